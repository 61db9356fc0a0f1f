"""
train_lm.py: train a language model toward the Nash equilibrium of a preference game.

    python train_lm.py                    # the proof: a tiny Phi-3 plays known games; exact gaps
    python train_lm.py --algo inpo        # one algorithm of the toy game
    python train_lm.py --model phi3 [--weights DIR]   # Phi-3-mini, LoRA players, the model judges
    python train_lm.py --model smollm2 --algo lana    # the same run in small: SmolLM2-135M, 2 CPUs
    python train_lm.py --model phi3 --eval       # win rate of the trained policy vs the base
    python train_lm.py --model phi3 --dry_run    # the memory of a step, from config.json alone
    python train_lm.py --model smollm2 --judge_check   # is the judge better than a coin?

Reading order, as in nanoGPT's train.py: the config and its presets; the pieces of a step (sample,
score, duel); one step function per algorithm and the registry ALGOS (each algorithm's step,
adapters, yardstick, memory rows and defaults); the training loop, in one function; main. The loop
and the steps are the same for the toy game and the real run: both are a task (tasks.py).
Elsewhere: the losses in nano_nash.py; a run's config from the presets (plan.config), the checks of
the flags, the runs a command makes and the toy comparison's report in plan.py; --eval and
--judge_check (which a real run also prints at its start) in evaluate.py; --dry_run in memory.py;
checkpoints, resume and torchrun in runs.py.
Simplifications: one gradient step per batch; duel labels are sampled (y wins with probability
P(y ≻ y'); INPO's loss takes P itself, eq. 8 in expectation over its coin); Phi-3's run
samples at temperature 0.1 (LANA's setting), which the theory of INPO and Nash-MD-PG (y ~ π)
does not cover (SmolLM2's samples at 1).
"""
import cli

if __name__ == "__main__":
    cli.catch_signals()         # first: Ctrl-C during the imports below is one line too

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import nano_nash
import plots
import words
from model import generate, sequence_logprobs
from cli import Interrupts, UserError, flags
from parallel import Shard, all_reduce
from runs import Run
from tasks import Rollout, setup


# --------------------------------------------------------------------------------------------------
# config

@dataclass
class TrainConfig:
    model: str = "tiny"          # a key of MODELS: tiny: the toy game (exact gaps, CPU) | phi3:
                                 # Phi-3-mini-4k | smollm2: SmolLM2-135M-Instruct (2 CPU cores)
    algo: str = ""               # a key of ALGOS, or all; "": tiny all (the comparison), smollm2
                                 # inpo, phi3 lana
    task: str = ""               # toy | words (words.py) | chat (real prompts, self-judged); "":
                                 # the model's (MODELS), chat when --prompts is given
    weights: str = ""            # real models: a folder or HF cache; else $NANO_NASH_WEIGHTS, the
                                 # HF cache (tasks.HUB)
    prompts: str = ""            # real models: .jsonl / .json / .txt; "" = data/prompts.jsonl
    out_dir: str = "out/lm"      # run folders: out_dir/<algo>/ (runs.py)
    figure: str = "figures/lm_convergence.png"   # tiny --algo all: the gaps beside the closed forms
    batch_size: int = 4          # prompts per step (the global batch under torchrun)
    # the toy game's defaults; MODELS and ALGOS (below) change these per model and algorithm
    max_steps: int = 300
    samples: int = 32            # sampled slots per prompt per step
    lr: float = 3e-4
    adam_beta1: float = 0.0
    tau: float = 0.1             # KL temperature τ of the regularised game (toy: DualGap_τ's too)
    eta: float = 4 / 3           # step size η of INPO (the paper's η_I = 1/η; ητ ≤ 1) and SPPO
    iter_steps: int = 5          # INPO, SPPO: gradient steps per iteration (then π_t <- π_θ)
    max_new_tokens: int = 1      # tiny: the response length L (n = 3^L actions)
    temperature: float = 1.0     # tiny: 1 (the exact gap assumes y ~ π)
    mix_beta: float = 0.125      # Nash-MD-PG's opponent π^(1−β) μ^β, per token ("MD1" in NLHF)
    lora_rank: int = 16
    cosine: bool = True          # cosine learning-rate decay to 0 at max_steps
    max_prompt_tokens: int = 256     # longer prompts are cut (with a warning)
    judge_both_orders: bool = False  # self-judge: average both orders, log their disagreement
    grad_checkpoint: bool = False    # recompute each block in backward: activations / ~n_layer
    micro_batches: int = 1       # split each step's slots into chunks whose gradients add up
    compile: bool = False        # decode through torch.compile (model.compiled): faster, once built
    label_noise: float = 0.0     # tiny: the judge's answer flips with probability ε
    save_every: int = 50
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"         # auto: cuda, mps, then cpu (tiny: cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"          # auto: bfloat16 on a GPU, float32 on the CPU | bfloat16 | float32
    resume: bool = False         # continue the run in out_dir/<algo>/ from its last checkpoint
    overwrite: bool = False      # replace the run in out_dir/<algo>/ (deletes only what it wrote)
    eval: bool = False           # evaluate the run's checkpoint instead of training (evaluate.py)
    dry_run: bool = False        # print the memory of a step and exit; no weights read (memory.py)
    judge_check: bool = False    # real models: the judge's accuracy on labelled pairs (evaluate.py)
    judge_pairs: str = ""        # its pairs: .jsonl of {prompt, good, bad}; "" = data/judge_pairs
    debug: bool = False          # show tracebacks for errors (else one line)


# The defaults that depend on the model; each algorithm adds its own (ALGOS[algo].tiny, or .real
# on a real model). A run's config (plan.config): TrainConfig(**MODELS[model], **ALGOS[algo].tiny
# or .real, **flags given).
# phi3: LANA's paper (§6: lr 3e-4, batch 4, temperature 0.1, 128 new tokens); 3 iterations of
# INPO and SPPO (their papers' count).
# smollm2: the same run in small, for 2 CPU cores: a step in seconds (batch 2, 32 new tokens), 3
# iterations of 10 steps; temperature 1, as the theory samples (y ~ π); the judge reads both
# orders (SmolLM2 favours a position: --judge_check); float32, the CPU's (on a GPU too: it is
# small, and --dry_run counts what runs).
MODELS = {
    "tiny": dict(task="toy"),                    # TrainConfig's defaults
    "phi3": dict(
        task="chat",
        max_steps=750,
        iter_steps=250,
        samples=1,
        max_new_tokens=128,
        temperature=0.1,
    ),
    "smollm2": dict(
        task="words",
        max_steps=30,
        iter_steps=10,
        batch_size=2,
        samples=1,
        max_new_tokens=32,
        temperature=1.0,
        judge_both_orders=True,
        dtype="float32",
        log_every=1,
        save_every=10,
    ),
}

# Each task's defaults over the model's (and its default --algo): the words game (words.py) asks
# 3 games a step, `samples` answers each, of at most 3 tokens (a move is 1 or 2, then its end);
# its sampled yardstick costs seconds (N_SAMPLES answers per game), so it is logged every 5 steps.
TASKS = {
    "toy": dict(algo="all"),
    "chat": dict(algo="lana"),
    "words": dict(
        algo="inpo",
        figure="figures/words.png",
        max_steps=40,
        iter_steps=5,
        batch_size=3,
        samples=16,
        max_new_tokens=3,
        temperature=1.0,
        tau=0.15,
        lr=5e-4,
        dtype="bfloat16",
        log_every=5,
        save_every=10,
    ),
}

MATH = ("model task algo base prompts_sha batch_size samples lr adam_beta1 tau eta iter_steps "
        "max_new_tokens temperature mix_beta lora_rank cosine max_prompt_tokens judge_both_orders "
        "label_noise seed dtype").split()        # --resume refuses to change these


# --------------------------------------------------------------------------------------------------
# sampling, scoring, duels: what every step is made of

def uniforms(gen, slots, rows, *shape):
    """The step's next draw: uniforms (slots, *shape) for every slot of the global batch, of which
    this process (and micro-batch) keeps `rows`: the samples do not depend on how the batch is
    split."""
    return torch.rand(slots, *shape, generator=gen, device=gen.device)[rows]


def sample(model, task, cfg, k, adapters, u, mix_beta=0.0):
    """R responses per slot: k (S,) prompt of each slot, u (S, R, N) uniforms -> a Rollout of R·S
    rows, block by block ([first response of every slot; second; ...]); adapters and mix_beta: one,
    or one per row."""
    k = k.repeat(u.size(1))
    t, m, r = generate(
        model,
        [task.prompts[i] for i in k.tolist()],
        cfg.max_new_tokens,
        adapters=adapters,
        mix_beta=mix_beta,
        temperature=cfg.temperature,
        vocab=task.vocab,
        stop_ids=task.stop_ids,
        pad_id=task.tok.pad_id,
        uniforms=u.transpose(0, 1).flatten(0, 1),       # (R·S, N), block by block
        compile=cfg.compile,
    )
    return Rollout(t, m, r, k)


def score(model, task, r, adapters, grad=False):
    """log π(y|x) of each row under `adapters` (one, or one per row): (B,)."""
    with torch.set_grad_enabled(grad):
        return sequence_logprobs(model, r.tokens, r.mask, r.resp, adapters, task.vocab,
                                 task.shared)


def duel(pref, coins):
    """Rows of the winners and losers of pairs (i, i + S) in a [first; second] Rollout of 2S rows:
    the first wins with probability P(first ≻ second)."""
    i = torch.arange(len(pref), device=pref.device)
    win = coins < pref
    return torch.where(win, i, i + len(pref)), torch.where(win, i + len(pref), i)


def halves(r):
    S = len(r.k) // 2
    return r.take(slice(0, S)), r.take(slice(S, None))


# --------------------------------------------------------------------------------------------------
# one training step per algorithm: (model, task, cfg, k (S,) prompts, rng) -> (loss, stats)
# rng(*shape) gives uniforms (S, *shape) for these slots of the global batch.

def step_inpo(model, task, cfg, k, rng):
    """INPO (§4): y, y' ~ π_t (the frozen adapter "prev"), judged by the base, square loss (in
    expectation over eq. 8's coin: no winner is drawn)."""
    S = len(k)
    r = sample(model, task, cfg, k, "prev", rng(2, cfg.max_new_tokens))    # rows [y; y'] ~ π_t
    pref, st = task.judge(model, *halves(r), None, cfg.judge_both_orders)
    twice = r.take(torch.arange(4 * S) % (2 * S))
    lp_prev, lp_ref = score(model, task, twice, ["prev"] * 2 * S + [None] * 2 * S).split(2 * S)
    lp = score(model, task, r, "policy", grad=True)             # (after: no graph held meanwhile)
    loss, s = nano_nash.inpo_loss(*lp.split(S), *lp_prev.split(S), *lp_ref.split(S), pref,
                                  eta=cfg.eta, tau=cfg.tau)
    kl = (lp - lp_ref).mean().detach()
    return loss, {**st, **s, "win": pref.mean(), "kl": kl, "ntok": r.resp.sum()}


def step_nash_md_pg(model, task, cfg, k, rng):
    """Nash-MD-PG (§3.4): y ~ π_θ, y' ~ π_θ^(1−β) μ^β (per token), judged by the base, policy
    gradient."""
    S = len(k)
    beta = [0.0] * S + [cfg.mix_beta] * S
    r = sample(model, task, cfg, k, "policy", rng(2, cfg.max_new_tokens), beta)
    y, y2 = halves(r)
    pref, st = task.judge(model, y, y2, None, cfg.judge_both_orders)
    lp_ref = score(model, task, y, None)
    lp = score(model, task, y, "policy", grad=True)
    loss, s = nano_nash.pg_loss(lp, pref, lp_ref, tau=cfg.tau)
    return loss, {**st, **s, "win": pref.mean(), "ntok": r.resp.sum()}


def step_lana(model, task, cfg, k, rng, printed_sign=False):
    """LANA, Algorithm 1 (§6): each player samples y, y' ~ π_i; the OTHER player judges; the loss
    couples the opponent's log π_{−i}(y_w) with the player's own log π_i(y_l). Both players run in
    one batch (per-row adapters): rows [y of player 1; y of player 2; y' of player 1; y' of
    player 2]."""
    S = len(k)
    me = ["player1"] * S + ["player2"] * S
    opp = me[S:] + me[:S]                                       # the judge of each pair: the other
    r = sample(model, task, cfg, k, me + me, rng(2, 2, cfg.max_new_tokens).flatten(1, 2))   # 4/slot
    pref, st = task.judge(model, *halves(r), opp, cfg.judge_both_orders)
    w, l = duel(pref, rng(2).T.flatten())
    lp_w = score(model, task, r.take(w), opp)                   # each winner under the opponent
    lp_l = score(model, task, r.take(l), me, grad=True)         # each loser under its own player
    loss, s = nano_nash.lana_loss(lp_l, lp_w, printed_sign=printed_sign)
    return loss, {**st, **s, "win": pref.mean(), "ntok": r.resp.sum()}


def step_maio_pg(model, task, cfg, k, rng, judge=None):
    """MAIO-PG (this repo, §5.1): y ~ π_θ against ỹ, the winner of a duel between two more samples
    a, b of π_θ, with the payoff advantage P(y ≻ ỹ) − 1/2 (pg_loss, τ = 0): mirror ascent against
    LANA's improved opponent, with a payoff instead of LANA's log-ratio. No reference log-probs; the
    judge is the frozen base (judge="policy": the policy judges itself, which selfjudge.py
    measures). The duel is not decided by a coin: its winner is a with probability P(a ≻ b), so
    P(y ≻ ỹ) is replaced by its mean P(a ≻ b) P(y ≻ a) + P(b ≻ a) P(y ≻ b) (the same expected
    gradient, less noise)."""
    S = len(k)
    r = sample(model, task, cfg, k, "policy", rng(3, cfg.max_new_tokens))    # rows [y; a; b] ~ π_θ
    y, a, b = torch.arange(3 * S, device=k.device).split(S)
    first, second = r.take(torch.cat([a, y, y])), r.take(torch.cat([b, a, b]))
    pref, st = task.judge(model, first, second, judge, cfg.judge_both_orders)   # ab, ya, yb
    p_ab, p_ya, p_yb = pref.split(S)
    pref_y = p_ab * p_ya + (1 - p_ab) * p_yb                    # E[P(y ≻ ỹ)] over the duel's winner
    lp = score(model, task, r.take(y), "policy", grad=True)
    loss, s = nano_nash.pg_loss(lp, pref_y)
    return loss, {**st, **s, "win": pref_y.mean(), "ntok": r.resp.sum()}


SPPO_K = 4   # SPPO: the samples of π_t each y is judged against


def step_sppo(model, task, cfg, k, rng):
    """SPPO (Wu et al. 2024): y ~ π_t (the frozen adapter "prev"; a new π_t every iter_steps, as
    INPO's) and K = SPPO_K more samples y_1..y_K ~ π_t; P̂(y ≻ π_t) = mean_j P(y ≻ y_j), judged by
    the base in one call; the square loss regresses log π_θ(y)/π_t(y) on η (P̂ − 1/2), toward MWU's
    step π_t e^{η P(y ≻ π_t)} / Z. Its gradient is linear in P̂: K sets the noise, not the mean."""
    S, K = len(k), SPPO_K
    r = sample(model, task, cfg, k, "prev", rng(1 + K, cfg.max_new_tokens))   # rows [y; y_1; ...]
    y, others = r.take(slice(0, S)), r.take(slice(S, None))
    ys = y.take(torch.arange(K * S) % S)                        # y, once per opponent
    pref, st = task.judge(model, ys, others, None, cfg.judge_both_orders)
    win = pref.view(K, S).mean(0)                               # P̂(y ≻ π_t)
    lp_prev = score(model, task, y, "prev")
    lp = score(model, task, y, "policy", grad=True)
    loss, s = nano_nash.sppo_loss(lp, lp_prev, win, eta=cfg.eta)
    return loss, {**st, **s, "win": win.mean(), "ntok": r.resp.sum()}


class Algo(NamedTuple):
    label: str            # its name in tables and figures
    step: Callable        # (model, task, cfg, k, rng) -> (loss, stats)
    adapters: tuple       # the adapters it keeps on the base (adapters off: the base, μ)
    gap: str              # its yardstick: "gap" = DualGap_τ (targets π*_τ), "gap0" = DualGap_0
    rows: tuple           # per slot: rows sampled, scored with a graph, scored without (memory.py)
    tiny: dict = {}       # its defaults on the toy game (over TrainConfig's)
    real: dict = {}       # its defaults on real prompts (over MODELS[model])
    words: dict = {}      # its defaults on the words game (over MODELS[model], TASKS["words"])
    judges: dict = {"policy": None}   # the trained adapters, each with the adapter judging it
                                      # (None: the frozen base)
    iterates: bool = False    # a new iteration every iter_steps: π_t ("prev") <- π_θ ("policy")
    in_all: bool = True       # one of --algo all, the toy comparison
    variant: bool = False     # another entry's step with a switch (the same cost: benches skip it)


# The registry: an algorithm is a step function and an entry here. tiny: tuned so that `python
# train_lm.py` converges in minutes on 2 CPU cores (SPPO: INPO's optimizer, η and iter_steps).
# real: INPO's paper for its τ and η (App. B: η_I = 0.005, so η = 200; τ = η_I/3, so ητ = 1/3);
# NLHF's τ for Nash-MD-PG; SPPO's paper (β = 0.001, so η = 1000).
# words: the policy gradients at lr 5e-5 (3e-4 sent them to a corner); Nash-MD-PG at 1e-4
# with 32 answers a game, which halves its gradient's variance (README).
ALGOS = {
    "inpo": Algo(
        label="INPO",
        step=step_inpo,
        adapters=("policy", "prev"),
        gap="gap",
        rows=(2, 2, 4),
        iterates=True,
        tiny=dict(lr=1e-3, adam_beta1=0.9),
        real=dict(tau=0.005 / 3, eta=200.0),
        words=dict(eta=2.0, max_steps=60),
    ),
    "nash_md_pg": Algo(
        label="Nash-MD-PG",
        step=step_nash_md_pg,
        adapters=("policy",),
        gap="gap",
        rows=(3, 1, 1),
        tiny=dict(lr=2e-4),
        real=dict(tau=0.008),
        words=dict(lr=1e-4, samples=32),
    ),
    "lana": Algo(
        label="LANA",
        step=step_lana,
        adapters=("player1", "player2"),
        gap="gap0",
        rows=(4, 2, 2),
        judges={"player1": "player2", "player2": "player1"},
        tiny=dict(samples=8),
        words=dict(lr=5e-5),
    ),
    "maio_pg": Algo(
        label="MAIO-PG",
        step=step_maio_pg,
        adapters=("policy",),
        gap="gap0",
        rows=(3, 1, 0),
        tiny=dict(max_steps=400, samples=128, lr=1.5e-4),
        words=dict(lr=5e-5),
    ),
    "sppo": Algo(
        label="SPPO",
        step=step_sppo,
        adapters=("policy", "prev"),
        gap="gap0",
        rows=(1 + SPPO_K, 1, 1),
        iterates=True,
        tiny=dict(lr=1e-3, adam_beta1=0.9),
        real=dict(eta=1000.0),
        words=dict(eta=2.0),
    ),
}
ALGOS["lana_printed"] = ALGOS["lana"]._replace(
    label="LANA (printed sign)",
    step=partial(step_lana, printed_sign=True),
    variant=True,
)
ALGOS["maio_pg_self"] = ALGOS["maio_pg"]._replace(  # selfjudge.py's: the policy judges its duels
    label="MAIO-PG (self-judge)",
    step=partial(step_maio_pg, judge="policy"),
    judges={"policy": "policy"},
    in_all=False,
    variant=True,
)


# --------------------------------------------------------------------------------------------------
# training

def diverged(run, step, what):
    return UserError(f"{what} at step {step}: the run diverged; the last checkpoint "
                     f"({run.latest() or 'none yet'}) is intact. Try a lower --lr")


def train(cfg, path, shard=Shard(), built=None):
    """Train one algorithm in the run folder `path` (runs.py); returns its log records. built: a
    (model, task, base name) to use instead of setup(cfg)'s (selfjudge.py brings a taught judge).
    A record holds the exact gaps (toy) of the policy before the step's update and of the average
    iterate (whose running sums avg travel in the checkpoint), and the step's statistics."""
    algo = ALGOS[cfg.algo]
    with Run(path, asdict(cfg), MATH, resume=cfg.resume, overwrite=cfg.overwrite,
             replaceable=cfg.model == "tiny", writer=shard.rank == 0) as run:   # refuse, then load
        model, task, base = built or setup(cfg)
        if cfg.task == "chat" and shard.rank == 0:    # the model judges itself: can it?
            import evaluate                             # (it reads this file's registry)
            evaluate.judge_check(model, task, cfg)
        device = model.lm_head.weight.device
        import identity                               # what the run trains on: its base
        sha = hashlib.sha256(json.dumps(task.prompts).encode()).hexdigest()   # ids, not text
        run.config.update(base=base, prompts_sha=sha, **identity.of(model, task.tok))
        state = run.load(model, algo.adapters) if cfg.resume else {}
        torch.manual_seed(cfg.seed)                   # the adapters' init: the same in every run
        for name in () if state else algo.adapters:   # all on ONE base; adapters off = μ
            model.add_adapter(name, cfg.lora_rank, 2 * cfg.lora_rank)
        model.checkpointing = cfg.grad_checkpoint
        params = [p for a in algo.judges for p in model.lora_parameters(a)]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, 0.999), weight_decay=0.0)
        gen = torch.Generator(device).manual_seed(cfg.seed)   # every random number of training
        sampler = torch.Generator().manual_seed(cfg.seed)     # the yardstick's own (words.py)
        if state:
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["rng"])
            sampler.set_state(state["measure_rng"])
        start, avg = state.get("step", 0), state.get("avg", {})
        slots = cfg.batch_size * cfg.samples              # the global batch: prompt x sample slots
        mine = torch.arange(slots, device=device)[shard.mine(slots)]     # this process's slots
        n = len(task.prompts)
        print(f"{path.name}: {cfg.algo} on {cfg.model} ({device}), "
              f"{sum(p.numel() for p in params):,} trainable parameters in "
              f"{', '.join(algo.judges)}, {n} prompts, steps {start}..{cfg.max_steps}"
              + f", {shard.world} processes" * (shard.world > 1))
        with Interrupts() as stop:
            for step in range(start, cfg.max_steps + 1):
                rec = {"step": step}
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    rec.update(task.measure(model, algo.judges, avg, sampler))
                if step == cfg.max_steps:
                    break
                t0 = time.time()

                # the batch: batch_size prompts (fresh permutations), each in `samples` slots
                perms = [torch.randperm(n, generator=gen, device=device)
                         for _ in range(-(-cfg.batch_size // n))]
                k = torch.cat(perms)[:cfg.batch_size].repeat_interleave(cfg.samples)
                if algo.iterates and step % cfg.iter_steps == 0:
                    model.copy_adapter("policy", "prev")      # π_t <- π_θ: a new iteration

                # the step and its backward in micro-batches, each loss weighted by its share of the
                # slots: their gradients add up to the batch's. Every chunk draws the step's numbers
                # again (the same generator state) and keeps its own slots: the same samples.
                opt.zero_grad(set_to_none=True)
                at, stats = gen.get_state(), {}
                for rows in mine.tensor_split(cfg.micro_batches):
                    gen.set_state(at)
                    rng = partial(uniforms, gen, slots, rows)
                    try:
                        loss, st = algo.step(model, task, cfg, k[rows], rng)
                    except FloatingPointError:
                        raise diverged(run, step, "the model's logits are not finite") from None
                    share = len(rows) / len(mine)
                    (loss * share).backward()
                    for key, v in {"loss": loss.detach(), **st}.items():   # means; ntok a sum
                        stats[key] = stats.get(key, 0.0) + (v if key == "ntok" else v * share)

                # the means over processes, and the checks
                vals = all_reduce(params, list(stats.values()), shard)
                gnorm = torch.nn.utils.clip_grad_norm_(params, math.inf)
                if not (torch.isfinite(vals[0]) and torch.isfinite(gnorm)):
                    raise diverged(run, step, "the loss or its gradient is not finite")

                # AdamW, the learning rate decayed to 0 on a cosine: a function of the step
                decay = 0.5 + 0.5 * math.cos(math.pi * step / cfg.max_steps) if cfg.cosine else 1
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * decay
                opt.step()

                # log
                if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                    dt = time.time() - t0
                    rec.update(zip(stats, vals.tolist()))
                    ntok = rec.pop("ntok") * shard.world
                    rec.update(tok_s=ntok / dt, s_step=dt)
                    run.log(rec)
                    shown = " | ".join(f"{key} {v:.4g}" for key, v in rec.items()
                                       if isinstance(v, float))         # (not words' counts)
                    print(f"{path.name} step {step:4d} | {shown}", flush=True)

                # save (a finite model only); after a signal, save and stop
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop.signal:
                    x = torch.tensor([task.prompts[0]], device=device)
                    with torch.no_grad():
                        finite = all(torch.isfinite(model(x, a)).all() for a in algo.adapters)
                    if not finite:
                        raise diverged(run, step + 1, "the adapters give non-finite logits")
                    state = {"optimizer": opt.state_dict(), "rng": gen.get_state(), "avg": avg,
                             "measure_rng": sampler.get_state()}
                    run.save(step + 1, model, algo.adapters, state, base)
                if stop.signal:
                    raise UserError(f"stopped by {stop.signal} after step {step + 1}, saved in "
                                    f"{run.latest()}; continue with the same command and --resume")
        run.log(rec)
        run.finish()
        if run.writer:
            draw({cfg.algo: (algo.gap, run.records())}, path / "plot.png", cfg.task)
        return run.records()


def draw(runs, path, task, closed=None):
    """The task's figure (the words game: words.figure, else plots.lm_convergence); a failed
    write is one line."""
    try:
        if task == "words":
            words.figure({name: recs for name, (_, recs) in runs.items()}, path, next(iter(runs)))
        else:
            plots.lm_convergence(runs, path, closed)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free space or fix permissions "
                        "(the run itself is saved)") from None


# --------------------------------------------------------------------------------------------------
# main

def main(given, shard=Shard()):
    """What the flags `given` ({name: value}) ask for: the runs of plan.configs (one algorithm, or
    each of the toy comparison), trained, evaluated (--eval) or budgeted (--dry_run); or the
    judge's check (--judge_check)."""
    import evaluate, memory, plan    # they read this file's registry: imported here, not above
    cfgs = plan.configs(given, shard.world)
    cfg = next(iter(cfgs.values()))
    if cfg.dry_run:
        return {name: memory.dry_run(c) for name, c in cfgs.items()}
    if cfg.judge_check:
        model, task, _ = setup(cfg)
        return evaluate.judge_check(model, task, cfg)
    if cfg.eval:
        return {name: evaluate.evaluate(c, Path(c.out_dir) / name) for name, c in cfgs.items()}
    logs = {name: train(c, Path(c.out_dir) / name, shard) for name, c in cfgs.items()}
    if shard.rank == 0:
        plan.report(cfgs, logs)
    return logs


if __name__ == "__main__":
    import plan
    plan.command_line(main, flags(TrainConfig, __doc__))    # errors as one line, or --debug
