"""Benchmarks: ours vs the reference implementation on the same weights, in one process.

    python bench.py --json out/bench.json    # forward, generation, training steps, memory; tiny random Phi-3
    python bench.py --quick                  # fast sanity run (short sequences, 2 repeats, one TRL step)
    python bench.py --step-tokens 32 128     # training steps at T = 32 and 128 new tokens (TRL: minutes)
    python bench.py --eager                  # ours eager only (else also through generate(compile=True))
    python bench.py --only memory            # one step's memory, ours vs the peers' layout (no timing)
    python bench.py --load-rss --only none   # peak RSS while loading a ~1 GB checkpoint
    .venv-bench/bin/python bench.py          # with TRL (requirements-bench.txt): the Nash-MD-PG step's peer

Each benchmark returns results {name, ours, reference, ratio, unit, notes} (ratio > 1: ours is better;
reference and ratio are null where no peer exists); add one by writing such a function and listing it in
BENCHMARKS. Timed pairs alternate ours and the reference, so load from other jobs hits both alike.
transformers is the reference here, never used by model.py; trl is imported only when present (bench_trl.py).

Training steps run train_lm.ALGOS[algo].step plus the backward pass and AdamW step that train() does, on
a tasks.ChatTask built here: a random Phi-3 of the TRL side's shape (bench_trl.phi3_config), LoRA adapters,
batch 4, 14-token prompts, exactly T new tokens (stop ids off), the model judging itself; same shapes as TRL's
side, not the same weights. The profile splits each step into generation (train_lm.sample), judging
(task.judge), log-prob forwards (train_lm.score) and the rest (loss, backward, optimizer). Memory compares
train_lm.memory with the peers' layout for Phi-3-mini at LANA's paper settings (no timing).
"""
import argparse
import functools
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import tasks
import train_lm
from model import GPT, GPTConfig, generate
from tokenizer import load_tokenizer, tiny_tokenizer
from weights import load_phi3

PHI3_TOKENIZER = Path(__file__).resolve().parent / ".." / "shared" / "assets" / "phi3-tokenizer"
LABELS = {"nash_md_pg": "Nash-MD-PG", "lana": "LANA", "inpo": "INPO"}


# ----------------------------------------------------------------------------------------------------------
# config and timing

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
    forward_len: int = 128         # tokens per row in the forward benchmark
    repeats: int = 5
    clock: str = "wall"            # "wall" or "cpu" (process CPU time; for a machine shared with other jobs)
    step_tokens: tuple = (32,)     # new tokens T of the training steps (TRL at 128: ~20 s/step and more)
    step_intermediate: int = 683   # Phi-3's ratio 8192/3072 at hidden 256, as bench_trl.phi3_config
    steps: int = 5                 # timed training steps per algorithm (after one warm-up step)
    trl_steps: int = 3             # timed TRL steps (after one warm-up step)
    mix_beta: float = 0.5          # Nash-MD-PG's mixture coefficient (TRL's mixture_coef default)
    temperature: float = 0.9       # TRL's default sampling temperature
    tau: float = 0.1               # Nash-MD-PG's KL coefficient (TRL's beta default); others: phi3 presets
    compile: bool = True           # also time ours through generate(compile=True) (--eager: eager only)


def timed_pair(ours, reference, repeats, clock):
    """Median seconds of ours() and reference() over `repeats` alternating runs, after one warm-up each.
    clock: "wall" (time.perf_counter) or "cpu" (time.process_time: this process's CPU seconds)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    ours(), reference()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (reference, t_ref)):
            t0 = now()
            fn()
            times.append(now() - t0)
    return statistics.median(t_ours), statistics.median(t_ref)


def result(name, ours, reference, unit, higher_is_better=True, notes=""):
    ratio = ours / reference if higher_is_better else reference / ours
    return dict(name=name, ours=ours, reference=reference, ratio=ratio, unit=unit, notes=notes)


def modes(cfg):
    """Ours eager, and compiled (generate(compile=True)) unless --eager."""
    return (False, True) if cfg.compile else (False,)


def tiny_pair(cfg, folder):
    """A random transformers Phi-3 and ours loaded from its saved folder (same weights)."""
    from transformers import Phi3Config, Phi3ForCausalLM
    torch.manual_seed(0)
    hf = Phi3ForCausalLM(Phi3Config(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)).eval()
    hf.save_pretrained(folder)
    ours, _ = load_phi3(folder)
    print(f"tiny Phi-3: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters")
    return hf, ours


# ----------------------------------------------------------------------------------------------------------
# forward and generation: ours vs transformers

def bench_forward(cfg, pair):
    hf, ours = pair()
    x = torch.randint(3, cfg.vocab, (cfg.batch, cfg.forward_len))
    with torch.no_grad():
        t_ours, t_ref = timed_pair(lambda: ours(x), lambda: hf(x), cfg.repeats, cfg.clock)
    return [result("forward (B=%d, T=%d)" % x.shape, x.numel() / t_ours, x.numel() / t_ref, "tokens/s")]


def bench_generate(cfg, pair):
    """Exactly new_tokens per row (no stop tokens; HF forced with min_new_tokens), KV cache on both sides."""
    hf, ours = pair()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab, (cfg.batch, cfg.prompt_len), generator=g)
    n, out = cfg.batch * cfg.new_tokens, []
    for (name, temp), comp in itertools.product((("greedy", 0.0), ("sample T=1", 1.0)), modes(cfg)):
        kw = dict(do_sample=temp > 0, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                  pad_token_id=0, eos_token_id=None)
        if temp > 0:
            kw.update(temperature=temp, top_p=1.0, top_k=0)
        def run():
            return generate(ours, prompts.tolist(), cfg.new_tokens, temperature=temp, generator=g,
                            compile=comp)
        t0 = time.perf_counter()
        run()                                            # compiles, the first time a shape is seen
        first = time.perf_counter() - t0
        t_ours, t_ref = timed_pair(run, lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                                                            **kw), cfg.repeats, cfg.clock)
        out.append(result(f"generate {name}{', compiled' * comp} (B={cfg.batch}, {cfg.new_tokens} new)",
                          n / t_ours, n / t_ref, "tokens/s", notes=f"{1e3 * t_ours / cfg.new_tokens:.2f} ms "
                          f"per decode step (transformers {1e3 * t_ref / cfg.new_tokens:.2f} ms); first call "
                          f"{first:.1f} s"))
    h, W = torch.randn(cfg.batch, cfg.hidden), ours.lm_head.weight
    lm_head = timed_pair(lambda: h @ W.T, lambda: None, 50, cfg.clock)[0]      # warm: in a loop of its own
    out[0]["notes"] += f"; the lm_head matmul alone (B={cfg.batch}, warm) {1e3 * lm_head:.2f} ms"
    return out


# ----------------------------------------------------------------------------------------------------------
# training steps: train_lm's step functions (Nash-MD-PG vs TRL's NashMDTrainer)

def step_task(cfg, max_prompt_tokens):
    """A ChatTask with cfg.batch chat prompts of exactly prompt_len ids and no stop ids (every response has
    exactly max_new_tokens tokens, as TRL's min_new_tokens forces: a random model would stop at random)."""
    have_phi3 = (PHI3_TOKENIZER / "tokenizer.json").is_file()
    tok = load_tokenizer(PHI3_TOKENIZER) if have_phi3 else tiny_tokenizer()
    s = "the cat sat on a mat and the dog ran to see what was there in his red house by an old tree"

    def fit(a):                     # a text from s[a:] of exactly prompt_len ids: whole words if possible
        ends = [b for b in range(a + 1, len(s) + 1) if s[b:b + 1] in ("", " ")] + list(range(a + 1, len(s)))
        fits = (t for t in (s[a:b] for b in ends) if len(tok.chat(tok.encode(t))) == cfg.prompt_len)
        return next(fits, None)
    starts = [0] + [i + 1 for i, ch in enumerate(s) if ch == " "]
    texts = list(itertools.islice(filter(None, map(fit, starts)), cfg.batch))
    if len(texts) < cfg.batch:
        raise RuntimeError(f"cannot cut {cfg.batch} prompts of {cfg.prompt_len} ids from {s!r}; change it")
    task = tasks.ChatTask(tok, texts, max_prompt_tokens)
    task.stop_ids = ()
    assert all(len(p) == cfg.prompt_len for p in task.prompts)
    return task, "Phi-3 tokenizer" if have_phi3 else "tiny tokenizer (Phi-3 asset absent: shorter judge text)"


@contextmanager
def step_profile(task):
    """{part: seconds} inside generation, judging and log-prob forwards, by wrapping the functions in place:
    the step functions look train_lm.sample and train_lm.score up in the module at call time, and judge is a
    method of the task instance. CPU only: no device syncs needed for honest wall times."""
    seconds, saved = {}, []

    def timed(fn, part):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[part] += time.perf_counter() - t0
        return wrapper
    for obj, name, part in ((train_lm, "sample", "generation"), (task, "judge", "judging"),
                            (train_lm, "score", "log-prob forwards")):
        seconds[part] = 0.0
        saved.append((obj, name, vars(obj).get(name)))      # None: a method of the class, not the instance
        setattr(obj, name, timed(getattr(obj, name), part))
    try:
        yield seconds
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn) if fn is not None else delattr(obj, name)


def our_steps(cfg, algo, T, n_steps, comp):
    """Seconds of n_steps steps of ALGOS[algo].step + backward + AdamW (after one warm-up step, which compiles
    with comp), the median step's profile, and the sampled response tokens per step (the step's ntok)."""
    spec = train_lm.ALGOS[algo]
    tcfg = train_lm.resolve(train_lm.TrainConfig(
        model="phi3", batch_size=cfg.batch, samples=1, max_new_tokens=T, temperature=cfg.temperature,
        mix_beta=cfg.mix_beta, tau=cfg.tau if algo == "nash_md_pg" else None, compile=comp), algo)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=cfg.vocab, n_layer=cfg.layers, n_head=cfg.heads, n_kv_head=cfg.heads,
                          n_embd=cfg.hidden, intermediate_size=cfg.step_intermediate))
    for name in spec.adapters:
        model.add_adapter(name, tcfg.lora_rank, 2 * tcfg.lora_rank)
    params = [p for name in spec.adapters[:spec.trained] for p in model.lora_parameters(name)]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=(tcfg.adam_beta1, 0.999), weight_decay=0.0)
    task, tok_name = step_task(cfg, tcfg.max_prompt_tokens)
    gen, k = torch.Generator().manual_seed(0), torch.arange(cfg.batch)      # prompt k of slot k

    def rng(*shape):
        return torch.rand(len(k), *shape, generator=gen)

    times, profiles = [], []
    for step in range(n_steps + 1):
        with step_profile(task) as prof:
            t0 = time.perf_counter()
            loss, st = spec.step(model, task, tcfg, k, rng, step)              # what train() does per step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
        if step > 0:                                                           # step 0 is the warm-up
            times.append(dt)
            profiles.append(dict(prof, total=dt))
    mid = sorted(profiles, key=lambda p: p["total"])[len(profiles) // 2]
    mid["loss+backward+optimizer"] = mid["total"] - sum(v for p, v in mid.items() if p != "total")
    return times, mid, int(st["ntok"]), tok_name


def bench_steps(cfg, pair=None):
    """One full training step per algorithm. Nash-MD-PG against TRL's NashMDTrainer (bench_trl.py) when trl is
    installed; LANA and INPO have no peer (absolute numbers). Ratio: TRL seconds / our seconds."""
    out, have_trl, trl = [], importlib.util.find_spec("trl") is not None, {}
    for T in cfg.step_tokens:
        for algo, comp in itertools.product(LABELS, modes(cfg)):
            times, prof, ntok, tok_name = our_steps(cfg, algo, T, cfg.steps, comp)
            ours_s = statistics.median(times)
            name = f"{LABELS[algo]} train step{', compiled' * comp} (B={cfg.batch}, {T} new)"
            notes = (f"ours: train_lm.ALGOS[{algo!r}].step + backward + AdamW, LoRA r=16 on a random Phi-3 "
                     f"(hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, intermediate "
                     f"{cfg.step_intermediate}, vocab {cfg.vocab}), {tok_name}, self-judge (the model reads "
                     f"a judge prompt), temperature {cfg.temperature}; median of {cfg.steps} steps "
                     f"({', '.join(f'{t:.2f}' for t in times)} s); {ntok} sampled tokens/step = "
                     f"{ntok / ours_s:.0f} tokens/s" +
                     (f"; mixture coefficient {cfg.mix_beta}, tau {cfg.tau}" if algo == "nash_md_pg" else ""))
            r = dict(name=name, ours=ours_s, reference=None, ratio=None, unit="s/step", notes=notes,
                     profile={part: round(sec, 4) for part, sec in prof.items()})    # the median step
            if algo == "nash_md_pg" and not have_trl:
                r["notes"] += "; reference skipped: trl not installed (.venv-bench, requirements-bench.txt)"
            elif algo == "nash_md_pg":
                from bench_trl import trl_nash_md_step
                if T not in trl:                                   # once per T, for both of our modes
                    trl[T] = trl_nash_md_step(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                                              vocab=cfg.vocab, batch=cfg.batch, prompt_len=cfg.prompt_len,
                                              new_tokens=T, mixture_coef=cfg.mix_beta, steps=cfg.trl_steps,
                                              threads=cfg.threads)
                    torch.set_num_threads(cfg.threads)
                ref = trl[T]
                times += our_steps(cfg, algo, T, cfg.steps, comp)[0]   # ours again: load drifts, so two
                ours_s = statistics.median(times)                      # rounds, TRL after the first one
                trl_s = ref["seconds_per_step"]
                r.update(ours=ours_s, reference=trl_s, ratio=trl_s / ours_s)
                r["notes"] += (f"; ours timed in two rounds, median of {len(times)} steps "
                               f"({', '.join(f'{t:.2f}' for t in times)} s); reference: TRL NashMDTrainer, "
                               "full fine-tuning, judge = a same-shape reward model (Bradley-Terry), TRL "
                               f"defaults (gradient checkpointing on, so no KV cache) -- {ref['notes']}")
            print(f"  profile {name}: {prof['total']:.3f} s = " + " + ".join(
                f"{p} {s:.3f} ({100 * s / prof['total']:.0f}%)" for p, s in prof.items() if p != "total"))
            out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------------
# memory of one step: ours vs the peers' layout, Phi-3-mini at LANA's paper settings

def param_counts(c, r):
    """(base, one LoRA adapter) parameter counts of model.py's Phi-3 (no biases, untied lm_head): embed V·C +
    lm_head C·V + final norm C + per layer qkv C·(C + 2·kv·hd), o C·C, gate_up C·2I, down I·C and 2 norms 2C.
    LoRA on Linear(in, out) adds A (r, in) + B (out, r); the adapters target all four Linears."""
    C, I, hd = c.n_embd, c.intermediate_size, c.n_embd // c.n_head
    shapes = [(C, C + 2 * c.n_kv_head * hd), (C, C), (C, 2 * I), (I, C)]
    base = 2 * c.vocab_size * C + C + c.n_layer * (sum(i * o for i, o in shapes) + 2 * C)
    return base, c.n_layer * sum(r * (i + o) for i, o in shapes)


def bench_memory(cfg, pair=None):
    """Bytes of one LANA step (GB = 1e9): ours (train_lm.memory: one base, the players as LoRA adapters) vs
    the peers' naive layout: policy, reference and opponent (LANA: 2 players + reference) as 3 full copies,
    the trained ones fully fine-tuned with mixed-precision AdamW (gradients in the compute dtype, fp32 master
    weights and m, v: 12 bytes per trained parameter), the same transients (a full fine-tune keeps somewhat
    different activations; not modelled). No timing."""
    small, model = GPTConfig.from_name("tiny"), GPT(GPTConfig.from_name("tiny"))    # param_counts vs model.py
    counted = sum(p.numel() for p in model.parameters())
    model.add_adapter("a", 16, 32)
    counted = counted, sum(p.numel() for p in model.lora_parameters("a"))
    assert counted == param_counts(small, 16), f"param_counts {param_counts(small, 16)} != model.py {counted}"
    algo, c, nbytes = train_lm.ALGOS["lana"], GPTConfig.from_name("phi3-mini"), 2       # bf16
    tcfg = train_lm.resolve(train_lm.TrainConfig(model="phi3", batch_size=4, samples=1, max_prompt_tokens=256,
                                                 max_new_tokens=128, lora_rank=16), "lana")
    ours, (base, lora) = train_lm.memory(c, tcfg, nbytes), param_counts(c, tcfg.lora_rank)
    naive = dict(base=3 * base * nbytes, adapters=algo.trained * base * (nbytes + 12),
                 kv_cache=ours["kv_cache"], scoring=ours["scoring"], activations=ours["activations"])
    naive["total"] = naive["base"] + naive["adapters"] + max(naive["kv_cache"], naive["scoring"],
                                                             naive["activations"])
    want = dict(base=base * nbytes, adapters=4 * lora * len(algo.adapters) + 12 * lora * algo.trained)
    off = "".join(f"; train_lm.memory's {k} {ours[k] / 1e9:.3f} GB != {v / 1e9:.3f} GB from param_counts"
                  for k, v in want.items() if ours[k] != v)
    gb = "{base:.2f} + {adapters:.2f} + max({kv_cache:.2f}, {scoring:.2f}, {activations:.2f}) = {total:.2f}"
    gb = gb.format
    ours_gb, naive_gb = (gb(**{k: v / 1e9 for k, v in d.items()}) for d in (ours, naive))
    notes = (f"Phi-3-mini ({base / 1e9:.2f}B parameters, {lora / 1e6:.1f}M per adapter, r 16), bf16, LANA, "
             "batch 4, 256 + 128 tokens; GB = weights + trained state + max(KV cache, scoring, "
             f"activations): ours {ours_gb}, naive {naive_gb} ({algo.trained} of 3 full copies fine-tuned, "
             "mixed-precision "
             f"AdamW: 2 + 12 bytes per parameter); param_counts = model.py's count on the tiny config{off}")
    return [result("memory of a LANA step, Phi-3-mini (B=4, 256+128 tokens)", ours["total"] / 1e9,
                   naive["total"] / 1e9, "GB", higher_is_better=False, notes=notes)]


BENCHMARKS = [bench_forward, bench_generate, bench_steps, bench_memory]


# ----------------------------------------------------------------------------------------------------------
# --load-rss: peak memory while loading a checkpoint, in a fresh process

RSS_CHILD = """
import sys, time, weights
peak = lambda: int(next(s for s in open('/proc/self/status') if s.startswith('VmHWM')).split()[1]) * 1024
base, t0 = peak(), time.perf_counter()
m, _ = weights.load_phi3(sys.argv[1])
touched = sum(float(p.sum()) for p in m.parameters())   # lazy mmap views, if any: read them all
print(base, peak(), time.perf_counter() - t0)
"""


def bench_load_rss(cfg):
    """Peak RSS growth while loading a ~1 GiB float32 checkpoint in a fresh process, over the checkpoint size,
    against the ideal 1.0x. Building on the meta device and reading tensor by tensor should give ~1x (a naive
    load gives 2x)."""
    from transformers import Phi3Config, Phi3ForCausalLM
    hidden, inter, vocab = 2048, 5632, 32064
    per_layer = 4 * (hidden * 3 * hidden + hidden * hidden + 3 * hidden * inter + 2 * hidden)
    layers = max(1, (2**30 - 4 * 2 * vocab * hidden) // per_layer)
    with tempfile.TemporaryDirectory() as d:
        Phi3ForCausalLM(Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=16,
                                   max_position_embeddings=512, tie_word_embeddings=False)).save_pretrained(d)
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, d], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        base, peak, secs = map(float, out.stdout.split()[-3:])
    ratio = (peak - base) / size
    print(f"load-rss: checkpoint {size / 2**30:.2f} GiB ({layers} layers), peak RSS growth "
          f"{(peak - base) / 2**30:.2f} GiB = {ratio:.2f}x the checkpoint, load {secs:.1f}s")
    return [result("load peak RSS / checkpoint size", ratio, 1.0, "x", higher_is_better=False)]


# ----------------------------------------------------------------------------------------------------------
# main

def fmt(x):
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table(results):
    """The readable table: one line per result, ratio > 1 = ours better, "-" where there is no reference."""
    lines = [f"{'benchmark':<58} {'ours':>10} {'reference':>10} {'unit':<9} {'ratio':>7}"]
    for r in results:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['name']:<58} {fmt(r['ours']):>10} {fmt(r['reference']):>10} {r['unit']:<9} "
                     f"{ratio:>7}")
    return "\n".join(lines)


def main(cfg, json_path=None, load_rss=False, only=None):
    torch.set_num_threads(cfg.threads)
    print(f"bench: {cfg}\ntorch {torch.__version__}, {cfg.threads} threads, {cfg.clock} clock, "
          f"load {os.getloadavg()[0]:.1f}")
    benches = [b for b in BENCHMARKS if not only or any(o in b.__name__ for o in only)]
    results = []
    with tempfile.TemporaryDirectory() as d:
        pair = functools.cache(lambda: tiny_pair(cfg, d))        # built when a benchmark first needs it
        for bench in benches:
            for r in bench(cfg, pair):
                print(table([r]).splitlines()[1], flush=True)
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
    ap.add_argument("--json", help="write the results ([{name, ours, reference, ratio, unit, notes}])")
    ap.add_argument("--quick", action="store_true",
                    help="sanity run: 32-token generation, 8-token training steps, 2 repeats, 1 TRL step")
    ap.add_argument("--only", nargs="+", help="run only the benchmarks whose function name contains one of "
                                              "these (forward, generate, steps, memory; none: no benchmark)")
    ap.add_argument("--load-rss", action="store_true", help="also: peak RSS while loading a ~1 GB checkpoint")
    ap.add_argument("--step-tokens", type=int, nargs="+", help="new tokens of the training steps (default "
                    f"{BenchConfig.step_tokens[0]}; 128 is the real run's: TRL then takes minutes)")
    ap.add_argument("--threads", type=int, default=BenchConfig.threads)
    ap.add_argument("--clock", choices=("wall", "cpu"), default=BenchConfig.clock)
    ap.add_argument("--eager", action="store_true", help="time ours eager only (no compiled rows)")
    args = ap.parse_args()
    quick = dict(new_tokens=32, forward_len=32, repeats=2, step_tokens=(8,), steps=2, trl_steps=1)
    cfg = BenchConfig(threads=args.threads, clock=args.clock, compile=not args.eager,
                      **(quick if args.quick else {}))
    if args.step_tokens:
        cfg.step_tokens = tuple(args.step_tokens)
    main(cfg, args.json, args.load_rss, args.only)
