"""
selfjudge.py: LANA's players judge each other. Does self-evaluation help or hurt? Measured
exactly, on the toy games of train_lm.py, against the TRUE preferences.

    python selfjudge.py         # about 4 minutes on 2 CPU cores: a table and figures/self_judge.png

1. Teach the tiny model to judge. On the prompt TOY_JUDGE(x, y, y') (tasks.py) its probability of
   answering "1" rather than "2" is fitted to P(y ≻ y'), for every prompt and ordered pair (so both
   presentation orders), by cross-entropy on the soft label, training the base weights. A second
   judge learns from a finite sample of noisy labels (m Bernoulli(P) draws per pair): its error is
   an estimate's, not a symmetric flip, which would only rescale the step.
2. From the taught base, train with train_lm.train (the loop and steps of the default run). RUNS
   names each run's algorithm and judge:
     oracle   the game's P, as in `python train_lm.py` (lana_oracle)
     self     the taught model with a player's adapter on: LANA's Algorithm 1 (each player judged
              with the OTHER player's adapter, so the judge drifts as the players train: "adaptive
              feedback"), or MAIO-PG's policy judging its own duels (train_lm.ALGOS["maio_pg_self"])
     noisy    the same as self, from the judge taught with noisy labels (lana_noisy)
     base     the taught model with adapters off: a frozen judge (maio_pg, inpo, nash_md_pg)
   Every logged step: each player's exact gap to the true NE (last and average iterate) and the mean
   error |P̂ − P| over all pairs of the judge that player is trained against.
"""
import cli

if __name__ == "__main__":
    cli.catch_signals()         # first: Ctrl-C during the imports below is one line too
import copy
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import plan
import plots
import train_lm
from tasks import ToyTask, setup


@dataclass
class StudyConfig:
    steps: int = 200               # SGD steps of every run
    labels: int = 8                # noisy labels per pair for the noisy judge
    seed: int = 1337
    out: str = "out/self_judge"    # run folders: out/<run name>/
    figure: str = "figures/self_judge.png"


CHECKS = [  # (flags, what must hold, what it must be): checked before any work (cli.check)
    ("steps labels", lambda v: 1 <= v < math.inf, "a positive integer"),
    ("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
]


RUNS = [  # the study: (run name, algorithm (train_lm.ALGOS), its judge)
    ("lana_oracle", "lana", "oracle"),        # the game's P
    ("lana_self", "lana", "self"),            # the taught model with the other player's adapter
    ("lana_noisy", "lana", "noisy"),          # the same, taught from noisy labels
    ("maio_pg_self", "maio_pg_self", "self"),  # the taught model with the policy's own adapter
    ("maio_pg", "maio_pg", "base"),           # the taught model, frozen (adapters off)
    ("inpo", "inpo", "base"),
    ("nash_md_pg", "nash_md_pg", "base"),
]


def teach_judge(model, task, labels, steps=800, lr=3e-4):
    """Fit the base's P̂(y ≻ y') (TOY_JUDGE, answer "1" vs "2") to labels (K, n, n) by full-batch
    Adam on the soft cross-entropy −[p log P̂ + (1 − p) log(1 − P̂)] over every prompt and ordered
    pair."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        margins = task.judge.margins(model, None, task)
        loss = F.binary_cross_entropy_with_logits(margins, labels.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    return task.judge.error(model, None, task)


def noisy_labels(P, m, gen):
    """An estimate of P from m judged duels per pair: y ≻ y' counted over m Bernoulli(P(y ≻ y'))
    draws, P̂(y' ≻ y) = 1 − P̂(y ≻ y'), P̂(y ≻ y) = 1/2."""
    est = torch.binomial(torch.full_like(P, float(m)), P, generator=gen) / m
    up = torch.ones_like(P[0], dtype=torch.bool).triu(1)         # each unordered pair drawn once
    return torch.where(up, est, torch.where(up.T, 1 - est.transpose(1, 2), 0.5))


def main(cfg=StudyConfig()):
    t0 = time.time()
    cli.check(cfg, CHECKS)
    for folder in (Path(cfg.out), Path(cfg.figure).parent):   # writable? now, not after minutes
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    lana = plan.config("lana", seed=cfg.seed, out_dir=cfg.out)
    model, _, _ = setup(lana)
    teacher = ToyTask(lana, self_judge=True)
    noisy = noisy_labels(teacher.P, cfg.labels, torch.Generator().manual_seed(cfg.seed))
    taught = {}                         # the judge taught from exact P, and from noisy labels
    for kind, labels in (("exact", teacher.P), ("noisy", noisy)):
        taught[kind] = copy.deepcopy(model).requires_grad_(True)
        err = teach_judge(taught[kind], teacher, labels)
        source = "exact P" if kind == "exact" else f"{cfg.labels} noisy labels per pair"
        print(f"judge taught from {source}: mean |P̂ − P| = {err:.4f} over "
              f"{teacher.P.numel()} prompt-pairs")
    logs = {}
    for name, algo, judge in RUNS:
        run = plan.config(algo, seed=cfg.seed, out_dir=cfg.out, max_steps=cfg.steps, log_every=10,
                          overwrite=True)
        run = replace(run, samples=min(run.samples, 32))          # MAIO-PG: 3 judge calls a slot
        task = ToyTask(run, self_judge=judge != "oracle")
        kind = "noisy" if judge == "noisy" else "exact"
        built = (copy.deepcopy(taught[kind]), task, f"tiny-judge-{kind}")
        logs[name] = train_lm.train(run, Path(cfg.out) / name, built=built)
    print(f"\nexact gaps against the true P after {cfg.steps} steps (last | average iterate) and "
          "the judge's mean error |P̂ − P| (start -> end):")
    for name, algo, _ in RUNS:
        recs = logs[name]
        key, end = train_lm.ALGOS[algo].gap, recs[-1]
        err = [r["judge_err"] for r in recs if "judge_err" in r]
        kind = "DualGap_τ" if key == "gap" else "DualGap_0"
        judged = " | judge: the game's P"
        if err:
            judged = f" | judge error {err[0]:.3f} -> {err[-1]:.3f}"
        print(f"  {name:13s} {kind} {recs[0][key]:.3e} -> {end[key]:.3e}"
              f" | average {end['avg_' + key]:.3e}{judged}")
        if "gap0_player2" in end:
            second = end.get("judge_err_player2")
            print(f"  {'':13s} player 2: {end['gap0_player2']:.3e} | average "
                  f"{end['avg_gap0_player2']:.3e}"
                  + (f" | judge error {second:.3f}" if second is not None else ""))
    runs = {name: (algo, judge, train_lm.ALGOS[algo].gap, logs[name]) for name, algo, judge in RUNS}
    plots.self_judge(runs, Path(cfg.figure))
    print(f"wrote {cfg.figure} in {time.time() - t0:.0f} s")
    return logs


if __name__ == "__main__":
    cli.run(lambda given: main(StudyConfig(**given)), cli.flags(StudyConfig, __doc__))
