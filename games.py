"""
games.py: the tabular Nash playground. Finite response sets, a known preference matrix P, exact answers.

    python games.py                   # all games, writes figures/games_*.png and figures/games_curves.csv (< 30 s)
    python games.py --game rps --iters 4000
    python games.py --smoke           # 64 iterations, CSV + games_main.png only, for tests

What is here, in reading order (math: ALGORITHMS.md, section numbers below refer to it):
  1. games      P[i, j] = P(y_i ≻ y_j) (rows beat columns), validated: square, in [0, 1], P + Pᵀ = 1.
  2. exact tools duality_gap, best_response, regularized_nash (τ > 0, Newton + continuation in τ),
                 nash (τ = 0, a small simplex LP solver with Bland's rule); every answer is certified by its gap.
  3. dynamics   closed-form updates, each a few lines: MWU self-play, Nash-MD (decreasing and constant step),
                 OMD = INPO, MMD, mirror ascent vs improved opponents (greedy BR, soft BR, extragradient, duel winner),
                 LANA (both signs), Nash-MD-PG with fixed β, online DPO and BT-reward RLHF.
  4. sampled    a softmax table trained by SGD on judged pairs with THE SAME losses as the LM (nano_nash.py).
  5. main       run everything, write CSV, plot, print a table of final gaps.
Left out: extensive-form games, contexts (each prompt is its own game), Nash-EMA (no tabular form in the paper).
"""
import argparse
import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import nano_nash


# ---------------------------------------------------------------------------------------------------------------------
# config

@dataclass
class GameConfig:
    game: str = "all"        # all | bt3 | dice | rps | cycle | nlhf3 | random
    iters: int = 1000        # iterations of every closed-form dynamic (sampled runs scale with it)
    seed: int = 0            # seed of the random game and of the sampled runs
    out: str = "figures"     # where the PNGs and games_curves.csv go
    smoke: bool = False      # tiny run for tests: iters = 64, small sampled runs, CSV + games_main.png only
    tau: float = 0.1         # KL temperature of the regularised game
    n_random: int = 6        # size of the random game


def parse_args(cls=GameConfig, argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    for f in dataclasses.fields(cls):
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action="store_true")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return cls(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def logsumexp(z):
    m = z.max()
    return m + math.log(np.exp(z - m).sum())


def kl(p, q):
    """KL(p‖q) with 0 log 0 = 0."""
    m = p > 0
    return float((p[m] * (np.log(p[m]) - np.log(q[m]))).sum())


def log(p):
    """log that maps an underflowed probability (0) to a very negative number instead of -inf and a warning."""
    return np.log(np.maximum(p, 1e-300))


def geo_mix(pi, mu, a):
    """Normalised geometric mixture π^{1−a} μ^a."""
    return softmax((1 - a) * log(pi) + a * np.log(mu))


# ---------------------------------------------------------------------------------------------------------------------
# games

def check_preference(P):
    """Raise ValueError unless P is a valid preference matrix: square, entries in [0, 1], P + Pᵀ = 1 (so P_ii = 1/2)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"P must be a square matrix, got shape {P.shape}")
    if not np.all(np.isfinite(P)) or P.min() < 0 or P.max() > 1:
        raise ValueError(f"entries of P are probabilities, so must lie in [0, 1]; got min {P.min()}, max {P.max()}")
    err = np.abs(P + P.T - 1).max()
    if err > 1e-12:
        raise ValueError(f"P + P.T must equal 1 (P[i,j] = P(y_i > y_j), so P[j,i] = 1 - P[i,j] and P[i,i] = 1/2); "
                         f"max |P + P.T - 1| = {err:.3g}. Symmetrise a learned P with (P + 1 - P.T) / 2.")
    return P


@dataclass
class Game:
    """A preference game: name, P (n, n) with rows beating columns, reference policy mu (n,), action labels."""
    name: str
    P: np.ndarray
    mu: np.ndarray
    labels: tuple = ()

    def __post_init__(self):
        self.P = check_preference(self.P)
        self.mu = np.asarray(self.mu, dtype=np.float64)
        if self.mu.shape != (len(self.P),) or self.mu.min() <= 0 or abs(self.mu.sum() - 1) > 1e-12:
            raise ValueError(f"mu must be a full-support distribution over the {len(self.P)} actions, got {self.mu}")


MU_S = (0.6, 0.3, 0.1)   # the skewed reference policy of ALGORITHMS §8 (a uniform μ would start RPS at its NE)


def bt3(mu=MU_S):
    """G1, the Bradley-Terry game of the NashLLMs slides: R = (0, log 9, log 2), P_ij = σ(R_i − R_j).
    The slide prints the TRANSPOSE (its rows are y', its columns y). y_2 is a Condorcet winner: NE = (0, 1, 0)."""
    R = np.array([0.0, math.log(9), math.log(2)])
    return Game("bt3", 1 / (1 + np.exp(-(R[:, None] - R[None, :]))), mu, ("y1", "y2", "y3"))


def dice(mu=MU_S):
    """G2, Gardner's non-transitive dice A={2,4,9}, B={1,6,8}, C={3,5,7}: P(A≻B) = P(B≻C) = P(C≻A) = 5/9, NE uniform."""
    faces = np.array([[2, 4, 9], [1, 6, 8], [3, 5, 7]])
    P = ((faces[:, None, :, None] > faces[None, :, None, :]) +
         0.5 * (faces[:, None, :, None] == faces[None, :, None, :])).mean(axis=(2, 3))
    return Game("dice", P, mu, ("A", "B", "C"))


def rps(mu=MU_S):
    """G3, rock-paper-scissors (R, P, S): NE uniform."""
    return Game("rps", [[.5, 0, 1], [1, .5, 0], [0, 1, .5]], mu, ("R", "P", "S"))


def weighted_cycle(a=0.1, b=0.2, c=0.3, mu=MU_S):
    """G4: 1 ≻ 2 by margin a, 2 ≻ 3 by b, 3 ≻ 1 by c. NE ∝ (b, c, a), e.g. (1/3, 1/2, 1/6)."""
    P = [[.5, .5 + a, .5 - c], [.5 - a, .5, .5 + b], [.5 + c, .5 - b, .5]]
    return Game("cycle", P, mu, ("1", "2", "3"))


def nlhf3(eps=0.1, mu=MU_S):
    """G5, NLHF §3.2's three preference types. P(y2≻y1) = 2/3 − ε/2, P(y1≻y3) = P(y3≻y2) = 2/3 + ε/4;
    NE = (1/3 + ε/2, 1/3 + ε/2, 1/3 − ε), while a Bradley-Terry fit would pick a single response."""
    p21, p13 = 2 / 3 - eps / 2, 2 / 3 + eps / 4
    P = [[.5, 1 - p21, p13], [p21, .5, 1 - p13], [1 - p13, p13, .5]]
    return Game("nlhf3", P, mu, ("y1", "y2", "y3"))


def random_game(n, seed=0):
    """G6: upper triangle i.i.d. U[0, 1], P_ji = 1 − P_ij, P_ii = 1/2; μ ~ Dirichlet(1)."""
    rng = np.random.default_rng(seed)
    U = np.triu(rng.uniform(size=(n, n)), 1)
    P = U + np.tril(1 - U.T, -1) + 0.5 * np.eye(n)
    return Game("random", P, rng.dirichlet(np.ones(n)), tuple(str(i) for i in range(n)))


def make_games(cfg):
    games = [bt3(), dice(), rps(), weighted_cycle(), nlhf3(), random_game(cfg.n_random, cfg.seed)]
    if cfg.game != "all":
        games = [g for g in games if g.name == cfg.game]
        if not games:
            raise ValueError(f"unknown --game {cfg.game!r}; choose all, bt3, dice, rps, cycle, nlhf3 or random")
    return games


# ---------------------------------------------------------------------------------------------------------------------
# exact tools

def best_response(P, pi, mu=None, tau=0.0):
    """BR_τ(π) = argmax_π' J_τ(π', π) = softmax(log μ + Pπ/τ) (§2). τ = 0: uniform over argmax_y P(y ≻ π)."""
    mu = np.full(len(P), 1 / len(P)) if mu is None else mu
    p = P @ pi                                                     # (n,) win-rates P(y ≻ π)
    if tau > 0:
        return softmax(np.log(mu) + p / tau)
    best = (p >= p.max() - 1e-12).astype(float)
    return best / best.sum()


def duality_gap(P, pi, mu=None, tau=0.0):
    """DualGap_τ(π) = max_π1 J_τ(π1, π) − min_π2 J_τ(π, π2), closed form by symmetry (§2):
        τ > 0:  2 [τ log Σ_y μ(y) exp(P(y ≻ π)/τ) + τ KL(π‖μ)] − 1
        τ = 0:  2 max_y P(y ≻ π) − 1            (= 2 × exploitability)
    ≥ 0, convex in π, and 0 exactly at the (regularised) NE."""
    p = P @ pi
    if tau == 0:
        return float(2 * p.max() - 1)
    mu = np.full(len(P), 1 / len(P)) if mu is None else mu
    return float(2 * (tau * logsumexp(np.log(mu) + p / tau) + tau * kl(pi, mu)) - 1)


def regularized_nash(P, mu, tau, tol=1e-10):
    """π*_τ: the unique NE of the τ-regularised game, π*_τ = BR_τ(π*_τ) (§2), certified DualGap_τ ≤ tol.
    The damped logit iteration z ← (1 − g) z + g T(z), T(z) = log μ + P softmax(z)/τ, needs ~1/g ∝ 1/τ² steps.
    We solve the same fixed point z = T(z) by Newton: (I − (P/τ) S) δ = T(z) − z with S = diag π − ππᵀ.
    The Jacobian is never singular (P S = A S, A = P − 1/2 skew, so A S has imaginary eigenvalues). Newton is
    only locally fast, so we continue in τ: solve at τ_0 = max(τ, 1), halve τ, warm-start, repeat. If certification
    fails we fall back to the damped iteration itself (slow but safe)."""
    P, mu = check_preference(P), np.asarray(mu, dtype=np.float64)
    z, n = np.log(mu), len(P)
    taus = [max(tau, 1.0)]
    while taus[-1] > tau:
        taus.append(max(taus[-1] / 2, tau))
    for t in taus:
        for _ in range(50):
            pi = softmax(z)
            F = z - np.log(mu) - P @ pi / t                       # (n,) residual of z = T(z)
            if np.abs(F).max() < 1e-13:
                break
            J = np.eye(n) - (P / t) @ (np.diag(pi) - np.outer(pi, pi))
            step, a = np.linalg.solve(J, -F), 1.0
            while a > 1e-4:                                       # backtracking: Newton may overshoot far from z*
                z_new = z + a * step
                if np.abs(z_new - np.log(mu) - P @ softmax(z_new) / t).max() < np.abs(F).max():
                    break
                a /= 2
            z = z_new
    pi = softmax(z)
    if duality_gap(P, pi, mu, tau) > tol:                         # fallback: the damped iteration of §2
        L = max(np.abs(P - 0.5).max(), 1e-12)
        g = (tau / L**2) * tau / (1 + (tau / L**2) * tau)
        for _ in range(2_000_000):
            z = (1 - g) * z + g * (np.log(mu) + P @ softmax(z) / tau)
            if duality_gap(P, softmax(z), mu, tau) <= tol:
                break
        pi = softmax(z)
    gap = duality_gap(P, pi, mu, tau)
    if gap > tol:
        raise RuntimeError(f"regularized_nash did not certify: DualGap_tau = {gap:.3g} > {tol}")
    return pi


def _simplex_max(c, A, b, tol=1e-12):
    """max cᵀw s.t. A w ≤ b, w ≥ 0, with b ≥ 0 (so the slack basis is feasible). Tableau simplex, Bland's rule
    (smallest entering index, smallest leaving basis index): it cannot cycle, so it terminates."""
    m, k = A.shape
    T = np.zeros((m + 1, k + m + 1))
    T[:m, :k], T[:m, k:k + m], T[:m, -1], T[-1, :k] = A, np.eye(m), b, -c
    basis = list(range(k, k + m))
    while True:
        enter = np.flatnonzero(T[-1, :-1] < -tol)
        if len(enter) == 0:
            break
        j = enter[0]
        rows = np.flatnonzero(T[:m, j] > tol)
        if len(rows) == 0:
            raise RuntimeError("LP unbounded (cannot happen for a valid preference matrix)")
        ratios = T[rows, -1] / T[rows, j]
        ties = rows[ratios <= ratios.min() + tol]
        i = min(ties, key=lambda r: basis[r])
        T[i] /= T[i, j]
        for r in range(m + 1):
            if r != i:
                T[r] -= T[r, j] * T[i]
        basis[i] = j
    w = np.zeros(k + m)
    w[basis] = T[:m, -1]
    return w[:k]


def nash(P, tol=1e-9):
    """A NE of the unregularised game (τ = 0), certified DualGap_0 ≤ tol. The game is symmetric, so π is a NE iff
    max_y P(y ≻ π) = 1/2. With w = π / v: max Σw s.t. P w ≤ 1, w ≥ 0 has value 1/v = 2 and π = w / Σw (§2 LP).
    The NE set may contain several points; this returns one vertex of it."""
    P = check_preference(P)
    w = _simplex_max(np.ones(len(P)), P, np.ones(len(P)))
    pi = np.clip(w, 0, None) / w.sum()
    gap = duality_gap(P, pi)
    if gap > tol:
        raise RuntimeError(f"nash did not certify: DualGap_0 = {gap:.3g} > {tol}")
    return pi


def bt_reward(P, mu, iters=50):
    """The Bradley-Terry reward RLHF would fit on pairs y, y' ~ μ: argmin_r Σ μ_y μ_y' CE(P_yy', σ(r_y − r_y'))
    (convex; Newton with the gauge Σr = 0). Exact when P is itself BT (bt3); a transitive summary otherwise."""
    W, n = np.outer(mu, mu), len(P)
    r = np.zeros(n)
    for _ in range(iters):
        S = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))
        grad = (W * (S - P)).sum(1)
        H = W * S * (1 - S)
        H = np.diag(H.sum(1)) - H + np.ones((n, n)) / n
        r = r - np.linalg.solve(H, grad)
    return r - r.mean()


# ---------------------------------------------------------------------------------------------------------------------
# closed-form dynamics: each maps π_t (and t) to π_{t+1}

def mwu_step(P, pi, eta):
    """Self-play multiplicative weights / Hedge (Nash-MD at τ = 0, the SPPO target): π' ∝ π exp(η Pπ). Cycles."""
    return softmax(log(pi) + eta * P @ pi)


def nash_md_step(P, mu, pi, eta, tau):
    """Nash-MD (NLHF eqs. 3-5, §3.1): π^μ = π^{1−ητ} μ^{ητ};  log π' = log π^μ + η P(y ≻ π^μ) + c.
    η_t = 2/(τ(t+2)) gives KL(π*_τ‖π_T) ≤ 8/(τ²(T+1)) (Thm 1). A constant η converges to a biased point."""
    log_mix = (1 - eta * tau) * log(pi) + eta * tau * np.log(mu)
    return softmax(log_mix + eta * P @ softmax(log_mix))


def omd_step(P, mu, pi, eta, tau):
    """NLHF's OMD = INPO's closed form (INPO eq. 5 with η_I = 1/η, §3.2, §4):
    log π' = (1 − ητ) log π + ητ log μ + η P(y ≻ π) + c = π^{1−ητ} BR_τ(π)^{ητ}. Same as Nash-MD but vs π, not π^μ."""
    return softmax((1 - eta * tau) * log(pi) + eta * tau * np.log(mu) + eta * P @ pi)


def mmd_step(P, mu, pi, eta, tau):
    """Magnetic mirror descent (Sokota et al. 2022, §5.2): log π' = (log π + ητ log μ + η Pπ)/(1 + ητ) + c.
    Identical to omd_step with step η/(1 + ητ)."""
    return softmax((log(pi) + eta * tau * np.log(mu) + eta * P @ pi) / (1 + eta * tau))


def mirror_ascent_step(P, pi, opponent, gamma):
    """MAIO (Munos et al. 2020, §5.1): mirror ascent against an improved opponent π̃: π' ∝ π exp(γ P π̃)."""
    return softmax(log(pi) + gamma * P @ opponent)


def greedy_br(P, pi):
    """Improved opponent 1: the pure best response e_argmax P(y ≻ π) (ties broken by the lowest index)."""
    return np.eye(len(P))[np.argmax(P @ pi)]


def extragradient(P, pi, gamma):
    """Improved opponent 3: mirror-prox look-ahead π̃ ∝ π exp(γ Pπ)."""
    return mwu_step(P, pi, gamma)


def duel_winner(P, pi):
    """Improved opponent 5 (LANA): the winner of a duel y, y' ~ π has law π̃ = 2 π ⊙ Pπ (sums to 1 as πᵀPπ = 1/2)."""
    return 2 * pi * (P @ pi)


def lana_step(P, pi, gamma, printed_sign=False):
    """LANA's tabular update (§6). §5.2 reading: π' ∝ π^{1−γ} π̃^γ with π̃ the duel winner, i.e. π' ∝ π (Pπ)^γ
    (MWU on the log win-rate). Printed sign (eq. 2/Alg. 1): the step goes AWAY from π̃: π' ∝ π (Pπ)^{−γ}."""
    s = -1.0 if printed_sign else 1.0
    return softmax(log(pi) + s * gamma * log(P @ pi))


def lana_sgd_step(P, pi, lr, printed_sign=False):
    """Expected SGD step of nano_nash.lana_loss on a logit table (what sampled LANA follows on average):
    z' = z + s·lr (π̃ − π), s = +1 (§5.2 reading) or −1 (printed). A replicator flow, not the geometric step."""
    s = -1.0 if printed_sign else 1.0
    return softmax(log(pi) + s * lr * (duel_winner(P, pi) - pi))


def nash_md_pg_step(P, mu, pi, lr, tau, beta):
    """Expected gradient step of nano_nash.nash_md_pg_loss on a logit table z (y ~ π, y' ~ π' = π^{1−β} μ^β):
    a = Pπ' − τ log(π/μ);  z' = z + lr · π ⊙ (a − ⟨π, a⟩). Fixed point π = BR_τ(π'): π' is the NE at τ/(1−β)."""
    a = P @ geo_mix(pi, mu, beta) - tau * np.log(pi / mu)
    return softmax(log(pi) + lr * pi * (a - pi @ a))


def online_dpo_grad(P, mu, z, beta):
    """Expected gradient of nano_nash.dpo_loss w.r.t. the logit table z, pairs y, y' ~ sg[π], labels ~ Bernoulli(P)
    (so the ordered pair (y_w, y_l) = (y, y') has probability 2 π_y π_y' P_yy'):
    W_yy' = 2 π_y π_y' P_yy' β σ(−β d_yy'),  d_yy' = (z_y − z_y') − (log μ_y − log μ_y'),
    grad_y = −Σ_y' (W_yy' − W_y'y)."""
    pi, r = softmax(z), z - np.log(mu)
    d = r[:, None] - r[None, :]
    W = 2 * np.outer(pi, pi) * P * beta / (1 + np.exp(beta * d))
    return -(W.sum(1) - W.sum(0))


def online_dpo_step(P, mu, pi, lr, beta):
    """Online DPO, one expected SGD step z' = z − lr ∇. Its stationary point is not the NE (§7)."""
    z = log(pi)
    return softmax(z - lr * online_dpo_grad(P, mu, z, beta))


def rlhf_step(P, mu, pi, eta, tau, reward):
    """BT-reward RLHF: mirror ascent on the fitted reward, log π' = (1 − ητ) log π + ητ log μ + η r + c.
    Converges to μ e^{r/τ}: a transitive summary of P, not the NE of the preference game."""
    return softmax((1 - eta * tau) * log(pi) + eta * tau * np.log(mu) + eta * reward)


def algorithms(game, tau):
    """The catalogue: name -> (gap kind 'reg' (DualGap_τ) or 'unreg' (DualGap_0), step(pi, t) -> pi').
    Step sizes:   nash_md η_t = 2/(τ(t+2)) | nash_md_const ητ = 0.1 | inpo ητ = τ/η_I = 0.1 | inpo_paper τ/η_I = 1/3
    | mmd the step that equals inpo | nash_md_pg β = .25, lr 10 | online_dpo β = τ, lr 5 | rlhf_bt ητ = 0.1
    | mwu η = .5 | maio_greedy γ_t = 1/√(t+1) (constant γ stalls at O(γ)) | maio_soft vs softmax(Pπ/.05), γ = .5
    | maio_extragrad γ = 1 | maio_duel γ = 1 | lana / lana_printed γ = .5 (geometric step, §6)."""
    P, mu = game.P, game.mu
    r = bt_reward(P, mu)
    g = 0.1      # OMD/INPO step ητ = τ/η_I. The paper's τ/η_I = 1/3 ("inpo_paper") cycles on RPS at τ = 0.1 (§5.2)
    return {
        "nash_md": ("reg", lambda pi, t: nash_md_step(P, mu, pi, 2 / (tau * (t + 2)), tau)),
        "nash_md_const": ("reg", lambda pi, t: nash_md_step(P, mu, pi, 0.1 / tau, tau)),
        "inpo": ("reg", lambda pi, t: omd_step(P, mu, pi, g / tau, tau)),
        "inpo_paper": ("reg", lambda pi, t: omd_step(P, mu, pi, 1 / (3 * tau), tau)),
        "mmd": ("reg", lambda pi, t: mmd_step(P, mu, pi, g / (1 - g) / tau, tau)),
        "nash_md_pg_b.25": ("reg", lambda pi, t: nash_md_pg_step(P, mu, pi, 10.0, tau, 0.25)),
        "online_dpo": ("reg", lambda pi, t: online_dpo_step(P, mu, pi, 5.0, tau)),
        "rlhf_bt": ("reg", lambda pi, t: rlhf_step(P, mu, pi, g / tau, tau, r)),
        "mwu": ("unreg", lambda pi, t: mwu_step(P, pi, 0.5)),
        "maio_greedy": ("unreg", lambda pi, t: mirror_ascent_step(P, pi, greedy_br(P, pi), 1 / math.sqrt(t + 1))),
        "maio_soft": ("unreg", lambda pi, t: mirror_ascent_step(P, pi, best_response(P, pi, None, 0.05), 0.5)),
        "maio_extragrad": ("unreg", lambda pi, t: mirror_ascent_step(P, pi, extragradient(P, pi, 1.0), 1.0)),
        "maio_duel": ("unreg", lambda pi, t: mirror_ascent_step(P, pi, duel_winner(P, pi), 1.0)),
        "lana": ("unreg", lambda pi, t: lana_step(P, pi, 0.5)),
        "lana_printed": ("unreg", lambda pi, t: lana_step(P, pi, 0.5, printed_sign=True)),
    }


def log_iters(T, per_decade=20):
    """Iterations at which curves are logged: 0, then ~per_decade log-spaced points per decade, always T."""
    decades = max(1, math.ceil(math.log10(max(T, 2))))
    pts = np.round(np.logspace(0, math.log10(max(T, 1)), per_decade * decades))
    return sorted({0, T} | {int(p) for p in pts if p <= T})


def run(step, pi0, T):
    """Iterate step from pi0 for T steps; returns the (T+1, n) trajectory."""
    traj = [pi0]
    for t in range(T):
        traj.append(step(traj[-1], t))
    return np.array(traj)


# ---------------------------------------------------------------------------------------------------------------------
# sampled: a softmax table trained by SGD on judged pairs, with the LM's own losses (nano_nash.py)
# log π(y) = log_softmax(z)[y] plays the role of a sequence log-prob; the oracle judge draws Bernoulli(P(y ≻ y')),
# flipped with probability eps to mimic a noisy self-judge (that turns P into eps + (1 − 2 eps) P).

def judge(P, y, y2, gen, eps=0.0):
    """Oracle: True where y beats y2. P: (n, n) tensor; y, y2: (B,) long."""
    p = eps + (1 - 2 * eps) * P[y, y2]
    return torch.rand(len(y), generator=gen, dtype=P.dtype) < p


def _table(game, seed):
    P, log_mu = torch.tensor(game.P), torch.tensor(np.log(game.mu))
    z = log_mu.clone().requires_grad_()                             # π_0 = μ, as in the LM (adapters start at 0)
    return P, log_mu, z, torch.Generator().manual_seed(seed)


def sgd_step(z, loss, lr):
    """Plain SGD, z ← z − lr ∇loss (torch.optim.SGD without momentum; written out, since importing torch.optim
    pulls in torch._dynamo and costs ~2 s of start-up, more than the whole smoke run)."""
    (g,) = torch.autograd.grad(loss, z)
    with torch.no_grad():
        z -= lr * g


def sampled_inpo(game, tau, eta, iters, steps, batch, lr, eps=0.0, seed=0):
    """INPO: per iteration freeze π_t, then `steps` SGD steps on nano_nash.inpo_loss with y, y' ~ π_t.
    Returns the (iters+1, n) trajectory and ‖π_{t+1} − OMD(π_t)‖_1 per iteration (sampled vs closed form)."""
    P, log_mu, z, gen = _table(game, seed)
    traj, dev = [game.mu], []
    for _ in range(iters):
        logp_prev = torch.log_softmax(z.detach(), 0)               # (n,) frozen π_t
        for _ in range(steps):
            y, y2 = torch.multinomial(logp_prev.exp().expand(2, -1), batch, True, generator=gen)  # (B,), (B,)
            win = judge(P, y, y2, gen, eps)
            yw, yl = torch.where(win, y, y2), torch.where(win, y2, y)
            logp = torch.log_softmax(z, 0)
            loss, _ = nano_nash.inpo_loss(logp[yw], logp[yl], logp_prev[yw], logp_prev[yl], log_mu[yw], log_mu[yl],
                                          tau=tau, eta=eta)
            sgd_step(z, loss, lr)
        pi = torch.softmax(z.detach(), 0).numpy()
        dev.append(np.abs(pi - omd_step(game.P, game.mu, traj[-1], 1 / eta, tau)).sum())
        traj.append(pi)
    return np.array(traj), np.array(dev)


def sampled_nash_md_pg(game, tau, beta, iters, batch, lr, eps=0.0, seed=0):
    """Nash-MD-PG: y ~ π, y' ~ π^{1−β} μ^β, one SGD step on nano_nash.nash_md_pg_loss per batch."""
    P, log_mu, z, gen = _table(game, seed)
    traj = [game.mu]
    for _ in range(iters):
        logp = torch.log_softmax(z, 0)
        mix = torch.softmax((1 - beta) * logp.detach() + beta * log_mu, 0)
        y = torch.multinomial(logp.detach().exp(), batch, True, generator=gen)
        y2 = torch.multinomial(mix, batch, True, generator=gen)
        loss, _ = nano_nash.nash_md_pg_loss(logp[y], log_mu[y], judge(P, y, y2, gen, eps).double(), tau=tau)
        sgd_step(z, loss, lr)
        traj.append(torch.softmax(z.detach(), 0).numpy())
    return np.array(traj)


def sampled_lana(game, iters, batch, lr, printed_sign=False, eps=0.0, seed=0):
    """LANA: y, y' ~ π_i, the judge names the winner, one SGD step on nano_nash.lana_loss. With an oracle judge and
    the opponent term detached, player −i never touches player i's gradient, so one table plays both roles."""
    P, log_mu, z, gen = _table(game, seed)
    traj = [game.mu]
    for _ in range(iters):
        logp = torch.log_softmax(z, 0)
        y, y2 = torch.multinomial(logp.detach().exp().expand(2, -1), batch, True, generator=gen)
        win = judge(P, y, y2, gen, eps)
        yw, yl = torch.where(win, y, y2), torch.where(win, y2, y)
        loss, _ = nano_nash.lana_loss(logp.detach()[yw], logp[yl], printed_sign=printed_sign)
        sgd_step(z, loss, lr)
        traj.append(torch.softmax(z.detach(), 0).numpy())
    return np.array(traj)


# ---------------------------------------------------------------------------------------------------------------------
# experiments, CSV, figures

def curve(game, traj, tau, kind):
    """Gap at the logged iterations of a trajectory: DualGap_τ ('reg') or DualGap_0 ('unreg'). Returns (its, gaps)."""
    t, its = (tau if kind == "reg" else 0.0), log_iters(len(traj) - 1)
    return np.array(its), np.array([duality_gap(game.P, traj[i], game.mu, t) for i in its])


def sgd_steps(cfg):
    """SGD steps of the sampled Nash-MD-PG and LANA runs (torch steps cost ~0.5 ms each on a CPU)."""
    return min(cfg.iters, 400)


def sampled_runs(game, cfg):
    """Closed form vs sampled on one game: INPO (iterations), Nash-MD-PG(β = .25) and LANA (SGD steps)."""
    tau, T = cfg.tau, sgd_steps(cfg)
    n_out, steps = (8, 5) if cfg.smoke else (40, 10)
    runs = {}
    closed = run(lambda pi, t: omd_step(game.P, game.mu, pi, 0.1 / tau, tau), game.mu, n_out)
    # INPO samples a fresh data set per iteration; a big batch keeps SGD noise (∝ lr/batch) below the update size
    traj, dev = sampled_inpo(game, tau, tau / 0.1, n_out, steps, 4096, 1.0, seed=cfg.seed)
    noisy, _ = sampled_inpo(game, tau, tau / 0.1, n_out, steps, 4096, 1.0, eps=0.1, seed=cfg.seed)
    runs["inpo"] = ("reg", closed, {"sampled": traj, "sampled eps=.1": noisy}, dev)
    closed = run(lambda pi, t: nash_md_pg_step(game.P, game.mu, pi, 3.0, tau, 0.25), game.mu, T)
    traj = sampled_nash_md_pg(game, tau, .25, T, 256, 3.0, seed=cfg.seed)
    runs["nash_md_pg_b.25"] = ("reg", closed, {"sampled": traj}, None)
    for printed in (False, True):
        closed = run(lambda pi, t: lana_sgd_step(game.P, pi, 2.0, printed), game.mu, T)
        traj = sampled_lana(game, T, 64, 2.0, printed, seed=cfg.seed)
        runs["lana_sgd" + ("_printed" if printed else "")] = ("unreg", closed, {"sampled": traj}, None)
    return runs


def records_of(game, algo, kind, its, gaps, traj):
    return [{"game": game.name, "algorithm": algo, "gap": "DualGap_tau" if kind == "reg" else "DualGap_0",
             "iter": int(i), "value": float(v), "pi": " ".join(f"{p:.6g}" for p in traj[i])} for i, v in zip(its, gaps)]


def write_csv(records, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)


def simplex_xy(traj):
    """Barycentric (π_1, π_2, π_3) -> 2-D point in the triangle with vertices (0,0), (1,0), (1/2, √3/2)."""
    return traj @ np.array([[0, 0], [1, 0], [0.5, math.sqrt(3) / 2]])


def draw_simplex(ax, game, trajs, tau, title, colors=None):
    ax.plot(*simplex_xy(np.eye(3)[[0, 1, 2, 0]]).T, color="k", lw=0.8)
    for (x, y), lab in zip(simplex_xy(np.eye(3)), game.labels):
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(0, -12 if y == 0 else 4), ha="center")
    for name, traj in trajs.items():
        kw = {"color": colors[name]} if colors and name in colors else {}
        ax.plot(*simplex_xy(traj).T, lw=0.9, label=name, **kw)
    ax.plot(*simplex_xy(nash(game.P)), "k*", ms=12, label="NE (τ=0)")
    ax.plot(*simplex_xy(regularized_nash(game.P, game.mu, tau)), "rX", ms=9, label=f"π*_τ (τ={tau})")
    ax.plot(*simplex_xy(game.mu), "ko", mfc="none", ms=7, label="μ = π_0")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.axis("off")


def plot_gaps(ax, series, ylabel, title, colors=None):
    """series: name -> (iterations, gaps, line style). Gaps are clipped at 1e-16 (float64 round-off)."""
    for name, (x, y, style) in series.items():
        kw = {"color": colors[name]} if colors and name in colors else {}
        ax.loglog(np.maximum(x, 1), np.maximum(y, 1e-16), style, lw=1.2, label=name, **kw)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="major", alpha=0.3)


def make_figures(cfg, games, results, sampled, lana_bt3, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tau, written = cfg.tau, []
    names = list(next(iter(results.values())))          # one colour per algorithm in every figure
    colors = {a: plt.get_cmap("tab20")(i % 20) for i, a in enumerate(names)}

    def save(fig, name, wspace=0.25):
        # fixed margins: tight_layout would lay out all the text a second time (rendering dominates the run time)
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.88, wspace=wspace)
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    ylab = {"reg": f"DualGap_τ(π_t), τ={tau} (regularised)", "unreg": "DualGap_0(π_t) = 2·max_y P(y≻π_t) − 1"}
    if cfg.smoke:                                        # smoke: CSV + the README figure only (rendering is slow)
        games, sampled, lana_bt3 = [g for g in games if g.name == "rps"] or games[:1], None, None
    for game in ([] if cfg.smoke else games):            # 1. per game: gap vs iteration, every algorithm
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, kind in zip(axes, ("reg", "unreg")):
            series = {a: (x, g, "--" if a == "mmd" else "-")
                      for a, (k, tr, x, g) in results[game.name].items() if k == kind}
            plot_gaps(ax, series, ylab[kind], f"{game.name}: " + ("regularised algorithms, π_0 = μ" if kind == "reg"
                                                                    else "unregularised dynamics, π_0 = μ"), colors)
        save(fig, f"games_gap_{game.name}.png")
    tri = [g for g in games if len(g.P) == 3 and not cfg.smoke]   # 2. simplex trajectories of 3-action games
    if tri:
        show = ("nash_md", "inpo_paper", "nash_md_pg_b.25", "online_dpo", "mwu", "maio_extragrad", "lana")
        fig, axes = plt.subplots(1, len(tri), figsize=(3.6 * len(tri), 3.8), squeeze=False)
        for ax, game in zip(axes[0], tri):
            draw_simplex(ax, game, {a: results[game.name][a][1] for a in show}, tau, game.name, colors)
        axes[0][0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(-0.1, 1.0))
        save(fig, "games_simplex.png", wspace=0.05)
    if sampled:                                          # 3. closed form vs sampled, one panel per loss
        game, runs = sampled
        fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8))
        for ax, (algo, (kind, closed, samp, dev)) in zip(axes, runs.items()):
            series = {"closed form": (*curve(game, closed, tau, kind), "k-")}
            for lab, tr in samp.items():
                series[lab] = (*curve(game, tr, tau, kind), "-")
            unit = "INPO iteration" if dev is not None else "SGD step"
            note = "" if dev is None else f"\nmean ‖π_t+1 − OMD(π_t)‖₁ = {dev.mean():.3f}"
            plot_gaps(ax, series, ylab[kind].split(" (")[0], f"{game.name}: {algo}{note}")
            ax.set_xlabel(unit)
        save(fig, "games_sampled.png", wspace=0.35)
    if lana_bt3:                                         # 4. LANA's two sign readings
        game, trajs = lana_bt3
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, printed in zip(axes[:2], (False, True)):
            sub = {k: v for k, v in trajs.items() if ("printed" in k) == printed}
            draw_simplex(ax, game, sub, tau, "printed sign: raise log π(y_l)" if printed
                         else "§5.2 reading (default): lower log π(y_l)")
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(-0.15, 1.0))
        series = {k: (*curve(game, v, tau, "unreg"), "--" if "printed" in k else "-") for k, v in trajs.items()}
        plot_gaps(axes[2], series, ylab["unreg"], f"LANA on {game.name} (Condorcet winner y2)")
        axes[2].set_xlabel("iteration (geometric) or SGD step (expected / sampled)")
        save(fig, "games_lana.png")
    main = next((g for g in games if g.name == "rps"), games[0])   # 5. the README figure
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    res = results[main.name]
    pick = ("nash_md", "nash_md_const", "inpo", "inpo_paper", "nash_md_pg_b.25", "online_dpo", "rlhf_bt")
    series = {a: (res[a][2], res[a][3], "-") for a in pick}
    if sampled and sampled[0].name == main.name:
        tr = sampled[1]["inpo"][2]["sampled"]
        series["inpo (sampled, nano_nash.inpo_loss;\n x = INPO iterations)"] = (*curve(main, tr, tau, "reg"), "k--")
    mu_txt = ", ".join(f"{m:g}" for m in main.mu)
    plot_gaps(axes[0], series, ylab["reg"], f"{main.name}, μ = ({mu_txt}): who reaches π*_τ?", colors)
    draw_simplex(axes[1], main, {a: res[a][1] for a in ("nash_md", "inpo", "inpo_paper", "online_dpo", "rlhf_bt")},
                 tau, "trajectories from μ", colors)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(-0.1, 1.0))
    save(fig, "games_main.png")
    return written


def main(cfg):
    t0 = time.time()
    torch.set_num_threads(1)                             # tiny tensors: threads only add overhead
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, iters=64)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"config: {dataclasses.asdict(cfg)}")
    games = make_games(cfg)
    results, records = {}, []
    for game in games:
        results[game.name] = {}
        for algo, (kind, step) in algorithms(game, cfg.tau).items():
            traj = run(step, game.mu, cfg.iters)
            its, gaps = curve(game, traj, cfg.tau, kind)
            results[game.name][algo] = (kind, traj, its, gaps)
            records += records_of(game, algo, kind, its, gaps, traj)
    sampled, lana_bt3 = None, None
    game = next((g for g in games if g.name == "rps"), None)
    if game is not None:
        runs = sampled_runs(game, cfg)
        sampled = (game, runs)
        for algo, (kind, closed, samp, dev) in runs.items():
            for lab, tr in [("closed", closed)] + list(samp.items()):
                name = f"{algo}[{lab.replace(' ', '_')}]"
                records += records_of(game, name, kind, *curve(game, tr, cfg.tau, kind), tr)
        print(f"sampled INPO vs closed-form INPO update on rps: mean ‖π_t+1 − OMD(π_t)‖_1 = "
              f"{runs['inpo'][3].mean():.4f} over {len(runs['inpo'][3])} iterations")
    game = next((g for g in games if g.name == "bt3"), None)
    if game is not None:
        T = sgd_steps(cfg)
        lana_bt3 = (game, {
            "geometric π∝π(Pπ)^γ": results["bt3"]["lana"][1], "geometric printed": results["bt3"]["lana_printed"][1],
            "expected SGD": run(lambda pi, t: lana_sgd_step(game.P, pi, 2.0), game.mu, T),
            "expected SGD printed": run(lambda pi, t: lana_sgd_step(game.P, pi, 2.0, True), game.mu, T),
            "sampled lana_loss": sampled_lana(game, T, 64, 2.0, False, seed=cfg.seed),
            "sampled lana_loss printed": sampled_lana(game, T, 64, 2.0, True, seed=cfg.seed)})
    write_csv(records, out / "games_curves.csv")
    written = make_figures(cfg, games, results, sampled, lana_bt3, out)
    # a short table: final gap per game and algorithm
    algos = list(next(iter(results.values())))
    print(f"\nfinal gap after {cfg.iters} iterations (τ = {cfg.tau}; 'reg' rows: DualGap_τ, 'unreg' rows: DualGap_0)")
    print(f"{'algorithm':18s}{'kind':6s}" + "".join(f"{g.name:>10s}" for g in games))
    for a in algos:
        kind = results[games[0].name][a][0]
        print(f"{a:18s}{kind:6s}" + "".join(f"{max(results[g.name][a][3][-1], 0):10.1e}" for g in games))
    for g in games:                                      # the two biases of §3.1/§3.4, measured
        mix_pg = geo_mix(results[g.name]["nash_md_pg_b.25"][1][-1], g.mu, 0.25)
        mix_md = geo_mix(results[g.name]["nash_md_const"][1][-1], g.mu, 0.1)
        print(f"{g.name}: fixed-β Nash-MD-PG mixture vs π*(τ/(1-β)): "
              f"{np.abs(mix_pg - regularized_nash(g.P, g.mu, cfg.tau / 0.75)).max():.1e} | constant-η Nash-MD "
              f"mixture vs π*(τ/(1-ητ)): {np.abs(mix_md - regularized_nash(g.P, g.mu, cfg.tau / 0.9)).max():.1e}")
    if sampled:
        for algo, (kind, closed, samp, _) in sampled[1].items():
            finals = " ".join(f"{lab} {max(curve(sampled[0], tr, cfg.tau, kind)[1][-1], 0):.1e}"
                              for lab, tr in [("closed", closed)] + list(samp.items()))
            print(f"rps {algo}: {finals}")
    print(f"wrote {out / 'games_curves.csv'} ({len(records)} rows) and {len(written)} figures "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main(parse_args())
