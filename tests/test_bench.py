"""Tests of bench_scale.py: the real-size command runs (scaled down, on the CPU) and the memory
estimate of --dry_run holds against a measured step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import bench_scale
import train_lm as T

ROOT = Path(__file__).parents[1]


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
