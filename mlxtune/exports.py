"""Fuse and export: a trained adapter → a fused HF dir, a PEFT or mlx-lm adapter, or a GGUF file.

    fuse(run_dir, out, base=None, quantize=None)               fused model as a HF dir (float; re-quantized on request)
    export(run_dir, "hf" | "peft" | "mlx-lm" | "gguf" | "hf-base", out, base=None, outtype="f16" | "q8_0")

The input is anything `adapters.read_adapter` reads (an mlxtune run or adapter dir, a PEFT dir, an mlx-lm
adapter dir), so this also converts between the three adapter formats. The base model defaults to the path
the adapter records.

Fusing merges W + (alpha / r) * (A @ B)^T in float32 (`lora.merge_lora`). A base trained quantized (QLoRA: the
adapter config records `base_model.quantization`) is loaded quantized the same way, so the fused weights are
dequantize(Q(W)) + delta — the function that was trained — and written as float unless `quantize` asks to
re-quantize the fused model (merging into the packed integers would lose the adapter: mlx-lm #1172).
Writers live with their formats: `saving.save_model` (HF dir), `adapters.write_adapter_dir` (PEFT, mlx-lm),
`gguf.write_gguf` (GGUF).

PEFT and mlx-lm exports are loadable by their consumers as written: when the base is a GGUF (or, for PEFT, an
mlx-lm quantized dir that transformers cannot read), the dequantized base is written as a float32 Hugging Face
dir `<out>/base/` and the adapter config points at it by absolute path (`base_model_name_or_path`, `model`);
otherwise it points at the base's absolute path or hub id. `hf-base` writes only that base dir. Their weights
carry the base's fingerprint and path in the safetensors metadata (adapters.BASE_FINGERPRINT_KEY), which
`read_adapter` checks when mlxtune reads them back.

Every input is validated before anything is written; outputs are built beside `out` and swapped into place
(fsio), so a failure leaves nothing behind. `out` follows fsio.check_output: an existing file or non-empty dir
needs `force=True`, and it may never be an input (the adapter or run dir, the base model) nor inside or around one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from . import fsio, hub
from .adapters import (BASE_FINGERPRINT_KEY, BASE_PATH_KEY, CONFIG_FILE, PEFT_WEIGHTS_FILE, WEIGHTS_FILE, AdapterSpec,
                       load_adapter, read_adapter, write_adapter_dir)
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
    hf-base: the base model alone, dequantized, as a Hugging Face dir (what PEFT / transformers load).
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if outtype is not None and format != "gguf":
        raise ExportError(f"outtype={outtype!r} applies only to format 'gguf'")
    outtype = outtype or "f16"
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(GGUF_OUTTYPES)}")
    spec = read_adapter(run_dir_or_adapter)
    fsio.check_output(out, inputs=_inputs(spec, base), force=force)
    out = Path(out).expanduser()
    written = _write_export(spec, format, out, base, outtype, force)
    if format in CARD_KIND and (written.is_dir() or written.parent == out):  # a lone .gguf file has no card
        from .modelcard import write_model_card

        write_model_card(out, run_dir=run_dir_or_adapter, what=CARD_KIND[format])
    return written


CARD_KIND = {"hf": "fused", "peft": "peft", "mlx-lm": "mlx-lm", "gguf": "gguf"}
"The model card's kind (modelcard.WHATS) for each export format (hf-base, the untrained base, has none)."
BASE_DIR = "base"
"Where a PEFT / mlx-lm export writes the Hugging Face base its consumer needs (a GGUF base)."


def _write_export(spec: AdapterSpec, format: str, out: Path, base: Optional[PathLike], outtype: str,
                  force: bool) -> Path:
    """Write the export itself (one atomic file or directory swap); returns what was written."""
    if format in ("peft", "mlx-lm"):
        return _export_adapter(spec, format, out, base, force)
    if format == "hf-base":
        return save_model(*base_model(spec, base), out, overwrite=True)  # `out` was checked above
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
    """Write `spec` as a PEFT or mlx-lm adapter dir (one directory swap), with `base/` when its consumer cannot
    read the base as it is (see needs_hf_base)."""
    base_path = _local_or_hub(base if base is not None else spec.base.get("path"))
    write_base = needs_hf_base(base_path, format)
    consumer_base = str(out.resolve() / BASE_DIR) if write_base else base_path
    n_layers = spec.base.get("num_hidden_layers") or _base_num_layers(base_path)
    convert, wfile, kind = (to_peft, PEFT_WEIGHTS_FILE, "pt") if format == "peft" else (to_mlx_lm, WEIGHTS_FILE, "mlx")
    weights, config = convert(spec, consumer_base, n_layers)
    stamp = ((BASE_FINGERPRINT_KEY, spec.base.get("fingerprint")), (BASE_PATH_KEY, base_path))
    meta = {"format": kind, **{k: str(v) for k, v in stamp if v}}  # read_adapter checks the fingerprint
    fill = None
    if write_base:
        model, tokenizer = base_model(spec, base)  # loaded (and checked) before anything is written

        def fill(tmp: Path) -> None:
            save_model(model, tokenizer, tmp / BASE_DIR)
    return write_adapter_dir(out, weights, config, weights_file=wfile, metadata=meta, overwrite=force, fill=fill)


def needs_hf_base(base_path: Optional[str], format: str) -> bool:
    """Whether the consumer of a `format` export cannot load the base as it is: a GGUF file (neither PEFT nor
    mlx-lm load one as a base), or for PEFT an mlx-lm quantized dir (transformers does not read its layout)."""
    if not base_path or not Path(base_path).exists():
        return False
    p = Path(base_path)
    if p.is_file():
        return p.suffix.lower() == ".gguf"
    if format != "peft":
        return False
    try:
        return "quantization" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def base_model(spec: AdapterSpec, base: Optional[PathLike] = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the adapter's base as a float model to save as a Hugging Face dir. A GGUF loads in
    float32 (its dequantized values exactly, so the written dir has the GGUF's fingerprint); a dir keeps its dtype."""
    base_path = _base_path(spec, base)
    model, tokenizer = load(base_path, dtype="float32" if base_path.lower().endswith(".gguf") else None)
    dequantize(model)
    return model, tokenizer


def describe_export(format: str, written: Path) -> str:
    """The line the CLI prints: what was written and, for an adapter, which base its consumer loads."""
    line = f"wrote {format} export to {written}"
    cfg = written / CONFIG_FILE if format in ("peft", "mlx-lm") else None
    if cfg is None or not cfg.is_file():
        return line
    base = json.loads(cfg.read_text()).get("base_model_name_or_path" if format == "peft" else "model")
    if base and Path(base).parent == written.resolve():
        wfile = written / (PEFT_WEIGHTS_FILE if format == "peft" else WEIGHTS_FILE)
        src = Path(mx.load(str(wfile), return_metadata=True)[1].get(BASE_PATH_KEY, "the base")).name
        return (f"{line}; base model: {base} (a Hugging Face dir written from {src}, which "
                f"{'PEFT' if format == 'peft' else 'mlx-lm'} cannot load as a base)")
    return f"{line}; base model: {base}" if base else f"{line}; no base model recorded: pass it to the loader"


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
    spec = read_adapter(run_dir)
    fsio.check_output(out, inputs=_inputs(spec, base), force=force)
    out = Path(out).expanduser()
    model, tokenizer = fused_model(spec, base)
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


def _local_or_hub(path: Optional[PathLike]) -> Optional[str]:
    """A base path as its consumer needs it: absolute when it exists here, else as given (a hub id)."""
    if path is None or not str(path):
        return None
    p = Path(str(path)).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def _inputs(spec: AdapterSpec, base: Optional[PathLike]) -> list[Path]:
    """What fuse / export read, which --out may never be, be inside of, or hold: the adapter's files (so a run's own
    `RUN/fused` is fine, `RUN` itself is not) and the base."""
    recorded = base if base is not None else spec.base.get("path")
    local = _local_or_hub(recorded)
    adapter = ([spec.path / f for f in (WEIGHTS_FILE, PEFT_WEIGHTS_FILE, CONFIG_FILE, "config.yaml")]
               if spec.path.is_dir() else [spec.path])
    return adapter + ([Path(local)] if local and Path(local).exists() else [])


def _base_num_layers(base_path: Optional[str]) -> Optional[int]:
    """num_hidden_layers from a local HF base dir's config.json, else None."""
    if not base_path:
        return None
    cfg = Path(base_path).expanduser() / "config.json"
    try:
        return int(json.loads(cfg.read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
