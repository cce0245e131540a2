"""Fuse and export: a trained adapter → a fused HF dir, a PEFT or mlx-lm adapter, or a GGUF file.

    fuse(run_dir, out, base=None, quantize=None)               fused model as a HF dir (float; re-quantized on request)
    export(run_dir, "hf" | "peft" | "mlx-lm" | "gguf", out, base=None, outtype="f16" | "q8_0")

The input is anything `adapters.read_adapter` reads (an mlxtune run or adapter dir, a PEFT dir, an mlx-lm
adapter dir), so this also converts between the three adapter formats. The base model defaults to the path
the adapter records.

Fusing merges W + (alpha / r) * (A @ B)^T in float32 (`lora.merge_lora`). A base trained quantized (QLoRA: the
adapter config records `base_model.quantization`) is loaded quantized the same way, so the fused weights are
dequantize(Q(W)) + delta — the function that was trained — and written as float unless `quantize` asks to
re-quantize the fused model (merging into the packed integers would lose the adapter: mlx-lm #1172).
Writers live with their formats: `saving.save_model` (HF dir), `adapters.write_adapter_dir` (PEFT, mlx-lm),
`gguf.write_gguf` (GGUF).

Every input is validated before anything is written; outputs are built beside `out` and swapped into place
(fsio), so a failure leaves nothing behind. An existing non-empty `out` needs `force=True`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from . import fsio, hub
from .adapters import CONFIG_FILE, PEFT_WEIGHTS_FILE, WEIGHTS_FILE, AdapterSpec, load_adapter, read_adapter, write_adapter_dir
from .config import EXPORT_FORMATS, GGUF_OUTTYPES
from .errors import AdapterError, ConfigError, ExportError
from .gguf import write_gguf
from .loading import load
from .lora import merge_lora
from .quant import check_quantize, dequantize, quantize_model
from .saving import save_model

PathLike = Union[str, os.PathLike]


def export(
    run_dir_or_adapter: PathLike,
    format: str,
    out: PathLike,
    base: Optional[PathLike] = None,
    *,
    outtype: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Export an adapter (run dir, mlxtune / PEFT / mlx-lm adapter dir) as `format`; returns what was written.

    hf:     the fused model as a Hugging Face dir (float; see `fuse` for re-quantizing).
    peft:   `adapter_model.safetensors` + `adapter_config.json` for `peft.PeftModel.from_pretrained`.
    mlx-lm: `adapters.safetensors` + `adapter_config.json` for `mlx_lm.load(base, adapter_path=...)`.
    gguf:   the fused model as `<out>/model-<outtype>.gguf` (or `out` itself when it ends in .gguf);
            outtype f16 (default) or q8_0.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if outtype is not None and format != "gguf":
        raise ExportError(f"outtype={outtype!r} applies only to format 'gguf'")
    outtype = outtype or "f16"
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(GGUF_OUTTYPES)}")
    out = Path(out).expanduser()
    _check_out(out, force)
    written = _write_export(read_adapter(run_dir_or_adapter), format, out, base, outtype, force)
    if written.is_dir() or written.parent == out:  # a dir export carries its model card (a lone .gguf file does not)
        from .modelcard import write_model_card

        write_model_card(out, run_dir=run_dir_or_adapter, what=CARD_KIND[format])
    return written


CARD_KIND = {"hf": "fused", "peft": "peft", "mlx-lm": "mlx-lm", "gguf": "gguf"}
"The model card's kind (modelcard.WHATS) for each export format."


def _write_export(spec: AdapterSpec, format: str, out: Path, base: Optional[PathLike], outtype: str,
                  force: bool) -> Path:
    """Write the export itself (one atomic file or directory swap); returns what was written."""
    if format in ("peft", "mlx-lm"):
        return _export_adapter(spec, format, out, base, force)
    model, tokenizer = fused_model(spec, base)
    if format == "hf":
        return save_model(model, tokenizer, out, overwrite=True)  # `out` was checked above
    name = Path(str(base or spec.base.get("path") or "model")).name.removesuffix(".gguf")
    if out.suffix == ".gguf":
        with fsio.atomic_file(out, overwrite=force) as tmp:
            write_gguf(model, tokenizer, tmp, outtype=outtype, name=name)
        return out
    with fsio.atomic_dir(out, overwrite=force) as tmp:
        write_gguf(model, tokenizer, tmp / f"model-{outtype}.gguf", outtype=outtype, name=name)
    return out / f"model-{outtype}.gguf"


def _export_adapter(spec: AdapterSpec, format: str, out: Path, base: Optional[PathLike], force: bool) -> Path:
    """Write `spec` as a PEFT or mlx-lm adapter dir (one directory swap)."""
    base_path = str(base) if base is not None else spec.base.get("path")
    n_layers = spec.base.get("num_hidden_layers") or _base_num_layers(base_path)
    if format == "peft":
        weights, config = to_peft(spec, base_path, n_layers)
        wfile, meta = PEFT_WEIGHTS_FILE, {"format": "pt"}
    else:
        weights, config = to_mlx_lm(spec, base_path, n_layers)
        wfile, meta = WEIGHTS_FILE, {"format": "mlx"}
    return write_adapter_dir(out, weights, config, weights_file=wfile, metadata=meta, overwrite=force)


def fuse(
    run_dir: PathLike,
    out: PathLike,
    base: Optional[PathLike] = None,
    quantize: Union[None, int, dict, Any] = None,
    *,
    force: bool = False,
) -> Path:
    """Merge the adapter at `run_dir` into its base and save a Hugging Face dir at `out`; returns `out`.

    The output is float (the base's dtype) by default. `quantize` ({"bits": 4|8, "group_size": 64}, a
    QuantizeConfig, or just the bits) re-quantizes the fused float model before saving.
    """
    q = _quantize_arg(quantize)
    out = Path(out).expanduser()
    _check_out(out, force)
    model, tokenizer = fused_model(run_dir, base)
    if q is not None:
        quantize_model(model, q)
    return save_model(model, tokenizer, out, dequantize=q is None, overwrite=True)  # `out` was checked above


def fused_model(adapter: Union[PathLike, AdapterSpec], base: Optional[PathLike] = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the base (quantized as at training, if it was) + the adapter, merged, all float."""
    spec = adapter if isinstance(adapter, AdapterSpec) else read_adapter(adapter)
    base_path = _base_path(spec, base)
    quant = spec.base.get("quantization") or None
    # A QLoRA base is re-created as trained: same dtype, then the same quantization.
    dtype = spec.base.get("dtype") if quant else None
    model, tokenizer = load(base_path, dtype=dtype, quantize=quant)
    load_adapter(model, spec)
    merge_lora(model)
    dequantize(model)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------
# Adapter formats


def to_peft(spec: AdapterSpec, base_path: Optional[str], n_layers: Optional[int]) -> tuple[dict, dict]:
    """(weights, adapter_config) in PEFT's LoRA layout: A (r, in), B (out, r), keys `base_model.model.<path>`."""
    weights = {}
    for path in spec.wrapped:
        weights[f"base_model.model.{path}.lora_A.weight"] = mx.contiguous(spec.weights[f"{path}.lora_a"].T.astype(mx.float32))
        weights[f"base_model.model.{path}.lora_B.weight"] = mx.contiguous(spec.weights[f"{path}.lora_b"].T.astype(mx.float32))
    idx = spec.layer_indices()
    every = n_layers is not None and idx == list(range(n_layers))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in spec.wrapped}),
        "layers_to_transform": None if every else idx,
        "layers_pattern": None if every else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    return weights, config


def to_mlx_lm(spec: AdapterSpec, base_path: Optional[str], n_layers: Optional[int]) -> tuple[dict, dict]:
    """(weights, adapter_config) for mlx-lm 0.32's load_adapters: the last `num_layers` layers, per-layer keys.

    mlx-lm can only adapt a contiguous run of final layers. A subset that is not one (say layers 0 and 2
    of 4) is written as the run from its first layer to the end, with zero A and B in the layers that had
    no adapter — the same function, since B = 0 adds nothing.
    """
    locals_ = sorted({p.split(".layers.", 1)[1].split(".", 1)[1] for p in spec.wrapped if ".layers." in p})
    weights = {k: mx.contiguous(v.astype(mx.float32)) for k, v in spec.weights.items()}
    if isinstance(spec.layers, int) and not isinstance(spec.layers, bool):
        num_layers = spec.layers
    elif spec.layers is None and n_layers is None:
        num_layers = -1
    else:
        if n_layers is None:
            raise ExportError(
                f"{spec.path}: cannot tell how many layers the base model has (mlx-lm counts adapted layers "
                "from the end); pass --base with the base model dir"
            )
        first = min(spec.layer_indices()) if spec.layers is not None else 0
        num_layers = n_layers - first
        _zero_fill(spec, weights, locals_, first, n_layers)
    config = {
        "fine_tune_type": "lora",
        "model": base_path,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": spec.rank,
            "scale": spec.alpha / spec.rank,
            "dropout": spec.dropout,
            "keys": locals_,
        },
    }
    return weights, config


def _zero_fill(spec: AdapterSpec, weights: dict, locals_: list[str], first: int, n_layers: int) -> None:
    """Add zero A and B for every layer from `first` to the end that has no adapter (B = 0 adds nothing)."""
    prefix = spec.wrapped[0].split(".layers.", 1)[0]
    shapes = {}  # local path -> (a shape, b shape), from any layer that has it
    for p in spec.wrapped:
        local = p.split(".layers.", 1)[1].split(".", 1)[1]
        shapes.setdefault(local, (spec.weights[f"{p}.lora_a"].shape, spec.weights[f"{p}.lora_b"].shape))
    for i in range(first, n_layers):
        for local in locals_:
            key = f"{prefix}.layers.{i}.{local}"
            if f"{key}.lora_a" not in weights:
                weights[f"{key}.lora_a"] = mx.zeros(shapes[local][0], dtype=mx.float32)
                weights[f"{key}.lora_b"] = mx.zeros(shapes[local][1], dtype=mx.float32)


# ---------------------------------------------------------------------------------------------------------
# Arguments and paths


def _quantize_arg(q):
    """A quantize spec for fuse: a bit count, {bits, group_size}, a QuantizeConfig or None (validated by quant)."""
    if isinstance(q, int) and not isinstance(q, bool):
        q = {"bits": q}
    try:
        return check_quantize(q)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def _base_path(spec: AdapterSpec, base: Optional[PathLike]) -> str:
    recorded = spec.base.get("path")
    path = base if base is not None else recorded
    if not path:
        raise AdapterError(f"{spec.path}: the adapter records no base model path; pass --base with the base model")
    p = Path(str(path)).expanduser()
    if not p.exists() and hub.is_hub_id(str(path)):
        return str(path)  # a hub id: the loader fetches it (or says why it cannot)
    if not p.exists():
        how = "given with --base" if base is not None else f"recorded in {spec.path / CONFIG_FILE}"
        raise AdapterError(f"base model {p} ({how}) not found; pass --base with the base model dir or .gguf file")
    return str(p)


def _base_num_layers(base_path: Optional[str]) -> Optional[int]:
    """num_hidden_layers from a local HF base dir's config.json, else None."""
    if not base_path:
        return None
    cfg = Path(base_path).expanduser() / "config.json"
    try:
        return int(json.loads(cfg.read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        if out.is_dir() and not any(out.iterdir()):
            return
        raise ExportError(f"{out} already exists and is not empty; choose another --out or pass --force to replace it")
