"""
selfjudge.py: LANA's players judge each other. Does self-evaluation help or hurt? Measured exactly, on the toy
games of train_lm.py, against the TRUE preferences.

    python selfjudge.py             # about 4 minutes on 2 CPU cores: a table and figures/self_judge.png

1. Teach the tiny model to judge. On the prompt TOY_JUDGE(x, y, y') (tasks.py) its probability of answering
   "1" rather than "2" is fitted to P(y ≻ y'), for every prompt and ordered pair (so both presentation
   orders), by cross-entropy on the soft label, training the base weights. A second judge learns from a finite
   sample of noisy labels (m Bernoulli(P) draws per pair): its error is an estimate's, not a symmetric flip,
   which would only rescale the step.
2. From the taught base, train with train_lm.train (the loop and steps of the default run):
     lana, oracle judge          as in `python train_lm.py`: the game's P judges
     lana, self-judge            Algorithm 1: each player is judged by the model with the OTHER player's
                                 adapter, so the judge drifts as the players train ("adaptive feedback")
     lana, noisy self-judge      the same, from the judge taught with noisy labels
     maio_pg, self-judge         the policy judges its own duels (train_lm.ALGOS["maio_pg_self"])
     maio_pg, inpo, nash_md_pg   judged by the frozen base: the taught judge, which does not drift
   Every logged step: each player's exact gap to the true NE (last and average iterate) and the mean error
   |P̂ − P| over all pairs of the judge that player is trained against.
"""
import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import plots
import train_lm
from tasks import ToyTask

RUNS = [  # (run name, algorithm, the judge: "oracle", "self" or "noisy")
    ("lana_oracle", "lana", "oracle"), ("lana_self", "lana", "self"), ("lana_noisy", "lana", "noisy"),
    ("maio_pg_self", "maio_pg_self", "self"), ("maio_pg", "maio_pg", "self"), ("inpo", "inpo", "self"),
    ("nash_md_pg", "nash_md_pg", "self")]


def teach_judge(model, task, labels, steps=800, lr=3e-4):
    """Fit the base's P̂(y ≻ y') (TOY_JUDGE, answer "1" vs "2") to labels (K, n, n) by full-batch Adam on the
    soft cross-entropy −[p log P̂ + (1 − p) log(1 − P̂)] over every prompt and ordered pair."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(task.judge.margins(model, None, task), labels.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    return task.judge.error(model, None, task)


def noisy_labels(P, m, gen):
    """An estimate of P from m judged duels per pair: y ≻ y' counted over m Bernoulli(P(y ≻ y')) draws,
    P̂(y' ≻ y) = 1 − P̂(y ≻ y'), P̂(y ≻ y) = 1/2."""
    est = torch.binomial(torch.full_like(P, float(m)), P, generator=gen) / m
    up = torch.ones_like(P[0], dtype=torch.bool).triu(1)             # each unordered pair drawn once
    return torch.where(up, est, torch.where(up.T, 1 - est.transpose(1, 2), 0.5))


def main(out="out/self_judge", figure="figures/self_judge.png", steps=200, m=8, seed=1337):
    t0 = time.time()
    base_cfg = replace(train_lm.TrainConfig(seed=seed, out_dir=out), algo="lana")
    model, _, _ = train_lm.setup(train_lm.resolve(base_cfg, "lana"))
    teacher = ToyTask(train_lm.resolve(base_cfg, "lana"), self_judge=True)
    judges = {}
    noisy = noisy_labels(teacher.P, m, torch.Generator().manual_seed(seed))
    for kind, labels in (("self", teacher.P), ("noisy", noisy)):
        judges[kind] = copy.deepcopy(model).requires_grad_(True)
        err = teach_judge(judges[kind], teacher, labels)
        print(f"judge taught from {'exact P' if kind == 'self' else f'{m} noisy labels per pair'}: "
              f"mean |P̂ − P| = {err:.4f} over {teacher.P.numel()} prompt-pairs")
    logs = {}
    for name, algo, judge in RUNS:
        cfg = replace(train_lm.resolve(base_cfg, algo), max_steps=steps, log_every=10, overwrite=True)
        cfg = replace(cfg, samples=min(cfg.samples, 32))          # MAIO-PG: 3 judge calls a slot
        task = ToyTask(cfg, self_judge=judge != "oracle")
        built = (copy.deepcopy(judges["noisy" if judge == "noisy" else "self"]), task, f"tiny-judge-{judge}")
        logs[name] = train_lm.train(cfg, Path(out) / name, built=built)
    print(f"\nexact gaps against the true P after {steps} steps (last | average iterate) and the judge's "
          "mean error |P̂ − P| (start -> end):")
    for name, algo, _ in RUNS:
        recs = logs[name]
        key, end = train_lm.ALGOS[algo].gap, recs[-1]
        err = [r["judge_err"] for r in recs if "judge_err" in r]
        kind = "DualGap_τ" if key == "gap" else "DualGap_0"
        print(f"  {name:13s} {kind} {recs[0][key]:.3e} -> {end[key]:.3e}"
              f" | average {end['avg_' + key]:.3e}" + (f" | judge error {err[0]:.3f} -> {err[-1]:.3f}" if err
                                                       else " | judge: the game's P"))
        if "gap0_player2" in end:
            print(f"  {'':13s} player 2: {end['gap0_player2']:.3e} | average {end['avg_gap0_player2']:.3e}"
                  + (f" | judge error {end['judge_err_player2']:.3f}" if "judge_err_player2" in end else ""))
    styles = [{"oracle": ":", "noisy": "-."}.get(j, "-" if any(train_lm.ALGOS[a].judges) else "--")
              for _, a, j in RUNS]                                # -: a self-judge, --: the frozen base
    plots.self_judge({n: (a.removesuffix("_self"), s, train_lm.ALGOS[a].gap, logs[n])
                      for (n, a, _), s in zip(RUNS, styles)}, Path(figure))
    print(f"wrote {figure} in {time.time() - t0:.0f} s")
    return logs


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--steps", type=int, default=200, help="SGD steps of every run")
    p.add_argument("--labels", type=int, default=8, help="noisy labels per pair for the noisy judge")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="out/self_judge")
    p.add_argument("--figure", default="figures/self_judge.png")
    a = p.parse_args()
    main(a.out, a.figure, a.steps, a.labels, a.seed)
