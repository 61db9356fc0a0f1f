"""
train_lm.py: train a language model toward the Nash equilibrium of a preference game.

    python train_lm.py                               # the proof: a tiny Phi-3 plays known games; exact gaps
    python train_lm.py --algo inpo                   # one algorithm of the toy game
    python train_lm.py --model phi3 [--weights DIR]  # Phi-3-mini, LoRA players, the model judges (LANA)
    python train_lm.py --model phi3 --eval           # win rate of the trained policy vs the base
    python train_lm.py --model phi3 --dry_run        # the memory of a step, from config.json alone

Reading order: the config; the pieces of a step (sample, judge, score, duel); one step function per algorithm
and the registry ALGOS (each algorithm's step, adapters, yardstick, memory rows and defaults); the loop; eval;
--dry_run; main. The loop and the steps are the same for the toy game and the real run: both are a task
(tasks.py). The losses are in nano_nash.py; weights on disk in weights.py; checkpoints, resume and torchrun in
runs.py; the figures in plots.py. Simplifications: one gradient step per batch; duel labels are sampled (y
wins with probability P(y ≻ y'), INPO's λ_p); the real run samples at temperature 0.1 (LANA's setting), which
the theory of INPO and Nash-MD-PG (y ~ π) does not cover.
"""
import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import games
import nano_nash
import plots
from model import GPTConfig, generate, sequence_logprobs
from runs import Interrupts, Run, Shard, UserError, all_reduce, distributed
from tasks import Rollout, find_weights, setup
from weights import CheckpointError, load_adapter, read_config


# ----------------------------------------------------------------------------------------------------------
# config

@dataclass
class TrainConfig:
    model: str = "tiny"            # tiny: the toy game (exact gaps, CPU) | phi3: Phi-3-mini-4k-instruct
    algo: str = ""                 # a key of ALGOS; "": tiny all (every algorithm, one run each), phi3 lana
    weights: str = ""              # phi3: a folder or HF cache; else $NANO_NASH_WEIGHTS, else ~/.cache
    prompts: str = ""              # phi3: .jsonl / .json / .txt; "" = data/prompts.jsonl
    out_dir: str = "out/lm"        # run folders: out_dir/<algo>/ (runs.py)
    figure: str = "figures/lm_convergence.png"   # tiny --algo all: the gap curves beside the closed form
    batch_size: int = 4            # prompts per step (the global batch under torchrun)
    max_steps: int = None          # None: this and the next 8 come from ALGOS[algo].tiny or .phi3
    samples: int = None            # sampled pairs per prompt per step
    lr: float = None
    adam_beta1: float = None
    tau: float = None              # KL temperature τ of the regularised game
    eta: float = None              # INPO's step size η (the paper's η_I = 1/η); ητ ≤ 1
    iter_steps: int = None         # INPO: gradient steps per iteration (then π_t <- π_θ)
    max_new_tokens: int = None     # tiny: the response length L (n = 3^L actions)
    temperature: float = None      # tiny: 1 (the exact gap assumes y ~ π)
    mix_beta: float = 0.125        # Nash-MD-PG's opponent π^(1−β) μ^β, per token ("MD1" in NLHF)
    lora_rank: int = 16
    cosine: bool = True            # cosine learning-rate decay to 0 at max_steps
    max_prompt_tokens: int = 256   # longer prompts are cut (with a warning)
    judge_both_orders: bool = False  # self-judge: average both presentation orders, log their disagreement
    grad_checkpoint: bool = False  # recompute each block in backward: activation memory / ~n_layer
    micro_batches: int = 1         # split each step's slots into chunks whose gradients add up
    compile: bool = False          # decode through torch.compile (model.compiled): faster after a compile
    label_noise: float = 0.0       # tiny: the judge's answer flips with probability ε
    save_every: int = 50
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"           # auto: cuda, then mps, then cpu (tiny: cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto: bfloat16 on a GPU, float32 on the CPU | bfloat16 | float32
    resume: bool = False           # continue the run in out_dir/<algo>/ from its last checkpoint
    overwrite: bool = False        # replace the run in out_dir/<algo>/ (deletes only what that run wrote)
    eval: bool = False             # evaluate the run's checkpoint instead of training
    dry_run: bool = False          # print the memory budget of a step and exit (no weights read)
    debug: bool = False            # show tracebacks for errors (else one line)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.error = lambda msg: p.exit(2, f"error: {msg} (see --help)\n")          # one line, like every error here
    for f in fields(TrainConfig):                   # --flag / --no-flag for booleans, as in games.py
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
        p.add_argument(f"--{f.name}", default=f.default, **kind)
    return TrainConfig(**vars(p.parse_args(argv)))


CHECKS = [  # (flags, what must hold, what it must be): every flag is checked here, before anything is loaded
    ("batch_size samples max_new_tokens lora_rank save_every log_every max_prompt_tokens iter_steps "
     "micro_batches".split(), lambda v: v >= 1, "a positive integer"),
    (["max_steps"], lambda v: 0 <= v < 10**9, "an integer >= 0"),
    (["lr", "tau", "eta", "temperature"], lambda v: 0 < v < math.inf, "a finite number > 0"),
    (["adam_beta1", "mix_beta"], lambda v: 0 <= v < 1, "in [0, 1)"),
    (["label_noise"], lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    (["seed"], lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    (["dtype"], lambda v: v in ("auto", "bfloat16", "float32"), "auto, bfloat16 or float32"),
]


def check(cfg):
    for names, ok, what in CHECKS:
        for name in names:
            v = getattr(cfg, name)
            if v is not None and not ok(v):            # nan fails every comparison, so it lands here too
                raise UserError(f"--{name} must be {what}, got {v}")
    toy = cfg.model == "tiny"
    if cfg.algo == "inpo" and cfg.eta * cfg.tau > 1:
        raise UserError(f"INPO needs --eta x --tau <= 1 (got {cfg.eta * cfg.tau:g}); the paper uses 1/3")
    if toy and (cfg.temperature != 1 or cfg.max_new_tokens > 4):
        raise UserError("the toy game needs --temperature 1 (its exact gap assumes y ~ π) and "
                        "--max_new_tokens <= 4 (3^L responses are enumerated)")
    if toy and (cfg.prompts or cfg.weights):
        raise UserError("--prompts and --weights apply to --model phi3; the toy game has its own")
    if not toy and cfg.label_noise:
        raise UserError("--label_noise is for the toy game (--model tiny), whose judge is an oracle")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# sampling, scoring, duels: what every step is made of

def sample(model, task, cfg, k, adapters, u, mix_beta=0.0):
    """R responses per slot: k (S,) prompt of each slot, u (S, R, N) uniforms -> a Rollout of R·S rows, block
    by block ([first response of every slot; second; ...]); adapters and mix_beta: one, or one per row."""
    k = k.repeat(u.size(1))
    t, m, r = generate(model, [task.prompts[i] for i in k.tolist()], cfg.max_new_tokens, adapters=adapters,
                       mix_beta=mix_beta, temperature=cfg.temperature, vocab=task.vocab,
                       stop_ids=task.stop_ids, pad_id=task.tok.pad_id,
                       uniforms=u.transpose(0, 1).flatten(0, 1), compile=cfg.compile)   # (R·S, N), by block
    return Rollout(t, m, r, k)


def score(model, task, r, adapters, grad=False):
    """log π(y|x) of each row under `adapters` (one, or one per row): (B,)."""
    with torch.set_grad_enabled(grad):
        return sequence_logprobs(model, r.tokens, r.mask, r.resp, adapters, task.vocab)


def duel(pref, coins):
    """Rows of the winners and losers of pairs (i, i + S) in a [first; second] Rollout of 2S rows: the first
    wins with probability P(first ≻ second) (INPO's λ_p)."""
    i, win = torch.arange(len(pref), device=pref.device), coins < pref
    return torch.where(win, i, i + len(pref)), torch.where(win, i + len(pref), i)


def halves(r):
    S = len(r.k) // 2
    return r.take(slice(0, S)), r.take(slice(S, None))


# ----------------------------------------------------------------------------------------------------------
# one training step per algorithm: (model, task, cfg, k (S,) prompts, rng, step) -> (loss, stats)
# rng(*shape) gives uniforms (S, *shape) for this process's slots of the global batch.

def step_inpo(model, task, cfg, k, rng, step):
    """INPO (§4): y, y' ~ π_t (the frozen adapter "prev"), ordered by the judge (the base), square loss."""
    if step % cfg.iter_steps == 0:
        model.copy_adapter("policy", "prev")                      # π_t <- π_θ: a new INPO iteration
    r = sample(model, task, cfg, k, "prev", rng(2, cfg.max_new_tokens))          # rows [y; y'] ~ π_t
    pref, st = task.judge(model, *halves(r), None, cfg.judge_both_orders)
    w, l = duel(pref, rng())
    pair, S = r.take(torch.cat([w, l])), len(k)                   # rows [y_w; y_l]
    lp_prev, lp_ref = score(model, task, pair.take(torch.arange(4 * S) % (2 * S)),
                            ["prev"] * 2 * S + [None] * 2 * S).split(2 * S)      # one forward for π_t and μ
    lp = score(model, task, pair, "policy", grad=True)            # (after: no graph is held meanwhile)
    loss, s = nano_nash.inpo_loss(*lp.split(S), *lp_prev.split(S), *lp_ref.split(S), eta=cfg.eta, tau=cfg.tau)
    return loss, {**st, **s, "win": pref.mean(), "kl": (lp - lp_ref).mean().detach(), "ntok": r.resp.sum()}


def step_nash_md_pg(model, task, cfg, k, rng, step):
    """Nash-MD-PG (§3.4): y ~ π_θ, y' ~ π_θ^(1−β) μ^β (per token), judged by the base, policy gradient."""
    S = len(k)
    r = sample(model, task, cfg, k, "policy", rng(2, cfg.max_new_tokens), [0.0] * S + [cfg.mix_beta] * S)
    y, y2 = halves(r)
    pref, st = task.judge(model, y, y2, None, cfg.judge_both_orders)
    lp_ref, lp = score(model, task, y, None), score(model, task, y, "policy", grad=True)
    loss, s = nano_nash.pg_loss(lp, pref, lp_ref, tau=cfg.tau)
    return loss, {**st, **s, "win": pref.mean(), "ntok": r.resp.sum()}


def step_lana(model, task, cfg, k, rng, step, printed_sign=False):
    """LANA, Algorithm 1 (§6): each player samples y, y' ~ π_i; the OTHER player judges; the loss couples the
    opponent's log π_{−i}(y_w) with the player's own log π_i(y_l). Both players run in one batch (per-row
    adapters): rows [y of player 1; y of player 2; y' of player 1; y' of player 2]."""
    S, me = len(k), ["player1"] * len(k) + ["player2"] * len(k)
    opp = me[S:] + me[:S]                                          # the judge of each pair: the other player
    r = sample(model, task, cfg, k, me + me, rng(2, 2, cfg.max_new_tokens).flatten(1, 2))      # 4 rows/slot
    pref, st = task.judge(model, *halves(r), opp, cfg.judge_both_orders)
    w, l = duel(pref, rng(2).T.flatten())
    lp_w = score(model, task, r.take(w), opp)                      # each winner under the opponent
    lp_l = score(model, task, r.take(l), me, grad=True)           # each loser under its own player
    loss, s = nano_nash.lana_loss(lp_l, lp_w, printed_sign=printed_sign)
    return loss, {**st, **s, "win": pref.mean(), "ntok": r.resp.sum()}


def step_maio_pg(model, task, cfg, k, rng, step, judge=None):
    """MAIO-PG (this repo, §5.1): y ~ π_θ against ỹ, the winner of a duel between two more samples a, b of
    π_θ, with the payoff advantage P(y ≻ ỹ) − 1/2 (pg_loss, τ = 0): mirror ascent against LANA's improved
    opponent, with a payoff instead of LANA's log-ratio. No reference log-probs; the judge is the frozen base
    (judge="policy": the policy judges itself, which selfjudge.py measures). The duel is not decided by a
    coin: its winner is a with probability P(a ≻ b), so P(y ≻ ỹ) is replaced by its mean
    P(a ≻ b) P(y ≻ a) + P(b ≻ a) P(y ≻ b) (the same expected gradient, less noise)."""
    i = torch.arange(len(k), device=k.device)
    r = sample(model, task, cfg, k, "policy", rng(3, cfg.max_new_tokens))       # rows [y; a; b] ~ π_θ
    y, a, b = i, i + len(k), i + 2 * len(k)
    pref, st = task.judge(model, r.take(torch.cat([a, y, y])), r.take(torch.cat([b, a, b])), judge,
                          cfg.judge_both_orders)                     # one call: (a, b), (y, a), (y, b)
    p_ab, p_ya, p_yb = pref.split(len(k))
    pref_y = p_ab * p_ya + (1 - p_ab) * p_yb                       # E[P(y ≻ ỹ)] over the duel's winner ỹ
    loss, s = nano_nash.pg_loss(score(model, task, r.take(y), "policy", grad=True), pref_y)
    return loss, {**st, **s, "win": pref_y.mean(), "ntok": r.resp.sum()}


class Algo(NamedTuple):
    step: Callable        # (model, task, cfg, k, rng, step) -> (loss, stats)
    adapters: tuple       # the adapters it keeps on the base; the first `trained` ones are trained
    trained: int
    gap: str              # its yardstick: "gap" = DualGap_τ (targets π*_τ), "gap0" = DualGap_0 (no τ, no μ)
    judges: tuple         # for each trained adapter, the adapter that judges it (None: the frozen base)
    rows: tuple           # per slot: rows generated, scored with a graph, scored without (for --dry_run)
    tiny: tuple           # the defaults of TrainConfig's None fields (HPARAMS order) for --model tiny
    phi3: tuple           # ... and for --model phi3


# Every default that depends on the algorithm or the model. tiny: tuned so that `python train_lm.py` converges
# in < 3 min on 2 CPU cores. phi3: LANA's paper (§6: lr 3e-4, batch 4, temperature 0.1, 128 new tokens), and
# INPO's paper for its τ and η (App. B: η_I = 0.005, so η = 200; τ = η_I/3, so ητ = 1/3).
HPARAMS = "max_steps samples lr adam_beta1 tau eta iter_steps max_new_tokens temperature".split()
ALGOS = {
    "inpo": Algo(step_inpo, ("policy", "prev"), 1, "gap", (None,), rows=(2, 2, 4),
                 #     steps samples lr    beta1 tau       eta    iter  new  temperature
                 tiny=(300,  32,     1e-3, .9,   .1,       4 / 3, 5,    1,   1.),
                 phi3=(750,  1,      3e-4, 0.,   .005 / 3, 200.,  250,  128, .1)),
    "nash_md_pg": Algo(step_nash_md_pg, ("policy",), 1, "gap", (None,), rows=(3, 1, 1),
                       tiny=(300, 32, 2e-4, 0., .1, None, None, 1, 1.),
                       phi3=(750, 1, 3e-4, 0., .008, None, None, 128, .1)),
    "lana": Algo(step_lana, ("player1", "player2"), 2, "gap0", ("player2", "player1"), rows=(4, 2, 2),
                 tiny=(300, 8, 3e-4, 0., .1, None, None, 1, 1.),
                 phi3=(750, 1, 3e-4, 0., None, None, None, 128, .1)),
    "maio_pg": Algo(step_maio_pg, ("policy",), 1, "gap0", (None,), rows=(3, 1, 0),
                    tiny=(400, 128, 1.5e-4, 0., .1, None, None, 1, 1.),
                    phi3=(750, 1, 3e-4, 0., None, None, None, 128, .1)),
}
ALL = ("inpo", "nash_md_pg", "lana", "maio_pg", "lana_printed")           # --algo all: the toy comparison
ALGOS["lana_printed"] = ALGOS["lana"]._replace(step=lambda *a: step_lana(*a, printed_sign=True))
ALGOS["maio_pg_self"] = ALGOS["maio_pg"]._replace(step=lambda *a: step_maio_pg(*a, judge="policy"),
                                                  judges=("policy",))         # selfjudge.py's variant
MATH = ["model", "algo", "base", "prompts_sha", "batch_size", "samples", "lr", "adam_beta1", "tau", "eta",
        "iter_steps", "max_new_tokens", "temperature", "mix_beta", "lora_rank", "cosine", "max_prompt_tokens",
        "judge_both_orders", "label_noise", "seed", "dtype"]    # --resume refuses to change these


def resolve(cfg, algo):
    """cfg for one algorithm, checked: its None fields from ALGOS[algo].tiny or .phi3."""
    table = dict(zip(HPARAMS, getattr(ALGOS[algo], cfg.model)))
    return check(replace(cfg, algo=algo, **{k: v for k, v in table.items() if getattr(cfg, k) is None}))


# ----------------------------------------------------------------------------------------------------------
# training

def train(cfg, path, shard=Shard(), built=None):
    """Train one algorithm in the run folder `path` (runs.py); returns its log records. built: a (model, task,
    base name) to use instead of setup(cfg)'s (selfjudge.py brings a model taught to judge)."""
    algo = ALGOS[cfg.algo]
    with Run(path, asdict(cfg), MATH, resume=cfg.resume, overwrite=cfg.overwrite,
             replaceable=cfg.model == "tiny", writer=shard.rank == 0) as run:    # refuse before any load
        model, task, base = built or setup(cfg)
        device = model.lm_head.weight.device
        run.config.update(base=base, prompts_sha=hashlib.sha256(json.dumps(task.texts).encode()).hexdigest())
        state = run.load(model, algo.adapters) if cfg.resume else {}
        torch.manual_seed(cfg.seed)                           # the adapters' init: the same in every run
        for name in () if state else algo.adapters:           # all on ONE base; adapters off = μ
            model.add_adapter(name, cfg.lora_rank, 2 * cfg.lora_rank)
        params = [p for a in algo.adapters[:algo.trained] for p in model.lora_parameters(a)]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, 0.999), weight_decay=0.0)
        gen = torch.Generator(device).manual_seed(cfg.seed)   # every random number: batches, samples, duels
        if state:
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["rng"])
        print(f"{path.name}: {cfg.algo} on {cfg.model} ({device}), {sum(p.numel() for p in params):,} "
              f"trainable parameters in {', '.join(algo.adapters[:algo.trained])}, {len(task.prompts)} "
              f"prompts, steps {state.get('step', 0)}..{cfg.max_steps}"
              + f", {shard.world} processes" * (shard.world > 1))
        loop(cfg, model, task, algo, run, opt, gen, params, state, base, shard)
        if run.writer:
            plots.lm_convergence({path.name: (algo.gap, run.records())}, path / "plot.png")
        return run.records()


def loop(cfg, model, task, algo, run, opt, gen, params, state, base, shard):
    """Steps from the checkpoint's to max_steps: a batch, the algorithm's step, backward, all-reduce, checks,
    AdamW, log, save. A record holds the exact gaps (toy) of the policy before the step's update (and of the
    average iterate, whose running sum avg is saved with the checkpoint) and the step's statistics."""
    slots, device = cfg.batch_size * cfg.samples, gen.device      # the global batch: prompt x sample slots
    start, avg = state.get("step", 0), state.get("avg", {})
    judges = dict(zip(algo.adapters[:algo.trained], algo.judges))

    def rng(*shape):                                          # the global draw, this process's slots
        return torch.rand(slots, *shape, generator=gen, device=device)[shard.mine(slots)]

    def diverged(step, what):
        return UserError(f"{what} at step {step}: the run diverged; the last checkpoint "
                         f"({run.latest() or 'none yet'}) is intact. Try a lower --lr")

    with Interrupts() as stop:
        for step in range(start, cfg.max_steps + 1):
            rec = {"step": step}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                rec.update(task.measure(model, judges, avg))
            if step == cfg.max_steps:
                break
            t0 = time.time()
            perm = torch.cat([torch.randperm(len(task.prompts), generator=gen, device=device)
                              for _ in range(-(-cfg.batch_size // len(task.prompts)))])
            k = perm[:cfg.batch_size].repeat_interleave(cfg.samples)[shard.mine(slots)]
            opt.zero_grad(set_to_none=True)
            try:
                loss, st = forward_backward(cfg, model, task, algo, k, rng, gen, step)
            except FloatingPointError:
                raise diverged(step, "the model's logits are not finite") from None
            vals = all_reduce(params, [loss, *st.values()], shard)
            gnorm = torch.nn.utils.clip_grad_norm_(params, math.inf)
            if not (torch.isfinite(vals[0]) and torch.isfinite(gnorm)):
                raise diverged(step, "the loss or its gradient is not finite")
            for g in opt.param_groups:        # cosine decay to 0: a function of the step, nothing to save
                g["lr"] = cfg.lr * (0.5 + 0.5 * math.cos(math.pi * step / cfg.max_steps) if cfg.cosine else 1)
            opt.step()
            if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                dt, st = time.time() - t0, dict(zip(st, vals[1:].tolist()))
                ntok = st.pop("ntok") * shard.world               # every stat is the mean over ranks
                rec.update(loss=vals[0].item(), **st, tok_s=ntok / dt, s_step=dt)
                run.log(rec)
                print(f"{run.path.name} step {step:4d} | " + " | ".join(
                    f"{k} {v:.4g}" for k, v in rec.items() if k != "step"), flush=True)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop.signal:
                x = torch.tensor([task.prompts[0]], device=device)   # only a finite model is saved
                with torch.no_grad():
                    if not all(torch.isfinite(model(x, a)).all() for a in algo.adapters):
                        raise diverged(step + 1, "the adapters give non-finite logits")
                state = {"optimizer": opt.state_dict(), "rng": gen.get_state(), "avg": avg}
                run.save(step + 1, model, algo.adapters, state, base)
            if stop.signal:
                raise UserError(f"stopped by {stop.signal} after step {step + 1}, saved in {run.latest()}; "
                                "continue with the same command and --resume")
    run.log(rec)
    run.finish()


def forward_backward(cfg, model, task, algo, k, rng, gen, step):
    """The algorithm's step on the slots k and its backward, in cfg.micro_batches chunks whose gradients add
    up (each chunk's loss weighted by its share of the slots): the gradient of one big step, a fraction of its
    activation memory. Each chunk restarts gen (rng's generator) at the step's state, so it draws the step's
    numbers again and keeps its own slots: the samples do not depend on the number of chunks. Returns the loss
    and the statistics (means over the slots; ntok a sum)."""
    at, loss, stats = gen.get_state(), 0.0, {}
    model.checkpointing = cfg.grad_checkpoint
    for c in torch.arange(len(k), device=k.device).tensor_split(cfg.micro_batches):
        gen.set_state(at)                                     # the step's draws again, this chunk's slots
        part, st = algo.step(model, task, cfg, k[c], lambda *shape: rng(*shape)[c], step)
        (part * len(c) / len(k)).backward()
        loss = loss + part.detach() * len(c) / len(k)
        for key, v in st.items():
            stats[key] = stats.get(key, 0.0) + (v if key == "ntok" else v * len(c) / len(k))
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(cfg, path):
    """Win rate of the trained policy against the base on the held-out prompts (toy: the games), judged by the
    base in both orders (toy: by P); 95% CI. Writes AlpacaEval JSON ({instruction, output, generator})."""
    run, player = Run(path, {}, [], resume=True, writer=False), ALGOS[cfg.algo].adapters[0]
    if run.latest() is None:
        raise UserError(f"--eval: no checkpoint in {path}; train first with the same --out_dir and --algo")
    model, task, _ = setup(cfg, held_out=True)
    try:
        load_adapter(model, player, run.latest() / player)
    except CheckpointError as e:
        raise UserError(f"--eval: {e}") from None
    gen, prefs, rows = torch.Generator(model.lm_head.weight.device).manual_seed(cfg.seed), [], []
    ks = torch.arange(len(task.prompts), device=gen.device).repeat_interleave(cfg.samples)
    for k in ks.split(cfg.batch_size * cfg.samples):
        u = torch.rand(len(k), 1, cfg.max_new_tokens, generator=gen, device=gen.device)
        ours, base = sample(model, task, cfg, k, player, u), sample(model, task, cfg, k, None, u)
        prefs.append(task.judge(model, ours, base, None, True)[0].cpu())
        for b, i in enumerate(k.tolist()):
            ids = [r.tokens[b][r.resp[b].bool()].tolist() for r in (ours, base)]
            rows.append((task.texts[i], *(task.tok.decode(x, skip_special=True).strip() for x in ids)))
    pref = torch.cat(prefs).double()
    n, m = len(pref), pref.mean().item()
    half = 1.96 * pref.std().item() / math.sqrt(n) if n > 1 else 0.0
    result = dict(checkpoint=str(run.latest()), win_rate=m, ci95=[m - half, m + half], n=n)
    out = path / "eval"
    try:
        out.mkdir(exist_ok=True)
        for name, obj in (("model_outputs.json", [dict(instruction=x, output=a, generator=path.name)
                                                  for x, a, _ in rows]),
                          ("reference_outputs.json", [dict(instruction=x, output=b, generator="base")
                                                      for x, _, b in rows]), ("results.json", result)):
            (out / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); free space or fix permissions, then run "
                        "--eval again") from None
    print(f"{path.name}: win rate vs the base {m:.3f} (95% CI {m - half:.3f}..{m + half:.3f}, n = {n}); "
          f"AlpacaEval JSON in {out}")
    return result


# ----------------------------------------------------------------------------------------------------------
# --dry_run: the memory of one step, from the config alone

def memory(c, cfg, dtype_bytes=2):
    """Bytes of one step (GB = 1e9). S = batch·samples slots, T = prompt + new tokens, N = new tokens, R = the
    rank of all of the algorithm's adapters together (they run in one LoRA matmul), M = micro_batches.
      base          every weight once, in the compute dtype (the reference, the judge, every player share it)
      adapters      float32 A, B of each adapter; its gradient (4 bytes) and AdamW's m, v (8) if trained
      kv_cache      one generate call: rows · T · n_layer · 2 (k, v) · n_kv_head · head_dim, rows = S·r/M
      scoring       the log-probs taken without a graph (π_t, μ, an opponent), before the graph is built:
                    float32 logits at the response positions and cross_entropy's log-softmax, S·n/M rows
      activations   what autograd keeps per token and layer (q, k, v, attention out, gate_up, silu, and the
                    float32 LoRA inputs and bottlenecks) and cross_entropy's log-softmax, then in backward two
                    more logits-sized buffers (its gradient and the logits'), for S·g/M rows (r, g, n:
                    ALGOS[algo].rows). With --grad_checkpoint: each block's input, plus one block's
                    activations while it is recomputed. The CPU and CUDA attention kernels both keep only
                    the output and its logsumexp (no T x T matrix), so the estimate is the same on both.
    The phases follow each other: total = base + adapters + max(kv_cache, scoring, activations)."""
    C, I, hd, L, V = c.n_embd, c.intermediate_size, c.n_embd // c.n_head, c.n_layer, c.vocab_size
    algo, S, kv = ALGOS[cfg.algo], cfg.batch_size * cfg.samples / cfg.micro_batches, c.n_kv_head * hd
    N, R = cfg.max_new_tokens, cfg.lora_rank * len(algo.adapters)
    T = cfg.max_prompt_tokens + N
    lora = L * cfg.lora_rank * (6 * C + 2 * kv + 3 * I)                # A, B of the 4 linear layers
    per_tok = (3 * C + 3 * kv + 3 * I) * dtype_bytes + (5 * C + I + 4 * R) * 4
    kept = T * (L * C * dtype_bytes + per_tok) if cfg.grad_checkpoint else T * L * per_tok
    gen_rows, graph_rows, free_rows = algo.rows
    d = dict(base=dtype_bytes * (2 * V * C + C + L * (C * (2 * C + 2 * kv) + 3 * C * I + 2 * C)),
             adapters=4 * lora * len(algo.adapters) + 12 * lora * algo.trained,
             kv_cache=int(gen_rows * S * T * L * 2 * kv * dtype_bytes),
             scoring=int(free_rows * S * 2 * N * V * 4),
             activations=int(graph_rows * S * (kept + 3 * N * V * 4)))
    d["total"] = d["base"] + d["adapters"] + max(d["kv_cache"], d["scoring"], d["activations"])
    return d


def dry_run(cfg):
    """The memory of a step as set, with --grad_checkpoint, and with it and one slot per micro-batch."""
    c = GPTConfig.from_name("tiny") if cfg.model == "tiny" else \
        read_config(find_weights(cfg) / "config.json") if cfg.weights else GPTConfig.from_name("phi3-mini")
    dtype_bytes, M = 4 if cfg.dtype == "float32" else 2, cfg.batch_size * cfg.samples
    cols = {"as set": cfg, "--grad_checkpoint": replace(cfg, grad_checkpoint=True),
            f"+ --micro_batches {M}": replace(cfg, grad_checkpoint=True, micro_batches=M)}
    d = {name: memory(c, sub, dtype_bytes) for name, sub in cols.items()}
    print(f"{cfg.algo} on {cfg.model}: batch {cfg.batch_size} x {cfg.samples} samples, "
          f"{cfg.max_prompt_tokens} + {cfg.max_new_tokens} tokens, LoRA r = {cfg.lora_rank}, "
          f"{8 * dtype_bytes}-bit weights (GB = 1e9)\n"
          f"  {'':<12}" + "".join(f"{name:>20}" for name in cols) + "\n" +
          "\n".join(f"  {k:<12}" + "".join(f"{d[n][k] / 1e9:17.3f} GB" for n in cols) for k in d["as set"]))
    return d["as set"]


# ----------------------------------------------------------------------------------------------------------
# main

def plan(cfg):
    """[(run name, resolved config)]: --algo all (the toy default) runs every algorithm of ALGOS."""
    if cfg.model not in ("tiny", "phi3"):
        raise UserError(f"unknown --model {cfg.model!r}; choose tiny or phi3")
    cfg = replace(cfg, algo=cfg.algo or ("all" if cfg.model == "tiny" else "lana"))
    if cfg.algo not in ALGOS and not (cfg.algo == "all" and cfg.model == "tiny"):
        raise UserError(f"unknown --algo {cfg.algo!r}; choose one of {', '.join(ALGOS)}"
                        + (" or all" if cfg.model == "tiny" else " (all is the toy game's comparison)"))
    return [(a, resolve(cfg, a)) for a in (ALL if cfg.algo == "all" else [cfg.algo])]


def main(cfg, shard=Shard()):
    runs = plan(cfg)
    if cfg.batch_size % shard.world:
        raise UserError(f"--batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                        f"number of processes ({shard.world}), e.g. {shard.world * cfg.batch_size}")
    if cfg.dry_run or cfg.eval:
        if shard.world > 1:
            raise UserError("--eval and --dry_run run in one process: start them with python, not torchrun")
        return {name: dry_run(sub) if cfg.dry_run else evaluate(sub, Path(cfg.out_dir) / name)
                for name, sub in runs}
    logs = {name: train(sub, Path(cfg.out_dir) / name, shard) for name, sub in runs}
    if cfg.model == "tiny" and shard.rank == 0:
        print("\nexact gap of the LM policy, mean over prompts (DualGap_τ with τ = 0.1, or DualGap_0):")
        for name, recs in logs.items():
            key = ALGOS[name].gap
            g = [r[key] for r in recs if key in r]
            print(f"  {name:13s} {'DualGap_0' if key == 'gap0' else 'DualGap_τ'}  start {g[0]:.3e}  final "
                  f"{g[-1]:.3e} ({g[0] / g[-1]:5.1f}x lower)  average iterate {recs[-1]['avg_' + key]:.3e}")
        if len(runs) > 1 and cfg.figure:
            sub = dict(runs)["inpo"]
            model, task, _ = setup(sub)
            closed = games.reference_curves(task.P, task.policy(model, None), sub.tau, sub.eta, sub.mix_beta,
                                            sub.max_steps, 3.0)
            plots.lm_convergence({a: (ALGOS[a].gap, recs) for a, recs in logs.items()}, Path(cfg.figure),
                                 closed, sub.iter_steps)
            print(f"wrote {cfg.figure}")
    return logs


if __name__ == "__main__":
    args = parse_args()
    try:
        with distributed() as shard:
            main(args, shard)
    except (UserError, CheckpointError, OSError, torch.OutOfMemoryError, KeyboardInterrupt) as e:
        if args.debug:
            raise
        what = {torch.OutOfMemoryError: "out of memory: lower --batch_size or --max_new_tokens, or use a "
                "bigger device", KeyboardInterrupt: "interrupted; --resume goes on from the last checkpoint"}
        what = what.get(type(e), str(e))
        print(f"error: {what.splitlines()[0] if what else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
