"""Probe: where does mlxtune's dense step lose time or memory against mlx-lm? One variant per row, same batches.

    python benchmarks/probe_step.py            # GPU (3B shapes); --tiny for a CPU smoke run

Variants (Llama-3.2-3B, B4 x L512 unless noted):
  ours            mlxtune model + TrainStep (chunked loss)
  ours-unchunked  loss in one chunk (no per-chunk checkpoint)
  ours-nokey      model in eval mode: layers called plainly (no per-layer dropout key / keyed call)
  mlxlm-model     mlx-lm's model, mlxtune's TrainStep and chunked loss
  mlxlm           mlx-lm's model and step (the peer)
  long-2048/8192  mlxtune B1 x L, checkpointing (query-chunked attention above 2048)
  qlora-*         4-bit base B1 x L512 ckpt: full step; forward+loss only; with a dense (unquantized) embedding
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_train as bt  # noqa: E402


def timed(name, build, step, B, L, vocab, warmup=3, steps=8):
    bt.reset_memory()
    obj = build()
    rng = np.random.default_rng(0)
    data = [mx.array(rng.integers(0, vocab, (B, L + 1)).astype(np.int32)) for _ in range(warmup + steps)]
    mx.reset_peak_memory()
    for x in data[:warmup]:
        step(obj, x)
    t = time.perf_counter()
    for x in data[warmup:]:
        step(obj, x)
    dt = (time.perf_counter() - t) / steps
    r = {"variant": name, "B": B, "L": L, "tok_s": round(B * L / dt), "step_ms": round(dt * 1e3, 1),
         "peak_gb": round(mx.get_peak_memory() / 1e9, 2)}
    print(json.dumps(r), flush=True)
    del obj
    return r


def ours_step(st, x):
    st.micro(x[:, :-1], x[:, 1:], mx.ones(x[:, 1:].shape), update=True)
    mx.eval(st.state)


def main():
    tiny = "--tiny" in sys.argv
    cfg = bt.TINY if tiny else bt.LLAMA_3B
    dtype = mx.float32 if tiny else mx.bfloat16
    B, L = (2, 128) if tiny else (4, 512)
    V = cfg["vocab_size"]
    from mlxtune.step import TrainStep
    import mlx.optimizers as optim
    import mlxtune.model as M

    def ours(chunk=None, eval_mode=False, ckpt=False, quantize=None, dense_embed=False):
        def build():
            m = bt.build_mlxtune(cfg, dtype, None, ckpt)
            if quantize:
                pred = (lambda p, mod: isinstance(mod, nn.Linear)) if dense_embed else None
                nn.quantize(m, group_size=64, bits=quantize, class_predicate=pred)
            if eval_mode:
                m.eval()
            return TrainStep(m, optim.AdamW(learning_rate=1e-5), None, True, chunk_size=chunk)
        return build

    rows = []
    rows.append(timed("ours", ours(), ours_step, B, L, V))
    rows.append(timed("ours-unchunked", ours(chunk=10**9), ours_step, B, L, V))
    rows.append(timed("ours-nokey", ours(eval_mode=True), ours_step, B, L, V))

    class MlxLmModelStep(TrainStep):
        def _loss(self, model, inputs, targets, loss_mask, segment_ids=None):
            from mlxtune.loss import chunked_ce_sum

            h = model.model(inputs)
            return chunked_ce_sum(model.model.embed_tokens.as_linear, h, targets, loss_mask, None, V), loss_mask.sum()

    rows.append(timed("mlxlm-model", lambda: MlxLmModelStep(bt.build_mlx_lm(cfg, dtype), optim.AdamW(learning_rate=1e-5), None),
                      ours_step, B, L, V))
    rows.append(timed("mlxlm", lambda: bt.MlxLmStep(bt.build_mlx_lm(cfg, dtype)),
                      lambda st, x: st.run(x, mx.array([[0, x.shape[1] - 1]] * x.shape[0]), True), B, L, V))
    for LL in ((256, 1024) if tiny else (2048, 8192)):
        rows.append(timed(f"long-{LL}", ours(ckpt=True), ours_step, 1, LL, V, warmup=2, steps=3))
    # The QLoRA build quantizes after LoRA is applied would wrap LoRA's bases; build dense, quantize, then LoRA.
    def qlora(dense_embed=False):
        def build():
            from mlxtune.lora import apply_lora

            m = M.Model(M.ModelArgs.from_hf_config(cfg))
            m.set_dtype(dtype)
            pred = (lambda p, mod: isinstance(mod, nn.Linear)) if dense_embed else None
            nn.quantize(m, group_size=64, bits=4, class_predicate=pred)
            mx.eval(m.parameters())
            apply_lora(m, 16, 32, verbose=False)
            m.grad_checkpoint = True
            m.train()
            return TrainStep(m, optim.AdamW(learning_rate=1e-5), None, True)
        return build

    LQ = 128 if tiny else 512
    rows.append(timed("qlora", qlora(), ours_step, 1, LQ, V))
    rows.append(timed("qlora-dense-embed", qlora(True), ours_step, 1, LQ, V))

    def fwd_only(st, x):
        from mlxtune.loss import loss_sum

        s, n = loss_sum(st.model, x[:, :-1], x[:, 1:], mx.ones(x[:, 1:].shape))
        mx.eval(s, n)

    rows.append(timed("qlora-forward-only", qlora(), fwd_only, 1, LQ, V))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
