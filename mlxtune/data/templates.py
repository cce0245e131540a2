"""Chat templates for rendering records: the tokenizer's own, a built-in (alpaca, chatml, llama3), or a .jinja file.

`resolve_template` picks the template for a format per `data.template` (auto: alpaca for Alpaca data, else the
tokenizer's chat template; completions without one render raw; text is always raw) and checks that the tokenizer
knows the special tokens a built-in writes. `wants_bos` says whether the model expects BOS first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

from ..config import TEMPLATES
from ..errors import DataError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
"Where the built-in templates' .jinja sources live (mlxtune/templates)."
TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
"Tokens a built-in template writes that the tokenizer must know as single tokens."


def builtin_template(name: str) -> str:
    """The source of a built-in chat template (alpaca, chatml, llama3)."""
    return (TEMPLATE_DIR / f"{name}.jinja").read_text()


def template_source_hash(template: str) -> Optional[str]:
    """A hash of the source `data.template` names (built-in or .jinja file); None for auto / tokenizer."""
    if template in TEMPLATES:
        return hashlib.sha256(builtin_template(template).encode()).hexdigest()
    p = Path(template).expanduser()
    if template not in ("auto", "tokenizer") and p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return None


def tokenizer_name(tok: Any) -> str:
    """The tokenizer's path or class name, for error messages."""
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def check_template_tokens(tok: Any, name: str) -> None:
    """Refuse a built-in template whose special tokens (or EOS) the tokenizer does not have."""
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer ({tokenizer_name(tok)}) has no EOS token, which the {name} template needs to end "
                        f"a turn; use a tokenizer with eos_token set")
    vocab = tok.get_vocab()
    missing = [t for t in TEMPLATE_TOKENS.get(name, ()) if t not in vocab]
    if missing:
        raise DataError(f"data.template: {name} writes {', '.join(missing)}, which the tokenizer ({tokenizer_name(tok)}) "
                        f"does not have as tokens; use the template that matches the model (auto / tokenizer)")


def resolve_template(tok: Any, template: str, fmt: str) -> tuple[str, Optional[str]]:
    """(name, jinja source or None for the tokenizer's own) for records of `fmt`; name `raw` = no template.
    `tok`: a Hugging Face tokenizer; `template`: the `data.template` setting."""
    has_own = bool(getattr(tok, "chat_template", None))
    t = template
    if fmt == "text":
        return "raw", None
    if t == "auto":
        if fmt == "alpaca":
            t = "alpaca"
        elif has_own:
            t = "tokenizer"
        elif fmt == "completions":
            return "raw", None
        else:
            raise DataError(f"data.template: the tokenizer ({tokenizer_name(tok)}) has no chat template to render "
                            f"{fmt} conversations; set data.template to chatml, llama3 or alpaca")
    if t == "tokenizer":
        if not has_own:
            raise DataError(f"data.template: tokenizer, but the tokenizer ({tokenizer_name(tok)}) has no chat template; "
                            f"set data.template to chatml, llama3 or alpaca")
        return "tokenizer", None
    if t in TEMPLATES:
        check_template_tokens(tok, t)
        return t, builtin_template(t)
    p = Path(t).expanduser()
    if not p.is_file():
        raise DataError(f"data.template: {t!r} is not auto, tokenizer, {', '.join(TEMPLATES)} or an existing .jinja file")
    return str(p), p.read_text()


def wants_bos(tok: Any) -> bool:
    """Whether the model expects BOS first: its tokenizer adds one, or its chat template writes one."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    if bool(ids) and ids[0] == tok.bos_token_id:
        return True
    if not getattr(tok, "chat_template", None):
        return False
    try:
        s = tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False)
        return s.startswith(tok.bos_token)
    except Exception:  # a template that rejects a lone user turn tells us nothing
        return False
