"""Before and around training: predict memory, check the machine, fetch models safely.

    mlxtune estimate -c CONFIG [--section.key value ...]   peak memory of a training step, from the config alone
    mlxtune doctor [-c CONFIG]                              Python, MLX, backend, memory, BLAS, write access, extras
    mlxtune download model|data ID [--revision R]           hub → the standard Hugging Face cache (safe files only)

`memory_guard(cfg, model, train_batches)` is the trainer's pre-flight check (`train.memory_guard`: warn, refuse
or off): it estimates the peak of the largest micro-batch and warns or refuses when it exceeds the memory
available, saying what to change.

Memory model (`estimate_memory`). The peak of one training micro-batch (the trainer evaluates every micro-batch
as it goes) is counted from the arrays the step holds when the backward pass reaches the top decoder layer, read
off model.py, lora.py, loss.py and step.py:

- resident: base weights as loaded (dtype cast / quantized: counted exactly from config.json or the GGUF header),
  LoRA parameters (float32), AdamW's m and v, the gradient accumulator and the step's fresh gradient;
- saved activations, per decoder layer from the lowest LoRA layer up, per token: the inputs of both RMSNorms
  (2D); the scaled queries and the keys and values broadcast to every query head (3·H·hd: MLX runs attention
  unfused whenever gradients are traced, and its batched matmul materializes the broadcast); gate, silu(gate)
  and up (3F); x·A of each adapted projection (r each); the inputs the LoRA A gradients read — the normed input
  of q/k/v and of gate/up (D each), the attention output for o_proj (H·hd), silu(gate)·up for down_proj (F) —
  or, with LoRA dropout, each projection's own dropped input plus a one-byte mask; and the attention
  probabilities, B·H·L² per layer (none above 2048 positions, where attention runs in checkpointed query
  blocks). Packed rows cost the same (measured; the segment mask is shared). With `train.grad_checkpoint` a
  layer keeps CKPT_PER_LAYER·D per token and one layer is recomputed at a time (CKPT_RECOMPUTE x its
  activations);
- the final norm's input and output (2D per token) and the batch arrays;
- backward temporaries of the layer being differentiated: LAYER_TRANSIENT x its activations and
  ATTENTION_TRANSIENT x its attention probabilities (or one query block);
- the loss: float32 logits, LOGITS_COPIES x (N, V) when the micro-batch fits one chunk of
  `loss.chunk_size_for(V)` tokens, else CHUNK_COPIES chunk-sized buffers;
- evaluation with `train.eval_generate`: the generation KV cache (2 · layers · batch · K · hd per position,
  allocated in steps of 256) while the training temporaries are gone.

Which constants are fitted: LAYER_TRANSIENT, ATTENTION_TRANSIENT and CKPT_PER_LAYER keep their counted values
(2, 2, 2); LOGITS_COPIES (counted 3, fitted 2), CHUNK_COPIES (fitted) and CKPT_RECOMPUTE (counted 1, fitted 0.6)
were calibrated against `mx.get_peak_memory()` around real `step.TrainStep` steps, run the way the trainer runs
them, in float32 on the CPU backend, over 27 configurations (`python tests/test_diagnostics.py --calibrate` prints
the table: all within 6% but LoRA on the top 2 of 4 layers only, +15%; the four held out for
tests/test_diagnostics.py, which asserts 15%, within 2.1%). The CPU backend runs each operation before the next,
so this is the step's live set; GPU backends add what the host's run-ahead keeps alive (benchmarks/NOTES.md). MLX's allocator and
graph scheduling differ a little between backends and versions: treat the estimate as +-15%; it counts MLX
arrays, not the rest of the Python process (tokenizer, data) or other programs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import ConfigError, MlxtuneError, ModelLoadError, did_you_mean

GB = 1e9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# safetensors header dtype names → bytes per element
ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U32": 4,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
ST_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# Fitted constants of the memory model (see the module docstring; counted values in the comments).
LAYER_TRANSIENT = 2.0
"Cotangents alive while one layer is differentiated, in units of that layer's saved activations (counted: 2)."
ATTENTION_TRANSIENT = 2.0
"Attention-probability-sized temporaries while one layer is differentiated: dP and dS (counted: 2)."
LOGITS_COPIES = 2.0
"""Unchunked loss (N <= chunk): float32 (N, V) arrays alive (fitted 2: the logits' float32 copy and the gradient
written by loss._ce_sum_fused; autodiff through the loss held 3)."""
CHUNK_COPIES = (0.5, 1.5, 6.0)
"""Chunked loss: min(a + b * n_chunks, c) float32 chunk-sized buffers alive (fitted: MLX overlaps neighbouring
chunks of the chain; with loss._ce_sum_fused's hand-written gradient the ceiling fell from 11.5 to 6)."""
CKPT_PER_LAYER = 2.0
"With gradient checkpointing, elements of D per token kept per layer: its input and output (counted: 2)."
CKPT_RECOMPUTE = 0.6
"""With gradient checkpointing, the recomputed layer's activations, in units of a plain layer's saved ones (counted 1;
fitted 0.6: the backward frees the recomputed intermediates as it consumes them)."""

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EVAL_GENERATE_BATCH = 8  # trainer._validate → evaluate.generation_metrics(batch_size=8)
EVAL_GENERATE_TOKENS = 128  # trainer._validate: max_tokens=128
KV_STEP = 256  # mlx-lm's KVCache grows in steps of 256 positions


# ---------------------------------------------------------------------------------------------------------
# What the model is, without loading its weights


@dataclass
class ModelSpec:
    """A base model's architecture and in-memory weight size, read from config.json / GGUF metadata only."""

    args: Any
    "ModelArgs (model.py)."
    path: str
    weight_bytes: int
    "Bytes the weights take once loaded (after the dtype cast and quantization the config asks for)."
    n_params: int
    "Logical parameter count."
    dtype: str
    "The compute dtype of activations (float32, float16 or bfloat16)."
    quantized: Optional[dict] = None
    "{'bits', 'group_size'} when the base is quantized in memory."

    def describe(self) -> str:
        a = self.args
        q = f", {self.quantized['bits']}-bit base" if self.quantized else ""
        return (f"{a.model_type}, {a.num_hidden_layers} layers, d {a.hidden_size}, {self.n_params / 1e9:.3g}B parameters, "
                f"{self.dtype}{q}")


def _linear_shapes(args) -> dict[str, tuple[int, int, bool]]:
    """Per decoder layer: name → (in, out, has_bias) of each projection."""
    D, F, H, K, hd = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
    return {
        "q_proj": (D, H * hd, args.qkv_bias), "k_proj": (D, K * hd, args.qkv_bias), "v_proj": (D, K * hd, args.qkv_bias),
        "o_proj": (H * hd, D, args.o_bias), "gate_proj": (D, F, args.mlp_bias), "up_proj": (D, F, args.mlp_bias),
        "down_proj": (F, D, args.mlp_bias),
    }


def weight_bytes(args, dtype: str, quantize: Optional[dict] = None) -> tuple[int, int]:
    """(bytes in memory, logical parameter count) of a dense or quantized base, counted from its shapes.

    quantize {bits, group_size}: every linear and the embedding whose input size is a multiple of the group
    size hold bits/8 bytes per weight plus a scale and a bias per group in `dtype` (mlx's affine layout), as
    loading.quantize_model does.
    """
    s = DTYPE_BYTES[dtype]
    D, V = args.hidden_size, args.vocab_size

    def matrix(n_in: int, n_out: int) -> int:
        if quantize and n_in % quantize["group_size"] == 0:
            return n_out * n_in * quantize["bits"] // 8 + 2 * n_out * (n_in // quantize["group_size"]) * s
        return n_out * n_in * s

    total, n = 0, 0
    for n_in, n_out, bias in _linear_shapes(args).values():
        total += args.num_hidden_layers * (matrix(n_in, n_out) + (n_out * s if bias else 0))
        n += args.num_hidden_layers * (n_in * n_out + (n_out if bias else 0))
    norms = (2 * args.num_hidden_layers + 1) * D
    total += norms * s + matrix(D, V)  # embedding (V, D): input dim D
    n += norms + V * D
    if not args.tie_word_embeddings:
        total += matrix(D, V)
        n += V * D
    return total, n


def _safetensors_dtypes(model_dir: Path) -> dict[str, int]:
    """{safetensors dtype: elements} over a dir's weight files, from their JSON headers (no tensor data read)."""
    counts: dict[str, int] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"{f}: cannot read the safetensors header ({type(e).__name__}: {e}); the file may be "
                                 "truncated or corrupt — download it again") from None
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            counts[info.get("dtype", "?")] = counts.get(info.get("dtype", "?"), 0) + math.prod(info.get("shape", []))
    return counts


def _local_model_path(path: str) -> Path:
    """A local path as is; a hub id → its snapshot in the local cache (never downloads)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if p.suffix.lower() == ".gguf" or str(path).startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise ModelLoadError(f"model path {str(path)!r} does not exist; pass a local HF model dir, a .gguf file or a hub id like org/name")
    from .loading import HUB_PATTERNS

    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        raise ModelLoadError(f"{path!r} is not a local path and is not in the Hugging Face cache; fetch it first "
                             f"(`mlxtune download model {path}`) or pass a local model dir") from None


def model_spec(path: Union[str, os.PathLike], dtype: Optional[str] = None, quantize: Any = None) -> ModelSpec:
    """Architecture and in-memory weight size of a HF model dir, .gguf file or cached hub id, read from
    config.json (+ safetensors headers for the stored dtype) or the GGUF metadata: no weights are loaded."""
    from .model import ModelArgs

    q = None
    if quantize is not None:
        q = {"bits": quantize.bits, "group_size": quantize.group_size} if hasattr(quantize, "bits") else dict(quantize)
    src = _local_model_path(str(path))
    if src.is_file() and src.suffix.lower() == ".gguf":
        args = ModelArgs.from_hf_config(_gguf_config(src), source=str(src))
        from .gguf import default_dtype

        act = dtype or default_dtype()  # GGUF tensors are dequantized to this dtype at load
        wb, n = weight_bytes(args, act, q)
        return ModelSpec(args, str(src), wb, n, act, q)
    if src.is_file():
        raise ModelLoadError(f"{src}: not a model dir or .gguf file; pass the directory that holds config.json")
    from .loading import read_config

    config = read_config(src)
    args = ModelArgs.from_hf_config(config, source=str(src / "config.json"))
    stored = _safetensors_dtypes(src)
    floats = {ST_FLOAT[k]: v for k, v in stored.items() if k in ST_FLOAT}
    stored_dtype = max(floats, key=floats.get) if floats else None
    cfg_dtype = config.get("torch_dtype") or config.get("dtype")
    act = dtype or stored_dtype or (cfg_dtype if cfg_dtype in DTYPE_BYTES else "float32")
    mlx_quant = config.get("quantization")
    if q is None and isinstance(mlx_quant, dict) and mlx_quant.get("bits"):
        q = {"bits": int(mlx_quant["bits"]), "group_size": int(mlx_quant.get("group_size", 64))}
    wb, n = weight_bytes(args, act, q)
    return ModelSpec(args, str(src), wb, n, act, q)


def _gguf_config(path: Path) -> dict:
    """config.json dict from a GGUF's metadata and tensor shapes, read from its header (no tensor data)."""
    from .gguf import SUPPORTED_ARCHS, gguf_config

    try:
        metadata, shapes = read_gguf_header(path)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; mlxtune reads "
                             f"{', '.join(SUPPORTED_ARCHS)} (Llama 3.x, Qwen2/2.5) GGUF files")
    return gguf_config(metadata, shapes, path)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: shape}) from a GGUF header. Arrays longer than 64 elements (token lists, merges)
    are skipped, not decoded, so a 128k-token vocabulary costs milliseconds; no tensor data is read."""
    import io

    with open(path, "rb") as raw:
        f = io.BufferedReader(raw, buffer_size=1 << 20)

        def read(fmt: str):
            n = struct.calcsize(fmt)
            b = f.read(n)
            if len(b) != n:
                raise ValueError("the GGUF header is truncated; download the file again")
            return struct.unpack(fmt, b)[0]

        def string() -> str:
            n = read("<Q")
            if n > 1 << 24:
                raise ValueError("the GGUF header is corrupt (a string of absurd length)")
            b = f.read(n)
            if len(b) != n:
                raise ValueError("the GGUF header is truncated; download the file again")
            return b.decode("utf-8", errors="replace")

        def value(vtype: int):
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = read("<I"), read("<Q")
                if count <= 64:
                    return [value(etype) for _ in range(count)]
                if etype == 8:
                    for _ in range(count):
                        f.seek(read("<Q"), 1)
                elif etype in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
                else:
                    raise ValueError(f"the GGUF header is corrupt (array of type {etype})")
                return None
            if vtype not in _GGUF_SCALARS:
                raise ValueError(f"the GGUF header is corrupt (value type {vtype})")
            return read(_GGUF_SCALARS[vtype])

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (it does not start with the GGUF magic bytes)")
        version = read("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = read("<Q"), read("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = string()
            v = value(read("<I"))
            if v is not None:
                metadata[key] = v
        shapes = {}
        for _ in range(n_tensors):
            name = string()
            dims = [read("<Q") for _ in range(read("<I"))]
            read("<I"), read("<Q")  # type, offset
            shapes[name] = tuple(reversed(dims))  # ggml lists the fastest dim first
    return metadata, shapes


# ---------------------------------------------------------------------------------------------------------
# The memory model


@dataclass
class LoraPlan:
    """What LoRA adds to a step: rank, the adapted projections (leaf names), the adapted layer indices, dropout."""

    rank: int
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    dropout: float = 0.0

    @classmethod
    def from_config(cls, lora_cfg, n_layers: int) -> "LoraPlan":
        from .lora import DEFAULT_TARGETS, _resolve_layers, _resolve_targets

        leaves = []
        for t in _resolve_targets(lora_cfg.targets):
            leaf = t.rsplit(".", 1)[-1]
            if leaf not in DEFAULT_TARGETS:
                raise ConfigError(f"lora.targets: {t!r} matched no linear layer{did_you_mean(leaf, DEFAULT_TARGETS)}; "
                                  f"the model's linear layers are {', '.join(DEFAULT_TARGETS)}")
            leaves.append(leaf)
        try:
            layers = _resolve_layers(lora_cfg.layers, n_layers)
        except MlxtuneError as e:
            raise ConfigError(str(e)) from None
        return cls(int(lora_cfg.rank), tuple(dict.fromkeys(leaves)), tuple(layers), float(lora_cfg.dropout))


@dataclass
class MemoryEstimate:
    """Predicted peak memory of a training step (bytes), by term. `total` is what must fit."""

    weights: int
    lora: int
    optimizer: int
    gradients: int
    activations: int
    backward: int
    logits: int
    batch: int
    eval_kv: int
    batch_size: int
    length: int
    packed: bool
    grad_checkpoint: bool
    dtype: str
    notes: dict = field(default_factory=dict)

    @property
    def train_peak(self) -> int:
        return (self.weights + self.lora + self.optimizer + self.gradients + self.activations + self.backward
                + self.logits + self.batch)

    @property
    def eval_peak(self) -> int:
        return self.weights + self.lora + self.optimizer + self.gradients // 2 + self.eval_kv

    @property
    def total(self) -> int:
        return max(self.train_peak, self.eval_peak)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(train_peak=self.train_peak, eval_peak=self.eval_peak, total=self.total)
        return d

    def table(self) -> list[str]:
        n = self.notes
        rows = [
            ("weights", self.weights, n.get("weights", "")),
            ("LoRA parameters", self.lora, n.get("lora", "float32")),
            ("AdamW state", self.optimizer, "m and v, float32"),
            ("gradients", self.gradients, "accumulator + this step's"),
            ("activations", self.activations, n.get("activations", "")),
            ("backward temporaries", self.backward, "one layer's cotangents and attention gradients"),
            ("logits / loss", self.logits, n.get("logits", "")),
        ]
        if self.eval_kv:
            rows.append(("eval KV cache", self.eval_kv, n.get("eval_kv", "")))
        out = [f"  {name:<22}{_gb(v):>10}   {note}" for name, v, note in rows]
        out.append(f"  {'peak (estimated)':<22}{_gb(self.total):>10}   "
                   + ("training step" if self.train_peak >= self.eval_peak else "evaluation with generation"))
        return out


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.01 * GB else f"{n / 1e6:.1f} MB"


def _layer_elements(args, lora: LoraPlan, packed: bool) -> tuple[float, float]:
    """(elements, extra bytes) one decoder layer saves for its backward, per token (see the module docstring)."""
    D, F, H, hd = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.head_dim
    t = set(lora.targets)
    n = 2 * D  # inputs of input_layernorm and post_attention_layernorm
    n += 3 * H * hd  # scaled queries; keys and values broadcast over the query heads of each KV head
    n += 3 * F  # gate, silu(gate), up
    n += lora.rank * len(t)  # x @ A of each adapted projection
    extra = 0.0  # packed rows cost the same (measured): the segment mask (B, 1, L, L) is shared by the layers
    if lora.dropout > 0:  # each adapted projection keeps its own dropped input, and the mask (one byte each)
        dropped = sum(_linear_shapes(args)[x][0] for x in t)
        return n + dropped, float(dropped)
    # the inputs the LoRA A gradients read, shared by the projections that take the same input
    if t & {"q_proj", "k_proj", "v_proj"}:
        n += D  # normed input of q/k/v
    if "o_proj" in t:
        n += H * hd  # attention output
    if t & {"gate_proj", "up_proj"}:
        n += D  # normed input of gate/up
    if "down_proj" in t:
        n += F  # silu(gate) * up
    return n, extra


def estimate_memory(args, *, weight_bytes: int, dtype: str, batch_size: int, length: int, lora: LoraPlan,
                    packed: bool = True, grad_checkpoint: bool = False, eval_generate: int = 0,
                    eval_prompt: Optional[int] = None) -> MemoryEstimate:
    """Peak memory of one training micro-batch of `batch_size` rows x `length` positions (see the module docstring).

    args: ModelArgs; weight_bytes: the base as held in memory; dtype: the activation dtype; eval_generate /
    eval_prompt: generation at evaluation (train.eval_generate examples, prompts up to eval_prompt tokens).
    """
    from .loss import chunk_size_for
    from .model import ATTENTION_CHUNK

    s = DTYPE_BYTES[dtype]
    D, H, K, hd, V = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.vocab_size
    nl = args.num_hidden_layers
    B, L = int(batch_size), int(length)
    N = B * L
    shapes = _linear_shapes(args)
    lora_params = len(lora.layers) * sum(lora.rank * (shapes[t][0] + shapes[t][1]) for t in lora.targets)
    lora_bytes = 4 * lora_params

    elems, extra = _layer_elements(args, lora, packed)
    layer_linear = N * (elems * s + extra)
    if L <= ATTENTION_CHUNK:
        probs = B * H * L * L * s  # attention probabilities (B, H, L, L), saved per layer
        probs_tmp = probs
    else:  # query blocks under mx.checkpoint: nothing quadratic is saved; one block is recomputed at a time
        probs = 0
        probs_tmp = B * H * ATTENTION_CHUNK * L * s
    n_backward = nl - min(lora.layers) if lora.layers else 0  # layers below the lowest LoRA layer need no backward
    if grad_checkpoint:
        saved = n_backward * CKPT_PER_LAYER * N * D * s + CKPT_RECOMPUTE * layer_linear + probs  # + the recomputed layer
    else:
        saved = n_backward * (layer_linear + probs)
    head = 2 * N * D * s  # final norm input and output, kept for the loss
    backward = LAYER_TRANSIENT * layer_linear + ATTENTION_TRANSIENT * probs_tmp
    chunk = chunk_size_for(V)
    if N <= chunk:  # one piece: the logits and their gradient (softmax fused in by mx.compile)
        logits = LOGITS_COPIES * N * V * 4
    else:  # checkpointed chunks, chained (loss.py): a few chunk-sized buffers in the forward and the backward
        a, b, c = CHUNK_COPIES
        logits = min(a + b * math.ceil(N / chunk), c) * chunk * V * 4
    chunk = min(N, chunk)
    batch = N * 16  # inputs, targets, loss mask, segment ids

    eval_kv = 0
    notes = {
        "lora": f"{lora_params / 1e6:.3g}M float32 parameters, rank {lora.rank}, {len(lora.targets)} projections x {len(lora.layers)} layers",
        "activations": (f"{'checkpointed: ' if grad_checkpoint else ''}{n_backward} layers x {B}x{L} tokens, {dtype}"
                        + (", packed" if packed else "")),
        "logits": f"float32 chunks of {chunk} tokens x {V:,} vocabulary",
    }
    if eval_generate:
        gb = min(eval_generate, EVAL_GENERATE_BATCH)
        positions = math.ceil(((eval_prompt or L) + EVAL_GENERATE_TOKENS) / KV_STEP) * KV_STEP
        eval_kv = 2 * nl * gb * K * hd * positions * s
        notes["eval_kv"] = f"train.eval_generate: {gb} sequences x {positions} positions"
    return MemoryEstimate(
        weights=int(weight_bytes), lora=int(lora_bytes), optimizer=int(2 * lora_bytes), gradients=int(2 * lora_bytes),
        activations=int(saved + head), backward=int(backward), logits=int(logits), batch=int(batch), eval_kv=int(eval_kv),
        batch_size=B, length=L, packed=bool(packed), grad_checkpoint=bool(grad_checkpoint), dtype=dtype, notes=notes,
    )


def _packing_modes(packing) -> list[bool]:
    return [True, False] if packing == "auto" else [bool(packing)]


def estimate(config: Any = None, overrides: Optional[list[str]] = None, *, spec: Optional[ModelSpec] = None,
             **kwargs: Any) -> MemoryEstimate:
    """Peak memory of a training step from the config alone: config.json / GGUF metadata, no weights loaded,
    micro-batches of train.batch_size rows x data.max_length positions (the most a row can hold)."""
    from .config import load_config

    cfg = load_config(config, overrides, **kwargs)
    if not cfg.model.path:
        raise ConfigError("model.path: not set; point it at a Hugging Face model dir, a .gguf file or a hub id")
    spec = spec or model_spec(cfg.model.path, cfg.model.dtype, cfg.model.quantize)
    return _estimate_for(cfg, spec, [(cfg.train.batch_size, cfg.data.max_length, p) for p in _packing_modes(cfg.data.packing)])


def _estimate_for(cfg, spec: ModelSpec, shapes: Sequence[tuple[int, int, bool]]) -> MemoryEstimate:
    plan = LoraPlan.from_config(cfg.lora, spec.args.num_hidden_layers)
    best = None
    for B, L, packed in shapes:
        est = estimate_memory(spec.args, weight_bytes=spec.weight_bytes, dtype=spec.dtype, batch_size=B, length=L,
                              lora=plan, packed=packed, grad_checkpoint=cfg.train.grad_checkpoint,
                              eval_generate=cfg.train.eval_generate, eval_prompt=cfg.data.max_length)
        if best is None or est.total > best.total:
            best = est
    best.notes["weights"] = spec.describe()
    return best


# ---------------------------------------------------------------------------------------------------------
# Available memory and the guard


def available_memory() -> tuple[Optional[int], str]:
    """(bytes this process can still use for MLX arrays, where the number comes from).

    Counts what MLX already holds (active + cached buffers) as usable, so the number compares with a peak that
    includes the weights already loaded. CPU: psutil's available RAM. Apple silicon: that, capped by Metal's
    recommended working set. CUDA: the device's free memory.
    """
    import mlx.core as mx

    held = 0
    try:
        held = mx.get_active_memory() + mx.get_cache_memory()
    except Exception:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().available
    except Exception:
        ram = None
    info = _device_info()
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    if on_gpu and "free_memory" in info:
        return int(info["free_memory"]) + held, "GPU memory free (CUDA)"
    if on_gpu and "max_recommended_working_set_size" in info:
        ws = int(info["max_recommended_working_set_size"])
        if ram is None:
            return ws, "Metal recommended working set"
        return min(ws, ram + held), "unified memory available (psutil, capped by Metal's recommended working set)"
    if ram is None:
        return None, "unknown (psutil missing)"
    return ram + held, "RAM available (psutil)"


def _device_info() -> dict:
    import mlx.core as mx

    for fn in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
        if fn is None:
            continue
        try:
            info = fn()
            if isinstance(info, dict):
                return info
        except Exception:
            continue
    return {}


def _backend() -> str:
    """cpu, metal or cuda: where MLX runs by default."""
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if "free_memory" in _device_info() or (cuda is not None and cuda.is_available()) else "metal"


def _alternatives(cfg, spec: ModelSpec, shapes, budget: Optional[int]) -> list[tuple[str, int]]:
    """Single changes that lower the peak, with their estimates: checkpointing, half batch, half length, 4-bit."""
    out = []
    tc, dc = cfg.train, cfg.data
    if not tc.grad_checkpoint:
        c = dataclasses.replace(cfg, train=dataclasses.replace(tc, grad_checkpoint=True))
        out.append(("train.grad_checkpoint: true", _estimate_for(c, spec, shapes).total))
    if max(b for b, _, _ in shapes) > 1:
        half = max(1, tc.batch_size // 2)
        c = cfg
        sh = [(max(1, b // 2), l, p) for b, l, p in shapes]
        out.append((f"train.batch_size: {half} with train.grad_accumulation: {tc.grad_accumulation * 2}",
                    _estimate_for(c, spec, sh).total))
    if dc.max_length > 256:
        sh = [(b, max(2, l // 2), p) for b, l, p in shapes]
        out.append((f"data.max_length: {dc.max_length // 2}", _estimate_for(cfg, spec, sh).total))
    if spec.quantized is None:
        wb, _ = weight_bytes(spec.args, spec.dtype, {"bits": 4, "group_size": 64})
        q = dataclasses.replace(spec, weight_bytes=wb, quantized={"bits": 4, "group_size": 64})
        out.append(("model.quantize: {bits: 4}", _estimate_for(cfg, q, shapes).total))
    return sorted(out, key=lambda x: x[1])


def _advice(cfg, spec: ModelSpec, shapes, budget: Optional[int]) -> str:
    alts = _alternatives(cfg, spec, shapes, budget)
    if not alts:
        return "use a machine with more memory"
    parts = [f"{what} (~{_gb(v)})" for what, v in alts]
    advice = "to lower it set " + ", or ".join(parts)
    if budget is not None and len(alts) > 1 and min(v for _, v in alts) > budget:  # no single change is enough
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_checkpoint=True))
        sh = [(max(1, b // 2), l, p) for b, l, p in shapes]
        q = spec
        if spec.quantized is None:
            wb, _ = weight_bytes(spec.args, spec.dtype, {"bits": 4, "group_size": 64})
            q = dataclasses.replace(spec, weight_bytes=wb, quantized={"bits": 4, "group_size": 64})
        advice += f"; checkpointing, half the batch and a 4-bit base together: ~{_gb(_estimate_for(c, q, sh).total)}"
    return advice


def memory_guard(cfg, model, train_batches) -> Optional[MemoryEstimate]:
    """The trainer's pre-flight check: estimate the largest micro-batch's peak and compare with the memory
    available; `train.memory_guard: warn` prints one warning line, `refuse` raises (exit code 2)."""
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    wb = sum(v.nbytes for _, v in params)
    dtype = str(model.model.norm.weight.dtype).rsplit(".", 1)[-1]  # norms keep the model's float dtype
    dtype = dtype if dtype in DTYPE_BYTES else "float32"
    q = None
    for _, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size"):
            q = {"bits": int(m.bits), "group_size": int(m.group_size)}
            break
    n = sum(v.size for _, v in params)
    spec = ModelSpec(model.args, str(getattr(model, "source", {}).get("path", "")), wb, n, dtype, q)
    shapes = sorted({(int(b.inputs.shape[0]), int(b.inputs.shape[1]), b.segment_ids is not None) for b in train_batches})
    if not shapes:
        return None
    est = _estimate_for(cfg, spec, shapes)
    budget, where = available_memory()
    if budget is None or est.total <= budget:
        return est
    B, L = est.batch_size, est.length
    msg = (f"train.memory_guard: the estimated peak memory {_gb(est.total)} (micro-batch {B}x{L}, "
           f"grad checkpointing {'on' if cfg.train.grad_checkpoint else 'off'}) exceeds the {_gb(budget)} {where}; "
           f"{_advice(cfg, spec, shapes, budget)}; `mlxtune estimate -c CONFIG` shows the breakdown")
    if cfg.train.memory_guard == "refuse":
        raise MlxtuneError(msg + " (train.memory_guard: warn continues anyway)")
    print(f"warning: {msg} (train.memory_guard: refuse stops instead, off silences this)", file=sys.stderr, flush=True)
    return est


# ---------------------------------------------------------------------------------------------------------
# doctor


@dataclass
class Check:
    status: str  # ok | warn | fail
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" — fix: {self.fix}" if self.fix and self.status != "ok" else ""
        return f"{self.status:<5} {self.name:<14} {self.detail}{fix}"


OPENBLAS_FIX = ("apt-get install -y libopenblas0-pthread, then "
                "export LD_PRELOAD=$(dpkg -L libopenblas0-pthread | grep 'libopenblas.so.0$') before running mlxtune")
SLOW_BLAS_GFLOPS = 20.0
EXTRAS = (
    ("torch", "torch", "BERTScore and PEFT export tests", "pip install torch"),
    ("peft", "peft", "checking PEFT exports in transformers", "pip install peft"),
    ("gguf", "gguf", "GGUF K-quant reading and GGUF export", "pip install gguf"),
    ("bert-score", "bert_score", "BERTScore in mlxtune eval", "pip install 'mlxtune[bertscore]'"),
    ("pyarrow", "pyarrow", "Parquet data files", "pip install 'mlxtune[parquet]'"),
    ("matplotlib", "matplotlib", "loss.png and eval plots", "pip install 'mlxtune[plot]'"),
)


def blas_gflops(n: int = 512, repeats: int = 3) -> float:
    """fp32 matmul throughput on the default device, GFLOP/s (best of `repeats`)."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _writable(path: Path) -> tuple[bool, str]:
    """Can we create files under `path` (creating it if needed)? Checked by writing and removing a temp file."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return False, f"{probe} is a file, not a directory"
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".mlxtune-doctor-"):
            pass
        return True, ""
    except OSError as e:
        return False, f"{e.strerror or e}"


def doctor_checks(output_dir: Optional[str] = None, blas: bool = True) -> list[Check]:
    checks: list[Check] = []
    v = sys.version_info
    checks.append(Check("ok" if v >= (3, 10) else "fail", "python", f"{platform.python_version()} ({sys.executable})",
                        "use Python 3.10 or newer"))
    try:
        import mlx.core as mx
        from importlib.metadata import version

        mlx_v = getattr(mx, "__version__", "?")
        try:
            lm = version("mlx-lm")
        except Exception:
            lm = "missing"
        checks.append(Check("ok" if lm != "missing" else "fail", "mlx", f"mlx {mlx_v}, mlx-lm {lm}", "pip install mlx-lm"))
    except Exception as e:  # pragma: no cover - mlxtune imports mlx everywhere
        checks.append(Check("fail", "mlx", f"cannot import mlx ({e})",
                            "pip install 'mlxtune[cpu]' (Linux CPU), 'mlxtune[cuda]' (NVIDIA) or mlxtune (macOS)"))
        return checks
    info = _device_info()
    name = info.get("device_name") or info.get("architecture") or ""
    backend = _backend()
    checks.append(Check("ok", "backend", f"{backend} ({name})".replace(" ()", "")))
    budget, where = available_memory()
    try:
        import psutil

        total = psutil.virtual_memory().total
        mem = f"{_gb(budget)} {where}; {_gb(total)} RAM in total" if budget else f"{_gb(total)} RAM in total"
    except Exception:
        mem = f"{_gb(budget)} {where}" if budget else where
    if budget is None:
        checks.append(Check("warn", "memory", mem, "pip install psutil"))
    elif budget < 4 * GB:
        checks.append(Check("warn", "memory", mem, "close other programs; train with model.quantize: {bits: 4}, "
                            "train.grad_checkpoint: true and a smaller train.batch_size (`mlxtune estimate` shows the need)"))
    else:
        checks.append(Check("ok", "memory", mem))
    if blas and backend == "cpu":
        g = blas_gflops()
        preload = os.environ.get("LD_PRELOAD", "")
        note = f"fp32 matmul {g:.1f} GFLOP/s" + (" (OpenBLAS preloaded)" if "openblas" in preload.lower() else "")
        if g < SLOW_BLAS_GFLOPS and sys.platform.startswith("linux"):
            checks.append(Check("warn", "blas", note + "; MLX's CPU wheel bundles a slow reference BLAS", OPENBLAS_FIX))
        elif g < SLOW_BLAS_GFLOPS:
            checks.append(Check("warn", "blas", note + "; CPU training will be slow", "train on a GPU (Metal or CUDA)"))
        else:
            checks.append(Check("ok", "blas", note))
    from .data import cache_dir

    try:
        from huggingface_hub import constants

        hf_cache = Path(constants.HF_HUB_CACHE)
        offline = bool(constants.HF_HUB_OFFLINE)
    except Exception:
        hf_cache, offline = Path.home() / ".cache" / "huggingface" / "hub", False
    dirs = [("output dir", Path(output_dir or "runs")), ("hub cache", hf_cache), ("data cache", cache_dir())]
    for label, d in dirs:
        ok, why = _writable(d)
        fix = {"output dir": "choose a writable output_dir (config) or run from a writable directory",
               "hub cache": "set HF_HOME (or HF_HUB_CACHE) to a writable directory",
               "data cache": "set MLXTUNE_CACHE to a writable directory"}[label]
        checks.append(Check("ok" if ok else "fail", label, f"{d} {'writable' if ok else 'not writable: ' + why}", fix))
    if offline:
        checks.append(Check("warn", "hub", "HF_HUB_OFFLINE=1: hub ids resolve only from the local cache",
                            "unset HF_HUB_OFFLINE to download, or pass local model dirs"))
    from importlib.metadata import PackageNotFoundError, version

    for dist, module, what, fix in EXTRAS:
        if importlib.util.find_spec(module) is None:
            checks.append(Check("warn", dist, f"not installed (optional: {what})", fix))
        else:
            try:
                ver = version(dist)
            except PackageNotFoundError:
                ver = "?"
            checks.append(Check("ok", dist, f"{ver} ({what})"))
    return checks


# ---------------------------------------------------------------------------------------------------------
# download

DATA_PATTERNS = ["*.jsonl", "*.json", "*.parquet", "*/*.jsonl", "*/*.json", "*/*.parquet"]
SAFE_SUFFIXES = (".json", ".safetensors", ".model", ".tiktoken", ".txt", ".jinja", ".gguf", ".jsonl", ".parquet")


def download(kind: str, repo_id: str, revision: Optional[str] = None, include: Sequence[str] = ()) -> Path:
    """Fetch a model (safetensors, JSON and tokenizer files only: no pickles, no code) or a dataset (JSON/JSONL/
    Parquet) into the standard Hugging Face cache, with progress; an interrupted download resumes."""
    from .loading import HUB_PATTERNS

    if kind not in ("model", "data"):
        raise ConfigError(f"download: {kind!r} is not model or data")
    if Path(repo_id).expanduser().exists():
        raise ConfigError(f"{repo_id}: already a local path; use it directly (model.path / data.train: {repo_id})")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ConfigError(f"{repo_id!r} is not a hub id; expected org/name")
    for pat in include:
        if not pat.lower().endswith(SAFE_SUFFIXES):
            raise ConfigError(f"--include {pat!r}: only {', '.join(SAFE_SUFFIXES)} files are fetched "
                              "(pickles and code can run arbitrary code)")
    patterns = (list(HUB_PATTERNS) if kind == "model" else list(DATA_PATTERNS)) + list(include)
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(repo_id, repo_type="model" if kind == "model" else "dataset", revision=revision,
                                 allow_patterns=patterns)
    except Exception as e:
        raise MlxtuneError(_download_error(kind, repo_id, e, constants)) from None
    return Path(path)


def _download_error(kind: str, repo_id: str, e: Exception, constants) -> str:
    name = type(e).__name__
    field_ = "model.path" if kind == "model" else "data.train"
    local = f"download it where the hub is reachable (`hf download {repo_id}{' --repo-type dataset' if kind == 'data' else ''} --local-dir DIR`) and set {field_}: DIR"
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"{repo_id}: the hub has no accessible {'model' if kind == 'model' else 'dataset'} of that name or revision ({name}); check the id, or log in (`hf auth login`) for a gated repo"
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return f"cannot download {repo_id}: offline mode (HF_HUB_OFFLINE=1) and it is not in the cache ({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE, or {local}"
    reason = str(e).split("\n")[0][:160]
    return (f"cannot download {repo_id}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable ({name}: {reason}); "
            f"check the network or proxy and run it again (it resumes), or {local}")


# ---------------------------------------------------------------------------------------------------------
# CLI


def register_cli(sub) -> None:
    p = sub.add_parser("estimate", help="predict peak training memory from a config (no weights loaded)",
                       description="Predict the peak memory of a training step from the config alone: config.json or "
                                   "GGUF metadata, micro-batches of train.batch_size x data.max_length. Overrides work "
                                   "as for train: --train.batch_size 2 --train.grad_checkpoint true")
    p.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=_cli_estimate, accepts_overrides=True)

    d = sub.add_parser("doctor", help="check Python, MLX, backend, memory, BLAS speed, write access and extras",
                       description="Check the environment; each line is ok, warn or fail with the fix. Exit code 1 "
                                   "when something fails.")
    d.add_argument("-c", "--config", help="also check this config's output_dir")
    d.add_argument("--output-dir", help="the output dir to check (default: runs/)")
    d.add_argument("--no-blas", action="store_true", help="skip the matmul speed test")
    d.set_defaults(func=_cli_doctor)

    dl = sub.add_parser("download", help="fetch a model or dataset into the Hugging Face cache (safe files only)",
                        description="Download into the standard Hugging Face cache with progress; an interrupted "
                                    "download resumes. Models: safetensors, JSON and tokenizer files only (never "
                                    "pickles or code). Data: JSON, JSONL and Parquet files.")
    dl.add_argument("kind", choices=("model", "data"))
    dl.add_argument("id", metavar="ID", help="hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    dl.add_argument("--include", action="append", default=[], metavar="PATTERN",
                    help="also fetch files matching PATTERN (e.g. '*Q8_0.gguf'); safe file types only")
    dl.set_defaults(func=_cli_download)


def _cli_estimate(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    est = estimate(cfg)
    budget, where = available_memory()
    if args.json:
        print(json.dumps({**est.to_dict(), "available": budget, "available_source": where}, indent=2))
        return 0
    print(f"model       {cfg.model.path} ({est.notes.get('weights', '')})")
    print(f"micro-batch {est.batch_size} x {est.length} positions ({'packed rows' if est.packed else 'padded'}), "
          f"grad checkpointing {'on' if est.grad_checkpoint else 'off'}")
    for line in est.table():
        print(line)
    if budget is not None:
        verdict = "fits" if est.total <= budget else "does NOT fit"
        print(f"available   {_gb(budget)} ({where}): {verdict}")
        if est.total > budget:
            spec = model_spec(cfg.model.path, cfg.model.dtype, cfg.model.quantize)
            shapes = [(cfg.train.batch_size, cfg.data.max_length, p) for p in _packing_modes(cfg.data.packing)]
            print(f"            {_advice(cfg, spec, shapes, budget)}")
    print("(an estimate, +-15%; `train.memory_guard` checks it again with the real batches before training)")
    if _backend() == "cuda":
        print("note: calibrated on MLX's CPU backend; on CUDA (an H100) measured peaks ran 1.1-1.6x this estimate, "
              "most with gradient checkpointing: leave headroom")
    return 0


def _cli_doctor(args) -> int:
    out = args.output_dir
    if args.config:
        from .config import load_config

        out = load_config(args.config).output_dir
        out = str(Path(out).parent if Path(out).name else out)
    checks = doctor_checks(out, blas=not args.no_blas)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if c.status == "fail"]
    print(f"{len(failed)} failed, {sum(c.status == 'warn' for c in checks)} warnings")
    return 1 if failed else 0


def _cli_download(args) -> int:
    path = download(args.kind, args.id, args.revision, args.include)
    field_ = "model.path" if args.kind == "model" else "data.train"
    print(f"downloaded {args.id} to {path}")
    print(f"use it as {field_}: {args.id} (resolved from the cache, also offline) or {field_}: {path}")
    return 0
