"""Masked cross-entropy on hidden states, in chunks: returns (loss_sum, n_tokens), never a mean.

The output projection is applied a chunk of tokens at a time, so the B x L x V float32 logits (2 GB for 4 x 512
tokens of a 128k vocabulary) never exist at once, not even for the backward pass: each chunk's gradient is
written by hand (`_ce_sum_fused`), recomputing the chunk's logits from its hidden states.

Carrying (sum, count) lets gradient accumulation, evaluation and metrics aggregate exactly and divide once
(token-weighted), whatever the micro-batch lengths.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

# Chunk so that one chunk's float32 logits hold about this many elements (16M = 64 MB). A chunk's backward holds
# the logits, one float32 copy and the gradient in the logits' dtype, whatever the sequence length.
LOGITS_CHUNK_ELEMENTS = 1 << 24


def chunk_size_for(vocab_size: int) -> int:
    return max(64, LOGITS_CHUNK_ELEMENTS // max(vocab_size, 1))


def token_nll(project: Callable, h: mx.array, targets: mx.array) -> mx.array:
    """Per-token NLL in nats (N,) float32 for hidden states h (N, D) and targets (N,)."""
    logits = project(h).astype(mx.float32)  # (N, V)
    lse = mx.logsumexp(logits, axis=-1)
    return lse - mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1)


def _ce_sum(project: Callable, h: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum of masked token NLL for h (N, D), targets (N,), mask (N,) float."""
    return (token_nll(project, h, targets) * mask).sum()


def _ce_sum_fused(project: Callable, h: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """`_ce_sum` with a hand-written gradient that keeps nothing from the forward but h.

    The backward recomputes the logits and writes their gradient, (softmax - one-hot) x cotangent x mask, in one
    elementwise pass in the logits' dtype, then takes project's input gradient from it. Autodiff through
    logsumexp and take_along_axis instead keeps a chain of float32 (N, V) intermediates; on the H100 that was
    most of the step's live set above the weights (benchmarks/NOTES.md).
    """

    @mx.custom_function
    def f(x):
        return _ce_sum(project, x, targets, mask)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x = primals[0] if isinstance(primals, (list, tuple)) else primals  # MLX passes a lone input bare
        logits = project(x)
        lf = logits.astype(mx.float32)
        lse = mx.logsumexp(lf, axis=-1, keepdims=True)
        w = (cotangent * mask)[:, None]
        onehot = mx.arange(lf.shape[-1])[None, :] == targets[:, None]
        g = ((mx.exp(lf - lse) - onehot) * w).astype(logits.dtype)
        _, (dx,) = mx.vjp(project, [x], [g])
        return dx

    return f(h)


def chunked_ce_sum(
    project: Callable, hidden: mx.array, targets: mx.array, mask: mx.array, chunk_size: Optional[int] = None, vocab_size: int = 0,
    fused: bool = True,
) -> mx.array:
    """Σ mask · NLL over hidden (B, L, D) → scalar float32, projecting `chunk_size` tokens at a time.

    fused=False: plain autodiff through each chunk, for a projection whose own weights train (the custom
    gradient, like mx.checkpoint, differentiates its input only); each chunk's logits then stay alive."""
    piece = _ce_sum_fused if fused else _ce_sum
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)
    t = targets.reshape(-1)
    m = mask.reshape(-1).astype(mx.float32)
    N = h.shape[0]
    chunk = chunk_size or chunk_size_for(vocab_size)
    if N <= chunk:
        return piece(project, h, t, m)
    total = mx.array(0.0, dtype=mx.float32)
    for s in range(0, N, chunk):
        # Chain the chunks: chunk i's input depends on the running total, so MLX cannot schedule the chunks side
        # by side (it would, and then every chunk's logits are alive at once — chunking would bound nothing).
        # Through the zero term the backward is chained too: chunk i-1's gradient waits for chunk i's.
        hs = h[s : s + chunk] if s == 0 else h[s : s + chunk] + (0.0 * total).astype(h.dtype)
        # Each fused chunk's backward recomputes its logits from hs: it keeps only its input.
        total = total + piece(project, hs, t[s : s + chunk], m[s : s + chunk])
    return total


def loss_sum(model, inputs: mx.array, targets: mx.array, loss_mask: mx.array, segment_ids: Optional[mx.array] = None,
             chunk_size: Optional[int] = None) -> tuple[mx.array, mx.array]:
    """(Σ masked NLL, number of target tokens) for one batch; inputs/targets/loss_mask (B, L)."""
    hidden = model(inputs, segment_ids=segment_ids, return_hidden=True)
    fused = not tree_flatten(model.output_weight().trainable_parameters())
    total = chunked_ce_sum(model.project, hidden, targets, loss_mask, chunk_size, model.args.vocab_size, fused)
    return total, loss_mask.astype(mx.float32).sum()


def batch_arrays(batch) -> tuple:
    """A data Batch (numpy fields) → the mx arrays loss_sum takes: (inputs, targets, loss_mask, segment_ids)."""
    seg = None if batch.segment_ids is None else mx.array(batch.segment_ids)
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.loss_mask), seg
