"""mlxtune: LoRA fine-tuning for Llama 3.x and Qwen2/2.5 on MLX.

A plain facade: each public name is looked up in the module that owns it the first time it is used, so
`import mlxtune` stays quick (MLX, transformers and friends load on first use). No public name shares its spelling
with a submodule, so importing any submodule never shadows an API function.

    model, tokenizer = mlxtune.load("path/or/model.gguf", adapter=None, dtype=None)
    mlxtune.apply_lora(model, rank=16, alpha=32, dropout=0.0, targets=None, layers=None)
    result = mlxtune.train("configs/demo.yaml", train={"max_steps": 20}, callbacks=[MyCallback()])
    mlxtune.evaluate(...), mlxtune.generate(...), mlxtune.chat(...)
    mlxtune.merge_lora(model)            # fold LoRA into the base weights in place (was `mlxtune.fuse`)
    mlxtune.save_model(model, tokenizer, out)
    mlxtune.export(run_dir, format="peft", out=...)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load": "mlxtune.loading",
    "save_model": "mlxtune.saving",
    "apply_lora": "mlxtune.lora",
    "plan_lora": "mlxtune.lora",
    "merge_lora": "mlxtune.lora",
    "fuse": "mlxtune.lora",  # deprecated alias of merge_lora (not the `mlxtune fuse` command)
    "Config": "mlxtune.config",
    "load_config": "mlxtune.config",
    "train": "mlxtune.trainer",
    "TrainResult": "mlxtune.trainer",
    "Callback": "mlxtune.callbacks",
    "evaluate": "mlxtune.eval",
    "generate": "mlxtune.generation",
    "chat": "mlxtune.chat_repl",
    "export": "mlxtune.exports",
    "push": "mlxtune.publish",
    "MlxtuneError": "mlxtune.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mlxtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

