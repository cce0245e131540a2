"""mlxtune: LoRA fine-tuning for Llama 3.x and Qwen2/2.5 on MLX.

Notebook API (imported lazily, so `import mlxtune` is quick):

    model, tokenizer = mlxtune.load("path/or/model.gguf", adapter=None, dtype=None)
    mlxtune.apply_lora(model, rank=16, alpha=32, dropout=0.0, targets=None, layers=None)
    result = mlxtune.train("configs/demo.yaml", train={"max_steps": 20})
    mlxtune.evaluate(...), mlxtune.generate(...), mlxtune.fuse(model), mlxtune.save_model(model, tokenizer, out)
    mlxtune.export(run_dir, format="peft", out=...)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load": "mlxtune.loading",
    "save_model": "mlxtune.loading",
    "apply_lora": "mlxtune.lora",
    "fuse": "mlxtune.lora",
    "Config": "mlxtune.config",
    "load_config": "mlxtune.config",
    "train": "mlxtune.trainer",
    "evaluate": "mlxtune.evaluate",
    "generate": "mlxtune.generate",
    "chat": "mlxtune.generate",
    "export": "mlxtune.export",
    "MlxtuneError": "mlxtune.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mlxtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
