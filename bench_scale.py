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
    python bench_scale.py --cpu-full [--grad_checkpoint --micro_batches 4]
                                         # CPU: ONE LANA step at the paper's settings on the same
                                         # bf16 model: its time and peak RSS beside --dry_run's
                                         # estimate (refused when that exceeds free memory)
    python bench_scale.py --cpu-full --small ...     # the same, scaled down to seconds

A step is what train_lm.py's loop does (bench.train_step): the algorithm's step (sample, judge,
score, loss) and backward in --micro_batches chunks (one unless given), then AdamW, on a
tasks.ChatTask with synthetic prompts (the byte-level tiny tokenizer: no files needed) and no stop
ids, so every response has exactly max_new_tokens tokens.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak RSS of a fresh process,
with a fixed malloc mmap threshold so that freed tensors go back to the OS (glibc's adaptive
threshold keeps them, and the RSS then measures the allocator, not the step). The model is built
in its dtype (bfloat16 on CUDA and for --cpu-full): its weights are never held in float32 first.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial
from typing import Callable, NamedTuple

import torch

import memory
import plan
import train_lm
from bench import step_profile, train_step
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


@contextmanager
def default_dtype(dtype):
    """Tensors made in the block without a dtype are `dtype` (a model built in bf16 directly)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class Built(NamedTuple):
    model: GPT
    config: GPTConfig
    train: train_lm.TrainConfig
    task: ChatTask
    step: Callable        # () -> stats: one step as train_lm.train's loop takes it


def configs(model_cfg, flags):
    """The GPTConfig of a random model and the TrainConfig of a step's flags (sampling at
    temperature 1: the random model's; the cost of a step does not depend on it)."""
    c = GPTConfig(**{"block_size": 4096, "vocab_size": 32064, **model_cfg})
    cfg = plan.config(model="phi3", samples=1, temperature=1.0, **flags)
    return c, cfg


def build(model_cfg, flags, device, dtype):
    """A random model (in dtype) with the algorithm's adapters, its optimizer, a task of
    exact-length prompts, and a step (bench.train_step: micro-batches and gradient checkpointing as
    flags set them)."""
    c, cfg = configs(model_cfg, flags)
    algo = train_lm.ALGOS[cfg.algo]
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = GPT(c).eval()
    for a in algo.adapters:
        model.add_adapter(a, cfg.lora_rank, 2 * cfg.lora_rank)
    model.checkpointing = cfg.grad_checkpoint
    params = [p for a in algo.judges for p in model.lora_parameters(a)]     # the trained ones
    opt = torch.optim.AdamW(params, lr=1e-5)
    task = ChatTask(tiny_tokenizer(), ["x" * cfg.max_prompt_tokens] * 4, cfg.max_prompt_tokens)
    task.stop_ids = ()                                # every response: max_new_tokens tokens
    S = cfg.batch_size * cfg.samples
    gen = torch.Generator(device).manual_seed(0)
    k = torch.arange(S, device=device) % len(task.prompts)
    step = partial(train_step, model, task, cfg, k, gen, opt)
    return Built(model, c, cfg, task, step)


def step_peak(spec):
    """In a fresh process: one step on the CPU; prints the estimate and the measured peak above the
    start."""
    b = build(spec["model"], spec["flags"], "cpu", torch.float32)
    before = rss("VmRSS")
    reset_peak()
    b.step()
    est = memory.memory(b.config, b.train, 4)
    measured = rss("VmHWM") - before
    print(json.dumps({"measured": measured, "estimate": transient(est, b.model)}))


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                  # Linux: reset the peak RSS (VmHWM) to now


def transient(est, model):
    """memory.memory's bytes above the weights and the adapters' A, B (float32): the step's own."""
    adapters = 4 * sum(p.numel() for a in model.adapters for p in model.lora_parameters(a))
    return est["total"] - est["base"] - adapters


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
    b = build(model_cfg, dict(algo="inpo", **lengths), device, dtype)
    model, c = b.model, b.config
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
    model = b = None
    for algo, spec in train_lm.ALGOS.items():
        if spec.variant:                              # the same cost as the entry it varies
            continue
        b = None                                      # free the previous model first
        flags = dict(algo=algo, batch_size=B, **lengths)
        b = build(model_cfg, flags, device, dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        times = [timed(b.step, sync) for _ in range(3)]                # the first one warms up
        est = memory.memory(b.config, b.train, 2 if cuda else 4)
        peak = (torch.cuda.max_memory_allocated() - start) / 1e9 if cuda else float("nan")
        print(f"{algo:<11} {min(times[1:]):7.3f} s/step (warm-up {times[0]:.1f} s) | peak above "
              f"the weights {peak:6.2f} GB, estimate {transient(est, b.model) / 1e9:6.2f} GB "
              f"(--dry_run total {est['total'] / 1e9:.2f} GB)", flush=True)


# --------------------------------------------------------------------------------------------------
# --cpu-full: one LANA step at the paper's settings, Phi-3-mini size, bfloat16, on the CPU

def meminfo(field):
    """A /proc/meminfo field, bytes."""
    return int(next(s for s in open("/proc/meminfo") if s.startswith(field)).split()[1]) * 1024


def full_flags(small, grad_checkpoint, micro_batches):
    """The model and the train flags of --cpu-full: the paper's (LANA, batch 4, 256-token prompts,
    128 new tokens, LoRA r 16) on PHI3_MINI; --small: SMALL, 16 + 8 tokens."""
    P, N = (16, 8) if small else (256, 128)
    flags = dict(algo="lana", batch_size=4, max_prompt_tokens=P, max_new_tokens=N, lora_rank=16,
                 grad_checkpoint=grad_checkpoint, micro_batches=micro_batches, dtype="bfloat16")
    return SMALL if small else PHI3_MINI, flags


def cpu_full(small=False, grad_checkpoint=False, micro_batches=1):
    """--dry_run's estimate of the step first (memory.memory in bfloat16: at full size what
    `python train_lm.py --model phi3 --algo lana --dtype bfloat16 --dry_run` prints as set, given
    the same --grad_checkpoint and --micro_batches); a step whose estimate exceeds the memory
    available now is refused in one line. Else the step runs in a fresh process (full_step), with
    the malloc threshold of --memory."""
    model_cfg, flags = full_flags(small, grad_checkpoint, micro_batches)
    est = memory.memory(*configs(model_cfg, flags), 2)
    parts = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in est.items() if k != "total")
    print(f"--dry_run estimate: {est['total'] / 1e9:.3f} GB = {parts} (GB = 1e9)", flush=True)
    available = meminfo("MemAvailable")
    if est["total"] > available:
        sys.exit(f"error: the estimate {est['total'] / 1e9:.1f} GB exceeds the "
                 f"{available / 1e9:.1f} GB available; add --grad_checkpoint --micro_batches 4")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    spec = json.dumps(dict(small=small, grad_checkpoint=grad_checkpoint,
                           micro_batches=micro_batches))
    child = subprocess.run([sys.executable, __file__, "--full-step", spec], env=env,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    if child.returncode:                              # -9: the kernel's out-of-memory killer
        sys.exit(f"error: the step's process ended with exit status {child.returncode}")


def full_step(spec):
    """The child of --cpu-full: build the model in bfloat16, run one step, print its time (split as
    bench.py's profiles), the peak RSS and the estimate beside it."""
    model_cfg, flags = full_flags(**spec)
    start = rss("VmRSS")                              # torch imported, nothing built
    t0 = time.perf_counter()
    b = build(model_cfg, flags, "cpu", torch.bfloat16)
    built, peak_built = rss("VmRSS"), rss("VmHWM")
    print(f"built {model_cfg} in bfloat16 in {time.perf_counter() - t0:.0f} s: "
          f"{(built - start) / 1e9:.2f} GB, {torch.get_num_threads()} threads", flush=True)
    reset_peak()
    with step_profile(b.task) as prof:
        seconds = timed(b.step, lambda: None)
    peak = max(peak_built, rss("VmHWM"))
    est = memory.memory(b.config, b.train, 2)
    parts = " + ".join(f"{p} {s:.1f}" for p, s in prof.items())
    print(f"LANA step, batch 4, {flags['max_prompt_tokens']} + {flags['max_new_tokens']} tokens, "
          f"--grad_checkpoint {flags['grad_checkpoint']}, --micro_batches "
          f"{flags['micro_batches']}: {seconds:.1f} s ({parts} + the rest "
          f"{seconds - sum(prof.values()):.1f})")
    print(f"peak RSS {peak / 1e9:.2f} GB, {(peak - start) / 1e9:.2f} GB above the process's "
          f"start | --dry_run estimate {est['total'] / 1e9:.2f} GB")
    print(f"peak above the weights {(rss('VmHWM') - built) / 1e9:.2f} GB | estimate "
          f"{transient(est, b.model) / 1e9:.2f} GB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--memory", action="store_true",
                   help="CPU: peak RSS of one step vs the estimate")
    p.add_argument("--gpu", action="store_true",
                   help="the real-size run (CUDA; scaled down elsewhere)")
    p.add_argument("--cpu-full", action="store_true",
                   help="CPU: one LANA step at the paper's settings, Phi-3-mini size, bfloat16")
    p.add_argument("--small", action="store_true",
                   help="with --gpu or --cpu-full: a scaled-down model, on any device")
    p.add_argument("--grad_checkpoint", action="store_true", help="with --cpu-full: as train_lm's")
    p.add_argument("--micro_batches", type=int, default=1, choices=(1, 2, 4),
                   help="with --cpu-full: as train_lm's")
    p.add_argument("--step-peak", help=argparse.SUPPRESS)                 # the child of --memory
    p.add_argument("--full-step", help=argparse.SUPPRESS)                 # the child of --cpu-full
    a = p.parse_args()
    if a.step_peak:
        step_peak(json.loads(a.step_peak))
    if a.full_step:
        full_step(json.loads(a.full_step))
    if a.memory:
        check_memory()
    if a.gpu:
        gpu(a.small)
    if a.cpu_full:
        cpu_full(a.small, a.grad_checkpoint, a.micro_batches)
    if not (a.memory or a.gpu or a.step_peak or a.cpu_full or a.full_step):
        p.print_help()
