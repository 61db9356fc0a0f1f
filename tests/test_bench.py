"""Tests of bench.py and bench_scale.py: their commands run (scaled down, on the CPU) so that they
cannot rot, and the memory estimate of --dry_run holds against a measured step. bench.py's SmolLM2
rows run on a tiny random Llama checkpoint with a byte-level tokenizer (built here: everywhere), and
on the real SmolLM2-135M-Instruct where fetch.sh put it (else they skip). No timing is checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import bench_scale
import memory
import train_lm as T

ROOT = Path(__file__).parents[1]
ALGOS = [a for a, spec in T.ALGOS.items() if not spec.variant]


def test_gpu_command_runs_scaled_down_on_cpu():
    p = subprocess.run([sys.executable, str(ROOT / "bench_scale.py"), "--gpu", "--small"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stderr
    assert "decode, greedy" in p.stdout and "tokens/s" in p.stdout
    lines = p.stdout.splitlines()
    for algo in ("inpo", "nash_md_pg", "lana", "maio_pg", "sppo"):
        assert any(line.startswith(algo) and "s/step" in line for line in lines), algo


def test_memory_estimate_matches_a_measured_step():
    """One configuration of bench_scale's three (all three: `python bench_scale.py --memory`): the
    peak RSS of one LANA step in a fresh process is within ±15% of memory.memory's estimate."""
    model, flags = next(c for c in bench_scale.MEMORY if c[1]["algo"] == "lana")
    name = bench_scale.describe(model, flags)
    spec = json.dumps({"model": {"vocab_size": 32064, **model}, "flags": flags})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, str(ROOT / "bench_scale.py"), "--step-peak", spec],
                       cwd=ROOT, text=True, capture_output=True, timeout=300, check=True, env=env)
    r = json.loads(p.stdout.splitlines()[-1])
    assert 0.85 < r["measured"] / r["estimate"] < 1.15, (name, r)


def test_dry_run_shows_checkpointing_and_micro_batches(capsys):
    """--dry_run prints the estimate as set, with --grad_checkpoint and with one slot per
    micro-batch; at the paper's settings the last two fit a 24 GB GPU."""
    d = T.main(dict(model="phi3", dry_run=True))["lana"]
    out = capsys.readouterr().out
    assert "--grad_checkpoint" in out and "--micro_batches 4" in out and d["total"] > 24e9
    totals = [float(x) for x in out.splitlines()[-1].split()[1::2]]
    assert totals[1] < 24 and totals[2] < totals[1]


# --------------------------------------------------------------------------------------------------
# bench_scale.py --cpu-full: one LANA step in bfloat16 (the command runs at full size by hand only)

def test_cpu_full_runs_scaled_down():
    command = [
        sys.executable,
        str(ROOT / "bench_scale.py"),
        "--cpu-full",
        "--small",
        "--grad_checkpoint",
        "--micro_batches",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "--dry_run estimate" in out, out
    assert "in bfloat16" in out, out
    assert "LANA step, batch 4, 16 + 8 tokens" in out, out
    assert "--micro_batches 4" in out, out
    assert "peak RSS" in out, out
    assert "peak above the weights" in out, out


def test_cpu_full_estimate_is_dry_runs():
    """--cpu-full checks and prints what `train_lm.py --dry_run` prints for its config."""
    model_cfg, flags = bench_scale.full_flags(False, True, 4)
    est = memory.memory(*bench_scale.configs(model_cfg, flags), 2)
    given = dict(
        model="phi3",
        algo="lana",
        dtype="bfloat16",
        grad_checkpoint=True,
        micro_batches=4,
        dry_run=True,
    )
    assert est == T.main(given)["lana"]


def test_cpu_full_refuses_a_step_that_does_not_fit(monkeypatch, capsys):
    """The estimate is checked first: a step it says exceeds the free memory never starts."""
    monkeypatch.setattr(bench_scale, "meminfo", lambda field: 10**6)
    monkeypatch.setattr(bench_scale.subprocess, "run", None)          # the step: never reached
    with pytest.raises(SystemExit) as e:
        bench_scale.cpu_full(small=True)
    message = str(e.value.code)
    assert message.startswith("error: the estimate"), message
    assert "--grad_checkpoint" in message, message
    assert "--dry_run estimate" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# bench.py: the tiny model's rows, and the SmolLM2 rows (ours vs transformers on a folder)

def smoke(**change):
    """A BenchConfig of seconds: 4 new tokens, one timed repeat and one step, eager only."""
    steps = dict(batch_size=2, max_new_tokens=4, max_prompt_tokens=32)   # SmolLM2's
    tiny = dict(
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        step_intermediate=64,
        batch=2,
        new_tokens=4,
        forward_len=8,
        repeats=1,
        step_tokens=(4,),
        steps=1,
        compile=False,
        smollm2_flags=steps,
    )
    return bench.BenchConfig(**{**tiny, **change})


def test_tiny_rows_run(tmp_path):
    """The tiny model's decode and step rows (no TRL needed: its row says it was skipped)."""
    cfg = smoke()
    rows = bench.bench_generate(cfg, lambda: bench.tiny_pair(cfg, tmp_path))
    assert [r["name"] for r in rows] == ["generate greedy (B=2, 4 new)",
                                        "generate sample T=1 (B=2, 4 new)"]
    assert all(r["ratio"] > 0 for r in rows)
    steps = bench.bench_steps(cfg)
    assert len(steps) == len(ALGOS) and all(r["ours"] > 0 for r in steps)


def byte_level_llama(folder, vocab=400):
    """A tiny random Llama (tied embeddings, GQA) with a byte-level BPE tokenizer.json in
    SmolLM2's format (ChatML tokens 0-2, digits alone, then GPT-2's regex), trained here."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bench.PROMPTS.read_text().splitlines(), trainer)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_theta=1e5, tie_word_embeddings=True, initializer_range=0.1, pad_token_id=2,
        bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def smollm2_rows(folder, dtypes, tmp_path, only=None):
    """bench.py --smollm2 [--only ...] at a smoke size, through main: (decode rows, step rows), as
    the JSON file holds them."""
    cfg = smoke(smollm2=str(folder), dtypes=dtypes)
    bench.main(cfg, tmp_path / "bench.json", only=only)
    rows = json.loads((tmp_path / "bench.json").read_text())
    return [r for r in rows if r["unit"] == "tokens/s"], [r for r in rows if r["unit"] == "s/step"]


def check_rows(decode, steps, dtypes, algos=ALGOS):
    names = [r["name"] for r in decode]
    for dtype in dtypes:
        for B in (2, 1):
            assert f"SmolLM2 {dtype} generate greedy (B={B}, 4 new)" in names, names
            assert f"SmolLM2 {dtype} generate sample T=1 (B={B}, 4 new)" in names, names
    assert len(decode) == 4 * len(dtypes) and all(r["ratio"] > 0 for r in decode)
    assert all("greedy tokens as transformers" in r["notes"] for r in decode if "greedy" in
               r["name"])
    assert len(steps) == len(algos) * len(dtypes)
    for r in steps:
        assert r["ours"] > 0 and r["unit"] == "s/step" and "(B=2, 4 new)" in r["name"], r
        assert "sampled tokens/step" in r["notes"] and "stop ids off" in r["notes"], r


def test_smollm2_rows_on_a_tiny_llama(tmp_path):
    """Both dtypes; in float32 ours decodes greedily what transformers decodes."""
    folder = byte_level_llama(tmp_path)
    decode, steps = smollm2_rows(folder, ("float32", "bfloat16"), tmp_path)
    check_rows(decode, steps, ("float32", "bfloat16"))
    notes = {r["name"]: r["notes"] for r in decode}
    for B in (2, 1):
        greedy = notes[f"SmolLM2 float32 generate greedy (B={B}, 4 new)"]
        assert f"on {B} of {B} rows" in greedy, greedy


def test_smollm2_rows_on_the_real_model(smollm2_dir, tmp_path):
    """The decoding rows on the real folder (its tokenizer, its chat prompts); the steps run on
    the tiny Llama above (every algorithm on the real model: test_real_model.py)."""
    decode, steps = smollm2_rows(smollm2_dir, ("float32",), tmp_path, only=["generate"])
    check_rows(decode, steps, ("float32",), algos=[])


def test_smollm2_flag_without_the_model_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--smollm2",
                        str(tmp_path / "absent"), "--only", "none"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stdout == "", p
    assert "fetch.sh" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
