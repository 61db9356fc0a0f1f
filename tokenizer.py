"""
tokenizer.py: the two tokenizers of nano_nash, behind one small interface (`Tokenizer`).

  Phi3Tokenizer(path)     Phi-3's SentencePiece-BPE, written by hand from the checkpoint's own tokenizer.json and
                          checked token for token against the `tokenizers` library in tests/test_tokenizer.py
  tiny_tokenizer()        a byte-level tiktoken Encoding built in code (every id < 512) for the `tiny` model
  load_tokenizer(path)    a checkpoint folder or its tokenizer.json -> Phi3Tokenizer;  None -> tiny_tokenizer()

Both speak Phi-3's chat format, "<|user|>\\n{user}<|end|>\\n<|assistant|>\\n", and recognise special tokens in text.

Why not tiktoken for Phi-3 too? tiktoken is byte-level BPE: it cuts the text with a regex, starts from single bytes
and merges whichever adjacent pair's *concatenated bytes* rank lowest. Phi-3 starts from Unicode characters, has no
regex split (a space is "▁" glued to the next word; runs of "▁" are pieces of their own), ranks merges by (left,
right) pair in the order of SentencePiece's piece scores, and turns a character into <0xNN> byte tokens only when the character is not in its vocabulary. A
3-byte character such as "中" is one symbol to Phi-3 but must be built by tiktoken from byte pairs that are not
Phi-3 pieces, and an out-of-vocabulary character must stay as separate bytes, which merging by rank cannot express
(STYLE.md lesson 15: 161 of 195 strings with 3-byte UTF-8 characters came out wrong). Hence the BPE below.

Left out: the parts of tokenizers that Phi-3 does not use (pre-tokenizers, regex normalizers, added tokens matched
after normalisation or as single words, BPE dropout, subword prefixes, pair templates, offsets). A tokenizer.json
that needs one of them is refused with an error that says which.
"""
import heapq
import json
import re
from pathlib import Path

import tiktoken

# Unicode White_Space, which is what tokenizers (Rust's char::is_whitespace) strips next to an rstrip/lstrip added
# token. Python's str.isspace() is not the same set: it also counts U+001C..U+001F.
WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                       "\u200a\u2028\u2029\u202f\u205f\u3000")
CHAT_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>")


# ----------------------------------------------------------------------------------------------------------------
# The common interface

class Tokenizer:
    """What train_lm.py and model.generate rely on; both tokenizers below fill it in.
    bos_id      <s>, what encode(text, bos=True) puts first (Phi-3's post-processor does the same)
    eos_id      <|end|>, which closes a chat turn: the token to append to a response
    pad_id      filler for left padding (always masked out)
    stop_ids    generation stops on any of them: <|endoftext|>, <|assistant|>, <|end|>
    vocab_size  1 + the largest id (the model's embedding may be larger: 32064 rows for Phi-3's 32011 ids)
    decode() drops ids the tokenizer does not know (such as Phi-3's padded embedding rows), as `tokenizers` does."""
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str, bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special: bool = False) -> str:
        raise NotImplementedError

    def chat(self, user: str, system: str | None = None) -> str:
        """Phi-3's chat template with the generation prompt at the end (encode it with bos=True, as Phi-3 does)."""
        head = "" if system is None else f"<|system|>\n{system}<|end|>\n"
        return f"{head}<|user|>\n{user}<|end|>\n<|assistant|>\n"


# ----------------------------------------------------------------------------------------------------------------
# Phi-3: SentencePiece-BPE read from tokenizer.json

def _is_byte_token(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _steps(spec, kinds: dict, what: str, path) -> list[dict]:
    """Flatten a normalizer/decoder spec ({"type": "Sequence", ...} or one step) and refuse unsupported steps."""
    if spec is None:
        return []
    if spec["type"] == "Sequence":
        subs = spec["normalizers"] if "normalizers" in spec else spec["decoders"]
        return [step for sub in subs for step in _steps(sub, kinds, what, path)]
    if spec["type"] not in kinds or ("pattern" in spec and "String" not in spec["pattern"]):
        raise ValueError(f"{path}: {what} {json.dumps(spec)} is not supported; Phi3Tokenizer implements "
                         f"{', '.join(kinds)} (plain-string patterns), which is what Phi-3's tokenizer.json uses")
    return [spec]


class Phi3Tokenizer(Tokenizer):
    """Encode = split out added tokens -> normalise each remaining span -> BPE -> ids, exactly as `tokenizers`
    does for Phi-3's tokenizer.json; decode = run the file's decoder steps. Usage: Phi3Tokenizer("tokenizer.json")."""

    def __init__(self, path):
        self.path = path = Path(path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
            self._read(cfg, path)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid tokenizer.json ({type(e).__name__}: {e}); use the file from "
                             "the Phi-3 checkpoint (e.g. microsoft/Phi-3-mini-4k-instruct)") from e
        self._cache: dict[str, list[int]] = {}            # word -> ids; text repeats words, BPE is the slow part

    def _read(self, cfg: dict, path: Path):
        model = cfg["model"]
        if model["type"] != "BPE" or cfg["pre_tokenizer"] is not None or model.get("dropout") or \
                model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
            raise ValueError(f"{path}: Phi3Tokenizer reads a plain SentencePiece-style BPE (no pre_tokenizer, dropout, "
                             "subword prefix/suffix or ignore_merges), as in Phi-3's tokenizer.json")
        self.normalizer = _steps(cfg["normalizer"], {"Prepend": 1, "Replace": 1}, "normalizer", path)
        self.decoder = _steps(cfg["decoder"], {"Replace": 1, "ByteFallback": 1, "Fuse": 1, "Strip": 1}, "decoder", path)
        self.vocab: dict[str, int] = model["vocab"]
        # merges are "a b" strings (tokenizers < 0.20) or [a, b] pairs; rank = position in the list
        pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        self.merges = {(self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b]) for rank, (a, b) in enumerate(pairs)}
        self.byte_fallback, self.fuse_unk = model["byte_fallback"], model["fuse_unk"]
        self.byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self.unk_id = self.vocab.get(model["unk_token"]) if model["unk_token"] else None
        # SentencePiece never merges the end of a word with the "▁" that starts the next one, so the normalised text
        # can be cut into words "▁*[^▁]*" and each word merged (and cached) alone: the result equals merging the
        # whole text, because no merge would have crossed a cut. Check it rather than assume it: Phi-3 passes, but
        # a BPE trained without a pre-tokenizer learns pieces such as "s▁the" (then we merge whole spans).
        self.split_words = not any((b.startswith("▁") and not a.endswith("▁")) or _is_byte_token(a) or
                                   _is_byte_token(b) for a, b in pairs)
        added = cfg["added_tokens"]
        for t in added:
            if t["normalized"] or t["single_word"]:
                raise ValueError(f"{path}: added token {t['content']!r} has normalized/single_word set, which "
                                 "Phi3Tokenizer does not implement (Phi-3's added tokens have neither)")
        self.added = {t["content"]: t for t in added}
        # Python's regex takes the first alternative that matches, so longest first = tokenizers' leftmost-longest
        self.added_re = re.compile("|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))) if added \
            else None
        self.special_ids = {t["id"] for t in added if t["special"]}
        self.id_to_token = {i: p for p, i in self.vocab.items()} | {t["id"]: t["content"] for t in added}
        self.vocab_size = max(self.id_to_token) + 1
        post = cfg["post_processor"]
        if post is not None and [next(iter(x.values()))["id"] for x in post.get("single", [])] != ["<s>", "A"]:
            raise ValueError(f"{path}: post_processor {json.dumps(post)[:200]} is not supported; Phi3Tokenizer "
                             "implements Phi-3's, which puts <s> before the text")
        ids = {**self.vocab, **{t["content"]: t["id"] for t in added}}
        missing = [t for t in ("<s>", *CHAT_TOKENS) if t not in ids]
        if missing:
            raise ValueError(f"{path}: no {missing} token(s); Phi3Tokenizer needs Phi-3's <s> and chat tokens")
        self.bos_id, self.eos_id, self.pad_id = ids["<s>"], ids["<|end|>"], ids["<|endoftext|>"]
        self.stop_ids = (ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"])

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Added tokens are matched in the raw text first (leftmost, longest); an rstrip/lstrip token also
        swallows the whitespace after/before it. Each span between them is normalised and merged on its own, so
        every span gets its own "▁" prefix: "<|user|>\\nHello" -> [<|user|>, ▁Hello]."""
        ids, start = ([self.bos_id] if bos else []), 0     # start: where the text not yet encoded begins
        for m in (self.added_re.finditer(text) if self.added_re else ()):
            token, lo, hi = self.added[m.group()], m.start(), m.end()
            while token["lstrip"] and lo > start and text[lo - 1] in WHITESPACE:
                lo -= 1
            while token["rstrip"] and hi < len(text) and text[hi] in WHITESPACE:
                hi += 1
            ids += self._encode_span(text[start:lo])
            ids.append(token["id"])
            start = hi
        return ids + self._encode_span(text[start:])

    def _encode_span(self, text: str) -> list[int]:
        for step in self.normalizer:            # Phi-3: Prepend("▁") (only to a non-empty span), Replace(" ", "▁")
            if step["type"] == "Prepend":
                text = step["prepend"] + text if text else text
            else:
                text = text.replace(step["pattern"]["String"], step["content"])
        words = [w for w in re.findall("▁*[^▁]*", text) if w] if self.split_words else [text] if text else []
        if len(self._cache) > 100_000:
            self._cache.clear()
        ids = []
        for w in words:
            if w not in self._cache:
                self._cache[w] = self._bpe(w)
            ids += self._cache[w]
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge one word: characters (or their <0xNN> bytes when not in the vocab) are the symbols; repeatedly
        apply the lowest-ranked merge, leftmost first on ties (tokenizers' order). A heap of candidate pairs over a
        linked list of symbols makes it O(n log n), not O(n²): long words exist (runs of spaces, text without any)."""
        sym: list = []                                      # symbol ids; None once merged into its left neighbour
        for ch in word:
            if ch in self.vocab:
                sym.append(self.vocab[ch])
            elif self.byte_fallback and all(self.byte_ids[b] is not None for b in ch.encode()):
                sym += [self.byte_ids[b] for b in ch.encode()]
            elif self.unk_id is None:
                raise ValueError(f"{self.path}: {ch!r} is not in the vocabulary and there is no byte fallback or unk")
            elif not (self.fuse_unk and sym and sym[-1] == self.unk_id):    # fuse_unk: one <unk> per run
                sym.append(self.unk_id)
        n = len(sym)
        prv, nxt = list(range(-1, n - 1)), list(range(1, n + 1))          # linked list; nxt == n means the end
        heap: list = []

        def push(i):                                        # queue the pair starting at symbol i, if it merges
            if 0 <= i and nxt[i] < n and (sym[i], sym[nxt[i]]) in self.merges:
                heapq.heappush(heap, (self.merges[sym[i], sym[nxt[i]]][0], i, sym[i], sym[nxt[i]]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] != a or j == n or sym[j] != b:       # stale: one of the two has merged since it was queued
                continue
            sym[i], sym[j] = self.merges[a, b][1], None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        return [s for s in sym if s is not None]

    def decode(self, ids, skip_special: bool = False) -> str:
        """ids -> pieces -> the file's decoder steps. Phi-3's: "▁" -> " ", runs of <0xNN> -> their UTF-8 text
        (one U+FFFD per byte if invalid), join, drop one leading space (the dummy prefix)."""
        tokens = [self.id_to_token[i] for i in map(int, ids)
                  if i in self.id_to_token and not (skip_special and i in self.special_ids)]
        for step in self.decoder:
            kind = step["type"]
            if kind == "Replace":
                tokens = [t.replace(step["pattern"]["String"], step["content"]) for t in tokens]
            elif kind == "Fuse":
                tokens = ["".join(tokens)]
            elif kind == "Strip":
                tokens = [_strip(t, step["content"], step["start"], step["stop"]) for t in tokens]
            else:                                           # ByteFallback
                tokens = _byte_fallback(tokens)
        return "".join(tokens)


def _strip(token: str, char: str, start: int, stop: int) -> str:
    """Remove up to `start` leading and `stop` trailing copies of `char`."""
    lo, hi = 0, len(token)
    while lo < min(start, hi) and token[lo] == char:
        lo += 1
    while len(token) - hi < stop and hi > lo and token[hi - 1] == char:
        hi -= 1
    return token[lo:hi]


def _byte_fallback(tokens: list[str]) -> list[str]:
    out, pending = [], bytearray()                          # pending: a run of <0xNN> tokens, as bytes
    for t in tokens + [None]:                               # None flushes the last run
        if t is not None and _is_byte_token(t):
            pending.append(int(t[3:5], 16))
            continue
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(pending)
            pending = bytearray()
        if t is not None:
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------------------
# tiny: a byte-level tiktoken Encoding built in code (nothing to download), every id < 512

TINY_MERGES = [b" t", b"he", b"th", b" a", b"in", b"er", b"an", b"re", b"on", b" s", b"en", b"at", b"nd", b"ou",
               b"ed", b" w", b"is", b"it", b"or", b"es", b"ar", b"to", b" o", b" b", b" c", b" h", b" i", b"ll"]
TINY_SPECIALS = ("<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<pad>")
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TinyTokenizer(Tokenizer):
    """Wraps a tiktoken Encoding: ids 0-255 are the bytes, then a few merges; specials take the top ids (..511)."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_id, self.eos_id, self.pad_id = ids["<s>"], ids["<|end|>"], ids["<pad>"]
        self.stop_ids = (ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"])
        self.special_ids = set(ids.values())
        self.known = self.special_ids | {enc.encode_single_token(b) for b in enc.token_byte_values()}
        self.vocab_size = enc.n_vocab

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.enc.encode(text, allowed_special="all")

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.enc.decode([i for i in map(int, ids)
                                if i in self.known and not (skip_special and i in self.special_ids)])


def tiny_tokenizer() -> TinyTokenizer:
    """The `tiny` model's tokenizer: lossless on any text (byte level), 512 ids, Phi-3's special tokens."""
    ranks = {bytes([b]): b for b in range(256)}
    for piece in TINY_MERGES:                               # two-byte merges, ranked after all single bytes
        ranks[piece] = len(ranks)
    first = 512 - len(TINY_SPECIALS)                        # specials at 504..511, so vocab_size is exactly 512
    specials = {s: first + k for k, s in enumerate(TINY_SPECIALS)}
    return TinyTokenizer(tiktoken.Encoding("nano_nash_tiny", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                           special_tokens=specials))


# ----------------------------------------------------------------------------------------------------------------

def load_tokenizer(path=None) -> Tokenizer:
    """None -> tiny_tokenizer(). Otherwise a Phi-3 checkpoint folder holding tokenizer.json (a Hugging Face cache
    folder with snapshots/*/tokenizer.json also works) or the tokenizer.json file itself -> Phi3Tokenizer."""
    if path is None:
        return tiny_tokenizer()
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        file = max(path.glob("snapshots/*/tokenizer.json"), default=file)    # the last snapshot by name
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}: pass the folder of a Phi-3 checkpoint (the one with "
                                "tokenizer.json, e.g. from microsoft/Phi-3-mini-4k-instruct) or the file itself, "
                                "or None for the tiny tokenizer")
    return Phi3Tokenizer(file)
