"""Config: defaults < YAML < overrides, coercion by type, unknown keys with suggestions, shipped YAMLs load."""

from pathlib import Path

import pytest

from mlxtune.config import Config, all_keys, field_docs, load_config, parse_overrides
from mlxtune.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.train
    assert (ROOT / cfg.data.train).exists(), f"{path.name}: data.train {cfg.data.train} missing from the repo"


def test_precedence_and_coercion(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: {path: m}\ntrain:\n  learning_rate: 1e-5\n  max_steps: '10'\nlora: {rank: 8}\n")
    cfg = load_config(y, ["--lora.rank", "32", "--train.learning_rate=2e-4", "--output_dir", "runs/x",
                          "--lora.targets", "q_proj,v_proj", "--data.packing", "false"])
    assert cfg.lora.rank == 32 and isinstance(cfg.lora.rank, int)
    assert cfg.train.learning_rate == 2e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 10
    assert cfg.output_dir == "runs/x"
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.data.packing is False
    # YAML's "1e-5" is a string to PyYAML; the field type makes it a float
    assert load_config(y).train.learning_rate == 1e-5


def test_kwargs_and_roundtrip(tmp_path):
    cfg = load_config(None, model={"path": "m", "quantize": {"bits": 4}}, **{"train.max_steps": 3, "lora.layers": 2})
    assert cfg.model.quantize.bits == 4 and cfg.model.quantize.group_size == 64
    assert cfg.train.max_steps == 3 and cfg.lora.layers == 2
    cfg.save(tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml") == cfg


def test_layers_accepts_list():
    assert load_config(None, **{"lora.layers": "[0, 1]"}).lora.layers == [0, 1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--lora.rnak", "3"], 'did you mean "lora.rank"'),
        (["--train.learning_rate", "fast"], "train.learning_rate: expected a number, got 'fast'"),
        (["--train.batch_size", "2.5"], "train.batch_size: expected an integer"),
        (["--data.packing", "maybe"], "data.packing: expected true or false"),
        (["--lora.rank", "0"], "lora.rank: must be a positive integer"),
        (["--train.schedule", "cosin"], "train.schedule: 'cosin' is not one of"),
        (["--lora.rank"], "--lora.rank: missing a value"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_yaml_key_names_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  learnig_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'train.learnig_rate' \(did you mean \"train.learning_rate\"\?\)"):
        load_config(y)


def test_bad_yaml_names_line(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(y)


def test_every_field_documented():
    docs = field_docs()
    missing = [k for k in all_keys() if k not in docs]
    assert not missing, f"fields without a doc line: {missing}"


def test_parse_overrides_negative_number():
    assert parse_overrides(["--train.min_lr_ratio", "-0.5"]) == {"train": {"min_lr_ratio": -0.5}}
