"""One typed source of truth for configuration.

Every option is a dataclass field with a default and a one-line doc (the string literal under it) that ends with
its domain. Values resolve as defaults < YAML file < overrides (CLI `--lora.rank 32` or keyword arguments
`lora={"rank": 32}`), are coerced by the field's type (`1e-5` is a float), and an unknown key fails with the
closest valid name. Every value is then checked against its domain in `DOMAINS` (one table: a number's range, a
name's choices, a path's shape) and the whole config against the cross-field rules (`_CROSS_RULES`), before
anything is loaded or written. A problem is one line naming the field, the value (cut short) and the domain.
The same dotted names are used in YAML, on the command line, in code and in the run dir's `config.yaml`.

A YAML config is read strictly: a regular file (never a FIFO or device) of at most 1 MB, UTF-8, no anchors,
aliases or merge keys (an alias bomb never expands), no duplicate keys, and a mapping of sections at the top.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError, did_you_mean

# --- Enumerations: defined once here, imported everywhere else ------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")
"Weight dtypes a model can be loaded in."
DATA_FORMATS = ("alpaca", "sharegpt", "messages", "completions", "text")
"Record formats the data loader reads (data.format may also be auto)."
TEMPLATES = ("alpaca", "chatml", "llama3")
"Built-in prompt templates (data.template may also be auto, tokenizer or a .jinja file)."
TEMPLATE_CHOICES = ("auto", "tokenizer") + TEMPLATES
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"The linear layers LoRA adapts by default."
TARGET_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                  "down": "down_proj"}
"Short names a config may use: `targets: [q, k, v, o, gate, up, down]`."
EXPORT_FORMATS = ("hf", "peft", "mlx-lm", "gguf", "hf-base")
"What `mlxtune export --format` writes."
GGUF_OUTTYPES = ("f16", "q8_0")
"Weight types `mlxtune export --format gguf --outtype` writes: float16, or llama.cpp's 8-bit Q8_0."
SCHEDULES = ("cosine", "linear", "constant")
MEMORY_GUARD_MODES = ("warn", "refuse", "off")
TRACKERS = ("tensorboard", "wandb")
"Experiment trackers train.report_to can name."
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZE_GROUP_SIZES = (32, 64, 128)
GENERATION_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")
"What `train.eval_generate` scores (eval.generation_metrics), each 0-100, higher is better."
EARLY_STOPPING_METRICS = ("val_loss", "val_ppl") + GENERATION_METRICS + tuple(f"val_{m}" for m in GENERATION_METRICS)
"Names train.early_stopping_metric may take: the validation loss or perplexity (lower is better), or a metric."
MAX_CONFIG_BYTES = 1 << 20
"A YAML config larger than this is refused before it is read."


# --- Domains: what each field may hold, stated once, enforced by _check_section ----------------------------


def _show(value: Any, limit: int = 40) -> str:
    """A value as a message may quote it: YAML spelling for booleans and null, cut to `limit` characters."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    if isinstance(value, str):  # quoted and escaped (never a raw control character), then cut
        return repr(value[: limit - 2]) + ("..." if len(value) > limit - 2 else "")
    try:
        s = repr(value)
    except ValueError:  # e.g. a list holding an integer too long to print
        s = f"a {type(value).__name__}"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _is_control(c: str) -> bool:
    return ord(c) < 32 or ord(c) == 127


def _cut(s: str, limit: int = 60) -> str:
    """A user's string for a message unquoted (a flag, a key): control characters as '?', cut to `limit`."""
    cut = s if len(s) <= limit else s[: limit - 3] + "..."
    return "".join("?" if _is_control(c) else c for c in cut)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


@dataclass(frozen=True)
class Num:
    """A finite number (integer=True: an int, never a bool or 8.5) from lo to hi; *_open excludes that end."""

    lo: float
    hi: Optional[float] = None
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False
    text: str = ""

    def describe(self) -> str:
        if self.text:
            return self.text
        kind = "an integer" if self.integer else "a finite number"
        if self.hi is None:
            return f"{kind} {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        return (f"{kind} in {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}"
                f"{')' if self.hi_open else ']'}")

    def problem(self, key: str, v: Any) -> Optional[str]:
        ok = _is_int(v) if self.integer else _is_number(v)
        ok = ok and (v > self.lo if self.lo_open else v >= self.lo)
        ok = ok and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi))
        return None if ok else f"{key}: must be {self.describe()}, got {_show(v)}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (compared with their type: 4.0 is not the integer 4, true is not 1)."""

    choices: tuple

    def describe(self) -> str:
        return "one of " + ", ".join(_show(c).strip("'") for c in self.choices)

    def problem(self, key: str, v: Any) -> Optional[str]:
        if any(type(v) is type(c) and v == c for c in self.choices):
            return None
        hint = did_you_mean(v, [c for c in self.choices if isinstance(c, str)]) if isinstance(v, str) else ""
        return f"{key}: {_show(v)} is not {self.describe()}{hint}"


@dataclass(frozen=True)
class Text:
    """A string of at most `max_len` characters; path=True: no control characters; nonempty: not blank."""

    max_len: int = 4096
    path: bool = True
    nonempty: bool = False

    def describe(self) -> str:
        what = "a path without control characters" if self.path else "text"
        return f"{'a non-empty ' + what[2:] if self.nonempty else what}, at most {self.max_len} characters"

    def problem(self, key: str, v: Any) -> Optional[str]:
        at = next((i for i, c in enumerate(v) if _is_control(c)), None) if self.path and isinstance(v, str) else None
        if at is not None:
            return f"{key}: {_show(v)} holds the control character {v[at]!r} at position {at}; must be {self.describe()}"
        ok = isinstance(v, str) and len(v) <= self.max_len and not (self.nonempty and not v.strip())
        return None if ok else f"{key}: must be {self.describe()}, got {_show(v)}"


@dataclass(frozen=True)
class Template:
    """A built-in template name, or a .jinja / .j2 file."""

    def describe(self) -> str:
        return f"one of {', '.join(TEMPLATE_CHOICES)}, or a .jinja file"

    def problem(self, key: str, v: Any) -> Optional[str]:
        if isinstance(v, str) and (v in TEMPLATE_CHOICES or (v.endswith((".jinja", ".j2")) and
                                                             Text().problem(key, v) is None)):
            return None
        hint = did_you_mean(v, TEMPLATE_CHOICES) if isinstance(v, str) else ""
        return f"{key}: {_show(v)} is not {self.describe()}{hint}"


@dataclass(frozen=True)
class Names:
    """A list of distinct names (aliases resolved first); `item`: each name's own domain; `nonempty`."""

    item: Any
    nonempty: bool = True
    aliases: Optional[dict] = None

    def describe(self) -> str:
        return f"a {'non-empty ' if self.nonempty else ''}list of distinct names"

    def problem(self, key: str, v: Any) -> Optional[str]:
        if not isinstance(v, list) or (self.nonempty and not v):
            return f"{key}: must be {self.describe()}, got {_show(v)}"
        seen: dict = {}
        for i, name in enumerate(v):
            bad = self.item.problem(f"{key}[{i}]", name)
            if bad:
                return bad
            canon = (self.aliases or {}).get(name, name)
            if canon in seen:
                return f"{key}: {_show(name)} repeats {_show(v[seen[canon]])}; must be {self.describe()}"
            seen[canon] = i
        return None


@dataclass(frozen=True)
class Layers:
    """null, a count of last layers, or a non-empty list of distinct non-negative layer indices."""

    most: int = 4096

    def describe(self) -> str:
        return f"a count in [1, {self.most}] or a non-empty list of distinct layer indices in [0, {self.most - 1}]"

    def problem(self, key: str, v: Any) -> Optional[str]:
        if _is_int(v) and 1 <= v <= self.most:
            return None
        if isinstance(v, list) and v and all(_is_int(i) and 0 <= i < self.most for i in v) and len(set(v)) == len(v):
            return None
        return f"{key}: must be {self.describe()}, got {_show(v)}"


DOMAINS: dict[str, Any] = {
    "model.path": Text(),
    "model.dtype": OneOf(DTYPES),
    "model.quantize.bits": OneOf(QUANTIZE_BITS),
    "model.quantize.group_size": OneOf(QUANTIZE_GROUP_SIZES),
    "lora.rank": Num(1, 4096, integer=True),
    "lora.alpha": Num(0, 1_000_000, lo_open=True),
    "lora.dropout": Num(0, 1, hi_open=True),
    "lora.targets": Names(Text(max_len=200, nonempty=True), aliases=TARGET_ALIASES),
    "lora.layers": Layers(),
    "lora.init_adapter": Text(),
    "data.train": Text(),
    "data.valid": Text(),
    "data.test": Text(),
    "data.val_split": Num(0, 1, hi_open=True),
    "data.format": OneOf(("auto",) + DATA_FORMATS),
    "data.template": Template(),
    "data.system_prompt": Text(max_len=100_000, path=False),
    "data.max_length": Num(2, 1_048_576, integer=True),
    "data.packing": OneOf((True, False, "auto")),
    "data.train_on": OneOf(("responses", "all")),
    "data.on_bad_line": OneOf(("error", "skip")),
    "data.on_too_long": OneOf(("truncate", "error")),
    "train.epochs": Num(0, 10_000, lo_open=True),
    "train.max_steps": Num(1, 1_000_000_000, integer=True),
    "train.batch_size": Num(1, 65_536, integer=True),
    "train.grad_accumulation": Num(1, 65_536, integer=True),
    "train.learning_rate": Num(0, 1, lo_open=True, hi_open=True),
    "train.warmup_ratio": Num(0, 1, hi_open=True),
    "train.schedule": OneOf(SCHEDULES),
    "train.min_lr_ratio": Num(0, 1),
    "train.weight_decay": Num(0, 1000),
    "train.adam_beta1": Num(0, 1, hi_open=True),
    "train.adam_beta2": Num(0, 1, hi_open=True),
    "train.adam_eps": Num(0, 1, lo_open=True),
    "train.max_grad_norm": Num(0, 1e9, lo_open=True),
    "train.save_every": Num(0, 1_000_000_000, integer=True),
    "train.keep_last": Num(1, 1_000_000, integer=True),
    "train.eval_every": Num(0, 1_000_000_000, integer=True),
    "train.eval_batches": Num(1, 1_000_000_000, integer=True),
    "train.eval_generate": Num(0, 1_000_000, integer=True),
    "train.early_stopping_patience": Num(1, 1_000_000, integer=True),
    "train.early_stopping_metric": OneOf(EARLY_STOPPING_METRICS),
    "train.log_every": Num(1, 1_000_000_000, integer=True),
    "train.seed": Num(0, 2**63 - 1, integer=True),
    "train.memory_guard": OneOf(MEMORY_GUARD_MODES),
    "train.memory_limit_gb": Num(0, 1_048_576, lo_open=True,
                                 text="a positive number of GB (finite, at most 1048576)"),
    "train.report_to": Names(OneOf(TRACKERS), nonempty=False),
    "output_dir": Text(nonempty=True),
}
"Every checked field's domain by dotted name; each field's doc line ends with `describe()` of its entry."


def _check_section(obj: Any, prefix: str) -> None:
    """Raise ConfigError for the first field of the dataclass `obj` outside its domain (None: fine where Optional)."""
    hints = _hints(type(obj))
    for f in fields(obj):
        dom = DOMAINS.get(prefix + f.name)
        value = getattr(obj, f.name)
        if dom is None or (value is None and type(None) in typing.get_args(hints[f.name])):
            continue
        problem = dom.problem(prefix + f.name, value)
        if problem:
            raise ConfigError(problem)


# --- The sections ------------------------------------------------------------------------------------------


@dataclass
class QuantizeConfig:
    bits: int = 4
    "Bits per weight of the frozen base: one of 2, 3, 4, 5, 6, 8."
    group_size: int = 64
    "Weights per quantization group: one of 32, 64, 128."

    def __post_init__(self):
        _check_section(self, "model.quantize.")


@dataclass
class ModelConfig:
    path: str = ""
    "A local Hugging Face model dir, a .gguf file, or a hub id: a path without control characters, at most 4096 characters."
    dtype: Optional[str] = None
    "Weight dtype, null (as stored; GGUF: float16 on GPU, float32 on CPU) or one of float32, bfloat16, float16."
    quantize: Optional[QuantizeConfig] = None
    "Quantize the frozen base at load (QLoRA), e.g. {bits: 4, group_size: 64}; null keeps it dense."

    def __post_init__(self):
        _check_section(self, "model.")


@dataclass
class LoraConfig:
    rank: int = 16
    "LoRA rank r (at most the adapted layer's width, checked with the model): an integer in [1, 4096]."
    alpha: float = 32.0
    "LoRA alpha; the update is scaled by alpha / rank: a finite number in (0, 1000000]."
    dropout: float = 0.0
    "Dropout on the LoRA input during training: a finite number in [0, 1)."
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    "Linear layers to adapt (q_proj ... down_proj; short q, k, v, o, gate, up, down also work): a non-empty list of distinct names."
    layers: Optional[Union[int, list[int]]] = None
    "Which decoder layers, null for every one (a count n: the last n): a count in [1, 4096] or a non-empty list of distinct layer indices in [0, 4095]."
    init_adapter: Optional[str] = None
    "Continue from this adapter (run/adapter, PEFT or mlx-lm dir; its shape wins): a path without control characters, at most 4096 characters."

    def __post_init__(self):
        _check_section(self, "lora.")


@dataclass
class DataConfig:
    train: str = ""
    "Training data (a JSON/JSONL/Parquet file, a dir with train/valid/test files, a hub id): a path without control characters, at most 4096 characters."
    valid: Optional[str] = None
    "Validation data; default the dir's valid file, else `val_split` of train: a path without control characters, at most 4096 characters."
    test: Optional[str] = None
    "Test data for `mlxtune eval`; default the dir's test file: a path without control characters, at most 4096 characters."
    val_split: float = 0.1
    "Fraction of train held out for validation when no valid file is given (0 disables): a finite number in [0, 1)."
    format: str = "auto"
    "The record format: one of auto, alpaca, sharegpt, messages, completions, text."
    template: str = "auto"
    "auto (alpaca for Alpaca data, else the tokenizer's chat template): one of auto, tokenizer, alpaca, chatml, llama3, or a .jinja file."
    system_prompt: Optional[str] = None
    "A system prompt added to conversations that have none (null: the template's default): text, at most 100000 characters."
    max_length: int = 2048
    "Examples are truncated to this many tokens: an integer in [2, 1048576]."
    packing: Union[bool, str] = "auto"
    "true: pack examples into rows of max_length; false: length-bucketed; auto: the cheaper: one of true, false, auto."
    train_on: str = "responses"
    "responses: loss on assistant turns and their end-of-turn tokens only; all: every token: one of responses, all."
    on_bad_line: str = "error"
    "error: stop at the first malformed line; skip: drop it and report counts by reason: one of error, skip."
    shuffle: bool = True
    "Shuffle the order of batches every epoch (seeded by train.seed)."
    on_too_long: str = "truncate"
    "truncate: cut examples longer than max_length (counted and reported); error: bad lines: one of truncate, error."
    cache: bool = True
    "Cache tokenized files in $MLXTUNE_CACHE/data (default ~/.cache/mlxtune/data), keyed by content and settings."

    def __post_init__(self):
        _check_section(self, "data.")


@dataclass
class TrainConfig:
    epochs: float = 1.0
    "Passes over the training data (ignored when max_steps is set): a finite number in (0, 10000]."
    max_steps: Optional[int] = None
    "Stop after this many optimizer steps (overrides epochs), or null: an integer in [1, 1000000000]."
    batch_size: int = 4
    "Examples per micro-batch (with packing: rows of max_length tokens): an integer in [1, 65536]."
    grad_accumulation: int = 1
    "Micro-batches per optimizer step; gradients are token-weighted across them: an integer in [1, 65536]."
    learning_rate: float = 1e-4
    "Peak learning rate (learning_rate x weight_decay < 1): a finite number in (0, 1)."
    warmup_ratio: float = 0.03
    "Fraction of steps with linear warmup from 0 (< 1, so the last step is after warmup): a finite number in [0, 1)."
    schedule: str = "cosine"
    "The decay after warmup: one of cosine, linear, constant."
    min_lr_ratio: float = 0.0
    "The schedule decays to learning_rate * min_lr_ratio: a finite number in [0, 1]."
    weight_decay: float = 0.0
    "AdamW decoupled weight decay: a finite number in [0, 1000]."
    adam_beta1: float = 0.9
    "AdamW beta1: a finite number in [0, 1)."
    adam_beta2: float = 0.999
    "AdamW beta2: a finite number in [0, 1)."
    adam_eps: float = 1e-8
    "AdamW epsilon: a finite number in (0, 1]."
    max_grad_norm: Optional[float] = 1.0
    "Clip gradients to this global norm, or null (no clipping): a finite number in (0, 1000000000]."
    grad_checkpoint: bool = False
    "Recompute each decoder layer's activations in the backward pass (less memory, ~30% slower)."
    save_every: int = 100
    "Write a full-state checkpoint every N optimizer steps (0: only at the end): an integer in [0, 1000000000]."
    keep_last: int = 2
    "How many step checkpoints to keep: an integer in [1, 1000000]."
    eval_every: int = 100
    "Validate every N optimizer steps (0: only at the end): an integer in [0, 1000000000]."
    eval_batches: Optional[int] = None
    "Validation micro-batches per evaluation, or null (the whole split): an integer in [1, 1000000000]."
    eval_generate: int = 0
    "At each evaluation also generate for this many validation examples and score BLEU/ROUGE (0: off): an integer in [0, 1000000]."
    early_stopping_patience: Optional[int] = None
    "Stop when `early_stopping_metric` has not improved for this many evaluations, or null (off): an integer in [1, 1000000]."
    early_stopping_metric: str = "val_loss"
    ("val_loss, val_ppl (lower is better) or a generation metric (higher is better; needs eval_generate): one of "
     "val_loss, val_ppl, bleu, chrf, rouge1, rouge2, rougeL, exact_match, val_bleu, val_chrf, val_rouge1, val_rouge2, "
     "val_rougeL, val_exact_match.")
    log_every: int = 10
    "Report loss, learning rate, tokens/s and memory every N optimizer steps: an integer in [1, 1000000000]."
    seed: int = 0
    "Seed for LoRA initialization, dropout and data order: an integer in [0, 9223372036854775807]."
    compile: bool = True
    "Compile the train step with mx.compile."
    memory_guard: str = "warn"
    "Before training, compare the memory estimate with what is available: one of warn, refuse, off."
    memory_limit_gb: Optional[float] = None
    ("GPU memory cap during training (mx.set_memory_limit): above it, evaluation waits for the device, so inputs held by "
     "queued GPU work cannot pile up beyond the step's live set; slower (docs/TROUBLESHOOTING.md); null: MLX's default; "
     "else a positive number of GB (finite, at most 1048576).")
    report_to: list[str] = field(default_factory=list)
    "Experiment trackers to log to, tensorboard or wandb (optional extras: pip install 'mlxtune[wandb]'): a list of distinct names."

    def __post_init__(self):
        _check_section(self, "train.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    "The base model."
    lora: LoraConfig = field(default_factory=LoraConfig)
    "The adapter."
    data: DataConfig = field(default_factory=DataConfig)
    "Training and evaluation data."
    train: TrainConfig = field(default_factory=TrainConfig)
    "Optimization, schedule, checkpoints."
    output_dir: str = "runs/latest"
    "The run dir (config.yaml, adapters, checkpoints/, metrics.jsonl, loss.png): a non-empty path without control characters, at most 4096 characters."

    def __post_init__(self):
        _check_section(self, "")
        for rule in _CROSS_RULES:
            problem = rule(self)
            if problem:
                raise ConfigError(problem)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.dump(self.to_dict(), Dumper=_PlainDumper, sort_keys=False))


# --- Cross-field rules: each takes a Config whose fields are in their domains, returns a problem or None ----


def _early_stopping_needs_validation(c: Config) -> Optional[str]:
    """Patience (or generation at evaluation) needs a validation split; a single train file with neither
    data.valid nor data.val_split > 0 has none (a dir or hub dataset may bring its own, checked at load)."""
    d = c.data
    if d.valid is None and d.val_split == 0 and d.train and os.path.isfile(d.train):
        for name in ("early_stopping_patience", "eval_generate"):
            value = getattr(c.train, name)
            if value:
                return (f"train.{name}: {value} needs validation data, but data.train is one file and data.val_split "
                        f"is 0; set data.valid or data.val_split > 0")
    return None


def _metric_is_computed(c: Config) -> Optional[str]:
    """A generation metric exists only when evaluation generates (train.eval_generate > 0)."""
    name = c.train.early_stopping_metric
    if name.removeprefix("val_") in GENERATION_METRICS and not c.train.eval_generate:
        return (f"train.early_stopping_metric: {name!r} is a generation metric, computed only when "
                f"train.eval_generate > 0; set train.eval_generate or use val_loss")
    return None


def _decay_below_one(c: Config) -> Optional[str]:
    """Decoupled weight decay scales each weight by (1 - lr * wd): at >= 1 it flips or zeroes every weight."""
    lr, wd = c.train.learning_rate, c.train.weight_decay
    if lr * wd >= 1:
        return (f"train.weight_decay: {_show(wd)} x train.learning_rate {_show(lr)} must be below 1 (each step scales "
                f"the weights by 1 - learning_rate x weight_decay); lower one of them")
    return None


_CROSS_RULES = (_early_stopping_needs_validation, _metric_is_computed, _decay_below_one)
"The rules between fields (warmup needs none: warmup_ratio < 1 always leaves the last step after warmup)."


# ---------------------------------------------------------------------------------------------------------
# Resolution: defaults < YAML < overrides, coerced by field type.


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key, e.g. 'lora.rank', 'model.quantize.bits'."""
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        inner = _unwrap_optional(tp)
        name = prefix + f.name
        out.append(name)
        if _is_dataclass_type(inner):
            out.extend(all_keys(inner, name + "."))
    return out


def field_docs(cls=Config, prefix: str = "") -> dict[str, str]:
    """Dotted key → its one-line doc (the string literal under the field in this file)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[prefix + a.target.id] = str(b.value.value)
    hints = _hints(cls)
    for f in fields(cls):
        inner = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(inner):
            docs.update(field_docs(inner, prefix + f.name + "."))
    return docs


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _expected(where: str, what: str, value: Any, key: str) -> ConfigError:
    """`key: expected <what>, got <value>`, with the field's domain as the fix when it has one."""
    dom = DOMAINS.get(key)
    fix = f"; use {dom.describe()}" if dom is not None and not isinstance(dom, OneOf) else ""
    return ConfigError(f"{where}: expected {what}, got {_show(value)}{fix}")


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Coerce a YAML or CLI value to the field type `tp`, or raise ConfigError naming the key."""
    where = f"{source}: {key}" if source else key
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key, source)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty section (`lora:` with every line commented out): its defaults
            value = {}
        if not isinstance(value, dict):
            names = [f.name for f in fields(tp)]
            listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"{where}: expected a mapping of {listed}, got {_show(value)}")
        return _build(tp, value, key + ".", source)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = value.strip()
            value = _yaml_value(value, key) if value.startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _expected(where, "a list", value, key)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return _coerce_scalar(value, tp, key, where)


def _coerce_union(value: Any, tp, key: str, source: str) -> Any:
    """Optional[X] and Union[A, B]: null where allowed, else the first alternative that takes the value."""
    where = f"{source}: {key}" if source else key
    args = typing.get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if type(None) in args:
            return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a, key, source)
        except ConfigError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    names = " or ".join(_type_name(a) for a in args if a is not type(None))
    raise _expected(where, names, value, key)


def _coerce_scalar(value: Any, tp, key: str, where: str) -> Any:
    """bool, int, float and str from YAML values or CLI strings; booleans are never numbers, 8.5 never an int."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if _is_int(value) and value in (0, 1):
            return bool(value)
        raise _expected(where, "true or false", value, key)
    if tp is int:
        number = _number(value)
        if _is_int(number):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise _expected(where, "an integer", value, key)
    if tp is float:
        number = _number(value)
        if number is None:
            raise _expected(where, "a number", value, key)
        try:
            return float(number)
        except OverflowError:  # an integer beyond float range: out of every domain, say so there
            return math.inf
    if tp is str:
        if isinstance(value, str):
            return value
        if _is_int(value) or isinstance(value, (float, datetime.date)):
            return str(value)  # `output_dir: 2024-06-01` or `path: 123` as written
        raise _expected(where, "a string", value, key)
    return value


def _number(value: Any) -> Union[int, float, None]:
    """An int or float from a number or a numeric string (`1e-5`, `nan`), else None; booleans are not numbers."""
    if _is_int(value) or isinstance(value, float):
        return value
    if isinstance(value, str) and len(value) <= 100:
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            pass
    return None


def _build(cls, values: dict, prefix: str = "", source: str = ""):
    """Instantiate `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for k in values:
        if k not in names:
            full = prefix + str(k)
            where = f"{source}: " if source else ""
            if full in all_keys():  # `lora.rank: 4` at the top of a YAML file
                section, leaf = full.rsplit(".", 1)
                raise ConfigError(f"{where}{full!r} is a dotted key; in YAML nest it: {section}: {{{leaf}: ...}}")
            raise ConfigError(f"{where}unknown config key {_show(full, 60)}{did_you_mean(full, all_keys())}")
    kwargs = {}
    for f in fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], prefix + f.name, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if source and not str(e).startswith(source):
            raise ConfigError(f"{source}: {e}") from None
        raise


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; a section the YAML gave as a scalar or list is an error, not replaced."""
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            section = _cut(".".join(parts[: i + 1]))
            raise ConfigError(f"{section}: expected a mapping, got {_show(nxt)}; cannot set {_show(key, 60)} in it")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """`['--lora.rank', '32', '--train.learning_rate=2e-4']` → nested dict of raw values."""
    tree: dict = {}
    i = 0
    keys = set(all_keys())
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {_show(a, 60)}; overrides look like --lora.rank 32")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and _number(args[i + 1]) is None):
                raise ConfigError(f"{_cut(a)}: missing a value (e.g. {_cut(a)} VALUE)")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key not in keys:
            raise ConfigError(f"unknown option --{_cut(key)}{did_you_mean(key, keys)}")
        _set_dotted(tree, key, _yaml_value(raw, key) if raw.strip() else raw)
    return tree


# ---------------------------------------------------------------------------------------------------------
# Strict YAML: a bounded regular file, UTF-8, no anchors/aliases/merge keys, no duplicate keys.


class _Refused(yaml.MarkedYAMLError):
    """A YAML construct a config may not use (an anchor, alias, merge key or duplicate key)."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases as they are composed (an alias bomb never expands),
    merge keys and duplicate keys. A subclass: yaml.SafeLoader itself is left untouched."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(None, None, "anchors and aliases (&name, *name) are not allowed in a config; write the "
                           "value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(None, None, "merge keys (<<) are not allowed in a config; write the keys out",
                               key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first:
                    raise _Refused(None, None, f"duplicate key {_show(key, 60)} (first on line {first[key]}); "
                                   f"keep one", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base constructor says so
                break
        return super().construct_mapping(node, deep)


class _PlainDumper(yaml.SafeDumper):
    """Writes every value out: a config StrictLoader reads back holds no anchors or aliases."""

    def ignore_aliases(self, data):
        return True


def _parse_yaml(text: str) -> Any:
    """`text` through StrictLoader; YAMLError (with its mark), or ValueError / RecursionError, propagate."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def _yaml_problem(e: Exception, text: str) -> tuple[Optional[int], str]:
    """(line or None, one short sentence) for an error raised while parsing `text`."""
    if isinstance(e, RecursionError):
        return None, "nested too deeply"
    if isinstance(e, ValueError) and not isinstance(e, yaml.YAMLError):  # int("9" * 5000) refuses to parse
        return None, "an integer with too many digits" if "digits" in str(e) else f"a value cannot be read ({_cut(str(e))})"
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.reader.ReaderError):  # a control character: no mark, a position
        code = ord(e.character) if isinstance(e.character, str) else e.character
        return text[: e.position].count("\n") + 1, f"the control character #x{code:04x} is not allowed"
    problem = getattr(e, "problem", None) or str(e)
    return (mark.line + 1 if mark else None), " ".join(str(problem).split())[:120]


def _yaml_value(raw: str, key: str) -> Any:
    """One override value (`--lora.targets "[q, v]"`) read as YAML with the same rules as a file."""
    try:
        return _parse_yaml(raw)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        _, problem = _yaml_problem(e, raw)
        raise ConfigError(f"--{_cut(key)}: value {_show(raw)} is not valid YAML ({problem})") from None


def _short_path(path: Path, limit: int = 100) -> str:
    """A path for a message: its end (where the name is) cut to `limit`, control characters as '?'."""
    from .fsio import short_path

    return _cut(short_path(path, limit), limit)


def _read_config_text(path: Path) -> str:
    """The text of a YAML config: refused unless a regular file (a FIFO is never opened) of at most 1 MB in UTF-8."""
    name = _short_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{name}: config file not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{name}: cannot read the config ({getattr(e, 'strerror', None) or e})") from None
    from .fsio import file_kind

    kind = file_kind(st.st_mode)
    if kind == "a directory":
        raise ConfigError(f"{name}: is a directory, not a YAML config file; pass the .yaml file itself (see configs/)")
    if kind is not None:
        raise ConfigError(f"{name}: is not a regular file ({kind}); pass a .yaml file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{name}: {st.st_size} bytes is too large for a config (at most {MAX_CONFIG_BYTES}); "
                          f"pass the .yaml config, not a data or model file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{name}: too large for a config (more than {MAX_CONFIG_BYTES} bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{name}:{line}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None


def read_yaml_config(path: str | os.PathLike) -> dict:
    """A YAML config file as a nested dict of raw values, read strictly (see the module doc)."""
    path = Path(path)
    name = _short_path(path)
    text = _read_config_text(path)
    try:
        loaded = _parse_yaml(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        line, problem = _yaml_problem(e, text)
        at = f"{name}:{line}" if line else name
        verdict = problem if isinstance(e, _Refused) else f"not valid YAML ({problem})"
        raise ConfigError(f"{at}: {verdict}") from None
    if loaded is None:
        raise ConfigError(f"{name}: the config is empty; give at least model.path and data.train (see configs/)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{name}: expected a mapping of sections (model, lora, data, train, output_dir), "
                          f"got {_show(loaded)}")
    return loaded


def load_config(
    source: Union[None, str, os.PathLike, dict, Config] = None,
    overrides: Union[None, list[str], dict] = None,
    **kwargs: Any,
) -> Config:
    """Resolve a Config from defaults < `source` (YAML path, dict or Config) < `overrides` < kwargs.

    kwargs take dotted names with `__` or nested dicts: `load_config("c.yaml", lora={"rank": 32})`,
    `load_config("c.yaml", **{"train.max_steps": 10})`. Every value is checked against its domain and the
    cross-field rules; a problem raises one ConfigError naming the field, the value and the domain.
    """
    src_name = ""
    tree: dict = {}
    if isinstance(source, Config):
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = dict(source)
    elif source is not None:
        # Relative data/model paths in a config file resolve against the current dir, like the CLI.
        tree, src_name = read_yaml_config(source), _short_path(Path(source))
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        for k, v in _flatten_dotted(over).items():
            _set_dotted(tree, k, v)
    for k, v in kwargs.items():
        if isinstance(v, dict) and "." not in k:
            for kk, vv in _flatten_dotted(v).items():
                _set_dotted(tree, f"{k}.{kk}", vv)
        else:
            _set_dotted(tree, k.replace("__", "."), v)
    return _build(Config, tree, "", src_name)


def _flatten_dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        # model.quantize is a section whose value may legitimately be a dict: keep nested dicts as leaves
        # only when the key is not itself a section path.
        if isinstance(v, dict) and key in _SECTION_KEYS:
            out.update(_flatten_dotted(v, key + "."))
        else:
            out[key] = v
    return out


_SECTION_KEYS = {"model", "lora", "data", "train", "model.quantize"}
