"""Portable run dirs and the run's own settings at inference (issue #16), on a tiny run trained in one folder.

- config.yaml records absolute paths (relative to the run dir when inside it), and eval / generate / chat / export
  work with `--adapter <abs run>` from another folder; a moved run dir works while its base is where recorded; a
  missing base is one line naming config.yaml and --model (which then overrides it); an old run dir with
  CWD-relative paths still works;
- `eval --compare` on a run trained from one file scores its validation split and says so, decided before the model
  loads; nothing held out at all is one line before loading;
- `load(base, adapter=RUN)` returns a model in eval mode (LoRA dropout 0.5 off: identical logits);
- prompts are rendered with the run's data.template (alpaca on a ChatML tokenizer: no `<|im_start|>`);
- progress lines while eval scores and generates; a chat reply cut by --max-tokens is marked.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlxtune.cli import main
from reliability_helpers import ROOT, alpaca_lines, make_small_model_dir

ALPACA_PROMPT = "### Instruction:\nAdd 1 and 2.\n\n### Response:\n"
FINISHED: dict = {}
"The model train() used in the fixture's run."


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    c = capsys.readouterr()
    return e.value.code, c.out, c.err


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """A project folder with a base model and one data file (no test split), and a run trained there with
    relative paths, `data.template: alpaca` (the base's own template is ChatML) and LoRA dropout 0.5."""
    from mlxtune.trainer import train

    root = tmp_path_factory.mktemp("runs")
    os.environ["MLXTUNE_CACHE"] = str(root / "cache")
    proj = root / "proj"
    (proj / "data").mkdir(parents=True)
    make_small_model_dir(proj / "models" / "base")
    (proj / "data" / "train.jsonl").write_text("\n".join(alpaca_lines(12)) + "\n")
    cfg = {"model": {"path": "models/base"}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.5},
           "data": {"train": "data/train.jsonl", "template": "alpaca", "max_length": 96, "val_split": 0.25},
           "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "eval_every": 2, "save_every": 2,
                     "log_every": 1, "seed": 3},
           "output_dir": "runs/demo"}
    import mlxtune.trainer as trainer

    finish = trainer._finish

    def spy(job, *a, **k):  # keep the model train() used, to check the mode it is left in
        FINISHED["model"] = job.model
        return finish(job, *a, **k)

    cwd = os.getcwd()
    os.chdir(proj)
    trainer._finish = spy
    try:
        res = train(cfg, quiet=True)
    finally:
        os.chdir(cwd)
        trainer._finish = finish
    (root / "elsewhere").mkdir()
    yield proj, (proj / res.run_dir).resolve(), root
    del os.environ["MLXTUNE_CACHE"]


@pytest.fixture
def elsewhere(proj, monkeypatch):
    monkeypatch.chdir(proj[2] / "elsewhere")
    return proj[2] / "elsewhere"


def _copy_run(run: Path, dst: Path, **changes) -> Path:
    shutil.copytree(run, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for key, value in changes.items():
        section, leaf = key.split("__")
        if section == "top":
            cfg[leaf] = value
        else:
            cfg[section][leaf] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def test_config_yaml_records_absolute_paths(proj):
    p, run, _ = proj
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for got, want in ((cfg["model"]["path"], p / "models" / "base"), (cfg["data"]["train"], p / "data" / "train.jsonl"),
                      (cfg["output_dir"], run)):
        assert Path(got).is_absolute() and Path(got).resolve() == want.resolve()
    assert cfg["data"]["template"] == "alpaca"


def test_portable_config_relative_inside_run_dir_and_hub_ids_untouched(tmp_path, monkeypatch):
    from mlxtune.runs import portable_config, run_config

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r"
    (run / "data").mkdir(parents=True)
    (run / "data" / "t.jsonl").write_text("{}\n")
    (tmp_path / "my.jinja").write_text("{{ messages }}")
    cfg = {"model": {"path": "org/model"}, "lora": {"init_adapter": None},
           "data": {"train": "r/data/t.jsonl", "valid": None, "test": None, "template": "my.jinja"}, "output_dir": "r"}
    out = portable_config(cfg, run)
    assert out["model"]["path"] == "org/model"  # a hub id
    assert out["data"]["train"] == "data/t.jsonl"  # inside the run dir: relative to it
    assert Path(out["data"]["template"]).resolve() == (tmp_path / "my.jinja").resolve()
    assert Path(out["output_dir"]).resolve() == run.resolve()
    (run / "config.yaml").write_text(yaml.safe_dump(out))
    moved = tmp_path / "moved" / "r2"
    shutil.move(str(run), str(moved))
    monkeypatch.chdir(tmp_path / "moved")
    assert run_config(moved).data.train == str(moved / "data" / "t.jsonl")  # found against the run dir


def test_commands_from_another_folder(proj, elsewhere, capsys):
    _, run, _ = proj
    rc, out, err = cli(["generate", "--adapter", str(run), "--prompt", "Add 1 and 2.", "--max-tokens", "3"], capsys)
    assert rc == 0, err
    assert ("[cut at 3 tokens: --max-tokens]" in err) == ("stop: length" in err), err  # a cut reply is marked
    rc, out, err = cli(["eval", "--adapter", str(run), "--compare", "--max-examples", "2", "--max-tokens", "2",
                        "--out", "rep"], capsys)
    assert rc == 0, err
    report = json.loads((elsewhere / "rep" / "report.json").read_text())
    assert report["data"].endswith("(valid)") and report["n_examples"] == 2
    assert "validation split" in report["note"] and "no test split" in out  # said in the output
    assert "### Instruction:\n" in report["samples"][0]["prompt"]  # the run's template
    assert "<|im_start|>" not in report["samples"][0]["prompt"]
    lines = err.splitlines()
    note = next(i for i, l in enumerate(lines) if "no test split" in l)
    assert note < next(i for i, l in enumerate(lines) if l.startswith("loading"))  # decided before loading
    assert any("scoring: 2/2 examples" in l for l in lines) and any("generating: 2/2 examples" in l for l in lines)
    rc, out, err = cli(["export", str(run), "--format", "peft", "--out", "peft"], capsys)
    assert rc == 0, err
    assert (elsewhere / "peft" / "adapter_config.json").is_file()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "mlxtune", "chat", "--adapter", str(run), "--max-tokens", "2"],
                       input="Add 1 and 2.\n/exit\n", capture_output=True, text=True, env=env, cwd=elsewhere, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "[prompt" in p.stderr and "error" not in p.stderr


def test_moved_run_dir_and_missing_base(proj, elsewhere, capsys):
    p, run, root = proj
    moved = _copy_run(run, root / "moved" / "demo")
    rc, _, err = cli(["generate", "--adapter", str(moved), "--prompt", "hi", "--max-tokens", "2"], capsys)
    assert rc == 0, err
    gone = _copy_run(run, root / "gone", model__path=str(root / "nowhere" / "base"))
    rc, _, err = cli(["generate", "--adapter", str(gone), "--prompt", "hi", "--max-tokens", "2"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "config.yaml" in lines[0] and "--model PATH" in lines[0], err
    rc, _, err = cli(["generate", "--adapter", str(gone), "--model", str(p / "models" / "base"), "--prompt", "hi",
                      "--max-tokens", "2"], capsys)
    assert rc == 0, err


def test_old_style_relative_config(proj, monkeypatch, capsys):
    """A run dir written before paths were absolute: model and data relative to the folder training ran in."""
    from mlxtune.runs import run_config

    p, run, root = proj
    old = _copy_run(run, p / "runs" / "old", model__path="models/base", data__train="data/train.jsonl",
                    top__output_dir="runs/old")
    monkeypatch.chdir(p)
    rc, _, err = cli(["generate", "--adapter", "runs/old", "--prompt", "hi", "--max-tokens", "2"], capsys)
    assert rc == 0, err
    monkeypatch.chdir(root / "elsewhere")  # the training folder is found from the recorded output_dir
    cfg = run_config(old)
    assert cfg.model.path == str(p / "models" / "base") and cfg.data.train == str(p / "data" / "train.jsonl")


def test_compare_with_nothing_held_out_fails_before_loading(proj, elsewhere, capsys, monkeypatch):
    import mlxtune.loading

    _, run, root = proj
    none = _copy_run(run, root / "noval", data__val_split=0.0)

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mlxtune.loading, "load", boom)
    rc, _, err = cli(["eval", "--adapter", str(none), "--compare", "--out", "rep2"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "nothing held out" in err and "--data" in err, err
    rc, _, err = cli(["eval", "--adapter", str(run), "--split", "test", "--out", "rep2"], capsys)
    assert rc == 2 and "no test split" in err and "--split valid" in err, err
    assert not (elsewhere / "rep2").exists()


def test_load_with_adapter_is_in_eval_mode(proj):
    """The run was trained with lora.dropout 0.5: in training mode two calls would differ."""
    from mlxtune.loading import load
    from mlxtune.lora import lora_modules

    p, run, _ = proj
    model, _ = load(p / "models" / "base", adapter=run)
    mods = lora_modules(model)
    assert mods and not model.training and not any(m.training for m in mods.values())
    ids = mx.array([[5, 6, 7, 8, 9, 10]])
    a, b = np.array(model(ids)), np.array(model(ids))
    assert np.array_equal(a, b)
    model.train()
    assert not np.array_equal(np.array(model(ids)), a)  # dropout does act in training mode


def test_train_leaves_its_model_in_eval_mode(proj):
    from mlxtune.lora import lora_modules

    model = FINISHED["model"]
    assert not model.training and not any(m.training for m in lora_modules(model).values())
    ids = mx.array([[5, 6, 7, 8]])
    assert np.array_equal(np.array(model(ids)), np.array(model(ids)))


def test_prompt_uses_the_runs_template(proj, elsewhere, capsys):
    from mlxtune.config import load_config
    from mlxtune.generation import PromptStyle, encode_prompt, prompt_style
    from mlxtune.runs import run_config
    from transformers import AutoTokenizer

    p, run, _ = proj
    tok = AutoTokenizer.from_pretrained(p / "models" / "base")
    style = prompt_style(run_config(run))
    assert style.template == "alpaca" and style.fmt == "alpaca"
    ids = encode_prompt(tok, "Add 1 and 2.", style=style)
    assert tok.decode(ids) == ALPACA_PROMPT  # not <|im_start|>### Instruction
    assert tok.decode(encode_prompt(tok, "Add 1 and 2.")).startswith("<|im_start|>user")  # no run: the tokenizer's
    auto = prompt_style(load_config({"data": {"train": str(p / "data" / "train.jsonl")}}))
    assert auto.fmt == "alpaca" and auto.template_name(tok) == "alpaca"  # auto on Alpaca data: alpaca, as training
    assert PromptStyle("chatml").template_name(tok) == "chatml"
    rc, _, err = cli(["generate", "--adapter", str(run), "--prompt", "Add 1 and 2.", "--max-tokens", "2"], capsys)
    assert rc == 0 and f"[prompt {len(ids)} tokens" in err, err


def test_chat_marks_a_reply_cut_by_max_tokens(proj):
    from mlxtune.chat_repl import chat
    from mlxtune.generation import load_for_inference

    _, run, _ = proj
    model, tok, r = load_for_inference(None, str(run))
    lines = iter(["Add 1 and 2.", "/exit"])
    out, err = io.StringIO(), io.StringIO()
    chat(model, tok, max_tokens=2, input_fn=lambda _: next(lines), out=out, err=err, style=r.style)
    assert "[cut at 2 tokens: --max-tokens]" in err.getvalue(), err.getvalue()


def test_progress_lines_and_eval_out_rules(tmp_path, proj, elsewhere, capsys):
    from mlxtune.eval.progress import Progress

    got: list[str] = []
    bar = Progress(25, "scoring", got.append, tty=False)
    for _ in range(25):
        bar.update(1)
    assert got[0].startswith("  scoring: 3/25 examples") and got[-1].startswith("  scoring: 25/25") and len(got) == 9
    tty = Progress(4, "generating", got.append, tty=True)  # a terminal: a tqdm bar, no lines
    tty.update(4)
    assert tty.bar is not None and tty.bar.n == 4 and len(got) == 9
    tty.close()
    _, run, _ = proj
    foreign = elsewhere / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    argv = ["eval", "--adapter", str(run), "--no-generate", "--max-examples", "1", "--out", str(foreign)]
    rc, _, err = cli(argv, capsys)
    assert rc == 2 and "--force" in err and (foreign / "notes.txt").read_text() == "mine"
    rc, _, err = cli(argv + ["--force"], capsys)
    assert rc == 0 and (foreign / "report.json").is_file() and (foreign / "notes.txt").read_text() == "mine"
    again = elsewhere / "again"
    assert cli(argv[:-1] + [str(again)], capsys)[0] == 0
    assert cli(argv[:-1] + [str(again)], capsys)[0] == 0  # a report dir of eval's own is rewritten
