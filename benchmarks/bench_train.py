"""Side-by-side LoRA training throughput and memory: mlxtune vs mlx-lm's trainer (vs HF PEFT), same run.

Builds the published Llama-3.2-3B / Qwen2.5-3B configs with random weights (speed and memory do not depend on
the values), LoRA rank 16 (alpha 32 = mlx-lm scale 2.0) on all 7 projections, dropout 0, AdamW, and runs each
implementation on the same token batches: 3 warm-up steps, then the mean of 10 timed steps. Peak memory is MLX's
peak allocation (weights included), reset before each implementation's run. MFU = 4N FLOP/token x tok/s over the
bf16 matmul rate measured in the same run (N counts the tied output matmul).

Rows:
  dense       B x L random tokens, no padding (mlx-lm's default_loss vs mlxtune's chunked loss)
  recipe      micro-batch 1, accumulation 64, max length 512, grad checkpointing, on the real length distribution
              of the Alpaca seed tasks: mlx-lm pads each example to 1+32k tokens; mlxtune packs rows of 512
              (segment ids, positions restart) — real (non-padding) tokens/s
  long        one sequence of L tokens with checkpointing
  qlora       4-bit base (group 64), B1 x L512, checkpointing

    python benchmarks/bench_train.py --rows all               # on the GPU (see benchmarks/RESULTS.md)
    python benchmarks/bench_train.py --tiny --rows all        # CPU smoke run with a tiny config
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_3B = {
    "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
    "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "attention_bias": False, "mlp_bias": False,
}
QWEN_3B = {
    "model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 32768,
}
TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLX_LM_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]


def n_params_flop(cfg: dict) -> float:
    """N for the 4N FLOP/token estimate: all matmul weights, the (tied) output projection counted once more."""
    D, F, Lr, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or D // H
    per_layer = D * H * hd * 2 + D * K * hd * 2 + 3 * D * F
    return Lr * per_layer + V * D


def matmul_rate(tiny: bool) -> float:
    n = 1024 if tiny else 8192
    a = mx.random.normal((n, n)).astype(mx.bfloat16 if not tiny else mx.float32)
    b = mx.random.normal((n, n)).astype(a.dtype)
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    t = time.perf_counter()
    reps = 5 if tiny else 20
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def reset_memory():
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


# ----------------------------------------------------------------------------------------------------------------
# Model builders


def build_mlxtune(cfg: dict, dtype, quantize=None, ckpt=False, quantize_embedding=True):
    from mlxtune.lora import apply_lora
    from mlxtune.model import Model, ModelArgs

    model = Model(ModelArgs.from_hf_config(cfg))
    model.set_dtype(dtype)
    if quantize:
        pred = None if quantize_embedding else (lambda _, m: isinstance(m, nn.Linear))
        nn.quantize(model, group_size=64, bits=quantize, class_predicate=pred)
    mx.eval(model.parameters())
    apply_lora(model, rank=16, alpha=32, dropout=0.0, targets=TARGETS, verbose=False)
    model.grad_checkpoint = ckpt
    model.train()
    mx.eval(model.parameters())
    return model


def build_mlx_lm(cfg: dict, dtype, quantize=None, ckpt=False):
    from mlx_lm.models import llama, qwen2
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mod = llama if cfg["model_type"] == "llama" else qwen2
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    model.set_dtype(dtype)
    if quantize:
        nn.quantize(model, group_size=64, bits=quantize)
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, cfg["num_hidden_layers"], {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": MLX_LM_KEYS})
    if ckpt:
        grad_checkpoint(model.layers[0])  # mlx-lm's own (patches the layer class)
    model.train()
    mx.eval(model.parameters())
    return model


# ----------------------------------------------------------------------------------------------------------------
# Steps: each returns a function micro(batch) and update()


def mlxtune_step(model):
    from mlxtune.step import TrainStep

    opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)
    st = TrainStep(model, opt, max_grad_norm=None, compile=True)
    return st


class MlxLmStep:
    """mlx-lm 0.32.2's compiled step (tuner/trainer.py) with its default_loss, verbatim in behaviour."""

    def __init__(self, model, accum: int = 1):
        from mlx_lm.tuner.trainer import default_loss

        self.model = model
        self.opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)
        loss_value_and_grad = nn.value_and_grad(model, default_loss)
        self.state = [model.state, self.opt.state, mx.random.state]
        self.accum = accum
        self.grad = None

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def step(batch, lengths, prev_grad, do_update):
            (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
            if prev_grad is not None:
                grad = tree_map(lambda x, y: x + y, grad, prev_grad)
            if do_update:
                if accum > 1:
                    grad = tree_map(lambda x: x / accum, grad)
                self.opt.update(model, grad)
                grad = None
            return lvalue, toks, grad

        self.step = step

    def run(self, batch, lengths, do_update):
        lvalue, toks, self.grad = self.step(batch, lengths, self.grad, do_update)
        mx.eval(self.state, lvalue, toks, self.grad)


# ----------------------------------------------------------------------------------------------------------------
# Rows


def dense_row(impl: str, cfg: dict, B: int, L: int, ckpt: bool, dtype, quantize=None, warmup=3, steps=10,
              quantize_embedding=True) -> dict:
    reset_memory()
    rng = np.random.default_rng(0)
    data = [rng.integers(0, cfg["vocab_size"], (B, L + 1)).astype(np.int32) for _ in range(warmup + steps)]
    if impl == "mlxtune":
        model = build_mlxtune(cfg, dtype, quantize, ckpt, quantize_embedding)
        st = mlxtune_step(model)
        mask = mx.ones((B, L))

        def one(x):
            x = mx.array(x)
            st.micro(x[:, :-1], x[:, 1:], mask, update=True)
            mx.eval(st.state)
    else:
        model = build_mlx_lm(cfg, dtype, quantize, ckpt)
        st = MlxLmStep(model)
        lengths = mx.array([[0, L]] * B)

        def one(x):
            st.run(mx.array(x), lengths, True)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    for x in data[:warmup]:
        one(x)
    t = time.perf_counter()
    for x in data[warmup:]:
        one(x)
    dt = (time.perf_counter() - t) / steps
    out = {"impl": impl, "tok_s": B * L / dt, "step_s": dt, "peak_gb": mx.get_peak_memory() / 1e9,
           "weights_gb": base / 1e9}
    del model, st
    return out


def recipe_row(impl: str, cfg: dict, lengths: list[int], max_len: int, ckpt: bool, dtype, micro: int = 64) -> dict:
    """Micro-batch 1 on real lengths, `micro` micro-batches per update; real tokens/s."""
    reset_memory()
    rng = np.random.default_rng(0)
    lengths = [min(l, max_len) for l in lengths]
    if impl == "mlxtune":
        from mlxtune.data import make_batches
        from mlxtune.data import Example

        exs = [Example(ids=list(rng.integers(0, cfg["vocab_size"], l)), mask=[0] + [1] * (l - 1)) for l in lengths]
        batches = make_batches(exs, 1, max_len, True, 0)
        model = build_mlxtune(cfg, dtype, None, ckpt)
        st = mlxtune_step(model)

        pending = {"b": None}

        def run_micro(b):  # hold one back so the step's last micro-batch runs fused with the update
            if pending["b"] is not None:
                p = pending["b"]
                st.micro(mx.array(p.inputs), mx.array(p.targets), mx.array(p.loss_mask),
                         None if p.segment_ids is None else mx.array(p.segment_ids))
                mx.async_eval(st.state)  # as the trainer does after every micro-batch
            pending["b"] = b

        def update():
            p = pending["b"]
            st.micro(mx.array(p.inputs), mx.array(p.targets), mx.array(p.loss_mask),
                     None if p.segment_ids is None else mx.array(p.segment_ids), update=True)
            pending["b"] = None
            mx.eval(st.state)

        real = [int((b.segment_ids > 0).sum()) if b.segment_ids is not None else int(b.loss_mask.sum()) for b in batches]
        padded = [b.inputs.size for b in batches]
        items = list(range(len(batches)))
    else:
        return mlx_lm_recipe(cfg, lengths, max_len, ckpt, dtype, micro, rng)
    mx.reset_peak_memory()
    # warm-up, not timed: every distinct shape through both compiled variants the timed loop uses (a micro-batch
    # that accumulates, and the last one fused with the update)
    seen = set()
    for i in items:
        shape = batches[i].inputs.shape if impl == "mlxtune" else batches[i][0].shape
        if shape not in seen:
            seen.add(shape)
            run_micro(batches[i])
            run_micro(batches[i])
            if impl == "mlxtune":
                update()
    order = rng.permutation(len(items))
    n = 0
    t = time.perf_counter()
    toks = pad = 0
    for k in range(micro):
        i = items[order[k % len(items)]]
        run_micro(batches[i])
        toks += real[i]
        pad += padded[i]
        n += 1
    update()
    if impl != "mlxtune":
        mx.eval(st.state)
    dt = time.perf_counter() - t
    out = {"impl": impl, "tok_s": toks / dt, "step_s": dt, "peak_gb": mx.get_peak_memory() / 1e9,
           "padding": 1 - toks / max(pad, 1), "micro_batches": micro}
    del model, st
    return out


def mlx_lm_recipe(cfg, lengths, max_len, ckpt, dtype, micro, rng) -> dict:
    """mlx-lm's own train() (batch 1, its iterate_batches padding to 1+32k, grad accumulation) on the same lengths.

    Its report for the last window of `micro` iterations is used: by then every length's shape has been compiled
    (the first epoch covers all examples). tokens/s is mlx-lm's own count of target tokens over its train time.
    """
    import tempfile

    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train

    model = build_mlx_lm(cfg, dtype, None, False)  # train() applies its own checkpointing
    data = [(list(rng.integers(0, cfg["vocab_size"], l)), 0) for l in lengths]
    reports = []

    class CB(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    iters = micro * (len(data) // micro + 2)
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=1, iters=iters, steps_per_report=micro, steps_per_eval=10**9, steps_per_save=10**9,
                            max_seq_length=max_len, adapter_file=os.path.join(tmp, "a.safetensors"),
                            grad_checkpoint=ckpt, grad_accumulation_steps=micro)
        train(model, optim.AdamW(learning_rate=1e-5), data, None, args, training_callback=CB())
    last = reports[-1]
    real = sum(l - 1 for l in lengths)
    padded = sum(min(1 + 32 * ((l + 31) // 32), max_len) - 1 for l in lengths)
    out = {"impl": "mlx-lm", "tok_s": last["tokens_per_second"], "step_s": 1 / last["iterations_per_second"] * micro,
           "peak_gb": mx.get_peak_memory() / 1e9, "padding": 1 - real / padded, "micro_batches": micro}
    del model
    return out


def peft_row(cfg: dict, B: int, L: int, ckpt: bool, warmup=3, steps=10) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(**{k: v for k, v in cfg.items()})
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf, torch_dtype=torch.bfloat16)
    if ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randint(0, cfg["vocab_size"], (B, L), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def one():
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    out = {"impl": "peft", "tok_s": B * L / dt, "step_s": dt, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    del model, opt
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help="comma list of: llama-dense, llama-dense-ckpt, qwen-dense, recipe, long, qlora, llama-b8 or all")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke run)")
    ap.add_argument("--peft", action="store_true", help="also run HF PEFT (torch, CUDA) on the dense Llama row")
    ap.add_argument("--long-len", type=int, default=8192)
    ap.add_argument("--impls", default="mlxtune,mlx-lm")
    ap.add_argument("--json", default=os.environ.get("OUT", "") and os.path.join(os.environ["OUT"], "bench_train.json"))
    args = ap.parse_args()
    rows = args.rows.split(",") if args.rows != "all" else ["llama-dense", "llama-dense-ckpt", "recipe", "long", "qlora", "qwen-dense"]
    impls = args.impls.split(",")
    tiny = args.tiny
    dtype = mx.float32 if tiny else mx.bfloat16
    llama, qwen = (TINY, TINY) if tiny else (LLAMA_3B, QWEN_3B)
    B, L = (2, 128) if tiny else (4, 512)
    lengths = json.loads((ROOT / "benchmarks/alpaca_seed_lengths.json").read_text())["lengths"]
    rate = matmul_rate(tiny)
    print(f"device {mx.default_device()} | matmul {'fp32' if tiny else 'bf16'} {rate / 1e12:.1f} TFLOP/s", flush=True)
    results = []

    def record(row, cfg, r, **extra):
        r.update(row=row, **extra)
        r["mfu"] = 4 * n_params_flop(cfg) * r["tok_s"] / rate
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # after every row: a call cut short by its time limit keeps what it measured
            Path(args.json).write_text(json.dumps({"device": str(mx.default_device()), "matmul_flops": rate,
                                                   "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
                                                   "results": results}, indent=1))

    for row in rows:
        for impl in impls:
            try:
                if row == "llama-dense":
                    record(row, llama, dense_row(impl, llama, B, L, False, dtype), B=B, L=L, ckpt=False)
                elif row == "llama-dense-ckpt":
                    record(row, llama, dense_row(impl, llama, B, L, True, dtype), B=B, L=L, ckpt=True)
                elif row == "llama-b8":
                    record(row, llama, dense_row(impl, llama, 2 * B, L, False, dtype), B=2 * B, L=L, ckpt=False)
                elif row == "qwen-dense":
                    record(row, qwen, dense_row(impl, qwen, B, L, False, dtype), B=B, L=L, ckpt=False)
                elif row == "recipe":
                    record(row, llama, recipe_row(impl, llama, lengths, 128 if tiny else 512, True, dtype,
                                                  micro=16 if tiny else 64), B=1, L=128 if tiny else 512, ckpt=True)
                elif row == "long":
                    LL = 1024 if tiny else (args.long_len if impl == "mlxtune" else 2048)
                    record(row, llama, dense_row(impl, llama, 1, LL, True, dtype, warmup=2, steps=3), B=1, L=LL, ckpt=True)
                elif row == "qlora":
                    record(row, llama, dense_row(impl, llama, 1, 128 if tiny else 512, True, dtype, quantize=4),
                           B=1, L=128 if tiny else 512, ckpt=True, bits=4)
            except Exception as e:  # a peer that fails (e.g. out of memory) is a result, not a crash
                print(json.dumps({"row": row, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
                results.append({"row": row, "impl": impl, "error": str(e)[:300]})
        if args.peft and row in ("llama-dense", "llama-dense-ckpt") and not tiny:
            try:
                record(row, llama, peft_row(llama, B, L, row.endswith("ckpt")), B=B, L=L, ckpt=row.endswith("ckpt"))
            except Exception as e:
                print(json.dumps({"row": row, "impl": "peft", "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
    print()
    print(table(results))


def table(results: list[dict]) -> str:
    lines = ["| row | shape | impl | tok/s | step s | peak GB | MFU | vs mlx-lm tok/s | vs mlx-lm peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_row = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    for row, rs in by_row.items():
        peer = next((r for r in rs if r.get("impl") == "mlx-lm" and "error" not in r), None)
        for r in rs:
            if "error" in r:
                lines.append(f"| {row} | | {r['impl']} | error: {r['error'][:60]} | | | | | |")
                continue
            shape = f"B{r.get('B')}xL{r.get('L')}" + (" ckpt" if r.get("ckpt") else "") + (f" {r['bits']}-bit" if r.get("bits") else "")
            ratio = f"{r['tok_s'] / peer['tok_s']:.2f}x" if peer and r is not peer else ""
            mem = f"{r['peak_gb'] / peer['peak_gb']:.2f}x" if peer and r is not peer else ""
            extra = f" (pad {r['padding']:.0%})" if "padding" in r else ""
            lines.append(f"| {row} | {shape} | {r['impl']}{extra} | {r['tok_s']:,.0f} | {r['step_s']:.3f} | {r['peak_gb']:.2f} | "
                         f"{r['mfu']:.1%} | {ratio} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
