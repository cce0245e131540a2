"""GGUF metadata → a Hugging Face config.json dict, and Llama 3 rope scaling ↔ llama.cpp's `rope_freqs` tensor.

    config = gguf_config(metadata, shapes, path)              # sizes, rope, bias flags, bos/eos ids
    divisors = rope_freq_divisors(args)                       # what write.py stores as rope_freqs.weight
    scaling = llama3_scaling_from_divisors(divisors, config, path)   # what read.py recovers from it

llama.cpp does not store Llama 3's rope scaling as metadata but as per-frequency divisors. Both directions use the
one RoPE implementation, `model.rope_inv_freq`, so the file, the model and transformers agree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import ModelLoadError
from ..model import ModelArgs, rope_inv_freq

PathLike = Union[str, Path]


def gguf_config(metadata: dict, shapes: dict[str, tuple], path: PathLike = "gguf") -> dict:
    """A Hugging Face config.json dict from `{arch}.*` metadata; `shapes` are the (logical) tensor shapes."""
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata has no {arch}.{key}; the file is incomplete or not a {arch} model")
        return value

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts: supported only when all equal
        if len(set(n_kv)) != 1:
            raise ModelLoadError(f"{path}: per-layer key/value head counts {sorted(set(n_kv))} are not supported")
        n_kv = n_kv[0]
    head_dim = int(get("attention.key_length", hidden // n_heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings (rope.dimension_count={rope_dims} < head_dim={head_dim}) are not supported")
    # The embedding's rows are the model's vocabulary (it may be padded past the token list).
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = shapes.get("token_embd.weight", (None,))[0] or get("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ModelLoadError(f"{path}: the GGUF has no token_embd.weight and no vocabulary size")
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": _f32_repr(get("attention.layer_norm_rms_epsilon", 1e-6 if arch == "qwen2" else 1e-5)),
        "rope_theta": _f32_repr(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in shapes
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ModelLoadError(f"{path}: rope scaling {scaling!r} is not supported (linear; llama3 via rope_freqs)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            config[key] = int(metadata[f"tokenizer.ggml.{key}"])
    return config


def _f32_repr(x: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-5 as 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def rope_freq_divisors(args: ModelArgs) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for scaled RoPE: each base inverse frequency over the scaled one (float32).

    Both come from `model.rope_inv_freq`, the RoPE the model runs, so writing and reading agree with it.
    """
    base = rope_inv_freq(dataclasses.replace(args, rope_scaling=None))
    return np.array(base / rope_inv_freq(args), dtype=np.float32)


def llama3_scaling_from_divisors(divisors: np.ndarray, config: dict, path: PathLike) -> dict:
    """Recover Llama 3's rope_scaling dict from the `rope_freqs.weight` divisors (it is not in the metadata).

    The factor is the largest divisor; the original context (a power of two) and the low/high frequency factors
    are searched among the values Llama 3.x uses and checked against every divisor: a match reproduces the
    file's frequencies, anything else is refused rather than guessed.
    """
    args = ModelArgs.from_hf_config({**config, "rope_scaling": None}, source=str(path))
    factor = float(np.float32(divisors.max()))
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        for old_ctx in (2**k for k in range(8, 18)):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                       "original_max_position_embeddings": old_ctx}
            expected = rope_freq_divisors(dataclasses.replace(args, rope_scaling=scaling))
            if expected.shape == divisors.shape and np.allclose(expected, divisors, rtol=1e-5):
                return scaling
    raise ModelLoadError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling; this rope variant is not supported")
