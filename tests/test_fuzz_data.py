"""Property-based fuzzing of data records (hypothesis): whatever a data file holds — random JSON values shaped
like each format, random bytes, in JSONL, a JSON list or Parquet — `load_splits` returns examples or raises ONE
DataError whose message is one printable line naming the file (and `file:line` for a record); never another
exception, never a hang. Bounded: ~150 examples in all, the byte-level tokenizer of reliability_helpers."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlxtune.config import DataConfig  # noqa: E402
from mlxtune.data import load_splits  # noqa: E402
from mlxtune.errors import DataError  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)

# Text with lone surrogates, control characters and non-BMP characters as well as plain words.
TEXT = st.one_of(st.text(st.characters(codec=None, categories=None), max_size=30), st.sampled_from(["", " ", "hi", "\n"]))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(SCALAR, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(TEXT, c, max_size=4)), max_leaves=12)
ROLE = st.sampled_from(["system", "user", "assistant", "human", "gpt", "chatgpt", "bing", "bard", "tool", "", "USER"])
VALUE = st.one_of(TEXT, JSON, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2))
TURN = st.one_of(
    st.fixed_dictionaries({"role": ROLE, "content": VALUE}, optional={"weight": JSON}),
    st.fixed_dictionaries({"from": ROLE, "value": VALUE}),
    JSON,
)
RECORD = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(TURN, max_size=5), JSON)}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(TURN, max_size=5), JSON)}),
    st.fixed_dictionaries({"instruction": VALUE, "output": VALUE}, optional={"input": VALUE}),
    st.fixed_dictionaries({"prompt": VALUE, "completion": VALUE}),
    st.fixed_dictionaries({"text": VALUE}),
    JSON,
)
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
CFG = st.fixed_dictionaries({
    "on_bad_line": st.sampled_from(["error", "skip"]),
    "format": st.sampled_from(["auto", "alpaca", "sharegpt", "messages", "completions", "text"]),
    "max_length": st.integers(2, 48),
    "on_too_long": st.sampled_from(["truncate", "error"]),
    "train_on": st.sampled_from(["responses", "all"]),
})


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from reliability_helpers import make_byte_tokenizer

    return AutoTokenizer.from_pretrained(str(make_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tok")))


def check(path: Path, tok, cfg: dict) -> None:
    """The property: examples, or one DataError of one printable line that names the file."""
    try:
        splits = load_splits(DataConfig(train=str(path), val_split=0.0, cache=False, **cfg), tok, seed=0)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 600 + len(str(path)), msg
        msg.encode("utf-8")  # printable: no lone surrogate echoed
        assert msg.startswith(str(path)), msg
        if re.match(rf"{re.escape(str(path))}:(row )?\d+", msg):
            assert re.match(rf"{re.escape(str(path))}:(row )?\d+: \S", msg), msg
        return
    assert splits.train and all(len(e.ids) <= cfg["max_length"] and any(e.mask) for e in splits.train)


def write_lines(dirpath: str, name: str, lines: list[bytes]) -> Path:
    path = Path(dirpath) / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@settings(max_examples=70, **SETTINGS)
@given(records=st.lists(RECORD, min_size=1, max_size=4), ascii_=st.booleans(), good_first=st.booleans(), cfg=CFG)
def test_fuzz_jsonl_and_json_list_records(byte_tok, records, ascii_, good_first, cfg):
    lines = ([GOOD.encode()] if good_first else []) + [json.dumps(r, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")
                                                       for r in records]
    with tempfile.TemporaryDirectory() as d:
        check(write_lines(d, "train.jsonl", lines), byte_tok, cfg)
        check(write_lines(d, "train.json", [b"[", b",\n".join(lines), b"]"]), byte_tok, cfg)


@settings(max_examples=50, **SETTINGS)
@given(raw=st.lists(st.binary(max_size=40), min_size=1, max_size=4), good_first=st.booleans(), cfg=CFG,
       name=st.sampled_from(["train.jsonl", "train.json", "train.parquet"]))
def test_fuzz_random_bytes(byte_tok, raw, good_first, cfg, name):
    with tempfile.TemporaryDirectory() as d:
        check(write_lines(d, name, ([GOOD.encode()] if good_first else []) + raw), byte_tok, cfg)


@settings(max_examples=30, **SETTINGS)
@given(rows=st.lists(st.fixed_dictionaries({}, optional={k: st.one_of(st.none(), TEXT.filter(lambda s: not re.search("[\ud800-\udfff]", s)))
                                                          for k in ("instruction", "input", "output", "text", "prompt", "completion")}),
                     min_size=1, max_size=4), cfg=CFG)
def test_fuzz_parquet_rows(byte_tok, rows, cfg):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.parquet"
        keys = sorted({k for r in rows for k in r})
        pq.write_table(pa.table({k: pa.array([r.get(k) for r in rows], pa.string()) for k in keys} or {"x": [None] * len(rows)}), path)
        check(path, byte_tok, cfg)
