"""The run dir, the resume state, and full-state checkpoints for exact resume.

    <output_dir>/
      config.yaml                 the resolved config (re-runs as is)
      adapters.safetensors        final adapter   } written by adapters.save_adapter at the end
      adapter_config.json         its metadata    }
      metrics.jsonl               one JSON object per report / evaluation (callbacks.MetricsWriter)
      loss.png                    training and validation loss
      checkpoints/step_000100/    adapters.safetensors, optimizer.safetensors, state.json
      checkpoints/abandoned-<time>/step_000300/, best/   a trajectory given up by `--resume PATH` (kept, inert)
      best/                       the best evaluation's adapter and best.json (with evaluation)

Every checkpoint (and best/, written by adapters.save_adapter with best.json as an extra file) is built in a
hidden temp dir and swapped into place by `fsio.atomic_dir`: a dir either exists complete or not at all, and
re-writing one never leaves a moment without a complete copy (`recover_run` puts the old copy back after a
kill between the two renames).

`state.json` is the `ResumeState` — everything the loop needs to continue as if never stopped: the step, the
data cursor (global micro-batch index = step x grad_accumulation), the schedule length, the number of
processes, the trained-token count and the open report window (so the next report averages the same steps as
an uninterrupted run's), and the early-stopping state — plus what the checkpoint must match to be resumed (base
fingerprint, adapter shapes, data hash). The RNG needs no state: it is re-seeded from (seed, micro-batch index)
before every micro-batch. Rules checked on resume (`check_resume`): the same grad_accumulation (another k
would skip or repeat micro-batches); any number of processes (the update does not depend on it: distributed.py);
a longer or shorter schedule is allowed and stated (the learning rate continues on the new schedule), one that
ends before the checkpoint's step is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import fsio
from .adapters import check_finite
from .errors import CheckpointError, DiskError

FORMAT_VERSION = 2  # 2: the whole ResumeState (grad_accumulation, report window); 1 is still read
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


# --------------------------------------------------------------------------------------------------------------
# The resume state


@dataclass
class Window:
    """The open report window: what the next report averages. loss_sum and tokens are mx arrays while training
    (summed lazily on the device), floats in state.json; seconds is the wall time already spent in it."""

    loss_sum: Any = 0.0
    tokens: Any = 0.0
    seen: int = 0
    seconds: float = 0.0


@dataclass
class EarlyStopping:
    best: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0


@dataclass
class ResumeState:
    """Where a run is; saved whole in every checkpoint and restored whole."""

    step: int = 0
    "Optimizer steps done."
    micro_index: int = 0
    "The data cursor: the next global micro-batch, always step x grad_accumulation."
    total_steps: int = 0
    "The schedule length (train.max_steps, or epochs x micro-batches / grad_accumulation)."
    grad_accumulation: int = 1
    world_size: int = 1
    trained_tokens: float = 0.0
    "Target tokens of the steps reported so far (the window holds the rest)."
    window: Window = field(default_factory=Window)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)

    def advance(self) -> None:
        self.step += 1
        self.micro_index = self.step * self.grad_accumulation

    def to_dict(self) -> dict:
        """As state.json holds it (the window's sums as floats)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("window", "early_stopping")}
        w = self.window
        out["window"] = {"loss_sum": float(w.loss_sum), "tokens": float(w.tokens), "seen": int(w.seen),
                         "seconds": float(w.seconds)}
        out["early_stopping"] = asdict(self.early_stopping)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ResumeState":
        """From state.json; a format-1 checkpoint has no window (the first report after it covers fewer steps)
        and no grad_accumulation (it is micro_index / step)."""
        step = int(d["step"])
        k = d.get("grad_accumulation") or (int(d["micro_index"]) // step if step and "micro_index" in d else None)
        return cls(step=step, micro_index=int(d.get("micro_index", step * (k or 1))),
                   total_steps=int(d.get("total_steps") or 0), grad_accumulation=int(k or 0),
                   world_size=int(d.get("world_size") or 1), trained_tokens=float(d.get("trained_tokens") or 0.0),
                   window=Window(**d.get("window", {})), early_stopping=EarlyStopping(**d.get("early_stopping", {})))


def data_hash(batches: Any, cfg: Any) -> str:
    """What the batches a run trains on hash to: a resume must see the same (data order would not continue)."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.data.max_length, cfg.data.packing, cfg.train.batch_size, cfg.data.shuffle, cfg.train.seed]).encode())
    for b in batches:
        h.update(np.ascontiguousarray(b.inputs).tobytes())
        h.update(np.ascontiguousarray(b.loss_mask).tobytes())
    return h.hexdigest()


def check_resume(path: Path, saved: ResumeState, *, grad_accumulation: int, total_steps: int,
                 world_size: int) -> list[str]:
    """Refuse a checkpoint this run cannot continue exactly (CheckpointError, one line with the reason and the
    fix); return notes for what is allowed but differs (the schedule length, the number of processes)."""
    s, k0 = saved.step, saved.grad_accumulation
    if k0 and saved.micro_index != s * k0:
        raise CheckpointError(f"{path}: cannot resume: its data cursor (micro-batch {saved.micro_index}) is not step "
                              f"{s} x grad_accumulation {k0}; state.json is damaged: resume from another checkpoint")
    if k0 and k0 != grad_accumulation:
        raise CheckpointError(
            f"{path}: cannot resume: train.grad_accumulation is {grad_accumulation} but the checkpoint was written "
            f"with {k0}; its step {s} ends at micro-batch {s * k0}, so another value would "
            f"{'skip' if grad_accumulation > k0 else 'repeat'} training data: add --train.grad_accumulation {k0}")
    if s > total_steps:
        raise CheckpointError(f"{path}: cannot resume: the checkpoint is at step {s}, past the end of this run's "
                              f"schedule ({total_steps} steps); raise train.max_steps (or train.epochs)")
    notes = []
    if saved.total_steps and saved.total_steps != total_steps:
        notes.append(f"the schedule changed since the checkpoint: {total_steps} steps instead of {saved.total_steps} "
                     f"(train.max_steps / train.epochs); the learning rate continues on the new schedule from step {s}")
    if saved.world_size != world_size:
        notes.append(f"the checkpoint was written by {saved.world_size} process(es), this run has {world_size}: "
                     f"the update does not depend on the number of processes, so training continues exactly")
    return notes


# --------------------------------------------------------------------------------------------------------------
# Listing, recovering, abandoning


def list_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    """(step, dir) of the run's current checkpoints, oldest first (abandoned ones and temps are not listed)."""
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


def recover_run(run: RunDir) -> None:
    """After a kill: put back a checkpoint or best/ whose re-write died between its two renames, and remove the
    temps dead processes left (also the `.tmp-*` dirs of mlxtune versions before fsio)."""
    for d in (run.checkpoints, run.root):
        if d.is_dir():
            fsio.clean_temps(d)
    if run.checkpoints.is_dir():
        for p in run.checkpoints.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def abandon_newer(run: RunDir, step: int, resume_path: Path) -> list[str]:
    """Resuming from `resume_path` (at `step`) gives up what this run dir holds beyond it: move the newer
    checkpoints (all of them when resuming from another run's checkpoint) and a newer best/ into
    checkpoints/abandoned-<time>/, where they are kept but never resumed from or pruned. Returns notes."""
    same_run = Path(resume_path).resolve().parent == run.checkpoints.resolve()
    newer = [p for s, p in list_checkpoints(run) if s > step or not same_run]
    best_step = _best_step(run)
    move_best = run.best.is_dir() and (not same_run or best_step is None or best_step > step)
    if not newer and not move_best:
        return []
    dest = run.checkpoints / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    while dest.exists():
        dest = dest.with_name(dest.name + "x")
    dest.mkdir(parents=True)
    for p in newer + ([run.best] if move_best else []):
        os.rename(p, dest / p.name)
    fsio.fsync_dir(run.checkpoints)
    fsio.fsync_dir(run.root)
    what = ", ".join(p.name for p in newer) + (" and " if newer and move_best else "") + (
        f"best/ (step {best_step})" if move_best else "")
    return [f"resuming from step {step}: moved {what} of the abandoned trajectory to {dest}"]


def _best_step(run: RunDir) -> Optional[int]:
    try:
        return int(json.loads((run.best / "best.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(run: RunDir, state: ResumeState, adapter: dict[str, mx.array], optimizer_state: Any,
                    identity: dict, keep_last: int) -> Path:
    """Write checkpoints/step_NNNNNN as one directory swap, then prune the older ones to `keep_last` in all.

    `identity`: what a resume must match (fingerprint, base_path, data_hash, seed), stored beside the state."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.step_dir(state.step)
    body = {"format_version": FORMAT_VERSION, **state.to_dict(), **identity}
    try:
        with fsio.atomic_dir(final, overwrite=True) as tmp:
            mx.save_safetensors(str(tmp / "adapters.safetensors"), adapter)
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
            (tmp / "state.json").write_text(json.dumps(body, indent=2))
    except (OSError, RuntimeError) as e:  # RuntimeError: MLX's writer ("[write] Unable to write ... bytes to file.")
        prev = [p for s, p in list_checkpoints(run) if s != state.step]
        raise CheckpointError(
            f"{final}: could not write the checkpoint ({_write_failure(e, run.checkpoints)}); "
            + (f"the previous checkpoint {prev[-1]} is intact: free some space and continue with --resume" if prev
               else "no earlier checkpoint exists")
        ) from None
    older = [p for s, p in list_checkpoints(run) if s < state.step]
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        _discard(p)
    return final


def _discard(p: Path) -> None:
    """Delete a dir so that a kill midway leaves no half-deleted checkpoint: rename it to a temp name first."""
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(p, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def _write_failure(e: Exception, where: Path) -> str:
    """Why a write failed, with the free space when the disk looks full."""
    why = getattr(e, "strerror", None) or str(e)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return why
    if fsio.is_disk_full(e) or free < 64 * 2**20:  # ENOSPC / EDQUOT, or under 64 MB left
        return f"{why}; {free / 2**20:.1f} MB free on that disk"
    return why


# --------------------------------------------------------------------------------------------------------------
# Reading


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
    check_finite(adapter, path / "adapters.safetensors")  # NaN/inf: never resumed from, never "the last good one"
    problems = []
    if state.get("format_version") not in (1, FORMAT_VERSION):
        problems.append(f"format_version {state.get('format_version')} (expected {FORMAT_VERSION})")
    if expected.get("fingerprint") and state.get("fingerprint") not in (expected["fingerprint"],
                                                                          *expected.get("legacy_fingerprints", ())):
        problems.append(
            f"base model differs (checkpoint: {state.get('base_path')} {str(state.get('fingerprint'))[:12]}, "
            f"now: {expected.get('base_path')} {expected['fingerprint'][:12]})"
        )
    problems += _shape_problems(adapter, expected.get("adapter_shapes") or {})
    if expected.get("data_hash") and state.get("data_hash") != expected["data_hash"]:
        problems.append("the training data or batching config changed since the checkpoint (data order would not continue)")
    if problems:
        raise CheckpointError(f"{path}: cannot resume: " + "; ".join(problems))
    return adapter, tree_unflatten(list(opt_flat.items())), state


def _shape_problems(adapter: dict, shapes: dict) -> list[str]:
    problems = []
    missing, extra = sorted(set(shapes) - set(adapter)), sorted(set(adapter) - set(shapes))
    if missing:
        problems.append(f"{len(missing)} adapter weights missing (e.g. {missing[0]}): lora.targets/layers differ")
    if extra:
        problems.append(f"{len(extra)} unexpected adapter weights (e.g. {extra[0]}): lora.targets/layers differ")
    bad = [k for k in shapes if k in adapter and tuple(adapter[k].shape) != tuple(shapes[k])]
    if bad:
        k = bad[0]
        problems.append(f"{len(bad)} adapter shapes differ (e.g. {k}: {tuple(adapter[k].shape)} vs "
                        f"{tuple(shapes[k])}): lora.rank differs")
    return problems


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


@contextmanager
def disk_errors(run: RunDir, good: Callable[[], Optional[Path]]):
    """Any OSError while a run works (full disk, read-only or vanished dir, a file where a dir belongs), or MLX's
    writer failing, outside save_checkpoint → one DiskError naming the path and the fix, not a traceback."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not fsio.is_disk_full(e):
            raise
        last = good()
        then = (f"then continue with --resume (last checkpoint: {last})" if last else
                "then start the run again (no checkpoint was written)")
        if isinstance(e, OSError):
            raise DiskError(f"{fsio.describe_os_error(e, run.root, 'writing the run')}; {then}") from None
        raise DiskError(f"{run.root}: could not write ({e}); is the disk full? free some space, {then}") from None
