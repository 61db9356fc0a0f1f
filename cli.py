"""
cli.py: the command line of every script: its flags, made from a config dataclass, and one error
boundary. Whatever a user can cause (a bad flag, file or environment variable, a full disk, out
of memory, a signal) ends the process with one line, "error: ...", and exit code 1; --debug shows
the traceback. Only the standard library is imported here, so a script can catch signals before
its slow imports:

    import cli
    cli.catch_signals()                     # first: Ctrl-C while torch imports is one line too
    import torch
    from weights import CheckpointError
    ...
    if __name__ == "__main__":
        cli.run(main, cli.flags(Config, __doc__))
"""
import argparse
import dataclasses
import os
import signal
import sys
import typing

# flags that name a file or folder: "~" is expanded, as a shell does for "--out_dir ~/x" but not
# for "--out_dir=~/x"
PATHS = {"out_dir", "weights", "prompts", "figure", "judge_pairs", "run", "export", "out"}


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
    given = vars(p.parse_args(argv))
    for name in PATHS & given.keys():
        given[name] = os.path.expanduser(given[name])
    return given


def check(cfg, rules):
    """cfg, or the one-line error of the first flag that breaks its rule: rules [(flag names,
    what must hold, what it must be)]. Run before any work: a bad flag costs nothing."""
    for names, ok, what in rules:
        for name in names.split():
            v = getattr(cfg, name)
            if not ok(v):                             # nan fails every comparison: it lands here
                raise UserError(f"--{name} must be {what}, got {v}")
    return cfg


def starting(signum, frame):
    raise SystemExit(f"error: stopped by {signal.Signals(signum).name} while starting")


def interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def catch_signals(handler=starting):
    """SIGINT and SIGTERM call handler: before run() (imports, flags) the process ends at once
    with one line; inside it they raise KeyboardInterrupt, which the script may catch (a training
    run saves first) and run() prints."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


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


def message(e):
    """The one line for an error the user can cause, or None for a bug (a traceback)."""
    import torch
    from weights import CheckpointError
    cpu = isinstance(e, RuntimeError) and "alloc" in str(e)     # "can't allocate", "bad_alloc"
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or cpu:
        return "out of memory: lower --batch_size or --max_new_tokens, or use a bigger device"
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted by {e or 'SIGINT'}"
    if isinstance(e, (UserError, CheckpointError, OSError)):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def run(main, given, interrupted=""):
    """main(given), inside the error boundary: an error the user can cause ends the process with
    one line "error: ..." and exit code 1 (with --debug: the traceback); interrupted: what to add
    after a signal (e.g. how to resume)."""
    catch_signals(interrupt)
    try:
        return main(given)
    except (Exception, KeyboardInterrupt) as e:
        what = message(e)
        if given.get("debug") or what is None:
            raise
        extra = f"; {interrupted}" if interrupted and isinstance(e, KeyboardInterrupt) else ""
        print(f"error: {what}{extra}", file=sys.stderr)
        sys.exit(1)
