"""`mlxtune chat` in a real terminal (a pty, through pexpect): two turns, /reset, /system, /exit, on a tiny model.

Random weights make the text meaningless, so the test checks the conversation's structure through the stats
line each turn prints (`[prompt N tokens (M cached), ...]`): the first turn's prompt is exactly the chat
template of one user message, the second turn carries the first (and takes it from the KV cache), /reset
starts over, /system adds a system prompt, and /exit ends the process cleanly.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect

from mlxtune.generation import encode_prompt

ROOT = Path(__file__).resolve().parent.parent
STATS = re.compile(r"\[prompt (\d+) tokens \((\d+) cached\), [\d.]+ tok/s \| (\d+) tokens, [\d.]+ tok/s\]")


def turn(child, text: str) -> tuple[int, int, int]:
    child.sendline(text)
    child.expect(STATS)
    prompt, cached, generated = (int(g) for g in child.match.groups())
    child.expect_exact(">>> ")
    return prompt, cached, generated


def test_chat_in_a_pty(tiny_llama_dir, llama3_tokenizer):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "mlxtune", "chat", "--model", str(tiny_llama_dir), "--max-tokens", "6"],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact("/exit")  # the help line
        child.expect_exact(">>> ")
        one = len(encode_prompt(llama3_tokenizer, "Hello there"))
        p1, c1, g1 = turn(child, "Hello there")
        assert (p1, c1) == (one, 0) and 1 <= g1 <= 6

        p2, c2, _ = turn(child, "Tell me more")
        assert p2 > p1 + len(encode_prompt(llama3_tokenizer, "Tell me more")) - 5  # the first turn is in the prompt
        assert c2 >= p1  # ... and came from the KV cache

        child.sendline("/reset")
        child.expect_exact("[new conversation]")
        child.expect_exact(">>> ")
        assert turn(child, "Hello there")[:2] == (one, 0)

        child.sendline("/system You answer in French.")
        child.expect_exact("system prompt set")
        child.expect_exact(">>> ")
        with_system = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello there"}]
        assert turn(child, "Hello there")[:2] == (len(encode_prompt(llama3_tokenizer, with_system)), 0)

        child.sendline("/nope")
        child.expect_exact("unknown command /nope")
        child.expect_exact(">>> ")

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
