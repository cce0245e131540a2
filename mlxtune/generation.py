"""Text generation on mlx-lm's generation, sampling and KV-cache utilities.

- `generate(model, tokenizer, prompt, ...) -> str` and `stream(...)` (token by token) for one prompt, on
  `mlx_lm.generate.stream_generate` with the chat template applied unless `raw=True`;
- `generate_batch(model, tokenizer, prompts, ...)` for many prompts at once (evaluation): prompts are sorted by
  length, left-padded into rows of an `mlx_lm` `BatchKVCache` (its mask hides the padding and its per-row
  offsets give every row RoPE positions 0, 1, ... from its first real token), and each row stops at its own
  stop token. Greedy outputs equal one-at-a-time generation (tests/test_generate.py);
- `resolve(model, adapter)` / `load_for_inference(...)`: the base model named by an adapter's run dir (read with
  runs.run_config: works from any folder), loaded as it was trained (shared by generate, chat and eval);
- `PromptStyle`: prompts are rendered with the template the run was trained with (`data.template` of its
  config.yaml: alpaca, chatml, llama3, a .jinja file or the tokenizer's), through the data package's Encoder, the
  one renderer training uses; without a run, the tokenizer's chat template.

The multi-turn chat (`ChatSession`, the REPL) lives in chat_repl.py; the commands in cli/generate.py.

Stop tokens are `tokenizer.stop_token_ids`: the tokenizer's EOS plus every end-of-turn token the vocabulary has
(`<|eot_id|>`, `<|im_end|>`, ...) and the model config's `eos_token_id`s: a Llama 3 base tokenizer's EOS is
`<|end_of_text|>` while its chat turns end in `<|eot_id|>`, and a model that never stops is the classic bug.

Sampling uses mlx-lm's sampler pieces with a PRNG key of its own (`make_sampler` below), so generating
(for example during an evaluation inside training) never advances MLX's global random state. Greedy
(temperature 0) is the default everywhere: outputs are reproducible.

Why not `mlx_lm.generate.batch_generate`: it is also correct on this model (checked), but its
`BatchGenerator` API has changed between mlx-lm releases, it draws samples from the global RNG and it stops
only at the tokenizer's EOS set; the loop here is short and holds to the same cache utilities.
"""

from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .errors import ConfigError, ModelLoadError
from .runs import find_run_config, run_config
from .tokenizer import stop_token_ids, unwrap

Prompt = Union[str, Sequence[int], Sequence[dict]]
Sampler = Callable[[mx.array], mx.array]


# ---------------------------------------------------------------------------------------------------------
# Prompts and stop tokens


def wrap_tokenizer(tokenizer: Any, model: Optional[nn.Module] = None) -> Any:
    """An mlx-lm `TokenizerWrapper` whose stop set is the stop tokens (keeps an existing wrapper's detokenizer)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    stops = set(stop_token_ids(tokenizer, model))
    if isinstance(tokenizer, TokenizerWrapper):
        wrapper = copy.copy(tokenizer)  # the caller's wrapper keeps its own stop set
        wrapper.eos_token_ids = set(tokenizer.eos_token_ids) | stops
        return wrapper
    return TokenizerWrapper(tokenizer, eos_token_ids=stops)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(unwrap(tokenizer), "chat_template", None))


@dataclass(frozen=True)
class PromptStyle:
    """How prompts are rendered: `data.template` (auto, tokenizer, alpaca, chatml, llama3 or a .jinja file) for
    records of format `fmt`, with the run's `data.system_prompt` (see data/templates.py for how auto resolves)."""

    template: str = "tokenizer"
    fmt: str = "messages"
    system_prompt: Optional[str] = None

    def encoder(self, tokenizer: Any, system: Optional[str] = None) -> Any:
        from .data.encode import Encoder

        return Encoder(tokenizer, self.template, system_prompt=system if system is not None else self.system_prompt)

    def template_name(self, tokenizer: Any) -> str:
        """The template that renders this style's prompts (`raw`: none, the prompt is plain text)."""
        return self.encoder(tokenizer).template_for(self.fmt)[0]


def prompt_style(cfg: Any) -> PromptStyle:
    """The PromptStyle of a run's Config: its data.template, system prompt and record format (data.format, or for
    auto the format of the training file's first record, as training detected it)."""
    data = cfg.data
    return PromptStyle(data.template, data.format if data.format != "auto" else _detect_format(data.train),
                       data.system_prompt)


def _detect_format(train: str) -> str:
    """The format of the first record of a local training file (or dir's train file); messages when unknown."""
    from .data.formats import detect_format
    from .data.sources import read_lines, split_files
    from .errors import MlxtuneError

    p = Path(train).expanduser() if train else None
    if p is None or not p.exists():
        return "messages"
    try:
        f = (split_files(p).get("train") or [None])[0] if p.is_dir() else p
        lines = read_lines(f) if f is not None else []
    except (MlxtuneError, OSError):
        return "messages"
    return next((fm for fm in (detect_format(l.value) for l in lines if l.error is None) if fm), "messages")


def encode_prompt(tokenizer: Any, prompt: Prompt, *, system: Optional[str] = None, raw: bool = False,
                  style: Optional[PromptStyle] = None) -> list[int]:
    """Token ids for a prompt: a string (one user turn), a list of {role, content} messages, or ids as is.

    Strings and messages are rendered with the generation prompt appended by `style`'s template (default: the
    tokenizer's chat template) through the data package's Encoder, exactly as training renders a record's
    prompt. With `raw=True` a string is encoded as plain text (BOS added as the tokenizer does).
    """
    from .data.records import BadRecord, Record

    tok = unwrap(tokenizer)
    if not isinstance(prompt, str) and len(prompt) and not isinstance(prompt[0], (str, dict)):
        return [int(t) for t in prompt]
    if raw:
        if not isinstance(prompt, str):
            raise ConfigError("raw=True takes a plain string prompt, not messages")
        return list(tok.encode(prompt, add_special_tokens=True))
    style = style or PromptStyle()
    if style.template == "tokenizer" and not has_chat_template(tok):
        raise ConfigError("the tokenizer has no chat template; pass raw=True (CLI: --raw) to use the prompt as plain text")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    enc = style.encoder(tok, system)
    try:
        if enc.template_for(style.fmt)[0] == "raw":  # trained on plain text / completions without a template
            users = [m for m in messages if m.get("role") != "system"]
            if len(users) != 1:
                raise ConfigError("this run was trained without a chat template (plain text or completions): "
                                  "it takes one prompt, not a conversation")
            record = Record(completion=(str(users[0].get("content", "")), ""))
        else:
            record = Record(messages=messages + [{"role": "assistant", "content": ""}])
        return list(enc.prompt(record, style.fmt)[0])
    except BadRecord as e:
        raise ConfigError(f"prompt: {e.detail}{'; ' + e.fix if e.fix else ''}") from None


# ---------------------------------------------------------------------------------------------------------
# Sampling


def check_sampling(max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, *, flags: bool = False) -> None:
    """Refuse a max_tokens below 1, a negative temperature or a top_p outside (0, 1] (ConfigError naming the
    argument, or with `flags` the command-line option: `--max-tokens`)."""

    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if flags else arg

    if max_tokens < 1:
        raise ConfigError(f"{name('max_tokens')}: must be at least 1, got {max_tokens}")
    if temperature < 0:
        raise ConfigError(f"{name('temperature')}: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{name('top_p')}: must be in (0, 1], got {top_p}")


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None) -> Sampler:
    """A sampler (log-probs (B, V) → token ids (B,)) with its own PRNG key.

    temperature 0 is mlx-lm's greedy sampler (argmax). Otherwise mlx-lm's top-p filter, then a categorical
    draw at `temperature` keyed by a key split from `seed` (random when None) on every call, so MLX's global
    random state (the trainer's dropout stream) is never touched.
    """
    from mlx_lm.sample_utils import apply_top_p, make_sampler as mlx_make_sampler

    check_sampling(1, temperature, top_p)
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
def inference_mode(model: nn.Module) -> Iterator[nn.Module]:
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
    style: Optional[PromptStyle] = None,
) -> Iterator[Any]:
    """Yield mlx-lm `GenerationResponse`s (`.text` segment, `.token`, `.finish_reason`, tokens/s) for one prompt.

    Stops at any of the stop tokens (the stop token itself is not in the text) or after `max_tokens`.
    `prompt_cache` (from `model.make_cache()`) is updated in place: pass the same one to continue a conversation.
    `style`: the template prompts are rendered with (a run's: `prompt_style(cfg)`; default the tokenizer's).
    """
    from mlx_lm.generate import stream_generate

    check_sampling(max_tokens)
    ids = encode_prompt(tokenizer, prompt, system=system, raw=raw, style=style)
    if not ids:
        raise ConfigError("the prompt is empty")
    wrapper = wrap_tokenizer(tokenizer, model)
    sampler = make_sampler(temperature, top_p, seed)
    with inference_mode(model):
        yield from stream_generate(model, wrapper, ids, max_tokens=max_tokens, sampler=sampler, prompt_cache=prompt_cache)


def generate(model: nn.Module, tokenizer: Any, prompt: Prompt, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, *, seed: Optional[int] = None, system: Optional[str] = None, raw: bool = False,
             style: Optional[PromptStyle] = None) -> str:
    """The completion of one prompt (a string is one user turn under the chat template unless `raw`);
    the arguments are `stream`'s."""
    return "".join(r.text for r in stream(model, tokenizer, prompt, max_tokens, temperature, top_p,
                                            seed=seed, system=system, raw=raw, style=style))


# ---------------------------------------------------------------------------------------------------------
# Many prompts, batched


PREFILL_STEP = 512
"Prompt positions run through the model at a time (bounds the attention scores of long prompts)."


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
    on_batch: Optional[Callable[[int], None]] = None,
) -> list[list[int]]:
    """Generated token ids for each prompt (token-id lists), in input order, stop token excluded.

    Prompts are sorted by length and generated `batch_size` at a time (left-padded, see the module doc);
    a row leaves the batch at its first stop token or after `max_tokens`. Greedy by default: the result is
    the same as generating each prompt alone. With temperature > 0 the draws depend on `seed` and on how
    prompts fall into batches. `on_batch(n)` is called after each batch with its number of prompts (progress).
    """
    check_sampling(max_tokens)
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("generate_batch: a prompt is empty")
    stops = set(stop_token_ids(tokenizer, model)) if stop_ids is None else set(stop_ids)
    sampler = make_sampler(temperature, top_p, seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in prompts]
    with inference_mode(model):
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            for i, ids in zip(rows, _generate_rows(model, [list(prompts[i]) for i in rows], max_tokens, sampler, stops)):
                out[i] = ids
            if on_batch is not None:
                on_batch(len(rows))
    return out


def _generate_rows(model: nn.Module, prompts: list[list[int]], max_tokens: int, sampler: Sampler,
                   stops: set[int]) -> list[list[int]]:
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


def _next_tokens(model: nn.Module, x: mx.array, cache: list, sampler: Sampler) -> mx.array:
    """Run x (B, T) through the model with the cache; sample the next token (B,) from the last position."""
    h = model(x, cache=cache, return_hidden=True)[:, -1, :]  # (B, D): project only the last position
    logits = model.project(h).astype(mx.float32)  # (B, V)
    y = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    mx.eval(y)
    return y


# ---------------------------------------------------------------------------------------------------------
# Model resolution shared by generate, chat and eval


@dataclass
class Resolved:
    """Where the base model and the adapter are, and the run's config when the adapter came from a run dir."""

    model: str
    adapter: Optional[str]
    run_config: Optional[Any]  # mlxtune.config.Config

    @property
    def style(self) -> Optional[PromptStyle]:
        """The prompt template the run was trained with (None without a run: the tokenizer's chat template)."""
        return prompt_style(self.run_config) if self.run_config is not None else None


def run_config_of(adapter: Union[str, Path], *, model: Optional[str] = None, require_base: bool = True) -> Optional[Any]:
    """The run's Config (paths resolved: runs.run_config) for an adapter inside a run dir (see
    runs.find_run_config), else None."""
    if find_run_config(adapter) is None:
        return None
    return run_config(adapter, model=model, require_base=require_base)


def _adapter_base_model(adapter: Union[str, Path]) -> Optional[str]:
    """The base model an adapter_config.json names (mlxtune: {"path": ...}; PEFT: base_model_name_or_path);
    a recorded local path that is gone is one line naming the file and --model."""
    from .fsio import read_json_object
    from .hub import is_hub_id

    meta = Path(adapter) / "adapter_config.json"
    if not meta.is_file():
        return None
    cfg = read_json_object(meta, ConfigError)
    base = cfg.get("base_model")
    path = (base.get("path") if isinstance(base, dict) else base) or cfg.get("base_model_name_or_path")
    if isinstance(path, str) and path and not Path(path).expanduser().exists() and not is_hub_id(path):
        shown = path if len(path) <= 60 else path[:57] + "..."
        raise ModelLoadError(f"{meta}: the base model {shown!r} it records does not exist; pass --model PATH to use "
                             f"the base where it is now")
    return path if isinstance(path, str) else None


def resolve(model: Optional[str], adapter: Optional[str]) -> Resolved:
    """Fill in the base model from the adapter's run dir (config.yaml) or adapter_config.json when omitted;
    `model` (--model) replaces the recorded base."""
    run_cfg = None
    if adapter is not None:
        if not Path(adapter).expanduser().exists():
            raise ConfigError(f"--adapter {adapter}: no such file or directory")
        run_cfg = run_config_of(adapter, model=model)
        if model is None and run_cfg is not None and run_cfg.model.path:
            model = run_cfg.model.path
        if model is None:
            model = _adapter_base_model(adapter)
    if not model:
        raise ConfigError("no model: pass --model PATH (a HF model dir or .gguf), or --adapter RUN_DIR of a training run")
    return Resolved(str(model), adapter, run_cfg)


def load_resolved(r: Resolved, dtype: Optional[str] = None, *, with_adapter: bool = True) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a Resolved, in eval mode; a run's dtype and quantization are applied (the model is
    used as it was trained) unless `dtype` is given."""
    from .loading import load

    kw: dict = {}
    if r.run_config is not None:
        kw = {"dtype": r.run_config.model.dtype, "quantize": r.run_config.model.quantize}
    if dtype is not None:
        kw["dtype"] = dtype
    m, tok = load(r.model, adapter=r.adapter if with_adapter else None, **kw)
    m.eval()
    return m, tok


def load_for_inference(model: Optional[str], adapter: Optional[str], dtype: Optional[str] = None, *,
                       with_adapter: bool = True) -> tuple[nn.Module, Any, Resolved]:
    """(model, tokenizer, Resolved): the base model (with the adapter applied unless `with_adapter=False`),
    in eval mode. A run dir's config supplies dtype and quantization, so the model is evaluated as trained."""
    r = resolve(model, adapter)
    m, tok = load_resolved(r, dtype, with_adapter=with_adapter)
    return m, tok, r
