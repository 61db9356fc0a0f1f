"""Tests of --model smollm2, the real run in small, and of the judge check every real run starts
with: every algorithm runs 2 steps on a tiny random Llama (SmolLM2's layout and kind of tokenizer,
built here with transformers: it runs everywhere) and on the real SmolLM2-135M-Instruct (skipped
cleanly without it); the judge check on judges whose answers are known (always "1", always right)
and on the real model; --dry_run and --eval for smollm2; the warning a self-judged run prints at
its start."""
import json

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import plan as P
import tasks
import train_lm as T
from model import GPT
from test_train_lm import args
from tokenizer import PRE_TOKENIZER, _byte_alphabet
from weights import read_config

transformers = pytest.importorskip("transformers")

ALGOS = [a for a in T.ALGOS if not T.ALGOS[a].variant]
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]      # a few, to have BPE at all


def byte_level_tokenizer():
    """A tokenizer.json of SmolLM2's kind: the ChatML tokens (ids 0-2), the 256 bytes in GPT-2's
    printable alphabet (ids 3-258), then a few merges, each building the next id."""
    alphabet = _byte_alphabet()                                 # printable stand-in -> byte
    pieces = CHATML + sorted(alphabet, key=alphabet.get)
    pieces += [a + b for a, b in MERGES]
    byte_level = dict(
        type="ByteLevel",
        add_prefix_space=False,
        trim_offsets=True,
        use_regex=True,
    )
    added = [
        dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
             special=True)
        for i, t in enumerate(CHATML)
    ]
    model = dict(
        type="BPE",
        dropout=None,
        unk_token=None,
        continuing_subword_prefix=None,
        end_of_word_suffix=None,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=False,
        vocab={p: i for i, p in enumerate(pieces)},
        merges=[list(m) for m in MERGES],
    )
    return dict(
        version="1.0",
        truncation=None,
        padding=None,
        added_tokens=added,
        normalizer=None,
        pre_tokenizer=PRE_TOKENIZER,
        post_processor=byte_level,
        decoder=byte_level,
        model=model,
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random Llama of SmolLM2's shape in small (tied embeddings, grouped-query attention, rope θ
    1e5), saved by transformers, with a byte-level ChatML tokenizer.json."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=1e5,
        tie_word_embeddings=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer()))
    return folder


@pytest.fixture
def two_pairs(tmp_path):
    """A labelled set of two pairs: the check at the start of a run stays quick."""
    path = tmp_path / "pairs.jsonl"
    rows = [dict(prompt="Say yes.", good="yes", bad="no"),
            dict(prompt="What is 2 + 2?", good="4", bad="5")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def smollm2(weights, tmp_path, *extra):
    """The flags of a short smollm2 run on real prompts (train_lm.main's, as the command line gives
    them)."""
    return args(["--model", "smollm2", "--task", "chat", "--weights", weights, "--out_dir",
                 tmp_path / "out", *extra])


# --------------------------------------------------------------------------------------------------
# every algorithm, 2 steps

def two_steps(weights, tmp_path, pairs, algo, capsys):
    """2 steps of `algo`, batch 1: its checkpoint holds its adapters, the trained ones moved, and
    the run began with the judge check and its warning (2 pairs: the interval always holds 1/2)."""
    flags = smollm2(weights, tmp_path, "--algo", algo, "--max_steps", 2, "--batch_size", 1,
                    "--max_new_tokens", 6, "--judge_pairs", pairs)
    logs = T.main(flags)[algo]
    out = capsys.readouterr().out
    assert out.startswith("judge check (2 labelled pairs, both orders)"), out
    assert out.splitlines()[1].startswith("warning: the judge is not shown to beat a coin"), out
    assert [r["step"] for r in logs] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs[:2])
    ckpt = tmp_path / "out" / algo / "ckpt_000002"
    files = {a: load_file(ckpt / a / "adapter_model.safetensors") for a in T.ALGOS[algo].adapters}
    for a in T.ALGOS[algo].judges:                              # the trained adapters moved
        assert any(t.abs().max() > 0 for name, t in files[a].items() if "lora_B" in name), a
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"] == "smollm2" and config["judge_both_orders"] is True


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_on_a_tiny_llama(tiny_llama, tmp_path, two_pairs, algo, capsys):
    two_steps(tiny_llama, tmp_path, two_pairs, algo, capsys)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_on_smollm2(smollm2_dir, tmp_path, two_pairs, algo, capsys):
    two_steps(smollm2_dir, tmp_path, two_pairs, algo, capsys)


def test_smollm2_eval(tiny_llama, tmp_path, two_pairs, capsys):
    """--eval after a 1-step run: the win rate against the base, with its CI, on the 8 held-out
    prompts of data/prompts.jsonl, and AlpacaEval JSON."""
    T.main(smollm2(tiny_llama, tmp_path, "--max_steps", 1, "--max_new_tokens", 4,
                   "--judge_pairs", two_pairs))
    res = T.main(smollm2(tiny_llama, tmp_path, "--max_new_tokens", 4, "--eval"))["lana"]
    assert res["n"] == 8 and res["ci95"][0] <= res["win_rate"] <= res["ci95"][1]
    outputs = json.loads((tmp_path / "out" / "lana" / "eval" / "model_outputs.json").read_text())
    assert len(outputs) == 8 and {o["generator"] for o in outputs} == {"lana"}


# --------------------------------------------------------------------------------------------------
# --dry_run: config.json of the weights it would load

def parameters(folder):
    """The parameters of our model on folder's config.json (on the meta device: nothing
    allocated)."""
    with torch.device("meta"):
        model = GPT(read_config(folder / "config.json"))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("weights", ["tiny_llama", "smollm2_dir"])
def test_smollm2_dry_run_reads_config_json(weights, request):
    folder = request.getfixturevalue(weights)
    d = T.main(dict(model="smollm2", task="chat", weights=str(folder), dry_run=True))["lana"]
    assert d["base"] == 4 * parameters(folder)                      # float32 on the CPU: 4 bytes
    assert d["total"] > d["base"] + d["adapters"]


def test_smollm2_dry_run_finds_the_hugging_face_cache(tiny_llama, tmp_path, monkeypatch):
    """No --weights: SmolLM2's folder in the Hugging Face cache (tasks.HUB); none there: one line
    naming the download."""
    monkeypatch.delenv("NANO_NASH_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(T.UserError, match=r"^SmolLM2 weights not found .* `huggingface-cli "
                                          r"download HuggingFaceTB/SmolLM2-135M-Instruct "):
        T.main(dict(model="smollm2", task="chat", dry_run=True))
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots"
    (snapshot / "abc").mkdir(parents=True)
    for f in tiny_llama.iterdir():
        (snapshot / "abc" / f.name).symlink_to(f)
    d = T.main(dict(model="smollm2", task="chat", dry_run=True))["lana"]
    assert d["base"] == 4 * parameters(tiny_llama)


# --------------------------------------------------------------------------------------------------
# the judge check

def crafted(monkeypatch, says):
    """Replace the judge's logits for ("1", "2") by says(first, second) per pair."""
    def logits(self, model, ks, first, second, adapters):
        return torch.tensor([says(a, b) for a, b in zip(first, second)])
    monkeypatch.setattr(tasks.SelfJudge, "logits", logits)


def check(folder, tmp_path, pairs):
    return T.main(smollm2(folder, tmp_path, "--judge_check", "--judge_pairs", pairs))


def test_judge_that_always_says_1(tiny_llama, tmp_path, monkeypatch, capsys):
    """Always "1", whatever it reads: right in one order, wrong in the other, so the mean over both
    orders is 1/2 exactly (a tie: half right): accuracy 50%, position bias 0.5, the orders always
    disagree; and the warning."""
    crafted(monkeypatch, lambda a, b: [50.0, -50.0])
    res = check(tiny_llama, tmp_path, tasks.ROOT / "data" / "judge_pairs.jsonl")
    assert res["n"] == 48 and res["accuracy"] == 0.5
    assert res["position_bias"] == 0.5 and res["orders_disagree"] == 1.0
    lo, hi = res["ci95"]
    assert lo == pytest.approx(0.3639, abs=1e-4) and hi == pytest.approx(0.6361, abs=1e-4)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("judge check (48 labelled pairs, both orders): accuracy 0.500 (95% CI "
                      "0.364..0.636), position bias +0.500, orders disagree 1.000")
    assert out[1].startswith("warning: the judge is not shown to beat a coin")


@pytest.mark.parametrize("right", [True, False])
def test_judge_that_reads_the_content(tiny_llama, tmp_path, two_pairs, monkeypatch, capsys, right):
    """A judge that prefers the good answer (or the bad one) in either order: accuracy 1 (or 0),
    no position bias, no disagreement; its interval (n = 2) is wide, so it warns."""
    tok = tasks.load_tokenizer(tiny_llama)
    good = [tok.encode(p["good"]) for p in tasks.load_pairs(two_pairs)]
    crafted(monkeypatch, lambda a, b: [3.0, 0.0] if (a in good) == right else [0.0, 3.0])
    res = check(tiny_llama, tmp_path, two_pairs)
    assert res["accuracy"] == float(right) and res["n"] == 2
    assert abs(res["position_bias"]) < 1e-6 and res["orders_disagree"] == 0.0
    assert res["ci95"][0] < 0.5 < res["ci95"][1]
    assert "warning" in capsys.readouterr().out


def test_wilson_interval():
    """Known values (Wilson 1927; e.g. 8 of 10: 0.490..0.943); always inside [0, 1]."""
    lo, hi = evaluate.wilson(0.8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert evaluate.wilson(1.0, 40)[0] > 0.9 and evaluate.wilson(0.0, 5)[0] == pytest.approx(0)
    assert evaluate.wilson(1.0, 4)[0] > 0.5 > evaluate.wilson(1.0, 3)[0]


def test_no_warning_for_a_judge_that_beats_a_coin(tiny_llama, tmp_path, monkeypatch, capsys):
    """Right on all 48 pairs: the interval is above 1/2, and a training run starts without a
    warning."""
    tok = tasks.load_tokenizer(tiny_llama)
    pairs = tasks.load_pairs(tasks.ROOT / "data" / "judge_pairs.jsonl")
    good = [tok.encode(p["good"]) for p in pairs]
    crafted(monkeypatch, lambda a, b: [2.0, -1.0] if a in good else [-1.0, 2.0])
    T.main(smollm2(tiny_llama, tmp_path, "--algo", "nash_md_pg", "--max_steps", 1,
                   "--max_new_tokens", 4, "--batch_size", 1))
    out = capsys.readouterr().out
    assert out.startswith("judge check (48 labelled pairs, both orders): accuracy 1.000 (95% CI "
                          "0.926..1.000)"), out
    assert "warning" not in out


def test_judge_check_on_smollm2(smollm2_dir, tmp_path):
    """The real model on the 48 labelled pairs: numbers in range, the point inside its interval."""
    res = check(smollm2_dir, tmp_path, tasks.ROOT / "data" / "judge_pairs.jsonl")
    lo, hi = res["ci95"]
    assert res["n"] == 48 and 0 <= lo <= res["accuracy"] <= hi <= 1
    assert -0.5 <= res["position_bias"] <= 0.5 and 0 <= res["orders_disagree"] <= 1


def test_judge_check_is_for_real_models():
    with pytest.raises(T.UserError, match="--judge_check measures a model judging itself"):
        P.configs(dict(judge_check=True))
