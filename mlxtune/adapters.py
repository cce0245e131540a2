"""Adapter files: write mlxtune's own, read mlxtune / PEFT / mlx-lm adapters back into LoRA layers.

mlxtune's format (what a run dir holds at its root, and what `save_adapter` writes):

    adapters.safetensors   `model.layers.0.self_attn.q_proj.lora_a` (in, r), `... .lora_b` (r, out), float32
    adapter_config.json    {"format": "mlxtune-lora", "format_version": 1,
                            "base_model": {path, fingerprint, model_type, hidden_size, num_hidden_layers,
                                           quantization, dtype},
                            "rank", "alpha", "dropout", "targets", "layers", "wrapped"}

`layers` is stored resolved (explicit indices), `targets` with short names expanded (`q` -> `q_proj`), and
`base_model.quantization` is `{"bits", "group_size"}` when the adapter was trained on a base quantized at load
(QLoRA, `load(..., quantize=...)`), with `base_model.dtype` the base's float dtype, so fusing can rebuild the
exact function that was trained.

`read_adapter(path)` reads any of the three formats into one `AdapterSpec` (mlxtune names and layouts);
`load_adapter(model, path)` checks it against the model and applies it. Every mismatch found (files, format,
base, keys, shapes) is collected and reported in one AdapterError, and the model is untouched on error.

Formats read:
- mlxtune: the above (a run dir has the same two files at its root).
- PEFT: `adapter_model.safetensors` + `adapter_config.json` with `peft_type: LORA`; keys
  `base_model.model.<path>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), scaling lora_alpha / r
  (lora_alpha / sqrt(r) with use_rslora).
- mlx-lm: `adapters.safetensors` (our names and layouts) + `adapter_config.json` with `lora_parameters:
  {rank, scale, dropout, keys}` and `num_layers` (the last n layers; -1 = all); alpha = scale * rank.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .errors import AdapterError
from .lora import DEFAULT_TARGETS, adapter_weights, apply_lora, linear_dims, lora_modules, _resolve_targets

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "mlxtune-lora"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]

# Errors list at most this many keys per kind; the count says how many there are in all.
_MAX_LISTED = 8


@dataclass
class AdapterSpec:
    """A LoRA adapter read from disk, in mlxtune's names and layouts whatever format it came in."""

    format: str
    "mlxtune-lora, peft or mlx-lm."
    path: Path
    "The dir it was read from."
    rank: int
    alpha: float
    "The update is scaled by alpha / rank (converted from mlx-lm's scale or PEFT's rsLoRA)."
    dropout: float
    targets: list[str]
    "Module names or dotted suffixes, as apply_lora takes them."
    layers: Union[None, int, list[int]]
    "None: every layer; int n: the last n layers (mlx-lm's num_layers); list: those indices."
    weights: dict[str, mx.array]
    "`<module path>.lora_a` (in, r) and `.lora_b` (r, out)."
    base: dict = field(default_factory=dict)
    "What the adapter records about its base: path, fingerprint, model_type, hidden_size, num_hidden_layers, quantization."
    config: dict = field(default_factory=dict)
    "The adapter_config.json as read."

    @property
    def wrapped(self) -> list[str]:
        """Module paths that carry LoRA weights in the file."""
        return sorted({k.rsplit(".", 1)[0] for k in self.weights})

    def layer_indices(self) -> list[int]:
        """Decoder layer indices that carry LoRA weights in the file."""
        return sorted({_layer_index(p) for p in self.wrapped if _layer_index(p) is not None})


# ---------------------------------------------------------------------------------------------------------
# Saving


def save_adapter(
    model: nn.Module,
    out_dir: PathLike,
    *,
    base_path: Optional[PathLike],
    fingerprint: Optional[str],
    rank: int,
    alpha: float,
    dropout: float,
    targets: Optional[Sequence[str]],
    layers: Union[None, int, Sequence[int]],
) -> Path:
    """Write the model's LoRA weights and a self-describing config into `out_dir`; returns `out_dir`.

    Each file is written to a temp file in `out_dir` and renamed into place, weights first, so a crash leaves
    either the old pair or the new weights with the old config, never a half-written file. `rank`, `alpha`,
    `dropout`, `targets` and `layers` must describe the LoRA layers the model holds (checked).
    """
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("save_adapter: the model has no LoRA layers to save; call apply_lora(model, ...) first")
    target_names = _resolve_targets(targets)
    plan, problems = _plan(model, target_names, layers, ignore_lora=True)
    if set(plan) != set(mods):
        problems.append(
            f"the model's LoRA layers ({_listed(sorted(mods))}) are not the ones targets={target_names} "
            f"layers={layers} select ({_listed(sorted(plan))})"
        )
    for name, m in mods.items():
        if m.rank != rank or not math.isclose(m.alpha, float(alpha)) or not math.isclose(m.dropout, float(dropout)):
            problems.append(
                f"{name} has rank={m.rank} alpha={m.alpha:g} dropout={m.dropout:g}, not the rank={rank} "
                f"alpha={float(alpha):g} dropout={float(dropout):g} given"
            )
            break
    if problems:
        raise AdapterError(f"save_adapter: {'; '.join(problems)}")

    if base_path is not None and Path(base_path).expanduser().exists():
        base_path = Path(base_path).expanduser().resolve()  # a relative path would break fusing from elsewhere
    args = getattr(model, "args", None)
    quant = None
    for m in mods.values():
        if isinstance(m.linear, nn.QuantizedLinear):
            quant = {"bits": int(m.linear.bits), "group_size": int(m.linear.group_size)}
            break
    first = next(iter(mods.values())).linear
    dtype = (first.scales if isinstance(first, nn.QuantizedLinear) else first.weight).dtype
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": {
            "path": None if base_path is None else str(base_path),
            "fingerprint": fingerprint,
            "model_type": getattr(args, "model_type", None),
            "hidden_size": getattr(args, "hidden_size", None),
            "num_hidden_layers": len(model.layers),
            "quantization": quant,
            "dtype": str(dtype).rsplit(".", 1)[-1],
        },
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "targets": target_names,
        "layers": sorted({_layer_index(p) for p in plan}),
        "wrapped": sorted(mods),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float32) for k, v in adapter_weights(model).items()}
    atomic_save_safetensors(out / WEIGHTS_FILE, weights, metadata={"format": "mlx"})
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def atomic_save_safetensors(path: PathLike, arrays: dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    """mx.save_safetensors to a temp file beside `path`, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write JSON (indented, newline-terminated) to a temp file beside `path`, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_mode(path: str) -> None:
    """mkstemp makes 0600 files; give the final file the mode a plain open() would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_adapter(path: PathLike) -> AdapterSpec:
    """Read an mlxtune adapter or run dir, a PEFT LoRA dir or an mlx-lm adapter dir (detected from its config).

    `path` may also name one of the dir's files. Raises one AdapterError listing every problem found.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.name in (CONFIG_FILE, WEIGHTS_FILE, PEFT_WEIGHTS_FILE):
        p = p.parent
    if not p.exists():
        raise AdapterError(f"{p}: adapter path not found")
    if not p.is_dir():
        raise AdapterError(f"{p}: not an adapter dir (expected a dir with {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        problems = [f"missing {CONFIG_FILE}"]
        if not any((p / f).is_file() for f in (WEIGHTS_FILE, PEFT_WEIGHTS_FILE)):
            problems.append(f"missing {WEIGHTS_FILE} (or PEFT's {PEFT_WEIGHTS_FILE})")
        hint = (
            f"this run dir has checkpoints/ but no final adapter yet: finish it with `mlxtune train -c {p / 'config.yaml'} --resume`"
            if (p / "checkpoints").is_dir()
            else "expected an mlxtune run or adapter dir, a PEFT LoRA dir or an mlx-lm adapter dir"
        )
        raise AdapterError(f"{p}: not an adapter dir: {'; '.join(problems)} ({hint})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")

    if "format" in cfg:
        if cfg["format"] != FORMAT:
            raise AdapterError(
                f"{cfg_file}: unknown adapter format {cfg['format']!r}; mlxtune reads {FORMAT!r}, PEFT LoRA "
                "(peft_type: LORA) and mlx-lm LoRA (lora_parameters) adapters"
            )
        return _read_mlxtune(p, cfg)
    if "peft_type" in cfg:
        return _read_peft(p, cfg)
    if "lora_parameters" in cfg or "fine_tune_type" in cfg:
        return _read_mlx_lm(p, cfg)
    raise AdapterError(
        f"{cfg_file}: unknown adapter format: no 'format' (mlxtune), 'peft_type' (PEFT) or 'lora_parameters' "
        "(mlx-lm) key"
    )


def _load_weights(file: Path, problems: list[str]) -> dict[str, mx.array]:
    if not file.is_file():
        problems.append(f"missing {file.name}")
        return {}
    try:
        return dict(mx.load(str(file)))
    except Exception as e:  # a truncated or foreign file: say which and why
        problems.append(f"{file.name} could not be read ({e})")
        return {}


def _need(cfg: dict, key: str, kind, problems: list[str], where: str):
    v = cfg.get(key)
    if v is None or not isinstance(v, kind) or isinstance(v, bool):
        problems.append(f"{where}: '{key}' is missing or not a {getattr(kind, '__name__', 'number')} (got {v!r})")
        return None
    return v


def _raise(p: Path, problems: list[str]) -> None:
    if problems:
        raise AdapterError(f"{p}: cannot read adapter: {'; '.join(problems)}")


def _read_mlxtune(p: Path, cfg: dict) -> AdapterSpec:
    problems: list[str] = []
    where = CONFIG_FILE
    version = cfg.get("format_version")
    if not isinstance(version, int) or version < 1:
        problems.append(f"{where}: format_version {version!r} is not a positive integer")
    elif version > FORMAT_VERSION:
        problems.append(f"{where}: format_version {version} was written by a newer mlxtune (this one reads {FORMAT_VERSION}); upgrade mlxtune")
    rank = _need(cfg, "rank", int, problems, where)
    alpha = _need(cfg, "alpha", (int, float), problems, where)
    dropout = cfg.get("dropout", 0.0)
    targets = cfg.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append(f"{where}: 'targets' must be a non-empty list of module names (got {targets!r})")
    layers = cfg.get("layers")
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        problems.append(f"{where}: 'layers' must be null or a list of layer indices (got {layers!r})")
    base = cfg.get("base_model") or {}
    if not isinstance(base, dict):
        problems.append(f"{where}: 'base_model' must be an object (got {base!r})")
        base = {}
    weights = _load_weights(p / WEIGHTS_FILE, problems)
    _raise(p, problems)
    return AdapterSpec(FORMAT, p, rank, float(alpha), float(dropout or 0.0), targets, layers, weights, dict(base), cfg)


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def _read_peft(p: Path, cfg: dict) -> AdapterSpec:
    problems: list[str] = []
    where = f"{CONFIG_FILE} (PEFT)"
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{p / CONFIG_FILE}: PEFT adapter type {cfg.get('peft_type')!r} is not supported; mlxtune reads LORA adapters")
    rank = _need(cfg, "r", int, problems, where)
    lora_alpha = _need(cfg, "lora_alpha", (int, float), problems, where)
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if cfg.get(key):
            problems.append(f"{where}: {key}=true ({what}) is not supported")
    if cfg.get("bias", "none") not in (None, "none"):
        problems.append(f"{where}: bias={cfg['bias']!r} (trained biases) is not supported; only bias='none'")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{where}: a non-empty {key} (per-module ranks) is not supported")
    if cfg.get("modules_to_save"):
        problems.append(f"{where}: modules_to_save={cfg['modules_to_save']} (fully trained modules) is not supported")
    if cfg.get("layers_pattern") not in (None, "layers", ["layers"]):
        problems.append(f"{where}: layers_pattern={cfg['layers_pattern']!r} is not supported (Llama/Qwen2 use 'layers')")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    elif layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        problems.append(f"{where}: layers_to_transform must be null, an index or a list of indices (got {layers!r})")
        layers = None

    raw = _load_weights(p / PEFT_WEIGHTS_FILE, problems)
    if not (p / PEFT_WEIGHTS_FILE).is_file() and (p / "adapter_model.bin").is_file():
        problems.append("adapter_model.bin (pickle) is not read; re-save with safe_serialization=True")
    weights: dict[str, mx.array] = {}
    bad = []
    for k, v in raw.items():
        m = _PEFT_KEY.match(k)
        if not m or v.ndim != 2:
            bad.append(k)
            continue
        # PEFT: A (r, in), B (out, r); mlxtune: lora_a (in, r), lora_b (r, out).
        weights[f"{m['path']}.lora_{m['ab'].lower()}"] = v.T
    if bad:
        problems.append(f"{PEFT_WEIGHTS_FILE}: {len(bad)} key(s) that are not LoRA A/B weights: {_listed(bad)}")

    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        # A regex (or "all-linear"): take the modules that actually carry weights.
        targets = list(DEFAULT_TARGETS) if targets == "all-linear" else sorted({w.rsplit(".", 1)[-1] for w in _paths(weights)})
    if not targets or not isinstance(targets, list):
        problems.append(f"{where}: target_modules must name the adapted modules (got {cfg.get('target_modules')!r})")
    else:
        outside = [t for t in targets if t in ("lm_head", "embed_tokens") or t.endswith((".lm_head", ".embed_tokens"))]
        if outside:
            problems.append(f"{where}: LoRA on {', '.join(outside)} is not supported (only linear layers inside the decoder layers)")
    _raise(p, problems)
    alpha = float(lora_alpha) * (math.sqrt(rank) if cfg.get("use_rslora") else 1.0)
    base = {"path": cfg.get("base_model_name_or_path")}
    return AdapterSpec("peft", p, rank, alpha, float(cfg.get("lora_dropout") or 0.0), list(targets), layers, weights, base, cfg)


def _read_mlx_lm(p: Path, cfg: dict) -> AdapterSpec:
    problems: list[str] = []
    where = f"{CONFIG_FILE} (mlx-lm)"
    ftype = cfg.get("fine_tune_type", "lora")
    if ftype != "lora":
        raise AdapterError(f"{p / CONFIG_FILE}: mlx-lm fine_tune_type {ftype!r} is not supported; mlxtune reads LoRA adapters")
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        problems.append(f"{where}: 'lora_parameters' is missing (expected {{rank, scale, dropout, keys}})")
        params = {}
    rank = _need(params, "rank", int, problems, f"{where} lora_parameters")
    if "scale" not in params and "alpha" in params:
        problems.append(f"{where}: lora_parameters has 'alpha' but mlx-lm adapters use 'scale' (= alpha / rank)")
    scale = _need(params, "scale", (int, float), problems, f"{where} lora_parameters")
    num_layers = cfg.get("num_layers", 16)  # mlx-lm's default when absent
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        problems.append(f"{where}: num_layers must be an integer (got {num_layers!r})")
        num_layers = -1
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
        problems.append(f"{where}: lora_parameters.keys must be null or a list of module paths (got {keys!r})")
    weights = _load_weights(p / WEIGHTS_FILE, problems)
    others = [k for k in weights if not k.endswith((".lora_a", ".lora_b"))]
    if others:
        problems.append(f"{WEIGHTS_FILE}: {len(others)} key(s) that are not LoRA weights: {_listed(others)}")
    _raise(p, problems)
    weights = {k: v for k, v in weights.items() if k.endswith((".lora_a", ".lora_b"))}
    targets = list(keys) if keys else list(DEFAULT_TARGETS)
    layers = None if num_layers < 0 else num_layers
    base = {"path": cfg.get("model")}
    return AdapterSpec("mlx-lm", p, rank, float(scale) * rank, float(params.get("dropout") or 0.0), targets, layers, weights, base, cfg)


# ---------------------------------------------------------------------------------------------------------
# Applying


def load_adapter(model: nn.Module, path: Union[PathLike, AdapterSpec], *, check_fingerprint: bool = True) -> list[str]:
    """Apply LoRA as the adapter at `path` describes and load its weights; returns the wrapped module paths.

    Accepts an mlxtune adapter or run dir, a PEFT LoRA dir or an mlx-lm adapter dir (or an AdapterSpec
    from read_adapter). Everything is checked before the model is touched: the base it was trained on
    (model type, sizes, fingerprint when both sides know it), the targets and layers, every key and shape.
    All mismatches are reported in one AdapterError. The LoRA parameters are trainable afterwards, so
    training can continue from an imported adapter.
    """
    spec = path if isinstance(path, AdapterSpec) else read_adapter(path)
    problems = check_adapter(model, spec, check_fingerprint=check_fingerprint)
    if problems:
        raise AdapterError(f"{spec.path}: adapter does not fit the model ({len(problems)} problem(s)): {'; '.join(problems)}")
    plan, _ = _plan(model, spec.targets, spec.layers)
    layers = sorted({_layer_index(p) for p in plan})
    wrapped = apply_lora(model, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=spec.targets, layers=layers, verbose=False)
    assert set(wrapped) == set(plan), (sorted(wrapped), sorted(plan))
    model.load_weights([(k, v.astype(mx.float32)) for k, v in spec.weights.items()], strict=False)
    mx.eval(model.parameters())
    return wrapped


def check_adapter(model: nn.Module, spec: AdapterSpec, *, check_fingerprint: bool = True) -> list[str]:
    """Every way `spec` does not fit `model`, as one-line problems (empty: it fits)."""
    problems: list[str] = []
    if lora_modules(model):
        problems.append("the model already has LoRA layers; load the adapter into a fresh base model")
    args = getattr(model, "args", None)
    base = spec.base or {}
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        want, have = base.get(key), getattr(args, key, None)
        if want is not None and have is not None and want != have:
            problems.append(f"base {key} is {want!r} in the adapter but {have!r} in the model")
    src = getattr(model, "source", None) or {}
    want_fp, have_fp = base.get("fingerprint"), src.get("fingerprint") if isinstance(src, dict) else None
    if check_fingerprint and want_fp and have_fp and want_fp != have_fp:
        problems.append(
            f"base fingerprint {want_fp} (trained on {base.get('path')}) does not match the model's {have_fp} "
            f"(loaded from {src.get('path')}): the adapter was trained on a different base model"
        )
    plan, plan_problems = _plan(model, spec.targets, spec.layers, ignore_lora=True)
    problems += plan_problems
    expected: dict[str, tuple[int, ...]] = {}
    for path, (d_in, d_out) in plan.items():
        expected[f"{path}.lora_a"] = (d_in, spec.rank)
        expected[f"{path}.lora_b"] = (spec.rank, d_out)
    missing = sorted(set(expected) - set(spec.weights))
    unexpected = sorted(set(spec.weights) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    wrong = [
        f"{k} is {tuple(spec.weights[k].shape)}, model needs {expected[k]}"
        for k in sorted(set(expected) & set(spec.weights))
        if tuple(spec.weights[k].shape) != expected[k]
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_listed(wrong)}")
    return problems


def _plan(
    model: nn.Module, targets: Optional[Sequence[str]], layers: Union[None, int, Sequence[int]], ignore_lora: bool = False
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """The module paths apply_lora would wrap, with their (in, out) dims, without touching the model.

    Mirrors apply_lora's matching: a target matches a linear inside a decoder layer whose local path equals
    it or ends with `.target`. An int `layers` means the last n layers, clamped to the model (as mlx-lm does).
    """
    problems: list[str] = []
    names = _resolve_targets(targets)
    n = len(model.layers)
    if layers is None:
        chosen = set(range(n))
    elif isinstance(layers, int):
        chosen = set(range(max(n - layers, 0), n)) if layers > 0 else set(range(n))
    else:
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            problems.append(f"layer index(es) {bad} out of range for a model with {n} layers")
        chosen = {i % n for i in layers if -n <= i < n}
    linears: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if ignore_lora and name.endswith(".linear"):
            continue  # the base inside a LoRALinear: report the wrapper's path instead
        if ".layers." not in f".{name}":
            continue
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) or (ignore_lora and hasattr(m, "lora_a")):
            linears[name] = m
    plan: dict[str, tuple[int, int]] = {}
    matched = {t: False for t in names}
    for path, m in linears.items():
        idx_s, local = path.split(".layers.", 1)[1].split(".", 1)
        for t in names:
            if local == t or local.endswith("." + t):
                matched[t] = True
                if int(idx_s) in chosen:
                    plan[path] = linear_dims(m.linear if hasattr(m, "lora_a") else m)
                break
    unmatched = [t for t, ok in matched.items() if not ok]
    if unmatched:
        problems.append(f"target(s) {', '.join(unmatched)} match no linear layer in the model")
    return plan, problems


def _layer_index(path: str) -> Optional[int]:
    if ".layers." not in f".{path}":
        return None
    try:
        return int(path.split("layers.", 1)[1].split(".", 1)[0])
    except ValueError:
        return None


def _paths(weights: dict) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in weights})


def _listed(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
