"""Fixtures shared by the test files."""
import os
import shutil
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parents[1] / ".." / "shared" / "assets"


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory):
    """A random Phi-3 with the real vocabulary (32064) and tokenizer.json, but hidden size 64 and 2
    layers."""
    tok = ASSETS / "phi3-tokenizer" / "tokenizer.json"
    if not tok.is_file():
        pytest.skip("../shared/assets/phi3-tokenizer/tokenizer.json not available")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4,
                                     max_position_embeddings=4096, pad_token_id=32000,
                                     tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("phi3_tiny")
    transformers.Phi3ForCausalLM(config).save_pretrained(folder)
    shutil.copy(tok, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct (Llama layout), where ../shared/assets/smollm2/fetch.sh put
    it: $NANO_NASH_SMOLLM2, else ~/.cache/nano-nash/smollm2-135m-instruct. Skips cleanly when it is
    absent."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    default = cache / "nano-nash" / "smollm2-135m-instruct"
    folder = Path(os.environ.get("NANO_NASH_SMOLLM2", default))
    if not (folder / ".complete").is_file():
        pytest.skip(f"SmolLM2-135M-Instruct not at {folder} "
                    "(run ../shared/assets/smollm2/fetch.sh)")
    return folder
