"""Batches: length-bucketed padding, or packing with segment ids; a seeded, resumable batch order.

`make_batches` turns examples (`ids`, `mask`: see records.py) into a fixed list of batches, computed once, so the
trainer knows the steps per epoch and a resumed run sees the same batches. Each example contributes
`inputs = ids[:-1]`, `targets = ids[1:]` and `loss_mask = mask[1:]`, always within itself: no position ever
predicts a token of another example.

- Unpacked (`packing=False`): examples sorted by length and grouped `batch_size` at a time, each batch padded
  to a multiple of 32 positions, so a run has few distinct shapes (few compiles) and little padding.
  `segment_ids` is None.
- Packed (`packing=True`): best-fit-decreasing bins of `max_length` positions; each row holds several
  examples with `segment_ids` 1, 2, 3, ... (0 = padding) and `positions` that restart at 0 for each example.
  The model (model.py) attends only within a segment, so every example sees exactly what it would see alone;
  all rows have length `max_length`, one shape for the whole run. `batch_size` counts rows.

- Auto (`packing="auto"`, the default of `data.packing`): both are built and the one with the lower estimated
  compute is kept (`estimated_cost`): padding wastes whole token passes, while a packed row pays attention
  over all L x L pairs of its segment mask. With rows of 2048 tokens the second dominates for small models
  (on CPU, a 2-layer d=128 model trains ~2x slower packed), while for a 3B model it is ~12% of a token's cost
  and packing wins; see benchmarks/RESULTS.md. Pass `attention_weight=attention_weight(model.args)` so the
  choice fits the model; without it a ~3B model is assumed.

Normalize the loss by `Batch.n_tokens` (real target tokens), never by the number of rows or positions.
`epoch_order(n_batches, seed, epoch, shuffle)` is a pure function of its arguments: resuming at (epoch, k)
replays exactly the remaining batches.

Shapes: B rows, L positions.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

PAD_MULTIPLE = 32
"Unpacked batches are padded to a multiple of this many positions (fewer shapes, fewer compiles)."
DEFAULT_ATTENTION_WEIGHT = 5.4e-5
"attention_weight of Llama-3.2-3B (d 3072, 28 layers, 24 heads x 128, FFN 8192, vocab 128256)."


@dataclass
class Batch:
    """One micro-batch as numpy arrays (convert with `mx.array(batch.inputs)`)."""

    inputs: np.ndarray
    "(B, L) int32: each example's ids[:-1], then padding (pad_id)."
    targets: np.ndarray
    "(B, L) int32: ids[1:], aligned with inputs (padding: pad_id)."
    loss_mask: np.ndarray
    "(B, L) float32: 1 where the target is trained (mask[1:]), 0 on prompts and padding."
    segment_ids: Optional[np.ndarray]
    "(B, L) int32 for packed rows: 1, 2, ... per example, 0 on padding; None when unpacked."
    n_tokens: int
    "Sum of loss_mask: the real target tokens (divide the loss sum by this)."
    positions: Optional[np.ndarray] = None
    "(B, L) int32 for packed rows: the position within its own example (0 on padding); None when unpacked."
    n_real: int = 0
    "Positions that hold a token of an example (B * L minus padding)."
    rows: tuple = field(default_factory=tuple)
    "Per row, the indices (into `examples`) of the examples it holds, in order."

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.inputs.shape)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _arrays(examples: Sequence, max_length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """ids and mask of each example as numpy arrays, cut to max_length tokens."""
    ids, masks = [], []
    for ex in examples:
        i, m = (ex.ids, ex.mask) if hasattr(ex, "ids") else ex
        assert len(i) == len(m), "an example's ids and mask differ in length"
        ids.append(np.asarray(i[:max_length], dtype=np.int32))
        masks.append(np.asarray(m[:max_length], dtype=np.float32))
    return ids, masks


def make_batches(
    examples: Sequence,
    batch_size: int,
    max_length: int,
    packing: Union[bool, str],
    pad_id: int,
    *,
    pad_multiple: int = PAD_MULTIPLE,
    attention_weight: Optional[float] = None,
) -> list[Batch]:
    """Deterministic batches over `examples` (objects with `.ids`/`.mask`, or (ids, mask) pairs).

    `packing`: True (packed rows), False (length-bucketed) or "auto" (whichever `estimated_cost` finds
    cheaper for this data, with `attention_weight`, default DEFAULT_ATTENTION_WEIGHT; packed on ties).
    Packed batches have `segment_ids`; unpacked ones have None.
    Examples longer than `max_length` tokens are cut (load_splits already truncates and reports it); an
    example of fewer than 2 tokens has nothing to predict and is left out. Every other example appears in
    exactly one batch. The count depends only on the inputs.
    """
    if packing == "auto":
        packed = make_batches(examples, batch_size, max_length, True, pad_id, pad_multiple=pad_multiple)
        padded = make_batches(examples, batch_size, max_length, False, pad_id, pad_multiple=pad_multiple)
        w = DEFAULT_ATTENTION_WEIGHT if attention_weight is None else attention_weight
        return packed if estimated_cost(packed, w) <= estimated_cost(padded, w) else padded
    if not isinstance(packing, bool):
        raise ValueError(f"packing must be True, False or 'auto', got {packing!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    ids, masks = _arrays(examples, max_length)
    usable = [k for k, a in enumerate(ids) if len(a) >= 2]
    if packing:
        rows = pack(usable, [len(ids[k]) - 1 for k in usable], max_length)
        groups = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
        return [_packed_batch(g, ids, masks, max_length, pad_id) for g in groups]
    order = sorted(usable, key=lambda k: (len(ids[k]), k))
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return [_padded_batch(g, ids, masks, max_length, pad_id, pad_multiple) for g in groups]


def pack(items: Sequence[int], sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: `items` (ids) of `sizes` into bins of `capacity`; deterministic.

    Items go largest first (ties: input order) into the fullest bin that still has room (ties: the oldest
    bin). Returns the bins in creation order, each listing its items in insertion order.
    """
    order = sorted(range(len(items)), key=lambda j: (-sizes[j], j))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for j in order:
        size = sizes[j]
        assert 0 < size <= capacity, f"item of size {size} does not fit a bin of {capacity}"
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([items[j]])
            room, b = capacity - size, len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(items[j])
            room -= size
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def _padded_batch(group, ids, masks, max_length, pad_id, pad_multiple) -> Batch:
    longest = max(len(ids[k]) - 1 for k in group)
    L = max(longest, min(_round_up(longest, pad_multiple), max_length))
    B = len(group)
    inputs = np.full((B, L), pad_id, np.int32)
    targets = np.full((B, L), pad_id, np.int32)
    loss_mask = np.zeros((B, L), np.float32)
    for r, k in enumerate(group):
        n = len(ids[k]) - 1
        inputs[r, :n] = ids[k][:-1]
        targets[r, :n] = ids[k][1:]
        loss_mask[r, :n] = masks[k][1:]
    n_real = sum(len(ids[k]) - 1 for k in group)
    return Batch(inputs, targets, loss_mask, None, int(loss_mask.sum()), None, n_real, tuple((k,) for k in group))


def _packed_batch(group, ids, masks, max_length, pad_id) -> Batch:
    B, L = len(group), max_length
    inputs = np.full((B, L), pad_id, np.int32)
    targets = np.full((B, L), pad_id, np.int32)
    loss_mask = np.zeros((B, L), np.float32)
    segment_ids = np.zeros((B, L), np.int32)
    positions = np.zeros((B, L), np.int32)
    n_real = 0
    for r, row in enumerate(group):
        at = 0
        for s, k in enumerate(row, start=1):
            n = len(ids[k]) - 1
            inputs[r, at : at + n] = ids[k][:-1]
            targets[r, at : at + n] = ids[k][1:]
            loss_mask[r, at : at + n] = masks[k][1:]
            segment_ids[r, at : at + n] = s
            positions[r, at : at + n] = np.arange(n)
            at += n
        n_real += at
    return Batch(inputs, targets, loss_mask, segment_ids, int(loss_mask.sum()), positions, n_real, tuple(tuple(row) for row in group))


def padding_fraction(batches: Sequence[Batch]) -> float:
    """The fraction of all computed positions that are padding (0.0 = none wasted)."""
    total = sum(b.inputs.size for b in batches)
    return 1.0 - sum(b.n_real for b in batches) / total if total else 0.0


def attention_weight(args: Any) -> float:
    """The compute of attending one (query, key) pair relative to one token through the model's linear layers
    (q/k/v/o, MLP, output head), for `estimated_cost`. `args`: a ModelArgs (or anything with its fields)."""
    get = args.get if isinstance(args, dict) else (lambda k: getattr(args, k, None))
    D, F, n_layers, V, H = (get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads"))
    K = get("num_key_value_heads") or H
    hd = get("head_dim") or D // H
    linear = n_layers * (2 * D * H * hd + 2 * D * K * hd + 3 * D * F) + D * V  # multiply-adds per token
    pairs = n_layers * 2 * H * hd  # q·k and p·v per (query, key) pair
    return pairs / linear


def estimated_cost(batches: Sequence[Batch], attention_weight: float = DEFAULT_ATTENTION_WEIGHT) -> float:
    """Relative compute of training on `batches`: B·L positions through the linear layers, plus
    `attention_weight` per attended (query, key) pair: L·L per packed row (its segment mask is computed in
    full), L·(L+1)/2 per causal row. Padding counts like real tokens: it is computed all the same."""
    total = 0.0
    for b in batches:
        B, L = b.inputs.shape
        pairs = L * L if b.segment_ids is not None else L * (L + 1) / 2
        total += B * (L + attention_weight * pairs)
    return total


def epoch_order(n_batches: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order in which epoch `epoch` visits batches 0..n_batches-1: seeded, independent of history.

    The same (seed, epoch) always gives the same permutation, so a run resumed at (epoch, k) continues with
    `epoch_order(...)[k:]`. `shuffle=False` gives 0, 1, 2, ...
    """
    if not shuffle:
        return list(range(n_batches))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, int(epoch)]))
    return rng.permutation(n_batches).tolist()
