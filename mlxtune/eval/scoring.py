"""Scoring a model on batches: token NLL, loss, perplexity and bits per byte.

Scoring carries sums and counts and divides once: `score` sums the NLL (nats) of every target token
(loss_mask == 1) and counts them, so loss = nll_sum / n_tokens is token-weighted whatever the batch shapes,
and ppl = exp(loss). `bits_per_byte` divides by the UTF-8 bytes of the target text instead of by tokens,
bpb = nll_sum / (ln 2 * n_bytes), which is comparable across tokenizers (as in nanochat's evaluate_bpb);
special tokens (end-of-turn, ...) are left out of both sums there, since they have no bytes and differ by
tokenizer.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..generation import inference_mode
from ..loss import chunk_size_for, token_nll as chunk_nll
from ..tokenizer import unwrap


def token_nll(model: nn.Module, batch: Any) -> mx.array:
    """Per-token NLL in nats (B, L) float32 of `batch.targets`, 0 where loss_mask is 0.

    The output projection runs a chunk of tokens at a time (loss.chunk_size_for), so B x L x V logits never
    exist at once. Packed batches (segment_ids) attend within their own example.
    """
    seg = None if batch.segment_ids is None else mx.array(batch.segment_ids)
    pos = None if getattr(batch, "positions", None) is None else mx.array(batch.positions)
    inputs = mx.array(batch.inputs)
    B, L = inputs.shape
    h = model(inputs, segment_ids=seg, positions=pos, return_hidden=True).reshape(B * L, -1)  # (B*L, D)
    targets = mx.array(batch.targets).reshape(-1)
    chunk = chunk_size_for(model.args.vocab_size)
    parts = []
    for s in range(0, B * L, chunk):
        nll = chunk_nll(model.project, h[s : s + chunk], targets[s : s + chunk])  # (n,)
        mx.eval(nll)
        parts.append(nll)
    return mx.concatenate(parts).reshape(B, L) * mx.array(batch.loss_mask)


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS/pad, end-of-turn, headers, reserved ...)."""
    tok = unwrap(tokenizer)
    ids = set(int(i) for i in getattr(tok, "all_special_ids", []) or [])
    for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def _target_bytes(tokenizer: Any, targets: np.ndarray, keep: np.ndarray, segment_ids: Optional[np.ndarray]) -> int:
    """UTF-8 bytes of the text of the kept target tokens: each maximal run (within one example) decoded whole,
    so characters split across tokens count once."""
    tok = unwrap(tokenizer)
    total = 0
    for r in range(targets.shape[0]):
        run: list[int] = []
        for j in range(targets.shape[1]):
            same_segment = segment_ids is None or j == 0 or segment_ids[r, j] == segment_ids[r, j - 1]
            if run and (not keep[r, j] or not same_segment):
                total += len(tok.decode(run).encode("utf-8"))
                run = []
            if keep[r, j]:
                run.append(int(targets[r, j]))
        if run:
            total += len(tok.decode(run).encode("utf-8"))
    return total


def nll_sums(model: nn.Module, batches: Iterable[Any], tokenizer: Any = None) -> dict:
    """One pass over the batches (in eval mode, restored after): {"loss_sum", "n_tokens"} over the target
    tokens, and with a tokenizer also the bits-per-byte sums {"bpb_nll_sum", "bpb_tokens", "n_bytes"}."""
    loss_sum, n_tokens, bpb_nll, n_bytes, bpb_tokens = 0.0, 0, 0.0, 0, 0
    specials = np.array(sorted(special_token_ids(tokenizer)), dtype=np.int64) if tokenizer is not None else None
    with inference_mode(model):
        for batch in batches:
            nll = np.array(token_nll(model, batch), dtype=np.float64)
            mask = np.asarray(batch.loss_mask) > 0
            loss_sum += float(nll[mask].sum())
            n_tokens += int(mask.sum())
            if tokenizer is not None:
                keep = mask & ~np.isin(np.asarray(batch.targets), specials)
                bpb_nll += float(nll[keep].sum())
                bpb_tokens += int(keep.sum())
                n_bytes += _target_bytes(tokenizer, np.asarray(batch.targets), keep, batch.segment_ids)
    out = {"loss_sum": loss_sum, "n_tokens": n_tokens}
    if tokenizer is not None:
        out.update({"bpb_nll_sum": bpb_nll, "bpb_tokens": bpb_tokens, "n_bytes": n_bytes})
    return out


def perplexity(loss: float) -> float:
    """exp(loss) for a mean NLL in nats; inf past exp's float range, NaN for NaN."""
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


def loss_fields(sums: dict) -> dict:
    """{"loss_sum", "n_tokens", "loss", "ppl"} from nll_sums' totals (NaN loss when there are no tokens)."""
    loss = sums["loss_sum"] / sums["n_tokens"] if sums["n_tokens"] else float("nan")
    return {"loss_sum": sums["loss_sum"], "n_tokens": sums["n_tokens"], "loss": loss, "ppl": perplexity(loss)}


def bpb_fields(sums: dict) -> dict:
    """{"nll_sum", "n_tokens", "n_bytes", "bpb"} from nll_sums' bits-per-byte totals (NaN when no bytes)."""
    bpb = sums["bpb_nll_sum"] / (math.log(2) * sums["n_bytes"]) if sums["n_bytes"] else float("nan")
    return {"nll_sum": sums["bpb_nll_sum"], "n_tokens": sums["bpb_tokens"], "n_bytes": sums["n_bytes"], "bpb": bpb}


def score(model: nn.Module, batches: Iterable[Any]) -> dict:
    """{"loss_sum", "n_tokens", "loss", "ppl"}: summed NLL (nats) over target tokens, their count,
    loss = loss_sum / n_tokens (token-weighted), ppl = exp(loss). NaN when there are no target tokens."""
    return loss_fields(nll_sums(model, batches))


def bits_per_byte(model: nn.Module, batches: Iterable[Any], tokenizer: Any) -> dict:
    """{"nll_sum", "n_tokens", "n_bytes", "bpb"}: bpb = nll_sum / (ln 2 * n_bytes) over the non-special target
    tokens and the UTF-8 bytes of their text."""
    return bpb_fields(nll_sums(model, batches, tokenizer))
