"""Weight precision: the float dtype a model is held in, quantizing its layers (QLoRA), dequantizing them back.

    check_dtype("bfloat16"); check_quantize({"bits": 4, "group_size": 64}) -> QuantizeConfig
    cast_floats(weights, "float16")          # every float array; integer (packed) arrays stay as they are
    quantize_model(model, QuantizeConfig(bits=4, group_size=64))   # Linear / Embedding → affine quantized
    quantize_like(model, {"group_size": 64, "bits": 4, ...}, weights, source)  # mlx-lm's stored layout
    dequantize(model)                         # every quantized layer back to float, in place

Quantization is MLX's affine scheme (`mx.quantize`): per group of `group_size` input weights a scale and a bias.
mlx-lm's config entry for a quantized model is a default `{"group_size", "bits"}` plus one entry per module
whose settings differ (`quantization_config`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .config import DTYPES, QuantizeConfig
from .errors import ConfigError, ModelLoadError


def check_dtype(dtype: Union[None, str, mx.Dtype]) -> Optional[str]:
    """A dtype name from config.DTYPES (an `mx.float16` is accepted too), or None; ConfigError otherwise."""
    if dtype is None:
        return None
    if isinstance(dtype, mx.Dtype):
        dtype = str(dtype).rsplit(".", 1)[-1]
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def check_quantize(quantize: Union[None, Mapping, QuantizeConfig]) -> Optional[QuantizeConfig]:
    """`{bits, group_size}` (either may be left out), a QuantizeConfig or None → QuantizeConfig or None."""
    if quantize is None or isinstance(quantize, QuantizeConfig):
        return quantize
    if isinstance(quantize, Mapping):
        unknown = set(quantize) - {"bits", "group_size"}
        if unknown:
            raise ConfigError(f"model.quantize: unknown key(s) {', '.join(sorted(unknown))}; use bits and group_size")
        return QuantizeConfig(**quantize)
    raise ConfigError(f"model.quantize: expected {{bits, group_size}} or null, got {quantize!r}")


def cast_floats(weights: Mapping[str, mx.array], dtype: Optional[str]) -> dict[str, mx.array]:
    """Every floating-point array cast to `dtype` (None: unchanged); packed integer weights are left alone."""
    if dtype is None:
        return dict(weights)
    dt = getattr(mx, dtype)
    return {k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def quantize_model(model: nn.Module, q: QuantizeConfig) -> list[str]:
    """Quantize the Linear / Embedding layers whose input dim is a multiple of the group size; returns paths."""
    done = []

    def predicate(path: str, module: nn.Module) -> bool:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % q.group_size == 0:
            done.append(path)
            return True
        return False

    nn.quantize(model, group_size=q.group_size, bits=q.bits, class_predicate=predicate)
    if not done:
        raise ConfigError(f"model.quantize: no layer has an input size divisible by group_size={q.group_size}; use 32 or 64")
    return done


def quantize_like(model: nn.Module, quantization: dict, weights: Mapping[str, mx.array], source) -> None:
    """Turn the layers that are stored quantized (mlx-lm layout: `x.scales` present) into quantized layers."""
    if quantization.get("mode", "affine") != "affine":
        raise ModelLoadError(f"{source}: quantization mode {quantization.get('mode')!r} is not supported (affine only)")

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return {"group_size": quantization["group_size"], "bits": quantization["bits"]}

    nn.quantize(model, class_predicate=predicate)


def quantization_config(per_module: Mapping[str, dict]) -> dict:
    """mlx-lm's config entry for `{module path: {"group_size", "bits"}}`: the most common settings as the
    default plus the modules that differ from it; {} when nothing is quantized."""
    if not per_module:
        return {}
    counts: dict[tuple, int] = {}
    for q in per_module.values():
        key = (q["group_size"], q["bits"])
        counts[key] = counts.get(key, 0) + 1
    gs, bits = max(counts, key=counts.get)
    config: dict = {"group_size": gs, "bits": bits}
    config.update({p: q for p, q in per_module.items() if (q["group_size"], q["bits"]) != (gs, bits)})
    return config


def is_quantized(layer: nn.Module) -> bool:
    """Whether `layer` is a quantized Linear or Embedding."""
    return isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def dequantized_weight(layer: nn.Module) -> mx.array:
    """The float weight of a quantized Linear / Embedding, in its scales' dtype."""
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits,
                      mode=getattr(layer, "mode", "affine"))
    return w.astype(layer.scales.dtype)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear / QuantizedEmbedding by its float equivalent (scales' dtype), in place."""
    updates = []
    for name, m in model.named_modules():
        if not is_quantized(m):
            continue
        w = dequantized_weight(m)
        if isinstance(m, nn.QuantizedLinear):
            f = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                f.bias = m.bias
        else:
            f = nn.Embedding(w.shape[0], w.shape[1])
        f.weight = w
        updates.append((name, f))
    if updates:
        model.update_modules(tree_unflatten(updates))
    return model
