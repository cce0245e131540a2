"""Environment checks for `mlxtune doctor`: Python, MLX, backend, memory, BLAS speed, write access, extras.

`run_checks(output_dir)` returns one `Check` per item — status ok, warn or fail, what was found, and the fix
when it is not ok; the command prints them and exits 1 when any failed. Nothing here prints.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .memory import GB, available_memory, backend, device_info, format_bytes

OPENBLAS_FIX = ("apt-get install -y libopenblas0-pthread, then "
                "export LD_PRELOAD=$(dpkg -L libopenblas0-pthread | grep 'libopenblas.so.0$') before running mlxtune")
SLOW_BLAS_GFLOPS = 20.0
"Below this fp32 matmul throughput on the CPU backend, doctor warns (MLX's CPU wheel bundles a reference BLAS)."
LOW_MEMORY = 4 * GB
EXTRAS = (
    ("torch", "torch", "BERTScore and PEFT export tests", "pip install torch"),
    ("peft", "peft", "checking PEFT exports in transformers", "pip install peft"),
    ("gguf", "gguf", "GGUF K-quant reading and GGUF export", "pip install gguf"),
    ("bert-score", "bert_score", "BERTScore in mlxtune eval", "pip install 'mlxtune[bertscore]'"),
    ("pyarrow", "pyarrow", "Parquet data files", "pip install 'mlxtune[parquet]'"),
    ("matplotlib", "matplotlib", "loss.png and eval plots", "pip install 'mlxtune[plot]'"),
)
"Optional packages: (distribution, module, what needs it, how to install)."
DIR_FIXES = {
    "output dir": "choose a writable output_dir (config) or run from a writable directory",
    "hub cache": "set HF_HOME (or HF_HUB_CACHE) to a writable directory",
    "data cache": "set MLXTUNE_CACHE to a writable directory",
}


@dataclass
class Check:
    """One line of the report."""

    status: str
    "ok, warn or fail."
    name: str
    detail: str
    fix: str = ""
    "What to do about it (shown when the status is not ok)."


def blas_gflops(n: int = 512, repeats: int = 3) -> float:
    """fp32 matmul throughput on the default device, GFLOP/s (best of `repeats`)."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def writable(path: Path) -> tuple[bool, str]:
    """(can we create files under `path`, creating it if needed; why not). Checked by writing a temp file."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return False, f"{probe} is a file, not a directory"
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".mlxtune-doctor-"):
            pass
        return True, ""
    except OSError as e:
        return False, f"{e.strerror or e}"


def _python_and_mlx() -> tuple[list[Check], bool]:
    """The python, mlx and backend checks, and whether mlx imports at all."""
    v = sys.version_info
    checks = [Check("ok" if v >= (3, 10) else "fail", "python", f"{platform.python_version()} ({sys.executable})",
                    "use Python 3.10 or newer")]
    from importlib.metadata import PackageNotFoundError, version

    try:
        import mlx.core as mx
    except Exception as e:  # pragma: no cover - mlxtune imports mlx everywhere
        return checks + [Check("fail", "mlx", f"cannot import mlx ({e})", "pip install 'mlxtune[cpu]' (Linux CPU), "
                               "'mlxtune[cuda]' (NVIDIA) or mlxtune (macOS)")], False
    try:
        lm = version("mlx-lm")
    except PackageNotFoundError:
        lm = "missing"
    checks.append(Check("ok" if lm != "missing" else "fail", "mlx", f"mlx {getattr(mx, '__version__', '?')}, "
                        f"mlx-lm {lm}", "pip install mlx-lm"))
    info = device_info()
    name = info.get("device_name") or info.get("architecture") or ""
    checks.append(Check("ok", "backend", f"{backend()} ({name})".replace(" ()", "")))
    return checks, True


def _memory() -> Check:
    budget, where = available_memory()
    try:
        import psutil

        total = psutil.virtual_memory().total
        mem = f"{format_bytes(budget)} {where}; {format_bytes(total)} RAM in total" if budget else \
            f"{format_bytes(total)} RAM in total"
    except Exception:
        mem = f"{format_bytes(budget)} {where}" if budget else where
    if budget is None:
        return Check("warn", "memory", mem, "pip install psutil")
    if budget < LOW_MEMORY:
        return Check("warn", "memory", mem, "close other programs; train with model.quantize: {bits: 4}, "
                     "train.grad_checkpoint: true and a smaller train.batch_size (`mlxtune estimate` shows the need)")
    return Check("ok", "memory", mem)


def _blas() -> Check:
    g = blas_gflops()
    preload = os.environ.get("LD_PRELOAD", "")
    note = f"fp32 matmul {g:.1f} GFLOP/s" + (" (OpenBLAS preloaded)" if "openblas" in preload.lower() else "")
    if g >= SLOW_BLAS_GFLOPS:
        return Check("ok", "blas", note)
    if sys.platform.startswith("linux"):
        return Check("warn", "blas", note + "; MLX's CPU wheel bundles a slow reference BLAS", OPENBLAS_FIX)
    return Check("warn", "blas", note + "; CPU training will be slow", "train on a GPU (Metal or CUDA)")


def _directories(output_dir: Optional[str]) -> list[Check]:
    from .data import cache_dir

    try:
        from huggingface_hub import constants

        hf_cache, offline = Path(constants.HF_HUB_CACHE), bool(constants.HF_HUB_OFFLINE)
    except Exception:
        hf_cache, offline = Path.home() / ".cache" / "huggingface" / "hub", False
    checks = []
    for label, d in (("output dir", Path(output_dir or "runs")), ("hub cache", hf_cache), ("data cache", cache_dir())):
        ok, why = writable(d)
        checks.append(Check("ok" if ok else "fail", label, f"{d} {'writable' if ok else 'not writable: ' + why}",
                            DIR_FIXES[label]))
    if offline:
        checks.append(Check("warn", "hub", "HF_HUB_OFFLINE=1: hub ids resolve only from the local cache",
                            "unset HF_HUB_OFFLINE to download, or pass local model dirs"))
    return checks


def _extras() -> list[Check]:
    from importlib.metadata import PackageNotFoundError, version

    checks = []
    for dist, module, what, fix in EXTRAS:
        if importlib.util.find_spec(module) is None:
            checks.append(Check("warn", dist, f"not installed (optional: {what})", fix))
            continue
        try:
            ver = version(dist)
        except PackageNotFoundError:
            ver = "?"
        checks.append(Check("ok", dist, f"{ver} ({what})"))
    return checks


def run_checks(output_dir: Optional[str] = None, blas: bool = True) -> list[Check]:
    """Every check, in report order; `output_dir` is where runs go (default runs/), `blas` times a matmul."""
    checks, has_mlx = _python_and_mlx()
    if not has_mlx:
        return checks
    checks.append(_memory())
    if blas and backend() == "cpu":
        checks.append(_blas())
    return checks + _directories(output_dir) + _extras()
