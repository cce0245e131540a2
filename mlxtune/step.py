"""The compiled train step: token-weighted gradient accumulation, global-norm clipping, AdamW, LR schedule.

Two small pure functions, each compiled once per input shape, with their state declared:

    state = [model.state, optimizer.state, mx.random.state, accumulator]
    micro(inputs, targets, loss_mask[, segment_ids])  -> (loss_sum, n_tokens)   # adds ∇ loss_sum to the accumulator
    update()                                          -> (grad_norm, lr)        # ∇ = Σ∇ / Σ tokens; clip; AdamW
    micro(..., update=True)                           -> both, as ONE compiled call (the last micro-batch of a step)

(The first micro-batch of a step writes the accumulator rather than adding to it, and the last one feeds the
update without writing it back, so a step of one micro-batch never touches it.)

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
        # True while the accumulator holds nothing of the current step: the next micro-batch *writes* it instead of
        # adding to it, so it is never reset to zeros (the reset and the first add were ~800 launched operations
        # per update for a 3B model; the step is bound by operations launched, not FLOPs: NOTES.md).
        self._fresh = True
        if not optimizer.state:  # create the optimizer state now so its arrays are part of the compiled state
            optimizer.init(model.trainable_parameters())
        self.state = [model.state, optimizer.state, mx.random.state, self.acc]
        self._grad_fn = nn.value_and_grad(model, self._loss)
        fns = {
            ("micro", True): partial(self._micro_impl, first=True),
            ("micro", False): partial(self._micro_impl, first=False),
            ("fused", True): partial(self._fused_impl, first=True),
            ("fused", False): partial(self._fused_impl, first=False),
            ("update", True): partial(self._update_impl, fresh=True),
            ("update", False): partial(self._update_impl, fresh=False),
        }
        wrap = partial(mx.compile, inputs=self.state, outputs=self.state) if compile else (lambda f: f)
        self._fns = {k: wrap(f) for k, f in fns.items()}

    def _loss(self, model, inputs, targets, loss_mask, segment_ids=None):
        total, n = loss_sum(model, inputs, targets, loss_mask, segment_ids, self.chunk_size)
        return total, n

    def _accumulated(self, args, first: bool):
        """(loss_sum, n_tokens) of this micro-batch and the step's gradient sums and token count so far."""
        (total, n), grads = self._grad_fn(self.model, *args)
        if first:
            return total, n, grads, n
        return total, n, tree_map(mx.add, self.acc["grads"], grads), self.acc["tokens"] + n

    def _micro_impl(self, *args, first: bool):
        total, n, self.acc["grads"], self.acc["tokens"] = self._accumulated(args, first)
        return total, n

    def _apply(self, grads, tokens):
        """∇ = Σ∇ / Σ tokens, clipped to max_grad_norm, then the optimizer update -> (grad_norm, lr)."""
        if self.all_reduce is not None:
            grads, tokens = self.all_reduce((grads, tokens))
        inv = 1.0 / mx.maximum(tokens, 1.0)
        # One concatenation and one reduction instead of a square, a sum and an add per LoRA matrix.
        flat = mx.concatenate([g.reshape(-1).astype(mx.float32) for g in _leaves(grads)])
        norm = mx.sqrt((flat * flat).sum()) * inv
        scale = inv
        if self.max_grad_norm is not None:  # as optim.clip_grad_norm: scale by max/(norm+1e-6) when norm >= max
            scale = inv * mx.where(norm < self.max_grad_norm, 1.0, self.max_grad_norm / (norm + 1e-6))
        # The scaling is the gradient's only use, so compile fuses it into the optimizer's elementwise update.
        self.optimizer.update(self.model, tree_map(lambda g: g * scale.astype(g.dtype), grads))
        return norm, self.optimizer.state["learning_rate"]  # the rate this update used

    def _update_impl(self, fresh: bool):
        if fresh:  # nothing accumulated (a process with no micro-batch this step still joins the all-reduce)
            return self._apply(tree_map(mx.zeros_like, self.acc["grads"]), mx.array(0.0))
        return self._apply(self.acc["grads"], self.acc["tokens"])

    def _fused_impl(self, *args, first: bool):
        total, n, grads, tokens = self._accumulated(args, first)
        norm, lr = self._apply(grads, tokens)
        return total, n, norm, lr

    def micro(self, inputs, targets, loss_mask, segment_ids=None, update: bool = False):
        """Accumulate one micro-batch: (loss_sum, n_tokens); with update=True also apply the update and
        return (loss_sum, n_tokens, grad_norm, lr)."""
        args = (inputs, targets, loss_mask) if segment_ids is None else (inputs, targets, loss_mask, segment_ids)
        out = self._fns[("fused" if update else "micro", self._fresh)](*args)
        self._fresh = update
        return out

    def update(self) -> tuple[mx.array, mx.array]:
        out = self._fns[("update", self._fresh)]()
        self._fresh = True
        return out

    def eval_state(self) -> None:
        mx.eval(self.state)


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]
