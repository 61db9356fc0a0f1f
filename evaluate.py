"""
evaluate.py: how good a real run is, and how good its judge is.

    python train_lm.py --model phi3 --eval            # the trained policy's win rate vs the base
    python train_lm.py --model smollm2 --judge_check  # the judge on labelled pairs

--eval: on the held-out prompts (every 10th; toy: the games), the trained policy's response and the
base's (drawn with the same uniforms) are judged by the base in both orders (toy: by P). Prints the
win rate with a 95% CI and writes AlpacaEval JSON ({instruction, output, generator}) to <run>/eval/.

--judge_check: a self-judged run is only as good as its judge, and a small model may read the
position and format of the responses rather than their content. So before compute is spent (and
at the start of every real run) the base model judges labelled pairs (data/judge_pairs.jsonl: a
question, a clearly right answer, a clearly wrong one), each in both orders, with the judge prompt
of training (tasks.JUDGE).
"""
import json
import math

import torch

import identity
import nano_nash
from cli import UserError
from runs import Run
from model import generate, sequence_logprobs
from tasks import JUDGE, ROOT, SelfJudge, load_prompts, setup
from train_lm import ALGOS, sample
from weights import CheckpointError, load_adapter


SIDE = 20             # the words game's --eval: answers per game, of the base and of the policy
FLUENCY = 20          # ... and the chat prompts whose answers the base scores
FLUENCY_TOKENS = 48   # ... of at most this many tokens


@torch.no_grad()
def evaluate(cfg, path):
    """The win rate of the run in `path` (its first adapter) against the base: the results.
    The run's folder is locked (shared) meanwhile: no run writes it."""
    with Run(path, {}, [], resume=True, writer=False, reader=True) as run:
        return win_rate(cfg, path, run)


def win_rate(cfg, path, run):
    player = ALGOS[cfg.algo].adapters[0]
    if run.latest() is None:
        raise UserError(f"--eval: no checkpoint in {path}; train first with the same --out_dir "
                        "and --algo")
    model, task, _ = setup(cfg, held_out=True)
    identity.check(run.manifest.get("config", {}), identity.of(model, task.tok), "--eval")
    try:
        load_adapter(model, player, run.latest() / player)
    except CheckpointError as e:
        raise UserError(f"--eval: {e}") from None
    if cfg.task == "words":
        return words_eval(cfg, path, model, task, player)
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(cfg.seed)
    ks = torch.arange(len(task.prompts), device=device)
    ks = ks.repeat_interleave(cfg.samples)
    prefs, rows = [], []
    for k in ks.split(cfg.batch_size * cfg.samples):
        u = torch.rand(len(k), 1, cfg.max_new_tokens, generator=gen, device=device)
        ours = sample(model, task, cfg, k, player, u)
        base = sample(model, task, cfg, k, None, u)
        pref, _ = task.judge(model, ours, base, None, True)
        prefs.append(pref.cpu())
        for b, i in enumerate(k.tolist()):
            ids = [r.tokens[b][r.resp[b].bool()] for r in (ours, base)]
            texts = [plain(task.tok, x.tolist()) for x in ids]
            rows.append((task.texts[i], *(t.strip() for t in texts)))
    pref = torch.cat(prefs).double()
    n = len(pref)
    m = pref.mean().item()
    half = 1.96 * pref.std().item() / math.sqrt(n) if n > 1 else 0.0
    result = dict(
        checkpoint=str(run.latest()),
        win_rate=m,
        ci95=[m - half, m + half],
        n=n,
    )
    ours = [dict(instruction=x, output=a, generator=path.name) for x, a, _ in rows]
    base = [dict(instruction=x, output=b, generator="base") for x, _, b in rows]
    files = {
        "model_outputs.json": ours,
        "reference_outputs.json": base,
        "results.json": result,
    }
    out = path / "eval"
    write(out, files)
    print(f"{path.name}: win rate vs the base {m:.3f} (95% CI {m - half:.3f}..{m + half:.3f}, "
          f"n = {n}); AlpacaEval JSON in {out}")
    return result


def write(out, files):
    """Write {name: object} as JSON (a str as it is) into the folder out; a failure is one line."""
    try:
        out.mkdir(exist_ok=True)
        for name, obj in files.items():
            text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, ensure_ascii=False)
            (out / name).write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); free space or fix permissions, "
                        "then run --eval again") from None


def answers(model, tok, prompts, adapter, n, u):
    """One answer per prompt at temperature 1 (uniforms u): the Rollout's (tokens, mask, resp) and
    the texts."""
    t, m, r = generate(model, prompts, n, adapters=adapter, temperature=1.0,
                       stop_ids=tok.stop_ids, pad_id=tok.pad_id, uniforms=u)
    texts = [plain(tok, row[keep.bool()].tolist()).strip() for row, keep in zip(t, r)]
    return (t, m, r), texts


def words_eval(cfg, path, model, task, player):
    """The words game's --eval: SIDE answers per game of the base and of the trained policy, drawn
    with the same uniforms, side by side; and what the training cost in fluency: the base model's
    per-token negative log-likelihood of the answers (FLUENCY_TOKENS new tokens, temperature 1)
    to the first FLUENCY ordinary chat prompts of data/prompts.jsonl, the base's own answers
    (before) and the trained policy's (after). Writes <run>/eval/words.md and results.json."""
    gen = torch.Generator().manual_seed(cfg.seed)
    lines = ["| game | base | trained |", "|---|---|---|"]
    for name, prompt in zip(task.names, task.prompts):
        u = torch.rand(SIDE, cfg.max_new_tokens, generator=gen)
        pair = [answers(model, task.tok, [prompt] * SIDE, a, cfg.max_new_tokens, u)[1]
                for a in (None, player)]
        lines += [f"| {name} | {b!r} | {t!r} |" for b, t in zip(*pair)]
    chats = load_prompts(ROOT / "data" / "prompts.jsonl")[:FLUENCY]
    prompts = [task.tok.chat(task.tok.encode(c)) for c in chats]
    u = torch.rand(len(prompts), FLUENCY_TOKENS, generator=gen)
    nll = {}
    for who, a in (("before", None), ("after", player)):
        (t, m, r), _ = answers(model, task.tok, prompts, a, FLUENCY_TOKENS, u)
        lp = sequence_logprobs(model, t, m, r, None)
        nll[who] = (-lp.sum() / r.sum()).item()
    result = dict(nll_before=nll["before"], nll_after=nll["after"], prompts=len(prompts))
    write(path / "eval", {"words.md": "\n".join(lines) + "\n", "results.json": result})
    print("\n".join(lines))
    print(f"{path.name}: the base's NLL per token of answers to {len(prompts)} chat prompts: "
          f"{nll['before']:.3f} (the base's own) -> {nll['after']:.3f} (the trained policy's); "
          f"in {path / 'eval'}")
    return result


def plain(tok, ids):
    """A response as text: without any control id, flagged special or not (Phi-3's </s> is not;
    decode(skip_special=True) would keep it as the text "</s>")."""
    return tok.decode([i for i in ids if i not in tok.special_ids])


# --------------------------------------------------------------------------------------------------
# the judge check

def wilson(p, n, z=1.96):
    """The 95% Wilson score interval of a proportion p out of n (good at small n and near 0, 1)."""
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


@torch.no_grad()
def judge_check(model, task, cfg):
    """The base model as a judge (JUDGE, as in training) on the labelled pairs, each shown in both
    orders. A pair is judged right when P(good ≻ bad), averaged over the orders, is above 1/2 (a
    tie, 1/2 exactly, counts half). Prints and returns:
      accuracy, ci95      the share judged right, with its 95% Wilson interval
      position_bias       mean P(answer "1") − 1/2 (a judge that always says "1": 0.5)
      orders_disagree     the share of pairs whose winner depends on the order
    and warns when the interval includes 1/2: the judge is not shown to beat a coin."""
    tok, pairs = task.tok, task.pairs
    user = [tok.encode(p["prompt"])[:cfg.max_prompt_tokens] for p in pairs]
    good = [tok.encode(p["good"]) for p in pairs]
    bad = [tok.encode(p["bad"]) for p in pairs]
    judge = SelfJudge(tok, user, JUDGE)
    longest = max(len(judge.ids(k, good[k], bad[k])) for k in range(len(pairs)))
    if longest > model.config.block_size:
        raise UserError(f"a judge prompt of the labelled pairs takes {longest} tokens, more than "
                        f"the model's context {model.config.block_size}; shorten the pairs")
    shown, swapped = [], []                     # the logits of "1", "2": good first, bad first
    for ks in torch.arange(len(pairs)).split(16):
        g = [good[k] for k in ks]
        b = [bad[k] for k in ks]
        shown.append(judge.logits(model, ks, g, b, None).float().cpu())
        swapped.append(judge.logits(model, ks, b, g, None).float().cpu())
    shown, swapped = torch.cat(shown), torch.cat(swapped)
    _, stats = nano_nash.judge_preference(shown, swapped)
    # σ(a) + σ(b) > 1 exactly when a + b > 0: the mean over the orders is above 1/2 when the
    # margins for "good" add up to more than 0 (so a tie is exact, with no rounding of σ)
    margin = (shown[:, 0] - shown[:, 1]) + (swapped[:, 1] - swapped[:, 0])
    right = (margin > 0).double() + 0.5 * (margin == 0).double()
    n = len(pairs)
    accuracy = right.mean().item()
    lo, hi = wilson(accuracy, n)
    result = dict(
        accuracy=accuracy,
        ci95=[lo, hi],
        position_bias=stats["position_bias"].item(),
        orders_disagree=stats["orders_disagree"].item(),
        n=n,
    )
    print(f"judge check ({n} labelled pairs, both orders): accuracy "
          f"{accuracy:.3f} (95% CI {lo:.3f}..{hi:.3f}), position bias "
          f"{result['position_bias']:+.3f}, orders disagree {result['orders_disagree']:.3f}")
    if lo <= 0.5 <= hi:
        print("warning: the judge is not shown to beat a coin (its 95% interval includes 50%): "
              "its preferences may follow position or format, not content")
    return result
