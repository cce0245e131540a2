"""QLoRA through the trainer: `mlxtune.train` with `model.quantize` trains LoRA on a 4-bit base (the loss falls),
and the saved adapter loads back onto the same quantized base.

(Fused-from-quantized == unfused quantized + LoRA is tests/test_adapters.py::test_qlora_save_load_and_fuse; the
measured run on the real demo model is benchmarks/bench_qlora_demo.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import make_bpe_model_dir

QUANT = {"bits": 4, "group_size": 32}  # the tiny model's dims (64, 128) are multiples of 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory, alpaca_seed_dir):
    """(model dir, data dir): a random 2-layer Llama (tied head) with a 512-token byte-level BPE trained on the
    seed data; 8 short seed tasks to train on and 4 to validate on.

    Not conftest's tiny_llama_dir: its real Llama 3 vocabulary (128,256 rows) makes the 4-bit tied output
    projection cost ~5 s per forward on a 2-core CPU (MLX's CPU quantized matmul is slow), ~75 s for 15 steps.
    """
    root = tmp_path_factory.mktemp("qlora")
    rows = [json.loads(l) for l in (alpaca_seed_dir / "train.jsonl").read_text().splitlines()]
    short = sorted(rows, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:12]
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:8]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[8:]))
    texts = [v for r in rows for v in r.values() if isinstance(v, str)]
    make_bpe_model_dir(root / "model", texts)
    return root / "model", data


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, assets):
    import mlxtune

    model_dir, data_dir = assets
    return mlxtune.train(
        model={"path": str(model_dir), "dtype": "float32", "quantize": QUANT},
        lora={"rank": 8, "alpha": 16, "dropout": 0.0},
        data={"train": str(data_dir), "max_length": 64, "packing": False, "template": "alpaca", "shuffle": False,
              "cache": False},
        train={"max_steps": 15, "batch_size": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "schedule": "constant",
               "log_every": 1, "eval_every": 0, "save_every": 0, "seed": 0},
        output_dir=str(tmp_path_factory.mktemp("qlora_run") / "run"),
        quiet=True,
    )


def _train_losses(run_dir: Path) -> list[float]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in recs if "train_loss" in r]


@pytest.mark.timeout(300)
def test_qlora_training_loss_falls(qlora_run):
    """4 fixed batches (no shuffling) seen ~4 times: each of the first 3 steps' batches has a lower loss when it
    comes round again 3 epochs later, and the adapter records its 4-bit base."""
    assert qlora_run.steps == 15
    losses = _train_losses(qlora_run.run_dir)
    assert len(losses) == 15 and all(np.isfinite(losses))
    for i in range(3):  # step i+1 and step i+13 train on the same batch
        assert losses[i + 12] < losses[i] - 0.5, losses
    cfg = json.loads((qlora_run.run_dir / "adapter_config.json").read_text())
    assert cfg["base_model"]["quantization"] == QUANT
    assert cfg["base_model"]["dtype"] == "float32"


@pytest.mark.timeout(300)
def test_qlora_adapter_loads_back_onto_quantized_base(qlora_run, assets):
    import mlxtune
    from mlxtune.config import load_config
    from mlxtune.data import load_splits, make_batches
    from mlxtune.eval import score
    from mlxtune.lora import LoRALinear, lora_modules

    model_dir, _ = assets
    base, tok = mlxtune.load(model_dir, dtype="float32", quantize=QUANT)
    tuned, _ = mlxtune.load(model_dir, adapter=qlora_run.run_dir, dtype="float32", quantize=QUANT)
    mods = lora_modules(tuned)
    assert len(mods) == 2 * 7  # 2 layers x the 7 default projections
    assert all(isinstance(m, LoRALinear) and isinstance(m.linear, nn.QuantizedLinear) for m in mods.values())
    assert isinstance(tuned.model.embed_tokens, nn.QuantizedEmbedding)
    assert not tuned.training

    # the weights that were saved are the ones applied
    saved = mx.load(str(qlora_run.run_dir / "adapters.safetensors"))
    assert set(saved) == {f"{p}.{ab}" for p in mods for ab in ("lora_a", "lora_b")}
    for path, m in mods.items():
        np.testing.assert_array_equal(np.array(m.lora_a), np.array(saved[f"{path}.lora_a"]))
        np.testing.assert_array_equal(np.array(m.lora_b), np.array(saved[f"{path}.lora_b"]))

    # and they carry what was learned: the tuned model fits the training data far better than the base
    cfg = load_config(qlora_run.run_dir / "config.yaml")
    splits = load_splits(cfg.data, tok, cfg.train.seed)
    batches = make_batches(splits.train, 2, 64, False, tok.pad_token_id)
    base_loss, tuned_loss = score(base, batches)["loss"], score(tuned, batches)["loss"]
    assert tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)

    # the same adapter on the unquantized base: close to the QLoRA function it was trained as, not equal
    dense, _ = mlxtune.load(model_dir, adapter=qlora_run.run_dir, dtype="float32")
    assert isinstance(lora_modules(dense)["model.layers.0.self_attn.q_proj"].linear, nn.Linear)
    dense_loss = score(dense, batches)["loss"]
    assert dense_loss != tuned_loss
    assert abs(dense_loss - tuned_loss) < 0.25 * (base_loss - tuned_loss), (dense_loss, tuned_loss, base_loss)
