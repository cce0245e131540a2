"""The compiled train step: token-weighted gradient accumulation, global-norm clipping, AdamW, LR schedule.

Two small pure functions, each compiled once per input shape, with their state declared:

    state = [model.state, optimizer.state, mx.random.state, accumulator]
    micro(inputs, targets, loss_mask[, segment_ids])  -> (loss_sum, n_tokens)   # adds ∇ loss_sum to the accumulator
    update()                                          -> (grad_norm, lr)        # ∇ = Σ∇ / Σ tokens; clip; AdamW; reset
    micro(..., update=True)                           -> both, as ONE compiled call (the last micro-batch of a step)

Fusing the last micro-batch with the update matters: each compiled call flattens and writes back the whole
state (~1,500 arrays for a 3B model with LoRA), and the H100 probe (benchmarks/NOTES.md) showed two calls per
step cost ~15% against mlx-lm's single call.

Gradients are of the *sum* of token losses; `update` divides by the total number of target tokens across the
micro-batches, so k micro-batches of any lengths give exactly the update of one batch holding all of them.
No `.item()`, I/O or Python side effects run inside; the host syncs only when the trainer reports.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from .loss import loss_sum


def lr_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "cosine", min_ratio: float = 0.0):
    """Linear warmup to `peak` over `warmup_steps` updates, then cosine / linear decay to peak*min_ratio, or constant.

    The optimizer calls it with its update count s = 0, 1, ...; warmup gives peak*(s+1)/warmup_steps so the
    first update is not wasted at lr 0.
    """
    floor = peak * min_ratio
    decay = max(1, total_steps - warmup_steps)

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        warm = peak * (s + 1) / max(1, warmup_steps)
        progress = mx.clip((s - warmup_steps) / decay, 0.0, 1.0)
        if kind == "cosine":
            after = floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        elif kind == "linear":
            after = peak - (peak - floor) * progress
        else:
            after = mx.array(peak, dtype=mx.float32)
        return mx.where(s < warmup_steps, warm, after)

    return schedule


def make_optimizer(train_cfg, total_steps: int) -> optim.Optimizer:
    warmup = int(round(train_cfg.warmup_ratio * total_steps))
    sched = lr_schedule(train_cfg.learning_rate, total_steps, warmup, train_cfg.schedule, train_cfg.min_lr_ratio)
    return optim.AdamW(
        learning_rate=sched,
        betas=[train_cfg.adam_beta1, train_cfg.adam_beta2],
        eps=train_cfg.adam_eps,
        weight_decay=train_cfg.weight_decay,
    )


class TrainStep:
    """Owns the gradient accumulator and the compiled micro/update functions for one model + optimizer."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: Optional[float] = 1.0,
                 compile: bool = True, chunk_size: Optional[int] = None, all_reduce=None):
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.chunk_size = chunk_size
        self.all_reduce = all_reduce  # data parallel: sums a tree across processes (distributed.py)
        self.acc = {"grads": tree_map(mx.zeros_like, model.trainable_parameters()), "tokens": mx.array(0.0)}
        if not optimizer.state:  # create the optimizer state now so its arrays are part of the compiled state
            optimizer.init(model.trainable_parameters())
        self.state = [model.state, optimizer.state, mx.random.state, self.acc]
        grad_fn = nn.value_and_grad(model, self._loss)
        self._grad_fn = grad_fn
        if compile:
            wrap = partial(mx.compile, inputs=self.state, outputs=self.state)
            self._micro, self._update, self._fused = wrap(self._micro_impl), wrap(self._update_impl), wrap(self._fused_impl)
        else:
            self._micro, self._update, self._fused = self._micro_impl, self._update_impl, self._fused_impl

    def _loss(self, model, inputs, targets, loss_mask, segment_ids=None):
        total, n = loss_sum(model, inputs, targets, loss_mask, segment_ids, self.chunk_size)
        return total, n

    def _micro_impl(self, inputs, targets, loss_mask, segment_ids=None):
        (total, n), grads = self._grad_fn(self.model, inputs, targets, loss_mask, segment_ids)
        self.acc["grads"] = tree_map(mx.add, self.acc["grads"], grads)
        self.acc["tokens"] = self.acc["tokens"] + n
        return total, n

    def _update_impl(self):
        grads, tokens = self.acc["grads"], self.acc["tokens"]
        if self.all_reduce is not None:
            grads, tokens = self.all_reduce((grads, tokens))
        grads = tree_map(lambda g: g / mx.maximum(tokens, 1.0), grads)
        if self.max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, self.max_grad_norm)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for g in _leaves(grads)))
        self.optimizer.update(self.model, grads)
        lr = self.optimizer.state["learning_rate"]  # the rate this update used
        self.acc["grads"] = tree_map(mx.zeros_like, self.acc["grads"])
        self.acc["tokens"] = mx.zeros_like(self.acc["tokens"])
        return norm, lr

    def _fused_impl(self, inputs, targets, loss_mask, segment_ids=None):
        total, n = self._micro_impl(inputs, targets, loss_mask, segment_ids)
        norm, lr = self._update_impl()
        return total, n, norm, lr

    def micro(self, inputs, targets, loss_mask, segment_ids=None, update: bool = False):
        """Accumulate one micro-batch: (loss_sum, n_tokens); with update=True also apply the update and
        return (loss_sum, n_tokens, grad_norm, lr)."""
        args = (inputs, targets, loss_mask) if segment_ids is None else (inputs, targets, loss_mask, segment_ids)
        return self._fused(*args) if update else self._micro(*args)

    def update(self) -> tuple[mx.array, mx.array]:
        return self._update()

    def eval_state(self) -> None:
        mx.eval(self.state)


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]
