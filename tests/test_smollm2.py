"""Tests on the real SmolLM2-135M-Instruct (Llama layout, tied embeddings; the 4-bit build,
dequantized, that ../shared/assets/smollm2/fetch.sh puts in a folder): our GPT loaded by weights.py
gives transformers' logits, decodes greedily what the asset README lists, its adapters load in
peft and back, and a merged export loads in transformers and decodes as ours does. They skip
cleanly without the model (the smollm2_dir fixture). CPU, float32."""
import json

import pytest
import torch
from safetensors import safe_open

from model import generate, left_pad
from test_model import randomize
from weights import export_merged, load_adapter, load_model, save_adapter

transformers = pytest.importorskip("transformers")

IM_END = 2          # <|im_end|>: the end of an answer, and the pad id
QUESTIONS = ["What is the capital of France?", "Rock, paper or scissors?"]
# the asset README's: the first prompt's ids, and each prompt's greedy answer (32 new tokens, stop
# at <|im_end|>), from transformers on this folder
FRANCE = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
ANSWERS = [
    [504, 3575, 282, 4649, 314, 7042, 30, 2],
    [504, 4187, 282, 4022, 28, 1941, 355, 25374, 5552, 335, 260, 1212, 506, 12916, 30, 1094, 346,
     2316, 253, 4022, 10136, 28, 346, 2316, 2003, 288, 4640, 25374, 30, 1094, 346, 2316],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def chats(tok):
    """The two README prompts in ChatML, as token ids."""
    texts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
    ids = [tok.encode(t).ids for t in texts]
    assert ids[0] == FRANCE
    return ids


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir)[0]


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture
def adapted(smollm2_dir):
    """A model of its own with a random adapter "policy" (B is not 0)."""
    model = load_model(smollm2_dir)[0]
    model.add_adapter("policy", r=8, alpha=16)
    randomize(model, "policy", scale=0.02)
    return model


def padded(tok, chats):
    """The two chats and two plain texts, left-padded: tokens, mask, RoPE positions."""
    texts = ["def f(x):\n    return 2 * x", "Bonjour"]
    rows = chats + [tok.encode(t).ids for t in texts]
    tokens, mask = left_pad(rows, IM_END)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return tokens, mask, positions


def assert_same_logits(hf_model, model, tok, chats, adapters=None):
    """Logits on every real token of a padded batch, ours against transformers', to 1e-4."""
    tokens, mask, pos = padded(tok, chats)
    with torch.no_grad():
        ref = hf_model(tokens, attention_mask=mask, position_ids=pos).logits
        got = model(tokens, adapters=adapters, mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)
    return got[real]


def answers(model, chats, adapters=None):
    """Greedy answers, batched: up to 32 new tokens each, stopping at <|im_end|> (kept)."""
    tokens, _, resp = generate(
        model,
        chats,
        32,
        adapters=adapters,
        temperature=0,
        stop_ids=[IM_END],
        pad_id=IM_END,
    )
    rows = zip(tokens, resp)
    return [t[r.bool()].tolist() for t, r in rows]


def test_loads_as_the_readme_says(ours, hf):
    c = ours.config
    assert c.model_type == "llama"
    assert (c.n_layer, c.n_head, c.n_kv_head) == (30, 9, 3)
    assert (c.n_embd, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert (c.rope_base, c.tie_embeddings) == (1e5, True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight       # tied: held once
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == hf.num_parameters()


def test_logits_equal_transformers(ours, hf, tok, chats):
    assert_same_logits(hf, ours, tok, chats)


def test_greedy_decoding_equals_the_readme(ours, chats):
    assert answers(ours, chats) == ANSWERS


def test_adapter_round_trip_through_peft(adapted, smollm2_dir, tok, chats, tmp_path):
    """Our adapter on the fused qkv_proj / gate_up_proj, saved as q, k, v / gate, up LoRAs sharing
    A: peft on transformers' LlamaForCausalLM gives our logits, and peft's re-save loads back as
    the same adapter."""
    peft = pytest.importorskip("peft")
    save_adapter(adapted, "policy", tmp_path / "ad",
                 base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    base = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir)
    hf_peft = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    got = assert_same_logits(hf_peft, adapted, tok, chats, adapters="policy")
    with torch.no_grad():
        tokens, mask, _ = padded(tok, chats)
        plain = adapted(tokens, mask=mask)[mask.bool()]
    assert (got - plain).abs().max() > 1e-2                 # the adapter changes the logits
    hf_peft.save_pretrained(tmp_path / "from_peft", save_embedding_layers=False)
    load_adapter(adapted, "back", tmp_path / "from_peft")
    pairs = zip(adapted.lora_parameters("back"), adapted.lora_parameters("policy"))
    assert all(torch.equal(p, q) for p, q in pairs)


def test_merged_export_decodes_in_transformers_as_ours(adapted, smollm2_dir, tok, chats,
                                                       tmp_path):
    """The base with the adapter merged in, written in SmolLM2's own layout (q, k, v apart, the
    output layer tied, its config.json and tokenizer files): transformers loads it, gives the
    adapted model's logits, and greedy-decodes it token for token as we do."""
    out = tmp_path / "merged"
    export_merged(adapted, "policy", smollm2_dir, out)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        assert names == set(f.keys()) and "lm_head.weight" not in names
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ref = []
    for p in chats:
        ids = hf.generate(
            torch.tensor([p]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=IM_END,
            pad_token_id=IM_END,
        )
        ref.append(ids[0, len(p):].tolist())
    assert answers(adapted, chats, adapters="policy") == ref
    assert ref != ANSWERS                                   # the adapter changed the answers
    # logits: against ours merged the same way ((W + ΔW) x, not W x + B (A x): other round-off)
    with torch.no_grad():
        for layer in adapted.lora_layers():
            layer.weight += adapted.lora_delta(layer, "policy")
    assert_same_logits(hf, adapted, tok, chats)
