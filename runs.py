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

A run deletes or replaces only what its run.json names (log.jsonl and plot.png with it); without
one they are the user's. Temporaries are made exclusively (new, unpredictable names: nothing
planted is followed), fsynced, then renamed into place. The folder itself is locked while the run
lives (fcntl: the OS releases it when the process dies; a lock file could be deleted). --resume
checks every file, refuses other weights or tokenizer and flags that change the math, and cuts the
log only once the checkpoint has loaded; SIGINT and SIGTERM finish the step, save and exit. A full
or read-only disk is one line too.
"""
import fcntl
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

import identity
from cli import UserError
from weights import CheckpointError, load_adapter, save_adapter

FORMAT = 2                          # bump when state.pt changes: older checkpoints are refused
CKPT = re.compile(r"ckpt_\d{6}")


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


class Run:
    """One run folder. config: the run's flags (a dict); math: the keys --resume must not change;
    replaceable: a fresh run may replace a finished run of its model (the toy run); writer: False
    on torchrun ranks > 0 (no lock); reader: a process that only reads the run (--eval,
    sample.py) shares the lock, so no run writes meanwhile."""

    def __init__(self, path, config, math, *,
                 resume=False, overwrite=False, replaceable=False, writer=True, reader=False):
        self.path = Path(path)
        self.config = config
        self.math = math
        self.writer = writer
        self.fd = None
        self.cut = None                 # the step the log is cut back to, before its next record
        try:
            f = self.path / "run.json"
            old = self.manifest = json.loads(f.read_text()) if f.is_file() else {}
            if not isinstance(old.get("config", {}), dict):
                raise TypeError
            # only names of checkpoints, never a path
            old["checkpoints"] = [n for n in old.get("checkpoints", []) if CKPT.fullmatch(n)]
        except (OSError, ValueError, AttributeError, TypeError):
            raise UserError(
                f"{self.path}/run.json is damaged; restore it or use another --out_dir"
            ) from None
        if writer:
            self.lock(fcntl.LOCK_EX, mkdir=True)
        elif reader and self.path.is_dir():
            self.lock(fcntl.LOCK_SH)
        if resume or not writer:
            return
        try:
            self.start(old, overwrite, replaceable and old.get("finished"))
        except BaseException:
            self.__exit__()                     # a refused run releases the lock at once
            raise

    def start(self, old, overwrite, replace_finished):
        """A fresh run: refuse a folder that holds a run or files no run.json names, delete what
        the old run.json names, and write a new one."""
        ckpts = sorted(p.name for p in self.path.iterdir() if CKPT.fullmatch(p.name))
        same = old.get("config", {}).get("model") == self.config.get("model")
        if (ckpts or old["checkpoints"]) and not (overwrite or (replace_finished and same)):
            raise UserError(
                f"{self.path} holds a run ({ckpts[-1] if ckpts else 'run.json'}); continue it "
                "with --resume, replace it with --overwrite, or use another --out_dir"
            )
        files = ["log.jsonl", "plot.png"]
        ours = old["checkpoints"] + files * ("config" in old)    # a run's run.json owns its files
        for name in files:
            if name not in ours and os.path.lexists(self.path / name):
                raise UserError(
                    f"{self.path / name} is not a run's (no run.json names it); move it away "
                    "or use another --out_dir"
                )
        with self.writing(self.path):                   # delete what that run wrote, only
            for name in ours:
                p = self.path / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        self.manifest = {"config": self.config, "checkpoints": [], "finished": False}
        self.write_manifest()

    def lock(self, how, mkdir=False):
        """flock on the folder itself, which cannot be deleted from under the run as a lock file
        could."""
        try:
            if mkdir:
                self.path.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self.fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another process runs in {self.path}; wait for it or use another --out_dir"
            ) from None
        except OSError as e:
            raise UserError(
                f"cannot use {self.path} for a run ({e.strerror}); choose another --out_dir"
            ) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)                   # releases the lock (so does the process's end)
            self.fd = None

    @contextmanager
    def writing(self, path, tmp=None):          # a full or read-only disk, or a permission
        try:
            yield
        except (OSError, RuntimeError, SafetensorError) as e:    # torch.save: RuntimeError
            latest = self.latest()
            intact = f", then --resume: {latest} is intact" if latest else ""
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise UserError(
                f"cannot write {path} ({why}); free space or fix permissions{intact}"
            ) from None
        finally:
            if tmp and tmp.is_dir():            # renamed into place, or a failure's leftovers
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp:
                tmp.unlink(missing_ok=True)

    def write(self, name, text):                # atomically: a new temporary file, fsync, rename
        f = self.path / name
        fd, tmp = tempfile.mkstemp(prefix=f".tmp_{name}.", dir=self.path)
        with self.writing(f, Path(tmp)):
            with open(fd, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(fd)
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
        a new temporary folder, listed in run.json, renamed into place; only then are this run's
        older checkpoints deleted."""
        final = self.path / f"ckpt_{step:06d}"
        m = self.manifest
        ours = m["checkpoints"]
        if not self.writer:
            return final
        if os.path.lexists(final):                      # never ours: resumed runs save later steps
            raise UserError(f"{final} is not this run's; move it elsewhere, then --resume")
        tmp = None
        with self.writing(final):
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp_ckpt_{step:06d}.", dir=self.path))
        with self.writing(final, tmp):
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
            saved.get("model")
        except Exception as e:
            raise UserError(
                f"{ckpt} is damaged ({type(e).__name__}); restore it from a copy or start afresh "
                "with --overwrite"
            ) from None
        if fmt != FORMAT:
            raise UserError(
                f"{ckpt} has format {fmt}, this code reads {FORMAT}; start anew with --overwrite"
            )
        try:                                    # what the loop restores: as a save wrote it
            torch.Generator(model.lm_head.weight.device).set_state(state["rng"])
            torch.Generator().set_state(state["measure_rng"])
            adam = {"state", "param_groups"} <= state["optimizer"].keys()
            ok = adam and type(state["step"]) is int
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            ok = False
        if not ok:
            raise UserError(
                f"{ckpt}/state.pt lacks a valid step, optimizer or RNG state; restore it from a "
                "copy or start afresh with --overwrite"
            )
        identity.check(saved, self.config, "--resume")
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
        self.cut = state["step"]                # at the next record: the run has started again
        return state

    def log(self, record):
        if self.writer and self.cut is not None:
            self.cut_log(self.cut)
        if self.writer:
            f = self.path / "log.jsonl"
            with self.writing(f), open(f, "a") as out:
                out.write(json.dumps(record) + "\n")

    def records(self):                          # a line torn by a crash or an edit is left out
        f = self.path / "log.jsonl"
        lines = f.read_text().splitlines() if f.is_file() else []
        out = []
        for s in lines:
            try:
                r = json.loads(s)
            except ValueError:
                continue
            if isinstance(r, dict) and type(r.get("step")) is int:
                out.append(r)
        return out

    def cut_log(self, step):                    # steps ≥ step run again: none appears twice
        self.cut = None
        if self.writer and (self.path / "log.jsonl").is_file():
            kept = (json.dumps(r) + "\n" for r in self.records() if r["step"] < step)
            self.write("log.jsonl", "".join(kept))

    def finish(self):
        self.manifest["finished"] = True
        if self.writer:
            self.write_manifest()
