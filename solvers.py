"""
solvers.py: exact answers for the tabular games of games.py, each certified by its duality gap,
and the loop that iterates a dynamic exactly.

    nash(P)                       a Nash equilibrium (τ = 0), by linear programming
    regularized_nash(P, μ, τ)     π*_τ, the unique NE of the τ-regularised game (Newton in τ)
    bt_reward(P, μ)               the Bradley-Terry reward RLHF fits: a transitive summary of P
    run(step, z, T)               iterate a step on logits in log space, last and average iterate

Everything is float64 and batched over leading dimensions (a stack of games). § numbers refer to
ALGORITHMS.md.
"""
import math
from typing import NamedTuple

import torch

from nano_nash import duality_gap, win_rates

F64 = torch.float64


# -------------------------------------------------------------------------------------------------
# 2. exact solutions, each certified by its duality gap

def _simplex_max(c, A, b, tol=1e-12):
    """max cᵀw s.t. A w ≤ b, w ≥ 0 for b ≥ 0: a tableau simplex from the slack basis with
    Bland's rule."""
    m, k = A.shape
    T = torch.zeros(m + 1, k + m + 1, dtype=F64)
    T[:m, :k] = A
    T[:m, k:-1] = torch.eye(m, dtype=F64)
    T[:m, -1] = b
    T[m, :k] = -c
    basis = list(range(k, k + m))
    while (T[m, :-1] < -tol).any():
        negative = T[m, :-1] < -tol
        j = int(negative.nonzero()[0])                               # entering column
        rows = (T[:m, j] > tol).nonzero().flatten().tolist()
        ratio = {i: (T[i, -1] / T[i, j]).item() for i in rows}      # the ratio test
        best = min(ratio.values())
        ties = [i for i in rows if ratio[i] <= best + tol]
        i = min(ties, key=lambda i: basis[i])
        T[i] = T[i] / T[i, j]
        pivot_row = torch.arange(m + 1) == i
        others = torch.where(pivot_row, 0.0, T[:, j])
        T -= others[:, None] * T[i]                              # column j becomes e_i
        basis[i] = j
    w = torch.zeros(k + m, dtype=F64)
    w[basis] = T[:m, -1]                                         # the basic variables
    return w[:k]


def nash(P, tol=1e-9):
    """A NE (τ = 0), certified DualGap_0 ≤ tol (§2): π is a NE iff P(y ≻ π) ≤ 1/2 for all y, so
    the LP max Σw s.t. P w ≤ 1, w ≥ 0 has value 2 ((Σw)²/2 = wᵀPw ≤ Σw) and π = w/Σw, a vertex of
    the NE set."""
    P = torch.as_tensor(P, dtype=F64)
    ones = torch.ones(len(P), dtype=F64)
    w = _simplex_max(ones, P, ones).clamp_min(0)
    pi = w / w.sum()                                  # clipped first: round-off can leave −1e-17
    gap = duality_gap(P, pi).item()
    if gap > tol:
        raise RuntimeError(f"nash did not certify: DualGap_0 = {gap:.3g} > {tol}")
    return pi


def _newton(P, log_mu, tau, z, iters=50):
    """Newton on z = T(z) = log μ + P softmax(z)/τ: (I − (P/τ) S) δ = T(z) − z, S = diag π − ππᵀ
    (nonsingular: A = P − ½ is skew). Backtracking accepts only a step that lowers max|T(z) − z|;
    if none does, it stops."""
    def residual(z):
        return log_mu + win_rates(P, z.softmax(-1)) / tau - z

    for _ in range(iters):
        pi = z.softmax(-1)
        r = residual(z).abs().max()
        if r < 1e-13:
            break
        S = torch.diag(pi) - torch.outer(pi, pi)
        identity = torch.eye(len(z), dtype=F64)
        J = identity - (P / tau) @ S
        step = torch.linalg.solve(J, residual(z))
        sizes = [0.5 ** k for k in range(14)]
        lower = [a for a in sizes if residual(z + a * step).abs().max() < r]
        if not lower:
            break
        z = z + lower[0] * step
    return z


def regularized_nash(P, mu, tau, tol=1e-10):
    """π*_τ, the unique NE of the τ-regularised game: π*_τ = BR_τ(π*_τ) (§2), certified
    DualGap_τ ≤ tol. Newton continued in τ (solve at max(τ, 1), halve, warm-start) or, if that
    fails to certify, the damped iteration z ← (z + damping T(z))/(1 + damping), damping = (τ/L)²,
    L = max|P − ½| (§2: slow, safe)."""
    P = torch.as_tensor(P, dtype=F64)
    mu = torch.as_tensor(mu, dtype=F64)
    z = mu.log()
    temperatures = {max(tau, 0.5 ** k) for k in range(60)}
    for t in sorted(temperatures, reverse=True):                  # 1, 1/2, …, τ
        z = _newton(P, mu.log(), t, z)
    L = (P - 0.5).abs().max().item()
    L = max(L, 1e-12)
    damping = (tau / L) ** 2
    for i in range(2_000_000):
        pi = z.softmax(-1)
        if i % 1000 == 0 and duality_gap(P, pi, mu, tau) <= tol:
            return pi
        target = mu.log() + win_rates(P, z.softmax(-1)) / tau
        z = (z + damping * target) / (1 + damping)
    raise RuntimeError(f"regularized_nash did not certify DualGap_tau <= {tol}")


def bt_reward(P, mu, iters=30):
    """The Bradley-Terry reward RLHF fits on pairs y, y' ~ μ: argmin_r Σ μ_y μ_y' CE(P_yy',
    σ(r_y − r_y')), by Newton (convex; the gauge Σr = 0 by adding 11ᵀ/n to the Hessian). Exact when
    P is BT (bt3)."""
    W = mu[..., :, None] * mu[..., None, :]
    r = torch.zeros_like(mu)
    for _ in range(iters):
        S = torch.sigmoid(r[..., :, None] - r[..., None, :])
        H = W * S * (1 - S)
        gauge = 1 / r.shape[-1]
        hessian = torch.diag_embed(H.sum(-1)) - H + gauge
        gradient = (W * (S - P)).sum(-1)
        r = r - torch.linalg.solve(hessian, gradient)
    return r - r.mean(-1, keepdim=True)




def log_iters(T, per_decade=20):
    """Where curves are logged: 0, ~per_decade log-spaced iterations per decade, and T."""
    decades = math.log10(max(T, 1))
    ks = range(int(per_decade * decades) + 1)
    points = {round(10 ** (k / per_decade)) for k in ks}
    return sorted({0, T} | {p for p in points if p <= T})


@torch.inference_mode()                      # no autograd bookkeeping: 20% faster on tiny tensors
def run(step, z, T, dense=0):
    """Iterate z ← log_softmax(step(z, t)), t < T, from z_0 (..., n); log at t ≤ dense and at
    log_iters(T). Returns its (m,), the iterates π_t (m, ..., n) and the running averages
    π̄_t = (π_0 + … + π_t)/(t + 1)."""
    keep = set(log_iters(T)) | set(range(dense + 1))
    total = torch.zeros_like(z)
    its = []
    last = []
    avg = []
    for t in range(T + 1):
        pi = z.exp()
        total += pi
        if t in keep:
            its.append(t)
            last.append(pi)
            avg.append(total / (t + 1))
        if t < T:
            z = torch.log_softmax(step(z, t), -1)
    return torch.tensor(its), torch.stack(last), torch.stack(avg)


class Curve(NamedTuple):
    """One dynamic on one game at the logged iterations: the gap of the last iterate and of the
    running average (by the dynamic's yardstick), and the iterates π_t (the simplex paths)."""
    its: torch.Tensor
    last: torch.Tensor
    avg: torch.Tensor
    pi: torch.Tensor


