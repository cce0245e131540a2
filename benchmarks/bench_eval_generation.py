"""Evaluation generation: batched (left-padded) vs one-at-a-time greedy generation, same prompts, same outputs.

The model: the real SmolLM2-135M-Instruct (.assets/smollm2/*.gguf, loaded by mlxtune.loading, float32 on CPU),
or `--tiny` a random tiny Qwen2 dir made here. The prompts: the instructions (+ inputs) of the first N Alpaca seed
test tasks (data/alpaca_seed/test.jsonl) under the model's chat template, of different lengths.

  one-at-a-time  mlx-lm's stream_generate per prompt (the path `mlxtune generate` takes), greedy
  batched        mlxtune.generation.generate_batch: prompts sorted by length, left-padded into one BatchKVCache,
                 each row stops at its own end-of-turn token
  mlx-lm batch   mlx_lm.generate.batch_generate (the peer), same stop tokens

Each runs once untimed (warm-up), then timed. The generated token ids of every method are asserted equal to
one-at-a-time. Reported: wall time, generated tokens/s, and the speed-up over one-at-a-time.

    LD_PRELOAD=$(bash tools/openblas.sh --path) .venv/bin/python benchmarks/bench_eval_generation.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402

from mlxtune.generation import encode_prompt, generate_batch  # noqa: E402
from mlxtune.tokenizer import stop_token_ids  # noqa: E402


def prompts_from_seed_tasks(tok, n: int) -> list[list[int]]:
    rows = [json.loads(l) for l in (ROOT / "data/alpaca_seed/test.jsonl").read_text().splitlines()[:n]]
    texts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows]
    return [encode_prompt(tok, t) for t in texts]


def one_at_a_time(model, tok, prompts, max_tokens, stops):
    from mlx_lm.generate import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    wrapper = TokenizerWrapper(tok, eos_token_ids=stops)
    out = []
    for p in prompts:
        ids = []
        for r in stream_generate(model, wrapper, p, max_tokens=max_tokens):
            if r.finish_reason != "stop":
                ids.append(r.token)
        out.append(ids)
    return out


def mlx_lm_batch(model, tok, prompts, max_tokens, stops, batch_size):
    from mlx_lm.generate import batch_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    r = batch_generate(model, TokenizerWrapper(tok, eos_token_ids=stops), prompts, max_tokens=max_tokens,
                       return_token_ids=True, prefill_batch_size=batch_size, completion_batch_size=batch_size)
    return r.token_ids


def tiny_model(tmp: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_model_dir

    from mlxtune.loading import load

    d = make_tiny_model_dir(tmp / "tiny_qwen", "qwen2", tokenizer_dir=ROOT / ".assets/qwen2.5-tokenizer")
    return load(d), "random tiny Qwen2 (2 layers, hidden 64, vocab 151,665; float32)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="prompts (default 8)")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens per prompt at most (default 48)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a random tiny model instead of SmolLM2")
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args()

    from mlxtune.loading import load

    if args.tiny:
        import tempfile

        (model, tok), desc = tiny_model(Path(tempfile.mkdtemp()))
    else:
        gguf = ROOT / ".assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        model, tok = load(gguf)
        desc = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
    stops = stop_token_ids(tok, model)
    prompts = prompts_from_seed_tasks(tok, args.n)
    lengths = sorted(len(p) for p in prompts)

    runs = {
        "one-at-a-time (mlx-lm stream_generate)": lambda: one_at_a_time(model, tok, prompts, args.max_tokens, stops),
        f"batched (mlxtune generate_batch, batch {args.batch_size})":
            lambda: generate_batch(model, tok, prompts, args.max_tokens, batch_size=args.batch_size, stop_ids=stops),
        f"mlx-lm batch_generate (batch {args.batch_size})":
            lambda: mlx_lm_batch(model, tok, prompts, args.max_tokens, stops, args.batch_size),
    }
    results, reference = [], None
    for name, fn in runs.items():
        fn()  # warm-up
        mx.synchronize()
        t = time.perf_counter()
        out = fn()
        mx.synchronize()
        dt = time.perf_counter() - t
        if reference is None:
            reference = out
        same = out == reference
        n_tok = sum(len(o) for o in out)
        results.append((name, dt, n_tok, same))
        print(f"{name:<50} {dt:8.2f} s  {n_tok / dt:8.1f} tok/s  same outputs: {same}", flush=True)
    assert all(r[3] for r in results[:2]), "batched greedy outputs differ from one-at-a-time"

    base = results[0][1]
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "",
        "## Evaluation generation: batched vs one-at-a-time greedy",
        "",
        "```",
        "LD_PRELOAD=$(bash tools/openblas.sh --path) .venv/bin/python benchmarks/bench_eval_generation.py"
        + (" --tiny" if args.tiny else "") + f" --n {args.n} --max-tokens {args.max_tokens} --batch-size {args.batch_size} --write",
        "```",
        "",
        f"{desc}; {args.n} Alpaca seed test prompts under the chat template ({lengths[0]}-{lengths[-1]} tokens), "
        f"greedy, at most {args.max_tokens} new tokens, stop at end-of-turn. {platform.machine()} CPU "
        f"({os.cpu_count()} cores, OpenBLAS preloaded: {bool(os.environ.get('LD_PRELOAD'))}; 1-min load average "
        f"{load_avg:.1f} at the end: the machine is shared), mlx {mx.__version__}. One warm-up run each, then one timed run.",
        "",
        "| method | time (s) | generated tok/s | speed-up | same token ids as one-at-a-time |",
        "|---|---:|---:|---:|---|",
    ]
    for name, dt, n_tok, same in results:
        lines.append(f"| {name} | {dt:.2f} | {n_tok / dt:.1f} | {base / dt:.2f}x | {'yes' if same else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:  # append only: other benchmarks write here too
            f.write(text)


if __name__ == "__main__":
    main()
