"""A 50 MB single-record JSONL trains with max_length 64 in bounded memory (issue 15: peak RSS under 1 GB).

    python benchmarks/bench_huge_record.py [--mb 50] [--max-length 64] [--steps 2]

Writes a tiny random model (tests/reliability_helpers.py: byte tokenizer, 2 layers) and two data files — one
record of `--mb` MB (a short user turn and a huge assistant reply) and one small record — then trains each in its
own subprocess (`mlxtune.train`, `--steps` steps, batch 1) and reports each child's peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, also sampled with psutil when installed). The difference is what
the huge record costs: reading one line, its JSON value, and the clipped text (data/encode.py: the record is cut
to 2 × max_length × the longest token before tokenizing and counted as truncated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, os, resource, sys, threading, time
peak = [0]
try:
    import psutil
    proc = psutil.Process()
    def sample():
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)
    threading.Thread(target=sample, daemon=True).start()
except ImportError:
    psutil = None
from mlxtune import train
cfg = json.loads(sys.argv[1])
t = time.perf_counter()
res = train(cfg, quiet=True)
secs = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ru_bytes = ru if sys.platform == "darwin" else ru * 1024
print(json.dumps({"ru_maxrss_mb": ru_bytes / 2**20, "psutil_peak_mb": peak[0] / 2**20 if psutil else None,
                  "train_s": secs}))
"""


def child(cfg: dict) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=False)
    if out.returncode != 0:
        sys.exit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def huge_record(path: Path, mb: float) -> int:
    """One messages record whose assistant reply is `mb` MB of words; returns the line's size in bytes."""
    n = int(mb * 2**20)
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit "
    reply = (words * (n // len(words) + 1))[:n]
    line = json.dumps({"messages": [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": reply}]})
    path.write_text(line + "\n")
    return len(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from reliability_helpers import make_small_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MLXTUNE_CACHE"] = str(tmp / "cache")
        model = make_small_model_dir(tmp / "model")
        results = {}
        for name in ("small", "huge"):
            data = tmp / name / "train.jsonl"
            data.parent.mkdir()
            size = huge_record(data, args.mb if name == "huge" else 0.001)
            cfg = {"model": {"path": str(model)}, "lora": {"rank": 4, "alpha": 8},
                   "data": {"train": str(data), "max_length": args.max_length, "val_split": 0},
                   "train": {"max_steps": args.steps, "batch_size": 1, "log_every": 1, "eval_every": 0, "save_every": 0},
                   "output_dir": str(tmp / f"run-{name}")}
            t = time.perf_counter()
            r = child(cfg)
            r.update(record_bytes=size, wall_s=time.perf_counter() - t)
            results[name] = r
            print(f"{name}: record {size / 2**20:.1f} MB, peak RSS {r['ru_maxrss_mb']:.0f} MB (ru_maxrss)"
                  + (f", {r['psutil_peak_mb']:.0f} MB (psutil)" if r["psutil_peak_mb"] else "")
                  + f", train() {r['train_s']:.1f} s, wall {r['wall_s']:.1f} s", flush=True)
        extra = results["huge"]["ru_maxrss_mb"] - results["small"]["ru_maxrss_mb"]
        print(f"the {args.mb:g} MB record costs {extra:.0f} MB of peak RSS; limit 1024 MB: "
              f"{'PASS' if results['huge']['ru_maxrss_mb'] < 1024 else 'FAIL'}")
        print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
