"""Where records come from: JSONL, JSON lists and Parquet files, dirs with train/valid/test files, hub datasets.

`read_lines` turns one file into raw `Line`s (parsed JSON values, or why a line could not be parsed);
`split_sources` finds the files of each split from `data.train` / `data.valid` / `data.test`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError, did_you_mean
from ..hub import DATA_FILES, is_hub_id
from .records import BadRecord, Line

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"), "test": ("test",)}


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


class _LineCounter:
    """Line numbers of increasing positions in `text`, counted incrementally."""

    def __init__(self, text: str):
        self.text, self.line, self.counted = text, 1, 0

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line


def _read_json_list(p: Path, raw: bytes) -> list[Line]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    dec, out, lines = json.JSONDecoder(), [], _LineCounter(text)
    ws = re.compile(r"\s*")
    i = ws.match(text, ws.match(text, 0).end() + 1).end()  # after '['
    if text[i : i + 1] == "]":
        return out
    while True:
        i = ws.match(text, i).end()
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file "
                            f"(a JSON list cannot skip a broken element; JSONL can)") from None
        n = lines.at(i)
        out.append(Line(f"{p}:{n}", f"line {n}", value))
        i = ws.match(text, end).end()
        if text[i : i + 1] == ",":
            i += 1
        elif text[i : i + 1] == "]":
            break
        else:
            raise DataError(f"{p}:{lines.at(i)}: not valid JSON (expected ',' or ']' between records); fix the file")
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
    """Download (or find in the local cache) a Hugging Face dataset repo's JSON/JSONL/Parquet files.

    Not `hub.download`: its errors do not yet tell an offline cache miss (LocalEntryNotFoundError) from an unknown
    repo, and these messages say that the path is not local either."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError(f"{repo_id}: fetching a hub dataset needs huggingface_hub; point data.train at a local file") from None
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=list(DATA_FILES)))
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
    if p.suffix.lower() in DATA_SUFFIXES or not is_hub_id(path):
        siblings = sorted(f.name for f in p.parent.glob("*")) if p.parent.is_dir() else []
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


def train_file(path: str) -> Path:
    """The one file `mlxtune data inspect|convert` reads: the file itself, or a dir's (first) train file."""
    src = resolve_source(path)
    if src.is_dir():
        files = split_files(src).get("train")
        if not files:
            raise DataError(f"{path}: no train file in this dir")
        return files[0]
    return src
