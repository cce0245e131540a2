"""Reporting: metrics.jsonl, one-line reports, a progress bar with ETA, memory (mx peak + process RSS), loss.png."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


class Monitor:
    """Writes metrics.jsonl and prints reports; shows a tqdm bar on an interactive terminal."""

    def __init__(self, metrics_path: Optional[Path], total_steps: int, start_step: int = 0, quiet: bool = False,
                 is_main: bool = True):
        self.path = metrics_path if is_main else None
        self.quiet = quiet or not is_main
        self.total = total_steps
        self.start = time.perf_counter()
        self.start_step = start_step
        self.bar = None
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def log(self, record: dict, line: Optional[str] = None) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if line and not self.quiet:
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def advance(self, step: int, postfix: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.start) / done * (self.total - step)
        m, s = divmod(int(left), 60)
        h, m = divmod(m, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def truncate_metrics(path: Path, max_step: int) -> None:
    """On resume: drop records written after the checkpoint's step (they will be produced again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    tmp = path.with_name(f".{path.name}.tmp")  # replaced atomically: a kill here must not lose the earlier records
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def plot_loss(metrics_path: Path, out: Path) -> Optional[Path]:
    """loss.png: training loss per report and validation loss per evaluation."""
    if not metrics_path.is_file():
        return None
    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train_loss" in r:
            train.append((r["step"], r["train_loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    if not train and not val:
        return None
    # A standalone Figure (no pyplot): never switches the process's backend, so inline plots in a notebook survive.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(".loss.png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(out)
    return out
