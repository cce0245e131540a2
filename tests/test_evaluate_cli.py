"""`mlxtune eval` end to end on a tiny model and the real Alpaca seed data: one model, and --compare (base vs
base + adapter on the same examples) from an adapter dir or from a run dir whose config.yaml names model and data."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from mlxtune.adapters import save_adapter
from mlxtune.cli import main
from mlxtune.config import load_config
from mlxtune.loading import load
from mlxtune.lora import apply_lora, lora_modules

FAST = ["--max-examples", "3", "--max-tokens", "4", "--batch-size", "4"]


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_qwen_dir, alpaca_seed_dir) -> Path:
    """A run dir: config.yaml naming the tiny model and the seed data, and a LoRA adapter with B != 0."""
    run = tmp_path_factory.mktemp("run")
    model, _ = load(tiny_qwen_dir)
    apply_lora(model, rank=4, alpha=8.0, targets=["q_proj", "v_proj"], verbose=False)
    mx.random.seed(0)
    for m in lora_modules(model).values():
        m.lora_b = 0.5 * mx.random.normal(m.lora_b.shape)
    save_adapter(model, run, base_path=str(tiny_qwen_dir), fingerprint=model.source["fingerprint"], rank=4,
                 alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"], layers=None)
    load_config({"model": {"path": str(tiny_qwen_dir)}, "data": {"train": str(alpaca_seed_dir)},
                 "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}, "output_dir": str(run)}).save(run / "config.yaml")
    return run


def test_eval_one_model_writes_report(tmp_path, tiny_qwen_dir, alpaca_seed_dir, monkeypatch, capsys):
    monkeypatch.delenv("MLXTUNE_BERTSCORE_MODEL", raising=False)
    out = tmp_path / "rep"
    assert run_cli(["eval", "--model", str(tiny_qwen_dir), "--data", str(alpaca_seed_dir), "--split", "valid", *FAST,
                    "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert report["n_examples"] == 3 and report["data"].endswith("(valid)")
    assert m["ppl"] > 1 and m["bpb"] > 0 and m["n_tokens"] > 0
    for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert 0 <= m[k] <= 100
    assert report["bertscore"]["available"] is False and "bertscore_f1" not in m
    assert len((out / "generations.jsonl").read_text().splitlines()) == 3
    assert "perplexity" in capsys.readouterr().out


def test_eval_compare_from_run_dir(tmp_path, adapter_run, monkeypatch):
    """--adapter RUN_DIR alone: config.yaml supplies the model and the data (its test split)."""
    monkeypatch.delenv("MLXTUNE_BERTSCORE_MODEL", raising=False)
    out = tmp_path / "cmp"
    assert run_cli(["eval", "--adapter", str(adapter_run), "--compare", *FAST, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    base, tuned, delta = report["base"], report["tuned"], report["delta"]
    assert report["data"].endswith("(test)") and report["n_examples"] == 3
    assert base["n_tokens"] == tuned["n_tokens"]  # the same examples
    assert tuned["loss"] != base["loss"]  # the adapter changes the model
    assert delta["loss"] == pytest.approx(tuned["loss"] - base["loss"])
    s = report["samples"][0]
    assert set(s) == {"prompt", "reference", "base", "tuned"}
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| metric | base | tuned | change |" in md and "![metrics" in md and "**Tuned**" in md
    assert "BERTScore: unavailable" in md


def test_eval_compare_with_adapter_dir_matches_tuned_model(tmp_path, adapter_run, tiny_qwen_dir, alpaca_seed_dir):
    """The tuned column equals evaluating the model loaded with the adapter directly."""
    from mlxtune.eval import evaluate

    cmp = evaluate(str(tiny_qwen_dir), data=str(alpaca_seed_dir / "test.jsonl"), adapter=str(adapter_run), compare=True,
                   max_examples=2, max_tokens=3, batch_size=2)
    direct = evaluate(str(tiny_qwen_dir), data=str(alpaca_seed_dir / "test.jsonl"), adapter=str(adapter_run),
                      max_examples=2, max_tokens=3, batch_size=2)
    assert cmp["tuned"]["loss"] == pytest.approx(direct["metrics"]["loss"], rel=1e-6)
    assert [s["tuned"] for s in cmp["samples"]] == [s["prediction"] for s in direct["samples"]]


def test_eval_errors_are_one_line_and_write_nothing(tmp_path, tiny_qwen_dir, capsys):
    out = tmp_path / "never"
    assert run_cli(["eval", "--model", str(tiny_qwen_dir), "--compare", "--data", "x", "--out", str(out)]) == 2
    assert "--compare" in capsys.readouterr().err
    assert run_cli(["eval", "--model", str(tiny_qwen_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()
