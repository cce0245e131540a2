"""Helpers for the adapter / export tests (test_adapters.py, test_export*.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxtune.lora import lora_modules


def load_base(path, quantize=None, tokenizer: bool = False):
    """(model, tokenizer or None) for a tiny HF dir through mlxtune.loading, eval mode.

    The tokenizer is skipped unless asked for: it is most of the load time of these tiny models.
    """
    from mlxtune.loading import load

    model, tokenizer = load(str(path), quantize=quantize, tokenizer=tokenizer)
    model.eval()
    return model, tokenizer


def randomize_lora(model, seed: int = 0, std: float = 0.05) -> None:
    """Non-zero random A and B in every LoRA layer (B = 0 would make equality tests that cannot fail)."""
    key = mx.random.key(seed)
    for _, m in sorted(lora_modules(model).items()):
        key, ka, kb = mx.random.split(key, 3)
        m.lora_a = std * mx.random.normal(m.lora_a.shape, key=ka)
        m.lora_b = std * mx.random.normal(m.lora_b.shape, key=kb)
    mx.eval(model.parameters())


def tokens(vocab_size: int, n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, min(vocab_size, 5000), size=(1, n)).astype(np.int32)


def logits(model, ids: np.ndarray) -> np.ndarray:
    model.eval()
    out = model(mx.array(ids)).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def mlx_lm_base_copy(src: Path, dst: Path) -> Path:
    """A copy of a transformers-5 dir with top-level rope fields, which mlx-lm 0.32 needs (STYLE.md traps)."""
    from mlxtune.model import ModelArgs

    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(ModelArgs.from_hf_config(cfg).to_hf_config())
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def tree(path: Path) -> list[str]:
    """Every file and dir under `path` (relative), to assert that nothing was written."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []
