"""
plots.py: every figure of the repo, in one palette: games.py's gap curves and simplex paths, train_lm.py's
convergence of the LM players, selfjudge.py's judges. Each algorithm has one colour and one line style
(distinct within each family and among train_lm.py's algorithms, so the figures read in black and white).
Nothing here computes a result: the functions draw what the scripts measured.
"""
import torch

from games import F64, log_iters, nash, regularized_nash
from runs import UserError

REG = ["nash_md", "nash_md_const", "inpo", "inpo_paper", "nash_md_pg", "online_dpo", "rlhf_bt"]
UNREG = ["mwu", "maio_greedy", "maio_soft", "maio_extragrad", "maio_duel", "maio_pg",
         "lana_geo", "lana_geo_printed", "lana", "lana_printed"]
COLORS = dict(zip(REG + UNREG, [   # one colour per algorithm in every figure of the repo, train_lm.py's too
    "#d62728", "#ff9896", "#1f77b4", "#17becf", "#e377c2", "#7f7f7f", "#bcbd22", "#8c564b", "#c49c94",
    "#98df8a", "#2ca02c", "#00441b", "#ff7f0e", "#000000", "#e6ab02", "#6a3d9a", "#b294c7"]))
DASHES = ["-", (0, (1, 1)), "--", (0, (5, 1)), ":", "-.", (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2)),   # for print:
          (0, (3, 1, 1, 1)), (0, (1, 3))]   # unique in each family and among train_lm.py's five algorithms
LINESTYLES = dict(zip(REG, DASHES)) | dict(zip(UNREG, [DASHES[i] for i in (4, 1, 6, 3, 5, 0, 2, 9, 8, 7)]))
CLIP = 1e-16   # gaps are clipped here on log axes (float64 round-off); every axis that clips says so
CORNERS = torch.tensor([[0, 0], [1, 0], [0.5, 3 ** 0.5 / 2]], dtype=F64)   # the 3-simplex drawn in the plane


def plot_gaps(ax, results, game, algos, iterate, title, ylabel):
    """Gap curves of one game on log axes, at log-spaced t ≥ 1; sampled runs as markers."""
    for a in algos:
        if (c := results[a][1].get(game.name)) is not None:
            keep = torch.isin(c[0], torch.tensor(log_iters(int(c[0][-1])))) & (c[0] >= 1)
            style = dict(ls="", marker="^" if "ε" in a else "o", ms=3) if "(" in a else {"ls": LINESTYLES[a]}
            ax.loglog(c[0][keep], c[1 if iterate == "last" else 2][keep].clamp_min(CLIP), label=a, lw=1.3,
                      color=COLORS[a.split(" ")[0].rstrip(",")], **style)
    ax.set(title=f"{game.name}: {title}", ylabel=f"{ylabel} (clipped at {CLIP:g})")
    ax.grid(True, which="major", alpha=0.3)


def draw_simplex(ax, results, game, algos, target, upto):
    """π_t, t ≤ upto, on a 3-action game's triangle, and target = (point, marker, label), the point those
    methods aim at: π*_τ (regularised methods) or the NE (unregularised dynamics). The circle is μ = π_0."""
    ax.plot(*CORNERS[[0, 1, 2, 0]].T, color="k", lw=0.8)
    for (x, y), lab in zip(CORNERS.tolist(), game.labels):
        ax.annotate(lab, (x, y), xytext=(0, -10 if y == 0 else 3), textcoords="offset points", ha="center")
    for a in algos:
        its, _, _, pi = results[a][1][game.name]
        ax.plot(*(pi[its <= upto] @ CORNERS).T, color=COLORS[a], ls=LINESTYLES[a], lw=1, label=a)
    ax.plot(*(target[0] @ CORNERS), target[1], ms=10, label=target[2])
    ax.plot(*(game.mu @ CORNERS), "ko", mfc="none", ms=6, label="μ = π_0")
    ax.set(title=f"{game.name}: the first {upto} iterations", aspect="equal")
    ax.axis("off")


def games_figures(cfg, games, results, out):
    """games_main.png (the README's) and, unless --smoke, games_gaps.png: grids of panels (draw, *args)."""
    plt = pyplot()
    plt.rcParams["font.size"] = 7                           # small panels: one small font for every label
    reg, last, avg = f"DualGap_τ of π_t, τ = {cfg.tau}", "DualGap_0 of π_t", "DualGap_0 of the average π̄_t"
    sampled_runs = [a for a in results if "sampled" in a]                   # INPO (2), then maio_pg, lana (2)

    def figure(name, rows, xlabel, w, h, each=False):   # fixed margins: tight_layout lays the text out twice
        W, H = w * len(rows[0]) + (.3 if each else 1.8), h * len(rows) + .6          # inches
        fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(W, H), squeeze=False)
        for row, axs in zip(rows, axes):
            for (draw, *args), ax in zip(row, axs):
                draw(ax, results, *args)
            for ax in axs if each else axs[-1:]:      # a legend per panel, or one right of a row sharing it
                ax.legend(fontsize=6, **({} if each else {"loc": "upper left", "bbox_to_anchor": (1, 1)}))
        axes[-1, 0].set_xlabel(xlabel, loc="left")
        fig.subplots_adjust(left=.8 / W, right=1 - (.1 if each else 1.5) / W, bottom=.5 / H, top=1 - .3 / H,
                            wspace=.3, hspace=.35)
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        return name

    main = next((g for g in games if g.name == "rps"), games[0])            # the README figure
    mu = ", ".join(f"{m:.2g}" for m in main.mu.tolist())
    panels = [(plot_gaps, main, REG + sampled_runs[:2], "last", f"μ = ({mu}): who reaches π*_τ?",
               reg + " (ε-judge: of P_ε)")]
    if len(main.P) == 3:                                                     # paths on the simplex
        star = (regularized_nash(main.P, main.mu, cfg.tau), "rX", f"π*_τ (τ = {cfg.tau})")
        ne = (nash(main.P), "k*", "NE (τ = 0)")
        panels += [(draw_simplex, main, REG, star, cfg.iters),
                   (draw_simplex, main, UNREG[:1] + UNREG[4:7] + ["lana"], ne, cfg.iters)]
    written = [figure("games_main.png", [panels], "iteration (sampled INPO: of 10 SGD steps)", 5, 4.6, True)]
    if not cfg.smoke:
        lana_vs_maio = UNREG[:1] + UNREG[4:] + sampled_runs[2:]      # (the other MAIOs: in the table)
        written.append(figure("games_gaps.png", [
            [(plot_gaps, g, REG, "last", "regularised", reg) for g in games],
            [(plot_gaps, g, lana_vs_maio, "last", "last iterate", last) for g in games],
            [(plot_gaps, g, lana_vs_maio, "avg", "running average", avg) for g in games]],
            "iteration (lana, lana_printed, maio_pg: one expected SGD step; markers: their sampled runs, x ="
            f" SGD steps). LANA runs {cfg.horizon:,} iterations, MWU, MAIO {cfg.horizon // 10:,}", 3.3, 3.0))
    return written


def lm_convergence(runs, path, closed=None, inpo_every=1):
    """train_lm.py's figure. runs: name -> (yardstick, log records), drawn as the exact gap on the toy
    games (yardstick "gap": DualGap_τ, "gap0": DualGap_0), else as the loss. closed: name -> the closed-form
    curve of games.reference_curves on the same games, one point per expected SGD step (INPO's: per
    iteration, one every inpo_every SGD steps), drawn in a second panel."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if closed else 1, figsize=(13 if closed else 6.5, 4.5), squeeze=False)
    toy = any("gap" in r for _, recs in runs.values() for r in recs)
    for name, (key, recs) in runs.items():
        key = key if toy else "loss"
        label = f"{name} ({'DualGap_0' if key == 'gap0' else 'DualGap_τ'})" if toy else name
        pts = [(r["step"], r[key]) for r in recs if key in r]
        axes[0, 0].plot(*zip(*pts), label=label, color=COLORS.get(name), ls=LINESTYLES.get(name))
    axes[0, 0].set(xlabel="SGD step", ylabel="exact gap, mean over prompts" if toy else "loss",
                   yscale="log" if toy else "linear", title="tiny Phi-3 + LoRA, toy games" if toy else "")
    axes[0, 0].legend(fontsize=8)
    for name, curve in (closed or {}).items():
        x = torch.arange(len(curve)) * (inpo_every if name == "inpo" else 1)
        keep = x < len(curve)                                  # INPO's iterations within the same SGD steps
        axes[0, 1].plot(x[keep], curve[keep.numpy()], label=name, color=COLORS.get(name),
                        ls=LINESTYLES.get(name))
    if closed:
        axes[0, 1].set(xlabel="expected SGD step (INPO: its closed-form iteration every iter_steps steps)",
                       yscale="log", title="games.py closed form (lr 3), same P, μ, τ")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free space or fix permissions (the run "
                        "itself is saved)") from None
    finally:
        plt.close(fig)


def self_judge(runs, path):
    """selfjudge.py's figure. runs: name -> (algorithm, line style, yardstick, log records): the gap to the
    true NE (last and average iterate), the regularised gap, and the error of each run's judge."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, (algo, style, key, recs) in runs.items():
        color, steps = COLORS.get(algo), [r["step"] for r in recs if "gap" in r]
        if key == "gap":
            axes[1].plot(steps, [r["gap"] for r in recs if "gap" in r], style, color=color, label=name)
        else:
            axes[0].plot(steps, [r["gap0"] for r in recs if "gap" in r], style, color=color,
                         label=f"{name} last")
            axes[0].plot(steps, [r["avg_gap0"] for r in recs if "gap" in r], style, color=color, alpha=0.4,
                         lw=3, label=f"{name} average")
        err = [(r["step"], r["judge_err"]) for r in recs if "judge_err" in r]
        if err:
            axes[2].plot(*zip(*err), style, color=color, label=name)
    titles = ("unregularised: DualGap_0 to the true NE", "regularised (base judge): DualGap_τ, τ = 0.1",
              "error of the judge each policy trains against: mean |P̂ − P|")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="SGD step", title=title, yscale="log" if ax is not axes[2] else "linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pyplot():
    """matplotlib without a display, imported only when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
