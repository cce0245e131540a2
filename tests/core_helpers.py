"""Helpers for the core tests (model, loading, LoRA, GGUF): oracles, config dialects and a GGUF writer.

The GGUF writer mirrors llama.cpp's convert_hf_to_gguf.py for Llama and Qwen2 (names, the Q/K row permutation
for Llama, 1-D tensors kept in F32), using llama.cpp's own `gguf` package for quantization and writing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

RTOL = 1e-5  # max |a - b| / max |b| for float32 logits


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_logits(model_dir: Path, ids: np.ndarray, **kwargs) -> np.ndarray:
    """transformers' logits (torch CPU, float32) for int ids (B, L)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def mlx_logits(model, ids: np.ndarray, **kwargs) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(np.asarray(ids, dtype=np.int32)), **kwargs).astype(mx.float32))


def to_v4_dialect(src: Path, dst: Path) -> Path:
    """Copy a transformers-5 model dir and rewrite config.json as transformers 4 wrote it.

    transformers 4: top-level `rope_theta` and `rope_scaling` (null when default), `torch_dtype`, no
    `rope_parameters`, no `dtype`, no `layer_types`.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    cfg["transformers_version"] = "4.46.0"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


# ---------------------------------------------------------------------------------------------------------
# HF dir → GGUF, as llama.cpp's converter does it

_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (n_head: query heads for Q, key/value heads for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    module, kind = hf.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{_BLOCK[rest]}.{kind}"
    return f"{_TOP[module]}.{kind}"


def hf_to_gguf(hf_dir: Path, out: Path, qtype: str = "F32", tokens: list[str] | None = None,
               extra_tensors: dict | None = None) -> Path:
    """Write a llama / qwen2 HF dir (float32 safetensors) as a GGUF with 2-D weights in `qtype`.

    qtype: F32, F16, Q8_0, Q4_0, Q4_1 or Q5_0 (Q5_0 is a type MLX cannot read: the loader's fallback).
    tokens: the token list to store (default: placeholder strings covering the vocabulary).
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = cfg["model_type"]
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0)}
    weights = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if cfg.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    w = GGUFWriter(str(out), arch)
    w.add_name("tiny-test")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope["rope_theta"])
    vocab = cfg["vocab_size"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens or [f"<t{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    qt = getattr(GGMLQuantizationType, qtype)
    for name in sorted(weights):
        a = weights[name].astype(np.float32)
        if arch == "llama" and ".self_attn.q_proj." in name:
            a = llamacpp_permute(a, n_head)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            a = llamacpp_permute(a, n_kv)
        gname = _gguf_name(name)
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, a)
        elif qtype == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        else:
            q = quantize(a, qt)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qt)
    for gname, a in (extra_tensors or {}).items():
        w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# Cutting a real GGUF down to its first blocks, bytes untouched (a cheap input for transformers' GGUF loader)

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_value(buf: bytes, pos: int, vtype: int):
    import struct

    if vtype in _SCALAR:
        fmt = _SCALAR[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == 8:  # string
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8: pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n
    if vtype == 9:  # array
        itype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        out = []
        for _ in range(n):
            v, pos = _read_value(buf, pos, itype)
            out.append(v)
        return out, pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_layout(path: Path) -> tuple[dict, dict, int]:
    """(metadata, {name: (ggml_type, dims fastest-first, offset)}, data_start), parsed from the header."""
    import struct

    buf = Path(path).read_bytes()
    assert buf[:4] == b"GGUF"
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, meta = 24, {}
    for _ in range(n_kv):
        key, pos = _read_value(buf, pos, 8)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = _read_value(buf, pos + 4, vtype)
    tensors = {}
    for _ in range(n_tensors):
        name, pos = _read_value(buf, pos, 8)
        (nd,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{nd}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        tensors[name] = (ttype, dims, offset)
    align = meta.get("general.alignment", 32)
    return meta, tensors, (pos + align - 1) // align * align


def truncate_gguf(src: Path, dst: Path, n_layers: int) -> Path:
    """Write `src`'s first `n_layers` blocks, embeddings, final norm and head to `dst`, the tensor bytes
    copied verbatim, with only the architecture metadata (no token lists, so it parses in milliseconds)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    meta, tensors, data_start = read_gguf_layout(src)
    arch = meta["general.architecture"]
    w = GGUFWriter(str(dst), arch)
    for key, value in meta.items():
        if key.startswith(f"{arch}.") and not isinstance(value, list):
            if key == f"{arch}.block_count":
                value = n_layers
            if isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_uint32(key, int(value))
    if f"{arch}.vocab_size" not in meta:  # transformers reads the vocabulary size from here or the token list
        w.add_uint32(f"{arch}.vocab_size", len(meta["tokenizer.ggml.tokens"]))
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    for name, (ttype, dims, offset) in tensors.items():
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_layers:
            continue
        qt = GGMLQuantizationType(ttype)
        block, type_size = GGML_QUANT_SIZES[qt]
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        row_bytes = dims[0] // block * type_size
        data = np.array(raw[data_start + offset: data_start + offset + rows * row_bytes]).reshape(rows, row_bytes)
        if qt == GGMLQuantizationType.F32:
            w.add_tensor(name, data.view(np.float32).reshape(tuple(reversed(dims))))
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
