"""Where does peak memory go on the GPU? The same training step under different evaluation pacing.

MLX's GPU backends keep every input of an encoded operation alive until the GPU has finished the command
buffer / graph holding it, and the host may run ahead of the GPU by up to 10 committed buffers (of
MLX_MAX_OPS_PER_BUFFER operations each, 20 on CUDA) unless active memory exceeds `mx.set_memory_limit`, in
which case evaluation waits for the GPU. So a step's measured peak is its *live set* (what the graph needs
when operations run one at a time) plus whatever the run-ahead keeps alive. This script measures both, one
process per variant (the environment knobs are read once per process):

  limit=default   MLX's own pacing (memory limit 0.8 x device memory on CUDA)
  limit=sync      memory limit 0: every operation waits for the previous one -> the peak is the live set
  limit=<GB>      memory limit at that many GB: the host waits whenever active memory is above it
  ops=<n>         MLX_MAX_OPS_PER_BUFFER=n (fewer operations per in-flight buffer)

    python benchmarks/profile_memory.py --matrix ckpt      # GPU, see NOTES.md (also: big, live)
    python benchmarks/profile_memory.py --tiny --matrix ckpt   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CASES = {  # name: (B, L, ckpt, bits, quantize_embedding)
    "dense": (4, 512, False, None, True),
    "dense-ckpt": (4, 512, True, None, True),
    "b1-ckpt": (1, 512, True, None, True),
    "long": (1, 8192, True, None, True),
    "qlora": (1, 512, True, 4, True),
    "qlora-dense-embed": (1, 512, True, 4, False),
}

MATRICES = {
    "ckpt": [
        ("dense-ckpt", "mlxtune", "default", None), ("dense-ckpt", "mlxtune", "sync", None),
        ("dense-ckpt", "mlxtune", 10.0, None), ("dense-ckpt", "mlxtune", "default", 5),
        ("dense-ckpt", "mlx-lm", "default", None), ("dense-ckpt", "mlx-lm", "sync", None),
        ("b1-ckpt", "mlxtune", "default", None), ("b1-ckpt", "mlxtune", "sync", None), ("b1-ckpt", "mlxtune", 7.0, None),
        ("qlora", "mlxtune", "default", None), ("qlora", "mlxtune", "sync", None),
        ("qlora-dense-embed", "mlxtune", "sync", None), ("qlora", "mlxtune", 2.9, None),
    ],
    "live": [(c, "mlxtune", "sync", None) for c in ("b1-ckpt", "qlora", "dense-ckpt", "long", "dense")],
    "big": [
        ("long", "mlxtune", "default", None), ("long", "mlxtune", "sync", None), ("long", "mlxtune", 13.5, None),
        ("dense", "mlxtune", "default", None), ("dense", "mlxtune", "sync", None), ("dense", "mlxtune", 13.5, None),
        ("dense", "mlx-lm", "default", None), ("dense", "mlx-lm", "sync", None),
    ],
}


def child(spec: dict) -> dict:
    import mlx.core as mx

    sys.path.insert(0, str(HERE))
    import bench_train as bt

    B, L, ckpt, bits, qemb = CASES[spec["case"]]
    tiny = spec.get("tiny", False)
    cfg, dtype = (bt.TINY, mx.float32) if tiny else (bt.LLAMA_3B, mx.bfloat16)
    if tiny:
        B, L = min(B, 2), min(L, 256)
    limit = spec["limit"]
    if limit == "sync":
        mx.set_memory_limit(0)
    elif limit != "default":
        mx.set_memory_limit(int(float(limit) * 1e9))
    steps = 2 if limit == "sync" else 4
    r = bt.dense_row(spec["impl"], cfg, B, L, ckpt, dtype, quantize=bits, warmup=2, steps=steps, quantize_embedding=qemb)
    r.update(spec, B=B, L=L, ckpt=ckpt)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", choices=sorted(MATRICES), help="run a list of variants, one process each")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=os.environ.get("OUT", "") and os.path.join(os.environ["OUT"], "profile_memory.json"))
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    results = []
    for case, impl, limit, ops in MATRICES[args.matrix]:
        spec = {"case": case, "impl": impl, "limit": limit, "ops": ops, "tiny": args.tiny}
        env = dict(os.environ)
        if ops:
            env["MLX_MAX_OPS_PER_BUFFER"] = str(ops)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else dict(spec, error=(p.stderr or p.stdout).strip().splitlines()[-1:])
        r["wall_s"] = round(time.perf_counter() - t, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: list[dict]) -> str:
    lines = ["| case | impl | pacing | tok/s | peak GB | peak - live set GB |", "|---|---|---|---:|---:|---:|"]
    live = {(r["case"], r["impl"]): r["peak_gb"] for r in results if r.get("limit") == "sync" and "peak_gb" in r}
    for r in results:
        if "peak_gb" not in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['limit']} | error: {r.get('error')} | | |")
            continue
        pacing = f"limit {r['limit']}" + (f", {r['ops']} ops/buffer" if r.get("ops") else "")
        ls = live.get((r["case"], r["impl"]))
        excess = "" if ls is None else f"{r['peak_gb'] - ls:+.2f}"
        lines.append(f"| {r['case']} | {r['impl']} | {pacing} | {r['tok_s']:,.0f} | {r['peak_gb']:.2f} | {excess} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
