"""Record formats: detect alpaca / sharegpt / messages / completions / text and normalize each record.

Every record becomes a `Record`: messages [{role, content}] with roles system / user / assistant, or raw text.
A record that cannot is a `BadRecord` that says what is wrong and how to fix it. The format is detected from the
first record that has one format's keys (`data.format: auto`) or forced.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from ..errors import DataError
from .records import BadRecord, Line, Record

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMAT_KEYS = {
    "alpaca": "instruction, input (optional), output",
    "sharegpt": 'conversations: [{"from": "human"|"gpt"|"system", "value": ...}]',
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
    """A value as JSON, cut to `n` characters, for error messages."""
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _string(value: Any, name: str, fmt: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise BadRecord("missing field", f"missing field {name!r}", f"{fmt} records need {FORMAT_KEYS[fmt]}")
        return ""
    if not isinstance(value, str):
        raise BadRecord("wrong type", f"field {name!r} must be a string, got {type(value).__name__} {short(value)}",
                        "write it as a JSON string")
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {type: text, text} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
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
    out = _string(value["output"], "output", "alpaca")
    user = ins + ("\n\n" + inp if inp.strip() else "")
    return Record(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": out}], alpaca=(ins, inp, out))


def _completions(value: dict) -> Record:
    prompt = _string(value.get("prompt"), "prompt", "completions")
    completion = _string(value.get("completion"), "completion", "completions")
    return Record(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                  completion=(prompt, completion))


def _text(value: dict) -> Record:
    text = _string(value.get("text"), "text", "text")
    if not text.strip():
        raise BadRecord("empty text", "field 'text' is empty", "remove the record or give it text")
    return Record(text=text)


def _turn(turn: Any, where: str, fmt: str) -> dict:
    """One messages / sharegpt turn → {role, content[, train]}."""
    role_key, content_key = ("role", "content") if fmt == "messages" else ("from", "value")
    if not isinstance(turn, dict):
        raise BadRecord("wrong type", f"{where} must be an object, got {type(turn).__name__} {short(turn)}",
                        f"write turns as {FORMAT_KEYS[fmt]}")
    role = turn.get(role_key)
    if fmt == "messages":
        ok, names = role in ROLES, ", ".join(ROLES)
    else:
        ok, names = isinstance(role, str) and role in SHAREGPT_ROLES, "human, gpt, system"
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
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn", f"{key} has no assistant turn, so nothing to train on",
                        "add the assistant's reply")
    return Record(messages=messages)


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


def parse_lines(lines: Sequence[Line], fmt: str = "auto") -> tuple[str, list[tuple[Line, Record | BadRecord]]]:
    """Detect the format (from the first record with a format's keys) and normalize every record."""
    if fmt == "auto":
        fmt = next((f for f in (detect_format(l.value) for l in lines if l.error is None) if f), None)
        if fmt is None:
            return "unknown", [(l, l.error or _unknown_format(l)) for l in lines]
    out: list[tuple[Line, Record | BadRecord]] = []
    for l in lines:
        if l.error is not None:
            out.append((l, l.error))
            continue
        try:
            out.append((l, normalize(l.value, fmt)))
        except BadRecord as e:
            if e.reason == "missing field" and detect_format(l.value) not in (None, fmt):
                e.detail += f" (this record looks like {detect_format(l.value)}, the file's format is {fmt})"
            out.append((l, e))
    return fmt, out
