"""Config: defaults < YAML < overrides, coercion by type, unknown keys with suggestions, shipped YAMLs load."""

from pathlib import Path

import pytest
import yaml

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
        (["--data.packing", "maybe"], "data.packing: 'maybe' is not one of true, false, auto"),
        (["--lora.rank", "0"], "lora.rank: must be an integer in [1, 4096], got 0"),
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


# --------------------------------------------------------------------------------------------------------------
# Domains: one table, stated in each field's doc, enforced on every path (YAML, overrides, kwargs, direct)


def test_every_domain_is_stated_in_its_doc_and_every_value_field_has_one():
    from mlxtune.config import DOMAINS

    docs = field_docs()
    for key, dom in DOMAINS.items():
        assert dom.describe() in docs[key], f"{key}: the doc does not state {dom.describe()!r}"
    sections = {"model", "model.quantize", "lora", "data", "train"}
    bools = {"data.shuffle", "data.cache", "train.grad_checkpoint", "train.compile"}
    assert set(all_keys()) - set(DOMAINS) == sections | bools
    assert load_config(None) == Config()  # the defaults are in their own domains


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora.rank", True, "lora.rank: expected an integer, got true; use an integer in [1, 4096]"),
        ("lora.rank", 8.5, "lora.rank: expected an integer, got 8.5; use an integer in [1, 4096]"),
        ("lora.rank", 4097, "lora.rank: must be an integer in [1, 4096], got 4097"),
        ("lora.rank", 10**40, "lora.rank: must be an integer in [1, 4096], got a 133-bit integer"),
        ("lora.alpha", float("inf"), "lora.alpha: must be a finite number in (0, 1000000], got inf"),
        ("lora.dropout", float("nan"), "lora.dropout: must be a finite number in [0, 1), got nan"),
        ("train.learning_rate", "nan", "train.learning_rate: must be a finite number in (0, 1), got nan"),
        ("train.learning_rate", -1e-4, "train.learning_rate: must be a finite number in (0, 1), got -0.0001"),
        ("train.learning_rate", 10**400, "train.learning_rate: must be a finite number in (0, 1), got inf"),
        ("train.epochs", 0, "train.epochs: must be a finite number in (0, 10000], got 0.0"),
        ("train.adam_beta2", 1, "train.adam_beta2: must be a finite number in [0, 1), got 1.0"),
        ("train.adam_eps", 0, "train.adam_eps: must be a finite number in (0, 1], got 0.0"),
        ("train.max_grad_norm", 0, "train.max_grad_norm: must be a finite number in (0, 1000000000], got 0.0"),
        ("train.min_lr_ratio", 1.5, "train.min_lr_ratio: must be a finite number in [0, 1], got 1.5"),
        ("train.seed", -1, "train.seed: must be an integer in [0, 9223372036854775807], got -1"),
        ("train.seed", 2**63, "got 9223372036854775808"),
        ("train.log_every", 0, "train.log_every: must be an integer in [1, 1000000000], got 0"),
        ("train.keep_last", 0, "train.keep_last: must be an integer in [1, 1000000], got 0"),
        ("train.eval_batches", 0, "train.eval_batches: must be an integer in [1, 1000000000], got 0"),
        ("data.max_length", 2**21, "data.max_length: must be an integer in [2, 1048576], got 2097152"),
        ("data.val_split", 1, "data.val_split: must be a finite number in [0, 1), got 1.0"),
        ("model.quantize", {"bits": 7}, "model.quantize.bits: 7 is not one of 2, 3, 4, 5, 6, 8"),
        ("model.quantize", {"group_size": 48}, "model.quantize.group_size: 48 is not one of 32, 64, 128"),
        ("lora.targets", [], "lora.targets: must be a non-empty list of distinct names, got []"),
        ("lora.targets", ["q", "q_proj"], "lora.targets: 'q_proj' repeats 'q'"),
        ("lora.layers", [], "lora.layers: must be a count in [1, 4096] or a non-empty list"),
        ("lora.layers", [0, 0], "got [0, 0]"),
        ("lora.layers", [-1], "got [-1]"),
        ("train.report_to", ["wandb", "wandb"], "train.report_to: 'wandb' repeats 'wandb'"),
        ("train.early_stopping_metric", "rogue", "train.early_stopping_metric: 'rogue' is not one of val_loss"),
        ("output_dir", "", "output_dir: must be a non-empty path without control characters"),
        ("output_dir", True, "output_dir: expected a string, got true"),
        ("model.path", "m\x00odel", r"model.path: 'm\x00odel' holds the control character '\x00' at position 1; must be a path"),
        ("data.system_prompt", "x" * 200_000, "data.system_prompt: must be text, at most 100000 characters, got 'xxxx"),
    ],
)
def test_value_outside_its_domain_is_one_line_naming_field_value_and_domain(key, value, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, **{key: value})
    text = str(e.value)
    assert message in text and "\n" not in text and len(text) < 300, text


def test_direct_construction_is_checked_too():
    from mlxtune.config import DataConfig, LoraConfig, TrainConfig

    for build, field_name in ((lambda: TrainConfig(learning_rate=float("nan")), "train.learning_rate"),
                              (lambda: TrainConfig(batch_size=True), "train.batch_size"),
                              (lambda: LoraConfig(rank=8.0), "lora.rank"),
                              (lambda: DataConfig(max_length=10**9), "data.max_length")):
        with pytest.raises(ConfigError, match=field_name):
            build()


def test_nan_and_inf_overrides_are_refused():
    for raw in ("nan", ".nan", "inf", "-inf", "1e999"):
        with pytest.raises(ConfigError, match=r"^train\.learning_rate: must be a finite number in \(0, 1\)"):
            load_config(None, ["--train.learning_rate", raw])


# --------------------------------------------------------------------------------------------------------------
# Cross-field rules


def test_cross_field_rules(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    one_file = {"data.train": str(data), "data.val_split": 0}
    with pytest.raises(ConfigError, match=r"train\.early_stopping_patience: 2 needs validation data.*data\.valid"):
        load_config(None, **one_file, **{"train.early_stopping_patience": 2})
    with pytest.raises(ConfigError, match=r"train\.eval_generate: 3 needs validation data"):
        load_config(None, **one_file, **{"train.eval_generate": 3})
    # a valid file, a held-out fraction or a dir (which may hold its own valid file) is validation enough
    load_config(None, **{**one_file, "data.valid": str(data)}, **{"train.early_stopping_patience": 2})
    load_config(None, **{**one_file, "data.val_split": 0.2}, **{"train.early_stopping_patience": 2})
    load_config(None, **{**one_file, "data.train": str(tmp_path)}, **{"train.early_stopping_patience": 2})
    with pytest.raises(ConfigError, match=r"train\.early_stopping_metric: 'rougeL' is a generation metric.*eval_generate"):
        load_config(None, **{"train.early_stopping_metric": "rougeL"})
    assert load_config(None, **{"train.early_stopping_metric": "val_rougeL", "train.eval_generate": 4})
    with pytest.raises(ConfigError, match=r"train\.weight_decay: 10\.0 x train\.learning_rate 0\.1 must be below 1"):
        load_config(None, **{"train.weight_decay": 10, "train.learning_rate": 0.1})
    # warmup: any ratio below 1 leaves the last step after warmup, even with one step
    assert load_config(None, **{"train.max_steps": 1, "train.warmup_ratio": 0.99}).train.max_steps == 1


# --------------------------------------------------------------------------------------------------------------
# Strict YAML


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora:\n  rank: 4\n  alpha: 8\n  rank: 8\n", r"c.yaml:4: duplicate key 'rank' \(first on line 2\)"),
        ("lora: {rank: 4}\nlora: {rank: 8}\n", r"c.yaml:2: duplicate key 'lora' \(first on line 1\)"),
        ("a: &a [1]\nlora: *a\n", r"c.yaml:1: anchors and aliases .* are not allowed"),
        ("lora:\n  <<: {rank: 4}\n", r"c.yaml:2: merge keys \(<<\) are not allowed"),
        ("- model\n- lora\n", r"c.yaml: expected a mapping of sections .*got \['model', 'lora'\]"),
        ("42\n", r"c.yaml: expected a mapping of sections .*got 42"),
        ("lora: [4]\n", r"c.yaml: lora: expected a mapping of rank, alpha"),
        ("train: 3\n", r"c.yaml: train: expected a mapping of epochs"),
        ("", r"c.yaml: the config is empty"),
        ("# all commented out\n", r"c.yaml: the config is empty"),
        ("lora:\n  rank: " + "9" * 5000 + "\n", r"c.yaml: not valid YAML \(an integer with too many digits\)"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", r"c.yaml: not valid YAML \(nested too deeply\)"),
        ("lora:\n  rank: 4\x07\n", r"c.yaml:2: not valid YAML \(the control character #x0007 is not allowed\)"),
        ("lora: {rank: !!python/object/apply:os.system [ls]}\n", r"c.yaml:1: not valid YAML \(could not determine a constructor"),
        ("output_dir: !!binary aGVsbG8=\n", r"c.yaml: output_dir: expected a string, got b'hello'"),
        ("train:\n  learning_rate: .nan\n", r"c.yaml: train.learning_rate: must be a finite number in \(0, 1\), got nan"),
    ],
)
def test_yaml_oddities(tmp_path, text, message):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(y)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    import time

    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml:1: anchors and aliases"):
        load_config(tmp_path / "bomb.yaml")
    assert time.perf_counter() - t0 < 1
    # a subclass: PyYAML's own SafeLoader still resolves aliases for everyone else
    assert yaml.safe_load("a: &x 1\nb: *x\n") == {"a": 1, "b": 1}


def test_non_utf8_special_files_and_huge_files_are_refused(tmp_path):
    import os

    (tmp_path / "latin1.yaml").write_bytes(b"lora:\n  rank: 4\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml:3: not UTF-8 text \(byte 21\); save the config as UTF-8"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbflora: {rank: 4}\n")
    assert load_config(tmp_path / "bom.yaml").lora.rank == 4
    (tmp_path / "big.yaml").write_text("#" * (2 << 20))
    with pytest.raises(ConfigError, match=r"big.yaml: 2097152 bytes is too large for a config \(at most 1048576\)"):
        load_config(tmp_path / "big.yaml")
    if hasattr(os, "mkfifo"):  # a FIFO is refused from its stat: opening it would wait for a writer forever
        os.mkfifo(tmp_path / "pipe.yaml")
        with pytest.raises(ConfigError, match=r"pipe.yaml: is not a regular file"):
            load_config(tmp_path / "pipe.yaml")
    if os.path.exists("/dev/zero"):
        with pytest.raises(ConfigError, match=r"/dev/zero: is not a regular file"):
            load_config("/dev/zero")
    with pytest.raises(ConfigError, match=r"is a directory, not a YAML config file"):
        load_config(tmp_path)


def test_an_override_into_a_section_the_yaml_gave_as_a_scalar_is_an_error(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lora: 5\n")
    with pytest.raises(ConfigError, match=r"^lora: expected a mapping, got 5; cannot set 'lora.rank' in it"):
        load_config(y, ["--lora.rank", "4"])
    y.write_text("lora:\n")  # an empty section (every line commented out) is the section's defaults
    assert load_config(y, ["--lora.rank", "4"]).lora.rank == 4


def test_override_values_are_read_strictly():
    with pytest.raises(ConfigError, match=r"^--lora.targets: value '\[q,' is not valid YAML"):
        load_config(None, ["--lora.targets", "[q,"])
    with pytest.raises(ConfigError, match=r"^--lora.targets: value '&a \[q\]' is not valid YAML \(anchors"):
        load_config(None, ["--lora.targets", "&a [q]"])
    with pytest.raises(ConfigError, match=r"^unexpected argument 'x{58}'\.\.\.; overrides look like"):
        load_config(None, ["x" * 1000])


# --------------------------------------------------------------------------------------------------------------
# CLI argument errors: one line in the house format, the command's help as the hint, exit 2


@pytest.mark.parametrize(
    "argv, line",
    [
        (["train"], "error: train: the following arguments are required: -c/--config (see mlxtune train --help)"),
        (["train", "-c"], "error: train: argument -c/--config: expected one argument (see mlxtune train --help)"),
        (["trian"], "error: argument COMMAND: invalid choice: 'trian' (choose from"),
        (["--bogus"], "error: unrecognized arguments: --bogus; give a command first (see mlxtune --help)"),
        (["eval", "--model", "m", "--data", "d", "--out", "o", "--nope"],
         "error: eval: unrecognized arguments: --nope (see mlxtune eval --help)"),
        (["data", "convert", "f"], "error: data convert: the following arguments are required: --out (see mlxtune data convert --help)"),
        (["data", "inspect", "f", "--max-length", "abc"], "error: data inspect: argument --max-length: invalid int value: 'abc'"),
        (["export", "r", "--format", "ggfu", "--out", "o"], '(did you mean "gguf"?) (see mlxtune export --help)'),
        (["generate", "--max-tokens", "x" * 500], "error: generate: argument --max-tokens: invalid int value: '" + "x" * 57 + "...'"),
        (["doctor", "--x"], "error: doctor: unrecognized arguments: --x (see mlxtune doctor --help)"),
        (["fuse"], "error: fuse: the following arguments are required: RUN_DIR, --out (see mlxtune fuse --help)"),
    ],
)
def test_cli_argument_errors_are_one_line(argv, line, capsys):
    from mlxtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and line in err, err
    assert "usage:" not in err and len(err) < 500
