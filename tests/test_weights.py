"""Tests of weights.py: loading a Hugging Face Phi-3 folder (sharded, in the HF cache layout, both
config.json spellings); every refusal is a CheckpointError naming the file and the fix, raised
before anything large is allocated; LoRA adapters round-trip through PEFT's format in both
directions. Then the Llama layout on tiny random checkpoints built with transformers: loading
(fused q, k, v and gate, up; tied embeddings), the options we refuse, adapters in PEFT's Llama
names, and the merged export. CPU, float32. (The real SmolLM2: test_smollm2.py.)"""
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig
from test_model import V, hf_phi3, one_thread, pair, randomize       # noqa: F401 (fixtures shared)
from model import generate, left_pad
from weights import (CheckpointError, export_merged, find_checkpoint, load_adapter, load_model,
                     model_name, read_config, save_adapter)


def refused(call, *fragments):
    """call() raises CheckpointError whose message contains every fragment (file names, the
    fix)."""
    with pytest.raises(CheckpointError) as e:
        call()
    for f in fragments:
        assert str(f) in str(e.value), f"{f!r} not in {str(e.value)!r}"
    return str(e.value)


def copy_of(folder, to):
    shutil.copytree(folder, to)
    return to


def same_model(a, b, n=8):
    x = torch.arange(3, 3 + n)[None] % V
    return torch.equal(a(x), b(x))


# -------------------------------------------------------------------------------------------------
# loading

def test_sharded_checkpoint_loads_the_same(pair, tmp_path):
    hf, ours, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    model, folder = load_model(tmp_path)
    assert folder == tmp_path and same_model(model, ours) and not model.training


def test_loader_errors(pair, tmp_path):
    hf, _, folder = pair
    nope = tmp_path / "nope"
    refused(lambda: load_model(nope), nope, "does not exist", "huggingface-cli download")
    refused(lambda: load_model(tmp_path), tmp_path, "no config.json")
    sh = tmp_path / "sharded"
    hf.save_pretrained(sh, max_shard_size="50KB")
    shards = sorted(sh.glob("model-*-of-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    refused(lambda: load_model(sh), shards[1], "truncated or corrupt", "download it again")
    shards[1].write_bytes(b"")
    refused(lambda: load_model(sh), shards[1], "truncated or corrupt")
    shards[1].unlink()
    refused(lambda: load_model(sh), shards[1].name, "missing; re-run the download")
    bad = copy_of(folder, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    refused(lambda: load_model(bad), bad, "no model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    bad = copy_of(folder, tmp_path / "bad2")
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    refused(lambda: load_model(bad), bad / "model.safetensors", "shape",
            "config.json and weights disagree")
    longrope = {"type": "longrope", "short_factor": [1.0] * 8}
    long = {**cfg, "rope_parameters": None, "rope_scaling": longrope}
    (bad / "config.json").write_text(json.dumps(long))
    refused(lambda: load_model(bad), bad / "config.json", "longrope", "not supported", "4k model")
    long = {**cfg, "rope_parameters": {**cfg["rope_parameters"], "rope_type": "longrope"}}
    (bad / "config.json").write_text(json.dumps(long))
    refused(lambda: load_model(bad), bad / "config.json", "longrope", "not supported")


def test_weights_missing_extra_or_not_float_or_not_finite(pair, tmp_path):
    _, _, folder = pair
    sd = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    bad = copy_of(folder, tmp_path / "bad")
    file = bad / "model.safetensors"
    cases = [({k: v for k, v in sd.items() if k != key},
              [bad, "1 weights missing", key, "incomplete"]),
             ({**sd, "model.layers.9.mlp.extra.weight": torch.zeros(2)},
              [file, "extra", "no such weight"])]
    for dtype in (torch.int64, torch.bool, torch.int8):
        cases.append(({**sd, key: sd[key].to(dtype)}, [file, key, "not floating point"]))
    for value in (float("nan"), float("inf"), float("-inf")):
        t = sd[key].clone()
        t[3, 5] = value
        cases.append(({**sd, key: t}, [file, key, "NaN or inf", "re-download"]))
    for state, fragments in cases:
        save_file(state, str(file))
        refused(lambda: load_model(bad), *fragments)
    save_file({**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, str(file))
    # exports that save inv_freq: ignored
    assert same_model(load_model(bad)[0], load_model(folder)[0])
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(file))
    model, _ = load_model(bad, "cpu", torch.float32)          # bf16 on disk, cast as it is read
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_index_json_must_name_files_inside_the_folder(pair, tmp_path):
    hf, _, _ = pair
    sh = tmp_path / "ckpt" / "sharded"
    hf.save_pretrained(sh, max_shard_size="50KB")
    index = sh / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    outside = tmp_path / "ckpt" / "x.safetensors"            # a decoy where "../x" would lead
    shutil.copy(sorted(sh.glob("model-*.safetensors"))[0], outside)
    refused_maps = [{"metadata": {}},                                  # no weight_map
                    {"weight_map": ["model-00001.safetensors"]},
                    {"weight_map": {k: "../x.safetensors" for k in good["weight_map"]}},
                    {"weight_map": {**good["weight_map"], "lm_head.weight": "/etc/passwd"}},
                    {"weight_map": {**good["weight_map"], "lm_head.weight": str(outside)}},
                    {"weight_map": {**good["weight_map"], "lm_head.weight": 3}}]
    for bad in refused_maps:
        index.write_text(json.dumps(bad))
        refused(lambda: load_model(sh), index, "re-download")
    index.write_text("{not json")
    refused(lambda: load_model(sh), index)


# -------------------------------------------------------------------------------------------------
# config.json

def phi3_mini_config(**change):
    d = dict(model_type="phi3", vocab_size=32064, num_hidden_layers=32, num_attention_heads=32,
             hidden_size=3072, num_key_value_heads=32, intermediate_size=8192,
             max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
             rms_norm_eps=1e-5, sliding_window=2047,
             torch_dtype="bfloat16", tie_word_embeddings=False, hidden_act="silu")
    return {**d, **change}


def test_config_both_spellings(tmp_path):
    old = phi3_mini_config()
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    new.update(dtype="bfloat16", rope_parameters=dict(rope_theta=10000.0, rope_type="default",
                                                      partial_rotary_factor=1.0))
    for i, d in enumerate([old, new]):
        (tmp_path / f"{i}.json").write_text(json.dumps(d))
        want = GPTConfig(**{**GPTConfig.from_name("phi3-mini").__dict__, "block_size": 2047})
        assert read_config(tmp_path / f"{i}.json") == want


def test_config_optional_keys_take_their_defaults(tmp_path):
    optional = ("num_key_value_heads", "rms_norm_eps")
    d = {k: v for k, v in phi3_mini_config(rope_theta=5e5).items() if k not in optional}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = read_config(tmp_path / "config.json")
    assert (c.n_kv_head, c.norm_eps, c.rope_base) == (32, 1e-5, 5e5)
    del d["rope_theta"], d["sliding_window"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = read_config(tmp_path / "config.json")
    assert (c.rope_base, c.block_size) == (10000.0, 4096)


@pytest.mark.parametrize("key", ["vocab_size", "num_hidden_layers", "num_attention_heads",
                                 "hidden_size", "intermediate_size", "max_position_embeddings"])
def test_config_missing_key_is_named(tmp_path, key):
    """Was a KeyError traceback (issue 8, bug 2). num_key_value_heads may be absent (it defaults to
    num_attention_heads), so without num_attention_heads the message must name
    num_attention_heads."""
    # num_key_value_heads: optional
    d = {k: v for k, v in phi3_mini_config().items() if k not in (key, "num_key_value_heads")}
    file = tmp_path / "config.json"
    file.write_text(json.dumps(d))
    refused(lambda: read_config(file), file, repr(key), "missing")


def test_config_with_almost_nothing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "hidden_size": 64}))
    file = tmp_path / "config.json"
    msg = refused(lambda: read_config(file), file, "missing")
    required = ("vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "max_position_embeddings")
    assert any(repr(k) in msg for k in required)


BAD_CONFIGS = {
    "string": dict(hidden_size="3072"),
    "bool": dict(num_hidden_layers=True),
    "float for int": dict(num_attention_heads=32.5),
    "list": dict(vocab_size=[32064]),
    "null": dict(hidden_size=None),
    "negative": dict(intermediate_size=-8192),
    "zero heads": dict(num_attention_heads=0),
    "zero kv heads": dict(num_key_value_heads=0),
    "100000 layers": dict(num_hidden_layers=100000),
    "huge vocab": dict(vocab_size=10 ** 12),
    "huge hidden": dict(hidden_size=2 ** 40),
    "huge int beyond float": dict(max_position_embeddings=10 ** 400),
    "heads do not divide hidden": dict(num_attention_heads=7, num_key_value_heads=7),
    "kv heads do not divide heads": dict(num_key_value_heads=5),
    "more kv heads than heads": dict(num_key_value_heads=64),
    "odd head size": dict(hidden_size=96, num_attention_heads=32, num_key_value_heads=32),
    "eps string": dict(rms_norm_eps="1e-5"),
    "eps zero": dict(rms_norm_eps=0.0),
    "rope_theta negative": dict(rope_theta=-1.0),
    "rope_theta NaN": dict(rope_theta=float("nan")),
    "layers Infinity": dict(num_hidden_layers=float("inf")),
    "layers NaN": dict(num_hidden_layers=float("nan")),
    "sliding_window NaN": dict(sliding_window=float("nan")),
    "sliding_window negative": dict(sliding_window=-5),
    "rope_scaling a string": dict(rope_scaling="linear"),
    "partial rotary": dict(partial_rotary_factor=0.5),
    "not phi3": dict(model_type="llama"),
    "tied embeddings": dict(tie_word_embeddings=True),
    "gelu": dict(hidden_act="gelu"),
}


@pytest.mark.parametrize("change", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_config_bad_values_are_refused(tmp_path, change):
    """Every damaged value is a CheckpointError naming config.json, never a
    TypeError/OverflowError traceback or a config that builds a broken model (Python's json reads
    NaN, Infinity and huge integers)."""
    (tmp_path / "config.json").write_text(json.dumps(phi3_mini_config(**change)))
    refused(lambda: read_config(tmp_path / "config.json"), tmp_path / "config.json")


def test_config_not_a_json_object(tmp_path):
    file = tmp_path / "config.json"
    for raw in (b"{", b"[1, 2]", b"\xff\xfe{}", b"", b"null"):
        file.write_bytes(raw)
        refused(lambda: read_config(file), file, "re-download")


def test_absurd_sizes_are_refused_before_allocating(pair, tmp_path):
    """A config promising 100000 layers (or a 10^12 vocabulary) is refused at once: nothing is
    built."""
    _, _, folder = pair
    bad = copy_of(folder, tmp_path / "bad")
    cfg = json.loads((folder / "config.json").read_text())
    absurd = (dict(num_hidden_layers=100000), dict(vocab_size=10 ** 12), dict(hidden_size=2 ** 40))
    for change in absurd:
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        t = time.perf_counter()
        refused(lambda: load_model(bad), bad / "config.json")
        assert time.perf_counter() - t < 0.5


# -------------------------------------------------------------------------------------------------
# the Hugging Face cache layout

def hf_cache(folder, root, revs=("old", "abc123"), ref="abc123",
             repo="microsoft/Phi-3-mini-4k-instruct"):
    repo = root / ("models--" + repo.replace("/", "--"))
    for rev in revs:
        (repo / "snapshots" / rev).mkdir(parents=True)
        for f in folder.iterdir():
            (repo / "snapshots" / rev / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(ref)
    return repo


def test_hf_cache_layout(pair, tmp_path):
    _, ours, folder = pair
    repo = hf_cache(folder, tmp_path)
    for path in (tmp_path, repo, repo / "snapshots" / "old"):
        assert same_model(load_model(path)[0], ours)
    # refs/main
    assert find_checkpoint(tmp_path) == find_checkpoint(repo) == repo / "snapshots" / "abc123"
    (repo / "refs" / "main").unlink()
    os.utime(repo / "snapshots" / "abc123", (0, 0))
    assert find_checkpoint(repo) == repo / "snapshots" / "old"      # no ref: the newest snapshot
    assert model_name(repo / "snapshots" / "old") == "microsoft/Phi-3-mini-4k-instruct"
    assert model_name(folder) == folder.name        # never this machine's absolute path
    other = tmp_path / "models--org--other"
    other.mkdir()
    # the one model among folders that hold none (whatever the names)
    assert find_checkpoint(tmp_path).parent.parent == repo
    hf_cache(folder, tmp_path, repo="microsoft/Phi-3-mini-128k-instruct")
    refused(lambda: find_checkpoint(tmp_path), tmp_path, "several models")


@pytest.mark.parametrize("ref", ["../../outside", "/etc", "../../../outside", "..", "."])
def test_hf_cache_refs_main_cannot_escape_the_snapshots(pair, tmp_path, ref):
    """refs/main holds a revision name; whatever it holds, the folder loaded is one of
    repo/snapshots/* (or a CheckpointError). Decoy checkpoints wait where a path in refs/main would
    lead."""
    _, _, folder = pair
    repo = hf_cache(folder, tmp_path / "cache", ref=ref)
    for decoy in (tmp_path / "outside", tmp_path / "cache" / "outside", repo):
        decoy.mkdir(exist_ok=True)
        shutil.copy(folder / "config.json", decoy / "config.json")
    try:
        got = find_checkpoint(tmp_path / "cache")       # the cache root: repo is a decoy too
    except CheckpointError as e:
        assert str(repo / "refs" / "main") in str(e) or "config.json" in str(e)
        return
    assert got.resolve().parent == (repo / "snapshots").resolve(), got


# -------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format

@pytest.fixture
def with_adapter(pair):
    """(model with a random adapter "policy", r=4, alpha=16)."""
    model = load_model(pair[2])[0]
    model.add_adapter("policy", r=4, alpha=16)
    randomize(model, "policy")
    return model


def test_adapter_round_trip_and_base_model_name(pair, with_adapter, tmp_path):
    _, _, folder = pair
    save_adapter(with_adapter, "policy", tmp_path / "ad",
                 base_model="microsoft/Phi-3-mini-4k-instruct")
    text = (tmp_path / "ad" / "adapter_config.json").read_text()
    cfg = json.loads(text)
    assert cfg["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert str(tmp_path) not in text and str(folder) not in text
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 16)
    assert cfg["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    other = load_model(folder)[0]
    load_adapter(other, "loaded", tmp_path / "ad")
    assert other.adapters["loaded"] == (4, 16)
    assert all(torch.equal(p, q) for p, q in zip(other.lora_parameters("loaded"),
                                                  with_adapter.lora_parameters("policy")))
    x = torch.randint(3, V, (2, 10))
    assert torch.equal(other(x, adapters="loaded"), with_adapter(x, adapters="policy"))
    assert [n for n, p in other.named_parameters() if p.requires_grad] == \
        [n for n, p in other.named_parameters() if "lora_" in n]        # loading freezes the base


def test_adapter_loads_in_peft_and_back(pair, with_adapter, tmp_path):
    peft = pytest.importorskip("peft")
    hf, _, _ = pair
    save_adapter(with_adapter, "policy", tmp_path / "ad",
                 base_model="microsoft/Phi-3-mini-4k-instruct")
    x = torch.randint(3, V, (2, 10))
    want = with_adapter(x, adapters="policy")
    assert not torch.allclose(want, with_adapter(x), atol=1e-3)   # the adapter changes the logits
    base = hf_phi3(hf.config.num_key_value_heads)
    hf_peft = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    hf_peft.load_state_dict(hf.state_dict(), strict=False)     # same base weights (the same seed)
    torch.testing.assert_close(hf_peft(x).logits, want, atol=1e-5, rtol=0)
    # no hub lookup; and back
    hf_peft.save_pretrained(tmp_path / "from_peft", save_embedding_layers=False)
    load_adapter(with_adapter, "peft_copy", tmp_path / "from_peft")
    torch.testing.assert_close(with_adapter(x, adapters="peft_copy"), want, atol=1e-6, rtol=0)


def test_load_adapter_refusals(pair, with_adapter, tmp_path):
    """Each damaged adapter is refused with CheckpointError, and the model is left without a new
    adapter."""
    _, _, folder = pair
    good = tmp_path / "good"
    save_adapter(with_adapter, "policy", good, base_model="microsoft/Phi-3-mini-4k-instruct")
    sd = load_file(good / "adapter_model.safetensors")
    cfg = json.loads((good / "adapter_config.json").read_text())
    model = load_model(folder)[0]
    key_a = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")
    not_lora = "base_model.model.lm_head.weight"

    def damaged(name, tensors=sd, config=cfg, raw=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config))
        if raw is not None:
            (d / "adapter_model.safetensors").write_bytes(raw)
        elif tensors is not None:
            save_file(tensors, str(d / "adapter_model.safetensors"))
        return d
    data = (good / "adapter_model.safetensors").read_bytes()
    other_base = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=1, n_embd=64,
                               intermediate_size=96, block_size=128))
    other_base.add_adapter("policy", r=4, alpha=16)
    save_adapter(other_base, "policy", tmp_path / "other_base")
    nan = {**sd, key_b: sd[key_b].clone().fill_(float("nan"))}
    cases = {
        "missing folder": (tmp_path / "nope", [tmp_path / "nope", "missing or unreadable"]),
        "no weights file": (damaged("no_file", tensors=None), ["missing or unreadable"]),
        "truncated": (damaged("truncated", raw=data[: len(data) // 2]), ["missing or unreadable"]),
        "empty file": (damaged("empty", raw=b""), ["missing or unreadable"]),
        "another base": (tmp_path / "other_base", ["qkv_proj", "another base"]),
        "r of the config": (damaged("r8", config={**cfg, "r": 8}), ["shape"]),
        "NaN": (damaged("nan", tensors=nan), [key_b, "non-finite"]),
        "inf": (damaged("inf", tensors={**sd, key_a: sd[key_a].clone().fill_(float("inf"))}),
                [key_a]),
        "integers": (damaged("int", tensors={**sd, key_a: sd[key_a].to(torch.int32)}), [key_a]),
        "not a LoRA key": (damaged("key", tensors={**sd, not_lora: torch.zeros(2)}),
                           ["lm_head", "not a LoRA weight"]),
        "DoRA": (damaged("dora", config={**cfg, "use_dora": True}), ["plain LoRA"]),
        "r a string": (damaged("rstr", config={**cfg, "r": "4"}), ["plain LoRA"]),
        "config a list": (damaged("cfg_list", config=[cfg]), []),
    }
    for name, (path, fragments) in cases.items():
        msg = refused(lambda: load_adapter(model, "x", path), path, *fragments)
        assert "x" not in model.adapters and not model.lora_layers()[0].lora_A, (name, msg)


def test_load_adapter_refuses_a_lora_B_without_its_lora_A(pair, with_adapter, tmp_path):
    """A layer whose file has B but not A would keep A's random init: the adapter loaded would not
    be the adapter saved (here the logits differ by ~1), silently. (A layer with neither keeps
    B = 0: allowed.)"""
    save_adapter(with_adapter, "policy", tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    del sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    model = load_model(pair[2])[0]
    refused(lambda: load_adapter(model, "x", tmp_path), tmp_path)
    assert "x" not in model.adapters


# -------------------------------------------------------------------------------------------------
# the Llama layout (SmolLM2's): q, k, v and gate, up stored apart, tied embeddings

def llama_config(tied=True, **change):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1e5,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **change,
    )


def hf_llama(tied=True, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(tied)).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama(request, tmp_path_factory):
    """(HF Llama, our model loaded from its saved folder, folder); the folder also holds a
    tokenizer.json, for the export to copy."""
    hf = hf_llama(request.param)
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"a tokenizer": "copied as it is"}')
    return hf, load_model(folder)[0], folder


def same_logits(hf, ours, adapters=None):
    """Ours equal transformers' on random tokens, and on the real tokens of a padded batch."""
    x = torch.randint(3, V, (2, 20))
    want = ours(x, adapters=adapters)
    torch.testing.assert_close(hf(x).logits, want, atol=1e-5, rtol=0)
    rows = [[1, 5, 9, 14, 3, 7], [1, 40], [1, 22, 23, 24]]
    toks, mask = left_pad(rows, 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ref = hf(toks, attention_mask=mask, position_ids=pos).logits
    got = ours(toks, adapters=adapters, mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    return want


def same_greedy(hf, ours, adapters=None):
    p = [1, 5, 9, 14]
    ref = hf.generate(
        torch.tensor([p]),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    toks, _, _ = generate(ours, [p], max_new_tokens=16, temperature=0, adapters=adapters)
    assert toks.tolist() == ref.tolist()


def test_llama_logits_and_greedy_match_transformers(llama):
    hf, ours, _ = llama
    c = ours.config
    tied = hf.config.tie_word_embeddings
    got = (c.model_type, c.tie_embeddings, c.rope_base, c.n_kv_head)
    assert got == ("llama", tied, 1e5, 2)
    # tied: one Parameter, held once
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == hf.num_parameters()
    same_logits(hf, ours)
    same_greedy(hf, ours)


def test_llama_sharded_and_a_tensor_in_two_shards(llama, tmp_path):
    """Each tensor is read from the shard the index names; one that is also in another shard is
    refused (which copy is right?)."""
    hf, ours, _ = llama
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert same_model(load_model(tmp_path)[0], ours)
    first = load_file(shards[0])
    key = sorted(first)[0]
    last = load_file(shards[-1])
    last[key] = first[key]
    save_file(last, str(shards[-1]), metadata={"format": "pt"})
    refused(lambda: load_model(tmp_path), shards[-1], key, "two shards", "re-download")


def test_llama_in_the_hf_cache_layout(llama, tmp_path):
    _, ours, folder = llama
    repo = hf_cache(folder, tmp_path, repo="HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "models--org--not-a-model").mkdir()
    snapshot = repo / "snapshots" / "abc123"
    assert find_checkpoint(tmp_path) == find_checkpoint(repo) == snapshot
    assert model_name(snapshot) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert same_model(load_model(tmp_path)[0], ours)


def test_llama_weights_missing_or_misnamed(llama, tmp_path):
    _, ours, folder = llama
    sd = load_file(folder / "model.safetensors")
    bad = copy_of(folder, tmp_path / "bad")
    file = bad / "model.safetensors"
    if ours.config.tie_embeddings:          # a tied copy of the output layer, as some exports save
        embedding = sd["model.embed_tokens.weight"]
        save_file({**sd, "lm_head.weight": embedding.clone()}, str(file))
        assert same_model(load_model(bad)[0], ours)
    key = "model.layers.1.self_attn.k_proj.weight"
    without = {k: v for k, v in sd.items() if k != key}
    save_file(without, str(file))
    refused(lambda: load_model(bad), bad, "1 weights missing", key, "not a llama model")
    fused = "model.layers.1.self_attn.qkv_proj.weight"         # our name, not Llama's
    save_file({**sd, fused: torch.zeros(128, 64)}, str(file))
    refused(lambda: load_model(bad), file, fused, "no such weight")
    save_file({**sd, key: sd[key][:16]}, str(file))
    refused(lambda: load_model(bad), file, key, "(16, 64)", "(32, 64)")


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# each option of a Llama config.json that GPT does not implement -> what the refusal names
UNSUPPORTED = {
    "linear rope": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
    "llama3 rope": (dict(rope_scaling=LLAMA3_ROPE), "llama3"),
    "dynamic rope": (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
    "attention bias": (dict(attention_bias=True), "attention_bias"),
    "mlp bias": (dict(mlp_bias=True), "mlp_bias"),
    "sliding window": (dict(sliding_window=64), "sliding_window"),
    "head_dim": (dict(head_dim=32), "head_dim"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act"),
}


@pytest.mark.parametrize("change, named", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_llama_options_we_do_not_implement_are_refused(llama, tmp_path, change, named):
    """config.json as transformers writes it with the option set: one CheckpointError naming the
    file and the option, before any weight is read."""
    _, _, folder = llama
    bad = copy_of(folder, tmp_path / "bad")
    llama_config(**change).save_pretrained(bad)
    refused(lambda: load_model(bad), bad / "config.json", named, "not")


def test_llama_default_rope_parameters_beside_a_linear_rope_scaling(llama, tmp_path):
    """Older and newer spellings in one file: the scaling one is not hidden by the default one."""
    _, _, folder = llama
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "linear", "factor": 4.0}
    assert cfg["rope_parameters"]["rope_type"] == "default"
    file = tmp_path / "config.json"
    file.write_text(json.dumps(cfg))
    refused(lambda: read_config(file), file, "rope_scaling", "linear", "not supported")
    cfg = {**cfg, "model_type": "mistral", "rope_scaling": None}
    file.write_text(json.dumps(cfg))
    refused(lambda: read_config(file), file, "mistral", "phi3", "llama")


@pytest.fixture
def llama_adapter(llama):
    """A fresh model with a random adapter "policy" (r=4, alpha=16: B is not 0)."""
    model = load_model(llama[2])[0]
    model.add_adapter("policy", r=4, alpha=16)
    randomize(model, "policy")
    return model


def same_adapter(model, a, b):
    pairs = zip(model.lora_parameters(a), model.lora_parameters(b))
    return all(torch.equal(p, q) for p, q in pairs)


def test_llama_adapter_in_peft_names_loads_in_peft_and_back(llama, llama_adapter, tmp_path):
    """A LoRA on our fused qkv_proj (gate_up_proj) is saved as q, k, v (gate, up) LoRAs sharing A,
    B split by rows: peft on transformers' LlamaForCausalLM gives our logits, and both our file and
    peft's re-save load back as the same adapter."""
    peft = pytest.importorskip("peft")
    hf, _, _ = llama
    save_adapter(llama_adapter, "policy", tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg["target_modules"] == targets
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    at = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    assert torch.equal(sd[at.format("q_proj", "A")], sd[at.format("v_proj", "A")])
    rows = [sd[at.format(p, "B")].shape[0] for p in ("q_proj", "k_proj", "v_proj")]
    assert rows == [64, 32, 32]
    base = hf_llama(hf.config.tie_word_embeddings)                  # the same seed: same weights
    hf_peft = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    want = same_logits(hf_peft, llama_adapter, adapters="policy")
    x = torch.randint(3, V, (2, 20))
    assert not torch.allclose(want, llama_adapter(x), atol=1e-3)   # the adapter changes logits
    hf_peft.save_pretrained(tmp_path / "from_peft", save_embedding_layers=False)
    for i, ad in enumerate([tmp_path / "ad", tmp_path / "from_peft"]):
        load_adapter(llama_adapter, f"copy{i}", ad)
        assert llama_adapter.adapters[f"copy{i}"] == (4, 16)
        assert same_adapter(llama_adapter, f"copy{i}", "policy")


def test_llama_adapter_with_separate_lora_A_is_refused(llama, tmp_path):
    """peft's own LoRA on q, k, v has three A's: no adapter of rank r on the fused layer equals
    it, so it is refused (naming the layers), not approximated."""
    peft = pytest.importorskip("peft")
    hf, _, folder = llama
    targets = ["q_proj", "k_proj", "v_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    base = hf_llama(hf.config.tie_word_embeddings)
    peft.get_peft_model(base, config).save_pretrained(tmp_path)
    model = load_model(folder)[0]
    refused(lambda: load_adapter(model, "x", tmp_path), tmp_path, "lora_A", "cannot fuse")
    assert "x" not in model.adapters


@pytest.mark.parametrize("layout", ["llama", "phi3"])
def test_export_merged_loads_in_transformers(llama, pair, tmp_path, layout):
    """base + adapter, merged and written in the source's layout: transformers loads it and gives
    the adapted model's logits and greedy tokens; config.json and tokenizer files come along, a
    tied output layer stays tied (stored once), and the model itself is unchanged."""
    transformers = pytest.importorskip("transformers")
    folder = llama[2] if layout == "llama" else pair[2]
    model = load_model(folder)[0]
    model.add_adapter("policy", r=4, alpha=16)
    randomize(model, "policy")
    model.copy_adapter("policy", "before")
    out = tmp_path / "merged"
    export_merged(model, "policy", folder, out)
    assert same_adapter(model, "policy", "before")                 # the model is unchanged
    assert same_model(model, load_model(folder)[0])
    for name in ("config.json", "tokenizer.json"):
        if (folder / name).exists():
            assert (out / name).read_bytes() == (folder / name).read_bytes()
    names = set(load_file(out / "model.safetensors"))
    assert names == set(load_file(folder / "model.safetensors"))   # the source's names
    assert ("lm_head.weight" in names) != model.config.tie_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    same_logits(hf, model, adapters="policy")
    same_greedy(hf, model, adapters="policy")
    tiny = GPT(GPTConfig.from_name("tiny"))
    refused(lambda: export_merged(tiny, None, folder, out), folder / "config.json",
            "not this model's config")
