"""
train_lm.py: train a language model toward the Nash equilibrium of a preference game with LANA, INPO or Nash-MD-PG.

    python train_lm.py                              # the proof: a tiny Phi-3 LM plays a known game, exact gaps (CPU)
    python train_lm.py --algo inpo                  # one algorithm of the toy game
    python train_lm.py --model phi3 [--weights DIR] # the real run: Phi-3-mini, LoRA players, the model judges itself
    python train_lm.py --model phi3 --eval true     # win rate of the trained player vs the base, AlpacaEval JSON

1. The toy game (--model tiny, the default). The `tiny` Phi-3 (random init, the same code as the real run) answers
   each of 4 prompts with --max_new_tokens L = 1 token from {a, b, c} (constrained decoding: generate(allowed_tokens)),
   so a response is one of n = 3^L actions and π(y|x) is ENUMERATED exactly with sequence_logprobs. Prompt k is its
   own non-transitive game from games.py (RPS, Gardner's dice, a weighted cycle, NLHF's 3-type game; L = 2:
   random 9-action games), which plays the judge; label noise ε turns P into P_ε = ε + (1 − 2ε) P. μ = the model's own
   initial policy (adapters off). Every logged step prints the EXACT duality gap DualGap_τ(π_θ) against the
   regularised NE of (P_ε, μ, τ) (games.duality_gap), averaged over prompts, and the plot puts games.py's closed-form
   curves for the same (P_ε, μ, τ) beside it.
2. The real run (--model phi3). LANA (Algorithm 1): two LoRA players "player1"/"player2" on ONE base; each samples
   two answers, the OTHER player judges them ("Which response is better? ... Output 1 or 2") by the logits of "1"
   and "2". INPO and Nash-MD-PG use the base model (adapters off) as judge and reference; INPO's previous iterate
   π_t is the frozen adapter "prev", Nash-MD-PG's opponent is sampled from the per-token mixture π^(1-β) μ^β.
Math: nano_nash.py (losses), games.py (exact gaps), ALGORITHMS.md. This file is the loop, I/O and checkpoints.
Simplifications: one gradient step per batch; duel labels are sampled, y_w ~ λ_p (y ≻ y' with prob. P(y ≻ y')),
for every algorithm; the real run samples at --temperature 0.1 (LANA's setting), which INPO's and Nash-MD-PG's
theory (y ~ π) does not cover: use --temperature 1 for those if you care.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from itertools import product
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import games
import nano_nash
from model import GPT, CheckpointError, GPTConfig, config_from_hf, generate, resolve_checkpoint, sequence_logprobs
from tokenizer import load_tokenizer, tiny_tokenizer

ROOT = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Every flag of the command line. A None field takes its value from PRESETS[model], then PRESETS[model/algo]."""
    model: str = "tiny"            # tiny = the toy game (exact gap, CPU) | phi3 = Phi-3-mini-4k-instruct
    algo: str = None               # inpo | nash_md | lana | all (tiny: inpo, nash_md, lana, lana printed sign)
    weights: str = ""              # phi3 folder; else $NANO_NASH_WEIGHTS, else the Hugging Face cache
    prompts: str = ""              # JSON lines with "prompt", or plain text one per line; "" = data/prompts.jsonl
    out_dir: str = "out/lm"        # each algorithm writes out_dir/<algo>/: log.jsonl, plot.png, ckpt_<step>/
    figure: str = "figures/lm_convergence.png"   # tiny --algo all: gap curves + closed form ("" = none)
    max_steps: int = None
    batch_size: int = 4            # prompts per step
    samples: int = None            # sampled pairs per prompt per step
    lr: float = None
    cosine: bool = True            # cosine learning-rate decay to 0 at max_steps
    adam_beta1: float = None       # Adam momentum: 0 for the games (momentum makes them cycle, measured), 0.9 for
                                   # INPO, whose inner problem is a plain regression (momentum averages label noise)
    tau: float = None              # KL temperature τ of the regularised game (Nash-MD-PG, INPO)
    eta: float = None              # INPO's η: an INVERSE step size, τ ≤ η (paper: τ = η/3)
    inpo_iter_steps: int = None    # gradient steps per INPO iteration (then prev <- policy)
    mix_beta: float = 0.125        # Nash-MD-PG opponent π^(1-β) μ^β (per token; NLHF "MD1")
    lana_printed_sign: bool = False  # LANA's sign as printed in Alg. 1 (default: the §5.2 reading)
    lora_rank: int = 16
    temperature: float = None      # sampling temperature (the toy game needs 1: y ~ π exactly)
    max_new_tokens: int = None     # toy: response length L, n = 3^L actions (1: RPS, dice, cycle, NLHF-3)
    max_prompt_tokens: int = 256   # longer prompts are truncated (with a warning)
    judge_both_orders: bool = False  # self-judge: average both presentation orders, report disagreement
    label_noise: float = 0.0       # toy: the judge's answer flips with probability ε
    eval: bool = False             # evaluate the checkpoint in out_dir instead of training
    dry_run: bool = False          # print the memory budget of a step (config only, no weights read) and exit
    resume: bool = False           # continue the run in out_dir from its last checkpoint (same flags)
    save_every: int = None
    log_every: int = None
    seed: int = 1337
    device: str = "auto"           # auto = cuda, then mps, then cpu (tiny: cpu)
    dtype: str = "auto"            # auto = bfloat16 on a GPU, float32 on the CPU


PRESETS = {   # tiny: chosen so that `python train_lm.py` converges in < 3 min; phi3: LANA's paper (ALGORITHMS §6)
    "tiny": dict(algo="all", max_steps=300, samples=32, lr=3e-4, adam_beta1=0.0, tau=0.1, eta=0.75,
                 inpo_iter_steps=5, temperature=1.0, max_new_tokens=1, save_every=100, log_every=10),
    "tiny/inpo": dict(lr=1e-3, adam_beta1=0.9),
    "tiny/nash_md": dict(lr=2e-4),
    "tiny/lana": dict(samples=8),        # LANA does not converge (either sign): a cheaper run shows that as well
    "phi3": dict(algo="lana", max_steps=750, samples=1, lr=3e-4, adam_beta1=0.0, tau=0.008, eta=0.024,
                 inpo_iter_steps=250, temperature=0.1, max_new_tokens=128, save_every=50, log_every=1),
    "phi3/inpo": dict(tau=0.005 / 3, eta=0.005, adam_beta1=0.9),      # INPO's paper: η = 0.005, τ = η/3
}
ALGOS = ("inpo", "nash_md", "lana")
ADAPTERS = {"inpo": ("policy", "prev"), "nash_md": ("policy",), "lana": ("player1", "player2")}
TRAINED = {"inpo": ("policy",), "nash_md": ("policy",), "lana": ("player1", "player2")}


class UserError(Exception):
    """Bad input or a stopped run: printed as one line, exit code 1, no traceback."""


def str2bool(s):
    words = {**dict.fromkeys(("1", "true", "yes", "y", "on"), True), **dict.fromkeys(("0", "false", "no", "n", "off"), False)}
    if s.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return words[s.lower()]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    """argparse generated from TrainConfig; unset flags stay None (= preset, see resolve)."""
    p = OneLineParser(description=__doc__.split("\n")[1])
    for f in fields(TrainConfig):
        typ = {bool: str2bool}.get(f.type, f.type)
        preset = ", ".join(f"{k}: {v[f.name]}" for k, v in PRESETS.items() if f.name in v)
        p.add_argument(f"--{f.name}", type=typ, default=f.default,
                       help=f"(default {f.default!r})" if f.default is not None else f"(preset: {preset})")
    return TrainConfig(**vars(p.parse_args(argv)))


def resolve(cfg, algo):
    """cfg with its None fields filled from PRESETS[model/algo], then PRESETS[model]."""
    preset = {**PRESETS.get(cfg.model, {}), **PRESETS.get(f"{cfg.model}/{algo}", {})}
    return replace(cfg, algo=algo, **{k: v for k, v in preset.items() if getattr(cfg, k) is None and k != "algo"})


def check_config(cfg):
    for name in ("batch_size", "samples", "max_new_tokens", "lora_rank", "save_every", "log_every",
                 "inpo_iter_steps", "max_prompt_tokens"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.max_steps < 0 or cfg.lr <= 0 or cfg.tau <= 0 or not 0 <= cfg.mix_beta < 1 or cfg.temperature <= 0:
        raise UserError("need --max_steps >= 0, --lr > 0, --tau > 0, 0 <= --mix_beta < 1, --temperature > 0")
    if cfg.algo == "inpo" and not cfg.tau <= cfg.eta:
        raise UserError(f"INPO needs --tau <= --eta (got {cfg.tau} > {cfg.eta}); the paper uses tau = eta/3")
    if not 0 <= cfg.label_noise < 0.5 or (cfg.label_noise and cfg.model != "tiny"):
        raise UserError(f"--label_noise must be in [0, 0.5) and is for the toy game only, got {cfg.label_noise}")
    if cfg.model == "tiny" and cfg.temperature != 1.0:
        raise UserError("the toy game's exact gap assumes y ~ π: keep --temperature 1 with --model tiny")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"unknown --dtype {cfg.dtype!r}; choose auto, bfloat16 or float32")


# ---------------------------------------------------------------------------------------------------- data
class Shard(NamedTuple):
    """This process's share of the GLOBAL batch under torchrun (rank 0 of 1 without it)."""
    rank: int = 0
    world: int = 1

    def rows(self, n, blocks=1):
        """Index of this rank's rows in a global batch of n rows made of `blocks` equal blocks (e.g. [y; y']): the
        rank-th of `world` equal slices of each block. Prompt slots stay whole (--batch_size % world == 0)."""
        if self.world == 1:
            return slice(None)
        m = n // blocks // self.world
        return torch.cat([torch.arange(b * n // blocks + self.rank * m, b * n // blocks + (self.rank + 1) * m)
                          for b in range(blocks)])


class Task(NamedTuple):
    """What the loop trains on. P is None for the real run (the LM judges itself)."""
    tok: object
    texts: list                 # K prompt texts
    ids: list                   # K token lists (chat template applied)
    P: np.ndarray | None        # (K, n, n) toy games, rows beat columns
    alphabet: torch.Tensor | None   # toy: the A allowed token ids
    L: int = 0                  # toy: response length (n = A^L actions)
    shard: Shard = Shard()      # torchrun: the rows of each step this process trains on


def load_prompts(path):
    """JSON lines with a "prompt" field, or plain text one prompt per line. Empty prompts are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} not found; pass --prompts FILE (JSON lines with a \"prompt\" field, "
                        "or plain text, one prompt per line)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    as_json = path.suffix in (".jsonl", ".json") or next((s for s in lines if s.strip()), "").lstrip()[:1] == "{"
    texts = []
    for i, line in enumerate(lines, 1):
        if as_json and line.strip():
            try:
                line = json.loads(line)["prompt"]
                assert isinstance(line, str)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                raise UserError(f"{path}:{i}: malformed line; each line must be a JSON object with a string "
                                "\"prompt\" field, e.g. {\"prompt\": \"Write a haiku.\"}") from None
        texts.append(line.strip())
    kept = [t for t in texts if t]
    if len(kept) < len(texts):
        print(f"skipped {len(texts) - len(kept)} empty prompt(s) in {path}")
    if not kept:
        raise UserError(f"{path} holds no prompts")
    return kept


def chat_ids(tok, texts, max_tokens):
    """Chat-formatted token ids; prompts over max_tokens tokens are cut to their first max_tokens tokens."""
    out, cut = [], 0
    for t in texts:
        ids = tok.encode(t)
        if len(ids) > max_tokens:
            t, cut = tok.decode(ids[:max_tokens]), cut + 1
        out.append(tok.encode(tok.chat(t), bos=True))
    if cut:
        print(f"warning: {cut} prompt(s) longer than {max_tokens} tokens were truncated")
    return out


def toy_task(cfg):
    """4 prompts, each its own non-transitive game over the n = 3^L responses {a,b,c}^L, with label noise ε."""
    tok = tiny_tokenizer()
    texts = ["RPS:", "Dice:", "Cycle:", "NLHF:"] if cfg.max_new_tokens == 1 else ["A:", "B:", "C:", "D:"]
    alphabet = [tok.encode(c) for c in "abc"]
    assert all(len(a) == 1 for a in alphabet), "each letter must be one token"
    if cfg.max_new_tokens == 1:       # n = 3: four classic non-transitive games (μ is the LM's, not theirs)
        P = np.stack([g.P for g in (games.rps(), games.dice(), games.weighted_cycle(), games.nlhf3())])
    else:                             # n = 3^L: random games (generically non-transitive)
        P = np.stack([games.random_game(3 ** cfg.max_new_tokens, seed=cfg.seed + k).P for k in range(len(texts))])
    P = cfg.label_noise + (1 - 2 * cfg.label_noise) * P
    return Task(tok, texts, chat_ids(tok, texts, cfg.max_prompt_tokens), P, torch.tensor([a[0] for a in alphabet]),
                cfg.max_new_tokens)


# ---------------------------------------------------------------------------------------------------- model
def find_weights(cfg):
    """--weights, else $NANO_NASH_WEIGHTS, else the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache)."""
    if cfg.weights or os.environ.get("NANO_NASH_WEIGHTS"):
        path = Path(cfg.weights or os.environ["NANO_NASH_WEIGHTS"]).expanduser()
        if not path.is_dir():
            raise UserError(f"weights folder {path} does not exist")
        return path
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
    path = Path(hub).expanduser() / "models--microsoft--Phi-3-mini-4k-instruct"
    if not path.is_dir():
        raise UserError("Phi-3 weights not found (no --weights, no $NANO_NASH_WEIGHTS, nothing in the Hugging Face "
                        f"cache {path}); get them with `huggingface-cli download microsoft/Phi-3-mini-4k-instruct "
                        "--local-dir DIR` and pass --weights DIR")
    return path


def setup(cfg, eval_split=False):
    """Device, frozen base model, task. Prompts are read first, so a bad file fails before a 7 GB load.
    Real run: every 10th prompt is held out for --eval (eval_split=True selects them)."""
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(cfg.device if cfg.device != "auto" else auto if cfg.model == "phi3" else "cpu")
    if cfg.model == "tiny":
        torch.set_num_threads(1)      # tiny matrices: more threads only add overhead (measured 4-20x slower)
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig.from_name("tiny"))
        # After the final RMSNorm |h| = √C, so with GPT-2's std 0.02 every logit is within ±0.02·C ≈ ±1.3 and the
        # LoRA players could never express a policy sharper than about 4:1. A wider output layer fixes that (and
        # makes μ non-uniform, different per prompt).
        torch.nn.init.normal_(model.lm_head.weight, std=0.06)
        return device, model.to(device), toy_task(cfg)
    texts = load_prompts(cfg.prompts or ROOT / "data" / "prompts.jsonl")
    texts = [t for i, t in enumerate(texts) if (i % 10 == 9) == eval_split] or texts
    dtype = {"auto": torch.bfloat16 if device.type in ("cuda", "mps") else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    path = find_weights(cfg)
    try:
        path = resolve_checkpoint(path)        # a folder, or the HF cache's newest snapshot
        model = GPT.from_pretrained(path, device=device, dtype=dtype)
        tok = load_tokenizer(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise UserError(f"cannot load Phi-3 from {path}: {e}") from None
    return device, model, Task(tok, texts, chat_ids(tok, texts, cfg.max_prompt_tokens), None, None)


# ---------------------------------------------------------------------------------------------------- sampling, scoring, judging
class Rollout(NamedTuple):
    """B sampled responses: tokens/attn/resp (B, T) as generate returns them; k (B,) prompt index; y (B,) toy action."""
    tokens: torch.Tensor
    attn: torch.Tensor
    resp: torch.Tensor
    k: torch.Tensor
    y: torch.Tensor | None

    def take(self, idx):
        return Rollout(*(None if t is None else t[idx] for t in self))


def sample(model, task, cfg, k, adapter, gen, mix_beta=0.0, blocks=1):
    """One response per entry of k, from `adapter` (None = base), or from the per-token mixture with the base.
    Under torchrun k is the GLOBAL batch (`blocks` equal blocks, e.g. [k; k]) and this rank generates only its
    rows, with the random numbers of the whole batch (generate(rows=...)); generate draws them for all
    max_new_tokens steps even when its rows stop early, so every rank's `gen` stays in step and a row's answer
    does not depend on the number of processes."""
    stop = () if task.P is not None else task.tok.stop_ids
    rows = task.shard.rows(len(k), blocks)
    tokens, attn, resp = generate(model, [task.ids[i] for i in k.tolist()], max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, stop_tokens=stop, pad_id=task.tok.pad_id,
                                  generator=gen, adapter=adapter, mix_adapter=None, mix_beta=mix_beta,
                                  allowed_tokens=task.alphabet, rows=None if isinstance(rows, slice) else rows)
    k = k[rows]
    y = None
    if task.P is not None:              # toy: the L response tokens -> action index in base A
        lut = torch.full((model.config.vocab_size,), -1, dtype=torch.long, device=tokens.device)
        lut[task.alphabet.to(tokens.device)] = torch.arange(len(task.alphabet), device=tokens.device)
        y = torch.zeros(len(k), dtype=torch.long, device=tokens.device)
        for t in range(cfg.max_new_tokens):
            y = y * len(task.alphabet) + lut[tokens[:, -cfg.max_new_tokens + t]]
    return Rollout(tokens, attn, resp, k, y)


def toy_policy(model, task):
    """log π(y|x) for every prompt and every response y ∈ A^L: (K, n), each row a distribution over n = |A|^L.
    π is the constrained sampler's policy: at each position the LM's next-token law renormalised over A,
        log π(y) = Σ_t [ log p(y_t | x, y_<t) − log Σ_{a ∈ A} p(a | x, y_<t) ].
    Term t comes from sequence_logprobs with resp_mask on position t only, normalised over the A responses that
    share the prefix y_<t. Differentiable; this is how the toy game scores every response exactly."""
    A, K, L = len(task.alphabet), len(task.ids), task.L
    seqs = [ids + [int(task.alphabet[a]) for a in y] for ids in task.ids for y in product(range(A), repeat=L)]
    T = max(map(len, seqs))
    device = model.lm_head.weight.device
    tokens = torch.tensor([[task.tok.pad_id] * (T - len(s)) + s for s in seqs], device=device)  # (K·n, T)
    attn = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], device=device)
    logpi = torch.zeros(K, A ** L, device=device)
    for t in range(L):
        resp = torch.zeros_like(attn)
        resp[:, T - L + t] = 1
        s = sequence_logprobs(model, tokens, attn, resp).view(K, A ** t, A, -1)  # (K, prefix, y_t, suffix)
        logpi = logpi + s.log_softmax(2).reshape(K, -1)
    return logpi


def row_adapters(model, names):
    """adapter_ids (B,) for GPT's per-row adapters: row b uses adapter names[b] (None = the base, id -1)."""
    return torch.tensor([-1 if n is None else model.adapter_names.index(n) for n in names],
                        device=model.lm_head.weight.device)


def logprobs(model, adapter, r, task, grad=False):
    """log π_adapter(y|x) per row of r (B,); adapter None = the base μ. adapter may be a list, one per row: all
    rows are then scored in ONE forward pass (per-row LoRA), e.g. two players, or π_t and μ, at once."""
    per_row = isinstance(adapter, (list, tuple))
    with torch.set_grad_enabled(grad):
        if task.P is not None:            # toy: one exact table per distinct adapter, rows gathered from it
            rows = list(adapter) if per_row else [adapter] * len(r.k)
            names = list(dict.fromkeys(rows))
            tables = []
            for a in names:
                with model.adapter(a):
                    tables.append(toy_policy(model, task))              # (K, n)
            which = torch.tensor([names.index(a) for a in rows], device=r.k.device)
            return torch.stack(tables)[which, r.k, r.y]
        if per_row:
            return sequence_logprobs(model, r.tokens, r.attn, r.resp, adapter_ids=row_adapters(model, adapter))
        with model.adapter(adapter):
            return sequence_logprobs(model, r.tokens, r.attn, r.resp)


JUDGE = ("Which response is better? Read the question and the two responses, then decide which response answers "
         "the question better.\n\nQuestion:\n{x}\n\nResponse 1:\n{a}\n\nResponse 2:\n{b}\n\n"
         "Output 1 or 2 and nothing else.")


def response_text(task, r, b):
    ids = r.tokens[b][r.resp[b].bool()].tolist()
    return task.tok.decode([i for i in ids if i not in task.tok.stop_ids], skip_special=True).strip()


@torch.no_grad()
def judge(model, task, cfg, r1, r2, adapter=None, both_orders=None):
    """P(y ≻ y') per pair (B,). Toy: the game's P_ε. Real: the LM under `adapter` (None = base; or a list, one
    judge per pair, all in one forward pass) reads JUDGE in Phi-3's chat format and we compare its logits for "1"
    and "2" (nano_nash.judge_preference)."""
    if task.P is not None:
        return torch.tensor(task.P[r1.k.cpu(), r1.y.cpu(), r2.y.cpu()], dtype=torch.float32, device=r1.k.device), {}
    tok, device = task.tok, r1.tokens.device
    one, two = tok.encode("1")[-1], tok.encode("2")[-1]

    def logits(ra, rb):
        prompts = [tok.encode(tok.chat(JUDGE.format(x=task.texts[int(ra.k[b])], a=response_text(task, ra, b),
                                                    b=response_text(task, rb, b))), bos=True) for b in range(len(ra.k))]
        T = max(map(len, prompts))
        x = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
        per_row = isinstance(adapter, (list, tuple))
        with model.adapter(None if per_row else adapter):
            out = model(x, attn_mask=mask, last_only=True,                 # (B, V) at the answer position
                        adapter_ids=row_adapters(model, adapter) if per_row else None)[:, -1].float()
        return out[:, one], out[:, two]

    both = cfg.judge_both_orders if both_orders is None else both_orders
    return nano_nash.judge_preference(*logits(r1, r2), *(logits(r2, r1) if both else ()))


# ---------------------------------------------------------------------------------------------------- one step per algorithm
def duel(pref, gen, shard=Shard()):
    """Rows of the winner and loser in a [y; y'] batch of 2B: y wins with probability P(y ≻ y') (INPO's λ_p).
    Every rank draws the coins of the global batch and keeps its own (u < p is torch.bernoulli's own draw)."""
    B = len(pref)
    u = torch.rand(B * shard.world, generator=gen, device=pref.device)[shard.rows(B * shard.world)]
    win = u < pref
    i = torch.arange(B, device=pref.device)
    return torch.where(win, i, i + B), torch.where(win, i + B, i)


def step_inpo(model, task, cfg, k, gen, step):
    """INPO eq. 8: y, y' ~ π_t (the frozen adapter "prev"), ordered by the base-model judge, square loss."""
    if step % cfg.inpo_iter_steps == 0:
        model.copy_adapter("policy", "prev")                 # π_t <- π_θ: a new INPO iteration begins
    r = sample(model, task, cfg, torch.cat([k, k]), "prev", gen, blocks=2)   # rows [y; y'], both ~ π_t
    B = len(r.k) // 2
    pref, st = judge(model, task, cfg, r.take(slice(0, B)), r.take(slice(B, None)))
    w, l = duel(pref, gen, task.shard)
    lp = logprobs(model, "policy", r, task, grad=True)
    both = r.take(torch.arange(4 * B, device=r.k.device) % (2 * B))   # π_t and μ score the rows in one forward
    lp_prev, lp_ref = logprobs(model, ["prev"] * (2 * B) + [None] * (2 * B), both, task).split(2 * B)
    loss, s = nano_nash.inpo_loss(lp[w], lp[l], lp_prev[w], lp_prev[l], lp_ref[w], lp_ref[l], tau=cfg.tau, eta=cfg.eta)
    return loss, {**st, **s, "win": pref.mean().item(), "kl": (lp - lp_ref).mean().item(), "ntok": int(r.resp.sum())}


def step_nash_md(model, task, cfg, k, gen, step):
    """Nash-MD-PG: y ~ π_θ, y' ~ π_θ^(1-β) μ^β (per token, KV-cached), base judge, policy gradient.
    y and y' are sampled in one generate call (rows [y; y'], β = 0 on the y rows): one forward pass per token."""
    B = len(k)
    r = sample(model, task, cfg, torch.cat([k, k]), "policy", gen, mix_beta=[0.0] * B + [cfg.mix_beta] * B,
               blocks=2)
    B = len(r.k) // 2                                        # this rank's rows
    r, r2 = r.take(slice(0, B)), r.take(slice(B, None))
    pref, st = judge(model, task, cfg, r, r2)
    lp, lp_ref = logprobs(model, "policy", r, task, grad=True), logprobs(model, None, r, task)
    loss, s = nano_nash.nash_md_pg_loss(lp, lp_ref, pref, tau=cfg.tau)
    ntok = int(r.resp.sum() + r2.resp.sum())
    return loss, {**st, **s, "win": pref.mean().item(), "kl": (lp - lp_ref).mean().item(), "ntok": ntok}


def step_lana(model, task, cfg, k, gen, step):
    """LANA Algorithm 1: each player samples y, y' ~ π_i; the OTHER player judges; loss on (π_{-i}(y_w), π_i(y_l)).
    Both players run batched, rows [y₁; y₂; y₁'; y₂'] (player 1, 2, 1, 2) with per-row adapters: one generate call,
    one judge forward (player 2 judges player 1's pairs and vice versa), one log-prob forward with grad (each row
    under its own player: the gradient reaches only that player's adapter), one without (opponents, and the base
    for player 1's KL statistic). Judge statistics are over both players' duels; win and kl are player 1's."""
    p1, p2 = "player1", "player2"
    B = len(k)
    r = sample(model, task, cfg, torch.cat([k, k, k, k]), [p1] * B + [p2] * B + [p1] * B + [p2] * B, gen, blocks=4)
    B = len(r.k) // 4                                        # this rank's rows per block
    me, opp = [p1] * B + [p2] * B, [p2] * B + [p1] * B       # the player of each [y; y'] half, and its judge
    pref, st = judge(model, task, cfg, r.take(slice(0, 2 * B)), r.take(slice(2 * B, None)), adapter=opp)
    lp = logprobs(model, me + me, r, task, grad=True)
    i1 = torch.arange(2 * B, device=r.k.device)
    i1 = i1 + B * (i1 >= B)                                  # player 1's rows [y₁; y₁'], player 2's: i1 + B
    rows = torch.cat([torch.arange(4 * B, device=r.k.device), i1])
    lp_opp, lp_base = logprobs(model, opp + opp + [None] * (2 * B), r.take(rows), task).split(4 * B)
    total, stats = 0.0, {}
    for i, rows in enumerate((i1, i1 + B)):                  # player 1, then player 2: [y; y'] as duel() expects
        w, l = duel(pref[i * B:(i + 1) * B], gen, task.shard)
        loss, s = nano_nash.lana_loss(lp_opp[rows][w], lp[rows][l], printed_sign=cfg.lana_printed_sign)
        total = total + loss
        if i == 0:
            stats = {**st, **s, "win": pref[:B].mean().item(), "kl": (lp[rows] - lp_base).mean().item()}
    stats["ntok"] = int(r.resp.sum())
    return total, stats


STEP = {"inpo": step_inpo, "nash_md": step_nash_md, "lana": step_lana}


# ---------------------------------------------------------------------------------------------------- exact gap (toy)
@torch.no_grad()
def toy_pi(model, task, adapter):
    """The policy table π(·|x_k) under `adapter` as float64 numpy (K, n), rows renormalised."""
    with model.adapter(adapter):
        pi = toy_policy(model, task).exp().double().cpu().numpy()
    return pi / pi.sum(1, keepdims=True)


def toy_gap(model, task, cfg, adapter, mu):
    """Mean over prompts of DualGap_τ(π_θ) for the game (P_ε, μ, τ) (0 exactly at its NE), and DualGap_0."""
    pi = toy_pi(model, task, adapter)
    gap = np.mean([games.duality_gap(P, p, m, cfg.tau) for P, p, m in zip(task.P, pi, mu)])
    return float(gap), float(np.mean([games.duality_gap(P, p) for P, p in zip(task.P, pi)]))


def closed_form(task, mu, cfg, T):
    """The same games (P_ε, μ, τ) under games.py's closed-form updates: mean gap after each of T iterations.
    "Expected step" = the softmax-table step that the sampled loss follows on average (learning rate 3)."""
    tau, eta, beta = cfg.tau, cfg.eta, cfg.mix_beta
    dyn = {f"INPO = OMD, η_I = {eta}": lambda P, m, p, t: games.omd_step(P, m, p, 1 / eta, tau),
           "Nash-MD, η_t = 2/(τ(t+2))": lambda P, m, p, t: games.nash_md_step(P, m, p, 2 / (tau * (t + 2)), tau),
           f"Nash-MD-PG, β = {beta} (expected step)": lambda P, m, p, t: games.nash_md_pg_step(P, m, p, 3., tau, beta),
           "LANA, §5.2 sign (expected step)": lambda P, m, p, t: games.lana_sgd_step(P, p, 3.0),
           "LANA, printed sign (expected step)": lambda P, m, p, t: games.lana_sgd_step(P, p, 3.0, True)}
    return {name: np.mean([[games.duality_gap(P, p, m, tau) for p in games.run(partial(f, P, m), m, T)]
                           for P, m in zip(task.P, mu)], 0) for name, f in dyn.items()}


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir, step, model, cfg, opt, gen):
    """run_dir/ckpt_<step>/: every adapter (PEFT format), state.pt (optimizer, all RNG states, step, config) and
    config.json. Written to a temp folder and renamed into place (atomic), then older checkpoints are removed."""
    tmp, final = run_dir / f".tmp_ckpt_{step:06d}", run_dir / f"ckpt_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in model.adapter_names:
        model.save_adapter(name, tmp / name)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "gen": gen.get_state(), "python": random.getstate(),
           "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng, "config": asdict(cfg)}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in run_dir.glob("ckpt_*"):
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir):
    return max(Path(run_dir).glob("ckpt_*"), default=None)


def restore_state(ckpt, opt, gen):
    """Optimizer and RNG states of a checkpoint (adapters are loaded before the optimizer is built); returns step."""
    st = torch.load(ckpt / "state.pt", weights_only=True)
    opt.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["rng"]["torch"])
    gen.set_state(st["rng"]["gen"])
    random.setstate(st["rng"]["python"])
    kind, keys, pos, has_gauss, gauss = st["rng"]["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if st["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(st["rng"]["cuda"])
    return st["step"]


# ---------------------------------------------------------------------------------------------------- torchrun
@contextmanager
def distributed():
    """This process's Shard. `torchrun --nproc_per_node N train_lm.py ...` sets WORLD_SIZE, RANK, LOCAL_RANK and the
    rendezvous: join the process group (gloo for CPU tensors, NCCL for CUDA ones on GPU cuda:LOCAL_RANK; the toy
    game stays on the CPU), silence stdout on ranks > 0 (errors still reach stderr) and leave the group at the
    end, also on errors. Without torchrun: Shard(0, 1), nothing else."""
    if "WORLD_SIZE" not in os.environ:
        yield Shard()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank < torch.cuda.device_count():     # (the toy game may run more CPU processes than there are GPUs)
        torch.cuda.set_device(local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    stdout = sys.stdout
    try:
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")
        yield Shard(dist.get_rank(), dist.get_world_size())
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        dist.destroy_process_group()


def all_reduce_grads(params, loss, shard):
    """Data parallelism on the adapters only; returns the loss averaged over ranks (a float). Ranks hold equally
    many rows, so the mean of their gradients is the global batch's gradient, as in DDP. DDP would hook one module's
    forward, but one frozen base serves every role through adapter switching, so we all-reduce by hand after
    backward: gradients and loss in ONE bucket. Equal seeds (or checkpoint) keep the adapters equal on all ranks."""
    if shard.world == 1:
        return loss.item()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [loss.detach().reshape(1).to(grads[0])])
    dist.all_reduce(flat)
    flat /= shard.world
    for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
        p.grad = g.view_as(p)
    return flat[-1].item()


# ---------------------------------------------------------------------------------------------------- training
def phase(cfg, msg):
    """Progress on long phases of the real run, overwritten in place on a terminal's stderr ("" clears it)."""
    if cfg.model != "tiny" and sys.stderr.isatty():
        print(f"\r{msg:<60}\r", end="", file=sys.stderr, flush=True)


def train(cfg, run_dir, shard=Shard()):
    """Train one algorithm; returns the log records (one dict per logged step). Under torchrun every rank runs this
    with the same seed and checkpoint; only rank 0 computes gaps and writes logs, checkpoints and plots."""
    device, model, task = setup(cfg)
    task = task._replace(shard=shard)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint in {run_dir} (expected {run_dir}/ckpt_<step>/ from an earlier "
                        "run with the same --out_dir)")
    for name in ADAPTERS[cfg.algo]:       # all on ONE base: players, previous iterate; adapters off = reference
        model.load_adapter(name, ckpt / name) if ckpt else model.add_adapter(name, r=cfg.lora_rank,
                                                                             alpha=2 * cfg.lora_rank)
    params = [p for name in TRAINED[cfg.algo] for p in model.adapter_parameters(name)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, 0.999), weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(cfg.seed)     # sampling, batches, duel labels
    start = restore_state(ckpt, opt, gen) if ckpt else 0
    mu = toy_pi(model, task, None) if task.P is not None else None
    if shard.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{run_dir.name}: {cfg.algo} on {cfg.model} ({device}), {sum(p.numel() for p in params):,} trainable "
          f"parameters in {', '.join(TRAINED[cfg.algo])}, {len(task.ids)} prompts, steps {start}..{cfg.max_steps}"
          + (f", {shard.world} processes" if shard.world > 1 else ""))
    records, saved = [], ckpt
    with open(run_dir / "log.jsonl" if shard.rank == 0 else os.devnull, "a") as log:
        log.write(json.dumps({"config": asdict(cfg), "start_step": start}) + "\n")
        for step in range(start, cfg.max_steps + 1):
            rec = {"step": step}
            if task.P is not None and shard.rank == 0 and (step % cfg.log_every == 0 or step >= cfg.max_steps - 1):
                rec["gap"], rec["gap0"] = toy_gap(model, task, cfg, TRAINED[cfg.algo][0], mu)
            if step == cfg.max_steps:      # the last entry: the gap after the final update
                if "gap" in rec:
                    records.append(rec)
                    log.write(json.dumps(rec) + "\n")
                break
            t0 = time.time()
            K = len(task.ids)            # the GLOBAL batch: the same draws on every rank (sample() keeps its rows)
            k = torch.cat([torch.randperm(K, generator=gen, device=device) for _ in range(-(-cfg.batch_size // K))])
            k = k[:cfg.batch_size]
            phase(cfg, f"step {step}: generating, judging, training")
            loss, st = STEP[cfg.algo](model, task, cfg, k.repeat_interleave(cfg.samples), gen, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss = all_reduce_grads(params, loss, shard)      # the mean over ranks (a float)
            if not math.isfinite(loss):
                raise UserError(f"non-finite loss ({loss}) at step {step}: run stopped; the last good checkpoint "
                                f"({saved or 'none written yet'}) is intact. Try a lower --lr.")
            for g in opt.param_groups:       # cosine decay to 0, a function of the step (nothing to checkpoint)
                g["lr"] = cfg.lr * (0.5 + 0.5 * math.cos(math.pi * step / cfg.max_steps) if cfg.cosine else 1.0)
            opt.step()
            dt = time.time() - t0
            rec.update(loss=loss, win=st["win"], kl=st["kl"], tok_s=st["ntok"] / dt, s_step=dt,
                       **({"orders_disagree": st["orders_disagree"]} if cfg.judge_both_orders and task.P is None else {}))
            if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                gap = f" | gap {rec['gap']:.3e}" if "gap" in rec else ""
                gap += f" | orders disagree {rec['orders_disagree']:.0%}" if "orders_disagree" in rec else ""
                phase(cfg, "")
                print(f"{run_dir.name} step {step:4d} | loss {rec['loss']:.4f} | win {rec['win']:.3f} | "
                      f"kl {rec['kl']:.4f}{gap} | {rec['tok_s']:.0f} tok/s | {dt:.3f} s/step", flush=True)
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                saved = save_checkpoint(run_dir, step + 1, model, cfg, opt, gen) if shard.rank == 0 else \
                    run_dir / f"ckpt_{step + 1:06d}"
    if shard.rank == 0:
        plot({run_dir.name: records}, run_dir / "plot.png")
    return records


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(cfg, run_dir):
    """Win rate of the trained player against the base on held-out prompts, judged by the base model in both
    orders; 95% normal CI over prompts. Writes AlpacaEval JSON (list of {instruction, output, generator})."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"--eval: no checkpoint in {run_dir}; train first (same --out_dir and --algo)")
    device, model, task = setup(cfg, eval_split=True)
    player = TRAINED[cfg.algo][0]
    model.load_adapter(player, ckpt / player)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    prefs, disagree, outputs, reference = [], [], [], []
    k_all = torch.arange(len(task.ids), device=device).repeat_interleave(cfg.samples)
    for chunk in k_all.split(cfg.batch_size * cfg.samples):
        phase(cfg, f"eval: {len(prefs)}/{len(k_all)}")
        r, r0 = sample(model, task, cfg, chunk, player, gen), sample(model, task, cfg, chunk, None, gen)
        pref, st = judge(model, task, cfg, r, r0, adapter=None, both_orders=True)
        prefs.append(pref.cpu())
        disagree.append(st.get("orders_disagree", 0.0) * len(chunk))
        for b, i in enumerate(chunk.tolist()):
            outputs.append(dict(instruction=task.texts[i], output=response_text(task, r, b), generator=run_dir.name))
            reference.append(dict(instruction=task.texts[i], output=response_text(task, r0, b), generator="base"))
    pref = torch.cat(prefs).double()
    n, m = len(pref), pref.mean().item()
    half = 1.96 * pref.std().item() / math.sqrt(n) if n > 1 else 0.0
    dis = sum(disagree) / n if task.P is None else None        # the toy judge is the game itself: no orders
    result = dict(checkpoint=str(ckpt), win_rate=m, ci95=[m - half, m + half], n=n, orders_disagree=dis,
                  judge="base model, both orders averaged" if task.P is None else "the toy game's P")
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    for name, obj in (("model_outputs.json", outputs), ("reference_outputs.json", reference), ("results.json", result)):
        (out / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    phase(cfg, "")
    print(f"{run_dir.name}: win rate vs base {m:.3f} (95% CI {m - half:.3f}..{m + half:.3f}, n = {n})"
          + (f"; the two judge orders disagree on {dis:.0%}" if dis is not None else "") + f"; AlpacaEval JSON in {out}")
    return result


# ---------------------------------------------------------------------------------------------------- memory budget
def param_counts(c, r):
    """(base, one LoRA adapter) parameter counts of model.py's Phi-3 (no biases, untied lm_head): embed V·C +
    lm_head C·V + final norm C + per layer qkv C·(C + 2·kv·hd), o C·C, gate_up C·2I, down I·C and 2 norms 2C.
    LoRA on Linear(in, out) adds A (r, in) + B (out, r); the adapters target all four Linears."""
    C, I, hd = c.n_embd, c.intermediate_size, c.n_embd // c.n_head
    shapes = [(C, C + 2 * c.n_kv_head * hd), (C, C), (C, 2 * I), (I, C)]
    base = 2 * c.vocab_size * C + C + c.n_layer * (sum(i * o for i, o in shapes) + 2 * C)
    return base, c.n_layer * sum(r * (i + o) for i, o in shapes)


def memory_budget(c, cfg, dtype_bytes=2):
    """Bytes of one training step of our layout: ONE frozen base (dtype_bytes each), the fp32 LoRA adapters of the
    algorithm (ADAPTERS: LANA's two players, INPO's policy and frozen prev, Nash-MD's policy), fp32 gradients and
    AdamW's m, v for the trained ones. Transients, B = batch, S = samples, T = prompt + new tokens:
      kv_cache     ONE generate call: INPO 2·B·S rows [y; y'], LANA 4·B·S (both players), Nash-MD 3·B·S ([y; y']
                   and the base's copy of each mixed y' row)
      activations  an ESTIMATE of what autograd keeps per token and layer: qkv out, rotated q and k, attention out,
                   gate_up out and silu (compute dtype); both RMSNorm inputs (fp32); the four Linear inputs cast to
                   the fp32 adapters and their r-wide bottlenecks; plus fp32 logits at the response positions.
                   Rows with a graph: INPO 2·B·S, Nash-MD B·S, LANA 4·B·S (both players' losses before backward).
    Generation and training run one after the other: total = static + max(kv_cache, activations). Activations
    measured with autograd's saved-tensor hooks on model.py: within 0.3% (fp32) and 4% (bf16) of the estimate."""
    base, lora = param_counts(c, cfg.lora_rank)
    C, I, hd, L, V = c.n_embd, c.intermediate_size, c.n_embd // c.n_head, c.n_layer, c.vocab_size
    B, T, N = cfg.batch_size * cfg.samples, cfg.max_prompt_tokens + cfg.max_new_tokens, cfg.max_new_tokens
    per_tok = (3 * C + 3 * c.n_kv_head * hd + 3 * I) * dtype_bytes + (2 * C + 3 * C + I + 4 * cfg.lora_rank) * 4
    rows, kv_rows = {"inpo": (2 * B, 2 * B), "nash_md": (B, 3 * B), "lana": (4 * B, 4 * B)}[cfg.algo]
    return finish_budget(dict(
        base_weights=base * dtype_bytes, adapter_each=4 * lora, adapters=4 * lora * len(ADAPTERS[cfg.algo]),
        gradients=4 * lora * len(TRAINED[cfg.algo]), optimizer_state=8 * lora * len(TRAINED[cfg.algo]),
        kv_cache=kv_rows * T * L * 2 * c.n_kv_head * hd * dtype_bytes, activations=rows * (T * L * per_tok + N * V * 4)))


def naive_budget(c, cfg, dtype_bytes=2, copies=3):
    """The peers' layout (TRL-style): policy, reference and opponent (LANA: 2 players + reference; INPO: policy,
    π_t, reference; Nash-MD: policy, reference, judge) as separate full copies, the trained ones fully fine-tuned
    with mixed-precision AdamW (gradients in dtype_bytes, fp32 master weights and m, v: 12 bytes). Same transients
    (a full fine-tune keeps somewhat different activations; not modelled)."""
    ours, (base, _) = memory_budget(c, cfg, dtype_bytes), param_counts(c, cfg.lora_rank)
    trained = len(TRAINED[cfg.algo]) * base
    return finish_budget(dict(base_weights=copies * base * dtype_bytes, adapter_each=0, adapters=0,
                              gradients=trained * dtype_bytes, optimizer_state=trained * 12,
                              kv_cache=ours["kv_cache"], activations=ours["activations"]))


def finish_budget(d):
    d["static"] = d["base_weights"] + d["adapters"] + d["gradients"] + d["optimizer_state"]
    d["total"] = d["static"] + max(d["kv_cache"], d["activations"])
    return d


def dry_run(cfg):
    """--dry_run: the budget from the config alone (config.json of --weights, else the phi3-mini preset)."""
    if cfg.model == "tiny":
        c = GPTConfig.from_name("tiny")
    elif cfg.weights:
        try:
            c = config_from_hf(resolve_checkpoint(find_weights(cfg)) / "config.json")
        except CheckpointError as e:
            raise UserError(f"--dry_run: {e}") from None
    else:
        c = GPTConfig.from_name("phi3-mini")
    dtype_bytes = 4 if cfg.dtype == "float32" else 2
    ours, naive = memory_budget(c, cfg, dtype_bytes), naive_budget(c, cfg, dtype_bytes)
    base, lora = param_counts(c, cfg.lora_rank)
    print(f"{cfg.algo} on {cfg.model}: {base:,} base parameters, {lora:,} per adapter (r = {cfg.lora_rank}); "
          f"batch {cfg.batch_size} x {cfg.samples} samples, {cfg.max_prompt_tokens} + {cfg.max_new_tokens} tokens, "
          f"{'fp32' if dtype_bytes == 4 else 'bf16'} base\n{'bytes (GB = 1e9)':<18}{'nano_nash':>12}{'naive':>12}")
    for k, v in ours.items():
        print(f"{k:<18}{v / 1e9:>12.3f}{naive[k] / 1e9:>12.3f}")
    print("(static = weights + adapters + gradients + optimizer; total = static + max(kv_cache, activations): "
          "generation and training run one after the other)\n")
    return ours, naive


# ---------------------------------------------------------------------------------------------------- plot and main
def plot(runs, path, closed=None, iter_steps=None):
    """runs: name -> records. Exact gap per step if logged (toy), else the loss; `closed`: closed-form curves beside
    (and INPO's, one iteration per iter_steps steps, on the left)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gap = any("gap" in r for recs in runs.values() for r in recs)
    key = "gap" if gap else "loss"
    fig, axes = plt.subplots(1, 2 if closed else 1, figsize=(13 if closed else 6.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    for name, recs in runs.items():
        pts = [(r["step"], r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts), label=name)
    if closed:
        last = max(r["step"] for recs in runs.values() for r in recs)
        inpo = next(v for k, v in closed.items() if k.startswith("INPO"))[:last // iter_steps + 1]
        ax.plot(np.arange(len(inpo)) * iter_steps, inpo, "k:", label="INPO closed form (1 iteration per inpo_iter_steps)")
        for name, curve in closed.items():
            axes[0, 1].plot(np.maximum(curve, 1e-12), label=name)      # 0 at the NE: floor for the log scale
        axes[0, 1].set(xlabel="iteration", ylabel="DualGap_τ", yscale="log", title="closed form (games.py), same P, μ, τ")
        axes[0, 1].legend(fontsize=8)
    ax.set(xlabel="step", ylabel="DualGap_τ (exact, mean over prompts)" if gap else "loss",
           title="LM (tiny Phi-3, LoRA) on the toy preference game" if gap else "training loss",
           yscale="log" if gap else "linear")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan(cfg):
    """(name, resolved config) of each run: --algo all = INPO, Nash-MD-PG, LANA in both sign readings."""
    if cfg.model not in PRESETS:
        raise UserError(f"unknown --model {cfg.model!r}; choose tiny or phi3")
    algo = cfg.algo or PRESETS[cfg.model]["algo"]
    if algo not in ALGOS + ("all",):
        raise UserError(f"unknown --algo {algo!r}; choose one of {', '.join(ALGOS)} or all")
    if algo == "all" and cfg.model != "tiny":
        raise UserError("--algo all is the toy game's comparison; with --model phi3 pick inpo, nash_md or lana")
    runs = [(a, replace(resolve(cfg, a), lana_printed_sign=False)) for a in ALGOS] + \
           [("lana_printed", replace(resolve(cfg, "lana"), lana_printed_sign=True))] if algo == "all" else \
           [(algo + ("_printed" if cfg.lana_printed_sign and algo == "lana" else ""), resolve(cfg, algo))]
    for _, sub in runs:
        check_config(sub)
    return runs


def main(cfg, shard=Shard()):
    """Train (or --eval) every run of the plan; for the toy game print the exact gaps and draw the figure."""
    runs = plan(cfg)
    if shard.world > 1 and cfg.eval:
        raise UserError("--eval runs in one process: start it with python, not torchrun")
    if cfg.batch_size % shard.world:
        fit = shard.world * -(-cfg.batch_size // shard.world)
        raise UserError(f"--batch_size {cfg.batch_size} is the global batch and must be divisible by the number of "
                        f"processes ({shard.world}); e.g. --batch_size {fit}")
    if cfg.dry_run:
        return {name: dry_run(sub) for name, sub in runs}
    if cfg.eval:
        return {name: evaluate(sub, Path(cfg.out_dir) / name) for name, sub in runs}
    logs = {name: train(sub, Path(cfg.out_dir) / name, shard) for name, sub in runs}
    if cfg.model != "tiny" or shard.rank > 0:
        return logs
    sub = dict(runs).get("inpo", runs[0][1])
    print(f"\nexact DualGap_τ of the LM policy (τ = {sub.tau}, label noise {sub.label_noise}), mean over prompts:")
    for name, recs in logs.items():
        g = [r["gap"] for r in recs if "gap" in r]
        print(f"  {name:13s} start {g[0]:.3e}  final {g[-1]:.3e}  start/final {g[0] / g[-1]:6.1f}x  min {min(g):.3e}")
    if len(runs) > 1 and cfg.figure:
        _, model, task = setup(sub)
        closed = closed_form(task, toy_pi(model, task, None), sub, sub.max_steps)
        for name, curve in closed.items():
            print(f"  closed form, {name}: {curve[0]:.3e} -> {curve[-1]:.3e} in {len(curve) - 1} iterations")
        plot(logs, ROOT / cfg.figure, closed, sub.inpo_iter_steps)
        print(f"wrote {cfg.figure}")
    return logs


if __name__ == "__main__":
    args = parse_args()
    try:
        with distributed() as shard:
            main(args, shard)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
