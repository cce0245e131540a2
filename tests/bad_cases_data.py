"""Bad-input cases for data (issue 15 and 16): role order and empty replies, lone surrogates, invalid UTF-8, deep
nesting, huge records and numbers, special files (FIFO, device, dir) where a data file belongs, CSV, JSON-list
structure, and `data inspect` / `data convert` errors (see bad_inputs_lib.py for `case` and `Ctx`; the format
basics — missing fields, wrong types, unknown roles — are in bad_cases_core.py)."""

from __future__ import annotations

import json
import os

import pytest

from bad_inputs_lib import GOOD_ALPACA, GOOD_MESSAGES, GOOD_SHAREGPT, GOOD_TEXT, case

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}


def msgs(*turns: dict) -> str:
    return json.dumps({"messages": list(turns)})


def share(*turns: tuple) -> str:
    return json.dumps({"conversations": [{"from": f, "value": v} for f, v in turns]})


def fifo(t, name: str = "train.jsonl"):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    d = t.tmp / "data"
    d.mkdir(exist_ok=True)
    os.mkfifo(d / name)  # opening it would block forever: it must be refused unopened
    return d / name


def device(name: str = "devnull"):
    path = os.devnull if name == "devnull" else "/dev/zero"
    if not os.path.exists(path):
        pytest.skip(f"no {path} here")
    return path


# --------------------------------------------------------------------------------------------------------------
# Role order and empty replies: errors by default (training an empty reply teaches the model to say nothing)


@case("data-messages-assistant-first", "train.jsonl:2", "messages[0] is an assistant turn as the first turn")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(A, U, A))
@case("data-messages-two-assistants", "train.jsonl:2", "messages[2] is an assistant turn after an assistant turn")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(U, A, A))
@case("data-messages-two-users", "train.jsonl:2", "messages[1] is a user turn after a user turn")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(U, U, A))
@case("data-messages-system-not-first", "train.jsonl:2", "messages[2] is a system turn after the first turn")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(U, A, S, U, A))
@case("data-messages-two-systems", "train.jsonl:2", "messages[1] is a system turn")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(S, S, U, A))
@case("data-messages-empty-reply", "train.jsonl:2", "messages[1] is an empty assistant turn", "say nothing")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(U, {"role": "assistant", "content": ""}))
@case("data-messages-whitespace-reply", "train.jsonl:3", "messages[3] is an empty assistant turn")
def _(t): return t.bad_data(GOOD_MESSAGES, GOOD_MESSAGES, msgs(U, A, U, {"role": "assistant", "content": " \n\t"}))
@case("data-messages-empty-content-parts", "train.jsonl:2", "messages[1] is an empty assistant turn")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(U, {"role": "assistant", "content": [{"type": "text", "text": ""}]}))
@case("data-sharegpt-gpt-first", "train.jsonl:2", "conversations[0] is an assistant turn as the first turn")
def _(t): return t.bad_data(GOOD_SHAREGPT, share(("gpt", "a"), ("human", "b"), ("gpt", "c")))
@case("data-sharegpt-empty-chatgpt-reply", "train.jsonl:2", "conversations[1] is an empty assistant turn")
def _(t): return t.bad_data(GOOD_SHAREGPT, share(("human", "a"), ("chatgpt", "")))
@case("data-sharegpt-role-keys-unknown-role", "train.jsonl:2", 'unknown role "robot" in conversations[1]')
def _(t): return t.bad_data(GOOD_SHAREGPT, json.dumps({"conversations": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}))
@case("data-sharegpt-role-keys-no-content", "train.jsonl:2", "conversations[1] has no content")
def _(t): return t.bad_data(GOOD_SHAREGPT, json.dumps({"conversations": [{"role": "user", "content": "a"}, {"role": "bard"}]}))
@case("data-alpaca-empty-output", "train.jsonl:2", "field 'output' is empty")
def _(t): return t.bad_data(GOOD_ALPACA, json.dumps({"instruction": "x", "input": "", "output": ""}))
@case("data-alpaca-whitespace-output", "train.jsonl:3", "field 'output' is empty")
def _(t): return t.bad_data(GOOD_ALPACA, GOOD_ALPACA, json.dumps({"instruction": "x", "output": "\n  "}))
@case("data-completions-empty-completion", "train.jsonl:2", "field 'completion' is empty")
def _(t): return t.bad_data('{"prompt": "1 + 1 =", "completion": " 2"}', '{"prompt": "a", "completion": ""}')


# --------------------------------------------------------------------------------------------------------------
# Text that is not valid Unicode, invalid UTF-8, deep nesting, numbers Python refuses


@case("data-messages-lone-surrogate", "train.jsonl:2", "messages[0] holds a lone surrogate \\ud800")
def _(t): return t.bad_data(GOOD_MESSAGES, '{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "c"}]}')
@case("data-alpaca-lone-low-surrogate", "train.jsonl:2", "field 'output' holds a lone surrogate \\udc00")
def _(t): return t.bad_data(GOOD_ALPACA, '{"instruction": "x", "output": "\\udc00"}')
@case("data-text-lone-surrogate", "train.jsonl:2", "field 'text' holds a lone surrogate")
def _(t): return t.bad_data(GOOD_TEXT, '{"text": "abc \\udfff"}')
@case("data-json-list-lone-surrogate", "train.json:3", "lone surrogate")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=f'[\n{GOOD_TEXT},\n{{"text": "\\ud83d"}}\n]'.encode()))})
@case("data-utf8-encoded-surrogate", "train.jsonl:2", "not UTF-8")
def _(t): return t.train({"data.train": str(t.data_file([], raw=(GOOD_TEXT + "\n").encode() + b'{"text": "\xed\xa0\x80"}\n'))})
@case("data-utf8-overlong", "train.jsonl:3", "not UTF-8")
def _(t): return t.train({"data.train": str(t.data_file([], raw=(GOOD_TEXT + "\n" + GOOD_TEXT + "\n").encode() + b'{"text": "\xc0\xaf"}\n'))})
@case("data-utf8-cut-sequence", "train.jsonl:2", "not UTF-8")
def _(t): return t.train({"data.train": str(t.data_file([], raw=(GOOD_TEXT + "\n").encode() + b'{"text": "\xe2\x82"}\n'))})
@case("data-latin1-file", "train.jsonl:1", "not UTF-8", "save the file as UTF-8")
def _(t): return t.train({"data.train": str(t.data_file([], raw='{"text": "caf\xe9 au lait"}\n'.encode("latin-1")))})
@case("data-json-list-invalid-utf8", "train.json:3", "not UTF-8")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=f"[\n{GOOD_TEXT},\n".encode() + b'{"text": "\xff"}\n]'))})
@case("data-deep-nesting-line", "train.jsonl:2", "nested too deeply")
def _(t): return t.bad_data(GOOD_TEXT, "[" * 200_000 + "]" * 200_000)
@case("data-deep-nesting-in-record", "train.jsonl:2", "nested too deeply")
def _(t): return t.bad_data(GOOD_MESSAGES, '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}")
@case("data-json-list-deep-nesting", "train.json:3", "nested too deeply")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=f"[\n{GOOD_TEXT},\n{'[' * 100_000}{']' * 100_000}\n]".encode()))})
@case("data-integer-over-digit-limit", "train.jsonl:2", "not valid JSON")
def _(t): return t.bad_data(GOOD_TEXT, '{"text": ' + "9" * 10_000 + "}")
@case("data-nul-byte-in-string", "train.jsonl:2", "not valid JSON", "Invalid control character")
def _(t): return t.bad_data(GOOD_TEXT, '{"text": "a\x00b"}')
@case("data-nan-as-text", "train.jsonl:2", "field 'text' must be a string, got float NaN")
def _(t): return t.bad_data(GOOD_TEXT, '{"text": NaN}')


# --------------------------------------------------------------------------------------------------------------
# Huge records


@case("data-line-over-64-mib", "train.jsonl:2", "the line is over 64 MiB")
def _(t):
    line = b'{"text": "' + b"x" * (65 << 20) + b'"}'
    return t.train({"data.train": str(t.data_file([], raw=(GOOD_TEXT + "\n").encode() + line + b"\n"))})
@case("data-huge-record-too-long-error", "train.jsonl:2", "at least", "more than data.max_length=96")
def _(t): return t.bad_data(GOOD_MESSAGES, msgs(U, {"role": "assistant", "content": "word " * 400_000}), **{"data.on_too_long": "error"})


# --------------------------------------------------------------------------------------------------------------
# Special files where a data file belongs: refused before anything opens them (a FIFO would hang)


@case("data-train-is-fifo", "train.jsonl: is a FIFO")
def _(t): return t.train({"data.train": str(fifo(t))})
@case("data-valid-is-fifo", "valid.jsonl: is a FIFO")
def _(t): t.data_file([GOOD_ALPACA] * 4); return t.train({"data.train": str(t.tmp / "data" / "train.jsonl"), "data.valid": str(fifo(t, "valid.jsonl"))})
@case("data-fifo-in-data-dir", "train.jsonl: is a FIFO")
def _(t): fifo(t); return t.train({"data.train": str(t.tmp / "data")})
@case("data-test-fifo-in-data-dir", "test.jsonl: is a FIFO")
def _(t): t.data_file([GOOD_ALPACA] * 4); fifo(t, "test.jsonl"); return t.train({"data.train": str(t.tmp / "data")})
@case("data-train-is-dev-null", "is a character device")
def _(t): return t.train({"data.train": device()})
@case("data-valid-is-dev-zero", "/dev/zero: is a character device")
def _(t): return t.train({"data.valid": device("zero")})
@case("data-train-dir-named-jsonl-in-dir", "no train file in this dir (train.jsonl is a directory)")
def _(t): (t.tmp / "d" / "train.jsonl").mkdir(parents=True); (t.tmp / "d" / "valid.jsonl").write_text(GOOD_ALPACA + "\n"); return t.train({"data.train": str(t.tmp / "d")})


# --------------------------------------------------------------------------------------------------------------
# CSV, JSON-list structure


@case("data-csv-file", "train.csv", "CSV is not supported: use JSON, JSONL or Parquet")
def _(t): return t.train({"data.train": str(t.data_file(["instruction,output", "a,b"], "train.csv"))})
@case("data-tsv-file", "train.tsv", "CSV is not supported")
def _(t): return t.train({"data.train": str(t.data_file(["instruction\toutput", "a\tb"], "train.tsv"))})
@case("data-csv-in-dir", "no train file in this dir (train.csv: CSV is not supported: use JSON, JSONL or Parquet)")
def _(t): t.data_file(["instruction,output", "a,b"], "train.csv"); return t.train({"data.train": str(t.tmp / "data")})
@case("data-json-list-missing-comma", "train.json:3", "expected ',' or ']' between records")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=f"[\n{GOOD_TEXT}\n{GOOD_TEXT}\n]".encode()))})
@case("data-json-list-unterminated", "train.json", "not valid JSON")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=f"[\n{GOOD_TEXT},\n{GOOD_TEXT}\n".encode()))})
@case("data-json-pretty-single-object", "train.json", "a JSON file must hold a list of records", "instruction")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=json.dumps(json.loads(GOOD_ALPACA), indent=2).encode()))})
@case("data-json-list-of-numbers", "train.json:1", "expected a JSON object")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=f"[{GOOD_TEXT}, 1, 2]".encode()))})


# --------------------------------------------------------------------------------------------------------------
# data inspect / data convert


@case("data-inspect-nothing-usable", "bad.jsonl: no usable records", "invalid JSON")
def _(t): return ["data", "inspect", str(t.data_file(["{", "{oops"], "bad.jsonl"))]
@case("data-inspect-on-bad-line-error-without-tokenizer", "train.jsonl:2", "not valid JSON", "--on-bad-line skip")
def _(t): return ["data", "inspect", str(t.data_file([GOOD_ALPACA, "{"])), "--on-bad-line", "error"]
@case("data-inspect-all-skipped-with-tokenizer", "train.jsonl: no usable examples")
def _(t): return ["data", "inspect", str(t.data_file([msgs(A), "{"])), "--tokenizer", str(t.model)]
@case("data-inspect-tokenizer-missing", "--tokenizer", "no such file or dir")
def _(t): return ["data", "inspect", str(t.data_file([GOOD_ALPACA])), "--tokenizer", str(t.tmp / "nope")]
@case("data-inspect-tokenizer-is-a-data-file", "not a model dir, .gguf file or run dir")
def _(t): f = t.data_file([GOOD_ALPACA]); return ["data", "inspect", str(f), "--tokenizer", str(f)]
@case("data-inspect-tokenizer-dir-without-tokenizer", "no tokenizer files")
def _(t): (t.tmp / "empty").mkdir(); return ["data", "inspect", str(t.data_file([GOOD_ALPACA])), "--tokenizer", str(t.tmp / "empty")]
@case("data-inspect-csv", "CSV is not supported")
def _(t): return ["data", "inspect", str(t.data_file(["a,b"], "train.csv"))]
@case("data-inspect-fifo", "train.jsonl: is a FIFO")
def _(t): return ["data", "inspect", str(fifo(t))]
@case("data-inspect-dir-without-data", "no train, valid or test file in this dir")
def _(t): (t.tmp / "empty").mkdir(); return ["data", "inspect", str(t.tmp / "empty")]
@case("data-inspect-bad-split-named", "valid.jsonl:1", "not valid JSON")
def _(t): t.data_file([GOOD_ALPACA]); t.data_file(["{"], "valid.jsonl"); return ["data", "inspect", str(t.tmp / "data"), "--on-bad-line", "error"]
@case("data-convert-out-exists", "already exists", "--force")
def _(t):
    (t.tmp / "existing.jsonl").write_text("keep me\n")
    return ["data", "convert", str(t.data_file([GOOD_ALPACA])), "--out", str(t.tmp / "existing.jsonl")]
@case("data-convert-onto-own-input", "is the input")
def _(t): f = t.data_file([GOOD_ALPACA]); return ["data", "convert", str(f), "--out", str(f), "--force"]
@case("data-convert-out-inside-input-dir", "is inside the input")
def _(t): t.data_file([GOOD_ALPACA]); return ["data", "convert", str(t.tmp / "data"), "--out", str(t.tmp / "data" / "conv")]
@case("data-convert-dir-bad-split", "valid.jsonl:1", "field 'output' is empty")
def _(t):
    t.data_file([GOOD_ALPACA])
    t.data_file([json.dumps({"instruction": "x", "output": ""})], "valid.jsonl")
    return ["data", "convert", str(t.tmp / "data"), "--out", str(t.tmp / "out")]
@case("data-convert-text-records", "text records have no conversation")
def _(t): return ["data", "convert", str(t.data_file([GOOD_TEXT])), "--out", str(t.tmp / "out" / "x.jsonl")]
@case("data-convert-empty-file", "the file has no records")
def _(t): return ["data", "convert", str(t.data_file([], raw=b"\n\n")), "--out", str(t.tmp / "out" / "x.jsonl")]
@case("data-convert-fifo", "is a FIFO")
def _(t): return ["data", "convert", str(fifo(t)), "--out", str(t.tmp / "out" / "x.jsonl")]
@case("data-convert-role-order", "train.jsonl:2", "messages[0] is an assistant turn")
def _(t): return ["data", "convert", str(t.data_file([GOOD_MESSAGES, msgs(A, U)])), "--out", str(t.tmp / "out" / "x.jsonl")]
