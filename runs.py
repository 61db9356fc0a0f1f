"""
runs.py: what a training run keeps on disk, and how it runs on several processes. Nothing is ever lost:

    out_dir/<run>/  run.json      the run's config and the checkpoints it wrote: the only ones it deletes
                    log.jsonl     one record per logged step (on --resume cut back to the checkpoint's step)
                    plot.png      drawn from the whole log.jsonl
                    ckpt_000300/  <adapter>/ (PEFT format), state.pt (optimizer, RNG, step), config.json
                    .lock         held while the run lives (fcntl: the OS releases it when the process dies)

Checkpoints are fsynced in a temporary folder and renamed into place before older ones go; --resume checks
every file and refuses flags that change the math; SIGINT and SIGTERM finish the step, save and exit.
"""
import fcntl
import json
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from weights import CheckpointError, load_adapter, save_adapter

FORMAT = 1                                   # bump when state.pt changes: older checkpoints are refused
CKPT = re.compile(r"ckpt_\d{6}")


class UserError(Exception):
    """Something the user can fix: printed as one line (`error: ...`), exit code 1, no traceback."""


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd), os.close(fd)


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


class Run:
    """One run folder. config: the run's flags (a dict); math: the keys that change the math (--resume refuses
    to change them); replaceable: a fresh run may replace a finished run of the same model (the toy run);
    writer: False on torchrun ranks > 0, which read and never write."""

    def __init__(self, path, config, math, *, resume=False, overwrite=False, replaceable=False, writer=True):
        self.path, self.config, self.math, self.writer = Path(path), config, math, writer
        old = self.manifest = self.read_manifest()
        if not writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / ".lock", "a")
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another process runs in {self.path}; wait for it or use another --out_dir")
        except OSError as e:
            raise UserError(f"cannot use {self.path} for a run ({e.strerror}); choose another --out_dir")
        if resume:
            return
        ckpts = sorted(p.name for p in self.path.iterdir() if CKPT.fullmatch(p.name))
        same = old.get("finished") and old.get("config", {}).get("model") == config.get("model")
        if (ckpts or old.get("checkpoints")) and not (overwrite or (replaceable and same)):
            raise UserError(f"{self.path} holds a run ({ckpts[-1] if ckpts else 'run.json'}); continue it "
                            "with --resume, replace it with --overwrite, or use another --out_dir")
        for name in old.get("checkpoints", []) + ["log.jsonl", "plot.png"]:     # what that run wrote, only
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        self.manifest = {"config": config, "checkpoints": [], "finished": False}
        self.write_manifest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer:
            self.lock.close()                                 # releases the lock (so does the process's end)

    def read_manifest(self):
        try:
            return json.loads((self.path / "run.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            raise UserError(f"{self.path}/run.json is damaged; restore it or use another --out_dir") from None

    def write_manifest(self):
        if self.writer:
            write_atomic(self.path / "run.json", json.dumps(self.manifest, indent=1))

    def latest(self):
        """The newest checkpoint this run wrote that still exists (never a stray folder or a user's copy)."""
        names = [n for n in self.manifest.get("checkpoints", []) if (self.path / n).is_dir()]
        return self.path / names[-1] if names else None

    def save(self, step, model, adapters, state, base_model=""):
        """ckpt_<step>/: each adapter, state.pt (with format and step) and config.json, atomically."""
        final, tmp = self.path / f"ckpt_{step:06d}", self.path / f".tmp_ckpt_{step:06d}"
        if not self.writer:
            return final
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            for name in adapters:
                save_adapter(model, name, tmp / name, base_model)
            torch.save({**state, "format": FORMAT, "step": step}, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(self.config, indent=1))
            for f in [*tmp.rglob("*"), tmp]:
                fsync(f)
            if final.exists():                                # ours, from before a resume
                os.replace(final, self.path / f".old_{final.name}")
            os.replace(tmp, final)
            fsync(self.path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write {final} ({e.strerror}); the checkpoint "
                            f"{self.latest() or '(none)'} is intact: free space or fix permissions, then "
                            "--resume") from None
        old = [n for n in self.manifest["checkpoints"] if n != final.name] + [f".old_{final.name}"]
        self.manifest["checkpoints"] = [final.name]
        self.write_manifest()
        for name in old:
            shutil.rmtree(self.path / name, ignore_errors=True)
        return final

    def load(self, model, adapters):
        """Check the newest checkpoint, load its adapters into model, and return its state."""
        ckpt = self.latest()
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint of a run in {self.path}; start without --resume")
        try:
            saved = json.loads((ckpt / "config.json").read_text())
            state = torch.load(ckpt / "state.pt", weights_only=True)
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            raise UserError(f"{ckpt} is damaged ({type(e).__name__}); delete it to resume from an older one "
                            "or start afresh with --overwrite") from None
        if state.get("format") != FORMAT:
            raise UserError(f"{ckpt} has format {state.get('format')}, this code reads {FORMAT}; start anew")
        changed = [f"--{k} {saved.get(k)!r} -> {self.config.get(k)!r}" for k in self.math
                   if saved.get(k) != self.config.get(k)]
        if changed:
            raise UserError(f"--resume would change the run's math ({'; '.join(changed)}); use the flags "
                            f"saved in {ckpt}/config.json or start afresh with --overwrite")
        if saved.get("max_steps") != self.config.get("max_steps"):
            print(f"note: --max_steps {saved.get('max_steps')} -> {self.config.get('max_steps')}: the cosine "
                  "learning-rate schedule now ends at the new step")
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
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self):
        f = self.path / "log.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []

    def cut_log(self, step):
        """Drop the records of steps ≥ step: they are computed again after the resume, so no step repeats."""
        f = self.path / "log.jsonl"
        if self.writer and f.is_file():
            keep = [line for line in f.read_text().splitlines() if json.loads(line)["step"] < step]
            write_atomic(f, "".join(line + "\n" for line in keep))

    def finish(self):
        self.manifest["finished"] = True
        self.write_manifest()


class Interrupts:
    """with Interrupts() as stop: SIGINT (Ctrl-C) and SIGTERM (preemption) set stop.signal instead of killing
    the process; the loop saves at the end of the current step and exits. A second signal stops at once."""

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


# ----------------------------------------------------------------------------------------------------------
# torchrun: data parallelism over the LoRA gradients

class Shard(NamedTuple):
    """This process's slots of the global batch: the rank-th of `world` equal slices."""
    rank: int = 0
    world: int = 1

    def mine(self, n):
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


@contextmanager
def distributed():
    """`torchrun --nproc_per_node N train_lm.py ...` sets WORLD_SIZE, RANK, LOCAL_RANK: join the group (gloo
    on CPU, NCCL on GPUs), silence stdout on ranks > 0, leave at the end. Without torchrun: Shard(0, 1)."""
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
    """Average the adapters' gradients and the logged values over ranks, in one bucket (one frozen base serves
    every role, so there is no DDP wrapper: only LoRA gradients travel). Ranks hold equally many rows, so the
    mean of their gradients is the global batch's gradient. Returns the averaged values (a tensor)."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=params[0].device) for v in values])
    if shard.world == 1:
        return values
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [values])
    dist.all_reduce(flat)
    flat /= shard.world
    for p, g in zip(params, flat[:-len(values)].split([p.numel() for p in params])):
        p.grad = g.view_as(p)
    return flat[-len(values):]
