"""Run-dir layout and atomic full-state checkpoints for exact resume.

    <output_dir>/
      config.yaml                 the resolved config (re-runs as is)
      adapters.safetensors        final adapter   } written by adapters.save_adapter at the end
      adapter_config.json         its metadata    }
      metrics.jsonl               one JSON object per report / evaluation
      loss.png                    training and validation loss
      checkpoints/step_000100/    adapters.safetensors, optimizer.safetensors, state.json
      best/                       the best evaluation's adapter (with early stopping / eval)

A checkpoint is written into `checkpoints/.tmp-step_NNNNNN-<pid>/`, every file fsynced, then renamed into place
(atomic on POSIX) and the parent fsynced: a checkpoint dir either exists complete or not at all, whenever the
process dies. `state.json` holds the step, the data cursor (global micro-batch index), the RNG recipe (seed; the
RNG is re-seeded from (seed, micro index) before every micro-batch, so no opaque RNG state needs restoring), the
early-stopping state, and what the checkpoint must match to be resumed (base fingerprint, adapter shapes, data hash).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import CheckpointError

FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d{6,})$")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def loss_png(self) -> Path:
        return self.root / "loss.png"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, mx.array):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def list_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    if run.root.exists() and not run.root.is_dir():  # checked before a run writes anything
        raise CheckpointError(f"output_dir: {run.root} is a file, not a directory; choose another output_dir")
    if not run.checkpoints.is_dir():
        return []
    out = []
    for p in run.checkpoints.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run: RunDir) -> Optional[Path]:
    cps = list_checkpoints(run)
    return cps[-1][1] if cps else None


def clean_partial(run: RunDir) -> None:
    """Remove temp dirs left by a process that died mid-write (they were never renamed into place)."""
    if run.checkpoints.is_dir():
        for p in run.checkpoints.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run: RunDir, step: int, adapter: dict[str, mx.array], optimizer_state: Any, state: dict,
                    keep_last: int) -> Path:
    """Write checkpoints/step_NNNNNN atomically, then prune to the newest `keep_last`."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.step_dir(step)
    tmp = run.checkpoints / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), adapter)
        opt = dict(tree_flatten(optimizer_state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
        state = {**state, "format_version": FORMAT_VERSION, "step": step}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=_json_default))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. resumed from an older one): move the old one aside
            old = run.checkpoints / f".tmp-old-{final.name}-{os.getpid()}"  # atomically, never half-deleted in place
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(run.checkpoints)
    except (OSError, RuntimeError) as e:  # RuntimeError: MLX's writer ("[write] Unable to write ... bytes to file.")
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run)
        raise CheckpointError(
            f"{final}: could not write the checkpoint ({_write_failure(e, run.checkpoints)}); "
            + (f"the previous checkpoint {prev} is intact: free some space and continue with --resume" if prev
               else "no earlier checkpoint exists")
        ) from None
    for s, p in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _write_failure(e: Exception, where: Path) -> str:
    """Why a write failed, with the free space when the disk looks full."""
    why = getattr(e, "strerror", None) or str(e)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return why
    if getattr(e, "errno", None) in (28, 122) or free < 64 * 2**20:  # ENOSPC, EDQUOT, or under 64 MB left
        return f"{why}; {free / 2**20:.1f} MB free on that disk"
    return why


def load_checkpoint(path: Path, expected: dict) -> tuple[dict, dict, dict]:
    """Read (adapter weights, optimizer state tree, state.json) and check it fits `expected`.

    `expected` holds `fingerprint`, `adapter_shapes` {name: shape}, `data_hash`; every mismatch is reported in
    one CheckpointError with the reason.
    """
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no state.json); pass a checkpoints/step_NNNNNN dir or a run dir")
    try:
        state = json.loads(state_file.read_text())
        adapter = mx.load(str(path / "adapters.safetensors"))
        opt_flat = mx.load(str(path / "optimizer.safetensors"))
    except Exception as e:  # unreadable files: never resume from a damaged checkpoint
        raise CheckpointError(f"{path}: checkpoint is unreadable ({e}); resume from an earlier one with --resume PATH") from None
    problems = []
    if state.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {state.get('format_version')} (expected {FORMAT_VERSION})")
    if expected.get("fingerprint") and state.get("fingerprint") != expected["fingerprint"]:
        problems.append(
            f"base model differs (checkpoint: {state.get('base_path')} {str(state.get('fingerprint'))[:12]}, "
            f"now: {expected.get('base_path')} {expected['fingerprint'][:12]})"
        )
    shapes = expected.get("adapter_shapes") or {}
    missing = sorted(set(shapes) - set(adapter))
    extra = sorted(set(adapter) - set(shapes))
    if missing:
        problems.append(f"{len(missing)} adapter weights missing (e.g. {missing[0]}): lora.targets/layers differ")
    if extra:
        problems.append(f"{len(extra)} unexpected adapter weights (e.g. {extra[0]}): lora.targets/layers differ")
    bad = [k for k in shapes if k in adapter and tuple(adapter[k].shape) != tuple(shapes[k])]
    if bad:
        k = bad[0]
        problems.append(f"{len(bad)} adapter shapes differ (e.g. {k}: {tuple(adapter[k].shape)} vs {tuple(shapes[k])}): lora.rank differs")
    if expected.get("data_hash") and state.get("data_hash") != expected["data_hash"]:
        problems.append("the training data or batching config changed since the checkpoint (data order would not continue)")
    if problems:
        raise CheckpointError(f"{path}: cannot resume: " + "; ".join(problems))
    return adapter, tree_unflatten(list(opt_flat.items())), state


def resolve_resume(run: RunDir, resume: Any) -> Optional[Path]:
    """`--resume` (True: latest in the run dir) or `--resume PATH` (a step dir or another run dir)."""
    if resume in (None, False, ""):
        return None
    if resume is True or resume == "latest":
        cp = latest_checkpoint(run)
        if cp is None:
            raise CheckpointError(f"{run.checkpoints}: no checkpoint to resume from; start without --resume")
        return cp
    p = Path(resume)
    if (p / "state.json").is_file():
        return p
    if (p / "checkpoints").is_dir():
        cp = latest_checkpoint(RunDir(p))
        if cp is not None:
            return cp
    raise CheckpointError(f"{p}: no checkpoint there; pass a checkpoints/step_NNNNNN dir or a run dir with checkpoints")
