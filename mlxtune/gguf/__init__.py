"""GGUF files: reading (a bounded header parser, tensors → Hugging Face names, config, tokenizer) and writing.

    from mlxtune.gguf import read_gguf, read_header, header_config, gguf_tokenizer, write_gguf

`read` parses headers (bounded) and loads tensors, `hfconfig` turns metadata into a config.json dict (and Llama 3
rope scaling to and from `rope_freqs`, with `model.rope_inv_freq` in both directions), `tokenizer` builds the
stored tokenizer, `write` writes a fused model for llama.cpp.
"""

from .read import (
    GROUP_SIZE,
    SUPPORTED_ARCHS,
    GGUFContents,
    GGUFHeader,
    TensorInfo,
    default_dtype,
    header_config,
    hf_name,
    read_gguf,
    read_header,
    read_stored,
    unpermute_rows,
)
from .hfconfig import gguf_config, llama3_scaling_from_divisors, rope_freq_divisors
from .tokenizer import gguf_tokenizer
from .write import write_gguf

__all__ = [
    "GROUP_SIZE",
    "SUPPORTED_ARCHS",
    "GGUFContents",
    "GGUFHeader",
    "TensorInfo",
    "default_dtype",
    "gguf_config",
    "gguf_tokenizer",
    "header_config",
    "hf_name",
    "llama3_scaling_from_divisors",
    "read_gguf",
    "read_header",
    "read_stored",
    "rope_freq_divisors",
    "unpermute_rows",
    "write_gguf",
]
