"""One typed source of truth for configuration.

Every option is a dataclass field with a default and a one-line doc (the string literal under it). Values
resolve as defaults < YAML file < overrides (CLI `--lora.rank 32` or keyword arguments `lora={"rank": 32}`),
are coerced by the field's type (`1e-5` is a float), and an unknown key fails with the closest valid name.
The same dotted names are used in YAML, on the command line, in code and in the run dir's `config.yaml`.
"""

from __future__ import annotations

import dataclasses
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
EXPORT_FORMATS = ("hf", "peft", "mlx-lm", "gguf")
"What `mlxtune export --format` writes."
GGUF_OUTTYPES = ("f16", "q8_0")
"Weight types `mlxtune export --format gguf --outtype` writes: float16, or llama.cpp's 8-bit Q8_0."
SCHEDULES = ("cosine", "linear", "constant")
MEMORY_GUARD_MODES = ("warn", "refuse", "off")
TRACKERS = ("tensorboard", "wandb")
"Experiment trackers train.report_to can name."


@dataclass
class QuantizeConfig:
    bits: int = 4
    "Bits per weight of the frozen base (4 or 8)."
    group_size: int = 64
    "Weights per quantization group (32, 64 or 128)."

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise ConfigError(f"model.quantize.bits: {self.bits} is not supported; use 4 or 8")
        if self.group_size not in (32, 64, 128):
            raise ConfigError(f"model.quantize.group_size: {self.group_size} is not supported; use 32, 64 or 128")


@dataclass
class ModelConfig:
    path: str = ""
    "A local Hugging Face model dir, a .gguf file, or a hub id (fetched into the standard cache)."
    dtype: Optional[str] = None
    "Weight dtype: float32, bfloat16 or float16; default: as stored (GGUF: float16 on GPU, float32 on CPU)."
    quantize: Optional[QuantizeConfig] = None
    "Quantize the frozen base at load (QLoRA), e.g. {bits: 4, group_size: 64}; null keeps it dense."

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {self.dtype!r} is not one of float32, bfloat16, float16")


@dataclass
class LoraConfig:
    rank: int = 16
    "LoRA rank r."
    alpha: float = 32.0
    "LoRA alpha; the update is scaled by alpha / rank."
    dropout: float = 0.0
    "Dropout on the LoRA input during training."
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    "Linear layers to adapt (q_proj ... down_proj; short q, k, v, o, gate, up, down also work)."
    layers: Optional[Union[int, list[int]]] = None
    "null: every layer; an int n: the last n layers; a list: those layer indices."
    init_adapter: Optional[str] = None
    "Continue from this adapter (mlxtune run/adapter dir, PEFT dir or mlx-lm dir); its rank, alpha, targets, layers win."

    def __post_init__(self):
        if self.rank <= 0:
            raise ConfigError(f"lora.rank: must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets: must name at least one linear layer, e.g. [q_proj, v_proj]")


@dataclass
class DataConfig:
    train: str = ""
    "Training data: a JSON/JSONL/Parquet file, a dir with train/valid/test files, or a hub dataset id."
    valid: Optional[str] = None
    "Validation data; default: the dir's valid file, else `val_split` of train."
    test: Optional[str] = None
    "Test data for `mlxtune eval`; default: the dir's test file."
    val_split: float = 0.1
    "Fraction of train held out for validation when no valid file is given (0 disables)."
    format: str = "auto"
    "auto, alpaca, sharegpt, messages, completions or text."
    template: str = "auto"
    "auto (alpaca for Alpaca data, else the tokenizer's chat template), tokenizer, alpaca, chatml, llama3, or a .jinja file."
    system_prompt: Optional[str] = None
    "A system prompt added to conversations that have none (null: the template's default)."
    max_length: int = 2048
    "Examples are truncated to this many tokens."
    packing: Union[bool, str] = "auto"
    "true: pack examples into rows of max_length (each attends only to itself); false: length-bucketed; auto: the cheaper."
    train_on: str = "responses"
    "responses: loss on assistant turns and their end-of-turn tokens only; all: loss on every token."
    on_bad_line: str = "error"
    "error: stop at the first malformed line; skip: drop it and report counts by reason."
    shuffle: bool = True
    "Shuffle the order of batches every epoch (seeded by train.seed)."
    on_too_long: str = "truncate"
    "truncate: cut examples longer than max_length (counted and reported); error: treat them as bad lines."
    cache: bool = True
    "Cache tokenized files in $MLXTUNE_CACHE/data (default ~/.cache/mlxtune/data), keyed by content and settings."

    def __post_init__(self):
        if isinstance(self.packing, str) and self.packing != "auto":
            raise ConfigError(f"data.packing: expected true or false (or auto), got {self.packing!r}")
        if self.on_too_long not in ("truncate", "error"):
            raise ConfigError(f"data.on_too_long: {self.on_too_long!r} is not one of truncate, error")
        templates = TEMPLATE_CHOICES
        if self.template not in templates and not self.template.endswith((".jinja", ".j2")):
            raise ConfigError(f"data.template: {self.template!r} is not one of {', '.join(templates)} or a .jinja file"
                              f"{did_you_mean(self.template, templates)}")
        if not 0 <= self.val_split < 1:
            raise ConfigError(f"data.val_split: must be in [0, 1), got {self.val_split}")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length: must be at least 2, got {self.max_length}")
        if self.train_on not in ("responses", "all"):
            raise ConfigError(f"data.train_on: {self.train_on!r} is not one of responses, all")
        if self.on_bad_line not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_line: {self.on_bad_line!r} is not one of error, skip")
        formats = ("auto",) + DATA_FORMATS
        if self.format not in formats:
            raise ConfigError(f"data.format: {self.format!r} is not one of {', '.join(formats)}{did_you_mean(self.format, formats)}")


@dataclass
class TrainConfig:
    epochs: float = 1.0
    "Passes over the training data (ignored when max_steps is set)."
    max_steps: Optional[int] = None
    "Stop after this many optimizer steps (overrides epochs)."
    batch_size: int = 4
    "Examples per micro-batch (with packing: rows of max_length tokens)."
    grad_accumulation: int = 1
    "Micro-batches per optimizer step; gradients are token-weighted across them."
    learning_rate: float = 1e-4
    "Peak learning rate."
    warmup_ratio: float = 0.03
    "Fraction of steps with linear warmup from 0."
    schedule: str = "cosine"
    "cosine, linear or constant (after warmup)."
    min_lr_ratio: float = 0.0
    "The schedule decays to learning_rate * min_lr_ratio."
    weight_decay: float = 0.0
    "AdamW decoupled weight decay."
    adam_beta1: float = 0.9
    "AdamW beta1."
    adam_beta2: float = 0.999
    "AdamW beta2."
    adam_eps: float = 1e-8
    "AdamW epsilon."
    max_grad_norm: Optional[float] = 1.0
    "Clip gradients to this global norm (null: no clipping)."
    grad_checkpoint: bool = False
    "Recompute each decoder layer's activations in the backward pass (less memory, ~30% slower)."
    save_every: int = 100
    "Write a full-state checkpoint every N optimizer steps (0: only at the end)."
    keep_last: int = 2
    "How many step checkpoints to keep."
    eval_every: int = 100
    "Validate every N optimizer steps (0: only at the end)."
    eval_batches: Optional[int] = None
    "Validation micro-batches per evaluation (null: the whole split)."
    eval_generate: int = 0
    "At each evaluation also generate for this many validation examples and score BLEU/ROUGE (0: off)."
    early_stopping_patience: Optional[int] = None
    "Stop when `early_stopping_metric` has not improved for this many evaluations (null: off)."
    early_stopping_metric: str = "val_loss"
    "val_loss (lower is better) or a generation metric such as rougeL (higher is better)."
    log_every: int = 10
    "Report loss, learning rate, tokens/s and memory every N optimizer steps."
    seed: int = 0
    "Seed for LoRA initialization, dropout and data order."
    compile: bool = True
    "Compile the train step with mx.compile."
    memory_guard: str = "warn"
    "Before training, compare the memory estimate with what is available: warn, refuse or off."
    memory_limit_gb: Optional[float] = None
    ("GPU memory cap during training (mx.set_memory_limit): above it, evaluation waits for the device, so inputs held by "
     "queued GPU work cannot pile up beyond the step's live set; slower (docs/TROUBLESHOOTING.md); null: MLX's default.")
    report_to: list[str] = field(default_factory=list)
    "Experiment trackers to log to: tensorboard, wandb (each an optional extra: pip install 'mlxtune[wandb]')."

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size: must be at least 1, got {self.batch_size}")
        if self.grad_accumulation < 1:
            raise ConfigError(f"train.grad_accumulation: must be at least 1, got {self.grad_accumulation}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate: must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule: {self.schedule!r} is not one of cosine, linear, constant")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs: must be positive, got {self.epochs}")
        if self.memory_guard not in MEMORY_GUARD_MODES:
            raise ConfigError(f"train.memory_guard: {self.memory_guard!r} is not one of warn, refuse, off")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last: must be at least 1, got {self.keep_last}")
        for name in self.report_to:
            if name not in TRACKERS:
                raise ConfigError(f"train.report_to: {str(name)[:40]!r} is not one of {', '.join(TRACKERS)}"
                                  f"{did_you_mean(str(name), TRACKERS)}")
        if self.memory_limit_gb is not None and not 0 < self.memory_limit_gb < math.inf:
            raise ConfigError(f"train.memory_limit_gb: must be a positive number of GB (or null: MLX's default), "
                              f"got {self.memory_limit_gb}")


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
    "The run dir: config.yaml, adapters, checkpoints/, metrics.jsonl, loss.png."

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


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


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Coerce a YAML or CLI value to the field type `tp`, or raise ConfigError naming the key."""
    where = f"{source}: {key}" if source else key
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        # Try the non-None alternatives in a sensible order: int before list, etc.
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
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {', '.join(f.name for f in fields(tp))}, got {value!r}")
        return _build(tp, value, key + ".", source)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                value = yaml.safe_load(value)
            else:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, values: dict, prefix: str = "", source: str = ""):
    """Instantiate `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for k in values:
        if k not in names:
            full = prefix + str(k)
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}unknown config key {full!r}{did_you_mean(full, all_keys())}")
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


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
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
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --lora.rank 32")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _looks_numeric(args[i + 1])):
                raise ConfigError(f"--{key}: missing a value (e.g. --{key} VALUE)")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key not in keys:
            raise ConfigError(f"unknown option --{key}{did_you_mean(key, keys)}")
        _set_dotted(tree, key, yaml.safe_load(raw) if raw.strip() else raw)
    return tree


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config(
    source: Union[None, str, os.PathLike, dict, Config] = None,
    overrides: Union[None, list[str], dict] = None,
    **kwargs: Any,
) -> Config:
    """Resolve a Config from defaults < `source` (YAML path, dict or Config) < `overrides` < kwargs.

    kwargs take dotted names with `__` or nested dicts: `load_config("c.yaml", lora={"rank": 32})`,
    `load_config("c.yaml", **{"train.max_steps": 10})`.
    """
    src_name = ""
    tree: dict = {}
    if isinstance(source, Config):
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = dict(source)
    elif source is not None:
        path = Path(source)
        src_name = str(path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory, not a YAML config file; pass the .yaml file itself (see configs/)")
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train, output_dir)")
        tree = loaded
        # Relative data/model paths in a config file resolve against the current dir, like the CLI.
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
