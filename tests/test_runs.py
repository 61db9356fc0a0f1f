"""Fault tests of the run folder (runs.py): nothing is lost, nothing is mixed. A rerun without
--resume refuses (the toy run may replace its own finished run), --overwrite replaces only what the
run wrote; a lock keeps a second process out; SIGTERM and Ctrl-C save at the end of the step and
--resume ends bit-identical; divergence never overwrites the last finite checkpoint; stray entries
and a user's copies are never resumed from nor deleted; a crash inside a save orphans nothing; the
log holds each step once, the plot all of it."""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plots
import runs
import train_lm as T
import weights
from test_train_lm import ENV, ROOT, adapters, args, cli, interrupt_at, toy

FAST = dict(algo="inpo", samples=2, save_every=1, log_every=1)


def steps(run):
    return [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]


def ckpts(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt_"))


def same_adapters(a, b):
    a, b = adapters(a), adapters(b)
    return a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


def finite(ckpt, bound=1e6):
    return all(torch.isfinite(t).all() and t.abs().max() < bound for a in adapters(ckpt).values()
               for t in a.values())


# --------------------------------------------------------------------------------------------------
# a rerun on a folder that holds a run

def test_phi3_rerun_refuses_and_overwrite_replaces_only_what_the_run_wrote(phi3_dir, tmp_path):
    argv = ["--model", "phi3", "--weights", phi3_dir, "--algo", "nash_md_pg", "--max_new_tokens", 4,
            "--batch_size", 2, "--max_steps", 1, "--out_dir", tmp_path]
    run = tmp_path / "nash_md_pg"

    def main(*extra):
        return T.main(args([*argv, *extra]))
    main()
    before = (run / "ckpt_000001" / "state.pt").read_bytes()
    refusal = "holds a run .ckpt_000001.; continue it with --resume, replace it with --overwrite"
    with pytest.raises(T.UserError, match=refusal):
        main()                                  # a finished Phi-3 run is never replaced silently
    assert (run / "ckpt_000001" / "state.pt").read_bytes() == before and steps(run) == [0, 1]
    mine = {"notes.txt": "x", "ckpt_notes.txt": "y", "ckpt_000001_backup/state.pt": "z",
            "eval/results.json": "{}"}
    for name, text in mine.items():
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(text)
    main("--overwrite", "--max_steps", 2, "--save_every", 5)
    assert ckpts(run) == ["ckpt_000001_backup", "ckpt_000002", "ckpt_notes.txt"]
    assert steps(run) == [0, 1, 2]
    assert all((run / name).read_text() == text for name, text in mine.items())


def test_toy_run_replaces_its_own_finished_run_but_not_an_unfinished_one(tmp_path, monkeypatch):
    T.main(toy(tmp_path, **FAST, max_steps=2))
    run = tmp_path / "inpo"
    T.main(toy(tmp_path, **FAST, max_steps=3))    # the cheap toy run may replace its finished run
    assert ckpts(run) == ["ckpt_000003"] and steps(run) == [0, 1, 2, 3]
    undo = interrupt_at(monkeypatch, "inpo", 1)
    with pytest.raises(KeyboardInterrupt):
        T.main(toy(tmp_path, **FAST, max_steps=3))
    undo()
    refusal = r"holds a run \(ckpt_000001\); continue it with --resume"
    with pytest.raises(T.UserError, match=refusal):
        T.main(toy(tmp_path, **FAST, max_steps=3))    # an interrupted run is resumed, not replaced
    assert ckpts(run) == ["ckpt_000001"]


def test_stray_entries_and_user_copies_are_never_resumed_from_nor_deleted(tmp_path):
    """An empty ckpt_999999, a user's ckpt_000003_backup (a copy of another step) and a file
    ckpt_notes.txt: --resume continues from the run's own ckpt_000002, the saves work, and all three
    are left as they were."""
    T.main(toy(tmp_path, **FAST, max_steps=2))
    run = tmp_path / "inpo"
    (run / "ckpt_999999").mkdir()
    shutil.copytree(run / "ckpt_000002", run / "ckpt_000003_backup")
    (run / "ckpt_notes.txt").write_text("lr 1e-3 looked good")
    logs = T.main(toy(tmp_path, **FAST, max_steps=4, resume=True))["inpo"]
    assert [r["step"] for r in logs] == [0, 1, 2, 3, 4] and steps(run) == [0, 1, 2, 3, 4]
    assert ckpts(run) == ["ckpt_000003_backup", "ckpt_000004", "ckpt_999999", "ckpt_notes.txt"]
    assert (run / "ckpt_notes.txt").read_text() == "lr 1e-3 looked good"
    assert not any((run / "ckpt_999999").iterdir())
    assert torch.load(run / "ckpt_000003_backup" / "state.pt", weights_only=True)["step"] == 2


def test_run_json_names_only_checkpoints_inside_the_folder(tmp_path):
    """An edited run.json listing "../victim" (or an absolute path): --overwrite deletes neither."""
    T.main(toy(tmp_path / "out", **FAST, max_steps=1))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    manifest = tmp_path / "out" / "inpo" / "run.json"
    m = json.loads(manifest.read_text())
    listed = ["../../victim", str(victim), *m["checkpoints"]]
    manifest.write_text(json.dumps({**m, "checkpoints": listed}))
    T.main(toy(tmp_path / "out", **FAST, max_steps=1, overwrite=True))
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert ckpts(tmp_path / "out" / "inpo") == ["ckpt_000001"]


def test_a_save_never_replaces_a_checkpoint_it_did_not_write(tmp_path):
    """--overwrite with someone else's ckpt_000001 in the folder: the run refuses to save over it.
    """
    run = tmp_path / "inpo"
    (run / "ckpt_000001").mkdir(parents=True)
    (run / "ckpt_000001" / "theirs.txt").write_text("keep")
    refusal = r"ckpt_000001 is not this run's; move it elsewhere, then --resume"
    with pytest.raises(T.UserError, match=refusal):
        T.main(toy(tmp_path, **FAST, max_steps=2, overwrite=True))
    assert (run / "ckpt_000001" / "theirs.txt").read_text() == "keep"


# --------------------------------------------------------------------------------------------------
# processes: the lock, SIGTERM and Ctrl-C

def start(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train_lm.py"), *map(str, args)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(p, n=0):
    """Read p's stdout until it logs step n (it holds its run folder and its signal handlers by
    then)."""
    for line in p.stdout:
        if f" step {n:4d} |" in line:
            return
    pytest.fail(f"the run ended before step {n}: {p.wait()} {p.stderr.read()}")


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    first = start("--algo", "inpo", "--max_steps", 5000, "--samples", 2, "--log_every", 1,
                  "--out_dir", tmp_path, "--figure", "")
    try:
        wait_for_step(first)
        rc, out, err = cli("--algo", "inpo", "--max_steps", 2, "--samples", 2,
                           "--out_dir", tmp_path, "--figure", "", "--overwrite")
        assert rc == 1 and "Traceback" not in out + err and err.count("\n") == 1, err
        refusal = f"error: another process runs in {tmp_path / 'inpo'}; wait for it"
        assert err.startswith(refusal), err
    finally:
        first.kill()                                  # the process this test started, by its pid
        first.communicate()
    with runs.Run(tmp_path / "inpo", {}, [], resume=True):   # the OS released the lock with it
        pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_and_resume_ends_bit_identical(tmp_path, sig):
    kw = dict(FAST, max_steps=60, save_every=1000)
    argv = ["--algo", "inpo", "--samples", 2, "--max_steps", 60, "--save_every", 1000,
            "--log_every", 1, "--out_dir", tmp_path / "stopped", "--figure", ""]
    p = start(*argv)
    wait_for_step(p, 1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "Traceback" not in out + err and err.count("\n") == 1, err
    assert err.startswith(f"error: stopped by {sig.name} after step ") and "--resume" in err, err
    run = tmp_path / "stopped" / "inpo"
    (ck,) = ckpts(run)
    done = int(ck[5:])                               # the step it finished, saved at its end
    assert 1 < done < 60 and err.split("after step ")[1].startswith(f"{done},")
    assert steps(run)[-1] == done - 1
    T.main(toy(tmp_path / "stopped", **kw, resume=True))
    T.main(toy(tmp_path / "straight", **kw))
    assert same_adapters(run / "ckpt_000060", tmp_path / "straight" / "inpo" / "ckpt_000060")
    assert steps(run) == list(range(61))


# --------------------------------------------------------------------------------------------------
# divergence

def test_divergence_never_overwrites_the_last_finite_checkpoint(tmp_path, monkeypatch):
    """The third update explodes the adapters (×1e30): the run stops with one line before saving,
    and the checkpoint of step 2 stays, finite and the run's latest."""
    real, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                for g in self.param_groups:
                    for q in g["params"]:
                        q.mul_(1e30)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    refusal = r"at step 3: the run diverged; the last checkpoint .*ckpt_000002"
    with pytest.raises(T.UserError, match=refusal):
        T.main(toy(tmp_path, **FAST, max_steps=5))
    run = tmp_path / "inpo"
    assert ckpts(run) == ["ckpt_000002"] and finite(run / "ckpt_000002")
    assert runs.Run(run, {}, [], resume=True, writer=False).latest().name == "ckpt_000002"


@pytest.mark.parametrize("algo", ["nash_md_pg", "lana"])
def test_huge_lr_one_step_saves_nothing(tmp_path, algo):
    """Issue 11: `--algo nash_md_pg --lr 1e30 --max_steps 1` exited 0 with 1e30 adapters saved."""
    with pytest.raises(T.UserError, match="diverged"):
        T.main(toy(tmp_path, algo=algo, lr=1e30, max_steps=1, samples=2))
    assert all(finite(c) for c in (tmp_path / algo).glob("ckpt_*"))


# --------------------------------------------------------------------------------------------------
# inside a save, the log, the format, the adapter config

def test_a_crash_inside_a_save_orphans_nothing(tmp_path, monkeypatch):
    """Killed after ckpt_000002 is renamed into place but before run.json drops ckpt_000001:
    --resume continues from ckpt_000002 (listed before it was renamed) and the next save deletes
    ckpt_000001. A failed rename leaves the previous checkpoint the latest, and the same step can be
    saved again."""
    real_write, writes = runs.Run.write, []

    def write(self, name, text):
        writes.append(name)
        if writes.count("run.json") == 5:           # 1: start, 2-3: save of 1, 4-5: save of 2
            raise KeyboardInterrupt
        return real_write(self, name, text)
    monkeypatch.setattr(runs.Run, "write", write)
    with pytest.raises(KeyboardInterrupt):
        T.main(toy(tmp_path, **FAST, max_steps=4))
    monkeypatch.setattr(runs.Run, "write", real_write)
    run = tmp_path / "inpo"
    assert ckpts(run) == ["ckpt_000001", "ckpt_000002"]
    real_replace = runs.os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp_ckpt_000004."):      # made with an unpredictable end
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(runs.os, "replace", replace)
    refusal = r"cannot write .*ckpt_000004 .*--resume: .*ckpt_000003 is intact"
    with pytest.raises(T.UserError, match=refusal):
        T.main(toy(tmp_path, **FAST, max_steps=4, resume=True))
    assert ckpts(run) == ["ckpt_000003"] and not list(run.glob(".tmp*"))
    monkeypatch.setattr(runs.os, "replace", real_replace)
    T.main(toy(tmp_path, **FAST, max_steps=4, resume=True))
    assert ckpts(run) == ["ckpt_000004"] and steps(run) == [0, 1, 2, 3, 4]


def test_resume_cuts_the_log_and_the_plot_draws_all_of_it(tmp_path, monkeypatch):
    """Stopped after the checkpoint of step 3 with steps 3 and 4 logged, and a last line torn by the
    crash: after --resume every step appears once, and plot.png is drawn from all of steps 0..6."""
    kw = dict(FAST, max_steps=6, save_every=3)
    undo = interrupt_at(monkeypatch, "inpo", 5)
    with pytest.raises(KeyboardInterrupt):
        T.main(toy(tmp_path, **kw))
    run = tmp_path / "inpo"
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "gap": 0.01')                    # torn by the crash
    assert (run / "log.jsonl").read_text().count("\n") == 5
    undo()
    drawn = []
    monkeypatch.setattr(plots, "lm_convergence", lambda runs, path, *a: drawn.append(runs))
    T.main(toy(tmp_path, **kw, resume=True))
    assert steps(run) == list(range(7))
    assert [r["step"] for r in drawn[0]["inpo"][1]] == list(range(7))


def test_checkpoints_carry_a_format_version_and_another_is_refused(tmp_path):
    T.main(toy(tmp_path, **FAST, max_steps=1))
    state = tmp_path / "inpo" / "ckpt_000001" / "state.pt"
    assert torch.load(state, weights_only=True)["format"] == runs.FORMAT
    torch.save({**torch.load(state, weights_only=True), "format": runs.FORMAT + 1}, state)
    refusal = f"has format {runs.FORMAT + 1}, this code reads {runs.FORMAT}"
    with pytest.raises(T.UserError, match=refusal):
        T.main(toy(tmp_path, **FAST, max_steps=2, resume=True))


def test_adapter_config_records_the_model_name_never_a_path(phi3_dir, tmp_path):
    """The toy run records "tiny"; a Phi-3 run from the Hugging Face cache layout records
    "org/name"."""
    T.main(toy(tmp_path / "toy", **FAST, max_steps=1))
    cfg = json.loads((tmp_path / "toy/inpo/ckpt_000001/policy/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny"
    snap = tmp_path / "hub" / "models--microsoft--Phi-3-mini-4k-instruct" / "snapshots" / "abc123"
    shutil.copytree(phi3_dir, snap, symlinks=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    T.main(args(["--model", "phi3", "--weights", tmp_path / "hub", "--algo", "nash_md_pg",
                 "--max_new_tokens", 4, "--batch_size", 2, "--max_steps", 1,
                 "--out_dir", tmp_path / "phi3"]))
    text = (tmp_path / "phi3/nash_md_pg/ckpt_000001/policy/adapter_config.json").read_text()
    assert json.loads(text)["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert str(tmp_path) not in text and weights.model_name(phi3_dir) == phi3_dir.name
