"""The tokenized-data cache: one .npz per (file content, tokenizer, template, data settings, code).

Entries live under `$MLXTUNE_CACHE/data` (default `~/.cache/mlxtune/data`), so a resumed run does not tokenize
again. The key covers the file's content, the tokenizer's content (vocabulary, merges, special tokens, chat
template), the template's source, the data settings and the data pipeline's own code. Entries are written
atomically (fsio); a corrupt entry is ignored and rebuilt; a cache that cannot be written only costs the next run
a re-tokenization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import DataConfig
from ..fsio import atomic_file
from .records import Example, FileResult
from .templates import template_source_hash

log = logging.getLogger(__name__)

_CODE_FILES = ("records.py", "sources.py", "formats.py", "templates.py", "encode.py", "cache.py")
CODE_HASH = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes() for f in _CODE_FILES)).hexdigest()[:16]
"A hash of the code that decides what a cache entry holds: a change to it invalidates every entry."


def cache_dir() -> Path:
    """`$MLXTUNE_CACHE/data`, default `~/.cache/mlxtune/data`."""
    root = os.environ.get("MLXTUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mlxtune") / "data"


def file_sha(path: Path) -> str:
    """The SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of what decides tokenization: the (Hugging Face) tokenizer's full definition (vocab, merges,
    normalizer, added tokens), its special tokens and its chat template."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(str(len(tok)).encode())
    h.update(json.dumps([tok.bos_token, tok.eos_token, getattr(tok, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def cache_file(path: Path, cfg: DataConfig, tokenizer_fp: str) -> Path:
    """The cache entry of data file `path` tokenized per `cfg` by the tokenizer with fingerprint `tokenizer_fp`."""
    parts = {
        "code": CODE_HASH,
        "file": file_sha(path),
        "tokenizer": tokenizer_fp,
        "template": cfg.template,
        "template_source": template_source_hash(cfg.template),
        "format": cfg.format,
        "system_prompt": cfg.system_prompt,
        "max_length": cfg.max_length,
        "train_on": cfg.train_on,
        "on_bad_line": cfg.on_bad_line,
        "on_too_long": cfg.on_too_long,
    }
    return cache_dir() / f"{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]}.npz"


def load_entry(file: Path) -> Optional[FileResult]:
    """The cached result in `file`, or None when there is none or it is unreadable."""
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


def save_entry(file: Path, result: FileResult) -> None:
    """Write `result` to `file` atomically; a failure to write is logged (debug) and otherwise ignored."""
    lengths = [len(e.ids) for e in result.examples]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = np.fromiter((t for e in result.examples for t in e.ids), np.int32, count=int(offsets[-1]))
    mask = np.fromiter((t for e in result.examples for t in e.mask), np.uint8, count=int(offsets[-1]))
    meta = {"format": result.format, "template": result.template, "records": result.records,
            "skipped": result.skipped, "truncated": result.truncated, "examples": len(lengths)}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(file, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=ids, mask=mask, offsets=offsets, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    except OSError as e:  # a read-only or full disk only costs the next run a re-tokenization
        log.debug("could not write the data cache %s (%s)", file, e)
