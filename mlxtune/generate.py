"""Text generation and chat on mlx-lm's generation, sampling and KV-cache utilities.

- `generate(model, tokenizer, prompt, ...) -> str` and `stream(...)` (token by token) for one prompt, on
  `mlx_lm.generate.stream_generate` with the chat template applied unless `raw=True`;
- `generate_batch(model, tokenizer, prompts, ...)` for many prompts at once (evaluation): prompts are sorted by
  length, left-padded into rows of an `mlx_lm` `BatchKVCache` (its mask hides the padding and its per-row
  offsets give every row RoPE positions 0, 1, ... from its first real token), and each row stops at its own
  stop token. Greedy outputs equal one-at-a-time generation (tests/test_generate.py);
- `ChatSession` / `chat(...)`: a multi-turn conversation whose KV cache persists across turns, so each turn
  feeds only the tokens the cache does not already hold;
- the `mlxtune generate` and `mlxtune chat` commands.

Stop tokens are the tokenizer's EOS plus every end-of-turn token the vocabulary has (`<|eot_id|>`,
`<|im_end|>`, ...) and the model config's `eos_token_id`s: a Llama 3 base tokenizer's EOS is
`<|end_of_text|>` while its chat turns end in `<|eot_id|>`, and a model that never stops is the classic bug.

Sampling uses mlx-lm's sampler pieces with a PRNG key of its own (`make_sampler` below), so generating
(for example during an evaluation inside training) never advances MLX's global random state. Greedy
(temperature 0) is the default everywhere: outputs are reproducible.

Why not `mlx_lm.generate.batch_generate`: it is also correct on this model (checked), but its
`BatchGenerator` API has changed between mlx-lm releases, it draws samples from the global RNG and it stops
only at the tokenizer's EOS set; the loop here is short and holds to the same cache utilities.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO, Union

import mlx.core as mx
import mlx.nn as nn

from .errors import ConfigError

# End-of-turn / end-of-text tokens across the chat formats we support; each is used when the vocabulary has it.
# <|eot_id|>: Llama 3 end of turn; <|eom_id|>: Llama 3.1 end of a tool-call message; <|end_of_text|>: Llama 3 EOS;
# <|im_end|>: ChatML (Qwen, SmolLM2) end of turn; <|endoftext|>: Qwen / GPT-2-style end of text.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")

Prompt = Union[str, Sequence[int], Sequence[dict]]


# ---------------------------------------------------------------------------------------------------------
# Tokenizer helpers


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm `TokenizerWrapper` (or the tokenizer itself)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def token_id(tokenizer: Any, token: str) -> Optional[int]:
    """The id of `token` if it is a single token of this vocabulary, else None."""
    tok = hf_tokenizer(tokenizer)
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and token != tok.unk_token):
        return None
    return int(tid)


def stop_token_ids(tokenizer: Any, model: Optional[nn.Module] = None) -> set[int]:
    """EOS, the end-of-turn tokens in END_OF_TURN_TOKENS that the vocabulary has, and the model's eos ids."""
    tok = hf_tokenizer(tokenizer)
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    if tok is not tokenizer:  # an mlx-lm TokenizerWrapper: its eos set (from generation_config.json, GGUF metadata)
        ids.update(int(i) for i in tokenizer.eos_token_ids)
    for t in END_OF_TURN_TOKENS:
        tid = token_id(tok, t)
        if tid is not None:
            ids.add(tid)
    cfg_eos = getattr(getattr(model, "args", None), "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(int(i) for i in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    return ids


def wrap_tokenizer(tokenizer: Any, model: Optional[nn.Module] = None) -> Any:
    """An mlx-lm `TokenizerWrapper` whose stop set is `stop_token_ids` (keeps an existing wrapper's detokenizer)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    stops = stop_token_ids(tokenizer, model)
    if isinstance(tokenizer, TokenizerWrapper):
        wrapper = copy.copy(tokenizer)  # the caller's wrapper keeps its own stop set
        wrapper.eos_token_ids = set(tokenizer.eos_token_ids) | stops
        return wrapper
    return TokenizerWrapper(tokenizer, eos_token_ids=stops)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(hf_tokenizer(tokenizer), "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: Prompt, *, system: Optional[str] = None, raw: bool = False) -> list[int]:
    """Token ids for a prompt: a string (one user turn), a list of {role, content} messages, or ids as is.

    Strings and messages go through the tokenizer's chat template with the generation prompt appended
    (rendered to text, then encoded without adding special tokens: the template writes BOS itself). With
    `raw=True` a string is encoded as plain text (BOS added as the tokenizer does).
    """
    tok = hf_tokenizer(tokenizer)
    if not isinstance(prompt, str) and len(prompt) and not isinstance(prompt[0], (str, dict)):
        return [int(t) for t in prompt]
    if raw:
        if not isinstance(prompt, str):
            raise ConfigError("raw=True takes a plain string prompt, not messages")
        return list(tok.encode(prompt, add_special_tokens=True))
    if not has_chat_template(tok):
        raise ConfigError("the tokenizer has no chat template; pass raw=True (CLI: --raw) to use the prompt as plain text")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------------------
# Sampling


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None) -> Callable[[mx.array], mx.array]:
    """A sampler (log-probs (B, V) → token ids (B,)) with its own PRNG key.

    temperature 0 is mlx-lm's greedy sampler (argmax). Otherwise mlx-lm's top-p filter, then a categorical
    draw at `temperature` keyed by a key split from `seed` (random when None) on every call, so MLX's global
    random state (the trainer's dropout stream) is never touched.
    """
    from mlx_lm.sample_utils import apply_top_p, make_sampler as mlx_make_sampler

    if temperature < 0:
        raise ConfigError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1], got {top_p}")
    if temperature == 0:
        return mlx_make_sampler(0.0)
    key = mx.random.key(seed if seed is not None else random.randrange(2**31))

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sample


@contextlib.contextmanager
def inference_mode(model: nn.Module):
    """Run with the model in eval mode (no dropout, no RNG draws); restore training mode after if it was on."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


# ---------------------------------------------------------------------------------------------------------
# One prompt, streamed


def stream(
    model: nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    *,
    seed: Optional[int] = None,
    system: Optional[str] = None,
    raw: bool = False,
    prompt_cache: Optional[list] = None,
) -> Iterator[Any]:
    """Yield mlx-lm `GenerationResponse`s (`.text` segment, `.token`, `.finish_reason`, tokens/s) for one prompt.

    Stops at any of `stop_token_ids` (the stop token itself is not in the text) or after `max_tokens`.
    `prompt_cache` (from `model.make_cache()`) is updated in place: pass the same one to continue a conversation.
    """
    from mlx_lm.generate import stream_generate

    if max_tokens < 1:
        raise ConfigError(f"max_tokens: must be at least 1, got {max_tokens}")
    ids = encode_prompt(tokenizer, prompt, system=system, raw=raw)
    if not ids:
        raise ConfigError("the prompt is empty")
    wrapper = wrap_tokenizer(tokenizer, model)
    sampler = make_sampler(temperature, top_p, seed)
    with inference_mode(model):
        yield from stream_generate(model, wrapper, ids, max_tokens=max_tokens, sampler=sampler, prompt_cache=prompt_cache)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    *,
    seed: Optional[int] = None,
    system: Optional[str] = None,
    raw: bool = False,
) -> str:
    """The completion of one prompt (a string is one user turn under the chat template unless `raw`)."""
    return "".join(r.text for r in stream(model, tokenizer, prompt, max_tokens, temperature, top_p,
                                            seed=seed, system=system, raw=raw))


# ---------------------------------------------------------------------------------------------------------
# Many prompts, batched


def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    *,
    seed: Optional[int] = 0,
    batch_size: int = 8,
    stop_ids: Optional[set[int]] = None,
) -> list[list[int]]:
    """Generated token ids for each prompt (token-id lists), in input order, stop token excluded.

    Prompts are sorted by length and generated `batch_size` at a time (left-padded, see the module doc);
    a row leaves the batch at its first stop token or after `max_tokens`. Greedy by default: the result is
    the same as generating each prompt alone. With temperature > 0 the draws depend on `seed` and on how
    prompts fall into batches.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens: must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("generate_batch: a prompt is empty")
    stops = stop_token_ids(tokenizer, model) if stop_ids is None else set(stop_ids)
    sampler = make_sampler(temperature, top_p, seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in prompts]
    with inference_mode(model):
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            for i, ids in zip(rows, _generate_rows(model, [list(prompts[i]) for i in rows], max_tokens, sampler, stops)):
                out[i] = ids
    return out


PREFILL_STEP = 512
"Prompt positions run through the model at a time (bounds the attention scores of long prompts)."


def _generate_rows(model: nn.Module, prompts: list[list[int]], max_tokens: int, sampler, stops: set[int]) -> list[list[int]]:
    """One batch: left-pad, prefill, then decode one token per live row per step until every row stops."""
    from mlx_lm.models.cache import BatchKVCache

    B, L = len(prompts), max(len(p) for p in prompts)
    pads = [L - len(p) for p in prompts]
    cache = [BatchKVCache(pads) for _ in model.layers]
    x = mx.array([[0] * pad + p for p, pad in zip(prompts, pads)], dtype=mx.int32)  # (B, L), pad id is masked
    for s in range(0, L - 1, PREFILL_STEP):  # all but the last position: fill the cache
        e = min(s + PREFILL_STEP, L - 1)
        model(x[:, s:e], cache=cache, return_hidden=True)
        mx.eval([c.state for c in cache])
    y = _next_tokens(model, x[:, L - 1 :], cache, sampler)
    out: list[list[int]] = [[] for _ in range(B)]
    live = list(range(B))  # prompt index of each row still in the batch
    while True:
        tokens = y.tolist()
        keep = []
        for j, i in enumerate(live):
            if tokens[j] in stops:
                continue
            out[i].append(tokens[j])
            if len(out[i]) < max_tokens:
                keep.append(j)
        if not keep:
            return out
        if len(keep) < len(live):  # drop finished rows (BatchKVCache.filter also trims shared left padding)
            for c in cache:
                c.filter(keep)
            y = y[mx.array(keep)]
            live = [live[j] for j in keep]
        y = _next_tokens(model, y[:, None], cache, sampler)


def _next_tokens(model: nn.Module, x: mx.array, cache: list, sampler) -> mx.array:
    """Run x (B, T) through the model with the cache; sample the next token (B,) from the last position."""
    h = model(x, cache=cache, return_hidden=True)[:, -1, :]  # (B, D): project only the last position
    logits = model.project(h).astype(mx.float32)  # (B, V)
    y = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    mx.eval(y)
    return y


# ---------------------------------------------------------------------------------------------------------
# Chat


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


class ChatSession:
    """A multi-turn conversation under the tokenizer's chat template, with a KV cache kept across turns.

    Each turn renders the whole conversation, keeps the longest prefix the cache already holds (trimming the
    rest: a template may re-tokenize an earlier reply differently than it was generated) and feeds only the
    remainder.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, system: Optional[str] = None, max_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None):
        if not has_chat_template(tokenizer):
            raise ConfigError("the tokenizer has no chat template, so it cannot hold a conversation; "
                              "use `mlxtune generate --raw` for plain-text completion")
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
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> TurnStats:
        """Add a user turn, stream the reply through `on_text`, add it to the conversation, return the stats."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.models.cache import trim_prompt_cache

        messages = self.conversation() + [{"role": "user", "content": text}]
        ids = encode_prompt(self.tokenizer, messages)
        common = 0
        for a, b in zip(ids, self._cached):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # feed at least one token
        offset = self._cache[0].offset
        if offset > common and trim_prompt_cache(self._cache, offset - common) != offset - common:
            self._cache, common = self.model.make_cache(), 0
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


CHAT_HELP = "Commands: /reset (new conversation), /system TEXT (set the system prompt; new conversation), /exit (or Ctrl-D)."


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
) -> None:
    """Interactive chat: read a line, stream the reply, show tokens/s; /reset, /system TEXT, /exit."""
    out, err = out or sys.stdout, err or sys.stderr
    session = ChatSession(model, tokenizer, system=system, max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, seed=seed)
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
        if cmd in ("/exit", "/quit", "/bye"):
            return
        if cmd == "/reset":
            session.reset()
            print("[new conversation]", file=err, flush=True)
            continue
        if cmd == "/system" or cmd.startswith("/system "):
            session.set_system(cmd[len("/system"):].strip())
            print(f"[system prompt {'set' if session.system else 'cleared'}; new conversation]", file=err, flush=True)
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd.split()[0]}. {CHAT_HELP}", file=err, flush=True)
            continue
        try:
            stats = session.send(line, on_text=write)
        except KeyboardInterrupt:
            write("\n")
            print("[interrupted; this turn was dropped]", file=err, flush=True)
            continue
        write("\n")
        print(f"[{stats}]", file=err, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Model resolution shared by generate, chat and eval


@dataclass
class Resolved:
    """Where the base model and the adapter are, and the run's config when the adapter came from a run dir."""

    model: str
    adapter: Optional[str]
    run_config: Optional[Any]  # mlxtune.config.Config


def find_run_config(adapter: Union[str, Path]) -> Optional[Path]:
    """The run's config.yaml for a run dir, or for a checkpoint dir inside one (run/checkpoints/step_N)."""
    p = Path(adapter)
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def resolve(model: Optional[str], adapter: Optional[str]) -> Resolved:
    """Fill in the base model from the adapter's run dir (config.yaml) or adapter_config.json when omitted."""
    import json

    run_config = None
    if adapter is not None:
        if not Path(adapter).exists():
            raise ConfigError(f"--adapter {adapter}: no such file or directory")
        cfg_path = find_run_config(adapter)
        if cfg_path is not None:
            from .config import load_config

            run_config = load_config(cfg_path)
        if model is None and run_config is not None and run_config.model.path:
            model = run_config.model.path
        if model is None:
            meta = Path(adapter) / "adapter_config.json"
            if meta.is_file():
                cfg = json.loads(meta.read_text())
                base = cfg.get("base_model")  # mlxtune: {"path": ...}; PEFT: base_model_name_or_path
                model = (base.get("path") if isinstance(base, dict) else base) or cfg.get("base_model_name_or_path")
    if not model:
        raise ConfigError("no model: pass --model PATH (a HF model dir or .gguf), or --adapter RUN_DIR of a training run")
    return Resolved(str(model), adapter, run_config)


def load_for_inference(model: Optional[str], adapter: Optional[str], dtype: Optional[str] = None, *,
                       with_adapter: bool = True):
    """(model, tokenizer, Resolved): the base model (with the adapter applied unless `with_adapter=False`),
    in eval mode. A run dir's config supplies dtype and quantization, so the model is evaluated as trained."""
    from .loading import load

    r = resolve(model, adapter)
    kw: dict = {}
    if r.run_config is not None and Path(r.model) == Path(r.run_config.model.path or "."):
        kw = {"dtype": r.run_config.model.dtype, "quantize": r.run_config.model.quantize}
    if dtype is not None:
        kw["dtype"] = dtype
    m, tok = load(r.model, adapter=r.adapter if with_adapter else None, **kw)
    m.eval()
    return m, tok, r


# ---------------------------------------------------------------------------------------------------------
# CLI


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model: a HF model dir or a .gguf file (default: from --adapter's run dir)")
    p.add_argument("--adapter", help="an adapter dir or a training run dir (its config.yaml supplies the model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weight dtype (default: as stored / as trained)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate per reply (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--system", default=None, help="system prompt")


def register_cli(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt (streamed)",
                       description="Generate a completion for one prompt, streamed to stdout; tokens/s on stderr.")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    p.add_argument("--raw", action="store_true", help="use the prompt as plain text, without the chat template")
    _add_sampling_args(p, 256)
    p.set_defaults(func=_cli_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streamed)",
                       description=f"Interactive chat under the model's chat template. {CHAT_HELP}")
    _add_model_args(p)
    _add_sampling_args(p, 512)
    p.set_defaults(func=_cli_chat)


def _check_sampling(args) -> None:
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens: must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1], got {args.top_p}")


def _cli_generate(args) -> int:
    _check_sampling(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tok, _ = load_for_inference(args.model, args.adapter, args.dtype)
    raw = args.raw
    if not raw and not has_chat_template(tok):
        print("note: the tokenizer has no chat template; using the prompt as plain text (--raw)", file=sys.stderr)
        raw = True
    last = None
    for last in stream(model, tok, prompt, args.max_tokens, args.temperature, args.top_p, seed=args.seed,
                       system=args.system, raw=raw):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        print(f"[prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
              f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | stop: {last.finish_reason}]",
              file=sys.stderr)
    return 0


def _cli_chat(args) -> int:
    _check_sampling(args)
    model, tok, _ = load_for_inference(args.model, args.adapter, args.dtype)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    chat(model, tok, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
         top_p=args.top_p, seed=args.seed)
    return 0


from . import _callable_module  # noqa: E402  (mlxtune.generate(...) keeps working after this import)

_callable_module(__name__, "generate")
