"""
tokenizer.py against the `tokenizers` library (the reference), on a tokenizer.json trained here and on Phi-3's own
(../shared/assets, skipped when absent): encode without BOS and decode, over several hundred generated strings.
Plus the tiny tiktoken tokenizer, the chat template, load_tokenizer's errors and a loose speed guard.
Run: python -m pytest -q -s tests/test_tokenizer.py   (-s shows the counts and timings)
"""
import random
import time
from pathlib import Path

import pytest

from tokenizer import Phi3Tokenizer, Tokenizer, load_tokenizer, tiny_tokenizer

tokenizers = pytest.importorskip("tokenizers")
PHI3_JSON = Path(__file__).parents[1] / ".." / "shared" / "assets" / "phi3-tokenizer" / "tokenizer.json"
CHAT = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]


# ----------------------------------------------------------------------------------------------------------------
# test strings

HANDWRITTEN = [
    "", " ", "  ", "   ", "\n", "\n\n", "\t", "\t\t x", " \n \t ", "\r\n", "a", "Hello", " Hello", "Hello ",
    "  two leading", "trailing two  ", "a  b   c    d", " " * 17 + "x" + " " * 33, "line1\nline2\n\nline4\n",
    "tab\tseparated\tvalues", "Hello, world! How's it going?", "It's 3.14159 and 1,000,000 and -42e-3.",
    "中文字符测试", "日本語のテキストです。", "한국어 텍스트", "Ελληνικά κείμενα", "Привет, мир!", "नमस्ते दुनिया",
    "e\u0301 e\u0300\u0323 a\u030a", "👍 👍🏽 🇺🇸🇫🇷", "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag", "🧑🏽‍💻 coder",
    "مرحبا بالعالم", "שלום עולם", "\u200fRTL mark\u200e and \u202bembedding\u202c",
    "zero\u200bwidth\u200cjoin\u200dhere\ufeff", "nbsp\xa0here", "ideographic\u3000space", "\x00\x01\x7f control",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "https://example.com/path?q=1&r=2#frag", "C:\\Users\\me\\file.txt", '{"key": [1, 2, {"nested": null}]}',
    "▁ literal metaspace ▁▁ and <0x0A> literal byte token", "<unk> <s> </s> <|endoftext|>",
    "<|user|>\nHello<|end|>\n<|assistant|>\n", "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
    "<|end|><|end|><|end|>", "<|end|>   \n\t  after", "before   <|end|>", "x<|user|>y", "<|end", "|end|>",
    "<|end|>\x1cafter", "<|end|>\x85after", "<|end|>\u3000after", "<|end|>\u200bafter", "<|endoftext|>  kept",
    "<|assistant|>The answer is 42.<|end|>", "</s> after eos", "<s>\n", "a \n <|tool|> \tb",
    "<|end|> <|tool|>  <|end|>", "  <|tool|>", "\U0001f600\U0010ffff\ue000",
]

WORDS = ["the", "a", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "world", "Nash", "equilibrium",
         "gradient", "tokenizer", "don't", "I'm", "x", "y", "=", "+", "(", ")", "{", "}", "[", "]", ";", ":", ",", ".",
         "!", "?", "\"", "'", "#", "@", "$", "%", "&", "*", "/", "\\", "|", "_", "-", "->", "==", "def", "return",
         "self", "import", "torch", "0", "1", "42", "3.14", "2024", "1e-5", "0x1F", "naïve", "café", "Straße",
         "über", "Ωmega", "∑", "∞", "≤", "→", "—", "…", "«quote»", "“curly”"]
BLOCKS = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0600, 0x06FF), (0x0590, 0x05FF),
          (0x0900, 0x097F), (0x0400, 0x04FF), (0x0300, 0x036F), (0x1F300, 0x1FAFF), (0x2000, 0x206F),
          (0x0080, 0x024F), (0x10000, 0x1007F), (0xE000, 0xE0FF), (0x0000, 0x001F)]


def random_string(rng: random.Random, n_parts: int, markup: bool = True) -> str:
    parts = []
    for _ in range(n_parts):
        kind = rng.random()
        if kind < 0.45:
            parts.append(rng.choice(WORDS))
        elif kind < 0.65:
            parts.append(" " * rng.choice([1, 1, 1, 2, 3, 4, 5, 8, 16, 17, 40]))
        elif kind < 0.72:
            parts.append(rng.choice(["\n", "\n\n", "\t", "\r\n", " \n", "\n    ", "\xa0", "\u3000"]))
        elif kind < 0.85:
            lo, hi = rng.choice(BLOCKS)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        elif kind < 0.92:
            parts.append(rng.choice(["👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "e\u0301", "🇯🇵", "❤️", "\u200d"]))
        elif markup:
            parts.append(rng.choice(CHAT + ["<s>", "</s>", "<unk>", "<|end", "<0x41>", "<|tool|>"]))
    return "".join(parts)


def make_strings(n_random: int = 400) -> list[str]:
    rng = random.Random(0)
    return HANDWRITTEN + [random_string(rng, rng.randint(1, 30)) for _ in range(n_random)]



# ----------------------------------------------------------------------------------------------------------------
# reference tokenizers

def train_tokenizer_json(folder: Path, word_merges_only: bool) -> Path:
    """A Llama-style BPE with byte fallback, trained here. word_merges_only: train with a Metaspace pre-tokenizer
    (so no merge crosses a "▁", like SentencePiece), then save without it; otherwise merges cross words."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    if word_merges_only:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    rng = random.Random(1)
    corpus = [random_string(rng, 20, markup=False) for _ in range(300)]
    corpus += [" ".join(rng.choices(WORDS[:20], k=12)) for _ in range(300)]
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1200, limit_alphabet=150, special_tokens=specials,
                                                          show_progress=False))
    tok.pre_tokenizer = None
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t not in ("<|endoftext|>",))
                            for t in CHAT] + [AddedToken("<|tool|>", special=True, normalized=False, lstrip=True,
                                                         rstrip=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module", params=["trained-words", "trained-spans", "phi3"])
def case(request, tmp_path_factory):
    """(name, tokenizer.json path). trained-spans has merges across "▁", so Phi3Tokenizer merges whole spans;
    trained-words and phi3 take the per-word path."""
    if request.param == "phi3":
        if not PHI3_JSON.is_file():
            pytest.skip(f"Phi-3 tokenizer.json not found at {PHI3_JSON}")
        return "phi3", PHI3_JSON
    return request.param, train_tokenizer_json(tmp_path_factory.mktemp(request.param), request.param == "trained-words")


# ----------------------------------------------------------------------------------------------------------------
# Phi3Tokenizer == tokenizers

def test_encode_decode_match_reference(case):
    name, json_path = case
    ref, ours = tokenizers.Tokenizer.from_file(str(json_path)), Phi3Tokenizer(json_path)
    assert ours.split_words == (name != "trained-spans")     # both BPE paths are exercised
    strings = make_strings()
    want = [e.ids for e in ref.encode_batch(strings, add_special_tokens=False)]
    got = [ours.encode(s) for s in strings]
    bad = [(s, w, g) for s, w, g in zip(strings, want, got) if w != g]
    print(f"\n{name}: encode equal on {len(strings) - len(bad)}/{len(strings)} strings")
    assert not bad, f"{len(bad)} differ, first: {bad[0]}"
    assert all(ours.encode(s, bos=True) == ref.encode(s).ids for s in strings[:50])     # the post-processor
    for skip in (False, True):
        want_text = ref.decode_batch(want, skip_special_tokens=skip)
        bad = [(s, w) for s, w, ids in zip(strings, want_text, want) if ours.decode(ids, skip_special=skip) != w]
        print(f"{name}: decode(skip_special={skip}) equal on {len(strings) - len(bad)}/{len(strings)}")
        assert not bad, f"{len(bad)} differ, first: {bad[0]}"


def test_decode_random_ids_match_reference(case):
    """Arbitrary id sequences, e.g. byte tokens that do not form valid UTF-8 (one U+FFFD per byte)."""
    json_path = case[1]
    ref, ours = tokenizers.Tokenizer.from_file(str(json_path)), Phi3Tokenizer(json_path)
    rng = random.Random(2)
    byte_ids = [i for i in ours.byte_ids if i is not None]
    seqs = [[rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(ours.vocab_size)
             for _ in range(rng.randint(0, 12))] for _ in range(300)]
    assert all(ours.decode(ids) == ref.decode(ids, skip_special_tokens=False) for ids in seqs)


def test_long_text_and_speed(case):
    name, json_path = case
    ref, ours = tokenizers.Tokenizer.from_file(str(json_path)), Phi3Tokenizer(json_path)
    rng = random.Random(3)
    texts = {"mixed": "".join(random_string(rng, 30) for _ in range(2000))[:50_000],
             "english": " ".join(rng.choices(WORDS[:20], k=20_000))[:50_000],
             "spaces": " " * 50_000, "cjk": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(50_000))}
    for kind, text in texts.items():
        ours._cache.clear()
        t0 = time.perf_counter()
        ids = ours.encode(text)
        dt = time.perf_counter() - t0
        print(f"\n{name}: encode 50k chars ({kind}) in {dt * 1000:.0f} ms, {len(ids)} tokens")
        assert ids == ref.encode(text, add_special_tokens=False).ids
        if ours.split_words:           # a loose guard; the real number is printed (speed belongs in benchmarks)
            assert dt < 2.0


def test_phi3_known_facts():
    if not PHI3_JSON.is_file():
        pytest.skip(f"Phi-3 tokenizer.json not found at {PHI3_JSON}")
    tok = load_tokenizer(PHI3_JSON.parent)
    assert tok.encode("<|user|>\nHello<|end|>\n<|assistant|>\n") == [32010, 15043, 32007, 32001]
    assert tok.encode(tok.chat("Hello"), bos=True) == [1, 32010, 15043, 32007, 32001]
    assert tok.encode(tok.chat("Hi", system="Be brief."))[:1] == [32006]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size) == (1, 32007, 32000,
                                                                                  (32000, 32001, 32007), 32011)
    assert tok.decode([15043, 32050]) == "Hello"        # ids past the vocabulary (padded embedding rows) dropped
    assert isinstance(tok, Tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# tiny tokenizer, chat template, load_tokenizer errors

def test_tiny_tokenizer_round_trip():
    tok = load_tokenizer(None)
    strings = [s for s in make_strings() if "<" not in s]   # special-token text decodes back as itself too
    for s in strings:
        ids = tok.encode(s)
        assert all(0 <= i < 512 for i in ids) and tok.decode(ids) == s
    assert tok.vocab_size == 512 and max(tok.stop_ids + (tok.bos_id, tok.eos_id, tok.pad_id)) < 512
    assert len(set(tok.stop_ids + (tok.bos_id, tok.pad_id))) == 5 and tok.eos_id in tok.stop_ids
    prompt = tok.chat("Hi there")
    assert prompt == "<|user|>\nHi there<|end|>\n<|assistant|>\n"
    ids = tok.encode(prompt, bos=True)
    assert ids[0] == tok.bos_id and ids[-2:] == [tok.encode("<|assistant|>")[0], ord("\n")]
    assert tok.decode(ids) == "<s>" + prompt and tok.decode(ids, skip_special=True) == "\nHi there\n\n"
    assert tok.decode(list(range(300, 504))) == ""          # unused ids (a tiny model may sample them) are dropped


def test_chat_template_with_system():
    want = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert tiny_tokenizer().chat("Hi", system="Be brief.") == want


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    if PHI3_JSON.is_file():                                 # an unsupported normalizer is named in the error
        import json
        cfg = json.loads(PHI3_JSON.read_text(encoding="utf-8"))
        cfg["normalizer"] = {"type": "NFKC"}
        (tmp_path / "tokenizer.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="NFKC"):
            load_tokenizer(tmp_path)
