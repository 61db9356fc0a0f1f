"""
nano_nash: the losses of game-theoretic LM alignment in one file, readable top to bottom.

Every function here is pure: per-sequence log-probabilities of shape (B,) in, (scalar loss, dict of float stats) out.
A log-prob is a sum over response tokens, log π(y|x) = Σ_t log π(y_t | x, y_<t). The LM trainer (train_lm.py) and the
tabular playground (games.py, where log π(y) = log_softmax(logits)[y]) call the same functions, so the tabular
closed forms check the LM losses. Math reference: ALGORITHMS.md (section numbers below refer to it).

1. The preference game. For a prompt x, P(y ≻ y') ∈ [0, 1] is the probability that a judge prefers y to y', with
   P(y ≻ y') + P(y' ≻ y) = 1. Policies play against each other: P(π ≻ π') = E_{y~π, y'~π'} P(y ≻ y'). A Nash
   equilibrium (NE) π* satisfies P(π* ≻ π) ≥ 1/2 for every π: no policy is preferred to it. Preferences need not be
   transitive (rock-paper-scissors), so the NE may be mixed and need not maximise any reward.
2. The regularised game (NLHF eq. 2, INPO eq. 3), with reference policy μ = π_ref and temperature τ > 0:
       J_τ(π, π') = P(π ≻ π') − τ KL(π‖μ) + τ KL(π'‖μ).
   Its NE π*_τ is unique and solves the fixed point π*_τ(y) ∝ μ(y) exp(P(y ≻ π*_τ)/τ) (§2).
   Duality gap (how far π is from π*_τ): DualGap_τ(π) = max_π1 J_τ(π1, π) − min_π2 J_τ(π, π2) ≥ 0, 0 only at π*_τ.
   Larger τ: closer to μ; τ → 0: the unregularised NE. Nash-MD, INPO, online IPO target π*_τ; LANA has no τ.
3. Nash-MD (Munos et al. 2023, NLHF eqs. 3-5): π_{t+1} ∝ π_t^μ exp(η P(y ≻ π_t^μ)), π_t^μ = π_t^{1−ητ} μ^{ητ}.
   LM version Nash-MD-PG (nash_md_pg_loss): per prompt, y ~ π_θ (policy adapter), y' ~ π_θ^{1−β} μ^β (geometric
   mixture, mixed per token in the LM (NLHF App. F.1), μ = adapters off), judge P(y ≻ y'), REINFORCE with a
   −τ log(π_θ/μ) penalty.
   Needs: log π_θ(y) (with grad), log μ(y).
4. INPO (Zhang et al. 2024, eqs. 5-8): OMD π_{t+1} ∝ π_t^{1−τ/η} μ^{τ/η} exp(P(y ≻ π_t)/η), learned by a square loss
   on judged pairs y, y' ~ π_t (inpo_loss). Needs: log π_θ, log π_t (frozen copy "prev"), log μ on (y_w, y_l).
5. LANA (Azarafrooz & Faal 2024, Alg. 1): two players (two adapters on one base). Player i samples y, y' ~ π_i, the
   other player judges, and player i's loss couples the opponent's log π_{−i}(y_w) with its own log π_i(y_l)
   (lana_loss). Reference-free, no τ. The paper's sign is ambiguous; read lana_loss before using it.
6. Baselines: DPO and IPO (dpo_loss, ipo_loss). Online (pairs from the current π), IPO reaches π*_τ; DPO does not (§7).
7. The self-judge (judge_preference): P(y ≻ y') from the logits of tokens "1" and "2" at the judge's answer position,
   both presentation orders averaged so that P(y ≻ y') + P(y' ≻ y) = 1 holds exactly.

Tabular check: in games.py each loss drives a softmax table; its expected SGD step equals a closed-form update
(INPO: Prop. 6 exactly; Nash-MD-PG: softmax policy gradient; LANA: z += ±lr (π̃ − π)); tests/test_losses.py checks it.

Left out: sampling, the model and the optimiser (train_lm.py); exact solvers and dynamics (games.py).
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def _check_batch(**tensors):
    """All inputs must be 1-D tensors of the same length B (one entry per sequence)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of one shape (B,), got {shapes}; pass per-sequence log-probs "
                         f"(sum over response tokens), not per-token ones")


# ---------------------------------------------------------------------------------------------------------------------
# INPO

def inpo_loss(logp_w, logp_l, logp_prev_w, logp_prev_l, logp_ref_w, logp_ref_l, *, tau, eta):
    """INPO population loss, Zhang et al. 2024, eq. 8 (ALGORITHMS §4). η = INPO's η_I, an INVERSE step size.
        h = (log π(y_w) − log π(y_l)) − (τ/η)(log μ(y_w) − log μ(y_l)) − (1 − τ/η)(log π_t(y_w) − log π_t(y_l))
        loss = mean_b (h_b − 1/(2η))²
    (y_w, y_l): a pair y, y' ~ π_t (the frozen previous iterate, BOTH samples from it) ordered by the judge.
    Prop. 6: the minimiser over π is the OMD step π_{t+1} ∝ π_t^{1−τ/η} μ^{τ/η} exp(P(y ≻ π_t)/η),
    i.e. a move of τ/η (in log space) toward the soft best response BR_τ(π_t). Needs 0 ≤ τ ≤ η (paper: τ = η/3;
    τ = 0 is "INPO w/o KL", τ = η is online IPO). In games.py τ/η = 1/3 cycles on RPS at τ = 0.1; 0.1 converges.
    """
    _check_batch(logp_w=logp_w, logp_l=logp_l, logp_prev_w=logp_prev_w, logp_prev_l=logp_prev_l,
                 logp_ref_w=logp_ref_w, logp_ref_l=logp_ref_l)
    if not 0.0 <= tau <= eta:
        raise ValueError(f"INPO needs 0 <= tau <= eta (got tau={tau}, eta={eta}); tau > eta puts a negative weight "
                         f"on the previous iterate. The paper uses tau = eta/3.")
    r = tau / eta
    h = (logp_w - logp_l) - r * (logp_ref_w - logp_ref_l) - (1 - r) * (logp_prev_w - logp_prev_l)  # (B,)
    target = 1.0 / (2.0 * eta)
    loss = ((h - target) ** 2).mean()
    stats = {"loss": loss.item(), "h": h.mean().item(), "target": target,
             "margin": (logp_w - logp_l).mean().item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# Nash-MD-PG

def nash_md_pg_loss(logp, logp_ref, pref, *, tau):
    """Nash-MD-PG surrogate, Munos et al. 2023 (NLHF), opponent of App. F.3 eq. 15 (ALGORITHMS §3.4).
    y ~ π_θ, y' ~ π' = π^{1−β} μ^β (held constant).
        ĝ = ∇ log π_θ(y) · ( P(y ≻ y') − 1/2 − τ (log π_θ(y) − log μ(y)) )          (ascent direction)
        loss = −mean_b log π_θ(y_b) · sg[ P(y_b ≻ y'_b) − 1/2 − τ (log π_θ(y_b) − log μ(y_b)) ]   so ∇loss = −ĝ.
    The 1/2 = P(y ≻ y) is a control variate (zero mean). pref may be a probability or a 0/1 judge sample.
    With a fixed β the stationary point is π = BR_τ(π^{1−β} μ^β): the mixture, not π, is the NE at τ/(1−β) (§3.4).
    """
    _check_batch(logp=logp, logp_ref=logp_ref, pref=pref)
    log_ratio = logp.detach() - logp_ref.detach()                  # (B,) one-sample estimate of KL(π‖μ)
    advantage = pref.to(logp.dtype) - 0.5 - tau * log_ratio        # (B,) constant w.r.t. θ
    loss = -(logp * advantage).mean()
    stats = {"loss": loss.item(), "pref": pref.float().mean().item(), "kl": log_ratio.mean().item(),
             "advantage": advantage.mean().item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# LANA

def lana_loss(logp_opp_w, logp_l, *, printed_sign=False):
    """LANA, Azarafrooz & Faal 2024, Algorithm 1 (ALGORITHMS §6). Player i samples y, y' ~ π_i; the other player's
    judge picks the winner y_w; logp_opp_w = log π_{−i}(y_w) (opponent model, detached), logp_l = log π_i(y_l).
        printed (Alg. 1, eqs. 2/6/7):   loss = mean( log π_{−i}(y_w) − log π_i(y_l) )
        default (§5.2 reading):         loss = mean( log π_i(y_l) − log π_{−i}(y_w) )
    The doubt: eq. 2 defines the reward as log(π/π̃)/γ, while the §5.2 convergence analysis uses
    δ = γ log(π̃/π), i.e. π_{t+1} ∝ π_t^{1−γ} π̃^γ, a step TOWARD the improved opponent π̃. Only the flipped
    sign is consistent with that analysis, so it is the default; the printed sign is kept behind printed_sign=True.
    What each sign does, in expectation, to a softmax table (log π(y) = z_y − logsumexp z): a duel between
    y, y' ~ π keeps the winner with law π̃ = 2 π ⊙ Pπ (the "duel winner", §5.1); the loser has law 2π − π̃.
    Lowering log π(y_l) moves z by −lr(2π − π̃ − π) = lr(π̃ − π); raising log π(y_w) moves it by the same
    lr(π̃ − π). So "lower the loser" = "raise the winner": z += lr (π̃ − π), mass flows to winners.
    The printed sign raises log π(y_l): z −= lr (π̃ − π), mass flows to LOSERS (away from a Condorcet winner).
    The opponent term has no gradient: each player updates only its own adapter.
    """
    _check_batch(logp_opp_w=logp_opp_w, logp_l=logp_l)
    opp = logp_opp_w.detach()
    loss = (opp - logp_l).mean() if printed_sign else (logp_l - opp).mean()
    stats = {"loss": loss.item(), "logp_l": logp_l.mean().item(), "logp_opp_w": opp.mean().item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# baselines: DPO, IPO

def dpo_loss(logp_w, logp_l, logp_ref_w, logp_ref_l, *, beta):
    """DPO, Rafailov et al. 2023, eq. 7 (ALGORITHMS §7); β = inverse temperature (≈ the KL coefficient):
        loss = −mean log σ( β [(log π(y_w) − log π(y_l)) − (log μ(y_w) − log μ(y_l))] )
    Online DPO (pairs from the current π) does NOT reach the NE: for n = 2 its stationary point is
    log(π_1/π_2) = log(μ_1/μ_2) + logit(p)/β, against (p − 1/2)/τ for the NE (§7).
    """
    _check_batch(logp_w=logp_w, logp_l=logp_l, logp_ref_w=logp_ref_w, logp_ref_l=logp_ref_l)
    logits = beta * ((logp_w - logp_l) - (logp_ref_w - logp_ref_l))  # (B,) implicit reward margin
    loss = -F.logsigmoid(logits).mean()
    stats = {"loss": loss.item(), "reward_margin": (logits / beta).mean().item(),
             "reward_acc": (logits > 0).float().mean().item()}
    return loss, stats


def ipo_loss(logp_w, logp_l, logp_ref_w, logp_ref_l, *, tau):
    """IPO, Azar et al. 2023, the sampled IPO loss (as in uclaml/SPPO trainer.py, `ipo` branch; ALGORITHMS §7);
    τ is IPO's regulariser (target 1/(2τ)):
        loss = mean( (log π(y_w) − log π(y_l)) − (log μ(y_w) − log μ(y_l)) − 1/(2τ) )²
    Online IPO (y, y' ~ sg[π]) has the regularised NE π*_τ as its fixed point (Calandriello et al. 2024, Prop. 4.1);
    it is INPO with τ = η (no previous-iterate term).
    """
    _check_batch(logp_w=logp_w, logp_l=logp_l, logp_ref_w=logp_ref_w, logp_ref_l=logp_ref_l)
    h = (logp_w - logp_l) - (logp_ref_w - logp_ref_l)                # (B,)
    loss = ((h - 1.0 / (2.0 * tau)) ** 2).mean()
    stats = {"loss": loss.item(), "h": h.mean().item(), "target": 1.0 / (2.0 * tau)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# the self-judge

def judge_preference(logit_1, logit_2, logit_1_swapped=None, logit_2_swapped=None):
    """P(y ≻ y') from a judge LM's next-token logits for the answers "1" and "2" (LANA Alg. 1; NLHF uses a
    pairwise preference model the same way). The judge sees "A = y, B = y'":
        P_AB(y ≻ y') = σ(logit_1 − logit_2)                    (probability of answering "1", restricted to {1, 2})
    LMs prefer one position (position bias), so optionally show "A = y', B = y" too and average:
        P(y ≻ y') = ( σ(logit_1 − logit_2) + σ(logit_2_swapped − logit_1_swapped) ) / 2.
    The average is antisymmetric by construction: swapping the two orders gives 1 − P, so P(y ≻ y) = 1/2.
    stats: position_bias = mean P(judge answers "1") − 1/2 over both orders (0 for an unbiased judge);
           orders_disagree = fraction of pairs where the two orders pick different winners.
    """
    _check_batch(logit_1=logit_1, logit_2=logit_2)
    dt = torch.promote_types(logit_1.dtype, torch.float32)                    # bf16 logits: compare in float32
    p_ab = torch.sigmoid(logit_1.to(dt) - logit_2.to(dt))                     # (B,) y wins when shown first
    if (logit_1_swapped is None) != (logit_2_swapped is None):
        raise ValueError("pass both swapped-order logits (logit_1_swapped and logit_2_swapped) or neither")
    if logit_1_swapped is None:
        pref = p_ab
        stats = {"pref": pref.mean().item(), "position_bias": float("nan"), "orders_disagree": float("nan")}
        return pref, stats
    _check_batch(logit_1=logit_1, logit_1_swapped=logit_1_swapped, logit_2_swapped=logit_2_swapped)
    p_ba = torch.sigmoid(logit_2_swapped.to(dt) - logit_1_swapped.to(dt))    # (B,) y wins when shown second
    pref = 0.5 * (p_ab + p_ba)
    first_chosen = 0.5 * (p_ab + (1.0 - p_ba))                                # P(answer "1"), both orders
    stats = {"pref": pref.mean().item(),
             "position_bias": (first_chosen - 0.5).mean().item(),
             "orders_disagree": ((p_ab > 0.5) != (p_ba > 0.5)).float().mean().item()}
    return pref, stats
