"""Exports of a run on the demo's GGUF base load in their real consumers, as written (issue 16).

The run: SmolLM2-135M-Instruct (Q4_1 GGUF, the demo's base) loaded in float32, LoRA with random non-zero A and B on
a few layers, saved the way the trainer saves it (adapters.save_adapter, the base path and fingerprint recorded).
Oracles: PEFT over transformers (torch, CPU, float32) and mlx-lm 0.32, each reading only what `mlxtune export`
wrote. Each must give mlxtune's logits within 1e-4; the adapter moves them far more than that.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from export_helpers import logits, randomize_lora

from mlxtune.adapters import BASE_FINGERPRINT_KEY, BASE_PATH_KEY, save_adapter
from mlxtune.cli import main
from mlxtune.loading import load
from mlxtune.lora import apply_lora

TOL = 1e-4
IDS = np.array([[1, 504, 3458, 314, 260, 1789, 282, 4649, 47, 2]], dtype=np.int32)


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, smollm2_gguf):
    """(run dir, mlxtune's logits with the adapter) for a LoRA on the GGUF base."""
    root = tmp_path_factory.mktemp("consumers")
    model, _ = load(smollm2_gguf, dtype="float32", tokenizer=False)
    base = logits(model, IDS)
    targets, layers = ["q_proj", "v_proj", "down_proj"], [0, 14, 29]
    apply_lora(model, rank=4, alpha=8.0, targets=targets, layers=layers, verbose=False)
    randomize_lora(model, seed=1, std=0.1)
    run = save_adapter(model, root / "run", base_path=smollm2_gguf, fingerprint=model.source["fingerprint"],
                       rank=4, alpha=8.0, dropout=0.0, targets=targets, layers=layers)
    want = logits(model, IDS)
    assert np.abs(want - base).max() > 100 * TOL  # the adapter matters: the checks below cannot pass by accident
    return root, run, want


def _export(capsys, run, fmt, out):
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--format", fmt, "--out", str(out)])
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_peft_export_of_a_gguf_run_loads_in_peft(gguf_run, capsys, smollm2_gguf):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    root, run, want = gguf_run
    out = root / "peft"
    said = _export(capsys, run, "peft", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((out / "base").resolve())  # an HF dir PEFT reads, not the .gguf
    assert f"base model: {out / 'base'} (a Hugging Face dir written from {smollm2_gguf.name}, which PEFT" in said
    assert json.loads((out / "base" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    meta = mx.load(str(out / "adapter_model.safetensors"), return_metadata=True)[1]
    assert meta[BASE_FINGERPRINT_KEY] and meta[BASE_PATH_KEY] == str(smollm2_gguf.resolve())
    ids = torch.tensor(IDS, dtype=torch.long)
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        got_auto = auto(ids).logits.float().numpy()
        del auto
        base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
        got_peft = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits.float().numpy()
    assert np.abs(got_auto - want).max() <= TOL
    assert np.abs(got_peft - want).max() <= TOL
    # mlxtune reads its own export back on the written base: the recorded fingerprint is the base's
    model, _ = load(out / "base", adapter=out, tokenizer=False)
    assert np.abs(logits(model, IDS) - want).max() <= TOL


def test_mlx_lm_export_of_a_gguf_run_loads_in_mlx_lm(gguf_run, capsys):
    import mlx_lm

    root, run, want = gguf_run
    out = root / "mlx-lm"
    said = _export(capsys, run, "mlx-lm", out)
    base = json.loads((out / "adapter_config.json").read_text())["model"]
    assert base == str((out / "base").resolve()) and base in said
    model, _ = mlx_lm.load(base, adapter_path=str(out))
    got = np.array(model(mx.array(IDS)).astype(mx.float32))
    assert np.abs(got - want).max() <= TOL


def test_hf_base_export_writes_the_dequantized_base(gguf_run, capsys, smollm2_gguf):
    root, run, _ = gguf_run
    out = root / "hf-base"
    said = _export(capsys, run, "hf-base", out)
    assert f"wrote hf-base export to {out}" in said
    assert not (out / "README.md").exists()  # the untrained base: no fine-tune model card
    written, _ = load(out, tokenizer=False)
    gguf, _ = load(smollm2_gguf, dtype="float32", tokenizer=False)
    assert written.source["fingerprint"] == gguf.source["fingerprint"]  # the same weights, float32
    assert np.abs(logits(written, IDS) - logits(gguf, IDS)).max() == 0.0
