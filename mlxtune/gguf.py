"""Read a Llama / Qwen2 GGUF file into Hugging Face weight names, a config.json dict and a tokenizer.

    contents = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    contents.config      # a config.json dict (ModelArgs.from_hf_config reads it)
    contents.weights     # {"model.layers.0.self_attn.q_proj.weight": array, ...}
    tokenizer = gguf_tokenizer(path, contents.metadata)

Tensors are read with `mx.load(path, return_metadata=True)`, which returns F32/F16 tensors as arrays and
Q4_0/Q4_1/Q8_0 tensors as MLX affine-quantized triples (`name.weight` uint32, `name.scales`, `name.biases`,
group size 32). Those are dequantized in float32 (bit-exact with llama.cpp's own gguf-py) and cast to the
requested dtype, or, with `keep_quantized=True`, kept as triples for `nn.QuantizedLinear` (QLoRA on the file's
own quantization). Other tensor types (K-quants, Q5_x, ...) that MLX cannot read are dequantized with the
`gguf` package (numpy; slower). MLX returns BF16 tensors as float16.

llama.cpp's converter permutes the rows of the Llama Q and K projections (its RoPE pairs adjacent dimensions,
Hugging Face's pairs halves); `unpermute_rows` undoes that. Qwen2 files are not permuted.

The tokenizer is built from the vocabulary, merges and special tokens stored in the metadata with
transformers' own GGUF tokenizer builders, fed from the metadata already read here (transformers'
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives the same tokenizer but re-parses the file, ~15 s).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .errors import ModelLoadError

SUPPORTED_ARCHS = ("llama", "qwen2")
GROUP_SIZE = 32  # every GGUF block format MLX reads (Q4_0, Q4_1, Q8_0) has 32 weights per block

# Per-block tensor names: GGUF → Hugging Face (under `model.layers.N.`).
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

@dataclass
class GGUFContents:
    """What a GGUF file holds, in Hugging Face terms."""

    config: dict
    "A config.json dict (model_type, sizes, rope, tie_word_embeddings, bos/eos ids)."
    weights: dict
    "Hugging Face names → arrays; unknown GGUF tensors keep their GGUF name (the loader reports them)."
    quantization: Optional[dict] = None
    "With keep_quantized: mlx-lm style {'group_size': 32, 'bits': b, '<module path>': {...}} for kept triples."
    metadata: dict = field(default_factory=dict)
    "The GGUF metadata as plain Python values (token lists included)."


def hf_name(gguf_name: str) -> Optional[str]:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for names with no HF match."""
    base, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{kind}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    return None


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation: rows (H*hd, ...) as (H, hd/2, 2) → (H, 2, hd/2).

    Works on a weight (out, in), a bias (out,) and on the rows of quantized triples (weight, scales, biases
    are all row-major in the output dimension, and quantization groups run along the input dimension).
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def default_dtype() -> str:
    """float16 where MLX has a GPU, float32 on the CPU (bf16/f16 matmuls are slow on CPUs)."""
    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "float16"


def read_gguf(path: str | Path, dtype: Optional[str] = None, keep_quantized: bool = False) -> GGUFContents:
    """Read a llama / qwen2 GGUF: config dict, HF-named weights (dequantized unless keep_quantized), metadata.

    dtype: "float32", "bfloat16" or "float16" for every float tensor; None: `default_dtype()`.
    keep_quantized: keep Q4_0/Q4_1/Q8_0 tensors as MLX affine triples (group 32); others are dequantized.
    """
    path = Path(path)
    float_dtype = getattr(mx, dtype or default_dtype())
    raw, metadata = _read_tensors(path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; mlxtune reads {', '.join(SUPPORTED_ARCHS)} "
            "(Llama 3.x, Qwen2/2.5) GGUF files"
        )
    # Group MLX's quantized triples: `x.weight` (or `x`) with `x.scales` / `x.biases`.
    triples: dict[str, tuple[mx.array, mx.array, mx.array]] = {}
    for key in [k for k in raw if k.endswith(".scales")]:
        base = key[: -len(".scales")]
        wkey = base + ".weight" if base + ".weight" in raw else base
        triples[wkey] = (raw.pop(wkey), raw.pop(key), raw.pop(base + ".biases"))

    shapes = {k: tuple(v.shape) for k, v in raw.items()}
    shapes.update({k: (w.shape[0], s.shape[-1] * GROUP_SIZE) for k, (w, s, _) in triples.items()})
    config = gguf_config(metadata, shapes, path)
    rope_freqs = raw.pop("rope_freqs.weight", None)
    if rope_freqs is not None:
        config["rope_scaling"] = _llama3_scaling_from_factors(np.array(rope_freqs.astype(mx.float32)), config, path)

    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    permuted = arch == "llama"  # llama.cpp permutes Q/K for LlamaModel only

    def heads_for(name: str) -> Optional[int]:
        if permuted and ".self_attn.q_proj." in name:
            return n_heads
        if permuted and ".self_attn.k_proj." in name:
            return n_kv
        return None

    weights: dict[str, mx.array] = {}
    quantization: dict[str, Any] = {}
    for gname, arr in raw.items():
        name = hf_name(gname) or gname
        h = heads_for(name)
        if h:
            arr = unpermute_rows(arr, h)
        weights[name] = arr.astype(float_dtype) if mx.issubdtype(arr.dtype, mx.floating) else arr
    for gname, (w, scales, biases) in triples.items():
        name = hf_name(gname) or gname
        bits = w.shape[-1] // scales.shape[-1]
        h = heads_for(name)
        if h:
            w, scales, biases = (unpermute_rows(a, h) for a in (w, scales, biases))
        if keep_quantized and name.endswith(".weight"):
            module = name[: -len(".weight")]
            weights[name] = w
            weights[module + ".scales"] = scales.astype(float_dtype)
            weights[module + ".biases"] = biases.astype(float_dtype)
            quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
        else:
            dense = mx.dequantize(
                w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=GROUP_SIZE, bits=bits
            )
            weights[name] = dense.astype(float_dtype)
    quant_cfg = None
    if quantization:
        # mlx-lm's layout: a default plus per-module entries where a module differs from it.
        bits_count: dict[int, int] = {}
        for q in quantization.values():
            bits_count[q["bits"]] = bits_count.get(q["bits"], 0) + 1
        default_bits = max(bits_count, key=bits_count.get)
        quant_cfg = {"group_size": GROUP_SIZE, "bits": default_bits}
        quant_cfg.update({m: q for m, q in quantization.items() if q["bits"] != default_bits})
    return GGUFContents(config=config, weights=weights, quantization=quant_cfg, metadata=metadata)


def gguf_config(metadata: dict, shapes: dict[str, tuple], path: str | Path = "gguf") -> dict:
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


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old_ctx: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp writes to `rope_freqs.weight` for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


def _llama3_scaling_from_factors(factors: np.ndarray, config: dict, path: Path) -> dict:
    """Recover Llama 3's rope_scaling dict from the `rope_freqs.weight` divisors (it is not in the metadata).

    The factor is the largest divisor; the original context (a power of two) and the low/high frequency factors
    are searched among the values Llama 3.x uses and checked against every divisor: a match reproduces the
    file's frequencies exactly, anything else is refused rather than guessed.
    """
    factor = float(factors.max())
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        for old_ctx in (2**k for k in range(8, 18)):
            expected = _llama3_factors(config["rope_theta"], config["head_dim"], factor, low, high, old_ctx)
            if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-5):
                return {"rope_type": "llama3", "factor": float(np.float32(factor)), "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
    raise ModelLoadError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling; this rope variant is not supported")


# ---------------------------------------------------------------------------------------------------------
# Reading tensors and metadata


def _plain(value: Any) -> Any:
    """mx.load's metadata values → Python: 0-d arrays → scalars, 1-d arrays → lists."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _read_tensors(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata): with MLX when it can read every tensor type, else with the gguf package."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    try:
        raw, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX reads F32/F16/BF16/Q4_0/Q4_1/Q8_0 only
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)") from None
        if "past the end" in str(e) or "incomplete" in str(e):
            raise ModelLoadError(f"{path}: the GGUF file is truncated ({e}); download it again") from None
        return _read_with_gguf_py(path)  # another tensor type (K-quants, Q5_x, ...)
    return dict(raw), {k: _plain(v) for k, v in metadata.items()}


def _read_with_gguf_py(path: Path) -> tuple[dict, dict]:
    """Fallback for tensor types MLX cannot read: dequantize everything to float32 with llama.cpp's gguf-py."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ModelLoadError(
            f"{path}: this GGUF uses a tensor type MLX cannot read (e.g. Q4_K, Q6_K); install the `gguf` package "
            "to dequantize it, or use a Q8_0/Q4_0/Q4_1/F16 file"
        ) from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read this GGUF file ({e}); it may be truncated — download it again") from None
    metadata = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = fld.contents()
        metadata[name] = value.item() if isinstance(value, np.generic) else value
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims fastest-first
        data = dequantize(t.data, t.tensor_type).reshape(shape)
        tensors[t.name] = mx.array(np.ascontiguousarray(data, dtype=np.float32))
    return tensors, metadata


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def gguf_tokenizer(path: str | Path, metadata: Optional[dict] = None):
    """A transformers fast tokenizer (with the file's chat template) from the GGUF's tokenizer metadata."""
    path = Path(path)
    if metadata is None:
        metadata = _read_tensors(path)[1]  # tensors are lazy: only the metadata is read
    if "tokenizer.ggml.tokens" not in metadata:
        raise ModelLoadError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.tokens); it cannot be used for training")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # older transformers: its own (slower) GGUF path
        return _auto_tokenizer(path)
    from transformers import PreTrainedTokenizerFast

    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tok_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        tok_config.setdefault("add_bos_token", True)
    tokens = tok_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            tok_config[name] = tokens[int(token_id)]
    try:
        backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tok_dict)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tok_config, **extra})


def _auto_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from None
