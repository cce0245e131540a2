"""Where records come from: JSONL, JSON lists and Parquet files, dirs with train/valid/test files, hub datasets.

`read_lines` streams one file as raw `Line`s (parsed JSON values, or why a line could not be parsed); the file is
never held whole in memory:
- JSONL is read line by line; a line over `MAX_RECORD_BYTES` is skipped without being held (a "record too
  large" bad record), so memory holds at most one line of that size;
- a JSON list is decoded element by element from a buffer of 1 MiB chunks that grows only while one element is
  incomplete, up to `MAX_RECORD_BYTES` (a larger element is an error: a JSON list cannot skip a broken element);
- Parquet is read in batches of `PARQUET_BATCH_ROWS` rows (pyarrow decodes one row group at a time, so memory is
  bounded by the largest row group, which the file's writer chose).
Only regular files are read: a FIFO, a device, a socket or a directory where a file is expected is refused before
anything opens it (`check_data_file`). CSV is refused ("CSV is not supported: use JSON, JSONL or Parquet").
`split_sources` finds the files of each split from `data.train` / `data.valid` / `data.test`.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import IO, Any, Iterator

from .. import fsio
from ..config import DataConfig
from ..errors import DataError, did_you_mean
from ..hub import DATA_FILES, is_hub_id
from .records import BadRecord, Line

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"), "test": ("test",)}
CSV_SUFFIXES = (".csv", ".tsv")
CSV_REFUSED = "CSV is not supported: use JSON, JSONL or Parquet"
MAX_RECORD_BYTES = 64 << 20
"The largest record (a JSONL line, a JSON list element) read: 64 MiB, far above any trainable record."
CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 256


def short_path(path: Any, n: int = 80) -> str:
    """A path for a message, cut to `n` characters (keeping the end, where the name is): fsio.short_path."""
    return fsio.short_path(path, n)


def check_data_file(path: str | os.PathLike) -> Path:
    """`path` if it is a regular file that can hold data; else one DataError. Never opens the path (a FIFO or
    a device would block or never end)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataError(f"{short_path(p)}: no such file") from None
    except OSError as e:
        raise DataError(f"{short_path(p)}: cannot read it ({e.strerror or type(e).__name__})") from None
    kind = fsio.file_kind(st.st_mode)
    if kind is not None:
        raise DataError(f"{short_path(p)}: is {kind}, not a data file; point at a regular JSONL, JSON or Parquet file")
    if p.suffix.lower() in CSV_SUFFIXES:
        raise DataError(f"{short_path(p)}: {CSV_REFUSED} (e.g. pandas: df.to_json('train.jsonl', orient='records', "
                        f"lines=True))")
    return p


def read_lines(path: str | os.PathLike) -> Iterator[Line]:
    """Stream the raw records of a JSONL file, a JSON list or a Parquet file (see the module doc); blank JSONL
    lines are skipped. The file is checked (`check_data_file`) when this is called, before the first record."""
    p = check_data_file(path)
    if p.suffix.lower() == ".parquet":
        return _read_parquet(p)
    return _read_text(p)


def _first_byte(f: IO[bytes]) -> bytes:
    """The first non-whitespace byte of the file after a UTF-8 byte-order mark (b"" when none); rewinds."""
    head = b""
    while True:
        chunk = f.read(CHUNK_BYTES)
        if not head and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]
        head = chunk.lstrip()[:1]
        if head or not chunk:
            f.seek(0)
            return head


def _read_text(p: Path) -> Iterator[Line]:
    with open(p, "rb") as f:
        head = _first_byte(f)
        suffix = p.suffix.lower()
        if suffix == ".json" and head == b"{":
            yield from _read_json_object_or_lines(p, f)
        elif head == b"[" and suffix != ".jsonl":
            yield from _read_json_list(p, f)
        else:
            yield from _read_jsonl(p, f)


def parse_json(text: str | bytes) -> Any:
    """`json.loads`, with every way a value can fail raised as BadRecord (not valid JSON, nested too deeply,
    a number too long, not UTF-8)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise BadRecord("not UTF-8", f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRecord("invalid JSON", f"not valid JSON ({e.msg} at column {e.colno})",
                        "write one JSON object per line") from None
    except RecursionError:
        raise BadRecord("invalid JSON", "JSON nested too deeply", "flatten the record") from None
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        raise BadRecord("invalid JSON", f"not valid JSON ({str(e)[:60]})", "write one JSON object per line") from None


def _skip_rest_of_line(f: IO[bytes]) -> None:
    while True:
        rest = f.readline(CHUNK_BYTES)
        if not rest or rest.endswith(b"\n"):
            return


def _read_jsonl(p: Path, f: IO[bytes]) -> Iterator[Line]:
    n = 0
    while True:
        raw = f.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        n += 1
        rec = Line(f"{p}:{n}", f"line {n}")
        if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
            del raw
            _skip_rest_of_line(f)
            rec.error = BadRecord("record too large", f"the line is over {MAX_RECORD_BYTES >> 20} MiB",
                                  "split or shorten the record")
            yield rec
            continue
        if n == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data
        if not raw.strip():
            continue
        try:
            rec.value = parse_json(raw)
        except BadRecord as e:
            rec.error = e
        del raw
        yield rec


class _JsonText:
    """A UTF-8 file decoded in chunks, for reading JSON values one after another with their line numbers.

    The buffer holds the unread text of the current chunk; it grows (doubling) only while one value is
    incomplete, up to MAX_RECORD_BYTES."""

    def __init__(self, p: Path, f: IO[bytes]):
        self.p, self.f = p, f
        self.dec = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.i, self.eof = "", 0, False
        self.line, self.counted = 1, 0  # the line number at buf[counted]
        self.ws = re.compile(r"[ \t\n\r]*")

    def lineno(self, pos: int | None = None) -> int:
        pos = self.i if pos is None else pos
        self.line += self.buf.count("\n", self.counted, pos)
        self.counted = pos
        return self.line

    def more(self, n: int = 0) -> None:
        raw = self.f.read(n or CHUNK_BYTES)
        self.eof = not raw
        try:
            text = self.dec.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:
            line = self.lineno(len(self.buf)) + raw.count(b"\n", 0, max(0, e.start))
            raise DataError(f"{self.p}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
        self.lineno()
        self.buf, self.counted, self.i = self.buf[self.i:] + text, 0, 0

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end of the file)."""
        while True:
            self.i = self.ws.match(self.buf, self.i).end()
            if self.i < len(self.buf) or self.eof:
                return self.buf[self.i : self.i + 1]
            self.more()

    def value(self) -> tuple[Any, int]:
        """The JSON value at the current position and its line; DataError when it is broken or too large."""
        self.peek()
        start = self.lineno()
        dec = json.JSONDecoder()
        while True:
            try:
                value, end = dec.raw_decode(self.buf, self.i)
                if end < len(self.buf) or self.eof:  # a number at the end of the buffer may continue
                    self.i = end
                    return value, start
                e = None
            except json.JSONDecodeError as err:
                e = err
                near_end = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 16
                if self.eof or not near_end:
                    line = self.lineno(len(self.buf[: e.pos]) if e.pos <= len(self.buf) else len(self.buf))
                    raise DataError(f"{self.p}:{line}: not valid JSON ({e.msg}); fix the file (a JSON list "
                                    f"cannot skip a broken element; JSONL can)") from None
            except RecursionError:
                raise DataError(f"{self.p}:{start}: JSON nested too deeply; flatten the record") from None
            except ValueError as err:  # an integer literal over Python's digit limit
                raise DataError(f"{self.p}:{start}: not valid JSON ({str(err)[:60]}); fix the file") from None
            pending = len(self.buf) - self.i
            if pending > MAX_RECORD_BYTES:
                raise DataError(f"{self.p}:{start}: a record over {MAX_RECORD_BYTES >> 20} MiB (or broken JSON); "
                                f"split or shorten it")
            self.more(max(CHUNK_BYTES, pending))


def _read_json_list(p: Path, f: IO[bytes]) -> Iterator[Line]:
    t = _JsonText(p, f)
    t.peek()
    t.i += 1  # '['
    if t.peek() == "]":
        return
    while True:
        value, n = t.value()
        yield Line(f"{p}:{n}", f"line {n}", value)
        c = t.peek()
        if c == ",":
            t.i += 1
        elif c == "]":
            return
        else:
            raise DataError(f"{p}:{t.lineno()}: not valid JSON (expected ',' or ']' between records); fix the file")


def _read_json_object_or_lines(p: Path, f: IO[bytes]) -> Iterator[Line]:
    """A .json file that starts with '{': JSONL saved as .json, or one JSON document (refused)."""
    t = _JsonText(p, f)
    try:
        doc, _ = t.value()
        ends = t.lineno()
        single = t.peek() == "" or ends > 1
    except DataError:
        single = False  # not one JSON value: read as JSONL, which reports each broken line
    if single:
        keys = ", ".join(str(k)[:20] for k in list(doc)[:6]) if isinstance(doc, dict) else "?"
        raise DataError(f"{p}: a JSON file must hold a list of records, found a single object "
                        f"with keys {keys}; use a list [{{...}}, ...] or JSONL")
    f.seek(0)
    yield from _read_jsonl(p, f)


def _read_parquet(p: Path) -> Iterator[Line]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow; install it (pip install 'mlxtune[parquet]') "
                        f"or convert the file to JSONL") from None
    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__}: {str(e)[:80]})") from None
    return _parquet_rows(p, batches)


def _parquet_rows(p: Path, batches: Iterator[Any]) -> Iterator[Line]:
    n = 0
    while True:
        try:
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except Exception as e:  # as above, for a row group that cannot be decoded
            raise DataError(f"{p}:row {n + 1}: not a readable Parquet file ({type(e).__name__}: {str(e)[:80]})") from None
        if batch is None:
            return
        for row in rows:
            n += 1
            yield Line(f"{p}:row {n}", f"row {n}", row)


def split_files(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """The train/valid/test files of a dir: `train.jsonl`, `valid.json`, `test.parquet`, shards like
    `data/train-00000-of-00002.parquet`, and `validation`/`val`/`dev` for valid (searched two levels deep)."""
    d = Path(directory)
    # not only regular files: a FIFO or device named train.jsonl is refused by check_data_file, not ignored
    files = sorted(f for f in list(d.glob("*")) + list(d.glob("*/*")) if not f.is_dir() and f.suffix.lower() in DATA_SUFFIXES)
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
        raise DataError(f"{short_path(path)}: a symlink to {short_path(os.readlink(p))}, which does not exist")
    if p.suffix.lower() in DATA_SUFFIXES + CSV_SUFFIXES or not is_hub_id(path):
        siblings = sorted(f.name for f in p.parent.glob("*")) if p.parent.is_dir() else []
        raise DataError(f"{short_path(path)}: no such file or dir{did_you_mean(p.name[:80], siblings)}")
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
            raise DataError(f"{short_path(cfg.train)}: no train file in this dir{_why_not(src, 'train')}; expected "
                            f"train.jsonl, train.json or train.parquet")
        out.update(found)
    else:
        out["train"] = [src]
    for split in ("valid", "test"):
        given = getattr(cfg, split)
        if given:
            s = resolve_source(given)
            out[split] = split_files(s).get(split, []) if s.is_dir() else [s]
            if not out[split]:
                raise DataError(f"data.{split}: {short_path(given)} holds no {split} file{_why_not(s, split)}")
    return out


def _why_not(d: Path, split: str) -> str:
    """Why a dir has no file of `split`: ` (train.jsonl is a directory)`, ` (train.csv: CSV is not supported...)`."""
    for f in sorted(d.glob("*")):
        stem = f.name.lower().split(".")[0]
        if stem in SPLIT_NAMES[split] and f.suffix.lower() in DATA_SUFFIXES and f.is_dir():
            return f" ({f.name[:60]} is a directory)"
        if stem in SPLIT_NAMES[split] and f.suffix.lower() in CSV_SUFFIXES:
            return f" ({f.name[:60]}: {CSV_REFUSED})"
    return ""


def data_files(path: str) -> dict[str, list[Path]]:
    """The files `mlxtune data inspect|convert` read: {"": [the file]}, or a dir's {split: files} for every split
    it has (train, valid, test)."""
    src = resolve_source(path)
    if not src.is_dir():
        return {"": [src]}
    found = split_files(src)
    if not found:
        raise DataError(f"{short_path(path)}: no train, valid or test file in this dir{_why_not(src, 'train')}; "
                        f"expected train.jsonl (and valid.jsonl, test.jsonl), .json or .parquet")
    return found


def train_file(path: str) -> Path:
    """The first train file of `path` (a file: itself)."""
    files = data_files(path)
    if "" in files:
        return files[""][0]
    if "train" not in files:
        raise DataError(f"{short_path(path)}: no train file in this dir")
    return files["train"][0]
