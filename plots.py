"""
plots.py: every figure of the repo, from one style table. STYLE gives each algorithm one colour and
one dash, the same in every figure (games.py's gap curves and simplex paths, train_lm.py's LM
players, selfjudge.py's judges); hues and dashes differ within each family, so the figures also read
in black and white. The judge a run drew its verdicts from is a marker (MARKERS); games.py's sampled
runs are markers only. Nothing here computes a result: the scripts pass the points, the targets and
the labels, and this file draws them.
"""
import math
from typing import NamedTuple

import numpy as np

DENSE_DASHED = (0, (5, 1))
DENSE_DOTTED = (0, (1, 1))
DENSE_DASHDOT = (0, (3, 1, 1, 1))

STYLE = {   # name -> (colour, dash); every colour differs, hues and dashes differ in each family
    # regularised (games.py), aiming at π*_τ; train_lm.py runs inpo and nash_md_pg
    "nash_md": ("#e41a1c", "-"),                        # red
    "nash_md_const": ("#ff7f00", ":"),                  # orange
    "inpo": ("#377eb8", "--"),                          # blue
    "inpo_paper": ("#984ea3", DENSE_DASHED),            # purple
    "nash_md_pg": ("#f781bf", "-."),                    # pink
    "online_dpo": ("#999999", DENSE_DASHDOT),           # grey
    "rlhf_bt": ("#4daf4a", DENSE_DOTTED),               # green
    # unregularised (games.py), aiming at the NE; train_lm.py runs lana, lana_printed, maio_pg, sppo
    "mwu": ("#8c564b", ":"),                            # brown
    "sppo": ("#bcbd22", DENSE_DASHDOT),                 # olive
    "maio_greedy": ("#17becf", (0, (1, 3))),            # cyan, sparse dots
    "maio_soft": ("#e377c2", (0, (3, 1, 1, 1, 1, 1))),  # pink, dash-dot-dot
    "maio_extragrad": ("#7f7f7f", (0, (6, 2, 1, 2, 1, 2))),   # grey, sparse dash-dot-dot
    "maio_duel": ("#000000", (0, (8, 2))),              # black, long dashes
    "maio_pg": ("#2ca02c", "-"),                        # green
    "lana_geo": ("#ff7f0e", "--"),                      # orange
    "lana_geo_printed": ("#1f77b4", "-."),              # blue
    "lana": ("#9467bd", DENSE_DASHED),                  # purple
    "lana_printed": ("#d62728", DENSE_DOTTED),          # red
}
STYLE["maio_pg_self"] = STYLE["maio_pg"]   # selfjudge.py's MAIO-PG judged by the policy itself
MARKERS = {"oracle": "o", "noisy": "^", "self": "s", "base": "D"}   # the judge behind a run
CLIP = 1e-16   # gaps are clipped here on log axes (float64 round-off); each axis that clips says so
CORNERS = np.array([[0, 0], [1, 0], [0.5, 3 ** 0.5 / 2]])   # the 3-simplex drawn in the plane


def style(algo):
    """Line2D keywords: the algorithm's colour and dash, and gid = algo (a test reads it)."""
    colour, dash = STYLE[algo]
    return dict(color=colour, ls=dash, gid=algo)


class Series(NamedTuple):
    """One curve of a gap panel: legend label, the algorithm whose STYLE it takes, its points, and
    for a sampled run the kind of judge it drew verdicts from (hollow MARKERS[judge], no line)."""
    label: str
    algo: str
    x: object
    y: object
    judge: str = None


class Gaps(NamedTuple):
    """A panel of gap curves on log axes."""
    title: str
    ylabel: str
    series: list

    def draw(self, ax):
        for s in self.series:
            kw = style(s.algo)
            if s.judge:
                kw |= dict(ls="", marker=MARKERS[s.judge], mfc="none", ms=5)
            y = np.maximum(np.asarray(s.y), CLIP)
            ax.loglog(s.x, y, label=s.label, lw=1.5, **kw)
        ax.set(title=self.title, ylabel=f"{self.ylabel}\n(clipped at {CLIP:g})")
        ax.grid(alpha=0.3)


class Simplex(NamedTuple):
    """A panel of paths π_t on a 3-action game's triangle, toward the point they aim at."""
    title: str
    labels: tuple          # the actions, at the corners
    paths: dict            # algo -> π_t (m, 3)
    target: tuple          # (label, point): π*_τ or the NE
    mu: object             # π_0

    def draw(self, ax):
        ax.plot(*CORNERS[[0, 1, 2, 0]].T, color="k", lw=0.8)
        for (x, y), label in zip(CORNERS, self.labels):
            offset = (0, -14 if y == 0 else 4)
            ax.annotate(label, (x, y), xytext=offset, textcoords="offset points", ha="center")
        for algo, path in self.paths.items():
            xy = np.asarray(path) @ CORNERS
            ax.plot(*xy.T, lw=1.2, label=algo, **style(algo))
        label, point = self.target
        ax.plot(*(np.asarray(point) @ CORNERS), "k*", ms=14, label=label)
        ax.plot(*(np.asarray(self.mu) @ CORNERS), "ko", mfc="none", ms=8, label="μ = π_0")
        ax.set(title=self.title, aspect="equal")
        ax.axis("off")


def figure(path, panels, xlabel, cols=3):
    """Panels (Gaps, Simplex) on a grid of `cols` columns, legends outside the axes so they never
    cover a curve: on one row a legend under each panel, on a grid one legend right of it."""
    plt = pyplot()
    rows = math.ceil(len(panels) / cols)
    grid = rows > 1
    size = (4.8 * cols + 3.2 * grid, 4.2 * rows + (0.4 if grid else 2.0))
    with plt.rc_context({"font.size": 12, "legend.fontsize": 11}):
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
        for panel, ax in zip(panels, axes.flat):
            panel.draw(ax)
            if not grid:
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax in axes[:, 1:].flat:              # the first column's label names the rows
            ax.set_ylabel("")
        if grid:                                 # one entry per name, over all the panels
            handles = {label: handle for ax in axes.flat
                       for handle, label in zip(*ax.get_legend_handles_labels())}
            fig.legend(handles=list(handles.values()), loc="outside right upper")
        fig.supxlabel(xlabel)
        fig.savefig(path, dpi=100)
    plt.close(fig)


def curve(records, key):
    """(steps, values) of the log records that hold key."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [r[key] for r in kept]


def lm_convergence(runs, path, closed=None):
    """train_lm.py's figure. runs: name -> (yardstick key, log records), drawn as the exact gap on
    the toy games ("gap": DualGap_τ, "gap0": DualGap_0), else as the loss. closed: name -> (x, y),
    games.reference_curves on the same games (x in SGD steps), in a second panel. An OSError from
    writing the file propagates: the caller tells the user what to do."""
    plt = pyplot()
    panels = 2 if closed else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5), squeeze=False,
                             layout="constrained")
    toy = any("gap" in r for _, recs in runs.values() for r in recs)
    for name, (key, recs) in runs.items():
        key = key if toy else "loss"
        yardstick = "DualGap_0" if key == "gap0" else "DualGap_τ"
        label = f"{name} ({yardstick})" if toy else name
        axes[0, 0].plot(*curve(recs, key), label=label, **style(name))
    axes[0, 0].set(xlabel="SGD step",
                   ylabel="exact gap, mean over prompts" if toy else "loss",
                   yscale="log" if toy else "linear",
                   title="tiny Phi-3 + LoRA, toy games" if toy else "")
    for name, (x, y) in (closed or {}).items():
        axes[0, 1].plot(x, y, label=name, **style(name))
    if closed:
        axes[0, 1].set(xlabel="SGD step (INPO, SPPO: a closed-form iteration every iter_steps)",
                       yscale="log", title="games.py closed form, same P, μ, τ")
    for ax in axes.flat:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def self_judge(runs, path):
    """selfjudge.py's figure. runs: run name -> (algorithm, judge, yardstick key, log records),
    judge "oracle", "self", "noisy" or "base" (the frozen base model): the algorithm gives the
    colour and dash, the judge the marker. Panels: DualGap_0 to the true NE (last iterate; the
    average faint), the regularised gap, the error of the judge each policy trains against."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 6), layout="constrained")
    for name, (algo, judge, key, recs) in runs.items():
        kw = style(algo) | dict(marker=MARKERS[judge], ms=4)
        if key == "gap":
            axes[1].plot(*curve(recs, "gap"), label=name, **kw)
        else:
            axes[0].plot(*curve(recs, "gap0"), label=f"{name} last", **kw)
            axes[0].plot(*curve(recs, "avg_gap0"), alpha=0.4, lw=3, label=f"{name} average",
                         **kw)
        if any("judge_err" in r for r in recs):
            axes[2].plot(*curve(recs, "judge_err"), label=name, **kw)
    titles = ("unregularised: DualGap_0 to the true NE",
              "regularised: DualGap_τ, τ = 0.1",
              "error of the judge each policy trains\nagainst: mean |P̂ − P|")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="SGD step", title=title, yscale="log" if ax is not axes[2] else "linear")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2)
    keys = [plt.Line2D([], [], color="k", ls="", marker=marker, label=f"judge: {judge}")
            for judge, marker in MARKERS.items()]
    fig.legend(handles=keys, loc="outside upper center", ncols=len(keys))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def words(runs, path, shown, games, targets):
    """The words game's figure (words.py). runs: algorithm -> log records; shown: the algorithm
    whose moves are drawn; games: game name -> its moves; targets: game name -> its NE. Top row,
    per game: shown's frequency of each move (the NE dotted in its colour) and of no move (grey).
    Bottom row, per game: every run's sampled DualGap_0 with its 95% interval, and the floor (the
    NE sampled as often)."""
    plt = pyplot()
    K = len(games)
    size = (5.2 * K, 9)
    fig, axes = plt.subplots(2, K, figsize=size, layout="constrained")
    colours = [*plt.get_cmap("tab10").colors[:5], "0.5"]        # no move: grey
    steps, counts = curve(runs[shown], "counts")
    floors = curve(runs[shown], "floor0_games")[1][0]
    for k, (game, moves) in enumerate(games.items()):
        top = axes[0, k]
        for i, move in enumerate([*moves, "no move"]):
            freq = [c[k][i] / sum(c[k]) for c in counts]
            kw = dict(color=colours[i], marker=".", label=move)
            top.plot(steps, freq, **kw)
        for i, p in enumerate(targets[game]):
            colour = colours[i]
            top.axhline(p, color=colour, ls=":", lw=1.5)
        title = f"{game}: {shown}'s moves (NE dotted)"
        top.set(title=title, ylim=(0, 1), ylabel="frequency")
        top.legend(loc="upper right", fontsize=9)
        bottom = axes[1, k]
        for algo, recs in runs.items():
            x, rows = curve(recs, "gap0_games")
            mine = [row[k] for row in rows]                         # (gap, lo, hi) a step
            gap, lo, hi = np.array(mine).T
            bottom.plot(x, gap, label=algo, **style(algo))
            colour = STYLE[algo][0]
            bottom.fill_between(x, lo, hi, color=colour, alpha=0.15)
        label = "floor (NE sampled)"
        bottom.axhline(floors[k], color="k", ls=":", lw=1, label=label)
        title = f"{game}: sampled DualGap_0 (95% interval)"
        bottom.set(title=title, xlabel="SGD step", yscale="log")
    below = (0.5, -0.1)
    axes[1, 0].legend(loc="upper center", bbox_to_anchor=below, ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pyplot():
    """matplotlib without a display, imported only when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
