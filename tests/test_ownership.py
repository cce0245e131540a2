"""A run owns its directory (mlxtune/ownership.py): the dirs `train` refuses, the lock that keeps a second `train`
out of a live run, a stale lock taken over, `--overwrite`, and `--resume` on a finished run.

The two-process test runs the real CLI in subprocesses on the small byte-tokenizer model (reliability_helpers.py);
the rest run in-process through `mlxtune.cli.main`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from reliability_helpers import ROOT, run_config, slow_cli_script, small_run_inputs, write_yaml

# The first process: the real CLI with each fsync slowed down (test-side only), so that it holds the run dir for
# several seconds while the second one starts.
SLOW = slow_cli_script(0.1)
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ownership")
    os.environ["MLXTUNE_CACHE"] = str(root / "cache")
    root, model, data = small_run_inputs(root, 24, 4)
    yield root, model, data
    del os.environ["MLXTUNE_CACHE"]


@pytest.fixture(scope="module")
def alone(setup):
    """A run alone (in-process): the reference for the adapters, and a finished run to refuse."""
    from mlxtune.trainer import train

    root, model, data = setup
    res = train(run_config(root, model, data, output="alone", max_steps=STEPS), quiet=True)
    return res.run_dir


def _cfg(tmp: Path, setup, **changes) -> Path:
    root, model, data = setup
    cfg = run_config(tmp, model, data, max_steps=STEPS)
    cfg.update(changes)
    return write_yaml(tmp / "cfg.yaml", cfg)


def _cli(argv, capsys) -> tuple[int, list[str]]:
    from mlxtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return e.value.code, err


def _adapter(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _files(d: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_second_train_on_a_live_run_fails_fast_and_the_first_is_unharmed(setup, alone, tmp_path):
    cfg = _cfg(tmp_path, setup)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-c", SLOW, "train", "-c", str(cfg), "--quiet"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoints").is_dir():  # the first holds the lock and has started training
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.05)
    for extra in ([], ["--resume"]):
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "mlxtune", "train", "-c", str(cfg), "--quiet", *extra],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        took = time.time() - t0
        assert first.poll() is None, "the first run ended before the second was refused: slow it down more"
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith("error: output_dir") and f"pid {first.pid}" in lines[0], lines[0]
        assert took < 5, f"the second train took {took:.1f} s to be refused"
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert not (run / ".mlxtune-run.lock").exists(), "the lock is released at the end"
    a, b = _adapter(run / "adapters.safetensors"), _adapter(alone / "adapters.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_stale_lock_is_reported_and_taken_over(setup, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".mlxtune-run").write_text('{"format": "mlxtune-run", "format_version": 1}')
    (run / ".mlxtune-run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01 00:00:00"}))
    code, err = _cli(["train", "-c", str(_cfg(tmp_path, setup)), "--quiet"], capsys)
    assert code == 0, err
    notes = [line for line in err if "stale lock" in line]
    assert len(notes) == 1 and f"pid {dead.pid}" in notes[0], err
    assert (run / "adapters.safetensors").is_file() and not (run / ".mlxtune-run.lock").exists()


def test_lock_of_another_host_is_refused_naming_holder_and_fix(setup, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".mlxtune-run").write_text("{}")
    (run / ".mlxtune-run.lock").write_text(json.dumps({"pid": 12345, "host": "elsewhere.example", "started": "x"}))
    code, err = _cli(["train", "-c", str(_cfg(tmp_path, setup)), "--quiet"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "pid 12345 on host elsewhere.example" in err[0] and "delete" in err[0] and ".mlxtune-run.lock" in err[0]
    assert (run / ".mlxtune-run.lock").exists(), "another host's lock is never taken over"


def test_lock_released_and_new_dir_removed_when_prepare_fails(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    code, err = _cli(["train", "-c", str(_cfg(tmp_path, setup)), "--quiet", "--data.train", str(bad)], capsys)
    assert code == 2 and len(err) == 1, err
    assert not (tmp_path / "run").exists(), "a run dir created for the lock is removed when the checks fail"


@pytest.mark.parametrize("where", ["model", "inside-model", "data-dir", "data-file", "empty", "dot", "foreign",
                                   "file", "dangling", "finished"])
def test_refused_output_dirs(setup, alone, tmp_path, capsys, monkeypatch, where):
    root, model, data = setup
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    out = {"model": model, "inside-model": model / "run", "data-dir": data, "data-file": data / "train.jsonl",
           "empty": "", "dot": ".", "foreign": tmp_path / "foreign", "file": tmp_path / "file",
           "dangling": tmp_path / "dangling", "finished": alone}[where]
    expect = {"model": "is model.path", "inside-model": "is inside model.path", "data-dir": "is data.train",
              "data-file": "is a file", "empty": "non-empty path", "dot": "current directory", "foreign": "not a mlxtune run",
              "file": "is a file", "dangling": "dangling symlink", "finished": "already holds a finished run"}[where]
    cfg = _cfg(tmp_path, setup, output_dir=str(out))
    before = {**_files(root), **_files(tmp_path)}
    code, err = _cli(["train", "-c", str(cfg), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "output_dir" in err[0], err
    assert expect in err[0], err[0]
    assert {**_files(root), **_files(tmp_path)} == before


def test_overwrite_replaces_a_finished_run(setup, alone, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(alone, run)
    (run / "checkpoints" / "step_000099").mkdir()  # results of the old run that must go
    (run / "checkpoints" / "step_000099" / "state.json").write_text("{}")
    code, err = _cli(["train", "-c", str(_cfg(tmp_path, setup)), "--quiet", "--overwrite"], capsys)
    assert code == 0, err
    assert not (run / "checkpoints" / "step_000099").exists()
    assert (run / ".mlxtune-run").is_file() and not [p for p in run.iterdir() if p.name.startswith(".overwritten")]
    a, b = _adapter(run / "adapters.safetensors"), _adapter(alone / "adapters.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in b)
    code, err = _cli(["train", "-c", str(_cfg(tmp_path, setup)), "--quiet", "--overwrite", "--resume"], capsys)
    assert code == 2 and "choose one" in err[0]


@pytest.mark.parametrize("legacy", [False, True])
def test_resume_on_a_finished_run_says_so(setup, alone, tmp_path, capsys, legacy):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(alone, run)
    if legacy:  # a run of an older version: no marker, recognised by config.yaml + checkpoints/
        (run / ".mlxtune-run").unlink()
    before = _files(run)
    code, err = _cli(["train", "-c", str(_cfg(tmp_path, setup)), "--quiet", "--resume"], capsys)
    assert code == 0 and len(err) == 1, err
    assert f"already finished at step {STEPS} of {STEPS}" in err[0] and "--train.max_steps" in err[0]
    assert _files(run) == before, "nothing is written"
