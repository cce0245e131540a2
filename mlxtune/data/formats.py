"""Record formats: detect alpaca / sharegpt / messages / completions / text and normalize each record.

Every record becomes a `Record`: messages [{role, content}] with roles system / user / assistant, or raw text.
A record that cannot is a `BadRecord` that says what is wrong and how to fix it. The format is detected from the
first record that has one format's keys (`data.format: auto`; looked for in the first `LOOKAHEAD` records) or
forced.

ShareGPT turns are `{"from": ..., "value": ...}` or `{"role": ..., "content": ...}`; roles map as `SHAREGPT_ROLES`:
system → system; human, user → user; gpt, assistant, chatgpt, bing, bard → assistant.

A conversation is trainable only in order: an optional system turn first, then user and assistant turns
alternating, starting with user; every trained assistant turn (weight not 0) has a non-blank reply (training an
empty reply teaches the model to say nothing). Alpaca `output` and completions `completion` must not be blank
either. Text must be valid Unicode: a lone surrogate (`"\\ud800"` in JSON) is a bad record.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from typing import Any, Iterable, Iterator, Optional, Sequence

from ..errors import DataError
from .records import BadRecord, Line, Record

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
"ShareGPT `from` (or `role`) values → roles; the assistant names are those of real ShareGPT exports."
LOOKAHEAD = 1000
"With data.format: auto, the format is detected from the first of this many records that has a format's keys."
_SURROGATE = re.compile("[\ud800-\udfff]")
FORMAT_KEYS = {
    "alpaca": "instruction, input (optional), output",
    "sharegpt": 'conversations: [{"from": "human"|"gpt"|"system", "value": ...}] (or role/content)',
    "messages": 'messages: [{"role": "system"|"user"|"assistant", "content": ...}]',
    "completions": "prompt, completion",
    "text": "text",
}
"What each format's records hold, for error messages."


def detect_format(value: Any) -> Optional[str]:
    """The format a record's keys indicate, or None."""
    if not isinstance(value, dict):
        return None
    if "messages" in value:
        return "messages"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value and ("output" in value or "input" in value):
        return "alpaca"
    if "prompt" in value and "completion" in value:
        return "completions"
    if "text" in value:
        return "text"
    return None


def short(value: Any, n: int = 40) -> str:
    """A value as JSON, cut to `n` characters, for error messages (printable: lone surrogates escaped)."""
    if isinstance(value, (dict, list)) and len(value) > 8:
        value = list(value)[:8] if isinstance(value, dict) else value[:8]
    try:
        s = json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        s = f"<{type(value).__name__}>"
    s = s if len(s) <= n else s[: n - 3] + "..."
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _unicode(s: str, where: str) -> str:
    m = _SURROGATE.search(s)
    if m:
        raise BadRecord("invalid text", f"{where} holds a lone surrogate \\u{ord(m.group()):04x} at character "
                        f"{m.start()} (not valid Unicode)", "fix or remove that escape")
    return s


def _string(value: Any, name: str, fmt: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise BadRecord("missing field", f"missing field {name!r}", f"{fmt} records need {FORMAT_KEYS[fmt]}")
        return ""
    if not isinstance(value, str):
        raise BadRecord("wrong type", f"field {name!r} must be a string, got {type(value).__name__} {short(value)}",
                        "write it as a JSON string")
    return _unicode(value, f"field {name!r}")


def _reply(text: str, name: str) -> str:
    if not text.strip():
        raise BadRecord("empty reply", f"field {name!r} is empty, and training an empty reply teaches the model to "
                        "say nothing", "give the record a reply, or remove it")
    return text


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {type: text, text} parts."""
    if isinstance(value, str):
        return _unicode(value, where)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return _unicode("".join(p["text"] for p in value), where)
    if value is None:
        raise BadRecord("missing field", f"{where} has no content", "give every message a string content")
    raise BadRecord("wrong type", f"{where}.content must be a string, got {type(value).__name__} {short(value)}",
                    "write the content as a JSON string")


def _alpaca(value: dict) -> Record:
    if "instruction" not in value or "output" not in value:
        missing = "output" if "instruction" in value else "instruction"
        raise BadRecord("missing field", f"missing field {missing!r}", f"alpaca records need {FORMAT_KEYS['alpaca']}")
    ins = _string(value["instruction"], "instruction", "alpaca")
    inp = _string(value.get("input"), "input", "alpaca", required=False)
    out = _reply(_string(value["output"], "output", "alpaca"), "output")
    user = ins + ("\n\n" + inp if inp.strip() else "")
    return Record(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": out}], alpaca=(ins, inp, out))


def _completions(value: dict) -> Record:
    prompt = _string(value.get("prompt"), "prompt", "completions")
    completion = _reply(_string(value.get("completion"), "completion", "completions"), "completion")
    return Record(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                  completion=(prompt, completion))


def _text(value: dict) -> Record:
    text = _string(value.get("text"), "text", "text")
    if not text.strip():
        raise BadRecord("empty text", "field 'text' is empty", "remove the record or give it text")
    return Record(text=text)


def _turn(turn: Any, where: str, fmt: str) -> dict:
    """One messages / sharegpt turn → {role, content[, train]}."""
    if not isinstance(turn, dict):
        raise BadRecord("wrong type", f"{where} must be an object, got {type(turn).__name__} {short(turn)}",
                        f"write turns as {FORMAT_KEYS[fmt]}")
    sharegpt_keys = fmt == "sharegpt" and ("from" in turn or "role" not in turn)
    role_key, content_key = ("from", "value") if sharegpt_keys else ("role", "content")
    role = turn.get(role_key)
    if fmt == "messages":
        ok, names = isinstance(role, str) and role in ROLES, ", ".join(ROLES)
    else:
        ok, names = isinstance(role, str) and role in SHAREGPT_ROLES, "human, gpt, system (or user, assistant, chatgpt, bing, bard)"
        role = SHAREGPT_ROLES.get(role) if ok else role
    if not ok:
        if role is None:
            raise BadRecord("missing field", f"{where} has no {role_key!r}", f"give each turn a {role_key!r}: {names}")
        raise BadRecord("unknown role", f"unknown role {short(role)} in {where}", f"use {names}")
    msg = {"role": role, "content": _content(turn.get(content_key), where)}
    weight = turn.get("weight")
    if weight is not None:
        if role != "assistant" or weight not in (0, 1):
            raise BadRecord("wrong type", f"{where}.weight must be 0 or 1 on an assistant turn, got {short(weight)}",
                            "use weight 0 to not train a turn, or leave it out")
        msg["train"] = bool(weight)
    return msg


def _conversation(value: dict, fmt: str) -> Record:
    key = "messages" if fmt == "messages" else "conversations"
    turns = value.get(key)
    if turns is None:
        raise BadRecord("missing field", f"missing field {key!r}", f"{fmt} records need {FORMAT_KEYS[fmt]}")
    if not isinstance(turns, list):
        raise BadRecord("wrong type", f"field {key!r} must be a list of turns, got {type(turns).__name__} {short(turns)}",
                        f"write it as {FORMAT_KEYS[fmt]}")
    messages = [_turn(turn, f"{key}[{j}]", fmt) for j, turn in enumerate(turns)]
    if not messages:
        raise BadRecord("empty conversation", f"{key} is empty", "give each record at least a user and an assistant turn")
    _check_order(messages, key)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn", f"{key} has no assistant turn, so nothing to train on",
                        "add the assistant's reply")
    return Record(messages=messages)


def _check_order(messages: list[dict], key: str) -> None:
    """An optional system turn first, then user / assistant alternating from user; no blank trained reply."""
    first = 1 if messages[0]["role"] == "system" else 0
    for j, m in enumerate(messages):
        role = m["role"]
        if role == "system" and j > 0:
            raise BadRecord("role order", f"{key}[{j}] is a system turn after the first turn",
                            "put the one system turn first")
        expected = "system" if j < first else ("user" if (j - first) % 2 == 0 else "assistant")
        if role != expected:
            prev = messages[j - 1]["role"] if j else ""
            after = f"after {'an' if prev == 'assistant' else 'a'} {prev} turn" if j else "as the first turn"
            raise BadRecord("role order", f"{key}[{j}] is an {role} turn {after}" if role == "assistant" else
                            f"{key}[{j}] is a {role} turn {after}",
                            "alternate user and assistant turns, starting with user (after an optional system turn)")
        if role == "assistant" and m.get("train", True) and not m["content"].strip():
            raise BadRecord("empty reply", f"{key}[{j}] is an empty assistant turn, and training an empty reply "
                            "teaches the model to say nothing", "give it a reply, set its weight to 0, or remove the record")


def normalize(value: Any, fmt: str) -> Record:
    """A raw record in format `fmt` → Record, or BadRecord saying what is wrong and how to fix it."""
    if not isinstance(value, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(value).__name__} {short(value)}",
                        f"write one object per line with {FORMAT_KEYS[fmt]}")
    if fmt == "alpaca":
        return _alpaca(value)
    if fmt == "completions":
        return _completions(value)
    if fmt == "text":
        return _text(value)
    return _conversation(value, fmt)


def to_messages(record: Record) -> list[dict]:
    """The record as a plain messages list ({role, content}), as `mlxtune data convert` writes it."""
    if record.messages is None:
        raise DataError("a text record has no conversation to convert; keep it as {\"text\": ...}")
    return [{"role": m["role"], "content": m["content"]} for m in record.messages]


def _unknown_format(line: Line) -> BadRecord:
    keys = short(sorted(line.value)) if isinstance(line.value, dict) else short(line.value)
    return BadRecord("unknown format", f"no known format in keys {keys}",
                     "use alpaca (instruction/input/output), sharegpt (conversations), "
                     "messages, prompt/completion or text records, or set data.format")


def parse_stream(lines: Iterable[Line], fmt: str = "auto") -> tuple[str, Iterator[tuple[Line, Record | BadRecord]]]:
    """(format, every record normalized, lazily): the format is forced, or detected from the first record with a
    format's keys among the first LOOKAHEAD (the records read to find it are held until then)."""
    it = iter(lines)
    head: list[Line] = []
    if fmt == "auto":
        for l in it:
            head.append(l)
            fmt = (detect_format(l.value) if l.error is None else None) or "auto"
            if fmt != "auto" or len(head) >= LOOKAHEAD:
                break
        if fmt == "auto":
            return "unknown", ((l, l.error or _unknown_format(l)) for l in chain(head, it))
    return fmt, (_normalized(l, fmt) for l in chain(head, it))


def _normalized(l: Line, fmt: str) -> tuple[Line, Record | BadRecord]:
    if l.error is not None:
        return l, l.error
    try:
        return l, normalize(l.value, fmt)
    except BadRecord as e:
        if e.reason == "missing field" and detect_format(l.value) not in (None, fmt):
            e.detail += f" (this record looks like {detect_format(l.value)}, the file's format is {fmt})"
        return l, e
    except RecursionError:
        return l, BadRecord("invalid JSON", "JSON nested too deeply", "flatten the record")


def parse_lines(lines: Sequence[Line], fmt: str = "auto") -> tuple[str, list[tuple[Line, Record | BadRecord]]]:
    """`parse_stream` as a list: detect the format and normalize every record."""
    fmt, parsed = parse_stream(lines, fmt)
    return fmt, list(parsed)
