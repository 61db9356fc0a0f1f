"""
tokenizer.py: the two tokenizers of nano_nash, behind one small interface (`Tokenizer`).

  Phi3Tokenizer(path)    Phi-3's SentencePiece-BPE, written by hand from the checkpoint's tokenizer.json and
                         checked token for token against the `tokenizers` library in tests/test_tokenizer.py
  tiny_tokenizer()       a byte-level tiktoken Encoding built in code (every id < 512) for the `tiny` model
  load_tokenizer(path)   a checkpoint folder or its tokenizer.json -> Phi3Tokenizer;  None -> tiny_tokenizer()

Text is only ever text: encode() reads "<|end|>" as the pieces "<", "|", "end", ..., never as id 32007, and
control tokens enter only through chat(), which builds the chat format from ids. Else text could forge a turn:
train_lm.py puts responses inside the judge's prompt, and a response ending in "<|end|>\\n<|assistant|>\\n1"
would answer the judge's question itself, the very reward hack a policy trained against that judge would find.

Why not tiktoken for Phi-3 too? tiktoken is byte-level BPE: it cuts the text with a regex, starts from bytes
and merges whichever adjacent pair's *concatenated bytes* rank lowest. Phi-3 starts from Unicode characters,
has no regex split (a space is "▁" glued to the next word; runs of "▁" are pieces of their own), ranks merges
by (left, right) pair, and uses <0xNN> byte tokens only for characters not in its vocabulary. So "中" is one
symbol to Phi-3 but must be built by tiktoken from byte pairs that are not Phi-3 pieces, and an
out-of-vocabulary character must stay as separate bytes, which merging by rank cannot express (a tiktoken
version got 161 of 195 strings with 3-byte UTF-8 characters wrong). Hence the BPE below. It leaves out what
Phi-3's tokenizer.json does not use (pre-tokenizers, other normalizers, dropout, <unk> without byte fallback,
...; a file that asks for one is refused with an error that says which) and, on purpose, splitting added
tokens out of the text.
"""
import heapq
import itertools
import json
import re
from pathlib import Path

import tiktoken


# ------------------------------------------------------------------------------------------------------------
# The common interface

class Tokenizer:
    """What train_lm.py and model.generate rely on; both tokenizers below fill it in.
    encode(text, bos=False, dummy_prefix=True) -> ids  plain text (see above); bos=True puts bos_id first
    decode(ids, skip_special=False) -> str  drops ids it does not know (such as Phi-3's padded embedding rows)
    chat(user_ids) -> ids                   a prompt in Phi-3's chat format, built from ids
    bos_id       <s>, what bos=True and chat() put first (Phi-3's post-processor does the same)
    eos_id       <|end|>, which closes a chat turn: the token to append to a response
    pad_id       filler for left padding (always masked out)
    stop_ids     generation stops on any of them: <|endoftext|>, <|assistant|>, <|end|>
    special_ids  the control tokens: no text encodes to any of them
    vocab_size   1 + the largest id (the model's embedding may be larger: 32064 rows for Phi-3's 32011 ids)"""

    def _name_ids(self, ids: dict, pad: str):
        self.bos_id, self.eos_id, self.pad_id = ids["<s>"], ids["<|end|>"], ids[pad]
        self.stop_ids = (ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"])
        self.user_id, self.assistant_id = ids["<|user|>"], ids["<|assistant|>"]

    def chat(self, user_ids) -> list[int]:
        """Phi-3's "<s><|user|>\\n{user}<|end|>\\n<|assistant|>\\n", ending in the generation prompt. Its chat
        tokens swallow the whitespace after them (rstrip), so the "\\n"s cost no ids and user_ids =
        encode(user.strip()) gives exactly what `tokenizers` makes of that string."""
        return [self.bos_id, self.user_id, *user_ids, self.eos_id, self.assistant_id]


# ------------------------------------------------------------------------------------------------------------
# Phi-3: SentencePiece-BPE read from tokenizer.json

def _is_byte_token(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


# Phi-3's normaliser and decoder as tokenizer.json spells them. The code below implements exactly these two,
# which reads more simply than an interpreter for all of tokenizers' steps.
NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
    {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


class Phi3Tokenizer(Tokenizer):
    """Encode = normalise -> cut into words -> BPE each word, as `tokenizers` encodes Phi-3's tokenizer.json
    with no added tokens split out. Usage: Phi3Tokenizer("tokenizer.json")."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._read(json.loads(self.path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid tokenizer.json ({type(e).__name__}: {e}); use the file "
                             "from the Phi-3 checkpoint (e.g. microsoft/Phi-3-mini-4k-instruct)") from e
        self._cache: dict[str, list[int]] = {}        # word -> ids; text repeats words, BPE is the slow part

    def _read(self, cfg: dict):
        model, post = cfg["model"], cfg["post_processor"]
        self.vocab: dict[str, int] = model["vocab"]
        # merges are "a b" strings (tokenizers < 0.20) or [a, b] pairs; rank = position in the list
        pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        self.merges = {(self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b])
                       for rank, (a, b) in enumerate(pairs)}
        self.byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        # SentencePiece never merges the end of a word with the "▁" that starts the next one, so the
        # normalised text can be cut into words "▁*[^▁]*" and each merged (and cached) alone: no merge would
        # cross a cut. Check it rather than assume it: Phi-3 passes, but a BPE trained without a pre-tokenizer
        # learns pieces such as "s▁the" (then we merge whole spans).
        self.split_words = not any((b.startswith("▁") and not a.endswith("▁")) or _is_byte_token(a) or
                                   _is_byte_token(b) for a, b in pairs)
        added = {t["content"]: t["id"] for t in cfg["added_tokens"]}
        self.id_to_token = {i: p for p, i in self.vocab.items()} | {i: t for t, i in added.items()}
        self.vocab_size = max(self.id_to_token) + 1
        # The control tokens are all added tokens, flagged special or not (Phi-3's </s> is not), but <0xNN>: a
        # trainer may list the byte pieces as added tokens, yet byte fallback must emit them for plain text.
        # decode(skip_special=True) drops what the file flags special instead, as `tokenizers` does.
        self.special_ids = {i for t, i in added.items() if not _is_byte_token(t)}
        self.flagged_special = {t["id"] for t in cfg["added_tokens"] if t["special"]}
        names = self.vocab | added
        missing = [t for t in ("<s>", "<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>")
                   if t not in names]
        template = post and [next(iter(x.values()))["id"] for x in post.get("single", [])]
        has = {   # what Phi-3's tokenizer.json does not have -> does this one have it?
            f"a {model['type']} model, not BPE": model["type"] != "BPE",
            "a pre_tokenizer": cfg["pre_tokenizer"] is not None,
            "BPE dropout, a subword prefix/suffix or ignore_merges": any(map(model.get, (
                "dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"))),
            "no byte fallback to all 256 <0xNN> pieces": not model["byte_fallback"] or None in self.byte_ids,
            f"the normalizer {json.dumps(cfg['normalizer'])}": cfg["normalizer"] != NORMALIZER,
            f"the decoder {json.dumps(cfg['decoder'])}": cfg["decoder"] != DECODER,
            "a post_processor that does more than put <s> first": template not in (None, ["<s>", "A"]),
            f"no {missing} token(s)": missing,
            "a merge that builds a control token": not self.special_ids.isdisjoint(
                i for _, i in self.merges.values()),
        }
        if any(has.values()):
            raise ValueError(f"{self.path} has {'; '.join(what for what, yes in has.items() if yes)}, which "
                             "Phi3Tokenizer does not implement (Phi-3's tokenizer.json has none of these)")
        self._name_ids(names, pad="<|endoftext|>")

    def encode(self, text: str, bos: bool = False, dummy_prefix: bool = True) -> list[int]:
        """The normaliser turns spaces into "▁" and puts a "▁" in front of non-empty text (SentencePiece's
        add_dummy_prefix). dummy_prefix=False skips that "▁", for text that continues other ids: for Phi-3,
        encode(a) + encode(" b", dummy_prefix=False) == encode(a + " b") whenever a ends in a non-space."""
        text = ("▁" if dummy_prefix and text else "") + text.replace(" ", "▁")
        if len(self._cache) > 100_000:
            self._cache.clear()
        ids = [self.bos_id] if bos else []
        for word in filter(None, re.findall("▁*[^▁]*", text) if self.split_words else [text]):
            if word not in self._cache:
                self._cache[word] = self._bpe(word)
            ids += self._cache[word]
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Characters (or their <0xNN> bytes when not in the vocab) are the symbols; apply the lowest-ranked
        merge, leftmost first on ties (tokenizers' order), until none applies. A heap of candidate pairs over
        a linked list of symbols makes it O(n log n), not O(n²): long words exist (runs of spaces, CJK)."""
        sym: list = []                                  # symbol ids; None once merged into its left neighbour
        for ch in word:
            sym += [self.vocab[ch]] if ch in self.vocab else [self.byte_ids[b] for b in ch.encode()]
        n = len(sym)
        prv, nxt = list(range(-1, n - 1)), list(range(1, n + 1))      # linked list; nxt == n means the end
        heap: list = []

        def push(i):                                    # queue the pair starting at symbol i, if it merges
            if 0 <= i and nxt[i] < n and (sym[i], sym[nxt[i]]) in self.merges:
                heapq.heappush(heap, (self.merges[sym[i], sym[nxt[i]]][0], i, sym[i], sym[nxt[i]]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] != a or j == n or sym[j] != b:   # stale: one of the two has merged since it was queued
                continue
            sym[i], sym[j] = self.merges[a, b][1], None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        return [s for s in sym if s is not None]

    def decode(self, ids, skip_special: bool = False) -> str:
        """The decoder: pieces with "▁" -> " ", runs of <0xNN> -> their UTF-8 text, joined, less one leading
        space (the dummy prefix)."""
        pieces = [self.id_to_token[i].replace("▁", " ") for i in map(int, ids)
                  if i in self.id_to_token and not (skip_special and i in self.flagged_special)]
        text = "".join(_byte_fallback(pieces))
        return text[1:] if text.startswith(" ") else text


def _byte_fallback(tokens: list[str]) -> list[str]:
    """Each run of <0xNN> tokens -> its UTF-8 text, or one U+FFFD per byte if the run is not valid UTF-8."""
    out = []
    for is_bytes, run in itertools.groupby(tokens, _is_byte_token):
        if is_bytes:
            raw = bytes(int(t[3:5], 16) for t in run)
            try:
                run = [raw.decode("utf-8")]
            except UnicodeDecodeError:
                run = ["\ufffd"] * len(raw)
        out += run
    return out


# ------------------------------------------------------------------------------------------------------------
# tiny: a byte-level tiktoken Encoding built in code (nothing to download), every id < 512

TINY_MERGES = [b" t", b"he", b"th", b" a", b"in", b"er", b"an", b"re", b"on", b" s",
               b"en", b"at", b"nd", b"ou", b"ed", b" w", b"is", b"it", b"or", b"es",
               b"ar", b"to", b" o", b" b", b" c", b" h", b" i", b"ll"]
TINY_SPECIALS = ("<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>",
                 "<pad>")
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TinyTokenizer(Tokenizer):
    """The `tiny` model's tokenizer, lossless on any text: ids 0-255 are the bytes, then two-byte merges, and
    Phi-3's special tokens take the top ids (504..511, so vocab_size is exactly 512). Byte level, so there is
    no dummy prefix: encode() takes dummy_prefix only to share the interface."""

    def __init__(self):
        ranks = {bytes([b]): b for b in range(256)} | {piece: 256 + k for k, piece in enumerate(TINY_MERGES)}
        ids = {name: 512 - len(TINY_SPECIALS) + k for k, name in enumerate(TINY_SPECIALS)}
        self.enc = tiktoken.Encoding("nano_nash_tiny", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                     special_tokens=ids)
        self._name_ids(ids, pad="<pad>")
        self.special_ids = set(ids.values())
        self.known = self.special_ids | set(ranks.values())
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str, bos: bool = False, dummy_prefix: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.enc.encode_ordinary(text)   # ordinary: specials as text

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.enc.decode([i for i in map(int, ids)
                                if i in self.known and not (skip_special and i in self.special_ids)])


tiny_tokenizer = TinyTokenizer          # the name train_lm.py and bench.py use


# ------------------------------------------------------------------------------------------------------------

def load_tokenizer(path=None) -> Tokenizer:
    """None -> tiny_tokenizer(); a Phi-3 checkpoint folder or its tokenizer.json -> Phi3Tokenizer. (A Hugging
    Face cache folder: resolve it to its snapshot first, as train_lm.py does for the weights.)"""
    if path is None:
        return tiny_tokenizer()
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}: pass the folder of a Phi-3 checkpoint (the "
                                "one with tokenizer.json, e.g. from microsoft/Phi-3-mini-4k-instruct) or the "
                                "file itself, or None for the tiny tokenizer")
    return Phi3Tokenizer(file)
