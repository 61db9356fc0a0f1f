"""
report.py: what `python games.py` writes: the Markdown table of final gaps, the CSV of every curve
and the data of each figure (plots.py draws them; it computes nothing). results is
games.experiments' {name: (Dynamic, {game name: Curve})}.
"""
import csv

import torch

import plots
from solvers import log_iters, nash, regularized_nash


def table(results, games):
    """Markdown: DualGap_τ of the last iterate (regularised methods), DualGap_0 of the last and of
    the average iterate (unregularised dynamics); · = not run on that game, a negative round-off
    shows as 0."""
    head = " | ".join(f"{g.name} last | {g.name} avg" for g in games)
    rows = [f"| algorithm | gap | T | step sizes | {head} |", "|---" * (4 + 2 * len(games)) + "|"]
    for name, (d, curves) in results.items():
        cells = []
        for g in games:
            c = curves.get(g.name)
            if c is None:
                cells += ["·", "·"]
            else:
                cells.append(f"{max(c.last[-1], 0):.1e}")
                cells.append("–" if d.tau else f"{max(c.avg[-1], 0):.1e}")
        gap = "DualGap_0" if d.tau == 0 else "DualGap_τ"
        gap += " of P_ε" if d.P is not None else ""
        rows.append(f"| {name} | {gap} | {d.T:,} | {d.setting} | {' | '.join(cells)} |")
    return "\n".join(rows)


def write_csv(results, path):
    """Every curve at log-spaced points: game, algorithm, gap, iterate (last | average),
    iteration, value."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["game", "algorithm", "gap", "iterate", "iter", "value"])
        for name, (d, curves) in results.items():
            keep = set(log_iters(d.T))
            gap = "DualGap_tau" if d.tau else "DualGap_0"
            for game, c in curves.items():
                for i, t in enumerate(c.its.tolist()):
                    if t in keep:
                        w.writerow([game, name, gap, "last", t, f"{c.last[i]:.6g}"])
                        w.writerow([game, name, gap, "average", t, f"{c.avg[i]:.6g}"])


def series(results, game, iterate, chosen):
    """The gap curves of one game to draw, of the dynamics chosen(d), iterate "last" or "avg":
    log-spaced t ≥ 1, 20 points a decade, 5 for a sampled run (markers for its kind of judge)."""
    out = []
    for name, (d, curves) in results.items():
        c = curves.get(game.name)
        if c is None or not chosen(d):
            continue
        points = torch.tensor(log_iters(d.T, 5 if d.sampled else 20))
        keep = torch.isin(c.its, points) & (c.its >= 1)
        judge = ("noisy" if d.P is not None else "oracle") if d.sampled else None
        gap = getattr(c, iterate)
        out.append(plots.Series(name, d.algo, c.its[keep], gap[keep], judge))
    return out


def figures(cfg, games, results, out):
    """games_main.png: RPS (or the one game run); unless --smoke, every game's gaps in
    games_regularised.png, games_last.png and games_average.png. Returns the names written."""
    def regularised(d):
        return d.tau > 0

    def unregularised(d):                     # the other MAIOs are in the table only
        return d.tau == 0 and d.name not in ("maio_greedy", "maio_soft", "maio_extragrad")

    def toward_ne(d):                         # LANA's printed readings hug the simplex's edges
        return d.name in ("mwu", "sppo", "maio_duel", "maio_pg", "lana_geo", "lana")

    g = next((g for g in games if g.name == "rps"), games[0])
    mu = ", ".join(f"{m:.2g}" for m in g.mu.tolist())
    reg = f"DualGap_τ of π_t, τ = {cfg.tau}"
    gaps = series(results, g, "last", regularised)
    panels = [plots.Gaps(f"{g.name}, μ = ({mu}): who reaches π*_τ?", reg + " (ε-judge: of P_ε)",
                         gaps)]
    if len(g.P) == 3:                                                # paths on the simplex
        title = f"{g.name}: the first {cfg.iters} iterations"
        star = (f"π*_τ (τ = {cfg.tau})", regularized_nash(g.P, g.mu, cfg.tau))
        ne = ("NE (τ = 0)", nash(g.P))
        for target, chosen in ((star, regularised), (ne, toward_ne)):
            paths = {}
            for d, curves in results.values():
                c = curves[g.name]
                if chosen(d) and not d.sampled:
                    paths[d.algo] = c.pi[c.its <= cfg.iters]
            panels.append(plots.Simplex(title, g.labels, paths, target, g.mu))
    iterations = "iteration (sampled INPO: of 10 SGD steps)"
    plots.figure(out / "games_main.png", panels, iterations)
    if cfg.smoke:
        return ["games_main.png"]

    def grid(name, ylabel, iterate, chosen, xlabel):
        panels = [plots.Gaps(g.name, ylabel, series(results, g, iterate, chosen)) for g in games]
        plots.figure(out / name, panels, xlabel, cols=2)
        return name

    steps = (f"iteration: LANA runs {cfg.horizon:,}, MWU, SPPO and MAIO {cfg.horizon // 10:,}\n"
             "(lana, lana_printed, maio_pg: one expected SGD step; markers: sampled runs, at SGD "
             "steps; sampled SPPO's: at iterations)")
    return ["games_main.png",
            grid("games_regularised.png", reg, "last", regularised, iterations),
            grid("games_last.png", "DualGap_0 of π_t", "last", unregularised, steps),
            grid("games_average.png", "DualGap_0 of the average π̄_t", "avg", unregularised, steps)]

