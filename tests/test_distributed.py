"""Tests of train_lm.py's scale-out paths: torchrun data parallelism (2 CPU processes, gloo) ends
with the same adapters as one process with the same global batch, only rank 0 writes; and the
--dry_run memory budget counts exactly the parameters of a real Phi-3."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memory as M
import plan as P
import train_lm as T
from model import GPT, GPTConfig, sequence_logprobs

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}   # 2 shared cores: threads
                                                                         # only contend
for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


def launch(out_dir, *args, ranks=1):
    """Start train_lm.py (one process, or torchrun with 2 ranks) on the toy game; returns the Popen.
    """
    cmd = (TORCHRUN if ranks == 2 else [sys.executable]) + [
        str(ROOT / "train_lm.py"), "--out_dir", str(out_dir), "--figure", "", "--log_every", "1",
        *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


def adapters(ckpt):
    return {p.parent.name: load_file(p) for p in sorted(ckpt.glob("*/adapter_model.safetensors"))}


def assert_same_adapters(a, b, atol=1e-5):
    """Equal within atol, except at most 1 element in 10,000 within 1e-3. Why: the two runs sum the
    same gradient in a different order (rounding ~1e-7), and Adam's first steps move each element by
    about ±lr whatever the size of its gradient, so an element whose gradient is a near-exact
    cancellation can take its sign from the rounding (seen: 1 of 39k elements off by 4e-5 at lr
    1e-3)."""
    a, b = adapters(a), adapters(b)
    assert a.keys() == b.keys() and a
    d = torch.cat([(a[name][key] - b[name][key]).abs().flatten() for name in a for key in a[name]])
    off = int((d > atol).sum())
    assert off <= d.numel() // 10_000 and d.max() < 1e-3, (off, d.max().item())


# ----------------------------------------------------------------------------------------- torchrun
def test_two_ranks_equal_one_rank(tmp_path):
    """Global batch 8 on 2 ranks == batch 8 in 1 process, for every algorithm (--algo all): the
    randomness is shard-invariant (each rank takes its slots of the global draws) and the gradients
    and logged statistics are averaged. Only rank 0 prints, logs and writes checkpoints."""
    args = ["--batch_size", 8, "--samples", 2, "--max_steps", 3, "--iter_steps", 2]
    one, two = launch(tmp_path / "one", *args), launch(tmp_path / "two", *args, ranks=2)
    out1, out2 = finish(one), finish(two)
    assert "2 processes" in out2 and out2.count("exact gap") == 1
    for algo in P.configs({}):                       # --algo all: every algorithm of the comparison
        run1, run2 = tmp_path / "one" / algo, tmp_path / "two" / algo
        assert_same_adapters(run1 / "ckpt_000003", run2 / "ckpt_000003")
        assert sorted(p.name for p in run2.iterdir()) == [
            "ckpt_000003", "log.jsonl", "plot.png", "run.json"]
        assert out2.count(f"{algo} step") == out1.count(f"{algo} step") == 3
        log1, log2 = ([json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()]
                      for r in (run1, run2))
        assert [r["step"] for r in log1] == [r["step"] for r in log2] == [0, 1, 2, 3]
        for r1, r2 in zip(log1, log2):   # the same global loss, statistics and exact gap each step
            for key in set(r1) - {"tok_s", "s_step"}:
                assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), (algo, key)


def test_resume_on_two_ranks_from_one_rank_checkpoint(tmp_path):
    """Every rank loads the same checkpoint: 2 steps in one process, then 2 more on 2 ranks == 4 in
    one process."""
    args = ["--algo", "inpo", "--batch_size", 4, "--samples", 2, "--no-cosine", "--iter_steps", 2]
    straight = launch(tmp_path / "a", *args, "--max_steps", 4)
    first = launch(tmp_path / "b", *args, "--max_steps", 2)
    finish(first)
    finish(launch(tmp_path / "b", *args, "--max_steps", 4, "--resume", ranks=2))
    finish(straight)
    assert_same_adapters(tmp_path / "a" / "inpo" / "ckpt_000004",
                         tmp_path / "b" / "inpo" / "ckpt_000004")


def test_uneven_global_batch_is_a_clear_error(tmp_path):
    p = launch(tmp_path, "--algo", "inpo", "--batch_size", 3, "--max_steps", 1, ranks=2)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert ("error: --batch_size 3 is the global batch and must be divisible "
            "by the number of processes (2)") in err
    assert not (tmp_path / "inpo").exists()


def test_shard_slices_tile_the_batch():
    assert [T.Shard(r, 2).mine(8) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    assert T.Shard().mine(8) == slice(0, 8)


# ------------------------------------------------------------------------------------ memory budget
PHI3_MINI = GPTConfig.from_name("phi3-mini")


def test_memory_counts_the_real_parameters():
    """base = the bytes of every weight of transformers' Phi-3 (bf16); adapters = float32 A, B plus
    gradients and AdamW's m, v for the trained ones, counted from our model's LoRA parameters."""
    c = GPTConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)
    model = GPT(c)
    model.add_adapter("policy", r=4, alpha=8)
    lora = sum(p.numel() for p in model.lora_parameters("policy"))
    cfg = P.config("inpo", model="phi3", lora_rank=4)           # policy (trained) + prev
    assert M.memory(c, cfg)["adapters"] == 4 * lora * 2 + 12 * lora
    transformers = pytest.importorskip("transformers")
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, pad_token_id=0,
        tie_word_embeddings=False)).to(torch.bfloat16)
    assert M.memory(c, cfg)["base"] == sum(p.numel() * p.element_size() for p in hf.parameters())


def test_phi3_mini_memory_per_algo():
    m = {a: M.memory(PHI3_MINI, P.config(a, model="phi3")) for a in T.ALGOS}
    assert m["lana"]["base"] == 7_642_159_104                   # 3.82B parameters in bf16
    lora = 4 * 25_165_824                                       # one r = 16 adapter, float32
    assert (m["lana"]["adapters"], m["inpo"]["adapters"], m["nash_md_pg"]["adapters"]) == \
        (2 * lora + 6 * lora, 2 * lora + 3 * lora, lora + 3 * lora)
    big = M.memory(PHI3_MINI, P.config("lana", model="phi3", batch_size=8))
    assert big["kv_cache"] == 2 * m["lana"]["kv_cache"] == 4 * m["inpo"]["kv_cache"]  # LANA: 4 rows
    # SPPO: INPO's adapters (policy, trained, and prev); y and K = 4 more samples of π_t per slot
    # (INPO: 2); y scored once without a graph (as Nash-MD-PG's y) and once with one (INPO: twice)
    sppo, inpo = m["sppo"], m["inpo"]
    assert sppo["adapters"] == inpo["adapters"] and 2 * sppo["kv_cache"] == 5 * inpo["kv_cache"]
    assert sppo["scoring"] == m["nash_md_pg"]["scoring"]
    assert 2 * sppo["activations"] == inpo["activations"]


def test_words_memory_shares_prompts_unless_checkpointed():
    """The words game scores each distinct prompt once, so it needs less than a row per prompt;
    --grad_checkpoint scores every row whole (model.sequence_logprobs): then it is the chat
    task's estimate for the same shapes."""
    flags = dict(model="smollm2", batch_size=3, samples=16, max_prompt_tokens=256, max_new_tokens=3)
    words, chat = (P.config("inpo", **flags, task=task) for task in ("words", "chat"))
    assert M.memory(PHI3_MINI, words)["activations"] < M.memory(PHI3_MINI, chat)["activations"]
    words, chat = (replace(cfg, grad_checkpoint=True) for cfg in (words, chat))
    assert M.memory(PHI3_MINI, words) == M.memory(PHI3_MINI, chat)


def test_dry_run_cli_reads_no_weights(tmp_path):
    """No weights anywhere (an empty HF cache): --dry_run still prints the budget from the phi3-mini
    preset."""
    env = {**ENV, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path)}
    env.pop("NANO_NASH_WEIGHTS", None)
    p = subprocess.run([sys.executable, str(ROOT / "train_lm.py"), "--model", "phi3", "--dry_run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "7.642 GB" in p.stdout and "total" in p.stdout


@pytest.mark.parametrize("dtype,dtype_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_activation_estimate_matches_autograd(dtype, dtype_bytes):
    """The activation term against the bytes autograd really keeps for sequence_logprobs on our
    model."""
    c = GPTConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                  intermediate_size=256)
    model = GPT(c).to(dtype)
    model.add_adapter("policy", r=8, alpha=16)
    params, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    B, L, N = 4, 64, 32                                 # batch, prompt and new tokens
    tokens = torch.randint(0, c.vocab_size, (B, L + N))
    resp = torch.zeros_like(tokens)
    resp[:, L:] = 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_logprobs(model, tokens, torch.ones_like(tokens), resp, "policy")
    # Nash-MD-PG: a graph on B·S rows
    cfg = P.config("nash_md_pg", model="phi3", batch_size=B, samples=1, max_prompt_tokens=L,
                   max_new_tokens=N, lora_rank=8)
    estimate = M.memory(c, cfg, dtype_bytes)["activations"]
    assert abs(estimate / sum(seen.values()) - 1) < 0.1, (estimate, sum(seen.values()))
