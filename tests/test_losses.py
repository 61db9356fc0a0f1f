"""Tests for nano_nash.py: each loss vs a slow loop reference, gradient signs, population-level identities."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import games as G  # noqa: E402
import nano_nash as NN  # noqa: E402

B = 5


def batch(seed, k, lo=-3.0, hi=0.0):
    g = torch.Generator().manual_seed(seed)
    return [lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(k)]


def leaf(x):
    return x.clone().requires_grad_()


# ---------------------------------------------------------------------------------------------------------------------
# each loss equals a slow, loop-based reference (python loops over the batch, plain math)

def test_inpo_matches_loop_reference():
    w, l, pw, pl, rw, rl = batch(0, 6)
    tau, eta = 0.1, 0.3
    loss, stats = NN.inpo_loss(w, l, pw, pl, rw, rl, tau=tau, eta=eta)
    ref = 0.0
    for b in range(B):
        h = (w[b] - l[b]).item() - tau / eta * (rw[b] - rl[b]).item() - (1 - tau / eta) * (pw[b] - pl[b]).item()
        ref += (h - 1 / (2 * eta)) ** 2 / B
    assert abs(loss.item() - ref) < 1e-12 and abs(stats["loss"] - ref) < 1e-12


def test_nash_md_pg_matches_loop_reference():
    lp, lr = batch(1, 2)
    pref = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.9], dtype=torch.float64)
    tau = 0.2
    lp = leaf(lp)
    loss, _ = NN.nash_md_pg_loss(lp, lr, pref, tau=tau)
    loss.backward()
    for b in range(B):
        adv = pref[b].item() - 0.5 - tau * (lp[b].item() - lr[b].item())
        assert abs(lp.grad[b].item() - (-adv / B)) < 1e-12          # ∇loss = −ĝ, with the advantage held fixed
    ref = sum(-lp[b].item() * (pref[b].item() - 0.5 - tau * (lp[b].item() - lr[b].item())) for b in range(B)) / B
    assert abs(loss.item() - ref) < 1e-12


@pytest.mark.parametrize("printed", [False, True])
def test_lana_matches_loop_reference(printed):
    ow, l = batch(2, 2)
    ow, l = leaf(ow), leaf(l)
    loss, _ = NN.lana_loss(ow, l, printed_sign=printed)
    loss.backward()
    s = 1.0 if printed else -1.0
    ref = sum(s * (ow[b].item() - l[b].item()) for b in range(B)) / B
    assert abs(loss.item() - ref) < 1e-12
    assert ow.grad is None or torch.all(ow.grad == 0)                # the opponent's adapter gets no gradient


def test_dpo_and_ipo_match_loop_reference():
    w, l, rw, rl = batch(3, 4)
    beta, tau = 0.1, 0.25
    dpo, _ = NN.dpo_loss(w, l, rw, rl, beta=beta)
    ipo, _ = NN.ipo_loss(w, l, rw, rl, tau=tau)
    ref_dpo = ref_ipo = 0.0
    for b in range(B):
        m = (w[b] - l[b] - rw[b] + rl[b]).item()
        ref_dpo += -math.log(1 / (1 + math.exp(-beta * m))) / B
        ref_ipo += (m - 1 / (2 * tau)) ** 2 / B
    assert abs(dpo.item() - ref_dpo) < 1e-12 and abs(ipo.item() - ref_ipo) < 1e-12


def test_judge_matches_loop_reference():
    l1, l2, l1s, l2s = batch(4, 4, -2, 2)
    pref, stats = NN.judge_preference(l1, l2, l1s, l2s)
    sig = lambda x: 1 / (1 + math.exp(-x))                              # noqa: E731
    disagree = 0
    for b in range(B):
        pab, pba = sig((l1[b] - l2[b]).item()), sig((l2s[b] - l1s[b]).item())
        assert abs(pref[b].item() - (pab + pba) / 2) < 1e-6
        disagree += ((pab > .5) != (pba > .5)) / B
    assert abs(stats["orders_disagree"] - disagree) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# gradient signs

def test_gradient_signs():
    z = torch.zeros(B, dtype=torch.float64)
    # Nash-MD-PG: raises log π(y) when P(y ≻ y') > 1/2, lowers it when < 1/2 (at π = μ, no KL pull)
    lp = leaf(z)
    NN.nash_md_pg_loss(lp, z, torch.tensor([1, .8, .6, .2, 0.], dtype=torch.float64), tau=0.1)[0].backward()
    assert torch.all(-lp.grad[:3] > 0) and torch.all(-lp.grad[3:] < 0)   # SGD moves along −grad
    # ... and the KL term pulls log π(y) back toward log μ(y) at a tie
    lp = leaf(z + 1.0)
    NN.nash_md_pg_loss(lp, z, torch.full((B,), .5, dtype=torch.float64), tau=0.1)[0].backward()
    assert torch.all(-lp.grad < 0)
    # INPO: below target, raise log π(y_w) and lower log π(y_l); above target, the reverse
    for margin, sign in [(0.0, 1), (10.0, -1)]:
        w, l = leaf(z + margin), leaf(z)
        NN.inpo_loss(w, l, z, z, z, z, tau=0.1, eta=0.3)[0].backward()
        assert torch.all(sign * -w.grad > 0) and torch.all(sign * -l.grad < 0)
    # LANA: the §5.2 reading lowers log π_i(y_l); the printed sign raises it
    for printed, sign in [(False, -1), (True, 1)]:
        l = leaf(z)
        NN.lana_loss(z, l, printed_sign=printed)[0].backward()
        assert torch.all(sign * -l.grad > 0)
    # DPO / IPO (below target): raise the winner, lower the loser
    for fn, kw in [(NN.dpo_loss, {"beta": 0.1}), (NN.ipo_loss, {"tau": 0.5})]:
        w, l = leaf(z), leaf(z)
        fn(w, l, z, z, **kw)[0].backward()
        assert torch.all(-w.grad > 0) and torch.all(-l.grad < 0)


def test_bad_inputs_raise():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="tau <= eta"):
        NN.inpo_loss(a, a, a, a, a, a, tau=0.5, eta=0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        NN.dpo_loss(a, torch.zeros(4), a, a, beta=0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        NN.nash_md_pg_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), tau=0.1)
    with pytest.raises(ValueError, match="both"):
        NN.judge_preference(a, a, a)


# ---------------------------------------------------------------------------------------------------------------------
# the judge

def test_judge_symmetric_and_diagnostics():
    l1, l2, l1s, l2s = batch(5, 4, -4, 4)
    p, _ = NN.judge_preference(l1, l2, l1s, l2s)
    q, _ = NN.judge_preference(l1s, l2s, l1, l2)                       # the pair seen the other way round
    assert torch.allclose(p + q, torch.ones(B, dtype=torch.float64), atol=1e-12)
    # a judge that always answers "1" (pure position bias) on identical responses: P(a ≻ a) = 1/2
    p, stats = NN.judge_preference(torch.full((B,), 3.), torch.zeros(B), torch.full((B,), 3.), torch.zeros(B))
    assert torch.allclose(p, torch.full((B,), .5, dtype=p.dtype))
    assert stats["position_bias"] > 0.4 and stats["orders_disagree"] == 1
    # an unbiased judge: no position bias, orders agree
    p, stats = NN.judge_preference(torch.full((B,), 2.), torch.zeros(B), torch.zeros(B), torch.full((B,), 2.))
    assert torch.all(p > .8) and abs(stats["position_bias"]) < 1e-7 and stats["orders_disagree"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# population-level identities: expectations computed exactly over pairs, losses called per pair

def pairs(pi, P):
    """All ordered (y_w, y_l) with their probability 2 π(y_w) π(y_l) P(y_w ≻ y_l): y, y' ~ π, then the judge orders
    the pair (λ_p of INPO eq. 8); (y_w, y_l) arises from the draw (y_w, y_l) and from the draw (y_l, y_w)."""
    n = len(pi)
    return [(w, l, 2 * pi[w] * pi[l] * P[w, l]) for w in range(n) for l in range(n)]


def test_inpo_population_minimiser_is_closed_form_update():
    """INPO Prop. 6: argmin of eq. 8 (exact expectation, minimised with torch over a logit table) = OMD step."""
    game, tau, eta = G.weighted_cycle(), 0.1, 0.3
    rng = np.random.default_rng(0)
    pi_t = rng.dirichlet(np.ones(3))
    lp_t, lmu = torch.tensor(np.log(pi_t)), torch.tensor(np.log(game.mu))
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lp = torch.log_softmax(z, 0)
        loss = sum(p * NN.inpo_loss(lp[[w]], lp[[l]], lp_t[[w]], lp_t[[l]], lmu[[w]], lmu[[l]], tau=tau, eta=eta)[0]
                   for w, l, p in pairs(pi_t, game.P))
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    got = torch.softmax(z.detach(), 0).numpy()
    want = G.omd_step(game.P, game.mu, pi_t, 1 / eta, tau)            # INPO eq. 5 with step 1/η
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(pi_t - want).max() > 0.05                             # the update actually moved


def expected_grad(pi, P, loss_fn):
    z = torch.tensor(np.log(pi), requires_grad=True)
    lp = torch.log_softmax(z, 0)
    sum(p * loss_fn(lp, w, l) for w, l, p in pairs(pi, P)).backward()
    return z.grad.numpy()


@pytest.mark.parametrize("printed", [False, True])
def test_lana_expected_step_is_toward_duel_winner(printed):
    """E[∇ lana_loss] on a softmax table = π − π̃ (default) or π̃ − π (printed), π̃ = 2π ⊙ Pπ; and 'raise the
    winner' (loss −log π(y_w)) gives the same expected gradient as the default 'lower the loser'."""
    game = G.random_game(4, 1)
    pi = np.random.default_rng(2).dirichlet(np.ones(4))
    g = expected_grad(pi, game.P, lambda lp, w, l: NN.lana_loss(lp.detach()[[w]], lp[[l]], printed_sign=printed)[0])
    tilde = G.duel_winner(game.P, pi)
    assert np.abs(g - (tilde - pi if printed else pi - tilde)).max() < 1e-12
    g_win = expected_grad(pi, game.P, lambda lp, w, l: -lp[w])
    assert np.abs(g_win - (pi - tilde)).max() < 1e-12


def test_nash_md_pg_expected_gradient_matches_games():
    game, tau, beta, lr = G.random_game(4, 3), 0.2, 0.25, 0.7
    pi = np.random.default_rng(3).dirichlet(np.ones(4))
    mix, n = G.geo_mix(pi, game.mu, beta), 4
    z = torch.tensor(np.log(pi), requires_grad=True)
    lp, lmu = torch.log_softmax(z, 0), torch.tensor(np.log(game.mu))
    loss = sum(pi[y] * mix[y2] * NN.nash_md_pg_loss(lp[[y]], lmu[[y]], torch.tensor([game.P[y, y2]]), tau=tau)[0]
               for y in range(n) for y2 in range(n))
    loss.backward()
    want = G.nash_md_pg_step(game.P, game.mu, pi, lr, tau, beta)
    assert np.abs(G.softmax(np.log(pi) - lr * z.grad.numpy()) - want).max() < 1e-12


def test_online_dpo_expected_gradient_matches_games():
    game, beta = G.random_game(4, 4), 0.3
    pi = np.random.default_rng(4).dirichlet(np.ones(4))
    lmu = torch.tensor(np.log(game.mu))
    g = expected_grad(pi, game.P, lambda lp, w, l: NN.dpo_loss(lp[[w]], lp[[l]], lmu[[w]], lmu[[l]], beta=beta)[0])
    assert np.abs(g - G.online_dpo_grad(game.P, game.mu, np.log(pi), beta)).max() < 1e-12
