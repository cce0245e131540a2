"""train.memory_limit_gb: MLX's memory limit is set for the training steps and the previous one restored after (also
when training raises or is interrupted); null leaves it alone; a value <= 0 is a config error (one line, exit 2)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
import yaml

from conftest import make_bpe_model_dir
from mlxtune.config import load_config
from mlxtune.errors import ConfigError
from mlxtune.step import TrainStep

PREVIOUS = 7_770_000_000  # a limit no default would be, so "restored" means restored to what it was


@pytest.fixture(scope="module")
def assets(tmp_path_factory, alpaca_seed_dir):
    """(model dir, data dir): conftest's tiny BPE Llama and the 8 shortest seed tasks (trains in milliseconds)."""
    root = tmp_path_factory.mktemp("memlimit")
    rows = [json.loads(l) for l in (alpaca_seed_dir / "train.jsonl").read_text().splitlines()]
    data = root / "data"
    data.mkdir()
    short = sorted(rows, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:8]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    make_bpe_model_dir(root / "model", [v for r in rows for v in r.values() if isinstance(v, str)])
    return root / "model", data


@pytest.fixture
def previous_limit():
    before = mx.set_memory_limit(PREVIOUS)
    yield PREVIOUS
    mx.set_memory_limit(before)


def _cfg(tmp_path, assets, **train) -> dict:
    model_dir, data_dir = assets
    return dict(model={"path": str(model_dir), "dtype": "float32"}, lora={"rank": 4, "alpha": 8},
                data={"train": str(data_dir), "val_split": 0.0, "max_length": 256, "packing": False,
                      "template": "alpaca", "cache": False},
                train={"max_steps": 3, "batch_size": 2, "log_every": 1, "eval_every": 0, "save_every": 0,
                       "memory_guard": "off", **train},
                output_dir=str(tmp_path / "run"))


@pytest.fixture
def limits_seen(monkeypatch):
    """mx.get_memory_limit() at every micro-batch; `fail_at` (call index, exception) makes that micro-batch raise."""
    seen, fail = [], {}
    micro = TrainStep.micro

    def spy(self, *args, **kwargs):
        seen.append(mx.get_memory_limit())
        if fail.get("at") == len(seen):
            raise fail["exc"]
        return micro(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "micro", spy)
    return seen, fail


def test_limit_holds_during_training_and_is_restored(tmp_path, assets, previous_limit, limits_seen, capsys):
    import mlxtune

    seen, _ = limits_seen
    res = mlxtune.train(**_cfg(tmp_path, assets, memory_limit_gb=2.5))
    assert res.steps == 3
    assert seen and all(s == 2_500_000_000 for s in seen), seen
    assert mx.get_memory_limit() == previous_limit
    out = capsys.readouterr().out
    assert [l for l in out.splitlines() if l.startswith("memory limit:")] == [
        "memory limit: 2.5 GB (MLX evaluation waits for the device when active memory exceeds it)"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_limit_is_restored_when_training_raises(exc, tmp_path, assets, previous_limit, limits_seen):
    import mlxtune

    seen, fail = limits_seen
    fail.update(at=2, exc=exc)
    with pytest.raises(type(exc)):
        mlxtune.train(**_cfg(tmp_path, assets, memory_limit_gb=2.5), quiet=True)
    assert seen == [2_500_000_000, 2_500_000_000]
    assert mx.get_memory_limit() == previous_limit


def test_null_leaves_the_limit_alone(tmp_path, assets, previous_limit, limits_seen, monkeypatch, capsys):
    import mlxtune

    seen, _ = limits_seen
    calls = []
    real = mx.set_memory_limit
    monkeypatch.setattr(mx, "set_memory_limit", lambda n: calls.append(n) or real(n))
    mlxtune.train(**_cfg(tmp_path, assets, memory_limit_gb=None))
    assert calls == []
    assert seen and all(s == previous_limit for s in seen)
    assert mx.get_memory_limit() == previous_limit
    assert "memory limit:" not in capsys.readouterr().out


@pytest.mark.parametrize("value", [0, -1.5])
def test_non_positive_is_a_config_error(value, tmp_path, assets, capsys):
    from mlxtune.cli import main

    with pytest.raises(ConfigError, match=rf"^train\.memory_limit_gb: must be a positive number of GB .*got {value}"):
        load_config(train={"memory_limit_gb": value})

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, assets)))
    with pytest.raises(SystemExit) as e:
        main(["train", "-c", str(cfg), "--train.memory_limit_gb", str(value)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "train.memory_limit_gb: must be a positive number of GB" in err, err
    assert not (tmp_path / "run").exists()
