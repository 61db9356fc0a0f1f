"""
runs.py: what a training run keeps on disk, and how it runs on several processes. Nothing is ever
lost:

    out_dir/<run>/  run.json      the run's config and the checkpoints it wrote: the only ones it
                                  deletes
                    log.jsonl     one record per logged step (on --resume cut back to the
                                  checkpoint's step)
                    plot.png      drawn from the whole log.jsonl
                    ckpt_000300/  <adapter>/ (PEFT format), state.pt (optimizer, RNG, step),
                                  config.json
                    .lock         held while the run lives (fcntl: the OS releases it when the
                                  process dies)

Checkpoints are fsynced, then renamed into place; --resume checks every file and refuses flags
that change the math; SIGINT and SIGTERM finish the step, save and exit. A full or read-only disk
is one line too.
"""
import argparse
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import typing
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from weights import CheckpointError, load_adapter, save_adapter

FORMAT = 1                          # bump when state.pt changes: older checkpoints are refused
CKPT = re.compile(r"ckpt_\d{6}")


class UserError(Exception):
    """Something the user can fix: printed as one line (`error: ...`), exit code 1, no
    traceback."""


def flags(config, doc, argv=None):
    """The command line of every script, from its config dataclass: one --name per field, typed by
    the field's annotation (booleans: --name / --no-name), help: the docstring's first paragraph.
    Returns only the flags the user gave, {name: value}: the script layers them over its defaults
    (and train_lm.py over its presets). A bad flag is one line and exit code 1, like every user
    error here."""
    about = (doc or "").strip().split("\n\n")[0]       # python -OO strips docstrings: doc is None
    p = argparse.ArgumentParser(description=about, argument_default=argparse.SUPPRESS)
    p.error = lambda msg: p.exit(1, f"error: {msg} (see --help)\n")
    # typed by the annotation, not the default: `lr: float = 1` takes 3e-4, `steps: int = None`
    # takes 10; get_type_hints also reads annotations written as strings
    for f in dataclasses.fields(config):
        kind = typing.get_type_hints(config)[f.name]
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        p.add_argument(f"--{f.name}", help=f"default: {f.default!r}", **how)
    return vars(p.parse_args(argv))


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


class Run:
    """One run folder. config: the run's flags (a dict); math: the keys --resume must not change;
    replaceable: a fresh run may replace a finished run of its model (the toy run); writer: False
    on torchrun ranks > 0."""

    def __init__(self, path, config, math, *,
                 resume=False, overwrite=False, replaceable=False, writer=True):
        self.path = Path(path)
        self.config = config
        self.math = math
        self.writer = writer
        try:
            f = self.path / "run.json"
            old = self.manifest = json.loads(f.read_text()) if f.is_file() else {}
            # only names of checkpoints, never a path
            old["checkpoints"] = [n for n in old.get("checkpoints", []) if CKPT.fullmatch(n)]
        except (OSError, ValueError, AttributeError, TypeError):
            raise UserError(
                f"{self.path}/run.json is damaged; restore it or use another --out_dir"
            ) from None
        if not writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / ".lock", "a")
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another process runs in {self.path}; wait for it or use another --out_dir"
            )
        except OSError as e:
            raise UserError(
                f"cannot use {self.path} for a run ({e.strerror}); choose another --out_dir"
            )
        if resume:
            return
        ckpts = sorted(p.name for p in self.path.iterdir() if CKPT.fullmatch(p.name))
        same = old.get("finished") and old.get("config", {}).get("model") == config.get("model")
        if (ckpts or old["checkpoints"]) and not (overwrite or (replaceable and same)):
            raise UserError(
                f"{self.path} holds a run ({ckpts[-1] if ckpts else 'run.json'}); continue it "
                "with --resume, replace it with --overwrite, or use another --out_dir"
            )
        with self.writing(self.path):                   # delete what that run wrote, only
            for name in old["checkpoints"] + ["log.jsonl", "plot.png"]:
                p = self.path / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        self.manifest = {"config": config, "checkpoints": [], "finished": False}
        self.write_manifest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer:
            self.lock.close()                   # releases the lock (so does the process's end)

    @contextmanager
    def writing(self, path, tmp=None):          # a full or read-only disk, or a permission
        try:
            yield
        except OSError as e:
            latest = self.latest()
            intact = f", then --resume: {latest} is intact" if latest else ""
            raise UserError(
                f"cannot write {path} ({e.strerror or e}); free space or fix permissions{intact}"
            ) from None
        finally:
            if tmp:                             # renamed into place, or a failure's leftovers
                shutil.rmtree(tmp, ignore_errors=True)

    def write(self, name, text):                # atomically: a temporary file, fsync, rename
        f = self.path / name
        tmp = self.path / f".{name}.tmp"
        with self.writing(f):
            tmp.write_text(text)
            fsync(tmp)
            os.replace(tmp, f)
            fsync(self.path)

    def write_manifest(self):
        self.write("run.json", json.dumps(self.manifest, indent=1))

    def latest(self):
        """The newest checkpoint this run wrote that still exists (never a stray folder or a
        user's copy)."""
        for name in reversed(self.manifest["checkpoints"]):
            if (self.path / name).is_dir():
                return self.path / name
        return None

    def save(self, step, model, adapters, state, base_model=""):
        """ckpt_<step>/: each adapter, state.pt (with format and step) and config.json, fsynced in
        a temporary folder, listed in run.json, renamed into place; only then are this run's
        older checkpoints deleted."""
        final = self.path / f"ckpt_{step:06d}"
        tmp = self.path / f".tmp_ckpt_{step:06d}"
        m = self.manifest
        ours = m["checkpoints"]
        if not self.writer:
            return final
        if final.exists():                              # never ours: resumed runs save later steps
            raise UserError(f"{final} is not this run's; move it elsewhere, then --resume")
        with self.writing(final, tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            for name in adapters:
                save_adapter(model, name, tmp / name, base_model)
            torch.save({**state, "format": FORMAT, "step": step}, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(self.config, indent=1))
            for f in [*tmp.rglob("*"), tmp]:
                fsync(f)
            # listed before it exists: never orphaned
            m["checkpoints"] = [n for n in ours if n != final.name] + [final.name]
            self.write_manifest()
            os.replace(tmp, final)
            fsync(self.path)
        m["checkpoints"] = [final.name]
        self.write_manifest()
        for name in set(ours) - {final.name}:
            shutil.rmtree(self.path / name, ignore_errors=True)
        return final

    def load(self, model, adapters):
        """Check the newest checkpoint, load its adapters into model, and return its state."""
        ckpt = self.latest()
        if ckpt is None:
            raise UserError(
                f"--resume: no checkpoint of a run in {self.path}; start without --resume"
            )
        try:                                    # whatever a truncated or foreign file raises
            saved = json.loads((ckpt / "config.json").read_text())
            state = torch.load(ckpt / "state.pt", weights_only=True)
            fmt = state.get("format")
        except Exception as e:
            raise UserError(
                f"{ckpt} is damaged ({type(e).__name__}); restore it from a copy or start afresh "
                "with --overwrite"
            ) from None
        if fmt != FORMAT:
            raise UserError(
                f"{ckpt} has format {fmt}, this code reads {FORMAT}; start anew with --overwrite"
            )
        changed = [f"--{k} {saved.get(k)!r} -> {self.config.get(k)!r}"
                   for k in self.math
                   if saved.get(k) != self.config.get(k)]
        if changed:
            raise UserError(
                f"--resume would change the run's math ({'; '.join(changed)}); use the flags "
                f"saved in {ckpt}/config.json or start afresh with --overwrite"
            )
        if saved.get("max_steps") != self.config.get("max_steps"):
            if state["step"] > self.config["max_steps"]:
                raise UserError(
                    f"{ckpt} is at step {state['step']}; pass --max_steps {state['step']}+"
                )
            print(f"note: --max_steps {saved.get('max_steps')} -> {self.config.get('max_steps')}: "
                  "the cosine learning-rate schedule now ends at the new step")
        try:
            for name in adapters:
                load_adapter(model, name, ckpt / name)
        except CheckpointError as e:
            raise UserError(f"--resume: {e}") from None
        self.manifest["finished"] = False
        self.cut_log(state["step"])
        return state

    def log(self, record):
        if self.writer:
            f = self.path / "log.jsonl"
            with self.writing(f), open(f, "a") as out:
                out.write(json.dumps(record) + "\n")

    def records(self):                          # a last line torn by a crash is left out
        f = self.path / "log.jsonl"
        if not f.is_file():
            return []
        return [json.loads(s) for s in f.read_text().splitlines() if s.endswith("}")]

    def cut_log(self, step):                    # steps ≥ step run again: none appears twice
        if self.writer and (self.path / "log.jsonl").is_file():
            kept = (json.dumps(r) + "\n" for r in self.records() if r["step"] < step)
            self.write("log.jsonl", "".join(kept))

    def finish(self):
        self.manifest["finished"] = True
        if self.writer:
            self.write_manifest()


class Interrupts:
    """with Interrupts() as stop: SIGINT (Ctrl-C) and SIGTERM (preemption) set stop.signal instead
    of killing the process; the loop saves at the end of the current step and exits. A second
    signal stops at once."""

    def __enter__(self):
        self.signal = None
        self.saved = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


# -------------------------------------------------------------------------------------------------
# torchrun: data parallelism over the LoRA gradients

class Shard(typing.NamedTuple):
    """This process's slots of the global batch: the rank-th of `world` equal slices."""
    rank: int = 0
    world: int = 1

    def mine(self, n):
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


@contextmanager
def distributed():
    """`torchrun --nproc_per_node N train_lm.py ...` sets WORLD_SIZE, RANK, LOCAL_RANK: join the
    group (gloo on CPU, NCCL on GPUs), silence stdout on ranks > 0, leave at the end. Without
    torchrun: Shard(0, 1)."""
    if "WORLD_SIZE" not in os.environ:
        yield Shard()
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    stdout = sys.stdout
    try:
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")
        yield Shard(dist.get_rank(), dist.get_world_size())
    finally:
        sys.stdout = stdout
        dist.destroy_process_group()


def all_reduce(params, values, shard):
    """Average the LoRA gradients and the logged values over ranks in one bucket (one frozen base
    serves every role: no DDP wrapper). Ranks hold equally many rows, so this is the global
    batch's gradient."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=params[0].device)
                          for v in values])
    if shard.world == 1:
        return values
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [values])
    dist.all_reduce(flat)
    flat /= shard.world
    for p, g in zip(params, flat[:-len(values)].split([p.numel() for p in params])):
        p.grad = g.view_as(p)
    return flat[-len(values):]
