"""Loading and saving: what load() returns, every loader error (one message naming every problem), dtype and
quantization at load, the fingerprint, and save_model's dir (sharded, both config dialects, tokenizer,
generation config, atomic) read back by transformers, mlx-lm and mlxtune."""

from __future__ import annotations

import json
import sys
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from conftest import make_tiny_model_dir, read_json
from core_helpers import RTOL, hf_logits, mlx_logits, rel_err
from mlxtune.config import QuantizeConfig
from mlxtune.errors import ConfigError, ModelLoadError, MlxtuneError
from mlxtune.loading import fingerprint, load
from mlxtune.saving import save_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (tied, llama3 rope, GQA), no tokenizer, vocab 512."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("loading") / "llama", "llama")


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(0, 512, size=(2, 40))


def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_load_returns_eval_model_with_source(tiny_dir):
    model, tok = load(tiny_dir, tokenizer=False)
    assert tok is None and model.training is False
    assert model.source["path"] == str(tiny_dir)
    assert len(model.source["fingerprint"]) == 16
    assert "source" not in model.parameters()  # a plain attribute, not part of the module tree
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))


def test_load_with_tokenizer(tiny_qwen_dir):
    model, tok = load(tiny_qwen_dir)
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok.chat_template


def test_strict_check_lists_every_problem_in_one_error(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "bad")
    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.k_proj.weight"][:16]
    w["model.layers.0.self_attn.extra.weight"] = np.zeros((4, 4), np.float32)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        load(d, tokenizer=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "missing model.layers.1.mlp.up_proj.weight (expected shape (128, 64))" in msg
    assert "unexpected model.layers.0.self_attn.extra.weight in model.safetensors" in msg
    assert "model.layers.0.self_attn.k_proj.weight in model.safetensors has shape (16, 64), expected (32, 64)" in msg


def test_sharded_dir_names_the_shard(tiny_dir, tmp_path):
    model, _ = load(tiny_dir, tokenizer=False)
    d = save_model(model, None, tmp_path / "sharded", max_shard_bytes=60_000)
    index = read_json(d / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    again, _ = load(d, tokenizer=False)
    assert again.source["fingerprint"] == model.source["fingerprint"]

    last = index["weight_map"]["model.norm.weight"]
    w = load_file(str(d / last))
    w["model.norm.weight"] = w["model.norm.weight"][:3]
    save_file(w, str(d / last), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"model.norm.weight in {last} has shape \\(3,\\), expected \\(64,\\)"):
        load(d, tokenizer=False)
    (d / shards[0]).unlink()
    with pytest.raises(ModelLoadError, match=f"lists shard\\(s\\) that are not in the dir: {shards[0]}"):
        load(d, tokenizer=False)


def test_missing_config_json(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(d, tokenizer=False)


def test_unsupported_model_type(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "gpt2")
    cfg = read_json(d / "config.json")
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported"):
        load(d, tokenizer=False)


def test_bin_only_dir_is_refused(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "bin")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only PyTorch pickle weights \\(pytorch_model.bin\\).*safetensors only"):
        load(d, tokenizer=False)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors: cannot read safetensors .*truncated"):
        load(d, tokenizer=False)


def test_prequantized_hf_checkpoint_is_refused(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "gptq")
    cfg = read_json(d / "config.json")
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="quant_method='gptq'"):
        load(d, tokenizer=False)


def test_missing_tokenizer_is_an_error_unless_skipped(tiny_dir):
    with pytest.raises(ModelLoadError, match="no tokenizer files.*tokenizer=False"):
        load(tiny_dir)


def test_bad_paths_and_offline_hub_id(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load("nope.gguf")
    # conftest sets HF_HUB_OFFLINE=1: a hub id that is not cached cannot be fetched
    with pytest.raises(ModelLoadError, match="definitely-not-cached-model.*not in the cache.*pass the local dir: model.path"):
        load("mlxtune-test/definitely-not-cached-model")


def test_dtype_and_fingerprint(tiny_dir, ids):
    f32, _ = load(tiny_dir, tokenizer=False)
    bf16, _ = load(tiny_dir, dtype="bfloat16", tokenizer=False)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(bf16.parameters()))
    assert bf16.source["fingerprint"] == f32.source["fingerprint"]  # taken on the weights as stored
    assert rel_err(mlx_logits(bf16, ids), mlx_logits(f32, ids)) < 5e-2
    with pytest.raises(ConfigError, match="model.dtype"):
        load(tiny_dir, dtype="float64", tokenizer=False)
    # the fingerprint sees values, not only names and shapes
    w = dict(tree_flatten(f32.parameters()))
    w2 = dict(w, **{"model.norm.weight": w["model.norm.weight"] + 1})
    assert fingerprint(w2) != fingerprint(w)


def test_quantize_at_load(tiny_dir, ids):
    dense, _ = load(tiny_dir, tokenizer=False)
    q4, _ = load(tiny_dir, quantize={"bits": 4, "group_size": 64}, tokenizer=False)
    assert isinstance(q4.layers[0].mlp.up_proj, nn.QuantizedLinear) and q4.layers[0].mlp.up_proj.bits == 4
    assert isinstance(q4.model.embed_tokens, nn.QuantizedEmbedding)
    assert q4.source["fingerprint"] == dense.source["fingerprint"]
    err4 = rel_err(mlx_logits(q4, ids), mlx_logits(dense, ids))
    q8, _ = load(tiny_dir, quantize=QuantizeConfig(bits=8, group_size=32), tokenizer=False)
    err8 = rel_err(mlx_logits(q8, ids), mlx_logits(dense, ids))
    assert err8 < err4 < 0.2
    # only layers whose input size divides the group size are quantized: with 128, only down_proj (in = 128)
    q128, _ = load(tiny_dir, quantize={"bits": 4, "group_size": 128}, tokenizer=False)
    quantized = sorted(p for p, m in q128.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    assert quantized == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="unknown key"):
        load(tiny_dir, quantize={"bits": 4, "groupsize": 64}, tokenizer=False)
    with pytest.raises(ConfigError, match="group_size"):
        load(tiny_dir, quantize={"bits": 4, "group_size": 48}, tokenizer=False)


def test_save_model_round_trip_with_tokenizer(tiny_qwen_dir, tmp_path):
    model, tok = load(tiny_qwen_dir)
    out = save_model(model, tok, tmp_path / "saved", max_shard_bytes=2_000_000)
    cfg = read_json(out / "config.json")
    assert cfg["rope_theta"] == 1e6 and cfg["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32" and cfg["model_type"] == "qwen2"
    assert "quantization" not in cfg
    gen = read_json(out / "generation_config.json")
    assert {151645, 151643} <= set(gen["eos_token_id"])  # <|im_end|> and <|endoftext|>
    assert (out / "model.safetensors.index.json").is_file()
    for f in out.glob("*.safetensors"):
        assert mx.load(str(f), return_metadata=True)[1] == {"format": "pt"}
    again, tok3 = load(out)  # the tokenizer through transformers' AutoTokenizer
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tok3.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    assert again.source["fingerprint"] == model.source["fingerprint"]
    ids = np.random.default_rng(3).integers(0, 151000, size=(1, 20))
    assert rel_err(hf_logits(out, ids), mlx_logits(model, ids)) <= RTOL
    assert tok3("Hello world")["input_ids"] == [9707, 1879]


def test_save_model_is_atomic(tiny_dir, tmp_path, monkeypatch):
    model, _ = load(tiny_dir, tokenizer=False)
    calls = []
    real = mx.save_safetensors

    def failing(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, None, tmp_path / "out", max_shard_bytes=60_000)
    assert list(tmp_path.iterdir()) == []  # neither the dir nor a temp dir is left


def test_save_model_refuses_a_non_empty_dir(tiny_dir, tmp_path):
    model, _ = load(tiny_dir, tokenizer=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MlxtuneError, match="already exists and is not empty"):
        save_model(model, None, tmp_path / "out")
    save_model(model, None, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_quantized_model_dequantized_or_as_mlx_lm(tiny_dir, tmp_path, ids):
    from mlx_lm.utils import load_model

    q, _ = load(tiny_dir, quantize={"bits": 4, "group_size": 32}, tokenizer=False)
    want = mlx_logits(q, ids)
    dense = save_model(q, None, tmp_path / "dense")  # default: dequantized, for transformers
    assert "quantization" not in read_json(dense / "config.json")
    assert rel_err(hf_logits(dense, ids), want) <= RTOL
    packed = save_model(q, None, tmp_path / "packed", dequantize=False)  # mlx-lm's quantized layout
    assert read_json(packed / "config.json")["quantization"] == {"group_size": 32, "bits": 4}
    theirs, _ = load_model(packed)
    assert rel_err(mlx_logits(theirs, ids), want) <= RTOL
    ours, _ = load(packed, tokenizer=False)
    assert isinstance(ours.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert np.array_equal(mlx_logits(ours, ids), want)
    # the fingerprint dequantizes its samples: a quantized dir and its dequantized copy agree
    assert ours.source["fingerprint"] == load(dense, tokenizer=False)[0].source["fingerprint"]


def test_adapter_argument_calls_load_adapter(tiny_dir, monkeypatch):
    calls = []
    fake = types.ModuleType("mlxtune.adapters")
    fake.load_adapter = lambda model, path: calls.append((model, path)) or []
    monkeypatch.setitem(sys.modules, "mlxtune.adapters", fake)
    model, _ = load(tiny_dir, adapter="some/adapter/dir", tokenizer=False)
    assert calls == [(model, "some/adapter/dir")]


def test_adapter_round_trip(tiny_dir, tmp_path, ids):
    adapters = pytest.importorskip("mlxtune.adapters")
    from mlxtune.lora import apply_lora, lora_modules

    model, _ = load(tiny_dir, tokenizer=False)
    apply_lora(model, rank=4, alpha=8, targets=["q", "v"], verbose=False)
    mx.random.seed(0)
    for m in lora_modules(model).values():
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    want = mlx_logits(model, ids)
    adapters.save_adapter(model, tmp_path / "adapter", base_path=str(tiny_dir), fingerprint=model.source["fingerprint"],
                          rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"], layers=None)
    again, _ = load(tiny_dir, adapter=tmp_path / "adapter", tokenizer=False)
    assert np.array_equal(mlx_logits(again, ids), want)


REAL_CONFIGS = {  # the architecture fields of real released models: none may be refused
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.1-405b": dict(model_type="llama", hidden_size=16384, num_hidden_layers=126, intermediate_size=53248,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, num_hidden_layers=80, intermediate_size=29568,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, rope_theta=1e6,
                        max_position_embeddings=32768, rms_norm_eps=1e-6),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, head_dim=64),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_config_domains_accept_real_models(name):
    from mlxtune.model import ModelArgs

    args = ModelArgs.from_hf_config(REAL_CONFIGS[name], source=f"{name}/config.json")
    assert args.head_dim in (64, 128)


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 64}, "num_key_value_heads=64 is more than num_attention_heads=32"),
    ({"hidden_size": 4100}, "num_attention_heads=32 does not divide hidden_size=4100"),
    ({"rope_theta": float("nan")}, "rope_theta: expected a finite positive number, got nan"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": float("inf")}}, "rope_scaling.factor: expected a finite"),
    ({"vocab_size": 10**40}, "vocab_size=" + "1" + "0" * 39 + " is larger than any model can be"),
])
def test_config_domains_refuse_impossible_values(change, message):
    from mlxtune.model import ModelArgs

    with pytest.raises(ModelLoadError, match="^m/config.json: " + message.replace("(", r"\(").replace(".", r"\.")):
        ModelArgs.from_hf_config({**REAL_CONFIGS["llama-3.1-8b"], **change}, source="m/config.json")
