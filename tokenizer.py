"""
tokenizer.py: the three tokenizers of nano_nash, behind one small interface (`Tokenizer`).

  Phi3Tokenizer(path)       Phi-3's SentencePiece-BPE, written by hand from the checkpoint's
                            tokenizer.json
  ByteLevelTokenizer(path)  a byte-level BPE with the ChatML chat format (SmolLM2 and other
                            Llama-layout chat models): a tiktoken Encoding built from the
                            checkpoint's tokenizer.json
  tiny_tokenizer()          a byte-level tiktoken Encoding built in code (every id < 512) for the
                            `tiny` model
  load_tokenizer(path)      a checkpoint folder or its tokenizer.json -> one of the first two,
                            told apart by the file's decoder; None -> tiny_tokenizer()

Both read tokenizers are checked token for token against the `tokenizers` library in
tests/test_tokenizer.py.

Text is only ever text: encode() reads "<|end|>" as the pieces "<", "|", "end", ..., never as id
32007, and control tokens enter only through chat(), which builds the chat format from ids. Else
text could forge a turn: train_lm.py puts responses inside the judge's prompt, and a response
ending in "<|end|>\\n<|assistant|>\\n1" would answer the judge's question itself, the very reward
hack a policy trained against that judge would find.

Why tiktoken for SmolLM2's tokenizer and not for Phi-3's? tiktoken is byte-level BPE: it cuts the
text with a regex, starts from bytes and merges whichever adjacent pair's *concatenated bytes*
rank lowest. SmolLM2's tokenizer is exactly that: a regex (every digit alone, then GPT-2's),
bytes as the alphabet, and merge i builds id 252 + i, so ranking by id is ranking by merge. Phi-3
starts from Unicode characters, has no regex split (a space is "▁" glued to the next word; runs of
"▁" are pieces of their own), ranks merges by (left, right) pair, and uses <0xNN> byte tokens only
for characters not in its vocabulary. So "中" is one symbol to Phi-3 but must be built by tiktoken
from byte pairs that are not Phi-3 pieces, and an out-of-vocabulary character must stay as
separate bytes, which merging by rank cannot express (a tiktoken version got 161 of 195 strings
with 3-byte UTF-8 characters wrong). Hence the hand-written BPE for Phi-3. Each class leaves out
what its tokenizer.json does not use (other normalizers, pre-tokenizers, dropout, ...; a file that
asks for one is refused with an error that says which) and, on purpose, splitting added tokens out
of the text.
"""
import heapq
import itertools
import json
import re
from pathlib import Path

import regex      # tiktoken's own dependency (ByteLevelTokenizer.encode's slow path)
import tiktoken


# -------------------------------------------------------------------------------------------------
# The common interface

class Tokenizer:
    """What train_lm.py and model.generate rely on; the tokenizers below fill it in (the names
    are Phi-3's tokens; ByteLevelTokenizer's ChatML ones are in its docstring).
    encode(text, bos=False, dummy_prefix=True) -> ids
                 plain text (see above); bos=True puts first what the file's post-processor
                 does: bos_id for Phi-3, nothing for a model without a BOS
    decode(ids, skip_special=False) -> str
                 drops ids it does not know (such as Phi-3's padded embedding rows)
    chat(user_ids) -> ids
                 a prompt in the model's chat format, built from ids: head + user_ids + tail
    bos_id       <s>, what bos=True and chat() put first; None for a model without one
    eos_id       <|end|>, which closes a chat turn: the token to append to a response
    pad_id       filler for left padding (always masked out)
    stop_ids     generation stops on any of them: <|endoftext|>, <|assistant|>, <|end|>
    special_ids  the control tokens: no text encodes to any of them
    vocab_size   1 + the largest id (the model's embedding may be larger: 32064 rows for
                 Phi-3's 32011 ids)"""

    def __init__(self, path):
        """Read tokenizer.json with the subclass's _read (the tiny tokenizer has no file)."""
        self.path = Path(path)
        _parse(self.path, self._read)

    def _name_ids(self, ids, pad):
        """Phi-3's control tokens and chat format:
        "<s><|user|>\\n{user}<|end|>\\n<|assistant|>\\n". Its chat tokens swallow the whitespace
        after them (rstrip), so the "\\n"s cost no ids and user_ids = encode(user.strip()) gives
        exactly what `tokenizers` makes of that string."""
        self.bos_id = ids["<s>"]
        self.eos_id = ids["<|end|>"]
        self.pad_id = ids[pad]
        self.stop_ids = (ids["<|endoftext|>"], ids["<|assistant|>"], self.eos_id)
        self.head = [self.bos_id, ids["<|user|>"]]
        self.tail = [self.eos_id, ids["<|assistant|>"]]

    def chat(self, user_ids) -> list[int]:
        """The user's turn and the generation prompt, in the model's chat format."""
        return [*self.head, *user_ids, *self.tail]

    @property
    def vocab_size(self) -> int:
        return max(self.known) + 1

    def decode(self, ids, skip_special: bool = False) -> str:
        """The tiktoken tokenizers' decode: the pieces' bytes joined, then read as UTF-8 with
        U+FFFD for each invalid sequence (as `tokenizers`' ByteLevel decoder does)."""
        return self.enc.decode(self._kept(ids, skip_special))

    def _kept(self, ids, skip_special):
        """The ids to decode: those this tokenizer knows, less the special ones if skipped."""
        drop = self.flagged_special if skip_special else ()
        return [i for i in map(int, ids)
                if i in self.known and i not in drop]

    def _added(self, cfg):
        """tokenizer.json's added tokens, content -> id. decode(skip_special=True) drops those
        the file flags special, as `tokenizers` does."""
        tokens = cfg["added_tokens"]
        self.flagged_special = {t["id"] for t in tokens if t["special"]}
        self.added = {t["content"]: t["id"] for t in tokens}
        self.duplicated = len(set(self.added.values())) < len(tokens)    # a name or an id twice
        return self.added

    def _refuse(self, model, has, names, chat_names, merged_ids):
        """One error naming everything the file has that this class does not implement: has
        (what -> does the file have it) and what neither BPE here implements."""
        missing = [t for t in chat_names if t not in names]
        clashes = [p for p, i in model["vocab"].items()
                   if i in self.special_ids and self.added.get(p) != i]
        has = {
            f"a {model['type']} model, not BPE":
                model["type"] != "BPE",
            "BPE dropout, a subword prefix/suffix or ignore_merges":
                any(map(model.get, SUBWORD)),
            f"no {missing} token(s)":
                missing,
            "a merge that builds a control token":
                not self.special_ids.isdisjoint(merged_ids),
            "an added token listed twice (by name or id)":
                self.duplicated,
            f"pieces {clashes[:3]} whose ids are added tokens'":
                clashes,
            **has,
        }
        if any(has.values()):
            raise ValueError(
                f"{self.path} has {'; '.join(what for what, yes in has.items() if yes)}, which "
                f"{type(self).__name__} does not implement (the tokenizer.json of "
                f"{self.MODEL} has none of these)"
            )


def _parse(path, read):
    """read(the dict in tokenizer.json), where a file that is not one, or lacks a key, is named
    as such."""
    try:
        return read(json.loads(Path(path).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, StopIteration) as e:
        raise ValueError(
            f"{path} is not a valid tokenizer.json ({type(e).__name__}: {e}); use the file "
            "from the Phi-3 checkpoint or the SmolLM2 one, as downloaded with the weights (e.g. "
            "microsoft/Phi-3-mini-4k-instruct, HuggingFaceTB/SmolLM2-135M-Instruct)"
        ) from e


SUBWORD = ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")


def _merges(model):
    """[left, right] pairs, rank = position in the list; tokenizer.json spells them "a b"
    (tokenizers < 0.20) or [a, b]."""
    return [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]


# -------------------------------------------------------------------------------------------------
# Phi-3: SentencePiece-BPE read from tokenizer.json

def _is_byte_token(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


# Phi-3's normaliser and decoder as tokenizer.json spells them. The code below implements exactly
# these two, which reads more simply than an interpreter for all of tokenizers' steps.
NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


class Phi3Tokenizer(Tokenizer):
    """Encode = normalise -> cut into words -> BPE each word, as `tokenizers` encodes Phi-3's
    tokenizer.json with no added tokens split out. Usage: Phi3Tokenizer("tokenizer.json")."""
    MODEL = "Phi-3"

    def _read(self, cfg):
        self._cache = {}            # word -> ids: text repeats words, and BPE is the slow part
        model = cfg["model"]
        post = cfg["post_processor"]
        self.vocab = model["vocab"]                                 # piece -> id
        pairs = _merges(model)
        self.merges = {                                 # (left id, right id) -> (rank, merged id)
            (self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b])
            for rank, (a, b) in enumerate(pairs)
        }
        self.byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        # SentencePiece never merges the end of a word with the "▁" that starts the next one, so
        # the normalised text can be cut into words "▁*[^▁]*" and each merged (and cached) alone:
        # no merge would cross a cut. Check it rather than assume it: Phi-3 passes, but a BPE
        # trained without a pre-tokenizer learns pieces such as "s▁the" (then whole spans merge).
        self.split_words = not any(
            (b.startswith("▁") and not a.endswith("▁"))
            or _is_byte_token(a)
            or _is_byte_token(b)
            for a, b in pairs
        )
        added = self._added(cfg)
        names = self.vocab | added              # an added token beside a piece of its id: refused
        self.id_to_token = {i: t for t, i in names.items()}
        self.known = set(self.id_to_token)
        # The control tokens are all added tokens, flagged special or not (Phi-3's </s> is not),
        # but <0xNN>: a trainer may list the byte pieces as added tokens, yet byte fallback must
        # emit them for plain text.
        self.special_ids = {i for t, i in added.items() if not _is_byte_token(t)}
        chat_names = ("<s>", "<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>")
        template = post and [                       # {"SpecialToken": {"id": "<s>", ...}} -> "<s>"
            next(iter(x.values()))["id"]
            for x in post.get("single", [])
        ]
        merged_ids = [i for _, i in self.merges.values()]
        has = {   # what Phi-3's tokenizer.json does not have -> does this one have it?
            "a pre_tokenizer":
                cfg["pre_tokenizer"] is not None,
            "no byte fallback to all 256 <0xNN> pieces":
                not model["byte_fallback"] or None in self.byte_ids,
            f"the normalizer {json.dumps(cfg['normalizer'])}":
                cfg["normalizer"] != NORMALIZER,
            f"the decoder {json.dumps(cfg['decoder'])}":
                cfg["decoder"] != DECODER,
            "a post_processor that does more than put <s> first":
                template not in (None, ["<s>", "A"]),
        }
        self._refuse(model, has, names, chat_names, merged_ids)
        self._name_ids(names, pad="<|endoftext|>")

    def encode(self, text: str, bos: bool = False, dummy_prefix: bool = True) -> list[int]:
        """The normaliser turns spaces into "▁" and puts a "▁" in front of non-empty text
        (SentencePiece's add_dummy_prefix). dummy_prefix=False skips that "▁", for text that
        continues other ids: for Phi-3, encode(a) + encode(" b", dummy_prefix=False) ==
        encode(a + " b") whenever a ends in a non-space."""
        prefix = "▁" if dummy_prefix and text else ""
        text = prefix + text.replace(" ", "▁")
        if len(self._cache) > 100_000:
            self._cache.clear()
        ids = [self.bos_id] if bos else []
        words = re.findall("▁*[^▁]*", text) if self.split_words else [text]
        for word in filter(None, words):
            if word not in self._cache:
                self._cache[word] = self._bpe(word)
            ids += self._cache[word]
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Characters (or their <0xNN> bytes when not in the vocab) are the symbols; apply the
        lowest-ranked merge, leftmost first on ties (tokenizers' order), until none applies. A
        heap of candidate pairs over a linked list of symbols makes it O(n log n), not O(n²):
        long words exist (runs of spaces, CJK)."""
        sym = []                        # symbol ids; None once merged into its left neighbour
        for ch in word:
            if ch in self.vocab:
                sym.append(self.vocab[ch])
            else:
                sym += [self.byte_ids[b] for b in ch.encode()]
        n = len(sym)
        prv = list(range(-1, n - 1))    # a linked list over sym: prv[i] and nxt[i] are i's
        nxt = list(range(1, n + 1))     # neighbours; nxt[i] == n means the end
        heap = []                       # (rank, i, left id, right id): pairs that may merge

        def push(i):                    # queue the pair starting at symbol i, if it merges
            if i < 0 or nxt[i] == n:
                return
            pair = (sym[i], sym[nxt[i]])
            if pair in self.merges:
                heapq.heappush(heap, (self.merges[pair][0], i, *pair))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] != a or j == n or sym[j] != b:   # stale: one of the two merged since
                continue
            sym[i] = self.merges[a, b][1]              # j merges into i
            sym[j] = None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        return [s for s in sym if s is not None]

    def decode(self, ids, skip_special: bool = False) -> str:
        """The decoder: pieces with "▁" -> " ", runs of <0xNN> -> their UTF-8 text, joined, less
        one leading space (the dummy prefix)."""
        pieces = [self.id_to_token[i].replace("▁", " ")
                  for i in self._kept(ids, skip_special)]
        text = "".join(_byte_fallback(pieces))
        return text.removeprefix(" ")


def _byte_fallback(tokens: list[str]) -> list[str]:
    """Each run of <0xNN> tokens -> its UTF-8 text, or one U+FFFD per byte if the run is not
    valid UTF-8."""
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


# -------------------------------------------------------------------------------------------------
# Byte-level BPE with ChatML (SmolLM2): a tiktoken Encoding built from tokenizer.json

# The pre-tokenizer as SmolLM2's tokenizer.json spells it: every digit alone, then GPT-2's regex.
PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
# ... as one regex, for tiktoken: \p{N} takes each digit alone, so GPT-2's " ?\p{N}+" is gone;
# and a run of whitespace before a digit is one piece: to GPT-2's regex it ended a segment.
DIGITS_THEN_GPT2 = (r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+"""
                    r"""|\s+(?=\p{N})|\s+(?!\S)|\s+""")
CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_alphabet():
    """GPT-2's printable stand-ins for the 256 bytes, which the pieces are spelled in -> the
    bytes: a printable Latin-1 byte stands for itself; the other 68 (space, controls, no-break
    space, soft hyphen) move to U+0100, U+0101, ... in order."""
    moved = [b for b in range(256) if b <= 32 or 127 <= b <= 160 or b == 173]
    return {chr(256 + moved.index(b) if b in moved else b): b for b in range(256)}


class ByteLevelTokenizer(Tokenizer):
    """Byte-level BPE as `tokenizers` encodes SmolLM2's tokenizer.json with no added token split
    out: cut the text with DIGITS_THEN_GPT2, merge each piece's UTF-8 bytes by rank (tiktoken),
    ranks being the ids. Usage: ByteLevelTokenizer("tokenizer.json").

    ChatML: chat() builds "<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n"
    (no default system turn) from ids, the parts between control tokens encoded as text; so
    user_ids = encode(user.lstrip()) gives what `tokenizers` makes of the whole string (a leading
    space or newline would merge with the "\\n" before it). eos_id = pad_id = <|im_end|>, which
    ends an answer; stop_ids = <|endoftext|>, <|im_start|>, <|im_end|>. There is no BOS: bos_id
    is None, and bos=True adds nothing, as the file's post-processor does. Byte level, so there
    is no dummy prefix either: dummy_prefix is taken only to share the interface."""
    MODEL = "SmolLM2"
    bos_id = None

    def _read(self, cfg):
        model = cfg["model"]
        vocab = model["vocab"]                                      # piece -> id
        added = self._added(cfg)
        self.special_ids = set(added.values())
        to_byte = _byte_alphabet()
        ranks = {                           # the control tokens come only from ids, never merges
            bytes(to_byte[c] for c in piece): i
            for piece, i in vocab.items()
            if i not in self.special_ids
        }
        merged_ids = [vocab[a + b] for a, b in _merges(model)]
        longer_ids = sorted(i for piece, i in ranks.items() if len(piece) > 1)
        post = cfg["post_processor"]
        has = {   # what SmolLM2's tokenizer.json does not have -> does this one have it?
            "a normalizer":
                cfg["normalizer"] is not None,
            "a pre_tokenizer other than SmolLM2's (Digits, then ByteLevel)":
                cfg["pre_tokenizer"] != PRE_TOKENIZER,
            "byte fallback or an unk_token":
                model.get("byte_fallback") or model["unk_token"] is not None,
            "a decoder other than ByteLevel":
                cfg["decoder"]["type"] != "ByteLevel",
            "a post_processor that may add tokens":
                post is not None and post["type"] != "ByteLevel",
            "merges that do not build the other pieces one each, in the order of their ids":
                merged_ids != longer_ids,
        }
        self._refuse(model, has, added, CHATML, merged_ids)
        self.known = self.special_ids | set(ranks.values())
        # `tokenizers` drops a byte that is not in the alphabet (unk_token is null), and so does
        # encode(): tiktoken never sees one (it would panic on a byte without a rank)
        self.dropped = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self.enc = tiktoken.Encoding(
            "nano_nash_byte_level",
            pat_str=DIGITS_THEN_GPT2,
            mergeable_ranks=ranks,
            special_tokens=added,               # for decode(); encode_ordinary never emits them
        )
        self.eos_id = self.pad_id = added["<|im_end|>"]
        start = added["<|im_start|>"]
        self.stop_ids = (added["<|endoftext|>"], start, self.eos_id)
        self.head = [start, *self.encode("user\n")]
        self.tail = [self.eos_id, *self.encode("\n"), start, *self.encode("assistant\n")]

    def encode(self, text: str, bos: bool = False, dummy_prefix: bool = True) -> list[int]:
        data = text.encode()
        if len(data.translate(None, self.dropped)) == len(data):
            return self.enc.encode_ordinary(text)
        # A byte outside the alphabet: `tokenizers` cuts the text, then drops those bytes, then
        # merges what is left of each piece, so we do the same (a slow path, for rare text).
        ids = []
        for piece in regex.findall(DIGITS_THEN_GPT2, text):
            kept = piece.encode().translate(None, self.dropped)
            if kept:
                ids += self.enc._encode_single_piece(kept)      # BPE without the regex split
        return ids


# -------------------------------------------------------------------------------------------------
# tiny: a byte-level tiktoken Encoding built in code (nothing to download), every id < 512

TINY_MERGES = [b" t", b"he", b"th", b" a", b"in", b"er", b"an",
               b"re", b"on", b" s", b"en", b"at", b"nd", b"ou",
               b"ed", b" w", b"is", b"it", b"or", b"es", b"ar",
               b"to", b" o", b" b", b" c", b" h", b" i", b"ll"]
TINY_SPECIALS = ("<s>", "</s>", "<|endoftext|>", "<|assistant|>",
                 "<|end|>", "<|user|>", "<|system|>", "<pad>")
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TinyTokenizer(Tokenizer):
    """The `tiny` model's tokenizer, lossless on any text: ids 0-255 are the bytes, then two-byte
    merges, and Phi-3's special tokens take the top ids (504..511, so vocab_size is exactly 512).
    Byte level, so there is no dummy prefix: encode() takes dummy_prefix only to share the
    interface."""

    def __init__(self):
        pieces = [bytes([b]) for b in range(256)] + TINY_MERGES
        ranks = {piece: i for i, piece in enumerate(pieces)}
        ids = {name: 512 - len(TINY_SPECIALS) + k
               for k, name in enumerate(TINY_SPECIALS)}
        self.enc = tiktoken.Encoding(
            "nano_nash_tiny",
            pat_str=GPT2_SPLIT,
            mergeable_ranks=ranks,
            special_tokens=ids,
        )
        self._name_ids(ids, pad="<pad>")
        self.special_ids = set(ids.values())
        self.flagged_special = self.special_ids
        self.known = self.special_ids | set(ranks.values())

    def encode(self, text: str, bos: bool = False, dummy_prefix: bool = True) -> list[int]:
        ids = [self.bos_id] if bos else []
        return ids + self.enc.encode_ordinary(text)     # ordinary: special tokens' text is text


tiny_tokenizer = TinyTokenizer          # the name train_lm.py and bench.py use


# -------------------------------------------------------------------------------------------------

def load_tokenizer(path=None) -> Tokenizer:
    """None -> tiny_tokenizer(); a checkpoint folder or its tokenizer.json -> the tokenizer its
    file asks for (see _kind). (A Hugging Face cache folder: resolve it to its snapshot first, as
    train_lm.py does for the weights.)"""
    if path is None:
        return tiny_tokenizer()
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json at {file}: pass the folder of a Phi-3 or SmolLM2 checkpoint (the "
            "one with tokenizer.json, e.g. from microsoft/Phi-3-mini-4k-instruct) or the file "
            "itself, or None for the tiny tokenizer"
        )
    kind = _parse(file, _kind)
    return kind(file)


def _kind(cfg):
    """A byte-level BPE decodes with the ByteLevel decoder (bytes spelled as printable
    characters); anything else goes to Phi3Tokenizer, which refuses what is not Phi-3's."""
    byte_level = cfg["decoder"] and cfg["decoder"]["type"] == "ByteLevel"
    return ByteLevelTokenizer if byte_level else Phi3Tokenizer
