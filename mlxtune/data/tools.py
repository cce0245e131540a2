"""The logic behind `mlxtune data inspect|convert` (the CLI in cli/data.py prints what these return).

`read_records` parses a file without a tokenizer (records, format, what was skipped), keeping only the records
to show; `render_marked` shows an example's text with its trained tokens marked; `convert_to_messages` rewrites
any conversation format as OpenAI-style messages JSONL, streamed into a hidden temp file renamed into place when
complete (never replacing a file unless asked: `fsio.check_output`); a dir is converted split by split into an
output dir (`convert_splits`), swapped into place only when every split converted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DataError
from ..fsio import atomic_dir, atomic_file
from ..tokenizer import unwrap
from .batching import make_batches, padding_fraction
from .formats import parse_stream, to_messages
from .records import BadRecord, Example, Line, Record, skip_text
from .sources import check_data_file, read_lines


@dataclass
class RecordsView:
    """A file's records, normalized, without tokenizing them (only the ones to show are kept)."""

    records: int
    format: str
    good: list[tuple[Line, Record]]
    "The records to show (`show` of them from `index` among the usable ones)."
    skipped: dict[str, list[str]]
    "reason → labels (`line 17`) of the records that cannot be used."
    lengths: list[int]
    "Every usable record's length in characters."
    first_bad: Optional[tuple[Line, BadRecord]] = None


def read_records(path: Path, fmt: str = "auto", *, index: int = 0, show: int = 1) -> RecordsView:
    """Read and normalize every record of `path` (format `fmt`, or detected), streaming."""
    fmt, parsed = parse_stream(read_lines(path), fmt)
    view = RecordsView(0, fmt, [], {}, [])
    for l, r in parsed:
        view.records += 1
        if isinstance(r, BadRecord):
            view.skipped.setdefault(r.reason, []).append(l.label)
            view.first_bad = view.first_bad or (Line(l.where, l.label), r)
            continue
        if index <= len(view.lengths) < index + show:
            view.good.append((Line(l.where, l.label), r))
        view.lengths.append(char_length(r))
    return view


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
                        on_bad_line: str = "error", overwrite: bool = False) -> Converted:
    """Rewrite the records of `path` as messages JSONL at `out` (streamed to a hidden temp file, renamed into
    place when complete; parent dirs created, and removed again on error). The caller checks `out` first
    (fsio.check_output)."""
    check_data_file(path)
    missing = out.parent
    while not missing.parent.exists() and missing.parent != missing.parent.parent:
        missing = missing.parent
    made = [] if missing.exists() else [out.parent, *[d for d in out.parent.parents if missing in (d, *d.parents)]]
    try:
        with atomic_file(out, overwrite=overwrite) as tmp, open(tmp, "w", encoding="utf-8") as f:
            return _convert(path, f, fmt=fmt, system_prompt=system_prompt, on_bad_line=on_bad_line)
    except BaseException:
        for d in made:  # the dirs this call created, innermost first: nothing is left behind
            try:
                d.rmdir()
            except OSError:
                break
        raise


def convert_splits(files: dict[str, list[Path]], out: Path, *, overwrite: bool = False, **kw: Any) -> dict[str, Converted]:
    """Convert each split's files into `out/<split>.jsonl` (one dir, swapped into place when every split
    converted; an error names the file and line and leaves nothing behind)."""
    done: dict[str, Converted] = {}
    for paths in files.values():
        for p in paths:
            check_data_file(p)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for split, paths in files.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                parts = [_convert(p, f, **kw) for p in paths]
            skipped: dict[str, list[str]] = {}
            for c in parts:
                for reason, labels in c.skipped.items():
                    skipped.setdefault(reason, []).extend(labels)
            done[split] = Converted(sum(c.rows for c in parts), parts[0].format, skipped)
    return done


def _convert(path: Path, f: Any, *, fmt: str = "auto", system_prompt: Optional[str] = None,
             on_bad_line: str = "error") -> Converted:
    """Write the records of `path` to the open file `f` as messages JSONL, one at a time."""
    fmt, parsed = parse_stream(read_lines(path), fmt)
    rows = records = 0
    skipped: dict[str, list[str]] = {}
    for l, r in parsed:
        records += 1
        if fmt == "text":
            raise DataError(f"{path}: text records have no conversation to convert to messages; use them as they are")
        if isinstance(r, BadRecord):
            if on_bad_line == "error":
                raise DataError(f"{l.where}: {r.detail}{'; ' + r.fix if r.fix else ''}, or pass --on-bad-line skip")
            skipped.setdefault(r.reason, []).append(l.label)
            continue
        msgs = to_messages(r)
        if system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
        rows += 1
    if not records:
        raise DataError(f"{path}: the file has no records")
    if not rows:
        raise DataError(f"{path}: no usable records ({skip_text(skipped)})")
    return Converted(rows, fmt, skipped)
