"""Tests of sample.py on a 2-step LANA run of train_lm.py, on the tiny random Phi-3 (phi3_dir) and
on the real SmolLM2-135M-Instruct (skipped without it): its answers are model.generate's with the
run's adapter, --base is the adapter off (the same answers when B = 0, others when the run moved
B), the merged export loads in transformers and greedy-decodes token for token as we do, and
every error is one line."""
import io
import json
import shutil
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

import sample as S
import train_lm as T
from model import generate
from tokenizer import load_tokenizer
from weights import load_adapter, load_model

QUESTIONS = ["What is the capital of France?", "Rock, paper or scissors?"]
N = 8               # new tokens per answer


@pytest.fixture(scope="module", params=["phi3", "smollm2"])
def trained(request, tmp_path_factory):
    """A 2-step LANA run on a base: (its run folder, the base's folder). A large learning rate, so
    that the adapter changes the greedy answers (B moves by about lr a step under Adam)."""
    folder = request.getfixturevalue(f"{request.param}_dir")
    out = tmp_path_factory.mktemp(f"runs_{request.param}")
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n")
    pairs = out / "pairs.jsonl"                 # the judge's check at the run's start: 2 pairs
    pair = dict(prompt="2 + 2?", good="4", bad="5")
    pairs.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "prompt": "2 + 2 ="}) + "\n")
    model = request.param if request.param in T.MODELS else "phi3"
    T.main(dict(
        model=model,
        weights=str(folder),
        prompts=str(prompts),
        judge_pairs=str(pairs),
        algo="lana",
        max_steps=2,
        batch_size=2,
        max_new_tokens=6,
        judge_both_orders=False,
        lr=0.05,
        out_dir=str(out),
    ))
    return out / "lana", folder


@pytest.fixture(scope="module")
def other_dir(phi3_dir, tmp_path_factory):
    """A random Phi-3 of another width (32): weights the runs' adapters do not fit."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Phi3Config(vocab_size=32064, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, pad_token_id=32000)
    folder = tmp_path_factory.mktemp("phi3_narrow")
    transformers.Phi3ForCausalLM(config).save_pretrained(folder)
    shutil.copy(phi3_dir / "tokenizer.json", folder)
    return folder


class Reference(NamedTuple):
    """model.generate called directly on the questions' chats, as sample.py should call it: each
    answer's ids, and its text (decoded without control tokens, stripped)."""
    chats: list
    greedy: list            # with the run's adapter, both questions in one batch
    alone: list             # the same, one question at a time
    base: list              # the adapter off
    sampled: list           # temperature 0.7, top-p 0.9, seed 3


@pytest.fixture(scope="module")
def reference(trained):
    run, folder = trained
    model = load_model(folder)[0]
    tok = load_tokenizer(folder)
    load_adapter(model, "player1", run / "ckpt_000002" / "player1")
    chats = [tok.chat(tok.encode(q)) for q in QUESTIONS]

    def answers(rows, adapter="player1", **kw):
        tokens, _, resp = generate(
            model,
            rows,
            N,
            adapters=adapter,
            stop_ids=tok.stop_ids,
            pad_id=tok.pad_id,
            **{"temperature": 0, **kw},
        )
        ids = [t[r.bool()].tolist() for t, r in zip(tokens, resp)]
        return [(i, tok.decode(i, skip_special=True).strip()) for i in ids]

    return Reference(
        chats=chats,
        greedy=answers(chats),
        alone=[answers([c])[0] for c in chats],
        base=answers(chats, None),
        sampled=answers(chats, temperature=0.7, top_p=0.9,
                        generator=torch.Generator().manual_seed(3)),
    )


def texts(answers):
    return [text for _, text in answers]


def asked(run, **kw):
    """sample.main on the two questions (a prompts file), greedy unless told."""
    prompts = run.parent / "prompts.txt"
    flags = dict(run=str(run), prompts=str(prompts), max_new_tokens=N, temperature=0.0)
    return S.main({**flags, **kw})


def test_answers_are_generate_with_the_adapter(trained, reference, capsys, monkeypatch):
    """Greedy and sampled (temperature, top-p, seed) answers equal model.generate's with the run's
    first adapter, from a file, --prompt and stdin (one a line, empty lines skipped); the output
    shows them."""
    run, _ = trained
    assert asked(run) == texts(reference.greedy)
    assert asked(run, temperature=0.7, top_p=0.9, seed=3) == texts(reference.sampled)
    capsys.readouterr()
    S.command_line(["--run", str(run), "--prompt", QUESTIONS[0], "--temperature", "0",
                    "--max_new_tokens", str(N)])
    assert capsys.readouterr().out.endswith(reference.alone[0][1] + "\n\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTIONS[0]}\n\n  {QUESTIONS[1]}\n"))
    typed = S.main(dict(run=str(run), max_new_tokens=N, temperature=0.0))
    assert typed == texts(reference.alone)


def test_base_differs_only_when_B_is_nonzero(trained, reference, tmp_path):
    """--base answers as the model with no adapter. The run moved B: its answers differ from the
    base's. A copy of the checkpoint whose player2 has every lora_B set to 0 answers exactly as the
    base with --adapter player2 (player1, still trained, would not)."""
    run, _ = trained
    base = asked(run, base=True)
    assert base == texts(reference.base)
    ckpt = run / "ckpt_000002"
    for player in ("player1", "player2"):
        sd = load_file(ckpt / player / "adapter_model.safetensors")
        assert all(t.abs().max() > 0 for key, t in sd.items() if "lora_B" in key)
    assert texts(reference.greedy) != base
    zero = tmp_path / "ckpt_zero"
    shutil.copytree(ckpt, zero)
    zeroed = {key: t * 0 if "lora_B" in key else t for key, t in sd.items()}
    save_file(zeroed, zero / "player2" / "adapter_model.safetensors")
    assert asked(run, checkpoint=str(zero), adapter="player2") == base


def test_export_decodes_in_transformers_as_ours(trained, reference, tmp_path, capsys):
    """--export writes the base with the adapter merged as a Hugging Face folder and says how to
    load it; transformers' greedy decoding of it gives our adapted model's tokens."""
    transformers = pytest.importorskip("transformers")
    run, folder = trained
    out = tmp_path / "merged"
    assert S.main(dict(run=str(run), export=str(out))) == []
    shown = capsys.readouterr().out
    assert f"AutoModelForCausalLM.from_pretrained({str(out)!r})" in shown
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(folder)
    for chat, (want, _) in zip(reference.chats, reference.alone):
        got = hf.generate(
            torch.tensor([chat]),
            max_new_tokens=N,
            do_sample=False,
            eos_token_id=list(tok.stop_ids),
            pad_token_id=tok.pad_id,
        )
        assert got[0, len(chat):].tolist()[:len(want)] == want
    assert reference.alone != reference.base     # what it decodes is the adapter's, not the base's


def test_errors_are_one_line(trained, other_dir, tmp_path, capsys):
    """No run, no checkpoint, a missing adapter, weights the adapter does not fit, a toy run, bad
    flags: one line `error: ...`, exit code 1, no traceback."""
    run, folder = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    saved = json.loads((run / "run.json").read_text())
    (empty / "run.json").write_text(json.dumps({**saved, "checkpoints": []}))
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "run.json").write_text(json.dumps({"config": {"model": "tiny", "algo": "inpo"}}))
    cases = {
        "is not a run": ["--run", tmp_path / "nothing"],
        "no checkpoint yet": ["--run", empty],
        "no checkpoint ckpt_000009": ["--run", run, "--checkpoint", "ckpt_000009"],
        "has no adapter 'policy'": ["--run", run, "--adapter", "policy"],
        "another base": ["--run", run, "--weights", other_dir],
        "does not exist": ["--run", run, "--weights", tmp_path / "nowhere"],
        "toy game": ["--run", toy],
        "--temperature": ["--run", run, "--temperature", "-1"],
        "--top_p": ["--run", run, "--top_p", "0"],
        "not both": ["--run", run, "--prompt", "a", "--prompts", "b"],
        "unrecognized": ["--run", run, "--nope"],
        "context": ["--run", run, "--prompt", "a", "--max_new_tokens", "100000"],
    }
    for what, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            S.command_line([str(a) for a in argv])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert e.value.code == 1 and len(errors) == 1 and "Traceback" not in err, (what, err)
        assert what in errors[0] and err.endswith(errors[0] + "\n"), (what, err)
