"""
runs.py: a training run's folder, where nothing is lost. train_lm.py writes every run through `Run`:

    out_dir/<run>/  run.json      the run's config and the checkpoints it wrote (the only ones it ever deletes)
                    log.jsonl     one record per logged step; on --resume cut back to the checkpoint's step
                    plot.png      drawn from the whole log.jsonl
                    ckpt_000300/  <adapter>/ in PEFT format, state.pt (optimizer, RNG, step, format), config.json
                    .lock         held while the run is alive (fcntl: the OS releases it when the process dies)

What it guarantees: a fresh run refuses a folder that holds another run's checkpoints (unless --resume or
--overwrite; the cheap toy run may replace its own finished run); a second process on the same folder is refused;
a checkpoint is written to a temporary folder, fsynced and renamed into place, and only then are older ones
(of this run, named exactly ckpt_NNNNNN) removed; --resume checks every file, the format version and that no
flag that changes the math differs; SIGINT/SIGTERM end the current step, save and exit.
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

FORMAT = 1                                   # bump when state.pt changes; older checkpoints are refused
CKPT = re.compile(r"ckpt_\d{6}")


class UserError(Exception):
    """Something the user can fix: printed as one line (`error: ...`), exit code 1, no traceback."""


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


class Run:
    """One run folder, locked for the life of the process. config: the run's flags (a dict); math: the keys of
    config that change the math (--resume refuses to change them); replaceable: a fresh run may replace a
    finished run of the same model without --overwrite (the cheap toy run)."""

    def __init__(self, path, config, math, *, resume=False, overwrite=False, replaceable=False, writer=True):
        self.path, self.config, self.math, self.writer = Path(path), config, math, writer
        if not writer:                                        # torchrun ranks > 0: read, never write
            self.manifest = self.read_manifest()
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / ".lock", "a")
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is using {self.path} (it holds {self.path}/.lock); wait for it to "
                            "end or choose another --out_dir") from None
        except OSError as e:
            raise UserError(f"cannot use {self.path} as a run folder ({e.strerror}); choose another --out_dir")
        old = self.read_manifest()
        self.manifest = old if resume else {"config": config, "checkpoints": [], "finished": False}
        others = [p.name for p in self.path.iterdir() if CKPT.fullmatch(p.name)]
        if resume:
            return
        same = old.get("finished") and old.get("config", {}).get("model") == config.get("model")
        if (others or old.get("checkpoints")) and not (overwrite or (replaceable and same)):
            raise UserError(f"{self.path} already holds a run ({', '.join(sorted(others)[-2:])}); continue it with "
                            "--resume, or replace it with --overwrite, or choose another --out_dir")
        for name in old.get("checkpoints", []) + ["log.jsonl", "plot.png", "run.json"]:
            p = self.path / name                              # only what that run wrote (listed in run.json)
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
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
        except ValueError:
            raise UserError(f"{self.path}/run.json is damaged; restore it or use another --out_dir") from None

    def write_manifest(self):
        if self.writer:
            write_atomic(self.path / "run.json", json.dumps(self.manifest, indent=1))

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def latest(self):
        """The newest checkpoint this run wrote that still exists (never a stray or a user's copy)."""
        names = [n for n in self.manifest.get("checkpoints", []) if (self.path / n).is_dir()]
        return self.path / names[-1] if names else None

    def save(self, step, model, adapters, state, base_model=""):
        """ckpt_<step>/: each adapter (PEFT), state.pt (+ format, step) and config.json, atomically."""
        final = self.path / f"ckpt_{step:06d}"
        if not self.writer:
            return final
        tmp = self.path / f".tmp_{final.name}"
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
            raise UserError(f"could not write checkpoint {final} ({e.strerror}); the previous checkpoint "
                            f"{self.latest() or '(none)'} is intact; free space or fix permissions, then --resume")
        old = [n for n in self.manifest["checkpoints"] if n != final.name]
        self.manifest["checkpoints"] = [final.name]
        self.write_manifest()
        for name in old + [f".old_{final.name}"]:
            shutil.rmtree(self.path / name, ignore_errors=True)
        return final

    def load(self, model, adapters):
        """Validate the newest checkpoint and load it: adapters into model, then return its state dict."""
        ckpt = self.latest()
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint of a run in {self.path}; start without --resume")
        try:
            saved = json.loads((ckpt / "config.json").read_text())
            state = torch.load(ckpt / "state.pt", weights_only=True)
        except (OSError, ValueError, RuntimeError, EOFError) as e:
            raise UserError(f"{ckpt} is damaged ({type(e).__name__}); delete it to resume from an older run "
                            "or start afresh with --overwrite") from None
        if state.get("format") != FORMAT:
            raise UserError(f"{ckpt} has format {state.get('format')}, this code reads {FORMAT}; start afresh")
        changed = [f"--{k} {saved.get(k)!r} -> {self.config.get(k)!r}" for k in self.math
                   if saved.get(k) != self.config.get(k)]
        if changed:
            raise UserError(f"--resume would change the run's math ({'; '.join(changed)}); use the saved flags "
                            f"(in {ckpt}/config.json) or start afresh with --overwrite")
        if saved.get("max_steps") != self.config.get("max_steps"):
            print(f"note: --max_steps {saved.get('max_steps')} -> {self.config.get('max_steps')}: "
                  "the cosine learning-rate schedule now ends at the new step")
        try:
            for name in adapters:
                load_adapter(model, name, ckpt / name)
        except CheckpointError as e:
            raise UserError(f"--resume: {e}") from None
        self.manifest["finished"] = False
        if self.writer:
            self.cut_log(state["step"])
        return state

    # ------------------------------------------------------------------------------------------------------
    # the log

    def log(self, record):
        if self.writer:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self):
        f = self.path / "log.jsonl"
        lines = f.read_text().splitlines() if f.is_file() else []
        return [r for r in map(json.loads, lines) if "step" in r]

    def cut_log(self, step):
        """Drop records of steps ≥ step: they are recomputed after the resume, so no step appears twice."""
        f = self.path / "log.jsonl"
        if f.is_file():
            keep = [line for line in f.read_text().splitlines() if json.loads(line).get("step", -1) < step]
            write_atomic(f, "".join(line + "\n" for line in keep))

    def finish(self):
        self.manifest["finished"] = True
        self.write_manifest()


class Interrupts:
    """with Interrupts() as stop: ... — SIGINT (Ctrl-C) and SIGTERM (preemption) set stop.signal instead of
    killing the process; the loop saves at the end of the current step and exits. A second signal kills."""

    def __enter__(self):
        self.signal, self.saved = None, {}
        for s in (signal.SIGINT, signal.SIGTERM):
            self.saved[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None:                   # asked twice: stop now
            signal.signal(signum, self.saved[signum])
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
    """`torchrun --nproc_per_node N train_lm.py ...` sets WORLD_SIZE, RANK, LOCAL_RANK: join the group (gloo on
    CPU, NCCL on GPUs), silence stdout on ranks > 0, leave at the end. Without torchrun: Shard(0, 1)."""
    if "WORLD_SIZE" not in os.environ:
        yield Shard()
        return
    if int(os.environ.get("LOCAL_RANK", 0)) < torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
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
    """Average the gradients and the logged values over ranks in one bucket (no DDP wrapper: one frozen base
    serves every role, so only the adapters' gradients travel). Ranks hold equally many rows, so the mean of their
    gradients is the global batch's gradient. Returns the averaged values."""
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
