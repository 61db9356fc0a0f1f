"""Tests for nano_nash.py: each loss vs a slow loop reference, gradient signs, what is detached, and
the population identities: the expected SGD step of each loss on a softmax table is games.py's
closed form (SPPO: its expected gradient is the population loss's, minimised by games.sppo)."""
import itertools
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import games as G  # noqa: E402
import nano_nash as NN  # noqa: E402

B, F64 = 5, torch.float64


def batch(seed, k, lo=-3.0, hi=0.0):
    g = torch.Generator().manual_seed(seed)
    return [lo + (hi - lo) * torch.rand(B, generator=g, dtype=F64) for _ in range(k)]


def leaf(x):
    return x.clone().requires_grad_()


def random_policy(n, seed):
    p = -torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64).log()
    return p / p.sum()


# -------------------------------------------------------------------------------------------------
# each loss equals a slow, loop-based reference (python loops over the batch, plain math)

def test_inpo_matches_loop_reference():
    y, y2, py, py2, ry, ry2 = batch(0, 6)
    pref = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.9], dtype=F64)
    tau, eta = 0.1, 3.0                                     # η is a step size: ητ = 0.3
    loss, stats = NN.inpo_loss(y, y2, py, py2, ry, ry2, pref, eta=eta, tau=tau)
    ref, h_mean = 0.0, 0.0
    for b in range(B):
        r, p = eta * tau, pref[b].item()
        h = (y[b] - y2[b]).item() - r * (ry[b] - ry2[b]).item() - (1 - r) * (py[b] - py2[b]).item()
        ref += ((h - eta * (p - 0.5)) ** 2 + eta ** 2 * p * (1 - p)) / B
        h_mean += (2 * p - 1) * h / B
    assert abs(loss.item() - ref) < 1e-12 and abs(stats["h"].item() - h_mean) < 1e-12


def test_inpo_loss_is_eq8_in_expectation_over_its_coin():
    """Eq. 8 orders each pair by a coin, (y_w, y_l) = (y, y') with probability P, and takes
    (h(y_w, y_l) − η/2)². inpo_loss is its exact expectation over the coin, value and gradient;
    with verdicts (P = 1 or 0) it is eq. 8 itself, bit for bit."""
    x = batch(3, 6)
    pref = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.9], dtype=F64)
    eta, tau = 3.0, 0.1

    def eq8(order, p):      # the printed loss, the pair ordered as `order` says, each weighed by p
        y, y2, py, py2, ry, ry2 = (leaf(t) for t in x)
        w, l, pw, pl, rw, rl = [torch.where(order, a, b) for a, b in
                                ((y, y2), (y2, y), (py, py2), (py2, py), (ry, ry2), (ry2, ry))]
        r = eta * tau
        h = (w - l) - r * (rw - rl) - (1 - r) * (pw - pl)
        loss = (p * (h - eta / 2) ** 2).mean()
        loss.backward()
        return loss.item(), y.grad, y2.grad

    first = eq8(torch.ones(B, dtype=torch.bool), pref)         # (y, y'), weighed by P
    second = eq8(torch.zeros(B, dtype=torch.bool), 1 - pref)   # (y', y), weighed by 1 − P
    y, y2 = leaf(x[0]), leaf(x[1])
    loss, _ = NN.inpo_loss(y, y2, *x[2:], pref, eta=eta, tau=tau)
    loss.backward()
    assert torch.allclose(y.grad, first[1] + second[1], atol=1e-14)
    assert torch.allclose(y2.grad, first[2] + second[2], atol=1e-14)
    assert abs(loss.item() - (first[0] + second[0])) < 1e-12
    verdict = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=F64)    # a judge's verdicts
    printed, _, _ = eq8(verdict > 0, torch.ones(B, dtype=F64))
    assert NN.inpo_loss(*x, verdict, eta=eta, tau=tau)[0].item() == printed


def test_pg_loss_matches_loop_reference():
    lp, lr = batch(1, 2)
    pref = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.9], dtype=F64)
    tau = 0.2
    lp = leaf(lp)
    loss, stats = NN.pg_loss(lp, pref, lr, tau=tau)
    loss.backward()
    ref = 0.0
    for b in range(B):
        adv = pref[b].item() - 0.5 - tau * (lp[b].item() - lr[b].item())
        assert abs(lp.grad[b].item() - (-adv / B)) < 1e-12     # ∇loss = −ĝ, advantage held fixed
        ref += -lp[b].item() * adv / B
    assert abs(loss.item() - ref) < 1e-12
    assert abs(stats["kl"].item() - (lp - lr).mean().item()) < 1e-12


@pytest.mark.parametrize("printed", [False, True])
def test_lana_matches_loop_reference(printed):
    ow, l = batch(2, 2)
    ow, l = leaf(ow), leaf(l)
    loss, _ = NN.lana_loss(l, ow, printed_sign=printed)
    loss.backward()
    s = 1.0 if printed else -1.0
    ref = sum(s * (ow[b].item() - l[b].item()) for b in range(B)) / B
    assert abs(loss.item() - ref) < 1e-12
    assert ow.grad is None                                     # the opponent's log-prob is detached


def test_sppo_matches_loop_reference():
    lp, prev = batch(7, 2)
    lp, prev = leaf(lp), leaf(prev)
    win_rate = torch.tensor([1.0, 0.0, 0.25, 0.5, 0.875], dtype=F64)
    eta = 2.0
    loss, stats = NN.sppo_loss(lp, prev, win_rate, eta=eta)
    loss.backward()
    ref, mean_residual = 0.0, 0.0
    for b in range(B):
        r = lp[b].item() - prev[b].item() - eta * (win_rate[b].item() - 0.5)
        ref += 0.5 * r * r / B
        mean_residual += r / B
        assert abs(lp.grad[b].item() - r / B) < 1e-12
    assert abs(loss.item() - ref) < 1e-12
    assert abs(stats["residual"].item() - mean_residual) < 1e-12
    assert prev.grad is None                          # π_t, the previous iterate, is frozen


def test_dpo_matches_loop_reference():
    w, l, rw, rl = batch(3, 4)
    tau = 0.1
    loss, _ = NN.dpo_loss(w, l, rw, rl, tau=tau)
    margins = [(w[b] - l[b] - rw[b] + rl[b]).item() for b in range(B)]
    ref = sum(-math.log(1 / (1 + math.exp(-tau * m))) for m in margins) / B
    assert abs(loss.item() - ref) < 1e-12


def test_judge_matches_loop_reference():
    l1, l2, l1s, l2s = batch(4, 4, -2, 2)
    pref, stats = NN.judge_preference(torch.stack([l1, l2], 1), torch.stack([l1s, l2s], 1))

    def sig(x):
        return 1 / (1 + math.exp(-x))

    disagree = 0
    for b in range(B):
        pab, pba = sig((l1[b] - l2[b]).item()), sig((l2s[b] - l1s[b]).item())
        assert abs(pref[b].item() - (pab + pba) / 2) < 1e-6
        disagree += ((pab > .5) != (pba > .5)) / B
    assert abs(stats["orders_disagree"].item() - disagree) < 1e-6
    one_order, stats = NN.judge_preference(torch.stack([l1, l2], 1))
    assert torch.allclose(one_order, torch.sigmoid(l1 - l2).float()) and stats == {}


# -------------------------------------------------------------------------------------------------
# gradient signs, detached inputs, bad inputs

def test_gradient_signs():
    z = torch.zeros(B, dtype=F64)
    # pg_loss: raises log π(y) when P(y ≻ y') > 1/2, lowers it when < 1/2 (at π = μ, no KL pull)
    lp = leaf(z)
    NN.pg_loss(lp, torch.tensor([1, .8, .6, .2, 0.], dtype=F64), z, tau=0.1)[0].backward()
    assert torch.all(-lp.grad[:3] > 0) and torch.all(-lp.grad[3:] < 0)   # SGD moves along −grad
    lp = leaf(z + 1.0)                                       # the KL term pulls toward μ at a tie
    NN.pg_loss(lp, torch.full((B,), .5, dtype=F64), z, tau=0.1)[0].backward()
    assert torch.all(-lp.grad < 0)
    for margin, sign in [(0.0, 1), (10.0, -1)]:   # INPO: below target raise y_w, lower y_l; above:
        # reverse
        w, l = leaf(z + margin), leaf(z)
        NN.inpo_loss(w, l, z, z, z, z, z + 1, eta=3.0, tau=0.1)[0].backward()   # w beat l
        assert torch.all(sign * -w.grad > 0) and torch.all(sign * -l.grad < 0)
    for printed, sign in [(False, -1), (True, 1)]:  # LANA: §5.2 lowers log π(y_l), printed raises
        l = leaf(z)
        NN.lana_loss(l, z, printed_sign=printed)[0].backward()
        assert torch.all(sign * -l.grad > 0)
    for p, sign in [(1.0, 1), (0.0, -1)]:           # SPPO: raise a winner over π_t, lower a loser
        lp = leaf(z)
        NN.sppo_loss(lp, z, torch.full((B,), p, dtype=F64), eta=1.0)[0].backward()
        assert torch.all(sign * -lp.grad > 0)
    w, l = leaf(z), leaf(z)                         # DPO: raise the winner, lower the loser
    NN.dpo_loss(w, l, z, z, tau=0.1)[0].backward()
    assert torch.all(-w.grad > 0) and torch.all(-l.grad < 0)


def test_losses_detach_the_frozen_policies():
    """π_t, μ and the opponent get no gradient even when the caller passes tensors that require
    one."""
    x = batch(6, 6)
    w, l, pw, pl, rw, rl = (leaf(t) for t in x)
    pref = leaf(x[0].exp())                                 # a judge's P, itself an LM's output
    NN.inpo_loss(w, l, pw, pl, rw, rl, pref, eta=3.0, tau=0.1)[0].backward()
    NN.pg_loss(w, torch.full((B,), .7, dtype=F64), rw, tau=0.1)[0].backward()
    NN.dpo_loss(w, l, rw, rl, tau=0.1)[0].backward()
    NN.lana_loss(l, pw)[0].backward()
    NN.sppo_loss(w, pl, torch.full((B,), .7, dtype=F64), eta=1.0)[0].backward()
    assert all(t.grad is None for t in (pw, pl, rw, rl, pref))
    assert w.grad is not None and l.grad is not None


def test_bad_inputs_raise():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match=r"eta \* tau"):
        NN.inpo_loss(a, a, a, a, a, a, a, eta=20.0, tau=0.1)            # ητ = 2 > 1
    with pytest.raises(ValueError, match=r"\(B,\)"):
        NN.dpo_loss(a, torch.zeros(4), a, a, tau=0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        NN.pg_loss(torch.zeros(3, 2), torch.zeros(3, 2), tau=0.1)


def test_judge_symmetric_and_diagnostics():
    l1, l2, l1s, l2s = batch(5, 4, -4, 4)
    p, _ = NN.judge_preference(torch.stack([l1, l2], 1), torch.stack([l1s, l2s], 1))
    reversed_pair = torch.stack([l1s, l2s], 1), torch.stack([l1, l2], 1)
    q, _ = NN.judge_preference(*reversed_pair)
    assert torch.allclose(p + q, torch.ones(B), atol=1e-6)
    always_1 = torch.stack([torch.full((B,), 3.), torch.zeros(B)], 1)   # pure position bias
    p, stats = NN.judge_preference(always_1, always_1)
    assert torch.allclose(p, torch.full((B,), .5))
    assert stats["position_bias"] > 0.4 and stats["orders_disagree"] == 1
    p, stats = NN.judge_preference(always_1, always_1.flip(1))          # an unbiased judge
    assert torch.all(p > .8) and abs(stats["position_bias"]) < 1e-7
    assert stats["orders_disagree"] == 0


# -------------------------------------------------------------------------------------------------
# population identities: expectations computed exactly, by enumeration, the losses called per pair

def judged_pairs(pi, P):
    """All ordered (y_w, y_l) with probability 2 π(y_w) π(y_l) P(y_w ≻ y_l): y, y' ~ π, then the
    judge orders the pair (λ_p of INPO eq. 8); (y_w, y_l) arises from the draw (y_w, y_l) and from
    the draw (y_l, y_w)."""
    n = len(pi)
    return [(w, l, 2 * pi[w] * pi[l] * P[w, l]) for w in range(n) for l in range(n)]


def expected_step(pi, lr, terms):
    """z − lr ∇_z E[loss] on a softmax table z = log π, for
    terms = [(probability, loss(log_softmax(z)))]."""
    z = pi.log().clone().requires_grad_()
    lp = torch.log_softmax(z, 0)
    sum(p * loss(lp) for p, loss in terms).backward()
    return (z - lr * z.grad).detach()


def test_inpo_population_minimiser_is_the_closed_form_step():
    """INPO Prop. 6: the argmin of the loss in expectation over y, y' ~ π_t (exact, by
    enumeration; minimised over a logit table) is games.inpo's step with step size η (INPO's
    η_I = 1/η)."""
    game, tau, eta = G.weighted_cycle(), 0.1, 3.0
    pi_t, lmu = random_policy(3, 0), game.mu.log()
    lp_t = pi_t.log()
    z = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():                  # y, y' ~ π_t, judged P(y ≻ y'): every pair, by its weight
        opt.zero_grad()
        lp = torch.log_softmax(z, 0)
        loss = sum(pi_t[y] * pi_t[y2] * NN.inpo_loss(lp[[y]], lp[[y2]], lp_t[[y]], lp_t[[y2]],
                                                     lmu[[y]], lmu[[y2]], game.P[[y], y2],
                                                     eta=eta, tau=tau)[0]
                   for y in range(3) for y2 in range(3))
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    want = G.inpo(game.P, lmu, lp_t, eta, tau).softmax(0)
    assert (torch.softmax(z.detach(), 0) - want).abs().max() < 1e-6
    assert (pi_t - want).abs().max() > 0.05                             # the step actually moved


@pytest.mark.parametrize("sign", [1, -1])
def test_lana_expected_step_is_toward_or_away_from_the_duel_winner(sign):
    """E[∇ lana_loss] on a softmax table moves z by +lr (π̃ − π) (§5.2 reading) or −lr (π̃ − π)
    (printed),
    π̃ = 2π ⊙ Pπ: games.lana. 'Raise the winner' (loss −log π(y_w)) has the same expected step."""
    game, pi, lr = G.random_game(4, 1), random_policy(4, 2), 0.7
    pairs = judged_pairs(pi, game.P)

    def loss(lp, w, l):
        return NN.lana_loss(lp[[l]], lp[[w]], printed_sign=sign < 0)[0]

    got = expected_step(pi, lr, [(p, lambda lp, w=w, l=l: loss(lp, w, l)) for w, l, p in pairs])
    assert (got - G.lana(game.P, pi.log(), lr, sign)).abs().max() < 1e-12
    raise_winner = expected_step(pi, lr, [(p, lambda lp, w=w: -lp[w]) for w, _, p in pairs])
    assert (raise_winner - G.lana(game.P, pi.log(), lr)).abs().max() < 1e-12


def test_pg_loss_expected_step_is_nash_md_pg_with_the_mixture_opponent():
    """y ~ π, y' ~ π^{1−β} μ^β, pref = P(y ≻ y'): the expected step of pg_loss is
    games.nash_md_pg."""
    game, tau, beta, lr = G.random_game(4, 3), 0.2, 0.25, 0.7
    pi, lmu = random_policy(4, 3), game.mu.log()
    mix = NN.geometric_mixture(pi.log(), lmu, beta).exp()
    def loss(lp, y, y2):
        return NN.pg_loss(lp[[y]], game.P[y, y2][None], lmu[[y]], tau=tau)[0]

    terms = [(pi[y] * mix[y2], partial(loss, y=y, y2=y2))
             for y, y2 in itertools.product(range(4), range(4))]
    got = expected_step(pi, lr, terms)
    want = G.nash_md_pg(game.P, lmu, pi.log(), lr, tau, beta).softmax(0)
    assert (got.softmax(0) - want).abs().max() < 1e-12


def test_pg_loss_expected_step_is_maio_pg_with_the_duel_winner_opponent():
    """MAIO-PG as the LM runs it: y ~ π, and two more samples a, b ~ π of which the judge keeps the
    winner ỹ (so ỹ ~ π̃ = duel_winner); pref = a judged verdict on (y, ỹ), τ = 0. Enumerating (y, a,
    b, the winner)
    exactly, the expected step of pg_loss is games.maio_pg."""
    game, lr, n = G.random_game(4, 5), 0.9, 4
    P, pi = game.P, random_policy(4, 4)
    terms, opponent = [], torch.zeros(n, dtype=F64)
    for y, a, b in itertools.product(range(n), repeat=3):
        for o, p_o in ((a, P[a, b]), (b, P[b, a])):            # the duel of a and b: o wins
            prob = pi[y] * pi[a] * pi[b] * p_o
            terms.append((prob, lambda lp, y=y, o=o: NN.pg_loss(lp[[y]], P[y, o][None])[0]))
            opponent[o] += prob
    assert (opponent - NN.duel_winner(P, pi)).abs().max() < 1e-15        # ỹ ~ π̃ = 2π ⊙ Pπ
    got = expected_step(pi, lr, terms)
    assert (got.softmax(0) - G.maio_pg(P, pi.log(), lr).softmax(0)).abs().max() < 1e-12


def test_online_dpo_expected_step_matches_games():
    game, tau, lr = G.random_game(4, 4), 0.3, 0.8
    pi, lmu = random_policy(4, 4), game.mu.log()
    terms = [(p, lambda lp, w=w, l=l: NN.dpo_loss(lp[[w]], lp[[l]], lmu[[w]], lmu[[l]], tau=tau)[0])
             for w, l, p in judged_pairs(pi, game.P)]
    got = expected_step(pi, lr, terms)
    assert (got - G.online_dpo(game.P, lmu, pi.log(), lr, tau)).abs().max() < 1e-12


def test_sppo_expected_gradient_is_the_population_gradient():
    """SPPO as the LM runs it: y ~ π_t, two more samples y1, y2 ~ π_t, verdicts
    v_i ~ Bernoulli(P(y ≻ y_i)), P̂ = (v1 + v2)/2. Enumerating all of it exactly, E[∇ sppo_loss] at
    a table π ≠ π_t is the gradient of the population loss
    E_{y~π_t} ½ (log π(y) − log π_t(y) − η (P(y ≻ π_t) − ½))² (P̂ enters the gradient linearly),
    which is, written out, π_t ⊙ r − π ⟨π_t, r⟩."""
    game, eta, n = G.random_game(3, 2), 1.5, 3
    P, pi_t = game.P, random_policy(n, 5)
    z = (pi_t.log() + torch.tensor([0.3, -0.2, 0.1], dtype=F64)).requires_grad_()
    lp, lp_t = torch.log_softmax(z, 0), pi_t.log()
    expected = 0.0
    for y, y1, y2 in itertools.product(range(n), repeat=3):
        for v1, v2 in itertools.product((0, 1), repeat=2):
            p1 = P[y, y1] if v1 else 1 - P[y, y1]
            p2 = P[y, y2] if v2 else 1 - P[y, y2]
            prob = pi_t[y] * pi_t[y1] * pi_t[y2] * p1 * p2
            win_rate = torch.tensor([(v1 + v2) / 2], dtype=F64)
            expected = expected + prob * NN.sppo_loss(lp[[y]], lp_t[[y]], win_rate, eta=eta)[0]
    (sampled,) = torch.autograd.grad(expected, z, retain_graph=True)
    p = P @ pi_t
    r = lp - lp_t - eta * (p - 0.5)
    (population,) = torch.autograd.grad((pi_t * 0.5 * r ** 2).sum(), z, retain_graph=True)
    written_out = pi_t * r - lp.exp() * (pi_t * r).sum()
    assert (sampled - population).abs().max() < 1e-14
    assert (population - written_out).abs().max() < 1e-14
    assert population.abs().max() > 0.01                                # not at the optimum


@pytest.mark.parametrize("eta", [0.5, 3.0, 10.0])
def test_sppo_population_minimiser_is_games_sppo(eta):
    """The argmin over a logit table of E_{y~π_t} sppo_loss (exact P), found by LBFGS, is
    games.sppo's step, which is not MWU's (the loss cannot move every log-ratio by one log Z)."""
    game, n = G.random_game(4, 1), 4
    pi_t = random_policy(n, 7)
    lp_t = pi_t.log()
    p = game.P @ pi_t
    z = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=500, tolerance_grad=1e-15, tolerance_change=1e-18,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lp = torch.log_softmax(z, 0)
        loss = sum(pi_t[y] * NN.sppo_loss(lp[[y]], lp_t[[y]], p[[y]], eta=eta)[0] for y in range(n))
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    want = G.sppo(game.P, lp_t, eta).softmax(0)
    assert (torch.softmax(z.detach(), 0) - want).abs().max() < 1e-9
    assert (G.mwu(game.P, lp_t, eta).softmax(0) - want).abs().max() > 1e-5
