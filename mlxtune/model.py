"""One decoder for Llama 3.x and Qwen2/2.5, built from a Hugging Face `config.json`.

Weight names are Hugging Face's verbatim (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), so a
safetensors file loads with no key map.

The forward follows mlx-lm's model protocol (`__call__(inputs, cache=None)`, `.layers`, `make_cache()`), so
mlx-lm's generation, sampling and KV-cache utilities run on it unchanged. On top of that it accepts:

- `segment_ids` (B, L) and `positions` (B, L): packed rows, where each example attends only within its own
  segment (block-diagonal causal mask) and RoPE positions restart at every example;
- `return_hidden=True`: the final normed hidden states (B, L, D) instead of logits, so the loss can apply the
  output projection in chunks and never materialize B x L x V float32 logits.

Gradient checkpointing is a flag on the model (`model.grad_checkpoint = True`), applied per decoder layer
with `mx.checkpoint`; no class is patched. LoRA dropout keys are explicit: in training each layer gets a key,
split per projection and passed to projections that declare `takes_dropout_key`, so a recomputed layer
draws the masks of its forward.

Shapes: B batch, L sequence, D hidden, H query heads, K key/value heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import ModelLoadError
from .modelconfig import CONFIG_MAXIMA, check_config_domains

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass
class ModelArgs:
    """The architecture, in Hugging Face's config.json names."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: bias on q/k/v/o; qwen2 always has q/k/v bias (see qkv_bias)
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: Optional[Any] = None
    eos_token_id: Optional[Any] = None
    extra: dict = field(default_factory=dict)  # unknown config.json keys, written back on save

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                                 f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """Read a config.json dict in either dialect.

        transformers 4 writes top-level `rope_theta` / `rope_scaling`; transformers 5 writes
        `rope_parameters: {rope_theta, rope_type, factor, ...}`. Both are read; when both are present they
        must agree.
        """
        config = dict(config)
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"{source}: model_type {model_type!r:.40} is not supported; mlxtune runs "
                                 f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 3.x, Qwen2/2.5)")
        if config.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: use_sliding_window=true is not supported (Qwen2 sliding-window attention)")
        rope_params = config.pop("rope_parameters", None)
        if isinstance(rope_params, dict) and rope_params:
            rope_params = dict(rope_params)
            theta = rope_params.pop("rope_theta", None)
            if theta is not None:
                config.setdefault("rope_theta", theta)
            rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rope_type != "default" and not config.get("rope_scaling"):
                config["rope_scaling"] = rope_params
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size") if k not in config]
        if missing:
            raise ModelLoadError(f"{source}: missing required field(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in config.items() if k in known}
        extra = {k: v for k, v in config.items() if k not in known}
        for k in CONFIG_MAXIMA:
            v = kwargs.get(k)
            if isinstance(v, float) and v.is_integer():
                kwargs[k] = v = int(v)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ModelLoadError(f"{source}: {k}: expected a positive integer, got {v!r:.60}")
        check_config_domains(kwargs, source)
        scaling = kwargs.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            kwargs["rope_scaling"] = None
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # wrong value types
            raise ModelLoadError(f"{source}: {e}") from None
        except ModelLoadError as e:  # __post_init__'s checks name config.json; name the actual file
            raise ModelLoadError(str(e).replace("config.json:", f"{source}:", 1)) from None

    def to_hf_config(self) -> dict:
        """config.json for transformers 4 and 5 and mlx-lm: top-level rope fields plus `rope_parameters`."""
        d = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        d = {**self.extra, **d}
        d["architectures"] = ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"]
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            scaling = dict(self.rope_scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            d["rope_scaling"] = scaling
            rope_parameters.update(scaling)
        else:
            d.pop("rope_scaling", None)
        d["rope_parameters"] = rope_parameters
        if self.model_type == "qwen2":
            d.pop("attention_bias", None)
            d.pop("mlp_bias", None)
        return d


def rope_inv_freq(args: ModelArgs) -> mx.array:
    """Inverse frequencies (hd/2,) with llama3 / linear scaling, as transformers computes them (float32)."""
    dims = args.head_dim
    inv = 1.0 / (args.rope_theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    s = args.rope_scaling
    if not s:
        return inv
    rtype = s.get("rope_type", s.get("type"))
    if rtype == "linear":
        return inv / float(s["factor"])
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = mx.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) / factor * scaled + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return mx.where(is_medium, smoothed, scaled)


def rope_tables(inv_freq: mx.array, positions: mx.array) -> tuple[mx.array, mx.array]:
    """cos, sin (B, 1, L, hd/2) float32 for explicit per-token positions (B, L)."""
    angles = positions.astype(mx.float32)[:, None, :, None] * inv_freq  # (B, 1, L, hd/2)
    return mx.cos(angles), mx.sin(angles)


def apply_rope_tables(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE (transformers' convention) on x (B, H, L, hd) with precomputed tables."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(mx.float32), x[..., half:].astype(mx.float32)
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def segment_mask(segment_ids: mx.array) -> mx.array:
    """Boolean (B, 1, L, L): causal and within the same segment; True = may attend."""
    L = segment_ids.shape[1]
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


# Training on sequences longer than this computes attention a block of queries at a time (see chunked_attention).
ATTENTION_CHUNK = 2048


def chunked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, chunk: int) -> mx.array:
    """Causal attention a block of `chunk` queries at a time, each block under mx.checkpoint.

    The backward pass of fused attention materializes the (H, L, L) scores; for one 8,192-token sequence of a
    3B model that is several GB per layer. Blocks of queries bound it to (H, chunk, L), and causality lets
    block i read only keys [0, end of block i). Same function, exactly: each query row sees the same keys.
    q (B, H, L, hd), k/v (B, K, L, hd); mask "causal" or a boolean (B, 1, L, L) segment mask.
    """
    L = q.shape[2]
    outs = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        if isinstance(mask, mx.array):
            m = mask[..., s:e, :e]
            fn = partial(_attend, scale=scale, mask=m)
        else:
            fn = partial(_attend, scale=scale, mask="causal")
        outs.append(mx.checkpoint(fn)(q[:, :, s:e], k[:, :, :e], v[:, :, :e]))
    return mx.concatenate(outs, axis=2)


def _attend(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, K, hd = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, hd
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(D, H * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=args.o_bias)
        # 1/inv_freq: the per-dimension wavelengths mx.fast.rope takes as `freqs`.
        self._freqs = 1.0 / rope_inv_freq(args)
        mx.eval(self._freqs)  # a constant: never let a lazy graph ride along into every compiled step

    def _rope(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)

    def __call__(self, x: mx.array, mask=None, cache=None, rope: Optional[tuple] = None, key=None) -> mx.array:
        B, L, _ = x.shape
        kq, kk, kv, ko = mx.random.split(key, 4) if key is not None else (None,) * 4
        q = project(self.q_proj, x, kq).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = project(self.k_proj, x, kk).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = project(self.v_proj, x, kv).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if rope is not None:  # explicit positions (packed rows)
            q, k = apply_rope_tables(q, *rope), apply_rope_tables(k, *rope)
        elif cache is not None:
            q, k = self._rope(q, cache.offset), self._rope(k, cache.offset)
            k, v = cache.update_and_fetch(k, v)
        else:
            q, k = self._rope(q), self._rope(k)
        if cache is not None and rope is None:
            from mlx_lm.models.base import scaled_dot_product_attention

            o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        elif self.training and L > ATTENTION_CHUNK and (mask is None or isinstance(mask, str) or mask.shape[-2] == L):
            o = chunked_attention(q, k, v, self.scale, mask, ATTENTION_CHUNK)
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return project(self.o_proj, o.transpose(0, 2, 1, 3).reshape(B, L, -1), ko)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.up_proj = nn.Linear(D, F, bias=args.mlp_bias)
        self.down_proj = nn.Linear(F, D, bias=args.mlp_bias)

    def __call__(self, x: mx.array, key=None) -> mx.array:
        kg, ku, kd = mx.random.split(key, 3) if key is not None else (None,) * 3
        return project(self.down_proj, nn.silu(project(self.gate_proj, x, kg)) * project(self.up_proj, x, ku), kd)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None, rope: Optional[tuple] = None, key=None) -> mx.array:
        """`key`: PRNG key for this layer's LoRA dropout masks (split per projection); None: the global RNG."""
        ka, km = mx.random.split(key) if key is not None else (None, None)
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, rope, ka)
        return h + self.mlp(self.post_attention_layernorm(h), km)


def project(layer: nn.Module, x: mx.array, key: Optional[mx.array] = None) -> mx.array:
    """`layer(x)`; a layer that declares `takes_dropout_key` (LoRA) also gets `key` for its dropout mask."""
    if key is not None and getattr(layer, "takes_dropout_key", False):
        return layer(x, key)
    return layer(x)


def layer_key() -> mx.array:
    """A fresh PRNG key drawn from the global RNG (advancing it), for one layer's dropout masks."""
    return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)


def checkpointed_call(layer: nn.Module, x: mx.array, mask=None, rope=None, key: Optional[mx.array] = None) -> mx.array:
    """`layer(x, mask, None, rope)` under `mx.checkpoint`: activations are recomputed in the backward pass.

    Only what needs a gradient is passed to the checkpoint as an input: the layer's trainable parameters
    (closed-over arrays are constants to mx.checkpoint, so they would get no gradient) and x. The attention
    mask, the RoPE tables and the dropout key are bound instead: a checkpoint asks for the gradient of every
    input, and the CUDA attention kernel refuses a gradient with respect to a mask. The key makes the
    recomputation draw the same dropout masks as the forward.
    """

    def inner(params, x):
        layer.update(params)
        return layer(x, mask, None, rope, key)

    return mx.checkpoint(inner)(layer.trainable_parameters(), x)


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Set by lora.apply_lora when some LoRA layer has dropout: layers then draw explicit dropout keys
        # (5% of a 3B step on an H100 when done needlessly).
        self.lora_dropout = False
        self._inv_freq = rope_inv_freq(args)
        mx.eval(self._inv_freq)

    def __call__(
        self, inputs: mx.array, cache=None, segment_ids=None, positions=None, grad_checkpoint=False, training=False
    ) -> mx.array:
        h = self.embed_tokens(inputs)
        B, L = inputs.shape
        rope = None
        if segment_ids is not None or positions is not None:
            if cache is not None:
                raise ValueError("segment_ids/positions are for training and scoring, not with a KV cache")
            if positions is None:  # positions restart at every segment boundary
                positions = segment_positions(segment_ids)
            rope = rope_tables(self._inv_freq, positions)
            mask = segment_mask(segment_ids) if segment_ids is not None else "causal"
        elif cache is not None:
            from mlx_lm.models.base import create_attention_mask

            mask = create_attention_mask(h, cache[0])
        else:
            mask = "causal" if L > 1 else None
        if cache is None:
            cache = [None] * len(self.layers)
        keyed = training and self.lora_dropout  # per-layer dropout keys: checkpointed == plain, exactly
        for layer, c in zip(self.layers, cache):
            key = layer_key() if keyed and c is None else None
            if c is None and training and grad_checkpoint:
                h = checkpointed_call(layer, h, mask, rope, key)
            else:
                h = layer(h, mask, c, rope, key)
        return self.norm(h)


def segment_positions(segment_ids: mx.array) -> mx.array:
    """Positions (B, L) that restart at 0 at every change of segment id along each row."""
    B, L = segment_ids.shape
    idx = mx.broadcast_to(mx.arange(L)[None], (B, L))
    starts = mx.concatenate(
        [mx.ones((B, 1), dtype=mx.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = mx.cummax(mx.where(starts, idx, 0), axis=1)
    return idx - start_idx


class Model(nn.Module):
    """Causal LM: `model.*` decoder plus `lm_head` (absent when tied to the embeddings)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DecoderModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.grad_checkpoint = False

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        *,
        segment_ids: Optional[mx.array] = None,
        positions: Optional[mx.array] = None,
        return_hidden: bool = False,
        **_: Any,
    ) -> mx.array:
        """inputs (B, L) int → logits (B, L, V), or hidden states (B, L, D) with `return_hidden`."""
        h = self.model(inputs, cache, segment_ids, positions, self.grad_checkpoint, self.training)
        return h if return_hidden else self.project(h)

    def project(self, h: mx.array) -> mx.array:
        """Output projection: hidden (..., D) → logits (..., V)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def output_weight(self) -> nn.Module:
        """The module that produces logits (the embedding when tied), for chunked losses."""
        return self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head

    @property
    def layers(self) -> list:
        return self.model.layers

    def make_cache(self) -> list:
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict) -> dict:
        """Drop what transformers may save that the model does not hold (rotary tables, a tied head)."""
        out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out


def num_parameters(model: nn.Module) -> int:
    """Parameter count, with quantized weights counted at their logical (unpacked) size."""
    from mlx.utils import tree_flatten

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += module.weight.size * 32 // module.bits
            if "bias" in module:
                total += module.bias.size
            continue
    quantized = {name for name, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    for name, p in tree_flatten(model.parameters()):
        owner = name.rsplit(".", 1)[0]
        if owner in quantized:
            continue
        total += p.size
    return total
