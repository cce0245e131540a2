"""Reporting from the training loop: a small callback interface, its null object, and the built-in reporters.

The loop (trainer.py) holds no logging code: it builds a record and hands it to its `CallbackList`.

    on_train_begin(info)   once, before the first step: a `RunInfo` (run dir, schedule, resolved config)
    on_log(record)         a training report every train.log_every steps (and at the last step), and the
                           events that end a run early: {"step": 5, "event": "early_stop" | "interrupted", ...}
    on_eval(record)        a validation result: {"step", "val_loss", "val_ppl", "val_tokens", "val_<metric>"...};
                           a fresh run with validation data starts with step 0 (the base model, before any update)
    on_save(step, path)    a checkpoint landed in `path` (checkpoints/step_NNNNNN)
    on_train_end(result)   once, after the final adapter is written: the trainer's TrainResult

The records are exactly the lines of `metrics.jsonl` (each callback gets its own copy). A training report holds
step, epoch, train_loss, lr, grad_norm, tokens_per_sec (input tokens, prompts included), trained_tokens_per_sec
and trained_tokens (target tokens), peak_memory_gb and rss_gb. In a data-parallel run only process 0 runs
callbacks; the numbers are already summed over the processes.

Built-ins, always on process 0: `MetricsWriter` (metrics.jsonl; on resume the records after the checkpoint's step
are dropped, they are produced again), `LossPlot` (loss.png at the end: raw and smoothed
training loss, validation from the base model's step-0 record on) and, unless quiet, `ConsoleProgress`
(one line per report and evaluation with an ETA; a tqdm bar on an interactive terminal). Trackers (W&B,
TensorBoard) subclass `Callback` and are passed as `train(config, callbacks=[...])`; `info.request_stop()` asks
the trainer to stop as Ctrl-C does (`StopFlag`): finish the step, write a checkpoint, return with `interrupted=True`.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import mlx.core as mx

from . import fsio


@dataclass
class RunInfo:
    """What `on_train_begin` receives: where the run writes and what it is about to do."""

    run_dir: Path
    total_steps: int
    "The length of the schedule, in optimizer steps."
    start_step: int
    "0 for a fresh run; the checkpoint's step when resuming."
    resumed_from: Optional[Path]
    config: dict
    "The resolved config (Config.to_dict()), as config.yaml holds it."
    world_size: int
    examples: int
    "Training examples."
    micro_batches: int
    "Micro-batches per epoch."
    layout: str
    "packed or length-bucketed."
    padding: float
    "The fraction of computed positions that are padding."
    fingerprint: Optional[str] = None
    "The base model's fingerprint (as adapter_config.json records it)."
    request_stop: Callable[[], None] = field(default=lambda: None, repr=False)
    "Stop as Ctrl-C does: finish the current step, checkpoint, end with interrupted=True."


class Callback:
    """Subclass and override what you need; every method is a no-op here."""

    def on_train_begin(self, info: RunInfo) -> None:
        pass

    def on_log(self, record: dict) -> None:
        pass

    def on_eval(self, record: dict) -> None:
        pass

    def on_save(self, step: int, path: Path) -> None:
        pass

    def on_train_end(self, result: Any) -> None:
        pass


class CallbackList(Callback):
    """Calls each callback in order, each with its own copy of the record; empty, it does nothing (the null object)."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_train_begin(self, info: RunInfo) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(info)

    def on_log(self, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_log(dict(record))

    def on_eval(self, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_eval(dict(record))

    def on_save(self, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_save(step, path)

    def on_train_end(self, result: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_end(result)


class Stopped(KeyboardInterrupt):
    """A signal that ends the process at once (a second Ctrl-C / SIGTERM / SIGHUP, or one before training
    started); `exit_code` is 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + int(signum)


def _stop_signals() -> list:
    """SIGINT, SIGTERM and SIGHUP where the platform has them (Windows has no SIGHUP)."""
    return [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise `Stopped` as Ctrl-C raises KeyboardInterrupt, so that `finally` blocks and
    the atomic writers' cleanup run (the default action would kill the process mid-write). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    prev = {sig: signal.signal(sig, handler) for sig in _stop_signals() if sig != signal.SIGINT}
    try:
        yield
    finally:
        for sig, old in prev.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


class StopFlag:
    """Ctrl-C, SIGTERM and SIGHUP alike. While `graceful` (the training loop): the first one (or a callback's
    request_stop) finishes the current step, writes a checkpoint and ends the run (exit 128 + the signal: 130,
    143, 129); a second one raises `Stopped` at once (checkpoints are atomic dir swaps: nothing is corrupted).
    Before the loop (loading, checks) the first one raises `Stopped` at once."""

    def __init__(self):
        self.stop = False
        self.signum: Optional[int] = None
        self.graceful = False
        self._prev: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _stop_signals():
                self._prev[sig] = signal.signal(sig, self._handler)
        return self

    def request(self) -> None:
        self.stop = True

    def _handler(self, signum, frame):
        if self.signum is not None or not self.graceful:
            raise Stopped(signum)
        self.stop, self.signum = True, signum
        name = signal.Signals(signum).name
        print(f"\ninterrupt ({name}): finishing this step, writing a checkpoint (signal again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


def peak_memory_gb() -> float:
    """MLX's peak memory since the trainer reset it (after loading), in GB."""
    return mx.get_peak_memory() / 1e9


def rss_gb() -> float:
    """The process's resident memory, in GB."""
    import psutil

    return psutil.Process().memory_info().rss / 1e9


# --------------------------------------------------------------------------------------------------------------
# metrics.jsonl and loss.png


class MetricsWriter(Callback):
    """Appends each record to metrics.jsonl as one JSON line; starts it afresh, or cut at the resume step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, info: RunInfo) -> None:
        if info.resumed_from is not None:
            truncate_metrics(self.path, info.start_step)
        elif self.path.exists():
            self.path.unlink()

    def on_log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    on_eval = on_log


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop the records written after `max_step` (a resumed run produces them again); replaced atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    fsio.write_bytes(path, "".join(line + "\n" for line in keep))


class LossPlot(Callback):
    """loss.png at the end of the run, from metrics.jsonl."""

    def __init__(self, metrics: Path, out: Path):
        self.metrics, self.out = Path(metrics), Path(out)

    def on_train_end(self, result: Any) -> None:
        plot_loss(self.metrics, self.out)


def smooth(values: Sequence[float], half_window: Optional[int] = None) -> list[float]:
    """A centered moving average: point i is the mean of values[i-h : i+h+1], the window cut at both ends (so
    the curve neither lags like an EMA nor bends towards a padding value). h defaults to len(values) // 20
    (at least 1): a window of about a tenth of the run."""
    n = len(values)
    h = smoothing_half_window(n) if half_window is None else max(0, int(half_window))
    total = [0.0]
    for v in values:
        total.append(total[-1] + float(v))
    return [(total[min(n, i + h + 1)] - total[max(0, i - h)]) / (min(n, i + h + 1) - max(0, i - h)) for i in range(n)]


def smoothing_half_window(n: int) -> int:
    """The moving average's half width for `n` reports: n // 20, at least 1."""
    return max(1, n // 20)


def read_curves(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train_loss) per training report and (step, val_loss) per validation, from metrics.jsonl (a line
    torn by a kill is skipped)."""
    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            continue
        if "train_loss" in r:
            train.append((r["step"], r["train_loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    return train, val


def plot_loss(metrics_path: Path, out: Path) -> Optional[Path]:
    """loss.png: the training loss per report (faint) with its centered moving average (`smooth`) over it, and the
    validation loss per evaluation, its step-0 point (the base model, before any update) marked and labelled, and
    a dotted line at the base's level; None when there is nothing to plot."""
    if not Path(metrics_path).is_file():
        return None
    train, val = read_curves(metrics_path)
    if not train and not val:
        return None
    # A standalone Figure (no pyplot): never switches the process's backend, so inline plots in a notebook survive.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        raw = ax.plot(steps, losses, lw=1, alpha=0.35, label="train (per report)")[0]
        if len(train) >= 3:
            h = smoothing_half_window(len(train))
            ax.plot(steps, smooth(losses, h), lw=2, color=raw.get_color(),
                    label=f"train (centered moving average of {2 * h + 1} reports)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation")
        base = [v for s, v in val if s == 0]
        if base:
            ax.axhline(base[0], ls=":", lw=1, color="tab:orange", alpha=0.7)
            ax.plot([0], base, "*", ms=14, color="tab:red", label=f"base model (step 0): {base[0]:.4f}", zorder=3)
        if base or len(val) > 1:
            ax.annotate(f"{val[-1][1]:.4f}", val[-1], textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fsio.atomic_file(out, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return out


# --------------------------------------------------------------------------------------------------------------
# The console


class ConsoleProgress(Callback):
    """The run's opening line, one line per report / evaluation / event with an ETA; a tqdm bar on a terminal."""

    def __init__(self):
        self.bar = None
        self.info: Optional[RunInfo] = None
        self.t0 = 0.0

    def on_train_begin(self, info: RunInfo) -> None:
        self.info, self.t0 = info, time.perf_counter()
        train = info.config.get("train", {})
        what = f"resuming from {info.resumed_from}" if info.resumed_from else "training"
        k = train.get("grad_accumulation", 1)
        self._print(f"{what}: {info.examples} examples in {info.micro_batches} {info.layout} micro-batches "
                    f"({info.padding:.1%} padding), {info.total_steps} steps x {k} accumulation"
                    + (f" over {info.world_size} processes" if info.world_size > 1 else "") + f"; run dir {info.run_dir}")
        if train.get("memory_limit_gb") is not None:
            self._print(f"memory limit: {float(train['memory_limit_gb'])} GB (MLX evaluation waits for the device when "
                        f"active memory exceeds it)")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=info.total_steps, initial=info.start_step, unit="step", dynamic_ncols=True, leave=False)

    def on_log(self, record: dict) -> None:
        step, info = record["step"], self.info
        if "train_loss" in record:
            self._print(f"step {step}/{info.total_steps} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
                        f"{record['tokens_per_sec']:,.0f} tok/s | trained {int(record['trained_tokens']):,} tok | "
                        f"peak {record['peak_memory_gb']:.2f} GB | rss {record['rss_gb']:.2f} GB | eta {self.eta(step)}")
        elif record.get("event") == "early_stop":
            self._print(f"early stopping at step {step}: {record['metric']} has not improved for {record['patience']} "
                        f"evaluations (best {record['best']:.4f} at step {record['best_step']}, kept in "
                        f"{info.run_dir / 'best'})")
        elif record.get("event") == "interrupted":
            self._print(f"interrupted at step {step}; checkpoint in {record['checkpoint']}; continue with --resume")
        self._advance(step)

    def on_eval(self, record: dict) -> None:
        where = "step 0 (the base model, before training)" if record["step"] == 0 else f"step {record['step']}"
        line = f"{where}: val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.3f}"
        extra = [f"{k[4:]} {v:.4f}" for k, v in record.items()
                 if k.startswith("val_") and k not in ("val_loss", "val_ppl", "val_tokens", "val_n_examples")]
        self._print(line + "".join(" | " + e for e in extra))

    def on_train_end(self, result: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def eta(self, step: int) -> str:
        """The time left at this step's pace since the run (or the resume) began, h:mm:ss."""
        done = step - self.info.start_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.t0) / done * (self.info.total_steps - step)
        m, s = divmod(int(left), 60)
        h, m = divmod(m, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()


def default_callbacks(run_dir: Path, *, quiet: bool = False) -> list[Callback]:
    """What every run reports through on process 0: metrics.jsonl, loss.png and (unless quiet) the console."""
    run_dir = Path(run_dir)
    out: list[Callback] = [MetricsWriter(run_dir / "metrics.jsonl"), LossPlot(run_dir / "metrics.jsonl", run_dir / "loss.png")]
    return out if quiet else out + [ConsoleProgress()]
