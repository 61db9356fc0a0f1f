"""Tests of the words game (words.py): the parser and the rule judge on crafted answers; the
game with "no move"; the prompts in the model's chat format; the sampled gap's interval covers the
exact gap of a known distribution, and the floor is what the exact NE shows when sampled; the log
alone recomputes every gap; a run resumes bit-exactly (its measurement samples included); a short
run on the real SmolLM2 (skipped cleanly without it)."""
import json

import pytest
import torch

import games
import nano_nash
import train_lm as T
import words
from solvers import F64, nash
from tasks import Rollout
from test_real_model import tiny_llama  # noqa: F401 (a fixture)
from test_train_lm import args
from tokenizer import load_tokenizer

RPSLS = ("rock", "paper", "scissors", "lizard", "spock")
ANSWERS = [  # (answer, its move in rock-paper-scissors-lizard-Spock, or None: no move)
    ("Rock", "rock"),
    ("rock.", "rock"),
    ('"Rock!" I say', "rock"),
    ("**Scissors**", "scissors"),
    ("  paper\n", "paper"),
    ("ROCK", "rock"),
    ("Spock", "spock"),
    ("«Lizard»", "lizard"),
    ("Paper, because it covers rock", "paper"),
    ("Rocks", None),
    ("", None),
    ("\n", None),
    ("Rock-paper", None),
    ("Paper,scissors", None),
    ("I pick rock", None),
    ("The answer is Spock", None),
    ("Rockets", None),
    ("spöck", None),
]


@pytest.mark.parametrize("text, want", ANSWERS)
def test_the_first_word_is_the_move(text, want):
    assert words.move(text, RPSLS) == (RPSLS.index(want) if want else len(RPSLS))


def test_no_move_loses_to_every_move_and_ties_itself():
    """with_no_move: P in the corner, no move loses to each move, ties with itself; the game is
    still a preference game (P + Pᵀ = 1), and its NE is P's with no move never played."""
    for _, _, moves, _, P in words.WORDS:
        Q = words.with_no_move(P)
        n = len(moves)
        assert torch.equal(Q[:n, :n], P) and torch.equal(Q + Q.T, torch.ones_like(Q))
        assert (Q[n, :n] == 0).all() and Q[n, n] == 0.5
        ne = nash(Q)
        assert ne[n] < 1e-9
        torch.testing.assert_close(ne[:n], nash(P), atol=1e-7, rtol=0)
    assert nash(words.with_no_move(games.weighted_cycle().P))[:3].tolist() == pytest.approx(
        [1 / 3, 1 / 2, 1 / 6], abs=1e-7)


@pytest.fixture(scope="module")
def task(tiny_llama):       # noqa: F811 (the fixture imported above)
    return words.WordsTask(load_tokenizer(tiny_llama), tau=0.1, max_new_tokens=3)


def rollout(task, k, answers):
    """A Rollout of these answers to game k: their ids, the end of the turn after each."""
    ids = [task.tok.encode(a, dummy_prefix=False) + [task.tok.eos_id] for a in answers]
    width = max(map(len, ids))
    tokens = torch.full((len(ids), width), task.tok.pad_id)
    resp = torch.zeros_like(tokens)
    for b, row in enumerate(ids):
        tokens[b, width - len(row):] = torch.tensor(row)
        resp[b, width - len(row):] = 1
    return Rollout(tokens, resp.clone(), resp, torch.full((len(ids),), k))


def test_the_judge_is_the_rule(task):
    """P(y ≻ y') is the game's P on the two answers' moves: rock beats scissors, a move beats no
    move, no move ties no move, the weighted cycle's margins; the judge never reads more than the
    first word."""
    r1 = rollout(task, 0, ["Rock!", "Paper", "sure", "I think rock", "scissors"])
    r2 = rollout(task, 0, ["scissors", "paper.", "Rock", "no idea", "Rock beats scissors"])
    pref, _ = task.judge(None, r1, r2)
    assert pref.tolist() == [1.0, 0.5, 0.0, 0.5, 0.0]
    r1 = rollout(task, 1, ["Water", "Fire", "Grass", "Grass"])
    r2 = rollout(task, 1, ["fire", "grass", "water", "Grassland"])
    assert task.judge(None, r1, r2)[0].tolist() == pytest.approx([0.6, 0.7, 0.8, 1.0])
    r1 = rollout(task, 2, ["Spock", "Lizard", "Paper"])
    r2 = rollout(task, 2, ["rock", "spock", "Spock!"])
    assert task.judge(None, r1, r2)[0].tolist() == [1.0, 1.0, 1.0]


def test_prompts_are_chats_in_the_models_format(tiny_llama):  # noqa: F811
    """few_shot: the user asks, the assistant answers each worked example, the user asks again,
    in ChatML, with the control tokens from ids: the same ids as `tokenizers` gives the written
    chat (it parses the control tokens out of the text)."""
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    tok = load_tokenizer(tiny_llama)
    ids = words.few_shot(tok, "Rock, paper or scissors?", ["Scissors", "Rock"])
    turn = "<|im_start|>user\nRock, paper or scissors?<|im_end|>\n<|im_start|>assistant\n"
    text = f"{turn}Scissors<|im_end|>\n{turn}Rock<|im_end|>\n{turn}"
    assert ids == reference.encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------------------------------
# the yardstick

def counts_of(p, n, gen):
    return torch.bincount(torch.multinomial(p.float(), n, True, generator=gen), minlength=len(p))


def test_the_interval_covers_the_exact_gap():
    """The sampled DualGap_0 and DualGap_τ of N = 256 answers from a known policy per game, over 100
    repetitions: the bootstrap 95% interval of the mean over the games covers the exact gap in at
    least 85% of them (a policy away from the NE: the gap is smooth there)."""
    Qs = [words.with_no_move(P) for *_, P in words.WORDS]
    pis = [torch.tensor(p, dtype=F64) for p in
           ([.24, .07, .07, .62], [.08, .11, .35, .46], [.03, .09, .01, .07, .25, .55])]
    mus = [words.smoothed(torch.tensor(p) * 512) for p in
           ([.3, .1, .2, .4], [.1, .2, .3, .4], [.1, .1, .1, .1, .2, .4])]
    gen = torch.Generator().manual_seed(0)
    for tau in (0.0, 0.1):
        exact = words.gaps(Qs, pis, mus, tau).mean().item()
        covered = 0
        for _ in range(100):
            counts = [counts_of(p, 256, gen) for p in pis]
            _, boot = words.sampled_gap(Qs, counts, mus, tau, gen)
            lo, hi = boot.mean(0).quantile(torch.tensor([0.025, 0.975], dtype=F64))
            covered += bool(lo <= exact <= hi)
        assert covered >= 85, (tau, covered)


def test_the_floor_is_the_sampled_ne():
    """floor: the mean sampled DualGap_0 of the exact NE, N answers. It is > 0 (the exact NE has gap
    0: noise alone puts it there), equals a direct Monte Carlo of the statistic, and falls like
    1/√N."""
    Qs = [words.with_no_move(P) for *_, P in words.WORDS]
    ne = [nash(Q) for Q in Qs]
    mus = [torch.full((len(Q),), 1 / len(Q), dtype=F64) for Q in Qs]
    gen = torch.Generator().manual_seed(0)
    f256 = words.floor(Qs, ne, mus, 0.0, 256, gen)
    f1024 = words.floor(Qs, ne, mus, 0.0, 1024, gen)
    assert (nano_nash.duality_gap(Qs[0], ne[0]) < 1e-9) and (f256 > 0.02).all()
    direct = torch.stack([torch.tensor([
        nano_nash.duality_gap(Q, counts_of(p, 256, gen).double() / 256).item()
        for _ in range(2000)]).mean() for Q, p in zip(Qs, ne)])
    torch.testing.assert_close(f256, direct.double(), atol=0.0, rtol=0.08)
    assert ((f256 / f1024) - 2).abs().max() < 0.3


# --------------------------------------------------------------------------------------------------
# runs

def run(weights, tmp_path, *extra):
    """A short words run (INPO, the default) on `weights`: its log."""
    flags = args(["--model", "smollm2", "--weights", weights, "--out_dir", tmp_path / "out",
                  "--max_steps", 4, "--log_every", 2, "--save_every", 2, "--samples", 2,
                  "--no-cosine", *extra])
    return T.main(flags)["inpo"]


def timeless(records):
    return [{k: v for k, v in r.items() if k not in ("tok_s", "s_step")} for r in records]


def test_the_log_alone_recomputes_every_gap(tiny_llama, tmp_path):  # noqa: F811
    """A words run on a tiny Llama: its first record holds each game's moves and P and μ̂'s
    counts, every measured record the counts; from these alone, every logged gap (DualGap_0,
    DualGap_τ, each game's and their mean) comes out again."""
    logs = run(tiny_llama, tmp_path)
    first = logs[0]
    Qs = [words.with_no_move(torch.tensor(g["P"], dtype=F64)) for g in first["games"].values()]
    assert [g["moves"] for g in first["games"].values()] == [list(m) for *_, m, _, _ in
                                                              words.WORDS]
    mus = [words.smoothed(c) for c in first["mu_counts"]]
    measured = [r for r in logs if "counts" in r]
    assert [r["step"] for r in measured] == [0, 2, 4]
    for r in measured:
        freqs = [torch.tensor(c, dtype=F64) / sum(c) for c in r["counts"]]
        for key, tau in (("gap0", 0.0), ("gap", first["tau"])):
            each = words.gaps(Qs, freqs, mus, tau)
            assert r[key] == pytest.approx(each.mean().item(), abs=1e-12)
            assert [g[0] for g in r[key + "_games"]] == pytest.approx(each.tolist(), abs=1e-12)
            assert r[key + "_lo"] <= r[key + "_hi"]
        assert sum(map(sum, r["counts"])) == 3 * words.N_SAMPLES
    plot = tmp_path / "out" / "inpo" / "plot.png"
    assert plot.stat().st_size > 10_000


def test_seeds_table_gives_medians_and_ranges(tmp_path, capsys):
    """plan.py's table over run folders: each algorithm by its own yardstick (INPO DualGap_τ, LANA
    DualGap_0), from the first record and the last measured one, median and range over seeds."""
    import plan
    for seed, (start, end) in enumerate([(0.3, 0.1), (0.4, 0.05), (0.2, 0.1)]):
        for algo, key in (("inpo", "gap"), ("lana", "gap0"))[:2 if seed < 2 else 1]:
            folder = tmp_path / str(seed) / algo                  # LANA: the first 2 seeds
            folder.mkdir(parents=True)
            first = {"step": 0, "gap": 0.9, "gap0": 0.6, "no_move": 0.5, "kl_token": 0.0}
            last = {"step": 9, "gap": 0.9, "gap0": 0.3, "no_move": seed / 10, "kl_token": 0.2}
            first[key], last[key] = start, end
            recs = [first, last, {"step": 9, "loss": 1.0}]
            folder.joinpath("log.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
    plan.seeds_table(sorted(str(p) for p in tmp_path.iterdir()))
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows[0] == ("| inpo (3) | DualGap_τ | 0.300 (0.200-0.400) | 0.100 (0.050-0.100) | "
                       "3.000 (2.000-8.000) | 0.300 (0.300-0.300) | 0.100 (0.000-0.200) | "
                       "0.200 (0.200-0.200) |")
    assert rows[1] == ("| lana (2) | DualGap_0 | 0.350 (0.300-0.400) | 0.075 (0.050-0.100) | "
                       "5.500 (3.000-8.000) | 0.075 (0.050-0.100) | 0.050 (0.000-0.100) | "
                       "0.200 (0.200-0.200) |")


def test_eval_shows_answers_side_by_side_and_the_fluency_cost(tiny_llama, tmp_path):  # noqa: F811
    """--eval on a words run: 20 answers per game of the base and of the trained policy (a table in
    eval/words.md), and the base's NLL per token of the answers to 20 chat prompts, before and
    after; the same command twice gives the same numbers."""
    run(tiny_llama, tmp_path, "--max_steps", 1, "--lr", 0.05)
    first = T.main(args(["--model", "smollm2", "--weights", tiny_llama, "--out_dir",
                         tmp_path / "out", "--eval"]))["inpo"]
    table = (tmp_path / "out" / "inpo" / "eval" / "words.md").read_text().splitlines()
    assert len(table) == 2 + 3 * 20 and table[2].startswith("| rps |")
    assert first["prompts"] == 20 and 0 < first["nll_before"] != first["nll_after"] > 0
    again = T.main(args(["--model", "smollm2", "--weights", tiny_llama, "--out_dir",
                         tmp_path / "out", "--eval"]))["inpo"]
    assert again == first


@pytest.mark.parametrize("flags, message", [
    (["--model", "tiny", "--task", "words"], "--task words is not one for --model tiny"),
    (["--model", "smollm2", "--task", "words", "--judge_check"], "the words game's judge is"),
    (["--model", "smollm2", "--task", "play"], "unknown --task 'play'; choose toy or chat or"),
    (["--model", "phi3", "--task", "toy"], "--task toy is not one for --model phi3"),
])
def test_words_flags_in_one_line(flags, message):
    with pytest.raises(T.UserError, match=message):
        T.main(args(flags))


def test_a_resumed_run_is_bit_identical(tiny_llama, tmp_path):  # noqa: F811
    """4 steps straight, or 2 then --resume: the same log (its measurement samples come from their
    own generator, saved with the checkpoint) and the same adapters. (One thread: with two, this
    CPU's BLAS rounds differently from call to call, by 1e-7.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed_and_straight(tiny_llama, tmp_path)
    finally:
        torch.set_num_threads(threads)


def resumed_and_straight(tiny_llama, tmp_path):  # noqa: F811
    straight = run(tiny_llama, tmp_path / "a", "--log_every", 1)
    run(tiny_llama, tmp_path / "b", "--max_steps", 2, "--log_every", 1)
    resumed = run(tiny_llama, tmp_path / "b", "--resume", "--log_every", 1)
    assert timeless(resumed) == timeless(straight)
    a = tmp_path / "a" / "out" / "inpo" / "ckpt_000004" / "policy" / "adapter_model.safetensors"
    b = tmp_path / "b" / "out" / "inpo" / "ckpt_000004" / "policy" / "adapter_model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_words_on_smollm2(smollm2_dir, tmp_path):
    """2 steps of the default run on the real model: the base plays in some answers and not in
    others, and every gap is finite and above its floor's order."""
    logs = run(smollm2_dir, tmp_path, "--max_steps", 2)
    first = logs[0]
    assert 0.1 < first["no_move"] < 0.9
    assert all(0 < first[k] < 1 for k in ("gap0", "gap", "floor0", "floor"))
    assert json.loads(json.dumps(logs)) == logs
