"""Masked cross-entropy on hidden states, in chunks: returns (loss_sum, n_tokens), never a mean.

The output projection is applied a chunk of tokens at a time under `mx.checkpoint`, so the B x L x V float32
logits (2 GB for 4 x 512 tokens of a 128k vocabulary) never exist at once, not even for the backward pass:
each chunk's logits are recomputed from its hidden states when the gradient flows through it.

Carrying (sum, count) lets gradient accumulation, evaluation and metrics aggregate exactly and divide once
(token-weighted), whatever the micro-batch lengths.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import mlx.core as mx

# Chunk so that one chunk's float32 logits hold about this many elements (16M = 64 MB). The loss keeps about 4
# such buffers alive in the forward and 8 in the backward (measured), whatever the sequence length.
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


def chunked_ce_sum(
    project: Callable, hidden: mx.array, targets: mx.array, mask: mx.array, chunk_size: Optional[int] = None, vocab_size: int = 0
) -> mx.array:
    """Σ mask · NLL over hidden (B, L, D) → scalar float32, projecting `chunk_size` tokens at a time."""
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)
    t = targets.reshape(-1)
    m = mask.reshape(-1).astype(mx.float32)
    N = h.shape[0]
    chunk = chunk_size or chunk_size_for(vocab_size)
    if N <= chunk:
        return _ce_sum(project, h, t, m)
    total = mx.array(0.0, dtype=mx.float32)
    for s in range(0, N, chunk):
        # Chain the chunks: chunk i's input depends on the running total, so MLX cannot schedule the chunks side
        # by side (it would, and then every chunk's logits are alive at once — chunking would bound nothing).
        # Through the zero term the backward is chained too: chunk i-1's gradient waits for chunk i's.
        hs = h[s : s + chunk] if s == 0 else h[s : s + chunk] + (0.0 * total).astype(h.dtype)
        # targets and mask are bound (not passed) so the checkpoint takes no gradient through integer indices;
        # bind by value: a late-bound closure would recompute every chunk with the last chunk's targets.
        fn = partial(_ce_sum, project, targets=t[s : s + chunk], mask=m[s : s + chunk])
        total = total + mx.checkpoint(fn)(hs)
    return total


def loss_sum(model, inputs: mx.array, targets: mx.array, loss_mask: mx.array, segment_ids: Optional[mx.array] = None,
             chunk_size: Optional[int] = None) -> tuple[mx.array, mx.array]:
    """(Σ masked NLL, number of target tokens) for one batch; inputs/targets/loss_mask (B, L)."""
    hidden = model(inputs, segment_ids=segment_ids, return_hidden=True)
    total = chunked_ce_sum(model.project, hidden, targets, loss_mask, chunk_size, model.args.vocab_size)
    return total, loss_mask.astype(mx.float32).sum()


def batch_arrays(batch) -> tuple:
    """A data Batch (numpy fields) → the mx arrays loss_sum takes: (inputs, targets, loss_mask, segment_ids)."""
    seg = None if batch.segment_ids is None else mx.array(batch.segment_ids)
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.loss_mask), seg
