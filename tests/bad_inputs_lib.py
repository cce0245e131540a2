"""The bad-input corpus's machinery: `case` registers a case, `Ctx` builds its inputs, `base` is the shared fixture.

Cases live in tests/bad_cases_*.py, one file per area (each engineer adds to their own); tests/test_bad_inputs.py
imports them all and runs each through `mlxtune.cli.main([...])`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from reliability_helpers import alpaca_lines, make_small_model_dir, run_config, write_yaml

CASES: list = []


def case(name: str, *expect: str):
    """Register a case: `fn(t) -> argv`; the error line must contain every `expect` string ({tmp} is expanded)."""

    def deco(fn: Callable):
        CASES.append(pytest.param(fn, expect, id=name))
        return fn

    return deco


@dataclass
class Ctx:
    tmp: Path
    model: Path
    data: Path
    run: Path
    other_model: Path
    no_write: list = field(default_factory=list)

    def config(self, changes: dict | None = None, drop: tuple = (), text: str | None = None) -> Path:
        """A valid small training config with dotted `changes`, `drop`ped keys, or raw YAML `text`."""
        p = self.tmp / "cfg.yaml"
        if text is not None:
            p.write_text(text)
            return p
        cfg = run_config(self.tmp, self.model, self.data, max_steps=2)
        for key, value in (changes or {}).items():
            node = cfg
            *parents, leaf = key.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value
        for key in drop:
            node = cfg
            *parents, leaf = key.split(".")
            for k in parents:
                node = node[k]
            del node[leaf]
        return write_yaml(p, cfg)

    def train(self, changes: dict | None = None, *extra: str, **kw) -> list[str]:
        return ["train", "-c", str(self.config(changes, **kw)), "--quiet", *extra]

    def data_file(self, lines: list[str], name: str = "train.jsonl", raw: bytes | None = None) -> Path:
        d = self.tmp / "data"
        d.mkdir(exist_ok=True)
        f = d / name
        if raw is not None:
            f.write_bytes(raw)
        else:
            f.write_text("\n".join(lines) + "\n")
        return f

    def bad_data(self, *lines: str, name: str = "train.jsonl", **changes) -> list[str]:
        """Train on a file of `lines` (the first ones good, so the format is detected from them)."""
        return self.train({"data.train": str(self.data_file(list(lines), name)), **changes})

    def model_copy(self, name: str = "model") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.model, dst)
        return dst

    def edit_config_json(self, m: Path, **changes) -> Path:
        cfg = json.loads((m / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (m / "config.json").write_text(json.dumps(cfg))
        return m


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One small model, good data, a finished run (adapter + checkpoints), and a second, different base model."""
    from mlxtune.trainer import train

    root = tmp_path_factory.mktemp("bad_inputs")
    os.environ["MLXTUNE_CACHE"] = str(root / "cache")
    model = make_small_model_dir(root / "model")
    other = make_small_model_dir(root / "other", hidden=48, seed=1)
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(alpaca_lines(12)) + "\n")
    (data / "valid.jsonl").write_text("\n".join(alpaca_lines(4, seed=1)) + "\n")
    res = train(run_config(root, model, data, max_steps=2, save_every=1), quiet=True)
    yield root, model, data, res.run_dir, other
    del os.environ["MLXTUNE_CACHE"]


GOOD_ALPACA = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})
GOOD_SHAREGPT = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
GOOD_MESSAGES = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
GOOD_COMPLETION = json.dumps({"prompt": "1 + 1 =", "completion": " 2"})
GOOD_TEXT = json.dumps({"text": "The quick brown fox."})


