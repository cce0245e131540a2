"""The data types the pipeline stages pass along: raw `Line` → normalized `Record` → tokenized `Example`.

`BadRecord` is how every stage says a record cannot become an example: its `reason` is the category counted in
`on_bad_line: skip` mode, its `detail` and `fix` become the one-line DataError of `on_bad_line: error`.
`FileResult` is one file's outcome (what the cache stores and `load_splits` aggregates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


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
    clipped: bool = False
    "Cut to the encoder's character budget before tokenizing (the record is far over max_length)."


class BadRecord(Exception):
    """A record that cannot become an example: `reason` is the category counted in skip mode."""

    def __init__(self, reason: str, detail: str, fix: str = "", fatal: bool = True):
        super().__init__(detail)
        self.reason, self.detail, self.fix = reason, detail, fix
        self.fatal = fatal  # False: dropped and reported even with on_bad_line: error (truncation emptied it)


@dataclass
class Line:
    """A raw record: where it came from and its parsed value (or why it could not be parsed)."""

    where: str
    "`path:17` (JSON/JSONL line) or `path:row 17` (Parquet)."
    label: str
    "`line 17` or `row 17`, for summaries."
    value: Any = None
    error: Optional[BadRecord] = None


@dataclass
class FileResult:
    """One file read, normalized and tokenized."""

    examples: list[Example]
    format: str
    template: str
    records: int
    skipped: dict[str, list[str]]
    "reason → labels (`line 17`) of the records dropped for it."
    truncated: int
    cached: bool = False


def skip_text(skipped: dict[str, list[str]], show: int = 5) -> str:
    """`2 unknown role (line 3, line 5), 1 invalid JSON (line 2)`: most frequent reason first."""
    parts = []
    for reason, labels in sorted(skipped.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(labels[:show]) + (", ..." if len(labels) > show else "")
        parts.append(f"{len(labels)} {reason} ({shown})")
    return ", ".join(parts)
