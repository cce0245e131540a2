"""Load a base model (Hugging Face dir, GGUF file or hub id) into `Model` + tokenizer, and fingerprint it.

    model, tokenizer = load("path/to/hf-dir" | "model.gguf" | "org/name", dtype="float32",
                            quantize={"bits": 4, "group_size": 64})

A HF dir: `config.json` (transformers 4 and 5 dialects, via ModelArgs.from_hf_config), single or sharded
safetensors (`model.safetensors.index.json`) read with `mx.load`, `model.sanitize`, then a strict check that
reports every missing, unexpected or mis-shaped weight in one error. Only safetensors are read: pickled
`.bin`/`.pth` files can run code and are refused, and so is remote code. mlx-lm's quantized dirs
(`"quantization"` in config.json) load as quantized layers. A `.gguf` file is read by `gguf.read_stored`; a hub
id is fetched by `hub.download` (config, safetensors and tokenizer files only).

`model.source = {"path", "fingerprint"}`: the fingerprint is a cheap hash of the weights as stored (names,
shapes and a strided sample of values in float32), taken before any dtype cast or quantization, so it does
not depend on the dtype a model is loaded in, and an adapter can tell whether it is put on the base it was
trained on. Earlier versions fingerprinted a GGUF base after its dtype cast; for a GGUF,
`model.source["legacy_fingerprints"]` holds the values those versions recorded for a float16 / bfloat16 load
(float32 gave the current value), and an adapter or checkpoint recording one of them belongs to this base too
(`fingerprint_matches`).

Saving lives in saving.py, dtype casts and quantization in quant.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import fsio, hub
from .config import QuantizeConfig
from .errors import ConfigError, ModelLoadError
from .model import Model, ModelArgs
from .quant import cast_floats, check_dtype, check_quantize, quantize_like, quantize_model
from .tokenizer import load_tokenizer, unwrap

LEGACY_GGUF_DTYPES = ("float16", "bfloat16")
"Load dtypes whose GGUF fingerprint, as earlier versions computed it (after the cast), differs from today's."


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
    dtype = check_dtype(dtype)
    qcfg = check_quantize(quantize)
    src = resolve_path(path)
    is_gguf = src.is_file() and src.suffix.lower() == ".gguf"
    metadata = tok = None
    if is_gguf:
        model, fingerprints, metadata = _load_gguf(src, dtype, keep_quantized)
        if tokenizer:
            from .gguf import gguf_tokenizer

            tok = gguf_tokenizer(src, metadata)
            check_vocab(model.args, len(metadata.get("tokenizer.ggml.tokens") or ()), src)  # the file's own tokens
    elif src.is_file():
        raise ModelLoadError(f"{src}: not a model dir or .gguf file; pass the directory that holds config.json")
    else:
        if keep_quantized:
            raise ConfigError("keep_quantized applies to GGUF files only; use quantize={bits, group_size} for a HF dir")
        model, fingerprints, tok = _load_hf_dir(src, dtype, tokenizer)
    if qcfg is not None:
        quantize_model(model, qcfg)
    mx.eval(model.parameters())
    model.eval()
    # A plain attribute, outside the module tree (a dict attribute would become part of model.parameters()).
    source = {"path": os.path.abspath(src) if Path(path).expanduser().exists() else str(path),
              "fingerprint": fingerprints[0]}
    if fingerprints[1:]:
        source["legacy_fingerprints"] = fingerprints[1:]
    object.__setattr__(model, "source", source)
    if adapter is not None:
        from .adapters import load_adapter

        load_adapter(model, adapter)
        model.eval()  # the LoRA layers load_adapter added start in training mode (dropout on)
    return model, tok


def resolve_path(path: Union[str, os.PathLike]) -> Path:
    """A local path as is; a hub id (`org/name`) → its snapshot dir (config, safetensors, tokenizer only)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if s.lower().endswith(".gguf") or s.startswith((".", "/", "~")) or not hub.is_hub_id(s):
        raise ModelLoadError(f"model path {s!r} does not exist; pass a local HF model dir, a .gguf file or a hub id like org/name")
    return hub.download(s, allow_patterns=hub.MODEL_FILES)


def read_config(model_dir: Path) -> dict:
    """config.json as a dict, with one clear error for a missing or malformed file."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        hint = " (this looks like a GGUF dir: pass the .gguf file itself)" if any(model_dir.glob("*.gguf")) else ""
        raise ModelLoadError(f"{model_dir}: no config.json; pass a Hugging Face model dir{hint}")
    return fsio.read_json_object(cfg_path, ModelLoadError)


def check_vocab(args: ModelArgs, n: int, where: Path) -> None:
    """config's vocab_size must hold every id of the tokenizer's `n` tokens (an embedding row per id)."""
    if n > args.vocab_size:
        cfg = where / "config.json" if where.is_dir() else where
        raise ModelLoadError(f"{cfg}: vocab_size={args.vocab_size} is smaller than the tokenizer's {n} tokens "
                             f"(ids up to {n - 1} would index past the embedding); the config and the tokenizer "
                             "belong to different models")


def _load_hf_dir(model_dir: Path, dtype: Optional[str], tokenizer: bool) -> tuple[Model, list[str], Any]:
    """(model, fingerprints, tokenizer or None): config.json checked, then the tokenizer against it, then weights."""
    config = read_config(model_dir)
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") and "quantization" not in config:
        raise ModelLoadError(
            f"{model_dir / 'config.json'}: pre-quantized checkpoints (quant_method={qc.get('quant_method')!r}) are not "
            "supported; load the unquantized model and set model.quantize"
        )
    args = ModelArgs.from_hf_config(config, source=str(model_dir / "config.json"))
    tok = load_tokenizer(model_dir) if tokenizer else None
    if tok is not None:
        check_vocab(args, len(unwrap(tok)), model_dir)
    weights, origin = read_safetensors(model_dir)
    model = Model(args)
    quantization = config.get("quantization")
    if quantization:
        quantize_like(model, quantization, weights, model_dir / "config.json")
    weights = model.sanitize(weights)
    check_weights(model, weights, origin, model_dir)
    fp = fingerprint(weights, quantization)  # before the cast: the same whatever dtype the model is loaded in
    model.load_weights(list(cast_floats(weights, dtype).items()), strict=True)
    return model, [fp], tok


def _load_gguf(path: Path, dtype: Optional[str], keep_quantized: bool) -> tuple[Model, list[str], dict]:
    from .gguf import default_dtype, read_stored

    contents = read_stored(path, keep_quantized=keep_quantized)
    model = Model(ModelArgs.from_hf_config(contents.config, source=str(path)))
    if contents.quantization:
        quantize_like(model, contents.quantization, contents.weights, path)
    weights = model.sanitize(contents.weights)
    check_weights(model, weights, {k: path.name for k in weights}, path)
    fingerprints = fingerprint_variants(weights, contents.quantization, legacy_dtypes=LEGACY_GGUF_DTYPES)
    model.load_weights(list(cast_floats(weights, dtype or default_dtype()).items()), strict=True)
    return model, fingerprints, contents.metadata


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
        except Exception as e:  # MLX raises RuntimeError / ValueError variants for bad files
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
    floats = {k for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    nonfloat = sorted(k for k in weights if k in floats and not mx.issubdtype(weights[k].dtype, mx.floating))
    if nonfloat and not (missing or unexpected or misshaped):
        k = nonfloat[0]
        raise ModelLoadError(f"{where}: {k} in {origin.get(k, '?')} is {str(weights[k].dtype).rsplit('.', 1)[-1]}, "
                             f"not a float weight ({len(nonfloat)} such tensor(s)); the weight files are corrupt or "
                             "come from a format mlxtune does not read")
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


# ---------------------------------------------------------------------------------------------------------
# Fingerprint


def fingerprint(weights: Mapping[str, mx.array], quantization: Optional[dict] = None, samples: int = 64) -> str:
    """sha256 over sorted names, logical shapes and a strided sample of values in float32; 16 hex digits.

    Cheap at any model size (reads `samples` values per tensor). Quantized triples (`x.weight` with
    `x.scales`, described by an mlx-lm style `quantization` dict) count at their logical shape, and the sampled
    values are dequantized, so a GGUF loaded dense or kept quantized has the same fingerprint.
    """
    return fingerprint_variants(weights, quantization, samples)[0]


def fingerprint_variants(
    weights: Mapping[str, mx.array],
    quantization: Optional[dict] = None,
    samples: int = 64,
    *,
    legacy_dtypes: Sequence[str] = (),
) -> list[str]:
    """[fingerprint(weights), then the fingerprint of the weights cast to each of `legacy_dtypes`], from one
    pass over the samples (casting commutes with sampling; a quantized triple's scales are cast, as they were)."""
    dtypes = [None] + [getattr(mx, d) for d in legacy_dtypes]
    hashes = [hashlib.sha256() for _ in dtypes]
    for name in sorted(weights):
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in weights:
            continue  # part of a quantized triple: folded into its weight
        shape, values = _samples(weights, name, quantization, samples)
        variants = [values(dt).astype(mx.float32) for dt in dtypes]
        mx.eval(*variants)
        for h, v in zip(hashes, variants):
            h.update(name.encode())
            h.update(repr(shape).encode())
            h.update(np.array(v).tobytes())
    return [h.hexdigest()[:16] for h in hashes]


def _samples(weights: Mapping[str, mx.array], name: str, quantization: Optional[dict], samples: int
             ) -> tuple[tuple, Callable[[Optional[mx.Dtype]], mx.array]]:
    """(logical shape, values(dtype)): a strided sample of the tensor's values, as stored or cast to dtype."""
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
    if not quantized:
        vals = w.reshape(-1)[mx.array(idx)]
        floating = mx.issubdtype(vals.dtype, mx.floating)
        return shape, lambda dt: vals.astype(dt) if dt is not None and floating else vals
    rows, cols = idx // shape[1], idx % shape[1]
    urows, inv = np.unique(rows, return_inverse=True)
    r = mx.array(urows)
    wq, scales, biases = w[r], weights[f"{module}.scales"][r], weights[f"{module}.biases"][r]

    def values(dt: Optional[mx.Dtype]) -> mx.array:
        s, b = (scales, biases) if dt is None else (scales.astype(dt), biases.astype(dt))
        return mx.dequantize(wq, s, b, group_size=gs, bits=bits)[mx.array(inv), mx.array(cols)]

    return shape, values


def fingerprint_matches(source: Mapping, recorded: Optional[str]) -> bool:
    """Whether a recorded base fingerprint is the one of the model loaded from `source` (`model.source`):
    its fingerprint or one that older versions recorded for it (`legacy_fingerprints`)."""
    return recorded == source.get("fingerprint") or recorded in source.get("legacy_fingerprints", ())
