"""The fault matrix: every command that writes (train, fuse, export --format peft, eval --out, data convert) under
every fault — kill -9 and SIGTERM while it writes, a full disk, a file where a directory is expected. Each: the
promised exit code, one line, the output absent or complete (never half-written, temps hidden and cleaned by the
next run), and every input byte-identical.

kill -9 and SIGTERM run the real CLI in a subprocess whose fsync sleeps (test-side monkeypatching only), killed
when its first hidden temp (`.NAME.tmp-PID-RAND`, fsio) appears; the full disk makes fsio's fsync raise
OSError(ENOSPC) in-process; tests run as root, so "read-only" is a file standing where the output's parent dir
belongs (no chmod).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from bad_inputs_lib import base  # noqa: F401  (the module-scoped fixture: a small model, data, a finished run)
from reliability_helpers import ROOT, run_config, slow_cli_script, write_yaml

SLOW = slow_cli_script(0.15)
TEMP = re.compile(r"\.tmp-(\d+)-")
COMMANDS = ("train", "fuse", "export", "eval", "convert")


def _argv(cmd: str, base, out: Path, cfg_dir: Path) -> list[str]:
    root, model, data, run = base[:4]
    if cmd == "train":
        cfg = write_yaml(cfg_dir / "cfg.yaml", {**run_config(cfg_dir, model, data, max_steps=3), "output_dir": str(out)})
        return ["train", "-c", str(cfg), "--quiet"]
    return {"fuse": ["fuse", str(run), "--out", str(out)],
            "export": ["export", str(run), "--format", "peft", "--out", str(out)],
            "eval": ["eval", "--adapter", str(run), "--data", str(data / "valid.jsonl"), "--no-generate",
                     "--out", str(out)],
            "convert": ["data", "convert", str(data / "train.jsonl"), "--to", "messages", "--out", str(out)]}[cmd]


def _out(cmd: str, work: Path) -> Path:
    return work / ("out.jsonl" if cmd == "convert" else "out")


def _snapshot(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "cache" not in p.parts and not p.name.startswith(".mlxtune-run.lock")}


def _complete_or_absent(cmd: str, out: Path) -> None:
    """The output is absent, or every file it promises is there and readable."""
    if cmd == "train":  # a run dir: every checkpoint and the final adapter (if any) load
        for p in sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []:
            mx.load(str(p / "adapters.safetensors"))
            json.loads((p / "state.json").read_text())
        if (out / "adapters.safetensors").exists():
            mx.load(str(out / "adapters.safetensors"))
            json.loads((out / "adapter_config.json").read_text())
        return
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):  # an empty dir holds no artefact
        return
    if cmd == "convert":
        lines = out.read_text().splitlines()
        assert len(lines) == 12 and all("messages" in json.loads(line) for line in lines)
    elif cmd == "fuse":
        json.loads((out / "config.json").read_text())
        mx.load(str(out / "model.safetensors"))
    elif cmd == "export":
        json.loads((out / "adapter_config.json").read_text())
        mx.load(str(out / "adapter_model.safetensors"))
    elif cmd == "eval":
        json.loads((out / "report.json").read_text())


def _visible_partial(work: Path, out: Path) -> list[str]:
    """Entries of the work dir that look like an artefact but are not the output: must be none (temps are hidden)."""
    return [p.name for p in work.iterdir() if not p.name.startswith(".") and p not in (out, work / "cfg.yaml")]


@pytest.mark.parametrize("fault", ["kill9", "sigterm"])
@pytest.mark.parametrize("cmd", COMMANDS)
def test_signal_while_writing(base, tmp_path, cmd, fault):
    root = base[0]
    work = tmp_path / "work"
    work.mkdir()
    out = _out(cmd, work)
    argv = _argv(cmd, base, out, work)
    before = _snapshot(root)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-c", SLOW, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not any(m and int(m[1]) == p.pid for m in (TEMP.search(q.name) for q in work.rglob(".*"))):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"{cmd} ended before writing anything: {p.communicate()[0]}")
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL if fault == "kill9" else signal.SIGTERM)
    output, _ = p.communicate(timeout=120)
    if fault == "kill9":
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode == 143, output
        said = [line for line in output.splitlines() if "interrupt" in line]
        assert len(said) == 1, output
        assert not [m for m in (TEMP.search(q.name) for q in work.rglob(".*")) if m and int(m[1]) == p.pid] or \
            cmd == "train", "SIGTERM: the command removes its own temps"
    _complete_or_absent(cmd, out)
    assert not _visible_partial(work, out)
    assert _snapshot(root) == before, "an input changed"


def _cli(argv, capsys) -> tuple[int, list[str]]:
    from mlxtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_full_disk(base, tmp_path, cmd, monkeypatch, capsys):
    from mlxtune import fsio

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    work = tmp_path / "work"
    work.mkdir()
    out = _out(cmd, work)
    argv = _argv(cmd, base, out, work)
    before = _snapshot(base[0])
    monkeypatch.setattr(fsio, "fsync_file", full)
    code, err = _cli(argv, capsys)
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and err[-1] == errors[0], err
    assert "No space left on device" in errors[0] and "free some space" in errors[0], errors[0]
    monkeypatch.undo()
    _complete_or_absent(cmd, out)
    if cmd != "train":
        assert not out.exists() or (out.is_dir() and not any(out.iterdir())), "nothing half-written"
    assert not [q.name for q in work.rglob(".*") if TEMP.search(q.name)], "temps removed"
    assert _snapshot(base[0]) == before


@pytest.mark.parametrize("cmd", COMMANDS)
def test_file_where_the_output_dir_belongs(base, tmp_path, cmd, capsys):
    """Read-only output, as root can have it: the output's parent is a file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a dir")
    out = blocker / ("out.jsonl" if cmd == "convert" else "out")
    argv = _argv(cmd, base, out, tmp_path)
    before = _snapshot(base[0])
    code, err = _cli(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert "blocker" in err[0] and "not a directory" in err[0], err[0]
    assert blocker.read_text() == "not a dir" and _snapshot(base[0]) == before
