"""The tokenizer stored in a GGUF file, as a transformers fast tokenizer with the file's chat template.

    tokenizer = gguf_tokenizer("model.gguf", contents.metadata)

Built from the vocabulary, merges and special tokens in the metadata with transformers' own GGUF tokenizer
builders, fed from the metadata already read (transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
gives the same tokenizer but re-parses the file, ~15 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ModelLoadError
from .read import read_header


def gguf_tokenizer(path: Union[str, Path], metadata: Optional[dict] = None) -> Any:
    """A transformers fast tokenizer (with the file's chat template) from the GGUF's tokenizer metadata."""
    path = Path(path)
    if metadata is None:
        metadata = read_header(path, max_array=None).metadata  # no tensor data is read
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
    specials = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                ("pad_token", "padding_token_id"))
    for name, key in specials:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            tok_config[name] = tokens[int(token_id)]
    try:
        backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tok_dict)
    except Exception as e:  # transformers' builders raise many types for a malformed vocabulary
        raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tok_config, **extra})


def _auto_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # as above: whatever transformers raises, one line naming the file
        raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from None
