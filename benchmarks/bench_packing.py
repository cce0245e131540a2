"""Batching benchmark: padding waste and training throughput of packed rows vs length-bucketed batches vs
mlx-lm's own batching, in the same run, on the Alpaca seed tasks tokenized by the real Llama 3 tokenizer.

The data: data/alpaca_seed/train.jsonl (139 examples) rendered by mlxtune with the Alpaca recipe template and
the real Llama 3 tokenizer (.assets/llama3-tokenizer): BOS + prompt + response + EOS, loss on response + EOS.
All three methods train on these exact token sequences:

  packed     mlxtune make_batches(packing=True): best-fit-decreasing rows of max_length, segment ids, positions
             restart per example; one shape
  bucketed   mlxtune make_batches(packing=False): sorted by length, batch_size examples, padded to 32k
  mlx-lm     mlx_lm.tuner.trainer.iterate_batches over mlx_lm.tuner.datasets.CacheDataset (its own batching: it
             sorts by CacheDataset.itemlen, the raw record's length — here the 3 keys of an Alpaca dict, so no
             real sort — pads to 1+32k, drops the last partial batch) with its default_loss

The model: a tiny-ish Llama (float32) built directly with mlxtune.model, LoRA rank 8 on all projections, AdamW,
one compiled step (mlx-lm's pattern: state = model, optimizer, RNG). Its vocabulary is the set of token ids
this data uses, remapped to 0..U (lengths and masks unchanged), so that a 128K-row output layer does not swamp
the comparison on a CPU. Each method trains one epoch with its own model and optimizer (same seed); the three
run interleaved, one step each in turn, so they share the machine's load. The first step of each distinct
shape (it compiles) is timed apart and left out of the throughput. Reported: padding fraction (padded positions / computed positions), real target tokens per second
(the response + EOS tokens of the examples processed), total real tokens per second (non-padding positions),
and the ratio to mlx-lm; plus, independent of hardware, the estimated compute per target token
(batching.estimated_cost: linear passes over every computed position plus attention over every attended pair,
L² for a packed row's segment mask, L(L+1)/2 for a causal row) for this model and for Llama-3.2-3B's shape,
relative to mlx-lm, and what `packing: auto` picks for each.

    LD_PRELOAD=$(bash tools/openblas.sh --path) .venv/bin/python benchmarks/bench_packing.py --write
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from mlxtune.data import Batch, attention_weight, make_batches, padding_fraction  # noqa: E402
from mlxtune.config import DataConfig  # noqa: E402
from mlxtune.data import Example, load_splits  # noqa: E402
from mlxtune.lora import apply_lora  # noqa: E402
from mlxtune.model import Model, ModelArgs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
LLAMA32_3B = dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256)  # the published config
HEADING = "## bench_packing.py — padding and throughput: packed vs length-bucketed vs mlx-lm batching"


def load_examples(max_length: int) -> list[Example]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / ".assets" / "llama3-tokenizer")
    cfg = DataConfig(train=str(ROOT / "data" / "alpaca_seed" / "train.jsonl"), val_split=0.0, max_length=max_length, cache=False)
    return load_splits(cfg, tok, seed=0).train


def remap(examples: list[Example]) -> tuple[list[Example], int]:
    """Token ids → 1..U (0 is padding), so the tiny model's vocabulary is the data's."""
    used = sorted({t for e in examples for t in e.ids})
    index = {t: k + 1 for k, t in enumerate(used)}
    return [Example([index[t] for t in e.ids], e.mask) for e in examples], len(used) + 1


def model_args(vocab: int, hidden: int, layers: int) -> ModelArgs:
    return ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 8 // 3,
                     num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), vocab_size=vocab,
                     rope_theta=500000.0, tie_word_embeddings=True)


def build_model(vocab: int, hidden: int, layers: int) -> Model:
    mx.random.seed(0)
    model = Model(model_args(vocab, hidden, layers))
    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, verbose=False)
    model.train()
    mx.eval(model.parameters())
    return model


# -- the three batchings, as (arrays, real target tokens, real tokens) per step ------------------------------


def ours(examples, batch_size, max_length, packing) -> tuple[list, float]:
    batches = make_batches(examples, batch_size, max_length, packing, 0)
    steps = [(b, b.n_tokens, b.n_real) for b in batches]
    return steps, padding_fraction(batches)


def mlx_lm_batches(examples, batch_size, max_length) -> tuple[list, float]:
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import iterate_batches

    class Records:  # what mlx-lm's datasets look like to CacheDataset: raw records + process()
        def __init__(self, exs):
            self.exs = exs

        def __getitem__(self, k):
            return {"instruction": k, "input": k, "output": k}

        def __len__(self):
            return len(self.exs)

        def process(self, rec):  # (ids, prompt offset): the response starts at the first trained token
            e = self.exs[rec["output"]]
            return e.ids, e.mask.index(1)

    ds = CacheDataset(Records(examples))
    steps, computed, real = [], 0, 0
    for batch, lengths in iterate_batches(ds, batch_size, max_length, loop=False, seed=0):
        lens = np.array(lengths)
        n_real = int(np.sum(lens[:, 1] - 1))  # input positions that hold tokens
        # our count of real targets: response tokens after the offset, within the kept length
        n_targets = int(np.sum(lens[:, 1] - lens[:, 0]))
        steps.append(((batch, lengths), n_targets, n_real))
        computed += batch.shape[0] * (batch.shape[1] - 1)
        real += n_real
    return steps, 1.0 - real / computed


# -- one compiled training step per method --------------------------------------------------------------------


def make_step(model, optimizer, kind):
    from mlx_lm.tuner.trainer import default_loss

    def loss_ours(model, inputs, targets, loss_mask, segment_ids, positions):
        kw = {} if segment_ids is None else {"segment_ids": segment_ids, "positions": positions}
        logits = model(inputs, **kw).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets) * loss_mask
        return ce.sum() / loss_mask.sum()

    state = [model.state, optimizer.state, mx.random.state]
    if kind == "mlx-lm":
        grad_fn = nn.value_and_grad(model, lambda m, b, l: default_loss(m, b, l)[0])

        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch, lengths):
            loss, grads = grad_fn(model, batch, lengths)
            optimizer.update(model, grads)
            return loss

        return lambda s: step(*s)
    grad_fn = nn.value_and_grad(model, loss_ours)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, loss_mask, segment_ids, positions):
        loss, grads = grad_fn(model, inputs, targets, loss_mask, segment_ids, positions)
        optimizer.update(model, grads)
        return loss

    @partial(mx.compile, inputs=state, outputs=state)
    def step_unpacked(inputs, targets, loss_mask):
        loss, grads = grad_fn(model, inputs, targets, loss_mask, None, None)
        optimizer.update(model, grads)
        return loss

    def run(b: Batch):
        args = [mx.array(b.inputs), mx.array(b.targets), mx.array(b.loss_mask)]
        if b.segment_ids is None:
            return step_unpacked(*args)
        return step(*args, mx.array(b.segment_ids), mx.array(b.positions))

    return run


def bench_all(plans: dict, vocab: int, hidden: int, layers: int) -> dict[str, dict]:
    """Train every method on its steps, interleaved one step at a time (round-robin) so that all three see
    the same machine load; each method has its own model (same seed) and optimizer. The first step of each
    distinct shape compiles: it is timed apart (`compile_s`) and left out of the throughput."""
    runs = {}
    for name, (steps, *_rest) in plans.items():
        model = build_model(vocab, hidden, layers)
        optimizer = optim.AdamW(learning_rate=1e-4)
        kind = "mlx-lm" if name == "mlx-lm" else "ours"
        runs[name] = dict(kind=kind, steps=steps, model=model, opt=optimizer, run=make_step(model, optimizer, kind),
                          seen=set(), compile_s=0.0, seconds=0.0, targets=0, real=0, losses=[])
    for i in range(max(len(r["steps"]) for r in runs.values())):
        for r in runs.values():
            if i >= len(r["steps"]):
                continue
            arrays, n_targets, n_real = r["steps"][i]
            shape = arrays[0].shape if r["kind"] == "mlx-lm" else arrays.inputs.shape
            t0 = time.perf_counter()
            loss = r["run"](arrays)
            mx.eval(loss, r["model"].state, r["opt"].state)
            dt = time.perf_counter() - t0
            r["losses"].append(loss.item())
            if shape not in r["seen"]:
                r["seen"].add(shape)
                r["compile_s"] += dt
            else:
                r["seconds"] += dt
                r["targets"] += n_targets
                r["real"] += n_real
    out = {}
    for name, r in runs.items():
        dt = max(r["seconds"], 1e-9)
        out[name] = {"steps": len(r["steps"]), "shapes": len(r["seen"]), "compile_s": r["compile_s"], "seconds": r["seconds"],
                     "target_tps": r["targets"] / dt, "real_tps": r["real"] / dt, "loss": float(np.mean(r["losses"]))}
    return out


def step_cost(steps, kind, weight: float) -> float:
    """batching.estimated_cost for any of the three: linear passes B·L plus weight x attended pairs."""
    total = 0.0
    for arrays, *_ in steps:
        if kind == "mlx-lm":
            B, T = arrays[0].shape[0], arrays[0].shape[1] - 1
            total += B * (T + weight * T * (T + 1) / 2)
        else:
            B, L = arrays.inputs.shape
            total += B * (L + weight * (L * L if arrays.segment_ids is not None else L * (L + 1) / 2))
    return total


def table(rows: list[dict], max_length: int, batch_size: int) -> str:
    base = next(r for r in rows if r["method"] == "mlx-lm")
    out = [f"max_length {max_length}, batch_size {batch_size}",
           "",
           "| batching | steps | shapes | padding | target tok/s | total tok/s | vs mlx-lm | timed s | compile s | examples "
           "| est. compute / target token, this model | same, Llama-3.2-3B |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['steps']} | {r['shapes']} | {r['padding']:.1%} | {r['target_tps']:,.0f} | "
                   f"{r['real_tps']:,.0f} | {r['target_tps'] / base['target_tps']:.2f}x | {r['seconds']:.1f} | {r['compile_s']:.1f} | {r['examples']} "
                   f"| {r['cost_model'] / base['cost_model']:.2f}x | {r['cost_3b'] / base['cost_3b']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-length", type=int, nargs="+", default=[512, 2048], help="one table per value")
    ap.add_argument("--batch-size", type=int, default=4, help="examples (packed: rows) per step")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--write", action="store_true", help=f"write the tables to {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args()

    tables = []
    for max_length in args.max_length:
        examples, vocab = remap(load_examples(max_length))
        plans = {
            "packed (mlxtune)": (*ours(examples, args.batch_size, max_length, True), len(examples)),
            "length-bucketed (mlxtune)": (*ours(examples, args.batch_size, max_length, False), len(examples)),
            "mlx-lm": (*mlx_lm_batches(examples, args.batch_size, max_length), len(examples) // args.batch_size * args.batch_size),
        }
        results = bench_all(plans, vocab, args.hidden, args.layers)
        w_model, w_3b = attention_weight(model_args(vocab, args.hidden, args.layers)), attention_weight(LLAMA32_3B)
        rows = []
        for name, (steps, pad, n_examples) in plans.items():
            r = results[name]
            kind = "mlx-lm" if name == "mlx-lm" else "ours"
            targets = sum(x[1] for x in steps)
            r.update(method=name, padding=pad, examples=n_examples, cost_model=step_cost(steps, kind, w_model) / targets,
                     cost_3b=step_cost(steps, kind, w_3b) / targets)
            rows.append(r)
            print(f"  {name}: {r['steps']} steps, {r['shapes']} shapes, padding {pad:.1%}, {r['target_tps']:,.0f} target tok/s, "
                  f"{r['real_tps']:,.0f} total tok/s, {r['seconds']:.1f}s timed (+{r['compile_s']:.1f}s first step per shape), "
                  f"mean loss {r['loss']:.3f}", flush=True)
        auto = {who: "packed" if make_batches(examples, args.batch_size, max_length, "auto", 0, attention_weight=w)[0].segment_ids
                is not None else "length-bucketed" for who, w in (("this model", w_model), ("Llama-3.2-3B", w_3b))}
        t = table(rows, max_length, args.batch_size) + (
            f"\n\n`packing: auto` picks {auto['this model']} for this model (attention_weight {w_model:.2e}) and "
            f"{auto['Llama-3.2-3B']} for Llama-3.2-3B ({w_3b:.2e}). Fastest measured here: "
            f"{max(rows, key=lambda r: r['target_tps'])['method']}.")
        print("\n" + t + "\n", flush=True)
        tables.append(t)

    if args.write:
        cmd = "LD_PRELOAD=$(bash tools/openblas.sh --path) .venv/bin/python benchmarks/bench_packing.py " + " ".join(sys.argv[1:])
        model = (f"Llama, hidden {args.hidden}, {args.layers} layers, {args.hidden // 64} heads / {max(1, args.hidden // 128)} KV heads, "
                 f"vocab = the data's {vocab - 1} distinct ids + pad, float32, LoRA rank 8 on all projections, AdamW, compiled step")
        section = "\n".join([
            HEADING, "",
            f"Command: `{cmd.strip()}`",
            f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (shared), MLX {mx.__version__} CPU + OpenBLAS.",
            f"Data: data/alpaca_seed/train.jsonl, 139 examples, Alpaca template, real Llama 3 tokenizer. Model: {model}.",
            "One epoch each, interleaved step by step; the first step of each shape (compile) is timed apart. Target tokens =",
            "response + EOS tokens of the examples processed;",
            "total = all non-padding positions. mlx-lm drops the last partial batch (fewer examples). Note: mlx-lm's",
            "default_loss mask (`steps <= lengths`) also trains one padding target per example (id 0 after EOS); it is",
            "not counted as a target token here.",
            "", *[t + "\n" for t in tables],
        ])
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section: what was run, the exact command, the numbers.\n"
        if HEADING in text:
            start = text.index(HEADING)
            nxt = text.find("\n## ", start + len(HEADING))
            text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        RESULTS.write_text(text.rstrip("\n") + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
