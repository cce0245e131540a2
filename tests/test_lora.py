"""LoRA invariants: B = 0 is the base model; fused == unfused (dense and quantized base); a saved fused dir
gives the same logits in transformers and mlx-lm; targets and layers select what they say (plan_lora, the one
selection); gradient checkpointing gives the same gradients as the plain forward, with dropout too."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import make_tiny_model_dir
from core_helpers import RTOL, hf_logits, mlx_logits, rel_err
from mlxtune.errors import ConfigError, MlxtuneError
from mlxtune.loading import load
from mlxtune.saving import save_model
from mlxtune.lora import LoRALinear, apply_lora, fuse, lora_modules, merge_lora, plan_lora
from mlxtune.model import Model, ModelArgs


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "llama": make_tiny_model_dir(root / "llama", "llama"),
        "qwen2": make_tiny_model_dir(root / "qwen2", "qwen2", seed=1),
    }


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(0, 512, size=(2, 48))


def randomize_b(model, seed: int = 0, scale: float = 0.05) -> None:
    """Give every lora_b random values so the adapter changes the output."""
    mx.random.seed(seed)
    for m in lora_modules(model).values():
        m.lora_b = scale * mx.random.normal(m.lora_b.shape)


def test_zero_b_is_the_base_model(tiny_dirs, ids):
    model, _ = load(tiny_dirs["llama"], tokenizer=False)
    base = mlx_logits(model, ids)
    apply_lora(model, rank=8, alpha=16, verbose=False)
    assert np.array_equal(mlx_logits(model, ids), base)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_equals_unfused(tiny_dirs, ids, family):
    model, _ = load(tiny_dirs[family], tokenizer=False)
    base = mlx_logits(model, ids)
    apply_lora(model, rank=8, alpha=16, verbose=False)
    randomize_b(model)
    unfused = mlx_logits(model, ids)
    assert rel_err(unfused, base) > 1e-3  # the adapter does something
    merge_lora(model)
    assert not lora_modules(model)
    assert rel_err(mlx_logits(model, ids), unfused) <= 1e-6


def test_fused_equals_unfused_over_quantized_base(tiny_dirs, ids):
    model, _ = load(tiny_dirs["llama"], tokenizer=False, quantize={"bits": 4, "group_size": 32})
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    base = mlx_logits(model, ids)
    apply_lora(model, rank=8, alpha=16, verbose=False)
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    randomize_b(model)
    unfused = mlx_logits(model, ids)
    merge_lora(model)  # dequantize, add the delta in float32: the adapter is not lost (mlx-lm #1172)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    fused = mlx_logits(model, ids)
    assert rel_err(unfused, base) > 1e-3
    assert rel_err(fused, unfused) <= 1e-5  # same dequantized weights, different matmul kernels


def test_saved_fused_dir_loads_in_transformers_and_mlx_lm(tiny_dirs, ids, tmp_path):
    from mlx_lm.utils import load_model

    model, _ = load(tiny_dirs["qwen2"], tokenizer=False)
    apply_lora(model, rank=8, alpha=16, verbose=False)
    randomize_b(model)
    unfused = mlx_logits(model, ids)
    out = save_model(model, None, tmp_path / "fused")  # merges LoRA into the written weights
    assert lora_modules(model)  # ... and leaves the model in memory as it was
    assert rel_err(hf_logits(out, ids), unfused) <= RTOL
    theirs, _ = load_model(out)
    assert rel_err(mlx_logits(theirs, ids), unfused) <= RTOL
    again, _ = load(out, tokenizer=False)
    assert rel_err(mlx_logits(again, ids), unfused) <= RTOL


def test_misspelled_target_says_did_you_mean(tiny_dirs):
    model, _ = load(tiny_dirs["llama"], tokenizer=False)
    with pytest.raises(MlxtuneError, match='did you mean "q_proj"'):
        apply_lora(model, targets=["q_prj", "v_proj"], verbose=False)
    assert not lora_modules(model)  # nothing half-applied


def test_targets_and_layers_subset(tiny_dirs):
    model, _ = load(tiny_dirs["llama"], tokenizer=False)
    paths = apply_lora(model, rank=4, targets=["q", "v"], layers=1, verbose=False)
    assert sorted(paths) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert sorted(lora_modules(model)) == sorted(paths)
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert sorted(trainable) == sorted(f"{p}.{ab}" for p in paths for ab in ("lora_a", "lora_b"))

    model, _ = load(tiny_dirs["llama"], tokenizer=False)
    paths = apply_lora(model, rank=4, targets=["down_proj"], layers=[0], verbose=False)
    assert paths == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(MlxtuneError, match="out of range"):
        apply_lora(model, layers=[5], verbose=False)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_grad_checkpoint_gives_the_same_gradients(tiny_dirs, ids, dropout):
    model, _ = load(tiny_dirs["llama"], tokenizer=False)
    apply_lora(model, rank=8, alpha=16, dropout=dropout, verbose=False)
    randomize_b(model)
    model.train()
    x = mx.array(ids)
    weights = mx.random.normal((2, 48, 512), key=mx.random.key(7))

    def loss_fn(m):
        return (m(x) * weights).sum()

    grads = {}
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt
        mx.random.seed(123)  # the same dropout keys for both runs
        loss, g = nn.value_and_grad(model, loss_fn)(model)
        grads[ckpt] = (loss.item(), dict(tree_flatten(g)))
    assert grads[False][0] == pytest.approx(grads[True][0], rel=1e-6)
    plain, ckpt = grads[False][1], grads[True][1]
    assert sorted(plain) == sorted(ckpt) and len(plain) == 2 * 7 * 2
    for k in plain:
        assert rel_err(np.array(ckpt[k]), np.array(plain[k])) <= 1e-5, k
    if dropout:  # dropout really is on: another seed gives other gradients
        model.grad_checkpoint = False
        mx.random.seed(124)
        _, g = nn.value_and_grad(model, loss_fn)(model)
        k = "model.layers.0.self_attn.q_proj.lora_a"
        assert rel_err(np.array(dict(tree_flatten(g))[k]), np.array(plain[k])) > 1e-3


def test_lora_linear_from_base_shapes():
    base = nn.Linear(64, 32, bias=True)
    lora = LoRALinear.from_base(base, rank=4, alpha=8)
    assert lora.lora_a.shape == (64, 4) and lora.lora_b.shape == (4, 32) and lora.scale == 2.0
    q = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    assert LoRALinear.from_base(q, rank=4).lora_a.shape == (64, 4)


# --- plan_lora: the one selection ---------------------------------------------------------------------------


def _lazy_model(n_layers=4):
    """A model built from ModelArgs without evaluating a weight (as the memory estimate builds one)."""
    args = ModelArgs(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    return Model(args)


def test_plan_lora_layers_and_targets():
    model = _lazy_model(4)
    assert plan_lora(model, ["q"], 1) == ["model.layers.3.self_attn.q_proj"]  # int n: the LAST n layers
    assert plan_lora(model, ["q"], 2) == ["model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    assert plan_lora(model, ["down_proj"], [0, -1]) == ["model.layers.0.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert len(plan_lora(model, None, None)) == 4 * 7
    assert plan_lora(model, ["self_attn.v_proj"], [1]) == ["model.layers.1.self_attn.v_proj"]  # dotted suffix
    with pytest.raises(ConfigError, match="between 1 and 4"):
        plan_lora(model, None, 5)  # more layers than the model has is an error, not silently "all"
    with pytest.raises(ConfigError, match="between 1 and 4"):
        plan_lora(model, None, 0)
    with pytest.raises(ConfigError, match="out of range"):
        plan_lora(model, None, [4])
    with pytest.raises(ConfigError, match='did you mean "gate_proj"'):
        plan_lora(model, ["gate_prj"], None)


def test_plan_lora_is_what_apply_wraps_and_sees_lora_layers():
    model = _lazy_model(3)
    plan = plan_lora(model, ["q", "v", "up"], 2)
    assert apply_lora(model, rank=4, targets=["q", "v", "up"], layers=2, verbose=False) == plan
    assert sorted(lora_modules(model)) == plan
    # on a model that has LoRA, a LoRA layer counts at its own path (its base `.linear` is not listed)
    assert plan_lora(model, ["q", "v", "up"], 2) == plan


# --- merging: one path ----------------------------------------------------------------------------------


def test_fuse_is_a_deprecated_alias_of_merge_lora(tiny_dirs, ids):
    a, _ = load(tiny_dirs["llama"], tokenizer=False)
    b, _ = load(tiny_dirs["llama"], tokenizer=False)
    for m in (a, b):
        mx.random.seed(5)  # the same lora_a init
        apply_lora(m, rank=4, alpha=8, verbose=False)
        randomize_b(m)
    merge_lora(a)
    with pytest.warns(DeprecationWarning, match="merge_lora"):
        fuse(b)
    assert not lora_modules(a) and not lora_modules(b)
    assert np.array_equal(mlx_logits(a, ids), mlx_logits(b, ids))
    layer = LoRALinear.from_base(nn.Linear(16, 8), rank=2)
    with pytest.warns(DeprecationWarning, match="merged"):
        old = layer.fuse()
    assert np.array_equal(np.array(old.weight), np.array(layer.merged().weight))


def test_merge_keeps_quantized_on_request():
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    lora = LoRALinear.from_base(base, rank=4)
    lora.lora_b = 0.1 * mx.random.normal(lora.lora_b.shape, key=mx.random.key(1))
    assert isinstance(lora.merged(), nn.Linear) and not isinstance(lora.merged(), nn.QuantizedLinear)
    q = lora.merged(quantized=True)
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)
    x = mx.random.normal((3, 64), key=mx.random.key(2))
    assert rel_err(np.array(q(x)), np.array(lora(x))) < 0.1  # within 4-bit re-quantization error


def test_dropout_key_is_explicit():
    """The same key gives the same mask, another key another; no key uses the global RNG."""
    layer = LoRALinear.from_base(nn.Linear(32, 16), rank=4, dropout=0.5)
    layer.lora_b = mx.ones(layer.lora_b.shape)
    layer.train()
    x = mx.ones((2, 32))
    k1, k2 = mx.random.key(1), mx.random.key(2)
    assert np.array_equal(np.array(layer(x, k1)), np.array(layer(x, k1)))
    assert not np.array_equal(np.array(layer(x, k1)), np.array(layer(x, k2)))
    layer.eval()
    assert np.array_equal(np.array(layer(x, k1)), np.array(layer(x, k2)))  # no dropout outside training
