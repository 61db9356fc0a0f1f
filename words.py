"""
words.py: the words game, --model smollm2's task: a real chat model answers in its own words, and
the first word of its answer is its move in a game from games.py, whose equilibrium is known.

    python train_lm.py --model smollm2               # INPO, 3 games, the sampled gaps; minutes
    python train_lm.py --model smollm2 --algo all    # every algorithm (README: how long)

The task (tasks.py's interface). Three prompts, each its own game (WORDS): rock-paper-scissors
(games.rps, NE uniform), water-fire-grass (games.weighted_cycle: water beats fire by 0.1, fire
beats grass by 0.2, grass beats water by 0.3; NE (1/3, 1/2, 1/6)) and rock-paper-scissors-lizard-
Spock (games.rpsls, NE uniform). A response's move is its first word, case and punctuation ignored
(move); any other answer is "no move", which loses to every move and ties with itself
(with_no_move). The judge is this rule and the game's P, an oracle like the toy game's. Each
prompt is a chat in which the user asked the same question before and the assistant answered
with a move (few_shot): without these worked examples SmolLM2 plays in about 5% of its answers,
with them in about half (README).

The yardstick (WordsTask.measure). No enumeration of answers is possible, so at every logged step
each trained adapter answers each game N_SAMPLES times at temperature 1 (the policy the theory is
about), from the run's measurement generator (saved with the checkpoint: a resumed run measures
the same samples). From the move frequencies p̂ (no move included), per game and then their mean:
  gap0   DualGap_0(p̂), with a bootstrap 95% interval (gap0_lo, gap0_hi);
  gap    DualGap_τ(p̂) against μ̂, the base model's frequencies (N_MU answers per game at the
         start, add-½ smoothed so that KL(p̂‖μ̂) is finite), its interval the same way; μ̂'s own
         noise is not in the interval;
  floor0, floor   the same statistics of the exact target (the NE, π*_τ for μ̂) sampled N_SAMPLES
         times, their mean over FLOOR_DRAWS draws: sampling noise alone puts a perfect policy
         there, so a sampled gap cannot go lower on average;
  no_move the frequency of no move; kl the per-token KL(π‖μ) estimate Σ (log π(y) − log μ(y)) /
         Σ |y| over the sampled answers (an unbiased estimate of the sequence KL, per token).
The first record holds each game's moves and P, and μ̂'s counts; every record holds the counts
p̂ comes from: the log alone recomputes every gap (tests/test_words.py does).
"""
import unicodedata

import torch

import games
import nano_nash
import plots
from model import generate, sequence_logprobs
from solvers import F64, nash, regularized_nash
from tasks import Rollout

WORDS = [  # (name, the question, its moves (lower case), the assistant's earlier answers, P)
    ("rps", "Rock, paper or scissors?", ("rock", "paper", "scissors"),
     ("Scissors", "Rock"), games.rps().P),
    ("elements", "Water, fire or grass?", ("water", "fire", "grass"),
     ("Grass", "Water", "Fire"), games.weighted_cycle().P),
    ("rpsls", "Rock, paper, scissors, lizard or Spock?",
     ("rock", "paper", "scissors", "lizard", "spock"), ("Spock", "Lizard", "Paper", "Rock"),
     games.rpsls().P),
]
N_SAMPLES = 256     # answers per game and adapter at every logged step
N_MU = 512          # answers per game of the base model, once (μ̂)
KL_SAMPLES = 64     # of them, those the KL estimate scores (twice: under π and μ)
DRAWS = 1000        # bootstrap draws of an interval, and draws of a floor


def first_word(text):
    """The answer's first word, lower case, its punctuation removed: '"Rock!" I say' -> 'rock'."""
    words = text.split()
    if not words:
        return ""
    kept = [c for c in words[0] if not unicodedata.category(c).startswith("P")]
    return "".join(kept).lower()


def move(text, moves):
    """The index of the answer's move in moves, or len(moves): no move."""
    word = first_word(text)
    return moves.index(word) if word in moves else len(moves)


def with_no_move(P):
    """The game P (n, n) with one more action, no move: it loses to every move and ties with
    itself. (n + 1, n + 1), float64."""
    n = len(P)
    Q = torch.full((n + 1, n + 1), 0.5, dtype=F64)
    Q[:n, :n] = torch.as_tensor(P, dtype=F64)
    Q[:n, n] = 1.0
    Q[n, :n] = 0.0
    return Q


def few_shot(tok, question, answers):
    """The ids of a chat, in the model's format, where the user asked `question` once per answer
    and the assistant gave it, then asks again. An answer's turn closes as chat() closes the
    user's (its tail up to the last control id: ChatML's <|im_end|>\\n, Phi-3's <|end|>); only
    the first turn has the BOS."""
    q = tok.encode(question)
    last = max(i for i, t in enumerate(tok.tail) if t in tok.special_ids)
    close = tok.tail[:last]
    turn = [i for i in tok.chat(q) if i != tok.bos_id]
    ids = [] if tok.bos_id is None else [tok.bos_id]
    for a in answers:
        ids += turn + tok.encode(a, dummy_prefix=False) + close
    return ids + turn


def resample(freqs, n, draws, gen):
    """`draws` frequency vectors of n draws from freqs (n,): (draws, len(freqs)), float64."""
    idx = torch.multinomial(freqs.float(), n * draws, replacement=True, generator=gen)
    counts = torch.zeros(draws, len(freqs), dtype=F64)
    return counts.scatter_add_(1, idx.view(draws, n), torch.ones(draws, n, dtype=F64)) / n


def gaps(Qs, freqs, mus, tau):
    """DualGap_τ of each game's frequencies (..., n_k + 1) against μ̂ (τ = 0: DualGap_0): (K, ...)."""
    return torch.stack([nano_nash.duality_gap(Q, f, mu, tau) for Q, f, mu in zip(Qs, freqs, mus)])


def sampled_gap(Qs, counts, mus, tau, gen):
    """The sampled gap of each game's move counts, and the bootstrap draws of its frequencies
    (DRAWS, the same sample size): (K,), (K, DRAWS). Their mean over the games and its 2.5% and
    97.5% quantiles are the logged gap and interval."""
    freqs = [c.double() / c.sum() for c in counts]
    draws = [resample(f, int(c.sum()), DRAWS, gen) for f, c in zip(freqs, counts)]
    return gaps(Qs, freqs, mus, tau), gaps(Qs, draws, mus, tau)


def floor(Qs, targets, mus, tau, n, gen):
    """The mean sampled gap of the exact targets (each game's NE, or π*_τ) from n answers: what
    sampling noise alone shows for a perfect policy. (K,)."""
    return gaps(Qs, [resample(t, n, DRAWS, gen) for t in targets], mus, tau).mean(1)


def smoothed(counts):
    """μ̂ from the base model's counts, add-½ smoothed: KL(p̂‖μ̂) stays finite."""
    counts = torch.as_tensor(counts, dtype=F64)
    return (counts + 0.5) / (counts.sum() + 0.5 * len(counts))


class WordsTask:
    """The words game (this file's docstring): prompts, an oracle judge, the sampled yardstick."""
    shared = True       # many answers to one long prompt: score each prompt once (prompt_once)

    def __init__(self, tok, tau, max_new_tokens):
        self.tok = tok
        self.names, self.texts, self.moves, examples, Ps = zip(*WORDS)
        self.Q = [with_no_move(P) for P in Ps]
        self.prompts = [few_shot(tok, q, a) for q, a in zip(self.texts, examples)]
        self.vocab = None
        self.stop_ids = tok.stop_ids
        self.tau = tau
        self.length = max_new_tokens
        self.pairs = ()                 # the judge is the rule: no judge check

    def move_of(self, r):
        """Each row's move: a list of B indices (len(moves): no move)."""
        texts = [self.tok.decode(y, skip_special=True) for y in r.response_ids()]
        return [move(t, self.moves[k]) for t, k in zip(texts, r.k.tolist())]

    def judge(self, model, r1, r2, adapters=None, both_orders=False):
        """P(y ≻ y') per pair (B,): the game's P on the two moves."""
        pairs = zip(r1.k.tolist(), self.move_of(r1), self.move_of(r2))
        p = [self.Q[k][i, j].item() for k, i, j in pairs]
        return torch.tensor(p, device=r1.k.device), {}

    def answers(self, model, adapter, n, gen, games=None):
        """n answers to each of `games` (indices; None: every game) at temperature 1, uniforms from
        gen: a Rollout per game (one prompt per call: no padding, no mask)."""
        out = []
        for k in range(len(self.prompts)) if games is None else games:
            u = torch.rand(n, self.length, generator=gen)
            r = generate(
                model,
                [self.prompts[k]] * n,
                self.length,
                adapters=adapter,
                temperature=1.0,
                stop_ids=self.stop_ids,
                pad_id=self.tok.pad_id,
                uniforms=u,
            )
            out.append(Rollout(*r, torch.full((n,), k, device=r[0].device)))
        return out

    def counts(self, r):
        """The counts of a game's moves in a Rollout of its answers, no move last: (n + 1,)."""
        k = int(r.k[0])
        return torch.bincount(torch.tensor(self.move_of(r)), minlength=len(self.moves[k]) + 1)

    @torch.no_grad()
    def measure(self, model, judges, memo, gen):
        """The sampled gaps of each trained adapter (keys of adapter 2 end in "_<name>"), the
        floors, the frequency of no move and the per-token KL(π‖μ). memo (saved with the
        checkpoint) keeps μ̂'s counts and the floors, computed at the first call."""
        out = {}
        if "mu" not in memo:
            memo["mu"] = [self.counts(r).tolist() for r in self.answers(model, None, N_MU, gen)]
            out["games"] = {name: dict(moves=m, P=Q[:-1, :-1].tolist())
                            for name, m, Q in zip(self.names, self.moves, self.Q)}
            out["mu_counts"] = memo["mu"]
        mus = [smoothed(c) for c in memo["mu"]]
        taus = {"gap0": 0.0, "gap": self.tau}
        if "floor" not in memo:
            memo["floor0"] = floor(self.Q, [nash(Q) for Q in self.Q], mus, 0.0, N_SAMPLES, gen)
            stars = [regularized_nash(Q, mu, self.tau) for Q, mu in zip(self.Q, mus)]
            memo["floor"] = floor(self.Q, stars, mus, self.tau, N_SAMPLES, gen)
        for key in ("floor0", "floor"):
            out.update({key: memo[key].mean().item(), f"{key}_games": memo[key].tolist()})
        ends = torch.tensor([0.025, 0.975], dtype=F64)
        for i, a in enumerate(judges):
            end = f"_{a}" if i else ""
            rollouts = self.answers(model, a, N_SAMPLES, gen)
            counts = [self.counts(r) for r in rollouts]
            for key, tau in taus.items():
                each, boot = sampled_gap(self.Q, counts, mus, tau, gen)    # (K,), (K, DRAWS)
                lo, hi = boot.mean(0).quantile(ends)                        # of the mean
                out.update({key + end: each.mean().item(), f"{key}_lo{end}": lo.item(),
                            f"{key}_hi{end}": hi.item()})
                rows = torch.cat([each[:, None], boot.quantile(ends, dim=1).T], 1)  # (K, 3)
                out[f"{key}_games{end}"] = rows.tolist()                    # gap, lo, hi
            none = [c[-1].item() / c.sum().item() for c in counts]
            out["no_move" + end] = sum(none) / len(none)
            out["kl_token" + end] = self.kl(model, a, rollouts)
            out["counts" + end] = [c.tolist() for c in counts]
        return out

    def kl(self, model, adapter, rollouts):
        """The per-token KL(π‖μ) estimate on the first KL_SAMPLES answers of each game."""
        diff, ntok = 0.0, 0
        for r in rollouts:
            r = r.take(slice(0, KL_SAMPLES))
            lp = sequence_logprobs(model, r.tokens, r.mask, r.resp, adapter, shared=True)
            lp_mu = sequence_logprobs(model, r.tokens, r.mask, r.resp, None, shared=True)
            diff += (lp - lp_mu).sum().item()
            ntok += r.resp.sum().item()
        return diff / ntok


def figure(runs, path, shown):
    """plots.words for runs (algorithm -> (yardstick key, log records)): shown's move frequencies
    beside each game's NE, every run's sampled gaps."""
    names = [name for name, *_ in WORDS]
    moves = {name: m for name, _, m, *_ in WORDS}
    targets = {name: nash(with_no_move(P))[:-1].tolist() for name, *_, P in WORDS}
    plots.words(runs, path, shown, {n: moves[n] for n in names}, targets)
