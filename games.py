"""
games.py: the tabular Nash playground. Finite response sets, a known preference matrix P, exact answers.

    python games.py                # all games: a Markdown table, figures/games_*.png and games_curves.csv
    python games.py --game rps     # one game: bt3 | dice | rps | cycle | nlhf3 | random
    python games.py --smoke        # seconds, what the tests run: the CSV and games_main.png in out/smoke

Sections: 1. games, 2. exact solutions, 3. closed-form dynamics (regularised methods aim at π*_τ, scored by
DualGap_τ; unregularised ones aim at the NE, scored by DualGap_0 of the last AND of the average iterate),
4. sampled runs of the LM's own losses, 5. output (plots.py draws the figures). P, BR_τ, DualGap_τ and the
losses are in nano_nash.py; § numbers refer to ALGORITHMS.md. Left out: contexts (a prompt is a game),
extensive-form games, Nash-EMA.
"""
import argparse
import csv
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch

from nano_nash import (best_response, duality_gap, duel_winner, geometric_mixture, inpo_loss, lana_loss,
                       pg_loss, win_rates)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# config: the CLI is generated from this dataclass; the step sizes are in algorithms() and sampled()

@dataclasses.dataclass
class GameConfig:
    game: str = "all"          # all | bt3 | dice | rps | cycle | nlhf3 | random
    tau: float = 0.1           # KL temperature of the regularised game
    iters: int = 1000          # iterations of the regularised methods (and of the simplex paths)
    horizon: int = 100_000     # iterations of LANA (last and average iterate); MWU and MAIO run a tenth
    sgd_steps: int = 2000      # SGD steps of the sampled runs
    seed: int = 0              # the random game and the sampled runs
    out: str = ""              # where the PNGs and games_curves.csv go; "": figures, with --smoke out/smoke
    smoke: bool = False        # --smoke: a few seconds, the CSV and games_main.png only (--no-smoke: off)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    for f in dataclasses.fields(GameConfig):
        if f.type in (bool, "bool"):                              # --smoke / --no-smoke, as in train_lm.py
            p.add_argument(f"--{f.name}", default=f.default, action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(f"--{f.name}", default=f.default, type=type(f.default))
    return GameConfig(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------
# 1. games

@dataclasses.dataclass
class Game:
    """A preference game: P (n, n), rows beat columns; a full-support reference policy mu (n,); labels.
    Validated: ValueError unless P is square with entries in [0, 1] and P + Pᵀ = 1 (so P_ii = 1/2)."""
    name: str
    P: torch.Tensor
    mu: torch.Tensor
    labels: tuple = ()

    def __post_init__(self):
        P = self.P = torch.as_tensor(self.P, dtype=F64)
        mu = self.mu = torch.as_tensor(self.mu, dtype=F64)
        if P.dim() != 2 or P.shape[0] != P.shape[1] or not (P.isfinite() & (P >= 0) & (P <= 1)).all():
            raise ValueError(f"P must be a square matrix of probabilities in [0, 1]; got {P.tolist()}")
        if (err := (P + P.T - 1).abs().max().item()) > 1e-12:
            raise ValueError(f"P + P.T must equal 1 (P[i,j] = P(y_i > y_j), P[j,i] = 1 - P[i,j]); got max "
                             f"|P + P.T - 1| = {err:.3g}. Symmetrise a learned P with (P + 1 - P.T) / 2.")
        if mu.shape != (len(P),) or mu.min() <= 0 or abs(mu.sum().item() - 1) > 1e-12:
            raise ValueError(f"mu must be a full-support distribution on the {len(P)} actions: {mu.tolist()}")


MU_S = (0.6, 0.3, 0.1)   # the skewed reference policy of §8 (a uniform μ would start RPS at its NE)


def bt3(mu=MU_S):
    """G1, the NashLLMs slides' BT game (printed as Pᵀ): P_ij = σ(R_i − R_j), R = (0, log 9, log 2); NE y2."""
    R = torch.tensor([0.0, math.log(9), math.log(2)], dtype=F64)
    return Game("bt3", torch.sigmoid(R[:, None] - R[None, :]), mu, ("y1", "y2", "y3"))


def dice(mu=MU_S):
    """G2, Gardner's dice A={2,4,9}, B={1,6,8}, C={3,5,7}: P(A≻B) = P(B≻C) = P(C≻A) = 5/9; NE uniform."""
    f = torch.tensor([[2, 4, 9], [1, 6, 8], [3, 5, 7]])
    a, b = f[:, None, :, None], f[None, :, None, :]
    return Game("dice", ((a > b).to(F64) + 0.5 * (a == b)).mean((2, 3)), mu, ("A", "B", "C"))


def rps(mu=MU_S):
    """G3, rock-paper-scissors (R, P, S): NE uniform. P has zeros: each pure strategy surely loses to one."""
    return Game("rps", [[.5, 0, 1], [1, .5, 0], [0, 1, .5]], mu, ("R", "P", "S"))


def weighted_cycle(a=0.1, b=0.2, c=0.3, mu=MU_S):
    """G4: 1 ≻ 2 by margin a, 2 ≻ 3 by b, 3 ≻ 1 by c. NE ∝ (b, c, a), e.g. (1/3, 1/2, 1/6)."""
    P = [[.5, .5 + a, .5 - c], [.5 - a, .5, .5 + b], [.5 + c, .5 - b, .5]]
    return Game("cycle", P, mu, ("1", "2", "3"))


def nlhf3(eps=0.1, mu=MU_S):
    """G5, NLHF §3.2's three preference types: P(y2≻y1) = 2/3 − ε/2, P(y1≻y3) = P(y3≻y2) = 2/3 + ε/4, so
    NE = (1/3 + ε/2, 1/3 + ε/2, 1/3 − ε), while a Bradley-Terry fit would pick a single response."""
    p21, p13 = 2 / 3 - eps / 2, 2 / 3 + eps / 4
    P = [[.5, 1 - p21, p13], [p21, .5, 1 - p13], [1 - p13, p13, .5]]
    return Game("nlhf3", P, mu, ("y1", "y2", "y3"))


def random_game(n, seed=0):
    """G6: the upper triangle i.i.d. U[0, 1], P_ji = 1 − P_ij, P_ii = 1/2; μ ~ Dirichlet(1)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.rand(n, n, generator=gen, dtype=F64).triu(1)
    e = -torch.rand(n, generator=gen, dtype=F64).log()
    P = U + (1 - U.T).tril(-1) + torch.eye(n, dtype=F64) / 2
    return Game("random", P, e / e.sum(), tuple(map(str, range(n))))


# ----------------------------------------------------------------------------------------------------------
# 2. exact solutions, each certified by its duality gap

def _simplex_max(c, A, b, tol=1e-12):
    """max cᵀw s.t. A w ≤ b, w ≥ 0 for b ≥ 0: a tableau simplex from the slack basis with Bland's rule."""
    m, k = A.shape
    T = torch.zeros(m + 1, k + m + 1, dtype=F64)
    T[:m, :k], T[:m, k:-1], T[:m, -1], T[m, :k] = A, torch.eye(m, dtype=F64), b, -c
    basis = list(range(k, k + m))
    while (T[m, :-1] < -tol).any():
        j = int((T[m, :-1] < -tol).nonzero()[0])
        rows = (T[:m, j] > tol).nonzero().flatten().tolist()
        ratio = {i: (T[i, -1] / T[i, j]).item() for i in rows}
        i = min((i for i in rows if ratio[i] <= min(ratio.values()) + tol), key=lambda i: basis[i])
        T[i] = T[i] / T[i, j]
        T -= torch.where(torch.arange(m + 1) == i, 0.0, T[:, j])[:, None] * T[i]     # column j becomes e_i
        basis[i] = j
    return torch.zeros(k + m, dtype=F64).scatter(0, torch.tensor(basis), T[:m, -1])[:k]   # basic variables


def nash(P, tol=1e-9):
    """A NE (τ = 0), certified DualGap_0 ≤ tol (§2): π is a NE iff P(y ≻ π) ≤ 1/2 for all y, so the LP
    max Σw s.t. P w ≤ 1, w ≥ 0 has value 2 ((Σw)²/2 = wᵀPw ≤ Σw) and π = w/Σw, a vertex of the NE set."""
    P = torch.as_tensor(P, dtype=F64)
    w = _simplex_max(torch.ones(len(P), dtype=F64), P, torch.ones(len(P), dtype=F64)).clamp_min(0)
    pi = w / w.sum()                                             # clipped first: round-off can leave −1e-17
    if (gap := duality_gap(P, pi).item()) > tol:
        raise RuntimeError(f"nash did not certify: DualGap_0 = {gap:.3g} > {tol}")
    return pi


def _newton(P, log_mu, tau, z, iters=50):
    """Newton on z = T(z) = log μ + P softmax(z)/τ: (I − (P/τ) S) δ = T(z) − z, S = diag π − ππᵀ (nonsingular:
    A = P − ½ is skew). Backtracking accepts only a step that lowers max|T(z) − z|; if none does, it stops."""
    resid = lambda z: (log_mu + win_rates(P, z.softmax(-1)) / tau - z).abs().max()     # noqa: E731
    for _ in range(iters):
        pi, r = z.softmax(-1), resid(z)
        if r < 1e-13:
            break
        J = torch.eye(len(z), dtype=F64) - (P / tau) @ (torch.diag(pi) - torch.outer(pi, pi))
        step = torch.linalg.solve(J, log_mu + win_rates(P, pi) / tau - z)
        a = next((a for a in (0.5 ** k for k in range(14)) if resid(z + a * step) < r), None)
        if a is None:
            break
        z = z + a * step
    return z


def regularized_nash(P, mu, tau, tol=1e-10):
    """π*_τ, the unique NE of the τ-regularised game: π*_τ = BR_τ(π*_τ) (§2), certified DualGap_τ ≤ tol.
    Newton continued in τ (solve at max(τ, 1), halve, warm-start) or, if that fails to certify, the damped
    iteration z ← (z + g T(z))/(1 + g), g = (τ/L)², L = max|P − ½| (§2: slow, safe)."""
    P, mu = torch.as_tensor(P, dtype=F64), torch.as_tensor(mu, dtype=F64)
    z = mu.log()
    for t in sorted({max(tau, 0.5 ** k) for k in range(60)}, reverse=True):   # 1, 1/2, 1/4, …, τ
        z = _newton(P, mu.log(), t, z)
    g = (tau / max((P - 0.5).abs().max().item(), 1e-12)) ** 2
    for i in range(2_000_000):
        if i % 1000 == 0 and duality_gap(P, z.softmax(-1), mu, tau) <= tol:
            return z.softmax(-1)
        z = (z + g * (mu.log() + win_rates(P, z.softmax(-1)) / tau)) / (1 + g)
    raise RuntimeError(f"regularized_nash did not certify DualGap_tau <= {tol}")


def bt_reward(P, mu, iters=30):
    """The Bradley-Terry reward RLHF fits on pairs y, y' ~ μ: argmin_r Σ μ_y μ_y' CE(P_yy', σ(r_y − r_y')),
    by Newton (convex; the gauge Σr = 0 by adding 11ᵀ/n to the Hessian). Exact when P is BT (bt3)."""
    W, r = mu[..., :, None] * mu[..., None, :], torch.zeros_like(mu)
    for _ in range(iters):
        S = torch.sigmoid(r[..., :, None] - r[..., None, :])
        H = W * S * (1 - S)
        r = r - torch.linalg.solve(torch.diag_embed(H.sum(-1)) - H + 1 / r.shape[-1], (W * (S - P)).sum(-1))
    return r - r.mean(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------
# 3. closed-form dynamics. Each update maps logits z = log π (..., K, n), a row per game, to new logits
# (run() renormalises). No probability is taken back to log space: a policy with e^-5000 on an action stays
# exact, where a floor like log(max(π, 1e-300)) distorts long runs on RPS, whose P has zeros.

def nash_md(P, log_mu, z, eta, tau):
    """Nash-MD (NLHF eqs. 3-5, §3.1): π^μ = π^{1−ητ} μ^{ητ};  log π' = log π^μ + η P(y ≻ π^μ) + c. With
    η_t = 2/(τ(t+2)), KL(π*_τ‖π_T) ≤ 8/(τ²(T+1)) (Thm 1); a constant η is biased (π^μ → π*_{τ/(1−ητ)})."""
    mix = geometric_mixture(z, log_mu, eta * tau)
    return mix + eta * win_rates(P, mix.exp())


def inpo(P, log_mu, z, eta, tau, reward=None):
    """INPO's step = NLHF's OMD (INPO eq. 5 with step size η, §3.2, §4), the minimiser of the population
    inpo_loss: log π' = (1 − ητ) log π + ητ log μ + η P(y ≻ π) + c, i.e. π' ∝ π^{1−ητ} BR_τ(π)^{ητ}; Nash-MD
    against π instead of π^μ, unbiased with a constant step. It is also magnetic mirror descent (MMD, §5.2)
    log π' = (log π + η'τ log μ + η' Pπ)/(1 + η'τ) + c with η' = η/(1 − ητ). With a fixed reward r in place
    of P(y ≻ π) it is BT-reward RLHF, which converges to μ e^{r/τ}: a transitive summary of P, not the NE."""
    payoff = win_rates(P, z.exp()) if reward is None else reward
    return (1 - eta * tau) * z + eta * tau * log_mu + eta * payoff


def expected_pg(z, a, lr):
    """The expected SGD step of nano_nash.pg_loss on a softmax table, advantage a(y) = E[pref] − τ log π/μ:
    z' = z + lr π ⊙ (a − ⟨π, a⟩) (§3.4; the baseline 1/2 drops out)."""
    pi = z.exp()
    return z + lr * pi * (a - (pi * a).sum(-1, keepdim=True))


def nash_md_pg(P, log_mu, z, lr, tau, beta):
    """Nash-MD-PG with a fixed β (§3.4): expected_pg with a = P(y ≻ π^{1−β} μ^β) − τ log(π/μ). Fixed point
    π = BR_τ(π^{1−β} μ^β): the MIXTURE is the NE at temperature τ/(1 − β), π is not π*_τ."""
    return expected_pg(z, win_rates(P, geometric_mixture(z, log_mu, beta).exp()) - tau * (z - log_mu), lr)


def online_dpo(P, log_mu, z, lr, tau):
    """Online DPO: the expected step z' = z − lr ∇ of nano_nash.dpo_loss (KL strength τ) on pairs from sg[π]
    ordered by the judge ((y_w, y_l) = (y, y') w.p. 2 π_y π_y' P_yy'); its fixed point is not the NE:
        −∇_y = Σ_y' (W_yy' − W_y'y),  W_yy' = 2 π_y π_y' P_yy' τ σ(−τ (r_y − r_y')),  r = z − log μ   (§7)."""
    pi, r = z.exp(), z - log_mu
    W = 2 * pi[..., None] * pi[..., None, :] * P * tau * torch.sigmoid(tau * (r[..., None, :] - r[..., None]))
    return z + lr * (W.sum(-1) - W.sum(-2))


def maio(P, z, gamma, opponent):
    """MAIO (Munos et al. 2020, §5.1): mirror ascent against an improved opponent π̃, z' = z + γ P(y ≻ π̃).
    With π̃ = π itself it is self-play MWU (Hedge; INPO at τ = 0; the SPPO target), which cycles."""
    return z + gamma * win_rates(P, opponent)


def lana_geo(log_P, z, gamma, sign=1):
    """LANA's geometric step (§6). §5.2 reading (sign +1): π' ∝ π^{1−γ} π̃^γ toward the duel winner
    π̃ = 2π ⊙ Pπ, i.e. π' ∝ π (Pπ)^γ; printed sign (eq. 2, Alg. 1; −1): π' ∝ π (Pπ)^{−γ}. In log space,
    log P(y ≻ π) = logsumexp_y' (log P(y ≻ y') + z_y') with log 0 = −inf: exact however small π gets."""
    return z + sign * gamma * torch.logsumexp(log_P + z.unsqueeze(-2), -1)


def lana(P, z, lr, sign=1):
    """The expected SGD step of nano_nash.lana_loss on a softmax table (what train_lm.py's LANA follows):
    z' = z + sign · lr (π̃ − π); sign +1 (§5.2 reading) moves toward the duel winner, −1 (printed) away."""
    pi = z.exp()
    return z + sign * lr * (duel_winner(P, pi) - pi)


def maio_pg(P, z, lr):
    """MAIO-PG: the expected SGD step of nano_nash.pg_loss (τ = 0) against the duel winner ỹ ~ π̃:
    z' = z + lr π ⊙ (Pπ̃ − ⟨π, Pπ̃⟩). LANA's opponent, with the payoff P(y ≻ ỹ) instead of a log-ratio."""
    return expected_pg(z, win_rates(P, duel_winner(P, z.exp())), lr)


@dataclasses.dataclass
class Dynamic:
    step: object               # step(z, t) -> logits of π_{t+1}; z is (R, K, n): R readings of K games
    T: int                     # iterations (closed forms, sampled INPO) or SGD steps (other sampled runs)
    tau: float                 # scored by DualGap_τ (τ > 0) or DualGap_0 (τ = 0)
    setting: str               # its step sizes, for the table
    names: tuple = ()          # names of the R readings (LANA's two signs run as one batch); () = its key
    P: torch.Tensor = None     # the game it is scored on, if not the stack's (a noisy judge's P_ε)


def algorithms(P, mu, cfg):
    """Every closed-form dynamic on a stack of games, with its step sizes (the one table of them). LANA runs
    cfg.horizon iterations (the paper's claim is about its average); MWU and MAIO show their trend in H/10."""
    lm, tau, H, signs = mu.log(), cfg.tau, cfg.horizon, torch.tensor([[[1.0]], [[-1.0]]], dtype=F64)
    r, u = bt_reward(P, mu), torch.full_like(mu, 1 / mu.shape[-1])
    mwu = lambda z, eta: maio(P, z, eta, z.exp())                                          # noqa: E731
    br = lambda z, temp: best_response(P, z.exp(), u, temp)                # noqa: E731 (μ = u, uniform)
    reg = {   # INPO's paper uses ητ = 1/3 ("inpo_paper"), which cycles on RPS at τ = 0.1
        "nash_md": ("η_t = 2/(τ(t+2))", lambda z, t: nash_md(P, lm, z, 2 / (tau * (t + 2)), tau)),
        "nash_md_const": ("ητ = 0.1", lambda z, t: nash_md(P, lm, z, 0.1 / tau, tau)),
        "inpo": ("ητ = 0.1", lambda z, t: inpo(P, lm, z, 0.1 / tau, tau)),
        "inpo_paper": ("ητ = 1/3", lambda z, t: inpo(P, lm, z, 1 / (3 * tau), tau)),
        "nash_md_pg": ("β = 0.25, lr 3", lambda z, t: nash_md_pg(P, lm, z, 3.0, tau, 0.25)),
        "online_dpo": ("lr 5", lambda z, t: online_dpo(P, lm, z, 5.0, tau)),
        "rlhf_bt": ("ητ = 0.1", lambda z, t: inpo(P, lm, z, 0.1 / tau, tau, r))}
    unreg = {
        "mwu": ("η = 0.1", lambda z, t: mwu(z, 0.1)),
        "maio_greedy": ("γ_t = 1/√(t+1), π̃ = BR_0(π)", lambda z, t: maio(P, z, (t + 1) ** -0.5, br(z, 0.0))),
        "maio_soft": ("γ = 0.5, π̃ = BR_τ(π), τ = .05, μ = u", lambda z, t: maio(P, z, 0.5, br(z, 0.05))),
        "maio_extragrad": ("γ = 1, π̃ = MWU(π), η = 1", lambda z, t: maio(P, z, 1, mwu(z, 1).softmax(-1))),
        "maio_duel": ("γ = 1, π̃ = duel winner", lambda z, t: maio(P, z, 1.0, duel_winner(P, z.exp()))),
        "maio_pg": ("lr 1", lambda z, t: maio_pg(P, z, 1.0))}
    lana_ = {"lana_geo": ("γ = 0.5", lambda z, t: lana_geo(P.log(), z, 0.5, signs)),  # both readings at once:
             "lana": ("lr 1", lambda z, t: lana(P, z, 1.0, signs))}                   # R = 2, sign ±1
    return {**{k: Dynamic(f, cfg.iters, tau, s) for k, (s, f) in reg.items()},
            **{k: Dynamic(f, H // 10, 0.0, s) for k, (s, f) in unreg.items()},
            **{k: Dynamic(f, H, 0.0, s, (k, k + "_printed")) for k, (s, f) in lana_.items()}}


def log_iters(T, per_decade=20):
    """Where curves are logged: 0, ~per_decade log-spaced iterations per decade, and T."""
    pts = {round(10 ** (k / per_decade)) for k in range(int(per_decade * math.log10(max(T, 1))) + 1)}
    return sorted({0, T} | {p for p in pts if p <= T})


@torch.inference_mode()                                # no autograd bookkeeping: 20% faster on tiny tensors
def run(step, z, T, dense=0):
    """Iterate z ← log_softmax(step(z, t)), t < T, from z_0 (..., n); log at t ≤ dense and at log_iters(T).
    Returns its (m,), the iterates π_t (m, ..., n) and the running averages π̄_t = (π_0 + … + π_t)/(t + 1)."""
    keep, total, its, last, avg = set(log_iters(T)) | set(range(dense + 1)), torch.zeros_like(z), [], [], []
    for t in range(T + 1):
        total += (pi := z.exp())
        if t in keep:
            its.append(t), last.append(pi), avg.append(total / (t + 1))
        if t < T:
            z = torch.log_softmax(step(z, t), -1)
    return torch.tensor(its), torch.stack(last), torch.stack(avg)


# ----------------------------------------------------------------------------------------------------------
# 4. sampled: a softmax table z (K, n), a row per game, trained by SGD on judged samples with the LM's losses;
# log π(y) = log_softmax(z)[y] plays the per-sequence log-prob. The oracle judge draws Bernoulli(P(y ≻ y')).
# A judge that flips each verdict with probability ε is the oracle of P_ε = ε + (1 − 2ε) P (its own π*_τ).

def judge(P, y, y2, gen):
    """The oracle judge: True where y beats y2, drawn Bernoulli(P(y ≻ y2)). P (K, n, n); y, y2 (K, B)."""
    return torch.rand(y.shape, generator=gen, dtype=F64) < P[torch.arange(len(P))[:, None], y, y2]


def duel(P, log_pi, B, gen):
    """y, y' ~ π (B per game) ordered by the judge: (y_w, y_l), each (K, B). y_w has the law π̃ = 2π ⊙ Pπ."""
    y, y2 = torch.multinomial(log_pi.exp(), 2 * B, replacement=True, generator=gen).chunk(2, -1)
    return torch.where(win := judge(P, y, y2, gen), y, y2), torch.where(win, y2, y)


def at(log_pi, y):
    """log π(y) of samples y (K, B), flattened to the losses' per-sequence shape (K·B,)."""
    return log_pi.gather(-1, y).flatten()


def inpo_batch(P, gen, B, log_mu, eta, tau, logp, prev):
    """INPO (eq. 8): a pair from the frozen π_t, ordered by the judge, in nano_nash.inpo_loss."""
    w, l = duel(P, prev, B, gen)
    return inpo_loss(at(logp, w), at(logp, l), at(prev, w), at(prev, l), at(log_mu, w), at(log_mu, l),
                     eta=eta, tau=tau)[0]


def maio_pg_batch(P, gen, B, logp, prev):
    """MAIO-PG: nano_nash.pg_loss (τ = 0) for y ~ π against ỹ, the judged winner of two more samples of π."""
    y, opponent = torch.multinomial(prev.exp(), B, replacement=True, generator=gen), duel(P, prev, B, gen)[0]
    return pg_loss(at(logp, y), judge(P, y, opponent, gen).flatten().to(F64))[0]


def lana_batch(P, gen, B, sign, logp, prev):
    """LANA (Alg. 1): lana_loss(log π(y_l), log π_opponent(y_w)); with an oracle judge one table is both."""
    w, l = duel(P, prev, B, gen)
    return lana_loss(at(logp, l), at(logp, w), printed_sign=sign < 0)[0]


def sgd(batch_loss, lr, inner=1):
    """A step for run(): `inner` plain SGD steps z ← z − lr K ∇loss, sampling from π_t = softmax(z_t) (INPO:
    one iteration; the others: inner = 1). Losses average the samples of all K games; K undoes that."""
    def step(z, t):
        with torch.inference_mode(False):                 # run() is in inference mode; autograd needs it off
            prev, z = z.clone(), z.clone()
            for _ in range(inner):
                z.requires_grad_()
                (g,) = torch.autograd.grad(len(z) * batch_loss(torch.log_softmax(z, -1), prev), z)
                z = (z - lr * g).detach()
        return z
    return step


def sampled(P, mu, cfg):
    """The sampled runs at their closed forms' step sizes; INPO's T counts iterations of 10 SGD steps."""
    gen, lm, tau, P_eps = torch.Generator().manual_seed(cfg.seed), mu.log(), cfg.tau, 0.1 + 0.8 * P
    inpo_on = lambda P: sgd(partial(inpo_batch, P, gen, 4096, lm, 0.1 / tau, tau), 1.0, 10)     # noqa: E731
    S, per_it, pg = cfg.sgd_steps, "ητ = 0.1; 10 SGD steps (lr 1, B 4096) per iteration", "lr 1, B 256"
    return {"inpo (sampled)": Dynamic(inpo_on(P), 40, tau, per_it),
            "inpo, ε = 0.1 judge (sampled)": Dynamic(inpo_on(P_eps), 40, tau, per_it, P=P_eps),
            "maio_pg (sampled)": Dynamic(sgd(partial(maio_pg_batch, P, gen, 256), 1.0), S, 0.0, pg),
            "lana (sampled)": Dynamic(sgd(partial(lana_batch, P, gen, 256, 1), 1.0), S, 0.0, pg),
            "lana_printed (sampled)": Dynamic(sgd(partial(lana_batch, P, gen, 256, -1), 1.0), S, 0.0, pg)}


# ----------------------------------------------------------------------------------------------------------
# 5. reference curves for train_lm.py, the experiments, the table and the CSV (the figures: plots.py)

def reference_curves(P, mu, tau, eta, beta, steps, lr, average=False):
    """The closed forms that train_lm.py's losses follow in expectation, on its games P (K, n, n), μ (K, n):
    algo -> (steps + 1,) numpy array, the gap at each step averaged over the K games. "inpo": INPO's step
    (size η) and "nash_md_pg": its expected step (fixed β, lr), by DualGap_τ; "lana", "lana_printed",
    "maio_pg": the expected SGD steps (lr), by DualGap_0 of π_t (average=True: of the average π̄_t)."""
    P, mu = torch.as_tensor(P, dtype=F64), torch.as_tensor(mu, dtype=F64)
    lm, out = mu.log(), {}
    for name, t_gap, step in [("inpo", tau, lambda z, t: inpo(P, lm, z, eta, tau)),
                              ("nash_md_pg", tau, lambda z, t: nash_md_pg(P, lm, z, lr, tau, beta)),
                              ("lana", 0.0, lambda z, t: lana(P, z, lr)),
                              ("lana_printed", 0.0, lambda z, t: lana(P, z, lr, -1)),
                              ("maio_pg", 0.0, lambda z, t: maio_pg(P, z, lr))]:
        _, pi, avg = run(step, lm, steps, dense=steps)
        out[name] = duality_gap(P, avg if average else pi, mu, t_gap).mean(-1).numpy()
    return out


def experiments(cfg, games):
    """Every dynamic on the games, stacked by size (the slow sampled runs on the first stack only).
    results[algo] = (Dynamic, {game: (its (m,), gap of π_t (m,), gap of π̄_t (m,), π_t (m, n))})."""
    results = {}
    for s, n in enumerate(dict.fromkeys(len(g.P) for g in games)):     # stack the games of each size
        gs = [g for g in games if len(g.P) == n]
        P, mu = torch.stack([g.P for g in gs]), torch.stack([g.mu for g in gs])    # (K, n, n), (K, n)
        for algo, d in (algorithms(P, mu, cfg) | (sampled(P, mu, cfg) if s == 0 else {})).items():
            z0 = mu.log().expand(len(d.names), *mu.shape) if d.names else mu.log()
            its, pi, avg = run(d.step, z0, d.T, dense=0 if "sampled" in algo else cfg.iters)
            pi, avg = (pi, avg) if d.names else (pi[:, None], avg[:, None])             # (m, R, K, n)
            last, mean = (duality_gap(P if d.P is None else d.P, x, mu, d.tau) for x in (pi, avg))  # (m,R,K)
            for r, name in enumerate(d.names or (algo,)):
                curves = results.setdefault(name, (d, {}))[1]
                curves |= {g.name: (its, last[:, r, k], mean[:, r, k], pi[:, r, k]) for k, g in enumerate(gs)}
    return results


def table(results, games):
    """Markdown: DualGap_τ of the last iterate (regularised methods), DualGap_0 of the last and of the average
    iterate (unregularised dynamics); · = not run on that game, a negative round-off shows as 0."""
    head = " | ".join(f"{g.name} last | {g.name} avg" for g in games)
    rows = [f"| algorithm | gap | T | step sizes | {head} |", "|---" * (4 + 2 * len(games)) + "|"]
    for algo, (d, curves) in results.items():
        cells = [("·", "·") if (c := curves.get(g.name)) is None else
                 (f"{max(c[1][-1], 0):.1e}", "–" if d.tau else f"{max(c[2][-1], 0):.1e}") for g in games]
        gap = "DualGap_0" if d.tau == 0 else "DualGap_τ" + (" of P_ε" if d.P is not None else "")
        rows.append(f"| {algo} | {gap} | {d.T:,} | {d.setting} | {' | '.join(sum(cells, ()))} |")
    return "\n".join(rows)


def write_csv(results, path):
    """Every curve at log-spaced points: game, algorithm, gap, iterate (last | average), iteration, value."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["game", "algorithm", "gap", "iterate", "iter", "value"])
        for algo, (d, curves) in results.items():
            keep, gap = set(log_iters(d.T)), "DualGap_tau" if d.tau else "DualGap_0"
            for game, (its, last, avg, _) in curves.items():
                w.writerows([game, algo, gap, kind, t, f"{v[i]:.6g}"] for i, t in enumerate(its.tolist())
                            if t in keep for kind, v in (("last", last), ("average", avg)))


def main(cfg):
    t0 = time.time()
    torch.set_num_threads(1)                             # tiny tensors: threads only add overhead
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, iters=64, horizon=640, sgd_steps=64)
    print(f"config: {dataclasses.asdict(cfg)}")
    games = [g for g in (bt3(), dice(), rps(), weighted_cycle(), nlhf3(), random_game(6, cfg.seed))
             if cfg.game in ("all", g.name)]
    if not games:
        raise ValueError(f"unknown --game {cfg.game!r}; choose all, bt3, dice, rps, cycle, nlhf3 or random")
    (out := Path(cfg.out or ("out/smoke" if cfg.smoke else "figures"))).mkdir(parents=True, exist_ok=True)
    results = experiments(cfg, games)
    write_csv(results, out / "games_curves.csv")
    from plots import games_figures                     # (plots.py imports this file)
    written = games_figures(cfg, games, results, out)
    print(f"\nfinal gaps, τ = {cfg.tau} (T: iterations; SGD steps if sampled)\n\n{table(results, games)}")
    print(f"\nwrote {out / 'games_curves.csv'} and {', '.join(written)} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main(parse_args())
