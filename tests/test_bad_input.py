"""Bad input, table-driven: everything a user can get wrong (config.json, weights, the Hugging Face
cache, tokenizer.json, prompts, flags, checkpoints, run folders, a full or read-only disk) ends in
one line that names the thing and the fix, exit code != 0, no traceback.

Each case builds its files under its own tmp folder and returns the command line. How it runs:
  cli   train_lm.py in a subprocess (all of them started up front, 4 at a time, to share the
        start-up cost): exit code != 0, stderr exactly one line "error: ...", no "Traceback"
  call  train_lm.main in process: it must raise an error that the command line prints as one line
        (UserError, or weights.py's CheckpointError); this is how a full or read-only disk is
        simulated (CI runs as root, so chmod proves nothing): os.replace, torch.save, Path.mkdir,
        ... patched to raise OSError
  main  train_lm.py's __main__ in process (runpy), for what only the boundary (plan.command_line)
        handles (out of memory, Ctrl-C)
Every message must match the case's regex: the thing it names and, mostly, the fix."""
import errno
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from safetensors.torch import load_file, save_file

import runs
import tasks
import train_lm as T
from test_train_lm import ENV, ROOT, args
from weights import CheckpointError

ONE_LINE = (T.UserError, CheckpointError)     # what the command line prints as "error: <one line>"


class Ctx(NamedTuple):
    tmp: Path           # the case's own folder
    fx: Callable        # fx(name): a fixture (the tiny Phi-3 folder, the toy run to copy)
    mp: object          # monkeypatch (None in a subprocess case)


class Case(NamedTuple):
    id: str
    make: Callable      # Ctx -> argv, or (argv, after): after() checks what must have survived
    match: str          # a regex the message must match: what it names, and the fix
    how: str = "call"   # "call", "cli" or "main" (see the module docstring)
    xfail: str = ""     # a known gap, with the change it needs


# --------------------------------------------------------------------------------------------------
# building the bad inputs

def toy(c, *extra):
    return ["--algo", "inpo", "--max_steps", 1, "--samples", 2, "--figure", "",
            "--out_dir", c.tmp / "out",
            *extra]


def phi3(c, *extra, weights=None):
    return ["--model", "phi3", "--weights", weights or c.fx("phi3_dir"), "--max_new_tokens", 4,
            "--batch_size", 2, "--max_steps", 1, "--out_dir", c.tmp / "out", *extra]


def folder(c, config=None, tensors=None, tokenizer=None, drop=()):
    """A copy of the tiny Phi-3 in tmp/w (links to its big files): config(d) edits config.json's
    dict in place, or returns a new dict or text; tensors(sd) edits the weights (then written as a
    file of its own); tokenizer: the text of tokenizer.json; drop: files to leave out."""
    src, w = c.fx("phi3_dir"), c.tmp / "w"
    w.mkdir()
    d = json.loads((src / "config.json").read_text())
    d = (config(d) or d) if config else d
    (w / "config.json").write_text(d if isinstance(d, str) else json.dumps(d))
    if tensors:
        sd = load_file(src / "model.safetensors")
        save_file(tensors(sd) or sd, w / "model.safetensors")
    else:
        (w / "model.safetensors").symlink_to(src / "model.safetensors")
    if tokenizer is None:
        (w / "tokenizer.json").symlink_to(src / "tokenizer.json")
    else:
        (w / "tokenizer.json").write_text(tokenizer)
    for name in drop:
        (w / name).unlink()
    return w


def bad_weights(c, *extra, **kw):
    return phi3(c, *extra, weights=folder(c, **kw))


def key(**kv):                                     # config.json edit: set these keys
    return lambda d: d.update(kv)


def tensor(name, f):                               # weights edit: tensor name <- f(tensor)
    return lambda sd: sd.update({name: f(sd[name])})


def truncate(path, keep=0.5):
    b = path.read_bytes()
    path.write_bytes(b[:int(len(b) * keep)])


def truncated_weights(c):
    argv = bad_weights(c, tensors=lambda sd: None)        # a file of its own, never the shared one
    truncate(c.tmp / "w" / "model.safetensors")
    return argv


def sharded(c, index):
    w = folder(c, drop=["model.safetensors"])
    (w / "model.safetensors.index.json").write_text(json.dumps(index))
    return phi3(c, weights=w)


def hf_cache(c, ref):
    """The cache layout hub/models--org--name/{refs/main, snapshots/}, and a good model folder
    beside it that refs/main may try to reach."""
    repo = c.tmp / "hub" / "models--microsoft--Phi-3-mini-4k-instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(ref)
    (repo / "snapshots").mkdir()
    shutil.copytree(c.fx("phi3_dir"), c.tmp / "elsewhere", symlinks=True)
    return phi3(c, weights=c.tmp / "hub")


def no_weights_found(c, env):
    """No --weights: $NANO_NASH_WEIGHTS (env = its value), else an empty Hugging Face cache."""
    argv = phi3(c, weights="-")
    c.mp.setenv("HF_HUB_CACHE", str(c.tmp / "empty_hub"))
    c.mp.delenv("NANO_NASH_WEIGHTS", raising=False)
    if env:
        c.mp.setenv("NANO_NASH_WEIGHTS", str(c.tmp / env))
    return argv[:2] + argv[4:]


def out_of_memory_loading(c):
    import safetensors

    class Full:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, k):
            return self.f.get_slice(k)

        def get_tensor(self, k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB")
    real, argv = safetensors.safe_open, phi3(c)              # the fixture first, then the patch
    c.mp.setattr(safetensors, "safe_open", Full)
    return argv


def prompts(c, data, name="p.jsonl", *extra):
    p = c.tmp / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    elif data is not None:
        p.write_text(data)
    return phi3(c, "--prompts", p, *extra)


def pairs(c, text, *extra):
    """A judge pairs file holding `text`, for a training run (the check it starts with), or with
    extra flags."""
    p = c.tmp / "pairs.jsonl"
    p.write_text(text)
    return phi3(c, "--judge_pairs", p, *extra)


# --- checkpoints: a copy of a finished 2-step toy run (inpo, a checkpoint per step) ---------------

def ckpt(c, damage=None, *extra):
    shutil.copytree(c.fx("toy_run"), c.tmp / "out")
    if damage:
        damage(c.tmp / "out" / "inpo" / "ckpt_000002")
    return toy(c, "--max_steps", 3, "--save_every", 1, "--resume", *extra)


def nan_adapter(ck):
    f = ck / "policy" / "adapter_model.safetensors"
    sd = load_file(f)
    next(iter(sd.values()))[0, 0] = float("nan")
    save_file(sd, f)


def set_format(ck, fmt):
    torch.save({**torch.load(ck / "state.pt", weights_only=True), "format": fmt}, ck / "state.pt")


def only_a_backup(c):
    """The run's own checkpoint is gone; the user's copy ckpt_000003_backup is neither resumed nor
    deleted."""
    argv = ckpt(c, lambda ck: ck.rename(ck.with_name("ckpt_000003_backup")))
    backup = c.tmp / "out" / "inpo" / "ckpt_000003_backup"
    return argv, lambda: ((backup / "state.pt").is_file()
                          or pytest.fail("the user's backup was touched"))


def stray_only(c):
    """A folder holding only a stray empty ckpt_999999: a fresh run refuses to guess, and keeps it.
    """
    stray = c.tmp / "out" / "inpo" / "ckpt_999999"
    stray.mkdir(parents=True)
    return toy(c), lambda: stray.is_dir() or pytest.fail("the stray folder was deleted")


def evaluate(c, damage=None, full_disk=False):
    shutil.copytree(c.fx("toy_run"), c.tmp / "out")
    if damage:
        damage(c.tmp / "out" / "inpo" / "ckpt_000002")
    if full_disk:
        c.mp.setattr(Path, "write_text", oserror(errno.ENOSPC))
    return toy(c, "--eval", "--max_steps", 2)


def phi3_resume(c, change):
    """A 1-step phi3 run on a 3-prompt file, then --resume with one thing changed."""
    p = c.tmp / "p.txt"
    p.write_text("one\ntwo\nthree\n")
    T.main(args(phi3(c, "--prompts", p, "--algo", "nash_md_pg")))
    if change == "prompts":
        p.write_text("one\ntwo\nfour\n")
    return phi3(c, "--prompts", p, "--algo", "nash_md_pg", "--resume", "--max_steps", 2,
                *(["--lr", 1e-3] if change == "lr" else []))


# --- a full or read-only disk, patched in process -------------------------------------------------

def oserror(code):
    def fail(*a, **kw):
        raise OSError(code, os.strerror(code))
    return fail


def disk_fault(c, target, attr, code, from_start=False):
    """target.attr raises OSError(code) once the first checkpoint is saved (or from the start); the
    checkpoint saved before must stay intact and remain the run's latest, with no temporary folder
    left behind."""
    real, real_save = getattr(target, attr), runs.Run.save

    def save(self, *a, **kw):
        out = real_save(self, *a, **kw)
        c.mp.setattr(target, attr, oserror(code))
        return out
    if from_start:
        c.mp.setattr(target, attr, oserror(code))
    else:
        c.mp.setattr(runs.Run, "save", save)

    def after():
        c.mp.setattr(target, attr, real)
        if not from_start:
            run = runs.Run(c.tmp / "out" / "inpo", {}, [], resume=True, writer=False)
            assert run.latest() is not None and run.latest().name == "ckpt_000001", run.latest()
            assert torch.load(run.latest() / "state.pt", weights_only=True)["step"] == 1
            left = list((c.tmp / "out" / "inpo").glob(".tmp*"))
            assert not left, "a temporary checkpoint was left behind"
    return toy(c, "--max_steps", 3, "--save_every", 1, "--log_every", 1), after


def log_fault(c):
    """log.jsonl cannot grow after the first checkpoint (runs.py appends to it with the builtin
    open)."""
    c.mp.setattr(runs, "open", open, raising=False)
    return disk_fault(c, runs, "open", errno.ENOSPC)


def plot_fault(c):
    c.mp.setattr("matplotlib.figure.Figure.savefig", oserror(errno.ENOSPC))
    return toy(c)


def raising_in_step(c, exc):
    def boom(*a, **kw):
        raise exc
    c.mp.setattr("model.generate", boom)      # train_lm.py, run afresh by runpy, imports this one
    return toy(c)


# --------------------------------------------------------------------------------------------------
# the table

R = r"--resume"
ADAPTER = Path("policy") / "adapter_model.safetensors"
CASES = [
    # config.json: one table of (key, type, range), checked before anything large is allocated
    Case(
        "config-missing-keys",
        lambda c: bad_weights(c, config=lambda d: {"model_type": "phi3", "n": 8}),
        r"config\.json: key 'vocab_size' is missing; re-download config\.json",
        "cli",
    ),
    Case(
        "config-heads-a-string",
        lambda c: bad_weights(c, config=key(num_attention_heads="4")),
        r"num_attention_heads = '4' must be an integer in \[1, 1024\]; config\.json is damaged",
    ),
    Case(
        "config-hidden-a-float",
        lambda c: bad_weights(c, config=key(hidden_size=64.5)),
        r"hidden_size = 64\.5 must be an integer",
    ),
    Case(
        "config-layers-a-bool",
        lambda c: bad_weights(c, config=key(num_hidden_layers=True)),
        r"num_hidden_layers = True must be an integer",
    ),
    Case(
        "config-zero-heads",
        lambda c: bad_weights(c, config=key(num_attention_heads=0)),
        r"num_attention_heads = 0 must be an integer in \[1, ",
    ),
    Case(
        "config-100000-layers",
        lambda c: bad_weights(c, config=key(num_hidden_layers=100000)),
        r"num_hidden_layers = 100000 must be an integer in \[1, 1024\]",
    ),
    Case(
        "config-huge-hidden",
        lambda c: bad_weights(c, config=key(hidden_size=10**9)),
        r"hidden_size = 1000000000 must be",
    ),
    Case(
        "config-huge-vocab",
        lambda c: bad_weights(c, config=key(vocab_size=10**12)),
        r"vocab_size = 1000000000000 must be",
    ),
    Case(
        "config-negative-eps",
        lambda c: bad_weights(c, config=key(rms_norm_eps=-1)),
        r"rms_norm_eps = -1 must be a number",
    ),
    Case(
        "config-not-json",
        lambda c: bad_weights(c, config=lambda d: '{"model_type": "phi3",'),
        r"cannot read .*config\.json as a JSON object \(.+\); re-download config\.json",
    ),
    Case(
        "config-a-json-array",
        lambda c: bad_weights(c, config=lambda d: "[1, 2]"),
        r"config\.json as a JSON object \(a JSON list\)",
    ),
    Case(
        "config-gpt2",
        lambda c: bad_weights(c, config=key(model_type="gpt2")),
        r"model_type is 'gpt2'; only \['llama', 'phi3'\]",
    ),
    Case(
        "config-longrope",
        lambda c: bad_weights(c, config=key(rope_parameters={"rope_type": "longrope"})),
        r"of type 'longrope'.*use a 4k model",
    ),
    Case(
        "config-heads-do-not-divide",
        lambda c: bad_weights(c, config=key(num_attention_heads=5)),
        r"hidden_size 64, 5 heads.*must divide evenly",
    ),
    Case(
        "config-kv-heads-do-not-divide",
        lambda c: bad_weights(c, config=key(num_key_value_heads=3)),
        r"3 key-value heads must divide",
    ),
    Case(
        "config-absent",
        lambda c: bad_weights(c, drop=["config.json"]),
        r"no config\.json .*the download is incomplete",
    ),
    Case(
        "config-disagrees-with-weights",
        lambda c: bad_weights(c, config=key(intermediate_size=96)),
        r"has shape \(64, 128\), config\.json implies \(64, 96\); "
        r"config\.json and weights disagree",
    ),
    Case(
        "config-dry-run",
        lambda c: bad_weights(c, "--dry_run", config=key(num_hidden_layers=0)),
        r"num_hidden_layers = 0 must be",
    ),
    Case(
        "tokenizer-id-beyond-vocab",
        lambda c: bad_weights(c, config=key(vocab_size=1000)),
        r"tokenizer has ids up to 32010, the model's vocabulary only 1000.*from different models",
    ),
    # weights: shards and the Hugging Face cache stay inside the folder; dtypes, values are checked
    Case(
        "index-without-weight_map",
        lambda c: sharded(c, {"metadata": {}}),
        r"index\.json has no valid weight_map .*; re-download it",
    ),
    Case(
        "index-outside-the-folder",
        lambda c: sharded(c, {"weight_map": {"x": "../m.safetensors"}}),
        r"lists \['\.\./m\.safetensors'\], not file names in the folder; re-download it",
    ),
    Case(
        "index-missing-shard",
        lambda c: sharded(c, {"weight_map": {"lm_head.weight": "m-2.safetensors"}}),
        r"shard\(s\) \['m-2\.safetensors'\] .* are missing; re-run the download",
    ),
    Case(
        "weights-nan",
        lambda c: bad_weights(c, tensors=tensor("model.norm.weight", lambda x: x / 0 * 0)),
        r"model\.norm\.weight holds NaN or inf values; re-download the file",
        "cli",
    ),
    Case(
        "weights-int64",
        lambda c: bad_weights(c, tensors=tensor("model.norm.weight", lambda x: x.long())),
        r"model\.norm\.weight is stored as I64, not floating point",
    ),
    Case(
        "weights-bool",
        lambda c: bad_weights(c, tensors=tensor("lm_head.weight", lambda x: x > 0)),
        r"lm_head\.weight is stored as BOOL, not floating point",
    ),
    Case(
        "weights-truncated",
        truncated_weights,
        r"model\.safetensors is truncated or corrupt .*download it again",
    ),
    Case(
        "weights-absent",
        lambda c: bad_weights(c, drop=["model.safetensors"]),
        r"no model\.safetensors or model\.safetensors\.index\.json; download the \*\.safetensors",
    ),
    Case(
        "weights-folder-missing",
        lambda c: phi3(c, weights=c.tmp / "nowhere"),
        r"nowhere does not exist; pass a folder with config\.json",
        "cli",
    ),
    Case(
        "weights-a-file",
        lambda c: phi3(c, weights=c.fx("phi3_dir") / "model.safetensors"),
        r"model\.safetensors does not exist; pass a folder with config\.json",
    ),
    Case(
        "weights-env-missing",
        lambda c: no_weights_found(c, "nowhere"),
        r"nowhere does not exist; pass a folder",
    ),
    Case(
        "weights-nowhere",
        lambda c: no_weights_found(c, ""),
        r"Phi-3 weights not found .*huggingface-cli download .* pass --weights DIR",
    ),
    Case(
        "weights-out-of-memory",
        out_of_memory_loading,
        r"out of memory loading model\.safetensors onto cpu: use a device with more memory",
    ),
    Case(
        "hf-cache-ref-escapes",
        lambda c: hf_cache(c, "../../../elsewhere"),
        r"refs/main holds '\.\./\.\./\.\./elsewhere', not a revision name; delete the file",
    ),
    Case(
        "hf-cache-no-snapshot",
        lambda c: hf_cache(c, "abc123"),
        r"hub: no config\.json .*download is incomplete",
    ),
    # tokenizer.json
    Case(
        "tokenizer-absent",
        lambda c: bad_weights(c, drop=["tokenizer.json"]),
        r"w has no tokenizer\.json; download it with the weights",
        "cli",
    ),
    Case(
        "tokenizer-not-json",
        lambda c: bad_weights(c, tokenizer='{"model": '),
        r"tokenizer\.json is not a valid tokenizer\.json .*; "
        r"use the file from the Phi-3 checkpoint",
        "cli",
    ),
    Case(
        "tokenizer-unigram",
        lambda c: bad_weights(c, tokenizer=(c.fx("phi3_dir") / "tokenizer.json").read_text()
                              .replace('"BPE"', '"Unigram"', 1)),
        r"has a Unigram model, not BPE, which Phi3Tokenizer does not implement",
    ),
    # prompts files
    Case(
        "prompts-missing",
        lambda c: prompts(c, None),
        r"cannot read prompts file .*p\.jsonl .*; pass --prompts",
    ),
    Case(
        "prompts-empty",
        lambda c: prompts(c, ""),
        r"p\.jsonl holds no prompts; write one prompt per line",
    ),
    Case(
        "prompts-blank-lines",
        lambda c: prompts(c, "\n  \n\n", "p.txt"),
        r"p\.txt holds no prompts; write",
    ),
    Case(
        "prompts-malformed-json-line",
        lambda c: prompts(c, '{"prompt": "a"}\n{"prompt": \n'),
        r"p\.jsonl: not valid JSON \(.*\); write one \{\"prompt\": \.\.\.\} per line",
        "cli",
    ),
    Case(
        "prompts-json-array-of-numbers",
        lambda c: prompts(c, "[1, 2]", "p.json"),
        r"p\.json: item 1 is not a string or an object with a string \"prompt\" field",
    ),
    Case(
        "prompts-object-without-prompt",
        lambda c: prompts(c, '{"text": "a"}\n'),
        r"item 1 is not a string or an object with a string \"prompt\" field",
    ),
    Case(
        "prompts-invalid-utf8",
        lambda c: prompts(c, b"hello\n\xff\xfe bad\n", "p.txt"),
        r"p\.txt is not UTF-8 \(byte 6\); save it as UTF-8",
        "cli",
    ),
    Case(
        "prompts-a-directory",
        lambda c: (c.tmp / "d").mkdir() or phi3(c, "--prompts", c.tmp / "d"),
        r"cannot read prompts file .*d \(Is a directory\); pass --prompts FILE",
    ),
    # the judge check's labelled pairs (read with the prompts, before the weights)
    Case(
        "judge-pairs-missing",
        lambda c: phi3(c, "--judge_check", "--judge_pairs", c.tmp / "nowhere.jsonl"),
        r"cannot read judge pairs .*nowhere\.jsonl .*; pass --judge_pairs FILE",
    ),
    Case(
        "judge-pairs-not-objects",
        lambda c: pairs(c, '{"prompt": "q", "good": "a", "bad": "b"}\n["q", "a", "b"]\n'),
        r"pairs\.jsonl: line 2 is not a JSON object with the strings prompt, good, bad",
    ),
    Case(
        "judge-pairs-without-bad",
        lambda c: pairs(c, '{"prompt": "q", "good": "a"}\n', "--judge_check"),
        r"pairs\.jsonl: line 1 is not a JSON object with the strings prompt, good, bad",
    ),
    Case(
        "judge-pairs-empty",
        lambda c: pairs(c, "\n\n"),
        r"pairs\.jsonl holds no pairs; write one JSON object a line",
        "cli",
    ),
    Case(
        "judge-check-with-tiny",
        lambda c: toy(c, "--judge_check"),
        r"--judge_check measures a model judging itself \(--model phi3 or smollm2\); the toy",
    ),
    # flags: every number finite and in range, every name known, before anything is loaded
    Case(
        "lr-nan",
        lambda c: toy(c, "--lr", "nan"),
        r"--lr must be a finite number > 0, got nan",
        "cli",
    ),
    Case("lr-inf", lambda c: toy(c, "--lr", "inf"), r"--lr must be a finite number > 0, got inf"),
    Case("lr-zero", lambda c: toy(c, "--lr", 0), r"--lr must be a finite number > 0, got 0"),
    Case(
        "lr-not-a-number",
        lambda c: toy(c, "--lr", "fast"),
        r"--lr: invalid float value: 'fast'",
        "cli",
    ),
    Case(
        "temperature-nan",
        lambda c: phi3(c, "--temperature", "nan"),
        r"--temperature must be a finite",
    ),
    Case(
        "adam_beta1-1.5",
        lambda c: toy(c, "--adam_beta1", 1.5),
        r"--adam_beta1 must be in \[0, 1\)",
    ),
    Case(
        "seed-negative",
        lambda c: toy(c, "--seed", -1),
        r"--seed must be an integer in \[0, 2\^63\)",
    ),
    Case(
        "device-gpu0",
        lambda c: toy(c, "--device", "gpu0"),
        r"--device gpu0 is not a device of this machine; use auto, cpu, cuda",
        "cli",
    ),
    Case(
        "device-cuda7",
        lambda c: toy(c, "--device", "cuda:7"),
        r"--device cuda:7 is not a device",
    ),
    Case(
        "max_new_tokens-5000-phi3",
        lambda c: phi3(c, "--max_new_tokens", 5000),
        r"more than the model's context 4096; lower --max_new_tokens or --max_prompt_tokens",
    ),
    Case(
        "max_new_tokens-5000-toy",
        lambda c: toy(c, "--max_new_tokens", 5000),
        r"and --max_new_tokens <= 4",
    ),
    Case(
        "max_prompt_tokens-beyond-context",
        lambda c: phi3(c, "--max_prompt_tokens", 5000),
        r"context 4096; lower --max_new_tokens or --max_prompt_tokens",
    ),
    Case(
        "batch_size-0",
        lambda c: toy(c, "--batch_size", 0),
        r"--batch_size must be a positive integer",
    ),
    Case(
        "save_every-0",
        lambda c: toy(c, "--save_every", 0),
        r"--save_every must be a positive integer",
    ),
    Case(
        "algo-ppo",
        lambda c: toy(c, "--algo", "ppo"),
        r"unknown --algo 'ppo'; choose one of inpo",
    ),
    Case(
        "model-gpt2",
        lambda c: toy(c, "--model", "gpt2"),
        r"unknown --model 'gpt2'; choose tiny or phi3",
    ),
    Case(
        "dtype-fp8",
        lambda c: toy(c, "--dtype", "fp8"),
        r"--dtype must be auto, bfloat16 or float32",
    ),
    Case(
        "eta-tau-above-1",
        lambda c: toy(c, "--eta", 20),
        r"INPO needs --eta x --tau <= 1 \(got 2\)",
    ),
    Case(
        "toy-temperature",
        lambda c: toy(c, "--temperature", 0.5),
        r"the toy game needs --temperature 1",
    ),
    Case(
        "prompts-with-tiny",
        lambda c: toy(c, "--prompts", "data/prompts.jsonl"),
        r"--prompts and --weights apply to --model phi3",
    ),
    Case(
        "weights-with-tiny",
        lambda c: toy(c, "--weights", c.tmp),
        r"--prompts and --weights apply to",
    ),
    Case(
        "label_noise-with-phi3",
        lambda c: phi3(c, "--label_noise", 0.1),
        r"--label_noise is for the toy game \(--model tiny\)",
    ),
    Case(
        "unknown-flag",
        lambda c: toy(c, "--learning_rate", 1),
        r"unrecognized arguments: --learning_rate 1 \(see --help\)",
        "cli",
    ),
    Case(
        "bad-bool",
        lambda c: toy(c, "--eval=maybe"),
        r"--eval.*ignored explicit argument 'maybe'",
        "cli",
    ),
    # checkpoints and run folders
    Case(
        "resume-without-checkpoint",
        lambda c: toy(c, R),
        r"--resume: no checkpoint of a run in .*; start without --resume",
        "cli",
    ),
    Case(
        "resume-truncated-state",
        lambda c: ckpt(c, lambda ck: truncate(ck / "state.pt")),
        r"ckpt_000002 is damaged \(RuntimeError\); "
        r"restore it from a copy or start afresh with --overwrite",
        "cli",
    ),
    Case(
        "resume-empty-state",
        lambda c: ckpt(c, lambda ck: truncate(ck / "state.pt", 0)),
        r"ckpt_000002 is damaged \(EOFError\); restore it",
    ),
    Case(
        "resume-garbage-state",
        lambda c: ckpt(c, lambda ck: (ck / "state.pt").write_text("hi" * 50)),
        r"ckpt_000002 is damaged \(KeyError\); restore it",
    ),
    Case(
        "resume-state-missing",
        lambda c: ckpt(c, lambda ck: (ck / "state.pt").unlink()),
        r"ckpt_000002 is damaged \(FileNotFoundError\)",
    ),
    Case(
        "resume-config-missing",
        lambda c: ckpt(c, lambda ck: (ck / "config.json").unlink()),
        r"ckpt_000002 is damaged \(FileNotFoundError\)",
    ),
    Case(
        "resume-adapter-missing",
        lambda c: ckpt(c, lambda ck: (ck / ADAPTER).unlink()),
        r"--resume: adapter .*ckpt_000002/policy is missing or unreadable",
    ),
    Case(
        "resume-adapter-truncated",
        lambda c: ckpt(c, lambda ck: truncate(ck / "prev" / ADAPTER.name)),
        r"--resume: adapter .*ckpt_000002/prev is missing or unreadable \(SafetensorError",
        "cli",
    ),
    Case(
        "resume-adapter-config-a-list",
        lambda c: ckpt(c, lambda ck: (ck / "prev/adapter_config.json").write_text("[16]")),
        r"--resume: .*ckpt_000002/prev: only plain LoRA adapters \(integer r",
    ),
    Case(
        "resume-adapter-nan",
        lambda c: ckpt(c, nan_adapter),
        r"--resume: .*policy: .*lora_A\.weight has non-finite or non-float values; "
        r"the adapter is damaged",
    ),
    Case(
        "resume-other-format",
        lambda c: ckpt(c, lambda ck: set_format(ck, 0)),
        r"ckpt_000002 has format 0, this code reads 2; start anew with --overwrite",
    ),
    Case(
        "resume-changed-lr",
        lambda c: ckpt(c, None, "--lr", 1e-2),
        r"--resume would change the run's math \(--lr 0\.001 -> 0\.01\); "
        r"use the flags saved in .*--overw",
    ),
    Case(
        "resume-changed-lora_rank",
        lambda c: ckpt(c, None, "--lora_rank", 8),
        r"\(--lora_rank 16 -> 8\)",
    ),
    Case(
        "resume-changed-prompts-content",
        lambda c: phi3_resume(c, "prompts"),
        r"math \(--prompts_sha '",
    ),
    Case(
        "resume-phi3-changed-lr",
        lambda c: phi3_resume(c, "lr"),
        r"math \(--lr 0\.0003 -> 0\.001\)",
    ),
    Case(
        "resume-past-max_steps",
        lambda c: ckpt(c, None, "--max_steps", 1),
        r"ckpt_000002 is at step 2; pass --max_steps 2\+",
    ),
    Case("resume-only-a-users-backup", only_a_backup, r"--resume: no checkpoint of a run in"),
    Case(
        "fresh-run-beside-a-stray-ckpt",
        stray_only,
        r"holds a run \(ckpt_999999\); continue it with --resume, replace it with --overwrite",
    ),
    Case(
        "run-json-damaged",
        lambda c: ckpt(c, lambda ck: (ck.parent / "run.json").write_text("{")),
        r"inpo/run\.json is damaged; restore it or use another --out_dir",
    ),
    Case(
        "run-json-a-list",
        lambda c: ckpt(c, lambda ck: (ck.parent / "run.json").write_text("[]")),
        r"inpo/run\.json is damaged; restore it or use another --out_dir",
    ),
    Case(
        "eval-without-checkpoint",
        lambda c: toy(c, "--eval"),
        r"--eval: no checkpoint in .*; train first",
    ),
    Case(
        "eval-truncated-adapter",
        lambda c: evaluate(c, lambda ck: truncate(ck / ADAPTER)),
        r"--eval: adapter .*ckpt_000002/policy is missing or unreadable",
    ),
    Case(
        "eval-disk-full",
        lambda c: evaluate(c, full_disk=True),
        r"cannot write .*eval.* \(No space left on device\)",
    ),
    Case(
        "eval-fewer-than-10-prompts",
        lambda c: shutil.copytree(c.fx("toy_run"), c.tmp / "out")
        and prompts(c, "a\nb\nc\n", "p.txt", "--eval", "--algo", "inpo"),
        r"--eval holds out every 10th prompt and .*p\.txt has only 3; give 10\+",
    ),
    # output folders, the disk, the process
    Case(
        "out_dir-a-file",
        lambda c: (c.tmp / "f").write_text("x") and toy(c, "--out_dir", c.tmp / "f"),
        r"cannot use .*f/inpo for a run \(Not a directory\); choose another --out_dir",
        "cli",
    ),
    Case(
        "run-folder-a-file",
        lambda c: (c.tmp / "out").mkdir() or (c.tmp / "out/inpo").write_text("x") and toy(c),
        r"cannot use .*inpo for a run \(File exists\); choose another --out_dir",
    ),
    Case(
        "disk-full-torch.save",
        lambda c: disk_fault(c, torch, "save", errno.ENOSPC),
        r"cannot write .*ckpt_000002 \(No space left on device\); "
        r"free space .*--resume: .*ckpt_000001 is",
    ),
    Case(
        "read-only-os.replace",
        lambda c: disk_fault(c, os, "replace", errno.EACCES),
        r"cannot write .*\(Permission denied\); "
        r"free space or fix permissions, then --resume: .*ckpt_0+1",
    ),
    Case(
        "read-only-mkdir",
        lambda c: disk_fault(c, Path, "mkdir", errno.EACCES, from_start=True),
        r"cannot use .*inpo for a run \(Permission denied\); choose another --out_dir",
    ),
    Case(
        "read-only-from-the-start",
        lambda c: disk_fault(c, os, "replace", errno.EROFS, from_start=True),
        r"cannot write .*run\.json \(Read-only file system\); free space or fix permissions",
    ),
    Case(
        "disk-error-fsync",
        lambda c: disk_fault(c, os, "fsync", errno.EIO),
        r"cannot write .*ckpt_000002 \(Input/output error\); .*ckpt_000001 is intact",
    ),
    Case(
        "disk-full-log",
        log_fault,
        r"cannot write .*log\.jsonl \(No space left on device\); .*ckpt_000001",
    ),
    Case("disk-full-plot", plot_fault, r"cannot write .*plot\.png \(No space left on device\)"),
    Case(
        "out-of-memory-in-a-step",
        lambda c: raising_in_step(c, torch.OutOfMemoryError("CUDA out of mem")),
        r"out of memory: lower --batch_size or --max_new_tokens",
        "main",
    ),
    Case(
        "ctrl-c-before-a-checkpoint",
        lambda c: raising_in_step(c, KeyboardInterrupt()),
        r"^error: interrupted",
        "main",
    ),
]


# --------------------------------------------------------------------------------------------------
# running the table

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 2-step toy run (inpo, a checkpoint per step) for the checkpoint cases to copy and
    damage."""
    c = Ctx(tmp_path_factory.mktemp("toy_run"), None, None)
    T.main(args(toy(c, "--max_steps", 2, "--save_every", 1)))
    return c.tmp / "out"


def split(made):
    return (made, None) if isinstance(made, list) else made


def one_line(err, match):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"


@pytest.fixture(scope="module")
def cli_results(request, tmp_path_factory):
    """Every CLI case, 4 at a time: id -> (exit code, stdout, stderr), or why it was skipped."""
    jobs = {}
    for case in [c for c in CASES if c.how == "cli"]:
        try:
            ctx = Ctx(tmp_path_factory.mktemp(case.id), request.getfixturevalue, None)
            argv, _ = split(case.make(ctx))
            jobs[case.id] = [sys.executable, str(ROOT / "train_lm.py"), *map(str, argv)]
        except pytest.skip.Exception as e:
            jobs[case.id] = str(e)

    def run(cmd):
        if isinstance(cmd, str):
            return cmd
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
        return p.returncode, p.stdout, p.stderr
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(jobs, pool.map(run, jobs.values())))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(
    strict=True, reason=c.xfail)] * bool(c.xfail)) for c in CASES])
def test_bad_input(case, request, tmp_path, monkeypatch, capsys):
    if case.how == "cli":
        res = request.getfixturevalue("cli_results")[case.id]
        if isinstance(res, str):
            pytest.skip(res)
        rc, out, err = res
        assert rc != 0 and "Traceback" not in out, (rc, out, err)
        return one_line(err, case.match)
    argv, after = split(case.make(Ctx(tmp_path, request.getfixturevalue, monkeypatch)))
    argv, t0 = list(map(str, argv)), time.time()
    if case.how == "main":
        monkeypatch.setattr(sys, "argv", ["train_lm.py", *argv])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "train_lm.py"), run_name="__main__")
        out, err = capsys.readouterr()
        assert e.value.code not in (0, None) and "Traceback" not in out
        one_line(err, case.match)
    else:
        with pytest.raises(ONE_LINE) as e:
            T.main(args(argv))
        one_line(f"error: {e.value}", case.match)
    assert time.time() - t0 < 30, "a refusal must be quick (nothing large is built first)"
    if after:
        after()


def test_the_table_is_big_enough():
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------------
# what must be accepted

def test_prompts_files_that_are_fine(tmp_path):
    """A byte-order mark, a JSON array of strings or {"prompt": ...} objects, and a .txt whose lines
    start with "[" or "{" (plain text, not JSON) are read as the user meant."""
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"prompt": "x"}\n{"prompt": "y"}\n')
    (tmp_path / "a.json").write_text(json.dumps(["one", {"prompt": "two"}, " "]))
    (tmp_path / "p.txt").write_text("[INST] say hi\n{not json} either\n")
    assert tasks.load_prompts(tmp_path / "bom.jsonl") == ["x", "y"]
    assert tasks.load_prompts(tmp_path / "a.json") == ["one", "two"]
    assert tasks.load_prompts(tmp_path / "p.txt") == ["[INST] say hi", "{not json} either"]


def test_phi3_run_with_a_bom_prompts_file(phi3_dir, tmp_path):
    """End to end: a .jsonl saved by an editor that writes a byte-order mark trains."""
    p = tmp_path / "p.jsonl"
    p.write_bytes("\ufeff".encode() + b'{"prompt": "Say hi."}\n{"prompt": "Count to 3."}\n')
    c = Ctx(tmp_path, {"phi3_dir": phi3_dir}.get, None)
    logs = T.main(args(phi3(c, "--prompts", p, "--algo", "nash_md_pg")))
    assert [r["step"] for r in logs["nash_md_pg"]] == [0, 1]
