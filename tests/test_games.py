"""Tests for games.py: known answers, exact tools, closed-form dynamics, sampled runs, the smoke run."""
import csv
import itertools
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import games as G  # noqa: E402

MU_U = np.ones(3) / 3
MU_S = np.array([.6, .3, .1])


def J(P, mu, tau, p1, p2):
    """J_τ(π1, π2) = π1ᵀPπ2 − τKL(π1‖μ) + τKL(π2‖μ), written out independently of games.py."""
    return p1 @ P @ p2 - tau * G.kl(p1, mu) + tau * G.kl(p2, mu)


def kl_rows(X, mu):
    """KL(x‖μ) for every row x of X, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(X > 0, X * np.log(X / mu), 0.0).sum(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: extra threads only contend with each other on a small, shared CPU."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def simplex_grid(k):
    """All points (i, j, k-i-j)/k of the 3-simplex."""
    return np.array([(i, j, k - i - j) for i in range(k + 1) for j in range(k + 1 - i)], dtype=float) / k


# ---------------------------------------------------------------------------------------------------------------------
# games and validation

@pytest.mark.parametrize("P, msg", [
    (np.full((2, 3), .5), "square"),
    ([[.5, 1.2], [-.2, .5]], r"\[0, 1\]"),
    ([[.5, .7], [.4, .5]], "P \\+ P.T"),
    ([[.4, .5], [.5, .6]], "P \\+ P.T"),
    ([[.5, np.nan], [np.nan, .5]], r"\[0, 1\]"),
])
def test_invalid_games_raise(P, msg):
    with pytest.raises(ValueError, match=msg):
        G.check_preference(P)
    with pytest.raises(ValueError):
        G.Game("bad", P, np.ones(len(np.atleast_2d(P))) / len(np.atleast_2d(P)))


def test_invalid_mu_raises():
    with pytest.raises(ValueError, match="mu"):
        G.Game("rps", G.rps().P, [.5, .5, 0.0])
    with pytest.raises(ValueError, match="mu"):
        G.Game("rps", G.rps().P, [.5, .5])


def test_bt3_matches_slides():
    P = G.bt3().P
    assert np.allclose(P, [[1 / 2, 1 / 10, 1 / 3], [9 / 10, 1 / 2, 9 / 11], [2 / 3, 2 / 11, 1 / 2]], atol=1e-15)
    assert np.allclose(G.nash(P), [0, 1, 0], atol=1e-12)          # y2 is a Condorcet winner
    pi_R, pi_P = np.array([2 / 3, 1 / 3, 0]), np.array([0, 0, 1.0])
    assert abs(pi_P @ P @ pi_R - 50 / 99) < 1e-15                   # the slide's 50/99
    # on S = {(2a, a, 1-3a)} the maximin preference is attained at a = 0, i.e. (0, 0, 1)
    S = np.array([(2 * a, a, 1 - 3 * a) for a in np.linspace(0, 1 / 3, 301)])
    worst = (S @ P @ S.T).min(axis=1)
    assert np.argmax(worst) == 0
    for tau, want in [(1, (.27234, .41712, .31054)), (.1, (.01671, .94356, .03973))]:
        assert np.allclose(G.regularized_nash(P, MU_U, tau), want, atol=5e-6)


def test_known_nash_equilibria():
    assert np.allclose(G.nash(G.rps().P), MU_U, atol=1e-12)
    assert np.allclose(G.dice().P[[0, 1, 2], [1, 2, 0]], 5 / 9)
    assert np.allclose(G.nash(G.dice().P), MU_U, atol=1e-12)
    for a, b, c in [(.1, .2, .3), (.3, .05, .2), (.45, .45, .01)]:
        want = np.array([b, c, a]) / (a + b + c)
        assert np.allclose(G.nash(G.weighted_cycle(a, b, c).P), want, atol=1e-12)
    for eps in (.1, -.1, .2):
        want = np.array([1 / 3 + eps / 2, 1 / 3 + eps / 2, 1 / 3 - eps])
        assert np.allclose(G.nash(G.nlhf3(eps).P), want, atol=1e-12)
    # dice read as 9 faces: transitive, NE = the best face
    faces = np.arange(1, 10)
    P = (faces[:, None] > faces[None, :]) + .5 * (faces[:, None] == faces[None, :])
    assert np.allclose(G.nash(P), np.eye(9)[8])


def test_regularized_known_values():
    P = G.weighted_cycle().P
    assert np.allclose(G.regularized_nash(P, MU_U, 1.0), [.31178, .34634, .34189], atol=5e-6)
    assert np.allclose(G.regularized_nash(P, MU_U, 0.1), [.24365, .47753, .27881], atol=5e-6)
    for game in (G.rps(), G.dice()):                    # symmetric games + uniform μ: π*_τ uniform for every τ
        for tau in (1, .1, .01):
            assert np.allclose(G.regularized_nash(game.P, MU_U, tau), MU_U, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# exact tools

@pytest.mark.parametrize("n", [2, 3, 5, 8, 10, 14])
def test_nash_certified_on_random_games(n):
    for seed in range(15):
        P = G.random_game(n, seed).P
        pi = G.nash(P)
        assert pi.min() >= 0 and abs(pi.sum() - 1) < 1e-12
        assert G.duality_gap(P, pi) <= 1e-9
        assert (pi @ P).min() >= 0.5 - 1e-9             # guarantees at least 1/2 against every pure response


def test_regularized_nash_fixed_point_fast_and_certified():
    for n in (2, 3, 6, 10):
        for seed in range(4):
            game = G.random_game(n, seed)
            for tau in (1.0, 0.3, 0.1, 0.03, 0.01):
                t0 = time.perf_counter()
                pi = G.regularized_nash(game.P, game.mu, tau)
                assert time.perf_counter() - t0 < 0.5, "regularized_nash must be fast for small tau"
                assert G.duality_gap(game.P, pi, game.mu, tau) <= 1e-10
                assert np.abs(G.best_response(game.P, pi, game.mu, tau) - pi).max() < 1e-10
                # J_τ(π*, p) ≥ 1/2 for every p: the min-player's best response is BR_τ(π*) itself
                br = G.best_response(game.P, pi, game.mu, tau)
                assert J(game.P, game.mu, tau, pi, br) >= 0.5 - 1e-10


def test_two_action_closed_form():
    p, mu = 0.8, np.array([.3, .7])
    P = np.array([[.5, p], [1 - p, .5]])
    for tau in (1, .1, .02):
        pi = G.regularized_nash(P, mu, tau)
        assert abs(math.log(pi[0] / pi[1]) - (math.log(mu[0] / mu[1]) + (p - .5) / tau)) < 1e-8


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_gap_formula_equals_brute_force(tau):
    game = G.random_game(3, 7)
    P, mu = game.P, game.mu
    grid = simplex_grid(400)
    rng = np.random.default_rng(0)
    for pi in rng.dirichlet(np.ones(3), size=4):
        formula = G.duality_gap(P, pi, mu, tau)
        if tau == 0:                                     # linear in each argument: vertices are exact
            brute = max(J(P, mu, 0, e, pi) for e in np.eye(3)) - min(J(P, mu, 0, pi, e) for e in np.eye(3))
            assert abs(brute - formula) < 1e-14
        else:
            best = (grid @ P @ pi - tau * kl_rows(grid, mu)).max() + tau * G.kl(pi, mu)       # max_π1 J(π1, π)
            worst = (pi @ P @ grid.T + tau * kl_rows(grid, mu)).min() - tau * G.kl(pi, mu)    # min_π2 J(π, π2)
            brute = best - worst
            assert brute <= formula + 1e-12 and formula - brute < 2e-3
            br = G.best_response(P, pi, mu, tau)          # the closed-form BR attains the max exactly
            assert abs(J(P, mu, tau, br, pi) - J(P, mu, tau, pi, br) - formula) < 1e-12


def test_gap_zero_at_ne_and_positive_elsewhere():
    game = G.weighted_cycle()
    assert abs(G.duality_gap(game.P, np.array([1 / 3, 1 / 2, 1 / 6]))) < 1e-15
    assert G.duality_gap(game.P, MU_U) > 0.01


def test_best_response_tau0_is_argmax():
    P = G.rps().P
    assert np.allclose(G.best_response(P, np.array([1.0, 0, 0])), [0, 1, 0])   # paper beats rock
    assert np.allclose(G.best_response(P, MU_U), MU_U)                          # all tie at the NE


def test_bt_reward_recovers_bt_scores():
    R = np.array([0, math.log(9), math.log(2)])
    assert np.allclose(G.bt_reward(G.bt3().P, MU_S), R - R.mean(), atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# closed-form dynamics

@pytest.mark.parametrize("tau", [1.0, 0.3, 0.1])
def test_nash_md_last_iterate_bound(tau):
    """NLHF Thm 1: with η_t = 2/(τ(t+2)), KL(π*_τ‖π_T) ≤ 8/(τ²(T+1)) at every T."""
    for seed in range(3):
        game = G.random_game(6, seed)
        star = G.regularized_nash(game.P, game.mu, tau)
        pi = game.mu
        for T in range(1, 301):
            pi = G.nash_md_step(game.P, game.mu, pi, 2 / (tau * (T + 1)), tau)     # step t = T-1
            assert G.kl(star, pi) <= 8 / (tau**2 * (T + 1))
        assert G.kl(star, pi) < 1e-3 * 8 / (tau**2 * 301)   # and far below it in practice


def test_nash_md_first_step_is_best_response_to_mu():
    game, tau = G.random_game(5, 3), 0.2
    pi1 = G.nash_md_step(game.P, game.mu, game.mu, 1 / tau, tau)
    assert np.allclose(pi1, G.best_response(game.P, game.mu, game.mu, tau), atol=1e-14)


def test_constant_step_nash_md_is_biased_but_omd_is_not():
    game, tau, eta = G.weighted_cycle(), 0.1, 1.0          # ητ = 0.1
    star = G.regularized_nash(game.P, game.mu, tau)
    md = G.run(lambda pi, t: G.nash_md_step(game.P, game.mu, pi, eta, tau), game.mu, 3000)[-1]
    omd = G.run(lambda pi, t: G.omd_step(game.P, game.mu, pi, eta, tau), game.mu, 3000)[-1]
    assert np.abs(md - star).max() > 1e-4                   # converged, but to the wrong point
    assert np.abs(omd - star).max() < 1e-12
    mix = G.geo_mix(md, game.mu, eta * tau)                 # its mixture is the NE at τ/(1 − ητ)
    assert np.abs(mix - G.regularized_nash(game.P, game.mu, tau / (1 - eta * tau))).max() < 1e-9


def test_mmd_equals_omd_and_geometric_step_to_br():
    rng = np.random.default_rng(1)
    for seed in range(5):
        game = G.random_game(5, seed)
        pi, tau, eta_p = rng.dirichlet(np.ones(5)), rng.uniform(.05, 1), rng.uniform(.1, 5)
        eta = eta_p / (1 + eta_p * tau)
        a = G.mmd_step(game.P, game.mu, pi, eta_p, tau)
        b = G.omd_step(game.P, game.mu, pi, eta, tau)
        c = G.geo_mix(pi, G.best_response(game.P, pi, game.mu, tau), eta * tau)
        assert np.abs(a - b).max() < 1e-14 and np.abs(b - c).max() < 1e-14


def test_mwu_self_play_spirals_out_on_rps():
    P, u = G.rps().P, MU_U
    traj = G.run(lambda pi, t: G.mwu_step(P, pi, 0.1), MU_S, 5000)
    kls = [G.kl(u, p) for p in traj[::500]]
    assert all(b > a for a, b in zip(kls, kls[1:]))        # moves away from the NE, monotonically
    assert abs(G.kl(u, traj[5000]) - 1.12) < 0.005          # ALGORITHMS §8 G3


def test_fixed_beta_nash_md_pg_lands_on_ne_at_tau_over_1_minus_beta():
    tau, beta = 0.1, 0.25
    for game in (G.weighted_cycle(), G.random_game(5, 2)):
        pi = G.run(lambda p, t: G.nash_md_pg_step(game.P, game.mu, p, 3.0, tau, beta), game.mu, 4000)[-1]
        mix = G.geo_mix(pi, game.mu, beta)
        assert np.abs(mix - G.regularized_nash(game.P, game.mu, tau / (1 - beta))).max() < 1e-7
        assert np.abs(pi - G.best_response(game.P, mix, game.mu, tau)).max() < 1e-7
        assert np.abs(pi - G.regularized_nash(game.P, game.mu, tau)).max() > 5e-3   # π itself is biased


def test_online_dpo_stationary_point_is_not_the_ne():
    """n = 2, p = .8, β = τ = .1: online DPO stops at log(π1/π2) = logit(p)/β = 13.86, the NE is at 3.00 (§7)."""
    p, beta = 0.8, 0.1
    P, mu = np.array([[.5, p], [1 - p, .5]]), np.array([.5, .5])

    def grad_per_pair(d):                                 # expected gradient / (π1 π2): removes the vanishing factor
        z = np.array([d, 0.0])
        pi = G.softmax(z)
        return G.online_dpo_grad(P, mu, z, beta) / (pi[0] * pi[1])

    d_dpo, d_ne = math.log(p / (1 - p)) / beta, (p - .5) / 0.1
    assert abs(d_dpo - 13.86) < 5e-3 and abs(d_ne - 3.0) < 1e-12
    assert np.abs(grad_per_pair(d_dpo)).max() < 1e-12
    assert grad_per_pair(d_ne)[0] < -0.01                 # at the NE the DPO gradient still pushes π1 up
    pi = G.regularized_nash(P, mu, 0.1)
    assert abs(math.log(pi[0] / pi[1]) - d_ne) < 1e-9


def test_lana_signs_on_bt3():
    """§5.2 reading moves mass to the Condorcet winner y2; the printed sign moves it away (both tabular forms)."""
    P, mu = G.bt3().P, MU_S
    for step in (G.lana_step, lambda P, pi, g, s=False: G.lana_sgd_step(P, pi, g, s)):
        good = G.run(lambda pi, t: step(P, pi, 0.5), mu, 200)[:, 1]
        bad = G.run(lambda pi, t: step(P, pi, 0.5, True), mu, 200)[:, 1]
        assert good[-1] > 0.99 and np.all(np.diff(good) >= 0) and good[1] > good[0]
        assert bad[-1] < 0.01 and np.all(np.diff(bad) <= 0) and bad[1] < bad[0]


def test_duel_winner_is_a_distribution():
    rng = np.random.default_rng(0)
    game = G.random_game(7, 0)
    for pi in rng.dirichlet(np.ones(7), size=5):
        w = G.duel_winner(game.P, pi)
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-14


# ---------------------------------------------------------------------------------------------------------------------
# sampled versions (softmax table + nano_nash losses)

def test_sampled_inpo_reaches_small_gap_on_rps():
    game, tau = G.rps(), 0.1                               # μ = (.6, .3, .1): π*_τ is not uniform
    traj, dev = G.sampled_inpo(game, tau, eta=tau / 0.1, iters=40, steps=10, batch=4096, lr=1.0, seed=0)
    assert G.duality_gap(game.P, traj[0], game.mu, tau) > 0.1
    assert G.duality_gap(game.P, traj[-1], game.mu, tau) < 1e-2
    assert dev.mean() < 0.03                                # each iteration ≈ the closed-form INPO update


def test_sampled_steps_match_closed_form_in_expectation():
    """One SGD step with a huge batch ≈ the closed-form expected step (same lr), from a non-trivial π."""
    game = G.weighted_cycle()
    one = lambda traj: traj[1]                              # noqa: E731
    pg = G.sampled_nash_md_pg(game, 0.1, 0.25, 1, 200_000, 3.0, seed=1)
    assert np.abs(one(pg) - G.nash_md_pg_step(game.P, game.mu, game.mu, 3.0, 0.1, 0.25)).max() < 5e-3
    for printed in (False, True):
        la = G.sampled_lana(game, 1, 200_000, 2.0, printed, seed=1)
        want = G.lana_sgd_step(game.P, game.mu, 2.0, printed)
        assert np.abs(one(la) - want).max() < 5e-3
        assert np.sign(one(la)[1] - game.mu[1]) == np.sign(want[1] - game.mu[1]) != 0


def test_judge_noise_flips_outcomes():
    import torch
    P = torch.tensor(G.bt3().P)
    gen = torch.Generator().manual_seed(0)
    y, y2 = torch.full((100_000,), 1), torch.full((100_000,), 0)
    assert abs(G.judge(P, y, y2, gen).double().mean().item() - 0.9) < 5e-3
    assert abs(G.judge(P, y, y2, gen, eps=0.2).double().mean().item() - (0.2 + 0.6 * 0.9)) < 5e-3


# ---------------------------------------------------------------------------------------------------------------------
# the script

def test_log_iters():
    its = G.log_iters(1000)
    assert its[0] == 0 and its[-1] == 1000 and its == sorted(set(its)) and len(its) > 20


def test_parse_args_from_dataclass():
    cfg = G.parse_args(argv=["--game", "rps", "--iters", "7", "--smoke", "--tau", "0.5"])
    assert (cfg.game, cfg.iters, cfg.smoke, cfg.tau, cfg.seed) == ("rps", 7, True, 0.5, 0)
    with pytest.raises(ValueError, match="unknown --game"):
        G.make_games(G.GameConfig(game="nope"))


def test_smoke_run_writes_files(tmp_path):
    r = subprocess.run([sys.executable, "games.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "games_main.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(tmp_path / "games_curves.csv")))
    games = {r["game"] for r in rows}
    assert games == {"bt3", "dice", "rps", "cycle", "nlhf3", "random"}
    for game, algo in itertools.product(games, ["nash_md", "inpo", "mwu", "lana_printed"]):
        its = [int(r["iter"]) for r in rows if r["game"] == game and r["algorithm"] == algo]
        assert its == G.log_iters(64)                     # the smoke setting (64 iterations) reached the loop
    assert "final gap after 64 iterations" in r.stdout
