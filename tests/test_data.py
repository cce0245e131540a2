"""Data loading: sources (JSONL, JSON list, Parquet, dirs, hub ids), format detection, splits, bad lines
(one error naming file and line, or counts by reason), truncation, the tokenization cache, and the
`mlxtune data inspect|convert` commands. Offline; the real Llama 3 tokenizer."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import pytest

from mlxtune import data as D
from mlxtune.cli.data import register as register_data_cli
from mlxtune.config import DataConfig
from mlxtune.errors import ConfigError, DataError

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
GOOD = json.dumps({"messages": CONV})


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tok(llama3_tokenizer):
    return llama3_tokenizer


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def load(path, tok, **cfg):
    cfg.setdefault("val_split", 0.0)
    return D.load_splits(DataConfig(train=str(path), **cfg), tok, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Sources and splits


def test_alpaca_seed_dir(alpaca_seed_dir, tok):
    s = load(alpaca_seed_dir, tok)
    assert (len(s.train), len(s.valid), len(s.test)) == (139, 18, 18)
    assert s.info["train"]["format"] == "alpaca" and s.info["train"]["template"] == "alpaca"
    assert all(e.ids[0] == tok.bos_token_id and e.ids[-1] == tok.eos_token_id and e.mask[-1] == 1 for e in s.train)
    train, valid, test = s  # unpacks
    assert train is s.train and "139 examples" in s.summary()


def test_val_split_seeded_disjoint_complete(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"}) for i in range(40)])
    full = load(path, tok).train
    a = D.load_splits(DataConfig(train=str(path), val_split=0.25), tok, seed=1)
    b = D.load_splits(DataConfig(train=str(path), val_split=0.25), tok, seed=1)
    c = D.load_splits(DataConfig(train=str(path), val_split=0.25), tok, seed=2)
    assert len(a.valid) == 10 and len(a.train) == 30
    assert a.valid == b.valid and a.train == b.train
    assert a.valid != c.valid
    assert sorted(map(tuple, (e.ids for e in a.train + a.valid))) == sorted(tuple(e.ids) for e in full)
    assert a.info["valid"]["source"].startswith("0.25 of train")


def test_json_list_parquet_and_dir_names(tmp_path, tok):
    recs = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(5)]
    jl = write(tmp_path / "a.jsonl", [json.dumps(r) for r in recs])
    js = tmp_path / "a.json"
    js.write_text(json.dumps(recs, indent=2))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(recs), pqf)
    ref = load(jl, tok).train
    assert load(js, tok).train == ref and load(pqf, tok).train == ref
    d = tmp_path / "ds"
    write(d / "train.jsonl", [json.dumps(r) for r in recs])
    pq.write_table(pa.Table.from_pylist(recs[:2]), d / "validation.parquet")
    js2 = d / "test.json"
    js2.write_text(json.dumps(recs[:3]))
    s = load(d, tok)
    assert (len(s.train), len(s.valid), len(s.test)) == (5, 2, 3)
    # explicit valid wins over the dir's, and a hub-style shard layout is found
    shards = tmp_path / "hub" / "data"
    write(shards / "train-00000-of-00002.jsonl", [json.dumps(r) for r in recs[:2]])
    write(shards / "train-00001-of-00002.jsonl", [json.dumps(r) for r in recs[2:]])
    s = D.load_splits(DataConfig(train=str(tmp_path / "hub"), valid=str(jl), val_split=0.0), tok)
    assert s.train == ref and len(s.valid) == 5


def test_missing_file_and_offline_hub(tmp_path, tok):
    with pytest.raises(DataError, match=r"no such file"):
        load(tmp_path / "nope.jsonl", tok)
    with pytest.raises(DataError, match=r"hub is unreachable.*local"):
        load("someone/some-dataset-that-is-not-here", tok)
    with pytest.raises(DataError, match="data.train is not set"):
        D.load_splits(DataConfig(), tok)


def test_bom_and_crlf(tmp_path, tok):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\r\n\r\n" + GOOD + "\r\n").encode())
    assert len(load(path, tok).train) == 2


def test_format_override_and_detection(tmp_path, tok):
    path = write(tmp_path / "t.jsonl", ['{"text": "hello there"}', GOOD])
    s = load(path, tok, on_bad_line="skip")  # detected from the first record: text
    assert s.info["train"]["format"] == "text" and s.info["train"]["skipped"] == {"missing field": 1}
    s = load(path, tok, format="messages", on_bad_line="skip")
    assert s.info["train"]["format"] == "messages" and len(s.train) == 1


def test_config_validation():
    with pytest.raises(ConfigError, match="did you mean"):
        DataConfig(template="chatlm")
    with pytest.raises(ConfigError):
        DataConfig(on_too_long="cut")
    assert DataConfig(template="my.jinja").template == "my.jinja"


def test_custom_template_file_and_missing_chat_template(tmp_path, tok, qwen_tokenizer):
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    ex = D.encode_conversation(CONV, tok, template=str(t))
    assert tok.decode(ex.ids) == "user: Hi\nassistant: Hello!<|eot_id|>\n"
    # "assistant: " + "Hello!": the token " Hello" straddles the boundary; it overlaps the reply, so it is trained
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask) if m]) == " Hello!<|eot_id|>"
    with pytest.raises(DataError, match="writes <|eot_id|>"):
        D.encode_conversation(CONV, qwen_tokenizer, template="llama3")


# ---------------------------------------------------------------------------------------------------------
# Bad lines


BAD_CASES = {
    "invalid JSON": ('{"messages": [', "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "wrong type": (json.dumps({"messages": [{"role": "user", "content": 5}, CONV[1]]}), "content must be a string"),
    "unknown role": (json.dumps({"messages": [{"role": "bot", "content": "x"}, CONV[1]]}), 'unknown role "bot" in messages[0]; use system, user, assistant'),
    "empty conversation": (json.dumps({"messages": []}), "messages is empty"),
    "no assistant turn": (json.dumps({"messages": CONV[:1]}), "no assistant turn"),
    "format mismatch": (json.dumps({"instruction": "x", "output": "y"}), "missing field 'messages' (this record looks like alpaca"),
    "content missing": (json.dumps({"messages": [{"role": "user"}, CONV[1]]}), "messages[0] has no content"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_line_one_error_with_file_and_line(tmp_path, tok, case):
    bad, expect = BAD_CASES[case]
    path = write(tmp_path / "data" / "train.jsonl", [GOOD, "", bad, GOOD])  # blank line 2 is ignored; bad is line 3
    with pytest.raises(DataError) as e:
        load(path, tok)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and expect in msg and "data.on_bad_line: skip" in msg and "\n" not in msg


def test_bad_alpaca_missing_output_and_json_list_line(tmp_path, tok):
    path = write(tmp_path / "a.jsonl", [json.dumps({"instruction": "a", "input": "", "output": "b"}),
                                        json.dumps({"instruction": "a", "input": "b"})])
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'output'; alpaca records need instruction"):
        load(path, tok)
    js = tmp_path / "b.json"
    js.write_text('[\n  {"messages": ' + json.dumps(CONV) + '},\n\n  {"messages": [{"role": "robot", "content": "x"}]}\n]')
    with pytest.raises(DataError, match=rf"^{js}:4: unknown role"):
        load(js, tok)
    broken = tmp_path / "c.json"
    broken.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]')
    with pytest.raises(DataError, match=rf"^{broken}:3: not valid JSON"):
        load(broken, tok)


def test_first_bad_line_reported_even_if_found_late(tmp_path, tok):
    # line 2 fails only at tokenization (too long), line 3 already at parsing: line 2 is reported
    path = write(tmp_path / "t.jsonl", [GOOD, json.dumps({"messages": [CONV[0], {"role": "assistant", "content": "x " * 300}]}), "{"])
    with pytest.raises(DataError, match=rf"^{path}:2: .*more than data.max_length=64.*\(1 more bad record in this file\)"):
        load(path, tok, max_length=64, on_too_long="error")


def test_skip_mode_counts_by_reason(tmp_path, tok, caplog):
    lines = [GOOD, "{", json.dumps({"messages": [{"role": "bot", "content": "x"}, CONV[1]]}), GOOD,
             json.dumps({"messages": [{"role": "tool", "content": "x"}, CONV[1]]}), json.dumps({"messages": CONV[:1]}), GOOD]
    path = write(tmp_path / "train.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="mlxtune.data"):
        s = load(path, tok, on_bad_line="skip")
    assert len(s.train) == 3
    assert s.info["train"]["skipped"] == {"unknown role": 2, "invalid JSON": 1, "no assistant turn": 1}
    warning = caplog.text
    assert f"{path}: skipped 4 of 7 records: 2 unknown role (line 3, line 5), 1 invalid JSON (line 2), 1 no assistant turn (line 6)" in warning
    # cached: the warning is repeated, not silently dropped
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlxtune.data"):
        s2 = load(path, tok, on_bad_line="skip")
    assert s2.info["train"]["cached"] and "skipped 4 of 7" in caplog.text and s2.train == s.train


def test_empty_dataset_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="no records"):
        load(write(tmp_path / "e.jsonl", [""]), tok)
    path = write(tmp_path / "b.jsonl", ["{", json.dumps({"messages": []})])
    with pytest.raises(DataError, match=r"no usable examples \(1 empty conversation \(line 2\), 1 invalid JSON \(line 1\)\)"):
        load(path, tok, on_bad_line="skip")


def test_truncation_counted_and_prompt_filling_window(tmp_path, tok, caplog):
    long_answer = {"messages": [CONV[0], {"role": "assistant", "content": "word " * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, CONV[1]]}
    path = write(tmp_path / "t.jsonl", [GOOD, json.dumps(long_answer), GOOD])
    with caplog.at_level(logging.WARNING, logger="mlxtune.data"):
        s = load(path, tok, max_length=64)
    assert [len(e.ids) for e in s.train][1] == 64 and s.info["train"]["truncated"] == 1
    assert "truncated 1 of 3 examples to data.max_length=64" in caplog.text
    # a fine record whose trained tokens all fall past max_length: dropped and reported even in error mode
    path = write(tmp_path / "p.jsonl", [GOOD, json.dumps(long_prompt)])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlxtune.data"):
        s = load(path, tok, max_length=64)
    assert len(s.train) == 1 and s.info["train"]["skipped"] == {"prompt longer than max_length": 1}
    assert "skipped 1 of 2 records: 1 prompt longer than max_length (line 2)" in caplog.text
    with pytest.raises(DataError, match=rf"{path}:2: .* more than data.max_length=64"):
        load(path, tok, max_length=64, on_too_long="error")


# ---------------------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_miss_and_corruption(tmp_path, tok, alpaca_seed_dir):
    path = alpaca_seed_dir / "valid.jsonl"
    a = load(path, tok)
    assert not a.info["train"]["cached"]
    entries = list(D.cache_dir().glob("*.npz"))
    assert len(entries) == 1 and D.cache_dir() == tmp_path / "cache" / "data"
    b = load(path, tok)
    assert b.info["train"]["cached"] and b.train == a.train
    assert not load(path, tok, max_length=1000).info["train"]["cached"]  # settings are part of the key
    entries[0].write_bytes(b"\x00garbage")
    c = load(path, tok)
    assert not c.info["train"]["cached"] and c.train == a.train  # ignored and rebuilt
    assert load(path, tok).info["train"]["cached"]
    copy = write(tmp_path / "v.jsonl", path.read_text().splitlines()[:-1])  # content changed
    assert not load(copy, tok).info["train"]["cached"]
    assert all(p.suffix == ".npz" and not p.name.startswith(".") for p in D.cache_dir().iterdir())  # no temps left


# ---------------------------------------------------------------------------------------------------------
# CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlxtune")
    register_data_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_inspect(alpaca_seed_dir, llama3_tokenizer_dir, capsys):
    assert run_cli(["data", "inspect", str(alpaca_seed_dir / "train.jsonl"), "--tokenizer", str(llama3_tokenizer_dir),
                    "--color", "never", "--max-length", "256"]) == 0
    out = capsys.readouterr().out
    assert "format alpaca, template alpaca" in out
    assert "### Response:\n[[" in out and "<|eot_id|>]]" in out and "[[### Instruction" not in out
    assert "lengths (tokens): min" in out and "truncated to max_length=256: " in out
    assert "padding at batch_size 4: packed" in out
    assert run_cli(["data", "inspect", str(alpaca_seed_dir)]) == 0  # no tokenizer: records and character lengths
    out = capsys.readouterr().out
    assert "format alpaca" in out and '"role": "assistant"' in out and "--tokenizer" in out


def test_cli_convert_roundtrip(tmp_path, alpaca_seed_dir, tok, capsys):
    out = tmp_path / "out" / "msgs.jsonl"
    assert run_cli(["data", "convert", str(alpaca_seed_dir / "valid.jsonl"), "--to", "messages", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 18 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    via_messages = load(out, tok, template="tokenizer").train
    via_alpaca = load(alpaca_seed_dir / "valid.jsonl", tok, template="tokenizer").train
    assert via_messages == via_alpaca
    bad = write(tmp_path / "bad.jsonl", [GOOD, "{"])
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        run_cli(["data", "convert", str(bad), "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# Less-travelled paths


class NoOffsets:
    """A tokenizer without character offsets (like a slow tokenizer): everything else delegates."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_without_offsets_same_result(tok, qwen_tokenizer):
    conv = [{"role": "system", "content": "S."}, *CONV, {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Yes, more."}]
    for t in (tok, qwen_tokenizer):
        assert D.encode_conversation(conv, NoOffsets(t)) == D.encode_conversation(conv, t)


def test_mlx_lm_tokenizer_wrapper(tmp_path, tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    path = write(tmp_path / "t.jsonl", [GOOD])
    assert load(path, TokenizerWrapper(tok)).train == load(path, tok).train


def test_parquet_without_pyarrow(tmp_path, tok, monkeypatch):
    import sys

    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"reading Parquet needs pyarrow; install it"):
        load(f, tok)


def test_encode_conversation_errors_are_data_errors(tok):
    with pytest.raises(DataError, match="no assistant turn"):
        D.encode_conversation(CONV[:1], tok)


def test_prompt_for_generation(tok, alpaca_seed_dir):
    rec = D.normalize(json.loads((alpaca_seed_dir / "test.jsonl").read_text().splitlines()[0]), "alpaca")
    enc = D.Encoder(tok)
    ids, reference = enc.prompt(rec, "alpaca")
    ex, _ = enc.encode(rec, "alpaca")
    start = ex.mask.index(1)
    assert ids == ex.ids[:start] and reference == rec.alpaca[2]  # the prompt is exactly the untrained prefix
    chat = D.normalize({"messages": CONV}, "messages")
    ids, reference = enc.prompt(chat, "messages")
    ex, _ = enc.encode(chat, "messages")
    assert ids == ex.ids[: ex.mask.index(1)] and reference == "Hello!"


# ---------------------------------------------------------------------------------------------------------
# Huge and strange data (issue 15)


def qload(path, tok, **cfg):
    """`load` without the cache (hashing the 17 MB Llama 3 tokenizer costs a second per call)."""
    return load(path, tok, cache=False, **cfg)


class Spy:
    """A tokenizer that records the longest text it was asked to tokenize; everything else delegates."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        for t in [text] if isinstance(text, str) else text:
            self.longest = max(self.longest, len(t))
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_huge_record_clipped_before_tokenizing(tmp_path, tok):
    reply = "lorem ipsum dolor sit amet " * (5 * 2**20 // 27)  # a 5 MB line
    path = write(tmp_path / "t.jsonl", [GOOD, json.dumps({"messages": [CONV[0], {"role": "assistant", "content": reply}]})])
    spy = Spy(tok)
    s = qload(path, spy, max_length=64)
    budget = D.Encoder(tok, max_length=64).char_budget()
    assert budget < 100_000 and spy.longest <= budget + 200  # the tokenizer saw the budget, not 5 MB
    assert [len(e.ids) for e in s.train] == [len(s.train[0].ids), 64] and s.info["train"]["truncated"] == 1
    whole = D.Encoder(tok, max_length=64).encode(D.normalize({"messages": [CONV[0], {"role": "assistant", "content": reply[:20_000]}]}, "messages"), "messages")
    assert s.train[1] == whole[0]  # the first max_length tokens are those of the unclipped text
    with pytest.raises(DataError, match=rf"{path}:2: at least \d+ tokens, more than data.max_length=64"):
        qload(path, tok, max_length=64, on_too_long="error")
    # a prompt that fills the budget: dropped as "prompt longer than max_length", not an error
    path = write(tmp_path / "p.jsonl", [GOOD, json.dumps({"messages": [{"role": "user", "content": reply}, CONV[1]]})])
    assert qload(path, tok, max_length=64).info["train"]["skipped"] == {"prompt longer than max_length": 1}


def test_many_tiny_turns_bounded(tmp_path, tok):
    turns = [{"role": r, "content": "x"} for _ in range(3_000) for r in ("user", "assistant")]
    path = write(tmp_path / "t.jsonl", [json.dumps({"messages": turns})])
    s = qload(path, tok, max_length=32)
    assert len(s.train[0].ids) == 32 and s.info["train"]["truncated"] == 1


@pytest.mark.parametrize("kind", ["fifo", "dir", "device"])
def test_special_files_refused_before_reading(tmp_path, tok, kind):
    import os

    path = tmp_path / "train.jsonl"
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)  # opening it would block forever
        expect = "is a FIFO"
    elif kind == "dir":
        path.mkdir()
        expect = "is a directory, not a data file"
    else:
        path = Path(os.devnull)
        if not path.exists():
            pytest.skip("no null device")
        expect = "is a character device"
    with pytest.raises(DataError, match=expect):
        D.load_file(path, DataConfig(train=str(path)), tok)
    if kind == "fifo":  # as a dir's train file too
        with pytest.raises(DataError, match="train.jsonl: is a FIFO"):
            qload(tmp_path, tok)


ORDER_CASES = {
    "assistant first": ([CONV[1], CONV[0], CONV[1]], "messages[0] is an assistant turn as the first turn"),
    "two assistants": ([*CONV, CONV[1]], "messages[2] is an assistant turn after an assistant turn"),
    "two users": ([CONV[0], *CONV], "messages[1] is a user turn after a user turn"),
    "system not first": ([*CONV, {"role": "system", "content": "S"}], "messages[2] is a system turn after the first"),
    "empty reply": ([CONV[0], {"role": "assistant", "content": " \n"}], "messages[1] is an empty assistant turn"),
}


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_role_order_and_empty_replies(tmp_path, tok, case):
    turns, expect = ORDER_CASES[case]
    path = write(tmp_path / "train.jsonl", [GOOD, json.dumps({"messages": turns})])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {re.escape(expect)}"):
        qload(path, tok)
    reason = "empty reply" if case == "empty reply" else "role order"
    assert qload(path, tok, on_bad_line="skip").info["train"]["skipped"] == {reason: 1}


def test_empty_replies_in_every_format(tmp_path, tok):
    for rec, expect in [({"instruction": "a", "input": "", "output": "  "}, "field 'output' is empty"),
                        ({"prompt": "a", "completion": ""}, "field 'completion' is empty")]:
        path = write(tmp_path / "e.jsonl", [json.dumps({**rec, **({"output": "b"} if "output" in rec else {"completion": "b"})}),
                                            json.dumps(rec)])
        with pytest.raises(DataError, match=rf"{path}:2: {expect}"):
            qload(path, tok)
    # an untrained (weight 0) empty assistant turn teaches nothing: allowed
    conv = [CONV[0], {"role": "assistant", "content": "", "weight": 0}, CONV[0], CONV[1]]
    assert len(qload(write(tmp_path / "w.jsonl", [json.dumps({"messages": conv})]), tok).train) == 1


def test_sharegpt_assistant_names_and_role_content_keys(tmp_path, tok):
    expect = qload(write(tmp_path / "m.jsonl", [GOOD]), tok).train
    for turns in ([{"from": "human", "value": "Hi"}, {"from": "chatgpt", "value": "Hello!"}],
                  [{"from": "user", "value": "Hi"}, {"from": "bing", "value": "Hello!"}],
                  [{"from": "human", "value": "Hi"}, {"from": "bard", "value": "Hello!"}],
                  [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                  [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello!"}]):
        path = write(tmp_path / "s.jsonl", [json.dumps({"conversations": turns})])
        s = qload(path, tok)
        assert s.info["train"]["format"] == "sharegpt" and s.train == expect, turns


@pytest.mark.parametrize("raw, expect", [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, ' + GOOD[14:].encode()[:-2] + b"]}", "lone surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"text": ' + b"1" * 5000 + b"}", "not valid JSON"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
    (b'{"text": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate encoded as UTF-8 bytes
    (b'{"text": "a\x00b"}', "not valid JSON"),
])
def test_strange_bytes_are_one_line_errors(tmp_path, tok, raw, expect):
    path = tmp_path / "t.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + raw + b"\n")
    with pytest.raises(DataError) as e:
        qload(path, tok)
    assert str(e.value).startswith(f"{path}:2: ") and expect in str(e.value) and "\n" not in str(e.value)
    # the same element in a JSON list: one error naming the line (a list cannot skip an element)
    js = tmp_path / "t.json"
    js.write_bytes(b"[\n" + GOOD.encode() + b",\n" + raw + b"\n]")
    with pytest.raises(DataError) as e:
        qload(js, tok)
    assert str(e.value).startswith(f"{js}:") and "\n" not in str(e.value)


def test_json_list_streamed_in_small_chunks(tmp_path, tok, monkeypatch):
    from mlxtune.data import sources

    recs = [{"messages": [{"role": "user", "content": f"Q{i} " + "é" * i}, {"role": "assistant", "content": f"A{i}\n"}]}
            for i in range(60)] + [{"text": "x" * 5000}, {"prompt": "p", "completion": "c", "n": 12345678901234567890}]
    path = tmp_path / "t.json"
    path.write_text("\ufeff[\n" + ",\n".join(json.dumps(r, indent=1 if i % 2 else None, ensure_ascii=bool(i % 3))
                                             for i, r in enumerate(recs)) + "\n]\n")
    monkeypatch.setattr(sources, "CHUNK_BYTES", 7)  # every element spans many chunks
    lines = list(D.read_lines(path))
    assert [l.value for l in lines] == recs
    assert [l.where for l in lines][:3] == [f"{path}:2", f"{path}:3", f"{path}:15"]  # record 1 is 12 lines
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(DataError, match=rf"{path}:\d+: a record over"):
        list(D.read_lines(path))


def test_jsonl_line_over_the_record_limit_is_skipped_unread(tmp_path, tok, monkeypatch):
    from mlxtune.data import sources

    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 4096)
    path = write(tmp_path / "t.jsonl", [GOOD, json.dumps({"text": "x" * 10_000}), GOOD])
    with pytest.raises(DataError, match=rf"{path}:2: the line is over"):
        qload(path, tok)
    s = qload(path, tok, on_bad_line="skip")
    assert len(s.train) == 2 and s.info["train"]["skipped"] == {"record too large": 1}


def test_csv_refused(tmp_path, tok):
    path = tmp_path / "train.csv"
    path.write_text("instruction,output\na,b\n")
    with pytest.raises(DataError, match="CSV is not supported: use JSON, JSONL or Parquet"):
        qload(path, tok)
    with pytest.raises(DataError, match=r"no train file in this dir \(train.csv: CSV is not supported"):
        qload(tmp_path, tok)


# ---------------------------------------------------------------------------------------------------------
# data inspect / convert (issue 16)


def test_cli_inspect_tokenizer_sources(tmp_path, llama3_tokenizer_dir, smollm2_gguf, capsys):
    import yaml

    path = write(tmp_path / "d" / "train.jsonl", [GOOD])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(llama3_tokenizer_dir)}, "data": {"train": str(path)}}))
    for source in (str(run), str(smollm2_gguf)):  # a HF dir: test_cli_inspect
        assert run_cli(["data", "inspect", str(path), "--tokenizer", source, "--color", "never"]) == 0
        out = capsys.readouterr().out
        assert "[[Hello!" in out and "examples: 1 of 1 records" in out, source
    with pytest.raises(DataError, match="not a model dir, .gguf file or run dir"):
        run_cli(["data", "inspect", str(path), "--tokenizer", str(path)])


def test_cli_inspect_every_split_and_exit_2_when_nothing_usable(tmp_path, llama3_tokenizer_dir, capsys):
    d = tmp_path / "d"
    write(d / "train.jsonl", [GOOD, "{"])
    write(d / "valid.jsonl", [GOOD])
    assert run_cli(["data", "inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "=== train:" in out and "=== valid:" in out and "skipped: 1 invalid JSON (line 2)" in out
    with pytest.raises(DataError, match=rf"{d / 'train.jsonl'}:2: not valid JSON"):
        run_cli(["data", "inspect", str(d), "--on-bad-line", "error"])  # without a tokenizer too
    bad = write(tmp_path / "bad.jsonl", ["{", json.dumps({"messages": []})])
    for extra in ([], ["--tokenizer", str(llama3_tokenizer_dir)]):
        with pytest.raises(DataError, match="no usable"):
            run_cli(["data", "inspect", str(bad), *extra])


def test_cli_convert_never_replaces_without_force(tmp_path, capsys):
    src = write(tmp_path / "a.jsonl", [json.dumps({"instruction": "a", "input": "", "output": "b"})])
    out = write(tmp_path / "out.jsonl", ["keep me"])
    with pytest.raises(DataError.__mro__[1], match="already exists"):
        run_cli(["data", "convert", str(src), "--out", str(out)])
    assert out.read_text() == "keep me\n"
    with pytest.raises(DataError.__mro__[1], match="is the input"):
        run_cli(["data", "convert", str(src), "--out", str(src), "--force"])
    assert run_cli(["data", "convert", str(src), "--out", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["messages"][1] == {"role": "assistant", "content": "b"}


def test_cli_convert_dir_every_split(tmp_path, capsys):
    d = tmp_path / "d"
    write(d / "train.jsonl", [json.dumps({"instruction": "a", "input": "", "output": "b"})] * 3)
    write(d / "test.jsonl", [json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]})])
    assert run_cli(["data", "convert", str(d), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["test.jsonl", "train.jsonl"]
    assert len((tmp_path / "o" / "train.jsonl").read_text().splitlines()) == 3
    write(d / "valid.jsonl", [json.dumps({"instruction": "a", "output": ""})])  # an empty reply: the error names it
    with pytest.raises(DataError, match=rf"{d / 'valid.jsonl'}:1: field 'output' is empty"):
        run_cli(["data", "convert", str(d), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2*"))
