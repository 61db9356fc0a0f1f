"""Benchmarks: ours vs the reference implementation on the same weights, in one process.

    python bench.py --json out/bench.json    # forward, generation, training steps, memory; a tiny
                                             # random Phi-3
    python bench.py --quick                  # fast sanity run (short sequences, 2 repeats, 1 TRL
                                             # step)
    python bench.py --step-tokens 32 128     # training steps at T = 32 and 128 new tokens (TRL:
                                             # minutes)
    python bench.py --eager                  # ours eager only (else also generate(compile=True))
    python bench.py --only memory            # one step's memory, ours vs the peers' layout
    python bench.py --load-rss --only none   # peak RSS while loading a ~1 GB checkpoint
    .venv-bench/bin/python bench.py          # with TRL (requirements-bench.txt): Nash-MD-PG's peer
    python bench.py --smollm2 [DIR]          # the real SmolLM2-135M-Instruct instead of the tiny
                                             # model: decoding vs transformers, a step per algorithm
    python bench.py --smollm2 --dtype float32 bfloat16   # its rows in both weight dtypes

Each benchmark returns results {name, ours, reference, ratio, unit, notes} (ratio > 1: ours is
better; reference and ratio are null where no peer exists); add one by writing such a function and
listing it in BENCHMARKS. Timed pairs alternate ours and the reference, so load from other jobs hits
both alike. transformers is the reference here, never used by model.py; trl is imported only when
present (bench_trl.py).

Training steps run train_lm.ALGOS[algo].step (every algorithm of the registry but the variants) plus
the backward pass and AdamW step of train_lm.train's loop, on a tasks.ChatTask built here: a random
Phi-3 of the TRL side's shape (bench_trl.phi3_config), LoRA adapters, batch 4, 14-token prompts,
exactly T new tokens (stop ids off), the model judging itself; same shapes as TRL's side, not the
same weights. The profile splits each step into generation (train_lm.sample), judging (task.judge),
log-prob forwards (train_lm.score) and the rest (loss, backward, optimizer). Memory compares
memory.memory with the peers' layout for Phi-3-mini at LANA's paper settings (no timing).

--smollm2 runs the same kinds of rows on real weights: SmolLM2-135M-Instruct (the folder DIR, else
$NANO_NASH_SMOLLM2, else where ../shared/assets/smollm2/fetch.sh puts it). Decoding: the first chat
prompts of data/prompts.jsonl (left-padded), batch 4 and 1, ours vs transformers' generate on the
same folder. Steps: the real run as train_lm.py builds it (tasks.setup, the smollm2 preset, the
same prompts, the model judging itself), stop ids off. --dtype bfloat16 loads the weights in
bfloat16 on both sides (this CPU has AVX512-BF16), float32 the default.
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch

import memory
import plan
import tasks
import train_lm
from model import GPT, GPTConfig, generate, left_pad
from tokenizer import load_tokenizer, tiny_tokenizer
from weights import CheckpointError, find_checkpoint, load_model

ROOT = Path(__file__).resolve().parent
PHI3_TOKENIZER = ROOT / ".." / "shared" / "assets" / "phi3-tokenizer"
PROMPTS = ROOT / "data" / "prompts.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
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
    clock: str = "wall"            # "wall" or "cpu" (process CPU time: for a shared machine)
    step_tokens: tuple = (32,)     # new tokens T of the training steps (TRL at 128: ~20 s/step+)
    step_intermediate: int = 683   # Phi-3's ratio 8192/3072 at hidden 256, as bench_trl.phi3_config
    steps: int = 5                 # timed training steps per algorithm (after one warm-up step)
    trl_steps: int = 3             # timed TRL steps (after one warm-up step)
    mix_beta: float = 0.5          # Nash-MD-PG's mixture coefficient (TRL's mixture_coef default)
    temperature: float = 0.9       # TRL's default sampling temperature
    tau: float = 0.1               # Nash-MD-PG's KL coefficient (TRL's beta); others: phi3's
    compile: bool = True           # also time ours through generate(compile=True) (--eager: not)
    smollm2: str = ""              # SmolLM2's folder: its rows instead of the tiny model's
    dtypes: tuple = ("float32",)   # SmolLM2's rows: the weights' dtype(s), both sides
    smollm2_flags: dict = field(default_factory=dict)   # SmolLM2's steps: over its preset


def timed_pair(ours, reference, repeats, clock):
    """Median seconds of ours() and reference() over `repeats` alternating runs, after one warm-up
    each. clock: "wall" (time.perf_counter) or "cpu" (time.process_time: this process's CPU
    seconds)."""
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
    ours, _ = load_model(folder)
    print(f"tiny Phi-3: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters")
    return hf, ours


# --------------------------------------------------------------------------------------------------
# forward and generation: ours vs transformers

def bench_forward(cfg, pair):
    hf, ours = pair()
    x = torch.randint(3, cfg.vocab, (cfg.batch, cfg.forward_len))
    with torch.no_grad():
        t_ours, t_ref = timed_pair(lambda: ours(x), lambda: hf(x), cfg.repeats, cfg.clock)
    name = "forward (B=%d, T=%d)" % x.shape
    return [result(name, x.numel() / t_ours, x.numel() / t_ref, "tokens/s")]


def decode_rows(cfg, hf, ours, prompts, pad_id, g, prefix=""):
    """Ours vs transformers' generate on id-list prompts (left-padded, masked on both sides):
    greedy and sampled at temperature 1, ours eager and compiled; exactly new_tokens per row (no
    stop ids; transformers forced with min_new_tokens), KV cache on both sides. g: our sampler's
    generator; prefix: the start of each row's name. A greedy row also says on how many rows the
    two decoded the same tokens."""
    x, mask = left_pad(prompts, pad_id)
    B, N, out = len(prompts), cfg.new_tokens, []
    samplings = (("greedy", 0.0), ("sample T=1", 1.0))
    for (name, temp), comp in itertools.product(samplings, modes(cfg)):
        kw = dict(do_sample=temp > 0, max_new_tokens=N, min_new_tokens=N, pad_token_id=pad_id,
                  eos_token_id=None)
        if temp > 0:
            kw.update(temperature=temp, top_p=1.0, top_k=0)

        def run():
            return generate(ours, prompts, N, temperature=temp, generator=g, pad_id=pad_id,
                            compile=comp)

        def reference():
            return hf.generate(x, attention_mask=mask, **kw)
        t0 = time.perf_counter()
        mine = run()[0]                                  # compiles, the first time a shape is seen
        first = time.perf_counter() - t0
        same = ""
        if temp == 0:
            theirs = reference()
            agree = (mine[:, -N:] == theirs[:, -N:]).all(1).sum()
            same = f"; the same {N} greedy tokens as transformers on {agree} of {B} rows"
        t_ours, t_ref = timed_pair(run, reference, cfg.repeats, cfg.clock)
        label = f"{prefix}generate {name}{', compiled' * comp} (B={B}, {N} new)"
        notes = (f"{1e3 * t_ours / N:.2f} ms per decode step (transformers "
                 f"{1e3 * t_ref / N:.2f} ms); first call {first:.1f} s{same}")
        out.append(result(label, B * N / t_ours, B * N / t_ref, "tokens/s", notes=notes))
    return out


def bench_generate(cfg, pair):
    """Decoding on the tiny model: random prompts of prompt_len ids."""
    hf, ours = pair()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab, (cfg.batch, cfg.prompt_len), generator=g)
    out = decode_rows(cfg, hf, ours, prompts.tolist(), 0, g)
    h, W = torch.randn(cfg.batch, cfg.hidden), ours.lm_head.weight
    lm_head = timed_pair(lambda: h @ W.T, lambda: None, 50, cfg.clock)[0]   # warm: in its own loop
    out[0]["notes"] += f"; the lm_head matmul alone (B={cfg.batch}, warm) {1e3 * lm_head:.2f} ms"
    return out


# --------------------------------------------------------------------------------------------------
# training steps: train_lm's step functions (Nash-MD-PG vs TRL's NashMDTrainer)

def step_task(cfg, max_prompt_tokens):
    """A ChatTask with cfg.batch chat prompts of exactly prompt_len ids and no stop ids (every
    response has exactly max_new_tokens tokens, as TRL's min_new_tokens forces: a random model would
    stop at random)."""
    have_phi3 = (PHI3_TOKENIZER / "tokenizer.json").is_file()
    tok = load_tokenizer(PHI3_TOKENIZER) if have_phi3 else tiny_tokenizer()
    s = "the cat sat on a mat and the dog ran to see what was there in his red house by an old tree"

    def fit(a):                     # a text from s[a:] of exactly prompt_len ids: whole words first
        words = [b for b in range(a + 1, len(s) + 1) if s[b:b + 1] in ("", " ")]
        ends = words + list(range(a + 1, len(s)))
        fits = (t for t in (s[a:b] for b in ends) if len(tok.chat(tok.encode(t))) == cfg.prompt_len)
        return next(fits, None)
    starts = [0] + [i + 1 for i, ch in enumerate(s) if ch == " "]
    texts = list(itertools.islice(filter(None, map(fit, starts)), cfg.batch))
    if len(texts) < cfg.batch:
        raise RuntimeError(f"cannot cut {cfg.batch} prompts of {cfg.prompt_len} ids from {s!r}; "
                           "change it")
    task = tasks.ChatTask(tok, texts, max_prompt_tokens)
    task.stop_ids = ()
    assert all(len(p) == cfg.prompt_len for p in task.prompts)
    if have_phi3:
        return task, "Phi-3 tokenizer"
    return task, "tiny tokenizer (Phi-3 asset absent: shorter judge text)"


@contextmanager
def step_profile(task):
    """{part: seconds} inside generation (train_lm.sample), judging (task.judge) and log-prob
    forwards (train_lm.score) while the block runs: each is wrapped in a timer for the block's
    duration (unittest.mock.patch.object, which puts the original back). CPU only: no device syncs
    are needed for honest wall times."""
    seconds = {"generation": 0.0, "judging": 0.0, "log-prob forwards": 0.0}

    def timed(fn, part):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[part] += time.perf_counter() - t0
        return wrapper
    with ExitStack() as stack:
        for obj, name, part in ((train_lm, "sample", "generation"), (task, "judge", "judging"),
                                (train_lm, "score", "log-prob forwards")):
            stack.enter_context(patch.object(obj, name, timed(getattr(obj, name), part)))
        yield seconds


def train_step(model, task, cfg, k, gen, opt):
    """One step as train_lm.train's loop takes it: ALGOS[cfg.algo].step over the slots k in
    cfg.micro_batches chunks (each draws the step's numbers again from the same generator state and
    keeps its own rows), each loss weighted by its share of the slots, backward; then AdamW.
    Returns the last chunk's stats, with ntok summed over the chunks."""
    step, slots = train_lm.ALGOS[cfg.algo].step, len(k)
    at, ntok = gen.get_state(), 0
    opt.zero_grad(set_to_none=True)
    for rows in torch.arange(slots, device=k.device).tensor_split(cfg.micro_batches):
        gen.set_state(at)
        rng = partial(train_lm.uniforms, gen, slots, rows)
        loss, st = step(model, task, cfg, k[rows], rng)
        (loss * len(rows) / slots).backward()
        ntok += int(st["ntok"])
    opt.step()
    return {**st, "ntok": ntok}


def timed_steps(model, task, tcfg, n_steps):
    """Seconds of n_steps train_steps (after one warm-up step, which compiles with tcfg.compile)
    with the algorithm's adapters added to model, the median step's profile, and the sampled
    response tokens per step."""
    spec = train_lm.ALGOS[tcfg.algo]
    for name in spec.adapters:
        model.add_adapter(name, tcfg.lora_rank, 2 * tcfg.lora_rank)
    model.checkpointing = tcfg.grad_checkpoint
    params = [p for name in spec.judges for p in model.lora_parameters(name)]   # the trained ones
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=(tcfg.adam_beta1, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    k = torch.arange(tcfg.batch_size).repeat_interleave(tcfg.samples)   # prompt k of slot k

    times, profiles = [], []
    for step in range(n_steps + 1):
        with step_profile(task) as prof:
            t0 = time.perf_counter()
            st = train_step(model, task, tcfg, k, gen, opt)
            dt = time.perf_counter() - t0
        if step > 0:                                               # step 0 is the warm-up
            times.append(dt)
            profiles.append(dict(prof, total=dt))
    mid = sorted(profiles, key=lambda p: p["total"])[len(profiles) // 2]
    mid["loss+backward+optimizer"] = mid["total"] - sum(v for p, v in mid.items() if p != "total")
    return times, mid, st["ntok"]


def our_steps(cfg, algo, T, n_steps, comp):
    """timed_steps on a random Phi-3 of the TRL side's shape, batch cfg.batch, exactly T new
    tokens; and the tokenizer's name."""
    peer = dict(tau=cfg.tau) if algo == "nash_md_pg" else {}   # TRL's settings for its peer
    tcfg = plan.config(algo, model="phi3", batch_size=cfg.batch, samples=1, max_new_tokens=T,
                       temperature=cfg.temperature, mix_beta=cfg.mix_beta, compile=comp, **peer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=cfg.vocab, n_layer=cfg.layers, n_head=cfg.heads,
                          n_kv_head=cfg.heads, n_embd=cfg.hidden,
                          intermediate_size=cfg.step_intermediate))
    task, tok_name = step_task(cfg, tcfg.max_prompt_tokens)
    return *timed_steps(model, task, tcfg, n_steps), tok_name


def profile_line(name, prof):
    """A step's profile as one printed line: its parts' seconds and shares."""
    parts = " + ".join(f"{p} {s:.3f} ({100 * s / prof['total']:.0f}%)"
                       for p, s in prof.items() if p != "total")
    print(f"  profile {name}: {prof['total']:.3f} s = {parts}")


def bench_steps(cfg, pair=None):
    """One full training step per algorithm (train_lm.ALGOS, but the variants). Nash-MD-PG against
    TRL's NashMDTrainer (bench_trl.py) when trl is installed; the others have no peer (absolute
    numbers). Ratio: TRL seconds / our seconds."""
    out, have_trl, trl = [], importlib.util.find_spec("trl") is not None, {}
    algos = [a for a, spec in train_lm.ALGOS.items() if not spec.variant]
    for T in cfg.step_tokens:
        for algo, comp in itertools.product(algos, modes(cfg)):
            times, prof, ntok, tok_name = our_steps(cfg, algo, T, cfg.steps, comp)
            ours_s = statistics.median(times)
            label = train_lm.ALGOS[algo].label
            name = f"{label} train step{', compiled' * comp} (B={cfg.batch}, {T} new)"
            notes = (f"ours: train_lm.ALGOS[{algo!r}].step + backward + AdamW, LoRA r=16 on a "
                     f"random Phi-3 (hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, "
                     f"intermediate {cfg.step_intermediate}, vocab {cfg.vocab}), {tok_name}, "
                     f"self-judge (the model reads a judge prompt), temperature "
                     f"{cfg.temperature}; median of {cfg.steps} steps "
                     f"({', '.join(f'{t:.2f}' for t in times)} s); {ntok} sampled tokens/step = "
                     f"{ntok / ours_s:.0f} tokens/s")
            if algo == "nash_md_pg":                               # TRL's peer and its settings
                notes += f"; mixture coefficient {cfg.mix_beta}, tau {cfg.tau}"
            profile = {part: round(sec, 4) for part, sec in prof.items()}   # the median step
            r = dict(name=name, ours=ours_s, reference=None, ratio=None, unit="s/step", notes=notes,
                     profile=profile)
            if algo == "nash_md_pg" and not have_trl:
                r["notes"] += ("; reference skipped: trl not installed (.venv-bench, "
                               "requirements-bench.txt)")
            elif algo == "nash_md_pg":
                from bench_trl import trl_nash_md_step
                if T not in trl:                                   # once per T, for both modes
                    trl[T] = trl_nash_md_step(
                        hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, vocab=cfg.vocab,
                        batch=cfg.batch, prompt_len=cfg.prompt_len, new_tokens=T,
                        mixture_coef=cfg.mix_beta, steps=cfg.trl_steps, threads=cfg.threads)
                    torch.set_num_threads(cfg.threads)
                ref = trl[T]
                times += our_steps(cfg, algo, T, cfg.steps, comp)[0]   # ours again: load drifts,
                ours_s = statistics.median(times)                      # so two rounds, TRL between
                trl_s = ref["seconds_per_step"]
                r.update(ours=ours_s, reference=trl_s, ratio=trl_s / ours_s)
                r["notes"] += (f"; ours timed in two rounds, median of {len(times)} steps "
                               f"({', '.join(f'{t:.2f}' for t in times)} s); reference: TRL "
                               "NashMDTrainer, full fine-tuning, judge = a same-shape reward model "
                               "(Bradley-Terry), TRL defaults (gradient checkpointing on, so no KV "
                               f"cache) -- {ref['notes']}")
            profile_line(name, prof)
            out.append(r)
    return out


# --------------------------------------------------------------------------------------------------
# memory of one step: ours vs the peers' layout, Phi-3-mini at LANA's paper settings

def param_counts(c, r):
    """(base, one LoRA adapter) parameter counts of model.py's Phi-3 (no biases, untied lm_head):
    embed V·C + lm_head C·V + final norm C + per layer qkv C·(C + 2·kv·hd), o C·C, gate_up C·2I,
    down I·C and 2 norms 2C. LoRA on Linear(in, out) adds A (r, in) + B (out, r); the adapters
    target all four Linears."""
    C, I, hd = c.n_embd, c.intermediate_size, c.n_embd // c.n_head
    shapes = [(C, C + 2 * c.n_kv_head * hd), (C, C), (C, 2 * I), (I, C)]
    base = 2 * c.vocab_size * C + C + c.n_layer * (sum(i * o for i, o in shapes) + 2 * C)
    return base, c.n_layer * sum(r * (i + o) for i, o in shapes)


def bench_memory(cfg, pair=None):
    """Bytes of one LANA step (GB = 1e9): ours (memory.memory: one base, the players as LoRA
    adapters) vs the peers' naive layout: policy, reference and opponent (LANA: 2 players +
    reference) as 3 full copies, the trained ones fully fine-tuned with mixed-precision AdamW
    (gradients in the compute dtype, fp32 master weights and m, v: 12 bytes per trained parameter),
    the same transients (a full fine-tune keeps somewhat different activations; not modelled). No
    timing."""
    small = GPTConfig.from_name("tiny")
    model = GPT(small)                                        # param_counts vs model.py
    counted = sum(p.numel() for p in model.parameters())
    model.add_adapter("a", 16, 32)
    counted = counted, sum(p.numel() for p in model.lora_parameters("a"))
    assert counted == param_counts(small, 16), \
        f"param_counts {param_counts(small, 16)} != model.py {counted}"
    algo, c, nbytes = train_lm.ALGOS["lana"], GPTConfig.from_name("phi3-mini"), 2       # bf16
    trained = len(algo.judges)
    tcfg = plan.config("lana", model="phi3", batch_size=4, samples=1, max_prompt_tokens=256,
                       max_new_tokens=128, lora_rank=16)
    ours, (base, lora) = memory.memory(c, tcfg, nbytes), param_counts(c, tcfg.lora_rank)
    naive = dict(base=3 * base * nbytes, adapters=trained * base * (nbytes + 12),
                 kv_cache=ours["kv_cache"], scoring=ours["scoring"],
                 activations=ours["activations"])
    transient = max(naive["kv_cache"], naive["scoring"], naive["activations"])
    naive["total"] = naive["base"] + naive["adapters"] + transient
    want = dict(base=base * nbytes, adapters=4 * lora * len(algo.adapters) + 12 * lora * trained)
    off = "".join(f"; memory.memory's {k} {ours[k] / 1e9:.3f} GB != {v / 1e9:.3f} GB from "
                  "param_counts" for k, v in want.items() if ours[k] != v)
    gb = ("{base:.2f} + {adapters:.2f} + max({kv_cache:.2f}, {scoring:.2f}, {activations:.2f}) = "
          "{total:.2f}").format
    ours_gb, naive_gb = (gb(**{k: v / 1e9 for k, v in d.items()}) for d in (ours, naive))
    notes = (f"Phi-3-mini ({base / 1e9:.2f}B parameters, {lora / 1e6:.1f}M per adapter, r 16), "
             "bf16, LANA, batch 4, 256 + 128 tokens; GB = weights + trained state + max(KV cache, "
             f"scoring, activations): ours {ours_gb}, naive {naive_gb} ({trained} of 3 full copies "
             "fine-tuned, mixed-precision AdamW: 2 + 12 bytes per parameter); param_counts = "
             f"model.py's count on the tiny config{off}")
    return [result("memory of a LANA step, Phi-3-mini (B=4, 256+128 tokens)", ours["total"] / 1e9,
                   naive["total"] / 1e9, "GB", higher_is_better=False, notes=notes)]


BENCHMARKS = [bench_forward, bench_generate, bench_steps, bench_memory]


# --------------------------------------------------------------------------------------------------
# --smollm2: real weights, SmolLM2-135M-Instruct, ours vs transformers on the same folder

def find_smollm2(given):
    """The folder of --smollm2 DIR, else $NANO_NASH_SMOLLM2, else where fetch.sh puts it (the
    Hugging Face cache layout works too); one error line and exit 1 when there is none."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    default = cache / "nano-nash" / "smollm2-135m-instruct"
    path = given or os.environ.get("NANO_NASH_SMOLLM2") or default
    try:
        return find_checkpoint(path)
    except CheckpointError as e:
        sys.exit(f"error: {e}; ../shared/assets/smollm2/fetch.sh fetches SmolLM2-135M-Instruct")


def real_pair(folder, dtype):
    """transformers' model and ours, both loaded from `folder` in `dtype` (a key of DTYPES), and
    the folder's tokenizer."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    ours, _ = load_model(folder, "cpu", DTYPES[dtype])
    return hf, ours, load_tokenizer(folder)


def real_pairs(folder):
    """real_pair(folder, dtype), each dtype loaded once: the `pair` of the SmolLM2 benchmarks."""
    return functools.cache(partial(real_pair, folder))


def bench_smollm2_generate(cfg, pair):
    """Decoding on the real model, per dtype: the first cfg.batch prompts of data/prompts.jsonl in
    the model's chat format (of different lengths: left-padded), then the first alone."""
    out = []
    for dtype in cfg.dtypes:
        hf, ours, tok = pair(dtype)
        texts = tasks.load_prompts(PROMPTS)[:cfg.batch]
        chats = [tok.chat(tok.encode(t)) for t in texts]
        for B in dict.fromkeys((cfg.batch, 1)):
            g = torch.Generator().manual_seed(0)
            out += decode_rows(cfg, hf, ours, chats[:B], tok.pad_id, g, f"SmolLM2 {dtype} ")
    return out


def smollm2_run(cfg, algo, dtype, comp):
    """The real run's model, task and config for algo on SmolLM2, as train_lm.py builds them
    (tasks.setup): its preset, the chat prompts of data/prompts.jsonl, the model judging itself;
    on the CPU in dtype, with stop ids off (every response has max_new_tokens tokens)."""
    tcfg = plan.config(algo, model="smollm2", weights=str(cfg.smollm2), prompts=str(PROMPTS),
                       device="cpu", dtype=dtype, compile=comp, **cfg.smollm2_flags)
    model, task, _ = tasks.setup(plan.check(tcfg))
    task.stop_ids = ()
    return model, task, tcfg


def bench_smollm2_steps(cfg, pair=None):
    """One training step per algorithm (train_lm.ALGOS, but the variants) on the real model, per
    dtype; no peer (absolute numbers)."""
    out = []
    algos = [a for a, spec in train_lm.ALGOS.items() if not spec.variant]
    for dtype, algo, comp in itertools.product(cfg.dtypes, algos, modes(cfg)):
        model, task, tcfg = smollm2_run(cfg, algo, dtype, comp)
        torch.manual_seed(tcfg.seed)                     # the adapters' init, as in train_lm.train
        times, prof, ntok = timed_steps(model, task, tcfg, cfg.steps)
        ours_s = statistics.median(times)
        S, N = tcfg.batch_size * tcfg.samples, tcfg.max_new_tokens
        label = train_lm.ALGOS[algo].label
        name = f"SmolLM2 {dtype} {label} step{', compiled' * comp} (B={S}, {N} new)"
        times_s = ", ".join(f"{t:.2f}" for t in times)
        notes = (f"ours: train_lm.ALGOS[{algo!r}].step + backward + AdamW on "
                 f"SmolLM2-135M-Instruct ({cfg.smollm2}) as train_lm.py --model smollm2 builds "
                 f"it: batch {tcfg.batch_size} x {tcfg.samples} samples, LoRA r={tcfg.lora_rank}, "
                 f"temperature {tcfg.temperature}, judge_both_orders {tcfg.judge_both_orders}, "
                 f"the prompts of {PROMPTS.name} in ChatML, self-judge; stop ids off; median of "
                 f"{cfg.steps} steps ({times_s} s); {ntok} sampled tokens/step = "
                 f"{ntok / ours_s:.0f} tokens/s")
        profile_line(name, prof)
        profile = {part: round(sec, 4) for part, sec in prof.items()}   # the median step
        out.append(dict(name=name, ours=ours_s, reference=None, ratio=None, unit="s/step",
                        notes=notes, profile=profile))
    return out


SMOLLM2_BENCHMARKS = [bench_smollm2_generate, bench_smollm2_steps]


# --------------------------------------------------------------------------------------------------
# --load-rss: peak memory while loading a checkpoint, in a fresh process

RSS_CHILD = """
import sys, time, weights
status = lambda: next(s for s in open('/proc/self/status') if s.startswith('VmHWM'))
peak = lambda: int(status().split()[1]) * 1024
base, t0 = peak(), time.perf_counter()
m, _ = weights.load_model(sys.argv[1])
touched = sum(float(p.sum()) for p in m.parameters())   # lazy mmap views, if any: read them all
print(base, peak(), time.perf_counter() - t0)
"""


def bench_load_rss(cfg):
    """Peak RSS growth while loading a ~1 GiB float32 checkpoint in a fresh process, over the
    checkpoint size, against the ideal 1.0x. Building on the meta device and reading tensor by
    tensor should give ~1x (a naive load gives 2x)."""
    from transformers import Phi3Config, Phi3ForCausalLM
    hidden, inter, vocab = 2048, 5632, 32064
    per_layer = 4 * (hidden * 3 * hidden + hidden * hidden + 3 * hidden * inter + 2 * hidden)
    layers = max(1, (2**30 - 4 * 2 * vocab * hidden) // per_layer)
    with tempfile.TemporaryDirectory() as d:
        hf = Phi3ForCausalLM(Phi3Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=16, max_position_embeddings=512, tie_word_embeddings=False))
        hf.save_pretrained(d)
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, d], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent)
        base, peak, secs = map(float, out.stdout.split()[-3:])
    ratio = (peak - base) / size
    print(f"load-rss: checkpoint {size / 2**30:.2f} GiB ({layers} layers), peak RSS growth "
          f"{(peak - base) / 2**30:.2f} GiB = {ratio:.2f}x the checkpoint, load {secs:.1f}s")
    return [result("load peak RSS / checkpoint size", ratio, 1.0, "x", higher_is_better=False)]


# --------------------------------------------------------------------------------------------------
# main

def fmt(x):
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table(results):
    """The readable table: one line per result, ratio > 1 = ours better, "-" where there is no
    reference."""
    lines = [f"{'benchmark':<58} {'ours':>10} {'reference':>10} {'unit':<9} {'ratio':>7}"]
    for r in results:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['name']:<58} {fmt(r['ours']):>10} {fmt(r['reference']):>10} "
                     f"{r['unit']:<9} {ratio:>7}")
    return "\n".join(lines)


def main(cfg, json_path=None, load_rss=False, only=None):
    torch.set_num_threads(cfg.threads)
    print(f"bench: {cfg}\ntorch {torch.__version__}, {cfg.threads} threads, {cfg.clock} clock, "
          f"load {os.getloadavg()[0]:.1f}")
    pool = SMOLLM2_BENCHMARKS if cfg.smollm2 else BENCHMARKS
    benches = [b for b in pool if not only or any(o in b.__name__ for o in only)]
    results = []
    with tempfile.TemporaryDirectory() as d:
        if cfg.smollm2:                                 # built when a benchmark first needs them
            pair = real_pairs(cfg.smollm2)
        else:
            pair = functools.cache(lambda: tiny_pair(cfg, d))
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
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json",
                    help="write the results ([{name, ours, reference, ratio, unit, notes}])")
    ap.add_argument("--quick", action="store_true",
                    help="sanity run: 32-token generation, 8-token training steps, 2 repeats, "
                         "1 TRL step")
    ap.add_argument("--only", nargs="+",
                    help="run only the benchmarks whose function name contains one of these "
                         "(forward, generate, steps, memory; none: no benchmark)")
    ap.add_argument("--load-rss", action="store_true",
                    help="also: peak RSS while loading a ~1 GB checkpoint")
    ap.add_argument("--step-tokens", type=int, nargs="+",
                    help=f"new tokens of the training steps (default {BenchConfig.step_tokens[0]}; "
                         "128 is the real run's: TRL then takes minutes)")
    ap.add_argument("--threads", type=int, default=BenchConfig.threads)
    ap.add_argument("--clock", choices=("wall", "cpu"), default=BenchConfig.clock)
    ap.add_argument("--eager", action="store_true", help="time ours eager only (no compiled rows)")
    ap.add_argument("--smollm2", nargs="?", const="", metavar="DIR",
                    help="the real SmolLM2-135M-Instruct's rows (generate, steps) instead of the "
                         "tiny model's: DIR, else $NANO_NASH_SMOLLM2, else fetch.sh's folder")
    ap.add_argument("--dtype", nargs="+", choices=DTYPES, default=BenchConfig.dtypes,
                    help="with --smollm2: the weights' dtype(s), both sides (default float32)")
    args = ap.parse_args()
    quick = dict(new_tokens=32, forward_len=32, repeats=2, step_tokens=(8,), steps=2, trl_steps=1,
                 smollm2_flags=dict(max_new_tokens=8))
    cfg = BenchConfig(threads=args.threads, clock=args.clock, compile=not args.eager,
                      dtypes=tuple(args.dtype), **(quick if args.quick else {}))
    if args.step_tokens:
        cfg.step_tokens = tuple(args.step_tokens)
    if args.smollm2 is not None:
        cfg.smollm2 = str(find_smollm2(args.smollm2))
    main(cfg, args.json, args.load_rss, args.only)
