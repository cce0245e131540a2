"""GGUF export: the file gguf-py and MLX read back holds the fused model, and mlxtune's loader gives its logits.

Checks the metadata llama.cpp needs (architecture, sizes, byte-level BPE vocab and merges, special ids, chat
template, pre-tokenizer), the tensor types per outtype, the weights themselves (read with mx.load and un-permuted
here, independently of mlxtune's reader) and, through `mlxtune.loading.load`, the logits.
"""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from export_helpers import load_base, logits, randomize_lora, rel_err, tokens
from mlx.utils import tree_flatten

from mlxtune.adapters import save_adapter
from mlxtune.exports import export
from mlxtune.lora import apply_lora, merge_lora

# GGUF name -> HF name (inverse of llama.cpp's map, for the names these models have)
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)
    if base.startswith("blk."):
        _, i, local = base.split(".", 2)
        return f"model.layers.{i}.{_BLOCK[local]}.{kind}"
    return f"{_TOP[base]}.{kind}"


def _llama_cpp_rope_factors(theta, dim, s) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's rope_freqs for llama3 scaling, written out independently."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out)


# Two cases cover both architectures and both outtypes: Llama (tied head, Q/K permutation, llama3 rope_freqs)
# in q8_0 and Qwen2 (q/k/v biases, untied head) in f16.
@pytest.mark.parametrize("family,outtype", [("llama", "q8_0"), ("qwen", "f16")])
def test_gguf_export(family, outtype, tiny_llama_dir, tiny_qwen_dir, tmp_path):
    base_dir = tiny_llama_dir if family == "llama" else tiny_qwen_dir
    model, tokenizer = load_base(base_dir, tokenizer=True)
    ids = tokens(model.args.vocab_size)
    base_logits = logits(model, ids)
    apply_lora(model, rank=4, alpha=8.0, verbose=False)
    randomize_lora(model)
    save_adapter(model, tmp_path / "run", base_path=base_dir, fingerprint=model.source["fingerprint"], rank=4, alpha=8.0,
                 dropout=0.0, targets=None, layers=None)
    want = logits(model, ids)
    assert rel_err(want, base_logits) > 2e-2
    merge_lora(model)
    fused = dict(tree_flatten(model.parameters()))

    path = export(tmp_path / "run", "gguf", tmp_path / "gguf", outtype=outtype)
    assert path == tmp_path / "gguf" / f"model-{outtype}.gguf" and path.is_file()
    args = model.args

    # --- metadata (MLX's reader; gguf-py's GGUFReader takes minutes on a 128k vocab: see the next test)
    raw, meta = mx.load(str(path), return_metadata=True)
    meta = {k: (v.item() if isinstance(v, mx.array) and v.ndim == 0 else v) for k, v in meta.items()}
    arch = "llama" if family == "llama" else "qwen2"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.embedding_length"] == 64
    assert meta[f"{arch}.feed_forward_length"] == 128 and meta[f"{arch}.context_length"] == args.max_position_embeddings
    assert meta[f"{arch}.attention.head_count"] == 4 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(args.rope_theta)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(args.rms_norm_eps)
    assert meta["general.file_type"] == (1 if outtype == "f16" else 7)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == ("llama-bpe" if family == "llama" else "qwen2")
    toks = meta["tokenizer.ggml.tokens"]
    assert len(toks) == args.vocab_size
    vocab = tokenizer.get_vocab()
    assert all(toks[i] == t for t, i in vocab.items())
    types = np.array(meta["tokenizer.ggml.token_type"])
    special = vocab["<|im_end|>" if family == "qwen" else "<|eot_id|>"]
    assert types[special] == gguf.TokenType.CONTROL and types[vocab["Hello"]] == gguf.TokenType.NORMAL
    assert (types == gguf.TokenType.UNUSED).sum() == args.vocab_size - len(vocab)  # padding rows, if any
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    if family == "llama":
        factors = np.array(raw["rope_freqs.weight"])
        np.testing.assert_allclose(factors, _llama_cpp_rope_factors(args.rope_theta, args.head_dim, args.rope_scaling), rtol=1e-5)
        assert factors.max() == 32.0 and factors.min() == 1.0  # scaling really is exercised

        assert "output.weight" not in raw  # tied head
    else:
        assert "output.weight" in raw and "blk.0.attn_q.bias" in raw and "rope_freqs.weight" not in raw

    # --- the weights, read by MLX and mapped back here (independently of mlxtune's GGUF reader)
    raw = dict(raw)
    got = {}
    for k in [k for k in raw if k.endswith(".scales")]:
        b = k[: -len(".scales")]
        wk = b + ".weight" if b + ".weight" in raw else b
        got[wk] = mx.dequantize(raw.pop(wk), raw.pop(k), raw.pop(b + ".biases"), group_size=32, bits=8)
    got.update(raw)
    got.pop("rope_freqs.weight", None)
    assert sorted(_hf_name(k) for k in got) == sorted(fused)
    for k, v in got.items():
        name = _hf_name(k)
        w = np.array(v.astype(mx.float32))
        if family == "llama" and (".q_proj." in name or ".k_proj." in name):
            h = args.num_attention_heads if ".q_proj." in name else args.num_key_value_heads
            w = w.reshape(h, w.shape[0] // h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # undo llama.cpp's
        ref = np.array(fused[name])
        tol = 1e-3 * np.abs(ref).max() if outtype == "f16" or w.ndim == 1 else np.abs(ref).max() / 100
        np.testing.assert_allclose(w, ref, rtol=0, atol=tol, err_msg=name)

    # --- mlxtune's own GGUF loader gives the fused model's logits
    from mlxtune.loading import load

    loaded, gguf_tok = load(str(path), dtype="float32")
    err = rel_err(logits(loaded, ids), want)
    # and rebuilds the same tokenizer from the metadata written
    text = "Hello world: 3333 naïve ✅ " + ("<|im_start|>user" if family == "qwen" else "<|start_header_id|>user")
    assert gguf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert err <= (5e-3 if outtype == "f16" else 3e-2), err
    assert err < rel_err(base_logits, want) / 5


@pytest.fixture(scope="module")
def small_bpe_llama(tmp_path_factory):
    """A tiny Llama with a small byte-level BPE trained here (vocab ~300 < 512 rows: padding rows too)."""
    from conftest import make_tiny_model_dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|eot_id|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The capital of France is Paris.", "Hello world, hello there!", "LoRA adapters fuse into the base weights."] * 20
    tk.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
    tok_dir = tmp_path_factory.mktemp("small_bpe")
    tok.save_pretrained(tok_dir)
    return make_tiny_model_dir(tmp_path_factory.mktemp("small_bpe_llama"), "llama", tokenizer_dir=tok_dir)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_reads_with_gguf_py(outtype, small_bpe_llama, tmp_path):
    """gguf-py's reader: every metadata field llama.cpp needs and every tensor, dequantized by gguf-py itself."""
    from gguf.quants import dequantize

    model, tokenizer = load_base(small_bpe_llama, tokenizer=True)
    apply_lora(model, rank=4, alpha=8.0, verbose=False)
    randomize_lora(model)
    save_adapter(model, tmp_path / "run", base_path=small_bpe_llama, fingerprint=model.source["fingerprint"], rank=4,
                 alpha=8.0, dropout=0.0, targets=None, layers=None)
    merge_lora(model)
    fused = dict(tree_flatten(model.parameters()))
    args = model.args
    path = export(tmp_path / "run", "gguf", tmp_path / "m.gguf", outtype=outtype)
    assert path == tmp_path / "m.gguf"

    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert f["general.file_type"] == (gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert (f["llama.rope.dimension_count"], f["llama.attention.key_length"], f["llama.vocab_size"]) == (16, 16, 512)
    assert f["llama.context_length"] == args.max_position_embeddings
    assert f["llama.rope.freq_base"] == pytest.approx(args.rope_theta)
    vocab = tokenizer.get_vocab()
    assert len(vocab) < 512  # the rest are padding rows
    tokens_ = f["tokenizer.ggml.tokens"]
    assert len(tokens_) == 512 and all(tokens_[i] == t for t, i in vocab.items())
    assert tokens_[511] == "[PAD511]"
    types = f["tokenizer.ggml.token_type"]
    assert types[vocab["<|eot_id|>"]] == gguf.TokenType.CONTROL and types[511] == gguf.TokenType.UNUSED
    assert types[vocab["a"]] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges] and merges
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"  # unknown probe hash: by arch
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (
        vocab["<|begin_of_text|>"], vocab["<|eot_id|>"], vocab["<|pad|>"])
    assert f["tokenizer.chat_template"] == tokenizer.chat_template

    qtype = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    seen = set()
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            np.testing.assert_allclose(t.data, _llama_cpp_rope_factors(args.rope_theta, args.head_dim, args.rope_scaling), rtol=1e-5)
            continue
        name = _hf_name(t.name)
        seen.add(name)
        is_1d = t.name.endswith("_norm.weight")
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if is_1d else qtype), t.name
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
        if ".q_proj." in name or ".k_proj." in name:
            h = args.num_attention_heads if ".q_proj." in name else args.num_key_value_heads
            w = w.reshape(h, w.shape[0] // h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        ref = np.array(fused[name])
        tol = 1e-3 * np.abs(ref).max() if outtype == "f16" or is_1d else np.abs(ref).max() / 100
        np.testing.assert_allclose(w, ref, rtol=0, atol=tol, err_msg=name)
    assert seen == set(fused)
