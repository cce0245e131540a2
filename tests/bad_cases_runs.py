"""Bad-input cases for the commands that use a model or a run: --adapter / --model, eval (splits, --out), generate and
chat (see bad_inputs_lib.py for `case` and `Ctx`). `t.run` was trained on a dir with train and valid files (no test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from bad_inputs_lib import case


def _run_copy(t, name: str = "runcopy", text: str | None = None, **changes) -> Path:
    """A copy of the finished run whose config.yaml has `section__key` changes (or is `text`)."""
    dst = t.tmp / name
    shutil.copytree(t.run, dst)
    if text is not None:
        (dst / "config.yaml").write_text(text)
        return dst
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for key, value in changes.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def _no_base(t) -> Path:
    return _run_copy(t, model__path=str(t.tmp / "gone" / "base"))


def _out(t) -> list[str]:
    return ["--out", str(t.tmp / "out")]


# --------------------------------------------------------------------------------------------------------------
# --adapter RUN: the run's config.yaml


@case("runs-base-missing-generate", "config.yaml", "model.path", "does not exist", "--model PATH")
def _(t): return ["generate", "--adapter", str(_no_base(t)), "--prompt", "hi"]
@case("runs-base-missing-chat", "config.yaml", "--model PATH")
def _(t): return ["chat", "--adapter", str(_no_base(t))]
@case("runs-base-missing-eval", "config.yaml", "--model PATH")
def _(t): return ["eval", "--adapter", str(_no_base(t)), "--compare", *_out(t)]
@case("runs-base-missing-checkpoint", "config.yaml", "--model PATH")
def _(t): return ["generate", "--adapter", str(next((_no_base(t) / "checkpoints").iterdir())), "--prompt", "hi"]
@case("runs-base-missing-relative", "config.yaml", "'../models/nope'", "--model PATH")
def _(t): return ["generate", "--adapter", str(_run_copy(t, model__path="../models/nope")), "--prompt", "hi"]
@case("runs-config-not-yaml", "config.yaml", "not a readable run config")
def _(t): return ["generate", "--adapter", str(_run_copy(t, text="model: [unclosed\n")), "--prompt", "hi"]
@case("runs-config-a-list", "config.yaml", "expected a mapping")
def _(t): return ["eval", "--adapter", str(_run_copy(t, text="- a\n- b\n")), *_out(t)]
@case("runs-config-unknown-key", "lora.rnak")
def _(t): return ["generate", "--adapter", str(_run_copy(t, lora__rnak=4)), "--prompt", "hi"]
@case("runs-config-bad-template", "data.template")
def _(t): return ["generate", "--adapter", str(_run_copy(t, data__template="fancy")), "--prompt", "hi"]
@case("runs-config-template-file-missing", "data.template", "gone.jinja")
def _(t): return ["generate", "--adapter", str(_run_copy(t, data__template=str(t.tmp / "gone.jinja"))), "--prompt", "hi"]
@case("runs-adapter-missing", "--adapter", "no such file")
def _(t): return ["chat", "--adapter", str(t.tmp / "nope")]
@case("runs-adapter-dir-base-missing", "adapter_config.json", "does not exist", "--model PATH")
def _(t):
    a = t.tmp / "adapter"
    a.mkdir()
    for f in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(t.run / f, a / f)
    c = json.loads((a / "adapter_config.json").read_text())
    c["base_model"]["path"] = str(t.tmp / "gone")
    (a / "adapter_config.json").write_text(json.dumps(c))
    return ["generate", "--adapter", str(a), "--prompt", "hi"]
@case("runs-adapter-on-other-base", "adapter does not fit the model")
def _(t): return ["generate", "--adapter", str(t.run), "--model", str(t.other_model), "--prompt", "hi"]
@case("runs-model-missing", "does not exist")
def _(t): return ["generate", "--model", str(t.tmp / "nope"), "--prompt", "hi"]
@case("runs-model-is-a-file", "not a model dir")
def _(t): f = t.tmp / "weights.bin"; f.write_bytes(b"x"); return ["chat", "--model", str(f)]
@case("runs-chat-plain-text-run", "cannot hold a conversation")
def _(t): return ["chat", "--adapter", str(_run_copy(t, data__format="text"))]


# --------------------------------------------------------------------------------------------------------------
# eval: splits (decided before loading) and --out


@case("runs-eval-split-test-missing", "no test split", "--split valid")
def _(t): return ["eval", "--adapter", str(t.run), "--split", "test", *_out(t)]
@case("runs-eval-nothing-held-out", "nothing held out", "--data FILE")
def _(t):
    return ["eval", "--adapter", str(_run_copy(t, data__train=str(t.data / "train.jsonl"), data__val_split=0.0)),
            "--compare", *_out(t)]
@case("runs-eval-valid-missing", "no valid split", "--split train")
def _(t):
    return ["eval", "--adapter", str(_run_copy(t, data__train=str(t.data / "train.jsonl"), data__val_split=0.0)),
            "--split", "valid", *_out(t)]
@case("runs-eval-data-dir-without-train", "no train file")
def _(t): d = t.tmp / "empty_data"; d.mkdir(); return ["eval", "--adapter", str(t.run), "--data", str(d), *_out(t)]
@case("runs-eval-out-is-a-file", "exists and is not a directory")
def _(t): f = t.tmp / "report.txt"; f.write_text("x"); return ["eval", "--adapter", str(t.run), "--out", str(f)]
@case("runs-eval-out-not-empty", "already exists", "--force")
def _(t):
    d = t.tmp / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    return ["eval", "--adapter", str(t.run), "--out", str(d)]
@case("runs-eval-out-is-the-run", "holds the input")
def _(t): return ["eval", "--adapter", str(t.run), "--out", str(t.run), "--force"]
@case("runs-eval-out-inside-data", "inside the input")
def _(t): return ["eval", "--adapter", str(t.run), "--data", str(t.data), "--out", str(t.data / "rep")]
@case("runs-eval-out-is-the-model", "input")
def _(t): return ["eval", "--model", str(t.model), "--data", str(t.data), "--out", str(t.model), "--force"]
@case("runs-eval-compare-without-adapter", "--compare")
def _(t): return ["eval", "--model", str(t.model), "--data", str(t.data), "--compare", *_out(t)]
@case("runs-eval-nothing-to-evaluate", "pass --model PATH")
def _(t): return ["eval", *_out(t)]
@case("runs-eval-max-examples-zero", "max_examples")
def _(t): return ["eval", "--adapter", str(t.run), "--max-examples", "0", *_out(t)]
@case("runs-eval-batch-size-zero", "batch_size")
def _(t): return ["eval", "--adapter", str(t.run), "--batch-size", "0", *_out(t)]
@case("runs-eval-bad-tracker", "--report-to")
def _(t): return ["eval", "--adapter", str(t.run), "--report-to", "mlflow", *_out(t)]


# --------------------------------------------------------------------------------------------------------------
# generate / chat sampling arguments (checked before the model loads)


@case("runs-generate-max-tokens-zero", "--max-tokens")
def _(t): return ["generate", "--adapter", str(t.run), "--prompt", "hi", "--max-tokens", "0"]
@case("runs-generate-negative-temperature", "--temperature")
def _(t): return ["generate", "--adapter", str(t.run), "--prompt", "hi", "--temperature", "-1"]
@case("runs-generate-top-p-zero", "--top-p")
def _(t): return ["generate", "--adapter", str(t.run), "--prompt", "hi", "--top-p", "0"]
@case("runs-chat-top-p-above-one", "--top-p")
def _(t): return ["chat", "--adapter", str(t.run), "--top-p", "1.5"]
@case("runs-chat-max-tokens-negative", "--max-tokens")
def _(t): return ["chat", "--adapter", str(t.run), "--max-tokens", "-3"]
