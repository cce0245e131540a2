"""Predict the peak memory of a training step, and check it against the memory available before training.

    estimate(config)                        the peak of a micro-batch of train.batch_size x data.max_length, from
                                            the config alone (config.json / GGUF metadata: no weights loaded)
    memory_guard(cfg, model, train_batches) the trainer's pre-flight check (train.memory_guard: warn, refuse, off)
    available_memory()                      (bytes MLX may still use, where the number comes from)
    weight_bytes(args, dtype, quantize)     the base's exact in-memory size (modelspec.py)

The memory model (`estimate_memory`). The peak of one training micro-batch (the trainer evaluates every
micro-batch as it goes) is counted from the arrays the step holds when the backward pass reaches the top decoder
layer, read off model.py, lora.py, loss.py and step.py:

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

Which LoRA projections and layers are counted comes from `lora.plan_lora` (the selection apply_lora uses), run
on a model built lazily from ModelArgs: MLX arrays are lazy, so `Model(args)` allocates no weights.

Which constants are fitted: LAYER_TRANSIENT, ATTENTION_TRANSIENT and CKPT_PER_LAYER keep their counted values
(2, 2, 2); LOGITS_COPIES (counted 3, fitted 2), CHUNK_COPIES (fitted) and CKPT_RECOMPUTE (counted 1, fitted 0.6)
were calibrated against `mx.get_peak_memory()` around real `step.TrainStep` steps, run the way the trainer runs
them, in float32 on the CPU backend, over 27 configurations (`python tests/test_diagnostics.py --calibrate` prints
the table: all within 6% but LoRA on the top 2 of 4 layers only, +15%; the four held out for
tests/test_diagnostics.py, which asserts 15%, within 2.1%). The CPU backend runs each operation before the next,
so this is the step's live set; GPU backends add what the host's run-ahead keeps alive (benchmarks/NOTES.md).
Treat the estimate as +-15%; it counts MLX arrays, not the rest of the Python process or other programs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .errors import ConfigError, MlxtuneError
from .modelspec import DTYPE_BYTES, ModelSpec, linear_shapes, model_spec, weight_bytes

__all__ = ["estimate", "estimate_memory", "memory_guard", "available_memory", "weight_bytes", "model_spec",
           "LoraPlan", "MemoryEstimate", "MemoryCheck", "advice", "config_shapes", "device_info", "backend",
           "format_bytes"]

GB = 1e9
# Fitted constants of the memory model (see the module docstring; counted values in the comments).
LAYER_TRANSIENT = 2.0
"Cotangents alive while one layer is differentiated, in units of that layer's saved activations (counted: 2)."
ATTENTION_TRANSIENT = 2.0
"Attention-probability-sized temporaries while one layer is differentiated: dP and dS (counted: 2)."
LOGITS_COPIES = 2.0
"""Unchunked loss (N <= chunk): float32 (N, V) arrays alive (fitted 2: the logits' float32 copy and the gradient
written by the loss's fused cross-entropy; autodiff through the loss held 3)."""
CHUNK_COPIES = (0.5, 1.5, 6.0)
"""Chunked loss: min(a + b * n_chunks, c) float32 chunk-sized buffers alive (fitted: MLX overlaps neighbouring
chunks of the chain; with the hand-written cross-entropy gradient the ceiling fell from 11.5 to 6)."""
CKPT_PER_LAYER = 2.0
"With gradient checkpointing, elements of D per token kept per layer: its input and output (counted: 2)."
CKPT_RECOMPUTE = 0.6
"""With gradient checkpointing, the recomputed layer's activations, in units of a plain layer's saved ones (counted 1;
fitted 0.6: the backward frees the recomputed intermediates as it consumes them)."""
EVAL_GENERATE_BATCH = 8  # the trainer's validation generates in batches of 8
EVAL_GENERATE_TOKENS = 128  # ... up to 128 new tokens
KV_STEP = 256  # mlx-lm's KVCache grows in steps of 256 positions
FOUR_BIT = {"bits": 4, "group_size": 64}


def format_bytes(n: float) -> str:
    """`1.23 GB`, or `4.5 MB` below 10 MB."""
    return f"{n / GB:.2f} GB" if n >= 0.01 * GB else f"{n / 1e6:.1f} MB"


@dataclass
class LoraPlan:
    """What LoRA adds to a step: rank, the adapted projections (leaf names), the adapted layer indices, dropout."""

    rank: int
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    dropout: float = 0.0

    @classmethod
    def from_paths(cls, rank: int, paths: Sequence[str], dropout: float = 0.0) -> "LoraPlan":
        """From the module paths lora.plan_lora selects (`model.layers.3.self_attn.q_proj`, ...)."""
        leaves, layers = {}, set()
        for p in paths:
            rest = p.split(".layers.", 1)[1]
            layers.add(int(rest.split(".", 1)[0]))
            leaves[p.rsplit(".", 1)[-1]] = None
        return cls(int(rank), tuple(leaves), tuple(sorted(layers)), float(dropout))

    @classmethod
    def for_model(cls, model, lora_cfg) -> "LoraPlan":
        """The model's LoRA layers when it has some (their real rank and dropout), else lora_cfg's plan."""
        from .lora import lora_modules, plan_lora

        applied = lora_modules(model)
        if applied:
            m = next(iter(applied.values()))
            return cls.from_paths(m.rank, list(applied), float(getattr(m, "dropout", 0.0)))
        return cls.from_paths(lora_cfg.rank, plan_lora(model, lora_cfg.targets, lora_cfg.layers), lora_cfg.dropout)


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
    "One-line descriptions of some terms (weights, lora, activations, logits, eval_kv) for the breakdown table."

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


def _layer_elements(args, lora: LoraPlan) -> tuple[float, float]:
    """(elements, extra bytes) one decoder layer saves for its backward, per token (see the module docstring)."""
    D, F, H, hd = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.head_dim
    t = set(lora.targets)
    n = 2 * D  # inputs of input_layernorm and post_attention_layernorm
    n += 3 * H * hd  # scaled queries; keys and values broadcast over the query heads of each KV head
    n += 3 * F  # gate, silu(gate), up
    n += lora.rank * len(t)  # x @ A of each adapted projection
    if lora.dropout > 0:  # each adapted projection keeps its own dropped input, and the mask (one byte each)
        dropped = sum(linear_shapes(args)[x][0] for x in t)
        return n + dropped, float(dropped)
    # the inputs the LoRA A gradients read, shared by the projections that take the same input
    n += D if t & {"q_proj", "k_proj", "v_proj"} else 0  # normed input of q/k/v
    n += H * hd if "o_proj" in t else 0  # attention output
    n += D if t & {"gate_proj", "up_proj"} else 0  # normed input of gate/up
    n += F if "down_proj" in t else 0  # silu(gate) * up
    return n, 0.0


def _logits_bytes(N: int, V: int) -> tuple[float, int]:
    """(bytes of the loss's float32 logits buffers, tokens per chunk) for N tokens."""
    from .loss import chunk_size_for

    chunk = chunk_size_for(V)
    if N <= chunk:  # one piece: the logits and their gradient (softmax fused in by mx.compile)
        return LOGITS_COPIES * N * V * 4, N
    a, b, c = CHUNK_COPIES  # checkpointed chunks, chained (loss.py): a few chunk-sized buffers
    return min(a + b * math.ceil(N / chunk), c) * chunk * V * 4, chunk


def estimate_memory(args, *, weight_bytes: int, dtype: str, batch_size: int, length: int, lora: LoraPlan,
                    packed: bool = True, grad_checkpoint: bool = False, eval_generate: int = 0,
                    eval_prompt: Optional[int] = None) -> MemoryEstimate:
    """Peak memory of one training micro-batch of `batch_size` rows x `length` positions (see the module docstring).

    args: ModelArgs; weight_bytes: the base as held in memory; dtype: the activation dtype; eval_generate /
    eval_prompt: generation at evaluation (train.eval_generate examples, prompts up to eval_prompt tokens).
    """
    from .model import ATTENTION_CHUNK

    s = DTYPE_BYTES[dtype]
    D, H, K, hd, V = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.vocab_size
    nl, B, L = args.num_hidden_layers, int(batch_size), int(length)
    N = B * L
    shapes = linear_shapes(args)
    lora_params = len(lora.layers) * sum(lora.rank * (shapes[t][0] + shapes[t][1]) for t in lora.targets)
    lora_bytes = 4 * lora_params

    elems, extra = _layer_elements(args, lora)
    layer_linear = N * (elems * s + extra)
    if L <= ATTENTION_CHUNK:
        probs = probs_tmp = B * H * L * L * s  # attention probabilities (B, H, L, L), saved per layer
    else:  # query blocks under mx.checkpoint: nothing quadratic is saved; one block is recomputed at a time
        probs, probs_tmp = 0, B * H * ATTENTION_CHUNK * L * s
    n_backward = nl - min(lora.layers) if lora.layers else 0  # layers below the lowest LoRA layer need no backward
    if grad_checkpoint:  # each layer's input and output, plus the one layer being recomputed
        saved = n_backward * CKPT_PER_LAYER * N * D * s + CKPT_RECOMPUTE * layer_linear + probs
    else:
        saved = n_backward * (layer_linear + probs)
    head = 2 * N * D * s  # final norm input and output, kept for the loss
    backward = LAYER_TRANSIENT * layer_linear + ATTENTION_TRANSIENT * probs_tmp
    logits, chunk = _logits_bytes(N, V)
    notes = {
        "lora": (f"{lora_params / 1e6:.3g}M float32 parameters, rank {lora.rank}, {len(lora.targets)} projections x "
                 f"{len(lora.layers)} layers"),
        "activations": (f"{'checkpointed: ' if grad_checkpoint else ''}{n_backward} layers x {B}x{L} tokens, {dtype}"
                        + (", packed" if packed else "")),
        "logits": f"float32 chunks of {chunk} tokens x {V:,} vocabulary",
    }
    eval_kv = 0
    if eval_generate:
        gb = min(eval_generate, EVAL_GENERATE_BATCH)
        positions = math.ceil(((eval_prompt or L) + EVAL_GENERATE_TOKENS) / KV_STEP) * KV_STEP
        eval_kv = 2 * nl * gb * K * hd * positions * s
        notes["eval_kv"] = f"train.eval_generate: {gb} sequences x {positions} positions"
    return MemoryEstimate(
        weights=int(weight_bytes), lora=int(lora_bytes), optimizer=int(2 * lora_bytes), gradients=int(2 * lora_bytes),
        activations=int(saved + head), backward=int(backward), logits=int(logits), batch=int(N * 16),  # 4 int32 arrays
        eval_kv=int(eval_kv), batch_size=B, length=L, packed=bool(packed), grad_checkpoint=bool(grad_checkpoint),
        dtype=dtype, notes=notes,
    )


def config_shapes(cfg) -> list[tuple[int, int, bool]]:
    """The micro-batch shapes (rows, positions, packed) a config can produce at most: train.batch_size rows of
    data.max_length, packed or padded (both with data.packing: auto)."""
    modes = [True, False] if cfg.data.packing == "auto" else [bool(cfg.data.packing)]
    return [(cfg.train.batch_size, cfg.data.max_length, p) for p in modes]


def estimate(config: Any = None, overrides: Optional[list[str]] = None, *, spec: Optional[ModelSpec] = None,
             **kwargs: Any) -> MemoryEstimate:
    """Peak memory of a training step from the config alone: config.json / GGUF metadata, no weights loaded,
    micro-batches of train.batch_size rows x data.max_length positions (the most a row can hold)."""
    from .config import load_config

    cfg = load_config(config, overrides, **kwargs)
    if not cfg.model.path:
        raise ConfigError("model.path: not set; point it at a Hugging Face model dir, a .gguf file or a hub id")
    spec = spec or model_spec(cfg.model.path, cfg.model.dtype, cfg.model.quantize)
    return estimate_for(cfg, spec, config_shapes(cfg))


def _plan(cfg, spec: ModelSpec, model=None) -> LoraPlan:
    if model is None:
        from .model import Model

        model = Model(spec.args)  # lazy: no weight is allocated, only the module tree plan_lora walks
    return LoraPlan.for_model(model, cfg.lora)


def estimate_for(cfg, spec: ModelSpec, shapes: Sequence[tuple[int, int, bool]], plan: Optional[LoraPlan] = None,
                 ) -> MemoryEstimate:
    """The largest estimate over micro-batch `shapes` (rows, positions, packed) for `spec` under `cfg`."""
    plan = plan or _plan(cfg, spec)
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


def device_info() -> dict:
    """MLX's device information (free_memory on CUDA, max_recommended_working_set_size on Metal, ...), or {}."""
    import mlx.core as mx

    for fn in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
        try:
            info = fn() if fn is not None else None
        except Exception:
            continue
        if isinstance(info, dict):
            return info
    return {}


def backend() -> str:
    """cpu, metal or cuda: where MLX runs by default."""
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if "free_memory" in device_info() or (cuda is not None and cuda.is_available()) else "metal"


def available_memory() -> tuple[Optional[int], str]:
    """(bytes this process can still use for MLX arrays, where the number comes from).

    Counts what MLX already holds (active + cached buffers) as usable, so the number compares with a peak that
    includes the weights already loaded. CPU: psutil's available RAM. Apple silicon: that, capped by Metal's
    recommended working set. CUDA: the device's free memory.
    """
    import mlx.core as mx

    try:
        held = mx.get_active_memory() + mx.get_cache_memory()
    except Exception:
        held = 0
    try:
        import psutil

        ram = psutil.virtual_memory().available
    except Exception:
        ram = None
    info = device_info()
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


def _four_bit(spec: ModelSpec) -> ModelSpec:
    wb, _ = weight_bytes(spec.args, spec.dtype, FOUR_BIT)
    return dataclasses.replace(spec, weight_bytes=wb, quantized=dict(FOUR_BIT))


def _alternatives(cfg, spec: ModelSpec, shapes, plan: LoraPlan) -> list[tuple[str, int]]:
    """Single changes that lower the peak, with their estimates: checkpointing, half batch, half length, 4-bit."""
    out = []
    tc, dc = cfg.train, cfg.data
    if not tc.grad_checkpoint:
        c = dataclasses.replace(cfg, train=dataclasses.replace(tc, grad_checkpoint=True))
        out.append(("train.grad_checkpoint: true", estimate_for(c, spec, shapes, plan).total))
    if max(b for b, _, _ in shapes) > 1:
        sh = [(max(1, b // 2), l, p) for b, l, p in shapes]
        out.append((f"train.batch_size: {max(1, tc.batch_size // 2)} with train.grad_accumulation: "
                    f"{tc.grad_accumulation * 2}", estimate_for(cfg, spec, sh, plan).total))
    if dc.max_length > 256:
        sh = [(b, max(2, l // 2), p) for b, l, p in shapes]
        out.append((f"data.max_length: {dc.max_length // 2}", estimate_for(cfg, spec, sh, plan).total))
    if spec.quantized is None:
        out.append(("model.quantize: {bits: 4}", estimate_for(cfg, _four_bit(spec), shapes, plan).total))
    return sorted(out, key=lambda x: x[1])


def advice(cfg, spec: ModelSpec, shapes: Sequence[tuple[int, int, bool]], budget: Optional[int],
           plan: Optional[LoraPlan] = None) -> str:
    """What to change so the peak fits `budget`: each single change with its estimate, and all of them together
    when no single one is enough."""
    plan = plan or _plan(cfg, spec)
    alts = _alternatives(cfg, spec, shapes, plan)
    if not alts:
        return "use a machine with more memory"
    text = "to lower it set " + ", or ".join(f"{what} (~{format_bytes(v)})" for what, v in alts)
    if budget is not None and len(alts) > 1 and min(v for _, v in alts) > budget:  # no single change is enough
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_checkpoint=True))
        sh = [(max(1, b // 2), l, p) for b, l, p in shapes]
        q = _four_bit(spec) if spec.quantized is None else spec
        text += (f"; checkpointing, half the batch and a 4-bit base together: "
                 f"~{format_bytes(estimate_for(c, q, sh, plan).total)}")
    return text


@dataclass
class MemoryCheck:
    """memory_guard's result: the estimate, the memory available and, when it does not fit under
    train.memory_guard: warn, the one-line warning the caller shows (`warning: ...` on stderr)."""

    estimate: MemoryEstimate
    budget: Optional[int]
    source: str
    warning: Optional[str] = None

    @property
    def fits(self) -> bool:
        return self.budget is None or self.estimate.total <= self.budget


def _spec_of(model) -> ModelSpec:
    """A loaded model's ModelSpec: its weights as held (LoRA excluded), its float dtype, its quantization."""
    from mlx.utils import tree_flatten

    params = [(k, v) for k, v in tree_flatten(model.parameters()) if not k.endswith((".lora_a", ".lora_b"))]
    dtype = str(model.model.norm.weight.dtype).rsplit(".", 1)[-1]  # norms keep the model's float dtype
    q = next(({"bits": int(m.bits), "group_size": int(m.group_size)} for _, m in model.named_modules()
              if hasattr(m, "bits") and hasattr(m, "group_size")), None)
    return ModelSpec(model.args, str(getattr(model, "source", {}).get("path", "")), sum(v.nbytes for _, v in params),
                     sum(v.size for _, v in params), dtype if dtype in DTYPE_BYTES else "float32", q)


def memory_guard(cfg, model, train_batches) -> Optional[MemoryCheck]:
    """The trainer's pre-flight check: the largest micro-batch's estimated peak against the memory available.

    Returns None without batches. When the peak exceeds the budget, `train.memory_guard: refuse` raises
    MlxtuneError (exit code 2) and `warn` returns a MemoryCheck whose `warning` the caller prints; each says
    what to change. The LoRA counted is the model's own when it already has LoRA layers, else cfg.lora's plan.
    """
    spec = _spec_of(model)
    shapes = sorted({(int(b.inputs.shape[0]), int(b.inputs.shape[1]), b.segment_ids is not None)
                     for b in train_batches})
    if not shapes:
        return None
    plan = _plan(cfg, spec, model)
    est = estimate_for(cfg, spec, shapes, plan)
    budget, where = available_memory()
    check = MemoryCheck(est, budget, where)
    if check.fits or cfg.train.memory_guard == "off":
        return check
    msg = (f"train.memory_guard: the estimated peak memory {format_bytes(est.total)} (micro-batch "
           f"{est.batch_size}x{est.length}, grad checkpointing {'on' if cfg.train.grad_checkpoint else 'off'}) exceeds "
           f"the {format_bytes(budget)} {where}; {advice(cfg, spec, shapes, budget, plan)}; "
           "`mlxtune estimate -c CONFIG` shows the breakdown")
    if cfg.train.memory_guard == "refuse":
        raise MlxtuneError(msg + " (train.memory_guard: warn continues anyway)")
    check.warning = msg + " (train.memory_guard: refuse stops instead, off silences this)"
    return check
