"""The logic behind `mlxtune data inspect|convert` (the CLI in cli/data.py prints what these return).

`read_records` parses a file without a tokenizer (records, format, what was skipped); `render_marked` shows an
example's text with its trained tokens marked; `convert_to_messages` rewrites any conversation format as
OpenAI-style messages JSONL, written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..fsio import write_bytes
from ..tokenizer import unwrap
from .batching import make_batches, padding_fraction
from .formats import parse_lines, to_messages
from .records import BadRecord, Example, Line, Record, skip_text
from .sources import read_lines


@dataclass
class RecordsView:
    """A file's records, normalized, without tokenizing them."""

    records: int
    format: str
    good: list[tuple[Line, Record]]
    skipped: dict[str, list[str]]
    "reason → labels (`line 17`) of the records that cannot be used."


def read_records(path: Path, fmt: str = "auto") -> RecordsView:
    """Read and normalize every record of `path` (format `fmt`, or detected)."""
    lines = read_lines(path)
    fmt, parsed = parse_lines(lines, fmt)
    skipped: dict[str, list[str]] = {}
    for l, r in parsed:
        if isinstance(r, BadRecord):
            skipped.setdefault(r.reason, []).append(l.label)
    return RecordsView(len(lines), fmt, [(l, r) for l, r in parsed if isinstance(r, Record)], skipped)


def normalized(record: Record) -> dict:
    """The record as `mlxtune data inspect` shows it: {"text": ...} or {"messages": [...]}."""
    return {"text": record.text} if record.text is not None else {"messages": to_messages(record)}


def char_length(record: Record) -> int:
    """The record's length in characters (text, or the content of all its turns)."""
    return len(record.text) if record.text is not None else sum(len(m["content"]) for m in record.messages)


def length_stats(lengths: Sequence[int]) -> str:
    """`min 3, median 40, mean 41.5, p95 80, max 97`."""
    a = np.asarray(lengths)
    return (f"min {a.min()}, median {int(np.median(a))}, mean {a.mean():.1f}, p95 {int(np.percentile(a, 95))}, "
            f"max {a.max()}")


def _mark(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return text
    return f"\x1b[32;1m{text}\x1b[0m" if color else f"[[{text}]]"


def render_marked(example: Example, tokenizer: Any, color: bool = False) -> str:
    """The example's text with trained tokens marked: green (color) or inside [[ ]]."""
    tok = unwrap(tokenizer)
    out: list[str] = []
    run: list[int] = []
    cur = None
    for t, m in zip(example.ids, example.mask):
        if cur is not None and m != cur:
            out.append(_mark(tok.decode(run, skip_special_tokens=False), bool(cur), color))
            run = []
        cur = m
        run.append(t)
    if run:
        out.append(_mark(tok.decode(run, skip_special_tokens=False), bool(cur), color))
    return "".join(out)


def padding_fractions(examples: Sequence[Example], batch_size: int, max_length: int, pad_id: int) -> dict[bool, float]:
    """The padding fraction of packed (True) and length-bucketed (False) batches of `examples`."""
    return {m: padding_fraction(make_batches(examples, batch_size, max_length, m, pad_id)) for m in (True, False)}


@dataclass
class Converted:
    """What `convert_to_messages` wrote."""

    rows: int
    format: str
    "The input's format."
    skipped: dict[str, list[str]]


def convert_to_messages(path: Path, out: Path, *, fmt: str = "auto", system_prompt: Optional[str] = None,
                        on_bad_line: str = "error") -> Converted:
    """Rewrite the records of `path` as messages JSONL at `out` (atomically; parent dirs created)."""
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path}: the file has no records")
    fmt, parsed = parse_lines(lines, fmt)
    if fmt == "text":
        raise DataError(f"{path}: text records have no conversation to convert to messages; use them as they are")
    rows: list[str] = []
    skipped: dict[str, list[str]] = {}
    for l, r in parsed:
        if isinstance(r, BadRecord):
            if on_bad_line == "error":
                raise DataError(f"{l.where}: {r.detail}{'; ' + r.fix if r.fix else ''}, or pass --on-bad-line skip")
            skipped.setdefault(r.reason, []).append(l.label)
            continue
        msgs = to_messages(r)
        if system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        rows.append(json.dumps({"messages": msgs}, ensure_ascii=False))
    if not rows:
        raise DataError(f"{path}: no usable records ({skip_text(skipped)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, ("\n".join(rows) + "\n").encode("utf-8"))
    return Converted(len(rows), fmt, skipped)
