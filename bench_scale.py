"""
bench_scale.py: training steps at real size: their time, and their peak memory against memory.memory
(the estimate that `python train_lm.py --dry_run` prints).

    python bench_scale.py --memory       # CPU: three configurations of 1-2 GB, one step of each
                                         # in a fresh process; its peak RSS against the estimate
    python bench_scale.py --gpu          # CUDA: a random Phi-3-mini-size model (3.8B, bf16; no
                                         # download) at the paper's settings (LoRA r 16, batch 4,
                                         # 256-token prompts, 128 new tokens): decode tokens/s
                                         # (ours, transformers on the same weights, the bandwidth
                                         # bound), s/step and peak memory of each train_lm.ALGOS
    python bench_scale.py --gpu --small  # the same run scaled down to seconds, on any device

A step is what train_lm.py's loop does with one micro-batch: the algorithm's step (sample, judge,
score, loss), backward and AdamW, on a tasks.ChatTask with synthetic prompts (the byte-level tiny
tokenizer: no files needed) and no stop ids, so every response has exactly max_new_tokens tokens.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak RSS of a fresh process,
with a fixed malloc mmap threshold so that freed tensors go back to the OS (glibc's adaptive
threshold keeps them, and the RSS then measures the allocator, not the step).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial

import torch

import memory
import plan
import train_lm
from model import GPT, GPTConfig, generate
from tasks import ChatTask
from tokenizer import tiny_tokenizer

PHI3_MINI = dict(vocab_size=32064, n_layer=32, n_head=32, n_kv_head=32, n_embd=3072,
                 intermediate_size=8192)
SMALL = dict(vocab_size=32064, n_layer=2, n_head=4, n_kv_head=4, n_embd=128, intermediate_size=256)
MEMORY = [   # (model, train flags): they differ in size, batch and length
    (dict(n_layer=8, n_head=8, n_kv_head=8, n_embd=512, intermediate_size=1408),
     dict(algo="inpo", batch_size=4, max_prompt_tokens=256, max_new_tokens=128)),
    (dict(n_layer=6, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048),
     dict(algo="lana", batch_size=2, max_prompt_tokens=384, max_new_tokens=64)),
    (dict(n_layer=4, n_head=16, n_kv_head=16, n_embd=1024, intermediate_size=2816),
     dict(algo="nash_md_pg", batch_size=8, max_prompt_tokens=128, max_new_tokens=256)),
]


def describe(model_cfg, flags):
    """A MEMORY row's name, e.g. "LANA, 768 x 6 layers (GQA), batch 2, 384 + 64 tokens"."""
    m, f = model_cfg, flags
    gqa = " (GQA)" if m["n_kv_head"] < m["n_head"] else ""
    return (f"{train_lm.ALGOS[f['algo']].label}, {m['n_embd']} x {m['n_layer']} layers{gqa}, "
            f"batch {f['batch_size']}, {f['max_prompt_tokens']} + {f['max_new_tokens']} tokens")


def rss(field):
    return int(next(s for s in open("/proc/self/status") if s.startswith(field)).split()[1]) * 1024


def build(model_cfg, flags, device, dtype):
    """A random model with the algorithm's adapters, its optimizer, a task of exact-length prompts,
    and a step."""
    cfg = plan.config(model="phi3", samples=1, temperature=1.0, **flags)
    c = GPTConfig(**{"block_size": 4096, "vocab_size": 32064, **model_cfg})
    algo = train_lm.ALGOS[cfg.algo]
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(c).to(dtype).eval()
    for a in algo.adapters:
        model.add_adapter(a, cfg.lora_rank, 2 * cfg.lora_rank)
    params = [p for a in algo.judges for p in model.lora_parameters(a)]     # the trained ones
    opt = torch.optim.AdamW(params, lr=1e-5)
    task = ChatTask(tiny_tokenizer(), ["x" * cfg.max_prompt_tokens] * 4, cfg.max_prompt_tokens)
    task.stop_ids = ()                                # every response: max_new_tokens tokens
    S = cfg.batch_size * cfg.samples
    gen = torch.Generator(device).manual_seed(0)
    k = torch.arange(S, device=device) % len(task.prompts)
    rng = partial(train_lm.uniforms, gen, S, slice(None))

    def step():
        loss, _ = algo.step(model, task, cfg, k, rng)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, c, cfg, step


def step_peak(spec):
    """In a fresh process: one step on the CPU; prints the estimate and the measured peak above the
    start."""
    model, c, cfg, step = build(spec["model"], spec["flags"], "cpu", torch.float32)
    before = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                  # Linux: reset the peak RSS (VmHWM) to now
    step()
    est = memory.memory(c, cfg, 4)
    params = 4 * sum(p.numel() for n in model.adapters for p in model.lora_parameters(n))
    measured = rss("VmHWM") - before
    print(json.dumps({"measured": measured, "estimate": est["total"] - est["base"] - params}))


def check_memory():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    rows = []
    for model_cfg, flags in MEMORY:
        name = describe(model_cfg, flags)
        spec = json.dumps({"model": {"vocab_size": 32064, **model_cfg}, "flags": flags})
        out = subprocess.run([sys.executable, __file__, "--step-peak", spec], env=env,
                             capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        r = json.loads(out.stdout.splitlines()[-1])
        measured, estimate = r["measured"] / 1e9, r["estimate"] / 1e9
        rows.append((name, measured, estimate))
        print(f"{name:<58} measured {measured:6.3f} GB  estimate {estimate:6.3f} GB  "
              f"ratio {measured / estimate:.2f}", flush=True)
    return rows


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def bandwidth(device, sync):
    """Measured device memory bandwidth, bytes/s: a 1 GiB copy (read + write) on CUDA."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * x.numel() * 4 / min(timed(lambda: y.copy_(x), sync) for _ in range(5))


def reference_decode(model, c, x, N, sync):
    """Seconds of transformers' greedy generate on the same weights and its version (or None and a
    note)."""
    try:
        import transformers
    except ImportError:
        return None, ", transformers not installed"
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=4096, pad_token_id=0, tie_word_embeddings=False))
    hf = hf.to(x.device, model.lm_head.weight.dtype).eval()
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    hf.load_state_dict(base, strict=False)

    def run():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N,
                    do_sample=False, pad_token_id=0)
    timed(run, sync)
    return min(timed(run, sync) for _ in range(3)), transformers.__version__


def gpu(small=False):
    """The real-size run: decode tokens/s against transformers and the bandwidth bound, then s/step
    and peak memory against the estimate for every algorithm at the paper's settings."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    model_cfg = SMALL if small or not cuda else PHI3_MINI
    P, N, B = (16, 8, 4) if small or not cuda else (256, 128, 4)
    where = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"torch {torch.__version__} on {where}; model {model_cfg}, {dtype}")
    lengths = dict(max_prompt_tokens=P, max_new_tokens=N)
    model, c, _, _ = build(model_cfg, dict(algo="inpo", **lengths), device, dtype)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "lora_" not in n)
    prompts = torch.randint(3, c.vocab_size, (B, P), generator=torch.Generator().manual_seed(0))

    def decode():
        generate(model, prompts.tolist(), N, temperature=0)
    timed(decode, sync)                                                   # warm-up
    ours = min(timed(decode, sync) for _ in range(3))
    line = (f"decode, greedy, batch {B}, {P}-token prompts, {N} new: ours {B * N / ours:.0f} "
            "tokens/s")
    ref, version = reference_decode(model, c, prompts.to(device), N, sync)
    if ref:
        line += f", transformers {version} {B * N / ref:.0f} tokens/s ({ref / ours:.2f}x)"
    else:
        line += version
    if cuda:
        bw = bandwidth(device, sync)
        line += (f"; bound {B * bw / weights:.0f} tokens/s = batch x {bw / 1e12:.2f} TB/s "
                 f"measured / {weights / 1e9:.2f} GB of weights")
    print(line, flush=True)
    model = None
    for algo, spec in train_lm.ALGOS.items():
        if spec.variant:                              # the same cost as the entry it varies
            continue
        model = step = None                           # free the previous model first
        flags = dict(algo=algo, batch_size=B, **lengths)
        model, c, cfg, step = build(model_cfg, flags, device, dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        times = [timed(step, sync) for _ in range(3)]                  # the first one warms up
        est = memory.memory(c, cfg, 2 if cuda else 4)
        peak = (torch.cuda.max_memory_allocated() - start) / 1e9 if cuda else float("nan")
        adapters = 4 * sum(p.numel() for a in model.adapters for p in model.lora_parameters(a))
        transient = (est["total"] - est["base"] - adapters) / 1e9
        print(f"{algo:<11} {min(times[1:]):7.3f} s/step (warm-up {times[0]:.1f} s) | peak above "
              f"the weights {peak:6.2f} GB, estimate {transient:6.2f} GB (--dry_run total "
              f"{est['total'] / 1e9:.2f} GB)", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--memory", action="store_true",
                   help="CPU: peak RSS of one step vs the estimate")
    p.add_argument("--gpu", action="store_true",
                   help="the real-size run (CUDA; scaled down elsewhere)")
    p.add_argument("--small", action="store_true",
                   help="with --gpu: a scaled-down model, on any device")
    p.add_argument("--step-peak", help=argparse.SUPPRESS)                 # the child of --memory
    a = p.parse_args()
    if a.step_peak:
        step_peak(json.loads(a.step_peak))
    if a.memory:
        check_memory()
    if a.gpu:
        gpu(a.small)
    if not (a.memory or a.gpu or a.step_peak):
        p.print_help()
