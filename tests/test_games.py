"""Tests for games.py and plots.py: known answers, exact solvers, closed-form dynamics (last and
average iterate, log space), SPPO's tabular step against MWU's, sampled runs with the nano_nash
losses, train_lm.py's reference curves, one style per algorithm in every figure, the script."""
import csv
import itertools
import math
import subprocess
import sys
from decimal import Decimal, getcontext
from functools import partial
from pathlib import Path

import matplotlib.colors
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import games as G  # noqa: E402
import report  # noqa: E402
import solvers  # noqa: E402
import plots  # noqa: E402
from nano_nash import (best_response, duality_gap, duel_winner, geometric_mixture,  # noqa: E402
                       pg_loss)
from cli import UserError, flags  # noqa: E402

F64 = torch.float64
MU_U = torch.full((3,), 1 / 3, dtype=F64)
MU_S = torch.tensor([.6, .3, .1], dtype=F64)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: extra threads only contend with each other on a small, shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kl(p, q):
    """KL(p‖q) for the last axis, 0 log 0 = 0, written out independently of games.py."""
    return torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p)).sum(-1)


def J(P, mu, tau, p1, p2):
    """J_τ(π1, π2) = π1ᵀPπ2 − τKL(π1‖μ) + τKL(π2‖μ); π1 may be a batch of rows."""
    return p1 @ P @ p2 - tau * kl(p1, mu) + tau * kl(p2, mu)


def steps(step, z, T):
    """Iterate a closed-form step T times from logits z (same renormalisation as games.run); all
    iterates."""
    out = [z]
    for t in range(T):
        out.append(torch.log_softmax(step(out[-1], t), -1))
    return torch.stack(out).exp()


def simplex_grid(k):
    points = [(i, j, k - i - j) for i in range(k + 1) for j in range(k + 1 - i)]
    return torch.tensor(points, dtype=F64) / k


def config(*argv):
    """games.py's command line, as its __main__ reads it."""
    return G.GameConfig(**flags(G.GameConfig, G.__doc__, list(argv)))


# -------------------------------------------------------------------------------------------------
# games and validation

@pytest.mark.parametrize("P, msg", [
    ([[.5, .5, .5], [.5, .5, .5]], "square"),
    ([[.5, 1.2], [-.2, .5]], r"\[0, 1\]"),
    ([[.5, .7], [.4, .5]], r"P \+ P.T"),
    ([[.4, .5], [.5, .6]], r"P \+ P.T"),
    ([[.5, math.nan], [math.nan, .5]], r"\[0, 1\]"),
])
def test_invalid_games_raise(P, msg):
    with pytest.raises(ValueError, match=msg):
        G.Game("bad", P, [.5, .5])


def test_invalid_mu_raises():
    for mu in ([.5, .5, 0.0], [.5, .5], [.5, .6, .1]):
        with pytest.raises(ValueError, match="mu"):
            G.Game("rps", G.rps().P, mu)


def test_games_are_float64_tensors():
    for g in (G.bt3(), G.dice(), G.rps(), G.weighted_cycle(), G.nlhf3(), G.random_game(6, 0)):
        assert g.P.dtype == g.mu.dtype == F64 and g.P.shape == (len(g.mu),) * 2
        assert len(g.labels) == len(g.mu)


def test_bt3_matches_slides():
    P = G.bt3().P
    want = torch.tensor([[1 / 2, 1 / 10, 1 / 3],
                         [9 / 10, 1 / 2, 9 / 11],
                         [2 / 3, 2 / 11, 1 / 2]], dtype=F64)
    assert torch.allclose(P, want, atol=1e-15)
    condorcet = torch.tensor([0, 1, 0], dtype=F64)
    assert torch.allclose(solvers.nash(P), condorcet, atol=1e-12)
    pi_R, pi_P = torch.tensor([2 / 3, 1 / 3, 0], dtype=F64), torch.tensor([0, 0, 1.0], dtype=F64)
    assert abs(pi_P @ P @ pi_R - 50 / 99) < 1e-15                         # the slide's 50/99
    S = [torch.tensor([2 * a, a, 1 - 3 * a]) for a in torch.linspace(0, 1 / 3, 301)]
    S = torch.stack(S).to(F64)
    assert (S @ P @ S.T).min(1).values.argmax() == 0   # maximin over {(2a, a, 1 − 3a)} at (0, 0, 1)
    for tau, want in [(1, (.27234, .41712, .31054)), (.1, (.01671, .94356, .03973))]:
        want = torch.tensor(want, dtype=F64)
        assert torch.allclose(solvers.regularized_nash(P, MU_U, tau), want, atol=5e-6)


def test_known_nash_equilibria():
    assert torch.allclose(solvers.nash(G.rps().P), MU_U, atol=1e-12)
    dice = G.dice().P
    five_ninths = torch.full((3,), 5 / 9, dtype=F64)
    assert torch.allclose(dice[[0, 1, 2], [1, 2, 0]], five_ninths, atol=1e-15)
    assert torch.allclose(solvers.nash(dice), MU_U, atol=1e-12)
    for a, b, c in [(.1, .2, .3), (.3, .05, .2), (.45, .45, .01)]:
        want = torch.tensor([b, c, a], dtype=F64) / (a + b + c)
        assert torch.allclose(solvers.nash(G.weighted_cycle(a, b, c).P), want, atol=1e-12)
    for eps in (.1, -.1, .2):
        want = torch.tensor([1 / 3 + eps / 2, 1 / 3 + eps / 2, 1 / 3 - eps], dtype=F64)
        assert torch.allclose(solvers.nash(G.nlhf3(eps).P), want, atol=1e-12)
    faces = torch.arange(1, 10)                      # dice read as 9 faces: transitive, NE = 9
    P = (faces[:, None] > faces[None, :]).to(F64) + .5 * (faces[:, None] == faces[None, :])
    assert torch.allclose(solvers.nash(P), torch.eye(9, dtype=F64)[8])


def test_regularized_known_values():
    P = G.weighted_cycle().P
    want = torch.tensor([.31178, .34634, .34189], dtype=F64)
    assert torch.allclose(solvers.regularized_nash(P, MU_U, 1.0), want, atol=5e-6)
    want = torch.tensor([.24365, .47753, .27881], dtype=F64)
    assert torch.allclose(solvers.regularized_nash(P, MU_U, 0.1), want, atol=5e-6)
    for game in (G.rps(), G.dice()):       # symmetric + uniform μ: π*_τ is uniform for every τ
        for tau in (1, .1, .01):
            assert torch.allclose(solvers.regularized_nash(game.P, MU_U, tau), MU_U, atol=1e-10)


# -------------------------------------------------------------------------------------------------
# exact solvers and the gap

@pytest.mark.parametrize("n", [2, 3, 5, 8, 10, 14])
def test_nash_certified_on_random_games(n):
    for seed in range(15):
        P = G.random_game(n, seed).P
        pi = solvers.nash(P)
        assert pi.min() >= 0 and abs(pi.sum() - 1) < 1e-14
        assert duality_gap(P, pi) <= 1e-9
        assert (pi @ P).min() >= 0.5 - 1e-9             # at least 1/2 against every pure response


def test_nash_normalises_the_clipped_weights(monkeypatch):
    """Issue 8: nash() divided the clipped LP solution by the UNclipped sum. A negative round-off
    weight (exaggerated here to −1e-3) must be clipped before normalising, so that π is a certified
    distribution."""
    P = torch.full((4, 4), 1.0, dtype=F64)       # the cycle plus a 4th action that loses to all
    P[:3, :3], P[3] = G.weighted_cycle().P, torch.tensor([0, 0, 0, .5], dtype=F64)
    w = solvers._simplex_max(torch.ones(4, dtype=F64), P, torch.ones(4, dtype=F64))
    assert w[3] == 0
    w[3] = -1e-3
    monkeypatch.setattr(solvers, "_simplex_max", lambda c, A, b: w.clone())
    pi = solvers.nash(P)
    assert pi.min() >= 0 and abs(pi.sum() - 1) < 1e-15
    assert torch.allclose(pi, torch.tensor([1 / 3, 1 / 2, 1 / 6, 0], dtype=F64), atol=1e-12)


def test_regularized_nash_fixed_point_fast_and_certified():
    import time
    for n in (2, 3, 6, 10):
        for seed in range(4):
            game = G.random_game(n, seed)
            for tau in (1.0, 0.3, 0.1, 0.03, 0.01):
                t0 = time.perf_counter()
                pi = solvers.regularized_nash(game.P, game.mu, tau)
                assert time.perf_counter() - t0 < 0.5, "regularized_nash must be fast for small tau"
                assert duality_gap(game.P, pi, game.mu, tau) <= 1e-10
                br = best_response(game.P, pi, game.mu, tau)
                assert (br - pi).abs().max() < 1e-10
                assert J(game.P, game.mu, tau, pi, br) >= 0.5 - 1e-10   # its best reply is BR_τ(π*)


def test_newton_never_accepts_a_non_improving_step(monkeypatch):
    """Issue 8: the backtracking took its last, non-improving step when no step size helped. With
    a wrong Newton direction (the solver is sabotaged) Newton must leave z alone; regularized_nash
    then falls back to the damped iteration and still certifies."""
    game = G.random_game(4, 0)

    def resid(z):
        return (game.mu.log() + game.P @ z.softmax(-1) / 1.0 - z).abs().max()

    monkeypatch.setattr(torch.linalg, "solve", lambda J, b: -10 * b)    # uphill for every step size
    z0 = game.mu.log()
    z = solvers._newton(game.P, game.mu.log(), 1.0, z0.clone())
    assert resid(z) <= resid(z0) and torch.equal(z, z0)
    pi = solvers.regularized_nash(game.P, game.mu, 0.3)
    assert duality_gap(game.P, pi, game.mu, 0.3) <= 1e-10


def test_two_action_closed_form():
    p, mu = 0.8, torch.tensor([.3, .7], dtype=F64)
    P = torch.tensor([[.5, p], [1 - p, .5]], dtype=F64)
    for tau in (1, .1, .02):
        pi = solvers.regularized_nash(P, mu, tau)
        assert abs(math.log(pi[0] / pi[1]) - (math.log(mu[0] / mu[1]) + (p - .5) / tau)) < 1e-8


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_gap_formula_equals_brute_force(tau):
    game = G.random_game(3, 7)
    P, mu = game.P, game.mu
    grid = simplex_grid(400)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        pi = -torch.rand(3, generator=gen, dtype=F64).log()
        pi = pi / pi.sum()
        formula = duality_gap(P, pi, mu, tau)
        if tau == 0:                               # linear in each argument: vertices are exact
            E = torch.eye(3, dtype=F64)
            brute = max(J(P, mu, 0, e, pi) for e in E) - min(J(P, mu, 0, pi, e) for e in E)
            assert abs(brute - formula) < 1e-14
        else:
            best = J(P, mu, tau, grid, pi).max()                                 # max_π1 J(π1, π)
            worst = (pi @ P @ grid.T + tau * kl(grid, mu)).min() - tau * kl(pi, mu)   # min_π2
            assert best - worst <= formula + 1e-12 and formula - (best - worst) < 2e-3
            br = best_response(P, pi, mu, tau)     # the closed-form BR attains the max exactly
            assert abs(J(P, mu, tau, br, pi) - J(P, mu, tau, pi, br) - formula) < 1e-12


def test_gap_zero_at_ne_and_positive_elsewhere():
    P = G.weighted_cycle().P
    assert abs(duality_gap(P, torch.tensor([1 / 3, 1 / 2, 1 / 6], dtype=F64))) < 1e-15
    assert duality_gap(P, MU_U) > 0.01


def test_best_response_tau0_is_argmax():
    P = G.rps().P
    assert torch.equal(best_response(P, torch.tensor([1.0, 0, 0], dtype=F64), None, 0.0),
                       torch.tensor([0, 1.0, 0], dtype=F64))                      # paper beats rock
    assert torch.allclose(best_response(P, MU_U, None, 0.0), MU_U)             # all tie at the NE


def test_bt_reward_recovers_bt_scores():
    R = torch.tensor([0, math.log(9), math.log(2)], dtype=F64)
    assert torch.allclose(solvers.bt_reward(G.bt3().P, MU_S), R - R.mean(), atol=1e-10)


def test_duel_winner_is_a_distribution():
    game = G.random_game(7, 0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        pi = -torch.rand(7, generator=gen, dtype=F64).log()
        w = duel_winner(game.P, pi / pi.sum())
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-14


# -------------------------------------------------------------------------------------------------
# closed-form dynamics (regularised)

@pytest.mark.parametrize("tau", [1.0, 0.3, 0.1])
def test_nash_md_last_iterate_bound(tau):
    """NLHF Thm 1: with η_t = 2/(τ(t+2)), KL(π*_τ‖π_T) ≤ 8/(τ²(T+1)) at every T (three games at
    once)."""
    games = [G.random_game(6, seed) for seed in range(3)]
    P, mu = torch.stack([g.P for g in games]), torch.stack([g.mu for g in games])
    star = torch.stack([solvers.regularized_nash(g.P, g.mu, tau) for g in games])
    traj = steps(lambda z, t: G.nash_md(P, mu.log(), z, 2 / (tau * (t + 2)), tau), mu.log(), 300)
    bound = 8 / (tau ** 2 * (torch.arange(301, dtype=F64) + 1))
    assert (kl(star, traj)[1:] <= bound[1:, None]).all()
    assert (kl(star, traj[-1]) < 1e-3 * bound[-1]).all()           # and far below it in practice


def test_nash_md_first_step_is_best_response_to_mu():
    game, tau = G.random_game(5, 3), 0.2
    pi1 = G.nash_md(game.P, game.mu.log(), game.mu.log(), 1 / tau, tau).softmax(-1)
    assert torch.allclose(pi1, best_response(game.P, game.mu, game.mu, tau), atol=1e-14)


def test_constant_step_nash_md_is_biased_but_inpo_is_not():
    game, tau, eta = G.weighted_cycle(), 0.1, 1.0           # ητ = 0.1
    lm, star = game.mu.log(), solvers.regularized_nash(game.P, game.mu, tau)
    md = steps(lambda z, t: G.nash_md(game.P, lm, z, eta, tau), lm, 3000)[-1]
    inpo = steps(lambda z, t: G.inpo(game.P, lm, z, eta, tau), lm, 3000)[-1]
    assert (md - star).abs().max() > 1e-4                   # converged, but to the wrong point
    assert (inpo - star).abs().max() < 1e-12
    mix = geometric_mixture(md.log(), lm, eta * tau).exp()  # its mixture is the NE at τ/(1 − ητ)
    hotter = solvers.regularized_nash(game.P, game.mu, tau / (1 - eta * tau))
    assert (mix - hotter).abs().max() < 1e-9


def test_inpo_is_mmd_and_a_geometric_step_to_the_best_response():
    """MMD (Sokota et al. 2022), written out here:
    log π' = (log π + η'τ log μ + η' Pπ)/(1 + η'τ) + c, equals INPO with η = η'/(1 + η'τ), which
    equals π^{1−ητ} BR_τ(π)^{ητ}."""
    gen = torch.Generator().manual_seed(1)
    for seed in range(5):
        game = G.random_game(5, seed)
        pi = -torch.rand(5, generator=gen, dtype=F64).log()
        pi, lm = pi / pi.sum(), game.mu.log()
        u = torch.rand(2, generator=gen).tolist()
        tau, eta_p = 0.05 + 0.95 * u[0], 0.1 + 4.9 * u[1]
        mmd = (pi.log() + eta_p * tau * lm + eta_p * game.P @ pi) / (1 + eta_p * tau)
        mmd = torch.softmax(mmd, -1)
        eta = eta_p / (1 + eta_p * tau)
        inpo = G.inpo(game.P, lm, pi.log(), eta, tau).softmax(-1)
        br = best_response(game.P, pi, game.mu, tau)
        geo = geometric_mixture(pi.log(), br.log(), eta * tau).exp()
        assert (mmd - inpo).abs().max() < 1e-14 and (inpo - geo).abs().max() < 1e-14


def test_rlhf_is_inpo_with_a_fixed_reward_and_misses_the_ne():
    """BT-reward RLHF converges to μ e^{r/τ}, a transitive summary: far from π*_τ on RPS."""
    game, tau = G.rps(), 0.1
    r, lm = solvers.bt_reward(game.P, game.mu), game.mu.log()
    pi = steps(lambda z, t: G.inpo(game.P, lm, z, 1.0, tau, r), lm, 2000)[-1]
    assert torch.allclose(pi, torch.softmax(lm + r / tau, -1), atol=1e-12)
    assert duality_gap(game.P, pi, game.mu, tau) > 0.5


def test_fixed_beta_nash_md_pg_lands_on_ne_at_tau_over_1_minus_beta():
    tau, beta = 0.1, 0.25
    for game in (G.weighted_cycle(), G.random_game(5, 2)):
        lm = game.mu.log()
        pi = steps(lambda z, t: G.nash_md_pg(game.P, lm, z, 3.0, tau, beta), lm, 4000)[-1]
        mix = geometric_mixture(pi.log(), lm, beta).exp()
        hotter = solvers.regularized_nash(game.P, game.mu, tau / (1 - beta))
        assert (mix - hotter).abs().max() < 1e-7
        assert (pi - best_response(game.P, mix, game.mu, tau)).abs().max() < 1e-7
        star = solvers.regularized_nash(game.P, game.mu, tau)
        assert (pi - star).abs().max() > 5e-3                            # π itself is biased


def test_online_dpo_stationary_point_is_not_the_ne():
    """n = 2, p = .8, τ = .1: online DPO stops at log(π1/π2) = logit(p)/τ = 13.86, the NE is at 3.00
    (§7)."""
    p, tau = 0.8, 0.1
    P = torch.tensor([[.5, p], [1 - p, .5]], dtype=F64)
    lm = torch.full((2,), math.log(.5), dtype=F64)

    def drift(d):           # the expected step / (lr π1 π2): removes the vanishing factor
        z = torch.log_softmax(torch.tensor([d, 0.0], dtype=F64), -1)
        return (G.online_dpo(P, lm, z, 1.0, tau) - z) / z.exp().prod()

    d_dpo, d_ne = math.log(p / (1 - p)) / tau, (p - .5) / tau
    assert abs(d_dpo - 13.86) < 5e-3 and abs(d_ne - 3.0) < 1e-12
    assert drift(d_dpo).abs().max() < 1e-12
    assert drift(d_ne)[0] > 0.01                        # at the NE the DPO step still pushes π1 up
    pi = solvers.regularized_nash(P, lm.exp(), tau)
    assert abs(math.log(pi[0] / pi[1]) - d_ne) < 1e-9


# -------------------------------------------------------------------------------------------------
# closed-form dynamics (unregularised): last and average iterate, log space

def test_run_logs_the_running_average_of_the_policies():
    P, mu = G.rps().P, MU_S
    def step(z, t):
        return G.mwu(P, z, 0.1)

    its, pi, avg = solvers.run(step, mu.log(), 50, dense=50)
    traj = steps(step, mu.log(), 50)
    assert its.tolist() == list(range(51)) and torch.allclose(pi, traj, atol=1e-15)
    assert torch.allclose(avg, traj.cumsum(0) / torch.arange(1, 52, dtype=F64)[:, None], atol=1e-15)


def test_mwu_cycles_but_its_average_approaches_the_ne_on_rps():
    P, mu = G.rps().P, MU_S
    mwu = lambda z, t: G.maio(P, z, 0.1, z.exp())                      # noqa: E731
    its, pi, avg = solvers.run(mwu, mu.log(), 10_000, dense=5000)
    kls = kl(MU_U, pi[:5001:500])                                  # iterations 0, 500, …, 5000
    assert (kls[1:] > kls[:-1]).all() and abs(kls[-1] - 1.12) < 0.005     # spirals out (§8 G3)
    assert duality_gap(P, pi[-1]) > 0.5 and duality_gap(P, avg[-1]) < 1e-2


def test_lana_geometric_step_on_rps_last_and_average():
    """§5.2 reading: the last iterate stays at DualGap_0 ≈ 1 and the AVERAGE gets worse with time
    (the policy circles the pure strategies with growing dwell times): the paper's 'convergence on
    average' fails here. The printed sign's average does converge on RPS, its last iterate does
    not. The two readings are two plain runs, the sign an ordinary argument."""
    P, mu = G.rps().P, MU_S
    gap, gap_avg = [], []
    for sign in (1, -1):
        its, pi, avg = solvers.run(lambda z, t: G.lana_geo(P.log(), z, 0.5, sign), mu.log(), 30_000)
        gap.append(duality_gap(P, pi))
        gap_avg.append(duality_gap(P, avg))
    gap, gap_avg = torch.stack(gap, 1), torch.stack(gap_avg, 1)                 # (m, 2)
    at = {t: i for i, t in enumerate(its.tolist())}
    assert gap[-1, 0] > 0.99
    assert gap_avg[-1, 0] > gap_avg[at[10_000], 0] + 0.05 > 0.7                 # 0.78, then 0.93
    assert gap[-1, 1] > 0.1 and gap_avg[at[10_000], 1] < 2e-3 and gap_avg[-1, 1] < 2e-3


def test_lana_geometric_step_is_exact_in_log_space():
    """RPS's P has zeros, so π(y) reaches e^-700 (below float64's 1e-300) within ~150 steps. In log
    space the step stays exact: it matches a 60-digit Decimal reference, and a long run never
    produces a NaN."""
    P, mu, gamma = G.rps().P, MU_S, 0.5
    z = mu.log()
    for t in range(300):
        z = torch.log_softmax(G.lana_geo(P.log(), z, gamma), -1)
    getcontext().prec = 60
    Pd = [[Decimal(repr(x)) for x in row] for row in P.tolist()]              # 0, 1/2 and 1: exact
    pi = [Decimal(x) / 10 for x in (6, 3, 1)]
    for t in range(300):                                        # π' ∝ π (Pπ)^γ with γ = 1/2
        pi = [p * sum(Pd[i][j] * pi[j] for j in range(3)).sqrt() for i, p in enumerate(pi)]
        pi = [p / sum(pi) for p in pi]
    ref = torch.tensor([float(p.ln()) for p in pi], dtype=F64)
    assert ref.min() < -690                                     # exp() of it underflows in float64
    assert (z - ref).abs().max() < 1e-9
    _, last, avg = solvers.run(lambda z, t: G.lana_geo(P.log(), z, gamma), mu.log(), 100_000)
    assert torch.isfinite(last).all() and torch.isfinite(avg).all()
    assert (last.sum(-1) - 1).abs().max() < 1e-12


def test_lana_signs_on_bt3():
    """§5.2 reading: mass to the Condorcet winner y2; the printed sign: away from it (both tabular
    forms)."""
    P, lm = G.bt3().P, MU_S.log()
    geometric = partial(G.lana_geo, P.log(), gamma=0.5)
    expected = partial(G.lana, P, lr=0.5)
    for step in (lambda z, s: geometric(z, sign=s), lambda z, s: expected(z, sign=s)):
        good = steps(lambda z, t: step(z, 1), lm, 200)[:, 1]
        bad = steps(lambda z, t: step(z, -1), lm, 200)[:, 1]
        assert good[-1] > 0.99 and (good.diff() >= 0).all() and good[1] > good[0]
        assert bad[-1] < 0.01 and (bad.diff() <= 0).all() and bad[1] < bad[0]


def test_maio_pg_converges_in_the_last_iterate_where_lana_does_not():
    """Same opponent (the duel winner), payoff P(y ≻ ỹ) instead of LANA's log-ratio: MAIO-PG's last
    iterate reaches the NE on the cyclic games; LANA's expected step (same lr) does not."""
    for game in (G.rps(), G.weighted_cycle(), G.nlhf3()):
        P, lm = game.P, game.mu.log()
        _, pi, _ = solvers.run(lambda z, t: G.maio_pg(P, z, 1.0), lm, 5000)
        _, pi_lana, _ = solvers.run(lambda z, t: G.lana(P, z, 1.0), lm, 5000)
        assert duality_gap(P, pi[-1]) < 1e-10 and duality_gap(P, pi_lana[-1]) > 0.1


# -------------------------------------------------------------------------------------------------
# SPPO: its tabular step, against MWU's

def random_policy(n, gen):
    p = -torch.rand(n, generator=gen, dtype=F64).log()
    return p / p.sum()


def population_sppo_loss(P, pi_t, logits, eta):
    """E_{y~π_t} ½ (log π(y) − log π_t(y) − η (P(y ≻ π_t) − ½))², written out independently."""
    p = P @ pi_t
    r = torch.log_softmax(logits, -1) - pi_t.log() - eta * (p - 0.5)
    return (pi_t * 0.5 * r ** 2).sum()


def test_sppo_solves_its_optimality_conditions():
    """games.sppo's logits are normalised and zero the gradient of the population loss, for η from
    0.01 to 100 (win-rate weights a = e^{η (p − ½)} up to e^{±50}); a batch of rows is solved as
    each row alone."""
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 6, 10):
        for seed in range(4):
            P = G.random_game(n, seed).P
            pi_t = random_policy(n, gen)
            for eta in (0.01, 0.1, 1.0, 10.0, 100.0):
                z = G.sppo(P, pi_t.log(), eta)
                assert abs(z.exp().sum() - 1) < 1e-12
                w = z.clone().requires_grad_()
                (grad,) = torch.autograd.grad(population_sppo_loss(P, pi_t, w, eta), w)
                assert grad.abs().max() < 1e-12 * max(1.0, eta)
    games = [G.random_game(4, s) for s in range(3)]
    P = torch.stack([g.P for g in games])
    z = torch.stack([random_policy(4, gen) for _ in games]).log()
    rows = torch.stack([G.sppo(P[k], z[k], 3.0) for k in range(3)])
    assert (G.sppo(P, z, 3.0) - rows).abs().max() < 1e-12


def test_sppo_is_mwu_damped_at_third_order_in_eta():
    """SPPO's step is not MWU's: log π_sppo − log π_mwu falls with p = P(y ≻ π_t) (SPPO gives the
    winners less than MWU does), by O(η³); from μ on the six games the largest gap in log π is about
    5e-6 at η = 0.1, 4e-3 at η = 1 and 1.4 at η = 10 (python games.py prints these). The two steps
    are equal where Σ π_t e^{η (p − ½)} = 1: wherever p is the same on π_t's support, e.g. at an
    interior NE."""
    gen = torch.Generator().manual_seed(1)
    for seed in range(5):
        P = G.random_game(5, seed).P
        pi_t = random_policy(5, gen)
        p = P @ pi_t
        for eta in (0.1, 1.0, 10.0):
            sppo = G.sppo(P, pi_t.log(), eta).log_softmax(-1)
            gap = sppo - G.mwu(P, pi_t.log(), eta).log_softmax(-1)
            order = p.argsort()
            assert (gap[order].diff() < 0).all()                 # falls with the win rate
            assert gap[p.argmax()] < 0 < gap[p.argmin()]
    games = [G.bt3(), G.dice(), G.rps(), G.weighted_cycle(), G.nlhf3(), G.random_game(6, 0)]
    largest = {}
    for eta in (0.1, 1.0, 10.0):
        gaps = []
        for g in games:
            sppo = G.sppo(g.P, g.mu.log(), eta).log_softmax(-1)
            mwu = G.mwu(g.P, g.mu.log(), eta).log_softmax(-1)
            gaps.append((sppo - mwu).abs().max())
        largest[eta] = max(gaps)
    assert 1e-6 < largest[0.1] < 1e-5 and 1e-3 < largest[1.0] < 1e-2 and largest[10.0] > 1
    assert 500 < largest[1.0] / largest[0.1] < 2000                                  # ~ η³
    for game in (G.weighted_cycle(), G.dice()):
        ne = solvers.nash(game.P)
        for eta in (0.1, 10.0):
            assert (G.sppo(game.P, ne.log(), eta).softmax(-1) - ne).abs().max() < 1e-13
            assert (G.mwu(game.P, ne.log(), eta).softmax(-1) - ne).abs().max() < 1e-13


def test_sppo_cycles_like_mwu_on_rps_and_its_average_approaches_the_ne():
    P, mu = G.rps().P, MU_S
    its, pi, avg = solvers.run(lambda z, t: G.sppo(P, z, 0.1), mu.log(), 10_000)
    assert duality_gap(P, pi[-1]) > 0.5 and duality_gap(P, avg[-1]) < 1e-2


# -------------------------------------------------------------------------------------------------
# sampled runs: a softmax table trained with the nano_nash losses follows the closed forms

def test_sampled_inpo_follows_the_closed_form_and_reaches_a_small_gap():
    game, tau = G.rps(), 0.1                              # μ = (.6, .3, .1): π*_τ is not uniform
    P, mu = game.P[None], game.mu[None]
    gen = torch.Generator().manual_seed(0)
    batch = partial(G.inpo_batch, P, gen, 4096, mu.log(), 0.1 / tau, tau)
    _, traj, _ = solvers.run(G.sgd(batch, 1.0, 10), mu.log(), 40, dense=40)
    closed_form = partial(G.inpo, P, mu.log(), eta=0.1 / tau, tau=tau)
    _, closed, _ = solvers.run(lambda z, t: closed_form(z=z), mu.log(), 40, dense=40)
    assert duality_gap(P, traj[0], mu, tau) > 0.1 and duality_gap(P, traj[-1], mu, tau) < 1e-2
    assert (traj - closed).abs().max() < 0.05


def _one_sgd_step(batch_loss, P, z0, lr, B=200_000, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return G.sgd(lambda logp, prev: batch_loss(P, gen, B, logp, prev), lr)(z0, 0).softmax(-1)


def test_sampled_steps_match_the_expected_steps():
    """One SGD step with a huge batch ≈ the closed-form expected step (same lr), from a non-trivial
    π."""
    game = G.weighted_cycle()
    P, lm = game.P[None], game.mu.log()[None]
    for sign in (1, -1):
        def lana_batch(P, gen, B, lp, prev):
            return G.lana_batch(P, gen, B, sign, lp, prev)

        got = _one_sgd_step(lana_batch, P, lm, 2.0)
        want = G.lana(P, lm, 2.0, sign).softmax(-1)
        assert (got - want).abs().max() < 5e-3
        assert torch.sign(got[0, 1] - game.mu[1]) == torch.sign(want[0, 1] - game.mu[1]) != 0
    got = _one_sgd_step(G.maio_pg_batch, P, lm, 2.0)
    assert (got - G.maio_pg(P, lm, 2.0).softmax(-1)).abs().max() < 5e-3

    def nash_md_pg_batch(P, gen, B, logp, prev):     # Nash-MD-PG: y ~ π against y' ~ π^{1−β} μ^β
        y = torch.multinomial(prev.exp(), B, True, generator=gen)
        y2 = torch.multinomial(geometric_mixture(prev, lm, 0.25).exp(), B, True, generator=gen)
        pref = G.judge(P, y, y2, gen).flatten().to(F64)
        return pg_loss(G.at(logp, y), pref, G.at(lm, y), tau=0.1)[0]
    got = _one_sgd_step(nash_md_pg_batch, P, lm, 3.0)
    assert (got - G.nash_md_pg(P, lm, lm, 3.0, 0.1, 0.25).softmax(-1)).abs().max() < 5e-3


def test_noisy_judge_is_the_oracle_of_p_eps():
    P = G.bt3().P[None]
    gen = torch.Generator().manual_seed(0)
    y, y2 = torch.full((1, 100_000), 1), torch.full((1, 100_000), 0)
    assert abs(G.judge(P, y, y2, gen).double().mean() - 0.9) < 5e-3
    assert abs(G.judge(0.2 + 0.6 * P, y, y2, gen).double().mean() - (0.2 + 0.6 * 0.9)) < 5e-3


def test_sampled_sppo_follows_its_tabular_step_not_mwus():
    """SPPO's loss on a softmax table, y ~ π_t and P̂ from 8 judged samples of π_t, 30 SGD steps per
    iteration: over 12 seeds the mean table after 8 iterations is within a few standard errors of
    games.sppo's, and (at η = 1, where the two differ by 6e-3) farther from MWU's."""
    games = [G.bt3(), G.dice(), G.rps(), G.weighted_cycle(), G.nlhf3()]
    P = torch.stack([g.P for g in games])
    mu = torch.stack([g.mu for g in games])
    eta, T = 1.0, 8
    finals = []
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        step = G.sgd(partial(G.sppo_batch, P, gen, 512, eta), 1.5, 30)
        finals.append(solvers.run(step, mu.log(), T)[1][-1])
    finals = torch.stack(finals)
    mean = finals.mean(0)
    se = finals.std(0) / 12 ** 0.5
    sppo = solvers.run(lambda z, t: G.sppo(P, z, eta), mu.log(), T)[1][-1]
    mwu = solvers.run(lambda z, t: G.mwu(P, z, eta), mu.log(), T)[1][-1]
    assert ((mean - sppo) / se).abs().max() < 4.5
    assert ((mean - mwu) / se).abs().max() > 5
    assert ((sppo - mu) / se).abs().max() > 50                          # and it moved


# -------------------------------------------------------------------------------------------------
# the registry, reference curves for train_lm.py, one style table, the script

def test_registry_entries_are_built_by_keyword_and_lana_readings_are_plain_entries():
    g = G.rps()
    registry = G.closed_forms(g.P[None], g.mu[None], G.GameConfig(), eta=1.0)
    assert {"lana", "lana_printed", "lana_geo", "lana_geo_printed", "sppo"} <= set(registry)
    for d in registry.values():
        assert d.algo == d.name and not d.sampled
        _, pi, _ = solvers.run(d.step, g.mu.log()[None], 3)
        assert pi.shape == (4, 1, 3)                                    # no hidden batch dimension
    with pytest.raises(TypeError):
        G.Dynamic("inpo", "inpo", None, 1, 0.1, "")                     # keywords only


def test_reference_curves_for_train_lm():
    games = [G.rps(), G.dice(), G.weighted_cycle(), G.nlhf3()]
    P = torch.stack([g.P for g in games])
    gen = torch.Generator().manual_seed(0)
    mu = torch.softmax(torch.randn(4, 3, generator=gen, dtype=F64), -1)
    sizes = dict(tau=0.1, eta=1.0, beta=0.125, lr=3.0, steps=300)
    names = ["inpo", "nash_md_pg", "lana", "lana_printed", "maio_pg", "sppo"]
    each = dict.fromkeys(names, 1)
    curves = G.reference_curves(P, mu, each, **sizes)
    assert list(curves) == ["inpo", "nash_md_pg", "lana", "lana_printed", "maio_pg", "sppo"]
    assert all(x.shape == gap.shape == (301,) for x, gap in curves.values())
    gap = {name: g for name, (_, g) in curves.items()}
    start_tau = duality_gap(P, mu, mu, 0.1).mean()
    assert abs(gap["inpo"][0] - start_tau) < 1e-15
    assert abs(gap["lana"][0] - duality_gap(P, mu).mean()) < 1e-15
    assert gap["inpo"][-1] < start_tau / 100 and gap["maio_pg"][-1] < gap["lana"][-1] / 5
    avg = G.reference_curves(P.numpy(), mu.numpy(), each, **sizes, average=True)
    assert abs(avg["lana"][1][0] - gap["lana"][0]) < 1e-15
    assert abs(avg["lana"][1][-1] - gap["lana"][-1]) > 1e-3
    every5 = G.reference_curves(P, mu, each | {"inpo": 5, "sppo": 5}, **sizes)   # π_t every 5
    for name in ("inpo", "sppo"):
        x, y = every5[name]
        assert x.tolist() == list(range(0, 301, 5))
        assert abs(y[2] - gap[name][2]) < 1e-15                      # iteration 2, at step 10
    assert every5["lana"][0].tolist() == list(range(301))


def test_one_style_per_name_distinct_in_each_family():
    g = G.rps()
    registry = G.closed_forms(g.P[None], g.mu[None], G.GameConfig(), eta=1.0)
    regularised = [d.name for d in registry.values() if d.tau > 0]
    unregularised = [d.name for d in registry.values() if d.tau == 0]
    trainer = ["inpo", "nash_md_pg", "lana", "lana_printed", "maio_pg", "sppo"]
    names = regularised + unregularised
    assert set(names + trainer + ["maio_pg_self"]) == set(plots.STYLE)
    assert plots.STYLE["maio_pg_self"] == plots.STYLE["maio_pg"]
    assert len({plots.STYLE[a][0] for a in names}) == len(names)      # one colour per algorithm
    for family in (regularised, unregularised, trainer):
        assert len({str(plots.STYLE[a][1]) for a in family}) == len(family)
        rgb = [matplotlib.colors.to_rgb(plots.STYLE[a][0]) for a in family]
        for a, b in itertools.combinations(rgb, 2):          # gold vs orange (0.2) is too close
            assert math.dist(a, b) > 0.25


def check_styles(monkeypatch):
    """Saving a figure instead checks it: every Line2D with a gid (an algorithm) has STYLE's colour
    and dash (or, for a sampled run, no line and a judge's marker) and a legend entry. Returns the
    (file name, gid, label, marker) of every line checked."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    seen = []

    def inspect(fig, path, **kw):
        legends = fig.legends + [ax.get_legend() for ax in fig.axes]
        entries = {t.get_text() for lg in legends if lg for t in lg.get_texts()}
        for ax in fig.axes:
            for line in ax.get_lines():
                algo = line.get_gid()
                if algo is None:                       # the triangle, a target, μ
                    continue
                colour, dash = plots.STYLE[algo]
                assert matplotlib.colors.to_hex(line.get_color()) == colour
                if line.get_linestyle() == "None":
                    assert line.get_marker() in plots.MARKERS.values()
                else:
                    want = Line2D([], [], ls=dash)._unscaled_dash_pattern
                    assert line._unscaled_dash_pattern == want, (algo, path)
                assert line.get_label() in entries
                seen.append((Path(path).name, algo, line.get_label(), line.get_marker()))

    monkeypatch.setattr(Figure, "savefig", inspect)
    return seen


def test_every_figure_draws_each_algorithm_in_its_style(monkeypatch, tmp_path):
    seen = check_styles(monkeypatch)
    cfg = G.GameConfig(iters=64, horizon=640, sgd_steps=64)
    games = [G.bt3(), G.dice(), G.rps(), G.weighted_cycle(), G.nlhf3(), G.random_game(6, 0)]
    written = report.figures(cfg, games, G.experiments(cfg, games), tmp_path)
    assert written == ["games_main.png", "games_regularised.png", "games_last.png",
                       "games_average.png"]
    assert {f for f, *_ in seen} == set(written)
    markers = {(algo, marker) for _, algo, label, marker in seen if "sampled" in label}
    assert markers == {("inpo", "o"), ("inpo", "^"), ("maio_pg", "o"), ("lana", "o"),
                       ("lana_printed", "o"), ("sppo", "o")}
    drawn = {algo for _, algo, *_ in seen}
    assert drawn == set(plots.STYLE) - {"maio_greedy", "maio_soft", "maio_extragrad",
                                        "maio_pg_self"}

    def records(key, judged=False):
        recs = [{"step": 10 * i, key: 0.5 / (i + 1), "avg_" + key: 0.4 / (i + 1)} for i in range(5)]
        for r in recs:
            r["gap"] = r[key]
            if judged:
                r["judge_err"] = 0.05
        return recs

    algos = ["inpo", "nash_md_pg", "lana", "lana_printed", "maio_pg", "sppo", "maio_pg_self"]
    runs = {a: ("gap" if a in ("inpo", "nash_md_pg") else "gap0", records("gap0")) for a in algos}
    closed = {a: ([0, 10, 20], [0.5, 0.2, 0.1]) for a in algos[:-1]}
    plots.lm_convergence(runs, tmp_path / "lm.png", closed)
    lm = [(algo, label) for f, algo, label, _ in seen if f == "lm.png"]
    assert sorted(lm) == sorted([(a, f"{a} ({'DualGap_τ' if k == 'gap' else 'DualGap_0'})")
                                 for a, (k, _) in runs.items()] + [(a, a) for a in closed])

    judges = {"lana_oracle": ("lana", "oracle"), "lana_self": ("lana", "self"),
              "lana_noisy": ("lana", "noisy"), "maio_pg_self": ("maio_pg_self", "self"),
              "maio_pg": ("maio_pg", "base"), "inpo": ("inpo", "base")}
    runs = {name: (algo, judge, "gap" if algo == "inpo" else "gap0",
                   records("gap" if algo == "inpo" else "gap0", judge in ("self", "noisy")))
            for name, (algo, judge) in judges.items()}
    plots.self_judge(runs, tmp_path / "self_judge.png")
    judged = [(label, algo, marker) for f, algo, label, marker in seen if f == "self_judge.png"]
    assert len(judged) == 5 * 2 + 1 + 3      # DualGap_0 (last, average), DualGap_τ, judge errors
    for label, algo, marker in judged:
        name = label.split(" ")[0]
        assert (algo, marker) == (judges[name][0], plots.MARKERS[judges[name][1]])


def test_lm_convergence_lets_a_write_error_propagate(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError):
        plots.lm_convergence({"inpo": ("gap", [{"step": 0, "gap": 0.1}])}, blocked / "plot.png")


def test_plots_imports_neither_games_nor_runs():
    source = (ROOT / "plots.py").read_text()
    assert "import games" not in source and "from games" not in source
    assert "import runs" not in source and "from runs" not in source


def test_log_iters():
    its = solvers.log_iters(1000)
    assert its[0] == 0 and its[-1] == 1000 and its == sorted(set(its)) and len(its) > 20


def test_the_command_line_from_the_dataclass():
    cfg = config("--game", "rps", "--iters", "7", "--smoke", "--tau", "0.5")
    assert (cfg.game, cfg.iters, cfg.smoke, cfg.tau, cfg.seed) == ("rps", 7, True, 0.5, 0)
    assert config("--no-smoke").smoke is False and config() == G.GameConfig()
    with pytest.raises(UserError, match="unknown --game .nope.; choose all or bt3"):
        G.main(G.GameConfig(game="nope", out="/nonexistent"))


@pytest.mark.parametrize("game", ["bt3", "dice", "rps", "cycle", "nlhf3", "random"])
def test_every_game_runs(game, tmp_path):
    """Issue 8: `--game random` crashed (the simplex panel got a 6-action game). Every --game value
    runs."""
    G.main(config("--smoke", "--game", game, "--out", str(tmp_path)))
    rows = list(csv.DictReader(open(tmp_path / "games_curves.csv")))
    assert {r["game"] for r in rows} == {game}
    assert (tmp_path / "games_main.png").stat().st_size > 10_000


def test_smoke_run_writes_its_files(tmp_path):
    """... in out/smoke: a smoke run leaves figures/ (the committed results) alone."""
    r = subprocess.run([sys.executable, str(ROOT / "games.py"), "--smoke"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "smoke"
    assert (out / "games_main.png").stat().st_size > 10_000 and not (tmp_path / "figures").exists()
    rows = list(csv.DictReader(open(out / "games_curves.csv")))
    assert {r["game"] for r in rows} == {"bt3", "dice", "rps", "cycle", "nlhf3", "random"}
    lengths = [("nash_md", 64), ("inpo", 64), ("mwu", 64), ("sppo", 64), ("lana_printed", 640),
               ("maio_pg", 64)]
    for algo, T in lengths:
        its = [int(r["iter"]) for r in rows if r["game"] == "rps" and r["algorithm"] == algo and
               r["iterate"] == "average"]
        assert its == solvers.log_iters(T)                      # the smoke setting reached the loop
    assert "| lana_geo | DualGap_0 | 640 |" in r.stdout and "rps last | rps avg" in r.stdout
    assert "| 0.1 |" in r.stdout and "| 10 |" in r.stdout          # SPPO against MWU
