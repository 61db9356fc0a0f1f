"""
nano_nash: the math of game-theoretic LM alignment in one file. Read it first, top to bottom.

  1. the preference game    P(y ≻ y'), win rates, the duel winner
  2. the regularised game   BR_τ (best response), DualGap_τ (distance to the NE), π^{1−β} μ^β
  3. INPO                   Zhang et al. 2024: a square loss minimised by a mirror-descent step
  4. policy gradient        Nash-MD-PG (Munos et al. 2023, NLHF) and MAIO-PG (an improved opponent)
  5. LANA                   Azarafrooz & Faal 2024: two players judge each other
  6. SPPO                   Wu et al. 2024: a square loss toward MWU's step (self-play)
  7. a baseline             DPO, which does not reach the Nash equilibrium
  8. the self-judge         P(y ≻ y') from an LM's logits for the answers "1" and "2"

Everything is a pure function of tensors. Policies are tables over a finite response set (..., n)
in games.py and in the exact LM toy game; the losses take per-sequence log-probabilities (B,),
log π(y|x) = Σ_t log π(y_t | x, y_<t), so games.py (a softmax table) and train_lm.py (an LM with
LoRA adapters) call the same code.

Symbols, one meaning each, everywhere in the repo (ALGORITHMS.md has the derivations, § below):
  P[i, j] = P(y_i ≻ y_j)  rows beat columns; P + Pᵀ = 1, so P(y ≻ y) = 1/2
  π, μ                    the policy; the reference policy (the base model: adapters off)
  π_t                     the previous iterate: the frozen policy an iteration improves on
  τ                       KL temperature of the regularised game (τ = 0: the unregularised game)
  η                       mirror-descent step size (INPO's paper writes η_I = 1/η; we never do)
  β                       Nash-MD-PG's mixture weight on μ in the opponent π^{1−β} μ^β
  γ                       LANA's (and MAIO's) step toward the improved opponent
Left out: sampling, models and optimisers (train_lm.py); solvers and closed forms (games.py).
"""
import torch
import torch.nn.functional as F


# -------------------------------------------------------------------------------------------------
# 1. The preference game. For one prompt, a judge prefers y to y' with probability P(y ≻ y').
# A policy π plays against π': P(π ≻ π') = Σ π(y) π'(y') P(y ≻ y'). Preferences need not be
# transitive (rock-paper-scissors), so no reward explains them; the solution concept is the Nash
# equilibrium (NE) π*: P(π* ≻ π) ≥ 1/2 for every π. It is usually mixed. Each prompt is a game.

def win_rates(P, pi):
    """P(y ≻ π) = Σ_y' P(y ≻ y') π(y') for every y.  P: (..., n, n), π: (..., n) -> (..., n)."""
    return (P @ pi.unsqueeze(-1)).squeeze(-1)


def duel_winner(P, pi):
    """Draw y, y' ~ π and keep the one the judge prefers: the winner has law
    π̃ = 2 π ⊙ P(y ≻ π) (§5.1). It sums to 1 because Σ π(y) P(y ≻ π) = P(π ≻ π) = 1/2.
    An *improved opponent*: P(π̃ ≻ π) ≥ 1/2."""
    return 2 * pi * win_rates(P, pi)


# -------------------------------------------------------------------------------------------------
# 2. The regularised game (NLHF eq. 2, INPO eq. 3). Stay close to μ, with temperature τ > 0:
#       J_τ(π, π') = P(π ≻ π') − τ KL(π‖μ) + τ KL(π'‖μ).
# Its NE π*_τ is unique: the fixed point π*_τ = BR_τ(π*_τ). Nash-MD and INPO converge to π*_τ;
# LANA and MAIO have no μ and aim at the unregularised NE (τ = 0).

def best_response(P, pi, mu, tau):
    """BR_τ(π) = argmax_π' J_τ(π', π) = softmax(log μ + P(y ≻ π)/τ) (§2).
    τ = 0: uniform over the argmax."""
    p = win_rates(P, pi)
    if tau > 0:
        return torch.softmax(torch.log(mu) + p / tau, -1)
    best = (p >= p.amax(-1, keepdim=True) - 1e-12).to(p.dtype)
    return best / best.sum(-1, keepdim=True)


def duality_gap(P, pi, mu=None, tau=0.0):
    """DualGap_τ(π) = max_π1 J_τ(π1, π) − min_π2 J_τ(π, π2) ≥ 0, zero exactly at the NE.
    Closed form (§2):
        τ > 0:  2 [τ log Σ_y μ(y) exp(P(y ≻ π)/τ) + τ KL(π‖μ)] − 1
        τ = 0:  2 max_y P(y ≻ π) − 1                      (twice the exploitability)
    Report which τ you measure with: at τ > 0 the gap of π*_τ is 0, its DualGap_0 is not."""
    p = win_rates(P, pi)
    if tau == 0:
        return 2 * p.amax(-1) - 1
    log_mu = torch.log(mu)
    log_pi = torch.log(pi.clamp_min(1e-300))                   # 0 log 0 = 0
    kl = (pi * (log_pi - log_mu)).sum(-1)
    return 2 * tau * (torch.logsumexp(log_mu + p / tau, -1) + kl) - 1


def geometric_mixture(log_pi, log_mu, beta):
    """log of the normalised π^{1−β} μ^β (Nash-MD's regularised opponent). In an LM it is mixed
    per token (NLHF App. F.1): a different distribution over sequences than the mixture of the
    sequence-level laws."""
    return torch.log_softmax((1 - beta) * log_pi + beta * log_mu, -1)


# -------------------------------------------------------------------------------------------------
# The losses. Inputs are per-sequence log-probs (B,); log-probs of frozen policies (π_t, μ, an
# opponent) are detached here, so a caller cannot leak gradient into them. Each returns
# (loss, stats of detached tensors).

def _check(*xs):
    if any(x.dim() != 1 or x.shape != xs[0].shape for x in xs):
        shapes = [tuple(x.shape) for x in xs]
        raise ValueError(f"expected per-sequence log-probs of one shape (B,), got {shapes}")


def inpo_loss(logp, logp2, prev, prev2, ref, ref2, pref, *, eta, tau):
    """3. INPO, Zhang et al. 2024, eq. 8 (§4), with η a step size (the paper's η_I = 1/η; its
    τ = η_I/3 is ητ = 1/3). A pair y, y' ~ π_t (both from the frozen previous iterate), judged
    P = P(y ≻ y'):
        h    = [log π(y) − log π(y')] − ητ [log μ(y) − log μ(y')]
               − (1 − ητ) [log π_t(y) − log π_t(y')]
        loss = mean (h − η (P − 1/2))² + η² P (1 − P)
    Eq. 8 as printed orders the pair by a coin, (y_w, y_l) = (y, y') with probability P, and
    takes (h(y_w, y_l) − η/2)². h is antisymmetric, so this loss is eq. 8's expectation over that
    coin, exactly: the same loss and gradient in expectation, without the coin's noise (a verdict,
    P = 1 or 0, gives eq. 8 itself). Prop. 6: the minimiser is the mirror step
        π_{t+1} ∝ π_t^{1−ητ} μ^{ητ} exp(η P(y ≻ π_t)) = π_t^{1−ητ} BR_τ(π_t)^{ητ}
    a move of ητ (in log space) toward BR_τ(π_t). Needs 0 ≤ ητ ≤ 1 (ητ = 1: online IPO;
    τ = 0: MWU). Stats: h and the margin log π(y_w) − log π(y_l), in expectation over the coin."""
    _check(logp, logp2, prev, prev2, ref, ref2, pref)
    if not 0 <= eta * tau <= 1:
        raise ValueError(f"INPO needs 0 <= eta * tau <= 1, got eta={eta}, tau={tau}: the weight "
                         "1 - eta*tau on the previous iterate would be negative "
                         "(the paper uses eta * tau = 1/3)")
    r = eta * tau
    pref = pref.detach()
    margin = logp - logp2
    ref_margin = (ref - ref2).detach()
    prev_margin = (prev - prev2).detach()
    h = margin - r * ref_margin - (1 - r) * prev_margin                     # (B,)
    loss = ((h - eta * (pref - 0.5)) ** 2 + eta ** 2 * pref * (1 - pref)).mean()
    sign = 2 * pref - 1                                 # E[h(y_w, y_l)] = (2P − 1) h(y, y')
    return loss, {"h": (sign * h).detach().mean(), "margin": (sign * margin).detach().mean()}


def pg_loss(logp, pref, logp_ref=None, *, tau=0.0):
    """4. Policy gradient against a sampled opponent y' (§3.4): y ~ π_θ, the judge gives
    P(y ≻ y'), and
        ĝ = ∇ log π_θ(y) · ( P(y ≻ y') − 1/2 − τ [log π_θ(y) − log μ(y)] )    (ascent direction)
        loss = −mean log π_θ(y) · sg[advantage],  so ∇loss = −ĝ.
    The 1/2 = P(y ≻ y) is a baseline (zero mean). In expectation over y' ~ π', on a softmax
    table:
        z += lr · π ⊙ (a − ⟨π, a⟩),  a = P(y ≻ π') − τ log(π/μ).
    Two algorithms, two opponents:
      Nash-MD-PG (NLHF App. F.3): π' = π^{1−β} μ^β (per token). Stationary point π = BR_τ(π'):
        with a fixed β the mixture π', not π, is the NE, at temperature τ/(1−β) (§3.4).
      MAIO-PG (this repo): π' = π̃, the duel winner of two more samples of π, τ = 0. Mirror
        ascent against an improved opponent (MAIO, Munos et al. 2020) with LANA's opponent but
        a payoff reward; no μ needed."""
    logp_ref = logp.detach() if logp_ref is None else logp_ref.detach()
    _check(logp, pref, logp_ref)
    kl = logp.detach() - logp_ref                      # (B,) one-sample estimate of KL(π‖μ)
    advantage = pref.to(logp.dtype) - 0.5 - tau * kl   # (B,) held constant
    loss = -(logp * advantage).mean()
    return loss, {"kl": kl.mean(), "advantage": advantage.mean()}


def lana_loss(logp_l, opp_w, *, printed_sign=False):
    """5. LANA, Algorithm 1 (§6). Player i samples y, y' ~ π_i; the OTHER player judges; y_w is
    the winner. logp_l = log π_i(y_l) (trained), opp_w = log π_{−i}(y_w) (the opponent's
    adapter, no gradient):
        §5.2 reading (default):   loss = mean( log π_i(y_l) − log π_{−i}(y_w) )
        printed (Alg. 1, eq. 2):  loss = mean( log π_{−i}(y_w) − log π_i(y_l) )
    The paper is inconsistent: eq. 2's reward log(π/π̃)/γ and the §5.2 analysis, whose step
    π_{t+1} ∝ π_t^{1−γ} π̃^γ goes TOWARD the improved opponent π̃ (the duel winner), need
    opposite signs; only the flipped one is consistent with the analysis. In expectation on a
    softmax table, lowering log π(y_l) moves z by +lr (π̃ − π), toward winners; the printed sign
    moves it by −lr (π̃ − π), toward losers."""
    _check(logp_l, opp_w)
    diff = logp_l - opp_w.detach()
    loss = -diff.mean() if printed_sign else diff.mean()
    return loss, {"logp_l": logp_l.detach().mean()}


def sppo_loss(logp, prev, win_rate, *, eta):
    """6. SPPO, Wu et al. 2024 (self-play preference optimisation), η a step size (the paper's
    1/β): y ~ π_t, win_rate = P̂(y ≻ π_t), the judge's mean verdict of y against K more samples
    of π_t, and
        loss = mean ½ ( log π(y) − log π_t(y) − η [P̂(y ≻ π_t) − 1/2] )²
    a regression of the log-ratio on the centred win rate. Its target is MWU's step
    π_t e^{η P(y ≻ π_t)} / Z (INPO at τ = 0, which cycles on RPS), with log Z replaced by the
    constant η/2: exact only where Σ π_t e^{η (P(y ≻ π_t) − 1/2)} = 1. On a softmax table its
    minimiser is not MWU's step (games.sppo measures the difference)."""
    _check(logp, prev, win_rate)
    centred = win_rate.to(logp.dtype) - 0.5
    r = logp - prev.detach() - eta * centred                # (B,) the residual
    return (0.5 * r ** 2).mean(), {"residual": r.detach().mean()}


def dpo_loss(logp_w, logp_l, ref_w, ref_l, *, tau):
    """7. DPO (Rafailov et al. 2023) with KL strength τ (DPO's β):
        loss = −mean log σ( τ [(log π(y_w) − log π(y_l)) − (log μ(y_w) − log μ(y_l))] )
    Online (pairs from π) it does NOT reach the NE: for n = 2 its stationary point is
    log(π_1/π_2) = log(μ_1/μ_2) + logit(p)/τ, against (p − 1/2)/τ for π*_τ (§7)."""
    _check(logp_w, logp_l, ref_w, ref_l)
    margin = (logp_w - logp_l) - (ref_w - ref_l).detach()      # (B,) implicit reward margin
    loss = -F.logsigmoid(tau * margin).mean()
    return loss, {"margin": margin.detach().mean()}


# -------------------------------------------------------------------------------------------------
# 8. The self-judge: the LM itself reads "Which response is better? ... Output 1 or 2"
# (LANA, Algorithm 1).

def judge_preference(logits, logits_swapped=None):
    """P(y ≻ y') from a judge's next-token logits (B, 2) for the answers ("1", "2"), y first:
        P(y ≻ y') = σ(l_1 − l_2)                    (the answer "1", restricted to {"1", "2"})
    LMs favour a position, so optionally show y' first too (logits_swapped) and average:
        P(y ≻ y') = [σ(l_1 − l_2) + σ(l'_2 − l'_1)] / 2
    which is antisymmetric: P(y ≻ y') + P(y' ≻ y) = 1 exactly. stats: position_bias =
    P(answer "1") − 1/2 over both orders; orders_disagree = share of pairs whose winner depends
    on the order."""
    logits = logits.float()
    p_ab = torch.sigmoid(logits[:, 0] - logits[:, 1])          # (B,) y wins, shown first
    if logits_swapped is None:
        return p_ab, {}
    swapped = logits_swapped.float()
    p_ba = torch.sigmoid(swapped[:, 1] - swapped[:, 0])        # (B,) y wins, shown second
    p_first = 0.5 * (p_ab + 1 - p_ba)                          # P(answer "1"), both orders
    stats = {"position_bias": (p_first - 0.5).mean(),
             "orders_disagree": ((p_ab > 0.5) != (p_ba > 0.5)).float().mean()}
    return 0.5 * (p_ab + p_ba), stats
