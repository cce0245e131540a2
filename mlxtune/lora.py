"""LoRA: one selection (`plan_lora`), a wrapper around a frozen linear, injection, and one merge path.

`LoRALinear` stores `lora_a (in, r)` and `lora_b (r, out)` with `scale = alpha / rank`, the same names and
layout mlx-lm uses, and keeps the wrapped layer under `.linear` (also mlx-lm's name), so an mlxtune model with
LoRA has the parameter tree mlx-lm's tools expect. PEFT's layout (`lora_A.weight (r, in)`,
`lora_B.weight (out, r)`) is converted by the adapter writers.

    y = linear(x) + scale * (dropout(x) @ lora_a) @ lora_b

`lora_b` starts at zero, so a freshly wrapped model is exactly the base model.

- `plan_lora(model, targets, layers)`: the module paths LoRA adapts — the one selection used by `apply_lora`,
  the adapter checks and the memory estimate. Works on any module tree whose decoder layers sit under a
  `layers` list (`model.layers.N...`), with or without LoRA already applied, and on lazily built models.
- Dropout keys are explicit: a decoder layer that is given a PRNG key passes a sub-key to each projection
  (`LoRALinear.__call__(x, key)`), so a gradient-checkpointed layer recomputes exactly the masks of its forward.
  Without a key the global RNG is used. There is no module-level state.
- `LoRALinear.merged_weight()` is the one merge: W (dequantized first when the base is quantized) +
  scale * (A @ B)^T in float32, cast to the base's float dtype; `merged()` builds the layer from it (re-quantized
  with the base's settings on request) and `merge_lora(model)` swaps every LoRA layer for it in place.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import DEFAULT_TARGETS, TARGET_ALIASES
from .errors import ConfigError, did_you_mean
from .model import num_parameters
from .quant import dequantized_weight

Layers = Union[None, int, Sequence[int]]


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, nn.QuantizedLinear or LoRALinear."""
    if isinstance(layer, LoRALinear):
        layer = layer.linear
    out_dims, packed_in = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return packed_in * 32 // layer.bits, out_dims
    return packed_in, out_dims


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` / `nn.QuantizedLinear` plus a trainable low-rank update."""

    takes_dropout_key = True
    "Decoder layers pass `key=` only to projections that declare this (model.py's protocol)."

    @staticmethod
    def from_base(linear: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> "LoRALinear":
        in_dims, out_dims = linear_dims(linear)
        lora = LoRALinear(in_dims, out_dims, rank=rank, alpha=alpha, dropout=dropout)
        lora.linear = linear
        return lora

    def __init__(self, in_dims: int, out_dims: int, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"lora.rank must be a positive integer, got {rank}")
        self.linear = nn.Linear(in_dims, out_dims, bias=bias)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = float(dropout)
        bound = 1.0 / math.sqrt(in_dims)  # kaiming-uniform(a=sqrt(5)) bound, as PEFT and mlx-lm initialize A
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.linear.freeze()

    def __call__(self, x: mx.array, key: Optional[mx.array] = None) -> mx.array:
        """`key`: the PRNG key of this call's dropout mask (None: the global RNG)."""
        y = self.linear(x)
        z = x
        if self.dropout > 0 and self.training:
            keep = 1.0 - self.dropout
            mask = mx.random.bernoulli(keep, x.shape, key=key)
            z = mx.where(mask, x / keep, mx.zeros_like(x))
        z = (z @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """The update to the weight, (out, in), in float32."""
        return self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32)).T

    def merged_weight(self) -> mx.array:
        """W + scale * (A @ B)^T, (out, in): computed in float32 over the (dequantized) base weight, then cast
        to the base's float dtype. Merging into packed integers would lose the adapter (mlx-lm #1172)."""
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            w, dtype = dequantized_weight(base), base.scales.dtype
        else:
            w, dtype = base.weight, base.weight.dtype
        return (w.astype(mx.float32) + self.delta()).astype(dtype)

    def merged(self, *, quantized: bool = False) -> nn.Module:
        """The plain layer with the update merged in: a float nn.Linear, or with `quantized` over a quantized
        base, an nn.QuantizedLinear re-quantized with the base's group size, bits and mode."""
        base = self.linear
        w = self.merged_weight()
        out_dims, in_dims = w.shape
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = w
        if has_bias:
            fused.bias = base.bias
        if quantized and isinstance(base, nn.QuantizedLinear):
            extra = {"mode": base.mode} if hasattr(base, "mode") else {}
            return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, **extra)
        return fused

    def fuse(self, dequantize: bool = True) -> nn.Module:
        """Deprecated: use `merged()` (always float, as this always was)."""
        warnings.warn("LoRALinear.fuse is deprecated; use LoRALinear.merged()", DeprecationWarning, stacklevel=2)
        return self.merged()


# ---------------------------------------------------------------------------------------------------------
# Selection


def resolve_targets(targets: Optional[Iterable[str]]) -> list[str]:
    """Target names with short forms expanded (`q` -> `q_proj`); None: DEFAULT_TARGETS; "q,v": a list."""
    if targets is None:
        return list(DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return list(dict.fromkeys(TARGET_ALIASES.get(t, t) for t in targets))


def resolve_layers(layers: Layers, n_layers: int) -> list[int]:
    """Sorted layer indices: None = every layer; int n = the LAST n layers (1 <= n <= n_layers); a list = those
    indices (negative ones count from the end)."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 0 < layers <= n_layers:
            raise ConfigError(f"lora.layers={layers} must be between 1 and {n_layers} (the model's layer count)")
        return list(range(n_layers - layers, n_layers))
    out = []
    for i in layers:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"lora.layers: layer index {i} is out of range for a model with {n_layers} layers")
        out.append(j)
    return sorted(set(out))


def decoder_layers(model: nn.Module) -> list:
    """The decoder layer list of `model` (`model.layers`, else `model.model.layers`)."""
    for owner in (model, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, (list, tuple)):
            return list(layers)
    raise ConfigError(f"{type(model).__name__} has no decoder `layers` list to apply LoRA to")


def layer_index(path: str) -> Optional[int]:
    """The decoder layer index in a module path (`model.layers.3.mlp.up_proj` -> 3), else None."""
    if ".layers." not in f".{path}":
        return None
    idx = path.split("layers.", 1)[1].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


def _decoder_linears(model: nn.Module) -> dict[str, tuple[int, str]]:
    """{path: (layer index, local path)} of every linear inside a decoder layer; a LoRALinear counts at its own
    path (its base `.linear` is skipped)."""
    found = {}
    lora_paths = set()
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear)) or layer_index(name) is None:
            continue
        if isinstance(m, LoRALinear):
            lora_paths.add(name)
        local = name.split("layers.", 1)[1].partition(".")[2]
        if local:
            found[name] = (layer_index(name), local)
    return {p: v for p, v in found.items() if not (p.endswith(".linear") and p[: -len(".linear")] in lora_paths)}


def plan_lora(model: nn.Module, targets: Optional[Iterable[str]] = None, layers: Layers = None) -> list[str]:
    """The module paths LoRA adapts, sorted: linears inside the chosen decoder layers whose local path equals a
    target or ends with `.target`. Does not touch the model.

    targets: names (`q_proj`, short `q`, or a dotted suffix like `self_attn.q_proj`); None: DEFAULT_TARGETS.
    layers:  None = every layer; an int n = the last n layers; a list = those indices.
    A target that matches no linear layer, or a layer out of range, raises ConfigError (with did-you-mean).
    """
    names = resolve_targets(targets)
    chosen = set(resolve_layers(layers, len(decoder_layers(model))))
    linears = _decoder_linears(model)
    matched = {t: False for t in names}
    plan = []
    for path, (idx, local) in linears.items():
        for t in names:
            if local == t or local.endswith("." + t):
                matched[t] = True
                if idx in chosen:
                    plan.append(path)
                break
    unmatched = [t for t, ok in matched.items() if not ok]
    if unmatched:
        leaves = sorted({local.rsplit(".", 1)[-1] for _, local in linears.values()})
        hints = "; ".join(f"{t!r}{did_you_mean(t.rsplit('.', 1)[-1], leaves)}" for t in unmatched)
        raise ConfigError(f"lora.targets: {hints} matched no linear layer; the model's linear layers are {', '.join(leaves)}")
    return sorted(plan)


# ---------------------------------------------------------------------------------------------------------
# Apply and merge


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: Optional[Iterable[str]] = None,
    layers: Layers = None,
    *,
    verbose: bool = False,
) -> list[str]:
    """Freeze the model and wrap the linears `plan_lora(model, targets, layers)` selects; returns their paths
    (e.g. `model.layers.0.self_attn.q_proj`). Everything is checked before the model is touched. `verbose`
    prints one line: rank, alpha, how many layers and trainable parameters."""
    if rank <= 0:
        raise ConfigError(f"lora.rank must be a positive integer, got {rank}")
    if alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout}")
    wrapped = plan_lora(model, targets, layers)
    modules = dict(model.named_modules())
    width = min((min(linear_dims(modules[p])) for p in wrapped), default=rank)
    if rank > width:  # the update of a layer d wide has rank at most d: a larger r only costs memory
        raise ConfigError(f"lora.rank: {rank} is more than the narrowest adapted layer's width ({width}); use at most {width}")
    model.freeze()
    updates = [(p, LoRALinear.from_base(modules[p], rank=rank, alpha=alpha, dropout=dropout)) for p in wrapped]
    model.update_modules(tree_unflatten(updates))
    inner = getattr(model, "model", None)
    if dropout > 0 and inner is not None and hasattr(inner, "lora_dropout"):
        inner.lora_dropout = True  # the decoder then hands every layer a dropout key
    if verbose:
        trainable, total = count_trainable(model)
        print(
            f"LoRA rank {rank}, alpha {alpha:g} on {len(wrapped)} layers "
            f"({', '.join(resolve_targets(targets))}): {trainable:,} trainable parameters "
            f"({100 * trainable / max(total, 1):.3f}% of {total:,})"
        )
    return wrapped


def merge_lora(model: nn.Module, *, quantized: bool = False) -> nn.Module:
    """Replace every LoRALinear by its merged layer (`LoRALinear.merged`), in place; returns the model.

    Not the `mlxtune fuse` command (which writes a fused model dir): this changes the model in memory.
    """
    merged = [(name, m.merged(quantized=quantized)) for name, m in lora_modules(model).items()]
    if merged:
        model.update_modules(tree_unflatten(merged))
    return model


def fuse(model: nn.Module, dequantize: bool = True) -> nn.Module:
    """Deprecated alias of `merge_lora(model)` (the result was always float)."""
    warnings.warn("mlxtune.lora.fuse is deprecated; use merge_lora(model)", DeprecationWarning, stacklevel=2)
    return merge_lora(model)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights at their logical (unpacked) size."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, num_parameters(model)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{path: LoRALinear} of the model's LoRA layers."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA parameters by dotted name (`model.layers.0.self_attn.q_proj.lora_a`)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
