"""Load a base model (Hugging Face dir, GGUF file or hub id) into `Model` + tokenizer; save a model as a HF dir.

    model, tokenizer = load("path/to/hf-dir" | "model.gguf" | "org/name", dtype="float32",
                            quantize={"bits": 4, "group_size": 64})
    save_model(model, tokenizer, "out/fused")

Loading a HF dir: `config.json` (transformers 4 and 5 dialects, via ModelArgs.from_hf_config), single or
sharded safetensors (`model.safetensors.index.json`) read with `mx.load`, `model.sanitize`, then a strict check
that reports every missing, unexpected or mis-shaped weight in one error. Only safetensors are read: pickled
`.bin`/`.pth` files can run code and are refused, and so is remote code. mlx-lm's quantized dirs
(`"quantization"` in config.json) load as quantized layers.

`model.source = {"path", "fingerprint"}`: the fingerprint is a cheap hash of the float weights as stored
(names, shapes and a strided sample of values), taken before any dtype cast or quantization, so an adapter can
tell whether it is being put on the base it was trained on.

Saving writes what transformers and mlx-lm load: sharded safetensors (`metadata={"format": "pt"}`) + index,
`config.json` in both dialects, the tokenizer and `generation_config.json`, into a temp dir renamed at the end.
LoRA layers are merged into the saved weights (the model in memory is left as it is); quantized layers are
dequantized unless `dequantize=False` (then the dir is in mlx-lm's quantized format).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import QuantizeConfig
from .errors import ConfigError, ModelLoadError, MlxtuneError
from .model import Model, ModelArgs

DTYPES = ("float32", "bfloat16", "float16")
# Files fetched for a hub id: never pickles (*.bin, *.pth) or code (*.py).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Tokens that end a turn or a document; any the tokenizer has go into generation_config.json's eos_token_id.
END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>")
DEFAULT_SHARD_BYTES = 5 * 2**30


# ---------------------------------------------------------------------------------------------------------
# Loading


def load(
    path: Union[str, os.PathLike],
    adapter: Optional[Union[str, os.PathLike]] = None,
    dtype: Optional[str] = None,
    quantize: Union[None, dict, QuantizeConfig] = None,
    *,
    tokenizer: bool = True,
    keep_quantized: bool = False,
) -> tuple[Model, Any]:
    """Load a base model and its tokenizer; the model is in eval mode with `model.source` set
    (`{"path": absolute local path or the hub id, "fingerprint": fingerprint(weights as stored)}`).

    path: a local HF model dir, a `.gguf` file, or a hub id (`org/name`, fetched into the HF cache).
    adapter: an adapter dir or run dir to apply (see adapters.load_adapter).
    dtype: float32, bfloat16 or float16; None keeps the stored dtype (GGUF: gguf.default_dtype()).
    quantize: {"bits": 4, "group_size": 64} or a QuantizeConfig: quantize the frozen base (QLoRA).
    tokenizer: False skips the tokenizer (returns None for it), for weights-only dirs.
    keep_quantized: GGUF only: keep Q4_0/Q4_1/Q8_0 tensors quantized (group 32) instead of dequantizing.
    """
    dtype = _check_dtype(dtype)
    qcfg = _check_quantize(quantize)
    src = resolve_path(path)
    is_gguf = src.is_file() and src.suffix.lower() == ".gguf"
    if is_gguf:
        model, fp, metadata = _load_gguf(src, dtype, keep_quantized)
    elif src.is_file():
        raise ModelLoadError(f"{src}: not a model dir or .gguf file; pass the directory that holds config.json")
    else:
        if keep_quantized:
            raise ConfigError("keep_quantized applies to GGUF files only; use quantize={bits, group_size} for a HF dir")
        if tokenizer:
            _require_tokenizer_files(src)  # before the weights: fail fast
        model, fp = _load_hf_dir(src, dtype)
    if qcfg is not None:
        quantize_model(model, qcfg)
    mx.eval(model.parameters())
    model.eval()
    # A plain attribute, outside the module tree (a dict attribute would become part of model.parameters()).
    source = os.path.abspath(src) if Path(path).expanduser().exists() else str(path)
    object.__setattr__(model, "source", {"path": source, "fingerprint": fp})
    tok = None
    if tokenizer:
        if is_gguf:
            from .gguf import gguf_tokenizer

            tok = gguf_tokenizer(src, metadata)
        else:
            tok = load_tokenizer(src)
    if adapter is not None:
        from .adapters import load_adapter

        load_adapter(model, adapter)
    return model, tok


def resolve_path(path: Union[str, os.PathLike]) -> Path:
    """A local path as is; a hub id (`org/name`) → its snapshot dir (config, safetensors, tokenizer only)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if s.lower().endswith(".gguf") or s.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        raise ModelLoadError(f"model path {s!r} does not exist; pass a local HF model dir, a .gguf file or a hub id like org/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, network error
        reason = type(e).__name__
        raise ModelLoadError(
            f"{s!r} is not a local path, and it cannot be fetched from the Hugging Face hub (hub unreachable, "
            f"offline, or no such repo: {reason}); download it where the hub is reachable "
            f"(`hf download {s} --local-dir DIR`) and pass the local dir: model.path=DIR"
        ) from None


def _check_dtype(dtype: Optional[str]) -> Optional[str]:
    if dtype is None:
        return None
    if isinstance(dtype, mx.Dtype):
        dtype = str(dtype).rsplit(".", 1)[-1]
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def _check_quantize(quantize) -> Optional[QuantizeConfig]:
    if quantize is None or isinstance(quantize, QuantizeConfig):
        return quantize
    if isinstance(quantize, Mapping):
        unknown = set(quantize) - {"bits", "group_size"}
        if unknown:
            raise ConfigError(f"model.quantize: unknown key(s) {', '.join(sorted(unknown))}; use bits and group_size")
        return QuantizeConfig(**quantize)
    raise ConfigError(f"model.quantize: expected {{bits, group_size}} or null, got {quantize!r}")


def read_config(model_dir: Path) -> dict:
    """config.json as a dict, with one clear error for a missing or malformed file."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        hint = " (this looks like a GGUF dir: pass the .gguf file itself)" if any(model_dir.glob("*.gguf")) else ""
        raise ModelLoadError(f"{model_dir}: no config.json; pass a Hugging Face model dir{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg_path}: expected a JSON object")
    return config


def _load_hf_dir(model_dir: Path, dtype: Optional[str]) -> tuple[Model, str]:
    config = read_config(model_dir)
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") and "quantization" not in config:
        raise ModelLoadError(
            f"{model_dir / 'config.json'}: pre-quantized checkpoints (quant_method={qc.get('quant_method')!r}) are not "
            "supported; load the unquantized model and set model.quantize"
        )
    args = ModelArgs.from_hf_config(config, source=str(model_dir / "config.json"))
    weights, origin = read_safetensors(model_dir)
    model = Model(args)
    quantization = config.get("quantization")
    if quantization:
        _quantize_like(model, quantization, weights, model_dir / "config.json")
    weights = model.sanitize(weights)
    check_weights(model, weights, origin, model_dir)
    fp = fingerprint(weights, quantization)
    model.load_weights(list(_cast(weights, dtype).items()), strict=True)
    return model, fp


def _load_gguf(path: Path, dtype: Optional[str], keep_quantized: bool) -> tuple[Model, str, dict]:
    from .gguf import read_gguf

    contents = read_gguf(path, dtype=dtype, keep_quantized=keep_quantized)
    model = Model(ModelArgs.from_hf_config(contents.config, source=str(path)))
    if contents.quantization:
        _quantize_like(model, contents.quantization, contents.weights, path)
    weights = model.sanitize(contents.weights)
    check_weights(model, weights, {k: path.name for k in weights}, path)
    fp = fingerprint(weights, contents.quantization)
    model.load_weights(list(weights.items()), strict=True)
    return model, fp, contents.metadata


def read_safetensors(model_dir: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """All weights of a dir (single file or sharded with an index) and the file each name came from."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index_path}: malformed index ({e}); it needs a weight_map of name → file") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise ModelLoadError(f"{index_path}: lists shard(s) that are not in the dir: {', '.join(missing)}; download them again")
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
            if pickles:
                raise ModelLoadError(
                    f"{model_dir}: only PyTorch pickle weights ({', '.join(pickles)}); mlxtune reads safetensors only "
                    "(unpickling can run arbitrary code). Convert once with transformers: "
                    "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
                )
            raise ModelLoadError(f"{model_dir}: no *.safetensors weight files")
    weights: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for f in files:
        try:
            part = mx.load(str(model_dir / f))
        except Exception as e:
            raise ModelLoadError(f"{model_dir / f}: cannot read safetensors ({e}); the file may be truncated or corrupt — download it again") from None
        for k, v in part.items():
            weights[k] = v
            origin[k] = f
    return weights, origin


def check_weights(model: nn.Module, weights: Mapping[str, mx.array], origin: Mapping[str, str], where: Path) -> None:
    """Raise one ModelLoadError listing every missing, unexpected and mis-shaped weight."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [k for k in weights if k in expected and tuple(weights[k].shape) != expected[k]]
    if not (missing or unexpected or misshaped):
        return
    problems = [f"missing {k} (expected shape {expected[k]})" for k in missing]
    problems += [f"unexpected {k} in {origin.get(k, '?')}" for k in unexpected]
    problems += [f"{k} in {origin.get(k, '?')} has shape {tuple(weights[k].shape)}, expected {expected[k]}" for k in misshaped]
    counts = ", ".join(f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"), (len(misshaped), "mis-shaped")) if n)
    raise ModelLoadError(
        f"{where}: the weights do not match config.json ({counts}): " + "; ".join(problems)
        + ". Check that config.json and the weight files belong to the same model and that no download was cut short"
    )


def _cast(weights: dict[str, mx.array], dtype: Optional[str]) -> dict[str, mx.array]:
    if dtype is None:
        return weights
    dt = getattr(mx, dtype)
    return {k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def _quantize_like(model: nn.Module, quantization: dict, weights: Mapping[str, mx.array], source) -> None:
    """Turn the layers that are stored quantized (mlx-lm layout: `x.scales` present) into quantized layers."""
    if quantization.get("mode", "affine") != "affine":
        raise ModelLoadError(f"{source}: quantization mode {quantization.get('mode')!r} is not supported (affine only)")

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return {"group_size": quantization["group_size"], "bits": quantization["bits"]}

    nn.quantize(model, class_predicate=predicate)


def quantize_model(model: nn.Module, q: QuantizeConfig) -> list[str]:
    """Quantize the Linear / Embedding layers whose input dim is a multiple of the group size; returns paths."""
    done = []

    def predicate(path: str, module: nn.Module) -> bool:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % q.group_size == 0:
            done.append(path)
            return True
        return False

    nn.quantize(model, group_size=q.group_size, bits=q.bits, class_predicate=predicate)
    if not done:
        raise ConfigError(f"model.quantize: no layer has an input size divisible by group_size={q.group_size}; use 32 or 64")
    return done


def _require_tokenizer_files(model_dir: Path) -> None:
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the base model's tokenizer files in, "
            "or load with tokenizer=False for weights only"
        )


def load_tokenizer(model_dir: Path):
    """transformers' AutoTokenizer for a local dir (no remote code), with one clear error."""
    _require_tokenizer_files(model_dir)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------
# Fingerprint


def fingerprint(weights: Mapping[str, mx.array], quantization: Optional[dict] = None, samples: int = 64) -> str:
    """sha256 over sorted names, logical shapes and a strided sample of values in float32; 16 hex digits.

    Cheap at any model size (reads `samples` values per tensor). Quantized triples (`x.weight` with
    `x.scales`, described by an mlx-lm style `quantization` dict) count at their logical shape, and the sampled
    values are dequantized, so a GGUF loaded dense or kept quantized has the same fingerprint.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in weights:
            continue  # part of a quantized triple: folded into its weight
        w = weights[name]
        module = name.rsplit(".", 1)[0]
        quantized = name.endswith(".weight") and f"{module}.scales" in weights
        if quantized:
            q = (quantization or {}).get(module) or quantization or {}
            gs, bits = q.get("group_size"), q.get("bits")
            if not gs or not bits:
                raise ModelLoadError(f"{module}: quantized weight with no group_size/bits in the quantization config")
            shape = (w.shape[0], w.shape[1] * 32 // bits)
        else:
            shape = tuple(w.shape)
        size = int(np.prod(shape)) if shape else 1
        idx = np.unique(np.linspace(0, size - 1, num=min(samples, size)).astype(np.int64))
        if quantized:
            rows, cols = idx // shape[1], idx % shape[1]
            urows, inv = np.unique(rows, return_inverse=True)
            r = mx.array(urows)
            dense = mx.dequantize(w[r], weights[f"{module}.scales"][r], weights[f"{module}.biases"][r], group_size=gs, bits=bits)
            vals = dense[mx.array(inv), mx.array(cols)]
        else:
            vals = w.reshape(-1)[mx.array(idx)]
        h.update(name.encode())
        h.update(repr(shape).encode())
        h.update(np.array(vals.astype(mx.float32)).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Saving


def export_weights(model: nn.Module, dequantize: bool = True) -> tuple[dict[str, mx.array], dict]:
    """The model's weights under Hugging Face names, LoRA merged in; returns (weights, quantization).

    LoRA layers are fused in float32 (over a quantized base: dequantized first, and re-quantized with the base's
    settings when `dequantize=False`). Quantized layers are dequantized unless `dequantize=False`, in which
    case `quantization` is the mlx-lm config entry describing them (empty when nothing is quantized).
    """
    from .lora import LoRALinear

    flat = dict(tree_flatten(model.parameters()))
    quant: dict[str, dict] = {}
    modules = model.named_modules()
    lora_prefixes = tuple(path + "." for path, m in modules if isinstance(m, LoRALinear))
    for path, m in modules:
        if isinstance(m, LoRALinear):
            for k in [k for k in flat if k.startswith(path + ".")]:
                del flat[k]
            fused = m.fuse()
            base = m.linear
            if not dequantize and isinstance(base, nn.QuantizedLinear):
                wq, scales, biases = mx.quantize(fused.weight, base.group_size, base.bits)
                flat.update({f"{path}.weight": wq, f"{path}.scales": scales, f"{path}.biases": biases})
                quant[path] = {"group_size": base.group_size, "bits": base.bits}
            else:
                flat[f"{path}.weight"] = fused.weight
            if "bias" in fused:
                flat[f"{path}.bias"] = fused.bias
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and not path.startswith(lora_prefixes):
            if dequantize:
                flat[f"{path}.weight"] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
                del flat[f"{path}.scales"], flat[f"{path}.biases"]
            else:
                quant[path] = {"group_size": m.group_size, "bits": m.bits}
    quantization: dict = {}
    if quant:
        counts: dict[tuple, int] = {}
        for q in quant.values():
            key = (q["group_size"], q["bits"])
            counts[key] = counts.get(key, 0) + 1
        gs, bits = max(counts, key=counts.get)
        quantization = {"group_size": gs, "bits": bits}
        quantization.update({p: q for p, q in quant.items() if (q["group_size"], q["bits"]) != (gs, bits)})
    return flat, quantization


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _dtype_name(weights: Mapping[str, mx.array]) -> str:
    """The float dtype holding most parameters (config.json's torch_dtype)."""
    sizes: dict[str, int] = {}
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            name = str(v.dtype).rsplit(".", 1)[-1]
            sizes[name] = sizes.get(name, 0) + v.size
    return max(sizes, key=sizes.get) if sizes else "float32"


def _shards(weights: dict[str, mx.array], max_shard_bytes: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights, key=_natural_key):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    return shards


def generation_config(model: Model, tokenizer) -> dict:
    """generation_config.json: the source model's, with bos and every end-of-turn / end-of-text id as eos."""
    gen: dict[str, Any] = {}
    src = Path(str(getattr(model, "source", {}).get("path", "")))
    if src.is_dir() and (src / "generation_config.json").is_file():
        try:
            gen = json.loads((src / "generation_config.json").read_text())
        except json.JSONDecodeError:
            gen = {}
    for key in ("transformers_version", "_from_model_config"):
        gen.pop(key, None)

    def ids(v) -> list[int]:
        if v is None:
            return []
        return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]

    eos = ids(gen.get("eos_token_id")) + ids(model.args.eos_token_id)
    bos = gen.get("bos_token_id", model.args.bos_token_id)
    if tokenizer is not None:
        eos += ids(tokenizer.eos_token_id)
        unk = getattr(tokenizer, "unk_token_id", None)
        vocab = tokenizer.get_vocab()
        eos += [vocab[t] for t in END_TOKENS if t in vocab and vocab[t] != unk]
        if bos is None and tokenizer.bos_token_id is not None:
            bos = tokenizer.bos_token_id
        if gen.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
            gen["pad_token_id"] = tokenizer.pad_token_id
    eos = list(dict.fromkeys(eos))
    if bos is not None:
        gen["bos_token_id"] = bos
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


def save_model(
    model: Model,
    tokenizer,
    out_dir: Union[str, os.PathLike],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    *,
    dequantize: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model` (+ tokenizer) as a Hugging Face dir that transformers and mlx-lm load; returns the dir.

    LoRA layers are merged into the written weights (the model object is not changed). Quantized layers are
    dequantized unless `dequantize=False`, which writes mlx-lm's quantized layout instead (mlx-lm and mlxtune
    load it; transformers does not). Everything goes to a temp dir next to `out_dir`, renamed at the end.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise MlxtuneError(f"{out}: already exists and is not empty; choose another output dir or pass overwrite=True")
    if max_shard_bytes <= 0:
        raise MlxtuneError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    weights, quantization = export_weights(model, dequantize=dequantize)
    config = model.args.to_hf_config()
    for key in ("quantization", "quantization_config", "torch_dtype", "dtype", "transformers_version"):
        config.pop(key, None)
    dtype = _dtype_name(weights)
    config["torch_dtype"] = dtype  # transformers 4
    config["dtype"] = dtype  # transformers 5
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    gen = generation_config(model, tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = _shards(weights, max_shard_bytes)
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            mx.save_safetensors(str(tmp / fname), shard, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if n > 1:
            total_size = sum(v.nbytes for v in weights.values())
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0])))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
