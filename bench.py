"""Benchmarks: ours vs the reference implementation on the same weights, in one process.

    python bench.py --json out/bench.json          # forward, generation, training steps; tiny random Phi-3, 2 threads
    python bench.py --quick                        # fast sanity run (short sequences, 2 repeats, one TRL step)
    python bench.py --step-tokens 32 128           # training steps at T = 32 and 128 new tokens (TRL: minutes)
    .venv-bench/bin/python bench.py                # with TRL (requirements-bench.txt): the Nash-MD-PG step's peer

Each benchmark appends a result {name, ours, reference, ratio, unit, notes} to one list (ratio > 1: ours is
better; reference and ratio are null where no peer exists); add a benchmark by writing a function that returns
such dicts and listing it in BENCHMARKS. transformers is needed here (it is the reference), never by model.py;
trl is imported only when present (bench_trl.py), else its rows are skipped with a note.

Training steps run train_lm.py's own step functions (STEP[algo]) plus the optimizer step that train() does, on a
Task built here: the same tiny Phi-3 as TRL's side (bench_trl.phi3_config), LoRA adapters, batch 4, 14-token
prompts, exactly T new tokens (stop ids off), the model judging itself; same shapes as TRL's side but not the
same random weights, and always the wall clock (TRL's timer is). The profile splits each step into
generation (train_lm.sample), judging (train_lm.judge), log-prob forwards (train_lm.logprobs) and the rest
(loss, backward, optimizer), by timing those functions in place.
"""
import argparse
import importlib.util
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

import train_lm
from model import GPT, GPTConfig, generate
from tokenizer import load_tokenizer, tiny_tokenizer

PHI3_TOKENIZER = Path(__file__).resolve().parent / ".." / "shared" / "assets" / "phi3-tokenizer"


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
    step_tokens: tuple = (32,) # new tokens T of the training-step benchmarks (TRL at 128: ~20 s/step and more)
    step_intermediate: int = 683   # TRL side's Phi-3 ratio 8192/3072 at hidden 256 (bench_trl.phi3_config)
    steps: int = 5             # timed training steps per algorithm (after one warm-up step)
    trl_steps: int = 3         # timed TRL steps (after one warm-up step)
    mix_beta: float = 0.5      # Nash-MD mixture coefficient (TRL's mixture_coef default)
    temperature: float = 0.9   # TRL's default sampling temperature
    tau: float = 0.1           # Nash-MD-PG's KL coefficient (TRL's beta default); LANA, INPO: the phi3 presets


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


# ---------------------------------------------------------------------------------------------------- training steps
class NoStopTokenizer:
    """The tokenizer with stop_ids = (): every response has exactly max_new_tokens tokens, as TRL's min_new_tokens
    forces on the reference side (a random model would otherwise stop at random)."""
    stop_ids = ()

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)


def step_task(cfg, n_prompts):
    """A real-run Task (P = None: the model judges itself) with n_prompts chat prompts of exactly prompt_len ids."""
    have_phi3 = (PHI3_TOKENIZER / "tokenizer.json").is_file()
    tok = NoStopTokenizer(load_tokenizer(PHI3_TOKENIZER) if have_phi3 else tiny_tokenizer())
    words = "the cat sat on a mat and the dog ran to see what was there in his red house by an old tree".split()
    texts, ids = [], []
    for i in range(n_prompts):
        n = 1
        while len(tok.encode(tok.chat(" ".join(words[i:i + n])), bos=True)) < cfg.prompt_len:
            n += 1
        text = " ".join(words[i:i + n])
        x = tok.encode(tok.chat(text), bos=True)
        if len(x) != cfg.prompt_len:      # the last word was several tokens: drop it, keep the chat tail intact
            raise RuntimeError(f"could not build a {cfg.prompt_len}-token prompt from {text!r}; change the words")
        texts.append(text), ids.append(x)
    tok_name = "Phi-3 tokenizer" if have_phi3 else "tiny tokenizer (Phi-3 asset absent; judge text is shorter)"
    return train_lm.Task(tok, texts, ids, None, None), tok_name


class StepProfile:
    """Seconds inside train_lm.sample / judge / logprobs during a step, by wrapping the module's functions (the
    step functions look them up at call time). CPU only: no device syncs needed for honest wall times."""
    PARTS = {"sample": "generation", "judge": "judging", "logprobs": "log-prob forwards"}

    def __init__(self):
        self.seconds = {part: 0.0 for part in self.PARTS.values()}

    def __enter__(self):
        self.saved = {name: getattr(train_lm, name) for name in self.PARTS}
        for name, part in self.PARTS.items():
            setattr(train_lm, name, self.timed(self.saved[name], part))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(train_lm, name, fn)

    def timed(self, fn, part):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[part] += time.perf_counter() - t0
        return wrapper


def our_steps(cfg, algo, T, n_steps):
    """Seconds of each of n_steps training steps of train_lm's STEP[algo] + backward + AdamW (after one warm-up
    step), with the median profile; tokens = sampled response tokens per step (train_lm's ntok)."""
    tcfg = train_lm.resolve(train_lm.TrainConfig(model="phi3", algo=algo, batch_size=cfg.batch, samples=1,
                                                 max_new_tokens=T, temperature=cfg.temperature,
                                                 mix_beta=cfg.mix_beta,
                                                 tau=cfg.tau if algo == "nash_md" else None), algo)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=cfg.vocab, n_layer=cfg.layers, n_head=cfg.heads, n_kv_head=cfg.heads,
                          n_embd=cfg.hidden, intermediate_size=cfg.step_intermediate, block_size=4096))
    for name in train_lm.ADAPTERS[algo]:
        model.add_adapter(name, r=tcfg.lora_rank, alpha=2 * tcfg.lora_rank)
    params = [p for name in train_lm.TRAINED[algo] for p in model.adapter_parameters(name)]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=(tcfg.adam_beta1, 0.999), weight_decay=0.0)
    task, tok_name = step_task(cfg, cfg.batch)
    gen = torch.Generator().manual_seed(0)
    k = torch.arange(cfg.batch)
    times, profiles, ntok = [], [], 0
    for step in range(n_steps + 1):
        with StepProfile() as prof:
            t0 = time.perf_counter()
            loss, st = train_lm.STEP[algo](model, task, tcfg, k, gen, step)     # what train() does per step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
        if step > 0:                      # step 0 is the warm-up
            times.append(dt)
            profiles.append(dict(prof.seconds, total=dt))
            ntok = st["ntok"]
    mid = sorted(profiles, key=lambda p: p["total"])[len(profiles) // 2]
    mid["loss+backward+optimizer"] = mid["total"] - sum(mid[p] for p in StepProfile.PARTS.values())
    return times, mid, ntok, tok_name


def print_profile(name, prof):
    parts = [p for p in prof if p != "total"]
    print(f"  profile {name}: {prof['total']:.3f} s = " +
          " + ".join(f"{p} {prof[p]:.3f} ({100 * prof[p] / prof['total']:.0f}%)" for p in parts))


def bench_steps(cfg, hf=None, ours=None):
    """One full training step per algorithm. Nash-MD-PG against TRL's NashMDTrainer (bench_trl.py) when trl is
    installed; LANA and INPO have no peer (absolute numbers). Ratio: TRL seconds / our seconds."""
    out, have_trl = [], importlib.util.find_spec("trl") is not None
    for T in cfg.step_tokens:
        for algo in ("nash_md", "lana", "inpo"):
            times, prof, ntok, tok_name = our_steps(cfg, algo, T, cfg.steps)
            ours_s = statistics.median(times)
            label = {"nash_md": "Nash-MD-PG", "lana": "LANA", "inpo": "INPO"}[algo]
            name = f"{label} train step (B={cfg.batch}, prompt {cfg.prompt_len}, {T} new)"
            notes = (f"ours: train_lm.STEP[{algo!r}] + backward + AdamW, LoRA r=16 on a random Phi-3 (hidden "
                     f"{cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, intermediate {cfg.step_intermediate}, "
                     f"vocab {cfg.vocab}), {tok_name}, self-judge (the base reads a judge prompt), temperature "
                     f"{cfg.temperature}; median of {cfg.steps} steps ({', '.join(f'{t:.2f}' for t in times)} s); "
                     f"{ntok} sampled tokens/step = {ntok / ours_s:.0f} tokens/s")
            r = dict(name=name, ours=ours_s, reference=None, ratio=None, unit="s/step", notes=notes,
                     profile={part: round(sec, 4) for part, sec in prof.items()})     # seconds of the median step
            if algo == "nash_md":
                r["notes"] += f"; mixture coefficient {cfg.mix_beta}, tau {cfg.tau}"
                if not have_trl:
                    r["notes"] += ("; reference skipped: trl not installed (use .venv-bench: "
                                   "pip install -r requirements-bench.txt)")
                else:
                    from bench_trl import trl_nash_md_step
                    ref = trl_nash_md_step(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, vocab=cfg.vocab,
                                           batch=cfg.batch, prompt_len=cfg.prompt_len, new_tokens=T,
                                           mixture_coef=cfg.mix_beta, steps=cfg.trl_steps, threads=cfg.threads)
                    torch.set_num_threads(cfg.threads)
                    # ours again after TRL: load from other jobs drifts, so both sides see before and after
                    after, _, _, _ = our_steps(cfg, algo, T, cfg.steps)
                    times += after
                    ours_s = statistics.median(times)
                    r.update(ours=ours_s, reference=ref["seconds_per_step"], ratio=ref["seconds_per_step"] / ours_s)
                    r["notes"] += (f"; ours timed before and after TRL, median of {len(times)} steps "
                                   f"({', '.join(f'{t:.2f}' for t in times)} s)")
                    r["notes"] += ("; reference: TRL NashMDTrainer, full fine-tuning, judge = a same-shape reward "
                                   "model (Bradley-Terry), TRL defaults (gradient checkpointing on, so no KV cache) "
                                   f"-- {ref['notes']}")
            print_profile(name, prof)
            out.append(r)
    return out


BENCHMARKS = [bench_forward, bench_generate, bench_steps]


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
def fmt(x):
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table(results):
    """The readable table: one line per result, ratio > 1 = ours better, "-" where there is no reference."""
    lines = [f"{'benchmark':<58} {'ours':>10} {'reference':>10} {'unit':<9} {'ratio':>7}"]
    for r in results:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['name']:<58} {fmt(r['ours']):>10} {fmt(r['reference']):>10} {r['unit']:<9} {ratio:>7}")
    return "\n".join(lines)


def main(cfg: BenchConfig, json_path=None, load_rss=False, only=None):
    torch.set_num_threads(cfg.threads)
    print(f"bench: {cfg}")
    benches = [b for b in BENCHMARKS if not only or any(o in b.__name__ for o in only)]
    results = []
    with tempfile.TemporaryDirectory() as d:
        hf, ours = tiny_pair(cfg, d)
        print(f"tiny Phi-3: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
              f"torch {torch.__version__}, {cfg.threads} threads, {cfg.clock} clock, load {os.getloadavg()[0]:.1f}")
        for bench in benches:
            for r in bench(cfg, hf, ours):
                ratio = "" if r["ratio"] is None else f"  ratio {r['ratio']:.2f}x"
                print(f"{r['name']:<58} ours {fmt(r['ours']):>9}  ref {fmt(r['reference']):>9} {r['unit']:<9}{ratio}",
                      flush=True)
                results.append(r)
    if load_rss:
        results += bench_load_rss(cfg)
    print("\n" + table(results))
    for r in results:
        if r.get("notes"):
            print(f"- {r['name']}: {r['notes']}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results (a list of {name, ours, reference, ratio, unit, notes})")
    ap.add_argument("--quick", action="store_true",
                    help="fast sanity run: 32-token generation, 8-token training steps, 2 repeats, 1 TRL step")
    ap.add_argument("--only", nargs="+", help="run only benchmarks whose function name contains one of these "
                                              "(forward, generate, steps)")
    ap.add_argument("--load-rss", action="store_true", help="also measure peak RSS while loading a ~1 GB checkpoint")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help=f"new tokens of the generation benchmark (default {BenchConfig.new_tokens})")
    ap.add_argument("--step-tokens", type=int, nargs="+", default=None,
                    help=f"new tokens of the training-step benchmarks (default {BenchConfig.step_tokens[0]}; "
                         "128 is the real run's length: TRL then takes minutes)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps of ours per algorithm")
    ap.add_argument("--threads", type=int, default=BenchConfig.threads)
    ap.add_argument("--clock", choices=("wall", "cpu"), default=BenchConfig.clock)
    args = ap.parse_args()
    cfg = BenchConfig(threads=args.threads, clock=args.clock)
    if args.quick:
        cfg = BenchConfig(threads=args.threads, clock=args.clock, new_tokens=32, forward_len=32, repeats=2,
                          step_tokens=(8,), steps=2, trl_steps=1)
    for key, value in (("new_tokens", args.new_tokens), ("repeats", args.repeats), ("steps", args.steps),
                       ("step_tokens", tuple(args.step_tokens or ()) or None)):
        if value is not None:
            setattr(cfg, key, value)
    main(cfg, args.json, args.load_rss, args.only)
