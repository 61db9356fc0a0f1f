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
with each move twice (few_shot): without these worked examples SmolLM2 plays in about 5% of its
answers, with them in 78-94% (README). rps and elements answer in lower case, rpsls with
capitals: with capitals the base rarely plays rock in rps, and in lower case it answers rpsls
with the question's last word, rock, most of the time (README).

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
from tasks import Rollout, turn_break

WORDS = [  # (name, the question, its moves (lower case), the assistant's earlier answers, P)
    ("rps", "Rock, paper or scissors?", ("rock", "paper", "scissors"),
     ("scissors", "paper", "rock", "scissors", "rock", "paper"), games.rps().P),
    ("elements", "Water, fire or grass?", ("water", "fire", "grass"),
     ("fire", "grass", "water", "grass", "fire", "water"), games.weighted_cycle().P),
    ("rpsls", "Paper, lizard, Spock, scissors or rock?",
     ("rock", "paper", "scissors", "lizard", "spock"),
     ("Rock", "Spock", "Scissors", "Lizard", "Paper") * 2, games.rpsls().P),
]
N_SAMPLES = 256     # answers per game and adapter at every logged step
N_MU = 512          # answers per game of the base model, once (μ̂)
KL_SAMPLES = 64     # of them, those the KL estimate scores (twice: under π and μ)
DRAWS = 1000        # bootstrap draws of an interval, and draws of a floor
ENDS = torch.tensor([0.025, 0.975], dtype=F64)     # the quantiles of a 95% interval


def first_word(text):
    """The answer's first word, lower case, its punctuation removed: '"Rock!" I say' -> 'rock'."""
    words = text.split()
    if not words:
        return ""
    letters = []
    for c in words[0]:
        if not unicodedata.category(c).startswith("P"):
            letters.append(c)
    return "".join(letters).lower()


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
    and the assistant gave it, then asks again; each answer's turn closes as tasks.turn_break
    says."""
    q = tok.encode(question)
    ids = tok.chat(q)
    for a in answers:
        ids += tok.encode(a, dummy_prefix=False) + turn_break(tok) + q + tok.tail
    return ids


# --------------------------------------------------------------------------------------------------
# the sampled yardstick

def resample(freqs, n, draws, gen):
    """`draws` frequency vectors of n draws from freqs (m,): (draws, m), float64."""
    idx = torch.multinomial(freqs.float(), n * draws, replacement=True, generator=gen)
    idx = idx.view(draws, n)
    ones = torch.ones(draws, n, dtype=F64)
    counts = torch.zeros(draws, len(freqs), dtype=F64)
    return counts.scatter_add_(1, idx, ones) / n


def gaps(Qs, freqs, mus, tau):
    """DualGap_τ of each game's frequencies (..., m_k) against μ̂ (τ = 0: DualGap_0): (K, ...)."""
    each = []
    for Q, f, mu in zip(Qs, freqs, mus):
        each.append(nano_nash.duality_gap(Q, f, mu, tau))
    return torch.stack(each)


def sampled_gap(Qs, counts, mus, tau, gen):
    """The gap of each game's move counts (K,), and of DRAWS bootstrap draws of as many answers
    from their frequencies (K, DRAWS): the logged gap and its interval come from these."""
    n = int(counts[0].sum())                        # answers per game
    freqs = [c.double() / n for c in counts]
    draws = [resample(f, n, DRAWS, gen) for f in freqs]
    return gaps(Qs, freqs, mus, tau), gaps(Qs, draws, mus, tau)


def floor(Qs, targets, mus, tau, n, gen):
    """The mean sampled gap of the exact targets (each game's NE, or π*_τ) from n answers: what
    sampling noise alone shows for a perfect policy. (K,)."""
    draws = [resample(t, n, DRAWS, gen) for t in targets]
    return gaps(Qs, draws, mus, tau).mean(1)


def smoothed(counts):
    """μ̂ from the base model's counts, add-½ smoothed: KL(p̂‖μ̂) stays finite."""
    counts = torch.as_tensor(counts, dtype=F64)
    return (counts + 0.5) / (counts.sum() + 0.5 * len(counts))


class WordsTask:
    """The words game (this file's docstring): prompts, an oracle judge, the sampled yardstick."""
    shared = True       # many answers to one long prompt: score it once (sequence_logprobs)

    def __init__(self, tok, tau, max_new_tokens):
        self.tok = tok
        self.names, self.texts, self.moves, examples, Ps = zip(*WORDS)
        self.Q = [with_no_move(P) for P in Ps]
        self.prompts = []
        for question, answers in zip(self.texts, examples):
            self.prompts.append(few_shot(tok, question, answers))
        self.vocab = None
        self.stop_ids = tok.stop_ids
        self.tau = tau
        self.length = max_new_tokens

    def move_of(self, r):
        """Each row's move: a list of B indices (len(moves): no move)."""
        out = []
        for y, k in zip(r.response_ids(), r.k.tolist()):
            text = self.tok.decode(y, skip_special=True)
            out.append(move(text, self.moves[k]))
        return out

    def judge(self, model, r1, r2, adapters=None, both_orders=False):
        """P(y ≻ y') per pair (B,): the game's P on the two moves."""
        p = []
        first, second = self.move_of(r1), self.move_of(r2)
        for k, i, j in zip(r1.k.tolist(), first, second):
            p.append(self.Q[k][i, j].item())
        return torch.tensor(p, device=r1.k.device), {}

    def answers(self, model, adapter, n, gen):
        """n answers to each game at temperature 1, uniforms from gen: a Rollout per game (one
        prompt per call: no padding, no mask)."""
        out = []
        for k, prompt in enumerate(self.prompts):
            u = torch.rand(n, self.length, generator=gen)
            t, m, r = generate(
                model,
                [prompt] * n,
                self.length,
                adapters=adapter,
                temperature=1.0,
                stop_ids=self.stop_ids,
                pad_id=self.tok.pad_id,
                uniforms=u,
            )
            k = torch.full((n,), k, device=t.device)
            out.append(Rollout(t, m, r, k))
        return out

    def counts(self, r):
        """The counts of a game's moves in a Rollout of its answers, no move last: (m + 1,)."""
        moves = torch.tensor(self.move_of(r))
        m = len(self.moves[r.k[0]])
        return torch.bincount(moves, minlength=m + 1)

    def start(self, model, memo, gen):
        """The first measurement: μ̂'s counts (the base's N_MU answers per game), the floors, and
        what the log needs to recompute every gap (each game's moves and P). -> the first record's
        extra keys."""
        base = self.answers(model, None, N_MU, gen)
        memo["mu"] = [self.counts(r).tolist() for r in base]
        mus = [smoothed(c) for c in memo["mu"]]
        ne = [nash(Q) for Q in self.Q]
        stars = [regularized_nash(Q, mu, self.tau) for Q, mu in zip(self.Q, mus)]   # π*_τ
        floor0 = floor(self.Q, ne, mus, 0.0, N_SAMPLES, gen)
        floor_tau = floor(self.Q, stars, mus, self.tau, N_SAMPLES, gen)
        memo["floor0"] = floor0.tolist()
        memo["floor"] = floor_tau.tolist()
        games = {}
        for name, moves, Q in zip(self.names, self.moves, self.Q):
            P = Q[:-1, :-1]
            games[name] = dict(moves=moves, P=P.tolist())
        return dict(games=games, mu_counts=memo["mu"], tau=self.tau)

    @torch.no_grad()
    def measure(self, model, judges, memo, gen):
        """The sampled gaps of each trained adapter (keys of adapter 2 end in "_<name>"), the
        floors, the frequency of no move and the per-token KL(π‖μ). memo (saved with the
        checkpoint) keeps μ̂'s counts and the floors (start)."""
        out = self.start(model, memo, gen) if "mu" not in memo else {}
        mus = [smoothed(c) for c in memo["mu"]]
        for key in ("floor0", "floor"):
            out[key] = sum(memo[key]) / len(memo[key])
            out[key + "_games"] = memo[key]
        for i, a in enumerate(judges):
            end = f"_{a}" if i else ""
            rollouts = self.answers(model, a, N_SAMPLES, gen)
            counts = [self.counts(r) for r in rollouts]
            for key, tau in (("gap0", 0.0), ("gap", self.tau)):
                each, boot = sampled_gap(self.Q, counts, mus, tau, gen)    # (K,), (K, DRAWS)
                lo, hi = boot.mean(0).quantile(ENDS)                        # of the mean
                out[key + end] = each.mean().item()
                out[f"{key}_lo{end}"] = lo.item()
                out[f"{key}_hi{end}"] = hi.item()
                lo, hi = boot.quantile(ENDS, dim=1)                         # of each game's
                per_game = torch.stack([each, lo, hi], 1)                   # (K, 3)
                out[f"{key}_games{end}"] = per_game.tolist()
            none = [c[-1] / c.sum() for c in counts]
            out["no_move" + end] = (sum(none) / len(none)).item()
            out["kl_token" + end] = self.kl(model, a, rollouts)
            out["counts" + end] = [c.tolist() for c in counts]
        return out

    def kl(self, model, adapter, rollouts):
        """The per-token KL(π‖μ) estimate on the first KL_SAMPLES answers of each game."""
        diff, ntok = 0.0, 0
        for r in rollouts:
            r = r.take(slice(0, KL_SAMPLES))
            seqs = r.tokens, r.mask, r.resp
            lp = sequence_logprobs(model, *seqs, adapter, shared=True)
            lp_mu = sequence_logprobs(model, *seqs, None, shared=True)
            diff += (lp - lp_mu).sum().item()
            ntok += r.resp.sum().item()
        return diff / ntok


def figure(runs, path, shown):
    """plots.words for runs (algorithm -> log records): shown's moves beside each game's NE,
    every run's sampled gaps."""
    moves = {}
    targets = {}
    for name, _, m, _, P in WORDS:
        moves[name] = m
        targets[name] = nash(with_no_move(P))[:-1].tolist()
    plots.words(runs, path, shown, moves, targets)
