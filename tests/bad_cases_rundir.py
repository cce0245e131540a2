"""Bad-input cases: where a run may write (ownership.py) — the model dir, a data dir, the current dir, a file, a
dangling symlink, someone's files, a finished run, a live run's lock — all refused before anything is loaded or
written (see bad_inputs_lib.py for `case` and `Ctx`). Run dirs here are never named tmp/run: the corpus checks
that tmp/run is not written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

from bad_inputs_lib import case


def _foreign(t, name: str = "mine", entry: str = "notes.txt"):
    d = t.tmp / name
    d.mkdir(exist_ok=True)
    (d / entry).write_text("someone's work")
    return d


def _locked_run(t, holder: dict, name: str = "live"):
    d = t.tmp / name
    d.mkdir()
    (d / ".mlxtune-run").write_text(json.dumps({"format": "mlxtune-run", "format_version": 1}))
    (d / ".mlxtune-run.lock").write_text(json.dumps(holder) if holder else "")
    return d


def _run_copy(t, name: str = "copy", drop: tuple = ()):
    d = t.tmp / name
    shutil.copytree(t.run, d)
    for n in drop:
        p = d / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return d


@case("rundir-is-the-model-dir", "output_dir", "is model.path")
def _(t): return t.train({"output_dir": str(t.model)})
@case("rundir-inside-the-model-dir", "output_dir", "is inside model.path")
def _(t): return t.train({"output_dir": str(t.model / "runs" / "demo")})
@case("rundir-symlink-to-the-model-dir", "output_dir", "is model.path")
def _(t): (t.tmp / "alias").symlink_to(t.model); return t.train({"output_dir": str(t.tmp / "alias")})
@case("rundir-is-the-data-dir", "output_dir", "is data.train")
def _(t): return t.train({"output_dir": str(t.data)})
@case("rundir-inside-the-data-dir", "output_dir", "is inside data.train")
def _(t): return t.train({"output_dir": str(t.data / "run1")})
@case("rundir-is-the-data-file", "output_dir", "is a file, not a directory")
def _(t): return t.train({"output_dir": str(t.data / "train.jsonl")})
@case("rundir-holds-the-data-file", "output_dir", "holds data.train")
def _(t): return t.train({"output_dir": str(t.tmp / "data"), "data.train": str(t.data_file(['{"text": "hi"}']))})
@case("rundir-is-the-valid-file", "output_dir", "is a file")
def _(t): return t.train({"output_dir": str(t.data / "valid.jsonl")})
@case("rundir-empty-string", "output_dir")
def _(t): return t.train({"output_dir": ""})
@case("rundir-dot-is-the-current-dir", "output_dir .", "current directory")
def _(t): return t.train({"output_dir": "."})
@case("rundir-current-dir-absolute", "output_dir", "current directory")
def _(t): return t.train({"output_dir": os.getcwd()})
@case("rundir-is-a-file", "output_dir", "is a file, not a directory")
def _(t): (t.tmp / "afile").write_text("x"); return t.train({"output_dir": str(t.tmp / "afile")})
@case("rundir-parent-is-a-file", "output_dir", "afile is a file, not a directory")
def _(t): (t.tmp / "afile").write_text("x"); return t.train({"output_dir": str(t.tmp / "afile" / "sub")})
@case("rundir-dangling-symlink", "output_dir", "dangling symlink")
def _(t): (t.tmp / "gone").symlink_to(t.tmp / "nowhere"); return t.train({"output_dir": str(t.tmp / "gone")})
@case("rundir-foreign-files", "output_dir", "not a mlxtune run", "notes.txt")
def _(t): return t.train({"output_dir": str(_foreign(t))})
@case("rundir-foreign-hidden-dir", "output_dir", "not a mlxtune run", ".git")
def _(t): (_foreign(t, entry="x") / "x").unlink(); (t.tmp / "mine" / ".git").mkdir(); return t.train({"output_dir": str(t.tmp / "mine")})
@case("rundir-foreign-with-overwrite", "output_dir", "not a mlxtune run")
def _(t): return t.train({"output_dir": str(_foreign(t))}, "--overwrite")
@case("rundir-foreign-with-resume", "output_dir", "not a mlxtune run")
def _(t): return t.train({"output_dir": str(_foreign(t))}, "--resume")
@case("rundir-a-checkpoints-dir", "output_dir", "not a mlxtune run")
def _(t): return t.train({"output_dir": str(t.run / "checkpoints")})
@case("rundir-finished-run-without-resume", "output_dir", "already holds a finished run", "--resume", "--overwrite")
def _(t): return t.train({"output_dir": str(t.run)})
@case("rundir-run-with-checkpoints-without-resume", "already holds a run with checkpoints", "--resume")
def _(t): return t.train({"output_dir": str(_run_copy(t, drop=("adapters.safetensors", "adapter_config.json")))})
@case("rundir-legacy-run-without-marker", "already holds a finished run")
def _(t): return t.train({"output_dir": str(_run_copy(t, drop=(".mlxtune-run",)))})
@case("rundir-resume-and-overwrite", "--resume and --overwrite", "choose one")
def _(t): return t.train({"output_dir": str(t.tmp / "fresh")}, "--resume", "--overwrite")
@case("rundir-resume-on-a-new-dir", "no checkpoint to resume from")
def _(t): return t.train({"output_dir": str(t.tmp / "fresh")}, "--resume")
@case("rundir-resume-on-an-empty-dir", "no checkpoint to resume from")
def _(t): (t.tmp / "empty").mkdir(); return t.train({"output_dir": str(t.tmp / "empty")}, "--resume")
@case("rundir-resume-path-not-a-checkpoint", "no checkpoint there")
def _(t): return t.train({"output_dir": str(t.tmp / "fresh")}, "--resume", str(_foreign(t)))
@case("rundir-is-the-init-adapter", "output_dir", "is lora.init_adapter")
def _(t): return t.train({"output_dir": str(t.run), "lora.init_adapter": str(t.run)}, "--overwrite")
@case("rundir-inside-the-init-adapter", "output_dir", "is inside lora.init_adapter")
def _(t): return t.train({"output_dir": str(t.run / "again"), "lora.init_adapter": str(t.run)})
@case("rundir-overwrite-would-delete-the-data", "output_dir", "holds data.train")
def _(t):
    d = _run_copy(t)
    (d / "train.jsonl").write_text((t.data / "train.jsonl").read_text())
    return t.train({"output_dir": str(d), "data.train": str(d / "train.jsonl")}, "--overwrite")
@case("rundir-lock-held-by-a-live-process", "output_dir", f"another train (pid {os.getppid()}", "is using this run dir")
def _(t): return t.train({"output_dir": str(_locked_run(t, {"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))})
@case("rundir-lock-held-live-with-resume", "output_dir", f"pid {os.getppid()}")
def _(t): return t.train({"output_dir": str(_locked_run(t, {"pid": os.getppid(), "host": socket.gethostname()}))}, "--resume")
@case("rundir-lock-of-another-host", "locked by pid 4242 on host build-07", "delete", ".mlxtune-run.lock")
def _(t): return t.train({"output_dir": str(_locked_run(t, {"pid": 4242, "host": "build-07", "started": "x"}))})
@case("rundir-lock-being-created", "another train is starting in this dir")
def _(t): return t.train({"output_dir": str(_locked_run(t, {}))})
@case("rundir-lock-in-a-new-dir-of-another-train", "output_dir", f"pid {os.getppid()}")
def _(t):
    d = t.tmp / "starting"
    d.mkdir()
    (d / ".mlxtune-run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    os.utime(d / ".mlxtune-run.lock", (time.time(), time.time()))
    return t.train({"output_dir": str(d)})
@case("rundir-interrupted-run-without-resume", "already holds a run stopped at step 1 of 2", "--resume")
def _(t): return t.train({"output_dir": str(_run_copy(t, drop=("checkpoints/step_000002",)))})
