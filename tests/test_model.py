"""The model path equals the references: transformers (torch, float32) and mlx-lm, on random tiny configs.

Every case is checked from both config.json dialects (transformers 5's `rope_parameters` as transformers 5.23
writes it, and transformers 4's top-level `rope_theta` / `rope_scaling`); the transformers-5 dirs on a
1,100-token sequence (past the llama3 scaling's original context of 256 and past 1,024; short otherwise,
because MLX's CPU attention is slow at that length). Also: packed rows equal their sequences alone, KV-cache
decoding equals the full forward, and the published 3B configs have their published parameter counts.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_model_dir
from core_helpers import RTOL, hf_logits, mlx_logits, rel_err, to_v4_dialect
from mlxtune.loading import load
from mlxtune.lora import apply_lora, count_trainable
from mlxtune.model import Model, ModelArgs, num_parameters

CASES = {
    # llama3 rope scaling (original context 256), GQA 4/2, tied head
    "llama3-gqa-tied": ("llama", {}),
    # bias on q/k/v/o and the MLP, untied head, no GQA, head_dim != hidden/heads, linear rope scaling
    "llama-bias-untied-linear": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                               num_key_value_heads=4, head_dim=32,
                                               rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # q/k/v bias, untied head, GQA 4/2, rope theta 1e6
    "qwen2-untied": ("qwen2", {}),
    # Qwen2.5-0.5B/3B style: tied head, GQA 4/1
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
}
LONG = 1100


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory):
    """{case: {"v5": dir as transformers 5.23 saves it, "v4": the same with a transformers-4 config.json}}."""
    out = {}
    for i, (name, (family, overrides)) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(name)
        v5 = make_tiny_model_dir(root / "v5", family, seed=i, **overrides)
        out[name] = {"v5": v5, "v4": to_v4_dialect(v5, root / "v4")}
    return out


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(0)
    return {"v5": rng.integers(0, 512, size=(1, LONG)), "v4": rng.integers(0, 512, size=(2, 160))}


def test_config_dialects_agree(case_dirs):
    for name, dirs in case_dirs.items():
        v5 = json.loads((dirs["v5"] / "config.json").read_text())
        v4 = json.loads((dirs["v4"] / "config.json").read_text())
        assert "rope_parameters" in v5 and "rope_theta" not in v5 and "rope_parameters" not in v4
        a, b = ModelArgs.from_hf_config(v5), ModelArgs.from_hf_config(v4)
        assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling), name
        assert a.rope_theta != 10000.0  # the known trap: a reader that misses rope_parameters falls back to 1e4


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dialect", ["v5", "v4"])
def test_logits_equal_transformers(case_dirs, ids, case, dialect):
    d = case_dirs[case][dialect]
    model, _ = load(d, tokenizer=False)
    ours = mlx_logits(model, ids[dialect])
    ref = hf_logits(d, ids[dialect])
    assert ours.shape == ref.shape == (*ids[dialect].shape, 512)
    assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_mlx_lm(case_dirs, ids, case):
    """mlx-lm's own model classes on the transformers-4 dialect (mlx-lm 0.32 misreads rope_parameters)."""
    from mlx_lm.utils import load_model

    d = case_dirs[case]["v4"]
    theirs, _ = load_model(d)
    model, _ = load(d, tokenizer=False)
    assert rel_err(mlx_logits(model, ids["v4"]), mlx_logits(theirs, ids["v4"])) <= RTOL


@pytest.mark.parametrize("case", ["llama3-gqa-tied", "qwen2-untied"])
def test_packed_row_equals_sequences_alone(case_dirs, case):
    model, _ = load(case_dirs[case]["v5"], tokenizer=False)
    rng = np.random.default_rng(1)
    a, b, c = rng.integers(0, 512, 37), rng.integers(0, 512, 90), rng.integers(0, 512, 5)
    packed = np.concatenate([a, b, c])[None]
    seg = np.array([0] * len(a) + [1] * len(b) + [2] * len(c))[None]
    out = mlx_logits(model, packed, segment_ids=mx.array(seg))
    start = 0
    for s in (a, b, c):
        alone = mlx_logits(model, s[None])
        assert rel_err(out[:, start:start + len(s)], alone) <= RTOL
        start += len(s)
    # explicit positions that restart per segment give the same as segment_ids alone
    pos = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.arange(len(c))])[None]
    out2 = mlx_logits(model, packed, segment_ids=mx.array(seg), positions=mx.array(pos))
    assert rel_err(out2, out) <= RTOL


@pytest.mark.parametrize("case", ["llama3-gqa-tied", "qwen2-untied"])
def test_kv_cache_decoding_equals_full_forward(case_dirs, case):
    model, _ = load(case_dirs[case]["v5"], tokenizer=False)
    ids = np.random.default_rng(2).integers(0, 512, (1, 120))
    full = mlx_logits(model, ids)
    cache = model.make_cache()
    steps = [mlx_logits(model, ids[:, :110], cache=cache)]
    for t in range(110, 120):
        steps.append(mlx_logits(model, ids[:, t:t + 1], cache=cache))
    assert rel_err(np.concatenate(steps, axis=1), full) <= RTOL


# ---------------------------------------------------------------------------------------------------------
# Published 3B configs: parameter counts from shapes alone (MLX is lazy: nothing is materialized)

LLAMA_3_2_3B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 24,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

QWEN2_5_3B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 32768,
    "max_window_layers": 36,
    "model_type": "qwen2",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.mark.parametrize(
    "config,params,lora_params",
    [(LLAMA_3_2_3B, 3_212_749_824, 24_313_856), (QWEN2_5_3B, 3_085_938_688, 29_933_568)],
    ids=["llama-3.2-3b", "qwen2.5-3b"],
)
def test_published_3b_configs_parameter_counts(config, params, lora_params):
    model = Model(ModelArgs.from_hf_config(config))
    assert num_parameters(model) == params
    paths = apply_lora(model, rank=16, alpha=32, targets=None, verbose=False)
    assert len(paths) == 7 * config["num_hidden_layers"]
    trainable, total = count_trainable(model)
    assert trainable == lora_params
    assert total == params + lora_params


def test_to_hf_config_round_trips():
    for cfg in (LLAMA_3_2_3B, QWEN2_5_3B):
        args = ModelArgs.from_hf_config(cfg)
        out = args.to_hf_config()
        assert out["rope_theta"] == cfg["rope_theta"] and out["rope_parameters"]["rope_theta"] == cfg["rope_theta"]
        again = ModelArgs.from_hf_config(out)
        assert (again.rope_theta, again.rope_scaling, again.tie_word_embeddings) == (args.rope_theta, args.rope_scaling, args.tie_word_embeddings)
