"""Experiment trackers: TensorBoard and Weights & Biases as training callbacks, and the eval report for both.

    check_trackers(report_to)                 before anything is written: a missing extra is one ConfigError
    make_trackers(report_to, run_dir)         the callbacks for train.report_to, in that order
    log_eval_report(report_to, dir, report)   `mlxtune eval --report-to`: the report's metrics into the same places

What is logged: every record the trainer hands its callbacks (the lines of metrics.jsonl), its numbers as scalars
under their metrics.jsonl names at the record's `step` (the optimizer step); the resolved config (W&B config,
TensorBoard text); the base model's fingerprint (W&B summary, TensorBoard text); loss.png as an image at the end.
The trainer runs callbacks on process 0 only, so a data-parallel run reports once.

Resuming never duplicates a step, even after a SIGKILL, because metrics.jsonl is the source of truth and the
trackers' own files are not (a killed process loses what TensorBoard's writer and W&B's service still buffered):
- TensorBoard (event files in RUN/tensorboard, written with tensorboardX): every session starts with a purge
  marker at step 0, so TensorBoard drops what earlier sessions logged; a resumed one logs the config text again
  and replays the run's metrics.jsonl up to the resumed step (from the base model's step-0 validation) before
  logging live records.
- W&B: the run id and each session's offline dir and last step live in RUN/wandb.json, so a resumed run
  continues the same W&B run (`resume="allow"`). A session that never finished (killed) left an offline dir
  that may hold any prefix of its records: it is deleted, and the records after the last finished session's
  (or, online, after the server's) last step are replayed from metrics.jsonl; live records at or before
  that step are skipped, as W&B itself does online.

W&B's console capture is off (it would rewrap the process's stdout); offline runs (`WANDB_MODE=offline`) are
uploaded later with `wandb sync RUN/wandb/offline-run-*`. The project is $WANDB_PROJECT, else "mlxtune".
"""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from . import fsio
from .callbacks import Callback
from .config import TRACKERS
from .errors import ConfigError, MlxtuneError

PathLike = Union[str, os.PathLike]

MODULES = {"tensorboard": "tensorboardX", "wandb": "wandb"}
"The module each tracker writes with (the import that check_trackers tries)."
PIP = {name: f"pip install 'mlxtune[{name}]'" for name in TRACKERS}
TENSORBOARD_DIR = "tensorboard"
WANDB_STATE = "wandb.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
DEFAULT_PROJECT = "mlxtune"


# ---------------------------------------------------------------------------------------------------------
# Public API


def check_trackers(report_to: Iterable[str], *, where: str = "train.report_to") -> None:
    """Raise one ConfigError, with the pip command, for a tracker that is unknown or whose package is missing
    (`where` names the setting in the message: "--report-to" for eval)."""
    for name in report_to:
        if name not in MODULES:
            raise ConfigError(f"{where}: {str(name)[:40]!r} is not one of {', '.join(TRACKERS)}")
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            raise ConfigError(f"{where}: {name} needs the {MODULES[name]} package, which is not installed; "
                              f"{PIP[name]}") from None


def make_trackers(report_to: Iterable[str], run_dir: PathLike) -> list[Callback]:
    """The tracker callbacks for `report_to` (checked first), writing under `run_dir`."""
    report_to = list(report_to)
    check_trackers(report_to)
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    return [kinds[name](run_dir) for name in dict.fromkeys(report_to)]


def log_eval_report(report_to: Iterable[str], directory: PathLike, report: Mapping[str, Any]) -> None:
    """Log an `evaluate` report's metrics (`eval/<metric>`; compared: `eval/base/...`, `eval/tuned/...`,
    `eval/delta/...`) to the trackers of `directory`: a training run dir continues that run's W&B run and
    TensorBoard dir (at its last step), any other dir (eval --out) gets its own."""
    report_to = list(report_to)
    check_trackers(report_to, where="--report-to")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metrics = eval_scalars(report)
    step = last_step(directory)
    if "tensorboard" in report_to:
        writer = _tb_writer(directory)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.close()
    if "wandb" in report_to:
        tracker = WandbTracker(directory)
        run = tracker.start(None, mode="append", job_type="eval")
        run.summary.update({**metrics, "eval/data": str(report.get("data"))})
        tracker.finish()


# ---------------------------------------------------------------------------------------------------------
# Records


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record (bools and the step itself left out), under their metrics.jsonl names."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """`eval/<metric>` for a plain report, `eval/<variant>/<metric>` for a base-vs-tuned comparison."""
    out = {f"eval/{k}": v for k, v in scalars(report.get("metrics") or {}).items()}
    for variant in ("base", "tuned", "delta"):
        out.update({f"eval/{variant}/{k}": v for k, v in scalars(report.get(variant) or {}).items()})
    for key in ("n_examples", "n_generated"):
        if isinstance(report.get(key), int):
            out[f"eval/{key}"] = float(report[key])
    return out


def read_metrics(run_dir: PathLike, after: int = 0, until: float = math.inf) -> list[dict]:
    """The records of RUN/metrics.jsonl with after < step <= until, in file order (a line torn by a kill is
    skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and after < record["step"] <= until:
            out.append(record)
    return out


def last_step(run_dir: PathLike) -> int:
    """The highest step in RUN/metrics.jsonl (0 when there is none)."""
    return max((r["step"] for r in read_metrics(run_dir)), default=0)


def plain(obj: Any) -> Any:
    """`obj` as JSON types (paths and other objects as strings), as YAML and W&B's config take them."""
    return json.loads(json.dumps(obj, default=str))


def _info(info: Any, key: str, default: Any = None) -> Any:
    """A field of the trainer's RunInfo (an object, or a dict)."""
    return info.get(key, default) if isinstance(info, Mapping) else getattr(info, key, default)


def base_fingerprint(run_dir: PathLike) -> Optional[str]:
    """The base model fingerprint the run's adapter_config.json records (None before the first save)."""
    try:
        cfg = json.loads((Path(run_dir) / "adapter_config.json").read_text())
        return (cfg.get("base_model") or {}).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------------
# TensorBoard


def _tb_writer(run_dir: Path, purge_step: Optional[int] = None):
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(run_dir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=10)


class _Tracker(Callback):
    """Training and validation records go to a tracker the same way: `_log(record)` at record["step"]."""

    def _log(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def on_log(self, record: dict) -> None:
        self._log(record)

    def on_eval(self, record: dict) -> None:
        self._log(record)


class TensorBoardTracker(_Tracker):
    """Event files in RUN/tensorboard: a scalar per record key at the record's step, the config and base model as
    text, loss.png as an image at the end. A resumed session purges the steps earlier sessions logged and replays
    metrics.jsonl up to the resumed step, so TensorBoard shows each step once."""

    def __init__(self, run_dir: PathLike):
        self.run_dir = Path(run_dir)
        self.writer = None
        self.step = 0

    def on_train_begin(self, info: Any) -> None:
        import yaml

        if not _info(info, "is_main", True):
            return  # the trainer calls callbacks on process 0 only; this guards other drivers
        start = int(_info(info, "start_step", 0) or 0)
        self.writer = _tb_writer(self.run_dir, purge_step=0)  # a killed session may not have flushed step 0
        config = plain(_info(info, "config") or {})
        self.writer.add_text("config", _code_block(yaml.safe_dump(config, sort_keys=False)), 0)
        for record in read_metrics(self.run_dir, -1, start) if start > 0 else []:
            self._log(record)

    def _log(self, record: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        if "event" in record:
            self.writer.add_text("event", _code_block(json.dumps(record, default=str)), step)
        self.step = max(self.step, step)

    def on_save(self, step: int, path: Any) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, result: Any) -> None:
        if self.writer is None:
            return
        fingerprint = base_fingerprint(self.run_dir)
        if fingerprint:
            self.writer.add_text("base_model_fingerprint", fingerprint, self.step)
        image = self.run_dir / LOSS_PLOT
        if image.is_file():
            from matplotlib.image import imread

            self.writer.add_image("loss_curve", imread(str(image)), self.step, dataformats="HWC")
        self.writer.close()
        self.writer = None


def _code_block(text: str) -> str:
    """Markdown (TensorBoard's text plugin) showing `text` verbatim."""
    return "\n".join("    " + line for line in text.splitlines())


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases


class WandbTracker(_Tracker):
    """A W&B run in RUN/wandb whose id (with each session's offline dir and last step) is kept in RUN/wandb.json,
    so a resumed training run continues the same W&B run without repeating a step (see the module docstring)."""

    def __init__(self, run_dir: PathLike, project: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run = None
        self.state: dict = {}
        self.floor = -1  # the last step already in W&B (step 0: the base model's validation)
        self.step = -1

    # -- the W&B run and RUN/wandb.json

    def start(self, config: Optional[dict], *, mode: str, job_type: Optional[str] = "train"):
        """Start a W&B run (mode "new"), continue the stored one after dropping the offline dirs of killed sessions
        (mode "resume": a resumed training run), or add to the stored one if any (mode "append": a report).
        Records the session in wandb.json."""
        import wandb

        state = read_wandb_state(self.run_dir) if mode != "new" else {}
        if state and mode == "resume":
            self.floor = _drop_unfinished(self.run_dir, state)
        new = not state
        state.setdefault("id", secrets.token_hex(4))
        state.setdefault("project", self.project)
        try:
            run = wandb.init(project=state["project"], dir=str(self.run_dir), id=state["id"], resume="allow",
                             name=self.run_dir.name, config=config, job_type=job_type if new else None,
                             settings=wandb.Settings(console="off"))
        except Exception as e:  # not logged in, unreachable server: one line with the way out
            reason = " ".join(str(e).split())[:200]
            raise MlxtuneError(f"W&B: {reason}; log in with `wandb login`, or set WANDB_MODE=offline and upload later "
                               f"with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`") from None
        self.run = run
        self.floor = max(self.floor, int(getattr(run, "starting_step", 0) or 0) - 1)
        self.step = self.floor
        state.setdefault("sessions", []).append(
            {"dir": _relative(run.settings.sync_dir, self.run_dir), "offline": bool(run.offline), "finished": False,
             "last_step": self.floor})
        self.state = state
        fsio.write_json(self.run_dir / WANDB_STATE, state)
        return run

    def finish(self) -> None:
        """Finish the W&B run (it flushes) and mark the session finished in wandb.json."""
        if self.run is None:
            return
        self.run.finish()
        self.run = None
        self.state["sessions"][-1].update(finished=True, last_step=self.step)
        fsio.write_json(self.run_dir / WANDB_STATE, self.state)

    # -- callbacks

    def on_train_begin(self, info: Any) -> None:
        if not _info(info, "is_main", True):
            return  # the trainer calls callbacks on process 0 only; this guards other drivers
        start = int(_info(info, "start_step", 0) or 0)
        run = self.start(plain(_info(info, "config") or {}), mode="resume" if start > 0 else "new")
        fingerprint = _info(info, "fingerprint") or base_fingerprint(self.run_dir)
        if fingerprint:
            run.summary["base_model_fingerprint"] = fingerprint
        for record in read_metrics(self.run_dir, self.floor, start) if start > self.floor else []:
            self._log(record)

    def _log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        if self.run is None or step <= self.floor:
            return  # already in W&B (a resumed run re-produces the steps after its checkpoint)
        if "event" in record:
            self.run.summary["event"] = str(record["event"])
        values = scalars(record)
        if values:
            self.run.log(values, step=step)
        self.step = max(self.step, step)

    def on_train_end(self, result: Any) -> None:
        if self.run is None:
            return
        import wandb

        fingerprint = base_fingerprint(self.run_dir)
        if fingerprint:
            self.run.summary["base_model_fingerprint"] = fingerprint
        image = self.run_dir / LOSS_PLOT
        if image.is_file() and self.step > self.floor:
            self.run.log({"loss_curve": wandb.Image(str(image))}, step=self.step)
        self.finish()


def read_wandb_state(run_dir: PathLike) -> dict:
    """RUN/wandb.json ({} when absent or unreadable): id, project, sessions [{dir, offline, finished, last_step}]."""
    try:
        state = json.loads((Path(run_dir) / WANDB_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and isinstance(state.get("id"), str) else {}


def _drop_unfinished(run_dir: Path, state: dict) -> int:
    """Delete the offline dirs of sessions that never finished (killed: they hold an unknown prefix of their
    records, which the resumed session replays); return the last step of the finished sessions."""
    kept = []
    for session in state.get("sessions", []):
        if session.get("finished"):
            kept.append(session)
            continue
        path = (run_dir / str(session.get("dir", ""))).resolve()
        wandb_dir = (run_dir / "wandb").resolve()
        if session.get("offline") and path.parent == wandb_dir and path.name.startswith("offline-run-"):
            shutil.rmtree(path, ignore_errors=True)
    state["sessions"] = kept
    return max((int(s.get("last_step", -1)) for s in kept), default=-1)


def _relative(path: PathLike, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


__all__ = ["check_trackers", "make_trackers", "log_eval_report", "TensorBoardTracker", "WandbTracker", "read_metrics",
           "read_wandb_state", "scalars", "eval_scalars", "last_step", "plain"]
