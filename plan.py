"""
plan.py: what a train_lm.py command line runs: the config of each run (the presets, then the flags),
checked before anything is loaded; how its errors end (one line); the report of the toy comparison.

    python train_lm.py                  # --algo all: each algorithm of the toy comparison
    python train_lm.py --algo sppo      # one of them

--algo all runs the entries of train_lm.ALGOS marked in_all, one after the other, each with its own
defaults (config); then a table of their exact gaps (each by its yardstick) and
figures/lm_convergence.png: their curves beside games.py's closed forms on the same games.

    python plan.py out/words1337 out/words_s1 out/words_s2     # README's words table over seeds

prints, for the words-game runs in these --out_dir folders (a seed each), the median and range of
each algorithm's numbers (seeds_table).
"""
import json
import math
import statistics
import sys
from pathlib import Path

import cli
import games
import train_lm
from cli import UserError
from parallel import distributed
from tasks import setup

CHECKS = [  # (flags, what must hold, what it must be): every number, before anything is loaded
    ("batch_size samples max_new_tokens lora_rank save_every log_every max_prompt_tokens "
     "iter_steps micro_batches", lambda v: v >= 1, "a positive integer"),
    ("max_steps", lambda v: 0 <= v < 10**9, "an integer >= 0"),
    ("lr tau eta", lambda v: 0 < v < math.inf, "a finite number > 0"),
    ("temperature", lambda v: 1e-3 <= v < math.inf,     # below, logits / T overflow to inf
     "a finite number >= 0.001 (smaller ones overflow the logits)"),
    ("adam_beta1 mix_beta", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("label_noise", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    ("dtype", lambda v: v in ("auto", "bfloat16", "float32"), "auto, bfloat16 or float32"),
]


def task_of(model, given):
    """The task a run's flags ask for: --task, else the model's (a real model's: chat with
    --prompts or --judge_check)."""
    default = train_lm.MODELS[model]["task"]
    if (given.get("prompts") or given.get("judge_check")) and default != "toy":
        default = "chat"
    return given.get("task") or default


def config(algo, model="tiny", **given):
    """One run's config: TrainConfig's defaults, the model's preset (train_lm.MODELS), its task's
    (train_lm.TASKS), the algorithm's for that task (train_lm.ALGOS[algo].tiny on the toy game,
    .real on real prompts, .words on the words game), then the flags given."""
    entry = train_lm.ALGOS[algo]
    task = task_of(model, given)
    mine = {"toy": entry.tiny, "chat": entry.real, "words": entry.words}[task]
    preset = {**train_lm.MODELS[model], **train_lm.TASKS[task], **mine}
    return train_lm.TrainConfig(**{**preset, **given, "algo": algo, "model": model, "task": task})


def check(cfg, world=1):
    """cfg, or the one-line error of the first thing wrong with it (world: processes)."""
    for names, ok, what in CHECKS:
        for name in names.split():
            v = getattr(cfg, name)
            if not ok(v):                             # nan fails every comparison: it lands here
                raise UserError(f"--{name} must be {what}, got {v}")
    toy = cfg.model == "tiny"
    if (cfg.task == "toy") != toy:
        raise UserError(f"--task {cfg.task} is not one for --model {cfg.model}; the toy game is "
                        "--model tiny's, words and chat a real model's")
    if cfg.task == "words" and cfg.judge_check:
        raise UserError("the words game's judge is its rule (an oracle): --judge_check is for "
                        "real prompts (--prompts FILE)")
    if cfg.algo == "inpo" and cfg.eta * cfg.tau > 1:
        raise UserError(f"INPO needs --eta x --tau <= 1 (got {cfg.eta * cfg.tau:g}); "
                        "the paper uses 1/3")
    if toy and (cfg.temperature != 1 or cfg.max_new_tokens > 4):
        raise UserError("the toy game needs --temperature 1 (its exact gap assumes y ~ π) and "
                        "--max_new_tokens <= 4 (3^L responses are enumerated)")
    real = " or ".join(m for m in train_lm.MODELS if m != "tiny")
    if toy and (cfg.prompts or cfg.weights):
        raise UserError(f"--prompts and --weights apply to --model {real}; the toy game has its "
                        "own")
    if toy and (cfg.judge_check or cfg.judge_pairs):
        raise UserError(f"--judge_check measures a model judging itself (--model {real}); the toy "
                        "game's judge is its P, an oracle (selfjudge.py measures a taught one)")
    if not toy and cfg.label_noise:
        raise UserError("--label_noise is for the toy game (--model tiny), whose judge is an "
                        "oracle")
    slots = cfg.batch_size * cfg.samples // world
    if cfg.micro_batches > slots:
        raise UserError(f"--micro_batches {cfg.micro_batches} is more than this process's "
                        f"{slots} slots (--batch_size x --samples); use at most {slots}")
    if cfg.batch_size % world:
        raise UserError(f"--batch_size {cfg.batch_size} is the global batch and must be divisible "
                        f"by the number of processes ({world}), e.g. {world * cfg.batch_size}")
    if (cfg.dry_run or cfg.eval or cfg.judge_check) and world > 1:
        raise UserError("--eval, --dry_run and --judge_check run in one process: start them with "
                        "python, not torchrun")
    return cfg


def configs(given, world=1):
    """{run name: its config, checked} for the flags `given` ({name: value}): one algorithm, or
    (--algo all; the toy game's default) every algorithm of the toy or the words game."""
    models, algos = train_lm.MODELS, train_lm.ALGOS
    model = given.get("model", "tiny")
    if model not in models:
        raise UserError(f"unknown --model {model!r}; choose {' or '.join(models)}")
    task = task_of(model, given)
    if task not in train_lm.TASKS:
        raise UserError(f"unknown --task {task!r}; choose {' or '.join(train_lm.TASKS)}")
    algo = given.get("algo") or train_lm.TASKS[task]["algo"]
    comparison = task != "chat"         # --algo all: the toy game's or the words game's
    if algo not in algos and not (algo == "all" and comparison):
        also = " or all" if comparison else " (all is for the toy and the words games)"
        raise UserError(f"unknown --algo {algo!r}; choose one of {', '.join(algos)}{also}")
    names = [a for a in algos if algos[a].in_all] if algo == "all" else [algo]
    return {a: check(config(**{**given, "algo": a}), world) for a in names}


def report(cfgs, logs):
    """The toy runs' exact gaps (start, final, average iterate); with --algo all, the figure."""
    cfg = next(iter(cfgs.values()))
    if cfg.task == "words":
        return words_report(cfgs, logs)
    if cfg.model != "tiny":
        return
    print("\nexact gap of the LM policy, mean over prompts (DualGap_τ with τ = 0.1, or DualGap_0):")
    for name, recs in logs.items():
        key = train_lm.ALGOS[name].gap
        g = [r[key] for r in recs if key in r]
        kind = "DualGap_0" if key == "gap0" else "DualGap_τ"
        print(f"  {name:13s} {kind}  start {g[0]:.3e}  final {g[-1]:.3e} "
              f"({g[0] / g[-1]:5.1f}x lower)  average iterate {recs[-1]['avg_' + key]:.3e}")
    if len(cfgs) == 1 or not cfg.figure:
        return
    cfg = cfgs["inpo"]                  # its τ, η and iter_steps: SPPO's too (toy presets)
    model, task, _ = setup(cfg)
    every = {}                          # SGD steps per closed-form step
    for name in logs:
        iterates = train_lm.ALGOS[name].iterates
        every[name] = cfg.iter_steps if iterates else 1
    closed = games.reference_curves(
        task.P,
        task.policy(model, None),
        every,
        tau=cfg.tau,
        eta=cfg.eta,
        beta=cfg.mix_beta,
        lr=3.0,
        steps=cfg.max_steps,
    )
    runs = {name: (train_lm.ALGOS[name].gap, recs) for name, recs in logs.items()}
    train_lm.draw(runs, Path(cfg.figure), cfg.task, closed)
    print(f"wrote {cfg.figure}")


def command_line(main, given):
    """main(given, shard) under torchrun or not, inside the error boundary (cli.run): an error the
    user can fix ends the process with one line "error: ..." and exit code 1 (with --debug: the
    traceback)."""
    def under_torchrun(given):
        with distributed() as shard:
            return main(given, shard)
    cli.run(under_torchrun, given, "--resume goes on from the last checkpoint")


def words_report(cfgs, logs):
    """The words game's runs: each one's sampled gap by its yardstick (start, final with its 95%
    interval, the floor), its DualGap_0, no move and KL; with --algo all, the figure."""
    print("\nsampled gap of the policy, mean over the 3 games (N answers per game, T = 1):")
    for name, recs in logs.items():
        key = train_lm.ALGOS[name].gap
        kind = "DualGap_0" if key == "gap0" else "DualGap_τ"
        first, last = recs[0], recs[-1]
        interval = f"[{last[key + '_lo']:.3f}, {last[key + '_hi']:.3f}]"
        floor = last[key.replace("gap", "floor")]
        print(f"  {name:13s} {kind} {first[key]:.3f} -> {last[key]:.3f} {interval} "
              f"({first[key] / last[key]:.1f}x lower; floor {floor:.3f}) | DualGap_0 "
              f"{first['gap0']:.3f} -> {last['gap0']:.3f} | no move {first['no_move']:.3f} -> "
              f"{last['no_move']:.3f} | KL per token {last['kl_token']:.3f}")
    cfg = next(iter(cfgs.values()))
    if len(cfgs) > 1 and cfg.figure:
        runs = {name: (train_lm.ALGOS[name].gap, recs) for name, recs in logs.items()}
        train_lm.draw(runs, Path(cfg.figure), cfg.task)
        print(f"wrote {cfg.figure}")


def seeds_table(folders):
    """Markdown: each algorithm's words-game runs in these out_dirs, its first and last measured
    gap by its yardstick, how many times lower, its last DualGap_0, no move and KL per token: the
    median over the runs (the range in brackets)."""
    runs = {}
    for folder in folders:
        for log in sorted(Path(folder).glob("*/log.jsonl")):
            key = train_lm.ALGOS[log.parent.name].gap
            recs = [json.loads(line) for line in log.read_text().splitlines()]
            first, last = recs[0], [r for r in recs if key in r][-1]
            numbers = (first[key], last[key], first[key] / last[key], last["gap0"],
                       last["no_move"], last["kl_token"])
            runs.setdefault(log.parent.name, []).append(numbers)
    print("| algorithm (runs) | yardstick | start gap | final gap | lower by | final DualGap_0 | "
          "no move | KL per token |")
    print("|---" * 8 + "|")
    for name, numbers in runs.items():
        cells = []
        for column in zip(*numbers):
            cell = f"{statistics.median(column):.3f}"
            if len(column) > 1:
                cell += f" ({min(column):.3f}-{max(column):.3f})"
            cells.append(cell)
        kind = "DualGap_0" if train_lm.ALGOS[name].gap == "gap0" else "DualGap_τ"
        print(f"| {name} ({len(numbers)}) | {kind} | {' | '.join(cells)} |")


if __name__ == "__main__":
    seeds_table(sys.argv[1:])
