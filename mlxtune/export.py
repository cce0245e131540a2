"""Fuse and export: a trained adapter → a fused HF dir, a PEFT or mlx-lm adapter, or a GGUF file.

    fuse(run_dir, out, base=None, quantize=None)               fused model as a HF dir (float; re-quantized on request)
    export(run_dir, "hf" | "peft" | "mlx-lm" | "gguf", out, base=None, outtype="f16" | "q8_0")

The input is anything `adapters.read_adapter` reads (an mlxtune run or adapter dir, a PEFT dir, an mlx-lm
adapter dir), so this also converts between the three adapter formats. The base model defaults to the path
the adapter records.

Fusing merges W + (alpha / r) * (A @ B)^T in float32. A base trained quantized (QLoRA: the adapter config
records `base_model.quantization`) is loaded quantized the same way, so the fused weights are
dequantize(Q(W)) + delta — the function that was trained — and written as float unless `quantize` asks to
re-quantize the fused model (merging into the packed integers would lose the adapter: mlx-lm #1172).

GGUF follows llama.cpp's convert_hf_to_gguf.py for Llama 3.x (arch `llama`: Q/K rows permuted for
llama.cpp's interleaved RoPE, llama3 rope scaling as a `rope_freqs` tensor) and Qwen2 (arch `qwen2`: no
permutation), with the tokenizer as a byte-level BPE (`tokenizer.ggml.model = gpt2`) and its chat template.

Every input is validated before anything is written; outputs go to a temp dir/file beside `out` that is
renamed into place, so a failure leaves nothing behind. An existing non-empty `out` needs `force=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapters import (
    CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    WEIGHTS_FILE,
    AdapterSpec,
    atomic_save_safetensors,
    atomic_write_json,
    load_adapter,
    read_adapter,
)
from .errors import AdapterError, ConfigError, MlxtuneError

FORMATS = ("hf", "peft", "mlx-lm", "gguf")
GGUF_OUTTYPES = ("f16", "q8_0")

PathLike = Union[str, os.PathLike]


class ExportError(MlxtuneError):
    """A bad export request: unknown format or outtype, an existing --out, a model GGUF cannot hold."""


# ---------------------------------------------------------------------------------------------------------
# Public API


def export(
    run_dir_or_adapter: PathLike,
    format: str,
    out: PathLike,
    base: Optional[PathLike] = None,
    *,
    outtype: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Export an adapter (run dir, mlxtune / PEFT / mlx-lm adapter dir) as `format`; returns what was written.

    hf:     the fused model as a Hugging Face dir (float; see `fuse` for re-quantizing).
    peft:   `adapter_model.safetensors` + `adapter_config.json` for `peft.PeftModel.from_pretrained`.
    mlx-lm: `adapters.safetensors` + `adapter_config.json` for `mlx_lm.load(base, adapter_path=...)`.
    gguf:   the fused model as `<out>/model-<outtype>.gguf` (or `out` itself when it ends in .gguf);
            outtype f16 (default) or q8_0.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if outtype is not None and format != "gguf":
        raise ExportError(f"outtype={outtype!r} applies only to format 'gguf'")
    outtype = outtype or "f16"
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(GGUF_OUTTYPES)}")
    out = Path(out).expanduser()
    _check_out(out, force)
    spec = read_adapter(run_dir_or_adapter)

    if format in ("peft", "mlx-lm"):
        base_path = str(base) if base is not None else spec.base.get("path")
        n_layers = spec.base.get("num_hidden_layers") or _base_num_layers(base_path)
        if format == "peft":
            weights, config, wfile = *to_peft(spec, base_path, n_layers), PEFT_WEIGHTS_FILE
            meta = {"format": "pt"}
        else:
            weights, config, wfile = *to_mlx_lm(spec, base_path, n_layers), WEIGHTS_FILE
            meta = {"format": "mlx"}
        with atomic_dir(out, force) as tmp:
            atomic_save_safetensors(tmp / wfile, weights, metadata=meta)
            atomic_write_json(tmp / CONFIG_FILE, config)
        return out

    model, tokenizer = fused_model(spec, base)
    if format == "hf":
        from .loading import save_model

        with atomic_dir(out, force) as tmp:
            save_model(model, tokenizer, tmp)
        return out
    name = Path(str(base or spec.base.get("path") or "model")).name.removesuffix(".gguf")
    if out.suffix == ".gguf":
        with atomic_file(out, force) as tmp:
            write_gguf(model, tokenizer, tmp, outtype=outtype, name=name)
        return out
    with atomic_dir(out, force) as tmp:
        write_gguf(model, tokenizer, tmp / f"model-{outtype}.gguf", outtype=outtype, name=name)
    return out / f"model-{outtype}.gguf"


def fuse(
    run_dir: PathLike,
    out: PathLike,
    base: Optional[PathLike] = None,
    quantize: Union[None, int, dict, Any] = None,
    *,
    force: bool = False,
) -> Path:
    """Merge the adapter at `run_dir` into its base and save a Hugging Face dir at `out`; returns `out`.

    The output is float (the base's dtype) by default. `quantize` ({"bits": 4|8, "group_size": 64}, a
    QuantizeConfig, or just the bits) re-quantizes the fused float model before saving.
    """
    q = _quantize_arg(quantize)
    out = Path(out).expanduser()
    _check_out(out, force)
    model, tokenizer = fused_model(run_dir, base)
    from .loading import quantize_model, save_model

    if q is not None:
        quantize_model(model, q)
    with atomic_dir(out, force) as tmp:
        save_model(model, tokenizer, tmp, dequantize=q is None)
    return out


def fused_model(adapter: Union[PathLike, AdapterSpec], base: Optional[PathLike] = None):
    """(model, tokenizer): the base (quantized as at training, if it was) + the adapter, fused, all float."""
    spec = adapter if isinstance(adapter, AdapterSpec) else read_adapter(adapter)
    base_path = _base_path(spec, base)
    from .loading import load

    quant = spec.base.get("quantization") or None
    # A QLoRA base is re-created as trained: same dtype, then the same quantization.
    dtype = spec.base.get("dtype") if quant else None
    model, tokenizer = load(base_path, dtype=dtype, quantize=quant)
    load_adapter(model, spec)
    from .lora import fuse as fuse_lora

    fuse_lora(model)
    dequantize_model(model)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------
# Adapter formats


def to_peft(spec: AdapterSpec, base_path: Optional[str], n_layers: Optional[int]) -> tuple[dict, dict]:
    """(weights, adapter_config) in PEFT's LoRA layout: A (r, in), B (out, r), keys `base_model.model.<path>`."""
    weights = {}
    for path in spec.wrapped:
        weights[f"base_model.model.{path}.lora_A.weight"] = mx.contiguous(spec.weights[f"{path}.lora_a"].T.astype(mx.float32))
        weights[f"base_model.model.{path}.lora_B.weight"] = mx.contiguous(spec.weights[f"{path}.lora_b"].T.astype(mx.float32))
    idx = spec.layer_indices()
    every = n_layers is not None and idx == list(range(n_layers))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in spec.wrapped}),
        "layers_to_transform": None if every else idx,
        "layers_pattern": None if every else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    return weights, config


def to_mlx_lm(spec: AdapterSpec, base_path: Optional[str], n_layers: Optional[int]) -> tuple[dict, dict]:
    """(weights, adapter_config) for mlx-lm 0.32's load_adapters: the last `num_layers` layers, per-layer keys.

    mlx-lm can only adapt a contiguous run of final layers. A subset that is not one (say layers 0 and 2
    of 4) is written as the run from its first layer to the end, with zero A and B in the layers that had
    no adapter — the same function, since B = 0 adds nothing.
    """
    locals_ = sorted({p.split(".layers.", 1)[1].split(".", 1)[1] for p in spec.wrapped if ".layers." in p})
    idx = spec.layer_indices()
    weights = {k: mx.contiguous(v.astype(mx.float32)) for k, v in spec.weights.items()}
    if isinstance(spec.layers, int) and not isinstance(spec.layers, bool):
        num_layers = spec.layers
    elif spec.layers is None and n_layers is None:
        num_layers = -1
    else:
        if n_layers is None:
            raise ExportError(
                f"{spec.path}: cannot tell how many layers the base model has (mlx-lm counts adapted layers "
                "from the end); pass --base with the base model dir"
            )
        first = min(idx) if spec.layers is not None else 0
        num_layers = n_layers - first
        prefix = spec.wrapped[0].split(".layers.", 1)[0]
        shapes = {}  # local path -> (a shape, b shape), from any layer that has it
        for p in spec.wrapped:
            local = p.split(".layers.", 1)[1].split(".", 1)[1]
            shapes.setdefault(local, (spec.weights[f"{p}.lora_a"].shape, spec.weights[f"{p}.lora_b"].shape))
        for i in range(first, n_layers):
            for local in locals_:
                key = f"{prefix}.layers.{i}.{local}"
                if f"{key}.lora_a" not in weights:
                    weights[f"{key}.lora_a"] = mx.zeros(shapes[local][0], dtype=mx.float32)
                    weights[f"{key}.lora_b"] = mx.zeros(shapes[local][1], dtype=mx.float32)
    config = {
        "fine_tune_type": "lora",
        "model": base_path,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": spec.rank,
            "scale": spec.alpha / spec.rank,
            "dropout": spec.dropout,
            "keys": locals_,
        },
    }
    return weights, config


# ---------------------------------------------------------------------------------------------------------
# Quantization helpers


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear / QuantizedEmbedding by its float equivalent (scales' dtype), in place."""
    from mlx.utils import tree_unflatten

    updates = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=getattr(m, "mode", "affine"))
            w = w.astype(m.scales.dtype)
            if isinstance(m, nn.QuantizedLinear):
                f = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    f.bias = m.bias
            else:
                f = nn.Embedding(w.shape[0], w.shape[1])
            f.weight = w
            updates.append((name, f))
    if updates:
        model.update_modules(tree_unflatten(updates))
    return model


def _quantize_arg(q):
    """A quantize spec for fuse: a bit count, {bits, group_size}, a QuantizeConfig or None (validated by loading)."""
    from .loading import _check_quantize

    if isinstance(q, int) and not isinstance(q, bool):
        q = {"bits": q}
    try:
        return _check_quantize(q)
    except ConfigError as e:
        raise ExportError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# GGUF

# sha256 of str(token ids) of llama.cpp's pre-tokenizer probe text (convert_hf_to_gguf.py
# get_vocab_base_pre), encoded without special tokens → the `tokenizer.ggml.pre` llama.cpp expects.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, with BOS
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "llama-bpe",  # Llama 3, no BOS
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
_DEFAULT_PRE = {"llama": "llama-bpe", "qwen2": "qwen2"}


def write_gguf(model: nn.Module, tokenizer, path: PathLike, outtype: str = "f16", name: str = "model") -> Path:
    """Write a float (fused, dequantized) Llama 3.x / Qwen2 model and its tokenizer as one GGUF file.

    f16: 2-D weights in float16; q8_0: 2-D weights in Q8_0 (rows whose width is not a multiple of 32 in
    float16). Norms, biases and rope_freqs stay float32, as llama.cpp expects.
    """
    import gguf

    if outtype not in GGUF_OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(GGUF_OUTTYPES)}")
    args = model.args
    archs = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    if args.model_type not in archs:
        raise ExportError(f"GGUF export supports llama and qwen2 models, not {args.model_type!r}")
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise ExportError("write_gguf: the model is quantized; dequantize it first (export.dequantize_model)")
    arch = archs[args.model_type]
    n_layers = args.num_hidden_layers
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_rope_freq_base(float(args.rope_theta))
    w.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    if arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(args.vocab_size)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    extra_tensors: list[tuple[str, np.ndarray]] = []
    scaling = args.rope_scaling or {}
    rtype = scaling.get("rope_type", scaling.get("type"))
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif rtype == "llama3":
        # llama.cpp divides each base frequency by rope_freqs[i]: base inv_freq / scaled inv_freq.
        from .model import rope_inv_freq

        base_args = type(args)(**{**args.__dict__, "rope_scaling": None})
        factors = np.array(rope_inv_freq(base_args)) / np.array(rope_inv_freq(args))
        extra_tensors.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.astype(np.float32)))

    _add_tokenizer(w, tokenizer, args)

    from mlx.utils import tree_flatten

    names = gguf.get_tensor_name_map(arch, n_layers)
    H, K = args.num_attention_heads, args.num_key_value_heads
    for key, value in extra_tensors:
        w.add_tensor(key, value)
    for key, value in tree_flatten(model.parameters()):
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"write_gguf: no GGUF name for tensor {key!r}")
        data = np.array(value.astype(mx.float32))
        if arch == gguf.MODEL_ARCH.LLAMA and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, H)
        elif arch == gguf.MODEL_ARCH.LLAMA and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, K)
        if data.ndim <= 1 or not new.endswith(".weight") or new.endswith("_norm.weight"):
            w.add_tensor(new, data.astype(np.float32))
        elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(new, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(new, data.astype(np.float16))
    path = Path(path)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _permute(x: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows → llama.cpp's interleaved pairs (convert_hf_to_gguf.py LlamaModel.permute)."""
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _add_tokenizer(w, tokenizer, args) -> None:
    """Byte-level BPE vocab, merges, special ids and chat template, as convert_hf_to_gguf.py writes them."""
    import gguf

    tok = tokenizer
    if not hasattr(tok, "backend_tokenizer") and hasattr(tok, "_tokenizer"):
        tok = tok._tokenizer  # mlx-lm's TokenizerWrapper around a Hugging Face tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) Hugging Face tokenizer")
    tj = json.loads(backend.to_str())
    model_j = tj.get("model", {})
    if model_j.get("type") != "BPE":
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers, not {model_j.get('type')!r}")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= args.vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {args.vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(args.vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if i in added:
            looks_special = t.startswith("<|") and t.endswith("|>")
            types.append(gguf.TokenType.CONTROL if (added[i].special or looks_special) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    merges = model_j.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(x.replace(" ", chr(ord(" ") + 256)) for x in m) for m in merges]
    ids = tok.encode(_CHKTXT, add_special_tokens=False)
    pre = _PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest(), _DEFAULT_PRE.get(args.model_type, "default"))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def _int(x):
        if isinstance(x, list):
            x = x[0] if x else None
        return x if isinstance(x, int) and not isinstance(x, bool) else None

    bos = _int(tok.bos_token_id) if tok.bos_token_id is not None else _int(args.bos_token_id)
    eos = _int(tok.eos_token_id) if tok.eos_token_id is not None else _int(args.eos_token_id)
    pad = _int(tok.pad_token_id)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if pad is not None:
        w.add_pad_token_id(pad)
    probe = tok.encode("a")
    w.add_add_bos_token(bool(bos is not None and probe[:1] == [bos]))
    w.add_add_eos_token(bool(eos is not None and len(probe) > 1 and probe[-1] == eos))
    template = getattr(tok, "chat_template", None)
    if template:
        w.add_chat_template(template)


# ---------------------------------------------------------------------------------------------------------
# Paths and atomic output


def _base_path(spec: AdapterSpec, base: Optional[PathLike]) -> str:
    recorded = spec.base.get("path")
    path = base if base is not None else recorded
    if not path:
        raise AdapterError(f"{spec.path}: the adapter records no base model path; pass --base with the base model")
    p = Path(str(path)).expanduser()
    if not p.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)):
        return str(path)  # a hub id: the loader fetches it (or says why it cannot)
    if not p.exists():
        how = "given with --base" if base is not None else f"recorded in {spec.path / CONFIG_FILE}"
        raise AdapterError(f"base model {p} ({how}) not found; pass --base with the base model dir or .gguf file")
    return str(p)


def _base_num_layers(base_path: Optional[str]) -> Optional[int]:
    """num_hidden_layers from a local HF base dir's config.json, else None."""
    if not base_path:
        return None
    cfg = Path(base_path).expanduser() / "config.json"
    try:
        return int(json.loads(cfg.read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        if out.is_dir() and not any(out.iterdir()):
            return
        raise ExportError(f"{out} already exists and is not empty; choose another --out or pass --force to replace it")


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` (whole), on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp file path beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _commit(Path(tmp), out, force)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _commit(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        _check_out(out, force)  # re-check: something may have appeared while we worked
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------------
# CLI


def register_cli(sub) -> None:
    p = sub.add_parser(
        "fuse",
        help="merge a run's LoRA adapter into its base model (a float HF dir)",
        description="Merge the adapter of RUN_DIR (or any mlxtune / PEFT / mlx-lm adapter dir) into its base "
        "model and save a Hugging Face dir. Float by default; --quantize-bits re-quantizes the fused model.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run dir or adapter dir")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir (must not exist or be empty, unless --force)")
    p.add_argument("--base", metavar="PATH", help="base model (default: the path recorded in adapter_config.json)")
    p.add_argument("--quantize-bits", type=int, metavar="N", help="re-quantize the fused model to N bits (4 or 8)")
    p.add_argument("--group-size", type=int, metavar="G", help="quantization group size with --quantize-bits (default 64)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cli_fuse)

    e = sub.add_parser(
        "export",
        help="export an adapter as a fused HF dir, a PEFT or mlx-lm adapter, or GGUF",
        description="Export the adapter of RUN_DIR (or any mlxtune / PEFT / mlx-lm adapter dir).",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="run dir or adapter dir")
    e.add_argument("--format", required=True, choices=FORMATS, help="hf: fused model; peft / mlx-lm: adapter; gguf: fused model for llama.cpp")
    e.add_argument("--out", required=True, metavar="DIR", help="output dir (gguf: a dir, or a file ending in .gguf)")
    e.add_argument("--base", metavar="PATH", help="base model (default: the path recorded in adapter_config.json)")
    e.add_argument("--outtype", choices=GGUF_OUTTYPES, help="GGUF weight type (default f16)")
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.set_defaults(func=_cli_export)


def _cli_fuse(args) -> int:
    if args.group_size is not None and args.quantize_bits is None:
        raise ExportError("--group-size applies only with --quantize-bits (the fused model is float otherwise)")
    q = None if args.quantize_bits is None else {"bits": args.quantize_bits, "group_size": args.group_size or 64}
    out = fuse(args.run_dir, args.out, base=args.base, quantize=q, force=args.force)
    print(f"wrote fused model to {out}" + (f" ({args.quantize_bits}-bit)" if q else ""))
    return 0


def _cli_export(args) -> int:
    out = export(args.run_dir, args.format, args.out, base=args.base, outtype=args.outtype, force=args.force)
    print(f"wrote {args.format} export to {out}")
    return 0


from . import _callable_module  # noqa: E402  (mlxtune.export(...) keeps working after this import)

_callable_module(__name__, "export")
