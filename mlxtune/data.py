"""Training data: files → records → conversations or text → (ids, loss mask) examples; `mlxtune data`.

Pipeline
    source      a JSONL file, a JSON list, a Parquet file, a dir with train/valid/test files, or a hub dataset id
    records     one JSON object per line (row); problems are reported as `file:line: what; how to fix`
    format      alpaca, sharegpt, messages, completions or text: detected from the first record that has one's
                keys (`data.format: auto`) or forced; every record normalizes to messages [{role, content}]
                (roles system / user / assistant) or to raw text
    template    the tokenizer's chat template, or a built-in (`alpaca`, `chatml`, `llama3`), or a .jinja file
    example     `Example(ids, mask)`: mask[i] == 1 when ids[i] is a training target

Loss mask. The rendering is tokenized once, with character offsets. For each assistant turn i the template
renders the conversation before it with the generation prompt (P_i: ends right after the assistant header) and
up to and including it (Q_i); the trained characters are [len(P_i), len(Q_i.rstrip())): the turn's content and
its end-of-turn token (`<|eot_id|>`, `<|im_end|>`, EOS) but not the header, not system or user text, and not
the newline a template writes after the end-of-turn token. Every assistant turn is trained, not only the last
(mlx-lm trains only the last). A token is trained when its characters overlap a trained span. P_i and Q_i must
be prefixes of the full rendering (true of Llama 3, ChatML/Qwen2.5 and Alpaca); for a template that rewrites
earlier turns the turn's content is located in the rendering instead. `train_on: all` trains every token.

BOS. A chat template writes its own BOS (Llama 3's does); the text is tokenized without special tokens, so
there is no second one (a doubled BOS is collapsed anyway). The alpaca template, raw completions and plain
text get the tokenizer's BOS when the model uses one (its tokenizer adds it, or its chat template writes it).

Bad records. With `on_bad_line: error` the first bad record (by line) raises one DataError naming file and
line; with `skip` bad records are dropped and counted by reason in a warning (never silently). A split with
no usable example is an error. Truncation (`on_too_long: truncate`) is not an error: it is counted and reported,
and a record whose trained tokens all fall past `max_length` is dropped and reported ("prompt longer than
max_length") in either mode; with `on_too_long: error` an over-long record is a bad record.

Cache. Tokenized files are cached under `$MLXTUNE_CACHE/data` (default `~/.cache/mlxtune/data`), keyed by
the file's content, the tokenizer's content (vocabulary, merges, special tokens, chat template), the template
and the data settings, so a resumed run does not tokenize again. Written atomically; a corrupt entry is
ignored and rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .config import DataConfig
from .errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("alpaca", "sharegpt", "messages", "completions", "text")
BUILTIN_TEMPLATES = ("alpaca", "chatml", "llama3")
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"), "test": ("test",)}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Tokens a built-in template writes that the tokenizer must know as single tokens.
TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    ids: list[int]
    "Token ids, BOS first when the model uses one."
    mask: list[int]
    "mask[i] == 1: ids[i] is a training target (predicted from position i - 1)."

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Splits:
    """The tokenized splits; unpacks as `train, valid, test = splits`."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    info: dict = field(default_factory=dict)
    "Per split: files, format, template, records, examples, skipped (reason → count), truncated, tokens."

    def __iter__(self):
        return iter((self.train, self.valid, self.test))

    def summary(self) -> str:
        """One line per split, e.g. `train: 139 examples (17,201 tokens, 8,790 trained), alpaca, ...`."""
        lines = []
        for name in ("train", "valid", "test"):
            i = self.info.get(name)
            if not i:
                continue
            extra = f", {i['truncated']} truncated to {i['max_length']}" if i.get("truncated") else ""
            skipped = sum(i.get("skipped", {}).values())
            extra += f", {skipped} skipped" if skipped else ""
            lines.append(
                f"{name}: {i['examples']} examples ({i['tokens']:,} tokens, {i['target_tokens']:,} trained), "
                f"format {i['format']}, template {i['template']}{extra} [{i['source']}]"
            )
        return "\n".join(lines)


@dataclass
class Record:
    """A normalized record: a conversation (`messages`) or raw `text`."""

    messages: Optional[list[dict]] = None
    "[{role, content}] with roles system/user/assistant; an assistant turn may carry train=False (weight 0)."
    text: Optional[str] = None
    "Raw text (format `text`): every token is trained."
    alpaca: Optional[tuple[str, str, str]] = None
    "(instruction, input, output) of an Alpaca record, for the alpaca template's separate Input block."
    completion: Optional[tuple[str, str]] = None
    "(prompt, completion) of a completions record, for rendering without a chat template."


class BadRecord(Exception):
    """A record that cannot become an example: `reason` is the category counted in skip mode."""

    def __init__(self, reason: str, detail: str, fix: str = "", fatal: bool = True):
        super().__init__(detail)
        self.reason, self.detail, self.fix = reason, detail, fix
        self.fatal = fatal  # False: dropped and reported even with on_bad_line: error (truncation emptied it)


# ---------------------------------------------------------------------------------------------------------
# Sources: paths → (where, value) records


@dataclass
class Line:
    """A raw record: where it came from and its parsed value (or why it could not be parsed)."""

    where: str
    "`path:17` (JSON/JSONL line) or `path:row 17` (Parquet)."
    label: str
    "`line 17` or `row 17`, for summaries."
    value: Any = None
    error: Optional[BadRecord] = None


def read_lines(path: str | os.PathLike) -> list[Line]:
    """Read a JSONL file, a JSON list or a Parquet file into raw records; blank JSONL lines are ignored."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.suffix.lower() == ".parquet":
        return _read_parquet(p)
    raw = p.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data
    head = raw.lstrip()[:1]
    if p.suffix.lower() == ".json" and head == b"[":
        return _read_json_list(p, raw)
    if p.suffix.lower() == ".json" and head == b"{":
        try:  # one JSON document (not a list) vs. JSONL saved as .json
            doc = json.loads(raw)
        except json.JSONDecodeError:
            return _read_jsonl(p, raw)
        raise DataError(f"{p}: a JSON file must hold a list of records, found a single object "
                        f"with keys {', '.join(map(str, list(doc)[:6]))}; use a list [{{...}}, ...] or JSONL")
    if head == b"[" and p.suffix.lower() != ".jsonl":
        return _read_json_list(p, raw)
    return _read_jsonl(p, raw)


def _read_jsonl(p: Path, raw: bytes) -> list[Line]:
    out = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        rec = Line(f"{p}:{n}", f"line {n}")
        try:
            rec.value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            rec.error = BadRecord("not UTF-8", f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8")
        except json.JSONDecodeError as e:
            rec.error = BadRecord("invalid JSON", f"not valid JSON ({e.msg} at column {e.colno})",
                                  "write one JSON object per line")
        out.append(rec)
    return out


def _read_json_list(p: Path, raw: bytes) -> list[Line]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    dec, out = json.JSONDecoder(), []
    ws = re.compile(r"\s*")
    i = ws.match(text, 0).end() + 1  # after '['
    line, counted = 1, 0

    def lineno(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    i = ws.match(text, i).end()
    if text[i : i + 1] == "]":
        return out
    while True:
        i = ws.match(text, i).end()
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file "
                            f"(a JSON list cannot skip a broken element; JSONL can)") from None
        n = lineno(i)
        out.append(Line(f"{p}:{n}", f"line {n}", value))
        i = ws.match(text, end).end()
        if text[i : i + 1] == ",":
            i += 1
        elif text[i : i + 1] == "]":
            break
        else:
            n = lineno(i)
            raise DataError(f"{p}:{n}: not valid JSON (expected ',' or ']' between records); fix the file")
    return out


def _read_parquet(p: Path) -> list[Line]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow; install it (pip install 'mlxtune[parquet]') "
                        f"or convert the file to JSONL") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return [Line(f"{p}:row {n}", f"row {n}", row) for n, row in enumerate(rows, start=1)]


def split_files(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """The train/valid/test files of a dir: `train.jsonl`, `valid.json`, `test.parquet`, shards like
    `data/train-00000-of-00002.parquet`, and `validation`/`val`/`dev` for valid (searched two levels deep)."""
    d = Path(directory)
    files = sorted(f for f in list(d.glob("*")) + list(d.glob("*/*")) if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
    out: dict[str, list[Path]] = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            hits = [f for f in files if f.name.lower().split(".")[0] == name or re.match(rf"{name}[-_.]\d", f.name.lower())]
            if hits:
                best = min(hits, key=lambda f: len(f.relative_to(d).parts))  # prefer top-level files
                out[split] = [f for f in hits if len(f.relative_to(d).parts) == len(best.relative_to(d).parts)]
                break
    return out


def fetch_hub_dataset(repo_id: str) -> Path:
    """Download (or find in the local cache) a Hugging Face dataset repo's JSON/JSONL/Parquet files."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError(f"{repo_id}: fetching a hub dataset needs huggingface_hub; point data.train at a local file") from None
    patterns = ["*.jsonl", "*.json", "*.parquet", "*/*.jsonl", "*/*.json", "*/*.parquet"]
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise DataError(f"{repo_id}: not a local file or dir, and the hub has no accessible dataset of that name "
                        f"({type(e).__name__}); check the path or the dataset id") from None
    except Exception as e:  # offline mode, DNS, timeouts, proxies: all mean "unreachable" here
        raise DataError(
            f"{repo_id}: not a local file or dir, and the Hugging Face hub is unreachable to fetch it as a dataset "
            f"({type(e).__name__}); download it where the hub is reachable, or point data.train at a local "
            f"JSONL/JSON/Parquet file or a dir with train.jsonl"
        ) from None


def resolve_source(path: str) -> Path:
    """A local file or dir as given, else a hub dataset id fetched to a local dir."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if p.is_symlink():
        raise DataError(f"{path}: a symlink to {os.readlink(p)}, which does not exist")
    if p.suffix.lower() in DATA_SUFFIXES or not _HUB_ID.match(path):
        siblings = sorted(f.name for f in p.parent.glob("*")) if p.parent.is_dir() else []
        from .errors import did_you_mean

        raise DataError(f"{path}: no such file or dir{did_you_mean(p.name, siblings)}")
    return fetch_hub_dataset(path)


def split_sources(cfg: DataConfig) -> dict[str, list[Path]]:
    """The files of each split: `data.train` (a file, or a dir's train files), `data.valid` / `data.test`
    (else the dir's valid / test files)."""
    if not cfg.train:
        raise DataError("data.train is not set; point it at a JSONL/JSON/Parquet file, a dir with train.jsonl, or a hub dataset id")
    out: dict[str, list[Path]] = {}
    src = resolve_source(cfg.train)
    if src.is_dir():
        found = split_files(src)
        if "train" not in found:
            raise DataError(f"{cfg.train}: no train file in this dir; expected train.jsonl, train.json or train.parquet")
        out.update(found)
    else:
        out["train"] = [src]
    for split in ("valid", "test"):
        given = getattr(cfg, split)
        if given:
            s = resolve_source(given)
            out[split] = split_files(s).get(split, []) if s.is_dir() else [s]
            if not out[split]:
                raise DataError(f"data.{split}: {given} holds no {split} file")
    return out


# ---------------------------------------------------------------------------------------------------------
# Formats: raw record → Record


def detect_format(value: Any) -> Optional[str]:
    """The format a record's keys indicate, or None."""
    if not isinstance(value, dict):
        return None
    if "messages" in value:
        return "messages"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value and ("output" in value or "input" in value):
        return "alpaca"
    if "prompt" in value and "completion" in value:
        return "completions"
    if "text" in value:
        return "text"
    return None


_FORMAT_KEYS = {
    "alpaca": "instruction, input (optional), output",
    "sharegpt": 'conversations: [{"from": "human"|"gpt"|"system", "value": ...}]',
    "messages": 'messages: [{"role": "system"|"user"|"assistant", "content": ...}]',
    "completions": "prompt, completion",
    "text": "text",
}


def _string(value: Any, name: str, fmt: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise BadRecord("missing field", f"missing field {name!r}", f"{fmt} records need {_FORMAT_KEYS[fmt]}")
        return ""
    if not isinstance(value, str):
        raise BadRecord("wrong type", f"field {name!r} must be a string, got {type(value).__name__} {_short(value)}",
                        "write it as a JSON string")
    return value


def _short(value: Any, n: int = 40) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {type: text, text} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if value is None:
        raise BadRecord("missing field", f"{where} has no content", "give every message a string content")
    raise BadRecord("wrong type", f"{where}.content must be a string, got {type(value).__name__} {_short(value)}",
                    "write the content as a JSON string")


def _check_conversation(messages: list[dict], field_name: str) -> list[dict]:
    if not messages:
        raise BadRecord("empty conversation", f"{field_name} is empty", "give each record at least a user and an assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn", f"{field_name} has no assistant turn, so nothing to train on",
                        "add the assistant's reply")
    return messages


def normalize(value: Any, fmt: str) -> Record:
    """A raw record in format `fmt` → Record, or BadRecord saying what is wrong and how to fix it."""
    if not isinstance(value, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(value).__name__} {_short(value)}",
                        f"write one object per line with {_FORMAT_KEYS[fmt]}")
    if fmt == "alpaca":
        if "instruction" not in value or "output" not in value:
            missing = "output" if "instruction" in value else "instruction"
            raise BadRecord("missing field", f"missing field {missing!r}", f"alpaca records need {_FORMAT_KEYS['alpaca']}")
        ins = _string(value["instruction"], "instruction", fmt)
        inp = _string(value.get("input"), "input", fmt, required=False)
        out = _string(value["output"], "output", fmt)
        user = ins + ("\n\n" + inp if inp.strip() else "")
        return Record(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": out}], alpaca=(ins, inp, out))
    if fmt == "completions":
        prompt = _string(value.get("prompt"), "prompt", fmt)
        completion = _string(value.get("completion"), "completion", fmt)
        return Record(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                      completion=(prompt, completion))
    if fmt == "text":
        text = _string(value.get("text"), "text", fmt)
        if not text.strip():
            raise BadRecord("empty text", "field 'text' is empty", "remove the record or give it text")
        return Record(text=text)
    key, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    turns = value.get(key)
    if turns is None:
        raise BadRecord("missing field", f"missing field {key!r}", f"{fmt} records need {_FORMAT_KEYS[fmt]}")
    if not isinstance(turns, list):
        raise BadRecord("wrong type", f"field {key!r} must be a list of turns, got {type(turns).__name__} {_short(turns)}",
                        f"write it as {_FORMAT_KEYS[fmt]}")
    messages = []
    for j, turn in enumerate(turns):
        where = f"{key}[{j}]"
        if not isinstance(turn, dict):
            raise BadRecord("wrong type", f"{where} must be an object, got {type(turn).__name__} {_short(turn)}",
                            f"write turns as {_FORMAT_KEYS[fmt]}")
        role = turn.get(role_key)
        if fmt == "messages":
            ok = role in ROLES
            names = ", ".join(ROLES)
        else:
            ok = isinstance(role, str) and role in SHAREGPT_ROLES
            names = "human, gpt, system"
            role = SHAREGPT_ROLES.get(role) if ok else role
        if not ok:
            if role is None:
                raise BadRecord("missing field", f"{where} has no {role_key!r}", f"give each turn a {role_key!r}: {names}")
            raise BadRecord("unknown role", f"unknown role {_short(role)} in {where}", f"use {names}")
        msg = {"role": role, "content": _content(turn.get(content_key), where)}
        weight = turn.get("weight")
        if weight is not None:
            if role != "assistant" or weight not in (0, 1):
                raise BadRecord("wrong type", f"{where}.weight must be 0 or 1 on an assistant turn, got {_short(weight)}",
                                "use weight 0 to not train a turn, or leave it out")
            msg["train"] = bool(weight)
        messages.append(msg)
    return Record(messages=_check_conversation(messages, key))


def to_messages(record: Record) -> list[dict]:
    """The record as a plain messages list ({role, content}), as `mlxtune data convert` writes it."""
    if record.messages is None:
        raise DataError("a text record has no conversation to convert; keep it as {\"text\": ...}")
    return [{"role": m["role"], "content": m["content"]} for m in record.messages]


def parse_lines(lines: Sequence[Line], fmt: str = "auto") -> tuple[str, list[tuple[Line, Record | BadRecord]]]:
    """Detect the format (from the first record with a format's keys) and normalize every record."""
    if fmt == "auto":
        fmt = next((f for f in (detect_format(l.value) for l in lines if l.error is None) if f), None)
        if fmt is None:
            return "unknown", [(l, l.error or BadRecord("unknown format", f"no known format in keys {_short(sorted(l.value)) if isinstance(l.value, dict) else _short(l.value)}",
                                                        "use alpaca (instruction/input/output), sharegpt (conversations), "
                                                        "messages, prompt/completion or text records, or set data.format")) for l in lines]
    out = []
    for l in lines:
        if l.error is not None:
            out.append((l, l.error))
            continue
        try:
            out.append((l, normalize(l.value, fmt)))
        except BadRecord as e:
            if e.reason == "missing field" and detect_format(l.value) not in (None, fmt):
                e.detail += f" (this record looks like {detect_format(l.value)}, the file's format is {fmt})"
            out.append((l, e))
    return fmt, out


# ---------------------------------------------------------------------------------------------------------
# Rendering and tokenization: Record → Example


def unwrap_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm TokenizerWrapper (or the tokenizer itself)."""
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if inner is not None and hasattr(inner, "apply_chat_template") else tokenizer


def builtin_template(name: str) -> str:
    """The source of a built-in chat template (alpaca, chatml, llama3)."""
    return (TEMPLATE_DIR / f"{name}.jinja").read_text()


@dataclass
class Rendered:
    """A record rendered to text with its trained character spans."""

    text: str
    spans: list[tuple[int, int]]
    bos: bool = False
    "Prepend the tokenizer's BOS (untrained)."
    eos: bool = False
    "Append the tokenizer's EOS (trained unless train_on says otherwise)."
    all_trained: bool = False


class Encoder:
    """Renders records with a template and tokenizes them into Examples (one tokenizer, one set of settings)."""

    def __init__(
        self,
        tokenizer: Any,
        template: str = "auto",
        *,
        system_prompt: Optional[str] = None,
        train_on: str = "responses",
        max_length: int = 2048,
        on_too_long: str = "truncate",
    ):
        self.tok = unwrap_tokenizer(tokenizer)
        self.template = template
        self.system_prompt = system_prompt
        self.train_on = train_on
        self.max_length = max_length
        self.on_too_long = on_too_long
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self._wants_bos: Optional[bool] = None
        self._templates: dict[str, tuple[str, Optional[str]]] = {}

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any) -> "Encoder":
        return cls(tokenizer, cfg.template, system_prompt=cfg.system_prompt, train_on=cfg.train_on,
                   max_length=cfg.max_length, on_too_long=cfg.on_too_long)

    # -- templates -------------------------------------------------------------------------------------

    def template_for(self, fmt: str) -> tuple[str, Optional[str]]:
        """(name, jinja source or None for the tokenizer's own) for records of `fmt`; `raw` = no template."""
        if fmt not in self._templates:
            self._templates[fmt] = self._resolve_template(fmt)
        return self._templates[fmt]

    def _resolve_template(self, fmt: str) -> tuple[str, Optional[str]]:
        has_own = bool(getattr(self.tok, "chat_template", None))
        t = self.template
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
                raise DataError(f"data.template: the tokenizer ({self._tok_name()}) has no chat template to render "
                                f"{fmt} conversations; set data.template to chatml, llama3 or alpaca")
        if t == "tokenizer":
            if not has_own:
                raise DataError(f"data.template: tokenizer, but the tokenizer ({self._tok_name()}) has no chat template; "
                                f"set data.template to chatml, llama3 or alpaca")
            return "tokenizer", None
        if t in BUILTIN_TEMPLATES:
            self._check_template_tokens(t)
            return t, builtin_template(t)
        p = Path(t).expanduser()
        if not p.is_file():
            raise DataError(f"data.template: {t!r} is not auto, tokenizer, {', '.join(BUILTIN_TEMPLATES)} or an existing .jinja file")
        return str(p), p.read_text()

    def _tok_name(self) -> str:
        return str(getattr(self.tok, "name_or_path", "") or type(self.tok).__name__)

    def _check_template_tokens(self, name: str) -> None:
        if self.eos_id is None:
            raise DataError(f"the tokenizer ({self._tok_name()}) has no EOS token, which the {name} template needs to end "
                            f"a turn; use a tokenizer with eos_token set")
        vocab = self.tok.get_vocab()
        missing = [t for t in TEMPLATE_TOKENS.get(name, ()) if t not in vocab]
        if missing:
            raise DataError(f"data.template: {name} writes {', '.join(missing)}, which the tokenizer ({self._tok_name()}) "
                            f"does not have as tokens; use the template that matches the model (auto / tokenizer)")

    def wants_bos(self) -> bool:
        """Whether the model expects BOS first: its tokenizer adds one, or its chat template writes one."""
        if self._wants_bos is None:
            want = False
            if self.bos_id is not None:
                ids = self.tok("a", add_special_tokens=True)["input_ids"]
                want = bool(ids) and ids[0] == self.bos_id
                if not want and getattr(self.tok, "chat_template", None):
                    try:
                        s = self.tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False)
                        want = s.startswith(self.tok.bos_token)
                    except Exception:  # a template that rejects a lone user turn tells us nothing
                        want = False
            self._wants_bos = want
        return self._wants_bos

    # -- rendering -------------------------------------------------------------------------------------

    def _apply(self, messages: list[dict], source: Optional[str], gen: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja errors and a template's raise_exception
            raise BadRecord("template error", f"the chat template rejected this conversation ({type(e).__name__}: {e})",
                            "check the turn order the model's template expects (e.g. user/assistant alternating)")

    def conversation(self, record: Record, template_name: str) -> list[dict]:
        """The messages the template sees: system prompt added, Alpaca's input kept apart for its template."""
        if template_name == "alpaca" and record.alpaca is not None:
            ins, inp, out = record.alpaca
            msgs = [{"role": "user", "content": ins, "input": inp}, {"role": "assistant", "content": out}]
        else:
            msgs = [dict(m) for m in record.messages]
        if self.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def render(self, record: Record, fmt: str) -> Rendered:
        """The record's text and trained character spans (see the module doc)."""
        name, source = self.template_for(fmt)
        if record.text is not None:
            return Rendered(record.text, [(0, len(record.text))], bos=self.wants_bos(), eos=True, all_trained=True)
        if name == "raw":  # completions without a chat template: prompt + completion + EOS
            prompt, completion = record.completion
            text = prompt + completion
            return Rendered(text, [(len(prompt), len(text))], bos=self.wants_bos(), eos=True,
                            all_trained=self.train_on == "all")
        msgs = self.conversation(record, name)
        clean = [{k: v for k, v in m.items() if k != "train"} for m in msgs]
        full = self._apply(clean, source, gen=False)
        spans: list[tuple[int, int]] = []
        prev_end = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = end = None
            try:
                before = self._apply(clean[:i], source, gen=True) if i else None
            except BadRecord:
                before = None
            if before is not None and full.startswith(before) and len(before) >= prev_end:
                start = len(before)
            upto = self._apply(clean[: i + 1], source, gen=False)
            if full.startswith(upto):
                end = len(upto.rstrip())
            if start is None or end is None or end < start:
                start, end = self._locate(full, m["content"], prev_end, start, i)
            if m.get("train", True):
                spans.append((start, end))
            prev_end = max(prev_end, end)
        bos = name == "alpaca" and self.wants_bos()
        return Rendered(full, spans, bos=bos, all_trained=self.train_on == "all")

    def _locate(self, full: str, content: str, after: int, start: Optional[int], turn: int) -> tuple[int, int]:
        """Fallback for templates that re-render earlier turns: find the content, extend over end-of-turn."""
        for c in (content, content.strip()):
            at = full.find(c, after) if c else -1
            if at >= 0:
                end = at + len(c)
                for eot in (self.tok.eos_token, *END_OF_TURN):
                    if eot and full.startswith(eot, end):
                        end += len(eot)
                        break
                return (at if start is None else start), end
        raise BadRecord("template error", f"cannot find assistant turn {turn} in the rendered conversation "
                        "(the template rewrites it)", "use data.template: chatml or llama3, or a template that "
                        "renders earlier turns unchanged")

    # -- tokenization ----------------------------------------------------------------------------------

    def encode(self, record: Record, fmt: str) -> tuple[Example, bool]:
        """(example, truncated) for one record; raises BadRecord."""
        (result,) = self.encode_many([record], fmt)
        if isinstance(result, BadRecord):
            raise result
        return result

    def encode_many(self, records: Sequence[Record], fmt: str) -> list[tuple[Example, bool] | BadRecord]:
        """Render and tokenize records (one batched tokenizer call); per record (example, truncated) or BadRecord."""
        rendered: list[Rendered | BadRecord] = []
        for r in records:
            try:
                rendered.append(self.render(r, fmt))
            except BadRecord as e:
                rendered.append(e)
        toks = iter(self._tokenize([r for r in rendered if isinstance(r, Rendered)]))
        out: list[tuple[Example, bool] | BadRecord] = []
        for r in rendered:
            if isinstance(r, BadRecord):
                out.append(r)
                continue
            ids, offsets = next(toks)
            try:
                out.append(self._example(r, ids, offsets))
            except BadRecord as e:
                out.append(e)
        return out

    def _tokenize(self, rendered: list[Rendered], chunk: int = 512) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) per rendering: one batched call with offsets (fast tokenizers)."""
        for s in range(0, len(rendered), chunk):
            part = rendered[s : s + chunk]
            try:
                enc = self.tok([r.text for r in part], add_special_tokens=False, return_offsets_mapping=True)
            except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
                yield from (self._tokenize_pieces(r) for r in part)
                continue
            yield from zip(enc["input_ids"], [[tuple(o) for o in offs] for offs in enc["offset_mapping"]])

    def _tokenize_pieces(self, r: Rendered) -> tuple[list[int], list[tuple[int, int]]]:
        """Without offsets: tokenize the pieces between span boundaries separately; each token gets its
        piece's [start, end) (exact when the boundaries fall on token boundaries, as with special tokens)."""
        cuts = sorted({0, len(r.text), *(c for span in r.spans for c in span)})
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b in zip(cuts, cuts[1:]):
            piece = self.tok(r.text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            offsets += [(a, b)] * len(piece)
        return ids, offsets

    def _example(self, r: Rendered, ids: list[int], offsets: list[tuple[int, int]]) -> tuple[Example, bool]:
        if r.all_trained:
            mask = [1] * len(ids)
        else:
            mask = _mask_from_spans(offsets, r.spans)
        if r.bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids, mask = [self.bos_id] + ids, [0] + mask
        if len(ids) >= 2 and self.bos_id is not None and ids[0] == ids[1] == self.bos_id:
            ids, mask = ids[1:], mask[1:]  # a template that writes BOS, plus a tokenizer that adds one
        if r.eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids, mask = ids + [self.eos_id], mask + [1]
        if ids:
            mask[0] = 0  # the first token is never predicted
        if not any(mask):
            raise BadRecord("no target tokens", "no token to train on (every assistant turn is empty or weight 0)",
                            "give the record an assistant reply")
        truncated = len(ids) > self.max_length
        if truncated:
            if self.on_too_long == "error":
                raise BadRecord("too long", f"{len(ids)} tokens, more than data.max_length={self.max_length}",
                                "raise data.max_length, shorten the record, or set data.on_too_long: truncate")
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            if not any(mask):
                raise BadRecord("prompt longer than max_length", f"no trained token within the first "
                                f"data.max_length={self.max_length} tokens (the prompt fills them)",
                                "raise data.max_length or shorten the prompt", fatal=False)
        return Example(ids, mask), truncated

    def prompt(self, record: Record, fmt: str) -> Optional[tuple[list[int], str]]:
        """(prompt ids, reference text) for generating the record's last assistant turn; None for text."""
        name, source = self.template_for(fmt)
        if record.text is not None:
            return None
        if name == "raw":
            prompt, completion = record.completion
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
            return ([self.bos_id] if self.wants_bos() else []) + ids, completion
        msgs = self.conversation(record, name)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        clean = [{k: v for k, v in m.items() if k != "train"} for m in msgs[:last]]
        text = self._apply(clean, source, gen=True)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if name == "alpaca" and self.wants_bos() and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids, msgs[last]["content"]


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters [s, e) overlap a span (spans sorted, disjoint)."""
    mask = [0] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s and not (s == e == spans[j][1]):
            j += 1
        if j == len(spans):
            break
        a, b = spans[j]
        if (s < b and e > a) or (s == e and a <= s < b):
            mask[t] = 1
    return mask


def encode_conversation(messages: list[dict], tokenizer: Any, template: str = "auto", *, system_prompt: Optional[str] = None,
                        train_on: str = "responses", max_length: int = 1 << 30) -> Example:
    """Tokenize one conversation ([{role, content}]) with its loss mask: the API behind load_splits, for one record."""
    try:
        record = normalize({"messages": messages}, "messages")
        enc = Encoder(tokenizer, template, system_prompt=system_prompt, train_on=train_on, max_length=max_length)
        return enc.encode(record, "messages")[0]
    except BadRecord as e:
        raise DataError(f"conversation: {e.detail}{'; ' + e.fix if e.fix else ''}") from None


# ---------------------------------------------------------------------------------------------------------
# Files → examples (with the cache) → splits


@dataclass
class FileResult:
    examples: list[Example]
    format: str
    template: str
    records: int
    skipped: dict[str, list[str]]
    "reason → labels (`line 17`) of the records dropped for it."
    truncated: int
    cached: bool = False


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_TOKENIZER_FP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides tokenization: the tokenizer's full definition (vocab, merges, normalizer,
    added tokens), its special tokens and its chat template."""
    tok = unwrap_tokenizer(tokenizer)
    try:
        return _TOKENIZER_FP[tok]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(str(len(tok)).encode())
    h.update(json.dumps([tok.bos_token, tok.eos_token, getattr(tok, "chat_template", None)], default=str).encode())
    fp = h.hexdigest()
    try:
        _TOKENIZER_FP[tok] = fp
    except TypeError:
        pass
    return fp


def cache_dir() -> Path:
    """`$MLXTUNE_CACHE/data`, default `~/.cache/mlxtune/data`."""
    root = os.environ.get("MLXTUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mlxtune") / "data"


_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _cache_key(path: Path, encoder: Encoder, cfg: DataConfig) -> str:
    parts = {
        "code": _CODE_HASH,
        "file": _file_sha(path),
        "tokenizer": tokenizer_fingerprint(encoder.tok),
        "template": cfg.template,
        "template_source": _template_source_hash(cfg.template),
        "format": cfg.format,
        "system_prompt": cfg.system_prompt,
        "max_length": cfg.max_length,
        "train_on": cfg.train_on,
        "on_bad_line": cfg.on_bad_line,
        "on_too_long": cfg.on_too_long,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _template_source_hash(template: str) -> Optional[str]:
    if template in BUILTIN_TEMPLATES:
        return hashlib.sha256(builtin_template(template).encode()).hexdigest()
    p = Path(template).expanduser()
    if template not in ("auto", "tokenizer") and p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return None


def _cache_load(file: Path) -> Optional[FileResult]:
    try:
        with np.load(file, allow_pickle=False) as z:
            ids, mask, offsets = z["ids"], z["mask"], z["offsets"]
            meta = json.loads(bytes(z["meta"]).decode())
        n = len(offsets) - 1
        assert n == meta["examples"] and offsets[0] == 0 and offsets[-1] == len(ids) == len(mask)
        ids_l, mask_l = ids.tolist(), mask.tolist()
        examples = [Example(ids_l[offsets[k] : offsets[k + 1]], mask_l[offsets[k] : offsets[k + 1]]) for k in range(n)]
        return FileResult(examples, meta["format"], meta["template"], meta["records"], meta["skipped"], meta["truncated"], cached=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt or foreign entry: rebuild it
        log.debug("ignoring unreadable data cache entry %s (%s)", file, e)
        return None


def _cache_save(file: Path, result: FileResult) -> None:
    lengths = [len(e.ids) for e in result.examples]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = np.fromiter((t for e in result.examples for t in e.ids), np.int32, count=int(offsets[-1]))
    mask = np.fromiter((t for e in result.examples for t in e.mask), np.uint8, count=int(offsets[-1]))
    meta = {"format": result.format, "template": result.template, "records": result.records,
            "skipped": result.skipped, "truncated": result.truncated, "examples": len(lengths)}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, ids=ids, mask=mask, offsets=offsets, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # a read-only or full disk only costs the next run a re-tokenization
        log.debug("could not write the data cache %s (%s)", file, e)


def load_file(path: str | os.PathLike, cfg: DataConfig, tokenizer: Any, *, encoder: Optional[Encoder] = None,
              use_cache: Optional[bool] = None) -> FileResult:
    """Read, normalize and tokenize one file (through the cache); raises DataError per `cfg.on_bad_line`."""
    path = Path(path)
    encoder = encoder or Encoder.from_config(cfg, tokenizer)
    use_cache = cfg.cache if use_cache is None else use_cache
    cfile = None
    if use_cache:
        cfile = cache_dir() / f"{_cache_key(path, encoder, cfg)}.npz"
        hit = _cache_load(cfile)
        if hit is not None:
            return hit
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path}: the file has no records; expected {_example_line()}")
    fmt, parsed = parse_lines(lines, cfg.format)
    bad: list[tuple[int, Line, BadRecord]] = [(k, l, r) for k, (l, r) in enumerate(parsed) if isinstance(r, BadRecord)]
    good = [(k, l, r) for k, (l, r) in enumerate(parsed) if isinstance(r, Record)]
    template = encoder.template_for(fmt)[0] if fmt in FORMATS else "-"
    encoded = encoder.encode_many([r for _, _, r in good], fmt) if good else []
    examples, truncated = [], 0
    for (k, l, _), res in zip(good, encoded):
        if isinstance(res, BadRecord):
            bad.append((k, l, res))
        else:
            examples.append(res[0])
            truncated += res[1]
    bad.sort(key=lambda b: b[0])
    fatal = [b for b in bad if b[2].fatal]
    if fatal and cfg.on_bad_line == "error":
        k, l, e = fatal[0]
        more = f" ({len(fatal) - 1} more bad record{'s' * (len(fatal) > 2)} in this file)" if len(fatal) > 1 else ""
        fix = f"; {e.fix}" if e.fix else ""
        raise DataError(f"{l.where}: {e.detail}{fix}, or set data.on_bad_line: skip to drop such records{more}")
    skipped: dict[str, list[str]] = {}
    for _, l, e in bad:
        skipped.setdefault(e.reason, []).append(l.label)
    result = FileResult(examples, fmt, template, len(lines), skipped, truncated)
    if not examples:
        why = _skip_text(skipped) if skipped else "no records"
        raise DataError(f"{path}: no usable examples ({why}); fix the records (data.format: {cfg.format}, detected {fmt})")
    if cfile is not None:
        _cache_save(cfile, result)
    return result


def _example_line() -> str:
    return '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} per line'


def _skip_text(skipped: dict[str, list[str]], show: int = 5) -> str:
    parts = []
    for reason, labels in sorted(skipped.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(labels[:show]) + (", ..." if len(labels) > show else "")
        parts.append(f"{len(labels)} {reason} ({shown})")
    return ", ".join(parts)


def _report(path: Path, r: FileResult, max_length: int) -> None:
    if r.skipped:
        n = sum(len(v) for v in r.skipped.values())
        log.warning("warning: %s: skipped %d of %d records: %s", path, n, r.records, _skip_text(r.skipped))
    if r.truncated:
        log.warning("warning: %s: truncated %d of %d examples to data.max_length=%d tokens", path, r.truncated,
                    len(r.examples), max_length)


def load_splits(data_cfg: DataConfig, tokenizer: Any, seed: int = 0) -> Splits:
    """Tokenized train/valid/test per `data_cfg` (see the module doc). valid: `data.valid`, else the dir's
    valid file, else a seeded `val_split` fraction held out of train; test: `data.test` or the dir's test
    file, else empty."""
    sources = split_sources(data_cfg)
    encoder = Encoder.from_config(data_cfg, tokenizer)
    out: dict[str, list[Example]] = {}
    info: dict[str, dict] = {}
    for split in ("train", "valid", "test"):
        files = sources.get(split, [])
        examples: list[Example] = []
        stats = {"files": [str(f) for f in files], "records": 0, "skipped": Counter(), "truncated": 0, "cached": True,
                 "format": None, "template": None, "max_length": data_cfg.max_length}
        for f in files:
            r = load_file(f, data_cfg, tokenizer, encoder=encoder)
            _report(f, r, data_cfg.max_length)
            examples.extend(r.examples)
            stats["records"] += r.records
            stats["truncated"] += r.truncated
            stats["cached"] &= r.cached
            stats["skipped"].update({k: len(v) for k, v in r.skipped.items()})
            stats["format"], stats["template"] = r.format, r.template
        out[split] = examples
        if files:
            stats["source"] = ", ".join(stats["files"])
            info[split] = stats
    if "valid" not in sources and data_cfg.val_split > 0 and len(out["train"]) >= 2:
        train = out["train"]
        n_val = min(len(train) - 1, max(1, round(len(train) * data_cfg.val_split)))
        perm = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 0x7A1])).permutation(len(train))
        held = set(perm[:n_val].tolist())
        out["valid"] = [e for k, e in enumerate(train) if k in held]
        out["train"] = [e for k, e in enumerate(train) if k not in held]
        info["valid"] = {**info["train"], "records": n_val, "skipped": Counter(), "truncated": 0,
                         "source": f"{data_cfg.val_split:g} of train (seed {seed})"}
    for split, stats in info.items():
        ex = out[split]
        stats["skipped"] = dict(stats["skipped"])
        stats["examples"] = len(ex)
        stats["tokens"] = sum(len(e.ids) for e in ex)
        stats["target_tokens"] = sum(sum(e.mask) for e in ex)
    return Splits(out["train"], out.get("valid", []), out["test"], info)


# ---------------------------------------------------------------------------------------------------------
# CLI: mlxtune data inspect | convert


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer from a local dir (or a model id in the local cache)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise DataError(f"--tokenizer {name}: cannot load a tokenizer from it ({type(e).__name__}); give a Hugging "
                        f"Face model dir with tokenizer.json / tokenizer_config.json") from None


def _inspect_source(path: str) -> Path:
    src = resolve_source(path)
    if src.is_dir():
        files = split_files(src).get("train")
        if not files:
            raise DataError(f"{path}: no train file in this dir")
        return files[0]
    return src


def _style(color: bool):
    def mark(text: str, trained: bool) -> str:
        if not trained:
            return text
        return f"\x1b[32;1m{text}\x1b[0m" if color else f"[[{text}]]"
    return mark


def render_marked(example: Example, tokenizer: Any, color: bool = False) -> str:
    """The example's text with trained tokens marked: green (color) or inside [[ ]]."""
    tok = unwrap_tokenizer(tokenizer)
    mark, out, run, cur = _style(color), [], [], None
    for t, m in zip(example.ids, example.mask):
        if cur is not None and m != cur:
            out.append(mark(tok.decode(run, skip_special_tokens=False), bool(cur)))
            run = []
        cur = m
        run.append(t)
    if run:
        out.append(mark(tok.decode(run, skip_special_tokens=False), bool(cur)))
    return "".join(out)


def _length_stats(lengths: Sequence[int]) -> str:
    a = np.asarray(lengths)
    return (f"min {a.min()}, median {int(np.median(a))}, mean {a.mean():.1f}, p95 {int(np.percentile(a, 95))}, "
            f"max {a.max()}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .batching import make_batches, padding_fraction

    cfg = DataConfig(train=args.file, format=args.format, template=args.template, system_prompt=args.system_prompt,
                     max_length=args.max_length, train_on=args.train_on, on_bad_line=args.on_bad_line, cache=False)
    path = _inspect_source(args.file)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    p = print
    if args.tokenizer is None:
        lines = read_lines(path)
        fmt, parsed = parse_lines(lines, cfg.format)
        good = [(l, r) for l, r in parsed if isinstance(r, Record)]
        skipped: dict[str, list[str]] = {}
        for l, r in parsed:
            if isinstance(r, BadRecord):
                skipped.setdefault(r.reason, []).append(l.label)
        p(f"{path}: {len(lines)} records, format {fmt}")
        for l, r in good[args.index : args.index + args.show]:
            p(f"\n--- record {l.label} (normalized) ---")
            p(json.dumps({"text": r.text} if r.text is not None else {"messages": to_messages(r)}, ensure_ascii=False, indent=2))
        chars = [len(r.text) if r.text is not None else sum(len(m["content"]) for m in r.messages) for _, r in good]
        if chars:
            p(f"\nlengths (characters): {_length_stats(chars)}")
        p(f"skipped: {_skip_text(skipped) if skipped else 'none'}")
        p("pass --tokenizer DIR to see tokens, the loss mask and token lengths")
        return 0
    tokenizer = load_tokenizer(args.tokenizer)
    r = load_file(path, cfg, tokenizer, use_cache=False)
    p(f"{path}: {r.records} records, format {r.format}, template {r.template}, tokenizer {args.tokenizer}")
    legend = "trained tokens in green" if color else "trained tokens inside [[ ]]"
    for k in range(args.index, min(args.index + args.show, len(r.examples))):
        ex = r.examples[k]
        p(f"\n--- example {k}: {len(ex.ids)} tokens, {sum(ex.mask)} trained ({legend}) ---")
        p(render_marked(ex, tokenizer, color))
    lengths = [len(e.ids) for e in r.examples]
    trained = sum(sum(e.mask) for e in r.examples)
    p(f"\nexamples: {len(r.examples)} of {r.records} records; lengths (tokens): {_length_stats(lengths)}")
    p(f"tokens: {sum(lengths):,}, trained: {trained:,} ({trained / max(1, sum(lengths)):.1%})")
    p(f"truncated to max_length={args.max_length}: {r.truncated} of {len(r.examples)}")
    p(f"skipped: {_skip_text(r.skipped) if r.skipped else 'none'}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fr = {m: padding_fraction(make_batches(r.examples, args.batch_size, args.max_length, m, pad)) for m in (True, False)}
    p(f"padding at batch_size {args.batch_size}: packed {fr[True]:.1%}, length-bucketed {fr[False]:.1%}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    path = _inspect_source(args.file)
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path}: the file has no records")
    fmt, parsed = parse_lines(lines, args.format)
    if fmt == "text":
        raise DataError(f"{path}: text records have no conversation to convert to messages; use them as they are")
    rows, skipped = [], {}
    for l, r in parsed:
        if isinstance(r, BadRecord):
            if args.on_bad_line == "error":
                raise DataError(f"{l.where}: {r.detail}{'; ' + r.fix if r.fix else ''}, or pass --on-bad-line skip")
            skipped.setdefault(r.reason, []).append(l.label)
            continue
        msgs = to_messages(r)
        if args.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": args.system_prompt})
        rows.append(json.dumps({"messages": msgs}, ensure_ascii=False))
    if not rows:
        raise DataError(f"{path}: no usable records ({_skip_text(skipped)})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if skipped:
        print(f"warning: {path}: skipped {sum(map(len, skipped.values()))} records: {_skip_text(skipped)}", file=sys.stderr)
    print(f"wrote {len(rows)} records to {out} ({fmt} → messages)")
    return 0


def register_cli(sub) -> None:
    data = sub.add_parser("data", help="inspect or convert training data", description="Inspect or convert training data.")
    dsub = data.add_subparsers(dest="data_command", metavar="{inspect,convert}")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    ins = dsub.add_parser("inspect", help="show a rendered example with its trained tokens, and length statistics",
                          description="Show how records render and which tokens are trained, with length statistics.")
    ins.add_argument("file", help="a JSONL/JSON/Parquet file, a dir with train.jsonl, or a hub dataset id")
    ins.add_argument("--tokenizer", help="a Hugging Face model/tokenizer dir (without it: records only, no tokens)")
    ins.add_argument("--template", default="auto", help="auto, tokenizer, alpaca, chatml, llama3 or a .jinja file")
    ins.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    ins.add_argument("--system-prompt", default=None)
    ins.add_argument("--max-length", type=int, default=DataConfig.max_length)
    ins.add_argument("--train-on", default="responses", choices=("responses", "all"))
    ins.add_argument("--on-bad-line", default="skip", choices=("skip", "error"), help="default: skip (and count)")
    ins.add_argument("--index", type=int, default=0, help="first example to show")
    ins.add_argument("-n", "--show", type=int, default=1, help="how many examples to show")
    ins.add_argument("--batch-size", type=int, default=4, help="for the padding estimate")
    ins.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    ins.set_defaults(func=cmd_inspect)

    conv = dsub.add_parser("convert", help="rewrite a data file as OpenAI-style messages JSONL",
                           description="Rewrite alpaca / sharegpt / completions / messages records as messages JSONL.")
    conv.add_argument("file")
    conv.add_argument("--to", default="messages", choices=("messages",))
    conv.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    conv.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    conv.add_argument("--system-prompt", default=None, help="add this system turn where a record has none")
    conv.add_argument("--on-bad-line", default="error", choices=("error", "skip"))
    conv.set_defaults(func=cmd_convert)
