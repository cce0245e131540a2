"""One optimizer step: the compiled functions (token-weighted accumulation, global-norm clipping, AdamW, LR
schedule), the stream of micro-batches steps consume, and the check that a step stayed finite.

Two small pure functions, each compiled once per input shape, with their state declared:

    state = [model.state, optimizer.state, mx.random.state, accumulator]
    micro(inputs, targets, loss_mask[, segment_ids])  -> (loss_sum, n_tokens)   # adds ∇ loss_sum to the accumulator
    update()                                          -> (grad_norm, lr)        # ∇ = Σ∇ / Σ tokens; clip; AdamW
    micro(..., update=True)                           -> both, as ONE compiled call (the last micro-batch of a step)

(A step of one micro-batch runs `micro(..., update=True)` on a zero accumulator: its gradient goes straight to
the update and the accumulator is never touched.)

Fusing the last micro-batch with the update matters: each compiled call flattens and writes back the whole
state (~1,500 arrays for a 3B model with LoRA), and the H100 probe (benchmarks/NOTES.md) showed two calls per
step cost ~15% against mlx-lm's single call.

Gradients are of the *sum* of token losses; `update` divides by the total number of target tokens across the
micro-batches, so k micro-batches of any lengths give exactly the update of one batch holding all of them.
No `.item()`, I/O or Python side effects run inside; the host syncs only when the trainer reports.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from .errors import MlxtuneError
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
        # True while the accumulator is zero (at every step boundary). A step of ONE micro-batch then feeds its
        # gradient straight to the update and never touches the accumulator: no add, no reset (~800 of the ~13,000
        # operations a 3B step launched; the step is bound by operations launched, not FLOPs: NOTES.md).
        self._fresh = True
        if not optimizer.state:  # create the optimizer state now so its arrays are part of the compiled state
            optimizer.init(model.trainable_parameters())
        self.state = [model.state, optimizer.state, mx.random.state, self.acc]
        self._grad_fn = nn.value_and_grad(model, self._loss)
        wrap = partial(mx.compile, inputs=self.state, outputs=self.state) if compile else (lambda f: f)
        self._micro, self._update, self._fused = wrap(self._micro_impl), wrap(self._update_impl), wrap(self._fused_impl)
        self._fused_alone = wrap(self._fused_alone_impl)

    def _loss(self, model, inputs, targets, loss_mask, segment_ids=None):
        total, n = loss_sum(model, inputs, targets, loss_mask, segment_ids, self.chunk_size)
        return total, n

    def _micro_impl(self, *args):
        (total, n), grads = self._grad_fn(self.model, *args)
        self.acc["grads"] = tree_map(mx.add, self.acc["grads"], grads)
        self.acc["tokens"] = self.acc["tokens"] + n
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

    def _update_impl(self):
        norm, lr = self._apply(self.acc["grads"], self.acc["tokens"])
        self.acc["grads"] = tree_map(mx.zeros_like, self.acc["grads"])
        self.acc["tokens"] = mx.zeros_like(self.acc["tokens"])
        return norm, lr

    def _fused_impl(self, *args):
        total, n = self._micro_impl(*args)
        norm, lr = self._update_impl()
        return total, n, norm, lr

    def _fused_alone_impl(self, *args):  # the step's only micro-batch: the accumulator stays zero, untouched
        (total, n), grads = self._grad_fn(self.model, *args)
        norm, lr = self._apply(grads, n)
        return total, n, norm, lr

    def micro(self, inputs, targets, loss_mask, segment_ids=None, update: bool = False):
        """Accumulate one micro-batch: (loss_sum, n_tokens); with update=True also apply the update and
        return (loss_sum, n_tokens, grad_norm, lr)."""
        args = (inputs, targets, loss_mask) if segment_ids is None else (inputs, targets, loss_mask, segment_ids)
        if update:
            out = (self._fused_alone if self._fresh else self._fused)(*args)
        else:
            out = self._micro(*args)
        self._fresh = update
        return out

    def update(self) -> tuple[mx.array, mx.array]:
        self._fresh = True
        return self._update()

    def eval_state(self) -> None:
        mx.eval(self.state)


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


# --------------------------------------------------------------------------------------------------------------
# The stream a step consumes, and its checks


class MicroBatches:
    """The global stream of micro-batches and the schedule over it (`k` per optimizer step, `total_steps`)."""

    def __init__(self, batches: list, cfg: Any):
        tc = cfg.train
        self.batches, self.seed, self.shuffle, self.k = batches, tc.seed, cfg.data.shuffle, tc.grad_accumulation
        n, k = len(batches), tc.grad_accumulation
        self.total_micro = math.ceil(tc.epochs * n)
        self.total_steps = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(self.total_micro / k))
        if tc.max_steps is not None:
            self.total_micro = max(self.total_micro, self.total_steps * k)
        self._order: tuple[int, list[int]] = (-1, [])

    def at(self, j: int):
        epoch = j // len(self.batches)
        if self._order[0] != epoch:
            self._order = (epoch, self.order(epoch))
        return self.batches[self._order[1][j % len(self.batches)]]

    def order(self, epoch: int) -> list[int]:
        from .data import epoch_order

        return epoch_order(len(self.batches), self.seed, epoch, self.shuffle)

    def of_step(self, step: int, rank: int = 0, size: int = 1) -> list[int]:
        """The micro-batches of `step` that process `rank` of `size` runs."""
        first, last = step * self.k, min((step + 1) * self.k, self.total_micro)
        return [j for j in range(first, last) if j % size == rank]

    def describe(self, j: int) -> str:
        """Where global micro-batch j comes from, for the NaN/inf error."""
        n = len(self.batches)
        epoch, pos = divmod(j, n)
        return f"micro-batch {j} (epoch {epoch + 1}, position {pos + 1} of {n}: training batch #{self.order(epoch)[pos]})"


def micro_seed(seed: int, micro_index: int) -> int:
    """The RNG seed for global micro-batch j: the same whichever process runs it (so W processes == 1)."""
    h = hashlib.blake2b(f"{seed}:{micro_index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little")


def all_finite(arrays: Iterable[mx.array]) -> bool:
    """True when every value of every (evaluated) array is finite; one host sync."""
    return bool(mx.all(mx.stack([mx.all(mx.isfinite(a)) for a in arrays])).item())


def nonfinite_error(step: int, what: str, where: str, good: Optional[Path]) -> MlxtuneError:
    """One line: the step and the batch where training diverged, and where the last good checkpoint is."""
    resume = (f"the last good checkpoint is {good} (its weights are finite; if the loss was already climbing, use an "
              f"earlier one or start over): resume with --resume PATH and a lower train.learning_rate, or check the "
              f"examples of that batch") if good else (
              "no checkpoint was written before it: lower train.learning_rate, or check the examples of that batch")
    at = f" at {where}" if where else ""
    return MlxtuneError(f"step {step}: {what}{at}; training stopped and this step was not saved; {resume}")


@contextmanager
def memory_limit(gb: Optional[float]):
    """train.memory_limit_gb: MLX's memory limit for the duration of training, the previous one restored after.

    Above the limit, MLX evaluation waits for the device before queueing more work, so the inputs that queued GPU
    command buffers keep alive cannot pile up beyond the step's live set (docs/TROUBLESHOOTING.md). None: untouched."""
    if gb is None:
        yield
        return
    previous = mx.set_memory_limit(int(gb * 1e9))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)
