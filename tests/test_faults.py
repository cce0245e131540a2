"""Fault injection: SIGKILL at random moments (mid-step, mid-eval, mid-checkpoint-write) and resume, SIGTERM /
SIGHUP (checkpoint, exit 143 / 129, resume) and a second signal (exits at once), a full disk during a save, and a
NaN/inf loss.

    pytest tests/test_faults.py                                   # 3 kill rounds (part of `make test`)
    MLXTUNE_FAULT_ROUNDS=20 MLXTUNE_FAULT_SEED=7 pytest tests/test_faults.py -k sigkill -s   # a longer soak

Invariants: after every kill each `checkpoints/step_*` dir loads with `checkpoint.load_checkpoint` (a checkpoint
is complete or absent), and after the last resume the adapters equal an uninterrupted run's bitwise, with the
same losses. Kills land mid-write because the test (never the library) runs the trainer through a small launcher
that makes each checkpoint file write and fsync sleep a little, and kills when a checkpoint's temp dir
(`.step_NNNNNN.tmp-PID-RAND`, fsio.atomic_dir) appears.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from reliability_helpers import ROOT, run_config, small_run_inputs, write_yaml

ROUNDS = int(os.environ.get("MLXTUNE_FAULT_ROUNDS", "3"))
SEED = int(os.environ.get("MLXTUNE_FAULT_SEED", "0"))
STEP_RE = re.compile(r"^step_\d+$")
TEMP_RE = re.compile(r"^\.step_(\d+)\.tmp-(\d+)-")  # a checkpoint being written (fsio.atomic_dir's temp dir)

# The child process: the real CLI, with checkpoint writes slowed down (test-side monkeypatching only) so that a
# kill can land between the files of a checkpoint, before its rename.
SLOW_WRITES = """
import re, sys, time
import mlx.core as mx
import mlxtune.fsio as fsio
_save, _fsync = mx.save_safetensors, fsio.fsync_file
def save(path, *a, **k):
    _save(path, *a, **k)
    if re.search(r"/\\.step_\\d+\\.tmp-", str(path)):
        time.sleep({delay})
def fsync(path):
    _fsync(path)
    time.sleep({delay})
mx.save_safetensors, fsio.fsync_file = save, fsync
from mlxtune.cli import main
sys.argv = ["mlxtune"] + sys.argv[1:]
main()
"""
WRITE_DELAY = 0.05  # seconds per file write and per fsync: a checkpoint write takes >= 5 x 0.05 = 0.25 s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    root, model, data = small_run_inputs(root, 40, 6)
    return root, model, data


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MLXTUNE_CACHE": str(root / "cache")}


def _config(tmp: Path, setup, **train) -> Path:
    root, model, data = setup
    return write_yaml(tmp / "cfg.yaml", run_config(tmp, model, data, **train))


def _adapter(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _losses(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train_loss" in r:
            out[r["step"]] = r["train_loss"]
    return out


def _expected(reference_run: Path) -> dict:
    """What load_checkpoint must accept: the reference run's fingerprint, data hash and adapter shapes."""
    last = sorted(p for p in (reference_run / "checkpoints").iterdir() if STEP_RE.match(p.name))[-1]
    state = json.loads((last / "state.json").read_text())
    shapes = {k: tuple(v.shape) for k, v in mx.load(str(last / "adapters.safetensors")).items()}
    return {"fingerprint": state["fingerprint"], "base_path": state["base_path"], "data_hash": state["data_hash"],
            "adapter_shapes": shapes}


def _check_all_checkpoints_load(run: Path, expected: dict) -> list[int]:
    """Every checkpoints/step_* dir must load (complete or absent); returns their steps."""
    from mlxtune.checkpoint import load_checkpoint

    cps = run / "checkpoints"
    steps = []
    for p in sorted(cps.iterdir()) if cps.is_dir() else []:
        if STEP_RE.match(p.name):
            _, _, state = load_checkpoint(p, expected)  # raises CheckpointError if unreadable or mismatched
            assert state["step"] == int(p.name.split("_")[1])
            steps.append(state["step"])
    return steps


def _tmp_dirs(run: Path) -> list[str]:
    """Hidden entries of checkpoints/: temps of unfinished writes (fsio's `.NAME.tmp-*`, `.NAME.old-*`)."""
    cps = run / "checkpoints"
    return sorted(p.name for p in cps.iterdir() if p.name.startswith(".")) if cps.is_dir() else []


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted run (in-process: the same code path as the CLI, without a second interpreter start)."""
    from mlxtune.trainer import train

    root = setup[0]
    tmp = tmp_path_factory.mktemp("reference")
    os.environ["MLXTUNE_CACHE"] = str(root / "cache")
    try:
        res = train(_config(tmp, setup, max_steps=_steps()), quiet=True)
    finally:
        del os.environ["MLXTUNE_CACHE"]
    assert res.steps == _steps()
    return res.run_dir


def _steps() -> int:
    return 2 * ROUNDS + 4  # each kill round makes at least one step of progress


def _launch(cfg: Path, env: dict, resume: bool, slow: bool) -> subprocess.Popen:
    args = ["train", "-c", str(cfg), "--quiet"] + (["--resume"] if resume else [])
    if slow:
        cmd = [sys.executable, "-c", SLOW_WRITES.replace("{delay}", str(WRITE_DELAY)), *args]
    else:
        cmd = [sys.executable, "-m", "mlxtune", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _latest_step(run: Path) -> int:
    cps = run / "checkpoints"
    steps = [int(p.name.split("_")[1]) for p in cps.iterdir() if STEP_RE.match(p.name)] if cps.is_dir() else []
    return max(steps, default=0)


def _kill_round(p: subprocess.Popen, run: Path, mode: str, rng: random.Random, min_step: int, deadline: float) -> dict:
    """Kill `p` per `mode`; returns what happened. 'write': when this process starts writing the checkpoint of a
    step >= min_step, after a random fraction of the write; 'time': at a random moment once it has saved a
    step >= min_step."""
    cps = run / "checkpoints"
    while time.time() < deadline:
        if p.poll() is not None:
            return {"finished": True}
        if mode == "write":  # temp dirs are named .step_NNNNNN.tmp-<pid>-RAND: ignore those a killed process left
            temps = [TEMP_RE.match(n) for n in (os.listdir(cps) if cps.is_dir() else [])]
            hit = [m for m in temps if m and int(m[2]) == p.pid and int(m[1]) >= min_step]
            if hit:
                time.sleep(rng.uniform(0, 2 * WRITE_DELAY))  # well inside the slowed write (>= 5 x WRITE_DELAY)
                break
            time.sleep(0.001)
        else:
            if _latest_step(run) >= min_step:
                time.sleep(rng.uniform(0, 0.5))
                break
            time.sleep(0.005)
    else:
        p.kill()
        pytest.fail("no progress before the deadline")
    if p.poll() is not None:
        return {"finished": True}
    p.send_signal(signal.SIGKILL)
    p.wait()
    return {"finished": False}


def test_sigkill_anywhere_then_resume_equals_uninterrupted(setup, reference, tmp_path):
    rng = random.Random(SEED)
    root = setup[0]
    cfg = _config(tmp_path, setup, max_steps=_steps())
    run = tmp_path / "run"
    env = _env(root)
    expected = _expected(reference)
    deadline = time.time() + 600
    log, mid_write, last_target = [], 0, 0
    for r in range(ROUNDS):
        mode = ("write", "time")[r % 2]  # alternate: inside a checkpoint write / at a random moment of training
        before = _latest_step(run)
        target = max(before, last_target) + 1  # every round gets further than the last: no kill loop
        last_target = target
        p = _launch(cfg, env, resume=before > 0, slow=mode == "write")
        res = _kill_round(p, run, mode, rng, target, deadline)
        if res["finished"]:
            out = p.stdout.read()
            assert p.returncode == 0, out
            log.append((r, mode, "finished"))
            break
        tmp_left = _tmp_dirs(run)
        mid_write += bool(tmp_left)
        steps = _check_all_checkpoints_load(run, expected)
        log.append((r, mode, f"killed at step >= {target}; checkpoints {steps}; temp dirs left {tmp_left}"))
        assert not (run / "adapters.safetensors").exists() or _latest_step(run) == _steps()
    print("\n".join(map(str, log)))
    # the last resume runs to the end
    p = _launch(cfg, env, resume=_latest_step(run) > 0, slow=False)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert not _tmp_dirs(run), "a resumed run cleans up temp dirs of killed writes"
    _check_all_checkpoints_load(run, expected)
    a, b = _adapter(run / "adapters.safetensors"), _adapter(reference / "adapters.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert _losses(run) == _losses(reference)
    if ROUNDS >= 1:
        assert mid_write >= 1, f"no kill landed inside a checkpoint write: {log}"


# --------------------------------------------------------------------------------------------------------------
# SIGTERM and SIGHUP behave like Ctrl-C; a second signal stops at once


def _wait_for(cond, p: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"the run ended or stalled before the signal: {p.communicate()[0]}")
        time.sleep(0.005)


def _resume_to_the_end_equals(reference: Path, cfg: Path, run: Path, capsys) -> None:
    code, err = _run_cli(["train", "-c", str(cfg), "--quiet", "--resume"], capsys)
    assert code == 0, err
    a, b = _adapter(run / "adapters.safetensors"), _adapter(reference / "adapters.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert _losses(run) == _losses(reference)


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_checkpoint_then_resume_equals_uninterrupted(setup, reference, tmp_path, monkeypatch,
                                                                         capsys, sig, code):
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))
    cfg, run = _config(tmp_path, setup, max_steps=_steps()), tmp_path / "run"
    p = _launch(cfg, _env(setup[0]), resume=False, slow=True)
    _wait_for(lambda: _latest_step(run) >= 2, p)
    p.send_signal(getattr(signal, sig))
    out, _ = p.communicate(timeout=120)
    assert p.returncode == code, out
    assert f"interrupt ({sig}): finishing this step, writing a checkpoint" in out, out
    assert not (run / ".mlxtune-run.lock").exists() and not _tmp_dirs(run)
    assert 2 <= _latest_step(run) < _steps()
    _resume_to_the_end_equals(reference, cfg, run, capsys)


def test_second_sigterm_exits_at_once_and_the_run_still_resumes(setup, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))
    cfg, run = _config(tmp_path, setup, max_steps=_steps()), tmp_path / "run"
    p = _launch(cfg, _env(setup[0]), resume=False, slow=True)
    cps = run / "checkpoints"
    _wait_for(lambda: cps.is_dir() and any(TEMP_RE.match(n) and int(TEMP_RE.match(n)[1]) >= 2
                                           for n in os.listdir(cps)), p)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)  # mid-write of a checkpoint: that write is dropped, nothing else changes
    out, _ = p.communicate(timeout=60)
    assert time.time() - t0 < 3, "a second signal stops at once"
    assert p.returncode == 143, out
    assert not (run / ".mlxtune-run.lock").exists()
    _check_all_checkpoints_load(run, _expected(reference))
    _resume_to_the_end_equals(reference, cfg, run, capsys)


# --------------------------------------------------------------------------------------------------------------
# A full disk during a save


def _run_cli(argv, capsys) -> tuple[int, str]:
    from mlxtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err.strip()


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(setup, reference, tmp_path, monkeypatch, capsys):
    """MLX's writer fails as on a full disk (what it raises writing to /dev/full) while saving step 3."""
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))
    real = mx.save_safetensors

    def full_disk(path, arrays, *a, **k):
        if "/.step_000003.tmp-" in str(path):
            Path(path).write_bytes(b"\0" * 8)  # a partial file, then the failure
            raise RuntimeError("[write] Unable to write 8 bytes to file.")
        return real(path, arrays, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    cfg = _config(tmp_path, setup, max_steps=_steps())
    code, err = _run_cli(["train", "-c", str(cfg), "--quiet"], capsys)
    assert code == 2
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    run = tmp_path / "run"
    assert "step_000003: could not write the checkpoint" in err and "Unable to write" in err
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_000002'} is intact" in err
    assert _check_all_checkpoints_load(run, _expected(reference)) == [1, 2]
    assert not _tmp_dirs(run)
    assert not (run / "adapters.safetensors").exists()
    # space freed: --resume finishes the run, bitwise equal to the uninterrupted one
    monkeypatch.setattr(mx, "save_safetensors", real)
    code, err = _run_cli(["train", "-c", str(cfg), "--quiet", "--resume"], capsys)
    assert code == 0, err
    a, b = _adapter(run / "adapters.safetensors"), _adapter(reference / "adapters.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in b)


def _mount_tmpfs(path: Path, size: str) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_real_full_disk_tmpfs(setup, reference, tmp_path, monkeypatch, capsys):
    """A real ENOSPC: the run dir on a 200 KB tmpfs (Linux, root; skipped elsewhere). Whichever write hits the
    full disk first (a checkpoint or metrics.jsonl), the error is one line and every checkpoint still loads."""
    mnt = tmp_path / "small_disk"
    if not _mount_tmpfs(mnt, "200k"):
        pytest.skip("cannot mount a tmpfs here (needs Linux and root)")
    try:
        monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))
        root, model, data = setup
        cfg = write_yaml(tmp_path / "cfg.yaml", {**run_config(tmp_path, model, data, max_steps=40, eval_every=0),
                                                 "output_dir": str(mnt / "run")})
        code, err = _run_cli(["train", "-c", str(cfg), "--quiet"], capsys)
        assert code == 2, err
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
        assert "No space left on device" in err or "Unable to write" in err, err
        assert "--resume" in err
        steps = _check_all_checkpoints_load(mnt / "run", _expected(reference))
        assert steps, "some checkpoints fit before the disk filled up"
        assert not _tmp_dirs(mnt / "run")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --------------------------------------------------------------------------------------------------------------
# NaN / inf


def _learning_rate_beyond_the_domain(monkeypatch, lr: float) -> None:
    """The config refuses a learning rate outside (0, 1); the non-finite guard must still hold when the numbers
    blow up anyway, so the optimizer (test-side only) gets `lr`."""
    import copy

    from mlxtune import trainer

    def make(tc, n):
        tc = copy.copy(tc)  # not dataclasses.replace: that would check the domain again
        object.__setattr__(tc, "learning_rate", lr)
        return real(tc, n)

    real = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", make)


def test_nan_loss_stops_naming_step_and_batch(setup, tmp_path, monkeypatch, capsys):
    """lr 1e30: step 1's update makes the LoRA weights ~1e30 (finite, saved), step 2's loss overflows."""
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))
    _learning_rate_beyond_the_domain(monkeypatch, 1e30)
    cfg = _config(tmp_path, setup, warmup_ratio=0.0)
    code, err = _run_cli(["train", "-c", str(cfg), "--quiet"], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    run = tmp_path / "run"
    m = re.match(r"error: step 2: the (loss|gradient norm) is (nan|inf|-inf) at micro-batch (\d+) \(epoch 1, position \d+ of \d+: "
                 r"training batch #\d+\)", err)
    assert m, err
    assert int(m.group(3)) in (2, 3)  # step 2 = global micro-batches 2 and 3 (grad_accumulation 2)
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_000001'}" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    assert not (run / "adapters.safetensors").exists()
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "train_loss" in r] == [1]


def test_poisoned_weight_stops_at_step_1_without_checkpoint(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))
    root, model, data = setup
    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    w = dict(mx.load(str(bad / "model.safetensors")))
    norm = np.array(w["model.norm.weight"])
    norm[3] = np.nan
    w["model.norm.weight"] = mx.array(norm)
    mx.save_safetensors(str(bad / "model.safetensors"), w, metadata={"format": "pt"})
    cfg = write_yaml(tmp_path / "cfg.yaml", run_config(tmp_path, bad, data))
    code, err = _run_cli(["train", "-c", str(cfg), "--quiet"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: step 1: the loss is nan at micro-batch 0 (epoch 1, position 1 of"), err
    assert "no checkpoint was written before it" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_inf_weights_with_finite_loss_are_never_checkpointed(setup, tmp_path, monkeypatch, capsys):
    """lr 1e39 is inf in float32: step 1's loss and gradient are finite, its update is not — nothing is saved."""
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))
    _learning_rate_beyond_the_domain(monkeypatch, 1e39)
    cfg = _config(tmp_path, setup, warmup_ratio=0.0)
    code, err = _run_cli(["train", "-c", str(cfg), "--quiet"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: step 1: the update made the LoRA weights inf/nan although the loss and gradient "
                          "were finite"), err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
