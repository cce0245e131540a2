"""Probe: how much of a training step is per-step overhead (operations launched) and how much is per-token work?

For mlxtune's and mlx-lm's compiled steps on the Llama-3.2-3B shape (checkpointing on), times steps over a range
of token counts and fits time = fixed + per_token x tokens; counts the primitives in one step's graph (the
graph MLX launches, read from `mx.export_to_dot` before evaluation); and times the host side alone (the call
plus `mx.async_eval` returning, while the GPU may still run).

    python benchmarks/probe_overhead.py           # GPU
    python benchmarks/probe_overhead.py --tiny    # CPU smoke run
"""

from __future__ import annotations

import collections
import io
import json
import re
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402


def count_ops(outputs) -> collections.Counter:
    f = io.StringIO()
    mx.export_to_dot(f, *outputs)
    return collections.Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', f.getvalue()))


def measure(run, state_of, shapes, vocab, reps):
    rng = np.random.default_rng(0)
    rows = []
    for B, L in shapes:
        xs = [mx.array(rng.integers(0, vocab, (B, L + 1)).astype(np.int32)) for _ in range(reps + 2)]
        for x in xs[:2]:
            mx.eval(state_of(run(x)))
        host = total = 0.0
        for x in xs[2:]:
            t0 = time.perf_counter()
            outs = state_of(run(x))
            mx.async_eval(outs)
            t1 = time.perf_counter()
            mx.eval(outs)
            t2 = time.perf_counter()
            host += t1 - t0
            total += t2 - t0
        rows.append({"B": B, "L": L, "tokens": B * L, "step_ms": 1e3 * total / reps, "host_ms": 1e3 * host / reps})
    return rows


def fit(rows):
    t = np.array([r["tokens"] for r in rows], float)
    y = np.array([r["step_ms"] for r in rows], float)
    per_token, fixed = np.polyfit(t, y, 1)
    return {"fixed_ms": round(float(fixed), 2), "us_per_token": round(float(per_token) * 1e3, 3)}


def main():
    tiny = "--tiny" in sys.argv
    cfg, dtype = (bt.TINY, mx.float32) if tiny else (bt.LLAMA_3B, mx.bfloat16)
    V = cfg["vocab_size"]
    shapes = [(1, 64), (1, 256), (1, 512), (2, 512), (4, 512)] if not tiny else [(1, 16), (1, 64), (2, 64)]
    reps = 3 if tiny else 6
    out = {}

    model = bt.build_mlxtune(cfg, dtype, None, True)
    st = bt.mlxtune_step(model)
    state = lambda _: [v for _, v in tree_flatten(st.state) if isinstance(v, mx.array)]  # noqa: E731
    for update in (True, False):
        name = "mlxtune " + ("micro+update" if update else "micro only")
        run = lambda x, u=update: st.micro(x[:, :-1], x[:, 1:], mx.ones(x[:, 1:].shape), update=u)  # noqa: E731
        x = mx.array(np.zeros((1, 65), np.int32))
        ops = count_ops(list(run(x)) + state(None))
        mx.eval(state(None))
        rows = measure(run, state, shapes, V, reps)
        out[name] = {"ops": sum(ops.values()), "top_ops": ops.most_common(12), "rows": rows, "fit": fit(rows)}
        print(json.dumps({name: out[name]}), flush=True)
    t0 = time.perf_counter()
    for _ in range(5):
        mx.eval(st.update())
    out["mlxtune update alone"] = {"step_ms": 1e3 * (time.perf_counter() - t0) / 5}
    print(json.dumps({"mlxtune update alone": out["mlxtune update alone"]}), flush=True)
    del model, st
    bt.reset_memory()

    model = bt.build_mlx_lm(cfg, dtype, None, True)
    peer = bt.MlxLmStep(model)
    pstate = lambda r: [v for _, v in tree_flatten(peer.state) if isinstance(v, mx.array)] + [a for a in r if isinstance(a, mx.array)]  # noqa: E731

    def prun(x):
        lengths = mx.array([[0, x.shape[1] - 1]] * x.shape[0])
        lv, toks, peer.grad = peer.step(x, lengths, peer.grad, True)
        return [lv, toks]

    x = mx.array(np.zeros((1, 65), np.int32))
    ops = count_ops(prun(x) + [v for _, v in tree_flatten(peer.state) if isinstance(v, mx.array)])
    mx.eval(peer.state)
    rows = measure(prun, pstate, shapes, V, reps)
    out["mlx-lm step"] = {"ops": sum(ops.values()), "top_ops": ops.most_common(12), "rows": rows, "fit": fit(rows)}
    print(json.dumps({"mlx-lm step": out["mlx-lm step"]}), flush=True)
    import os

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_overhead.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
