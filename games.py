"""
games.py: the tabular Nash playground. Finite response sets, a known preference matrix P, exact
answers.

    python games.py              # all games: Markdown tables, figures/games_*.png, games_curves.csv
    python games.py --game rps   # one game: bt3 | dice | rps | cycle | nlhf3 | random
    python games.py --smoke      # seconds, what the tests run: the CSV, games_main.png in out/smoke

Sections: 1. games, 2. closed-form dynamics (regularised methods aim at π*_τ, scored by DualGap_τ;
unregularised ones aim at the NE, scored by DualGap_0 of the last AND of the average iterate), each
registered by name in closed_forms(), 3. sampled runs of the LM's own losses on a softmax table,
4. experiments, train_lm.py's reference curves and SPPO against MWU. The exact solvers (NE, π*_τ)
and the loop that iterates a dynamic are in solvers.py; the table, CSV and figure data in
report.py (plots.py draws). P, BR_τ, DualGap_τ and the losses are in nano_nash.py; § numbers refer
to ALGORITHMS.md. π_t is the previous iterate: the policy a step starts from (INPO's and SPPO's
frozen policy). Left out: contexts (a prompt is a game), extensive-form games, Nash-EMA.
"""
import cli

if __name__ == "__main__":
    cli.catch_signals()         # first: Ctrl-C during the imports below is one line too
import dataclasses
import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

import report
from nano_nash import (best_response, duality_gap, duel_winner, geometric_mixture, inpo_loss,
                       lana_loss, pg_loss, sppo_loss, win_rates)
from solvers import F64, Curve, bt_reward, run


# -------------------------------------------------------------------------------------------------
# config: the CLI is generated from this dataclass; the step sizes are in closed_forms(), sampled()

@dataclasses.dataclass
class GameConfig:
    game: str = "all"        # all | bt3 | dice | rps | cycle | nlhf3 | random
    tau: float = 0.1         # KL temperature of the regularised game
    iters: int = 1000        # iterations of the regularised methods (and of the simplex paths)
    horizon: int = 100_000   # iterations of LANA; MWU, SPPO and MAIO run a tenth
    sgd_steps: int = 2000    # SGD steps of the sampled runs
    seed: int = 0            # the random game and the sampled runs
    out: str = ""            # where the PNGs and the CSV go; "": figures, with --smoke out/smoke
    smoke: bool = False      # a few seconds: the CSV and games_main.png only (--no-smoke: off)


CHECKS = [  # (flags, what must hold, what it must be): checked before any work (cli.check)
    ("tau", lambda v: 0 < v < math.inf, "a finite number > 0"),
    ("iters sgd_steps", lambda v: v >= 1, "a positive integer"),
    ("horizon", lambda v: v >= 10, "an integer >= 10 (MWU, SPPO and MAIO run a tenth)"),
    ("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
]


# -------------------------------------------------------------------------------------------------
# 1. games

@dataclasses.dataclass
class Game:
    """A preference game: P (n, n), rows beat columns; a full-support reference policy mu (n,);
    labels. ValueError unless P is square with entries in [0, 1] and P + Pᵀ = 1 (so P_ii = 1/2)."""
    name: str
    P: torch.Tensor
    mu: torch.Tensor
    labels: tuple = ()

    def __post_init__(self):
        P = self.P = torch.as_tensor(self.P, dtype=F64)
        mu = self.mu = torch.as_tensor(self.mu, dtype=F64)
        square = P.dim() == 2 and P.shape[0] == P.shape[1]
        probabilities = (P.isfinite() & (P >= 0) & (P <= 1)).all()
        if not square or not probabilities:
            raise ValueError(f"P must be a square matrix of probabilities in [0, 1]; got "
                             f"{P.tolist()}")
        err = (P + P.T - 1).abs().max().item()
        if err > 1e-12:
            raise ValueError(f"P + P.T must equal 1 (P[i,j] = P(y_i > y_j), P[j,i] = 1 - P[i,j]); "
                             f"got max |P + P.T - 1| = {err:.3g}. Symmetrise a learned P with "
                             "(P + 1 - P.T) / 2.")
        if mu.shape != (len(P),) or mu.min() <= 0 or abs(mu.sum().item() - 1) > 1e-12:
            raise ValueError(f"mu must be a full-support distribution on the {len(P)} actions: "
                             f"{mu.tolist()}")


MU_S = (0.6, 0.3, 0.1)   # §8's skewed μ of the 3-action games (a uniform μ starts RPS at its NE)


def bt3(mu=MU_S):
    """G1, the NashLLMs slides' BT game (printed as Pᵀ): P_ij = σ(R_i − R_j),
    R = (0, log 9, log 2); NE y2."""
    R = torch.tensor([0.0, math.log(9), math.log(2)], dtype=F64)
    P = torch.sigmoid(R[:, None] - R[None, :])
    return Game("bt3", P, mu, ("y1", "y2", "y3"))


def dice(mu=MU_S):
    """G2, Gardner's dice A={2,4,9}, B={1,6,8}, C={3,5,7}: P(A≻B) = P(B≻C) = P(C≻A) = 5/9;
    NE uniform."""
    faces = torch.tensor([[2, 4, 9], [1, 6, 8], [3, 5, 7]])
    a = faces[:, None, :, None]
    b = faces[None, :, None, :]
    P = ((a > b).to(F64) + 0.5 * (a == b)).mean((2, 3))
    return Game("dice", P, mu, ("A", "B", "C"))


def rps(mu=MU_S):
    """G3, rock-paper-scissors (R, P, S): NE uniform. P has zeros: each pure strategy surely loses
    to one."""
    P = [[.5, 0, 1],
         [1, .5, 0],
         [0, 1, .5]]
    return Game("rps", P, mu, ("R", "P", "S"))


def weighted_cycle(a=0.1, b=0.2, c=0.3, mu=MU_S):
    """G4: 1 ≻ 2 by margin a, 2 ≻ 3 by b, 3 ≻ 1 by c. NE ∝ (b, c, a), e.g. (1/3, 1/2, 1/6)."""
    P = [[.5, .5 + a, .5 - c],
         [.5 - a, .5, .5 + b],
         [.5 + c, .5 - b, .5]]
    return Game("cycle", P, mu, ("1", "2", "3"))


def rpsls():
    """Rock, paper, scissors, lizard, Spock (R, P, S, L, Sp): each move beats two and loses to two
    (rock crushes scissors and lizard, paper covers rock and disproves Spock, scissors cut paper
    and decapitate lizard, lizard eats paper and poisons Spock, Spock smashes scissors and
    vaporises rock); NE uniform."""
    P = [[.5, 0, 1, 1, 0],
         [1, .5, 0, 0, 1],
         [0, 1, .5, 1, 0],
         [0, 1, 0, .5, 1],
         [1, 0, 1, 0, .5]]
    return Game("rpsls", P, [0.2] * 5, ("R", "P", "S", "L", "Sp"))


def nlhf3(eps=0.1, mu=MU_S):
    """G5, NLHF §3.2's three preference types: P(y2≻y1) = 2/3 − ε/2,
    P(y1≻y3) = P(y3≻y2) = 2/3 + ε/4, so NE = (1/3 + ε/2, 1/3 + ε/2, 1/3 − ε), while a
    Bradley-Terry fit would pick one response."""
    p21 = 2 / 3 - eps / 2
    p13 = 2 / 3 + eps / 4
    P = [[.5, 1 - p21, p13],
         [p21, .5, 1 - p13],
         [1 - p13, p13, .5]]
    return Game("nlhf3", P, mu, ("y1", "y2", "y3"))


def random_game(n, seed=0):
    """G6: the upper triangle i.i.d. U[0, 1], P_ji = 1 − P_ij, P_ii = 1/2; μ ~ Dirichlet(1) (the
    other games start from MU_S)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.rand(n, n, generator=gen, dtype=F64).triu(1)
    e = -torch.rand(n, generator=gen, dtype=F64).log()
    diagonal = torch.eye(n, dtype=F64) / 2
    P = U + (1 - U.T).tril(-1) + diagonal
    return Game("random", P, e / e.sum(), tuple(map(str, range(n))))


# -------------------------------------------------------------------------------------------------
# 2. closed-form dynamics. Each update maps logits z = log π_t (..., K, n), a row per game, to new
# logits (run() renormalises). No probability is taken back to log space: a policy with e^-5000 on
# an action stays exact, where a floor like log(max(π, 1e-300)) distorts long runs on RPS, whose P
# has zeros.

def nash_md(P, log_mu, z, eta, tau):
    """Nash-MD (NLHF eqs. 3-5, §3.1): π^μ = π^{1−ητ} μ^{ητ}; log π' = log π^μ + η P(y ≻ π^μ) + c.
    With η_t = 2/(τ(t+2)), KL(π*_τ‖π_T) ≤ 8/(τ²(T+1)) (Thm 1); a constant η is biased
    (π^μ → π*_{τ/(1−ητ)})."""
    mix = geometric_mixture(z, log_mu, eta * tau)
    return mix + eta * win_rates(P, mix.exp())


def inpo(P, log_mu, z, eta, tau, reward=None):
    """INPO's step = NLHF's OMD (INPO eq. 5 with step size η, §3.2, §4), the minimiser of the
    population inpo_loss: log π' = (1 − ητ) log π + ητ log μ + η P(y ≻ π) + c, i.e.
    π' ∝ π^{1−ητ} BR_τ(π)^{ητ}; Nash-MD against π instead of π^μ, unbiased with a constant step.
    It is also magnetic mirror descent (MMD, §5.2) log π' = (log π + η'τ log μ + η' Pπ)/(1 + η'τ)
    + c with η' = η/(1 − ητ). With a fixed reward r in place of P(y ≻ π) it is BT-reward RLHF,
    which converges to μ e^{r/τ}: a transitive summary of P, not the NE."""
    payoff = win_rates(P, z.exp()) if reward is None else reward
    return (1 - eta * tau) * z + eta * tau * log_mu + eta * payoff


def expected_pg(z, a, lr):
    """The expected SGD step of nano_nash.pg_loss on a softmax table, advantage
    a(y) = E[pref] − τ log π/μ: z' = z + lr π ⊙ (a − ⟨π, a⟩) (§3.4; the baseline 1/2 drops out)."""
    pi = z.exp()
    baseline = (pi * a).sum(-1, keepdim=True)
    return z + lr * pi * (a - baseline)


def nash_md_pg(P, log_mu, z, lr, tau, beta):
    """Nash-MD-PG with a fixed β (§3.4): expected_pg with a = P(y ≻ π^{1−β} μ^β) − τ log(π/μ).
    Fixed point π = BR_τ(π^{1−β} μ^β): the MIXTURE is the NE at temperature τ/(1 − β), π is not
    π*_τ."""
    opponent = geometric_mixture(z, log_mu, beta).exp()
    advantage = win_rates(P, opponent) - tau * (z - log_mu)
    return expected_pg(z, advantage, lr)


def online_dpo(P, log_mu, z, lr, tau):
    """Online DPO: the expected step z' = z − lr ∇ of nano_nash.dpo_loss (KL strength τ) on pairs
    from sg[π] ordered by the judge ((y_w, y_l) = (y, y') w.p. 2 π_y π_y' P_yy'); its fixed point
    is not the NE (§7): with r = z − log μ,
        −∇_y = Σ_y' (W_yy' − W_y'y),   W_yy' = 2 π_y π_y' P_yy' τ σ(−τ (r_y − r_y'))."""
    pi = z.exp()
    r = z - log_mu
    pairs = 2 * pi[..., None] * pi[..., None, :] * P
    margins = r[..., None, :] - r[..., None]
    W = pairs * tau * torch.sigmoid(tau * margins)
    return z + lr * (W.sum(-1) - W.sum(-2))


def maio(P, z, gamma, opponent):
    """MAIO (Munos et al. 2020, §5.1): mirror ascent against an improved opponent π̃,
    z' = z + γ P(y ≻ π̃)."""
    return z + gamma * win_rates(P, opponent)


def mwu(P, z, eta):
    """Self-play MWU (Hedge): π' ∝ π e^{η P(y ≻ π)}, MAIO against π itself, INPO at τ = 0. It
    cycles on RPS; its average converges. SPPO's paper presents SPPO as this step."""
    return maio(P, z, eta, z.exp())


def sppo(P, z, eta, tol=1e-13):
    """SPPO's tabular step (Wu et al. 2024): the minimiser over softmax logits of the population
    sppo_loss, with z = log π_t and p_y = P(y ≻ π_t):
        E_{y~π_t} ½ (log π(y) − log π_t(y) − η (p_y − ½))².
    It is not MWU's step π_t e^{η p}/Z: a square loss cannot shift every log-ratio by one log Z.
    KKT, λ the multiplier of Σπ = 1: log π(y) = log π_t(y) + η (p_y − ½) − s_y with s e^s = λa
    (s = W(λa), Lambert's W), a = e^{η (p − ½)}, and Σπ = h(λ) = Σ π_t a e^{−s} = 1. Jensen:
    h(0) = Σ π_t a ≥ e^{η (P(π_t ≻ π_t) − ½)} = 1, so λ ≥ 0, and λ = 0 (MWU's step) iff
    Σ π_t a = 1. The shift s_y grows with p_y: SPPO moves less mass to the winners than MWU.
    1/h is concave and increasing in λ, so Newton on 1/h(λ) = 1 from λ = 0 climbs to the root
    without overshooting; at each λ, s = W(λa) by Newton, warm-started (λ only grows)."""
    log_a = eta * (win_rates(P, z.exp()) - 0.5)
    a = log_a.exp()
    pi_t = z.exp()
    s = torch.zeros_like(z)
    lam = torch.zeros_like(z[..., :1])
    for _ in range(200):
        for _ in range(100):
            b = a * torch.exp(-s)                       # = s/λ once s = W(λa)
            G = s - lam * b
            if G.abs().max() < tol:
                break
            s = s - G / (1 + lam * b)
        h = (pi_t * b).sum(-1, keepdim=True)
        if (h - 1).abs().max() < tol:
            return z + log_a - s
        slope = (pi_t * b * b / (1 + s)).sum(-1, keepdim=True)      # −dh/dλ
        lam = lam + h * (h - 1) / slope
    raise RuntimeError(f"sppo: Newton did not converge (eta = {eta})")


def lana_geo(log_P, z, gamma, sign=1):
    """LANA's geometric step (§6). §5.2 reading (sign +1): π' ∝ π^{1−γ} π̃^γ toward the duel
    winner π̃ = 2π ⊙ Pπ, i.e. π' ∝ π (Pπ)^γ; printed sign (eq. 2, Alg. 1; −1): π' ∝ π (Pπ)^{−γ}.
    In log space, log P(y ≻ π) = logsumexp_y' (log P(y ≻ y') + z_y') with log 0 = −inf: exact
    however small π gets."""
    log_win_rates = torch.logsumexp(log_P + z.unsqueeze(-2), -1)
    return z + sign * gamma * log_win_rates


def lana(P, z, lr, sign=1):
    """The expected SGD step of nano_nash.lana_loss on a softmax table (what train_lm.py's LANA
    follows): z' = z + sign · lr (π̃ − π); sign +1 (§5.2 reading) moves toward the duel winner,
    −1 (printed) away."""
    pi = z.exp()
    return z + sign * lr * (duel_winner(P, pi) - pi)


def maio_pg(P, z, lr):
    """MAIO-PG: the expected SGD step of nano_nash.pg_loss (τ = 0) against the duel winner ỹ ~ π̃:
    z' = z + lr π ⊙ (Pπ̃ − ⟨π, Pπ̃⟩). LANA's opponent, with the payoff P(y ≻ ỹ) instead of a
    log-ratio."""
    opponent = duel_winner(P, z.exp())
    return expected_pg(z, win_rates(P, opponent), lr)


@dataclasses.dataclass(kw_only=True)
class Dynamic:
    """One named dynamic, built by keyword. step(z, t) maps the logits of π_t (K, n), a row per
    game, to those of π_{t+1}. Scored by DualGap_τ, or for τ = 0 by DualGap_0 of the last and the
    average iterate."""
    name: str
    algo: str = ""          # whose colour and dash it takes in the figures (plots.STYLE); "": name
    step: Callable
    T: int                  # iterations (closed forms, sampled INPO and SPPO) or SGD steps
    tau: float              # the τ of its yardstick
    setting: str            # its step sizes, for the table
    sampled: bool = False   # a softmax table trained by SGD on judged samples (section 4)
    P: torch.Tensor = None  # the game it is scored on, if not the stack's (a noisy judge's P_ε)

    def __post_init__(self):
        self.algo = self.algo or self.name


def closed_forms(P, mu, cfg, *, eta, beta=0.25, lr_pg=3.0, lr=1.0, eta_mwu=0.1):
    """Every closed-form dynamic on a stack of games P (K, n, n), μ (K, n), with its step sizes:
    INPO's η (also constant-step Nash-MD's and RLHF's), Nash-MD-PG's β and lr_pg, LANA's and
    MAIO-PG's lr, MWU's and SPPO's η; reference_curves passes train_lm.py's. The regularised
    methods run cfg.iters iterations, LANA cfg.horizon (the paper's claim is about its average),
    MWU, SPPO and MAIO a tenth of it."""
    lm = mu.log()
    log_P = P.log()
    tau = cfg.tau
    reward = bt_reward(P, mu)
    uniform = torch.full_like(mu, 1 / mu.shape[-1])            # MAIO's best responses: μ = u
    regularised = partial(Dynamic, T=cfg.iters, tau=tau)
    unregularised = partial(Dynamic, T=cfg.horizon // 10, tau=0.0)
    lana_like = partial(Dynamic, T=cfg.horizon, tau=0.0)
    dynamics = [
        regularised(name="nash_md",
                    setting="η_t = 2/(τ(t+2))",
                    step=lambda z, t: nash_md(P, lm, z, 2 / (tau * (t + 2)), tau)),
        regularised(name="nash_md_const",
                    setting=f"ητ = {eta * tau:.3g}",
                    step=lambda z, t: nash_md(P, lm, z, eta, tau)),
        regularised(name="inpo",
                    setting=f"ητ = {eta * tau:.3g}",
                    step=lambda z, t: inpo(P, lm, z, eta, tau)),
        regularised(name="inpo_paper",      # INPO's paper; cycles on RPS
                    setting="ητ = 1/3",
                    step=lambda z, t: inpo(P, lm, z, 1 / (3 * tau), tau)),
        regularised(name="nash_md_pg",
                    setting=f"β = {beta:g}, lr {lr_pg:g}",
                    step=lambda z, t: nash_md_pg(P, lm, z, lr_pg, tau, beta)),
        regularised(name="online_dpo",
                    setting="lr 5",
                    step=lambda z, t: online_dpo(P, lm, z, 5.0, tau)),
        regularised(name="rlhf_bt",
                    setting=f"ητ = {eta * tau:.3g}",
                    step=lambda z, t: inpo(P, lm, z, eta, tau, reward)),
        unregularised(name="mwu",
                      setting=f"η = {eta_mwu:g}",
                      step=lambda z, t: mwu(P, z, eta_mwu)),
        unregularised(name="sppo",
                      setting=f"η = {eta_mwu:g}",
                      step=lambda z, t: sppo(P, z, eta_mwu)),
        unregularised(name="maio_greedy",
                      setting="γ_t = 1/√(t+1), π̃ = BR_0(π)",
                      step=lambda z, t: maio(P, z, (t + 1) ** -0.5,
                                             best_response(P, z.exp(), uniform, 0.0))),
        unregularised(name="maio_soft",
                      setting="γ = 0.5, π̃ = BR_τ(π), τ = .05, μ = u",
                      step=lambda z, t: maio(P, z, 0.5,
                                             best_response(P, z.exp(), uniform, 0.05))),
        unregularised(name="maio_extragrad",
                      setting="γ = 1, π̃ = MWU(π), η = 1",
                      step=lambda z, t: maio(P, z, 1, mwu(P, z, 1).softmax(-1))),
        unregularised(name="maio_duel",
                      setting="γ = 1, π̃ = duel winner",
                      step=lambda z, t: maio(P, z, 1.0, duel_winner(P, z.exp()))),
        unregularised(name="maio_pg",
                      setting=f"lr {lr:g}",
                      step=lambda z, t: maio_pg(P, z, lr)),
        lana_like(name="lana_geo",
                  setting="γ = 0.5",
                  step=lambda z, t: lana_geo(log_P, z, 0.5)),
        lana_like(name="lana_geo_printed",
                  setting="γ = 0.5",
                  step=lambda z, t: lana_geo(log_P, z, 0.5, sign=-1)),
        lana_like(name="lana",
                  setting=f"lr {lr:g}",
                  step=lambda z, t: lana(P, z, lr)),
        lana_like(name="lana_printed",
                  setting=f"lr {lr:g}",
                  step=lambda z, t: lana(P, z, lr, sign=-1)),
    ]
    return {d.name: d for d in dynamics}


# -------------------------------------------------------------------------------------------------
# 3. sampled: a softmax table z (K, n), a row per game, trained by SGD on judged samples with the
# LM's losses; log π(y) = log_softmax(z)[y] plays the per-sequence log-prob. The oracle judge draws
# Bernoulli(P(y ≻ y')); one that flips each verdict with probability ε is the oracle of
# P_ε = ε + (1 − 2ε) P (with its own π*_τ).

def judge(P, y, y2, gen):
    """The oracle judge: True where y beats y2, drawn Bernoulli(P(y ≻ y2)). P (K, n, n);
    y, y2 (K, B)."""
    rows = torch.arange(len(P))[:, None]
    u = torch.rand(y.shape, generator=gen, dtype=F64)
    return u < P[rows, y, y2]


def draw(log_pi, B, gen):
    """B samples y ~ π per game: (K, B)."""
    return torch.multinomial(log_pi.exp(), B, replacement=True, generator=gen)


def duel(P, log_pi, B, gen):
    """y, y' ~ π (B per game) ordered by the judge: (y_w, y_l), each (K, B). y_w has the law
    π̃ = 2π ⊙ Pπ."""
    y, y2 = draw(log_pi, 2 * B, gen).chunk(2, -1)
    win = judge(P, y, y2, gen)
    return torch.where(win, y, y2), torch.where(win, y2, y)


def at(log_pi, y):
    """log π(y) of samples y (K, B), flattened to the losses' per-sequence shape (K·B,)."""
    return log_pi.gather(-1, y).flatten()


def inpo_batch(P, gen, B, log_mu, eta, tau, logp, prev):
    """INPO (eq. 8): a pair from the frozen π_t, ordered by the judge's verdict, in
    nano_nash.inpo_loss: y_w beat y_l, P(y_w ≻ y_l) = 1 (eq. 8 as printed)."""
    w, l = duel(P, prev, B, gen)
    loss, _ = inpo_loss(at(logp, w), at(logp, l),
                        at(prev, w), at(prev, l),
                        at(log_mu, w), at(log_mu, l),
                        torch.ones(w.numel()),
                        eta=eta, tau=tau)
    return loss


def maio_pg_batch(P, gen, B, logp, prev):
    """MAIO-PG: nano_nash.pg_loss (τ = 0) for y ~ π against ỹ, the judged winner of two more
    samples of π."""
    y = draw(prev, B, gen)
    opponent, _ = duel(P, prev, B, gen)
    pref = judge(P, y, opponent, gen).flatten().to(F64)
    loss, _ = pg_loss(at(logp, y), pref)
    return loss


def lana_batch(P, gen, B, sign, logp, prev):
    """LANA (Alg. 1): lana_loss(log π(y_l), log π_opponent(y_w)); with an oracle judge one table is
    both players."""
    w, l = duel(P, prev, B, gen)
    loss, _ = lana_loss(at(logp, l), at(logp, w), printed_sign=sign < 0)
    return loss


def sppo_batch(P, gen, B, eta, logp, prev, k=8):
    """SPPO: y ~ π_t, P̂(y ≻ π_t) the mean verdict of y against k more samples of π_t, in
    nano_nash.sppo_loss. P̂ is unbiased and the loss's gradient is linear in it: the expected
    gradient is that of the population loss."""
    y = draw(prev, B, gen)                                       # (K, B)
    rivals = draw(prev, k * B, gen)                              # (K, k·B)
    wins = judge(P, y.repeat(1, k), rivals, gen).to(F64)
    win_rate = wins.view(len(P), k, B).mean(1).flatten()
    loss, _ = sppo_loss(at(logp, y), at(prev, y), win_rate, eta=eta)
    return loss


def sgd(batch_loss, lr, inner=1):
    """A step for run(): `inner` plain SGD steps z ← z − lr K ∇loss, sampling from π_t =
    softmax(z_t), the previous iterate (INPO, SPPO: one iteration on a frozen π_t; the others:
    inner = 1). Losses average the samples of all K games; K undoes that."""
    def step(z, t):
        with torch.inference_mode(False):    # run() is in inference mode; autograd needs it off
            prev = z.clone()
            z = z.clone()
            for _ in range(inner):
                z.requires_grad_()
                loss = len(z) * batch_loss(torch.log_softmax(z, -1), prev)
                (g,) = torch.autograd.grad(loss, z)
                z = (z - lr * g).detach()
        return z
    return step


def sampled(P, mu, cfg):
    """The sampled runs at their closed forms' step sizes, drawing from one generator in this
    order. INPO's and SPPO's T count iterations (SGD steps on a frozen π_t), the others' SGD
    steps. SPPO's loss weighs y by π_t(y): rare responses need many steps at a large lr."""
    gen = torch.Generator().manual_seed(cfg.seed)
    lm = mu.log()
    tau = cfg.tau
    P_eps = 0.1 + 0.8 * P
    inpo_on = partial(Dynamic, algo="inpo", T=40, tau=tau, sampled=True,
                      setting="ητ = 0.1; 10 SGD steps (lr 1, B 4096) per iteration")

    def inpo_step(judge):                              # judged by P or P_eps
        return sgd(partial(inpo_batch, judge, gen, 4096, lm, 0.1 / tau, tau), 1.0, 10)

    per_step = partial(Dynamic, T=cfg.sgd_steps, tau=0.0, sampled=True, setting="lr 1, B 256")
    return [
        inpo_on(name="inpo (sampled)", step=inpo_step(P)),
        inpo_on(name="inpo, ε = 0.1 judge (sampled)", P=P_eps, step=inpo_step(P_eps)),
        per_step(name="maio_pg (sampled)", algo="maio_pg",
                 step=sgd(partial(maio_pg_batch, P, gen, 256), 1.0)),
        per_step(name="lana (sampled)", algo="lana",
                 step=sgd(partial(lana_batch, P, gen, 256, 1), 1.0)),
        per_step(name="lana_printed (sampled)", algo="lana_printed",
                 step=sgd(partial(lana_batch, P, gen, 256, -1), 1.0)),
        Dynamic(name="sppo (sampled)", algo="sppo", T=40, tau=0.0, sampled=True,
                setting="η = 0.1; 30 SGD steps (lr 1.5, B 512, k 8) per iteration",
                step=sgd(partial(sppo_batch, P, gen, 512, 0.1), 1.5, 30)),
    ]


# -------------------------------------------------------------------------------------------------
# 4. experiments, train_lm.py's reference curves, SPPO against MWU; main

def stacks(games):
    """The games by size: (games, P (K, n, n), μ (K, n)) per size; one run plays all K."""
    for n in dict.fromkeys(len(g.P) for g in games):
        gs = [g for g in games if len(g.P) == n]
        P = torch.stack([g.P for g in gs])
        mu = torch.stack([g.mu for g in gs])
        yield gs, P, mu


def experiments(cfg, games):
    """Every dynamic on the games (the slow sampled runs on the first stack only).
    Returns {name: (Dynamic, {game name: Curve})}, in the registry's order."""
    results = {}
    for s, (gs, P, mu) in enumerate(stacks(games)):
        dynamics = list(closed_forms(P, mu, cfg, eta=0.1 / cfg.tau).values())
        if s == 0:
            dynamics += sampled(P, mu, cfg)
        for d in dynamics:
            # every t ≤ iters logged (the slow sampled runs: only log_iters(T))
            its, pi, avg = run(d.step, mu.log(), d.T, 0 if d.sampled else cfg.iters)
            scored_on = P if d.P is None else d.P
            last = duality_gap(scored_on, pi, mu, d.tau)                  # (m, K)
            mean = duality_gap(scored_on, avg, mu, d.tau)
            _, curves = results.setdefault(d.name, (d, {}))
            for k, g in enumerate(gs):
                curves[g.name] = Curve(its, last[:, k], mean[:, k], pi[:, k])
    return results


def reference_curves(P, mu, every, *, tau, eta, beta, lr, steps, average=False):
    """The closed forms that train_lm.py's losses follow in expectation, on its games P (K, n, n),
    μ (K, n), at its step sizes. every: name -> SGD steps per closed-form step (INPO and SPPO: one
    iteration of step size η every iter_steps SGD steps, when the trainer renews its frozen π_t;
    the others: one expected SGD step of size lr). Returns name -> (x, gap), x in SGD steps ≤ steps,
    the gap averaged over the K games by the dynamic's yardstick: DualGap_τ (inpo, nash_md_pg),
    else DualGap_0 of π_t (average=True: of the average π̄_t)."""
    P = torch.as_tensor(P, dtype=F64)
    mu = torch.as_tensor(mu, dtype=F64)
    cfg = GameConfig(tau=tau)
    registry = closed_forms(P, mu, cfg, eta=eta, beta=beta, lr_pg=lr, lr=lr, eta_mwu=eta)
    out = {}
    for name, k in every.items():
        d = registry[name]
        its, pi, avg = run(d.step, mu.log(), steps // k, dense=steps // k)
        gap = duality_gap(P, avg if average else pi, mu, d.tau).mean(-1)
        out[name] = ((its * k).numpy(), gap.numpy())
    return out


def sppo_vs_mwu(games, T, etas=(0.1, 1.0, 10.0)):
    """How close SPPO's step is to MWU's, the step its paper says it approximates: from the same
    π_t and η, max |log π_sppo − log π_mwu| and KL(π_sppo‖π_mwu) over the games, from μ (t = 0)
    and at the worst t < T along SPPO's own trajectory. Returns a Markdown table."""
    rows = ["| η | max abs Δ log π, from μ | KL, from μ | max abs Δ log π, along | KL, along |",
            "|---" * 5 + "|"]
    for eta in etas:
        start = []
        along = []
        for _, P, mu in stacks(games):
            z = mu.log()
            for t in range(T):
                log_s = torch.log_softmax(sppo(P, z, eta), -1)
                log_m = torch.log_softmax(mwu(P, z, eta), -1)
                kl = (log_s.exp() * (log_s - log_m)).sum(-1)
                along.append(torch.stack([(log_s - log_m).abs().amax(), kl.amax()]))
                z = log_s
            start.append(along[-T])
        a, b = torch.stack(start).amax(0)
        c, d = torch.stack(along).amax(0)
        rows.append(f"| {eta:g} | {a:.2e} | {b:.2e} | {c:.2e} | {d:.2e} |")
    return "\n".join(rows)


def main(cfg):
    t0 = time.time()
    cli.check(cfg, CHECKS)
    torch.set_num_threads(1)                        # tiny tensors: threads only add overhead
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, iters=64, horizon=640, sgd_steps=64)
    print(f"config: {dataclasses.asdict(cfg)}")
    games = [
        bt3(),
        dice(),
        rps(),
        weighted_cycle(),
        nlhf3(),
        random_game(6, cfg.seed),
    ]
    names = [g.name for g in games]
    games = [g for g in games if cfg.game in ("all", g.name)]
    if not games:
        raise cli.UserError(f"unknown --game {cfg.game!r}; choose all or {', '.join(names)}")
    out = Path(cfg.out or ("out/smoke" if cfg.smoke else "figures"))
    out.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=out).close()         # writable? now, not after minutes of work
    results = experiments(cfg, games)
    report.write_csv(results, out / "games_curves.csv")
    written = report.figures(cfg, games, results, out)
    print(f"\nfinal gaps, τ = {cfg.tau} (T: iterations; SGD steps if sampled)\n")
    print(report.table(results, games))
    print(f"\nSPPO's step vs MWU's from the same π_t (max over the games; along {cfg.iters:,} SPPO "
          "iterations from μ)\n")
    print(sppo_vs_mwu(games, cfg.iters))
    print(f"\nwrote {out / 'games_curves.csv'} and {', '.join(written)} in "
          f"{time.time() - t0:.1f}s")


if __name__ == "__main__":
    cli.run(lambda given: main(GameConfig(**given)), cli.flags(GameConfig, __doc__))
