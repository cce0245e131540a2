"""Bad-input cases for configuration: every value outside its domain (NaN, inf, booleans and floats where integers
belong, huge values, control characters), YAML oddities (duplicate keys, anchors and aliases, merge keys, a scalar
or list where a mapping belongs, non-UTF-8, empty, huge or special files), cross-field rules, overrides and
argument parsing, through `mlxtune ...` (see bad_inputs_lib.py for `case` and `Ctx`). Each names the field and
the value; none may load a model or write anything."""

from __future__ import annotations

import os

from bad_inputs_lib import case


def _yaml(t, text: str) -> list[str]:
    return ["train", "-c", str(t.config(text=text)), "--quiet"]


def _raw(t, raw: bytes) -> list[str]:
    p = t.tmp / "raw.yaml"
    p.write_bytes(raw)
    return ["train", "-c", str(p), "--quiet"]


NAN, INF = float("nan"), float("inf")

# --------------------------------------------------------------------------------------------------------------
# Numbers outside their domain (YAML values)


@case("cfg-rank-bool", "lora.rank: expected an integer, got true; use an integer in [1, 4096]")
def _(t): return t.train({"lora.rank": True})
@case("cfg-rank-fraction", "lora.rank: expected an integer, got 8.5")
def _(t): return t.train({"lora.rank": 8.5})
@case("cfg-rank-huge-int", "lora.rank: must be an integer in [1, 4096], got a 133-bit integer")
def _(t): return t.train({"lora.rank": 10**40})
@case("cfg-rank-above-max", "lora.rank: must be an integer in [1, 4096], got 5000")
def _(t): return t.train({"lora.rank": 5000})
@case("cfg-rank-above-layer-width", "lora.rank: 64 is more than the narrowest adapted layer's width (16); use at most 16")
def _(t): return t.train({"lora.rank": 64})
@case("cfg-rank-negative", "lora.rank: must be an integer in [1, 4096], got -4")
def _(t): return t.train({"lora.rank": -4})
@case("cfg-alpha-zero", "lora.alpha: must be a finite number in (0, 1000000], got 0.0")
def _(t): return t.train({"lora.alpha": 0})
@case("cfg-alpha-nan", "lora.alpha: must be a finite number in (0, 1000000], got nan")
def _(t): return t.train({"lora.alpha": NAN})
@case("cfg-alpha-inf", "lora.alpha: must be a finite number in (0, 1000000], got inf")
def _(t): return t.train({"lora.alpha": INF})
@case("cfg-dropout-negative", "lora.dropout: must be a finite number in [0, 1), got -0.1")
def _(t): return t.train({"lora.dropout": -0.1})
@case("cfg-lr-nan", "train.learning_rate: must be a finite number in (0, 1), got nan")
def _(t): return t.train({"train.learning_rate": NAN})
@case("cfg-lr-negative", "train.learning_rate: must be a finite number in (0, 1), got -0.001")
def _(t): return t.train({"train.learning_rate": -1e-3})
@case("cfg-lr-zero", "train.learning_rate: must be a finite number in (0, 1), got 0.0")
def _(t): return t.train({"train.learning_rate": 0})
@case("cfg-lr-one", "train.learning_rate: must be a finite number in (0, 1), got 1.0")
def _(t): return t.train({"train.learning_rate": 1.0})
@case("cfg-lr-negative-inf", "train.learning_rate: must be a finite number in (0, 1), got -inf")
def _(t): return t.train({"train.learning_rate": -INF})
@case("cfg-lr-control-characters", "train.learning_rate: expected a number, got '1e-4\\x07\\x00'")
def _(t): return t.train({"train.learning_rate": "1e-4\x07\x00"})
@case("cfg-lr-list", "train.learning_rate: expected a number, got [0.1, 0.2]")
def _(t): return t.train({"train.learning_rate": [0.1, 0.2]})
@case("cfg-epochs-zero", "train.epochs: must be a finite number in (0, 10000], got 0.0")
def _(t): return t.train({"train.epochs": 0}, drop=("train.max_steps",))
@case("cfg-epochs-huge", "train.epochs: must be a finite number in (0, 10000], got 1000000000.0")
def _(t): return t.train({"train.epochs": 1e9})
@case("cfg-epochs-nan", "train.epochs: must be a finite number in (0, 10000], got nan")
def _(t): return t.train({"train.epochs": NAN})
@case("cfg-batch-size-huge", "train.batch_size: must be an integer in [1, 65536], got 1000000")
def _(t): return t.train({"train.batch_size": 1_000_000})
@case("cfg-batch-size-bool", "train.batch_size: expected an integer, got false")
def _(t): return t.train({"train.batch_size": False})
@case("cfg-grad-accumulation-zero", "train.grad_accumulation: must be an integer in [1, 65536], got 0")
def _(t): return t.train({"train.grad_accumulation": 0})
@case("cfg-max-steps-fraction", "train.max_steps: expected an integer, got 2.5")
def _(t): return t.train({"train.max_steps": 2.5})
@case("cfg-warmup-one", "train.warmup_ratio: must be a finite number in [0, 1), got 1.0")
def _(t): return t.train({"train.warmup_ratio": 1})
@case("cfg-warmup-negative", "train.warmup_ratio: must be a finite number in [0, 1), got -0.5")
def _(t): return t.train({"train.warmup_ratio": -0.5})
@case("cfg-min-lr-ratio-above-one", "train.min_lr_ratio: must be a finite number in [0, 1], got 1.5")
def _(t): return t.train({"train.min_lr_ratio": 1.5})
@case("cfg-weight-decay-negative", "train.weight_decay: must be a finite number in [0, 1000], got -0.01")
def _(t): return t.train({"train.weight_decay": -0.01})
@case("cfg-adam-beta1-one", "train.adam_beta1: must be a finite number in [0, 1), got 1.0")
def _(t): return t.train({"train.adam_beta1": 1.0})
@case("cfg-adam-beta2-negative", "train.adam_beta2: must be a finite number in [0, 1), got -0.999")
def _(t): return t.train({"train.adam_beta2": -0.999})
@case("cfg-adam-eps-zero", "train.adam_eps: must be a finite number in (0, 1], got 0.0")
def _(t): return t.train({"train.adam_eps": 0})
@case("cfg-max-grad-norm-zero", "train.max_grad_norm: must be a finite number in (0, 1000000000], got 0.0")
def _(t): return t.train({"train.max_grad_norm": 0})
@case("cfg-max-grad-norm-nan", "train.max_grad_norm: must be a finite number in (0, 1000000000], got nan")
def _(t): return t.train({"train.max_grad_norm": NAN})
@case("cfg-save-every-negative", "train.save_every: must be an integer in [0, 1000000000], got -1")
def _(t): return t.train({"train.save_every": -1})
@case("cfg-eval-every-fraction", "train.eval_every: expected an integer, got 2.5")
def _(t): return t.train({"train.eval_every": 2.5})
@case("cfg-log-every-zero", "train.log_every: must be an integer in [1, 1000000000], got 0")
def _(t): return t.train({"train.log_every": 0})
@case("cfg-keep-last-zero", "train.keep_last: must be an integer in [1, 1000000], got 0")
def _(t): return t.train({"train.keep_last": 0})
@case("cfg-seed-negative", "train.seed: must be an integer in [0, 9223372036854775807], got -1")
def _(t): return t.train({"train.seed": -1})
@case("cfg-seed-2-to-the-63", "train.seed: must be an integer in [0, 9223372036854775807], got 9223372036854775808")
def _(t): return t.train({"train.seed": 2**63})
@case("cfg-eval-batches-zero", "train.eval_batches: must be an integer in [1, 1000000000], got 0")
def _(t): return t.train({"train.eval_batches": 0})
@case("cfg-eval-generate-negative", "train.eval_generate: must be an integer in [0, 1000000], got -3")
def _(t): return t.train({"train.eval_generate": -3})
@case("cfg-patience-zero", "train.early_stopping_patience: must be an integer in [1, 1000000], got 0")
def _(t): return t.train({"train.early_stopping_patience": 0})
@case("cfg-memory-limit-inf", "train.memory_limit_gb: must be a positive number of GB (finite, at most 1048576), got inf")
def _(t): return t.train({"train.memory_limit_gb": INF})
@case("cfg-val-split-one", "data.val_split: must be a finite number in [0, 1), got 1.0")
def _(t): return t.train({"data.val_split": 1})
@case("cfg-val-split-negative", "data.val_split: must be a finite number in [0, 1), got -0.1")
def _(t): return t.train({"data.val_split": -0.1})
@case("cfg-max-length-huge", "data.max_length: must be an integer in [2, 1048576], got 10000000")
def _(t): return t.train({"data.max_length": 10_000_000})
@case("cfg-quantize-group-size", "model.quantize.group_size: 48 is not one of 32, 64, 128")
def _(t): return t.train({"model.quantize": {"bits": 4, "group_size": 48}})
@case("cfg-quantize-bits-word", "model.quantize.bits: expected an integer, got 'four'")
def _(t): return t.train({"model.quantize": {"bits": "four"}})


# --------------------------------------------------------------------------------------------------------------
# Names, lists and paths


@case("cfg-targets-empty", "lora.targets: must be a non-empty list of distinct names, got []")
def _(t): return t.train({"lora.targets": []})
@case("cfg-targets-duplicate-alias", "lora.targets: 'q' repeats 'q_proj'")
def _(t): return t.train({"lora.targets": ["q_proj", "v_proj", "q"]})
@case("cfg-targets-mapping", "lora.targets: expected a list, got {'q_proj': 1}")
def _(t): return t.train({"lora.targets": {"q_proj": 1}})
@case("cfg-targets-empty-name", "lora.targets[1]: must be a non-empty path without control characters")
def _(t): return t.train({"lora.targets": ["q_proj", " "]})
@case("cfg-layers-empty", "lora.layers: must be a count in [1, 4096] or a non-empty list", "got []")
def _(t): return t.train({"lora.layers": []})
@case("cfg-layers-duplicate", "lora.layers: must be", "got [1, 1]")
def _(t): return t.train({"lora.layers": [1, 1]})
@case("cfg-layers-negative-index", "lora.layers: must be", "got [-1]")
def _(t): return t.train({"lora.layers": [-1]})
@case("cfg-layers-zero", "lora.layers: must be a count in [1, 4096]", "got 0")
def _(t): return t.train({"lora.layers": 0})
@case("cfg-report-to-duplicate", "train.report_to: 'tensorboard' repeats 'tensorboard'")
def _(t): return t.train({"train.report_to": ["tensorboard", "tensorboard"]})
@case("cfg-report-to-unknown", "train.report_to[0]: 'mlflow' is not one of tensorboard, wandb")
def _(t): return t.train({"train.report_to": ["mlflow"]})
@case("cfg-early-stopping-metric-unknown", "train.early_stopping_metric: 'accuracy' is not one of val_loss, val_ppl")
def _(t): return t.train({"train.early_stopping_metric": "accuracy"})
@case("cfg-output-dir-empty", "output_dir: must be a non-empty path without control characters", "got ''")
def _(t): return t.train({"output_dir": ""})
@case("cfg-output-dir-blank", "output_dir: must be a non-empty path", "got '   '")
def _(t): return t.train({"output_dir": "   "})
@case("cfg-output-dir-control-character", "output_dir: ", "holds the control character '\\n' at position", "must be a non-empty path")
def _(t): return t.train({"output_dir": str(t.tmp / "run\nx")})
@case("cfg-model-path-nul", "model.path: ", "holds the control character '\\x00' at position", "must be a path without")
def _(t): return t.train({"model.path": str(t.model) + "\x00"})
@case("cfg-data-train-path-too-long", "data.train: must be a path without control characters, at most 4096 characters, got 'xxx")
def _(t): return t.train({"data.train": "x" * 5000})
@case("cfg-init-adapter-bool", "lora.init_adapter: expected a string, got true")
def _(t): return t.train({"lora.init_adapter": True})
@case("cfg-template-typo", "data.template: 'chatm' is not one of auto, tokenizer", 'did you mean "chatml"')
def _(t): return t.train({"data.template": "chatm"})
@case("cfg-packing-word", "data.packing: 'sometimes' is not one of true, false, auto")
def _(t): return t.train({"data.packing": "sometimes"})
@case("cfg-train-on-unknown", "data.train_on: 'prompts' is not one of responses, all")
def _(t): return t.train({"data.train_on": "prompts"})
@case("cfg-on-bad-line-unknown", "data.on_bad_line: 'ignore' is not one of error, skip")
def _(t): return t.train({"data.on_bad_line": "ignore"})
@case("cfg-system-prompt-huge", "data.system_prompt: must be text, at most 100000 characters, got 'yyy")
def _(t): return t.train({"data.system_prompt": "y" * 200_000})
@case("cfg-schedule-number", "train.schedule: '3' is not one of cosine, linear, constant")
def _(t): return t.train({"train.schedule": 3})


# --------------------------------------------------------------------------------------------------------------
# Cross-field rules


@case("cfg-patience-without-validation", "train.early_stopping_patience: 2 needs validation data", "data.val_split")
def _(t): return t.train({"data.train": str(t.data / "train.jsonl"), "data.val_split": 0, "train.early_stopping_patience": 2})
@case("cfg-eval-generate-without-validation", "train.eval_generate: 4 needs validation data")
def _(t): return t.train({"data.train": str(t.data / "train.jsonl"), "data.val_split": 0.0, "train.eval_generate": 4})
@case("cfg-generation-metric-without-generation", "train.early_stopping_metric: 'rougeL' is a generation metric",
      "train.eval_generate > 0")
def _(t): return t.train({"train.early_stopping_metric": "rougeL", "train.early_stopping_patience": 2})
@case("cfg-weight-decay-times-lr", "train.weight_decay: 200.0 x train.learning_rate 0.01 must be below 1")
def _(t): return t.train({"train.weight_decay": 200, "train.learning_rate": 0.01})


# --------------------------------------------------------------------------------------------------------------
# YAML oddities


@case("cfg-yaml-duplicate-key", "cfg.yaml:5: duplicate key 'rank' (first on line 3)")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\nlora:\n  rank: 4\n  alpha: 8\n  rank: 64\n")
@case("cfg-yaml-duplicate-section", "cfg.yaml:3: duplicate key 'train' (first on line 2)")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\ntrain: {{max_steps: 1}}\ntrain: {{max_steps: 9}}\n")
@case("cfg-yaml-alias-bomb", "cfg.yaml:1: anchors and aliases (&name, *name) are not allowed")
def _(t):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(9)]
    return _yaml(t, "\n".join(lines) + "\n")
@case("cfg-yaml-anchor", "cfg.yaml:2: anchors and aliases", "write the value out")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\nlora: &l {{rank: 4}}\n")
@case("cfg-yaml-merge-key", "cfg.yaml:3: merge keys (<<) are not allowed")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\nlora:\n  <<: {{rank: 4}}\n")
@case("cfg-yaml-scalar-top", "cfg.yaml: expected a mapping of sections", "got 42")
def _(t): return _yaml(t, "42\n")
@case("cfg-yaml-string-top", "cfg.yaml: expected a mapping of sections", "got 'model.path=x'")
def _(t): return _yaml(t, "model.path=x\n")
@case("cfg-yaml-section-is-list", "cfg.yaml: train: expected a mapping of epochs, max_steps", "got [1, 2]")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\ntrain: [1, 2]\n")
@case("cfg-yaml-quantize-is-scalar", "model.quantize: expected a mapping of bits, group_size, got 4")
def _(t): return t.train({"model.quantize": 4})
@case("cfg-yaml-dotted-top-key", "'lora.rank' is a dotted key; in YAML nest it: lora: {rank: ...}")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\nlora.rank: 4\n")
@case("cfg-yaml-empty-file", "cfg.yaml: the config is empty")
def _(t): return _yaml(t, "")
@case("cfg-yaml-comments-only", "cfg.yaml: the config is empty")
def _(t): return _yaml(t, "# model:\n#   path: x\n")
@case("cfg-yaml-not-utf8", "raw.yaml:2: not UTF-8 text (byte 19)", "save the config as UTF-8")
def _(t): return _raw(t, b"model: {path: m}\n# \xff\xfe latin-1 or UTF-16 bytes\n")
@case("cfg-yaml-utf16", "raw.yaml:1: not UTF-8 text (byte 0)")
def _(t): return _raw(t, "model: {path: m}\n".encode("utf-16"))
@case("cfg-yaml-huge-file", "raw.yaml: 2097152 bytes is too large for a config (at most 1048576)")
def _(t): return _raw(t, b"#" * (2 << 20))
@case("cfg-yaml-fifo", "pipe.yaml: is not a regular file")
def _(t):
    if not hasattr(os, "mkfifo"):
        return ["train", "-c", os.devnull]
    os.mkfifo(t.tmp / "pipe.yaml")  # opening it would wait forever for a writer
    return ["train", "-c", str(t.tmp / "pipe.yaml")]
@case("cfg-yaml-device", ": is not a regular file")
def _(t): return ["train", "-c", os.devnull]
@case("cfg-yaml-deep-nesting", "cfg.yaml: not valid YAML (nested too deeply)")
def _(t): return _yaml(t, "a: " + "[" * 5000 + "]" * 5000 + "\n")
@case("cfg-yaml-huge-integer", "cfg.yaml: not valid YAML (an integer with too many digits)")
def _(t): return _yaml(t, "lora:\n  rank: " + "7" * 10_000 + "\n")
@case("cfg-yaml-control-character", "cfg.yaml:2: not valid YAML (the control character #x001b is not allowed)")
def _(t): return _yaml(t, "lora:\n  rank: 4\x1b[31m\n")
@case("cfg-yaml-python-tag", "cfg.yaml:1: not valid YAML (could not determine a constructor for the tag")
def _(t): return _yaml(t, "lora: {rank: !!python/object/apply:os.system [echo]}\n")
@case("cfg-yaml-binary-tag", "output_dir: expected a string, got b'hello'")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\noutput_dir: !!binary aGVsbG8=\n")
@case("cfg-yaml-nan-literal", "cfg.yaml: lora.alpha: must be a finite number in (0, 1000000], got nan")
def _(t): return _yaml(t, f"model: {{path: {t.model}}}\nlora: {{alpha: .NaN}}\n")
@case("cfg-yaml-unhashable-key", "cfg.yaml:1: not valid YAML", "unhashable key")
def _(t): return _yaml(t, "? [a, b]\n: 1\n")


# --------------------------------------------------------------------------------------------------------------
# Overrides get the same checks


@case("cfg-override-nan", "train.learning_rate: must be a finite number in (0, 1), got nan")
def _(t): return t.train(None, "--train.learning_rate", "nan")
@case("cfg-override-inf", "lora.alpha: must be a finite number in (0, 1000000], got inf")
def _(t): return t.train(None, "--lora.alpha", ".inf")
@case("cfg-override-negative-lr", "train.learning_rate: must be a finite number in (0, 1), got -0.0001")
def _(t): return t.train(None, "--train.learning_rate", "-1e-4")
@case("cfg-override-rank-bool", "lora.rank: expected an integer, got true")
def _(t): return t.train(None, "--lora.rank", "true")
@case("cfg-override-rank-fraction", "lora.rank: expected an integer, got 8.5")
def _(t): return t.train(None, "--lora.rank=8.5")
@case("cfg-override-empty-value", "lora.rank: expected an integer, got ''")
def _(t): return t.train(None, "--lora.rank=")
@case("cfg-override-bad-yaml-list", "--lora.targets: value '[q,' is not valid YAML")
def _(t): return t.train(None, "--lora.targets", "[q,")
@case("cfg-override-alias", "--lora.targets: value '*a' is not valid YAML (anchors and aliases")
def _(t): return t.train(None, "--lora.targets", "*a")
@case("cfg-override-into-scalar-section", "lora: expected a mapping, got 5; cannot set 'lora.rank' in it")
def _(t): return t.train({"lora": 5}, "--lora.rank", "4")
@case("cfg-override-stray-argument", "unexpected argument 'stray'; overrides look like --lora.rank 32")
def _(t): return t.train(None, "stray")
@case("cfg-override-dashed-name", "train.batch_size: must be an integer in [1, 65536], got -2")
def _(t): return t.train(None, "--train.batch-size", "-2")
@case("cfg-override-seed-huge", "train.seed: must be an integer in [0, 9223372036854775807], got 99999999999999999999")
def _(t): return t.train(None, "--train.seed", "99999999999999999999")
@case("cfg-override-unknown-long", "unknown option --" + "z" * 57 + "...")
def _(t): return t.train(None, "--" + "z" * 5000, "1")
@case("cfg-estimate-override-nan", "lora.dropout: must be a finite number in [0, 1), got nan")
def _(t): return ["estimate", "-c", str(t.config()), "--lora.dropout", "nan"]


# --------------------------------------------------------------------------------------------------------------
# Argument parsing: one line, the command's help as the hint


@case("cli-train-without-config", "train: the following arguments are required: -c/--config (see mlxtune train --help)")
def _(t): return ["train"]
@case("cli-unknown-command", "invalid choice: 'trian'", 'did you mean "train"', "(see mlxtune --help)")
def _(t): return ["trian", "-c", str(t.config())]
@case("cli-flag-before-command", "unrecognized arguments: --quiet; give a command first")
def _(t): return ["--quiet"]
@case("cli-eval-unknown-flag", "eval: unrecognized arguments: --temperature-x 3 (see mlxtune eval --help)")
def _(t): return ["eval", "--model", str(t.model), "--data", str(t.data), "--out", str(t.tmp / "out"), "--temperature-x", "3"]
@case("cli-generate-bad-int", "generate: argument --max-tokens: invalid int value: 'many'")
def _(t): return ["generate", "--model", str(t.model), "--prompt", "hi", "--max-tokens", "many"]
@case("cli-export-bad-format", "export: argument --format: invalid choice: 'ggfu'", 'did you mean "gguf"')
def _(t): return ["export", str(t.run), "--format", "ggfu", "--out", str(t.tmp / "out")]
@case("cli-data-convert-missing-out", "data convert: the following arguments are required: --out")
def _(t): return ["data", "convert", str(t.data / "train.jsonl")]
@case("cli-fuse-missing-out", "fuse: the following arguments are required: --out (see mlxtune fuse --help)")
def _(t): return ["fuse", str(t.run)]
@case("cli-train-config-missing-value", "train: argument -c/--config: expected one argument")
def _(t): return ["train", "-c"]
@case("cli-long-invalid-value-is-cut", "generate: argument --max-tokens: invalid int value: '" + "9x" * 28 + "9...'")
def _(t): return ["generate", "--model", str(t.model), "--prompt", "hi", "--max-tokens", "9x" * 5000]
@case("cli-data-without-subcommand", "data: give a subcommand: inspect or convert (see mlxtune data --help)")
def _(t): return ["data"]
