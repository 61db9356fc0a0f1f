"""
tasks.py: what train_lm.py trains on: three tasks behind one interface, so the loop and the steps
read the same.
    task.prompts, task.texts    chat-formatted token ids and the texts, one per prompt
    task.vocab, task.stop_ids   the ids responses are drawn from (None: all), and those that end
                                them
    task.shared                 score each distinct prompt once (model.sequence_logprobs)
    task.judge(model, r1, r2, adapters, both_orders) -> (P(y ≻ y') per pair (B,), stats)
    task.measure(model, judges, memo, gen)
                                -> the yardstick: exact duality gaps (toy), sampled ones (words),
                                or {}; memo and gen travel in the checkpoint
ToyTask  (--model tiny): a tiny random Phi-3 answers 4 prompts with L tokens from {a, b, c}; each
         prompt is a game from games.py, whose P judges; the policy can be enumerated, so its
         duality gap is exact.
WordsTask (words.py, --model smollm2's default): a real chat model answers in its own words; the
         first word is a move in a game from games.py, whose P judges; the gaps are sampled.
ChatTask (--task chat, or --prompts FILE; --model phi3's default): real prompts; the LM reads a
         judge prompt and answers "1" or "2" (SelfJudge), from ids in its own chat format.
"""
import json
import os
from itertools import product
from pathlib import Path
from typing import NamedTuple

import torch

import games
import nano_nash
from identity import fingerprint
from model import GPT, GPTConfig, left_pad, sequence_logprobs
from cli import UserError
from tokenizer import load_tokenizer, tiny_tokenizer
from weights import find_checkpoint, load_model, model_name, read_config

ROOT = Path(__file__).resolve().parent


class Rollout(NamedTuple):
    """Sampled responses: tokens, mask, resp (B, T) as generate returns them; k (B,) their
    prompts."""
    tokens: torch.Tensor
    mask: torch.Tensor
    resp: torch.Tensor
    k: torch.Tensor

    def take(self, i):
        return Rollout(*(t[i] for t in self))

    def response_ids(self):
        """Each row's response, as a list of ids."""
        return [t[r.bool()].tolist() for t, r in zip(self.tokens, self.resp)]


class ToyTask:
    """4 prompts, each its own game over the n = 3^L responses {a,b,c}^L. L = 1:
    rock-paper-scissors, Gardner's dice, a weighted cycle, NLHF's 3-type game; L ≥ 2: random
    games. The judge is the game's P (an oracle; with label noise ε the game is
    P_ε = ε + (1 − 2ε) P), or with self_judge the model itself reading TOY_JUDGE (selfjudge.py
    teaches it). μ: the model's policy, adapters off."""
    def __init__(self, cfg, self_judge=False):
        L = cfg.max_new_tokens
        self.tok = tiny_tokenizer()
        if L == 1:
            self.texts = ["RPS:", "Dice:", "Cycle:", "NLHF:"]
            gs = [games.rps(), games.dice(), games.weighted_cycle(), games.nlhf3()]
        else:
            self.texts = ["A:", "B:", "C:", "D:"]
            gs = [games.random_game(3 ** L, cfg.seed + k) for k in range(4)]
        self.user = [self.tok.encode(t) for t in self.texts]
        self.prompts = [self.tok.chat(u) for u in self.user]
        self.stop_ids = ()
        self.vocab = torch.tensor([self.tok.encode(c)[0] for c in "abc"])
        eps = cfg.label_noise
        self.P = eps + (1 - 2 * eps) * torch.stack([g.P for g in gs])        # (K, n, n)
        self.L = L
        self.tau = cfg.tau
        self.judge = SelfJudge(self.tok, self.user, TOY_JUDGE) if self_judge else self.oracle
        self.shared = False             # prompts of a few tokens: nothing to share

    def actions(self, r):
        """Each row's response as an index in {a,b,c}^L (base 3): (B,)."""
        vocab = self.vocab.to(r.tokens.device)
        last = r.tokens[:, -self.L:, None]                          # (B, L, 1)
        digits = (last == vocab).long().argmax(-1)                  # (B, L): 0, 1, 2 for a, b, c
        powers = 3 ** torch.arange(self.L - 1, -1, -1, device=digits.device)
        return (digits * powers).sum(-1)

    def oracle(self, model, r1, r2, adapters=None, both_orders=False):
        p = self.P[r1.k.cpu(), self.actions(r1).cpu(), self.actions(r2).cpu()]
        return p.float().to(r1.k.device), {}

    def responses(self):                                          # {a,b,c}^L in base-3 order
        return [list(y) for y in product(self.vocab.tolist(), repeat=self.L)]

    @torch.no_grad()
    def policy(self, model, adapter):
        """The exact table π(y | x_k): (K, n), float64. One forward over all K·n
        prompt-response sequences."""
        seqs = [p + y for p in self.prompts for y in self.responses()]
        tokens, mask = left_pad(seqs, self.tok.pad_id)
        resp = torch.zeros_like(mask)
        resp[:, -self.L:] = 1
        dev = model.lm_head.weight.device
        logp = sequence_logprobs(
            model, tokens.to(dev), mask.to(dev), resp.to(dev), adapter, self.vocab
        )
        return logp.double().exp().view(len(self.prompts), -1).cpu()

    @torch.no_grad()
    def measure(self, model, judges, avg, gen=None):
        """judges: trained adapter -> the adapter judging it. For each, the mean DualGap_τ (to
        π*_τ) and DualGap_0 (to the NE) of its policy and of its average iterate (the mean of the
        tables logged so far; avg is updated in place), and a self-judge's error |P̂ − P|. Keys of
        adapter 2 end in "_<name>"."""
        mu = self.policy(model, None)
        out = {}
        for i, (a, judge) in enumerate(judges.items()):
            pi = self.policy(model, a)
            total, n = avg.get(a, (0, 0))
            avg[a] = (total + pi, n + 1)
            end = f"_{a}" if i else ""
            for pre, p in (("", pi), ("avg_", avg[a][0] / avg[a][1])):
                gap = nano_nash.duality_gap(self.P, p, mu, self.tau)
                gap0 = nano_nash.duality_gap(self.P, p)
                out[f"{pre}gap{end}"] = gap.mean().item()
                out[f"{pre}gap0{end}"] = gap0.mean().item()
            if isinstance(self.judge, SelfJudge):
                out[f"judge_err{end}"] = self.judge.error(model, judge, self)
        return out


JUDGE = (                                   # four sections: each a user turn (SelfJudge)
    "Which response is better? Read the question and the two responses, then decide which "
    "response answers the question better.\n\nQuestion:\n",
    "Response 1:\n",
    "Response 2:\n",
    "Output 1 or 2 and nothing else.")
TOY_JUDGE = ("Judge ", " 1:", " 2:", " Better:")      # short: the tiny model learns to read it


def turn_break(tok):
    """The ids between a finished turn and the next user turn's text, in the model's chat format
    (Phi-3: <|end|> <|user|>; ChatML: <|im_end|> "\n" <|im_start|> "user\n"): chat()'s tail up to
    its last control id, then its head without <s>. No text can write them."""
    last = max(i for i, x in enumerate(tok.tail) if x in tok.special_ids)
    return tok.tail[:last] + [i for i in tok.head if i != tok.bos_id]


class SelfJudge:
    """An LM judges a pair from ids: the template's pieces, the prompt's ids as the policy saw
    them and each response's generated ids minus every special id: no text can write a control
    token into its input. Nor the judge's structure: each section of JUDGE (the question, each
    response, the instruction) is a user turn of its own, opened and closed by the chat format's
    control ids, so a response that writes "Response 2:" stays inside its own section. (The toy
    judge, TOY_JUDGE, reads ids from {a, b, c} and prompts written in code, no text: one turn.)"""
    def __init__(self, tok, user, template):
        self.tok = tok
        self.user = user
        self.pieces = [tok.encode(p) for p in template]
        self.answers = [tok.encode("1")[-1], tok.encode("2")[-1]]
        self.sep = [] if template == TOY_JUDGE else turn_break(tok)     # between the sections

    def ids(self, k, a, b):
        a = [i for i in a if i not in self.tok.special_ids]
        b = [i for i in b if i not in self.tok.special_ids]
        question, before_a, before_b, end = self.pieces
        s = self.sep
        user = question + self.user[k] + s + before_a + a + s + before_b + b + s + end
        return self.tok.chat(user)

    def logits(self, model, ks, first, second, adapters):
        """The judge's logits (B, 2) for the answers "1" and "2" on the pairs (first[b],
        second[b]): only these two rows of lm_head are computed (the other V − 2 logits would be
        thrown away)."""
        rows = [self.ids(int(k), a, b) for k, a, b in zip(ks, first, second)]
        x, m = left_pad(rows, self.tok.pad_id)
        dev = model.lm_head.weight.device
        h = model.trunk(x.to(dev), adapters, mask=m.to(dev))[:, -1]          # (B, C)
        return h @ model.lm_head.weight[self.answers].T                     # (B, 2)

    @torch.no_grad()
    def __call__(self, model, r1, r2, adapters=None, both_orders=False):
        """P(y ≻ y') per pair (B,) under `adapters` (None = the base, or one per pair), and the
        stats of nano_nash.judge_preference."""
        y1 = r1.response_ids()
        y2 = r2.response_ids()
        swapped = self.logits(model, r1.k, y2, y1, adapters) if both_orders else None
        logits = self.logits(model, r1.k, y1, y2, adapters)
        return nano_nash.judge_preference(logits, swapped)

    def margins(self, model, adapter, task):
        """logit(P̂(y ≻ y')) = logit "1" − logit "2" for every prompt and ordered toy pair:
        (K, n, n)."""
        ys = task.responses()
        K = len(self.user)
        ks, first, second = zip(*[(k, a, b) for k in range(K) for a in ys for b in ys])
        lg = self.logits(model, ks, first, second, adapter)
        return (lg[:, 0] - lg[:, 1]).view(K, len(ys), len(ys))

    def error(self, model, adapter, task):
        """The mean |P̂ − P| over every toy pair."""
        P_hat = torch.sigmoid(self.margins(model, adapter, task).double()).cpu()
        return (P_hat - task.P).abs().mean().item()


class ChatTask:
    """Real prompts (cut to max_prompt_tokens); the model judges itself with JUDGE (SelfJudge).
    pairs: labelled pairs (load_pairs) that check the judge (evaluate.judge_check)."""
    def __init__(self, tok, texts, max_prompt_tokens, pairs=()):
        self.tok = tok
        self.texts = texts
        self.pairs = pairs
        self.vocab = None
        self.stop_ids = tok.stop_ids
        user = [tok.encode(t) for t in texts]
        if any(len(u) > max_prompt_tokens for u in user):
            print(f"warning: prompts longer than {max_prompt_tokens} tokens were cut to that "
                  "length")
        self.user = [u[:max_prompt_tokens] for u in user]
        self.prompts = [tok.chat(u) for u in self.user]
        self.judge = SelfJudge(tok, self.user, JUDGE)
        self.shared = False             # as memory.py counts: each row its own prompt

    def measure(self, model, judges, memo, gen):
        return {}                                       # no exact yardstick for a real LM


def read_text(path, what, flag):
    """A UTF-8 text file's text, or one line saying why not (a device such as /dev/zero has no
    end: refused before reading)."""
    path = Path(path)
    if path.is_char_device() or path.is_block_device():
        raise UserError(f"cannot read {what} {path} (a device); pass {flag} FILE")
    try:
        return path.read_bytes().decode("utf-8-sig")          # -sig: a byte-order mark is not text
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror}); pass {flag} FILE") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None


def load_prompts(path):
    """JSON lines or a JSON array, of strings or {"prompt": ...} objects; or plain text, one
    prompt a line."""
    path = Path(path)
    text = read_text(path, "prompts file", "--prompts")
    lines = text.split("\n")        # \n or \r\n only: U+2028, \x0b, \x1c ... belong to a prompt
    first = text.lstrip()[:1]
    json_text = path.suffix != ".txt" and first in ("{", "[")
    if path.suffix in (".json", ".jsonl") or json_text:
        try:
            if first == "[":
                items = json.loads(text)
            else:
                items = [json.loads(s) for s in lines if s.strip()]
        except (ValueError, RecursionError) as e:        # RecursionError: [[[[...]]]] too deep
            raise UserError(
                f"{path}: not valid JSON ({e}); write one {{\"prompt\": ...}} per line"
            ) from None
        lines = [x.get("prompt") if isinstance(x, dict) else x for x in items]
        for i, x in enumerate(lines, 1):
            if not isinstance(x, str):
                raise UserError(
                    f"{path}: item {i} is not a string or an object with a string \"prompt\" field"
                )
    kept = [s.strip() for s in lines if s.strip()]
    for i, s in enumerate(kept, 1):
        try:
            s.encode()
        except UnicodeEncodeError:                  # "\ud800" in JSON: half of a character
            raise UserError(f"{path}: prompt {i} holds a lone surrogate (a \\uD800-\\uDFFF "
                            "escape without its pair); write the character itself") from None
    if len(kept) < len(lines):
        print(f"skipped {len(lines) - len(kept)} empty prompt(s) in {path}")
    if not kept:
        raise UserError(
            f"{path} holds no prompts; write one prompt per line (or one {{\"prompt\": ...}})"
        )
    return kept


FIELDS = ("prompt", "good", "bad")      # a labelled pair: a question, a right and a wrong answer


def load_pairs(path):
    """The judge's labelled pairs (--judge_check): JSON lines, one {"prompt", "good", "bad"}
    object of strings a line."""
    lines = read_text(path, "judge pairs", "--judge_pairs").split("\n")     # as load_prompts
    pairs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            ok = all(isinstance(pair.get(key), str) for key in FIELDS)
            ok = ok and all(pair[key].encode() for key in FIELDS)   # a lone surrogate raises
        except (ValueError, AttributeError, RecursionError):        # (UnicodeError: a ValueError)
            ok = False
        if not ok:
            raise UserError(f"{path}: line {i} is not a JSON object with the strings "
                            f"{', '.join(FIELDS)}")
        pairs.append(pair)
    if not pairs:
        raise UserError(f"{path} holds no pairs; write one JSON object a line, with the strings "
                        f"{', '.join(FIELDS)}")
    return pairs


# -------------------------------------------------------------------------------------------------
# setup: the device, the frozen base model and the task

def pick_device(cfg):
    mps = torch.backends.mps.is_available()
    gpu = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    auto = "cpu" if cfg.model == "tiny" else gpu        # the toy game: the CPU; else the GPU
    try:
        d = torch.device(auto if cfg.device == "auto" else cfg.device)
    except RuntimeError:
        d = None
    ok = d is not None and (
        d.type == "cpu"
        or (d.type == "mps" and mps)
        or (d.type == "cuda" and (d.index or 0) < torch.cuda.device_count())
    )
    if not ok:
        raise UserError(
            f"--device {cfg.device} is not a device of this machine; use auto, cpu, cuda, cuda:N "
            f"(here {torch.cuda.device_count()} GPU(s)) or mps"
        )
    return d


# each real --model: its name in messages and its Hugging Face repository (the download, and the
# cache's folder models--<org>--<name>)
HUB = {
    "phi3": dict(name="Phi-3", repo="microsoft/Phi-3-mini-4k-instruct"),
    "smollm2": dict(name="SmolLM2", repo="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def find_weights(cfg):
    """--weights, else $NANO_NASH_WEIGHTS, else the model's folder in the Hugging Face cache
    ($HF_HUB_CACHE or $HF_HOME/hub)."""
    given = cfg.weights or os.environ.get("NANO_NASH_WEIGHTS")
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or Path(home) / "hub"
    repo = HUB[cfg.model]["repo"]
    cached = Path(hub) / ("models--" + repo.replace("/", "--"))
    path = Path(given or cached).expanduser()
    if not given and not path.is_dir():
        raise UserError(
            f"{HUB[cfg.model]['name']} weights not found (no --weights, no $NANO_NASH_WEIGHTS, "
            f"nothing at {path}); get them with `huggingface-cli download {repo} "
            "--local-dir DIR` and pass --weights DIR"
        )
    return find_checkpoint(path)


def setup(cfg, held_out=False):
    """(frozen base model, task, base model's name). The real run checks everything cheap first
    (prompts, judge pairs, device, config.json, tokenizer, lengths) and loads the weights last.
    held_out: every 10th prompt."""
    device = pick_device(cfg)
    if cfg.model == "tiny":
        torch.set_num_threads(1)           # tiny matrices: more threads only add overhead
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig.from_name("tiny"))
        return model.to(device), ToyTask(cfg), "tiny"
    prompts = Path(cfg.prompts or ROOT / "data" / "prompts.jsonl")
    texts = load_prompts(prompts) if cfg.task == "chat" else []
    if held_out and len(texts) < 10 and cfg.task == "chat":
        raise UserError(
            f"--eval holds out every 10th prompt and {prompts} has only {len(texts)}; give 10+"
        )
    texts = [t for i, t in enumerate(texts)
             if (i % 10 == 9) == held_out] or texts
    pairs = ()
    if cfg.task == "chat":
        pairs = load_pairs(cfg.judge_pairs or ROOT / "data" / "judge_pairs.jsonl")
    folder = find_weights(cfg)
    config = read_config(folder / "config.json")
    if not (folder / "tokenizer.json").is_file():
        raise UserError(
            f"{folder} has no tokenizer.json; download it with the weights, from the same model"
        )
    try:
        tok = load_tokenizer(folder)
    except (OSError, ValueError) as e:       # missing, not JSON, or a kind of BPE not implemented
        raise UserError(str(e)) from None
    if tok.vocab_size > config.vocab_size:
        raise UserError(
            f"{folder}: the tokenizer has ids up to {tok.vocab_size - 1}, the model's vocabulary "
            f"only {config.vocab_size}; tokenizer.json and config.json are from different models"
        )
    if cfg.task == "words":
        import words                                    # (it imports this file)
        task = words.WordsTask(tok, cfg.tau, cfg.max_new_tokens)
    else:
        task = ChatTask(tok, texts, cfg.max_prompt_tokens, pairs)
    longest = max(map(len, task.prompts)) + cfg.max_new_tokens
    judge = len(task.judge.ids(0, [], [])) if isinstance(task, ChatTask) else 0
    judge += cfg.max_prompt_tokens + 2 * cfg.max_new_tokens
    if max(longest, judge) > config.block_size:
        raise UserError(
            f"a judge prompt can reach {judge} tokens, more than the model's context "
            f"{config.block_size}; lower --max_new_tokens or --max_prompt_tokens"
        )
    dtype = {
        "auto": torch.bfloat16 if device.type != "cpu" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[cfg.dtype]
    model, _ = load_model(folder, device, dtype)
    model.fingerprint = fingerprint(folder)     # what the run records (identity.of)
    return model, task, model_name(folder)
