"""GGUF: tiny files written as llama.cpp writes them (Q/K rows permuted, F32/F16/Q8_0/Q4_0/Q4_1, and Q5_0,
which MLX cannot read) load to the same logits as transformers' own GGUF loader (an independent dequantizer
and un-permuter) and, for F32, as the original HF model; the real SmolLM2-135M-Instruct GGUF matches
transformers' GGUF loader and answers a question through its own chat template."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import make_tiny_model_dir
from core_helpers import RTOL, hf_logits, hf_to_gguf, mlx_logits, rel_err, truncate_gguf
from mlxtune.errors import ModelLoadError
from mlxtune.gguf import read_gguf
from mlxtune.loading import load

QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
# Quantization error of the logits against the float model (random tiny weights are hard to quantize).
QUANT_TOL = {"F32": RTOL, "F16": 2e-3, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3, "Q5_0": 0.2}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {
        # no rope scaling: llama.cpp stores llama3 scaling as a rope_freqs tensor, which transformers ignores
        "llama": make_tiny_model_dir(root / "llama", "llama", rope_scaling=None, rope_theta=10000.0),
        "llama3": make_tiny_model_dir(root / "llama3", "llama", seed=2),  # llama3 rope scaling, original ctx 256
        "qwen2": make_tiny_model_dir(root / "qwen2", "qwen2", seed=1),
    }


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 512, size=(2, 40))


def gguf_oracle(path, ids):
    """transformers' GGUF loader: its own dequantization (gguf-py) and Q/K un-permutation."""
    return hf_logits(path.parent, ids, gguf_file=path.name)


@pytest.mark.parametrize("qtype", QTYPES + ["Q5_0"])
def test_llama_gguf_equals_transformers_gguf_loader(hf_dirs, ids, tmp_path, qtype):
    path = hf_to_gguf(hf_dirs["llama"], tmp_path / f"tiny-{qtype}.gguf", qtype)
    model, _ = load(path, dtype="float32", tokenizer=False)
    ours = mlx_logits(model, ids)
    assert rel_err(ours, gguf_oracle(path, ids)) <= RTOL
    assert rel_err(ours, hf_logits(hf_dirs["llama"], ids)) <= QUANT_TOL[qtype]


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_qwen2_gguf_equals_transformers_gguf_loader(hf_dirs, ids, tmp_path, qtype):
    path = hf_to_gguf(hf_dirs["qwen2"], tmp_path / f"qwen-{qtype}.gguf", qtype)
    model, _ = load(path, dtype="float32", tokenizer=False)
    assert model.args.model_type == "qwen2" and model.args.tie_word_embeddings is False
    ours = mlx_logits(model, ids)
    assert rel_err(ours, gguf_oracle(path, ids)) <= RTOL
    assert rel_err(ours, hf_logits(hf_dirs["qwen2"], ids)) <= QUANT_TOL[qtype]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_saved_as_hf_dir_loads_in_transformers(hf_dirs, ids, tmp_path, family):
    """GGUF → Hugging Face dir: the config built from GGUF metadata is one transformers reads correctly."""
    from mlxtune.saving import save_model

    model, _ = load(hf_to_gguf(hf_dirs[family], tmp_path / "m.gguf", "Q4_1"), dtype="float32", tokenizer=False)
    out = save_model(model, None, tmp_path / "hf")
    assert rel_err(hf_logits(out, ids), mlx_logits(model, ids)) <= RTOL


def test_llama3_rope_scaling_from_rope_freqs(hf_dirs, tmp_path):
    """llama.cpp writes Llama 3's rope scaling as per-frequency divisors (rope_freqs.weight), not metadata."""
    import json

    cfg = json.loads((hf_dirs["llama3"] / "config.json").read_text())
    rope = cfg["rope_parameters"]
    hd = cfg["head_dim"]
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    factors = []
    for freq in 1.0 / (rope["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd)):
        wavelen = 2 * math.pi / freq
        old = rope["original_max_position_embeddings"]
        if wavelen < old / rope["high_freq_factor"]:
            factors.append(1)
        elif wavelen > old / rope["low_freq_factor"]:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    path = hf_to_gguf(hf_dirs["llama3"], tmp_path / "llama3.gguf", "F32",
                      extra_tensors={"rope_freqs.weight": np.array(factors, dtype=np.float32)})
    model, _ = load(path, dtype="float32", tokenizer=False)
    want = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert model.args.rope_scaling == want
    ids = np.random.default_rng(1).integers(0, 512, size=(1, 300))  # past the original context of 256
    assert rel_err(mlx_logits(model, ids), hf_logits(hf_dirs["llama3"], ids)) <= RTOL


@pytest.mark.parametrize("qtype,bits", [("Q4_0", 4), ("Q8_0", 8)])
def test_keep_quantized(hf_dirs, ids, tmp_path, qtype, bits):
    """QLoRA on the file's own quantization: the GGUF blocks become nn.QuantizedLinear (affine, group 32)."""
    path = hf_to_gguf(hf_dirs["llama"], tmp_path / f"tiny-{qtype}.gguf", qtype)
    dense, _ = load(path, dtype="float32", tokenizer=False)
    kept, _ = load(path, dtype="float32", tokenizer=False, keep_quantized=True)
    q = kept.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.group_size, q.bits) == (32, bits)
    assert isinstance(kept.model.embed_tokens, nn.QuantizedEmbedding)
    assert rel_err(mlx_logits(kept, ids), mlx_logits(dense, ids)) <= RTOL
    assert kept.source["fingerprint"] == dense.source["fingerprint"]


@pytest.mark.parametrize("qtype", ["F16", "Q4_1"])
def test_adapter_fits_its_gguf_base_in_any_dtype(hf_dirs, tmp_path, qtype):
    """Defect 4 (#14): the base fingerprint does not depend on the dtype a GGUF is loaded in. An adapter trained
    on a base loaded in float32 (CPU) fits the same file loaded in float16 / bfloat16 (GPU, --dtype), dense or
    kept quantized; an adapter of a different base is refused; one that recorded the fingerprint earlier versions
    took after the cast (float16 here) still loads."""
    from mlxtune.adapters import save_adapter
    from mlxtune.errors import AdapterError
    from mlxtune.loading import fingerprint
    from mlxtune.lora import apply_lora

    path = hf_to_gguf(hf_dirs["llama"], tmp_path / "base.gguf", qtype)
    trained, _ = load(path, dtype="float32", tokenizer=False)
    apply_lora(trained, rank=4, alpha=8.0, targets=["q_proj", "v_proj"], verbose=False)

    def save(name: str, fp: str):
        return save_adapter(trained, tmp_path / name, base_path=str(path), fingerprint=fp, rank=4, alpha=8.0,
                            dropout=0.0, targets=["q_proj", "v_proj"], layers=None)

    adapter = save("adapter", trained.source["fingerprint"])
    for dtype in ("float32", "float16", "bfloat16"):
        model, _ = load(path, dtype=dtype, adapter=adapter, tokenizer=False)
        assert model.source["fingerprint"] == trained.source["fingerprint"]
    if qtype == "Q4_1":
        load(path, dtype="bfloat16", adapter=adapter, tokenizer=False, keep_quantized=True)

    other = hf_to_gguf(hf_dirs["llama3"], tmp_path / "other.gguf", qtype)  # same shapes, other weights
    with pytest.raises(AdapterError, match="trained on a different base model"):
        load(other, dtype="float16", adapter=adapter, tokenizer=False)

    # the fingerprint as earlier versions recorded it: taken on the weights after the float16 cast
    cast = read_gguf(path, dtype="float16")
    legacy = fingerprint(load(path, tokenizer=False)[0].sanitize(cast.weights), cast.quantization)
    assert legacy != trained.source["fingerprint"]
    old_adapter = save("old-adapter", legacy)
    load(path, dtype="float16", adapter=old_adapter, tokenizer=False)
    with pytest.raises(AdapterError, match="trained on a different base model"):
        load(other, dtype="float16", adapter=old_adapter, tokenizer=False)


def test_gguf_errors(tmp_path, hf_dirs):
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        load(tmp_path / "gpt2.gguf", tokenizer=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load(tmp_path / "junk.gguf", tokenizer=False)
    good = hf_to_gguf(hf_dirs["llama"], tmp_path / "good.gguf", "Q8_0").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) * 2 // 3])
    with pytest.raises(ModelLoadError, match="truncated"):
        load(tmp_path / "cut.gguf", tokenizer=False)
    gguf_dir = tmp_path / "dir"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(good)
    with pytest.raises(ModelLoadError, match="pass the .gguf file itself"):
        load(gguf_dir, tokenizer=False)


def _patched(good: bytes, tmp_path, name: str, at: int, fmt: str, value) -> "Path":
    import struct

    buf = bytearray(good)
    struct.pack_into(fmt, buf, at, value)
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(bytes(buf))
    return path


def test_lying_header_is_one_error_naming_the_file(hf_dirs, tmp_path):
    """Every count, length and extent of the header is checked against the file size before anything is
    allocated or a native reader sees the file: a lying header is a ModelLoadError naming the file."""
    from mlxtune.gguf import header_config, read_header

    good = hf_to_gguf(hf_dirs["llama"], tmp_path / "good.gguf", "F16").read_bytes()
    tensor = good.find(b"token_embd.weight") + len(b"token_embd.weight")  # then n_dims u32, dims u64, type, offset
    tokens = good.find(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")  # then type u32, etype u32, count
    lies = {
        "n_tensors": (8, "<Q", 2**62),
        "n_kv": (16, "<Q", 2**40),
        "key_length": (24, "<Q", 2**60),
        "array_count": (tokens + 8, "<Q", 2**61),
        "n_dims": (tensor, "<I", 9),
        "dim": (tensor + 4, "<Q", 2**40),
        "offset": (tensor + 4 + 16 + 4, "<Q", 2**50),
    }
    for name, (at, fmt, value) in lies.items():
        path = _patched(good, tmp_path, name, at, fmt, value)
        for read in (read_header, header_config, lambda p: load(p, tokenizer=False)):
            with pytest.raises(ModelLoadError, match=f"{path}: the GGUF (header is truncated or corrupt|file is truncated)"):
                read(path)
    header = read_header(tmp_path / "good.gguf")
    assert header.shapes["token_embd.weight"] == (512, 64) and "tokenizer.ggml.tokens" not in header.metadata
    assert len(read_header(tmp_path / "good.gguf", max_array=None).metadata["tokenizer.ggml.tokens"]) == 512


# ---------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1 GGUF)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load(smollm2_gguf)


def chat_ids(tok, question: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_smollm2_config_and_tokenizer(smollm2, smollm2_gguf):
    model, tok = smollm2
    a = model.args
    assert (a.model_type, a.num_hidden_layers, a.hidden_size, a.intermediate_size) == ("llama", 30, 576, 1536)
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.vocab_size) == (9, 3, 64, 49152)
    assert (a.rope_theta, a.rms_norm_eps, a.tie_word_embeddings) == (100000.0, 1e-5, True)
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.float32  # CPU default
    # the same tokenizer as transformers' own GGUF tokenizer path (which re-reads the file)
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tok_dict, tok_config = get_gguf_tokenizer(str(smollm2_gguf))
    ref = PreTrainedTokenizerFast(tokenizer_object=convert_gguf_tokenizer(arch, tok_dict)[0], **tok_config)
    for text in ["Hello world", "In 2024, pi is 3.14159!", "  spaces\n\nand\ttabs", "héllo wörld 日本語",
                 "<|im_start|>user\nHi<|im_end|>\n"]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok.chat_template == ref.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")


def test_smollm2_answers_through_its_chat_template(smollm2):
    model, tok = smollm2
    ids = chat_ids(tok, "What is the capital of France?")
    cache = model.make_cache()
    x, out = mx.array([ids]), []
    for _ in range(10):  # greedy with a KV cache
        nxt = int(mx.argmax(model(x, cache=cache)[0, -1]).item())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        x = mx.array([[nxt]])
    assert "Paris" in tok.decode(out)


def test_smollm2_logits_equal_transformers_gguf_loader(smollm2, smollm2_gguf, tmp_path):
    """The first two blocks + final norm + tied head against transformers' GGUF loader (its own Q4_1/Q8_0
    dequantization, Q/K un-permutation and config reading). transformers gets a copy of the file cut to those
    blocks, tensor bytes untouched, without the token lists (which its reader takes ~10 s to parse); every
    block goes through the same code as these two."""
    model, tok = smollm2
    ids = np.array([chat_ids(tok, "What is the capital of France?")])
    n = 2
    cut = truncate_gguf(smollm2_gguf, tmp_path / "smollm2-2-blocks.gguf", n)
    full_layers = model.model.layers
    model.model.layers = full_layers[:n]
    try:
        ours = mlx_logits(model, ids)
    finally:
        model.model.layers = full_layers
    assert rel_err(ours, gguf_oracle(cut, ids)) <= RTOL


def test_read_gguf_names_and_permutation(smollm2_gguf):
    """Every tensor maps to a Hugging Face name; Q/K rows are un-permuted (not just renamed)."""
    raw = mx.load(str(smollm2_gguf))
    c = read_gguf(smollm2_gguf, dtype="float32")
    assert all(k.startswith("model.") for k in c.weights) and "lm_head.weight" not in c.weights
    assert len(c.weights) == 2 + 9 * 30
    dq = mx.dequantize(raw["blk.0.attn_k.weight"], raw["blk.0.attn_k.scales"].astype(mx.float32),
                       raw["blk.0.attn_k.biases"].astype(mx.float32), group_size=32, bits=4)
    hf = np.array(c.weights["model.layers.0.self_attn.k_proj.weight"])
    want = np.array(dq).reshape(3, 32, 2, 576).swapaxes(1, 2).reshape(192, 576)
    assert np.array_equal(hf, want) and not np.array_equal(hf, np.array(dq))
