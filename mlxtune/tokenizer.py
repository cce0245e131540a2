"""Tokenizers: unwrap, load, end-of-turn tokens, stop ids and the pad-id policy, each defined once.

- `unwrap(tok)`: the Hugging Face tokenizer inside an mlx-lm `TokenizerWrapper` (or `tok` itself);
- `load_tokenizer(path)`: transformers' AutoTokenizer for a local dir, never running remote code;
- `END_OF_TURN_TOKENS`: tokens that end a turn or a document across the chat formats we support; each is used
  only when the vocabulary has it as a single token;
- `stop_token_ids(tok, model_args)`: where generation stops — EOS, every end-of-turn token the vocabulary has,
  an mlx-lm wrapper's eos set and the model config's `eos_token_id`s (a Llama 3 base tokenizer's EOS is
  `<|end_of_text|>` while its chat turns end in `<|eot_id|>`; a model that never stops is the classic bug);
- `pad_id(tok)`: the pad token, else EOS, else 0 — padding is never trained or scored, so any id works, but one
  policy keeps batches identical between training, evaluation and `mlxtune data inspect`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ModelLoadError

END_OF_TURN_TOKENS = (
    "<|eot_id|>",  # Llama 3 end of turn
    "<|eom_id|>",  # Llama 3.1 end of a tool-call message
    "<|end_of_text|>",  # Llama 3 EOS
    "<|im_end|>",  # ChatML (Qwen, SmolLM2) end of turn
    "<|endoftext|>",  # Qwen / GPT-2 style end of text
    "<end_of_turn>",  # Gemma end of turn
    "<|end|>",  # Phi-3 end of turn
    "</s>",  # Llama 2 / Mistral EOS
)
"Tokens that end a turn or a document; the one list for stop ids, generation_config.json and loss masks."

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"A model dir has a tokenizer when it holds at least one of these."


def unwrap(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm TokenizerWrapper, or `tokenizer` itself.

    A fast HF tokenizer also has a `_tokenizer` (the Rust one, without `apply_chat_template`): not unwrapped.
    """
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if inner is not None and hasattr(inner, "apply_chat_template") else tokenizer


def require_tokenizer_files(model_dir: Union[str, os.PathLike]) -> None:
    """Raise ModelLoadError when `model_dir` holds no tokenizer files."""
    d = Path(model_dir)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{d}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the base model's tokenizer files in, "
            "or load with tokenizer=False for weights only"
        )


def load_tokenizer(path: Union[str, os.PathLike]) -> Any:
    """transformers' AutoTokenizer for a local dir (no remote code), with one clear error."""
    require_tokenizer_files(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # a corrupt or foreign tokenizer file: say which dir and why
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def token_id(tokenizer: Any, token: str) -> Optional[int]:
    """The id of `token` if it is a single token of this vocabulary, else None."""
    tok = unwrap(tokenizer)
    try:
        tid = tok.convert_tokens_to_ids(token)
    except (KeyError, TypeError, ValueError):
        return None
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and token != tok.unk_token):
        return None
    return int(tid)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple, set)) else [int(value)]


def stop_token_ids(tokenizer: Any, model_args: Any = None) -> list[int]:
    """Sorted ids that end generation: EOS, the END_OF_TURN_TOKENS the vocabulary has, an mlx-lm wrapper's
    eos set (from generation_config.json or GGUF metadata) and `model_args.eos_token_id`.

    `model_args` may be a ModelArgs, a model with `.args`, or None.
    """
    tok = unwrap(tokenizer)
    ids = set(_ids(tok.eos_token_id))
    if tok is not tokenizer:
        ids.update(_ids(getattr(tokenizer, "eos_token_ids", None)))
    for t in END_OF_TURN_TOKENS:
        tid = token_id(tok, t)
        if tid is not None:
            ids.add(tid)
    args = getattr(model_args, "args", model_args)
    ids.update(_ids(getattr(args, "eos_token_id", None)))
    return sorted(ids)


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: pad_token_id, else eos_token_id, else 0."""
    tok = unwrap(tokenizer)
    for v in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if v is not None:
            return int(v[0] if isinstance(v, (list, tuple)) else v)
    return 0
