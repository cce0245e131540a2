"""Batching invariants: every example once, shifted targets within an example, fixed deterministic batches,
seeded epoch order; and on a tiny float32 model with LoRA, packed rows give the same per-example losses and
gradients as unpacked ones, and no packed example sees another."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxtune.data import Batch, Example, epoch_order, make_batches, pack, padding_fraction
from mlxtune.lora import apply_lora
from mlxtune.model import Model, ModelArgs

VOCAB = 97


def random_examples(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(lo, hi))
        ids = rng.integers(1, VOCAB, L).tolist()
        start = int(rng.integers(1, L)) if L > 1 else 1  # a prompt, then the trained response
        mask = [0] * start + [1] * (L - start)
        out.append(Example(ids, mask))
    return out


def segments_of(batch: Batch, examples: list[Example]):
    """Yield (example index, inputs, targets, loss_mask, positions) for every example in a batch."""
    for r, row in enumerate(batch.rows):
        if batch.segment_ids is None:
            (k,) = row
            n = len(examples[k].ids) - 1
            yield k, batch.inputs[r, :n], batch.targets[r, :n], batch.loss_mask[r, :n], np.arange(n)
        else:
            for s, k in enumerate(row, start=1):
                sel = batch.segment_ids[r] == s
                yield k, batch.inputs[r, sel], batch.targets[r, sel], batch.loss_mask[r, sel], batch.positions[r, sel]


@pytest.mark.parametrize("packing", [True, False])
def test_every_example_once_shifted_within_itself(packing):
    examples = random_examples(50)
    batches = make_batches(examples, batch_size=3, max_length=64, packing=packing, pad_id=0)
    seen = []
    for b in batches:
        assert b.inputs.dtype == np.int32 and b.targets.dtype == np.int32 and b.loss_mask.dtype == np.float32
        assert b.inputs.shape == b.targets.shape == b.loss_mask.shape
        assert b.n_tokens == int(b.loss_mask.sum())
        for k, inp, tgt, lm, pos in segments_of(b, examples):
            ex = examples[k]
            np.testing.assert_array_equal(inp, ex.ids[:-1])
            np.testing.assert_array_equal(tgt, ex.ids[1:])
            np.testing.assert_array_equal(lm, ex.mask[1:])
            np.testing.assert_array_equal(pos, np.arange(len(ex.ids) - 1))
            seen.append(k)
        if packing:
            assert b.shape[1] == 64 and b.positions is not None
            assert b.loss_mask[b.segment_ids == 0].sum() == 0  # padding is never a target
        else:
            assert b.segment_ids is None and b.shape[1] % 32 == 0
    assert sorted(seen) == list(range(len(examples)))
    assert sum(b.n_tokens for b in batches) == sum(sum(e.mask[1:]) for e in examples)


@pytest.mark.parametrize("packing", [True, False])
def test_deterministic_and_fixed_count(packing):
    examples = random_examples(40, seed=3)
    a = make_batches(examples, 4, 48, packing, pad_id=7)
    b = make_batches(list(examples), 4, 48, packing, pad_id=7)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.inputs, y.inputs)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
        assert x.rows == y.rows
    for x in a:  # padding positions hold pad_id and are never targets
        pad = (x.segment_ids == 0) if packing else (np.arange(x.shape[1])[None] >= np.array([[len(examples[r[0]].ids) - 1] for r in x.rows]))
        assert (x.inputs[pad] == 7).all() and (x.targets[pad] == 7).all() and x.loss_mask[pad].sum() == 0
        assert x.n_real == x.inputs.size - int(pad.sum())


def test_packed_rows_full_and_less_padding():
    examples = random_examples(200, seed=1, lo=5, hi=120)
    packed = make_batches(examples, 4, 256, True, 0)
    bucketed = make_batches(examples, 4, 256, False, 0)
    assert padding_fraction(packed) < 0.02
    assert padding_fraction(packed) < padding_fraction(bucketed)
    assert sum(len(b.rows) for b in packed) * 256 >= sum(len(e.ids) - 1 for e in examples)


def test_pack_best_fit_decreasing():
    bins = pack(list("abcdef"), [6, 5, 4, 3, 2, 2], 8)
    assert bins == [["a", "e"], ["b", "d"], ["c", "f"]]
    assert pack([0], [8], 8) == [[0]]


def test_truncates_and_drops_untrainable():
    long = Example(list(range(1, 101)), [0] * 10 + [1] * 90)
    single = Example([5], [1])
    for packing in (True, False):
        batches = make_batches([long, single], 2, 32, packing, 0)
        assert [k for b in batches for row in b.rows for k in row] == [0]
        assert batches[0].n_real == 31 and batches[0].shape[1] == 32


def test_epoch_order_seeded_and_resumable():
    a = epoch_order(50, seed=3, epoch=0, shuffle=True)
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == epoch_order(50, 3, 0, True)
    assert a != epoch_order(50, 3, 1, True)
    assert a != epoch_order(50, 4, 0, True)
    assert epoch_order(5, 3, 0, shuffle=False) == [0, 1, 2, 3, 4]
    assert epoch_order(0, 1, 0, True) == []


def test_padding_fraction():
    ex = [Example([1, 2, 3], [0, 1, 1])]
    (b,) = make_batches(ex, 1, 64, False, 0)
    assert b.shape == (1, 32) and padding_fraction([b]) == pytest.approx(1 - 2 / 32)
    assert padding_fraction([]) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Packed == unpacked on a real (tiny) model


def tiny_model(model_type: str) -> Model:
    extra = dict(rope_theta=500000.0, tie_word_embeddings=True,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16})
    if model_type == "qwen2":
        extra = dict(rope_theta=1e6, tie_word_embeddings=False)
    args = ModelArgs(model_type=model_type, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5, **extra)
    mx.random.seed(0)
    model = Model(args)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, verbose=False)
    # lora_b starts at zero (so lora_a would get no gradient): make both non-trivial
    params = [(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(params, strict=False)
    model.eval()
    mx.eval(model.parameters())
    return model


def token_ce(model: Model, batch: Batch) -> mx.array:
    """Per-position masked cross-entropy (B, L) in float32."""
    kw = {}
    if batch.segment_ids is not None:
        kw = dict(segment_ids=mx.array(batch.segment_ids), positions=mx.array(batch.positions))
    logits = model(mx.array(batch.inputs), **kw).astype(mx.float32)
    return nn.losses.cross_entropy(logits, mx.array(batch.targets)) * mx.array(batch.loss_mask)


def per_example_losses(model: Model, batches: list[Batch]) -> dict[int, float]:
    out = {}
    for b in batches:
        ce = np.array(token_ce(model, b))
        for r, row in enumerate(b.rows):
            for s, k in enumerate(row, start=1):
                sel = (b.segment_ids[r] == s) if b.segment_ids is not None else slice(None)
                out[k] = float(ce[r, sel].sum())
    return out


def total_loss_grads(model: Model, batches: list[Batch]):
    n = sum(b.n_tokens for b in batches)

    def loss_fn(_params):
        return sum(token_ce(model, b).sum() for b in batches) / n

    loss, grads = nn.value_and_grad(model, loss_fn)(model.trainable_parameters())
    mx.eval(loss, grads)
    return float(loss), dict(tree_flatten(grads))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_equals_unpacked_losses_and_grads(model_type):
    model = tiny_model(model_type)
    examples = random_examples(9, seed=5, lo=3, hi=30)
    alone = [make_batches([ex], 1, 64, False, 0)[0] for ex in examples]  # one example per forward
    for b, k in zip(alone, range(len(examples))):
        b.rows = ((k,),)
    packed = make_batches(examples, 2, 64, True, 0)
    bucketed = make_batches(examples, 3, 64, False, 0)
    assert any(len(row) > 1 for b in packed for row in b.rows), "the test needs rows holding several examples"

    ref = per_example_losses(model, alone)
    for batches in (packed, bucketed):
        got = per_example_losses(model, batches)
        assert got.keys() == ref.keys()
        for k in ref:
            n = max(1, sum(examples[k].mask[1:]))
            assert abs(got[k] - ref[k]) / n <= 1e-5, (k, got[k], ref[k])

    loss_ref, g_ref = total_loss_grads(model, alone)
    for batches in (packed, bucketed):
        loss, g = total_loss_grads(model, batches)
        assert abs(loss - loss_ref) <= 1e-5
        assert g.keys() == g_ref.keys() and len(g) > 0
        for name in g_ref:
            diff = float(mx.abs(g[name] - g_ref[name]).max())
            assert diff <= 1e-5, (name, diff)
        assert max(float(mx.abs(v).max()) for v in g.values()) > 1e-4  # the gradients are not trivially zero


def test_packed_examples_do_not_see_each_other():
    model = tiny_model("llama")
    a = Example(list(range(1, 11)), [0] * 3 + [1] * 7)
    b = Example(list(range(20, 36)), [0] * 5 + [1] * 11)
    c = Example(list(range(40, 53)), [0] * 2 + [1] * 11)
    b2 = Example([(t * 7) % VOCAB + 1 for t in b.ids], b.mask)
    (x,) = make_batches([a, b, c], 1, 64, True, 0)
    (y,) = make_batches([a, b2, c], 1, 64, True, 0)
    assert x.rows == y.rows and len(x.rows[0]) == 3

    def logits(batch, segments=True):
        kw = dict(segment_ids=mx.array(batch.segment_ids), positions=mx.array(batch.positions)) if segments else {}
        return np.array(model(mx.array(batch.inputs), **kw))

    lx, ly = logits(x), logits(y)
    changed = x.segment_ids[0] == x.rows[0].index(1) + 1
    others = (x.segment_ids[0] > 0) & ~changed
    assert np.abs(lx[0, others] - ly[0, others]).max() <= 1e-6
    assert np.abs(lx[0, changed] - ly[0, changed]).max() > 1e-3
    # Sanity: without segment ids the later examples would see the perturbation (the test can detect leaks).
    later = x.segment_ids[0] > x.rows[0].index(1) + 1
    if later.any():
        assert np.abs(logits(x, False)[0, later] - logits(y, False)[0, later]).max() > 1e-4


def test_auto_packing_picks_the_cheaper_layout():
    from mlxtune.data import DEFAULT_ATTENTION_WEIGHT, attention_weight, estimated_cost

    examples = random_examples(400, seed=2, lo=20, hi=200)
    packed = make_batches(examples, 4, 2048, True, 0)
    bucketed = make_batches(examples, 4, 2048, False, 0)
    free_attention = make_batches(examples, 4, 2048, "auto", 0, attention_weight=0.0)  # padding is all that costs
    costly_attention = make_batches(examples, 4, 2048, "auto", 0, attention_weight=1e-2)  # 2048² pairs dominate
    assert [b.rows for b in free_attention] == [b.rows for b in packed] and free_attention[0].segment_ids is not None
    assert [b.rows for b in costly_attention] == [b.rows for b in bucketed] and costly_attention[0].segment_ids is None
    assert estimated_cost(packed, 0.0) < estimated_cost(bucketed, 0.0)
    # the default weight is Llama-3.2-3B's
    llama32_3b = ModelArgs(model_type="llama", hidden_size=3072, num_hidden_layers=28, intermediate_size=8192,
                           num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256)
    assert attention_weight(llama32_3b) == pytest.approx(DEFAULT_ATTENTION_WEIGHT, rel=0.01)
    assert attention_weight(llama32_3b.to_hf_config()) == attention_weight(llama32_3b)
    with pytest.raises(ValueError):
        make_batches(examples, 4, 64, "yes", 0)
