"""Tests of train_lm.py: the toy game converges (exact gap), resume is bit-exact, a NaN loss stops the run with the
last checkpoint intact, bad input gives one clear line, and the Phi-3 path runs end to end on a tiny random Phi-3
checkpoint with the real tokenizer (transformers builds the checkpoint; skipped when the asset is absent)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import nano_nash
import train_lm as T

ROOT = Path(__file__).parents[1]
ASSETS = ROOT / ".." / "shared" / "assets"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}   # 2 shared cores: threads only contend


def toy(tmp_path, **kw):
    return T.TrainConfig(out_dir=str(tmp_path), figure="", **{"log_every": 5, **kw})


def cli(*args, timeout=240):
    p = subprocess.run([sys.executable, str(ROOT / "train_lm.py"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=ENV)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------------- toy game
def test_toy_policy_is_the_constrained_sampler():
    """The enumerated table (sequence_logprobs, per-token renormalisation) sums to 1 and matches the frequencies of
    generate(allowed_tokens=...) for 2-token responses (n = 9), within 4 standard errors."""
    cfg = T.resolve(T.TrainConfig(max_new_tokens=2), "inpo")
    _, model, task = T.setup(cfg)
    pi = T.toy_pi(model, task, None)                                     # (K, 9)
    assert pi.shape == (4, 9) and np.allclose(pi.sum(1), 1)
    N = 3000
    k = torch.zeros(N, dtype=torch.long)
    r = T.sample(model, task, cfg, k, None, torch.Generator().manual_seed(0))
    freq = np.bincount(r.y.numpy(), minlength=9) / N
    assert np.all(np.abs(freq - pi[0]) < 4 * np.sqrt(pi[0] * (1 - pi[0]) / N) + 1e-3)


@pytest.mark.parametrize("algo", ["inpo", "nash_md"])
def test_toy_convergence(tmp_path, algo):
    """Shortened default run: the exact duality gap falls at least 3x (the full run: 10x, see the README)."""
    recs = T.main(toy(tmp_path, algo=algo, max_steps=150))[algo]
    gaps = [r["gap"] for r in recs if "gap" in r]
    assert gaps[-1] < gaps[0] / 3, gaps
    log = [json.loads(line) for line in (tmp_path / algo / "log.jsonl").read_text().splitlines()]
    assert "config" in log[0] and all({"step", "loss", "gap"} <= set(r) for r in log[1:-1])
    assert (tmp_path / algo / "plot.png").is_file()


# ---------------------------------------------------------------------------------------------------- checkpoints
def adapters(ckpt):
    return {p.parent.name: load_file(p) for p in sorted(ckpt.glob("*/adapter_model.safetensors"))}


@pytest.mark.parametrize("algo", ["inpo", "nash_md", "lana"])
def test_resume_is_bit_exact(tmp_path, monkeypatch, algo):
    """Interrupted at step 4 (checkpoint at 3) and resumed == straight through, every adapter torch.equal."""
    kw = dict(algo=algo, max_steps=6, samples=2, save_every=3, inpo_iter_steps=2)
    T.main(toy(tmp_path / "straight", **kw))
    step = T.STEP[algo]

    def crash(model, task, cfg, k, gen, i):
        if i == 4:
            raise KeyboardInterrupt
        return step(model, task, cfg, k, gen, i)
    monkeypatch.setitem(T.STEP, algo, crash)
    with pytest.raises(KeyboardInterrupt):
        T.main(toy(tmp_path / "resumed", **kw))
    monkeypatch.setitem(T.STEP, algo, step)
    assert T.latest_checkpoint(tmp_path / "resumed" / algo).name == "ckpt_000003"
    T.main(toy(tmp_path / "resumed", resume=True, **kw))
    a = adapters(tmp_path / "straight" / algo / "ckpt_000006")
    b = adapters(tmp_path / "resumed" / algo / "ckpt_000006")
    assert a.keys() == b.keys() == set(T.ADAPTERS[algo])
    for name in a:
        assert all(torch.equal(a[name][key], b[name][key]) for key in a[name])


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real, calls = nano_nash.inpo_loss, []

    def nan_at_step_5(*args, **kw):
        loss, stats = real(*args, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 6 else loss), stats
    monkeypatch.setattr(nano_nash, "inpo_loss", nan_at_step_5)
    with pytest.raises(T.UserError, match="non-finite loss .* at step 5.*ckpt_000004"):
        T.main(toy(tmp_path, algo="inpo", max_steps=10, samples=2, save_every=2))
    run = tmp_path / "inpo"
    assert [p.name for p in run.iterdir() if "ckpt" in p.name] == ["ckpt_000004"]
    assert torch.load(run / "ckpt_000004" / "state.pt", weights_only=True)["step"] == 4
    assert adapters(run / "ckpt_000004").keys() == {"policy", "prev"}


# ---------------------------------------------------------------------------------------------------- Phi-3 path
@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    """A random Phi-3 with the real vocabulary (32064) and tokenizer.json, but hidden size 64 and 2 layers."""
    tok = ASSETS / "phi3-tokenizer" / "tokenizer.json"
    if not tok.is_file():
        pytest.skip("../shared/assets/phi3-tokenizer/tokenizer.json not available")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                                     pad_token_id=32000, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("phi3_tiny")
    transformers.Phi3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    shutil.copy(tok, folder / "tokenizer.json")
    return folder


PHI3 = ["--model", "phi3", "--max_new_tokens", 6, "--batch_size", 2]


@pytest.mark.parametrize("algo", ["lana", "inpo", "nash_md"])
def test_phi3_end_to_end(phi3_dir, tmp_path, algo):
    extra = ["--judge_both_orders", "true", "--eval", "false"] if algo == "lana" else []
    rc, out, err = cli(*PHI3, "--weights", phi3_dir, "--algo", algo, "--max_steps", 2, "--out_dir", tmp_path, *extra)
    assert rc == 0, err
    assert out.count(f"{algo} step") == 2
    run = tmp_path / algo
    assert [p.name for p in run.glob("ckpt_*")] == ["ckpt_000002"]
    assert sorted(p.name for p in (run / "ckpt_000002").iterdir() if p.is_dir()) == sorted(T.ADAPTERS[algo])
    cfg = json.loads((run / "ckpt_000002" / "config.json").read_text())
    assert cfg["algo"] == algo and cfg["lr"] == 3e-4 and cfg["lora_rank"] == 16
    if algo == "lana":         # --eval: base-judged win rate with a CI, and AlpacaEval-format generations
        rc, out, err = cli(*PHI3, "--weights", phi3_dir, "--algo", algo, "--out_dir", tmp_path, "--eval", "true")
        assert rc == 0, err
        outputs = json.loads((run / "eval" / "model_outputs.json").read_text())
        assert len(outputs) == 8 and all(set(o) == {"instruction", "output", "generator"} for o in outputs)
        assert all(isinstance(o["output"], str) for o in outputs)
        res = json.loads((run / "eval" / "results.json").read_text())
        assert res["n"] == 8 and res["ci95"][0] <= res["win_rate"] <= res["ci95"][1]


# ---------------------------------------------------------------------------------------------------- bad input
def bad_inputs(phi3_dir, tmp):
    (tmp / "empty.jsonl").write_text("\n\n")
    (tmp / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    (tmp / "notphi3").mkdir()
    corrupt = tmp / "corrupt"
    shutil.copytree(phi3_dir, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:len(data) // 2])
    w = ["--model", "phi3", "--weights", phi3_dir]
    return {
        "unknown algo": (["--algo", "sppo"], "unknown --algo"),
        "zero batch": (["--batch_size", "0"], "--batch_size must be a positive integer"),
        "negative batch": (["--batch_size", "-2"], "--batch_size must be a positive integer"),
        "bad bool": (["--resume", "maybe"], "expected true or false"),
        "missing weights": (["--model", "phi3", "--weights", tmp / "nope"], "does not exist"),
        "wrong weights": (["--model", "phi3", "--weights", tmp / "notphi3"], "no config.json"),
        "corrupt shard": (["--model", "phi3", "--weights", corrupt], "truncated or corrupt"),
        "missing prompts": (w + ["--prompts", tmp / "nope.jsonl"], "not found"),
        "empty prompts": (w + ["--prompts", tmp / "empty.jsonl"], "holds no prompts"),
        "malformed prompts": (w + ["--prompts", tmp / "bad.jsonl"], "bad.jsonl:2: malformed"),
        "resume without checkpoint": (["--algo", "inpo", "--resume", "true", "--out_dir", tmp / "none"],
                                      "no checkpoint"),
        "eval without checkpoint": (["--algo", "inpo", "--eval", "true", "--out_dir", tmp / "none"], "no checkpoint"),
    }


def test_bad_input_one_line_error(phi3_dir, tmp_path):
    cases = bad_inputs(phi3_dir, tmp_path)
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "train_lm.py"), *map(str, args)], cwd=ROOT, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}                   # all at once: mostly interpreter start-up
    for name, p in procs.items():
        out, err = p.communicate(timeout=240)
        rc, message = p.returncode, cases[name][1]
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc != 0, name
        assert "Traceback" not in err + out, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, err)
