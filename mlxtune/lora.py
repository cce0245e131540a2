"""LoRA: a wrapper around a frozen linear layer, injected by path, fused back in float32.

`LoRALinear` stores `lora_a (in, r)` and `lora_b (r, out)` with `scale = alpha / rank`, the same names and
layout mlx-lm uses, and keeps the wrapped layer under `.linear` (also mlx-lm's name), so an mlxtune model with
LoRA has the parameter tree mlx-lm's tools expect. PEFT's layout (`lora_A.weight (r, in)`,
`lora_B.weight (out, r)`) is converted at export (export.py).

    y = linear(x) + scale * (dropout(x) @ lora_a) @ lora_b

`lora_b` starts at zero, so a freshly wrapped model is exactly the base model.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MlxtuneError, did_you_mean

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Short names a user may write in a config: `targets: [q, k, v, o, gate, up, down]`.
SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


# Stack of [key] set by `dropout_keys` while a checkpointed layer runs; empty otherwise.
_KEYS: list = []


class dropout_keys:
    """Context: LoRA dropout inside draws its masks from `key` (deterministic for a given key).

    mx.checkpoint recomputes a layer's forward in the backward pass; with the global RNG the recomputation
    would draw different dropout masks than the forward and the gradients would be wrong. The checkpointed
    call passes a key in as an input, so the forward and its recomputation see the same masks.
    """

    def __init__(self, key: mx.array):
        self.key = key

    def __enter__(self):
        _KEYS.append([self.key])

    def __exit__(self, *exc):
        _KEYS.pop()


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or nn.QuantizedLinear."""
    out_dims, packed_in = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return packed_in * 32 // layer.bits, out_dims
    return packed_in, out_dims


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` / `nn.QuantizedLinear` plus a trainable low-rank update."""

    @staticmethod
    def from_base(linear: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> "LoRALinear":
        in_dims, out_dims = linear_dims(linear)
        lora = LoRALinear(in_dims, out_dims, rank=rank, alpha=alpha, dropout=dropout)
        lora.linear = linear
        return lora

    def __init__(self, in_dims: int, out_dims: int, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        if rank <= 0:
            raise MlxtuneError(f"lora.rank must be a positive integer, got {rank}")
        self.linear = nn.Linear(in_dims, out_dims, bias=bias)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = float(dropout)
        bound = 1.0 / math.sqrt(in_dims)  # kaiming-uniform(a=sqrt(5)) bound, as PEFT and mlx-lm initialize A
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.linear.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = self._dropout(x) if (self.dropout > 0 and self.training) else x
        z = (z @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def _dropout(self, x: mx.array) -> mx.array:
        keep = 1.0 - self.dropout
        if _KEYS:  # inside a checkpointed layer: draw from the key it was given, so recomputation agrees
            _KEYS[-1][0], sub = mx.random.split(_KEYS[-1][0])
            mask = mx.random.bernoulli(keep, x.shape, key=sub)
        else:
            mask = mx.random.bernoulli(keep, x.shape)
        return mx.where(mask, x / keep, mx.zeros_like(x))

    def delta(self) -> mx.array:
        """The update to the weight, (out, in), in float32."""
        return self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32)).T

    def fuse(self, dequantize: bool = True) -> nn.Module:
        """Merge into a plain layer: W + scale * (A @ B)^T, computed in float32 and cast back.

        A quantized base is dequantized first (merging into the packed ints would lose the adapter); the result
        is a float `nn.Linear` — re-quantize afterwards if you want a quantized model.
        """
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            w = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits)
            dtype = base.scales.dtype
        else:
            w, dtype = base.weight, base.weight.dtype
        fused_w = (w.astype(mx.float32) + self.delta()).astype(dtype)
        out_dims, in_dims = fused_w.shape
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = fused_w
        if has_bias:
            fused.bias = base.bias
        return fused


def _resolve_targets(targets: Optional[Iterable[str]]) -> list[str]:
    if targets is None:
        return list(DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return [SHORT_TARGETS.get(t, t) for t in targets]


def _resolve_layers(layers: Union[None, int, Sequence[int]], n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):  # the last `layers` layers (mlx-lm's num_layers convention)
        if not 0 < layers <= n_layers:
            raise MlxtuneError(f"lora.layers={layers} must be between 1 and {n_layers} (the model's layer count)")
        return list(range(n_layers - layers, n_layers))
    out = []
    for i in layers:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise MlxtuneError(f"lora.layers: layer index {i} is out of range for a model with {n_layers} layers")
        out.append(j)
    return sorted(set(out))


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: Optional[Iterable[str]] = None,
    layers: Union[None, int, Sequence[int]] = None,
    verbose: bool = True,
) -> list[str]:
    """Freeze the model and wrap the target linears of the chosen layers with LoRA.

    targets: module names (`q_proj`, ..., short `q`, ..., or a dotted suffix like `self_attn.q_proj`);
             default all seven projections. A target that matches nothing is an error.
    layers:  None = every layer; an int n = the last n layers; a list = those layer indices.
    Returns the dotted paths that were wrapped (e.g. `model.layers.0.self_attn.q_proj`).
    """
    target_names = _resolve_targets(targets)
    n_layers = len(model.layers)
    chosen = set(_resolve_layers(layers, n_layers))
    model.freeze()
    linear_paths = [
        name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and ".layers." in f".{name}"
    ]
    suffixes = sorted({p.split(".layers.", 1)[1].split(".", 1)[1] for p in linear_paths})
    matched: dict[str, list[str]] = {t: [] for t in target_names}
    wrapped = []
    for path in linear_paths:
        rest = path.split(".layers.", 1)[1]
        idx_s, local = rest.split(".", 1)
        for t in target_names:
            if local == t or local.endswith("." + t):
                matched[t].append(path)
                if int(idx_s) in chosen:
                    wrapped.append(path)
                break
    unmatched = [t for t, ps in matched.items() if not ps]
    if unmatched:
        leaf_names = sorted({s.rsplit(".", 1)[-1] for s in suffixes})
        hints = "; ".join(f"{t!r}{did_you_mean(t, leaf_names)}" for t in unmatched)
        raise MlxtuneError(
            f"lora.targets: {hints} matched no linear layer; the model's linear layers are {', '.join(leaf_names)}"
        )
    if alpha <= 0:
        raise MlxtuneError(f"lora.alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise MlxtuneError(f"lora.dropout must be in [0, 1), got {dropout}")
    modules = dict(model.named_modules())
    updates = []
    for path in wrapped:
        updates.append((path, LoRALinear.from_base(modules[path], rank=rank, alpha=alpha, dropout=dropout)))
    from mlx.utils import tree_unflatten

    model.update_modules(tree_unflatten(updates))
    inner = getattr(model, "model", None)
    if dropout > 0 and inner is not None and hasattr(inner, "lora_dropout"):
        inner.lora_dropout = True
    if verbose:
        trainable, total = count_trainable(model)
        print(
            f"LoRA rank {rank}, alpha {alpha:g} on {len(wrapped)} layers "
            f"({', '.join(target_names)}): {trainable:,} trainable parameters "
            f"({100 * trainable / max(total, 1):.3f}% of {total:,})"
        )
    return wrapped


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights at their logical size."""
    from .model import num_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, num_parameters(model)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def fuse(model: nn.Module, dequantize: bool = True) -> nn.Module:
    """Replace every LoRALinear by its fused float linear (in place); returns the model."""
    from mlx.utils import tree_unflatten

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in lora_modules(model).items()]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA parameters by dotted name (`model.layers.0.self_attn.q_proj.lora_a`)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
