"""Adapter files in every format, read and write, checked against the base model.

mlxtune's format (a run dir holds the same two files at its root):

    adapters.safetensors   `model.layers.0.self_attn.q_proj.lora_a` (in, r), `.lora_b` (r, out), float32;
                           metadata {"format": "mlx", "mlxtune_save_id": ID}
    adapter_config.json    {"format": "mlxtune-lora", "format_version": 1, "save_id": ID, "base_model": {path,
                            fingerprint, model_type, hidden_size, num_hidden_layers, quantization, dtype},
                            "rank", "alpha", "dropout", "targets", "layers" (indices), "wrapped"}

`base_model.quantization` ({"bits", "group_size"}, QLoRA) and `dtype` let fusing rebuild the trained function.

Writing goes through fsio. A dedicated dir (best/, an export) is written whole and swapped into place
(`replace=True`, `write_adapter_dir`). In a run root, which holds other files, each file is replaced atomically
and both carry one random save id: a save killed between them leaves ids that differ, which `read_adapter`
reports with the checkpoint to resume from (files without ids, from older versions, load as before).

`read_adapter(path)` reads mlxtune, PEFT (`adapter_model.safetensors`, `peft_type: LORA`; A (r, in), B (out, r);
lora_alpha / r, or / sqrt(r) with use_rslora) and mlx-lm adapters (`lora_parameters: {rank, scale, dropout,
keys}`, `num_layers` = a slice of the last layers: <= 0 or more than the model has = all) into one AdapterSpec
in mlxtune's names and layouts; NaN/inf or non-float weights are refused. PEFT / mlx-lm exports carry their base's
fingerprint and path in the safetensors metadata (BASE_FINGERPRINT_KEY, BASE_PATH_KEY), checked like mlxtune's.
`load_adapter(model, path)` checks it against the model (every problem in one AdapterError, the model untouched)
and applies it.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from . import fsio
from .config import DEFAULT_TARGETS
from .errors import AdapterError, MlxtuneError
from .lora import (Layers, adapter_weights, apply_lora, decoder_layers, layer_index, linear_dims, lora_modules,
                   plan_lora, resolve_layers, resolve_targets)

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "mlxtune-lora"
FORMAT_VERSION = 1
SAVE_ID_KEY = "mlxtune_save_id"
"The safetensors metadata key holding the save id that adapter_config.json's `save_id` must equal."
BASE_FINGERPRINT_KEY = "mlxtune_base_fingerprint"
BASE_PATH_KEY = "mlxtune_base_path"

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
        return sorted({layer_index(p) for p in self.wrapped if layer_index(p) is not None})


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_adapter(model: nn.Module, out_dir: PathLike, *, base_path: Optional[PathLike], fingerprint: Optional[str],
                 rank: int, alpha: float, dropout: float, targets: Optional[Sequence[str]], layers: Layers,
                 replace: bool = False, extra_files: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the model's LoRA weights and a self-describing config into `out_dir`; returns `out_dir`.

    `rank`, `alpha`, `dropout`, `targets` and `layers` must describe the LoRA layers the model holds (checked).
    replace=False (a run root, which holds other files): each file is replaced atomically, weights then config,
    both stamped with one save id, so an interrupted save is detected when read. replace=True (a dedicated dir
    such as best/): `out_dir` is rebuilt whole with the adapter and `extra_files` and swapped into place.
    `extra_files`: {file name: dict or list (written as JSON), str or bytes (as is)}, written beside the adapter.
    """
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("save_adapter: the model has no LoRA layers to save; call apply_lora(model, ...) first")
    target_names = resolve_targets(targets)
    problems: list[str] = []
    plan = _try(lambda: plan_lora(model, target_names, layers), problems) or []
    if not problems and set(plan) != set(mods):
        problems.append(f"the model's LoRA layers ({_listed(sorted(mods))}) are not the ones targets={target_names} "
                        f"layers={layers} select ({_listed(sorted(plan))})")
    odd = [(n, m) for n, m in mods.items() if m.rank != rank or not math.isclose(m.alpha, float(alpha))
           or not math.isclose(m.dropout, float(dropout))]
    if odd:
        n, m = odd[0]
        problems.append(f"{n} has rank={m.rank} alpha={m.alpha:g} dropout={m.dropout:g}, not the rank={rank} "
                        f"alpha={float(alpha):g} dropout={float(dropout):g} given")
    if problems:
        raise AdapterError(f"save_adapter: {'; '.join(problems)}")
    save_id = secrets.token_hex(8)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "save_id": save_id,
              "base_model": _base_record(model, mods, base_path, fingerprint),
              "rank": int(rank), "alpha": float(alpha), "dropout": float(dropout), "targets": target_names,
              "layers": sorted({layer_index(p) for p in plan}), "wrapped": sorted(mods)}
    weights = {k: v.astype(mx.float32) for k, v in adapter_weights(model).items()}
    metadata = {"format": "mlx", SAVE_ID_KEY: save_id}
    out = Path(out_dir)
    if replace:
        return write_adapter_dir(out, weights, config, metadata=metadata, extra_files=extra_files, overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    fsio.save_safetensors(out / WEIGHTS_FILE, weights, metadata=metadata)
    fsio.write_json(out / CONFIG_FILE, config)
    for name, content in (extra_files or {}).items():
        _write_extra(out / name, content)
    return out


def _base_record(model: nn.Module, mods: dict, base_path: Optional[PathLike], fingerprint: Optional[str]) -> dict:
    """adapter_config.json's base_model: what fusing needs to rebuild the base the adapter was trained on."""
    if base_path is not None and Path(base_path).expanduser().exists():
        base_path = Path(base_path).expanduser().resolve()  # a relative path would break fusing from elsewhere
    args = getattr(model, "args", None)
    quantized = [m.linear for m in mods.values() if isinstance(m.linear, nn.QuantizedLinear)]
    quant = {"bits": int(quantized[0].bits), "group_size": int(quantized[0].group_size)} if quantized else None
    first = next(iter(mods.values())).linear
    dtype = (first.scales if isinstance(first, nn.QuantizedLinear) else first.weight).dtype
    return {"path": None if base_path is None else str(base_path), "fingerprint": fingerprint,
            "model_type": getattr(args, "model_type", None), "hidden_size": getattr(args, "hidden_size", None),
            "num_hidden_layers": len(decoder_layers(model)), "quantization": quant, "dtype": str(dtype).rsplit(".", 1)[-1]}


def write_adapter_dir(out_dir: PathLike, weights: Mapping[str, mx.array], config: Mapping[str, Any], *,
                      weights_file: str = WEIGHTS_FILE, metadata: Optional[Mapping[str, str]] = None,
                      extra_files: Optional[Mapping[str, Any]] = None, overwrite: bool = False,
                      fill: Optional[Callable[[Path], Any]] = None) -> Path:
    """Write an adapter dir in any format (weights, adapter_config.json, extra files, then `fill(temp dir)` for
    anything else, such as a base model) as ONE directory swap (fsio.atomic_dir): a kill leaves the old dir or
    the new one, never a mix. Returns `out_dir`. Without `overwrite` a non-empty `out_dir` is OutputExistsError."""
    out = Path(out_dir)
    with fsio.atomic_dir(out, overwrite=overwrite) as tmp:
        fsio.save_safetensors(tmp / weights_file, weights, metadata=metadata)
        fsio.write_json(tmp / CONFIG_FILE, dict(config))
        for name, content in (extra_files or {}).items():
            _write_extra(tmp / name, content)
        if fill is not None:
            fill(tmp)
    return out


def _write_extra(path: Path, content: Any) -> None:
    (fsio.write_bytes if isinstance(content, (str, bytes)) else fsio.write_json)(path, content)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_adapter(path: PathLike) -> AdapterSpec:
    """Read an mlxtune adapter or run dir, a PEFT LoRA dir or an mlx-lm adapter dir (detected from its config).

    `path` may also name one of the dir's files. Raises one AdapterError listing every problem found.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.name in (CONFIG_FILE, WEIGHTS_FILE, PEFT_WEIGHTS_FILE):
        p = p.parent
    try:
        fsio.recover(p)  # a dir swap (best/, an export) killed between its renames: put the old copy back
    except OSError:
        pass  # a read-only place: nothing to recover there
    if not p.exists():
        raise AdapterError(f"{p}: adapter path not found")
    if not p.is_dir():
        raise AdapterError(f"{p}: not an adapter dir (expected a dir with {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        problems = [f"missing {CONFIG_FILE}"]
        if not any((p / f).is_file() for f in (WEIGHTS_FILE, PEFT_WEIGHTS_FILE)):
            problems.append(f"missing {WEIGHTS_FILE} (or PEFT's {PEFT_WEIGHTS_FILE})")
        hint = (f"this run dir has checkpoints/ but no final adapter yet: finish it with `mlxtune train -c "
                f"{p / 'config.yaml'} --resume`" if (p / "checkpoints").is_dir()
                else "expected an mlxtune run or adapter dir, a PEFT LoRA dir or an mlx-lm adapter dir")
        raise AdapterError(f"{p}: not an adapter dir: {'; '.join(problems)} ({hint})")
    cfg = fsio.read_json_object(cfg_file, AdapterError)

    if cfg.get("format", FORMAT) != FORMAT:
        raise AdapterError(f"{cfg_file}: unknown adapter format {cfg['format']!r}; mlxtune reads {FORMAT!r}, PEFT "
                           "LoRA (peft_type: LORA) and mlx-lm LoRA (lora_parameters) adapters")
    for key, reader in (("format", _read_mlxtune), ("peft_type", _read_peft), ("lora_parameters", _read_mlx_lm),
                        ("fine_tune_type", _read_mlx_lm)):
        if key in cfg:
            return reader(p, cfg)
    raise AdapterError(f"{cfg_file}: unknown adapter format: no 'format' (mlxtune), 'peft_type' (PEFT) or "
                       "'lora_parameters' (mlx-lm) key")


def _load_weights(file: Path, problems: list[str]) -> tuple[dict[str, mx.array], dict]:
    """(arrays, metadata); ({}, {}) with a problem when the file is missing or unreadable; non-finite refused."""
    if not file.is_file():
        problems.append(f"missing {file.name}")
        return {}, {}
    try:
        arrays, meta = mx.load(str(file), return_metadata=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        problems.append(f"{file.name} could not be read ({e})")
        return {}, {}
    check_finite(arrays, file)
    return dict(arrays), dict(meta or {})


def check_finite(weights: Mapping[str, mx.array], where: Any) -> None:
    """Refuse weights that are not float or hold NaN or inf (a diverged or corrupt save): one AdapterError naming
    `where` and the first bad tensor. Used for every adapter read and every checkpoint resumed."""
    ints = [k for k in sorted(weights) if not mx.issubdtype(weights[k].dtype, mx.floating)]
    bad = ints or [k for k in sorted(weights) if not mx.all(mx.isfinite(weights[k])).item()]
    if bad:
        what = f"is {str(weights[bad[0]].dtype).rsplit('.', 1)[-1]}, not a float weight" if ints else "holds NaN or inf"
        raise AdapterError(f"{where}: {bad[0][:80]} {what} ({len(bad)} such tensor(s)); the weights diverged or the "
                           "file is corrupt: use an earlier checkpoint or train again")


def _check_pair(p: Path, cfg: dict, meta: dict) -> None:
    """Refuse weights and config written by different saves (a save killed between its two files)."""
    wid, cid = meta.get(SAVE_ID_KEY), cfg.get("save_id")
    if wid is None or wid == cid:
        return  # written before save ids existed, or by another tool: nothing to compare
    steps = sorted(c for c in (p / "checkpoints").glob("step_*") if (c / "state.json").is_file()) if (p / "checkpoints").is_dir() else []
    fix = (f"resume the run from its latest checkpoint to write it again: `mlxtune train -c {p / 'config.yaml'} --resume {steps[-1]}`"
           if steps else "write the adapter again (save_adapter)")
    raise AdapterError(f"{p}: {WEIGHTS_FILE} (save {wid}) and {CONFIG_FILE} (save {cid or 'none'}) come from different "
                       f"saves: the save was interrupted between the two files; {fix}")


def _need(cfg: dict, key: str, kind, problems: list[str], where: str):
    v = cfg.get(key)
    if v is None or not isinstance(v, kind) or isinstance(v, bool):
        problems.append(f"{where}: '{key}' is missing or not a {getattr(kind, '__name__', 'number')} (got {v!r})")
        return None
    return v


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


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
    if layers is not None and not _ints(layers):
        problems.append(f"{where}: 'layers' must be null or a list of layer indices (got {layers!r})")
    base = cfg.get("base_model") or {}
    if not isinstance(base, dict):
        problems.append(f"{where}: 'base_model' must be an object (got {base!r})")
        base = {}
    weights, meta = _load_weights(p / WEIGHTS_FILE, problems)
    _raise(p, problems)
    _check_pair(p, cfg, meta)
    return AdapterSpec(FORMAT, p, rank, float(alpha), float(dropout or 0.0), targets, layers, weights, dict(base), cfg)


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def _read_peft(p: Path, cfg: dict) -> AdapterSpec:
    problems: list[str] = []
    where = f"{CONFIG_FILE} (PEFT)"
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{p / CONFIG_FILE}: PEFT adapter type {cfg.get('peft_type')!r} is not supported; mlxtune reads LORA adapters")
    rank = _need(cfg, "r", int, problems, where)
    lora_alpha = _need(cfg, "lora_alpha", (int, float), problems, where)
    for key, bad, why in (("use_dora", True, "DoRA"), ("fan_in_fan_out", True, "Conv1D layers"),
                          ("rank_pattern", True, "per-module ranks"), ("alpha_pattern", True, "per-module ranks"),
                          ("modules_to_save", True, "fully trained modules"), ("bias", "none", "trained biases"),
                          ("layers_pattern", "layers", "Llama/Qwen2 use 'layers'")):
        v = cfg.get(key)
        if (v and bad is True) or (bad is not True and v not in (None, bad, [bad])):
            problems.append(f"{where}: {key}={v!r} is not supported ({why})")
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if layers is not None and not _ints(layers):
        problems.append(f"{where}: layers_to_transform must be null, an index or a list of indices (got {layers!r})")
        layers = None

    raw, meta = _load_weights(p / PEFT_WEIGHTS_FILE, problems)
    if not (p / PEFT_WEIGHTS_FILE).is_file() and (p / "adapter_model.bin").is_file():
        problems.append("adapter_model.bin (pickle) is not read; re-save with safe_serialization=True")
    matches = {k: _PEFT_KEY.match(k) for k in raw}
    bad = [k for k, m in matches.items() if not m or raw[k].ndim != 2]
    # PEFT: A (r, in), B (out, r); mlxtune: lora_a (in, r), lora_b (r, out).
    weights = {f"{m['path']}.lora_{m['ab'].lower()}": raw[k].T for k, m in matches.items() if k not in bad}
    if bad:
        problems.append(f"{PEFT_WEIGHTS_FILE}: {len(bad)} key(s) that are not LoRA A/B weights: {_listed(bad)}")

    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        # A regex (or "all-linear"): take the modules that actually carry weights.
        targets = list(DEFAULT_TARGETS) if targets == "all-linear" else sorted({k.rsplit(".", 2)[-2] for k in weights})
    if not targets or not isinstance(targets, list):
        problems.append(f"{where}: target_modules must name the adapted modules (got {cfg.get('target_modules')!r})")
    else:
        outside = [t for t in targets if t in ("lm_head", "embed_tokens") or t.endswith((".lm_head", ".embed_tokens"))]
        if outside:
            problems.append(f"{where}: LoRA on {', '.join(outside)} is not supported (only linear layers inside the decoder layers)")
    _raise(p, problems)
    alpha = float(lora_alpha) * (math.sqrt(rank) if cfg.get("use_rslora") else 1.0)
    base = {"path": cfg.get("base_model_name_or_path"), "fingerprint": meta.get(BASE_FINGERPRINT_KEY)}  # export's stamp
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
    weights, meta = _load_weights(p / WEIGHTS_FILE, problems)
    others = [k for k in weights if not k.endswith((".lora_a", ".lora_b"))]
    if others:
        problems.append(f"{WEIGHTS_FILE}: {len(others)} key(s) that are not LoRA weights: {_listed(others)}")
    _raise(p, problems)
    targets = list(keys) if keys else list(DEFAULT_TARGETS)
    layers = None if num_layers <= 0 else num_layers  # mlx-lm slices layers[-max(n, 0):]: <= 0 is every layer
    base = {"path": cfg.get("model"), "fingerprint": meta.get(BASE_FINGERPRINT_KEY)}  # stamped by mlxtune's export
    return AdapterSpec("mlx-lm", p, rank, float(scale) * rank, float(params.get("dropout") or 0.0), targets, layers, weights, base, cfg)


# ---------------------------------------------------------------------------------------------------------
# Applying


def load_adapter(model: nn.Module, path: Union[PathLike, AdapterSpec], *, check_fingerprint: bool = True) -> list[str]:
    """Apply LoRA as the adapter at `path` (any format read_adapter reads, or an AdapterSpec) describes and load
    its weights; returns the wrapped paths. Everything is checked first (base model type, sizes, fingerprint when
    both sides know it, targets, layers, keys, shapes; one AdapterError). The LoRA weights stay trainable."""
    spec = path if isinstance(path, AdapterSpec) else read_adapter(path)
    problems = check_adapter(model, spec, check_fingerprint=check_fingerprint)
    if problems:
        raise AdapterError(f"{spec.path}: adapter does not fit the model ({len(problems)} problem(s)): {'; '.join(problems)}")
    wrapped = apply_lora(model, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=spec.targets,
                         layers=_spec_layers(spec, len(decoder_layers(model))), verbose=False)
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
    legacy = src.get("legacy_fingerprints", ()) if isinstance(src, dict) else ()  # see loading.py
    if check_fingerprint and want_fp and have_fp and want_fp != have_fp and want_fp not in legacy:
        problems.append(f"base fingerprint {want_fp} (trained on {base.get('path')}) does not match the model's "
                        f"{have_fp} (loaded from {src.get('path')}): the adapter was trained on a different base model")
    modules = dict(model.named_modules())
    expected: dict[str, tuple[int, ...]] = {}
    for path in _planned(model, spec, problems):
        d_in, d_out = linear_dims(modules[path])
        expected[f"{path}.lora_a"] = (d_in, spec.rank)
        expected[f"{path}.lora_b"] = (spec.rank, d_out)
    missing = sorted(set(expected) - set(spec.weights))
    unexpected = sorted(set(spec.weights) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    wrong = [f"{k} is {tuple(spec.weights[k].shape)}, model needs {expected[k]}"
             for k in sorted(set(expected) & set(spec.weights)) if tuple(spec.weights[k].shape) != expected[k]]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_listed(wrong)}")
    return problems


def _spec_layers(spec: AdapterSpec, n_layers: int) -> Layers:
    """The spec's layers in plan_lora's terms: mlx-lm's num_layers is a slice, so more than the model has = all."""
    if spec.format == "mlx-lm" and isinstance(spec.layers, int) and spec.layers > n_layers:
        return None
    return spec.layers


def _planned(model: nn.Module, spec: AdapterSpec, problems: list[str]) -> list[str]:
    """plan_lora for the spec; layer and target problems are both collected (not only the first)."""
    n = len(decoder_layers(model))
    layers = _spec_layers(spec, n)
    if _try(lambda: resolve_layers(layers, n), problems) is None:  # report a bad layer and a bad target together
        layers = [i for i in layers if -n <= i < n] if isinstance(layers, list) else None
    return _try(lambda: plan_lora(model, spec.targets, layers), problems) or []


def _try(fn, problems: list[str]):
    """fn(), or None with its MlxtuneError's message appended to `problems`."""
    try:
        return fn()
    except MlxtuneError as e:
        problems.append(str(e))
        return None


def _listed(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
