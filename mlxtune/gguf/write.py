"""Write a float Llama 3.x / Qwen2 model and its tokenizer as one GGUF file llama.cpp runs.

    write_gguf(model, tokenizer, "out/model-f16.gguf", outtype="f16" | "q8_0", name="my-model")

Follows llama.cpp's convert_hf_to_gguf.py: arch `llama` has its Q/K rows permuted for llama.cpp's interleaved
RoPE and llama3 rope scaling written as a `rope_freqs` tensor (the divisors `read.rope_freq_divisors` computes
from the model's own RoPE); arch `qwen2` is not permuted. The tokenizer is written as a byte-level BPE
(`tokenizer.ggml.model = gpt2`) with its merges, special ids and chat template; `tokenizer.ggml.pre` is chosen
the way llama.cpp chooses it, by hashing the ids of its probe text.

The model must be float (fused and dequantized: see `exports.fused_model`). The writer writes `path` directly;
callers that want atomic output pass a temp path (`fsio.atomic_file`).
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..config import GGUF_OUTTYPES
from ..errors import ExportError
from ..quant import is_quantized
from ..tokenizer import unwrap
from .hfconfig import rope_freq_divisors

# sha256 of str(token ids) of llama.cpp's pre-tokenizer probe text (convert_hf_to_gguf.py
# get_vocab_base_pre), encoded without special tokens → the `tokenizer.ggml.pre` llama.cpp expects.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, with BOS
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "llama-bpe",  # Llama 3, no BOS
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
_DEFAULT_PRE = {"llama": "llama-bpe", "qwen2": "qwen2"}


def write_gguf(model: nn.Module, tokenizer: Any, path: Union[str, Path], outtype: str = "f16", name: str = "model") -> Path:
    """Write a float (fused, dequantized) Llama 3.x / Qwen2 model and its tokenizer as one GGUF file.

    f16: 2-D weights in float16; q8_0: 2-D weights in Q8_0 (rows whose width is not a multiple of 32 in
    float16). Norms, biases and rope_freqs stay float32, as llama.cpp expects.
    """
    import gguf

    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(GGUF_OUTTYPES)}")
    args = model.args
    archs = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    if args.model_type not in archs:
        raise ExportError(f"GGUF export supports llama and qwen2 models, not {args.model_type!r}")
    if any(is_quantized(m) for _, m in model.named_modules()):
        raise ExportError("write_gguf: the model is quantized; dequantize it first (quant.dequantize)")
    arch = archs[args.model_type]
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    _add_metadata(w, args, arch, outtype, name)
    _add_rope_scaling(w, args)
    _add_tokenizer(w, tokenizer, args)
    _add_tensors(w, model, arch, outtype)
    path = Path(path)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_metadata(w, args, arch, outtype: str, name: str) -> None:
    """General and `{arch}.*` hyperparameters, as convert_hf_to_gguf.py writes them."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_block_count(args.num_hidden_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_rope_freq_base(float(args.rope_theta))
    w.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(args.vocab_size)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope_scaling(w, args) -> None:
    """Linear scaling as metadata; llama3 scaling as `rope_freqs.weight` (llama.cpp divides each base frequency
    by it)."""
    import gguf

    scaling = args.rope_scaling or {}
    rtype = scaling.get("rope_type", scaling.get("type"))
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif rtype == "llama3":
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freq_divisors(args))


def _add_tensors(w, model: nn.Module, arch, outtype: str) -> None:
    """Every parameter under its GGUF name; Llama Q/K rows permuted; 2-D weights in the outtype."""
    import gguf

    args = model.args
    names = gguf.get_tensor_name_map(arch, args.num_hidden_layers)
    heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}
    for key, value in tree_flatten(model.parameters()):
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"write_gguf: no GGUF name for tensor {key!r}")
        data = np.array(value.astype(mx.float32))
        proj = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else ""
        if arch == gguf.MODEL_ARCH.LLAMA and proj in heads and key.endswith((".weight", ".bias")):
            data = _permute(data, heads[proj])
        if data.ndim <= 1 or not new.endswith(".weight") or new.endswith("_norm.weight"):
            w.add_tensor(new, data.astype(np.float32))
        elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(new, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(new, data.astype(np.float16))


def _permute(x: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows → llama.cpp's interleaved pairs (convert_hf_to_gguf.py LlamaModel.permute);
    the inverse of read.unpermute_rows."""
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def _token_table(tok: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1; ids the tokenizer lacks are `[PADi]` (unused)."""
    import gguf

    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if i in added:
            looks_special = t.startswith("<|") and t.endswith("|>")
            types.append(gguf.TokenType.CONTROL if (added[i].special or looks_special) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, types


def _single_id(x: Any):
    """An int token id from an id or a list of ids (the first), else None."""
    if isinstance(x, list):
        x = x[0] if x else None
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _add_tokenizer(w, tokenizer: Any, args) -> None:
    """Byte-level BPE vocab, merges, special ids and chat template, as convert_hf_to_gguf.py writes them."""
    tok = unwrap(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) Hugging Face tokenizer")
    model_j = json.loads(backend.to_str()).get("model", {})
    if model_j.get("type") != "BPE":
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers, not {model_j.get('type')!r}")
    tokens, types = _token_table(tok, args.vocab_size)
    merges = model_j.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(x.replace(" ", chr(ord(" ") + 256)) for x in m) for m in merges]
    ids = tok.encode(_CHKTXT, add_special_tokens=False)
    pre = _PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest(), _DEFAULT_PRE.get(args.model_type, "default"))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos = _single_id(tok.bos_token_id) if tok.bos_token_id is not None else _single_id(args.bos_token_id)
    eos = _single_id(tok.eos_token_id) if tok.eos_token_id is not None else _single_id(args.eos_token_id)
    pad = _single_id(tok.pad_token_id)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if pad is not None:
        w.add_pad_token_id(pad)
    probe = tok.encode("a")
    w.add_add_bos_token(bool(bos is not None and probe[:1] == [bos]))
    w.add_add_eos_token(bool(eos is not None and len(probe) > 1 and probe[-1] == eos))
    template = getattr(tok, "chat_template", None)
    if template:
        w.add_chat_template(template)
