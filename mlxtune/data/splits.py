"""Files → examples (through the cache) → the train / valid / test splits.

Bad records. With `on_bad_line: error` the first bad record (by line) raises one DataError naming file and line;
with `skip` bad records are dropped and counted by reason in a warning (never silently). A split with no usable
example is an error. Truncation (`on_too_long: truncate`) is not an error: it is counted and reported, and a
record whose trained tokens all fall past `max_length` is dropped and reported ("prompt longer than max_length")
in either mode; with `on_too_long: error` an over-long record is a bad record.

Streaming. A file is read record by record (sources), each record normalized and clipped to the encoder's
character budget at once (encode), and tokenized in chunks of `ENCODE_CHUNK`: memory holds the examples, one
chunk of clipped records and the record being read, never the file. With `on_bad_line: error` tokenizing stops
at the first bad record; the rest of the file is still parsed to count the other bad records.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from ..config import DATA_FORMATS, DataConfig
from ..errors import DataError
from .cache import cache_file, load_entry, save_entry, tokenizer_fingerprint
from .encode import Encoder
from .formats import parse_stream
from .records import BadRecord, Example, FileResult, Line, Record, skip_text
from .sources import check_data_file, read_lines, split_sources

log = logging.getLogger(__name__)

EXAMPLE_LINE = '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} per line'
"What a good record looks like, for the error about an empty file."
ENCODE_CHUNK = 512
"Records tokenized per batched tokenizer call."


@dataclass
class Splits:
    """The tokenized splits; unpacks as `train, valid, test = splits`."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    info: dict = field(default_factory=dict)
    "Per split: files, format, template, records, examples, skipped (reason → count), truncated, tokens."

    def __iter__(self) -> Iterator[list[Example]]:
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


def load_file(path: str | os.PathLike, cfg: DataConfig, tokenizer: Any, *, encoder: Optional[Encoder] = None,
              use_cache: Optional[bool] = None, tokenizer_fp: Optional[str] = None) -> FileResult:
    """Read, normalize and tokenize one file (through the cache); raises DataError per `cfg.on_bad_line`.
    `tokenizer_fp`: the tokenizer's cache fingerprint when the caller has it (computed otherwise)."""
    path = check_data_file(path)  # before the cache hashes it: a FIFO or a device is never opened
    encoder = encoder or Encoder.from_config(cfg, tokenizer)
    use_cache = cfg.cache if use_cache is None else use_cache
    cfile = None
    if use_cache:
        cfile = cache_file(path, cfg, tokenizer_fp or tokenizer_fingerprint(encoder.tok))
        hit = load_entry(cfile)
        if hit is not None:
            return hit
    result, bad = encode_stream(read_lines(path), cfg.format, encoder, stop_at_error=cfg.on_bad_line == "error")
    if not result.records:
        raise DataError(f"{path}: the file has no records; expected {EXAMPLE_LINE}")
    fatal = [b for b in bad if b[2].fatal]
    if fatal and cfg.on_bad_line == "error":
        _, l, e = fatal[0]
        more = f" ({len(fatal) - 1} more bad record{'s' * (len(fatal) > 2)} in this file)" if len(fatal) > 1 else ""
        fix = f"; {e.fix}" if e.fix else ""
        raise DataError(f"{l.where}: {e.detail}{fix}, or set data.on_bad_line: skip to drop such records{more}")
    if not result.examples:
        why = skip_text(result.skipped) if result.skipped else "no records"
        raise DataError(f"{path}: no usable examples ({why}); fix the records (data.format: {cfg.format}, "
                        f"detected {result.format})")
    if cfile is not None:
        save_entry(cfile, result)
    return result


def encode_stream(lines: Iterable[Line], fmt: str, encoder: Encoder, *,
                  stop_at_error: bool = False) -> tuple[FileResult, list[tuple[int, Line, BadRecord]]]:
    """Normalize, clip and tokenize a stream of raw records (see the module doc): the FileResult, and every bad
    record (index, line, why) in file order. `stop_at_error`: stop tokenizing at the first fatal bad record."""
    fmt, parsed = parse_stream(lines, fmt)
    template = encoder.template_for(fmt)[0] if fmt in DATA_FORMATS else "-"
    examples: list[Example] = []
    bad: list[tuple[int, Line, BadRecord]] = []
    pending: list[tuple[int, Line, Record]] = []
    truncated = n = 0
    stopped = False

    def flush() -> None:
        nonlocal truncated, stopped
        for (k, l, _), res in zip(pending, encoder.encode_many([r for _, _, r in pending], fmt) if pending else []):
            if isinstance(res, BadRecord):
                bad.append((k, l, res))
                stopped |= stop_at_error and res.fatal
            else:
                examples.append(res[0])
                truncated += res[1]
        pending.clear()

    for k, (l, r) in enumerate(parsed):
        n += 1
        where = Line(l.where, l.label)  # without its (possibly large) value
        if isinstance(r, BadRecord):
            bad.append((k, where, r))
            if stop_at_error and r.fatal and not stopped:
                flush()  # the records before it: one of them may fail first
                stopped = True
        elif not stopped:
            pending.append((k, where, encoder.clip(r)))
            if len(pending) >= ENCODE_CHUNK:
                flush()
    if not stopped:
        flush()
    bad.sort(key=lambda b: b[0])
    skipped: dict[str, list[str]] = {}
    for _, l, e in bad:
        skipped.setdefault(e.reason, []).append(l.label)
    return FileResult(examples, fmt, template, n, skipped, truncated), bad


def _report(path: Path, r: FileResult, max_length: int) -> None:
    if r.skipped:
        n = sum(len(v) for v in r.skipped.values())
        log.warning("warning: %s: skipped %d of %d records: %s", path, n, r.records, skip_text(r.skipped))
    if r.truncated:
        log.warning("warning: %s: truncated %d of %d examples to data.max_length=%d tokens", path, r.truncated,
                    len(r.examples), max_length)


def _load_split(files: list[Path], cfg: DataConfig, encoder: Encoder, tokenizer_fp: Optional[str]) -> tuple[list[Example], dict]:
    """The examples of one split's files, and its stats (before the totals)."""
    examples: list[Example] = []
    stats = {"files": [str(f) for f in files], "records": 0, "skipped": Counter(), "truncated": 0, "cached": True,
             "format": None, "template": None, "max_length": cfg.max_length}
    for f in files:
        r = load_file(f, cfg, encoder.tok, encoder=encoder, tokenizer_fp=tokenizer_fp)
        _report(f, r, cfg.max_length)
        examples.extend(r.examples)
        stats["records"] += r.records
        stats["truncated"] += r.truncated
        stats["cached"] &= r.cached
        stats["skipped"].update({k: len(v) for k, v in r.skipped.items()})
        stats["format"], stats["template"] = r.format, r.template
    return examples, stats


def load_splits(data_cfg: DataConfig, tokenizer: Any, seed: int = 0) -> Splits:
    """Tokenized train/valid/test per `data_cfg` (see the package doc). valid: `data.valid`, else the dir's
    valid file, else a seeded `val_split` fraction held out of train; test: `data.test` or the dir's test
    file, else empty."""
    sources = split_sources(data_cfg)
    encoder = Encoder.from_config(data_cfg, tokenizer)
    fp = tokenizer_fingerprint(encoder.tok) if data_cfg.cache else None  # once for all files
    out: dict[str, list[Example]] = {}
    info: dict[str, dict] = {}
    for split in ("train", "valid", "test"):
        files = sources.get(split, [])
        out[split], stats = _load_split(files, data_cfg, encoder, fp)
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
