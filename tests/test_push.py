"""`mlxtune push` and the model card (issue #17): a dry run stages a folder whose README.md loads with
huggingface_hub's ModelCard (base model, license, model-index equal to the run's report.json) and whose adapter
loads with mlxtune and with PEFT; offline, without a token or without a network: one line, exit 2, nothing left."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.errors import ConfigError, MlxtuneError

REPO = "alice/tiny-lora"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, alpaca_seed_dir):
    """A 4-step run of the tiny Llama on 24 Alpaca seed tasks, and an eval report of it in RUN/eval."""
    import mlxtune.trainer as trainer
    from mlxtune.eval import evaluate

    tmp = tmp_path_factory.mktemp("push")
    data = tmp / "data"
    data.mkdir()
    lines = (alpaca_seed_dir / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[24:30]) + "\n")
    cfg = {"model": {"path": str(tiny_llama_dir)}, "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
           "data": {"train": str(data), "max_length": 64, "packing": True},
           "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "save_every": 4, "eval_every": 2,
                     "log_every": 1, "seed": 1},
           "output_dir": str(tmp / "run")}
    run = trainer.train(cfg, quiet=True).run_dir
    evaluate(None, None, str(data / "valid.jsonl"), str(run), max_examples=2, max_tokens=4, batch_size=2,
             out=str(run / "eval"))
    return Path(run)


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def _report_metrics(run: Path) -> dict:
    from mlxtune.modelcard import METRIC_TYPES

    report = json.loads((run / "eval" / "report.json").read_text())
    return {METRIC_TYPES[k]: v for k, v in report["metrics"].items() if k in METRIC_TYPES}


def test_dry_run_stages_the_adapter_with_a_valid_card(trained, tmp_path):
    from mlxtune.adapters import read_adapter
    from mlxtune.publish import push

    res = push(trained, REPO, dry_run=True, out=tmp_path / "stage")
    assert res.folder == tmp_path / "stage" and res.url is None
    assert set(res.files) == {"README.md", "adapters.safetensors", "adapter_config.json", "loss.png"}
    assert res.files["adapters.safetensors"] == (trained / "adapters.safetensors").stat().st_size
    card = _card(res.folder)
    d = card.data
    assert d.library_name == "mlxtune" and d.pipeline_tag == "text-generation" and "lora" in d.tags
    assert d.base_model is None  # a local base: named in the text, not claimed as a hub id
    assert Path(json.loads((trained / "adapter_config.json").read_text())["base_model"]["path"]).name in card.text
    assert {r.metric_type: r.metric_value for r in d.eval_results} == pytest.approx(_report_metrics(trained))
    assert {r.dataset_split for r in d.eval_results} == {"train"} and d.model_name == REPO
    assert "rank 4, alpha 8" in card.text and "q_proj, v_proj" in card.text and "final training loss" in card.text
    assert f"hf download {REPO}" in card.text and "![training and validation loss](loss.png)" in card.text
    staged, run = read_adapter(res.folder), read_adapter(trained)
    assert staged.weights.keys() == run.weights.keys()
    for k in run.weights:
        assert mx.array_equal(staged.weights[k], run.weights[k]), k


def test_dry_run_peft_adapter_loads_with_peft(trained, tmp_path, tiny_llama_dir):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from mlxtune.adapters import read_adapter
    from mlxtune.publish import push

    res = push(trained, REPO, what="peft", dry_run=True, out=tmp_path / "stage")
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= set(res.files)
    assert _card(res.folder).data.library_name == "peft"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(res.folder))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if "lora_" in k}
    run = read_adapter(trained)
    assert len(state) == len(run.weights) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    for key, w in run.weights.items():
        path, which = key.rsplit(".", 1)
        name = {"lora_a": "lora_A", "lora_b": "lora_B"}[which]
        got = state[f"base_model.model.{path}.{name}.default.weight"]
        np.testing.assert_array_equal(got, np.array(w).T)  # PEFT stores (r, in) and (out, r)


@pytest.mark.parametrize("what, library, expect, usage", [
    ("mlx-lm", "mlx", "adapters.safetensors", "--adapter-path tiny-lora"),
    ("fused", "transformers", "config.json", f"mlx_lm.generate --model {REPO}"),
    ("gguf", None, "model-f16.gguf", f"llama-cli -hf {REPO}"),
])
def test_dry_run_other_formats(trained, tmp_path, what, library, expect, usage):
    from mlxtune.publish import push

    res = push(trained, REPO, what=what, dry_run=True, out=tmp_path / "stage")
    assert expect in res.files and "README.md" in res.files
    card = _card(res.folder)
    assert card.data.library_name == library and usage in card.text


def test_card_names_a_hub_base_with_its_license(trained, tmp_path):
    """A base from the hub (a hub id, or a snapshot dir in the Hugging Face cache) is base_model; its card's license
    is inherited; a hub training set is listed under datasets."""
    import dataclasses

    from huggingface_hub import ModelCard

    from mlxtune.modelcard import base_hub_id, render_card, run_facts

    snap = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: llama3.2\n---\n# tiny\n")
    assert base_hub_id(str(snap)) == "acme/tiny-llama"
    assert base_hub_id("acme/tiny-llama") == "acme/tiny-llama" and base_hub_id(str(tmp_path)) is None
    facts = dataclasses.replace(run_facts(trained), base_path=str(snap), base_hub_id="acme/tiny-llama",
                                datasets=["tatsu-lab/alpaca"])
    d = ModelCard(render_card(facts, "peft", repo_id=REPO, name=REPO)).data
    assert d.base_model == "acme/tiny-llama" and d.license == "llama3.2" and d.datasets == ["tatsu-lab/alpaca"]
    assert {r.metric_type: r.metric_value for r in d.eval_results} == pytest.approx(_report_metrics(trained))


def test_export_folder_card_without_repo(trained, tmp_path):
    """What `export` writes beside an export: the card names the local folder and embeds no plot it lacks."""
    from mlxtune.modelcard import write_model_card

    folder = tmp_path / "my-export"
    folder.mkdir()
    path = write_model_card(folder, run_dir=trained, what="adapter")
    card = _card(folder)
    assert path == folder / "README.md" and card.data.model_name == "my-export"
    assert "hf download" not in card.text and "loss.png" not in card.text
    with pytest.raises(ConfigError, match="is not one of"):
        write_model_card(folder, run_dir=trained, what="onnx")


# ---------------------------------------------------------------------------------------------------------
# Failures: one line, exit 2, nothing left behind


def _cli(monkeypatch, argv):
    import mlxtune.cli as cli

    if "mlxtune.cli.push" not in cli.COMMAND_MODULES:  # until the lead registers the command
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "mlxtune.cli.push"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


@pytest.fixture
def private_tmp(monkeypatch, tmp_path):
    """tempfile's dir, to see that a failed push leaves no staging dir behind."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_push_offline_is_one_line_exit_2(trained, monkeypatch, capsys, private_tmp):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _cli(monkeypatch, ["push", str(trained), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "offline" in err and "HF_HUB_OFFLINE" in err
    assert list(private_tmp.iterdir()) == []


def test_push_without_token_or_network(trained, monkeypatch, capsys, private_tmp):
    import huggingface_hub
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert _cli(monkeypatch, ["push", str(trained), "--repo", REPO, "--what", "peft"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Hugging Face token" in err and "hf auth login" in err
    assert list(private_tmp.iterdir()) == []

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert _cli(monkeypatch, ["push", str(trained), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreachable" in err and "127.0.0.1:9" in err
    assert list(private_tmp.iterdir()) == []  # staged, then removed


def test_cli_dry_run_lists_the_files(trained, monkeypatch, capsys, tmp_path):
    out = tmp_path / "stage"
    assert _cli(monkeypatch, ["push", str(trained), "--repo", REPO, "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "would upload 4 files" in printed and "adapters.safetensors" in printed and f"staged in {out}" in printed
    assert (out / "README.md").is_file()


@pytest.mark.parametrize("argv, expect", [
    (["--repo", "not a repo"], "not a hub repo id"),
    (["--repo", REPO, "--out", "EXISTING"], "already exists and is not empty"),
])
def test_bad_requests_are_one_line(trained, monkeypatch, capsys, tmp_path, argv, expect):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("x")
    argv = [str(existing) if a == "EXISTING" else a for a in argv]
    assert _cli(monkeypatch, ["push", str(trained), *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err


def test_not_a_run_dir(tmp_path):
    from mlxtune.publish import push

    with pytest.raises(MlxtuneError, match="not a training run dir"):
        push(tmp_path, REPO, dry_run=True)
    with pytest.raises(ConfigError, match="--what"):
        push(tmp_path, REPO, what="onnx", dry_run=True)
