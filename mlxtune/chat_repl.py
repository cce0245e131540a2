"""Multi-turn chat: `ChatSession` (a conversation whose KV cache persists across turns) and `chat(...)`, the
interactive loop behind `mlxtune chat`.

Each turn renders the whole conversation under the run's template (generation.PromptStyle; default the tokenizer's
chat template) and feeds the model only the tokens its KV cache does not already hold. A reply cut by the token
limit is marked `[cut at N tokens: --max-tokens]`. The module is named chat_repl (not chat) so that importing it never shadows
the `mlxtune.chat` API function. The REPL is a user interface, so it writes to the streams it is given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO

import mlx.nn as nn

from .errors import ConfigError
from .generation import PromptStyle, encode_prompt, has_chat_template, inference_mode, make_sampler, wrap_tokenizer

CHAT_HELP = "Commands: /reset (new conversation), /system TEXT (set the system prompt; new conversation), /exit (or Ctrl-D)."


@dataclass
class TurnStats:
    """What one chat turn cost: prompt tokens (of which `cached` came from the KV cache) and throughput."""

    reply: str
    prompt_tokens: int  # the whole rendered conversation
    cached_tokens: int  # of which the KV cache already held this many
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: Optional[str]

    def __str__(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens ({self.cached_tokens} cached), {self.prompt_tps:.1f} tok/s | "
                f"{self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s")

    @property
    def cut(self) -> bool:
        """Whether the reply stopped at the token limit rather than at a stop token."""
        return self.finish_reason == "length"


class ChatSession:
    """A multi-turn conversation under `style`'s template (default: the tokenizer's chat template), with a KV
    cache kept across turns.

    Each turn renders the whole conversation, keeps the longest prefix the cache already holds (trimming the
    rest: a template may re-tokenize an earlier reply differently than it was generated) and feeds only the
    remainder.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, system: Optional[str] = None, max_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                 style: Optional[PromptStyle] = None):
        self.style = style or PromptStyle()
        if self.style.template == "tokenizer" and not has_chat_template(tokenizer):
            raise ConfigError("the tokenizer has no chat template, so it cannot hold a conversation; "
                              "use `mlxtune generate --raw` for plain-text completion")
        if self.style.template_name(tokenizer) == "raw":
            raise ConfigError("this run was trained on plain text or completions without a chat template, so it cannot "
                              "hold a conversation; use `mlxtune generate --adapter RUN --prompt TEXT`")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self._sampler = make_sampler(temperature, top_p, seed)
        self._wrapper = wrap_tokenizer(tokenizer, model)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict] = []
        self._cache = self.model.make_cache()
        self._cached: list[int] = []  # the tokens whose keys/values the cache holds

    def set_system(self, text: Optional[str]) -> None:
        """Set (or with None/"" clear) the system prompt and start a new conversation."""
        self.system = text or None
        self.reset()

    def conversation(self) -> list[dict]:
        """The messages so far, the system prompt first when there is one."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _reuse_cache(self, ids: list[int]) -> int:
        """Trim the cache to the longest prefix of `ids` it holds (at least one token is left to feed);
        return that prefix's length."""
        from mlx_lm.models.cache import trim_prompt_cache

        common = 0
        for a, b in zip(ids, self._cached):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # feed at least one token
        offset = self._cache[0].offset
        if offset > common and trim_prompt_cache(self._cache, offset - common) != offset - common:
            self._cache, common = self.model.make_cache(), 0
        return common

    def send(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> TurnStats:
        """Add a user turn, stream the reply through `on_text`, add it to the conversation, return the stats."""
        from mlx_lm.generate import stream_generate

        messages = self.conversation() + [{"role": "user", "content": text}]
        ids = encode_prompt(self.tokenizer, messages, style=self.style)
        common = self._reuse_cache(ids)
        generated: list[int] = []
        pieces: list[str] = []
        last = None
        try:
            with inference_mode(self.model):
                for last in stream_generate(self.model, self._wrapper, ids[common:], max_tokens=self.max_tokens,
                                            sampler=self._sampler, prompt_cache=self._cache):
                    generated.append(last.token)
                    pieces.append(last.text)
                    if on_text and last.text:
                        on_text(last.text)
        finally:  # also on Ctrl-C: record what the cache now holds
            self._cached = (ids + generated)[: self._cache[0].offset]
        reply = "".join(pieces)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return TurnStats(reply, len(ids), common, last.generation_tokens if last else 0,
                         last.prompt_tps if last else 0.0, last.generation_tps if last else 0.0,
                         last.finish_reason if last else None)


def _command(session: ChatSession, cmd: str, err: TextIO) -> Optional[bool]:
    """Run a slash command: True to leave the loop, False when handled, None when `cmd` is not a command."""
    if cmd in ("/exit", "/quit", "/bye"):
        return True
    if cmd == "/reset":
        session.reset()
        print("[new conversation]", file=err, flush=True)
        return False
    if cmd == "/system" or cmd.startswith("/system "):
        session.set_system(cmd[len("/system"):].strip())
        print(f"[system prompt {'set' if session.system else 'cleared'}; new conversation]", file=err, flush=True)
        return False
    if cmd.startswith("/"):
        print(f"unknown command {cmd.split()[0]}. {CHAT_HELP}", file=err, flush=True)
        return False
    return None


def chat(
    model: nn.Module,
    tokenizer: Any,
    *,
    system: Optional[str] = None,
    max_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    input_fn: Callable[[str], str] = input,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    style: Optional[PromptStyle] = None,
) -> None:
    """Interactive chat: read a line, stream the reply, show tokens/s; /reset, /system TEXT, /exit. `style`: the
    template prompts are rendered with (a run's: generation.prompt_style; default the tokenizer's)."""
    out, err = out or sys.stdout, err or sys.stderr
    session = ChatSession(model, tokenizer, system=system, max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, style=style)
    print(CHAT_HELP, file=err, flush=True)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = input_fn(">>> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            print("(use /exit or Ctrl-D to quit)", file=err, flush=True)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        handled = _command(session, cmd, err)
        if handled:
            return
        if handled is False:
            continue
        try:
            stats = session.send(line, on_text=write)
        except KeyboardInterrupt:
            write("\n")
            print("[interrupted; this turn was dropped]", file=err, flush=True)
            continue
        write("\n")
        if stats.cut:
            print(f"[cut at {stats.generation_tokens} tokens: --max-tokens]", file=err, flush=True)
        print(f"[{stats}]", file=err, flush=True)
