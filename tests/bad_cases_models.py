"""Bad-input cases for model and adapter inputs (issue 15): config.json field domains and cross-field lies, weights
of the wrong dtype or shape, GGUF header lies (counts, lengths, offsets, types), adapters with non-finite values,
wrong shapes or a mismatched base fingerprint, and fuse / export onto their inputs or existing outputs.
(`case` and `Ctx`: bad_inputs_lib.py.)"""

from __future__ import annotations

import math
import os
import shutil
import struct
from pathlib import Path

from bad_inputs_lib import case

# --------------------------------------------------------------------------------------------------------------
# config.json: each field in its domain, the fields consistent with each other and with the weights / tokenizer


def _cfg(t, **changes) -> list[str]:
    return t.train({"model.path": str(t.edit_config_json(t.model_copy(), **changes))})


@case("model-cfg-hidden-size-impossible", "config.json: hidden_size=1048576 is larger than any model can be")
def _(t): return _cfg(t, hidden_size=1 << 20)
@case("model-cfg-layers-zero", "config.json: num_hidden_layers: expected a positive integer, got 0")
def _(t): return _cfg(t, num_hidden_layers=0)
@case("model-cfg-layers-negative", "config.json: num_hidden_layers: expected a positive integer, got -2")
def _(t): return _cfg(t, num_hidden_layers=-2)
@case("model-cfg-layers-impossible", "config.json: num_hidden_layers=100000 is larger than any model can be")
def _(t): return _cfg(t, num_hidden_layers=100000)
@case("model-cfg-layers-bool", "config.json: num_hidden_layers: expected a positive integer, got True")
def _(t): return _cfg(t, num_hidden_layers=True)
@case("model-cfg-layers-more-than-weights", "the weights do not match config.json", "missing model.layers.2")
def _(t): return _cfg(t, num_hidden_layers=3)
@case("model-cfg-vocab-impossible", "config.json: vocab_size=1000000000000 is larger than any model can be")
def _(t): return _cfg(t, vocab_size=10**12)
@case("model-cfg-vocab-below-tokenizer", "config.json: vocab_size=100 is smaller than the tokenizer's 259 tokens")
def _(t): return _cfg(t, vocab_size=100)
@case("model-cfg-intermediate-zero", "config.json: intermediate_size: expected a positive integer, got 0")
def _(t): return _cfg(t, intermediate_size=0)
@case("model-cfg-intermediate-negative", "config.json: intermediate_size: expected a positive integer, got -64")
def _(t): return _cfg(t, intermediate_size=-64)
@case("model-cfg-hidden-fractional", "config.json: hidden_size: expected a positive integer, got 32.5")
def _(t): return _cfg(t, hidden_size=32.5)
@case("model-cfg-heads-do-not-divide-hidden", "config.json: num_attention_heads=5 does not divide hidden_size=32")
def _(t): return _cfg(t, num_attention_heads=5, num_key_value_heads=1, head_dim=None)
@case("model-cfg-heads-impossible", "config.json: num_attention_heads=4096 is larger than any model can be")
def _(t): return _cfg(t, num_attention_heads=4096)
@case("model-cfg-kv-heads-more-than-heads", "config.json: num_key_value_heads=8 is more than num_attention_heads=4")
def _(t): return _cfg(t, num_key_value_heads=8)
@case("model-cfg-kv-heads-zero", "config.json: num_key_value_heads: expected a positive integer, got 0")
def _(t): return _cfg(t, num_key_value_heads=0)
@case("model-cfg-head-dim-odd", "config.json: head_dim=7 is odd")
def _(t): return _cfg(t, head_dim=7)
@case("model-cfg-head-dim-impossible", "config.json: head_dim=4096 is larger than any model can be")
def _(t): return _cfg(t, head_dim=4096)
@case("model-cfg-head-dim-string", "config.json: head_dim: expected a positive integer, got '8'")
def _(t): return _cfg(t, head_dim="8")
@case("model-cfg-max-positions-zero", "config.json: max_position_embeddings: expected a positive integer, got 0")
def _(t): return _cfg(t, max_position_embeddings=0)
@case("model-cfg-max-positions-impossible", "config.json: max_position_embeddings=", "is larger than any model can be")
def _(t): return _cfg(t, max_position_embeddings=1e30)
@case("model-cfg-rope-theta-nan", "config.json: rope_theta: expected a finite positive number, got nan")
def _(t): return _cfg(t, rope_theta=math.nan, rope_parameters={"rope_type": "default"})
@case("model-cfg-rope-theta-inf", "config.json: rope_theta: expected a finite positive number, got inf")
def _(t): return _cfg(t, rope_theta=math.inf, rope_parameters={"rope_type": "default"})
@case("model-cfg-rope-theta-negative", "config.json: rope_theta: expected a finite positive number, got -1")
def _(t): return _cfg(t, rope_theta=-1, rope_parameters={"rope_type": "default"})
@case("model-cfg-rope-theta-string", "config.json: rope_theta: expected a finite positive number, got 'big'")
def _(t): return _cfg(t, rope_theta="big", rope_parameters={"rope_type": "default"})
@case("model-cfg-rope-parameters-theta-nan", "config.json: rope_theta: expected a finite positive number, got nan")
def _(t): return _cfg(t, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": math.nan})
@case("model-cfg-rms-norm-eps-zero", "config.json: rms_norm_eps: expected a finite positive number, got 0")
def _(t): return _cfg(t, rms_norm_eps=0)
@case("model-cfg-rms-norm-eps-huge", "config.json: rms_norm_eps=5 is not a small epsilon")
def _(t): return _cfg(t, rms_norm_eps=5)
@case("model-cfg-rope-scaling-a-list", "config.json: rope_scaling: expected an object or null")
def _(t): return _cfg(t, rope_scaling=[4.0])
@case("model-cfg-rope-scaling-factor-nan", "config.json: rope_scaling.factor: expected a finite positive number, got nan")
def _(t): return _cfg(t, rope_scaling={"rope_type": "linear", "factor": math.nan})
@case("model-cfg-rope-scaling-factor-zero", "config.json: rope_scaling.factor: expected a finite positive number, got 0")
def _(t): return _cfg(t, rope_scaling={"rope_type": "linear", "factor": 0})
@case("model-cfg-rope-llama3-freq-factors-swapped", "config.json: rope_scaling.high_freq_factor must be larger than low_freq_factor")
def _(t):
    return _cfg(t, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192})
@case("model-cfg-estimate-impossible-hidden", "config.json: hidden_size=1048576 is larger than any model can be")
def _(t): return ["estimate", "-c", str(t.config({"model.path": str(t.edit_config_json(t.model_copy(), hidden_size=1 << 20))}))]
@case("model-cfg-generate-heads-lie", "config.json: num_key_value_heads=8 is more than num_attention_heads=4")
def _(t): return ["generate", "--model", str(t.edit_config_json(t.model_copy(), num_key_value_heads=8)), "--prompt", "hi"]


# --------------------------------------------------------------------------------------------------------------
# Weights of the wrong dtype or shape


def _weights(t, edit) -> Path:
    import mlx.core as mx

    m = t.model_copy()
    w = dict(mx.load(str(m / "model.safetensors")))
    edit(w, mx)
    mx.save_safetensors(str(m / "model.safetensors"), w, metadata={"format": "pt"})
    return m


_EMB, _Q = "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"


@case("model-weights-int-embedding", f"{_EMB} in model.safetensors is int32, not a float weight")
def _(t): return t.train({"model.path": str(_weights(t, lambda w, mx: w.update({_EMB: w[_EMB].astype(mx.int32)})))})
@case("model-weights-uint8-norm", "model.norm.weight in model.safetensors is uint8, not a float weight")
def _(t): return t.train({"model.path": str(_weights(t, lambda w, mx: w.update({"model.norm.weight": w["model.norm.weight"].astype(mx.uint8)})))})
@case("model-weights-bool-projection", f"{_Q} in model.safetensors is bool, not a float weight")
def _(t): return t.train({"model.path": str(_weights(t, lambda w, mx: w.update({_Q: w[_Q] > 0})))})
@case("model-weights-int-generate", "is int16, not a float weight")
def _(t): return ["generate", "--model", str(_weights(t, lambda w, mx: w.update({_Q: w[_Q].astype(mx.int16)}))), "--prompt", "hi"]
@case("model-weights-cut-projection", f"{_Q} in model.safetensors has shape (32, 16), expected (32, 32)")
def _(t): return t.train({"model.path": str(_weights(t, lambda w, mx: w.update({_Q: w[_Q][:, :16]})))})
@case("model-weights-1d-where-2d", "model.layers.1.self_attn.o_proj.weight in model.safetensors has shape (1024,)")
def _(t): return t.train({"model.path": str(_weights(t, lambda w, mx: w.update({"model.layers.1.self_attn.o_proj.weight": w["model.layers.1.self_attn.o_proj.weight"].reshape(-1)})))})
@case("model-weights-unexpected-tensor", "unexpected model.layers.0.self_attn.extra_proj.weight in model.safetensors")
def _(t): return t.train({"model.path": str(_weights(t, lambda w, mx: w.update({"model.layers.0.self_attn.extra_proj.weight": mx.zeros((4,))})))})


# --------------------------------------------------------------------------------------------------------------
# GGUF header lies: every count, length, offset and type is bounded before it is used


def _gguf(t) -> Path:
    from core_helpers import hf_to_gguf

    return hf_to_gguf(t.model, t.tmp / "model.gguf")


def _layout(raw: bytes) -> dict:
    """Byte positions in a GGUF v3 header: 'kv' key → (type pos, value pos), 'tensors' [{field: pos}], counts."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    pos, kv, tensors = 24, {}, []

    def string(p):
        n = struct.unpack_from("<Q", raw, p)[0]
        return raw[p + 8:p + 8 + n].decode(), p + 8 + n

    def skip(p, vtype):
        if vtype in sizes:
            return p + sizes[vtype]
        if vtype == 8:
            return string(p)[1]
        etype, n = struct.unpack_from("<IQ", raw, p)
        p += 12
        for _ in range(n):
            p = skip(p, etype)
        return p

    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    for _ in range(n_kv):
        key_pos = pos
        key, pos = string(pos)
        vtype = struct.unpack_from("<I", raw, pos)[0]
        kv[key] = {"key": key_pos, "type": pos, "value": pos + 4}
        pos = skip(pos + 4, vtype)
    for _ in range(n_tensors):
        name_pos = pos
        name, pos = string(pos)
        n_dims = struct.unpack_from("<I", raw, pos)[0]
        tensors.append({"name": name, "name_pos": name_pos, "n_dims": pos, "dims": pos + 4,
                        "type": pos + 4 + 8 * n_dims, "offset": pos + 8 + 8 * n_dims})
        pos += 16 + 8 * n_dims
    return {"kv": kv, "tensors": tensors, "end": pos}


def _lie(t, fmt: str, where, value) -> list[str]:
    """The small model as GGUF with one header field overwritten (struct `fmt` at byte `where(layout)`)."""
    g = _gguf(t)
    raw = bytearray(g.read_bytes())
    struct.pack_into(fmt, raw, where(_layout(bytes(raw))), value)
    g.write_bytes(bytes(raw))
    return t.train({"model.path": str(g)})


def _kv(key):
    return lambda lay: lay["kv"][key]["value"]


def _tensor(field, i=-1):
    return lambda lay: lay["tensors"][i][field]


@case("gguf-hdr-version-unknown", "model.gguf: GGUF version 7 is not supported")
def _(t): return _lie(t, "<I", lambda lay: 4, 7)
@case("gguf-hdr-tensor-count-lie", "model.gguf: the GGUF header is truncated or corrupt", "tensors cannot fit")
def _(t): return _lie(t, "<Q", lambda lay: 8, 1 << 40)
@case("gguf-hdr-kv-count-lie", "model.gguf: the GGUF header is truncated or corrupt", "metadata entries cannot fit")
def _(t): return _lie(t, "<Q", lambda lay: 16, 1 << 62)
@case("gguf-hdr-kv-count-overflow", "model.gguf: the GGUF header is truncated or corrupt")
def _(t): return _lie(t, "<Q", lambda lay: 16, (1 << 64) - 1)
@case("gguf-hdr-key-length-lie", "model.gguf: the GGUF header is truncated or corrupt", "runs past the end")
def _(t): return _lie(t, "<Q", lambda lay: 24, 1 << 50)
@case("gguf-hdr-string-value-length-lie", "model.gguf: the GGUF header is truncated or corrupt", "runs past the end")
def _(t): return _lie(t, "<Q", _kv("general.architecture"), (1 << 64) - 2)
@case("gguf-hdr-value-type-unknown", "model.gguf: the GGUF header is truncated or corrupt", "metadata value type 99")
def _(t): return _lie(t, "<I", lambda lay: lay["kv"]["general.architecture"]["type"], 99)
@case("gguf-hdr-array-count-lie", "model.gguf: the GGUF header is truncated or corrupt", "array elements cannot fit")
def _(t): return _lie(t, "<Q", lambda lay: lay["kv"]["tokenizer.ggml.tokens"]["value"] + 4, 1 << 60)
@case("gguf-hdr-array-element-type-unknown", "model.gguf: the GGUF header is truncated or corrupt")
def _(t): return _lie(t, "<I", _kv("tokenizer.ggml.tokens"), 77)
@case("gguf-hdr-tensor-name-length-lie", "model.gguf: the GGUF header is truncated or corrupt", "runs past the end")
def _(t): return _lie(t, "<Q", _tensor("name_pos", 0), 1 << 40)
@case("gguf-hdr-tensor-dims-count-lie", "model.gguf: the GGUF header is truncated or corrupt", "has 9 dimensions")
def _(t): return _lie(t, "<I", _tensor("n_dims", 0), 9)
@case("gguf-hdr-tensor-dim-huge", "model.gguf: the GGUF file is truncated")
def _(t): return _lie(t, "<Q", _tensor("dims"), 1 << 40)
@case("gguf-hdr-tensor-dim-zero", "model.gguf: the GGUF header is truncated or corrupt", "has a dimension of 0")
def _(t): return _lie(t, "<Q", _tensor("dims"), 0)
@case("gguf-hdr-tensor-type-unknown", "model.gguf: tensor", "has ggml type 200")
def _(t): return _lie(t, "<I", _tensor("type"), 200)
@case("gguf-hdr-tensor-offset-past-end", "model.gguf: the GGUF file is truncated", "past the end")
def _(t): return _lie(t, "<Q", _tensor("offset"), 1 << 40)
@case("gguf-hdr-tensor-offset-overflow", "model.gguf: the GGUF file is truncated")
def _(t): return _lie(t, "<Q", _tensor("offset"), (1 << 64) - 1)
@case("gguf-hdr-tensor-offset-misaligned", "model.gguf", "its data offset 3 is not a multiple of the alignment 32")
def _(t): return _lie(t, "<Q", _tensor("offset", 0), 3)
@case("gguf-hdr-tensor-offsets-overlap", "model.gguf", "overlaps tensor")
def _(t): return _lie(t, "<Q", _tensor("offset"), 0)
@case("gguf-hdr-head-count-lie", "model.gguf: tensor", "5 attention heads cannot split")
def _(t): return _lie(t, "<I", _kv("llama.attention.head_count"), 5)
@case("gguf-hdr-kv-heads-more-than-heads", "model.gguf: num_key_value_heads=8 is more than num_attention_heads=4")
def _(t): return _lie(t, "<I", _kv("llama.attention.head_count_kv"), 8)
@case("gguf-hdr-rms-eps-negative", "model.gguf: rms_norm_eps: expected a finite positive number, got -1.0")
def _(t): return _lie(t, "<f", _kv("llama.attention.layer_norm_rms_epsilon"), -1.0)
@case("gguf-hdr-block-count-zero", "num_hidden_layers: expected a positive integer, got 0")
def _(t): return _lie(t, "<I", _kv("llama.block_count"), 0)
@case("gguf-hdr-rope-base-nan", "rope_theta: expected a finite positive number, got nan")
def _(t): return _lie(t, "<f", _kv("llama.rope.freq_base"), math.nan)


# --------------------------------------------------------------------------------------------------------------
# Adapters: non-finite or non-float values, wrong shapes, a base fingerprint that is not the model's


def _adapter(t, fmt: str = "mlxtune", edit=None, meta: dict | None = None) -> Path:
    """A copy of the run's adapter (or its PEFT / mlx-lm export) with its weights edited by `edit(w, mx)`."""
    import mlx.core as mx

    from mlxtune.exports import export

    dst = t.tmp / "adapter"
    if fmt == "mlxtune":
        dst.mkdir()
        for f in ("adapters.safetensors", "adapter_config.json"):
            shutil.copy(t.run / f, dst / f)
    else:
        export(t.run, fmt, dst)
    wfile = dst / ("adapter_model.safetensors" if fmt == "peft" else "adapters.safetensors")
    w, m = mx.load(str(wfile), return_metadata=True)
    w = dict(w)
    if edit:
        edit(w, mx)
    mx.save_safetensors(str(wfile), w, metadata={**m, **(meta or {})})
    return dst


def _poison(value: float, which: str = "lora_b"):
    def edit(w, mx):
        k = sorted(k for k in w if which in k.lower())[0]
        w[k] = mx.where(mx.arange(w[k].size).reshape(w[k].shape) == 0, value, w[k])
    return edit


@case("adapter2-nan-fuse", "adapters.safetensors: model.layers.0.mlp.down_proj.lora_", "holds NaN or inf (1 such tensor(s))")
def _(t): return ["fuse", str(_adapter(t, edit=_poison(math.nan))), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter2-inf-generate", "adapters.safetensors: model.layers.0.mlp.down_proj.lora_", "holds NaN or inf (1 such tensor(s))")
def _(t): return ["generate", "--model", str(t.model), "--adapter", str(_adapter(t, edit=_poison(math.inf, "lora_a"))), "--prompt", "hi"]
@case("adapter2-nan-export", "adapters.safetensors: model.layers.0.mlp.down_proj.lora_", "holds NaN or inf (1 such tensor(s))")
def _(t): return ["export", str(_adapter(t, edit=_poison(-math.inf))), "--format", "peft", "--out", str(t.tmp / "out")]
@case("adapter2-nan-init-adapter", "adapters.safetensors: model.layers.0.mlp.down_proj.lora_", "holds NaN or inf (1 such tensor(s))")
def _(t): return t.train({"lora.init_adapter": str(_adapter(t, edit=_poison(math.nan)))})
@case("adapter2-peft-nan", "adapter_model.safetensors: base_model.model.model.layers.0", "holds NaN or inf (1 such tensor(s))")
def _(t): return ["fuse", str(_adapter(t, "peft", _poison(math.nan))), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter2-mlx-lm-inf", "adapters.safetensors: model.layers.0.mlp.down_proj.lora_", "holds NaN or inf (1 such tensor(s))")
def _(t): return ["generate", "--model", str(t.model), "--adapter", str(_adapter(t, "mlx-lm", _poison(math.inf))), "--prompt", "hi"]
@case("adapter2-int-weights", "not a float weight")
def _(t):
    def edit(w, mx):
        k = sorted(w)[0]
        w[k] = w[k].astype(mx.int32)
    return ["fuse", str(_adapter(t, edit=edit)), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter2-transposed-lora-a", "adapter does not fit the model", "shape mismatch")
def _(t):
    def edit(w, mx):
        k = sorted(k for k in w if k.endswith("lora_a"))[0]
        w[k] = w[k].T
    return ["fuse", str(_adapter(t, edit=edit)), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter2-peft-extra-key", "adapter_model.safetensors: 1 key(s) that are not LoRA A/B weights")
def _(t): return ["fuse", str(_adapter(t, "peft", lambda w, mx: w.update({"base_model.model.lm_head.weight": mx.zeros((4, 4))}))), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter2-peft-fingerprint-mismatch", "adapter does not fit the model", "trained on a different base model")
def _(t): return ["fuse", str(_adapter(t, "peft", meta={"mlxtune_base_fingerprint": "0123456789abcdef"})), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter2-mlx-lm-fingerprint-mismatch", "adapter does not fit the model", "trained on a different base model")
def _(t): return ["generate", "--model", str(t.model), "--adapter", str(_adapter(t, "mlx-lm", meta={"mlxtune_base_fingerprint": "feedfacefeedface"})), "--prompt", "hi"]
@case("adapter2-peft-export-on-other-base", "adapter does not fit the model", "trained on a different base model")
def _(t):
    a = _adapter(t, "peft")
    other = t.model_copy("base2")
    _weights_scale(other)
    return ["export", str(a), "--format", "hf", "--base", str(other), "--out", str(t.tmp / "out")]

@case("adapter2-checkpoint-nan-resume", "step_000002/adapters.safetensors", "holds NaN or inf")
def _(t):
    import mlx.core as mx

    src = t.tmp / "src"
    shutil.copytree(t.run, src)
    f = src / "checkpoints" / "step_000002" / "adapters.safetensors"
    w, meta = mx.load(str(f), return_metadata=True)
    w = dict(w)
    _poison(math.nan)(w, mx)
    mx.save_safetensors(str(f), w, metadata=meta)
    return t.train(None, "--resume", str(src))

def _weights_scale(m: Path) -> None:
    import mlx.core as mx

    w = {k: v * 1.5 for k, v in mx.load(str(m / "model.safetensors")).items()}  # same shapes, other weights
    mx.save_safetensors(str(m / "model.safetensors"), w, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------------------
# fuse / export --out: never onto an input, never over an existing output without --force


def _export(t, out, *extra, fmt="peft", src=None) -> list[str]:
    return ["export", str(src or t.run), "--format", fmt, "--out", str(out), *extra]


@case("fuse-out-onto-run-dir", "holds the input")
def _(t): src = t.tmp / "run2"; shutil.copytree(t.run, src); return ["fuse", str(src), "--out", str(src)]
@case("fuse-out-onto-run-dir-force", "holds the input")
def _(t): src = t.tmp / "run2"; shutil.copytree(t.run, src); return ["fuse", str(src), "--out", str(src), "--force"]
@case("fuse-out-onto-the-adapter-weights", "is the input")  # RUN/fused is fine (the demo writes it); RUN's files are not
def _(t): src = t.tmp / "run2"; shutil.copytree(t.run, src); return ["fuse", str(src), "--out", str(src / "adapters.safetensors"), "--force"]
@case("export-out-onto-adapter-dir", "holds the input")
def _(t): a = _adapter(t); return _export(t, a, "--force", src=a)
@case("export-out-onto-base-model", "is the input")
def _(t): m = t.model_copy(); return _export(t, m, "--base", str(m), "--force", fmt="hf")
@case("export-out-inside-base-model", "is inside the input")
def _(t): m = t.model_copy(); return _export(t, m / "exported", "--base", str(m), fmt="hf-base")
@case("fuse-out-over-dir-holding-run", "holds the input")
def _(t):
    holder = t.tmp / "holder"
    shutil.copytree(t.run, holder / "run2")
    return ["fuse", str(holder / "run2"), "--out", str(holder), "--force"]
@case("export-out-gguf-onto-base-gguf", "is the input")
def _(t): g = _gguf(t); return _export(t, g, "--base", str(g), "--force", fmt="gguf")
@case("export-out-symlink-to-base", "is the input")
def _(t): m = t.model_copy(); os.symlink(m, t.tmp / "link"); return _export(t, t.tmp / "link", "--base", str(m), "--force", fmt="hf")
@case("export-out-existing-file", "already exists (an existing file)", "--force")
def _(t): (t.tmp / "existing.gguf").write_text("keep me"); return _export(t, t.tmp / "existing.gguf", fmt="gguf")
@case("fuse-out-existing-dir", "already exists (a directory that is not empty)", "--force")
def _(t): (t.tmp / "existing").mkdir(); (t.tmp / "existing" / "x.txt").write_text("keep"); return ["fuse", str(t.run), "--out", str(t.tmp / "existing")]
@case("export-out-hf-base-existing-dir", "already exists (a directory that is not empty)")
def _(t): (t.tmp / "existing").mkdir(); (t.tmp / "existing" / "x.txt").write_text("keep"); return _export(t, t.tmp / "existing", fmt="hf-base")
@case("export-out-dangling-symlink", "is a dangling symlink")
def _(t): os.symlink(t.tmp / "gone", t.tmp / "dangling"); return _export(t, t.tmp / "dangling", fmt="mlx-lm")
@case("export-out-parent-is-a-file", "is a file, not a directory")
def _(t): (t.tmp / "afile").write_text("x"); return _export(t, t.tmp / "afile" / "sub")
@case("export-out-empty-path", "empty path")
def _(t): return _export(t, "")
