"""Benchmarks: ours vs the reference implementation on the same weights, in one process.

    python bench.py                      # forward and generation tokens/s, tiny random Phi-3, 2 threads
    python bench.py --json out/bench.json --load-rss

Each benchmark appends a result {name, ours, reference, ratio, unit} to one list (ratio > 1: ours is better);
add a benchmark by writing a function that returns such dicts and listing it in BENCHMARKS.
transformers is needed here (it is the reference), never by model.py.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model import GPT, generate


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class BenchConfig:
    threads: int = 2
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024
    vocab: int = 32064
    batch: int = 4
    prompt_len: int = 14
    new_tokens: int = 128
    forward_len: int = 128     # tokens per row in the forward benchmark
    repeats: int = 5
    rss_gb: float = 1.0        # checkpoint size for --load-rss
    clock: str = "wall"        # "wall" or "cpu" (process CPU time; use on a machine shared with other jobs)


def timed_pair(ours, reference, repeats, clock):
    """Median seconds of ours() and reference() over `repeats` runs each, after one warm-up run each. The runs
    alternate, so load from other processes on a shared machine hits both sides alike. clock: "wall"
    (time.perf_counter) or "cpu" (time.process_time: CPU seconds of this process, steadier on a busy machine)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    ours(), reference()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (reference, t_ref)):
            t0 = now()
            fn()
            times.append(now() - t0)
    return statistics.median(t_ours), statistics.median(t_ref)


def result(name, ours, reference, unit, higher_is_better=True):
    ratio = ours / reference if higher_is_better else reference / ours
    return dict(name=name, ours=ours, reference=reference, ratio=ratio, unit=unit)


def tiny_pair(cfg: BenchConfig, folder):
    """A random transformers Phi-3 and ours loaded from its saved folder (same weights)."""
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    hf_cfg = Phi3Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                        max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        tie_word_embeddings=False)
    hf = Phi3ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(folder)
    return hf, GPT.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- benchmarks
def bench_forward(cfg, hf, ours):
    x = torch.randint(3, cfg.vocab, (cfg.batch, cfg.forward_len))
    n = x.numel()
    with torch.no_grad():
        t_ours, t_ref = timed_pair(lambda: ours(x), lambda: hf(x), cfg.repeats, cfg.clock)
    return [result("forward (B=%d, T=%d)" % x.shape, n / t_ours, n / t_ref, "tokens/s")]


def bench_generate(cfg, hf, ours):
    """Exactly new_tokens per row (no stop tokens; HF forced with min_new_tokens), KV cache on both sides."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab, (cfg.batch, cfg.prompt_len), generator=g)
    n = cfg.batch * cfg.new_tokens
    out = []
    for name, temp in (("greedy", 0.0), ("sample T=1", 1.0)):
        kw = dict(do_sample=temp > 0, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                  pad_token_id=0, eos_token_id=None)
        if temp > 0:
            kw.update(temperature=temp, top_p=1.0, top_k=0)
        t_ours, t_ref = timed_pair(
            lambda: generate(ours, prompts.tolist(), max_new_tokens=cfg.new_tokens, temperature=temp, generator=g),
            lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), **kw), cfg.repeats, cfg.clock)
        out.append(result(f"generate {name} (B={cfg.batch}, prompt {cfg.prompt_len}, {cfg.new_tokens} new)",
                          n / t_ours, n / t_ref, "tokens/s"))
    return out


BENCHMARKS = [bench_forward, bench_generate]


# ---------------------------------------------------------------------------------------------------- load RSS
RSS_CHILD = """
import sys, time, torch
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
import model
base = hwm()
t0 = time.perf_counter()
m = model.GPT.from_pretrained(sys.argv[1])
touched = sum(float(p.sum()) for p in m.parameters())   # safetensors may hand out lazy mmap views: read them all
print(base, hwm(), time.perf_counter() - t0, sum(p.numel() * p.element_size() for p in m.parameters()))
"""


def bench_load_rss(cfg):
    """Peak RSS while loading a ~rss_gb GB float32 checkpoint in a fresh process, over the checkpoint size.
    Building on the meta device and reading tensor by tensor should give ~1x (a naive load gives 2x)."""
    from safetensors.torch import save_file
    hidden, inter, vocab = 2048, 5632, 32064
    per_layer = 4 * (hidden * 3 * hidden + hidden * hidden + 3 * hidden * inter + 2 * hidden)
    layers = max(1, int((cfg.rss_gb * 2**30 - 4 * 2 * vocab * hidden) // per_layer))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(dict(
            model_type="phi3", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)))
        sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden), "lm_head.weight": torch.randn(vocab, hidden),
              "model.norm.weight": torch.ones(hidden)}
        for i in range(layers):
            p = f"model.layers.{i}."
            sd.update({p + "input_layernorm.weight": torch.ones(hidden),
                       p + "post_attention_layernorm.weight": torch.ones(hidden),
                       p + "self_attn.qkv_proj.weight": torch.randn(3 * hidden, hidden),
                       p + "self_attn.o_proj.weight": torch.randn(hidden, hidden),
                       p + "mlp.gate_up_proj.weight": torch.randn(2 * inter, hidden),
                       p + "mlp.down_proj.weight": torch.randn(hidden, inter)})
        save_file(sd, str(Path(d) / "model.safetensors"))
        del sd
        size = (Path(d) / "model.safetensors").stat().st_size
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, d], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        base, peak, secs, weights = map(float, out.stdout.split()[-4:])
    ratio = (peak - base) / size
    print(f"load-rss: checkpoint {size / 2**30:.2f} GiB ({layers} layers), peak RSS growth "
          f"{(peak - base) / 2**30:.2f} GiB = {ratio:.2f}x the checkpoint, load {secs:.1f}s")
    # no reference side: report against the ideal 1.0x (ratio > 1 would mean better than holding it once)
    return [dict(name="load peak RSS / checkpoint size", ours=ratio, reference=1.0, ratio=1.0 / ratio, unit="x")]


# ---------------------------------------------------------------------------------------------------- main
def main(cfg: BenchConfig, json_path=None, load_rss=False):
    torch.set_num_threads(cfg.threads)
    print(f"bench: {cfg}")
    results = []
    with tempfile.TemporaryDirectory() as d:
        hf, ours = tiny_pair(cfg, d)
        print(f"tiny Phi-3: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
              f"torch {torch.__version__}, {cfg.threads} threads, {cfg.clock} clock, load {os.getloadavg()[0]:.1f}")
        for bench in BENCHMARKS:
            for r in bench(cfg, hf, ours):
                print(f"{r['name']:<58} ours {r['ours']:>9.1f}  ref {r['reference']:>9.1f} {r['unit']:<9}"
                      f"  ratio {r['ratio']:.2f}x")
                results.append(r)
    if load_rss:
        results += bench_load_rss(cfg)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(dict(config=vars(cfg), results=results), indent=2))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--load-rss", action="store_true", help="also measure peak RSS while loading a ~1 GB checkpoint")
    ap.add_argument("--new-tokens", type=int, default=BenchConfig.new_tokens)
    ap.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    ap.add_argument("--threads", type=int, default=BenchConfig.threads)
    ap.add_argument("--clock", choices=("wall", "cpu"), default=BenchConfig.clock)
    args = ap.parse_args()
    main(BenchConfig(new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads, clock=args.clock),
         args.json, args.load_rss)
