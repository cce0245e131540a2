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


def _callable_module(module_name: str, func_name: str) -> None:
    """Make submodule `module_name` callable as its function `func_name`.

    `mlxtune.evaluate`, `mlxtune.generate` and `mlxtune.export` are both functions of the API and submodules.
    Importing a submodule rebinds the package attribute to the module (Python's import system does that), so after
    `import mlxtune.export` (the CLI does) `mlxtune.export(...)` would call a module. Forwarding calls keeps both
    spellings working, whatever was imported first.
    """
    import sys
    import types

    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, func_name)(*args, **kwargs)

    module.__class__ = _CallableModule
