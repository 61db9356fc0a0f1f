"""Fixtures shared by the test files."""
import shutil
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parents[1] / ".." / "shared" / "assets"


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory):
    """A random Phi-3 with the real vocabulary (32064) and tokenizer.json, but hidden size 64 and 2 layers."""
    tok = ASSETS / "phi3-tokenizer" / "tokenizer.json"
    if not tok.is_file():
        pytest.skip("../shared/assets/phi3-tokenizer/tokenizer.json not available")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                     max_position_embeddings=4096, pad_token_id=32000,
                                     tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("phi3_tiny")
    transformers.Phi3ForCausalLM(config).save_pretrained(folder)
    shutil.copy(tok, folder / "tokenizer.json")
    return folder
