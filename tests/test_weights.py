"""Tests of weights.py: loading a Hugging Face Phi-3 folder (sharded, in the HF cache layout, both config.json
spellings); every refusal is a CheckpointError naming the file and the fix, raised before anything large is
allocated; LoRA adapters round-trip through PEFT's format in both directions. CPU, float32."""
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig
from test_model import V, hf_phi3, one_thread, pair, randomize       # noqa: F401 (fixtures shared)
from weights import (CheckpointError, find_checkpoint, load_adapter, load_phi3, model_name, read_config,
                     save_adapter)


def refused(call, *fragments):
    """call() raises CheckpointError whose message contains every fragment (file names, the fix)."""
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


# ----------------------------------------------------------------------------------------------------------
# loading

def test_sharded_checkpoint_loads_the_same(pair, tmp_path):
    hf, ours, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    model, folder = load_phi3(tmp_path)
    assert folder == tmp_path and same_model(model, ours) and not model.training


def test_loader_errors(pair, tmp_path):
    hf, _, folder = pair
    nope = tmp_path / "nope"
    refused(lambda: load_phi3(nope), nope, "does not exist", "huggingface-cli download")
    refused(lambda: load_phi3(tmp_path), tmp_path, "no config.json")
    sh = tmp_path / "sharded"
    hf.save_pretrained(sh, max_shard_size="50KB")
    shards = sorted(sh.glob("model-*-of-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    refused(lambda: load_phi3(sh), shards[1], "truncated or corrupt", "download it again")
    shards[1].write_bytes(b"")
    refused(lambda: load_phi3(sh), shards[1], "truncated or corrupt")
    shards[1].unlink()
    refused(lambda: load_phi3(sh), shards[1].name, "missing; re-run the download")
    bad = copy_of(folder, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    refused(lambda: load_phi3(bad), bad, "no model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    bad = copy_of(folder, tmp_path / "bad2")
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    refused(lambda: load_phi3(bad), bad / "model.safetensors", "shape", "config.json and weights disagree")
    long = {**cfg, "rope_parameters": None, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}}
    (bad / "config.json").write_text(json.dumps(long))
    refused(lambda: load_phi3(bad), bad / "config.json", "longrope", "not supported", "4k model")
    long = {**cfg, "rope_parameters": {**cfg["rope_parameters"], "rope_type": "longrope"}}
    (bad / "config.json").write_text(json.dumps(long))
    refused(lambda: load_phi3(bad), bad / "config.json", "longrope", "not supported")


def test_weights_missing_extra_or_not_float_or_not_finite(pair, tmp_path):
    _, _, folder = pair
    sd = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    bad = copy_of(folder, tmp_path / "bad")
    file = bad / "model.safetensors"
    cases = [({k: v for k, v in sd.items() if k != key}, [bad, "1 weights missing", key, "incomplete"]),
             ({**sd, "model.layers.9.mlp.extra.weight": torch.zeros(2)}, [file, "extra", "no such weight"])]
    for dtype in (torch.int64, torch.bool, torch.int8):
        cases.append(({**sd, key: sd[key].to(dtype)}, [file, key, "not floating point"]))
    for value in (float("nan"), float("inf"), float("-inf")):
        t = sd[key].clone()
        t[3, 5] = value
        cases.append(({**sd, key: t}, [file, key, "NaN or inf", "re-download"]))
    for state, fragments in cases:
        save_file(state, str(file))
        refused(lambda: load_phi3(bad), *fragments)
    save_file({**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, str(file))
    assert same_model(load_phi3(bad)[0], load_phi3(folder)[0])        # exports that save inv_freq: ignored
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(file))
    model, _ = load_phi3(bad, "cpu", torch.float32)                   # bf16 on disk, cast as it is read
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_index_json_must_name_files_inside_the_folder(pair, tmp_path):
    hf, _, _ = pair
    sh = tmp_path / "ckpt" / "sharded"
    hf.save_pretrained(sh, max_shard_size="50KB")
    index = sh / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    outside = tmp_path / "ckpt" / "x.safetensors"                       # a decoy where "../x" would lead
    shutil.copy(sorted(sh.glob("model-*.safetensors"))[0], outside)
    refused_maps = [{"metadata": {}},                                  # no weight_map
                    {"weight_map": ["model-00001.safetensors"]},
                    {"weight_map": {k: "../x.safetensors" for k in good["weight_map"]}},
                    {"weight_map": {**good["weight_map"], "lm_head.weight": "/etc/passwd"}},
                    {"weight_map": {**good["weight_map"], "lm_head.weight": str(outside)}},
                    {"weight_map": {**good["weight_map"], "lm_head.weight": 3}}]
    for bad in refused_maps:
        index.write_text(json.dumps(bad))
        refused(lambda: load_phi3(sh), index, "re-download")
    index.write_text("{not json")
    refused(lambda: load_phi3(sh), index)


# ----------------------------------------------------------------------------------------------------------
# config.json

def phi3_mini_config(**change):
    d = dict(model_type="phi3", vocab_size=32064, num_hidden_layers=32, num_attention_heads=32,
             hidden_size=3072, num_key_value_heads=32, intermediate_size=8192, max_position_embeddings=4096,
             rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5, sliding_window=2047,
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
    d = {k: v for k, v in phi3_mini_config(rope_theta=5e5).items() if k not in ("num_key_value_heads",
                                                                                "rms_norm_eps")}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = read_config(tmp_path / "config.json")
    assert (c.n_kv_head, c.norm_eps, c.rope_base) == (32, 1e-5, 5e5)
    del d["rope_theta"], d["sliding_window"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = read_config(tmp_path / "config.json")
    assert (c.rope_base, c.block_size) == (10000.0, 4096)


@pytest.mark.parametrize("key", ["vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
                                 "intermediate_size", "max_position_embeddings"])
def test_config_missing_key_is_named(tmp_path, key):
    """Was a KeyError traceback (issue 8, bug 2). num_key_value_heads may be absent (it defaults to
    num_attention_heads), so without num_attention_heads the message must name num_attention_heads."""
    d = {k: v for k, v in phi3_mini_config().items() if k not in (key, "num_key_value_heads")}   # optional
    (tmp_path / "config.json").write_text(json.dumps(d))
    refused(lambda: read_config(tmp_path / "config.json"), tmp_path / "config.json", repr(key), "missing")


def test_config_with_almost_nothing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "hidden_size": 64}))
    msg = refused(lambda: read_config(tmp_path / "config.json"), tmp_path / "config.json", "missing")
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
    """Every damaged value is a CheckpointError naming config.json, never a TypeError/OverflowError traceback
    or a config that builds a broken model (Python's json reads NaN, Infinity and huge integers)."""
    (tmp_path / "config.json").write_text(json.dumps(phi3_mini_config(**change)))
    refused(lambda: read_config(tmp_path / "config.json"), tmp_path / "config.json")


def test_config_not_a_json_object(tmp_path):
    file = tmp_path / "config.json"
    for raw in (b"{", b"[1, 2]", b"\xff\xfe{}", b"", b"null"):
        file.write_bytes(raw)
        refused(lambda: read_config(file), file, "re-download")


def test_absurd_sizes_are_refused_before_allocating(pair, tmp_path):
    """A config promising 100000 layers (or a 10^12 vocabulary) is refused at once: nothing is built."""
    _, _, folder = pair
    bad = copy_of(folder, tmp_path / "bad")
    cfg = json.loads((folder / "config.json").read_text())
    for change in (dict(num_hidden_layers=100000), dict(vocab_size=10 ** 12), dict(hidden_size=2 ** 40)):
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        t = time.perf_counter()
        refused(lambda: load_phi3(bad), bad / "config.json")
        assert time.perf_counter() - t < 0.5


# ----------------------------------------------------------------------------------------------------------
# the Hugging Face cache layout

def hf_cache(folder, root, revs=("old", "abc123"), ref="abc123"):
    repo = root / "models--microsoft--Phi-3-mini-4k-instruct"
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
        assert same_model(load_phi3(path)[0], ours)
    assert find_checkpoint(tmp_path) == find_checkpoint(repo) == repo / "snapshots" / "abc123"   # refs/main
    (repo / "refs" / "main").unlink()
    os.utime(repo / "snapshots" / "abc123", (0, 0))
    assert find_checkpoint(repo) == repo / "snapshots" / "old"         # no ref: the newest snapshot
    assert model_name(repo / "snapshots" / "old") == "microsoft/Phi-3-mini-4k-instruct"
    assert model_name(folder) == folder.name                           # never this machine's absolute path
    other = tmp_path / "models--org--other"
    other.mkdir()
    assert find_checkpoint(tmp_path).parent.parent == repo            # the Phi-3 repo among other models
    (tmp_path / "models--microsoft--Phi-3-mini-128k-instruct").mkdir()
    refused(lambda: find_checkpoint(tmp_path), tmp_path, "several models")


@pytest.mark.parametrize("ref", ["../../outside", "/etc", "../../../outside", "..", "."])
def test_hf_cache_refs_main_cannot_escape_the_snapshots(pair, tmp_path, ref):
    """refs/main holds a revision name; whatever it holds, the folder loaded is one of repo/snapshots/*
    (or a CheckpointError). Decoy checkpoints wait where a path in refs/main would lead."""
    _, _, folder = pair
    repo = hf_cache(folder, tmp_path / "cache", ref=ref)
    for decoy in (tmp_path / "outside", tmp_path / "cache" / "outside", repo):
        decoy.mkdir(exist_ok=True)
        shutil.copy(folder / "config.json", decoy / "config.json")
    try:
        got = find_checkpoint(tmp_path / "cache")                       # the cache root: repo is a decoy too
    except CheckpointError as e:
        assert str(repo / "refs" / "main") in str(e) or "config.json" in str(e)
        return
    assert got.resolve().parent == (repo / "snapshots").resolve(), got


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format

@pytest.fixture
def with_adapter(pair):
    """(model with a random adapter "policy", r=4, alpha=16)."""
    model = load_phi3(pair[2])[0]
    model.add_adapter("policy", r=4, alpha=16)
    randomize(model, "policy")
    return model


def test_adapter_round_trip_and_base_model_name(pair, with_adapter, tmp_path):
    _, _, folder = pair
    save_adapter(with_adapter, "policy", tmp_path / "ad", base_model="microsoft/Phi-3-mini-4k-instruct")
    text = (tmp_path / "ad" / "adapter_config.json").read_text()
    cfg = json.loads(text)
    assert cfg["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert str(tmp_path) not in text and str(folder) not in text and (cfg["r"], cfg["lora_alpha"]) == (4, 16)
    other = load_phi3(folder)[0]
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
    save_adapter(with_adapter, "policy", tmp_path / "ad", base_model="microsoft/Phi-3-mini-4k-instruct")
    x = torch.randint(3, V, (2, 10))
    want = with_adapter(x, adapters="policy")
    assert not torch.allclose(want, with_adapter(x), atol=1e-3)       # the adapter changes the logits
    hf_peft = peft.PeftModel.from_pretrained(hf_phi3(hf.config.num_key_value_heads), tmp_path / "ad").eval()
    hf_peft.load_state_dict(hf.state_dict(), strict=False)             # same base weights (the same seed)
    torch.testing.assert_close(hf_peft(x).logits, want, atol=1e-5, rtol=0)
    hf_peft.save_pretrained(tmp_path / "from_peft", save_embedding_layers=False)   # no hub lookup; and back
    load_adapter(with_adapter, "peft_copy", tmp_path / "from_peft")
    torch.testing.assert_close(with_adapter(x, adapters="peft_copy"), want, atol=1e-6, rtol=0)


def test_load_adapter_refusals(pair, with_adapter, tmp_path):
    """Each damaged adapter is refused with CheckpointError, and the model is left without a new adapter."""
    _, _, folder = pair
    good = tmp_path / "good"
    save_adapter(with_adapter, "policy", good, base_model="microsoft/Phi-3-mini-4k-instruct")
    sd = load_file(good / "adapter_model.safetensors")
    cfg = json.loads((good / "adapter_config.json").read_text())
    model = load_phi3(folder)[0]
    key_a = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    key_b = key_a.replace("lora_A", "lora_B")

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
        "inf": (damaged("inf", tensors={**sd, key_a: sd[key_a].clone().fill_(float("inf"))}), [key_a]),
        "integers": (damaged("int", tensors={**sd, key_a: sd[key_a].to(torch.int32)}), [key_a]),
        "not a LoRA key": (damaged("key", tensors={**sd, "base_model.model.lm_head.weight": torch.zeros(2)}),
                           ["lm_head", "not a LoRA weight"]),
        "DoRA": (damaged("dora", config={**cfg, "use_dora": True}), ["plain LoRA"]),
        "r a string": (damaged("rstr", config={**cfg, "r": "4"}), ["plain LoRA"]),
        "config a list": (damaged("cfg_list", config=[cfg]), []),
    }
    for name, (path, fragments) in cases.items():
        msg = refused(lambda: load_adapter(model, "x", path), path, *fragments)
        assert "x" not in model.adapters and not model.lora_layers()[0].lora_A, (name, msg)


def test_load_adapter_refuses_a_lora_B_without_its_lora_A(pair, with_adapter, tmp_path):
    """A layer whose file has B but not A would keep A's random init: the adapter loaded would not be the
    adapter saved (here the logits differ by ~1), silently. (A layer with neither keeps B = 0: allowed.)"""
    save_adapter(with_adapter, "policy", tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    del sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    model = load_phi3(pair[2])[0]
    refused(lambda: load_adapter(model, "x", tmp_path), tmp_path)
    assert "x" not in model.adapters
