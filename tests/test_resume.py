"""Resume and the run dir, one test per defect of issue #14 that the old trainer had (each fails on it):

1. `--resume PATH` from an older checkpoint moves the newer ones (and a newer best/) aside; pruning never
   deletes the checkpoint just written; a later plain `--resume` continues the new trajectory.
2. The data cursor, grad_accumulation, the schedule length and the number of processes are checked against
   the checkpoint (refused with the reason, or stated).
3. metrics.jsonl of a resumed run equals the uninterrupted run's when the resume step is not a report step.
5. The memory guard sees the final LoRA (init_adapter's rank); lora.dropout stays the user's.
6. Re-writing a checkpoint killed between its renames leaves a complete copy; best/ is one directory swap.
7. A quota error is a full disk whatever errno number the platform gives EDQUOT.
8. tokens/s counts every real token when padding is the end-of-turn token.

In-process runs of a tiny 2-layer Llama with a byte-level tokenizer (reliability_helpers): a few seconds each.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from reliability_helpers import ROOT, make_small_model_dir, run_config, small_run_inputs

from mlxtune.callbacks import Callback
from mlxtune.checkpoint import RunDir, latest_checkpoint, list_checkpoints, load_checkpoint, recover_run
from mlxtune.errors import CheckpointError, MlxtuneError

WALL_CLOCK = ("tokens_per_sec", "trained_tokens_per_sec", "peak_memory_gb", "rss_gb")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    root, model, data = small_run_inputs(root, 40, 6)
    return root, model, data


@pytest.fixture(autouse=True)
def _cache(setup, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))


def _cfg(tmp: Path, setup, output: str = "run", **train) -> dict:
    root, model, data = setup
    return run_config(tmp, model, data, output=output, **train)


def _train(cfg: dict, **kw):
    from mlxtune.trainer import train

    return train(cfg, quiet=True, **kw)


def _adapter(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class StopAt(Callback):
    """Ask the trainer to stop (as Ctrl-C does) once a report or evaluation of `step` arrives."""

    def __init__(self, step: int):
        self.step, self.info = step, None

    def on_train_begin(self, info):
        self.info = info

    def on_log(self, record):
        if record["step"] == self.step:
            self.info.request_stop()

    on_eval = on_log


@pytest.fixture(scope="module")
def base_run(setup, tmp_path_factory):
    """An uninterrupted run: 6 steps, k=2, a checkpoint every 2 steps (all kept), evaluation every 3."""
    tmp = tmp_path_factory.mktemp("base")
    os.environ["MLXTUNE_CACHE"] = str(setup[0] / "cache")
    try:
        res = _train(_cfg(tmp, setup, save_every=2))
    finally:
        del os.environ["MLXTUNE_CACHE"]
    assert res.steps == 6
    return res.run_dir


# --------------------------------------------------------------------------------------------------------------
# 1. Resuming from an older checkpoint


def test_resume_from_older_checkpoint_moves_newer_ones_aside(setup, tmp_path, monkeypatch, capsys):
    """A run saved steps 2, 4, 6 (keep_last 2: 4 and 6 remain) and its best evaluation in best/ at step 6.
    `--resume checkpoints/step_000004` with another learning rate, stopped after step 5: step_000006 and best/
    are kept under checkpoints/abandoned-*/, the current checkpoints are 4 and 5 (the old trainer pruned 4 and
    kept the abandoned 6, so a plain --resume went back to the abandoned trajectory), and best/ is the step-4
    adapter again (the best evaluation of the trajectory resumed from)."""
    import mlxtune.trainer as trainer

    curve = {0: 9.5, 2: 5.0, 4: 4.0, 6: 3.0, 5: 9.0}  # 0: the base model's validation
    steps = []

    def fake_eval(model, batches):
        v = curve[steps[-1] if steps else 0]
        return {"loss_sum": v, "n_tokens": 1.0, "loss": v, "ppl": math.exp(v)}

    class Step(Callback):
        def on_log(self, record):
            steps.append(record["step"])

    monkeypatch.setattr(trainer, "evaluate_loss", fake_eval)
    cfg = _cfg(tmp_path, setup, save_every=2, eval_every=2, keep_last=2)
    _train(cfg, callbacks=[Step()])
    run = RunDir(tmp_path / "run")
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]
    assert json.loads((run.best / "best.json").read_text())["step"] == 6
    step4 = _adapter(run.step_dir(4) / "adapters.safetensors")
    capsys.readouterr()

    res = _train({**cfg, "train": {**cfg["train"], "learning_rate": 5e-4}}, resume=str(run.step_dir(4)),
                 callbacks=[Step(), StopAt(5)])
    assert res.interrupted and res.steps == 5
    assert [s for s, _ in list_checkpoints(run)] == [4, 5]
    assert latest_checkpoint(run) == run.step_dir(5)  # a plain --resume continues the new trajectory
    abandoned = [p for p in run.checkpoints.iterdir() if p.name.startswith("abandoned-")]
    assert len(abandoned) == 1
    assert sorted(p.name for p in abandoned[0].iterdir()) == ["best", "step_000006"]
    assert json.loads((abandoned[0] / "best" / "best.json").read_text())["step"] == 6
    assert json.loads((run.best / "best.json").read_text()) == {"step": 4, "metric": "val_loss", "value": 4.0}
    assert _same(_adapter(run.best / "adapters.safetensors"), step4)
    assert "abandoned trajectory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# 2. The cursor, grad_accumulation, the schedule and the number of processes


def test_resume_refuses_another_grad_accumulation(setup, base_run, tmp_path):
    """k=2 checkpoint resumed with k=3 would skip micro-batches (with k=1, repeat them): refused, with the fix."""
    for k, verb in ((3, "skip"), (1, "repeat")):
        with pytest.raises(CheckpointError, match=rf"train.grad_accumulation is {k} but the checkpoint was written with 2; "
                                                  rf"its step 2 ends at micro-batch 4, so another value would {verb}"):
            _train(_cfg(tmp_path, setup, output=f"k{k}", grad_accumulation=k),
                   resume=str(base_run / "checkpoints" / "step_000002"))
        assert not (tmp_path / f"k{k}").exists()


def test_resume_refuses_a_damaged_data_cursor(setup, base_run, tmp_path):
    import shutil

    cp = tmp_path / "step_000002"
    shutil.copytree(base_run / "checkpoints" / "step_000002", cp)
    state = json.loads((cp / "state.json").read_text())
    assert state["micro_index"] == 4 and state["grad_accumulation"] == 2
    state["micro_index"] = 5
    (cp / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"its data cursor \(micro-batch 5\) is not step 2 x grad_accumulation 2"):
        _train(_cfg(tmp_path, setup), resume=str(cp))


def test_changed_max_steps_is_stated_or_refused(setup, base_run, tmp_path, capsys):
    """A longer schedule is allowed and said in one line; one that ends before the checkpoint is refused."""
    with pytest.raises(CheckpointError, match=r"the checkpoint is at step 4, past the end of this run's schedule \(3 steps\)"):
        _train(_cfg(tmp_path, setup, output="short", max_steps=3), resume=str(base_run / "checkpoints" / "step_000004"))
    capsys.readouterr()
    res = _train(_cfg(tmp_path, setup, output="long", max_steps=8), resume=str(base_run / "checkpoints" / "step_000004"))
    assert res.steps == 8
    notes = [l for l in capsys.readouterr().err.splitlines() if "schedule changed" in l]
    assert notes == ["note: the schedule changed since the checkpoint: 8 steps instead of 6 (train.max_steps / "
                     "train.epochs); the learning rate continues on the new schedule from step 4"]
    state = json.loads((tmp_path / "long" / "checkpoints" / "step_000008" / "state.json").read_text())
    assert state["total_steps"] == 8 and state["micro_index"] == 16


def test_other_world_size_is_stated_and_exact(setup, base_run, tmp_path, capsys):
    """The update does not depend on the number of processes: a checkpoint written by 2 resumes with 1, said so,
    and ends bitwise where the uninterrupted run ended."""
    import shutil

    cp = tmp_path / "step_000002"
    shutil.copytree(base_run / "checkpoints" / "step_000002", cp)
    state = json.loads((cp / "state.json").read_text())
    (cp / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    res = _train(_cfg(tmp_path, setup, save_every=2), resume=str(cp))
    assert "note: the checkpoint was written by 2 process(es), this run has 1" in capsys.readouterr().err
    assert _same(_adapter(res.run_dir / "adapters.safetensors"), _adapter(base_run / "adapters.safetensors"))


def test_format_1_checkpoint_still_resumes(setup, base_run, tmp_path):
    """A checkpoint of the previous format (no grad_accumulation, no report window) resumes: k is its
    micro_index / step, and the run ends bitwise where the uninterrupted one ended."""
    import shutil

    cp = tmp_path / "step_000002"
    shutil.copytree(base_run / "checkpoints" / "step_000002", cp)
    state = json.loads((cp / "state.json").read_text())
    old = {k: v for k, v in state.items() if k not in ("grad_accumulation", "window")}
    (cp / "state.json").write_text(json.dumps({**old, "format_version": 1}))
    res = _train(_cfg(tmp_path, setup, save_every=2), resume=str(cp))
    assert _same(_adapter(res.run_dir / "adapters.safetensors"), _adapter(base_run / "adapters.safetensors"))
    with pytest.raises(CheckpointError, match="grad_accumulation is 1 but the checkpoint was written with 2"):
        _train(_cfg(tmp_path, setup, output="k1", grad_accumulation=1), resume=str(cp))


# --------------------------------------------------------------------------------------------------------------
# 3. metrics.jsonl is resume-exact


def _records(run: Path) -> list[dict]:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in recs if "event" not in r]


def test_metrics_resume_exact_when_resumed_between_reports(setup, tmp_path):
    """log_every 2, save_every 3: stopped after step 3 (a checkpoint, no report) and resumed, the run's
    metrics.jsonl equals the uninterrupted one's (wall-clock fields aside), the step-4 report averaging steps
    3 and 4 as it should (the old trainer restarted the window at the resume: step 4 alone, and trained_tokens
    lost step 3's tokens)."""
    over = dict(max_steps=8, log_every=2, save_every=3, eval_every=3)
    full = _train(_cfg(tmp_path, setup, output="full", **over))
    cfg = _cfg(tmp_path, setup, output="split", **over)
    first = _train(cfg, callbacks=[StopAt(3)])
    assert first.interrupted and first.steps == 3
    assert [s for s, _ in list_checkpoints(RunDir(first.run_dir))] == [3]
    second = _train(cfg, resume=True)
    assert second.steps == 8
    a, b = _records(second.run_dir), _records(full.run_dir)
    assert [r["step"] for r in a] == [0, 2, 3, 4, 6, 6, 8, 8]  # 0: the base model's validation
    assert a == b
    assert _same(_adapter(second.run_dir / "adapters.safetensors"), _adapter(full.run_dir / "adapters.safetensors"))
    state = json.loads((second.run_dir / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["window"]["tokens"] > 0 and state["window"]["seen"] > 0  # step 3, not reported yet, is saved


# --------------------------------------------------------------------------------------------------------------
# 5. The memory guard and init_adapter


def test_memory_guard_sees_init_adapters_rank_and_dropout_is_the_users(setup, base_run, tmp_path, monkeypatch, capsys):
    import mlxtune.memory
    from mlxtune.config import load_config
    from mlxtune.lora import lora_modules

    seen = []

    def spy(cfg, model, batches):
        seen.append((cfg.lora.rank, sorted({m.rank for m in lora_modules(model).values()})))
        return None

    monkeypatch.setattr(mlxtune.memory, "memory_guard", spy)
    cfg = _cfg(tmp_path, setup, max_steps=1, eval_every=0)
    cfg["lora"] = {"rank": 16, "alpha": 32, "dropout": 0.0, "init_adapter": str(base_run)}
    res = _train(cfg)
    assert seen == [(4, [4])]  # the adapter's rank, with its LoRA layers in place (the old guard saw rank 16)
    saved = load_config(res.run_dir / "config.yaml").lora
    assert (saved.rank, saved.alpha, saved.dropout) == (4, 8.0, 0.0)  # the base run trained with dropout 0.1
    assert json.loads((res.run_dir / "adapter_config.json").read_text())["dropout"] == 0.0
    err = capsys.readouterr().err
    assert "the adapter's shape replaces the config's: rank 16 -> 4, alpha 32.0 -> 8.0" in err


# --------------------------------------------------------------------------------------------------------------
# 6. Re-writing a checkpoint, best/


KILL_DURING_RESAVE = """
import os, sys
from pathlib import Path
import mlx.core as mx
from mlxtune.checkpoint import ResumeState, RunDir, save_checkpoint

run = RunDir(Path(sys.argv[1]))
ident = {"seed": 0, "fingerprint": "f", "base_path": "b", "data_hash": "d"}
opt = {"m": mx.zeros((1,))}
save_checkpoint(run, ResumeState(step=2, micro_index=2), {"w": mx.zeros((2,))}, opt, ident, 10)
real = os.rename
def rename(src, dst):  # a kill the moment the new copy would be renamed into place
    if Path(dst).name == "step_000002" and Path(src).name.startswith("."):
        os._exit(9)
    return real(src, dst)
os.rename = rename
save_checkpoint(run, ResumeState(step=2, micro_index=2), {"w": mx.ones((2,))}, opt, ident, 10)
"""


def test_resave_killed_between_renames_keeps_a_complete_copy(tmp_path):
    """The old trainer renamed the old copy aside and deleted it before renaming the new one in: a kill there
    lost step 2. Now the old copy is deleted only after the new one is in place, and recovered after a kill."""
    p = subprocess.run([sys.executable, "-c", KILL_DURING_RESAVE, str(tmp_path / "run")], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    run = RunDir(tmp_path / "run")
    recover_run(run)  # what a resume does first
    assert latest_checkpoint(run) == run.step_dir(2)
    adapter, _, state = load_checkpoint(run.step_dir(2), {"adapter_shapes": {"w": (2,)}})
    assert state["step"] == 2 and np.array_equal(np.array(adapter["w"]), np.zeros(2))  # the old, complete copy
    assert not [p.name for p in run.checkpoints.iterdir() if p.name.startswith(".")]


def test_best_is_one_directory_swap(setup, tmp_path, monkeypatch):
    """The disk fills up while best.json of the second best evaluation is written: best/ still holds the first
    one's adapter with its best.json (the old trainer had already replaced the adapter: a mismatched pair)."""
    import mlxtune.trainer as trainer
    from mlxtune.lora import adapter_weights

    curve, snapshots = iter([9.5, 5.0, 4.0, 3.0]), []  # 9.5: the base model's step-0 validation (snapshots[0])

    def fake_eval(model, batches):
        snapshots.append({k: np.array(v) for k, v in adapter_weights(model).items()})
        v = next(curve)
        return {"loss_sum": v, "n_tokens": 1.0, "loss": v, "ppl": math.exp(v)}

    real, calls = os.replace, []

    def replace(src, dst, *a, **k):
        if Path(dst).name == "best.json":
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(trainer, "evaluate_loss", fake_eval)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(MlxtuneError, match="No space left on device while writing the run"):
        _train(_cfg(tmp_path, setup, eval_every=1, save_every=100))
    best = tmp_path / "run" / "best"
    assert json.loads((best / "best.json").read_text())["step"] == 1
    assert _same(_adapter(best / "adapters.safetensors"), snapshots[1])
    assert not _same(snapshots[1], snapshots[2])


# --------------------------------------------------------------------------------------------------------------
# 7. EDQUOT by name


def test_quota_error_is_a_full_disk_whatever_its_errno(setup, tmp_path, monkeypatch):
    """macOS numbers EDQUOT 69 (Linux 122, which the old trainer hard-coded): with the platform's table saying 69,
    a quota error while checkpointing says how much space is left, and one in a reporter is one line, not a
    traceback."""
    import mlxtune.fsio as fsio

    monkeypatch.setattr(fsio, "_DISK_FULL", (errno.ENOSPC, 69))  # errno as macOS defines it
    real = mx.save_safetensors

    def quota(path, *a, **k):
        if "/.step_000002.tmp-" in str(path):
            raise OSError(69, "Disc quota exceeded", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", quota)
    with pytest.raises(CheckpointError, match=r"step_000002: could not write the checkpoint \(Disc quota exceeded; "
                                              r"[\d.]+ MB free on that disk\); the previous checkpoint .*step_000001 is intact"):
        _train(_cfg(tmp_path, setup))
    monkeypatch.setattr(mx, "save_safetensors", real)

    class Quota(Callback):
        def on_log(self, record):
            raise OSError(69, "Disc quota exceeded", "somewhere/metrics")

    with pytest.raises(MlxtuneError, match=r"^somewhere/metrics: Disc quota exceeded while writing the run; free some "
                                           r"space; then (continue with --resume|start the run again)"):
        _train(_cfg(tmp_path, setup, output="run2"), callbacks=[Quota()])


# --------------------------------------------------------------------------------------------------------------
# 8. Counting real tokens


def test_tokens_per_sec_counts_end_of_turn_tokens_that_equal_padding(tmp_path, monkeypatch):
    """A ChatML model whose pad token is <|im_end|>: every user turn ends with it inside the inputs. The report's
    input-token count (tokens_per_sec / trained_tokens_per_sec x trained tokens) is the batch's real tokens,
    Batch.n_real; the old trainer counted `inputs != pad_id` and missed those."""
    from mlxtune.data import load_splits, make_batches
    from mlxtune.config import load_config
    from mlxtune.loading import load
    from mlxtune.tokenizer import pad_id

    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))
    model_dir = make_small_model_dir(tmp_path / "model", pad_token="<|im_end|>")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(1, 5)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(tmp_path, model_dir, data, max_steps=1, batch_size=4, grad_accumulation=1, eval_every=0)
    cfg["data"].update(packing=False, val_split=0.0)
    res = _train(cfg)
    rec = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()][0]
    seen = rec["tokens_per_sec"] / rec["trained_tokens_per_sec"] * rec["trained_tokens"]

    c = load_config(cfg)
    _, tok = load(str(model_dir))
    batches = make_batches(load_splits(c.data, tok, c.train.seed).train, 4, c.data.max_length, False, pad_id(tok))
    assert len(batches) == 1
    b = batches[0]
    assert int((b.inputs != pad_id(tok)).sum()) < b.n_real  # the case the old count got wrong
    assert seen == pytest.approx(b.n_real, rel=1e-9)
