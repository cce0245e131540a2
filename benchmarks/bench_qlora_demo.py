"""QLoRA on the demo, measured: the same short LoRA run on SmolLM2-135M-Instruct with a float32 base and with the
base quantized at load (`model.quantize: {bits: 4, group_size: 64}`, optionally 8-bit), reporting for each the
training peak memory, RSS, held-out loss before -> after, loss on the trained batches before -> after, and tokens/s.

    LD_PRELOAD=$(bash tools/openblas.sh --path) .venv/bin/python benchmarks/bench_qlora_demo.py --write

Each variant runs in its own process (so peak memory and RSS are its own) through `mlxtune.train` with the demo
config (configs/demo.yaml: the GGUF, data/alpaca_seed, the chat template, packing, LoRA rank 16 on all 7
projections) and identical overrides. In that process:
  1. load the base (quantized or not) and score, in eval mode, the first `--eval-batches` validation batches and the
     `--steps` training batches the run will take (the trainer's own batches: same split, packing, order);
  2. free it and run `mlxtune.train` (which reloads the base; its `peak_memory_gb` is reset after loading, so it is
     the training peak: weights + activations + gradients + optimizer state);
  3. load base + the saved adapter and score the trained batches again. Held-out "after" is the trainer's final
     validation, which is the same function (trainer.evaluate_loss) on the same first `--eval-batches` batches.

MLX's CPU quantized matmul is slow (a 4-bit forward of 128 tokens takes ~20x the float32 one on a 2-core x86 CPU),
so the defaults are small: 4 steps of one packed row of 64 tokens. On Apple silicon or CUDA the quantized kernels
are fast; raise --steps / --max-length there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
GGUF = ROOT / ".assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT / "data" / "alpaca_seed"
VARIANTS = {
    "f32": ("float32 base", None),
    "q4": ("4-bit base (QLoRA)", {"bits": 4, "group_size": 64}),
    "q8": ("8-bit base (QLoRA)", {"bits": 8, "group_size": 64}),
}


def make_config(args, quantize, out_dir: str):
    import mlxtune

    return mlxtune.load_config(
        ROOT / "configs" / "demo.yaml",
        model={"path": str(GGUF), "dtype": "float32", "quantize": quantize},
        lora={"dropout": args.dropout},
        data={"train": str(DATA), "max_length": args.max_length},
        train={"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "warmup_ratio": 0.0,
               "eval_every": 0, "eval_batches": args.eval_batches, "save_every": 0, "log_every": 1},
        output_dir=out_dir,
    )


def run_variant(name: str, args) -> dict:
    """Steps 1-3 of the module docstring for one variant, in this process."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mlxtune
    from mlxtune import data as batching, loading
    from mlxtune.tokenizer import pad_id as tokenizer_pad_id
    from mlxtune.data import load_splits
    from mlxtune.trainer import evaluate_loss

    quantize = VARIANTS[name][1]
    tmp = tempfile.mkdtemp(prefix=f"bench_qlora_{name}_")
    cfg = make_config(args, quantize, str(Path(tmp) / "run"))
    tc, dc = cfg.train, cfg.data

    t0 = time.perf_counter()
    model, tok = loading.load(GGUF, dtype="float32", quantize=quantize)
    load_s = time.perf_counter() - t0
    weights_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
    # The trainer's batches, built as trainer.train builds them.
    splits = load_splits(dc, tok, tc.seed)
    pad_id = tokenizer_pad_id(tok)
    aw = batching.attention_weight(model.args)
    train_b = batching.make_batches(splits.train, tc.batch_size, dc.max_length, dc.packing, pad_id, attention_weight=aw)
    valid_b = batching.make_batches(splits.valid, tc.batch_size, dc.max_length, dc.packing, pad_id, attention_weight=aw)
    valid_b = valid_b[: tc.eval_batches]
    if tc.max_steps > len(train_b):
        raise SystemExit(f"--steps {tc.max_steps} is more than one epoch ({len(train_b)} batches)")
    seen = [train_b[i] for i in batching.epoch_order(len(train_b), tc.seed, 0, dc.shuffle)[: tc.max_steps]]
    t0 = time.perf_counter()
    before_valid, before_seen = evaluate_loss(model, valid_b), evaluate_loss(model, seen)
    eval_s = time.perf_counter() - t0
    del model
    gc.collect()
    mx.clear_cache()

    t0 = time.perf_counter()
    result = mlxtune.train(cfg, quiet=not args.verbose)
    train_s = time.perf_counter() - t0
    recs = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "train_loss" in r]
    vals = [r for r in recs if "val_loss" in r]

    tuned, _ = loading.load(GGUF, dtype="float32", quantize=quantize, adapter=result.run_dir)
    after_seen = evaluate_loss(tuned, seen)
    after_valid = {"loss": vals[-1]["val_loss"], "n_tokens": vals[-1]["val_tokens"]}
    assert after_valid["n_tokens"] == before_valid["n_tokens"], (after_valid, before_valid)
    del tuned
    shutil.rmtree(tmp, ignore_errors=True)

    # Throughput from the per-step records (log_every 1): dt = trained tokens / trained tok/s, seen = tok/s * dt.
    prev, dts, toks = 0.0, [], []
    for r in steps:
        n = r["trained_tokens"] - prev
        prev = r["trained_tokens"]
        dt = n / r["trained_tokens_per_sec"] if r["trained_tokens_per_sec"] > 0 else float("nan")
        dts.append(dt)
        toks.append(r["tokens_per_sec"] * dt)
    steady = slice(1, None) if len(steps) > 1 else slice(None)  # step 1 includes compiling the step
    return {
        "variant": name,
        "label": VARIANTS[name][0],
        "quantize": quantize,
        "weights_gb": weights_gb,
        "peak_gb": max(r["peak_memory_gb"] for r in steps),
        "rss_gb": max(r["rss_gb"] for r in steps),
        "process_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "valid_before": before_valid["loss"],
        "valid_after": after_valid["loss"],
        "valid_tokens": before_valid["n_tokens"],
        "seen_before": before_seen["loss"],
        "seen_after": after_seen["loss"],
        "seen_tokens": before_seen["n_tokens"],
        "train_losses": [r["train_loss"] for r in steps],
        "tokens_per_sec": sum(toks[steady]) / sum(dts[steady]),
        "first_step_s": dts[0],
        "step_s": sum(dts[steady]) / len(dts[steady]),
        "tokens_per_step": sum(toks) / len(toks),
        "train_s": train_s,
        "load_s": load_s,
        "eval_before_s": eval_s,
        "n_train_batches": len(train_b),
    }


def table(rows: list[dict]) -> str:
    out = ["| base | weights (GB) | training peak, MLX (GB) | RSS while training (GB) | held-out loss before → after "
           "| trained batches' loss before → after | tokens/s (steady) | s / step |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['weights_gb']:.3f} | {r['peak_gb']:.3f} | {r['rss_gb']:.2f} | "
                   f"{r['valid_before']:.4f} → {r['valid_after']:.4f} | {r['seen_before']:.4f} → {r['seen_after']:.4f} | "
                   f"{r['tokens_per_sec']:.1f} | {r['step_s']:.1f} |")
    return "\n".join(out)


def section(rows: list[dict], args, cmd: str, wall_s: float) -> str:
    import mlx.core as mx

    r0 = rows[0]
    preload = "openblas" in os.environ.get("LD_PRELOAD", "")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## bench_qlora_demo.py — QLoRA on the demo: float32 base vs a base quantized at load",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (shared; 1-min load average "
        f"{load:.1f} at the end), MLX {mx.__version__} CPU, OpenBLAS preloaded: {preload}. Total wall time {wall_s / 60:.1f} min.",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32, then quantized again for the QLoRA rows with group size "
        f"64: every linear and the tied embedding/output), configs/demo.yaml (chat template, packing, LoRA rank 16 / alpha "
        f"32 on all 7 projections of the 30 layers) with identical overrides: {args.steps} steps of batch {args.batch_size} x "
        f"max_length {args.max_length} (packed rows), peak learning rate {args.lr:g} with the demo's cosine decay and no warmup, "
        f"LoRA dropout {args.dropout:g}, seed 0. Held-out: the first {args.eval_batches} validation batches "
        f"({r0['valid_tokens']:.0f} response tokens); trained batches: the {args.steps} batches the run trained on "
        f"({r0['seen_tokens']:.0f} response tokens), before = the base, after = base + the saved adapter, both in eval mode. "
        "Training peak = `mx.get_peak_memory()` reset after loading (weights + activations + gradients + AdamW state); "
        "RSS = the process's resident set while training (max over steps). tokens/s counts every non-padding token "
        "(prompt and response), steps after the first.",
        "",
        table(rows),
        "",
        "Training losses per step (each step is a different batch): "
        + "; ".join(f"{r['label']}: " + ", ".join(f"{x:.3f}" for x in r["train_losses"]) for r in rows) + ".",
        "",
    ]
    by = {r["variant"]: r for r in rows}
    if "f32" in by:
        f = by["f32"]
        notes = []
        for k in ("q4", "q8"):
            if k in by:
                q = by[k]
                notes.append(f"{q['label']}: weights {q['weights_gb'] / f['weights_gb']:.2f}x, training peak "
                             f"{q['peak_gb'] / f['peak_gb']:.2f}x, RSS {q['rss_gb'] / f['rss_gb']:.2f}x, "
                             f"speed {q['tokens_per_sec'] / f['tokens_per_sec']:.3f}x of float32")
        if notes:
            lines += ["Relative to float32 — " + "; ".join(notes) + ".", ""]
        obs = []
        for k in ("q4", "q8"):
            if k in by:
                q = by[k]
                obs.append(f"{q['label']}: the base's held-out loss is {q['valid_before'] - f['valid_before']:+.3f} nats "
                           f"from float32's before training and {q['valid_after'] - f['valid_after']:+.3f} after; on "
                           f"the trained batches the loss falls {q['seen_before'] - q['seen_after']:.3f} nats "
                           f"(float32: {f['seen_before'] - f['seen_after']:.3f})")
        if obs:
            lines += ["Loss: " + "; ".join(obs) + ". The GGUF is already Q4_1 (group 32), so the 4-bit rows quantize "
                      "an already-quantized model a second time (group 64); the 4-bit base's gap before training is "
                      "the cost of that (not separated here from 4-bit quantization of an original checkpoint). "
                      "Speed: MLX's quantized matmul on this CPU is far slower than OpenBLAS float32 (each step runs "
                      "every projection through it); the memory saving is the point here. Quantized kernels on Apple "
                      "silicon and CUDA are not measured here.", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="f32,q4", help="comma-separated: f32, q4, q8 (default f32,q4)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--verbose", action="store_true", help="show the trainer's per-step reports")
    ap.add_argument("--write", action="store_true", help=f"append the results to {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # one variant, in its own process
        print("RESULT " + json.dumps(run_variant(args.child, args)), flush=True)
        return 0

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if not GGUF.is_file():
        ap.error(f"{GGUF} is missing: run `make assets`")
    passthrough = [a for a in sys.argv[1:] if a not in ("--write",)]
    t0 = time.perf_counter()
    rows = []
    for name in names:
        print(f"== {VARIANTS[name][0]} ...", flush=True)
        t1 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", name], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
        out = proc.stdout
        if proc.returncode != 0 or "RESULT " not in out:
            print(out, file=sys.stderr)
            raise SystemExit(f"{name}: failed (exit {proc.returncode})")
        if args.verbose:
            print(out.split("RESULT ", 1)[0], end="")
        row = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        rows.append(row)
        print(f"   done in {time.perf_counter() - t1:.0f}s: peak {row['peak_gb']:.3f} GB, held-out "
              f"{row['valid_before']:.4f} -> {row['valid_after']:.4f}, trained batches {row['seen_before']:.4f} -> "
              f"{row['seen_after']:.4f}, {row['tokens_per_sec']:.1f} tok/s", flush=True)
    wall = time.perf_counter() - t0
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.write:
        cmd = "LD_PRELOAD=$(bash tools/openblas.sh --path) .venv/bin/python benchmarks/bench_qlora_demo.py " + " ".join(sys.argv[1:])
        text = section(rows, args, cmd.strip(), wall)
        with open(RESULTS, "a") as f:  # append only: other benchmarks and people write this file too
            f.write("\n" + text)
        print(f"\nappended to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
