"""What a base model is, without loading its weights: architecture and in-memory size, for the memory model.

    spec = model_spec("Qwen/Qwen2.5-3B-Instruct", dtype="bfloat16")   # a local dir, a .gguf file or a cached hub id
    spec.args, spec.weight_bytes, spec.n_params, spec.dtype, spec.quantized

Everything is read from config.json (plus the safetensors JSON headers, for the stored dtype) or from a GGUF
header; no tensor data is read. `weight_bytes(args, dtype, quantize)` counts the base exactly as loading.py
holds it: dense in the compute dtype, or in mlx's affine quantized layout.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ModelLoadError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
"Bytes per element of each compute dtype (config.DTYPES)."
ST_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
"safetensors header dtype names of the float dtypes."
SAFETENSORS_HEADER_MAX = 100_000_000
"A larger safetensors JSON header is taken as corruption, not read."


@dataclass
class ModelSpec:
    """A base model's architecture and in-memory weight size, read from config.json / GGUF metadata only."""

    args: Any
    "ModelArgs (model.py)."
    path: str
    weight_bytes: int
    "Bytes the weights take once loaded (after the dtype cast and quantization the config asks for)."
    n_params: int
    "Logical parameter count."
    dtype: str
    "The compute dtype of activations (float32, float16 or bfloat16)."
    quantized: Optional[dict] = None
    "{'bits', 'group_size'} when the base is quantized in memory."

    def describe(self) -> str:
        a = self.args
        q = f", {self.quantized['bits']}-bit base" if self.quantized else ""
        return (f"{a.model_type}, {a.num_hidden_layers} layers, d {a.hidden_size}, {self.n_params / 1e9:.3g}B "
                f"parameters, {self.dtype}{q}")


def linear_shapes(args) -> dict[str, tuple[int, int, bool]]:
    """Per decoder layer: projection name → (in, out, has_bias)."""
    D, F, H, K, hd = (args.hidden_size, args.intermediate_size, args.num_attention_heads, args.num_key_value_heads,
                      args.head_dim)
    return {
        "q_proj": (D, H * hd, args.qkv_bias), "k_proj": (D, K * hd, args.qkv_bias),
        "v_proj": (D, K * hd, args.qkv_bias), "o_proj": (H * hd, D, args.o_bias),
        "gate_proj": (D, F, args.mlp_bias), "up_proj": (D, F, args.mlp_bias), "down_proj": (F, D, args.mlp_bias),
    }


def weight_bytes(args, dtype: str, quantize: Optional[dict] = None) -> tuple[int, int]:
    """(bytes in memory, logical parameter count) of a dense or quantized base, counted from its shapes.

    quantize {bits, group_size}: every linear and the embedding whose input size is a multiple of the group
    size hold bits/8 bytes per weight plus a scale and a bias per group in `dtype` (mlx's affine layout), as
    loading's quantization does.
    """
    s = DTYPE_BYTES[dtype]
    D, V, nl = args.hidden_size, args.vocab_size, args.num_hidden_layers

    def matrix(n_in: int, n_out: int) -> int:
        if quantize and n_in % quantize["group_size"] == 0:
            return n_out * n_in * quantize["bits"] // 8 + 2 * n_out * (n_in // quantize["group_size"]) * s
        return n_out * n_in * s

    total, n = 0, 0
    for n_in, n_out, bias in linear_shapes(args).values():
        total += nl * (matrix(n_in, n_out) + (n_out * s if bias else 0))
        n += nl * (n_in * n_out + (n_out if bias else 0))
    norms = (2 * nl + 1) * D
    total += norms * s + matrix(D, V)  # embedding (V, D): input dim D
    n += norms + V * D
    if not args.tie_word_embeddings:
        total += matrix(D, V)
        n += V * D
    return total, n


def safetensors_dtypes(model_dir: Path) -> dict[str, int]:
    """{safetensors dtype: elements} over a dir's weight files, from their JSON headers (no tensor data read)."""
    counts: dict[str, int] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > SAFETENSORS_HEADER_MAX:
                    raise ValueError("header too large")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"{f}: cannot read the safetensors header ({type(e).__name__}: {e}); the file may "
                                 "be truncated or corrupt — download it again") from None
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            dt = info.get("dtype", "?")
            counts[dt] = counts.get(dt, 0) + math.prod(info.get("shape", []))
    return counts


def local_model_path(path: str) -> Path:
    """A local path as is; a hub id → its snapshot in the local cache (never downloads; hub.hub_error's one line
    saying how to fetch it when it is not cached)."""
    from . import hub

    p = Path(path).expanduser()
    if p.exists():
        return p
    if p.suffix.lower() == ".gguf" or not hub.is_hub_id(str(path)):
        raise ModelLoadError(f"model path {str(path)!r} does not exist; pass a local HF model dir, a .gguf file or a "
                             "hub id like org/name")
    return hub.download(str(path), allow_patterns=hub.MODEL_FILES, local_only=True)


def _quantize_dict(quantize: Any) -> Optional[dict]:
    if quantize is None:
        return None
    if hasattr(quantize, "bits"):
        return {"bits": int(quantize.bits), "group_size": int(quantize.group_size)}
    return dict(quantize)


def model_spec(path: Union[str, os.PathLike], dtype: Optional[str] = None, quantize: Any = None) -> ModelSpec:
    """Architecture and in-memory weight size of a HF model dir, .gguf file or cached hub id, read from
    config.json (+ safetensors headers for the stored dtype) or the GGUF metadata: no weights are loaded.

    dtype: the compute dtype the config asks for (None: as stored); quantize: a QuantizeConfig or
    {bits, group_size} when the base is quantized at load."""
    from .model import ModelArgs

    q = _quantize_dict(quantize)
    src = local_model_path(str(path))
    if src.is_file() and src.suffix.lower() == ".gguf":
        from .gguf import read

        args = ModelArgs.from_hf_config(read.header_config(src), source=str(src))
        act = dtype or read.default_dtype()  # GGUF tensors are dequantized to this dtype at load
        wb, n = weight_bytes(args, act, q)
        return ModelSpec(args, str(src), wb, n, act, q)
    if src.is_file():
        raise ModelLoadError(f"{src}: not a model dir or .gguf file; pass the directory that holds config.json")
    from .loading import read_config

    config = read_config(src)
    args = ModelArgs.from_hf_config(config, source=str(src / "config.json"))
    floats = {ST_FLOAT[k]: v for k, v in safetensors_dtypes(src).items() if k in ST_FLOAT}
    stored_dtype = max(floats, key=floats.get) if floats else None
    cfg_dtype = config.get("torch_dtype") or config.get("dtype")
    act = dtype or stored_dtype or (cfg_dtype if cfg_dtype in DTYPE_BYTES else "float32")
    mlx_quant = config.get("quantization")
    if q is None and isinstance(mlx_quant, dict) and mlx_quant.get("bits"):
        q = {"bits": int(mlx_quant["bits"]), "group_size": int(mlx_quant.get("group_size", 64))}
    wb, n = weight_bytes(args, act, q)
    return ModelSpec(args, str(src), wb, n, act, q)
