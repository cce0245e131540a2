"""Save a model as a Hugging Face dir that transformers and mlx-lm load.

    save_model(model, tokenizer, "out/fused")                    # LoRA merged in, float
    save_model(model, None, "out/packed", dequantize=False)      # mlx-lm's quantized layout

Writes sharded safetensors (`metadata={"format": "pt"}`) + `model.safetensors.index.json` when there is more
than one shard, `config.json` in both dialects (transformers 4's top-level rope fields and `torch_dtype`,
transformers 5's `rope_parameters` and `dtype`), `generation_config.json` (the source model's, with every
end-of-turn id as eos) and the tokenizer files, all in one directory swap (`fsio.atomic_dir`).

LoRA layers are merged into the saved weights with `LoRALinear.merged` (the one merge path: in float32 over
the dequantized base, re-quantized afterwards when the output keeps quantized layers); the model in memory is
left as it is. Quantized layers are dequantized unless `dequantize=False`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import fsio
from .errors import MlxtuneError
from .quant import dequantized_weight, is_quantized, quantization_config
from .tokenizer import END_OF_TURN_TOKENS, token_id, unwrap

DEFAULT_SHARD_BYTES = 5 * 2**30


def export_weights(model: nn.Module, dequantize: bool = True) -> tuple[dict[str, mx.array], dict]:
    """The model's weights under Hugging Face names, LoRA merged in; returns (weights, quantization).

    LoRA layers are merged in float32 (over a quantized base: dequantized first, and re-quantized with the base's
    settings when `dequantize=False`). Quantized layers are dequantized unless `dequantize=False`, in which
    case `quantization` is the mlx-lm config entry describing them (empty when nothing is quantized).
    """
    from .lora import lora_modules

    flat = dict(tree_flatten(model.parameters()))
    per_module: dict[str, dict] = {}
    loras = lora_modules(model)
    lora_prefixes = tuple(path + "." for path in loras)
    for path, m in loras.items():
        for k in [k for k in flat if k.startswith(path + ".")]:
            del flat[k]
        merged = m.merged(quantized=not dequantize)
        flat.update({f"{path}.{k}": v for k, v in tree_flatten(merged.parameters())})
        if is_quantized(merged):
            per_module[path] = {"group_size": merged.group_size, "bits": merged.bits}
    for path, m in model.named_modules():
        if not is_quantized(m) or path.startswith(lora_prefixes):
            continue
        if dequantize:
            flat[f"{path}.weight"] = dequantized_weight(m)
            del flat[f"{path}.scales"], flat[f"{path}.biases"]
        else:
            per_module[path] = {"group_size": m.group_size, "bits": m.bits}
    return flat, quantization_config(per_module)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _dtype_name(weights: Mapping[str, mx.array]) -> str:
    """The float dtype holding most parameters (config.json's torch_dtype)."""
    sizes: dict[str, int] = {}
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            name = str(v.dtype).rsplit(".", 1)[-1]
            sizes[name] = sizes.get(name, 0) + v.size
    return max(sizes, key=sizes.get) if sizes else "float32"


def _shards(weights: dict[str, mx.array], max_shard_bytes: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights, key=_natural_key):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    return shards


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def generation_config(model: nn.Module, tokenizer: Any) -> dict:
    """generation_config.json: the source model's, with bos and every end-of-turn / end-of-text id as eos."""
    gen: dict[str, Any] = {}
    src = Path(str(getattr(model, "source", {}).get("path", "")))
    if src.is_dir() and (src / "generation_config.json").is_file():
        try:
            gen = json.loads((src / "generation_config.json").read_text())
        except json.JSONDecodeError:
            gen = {}
    for key in ("transformers_version", "_from_model_config"):
        gen.pop(key, None)
    eos = _ids(gen.get("eos_token_id")) + _ids(model.args.eos_token_id)
    bos = gen.get("bos_token_id", model.args.bos_token_id)
    if tokenizer is not None:
        tok = unwrap(tokenizer)
        eos += _ids(tok.eos_token_id)
        eos += [i for i in (token_id(tok, t) for t in END_OF_TURN_TOKENS) if i is not None]
        if bos is None and tok.bos_token_id is not None:
            bos = tok.bos_token_id
        if gen.get("pad_token_id") is None and tok.pad_token_id is not None:
            gen["pad_token_id"] = tok.pad_token_id
    eos = list(dict.fromkeys(eos))
    if bos is not None:
        gen["bos_token_id"] = bos
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


def hf_config(model: nn.Module, weights: Mapping[str, mx.array], quantization: dict) -> dict:
    """config.json for the weights being saved: both dialects, their dtype, mlx-lm's quantization entry."""
    config = model.args.to_hf_config()
    for key in ("quantization", "quantization_config", "torch_dtype", "dtype", "transformers_version"):
        config.pop(key, None)
    dtype = _dtype_name(weights)
    config["torch_dtype"] = dtype  # transformers 4
    config["dtype"] = dtype  # transformers 5
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def save_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: Union[str, os.PathLike],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    *,
    dequantize: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model` (+ tokenizer) as a Hugging Face dir that transformers and mlx-lm load; returns the dir.

    LoRA layers are merged into the written weights (the model object is not changed). Quantized layers are
    dequantized unless `dequantize=False`, which writes mlx-lm's quantized layout instead (mlx-lm and mlxtune
    load it; transformers does not). Everything goes to a temp dir next to `out_dir`, swapped in at the end.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MlxtuneError(f"{out}: already exists and is not empty; choose another output dir or pass overwrite=True")
    if max_shard_bytes <= 0:
        raise MlxtuneError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    weights, quantization = export_weights(model, dequantize=dequantize)
    config = hf_config(model, weights, quantization)
    gen = generation_config(model, tokenizer)
    with fsio.atomic_dir(out, overwrite=True) as tmp:  # the one swap: a kill leaves the old dir or the new one
        shards = _shards(weights, max_shard_bytes)
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            mx.save_safetensors(str(tmp / fname), shard, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if n > 1:
            total_size = sum(v.nbytes for v in weights.values())
            index = {"metadata": {"total_size": total_size},
                     "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0])))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            unwrap(tokenizer).save_pretrained(str(tmp))
            portable_tokenizer_config(tmp)
    return out


PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"What tokenizer_config.json names when transformers 5 wrote its generic backend class (4.x cannot load that)."
_LOAD_TIME_KEYS = ("is_local", "local_files_only")  # where transformers 5 loaded it from, not what the tokenizer is


def portable_tokenizer_config(model_dir: Path) -> None:
    """Make a saved tokenizer_config.json load in transformers 4.4x-4.5x, 5.x and mlx-lm: a real tokenizer class
    (`PreTrainedTokenizerFast` for transformers 5's generic `TokenizersBackend`), the chat template inline as
    well (4.x before 4.49 reads it only there) and no load-time keys."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    for key in _LOAD_TIME_KEYS:
        cfg.pop(key, None)
    jinja = model_dir / "chat_template.jinja"
    if "chat_template" not in cfg and jinja.is_file():
        cfg["chat_template"] = jinja.read_text()
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
