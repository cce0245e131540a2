"""A run owns its directory: which dirs `train` may write into, the marker that says a dir is a run, the lock.

    <output_dir>/.mlxtune-run        {"format": "mlxtune-run", "format_version": 1}: written first, only by mlxtune
    <output_dir>/.mlxtune-run.lock   {"pid", "host", "started"}: held while a `train` works in the dir

`check_run_dir` decides before anything is loaded or written: a new or empty dir, or a mlxtune run (the marker,
or for runs of older versions config.yaml + checkpoints/ or an adapter_config.json of format mlxtune-lora); a
run that has results only with `--resume` or `--overwrite`. Never the model dir, a data dir, a data file, the
current directory, a file, a dangling symlink, or a dir holding files that are not a run's.

`RunLock` is created atomically (O_EXCL): a second `train` on a live run fails at once naming the holder. A lock
whose pid is dead on this host is stale: reported and taken over. A lock from another host is never taken over
(its pid means nothing here): the error says how to clear it. Liveness is `os.kill(pid, 0)` (fsio), no /proc.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from . import fsio
from .errors import ConfigError, MlxtuneError

MARKER = ".mlxtune-run"
LOCK = ".mlxtune-run.lock"
MARKER_VERSION = 1
# Entries an OS or a file manager drops into any dir: they do not make a dir someone's.
_IGNORABLE = {".DS_Store", "Thumbs.db", "desktop.ini"}


class RunDirError(MlxtuneError):
    """An output_dir a run may not write into, or one another run holds."""


def _short(p: Any) -> str:
    return fsio.short_path(p, 120)


def is_run(root: Path) -> bool:
    """Whether `root` is a mlxtune run dir: the marker, or (runs of older versions) config.yaml + checkpoints/, or
    an adapter_config.json of format mlxtune-lora."""
    if (root / MARKER).is_file():
        return True
    if (root / "config.yaml").is_file() and (root / "checkpoints").is_dir():
        return True
    try:
        return json.loads((root / "adapter_config.json").read_text())["format"] == "mlxtune-lora"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def has_results(root: Path) -> bool:
    """A final adapter, a checkpoint or best/: what `--overwrite` would replace. (A run killed before its first
    checkpoint has none: it is started again as is, its metrics.jsonl re-written.)"""
    cps = root / "checkpoints"
    return ((root / "adapters.safetensors").exists() or (root / "best").exists()
            or (cps.is_dir() and any(not p.name.startswith(".") for p in cps.iterdir())))


def write_marker(root: Path) -> None:
    """Mark `root` as a mlxtune run (the first file a run writes)."""
    if not (root / MARKER).is_file():
        fsio.write_json(root / MARKER, {"format": "mlxtune-run", "format_version": MARKER_VERSION})


def check_run_dir(output_dir: Any, *, resume: Any = None, overwrite: bool = False,
                  inputs: Iterable[tuple[str, Any]] = ()) -> Path:
    """Refuse (RunDirError, one line naming the dir and the fix) an output_dir this run may not write into.
    `inputs`: (config field, path) of what the run reads (model.path, data.*, lora.init_adapter). Returns it resolved."""
    raw = os.fspath(output_dir) if output_dir is not None else ""
    if not raw.strip():
        raise RunDirError("output_dir: empty; name a run dir, e.g. output_dir: runs/demo")
    root = Path(raw).expanduser()
    where = f"output_dir {_short(raw)}"
    if root.is_symlink() and not root.exists():
        raise RunDirError(f"{where}: is a dangling symlink (to {_short(os.readlink(root))}); remove it or choose "
                          "another output_dir")
    target = root.resolve()
    if root.exists() and not root.is_dir():
        raise RunDirError(f"output_dir: {_short(raw)} is a file, not a directory; choose another output_dir")
    if target == Path.cwd().resolve() and not is_run(target):
        raise RunDirError(f"{where}: is the current directory; name a run dir, e.g. output_dir: runs/demo")
    _check_inputs(where, target, inputs, overwrite)
    ancestor = target
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunDirError(f"{where}: {_short(ancestor)} is a file, not a directory; choose another output_dir")
    if not target.exists():
        return target
    RunLock(target).refuse_if_held()  # a live run first: its holder is what the user needs to know
    entries = [p.name for p in target.iterdir() if p.name not in _IGNORABLE and p.name != LOCK]
    if not entries:
        return target
    if not is_run(target):
        shown = sorted(entries)[0]
        raise RunDirError(f"{where}: holds files that are not a mlxtune run (e.g. {_short(shown)}); choose a new or "
                          "empty output_dir")
    if has_results(target) and not resume and not overwrite:
        what = _describe_results(target)
        raise RunDirError(f"{where}: already holds {what}; add --resume to continue it, --overwrite to replace it, "
                          "or choose another output_dir")
    return target


def _describe_results(root: Path) -> str:
    """"a finished run (step 6)", "a run stopped at step 3 of 6", "a run with checkpoints", for the refusal."""
    step = total = None
    cps = sorted(p for p in (root / "checkpoints").glob("step_*") if (p / "state.json").is_file())
    if cps:
        try:
            state = json.loads((cps[-1] / "state.json").read_text())
            step, total = int(state["step"]), int(state.get("total_steps") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if step is not None and total and step < total:
        return f"a run stopped at step {step} of {total}"
    if (root / "adapters.safetensors").exists():
        return "a finished run" + (f" (step {step})" if step is not None else "")
    return "a run with checkpoints" if cps else "a run's results (best/)"


def _check_inputs(where: str, target: Path, inputs: Iterable[tuple[str, Any]], overwrite: bool) -> None:
    for name, value in inputs:
        if value is None or not os.fspath(value).strip():
            continue
        src = Path(os.fspath(value)).expanduser()
        if not src.exists():
            continue  # a hub id, or a path the loader reports
        src = src.resolve()
        if target == src or (src.is_dir() and src in target.parents):
            what = "is" if target == src else "is inside"
            raise RunDirError(f"{where}: {what} {name} ({_short(src)}); a run writes into a dir of its own: choose "
                              "another output_dir")
        if target in src.parents and (overwrite or not is_run(target)):
            raise RunDirError(f"{where}: holds {name} ({_short(src)}); choose another output_dir")


def clear_results(root: Path) -> None:
    """`--overwrite`: move the run's files aside into a hidden `.overwritten.tmp-PID-RAND` dir (one rename each:
    a kill leaves each file in place or aside, and the next run's temp cleanup removes the aside dir), then
    delete it. The marker and the lock stay."""
    names = [p for p in root.iterdir() if p.name not in (MARKER, LOCK) and p.name not in _IGNORABLE]
    if not names:
        return
    aside = root / f".overwritten.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    aside.mkdir()
    for p in names:
        os.rename(p, aside / p.name)
    fsio.fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The lock


class RunLock:
    """`.mlxtune-run.lock` in a run dir, held from the checks to the end of the run (release() on every exit path).
    Creating it creates the run dir when needed; release() removes the dirs it created if they are still empty."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / LOCK
        self.created: list[Path] = []
        self.held = False

    def acquire(self) -> "RunLock":
        d = self.root
        while not d.exists():
            self.created.append(d)
            d = d.parent
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return self._create()
        except BaseException:
            self.release()
            raise

    def _create(self) -> "RunLock":
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            self.held = True  # ours from here: release() removes it even if the write below fails
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            return self
        raise RunDirError(f"output_dir {_short(self.root)}: could not take the lock {LOCK}; another process keeps "
                          "creating it: check that no other train uses this dir")

    def _take_over_or_refuse(self) -> None:
        stale = self.refuse_if_held()
        if stale is None:
            return  # released meanwhile: try again
        print(f"note: {_short(self.path)}: taking over a stale lock ({stale} is no longer running)", file=sys.stderr,
              flush=True)
        aside = self.path.with_name(f".{LOCK}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
            aside.unlink()
        except FileNotFoundError:
            pass

    def refuse_if_held(self) -> Optional[str]:
        """RunDirError (naming the holder and the fix) when a live process or another host holds the lock; else a
        description of the stale holder, or None when there is no lock."""
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started = int(holder["pid"]), str(holder["host"]), str(holder.get("started", "?"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age < 10:  # being written by a process that just created it
                raise RunDirError(f"output_dir {_short(self.root)}: another train is starting in this dir "
                                  f"({LOCK} was just created); wait for it or choose another output_dir") from None
            pid, host, started = -1, socket.gethostname(), "?"
        fix = f"if it is not running, delete {_short(self.path)} and retry"
        if host != socket.gethostname():
            raise RunDirError(f"output_dir {_short(self.root)}: locked by pid {pid} on host {host[:60]} (since "
                              f"{started}); another train is using it: wait for it, or {fix}")
        if pid > 0 and fsio.pid_alive(pid):
            raise RunDirError(f"output_dir {_short(self.root)}: another train (pid {pid}, since {started}) is using "
                              f"this run dir; wait for it to finish or stop it, or choose another output_dir")
        return f"pid {pid} on this host, since {started},"

    def release(self) -> None:
        """Remove the lock (if this process holds it) and the dirs acquire() created that are still empty."""
        if self.held:
            try:
                holder = json.loads(self.path.read_text() or "{}")
                if holder.get("pid", os.getpid()) == os.getpid():  # ours (or our own half-written one)
                    self.path.unlink()
            except (OSError, ValueError, AttributeError):
                pass
            self.held = False
        for d in self.created:
            try:
                d.rmdir()  # only when empty: a run that wrote anything keeps its dir
            except OSError:
                break


# --------------------------------------------------------------------------------------------------------------
# What the trainer calls


def claim_run_dir(cfg: Any, run: Any, resume: Any, overwrite: bool, lock: list) -> Optional[Path]:
    """Before anything is loaded: check output_dir, take its lock (appended to `lock`), recover what a kill left,
    and return the checkpoint to resume from (None: a fresh run). On failure the lock is released."""
    from .checkpoint import latest_checkpoint, recover_run, resolve_resume

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run, or replace its results)")
    d = cfg.data
    check_run_dir(cfg.output_dir, resume=resume, overwrite=overwrite,
                  inputs=[("model.path", cfg.model.path), ("data.train", d.train), ("data.valid", d.valid),
                          ("data.test", d.test), ("lora.init_adapter", cfg.lora.init_adapter)])
    try:
        lock.append(RunLock(run.root).acquire())
    except OSError as e:
        raise RunDirError(f"output_dir: {fsio.describe_os_error(e, run.root, 'creating the run dir')}") from None
    try:
        if run.root.is_dir():
            recover_run(run)  # a checkpoint whose re-write was killed between its two renames comes back first
        if not resume and not overwrite and latest_checkpoint(run) is not None:
            raise RunDirError(f"output_dir {_short(run.root)}: already holds a run with checkpoints; add --resume to "
                              "continue it, --overwrite to replace it, or choose another output_dir")
        return resolve_resume(run, resume) if resume else None
    except BaseException:
        lock.pop().release()
        raise


def already_finished(run: Any, resume_path: Optional[Path], state: Any) -> bool:
    """`--resume` on a run at the end of its schedule whose final adapter is written: says so in one line (stderr)
    and returns True; nothing is to be written. A larger --train.max_steps / --train.epochs extends the run."""
    step, total_steps = state.step, state.total_steps
    if (resume_path is None or step < total_steps or not (run.root / "adapters.safetensors").is_file()
            or Path(resume_path).resolve().parent != run.checkpoints.resolve()):
        return False
    print(f"note: {_short(run.root)}: already finished at step {step} of {total_steps}; nothing to do. To train "
          f"further, resume with a larger --train.max_steps (> {total_steps}) or --train.epochs", file=sys.stderr,
          flush=True)
    return True


def start_run_dir(root: Path, overwrite: bool) -> None:
    """The run's first writes: (with --overwrite) the old results removed, then the marker."""
    root.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_results(root)
    write_marker(root)
