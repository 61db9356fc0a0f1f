"""
sample.py: use what train_lm.py trained. A run's adapter on its base model answers prompts.

    python sample.py --run out/lm/lana --prompt "Why is the sky blue?"
    python sample.py --run out/lm/lana --prompts questions.txt --temperature 0
    python sample.py --run out/lm/lana                  # type prompts, one a line; Ctrl-D ends
    python sample.py --run out/lm/lana --base ...       # the base model (adapter off), to compare
    python sample.py --run out/lm/lana --export merged  # a Hugging Face folder, adapter merged in

A run (runs.py) keeps its config in run.json and its LoRA adapters in ckpt_NNNNNN/<adapter>/
(PEFT's format). The trained policy is the algorithm's first adapter (LANA: player1, the others:
policy); the base is the run's (its --weights, else $NANO_NASH_WEIGHTS or the Hugging Face cache,
as train_lm.py finds them), or --weights. An answer is drawn from π_θ(y | x) as training drew it:
the prompt in the model's own chat format (tokenizer.chat), sampled by model.generate at
--temperature and --top_p (0: greedy), ending at the chat's stop ids, decoded without the control
tokens. --base draws from μ, the frozen base: its answers are what the run started from.

--export writes W + (α/r) B A for every layer with a LoRA (weights.export_merged), in the base's
own layout and with its config.json and tokenizer files: transformers loads it without nano_nash
or peft, and greedy decoding gives the same tokens as here.
"""
import cli

if __name__ == "__main__":
    cli.catch_signals()         # first: Ctrl-C during the imports below is one line too
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError

from evaluate import plain
from model import generate
from cli import UserError, flags
from runs import Run
from tasks import find_weights, load_prompts, pick_device
from tokenizer import load_tokenizer
from train_lm import ALGOS, TrainConfig
from weights import export_merged, load_adapter, load_model, model_name


@dataclass
class SampleConfig:
    run: str = "out/lm/lana"     # a run folder of train_lm.py: out_dir/<algo>
    checkpoint: str = ""         # ckpt_NNNNNN in the run (or a path); "": the run's latest
    adapter: str = ""            # "": the algorithm's policy (LANA: player1; or player2)
    weights: str = ""            # the base model's folder; "": the one the run trained on
    prompt: str = ""             # one prompt; neither this nor --prompts: read prompts from stdin
    prompts: str = ""            # a file: one prompt a line, JSON lines or a JSON array
    base: bool = False           # answer with the base model, the adapter off
    temperature: float = None    # None: the run's, the policy it trained; 0: greedy
    top_p: float = 1.0           # nucleus sampling: the most likely tokens up to this mass
    max_new_tokens: int = 256
    batch_size: int = 8          # prompts answered at once
    seed: int = 1337             # the same seed and batch size: the same answers
    device: str = "auto"         # auto: a GPU if there is one | cpu | cuda | cuda:N | mps
    export: str = ""             # write the base with the adapter merged into this folder
    debug: bool = False          # show tracebacks for errors (else one line)


def check(cfg):
    """cfg, or the one-line error of the first flag out of range."""
    t = cfg.temperature
    if t is not None and not (t == 0 or 1e-3 <= t < float("inf")):   # below: logits / t overflow
        raise UserError(f"--temperature must be 0 (greedy) or a finite number >= 0.001 "
                        f"(smaller ones overflow the logits), got {t}")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise UserError("--max_new_tokens and --batch_size must be positive integers")
    if cfg.prompt and cfg.prompts:
        raise UserError("give --prompt or --prompts, not both")
    return cfg


def read_run(path):
    """The run (its folder locked, shared: no run writes it meanwhile) and its TrainConfig, as
    run.json recorded it."""
    run = Run(path, {}, [], resume=True, writer=False, reader=True)
    saved = run.manifest.get("config")
    if not saved:
        raise UserError(f"{path} is not a run of train_lm.py (no run.json); pass --run "
                        "out_dir/<algo>, e.g. out/lm/lana")
    known = {f.name for f in fields(TrainConfig)}
    trained = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    if trained.model == "tiny":
        raise UserError(f"{path} is a run of the toy game (--model tiny), whose answers are "
                        "a, b, c; sample.py answers with runs on real weights")
    return run, trained, saved.get("base")


def load(cfg):
    """(the base model with the run's adapter loaded under its own name, the tokenizer, the
    adapter's name, the folder of the base's weights); no --temperature: the run's. Cheap checks
    first, the weights last."""
    path = Path(cfg.run)
    run, trained, base = read_run(path)
    with run:                                   # the checkpoint is read in the lock
        ckpt = path / cfg.checkpoint if cfg.checkpoint else run.latest()
        if ckpt is None or not ckpt.is_dir():
            listed = run.manifest.get("checkpoints") or "none"
            raise UserError(f"{path}: no checkpoint {cfg.checkpoint or 'yet'} (the run lists "
                            f"{listed}); train first, or pass --checkpoint ckpt_NNNNNN")
        adapter = cfg.adapter or ALGOS[trained.algo].adapters[0]
        if not (ckpt / adapter).is_dir():
            saved = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
            raise UserError(f"{ckpt} has no adapter {adapter!r}; it has {saved}")
        if cfg.temperature is None:
            cfg.temperature = trained.temperature
        trained.weights = cfg.weights or trained.weights
        trained.device = cfg.device
        folder = find_weights(trained)
        if base and model_name(folder) != base:
            print(f"note: the run trained on {base}; these weights are {model_name(folder)}")
        try:
            tok = load_tokenizer(folder)
        except ValueError as e:                     # not a tokenizer.json we read
            raise UserError(str(e)) from None
        device = pick_device(trained)
        dtype = trained.dtype
        if dtype == "auto":
            dtype = "float32" if device.type == "cpu" else "bfloat16"
        model, folder = load_model(folder, device, getattr(torch, dtype))
        load_adapter(model, adapter, ckpt / adapter)     # weights that do not fit: CheckpointError
        print(f"{ckpt / adapter} on {model_name(folder)} ({device}, {dtype})", file=sys.stderr)
        return model, tok, adapter, folder


def answer(model, tok, texts, adapter, cfg, gen):
    """The answer to each text, as token ids (the stop id, where reached, kept)."""
    prompts = [tok.chat(tok.encode(t)) for t in texts]
    longest = max(map(len, prompts)) + cfg.max_new_tokens
    if longest > model.config.block_size:
        raise UserError(f"a prompt and its answer can reach {longest} tokens, more than the "
                        f"model's context {model.config.block_size}; lower --max_new_tokens")
    tokens, _, resp = generate(
        model,
        prompts,
        cfg.max_new_tokens,
        adapters=adapter,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        generator=gen,
    )
    return [t[r.bool()].tolist() for t, r in zip(tokens, resp)]


def typed():
    """Prompts from stdin, one a line, until EOF (Ctrl-D) or Ctrl-C; a "> " on a terminal."""
    tty = sys.stdin.isatty()
    if tty:
        print("type a prompt and press Enter; Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            return
        if line.strip():
            yield [line.strip()]


def main(given):
    """What the flags `given` ({name: value}) ask for; returns the answers, as text."""
    cfg = check(SampleConfig(**given))
    model, tok, adapter, folder = load(cfg)
    use = None if cfg.base else adapter
    if cfg.export:
        try:
            export_merged(model, use, folder, cfg.export)
        except (OSError, SafetensorError) as e:     # a full disk: safetensors' own error
            raise UserError(f"cannot write {cfg.export} ({e}); free space or choose another "
                            "--export folder") from None
        what = "the base alone" if cfg.base else f"the base with {adapter} merged in"
        print(f"wrote {cfg.export}: {what}, as a Hugging Face folder. Load it with\n"
              "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"    model = AutoModelForCausalLM.from_pretrained({cfg.export!r})\n"
              f"    tokenizer = AutoTokenizer.from_pretrained({cfg.export!r})")
        if not (cfg.prompt or cfg.prompts):
            return []
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(cfg.seed)
    if cfg.prompt or cfg.prompts:
        texts = [cfg.prompt] if cfg.prompt else load_prompts(cfg.prompts)
        batches = [texts[i:i + cfg.batch_size] for i in range(0, len(texts), cfg.batch_size)]
    else:
        batches = typed()
    answers = []
    for batch in batches:
        for text, ids in zip(batch, answer(model, tok, batch, use, cfg, gen)):
            reply = plain(tok, ids).strip()
            answers.append(reply)
            if cfg.prompts:
                print(f"> {text}")
            print(reply + "\n", flush=True)
    return answers


def command_line(argv=None):
    """main on the command line, inside the error boundary (cli.run): an error the user can fix
    is one line, `error: ...`, and exit code 1 (with --debug: the traceback)."""
    return cli.run(main, flags(SampleConfig, __doc__, argv))


if __name__ == "__main__":
    command_line()
