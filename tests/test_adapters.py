"""Adapter files: save/load round trips, QLoRA, imports from mlx-lm, and one clear error per kind of misfit.

Every equality test uses non-zero random A and B and also checks that the adapter moves the logits by far more
than the tolerance, so none of them could pass with an adapter that does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from export_helpers import load_base, logits, randomize_lora, rel_err, tokens

from mlxtune import fsio
from mlxtune.adapters import CONFIG_FILE, SAVE_ID_KEY, WEIGHTS_FILE, load_adapter, read_adapter, save_adapter
from mlxtune.errors import AdapterError
from mlxtune.lora import adapter_weights, apply_lora, lora_modules


def _trained(base_dir, out, *, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), layers=None, quantize=None, seed=0):
    """A base with random non-zero LoRA saved as an mlxtune adapter at `out`; returns (model, base logits)."""
    model, _ = load_base(base_dir, quantize=quantize)
    ids = tokens(model.args.vocab_size)
    base_logits = logits(model, ids)
    apply_lora(model, rank=rank, alpha=alpha, targets=list(targets), layers=layers, verbose=False)
    randomize_lora(model, seed)
    save_adapter(model, out, base_path=base_dir, fingerprint=model.source["fingerprint"], rank=rank, alpha=alpha,
                 dropout=0.0, targets=list(targets), layers=layers)
    return model, base_logits


def test_save_load_round_trip(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("lora: {rank: 4}\n")  # a run dir holds other files beside the adapter
    model, base_logits = _trained(tiny_llama_dir, run, targets=("q", "v", "down"), layers=1)
    ids = tokens(model.args.vocab_size)
    want = logits(model, ids)
    assert rel_err(want, base_logits) > 1e-2  # the adapter matters

    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["format"] == "mlxtune-lora" and cfg["format_version"] == 1
    assert cfg["base_model"]["fingerprint"] == model.source["fingerprint"]
    assert cfg["base_model"]["path"] == str(tiny_llama_dir.resolve())
    assert (cfg["base_model"]["model_type"], cfg["base_model"]["hidden_size"], cfg["base_model"]["num_hidden_layers"]) == ("llama", 64, 2)
    assert cfg["base_model"]["quantization"] is None
    assert cfg["targets"] == ["q_proj", "v_proj", "down_proj"] and cfg["layers"] == [1]
    assert (cfg["rank"], cfg["alpha"], cfg["dropout"]) == (4, 8.0, 0.0)
    assert cfg["wrapped"] == sorted(lora_modules(model))
    saved = mx.load(str(run / WEIGHTS_FILE))
    assert sorted(saved) == sorted(adapter_weights(model))
    assert saved["model.layers.1.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert saved["model.layers.1.self_attn.q_proj.lora_b"].shape == (4, 64)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert {oct((run / f).stat().st_mode & 0o777) for f in (WEIGHTS_FILE, CONFIG_FILE)} == {oct(0o666 & ~umask)}

    fresh, _ = load_base(tiny_llama_dir)
    wrapped = load_adapter(fresh, run)
    assert sorted(wrapped) == cfg["wrapped"]
    np.testing.assert_array_equal(logits(fresh, ids), want)
    # a path to one of the files works too
    again, _ = load_base(tiny_llama_dir)
    load_adapter(again, run / CONFIG_FILE)
    np.testing.assert_array_equal(logits(again, ids), want)


def test_imported_adapter_keeps_training(tiny_llama_dir, tmp_path):
    """After load_adapter the LoRA weights are the trainable parameters, and a step moves them."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    _trained(tiny_llama_dir, tmp_path / "a")
    model, _ = load_base(tiny_llama_dir)
    load_adapter(model, tmp_path / "a")
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(trainable) == sorted(adapter_weights(model))
    ids = mx.array(tokens(model.args.vocab_size, n=9))
    model.train()

    def loss_fn(m):
        out = m(ids[:, :-1])
        return nn.losses.cross_entropy(out, ids[:, 1:]).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    flat = dict(tree_flatten(grads))
    assert sorted(flat) == sorted(trainable)
    assert all(float(mx.abs(g).max()) > 0 for g in flat.values())
    before = {k: np.array(v) for k, v in trainable.items()}
    opt = optim.Adam(learning_rate=1e-2)
    opt.update(model, grads)
    mx.eval(model.parameters())
    after = dict(tree_flatten(model.trainable_parameters()))
    assert all(not np.array_equal(before[k], np.array(after[k])) for k in before)


def test_qlora_save_load_and_fuse(tiny_qwen_dir, tmp_path):
    """LoRA on a 4-bit base: the adapter records the quantization, reloads exactly, and fuses in float."""
    from mlxtune.config import QuantizeConfig
    from mlxtune.quant import dequantize as dequantize_model
    from mlxtune.quant import quantize_model
    from mlxtune.lora import merge_lora

    q = {"bits": 4, "group_size": 64}
    model, base_logits = _trained(tiny_qwen_dir, tmp_path / "a", quantize=q, targets=("q", "k", "v", "o", "gate", "up", "down"))
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    ids = tokens(model.args.vocab_size)
    want = logits(model, ids)
    assert rel_err(want, base_logits) > 1e-2
    recorded = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["base_model"]
    assert recorded["quantization"] == q and recorded["dtype"] == "float32"

    fresh, _ = load_base(tiny_qwen_dir, quantize=q)
    load_adapter(fresh, tmp_path / "a")
    np.testing.assert_array_equal(logits(fresh, ids), want)

    # fuse: dequantize, merge in float32 -> the same function as quantized base + LoRA (float rounding only)
    merge_lora(fresh)
    dequantize_model(fresh)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in fresh.named_modules())
    fused = logits(fresh, ids)
    assert rel_err(fused, want) < 1e-5
    # re-quantized to 8 bits: within quantization tolerance, and far from the adapter-less base
    quantize_model(fresh, QuantizeConfig(bits=8, group_size=64))
    requant = logits(fresh, ids)
    err = rel_err(requant, want)
    assert err < 2e-2
    assert err < rel_err(base_logits, want) / 5


# --- import of adapters written by mlx-lm itself ------------------------------------------------------------


@pytest.mark.parametrize("keys", [["self_attn.q_proj", "mlp.up_proj"], None])
def test_import_mlx_lm_adapter(tiny_llama_dir, tmp_path, keys):
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from export_helpers import mlx_lm_base_copy

    base = mlx_lm_base_copy(tiny_llama_dir, tmp_path / "base")
    theirs, _ = mlx_lm_load(str(base))
    ids = tokens(theirs.args.vocab_size)
    base_logits = np.array(theirs(mx.array(ids)))
    theirs.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(theirs, 1, params)
    key = mx.random.key(3)
    for _, m in theirs.named_modules():
        if hasattr(m, "lora_b"):
            key, ka, kb = mx.random.split(key, 3)
            m.lora_a = 0.2 * mx.random.normal(m.lora_a.shape, key=ka)
            m.lora_b = 0.2 * mx.random.normal(m.lora_b.shape, key=kb)
    theirs.eval()
    want = np.array(theirs(mx.array(ids)))
    assert rel_err(want, base_logits) > 1e-2
    out = tmp_path / "mlx_lm_adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    # mlx-lm writes its whole argument namespace; the keys we read are among many others
    cfg = {"model": str(base), "fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params,
           "batch_size": 4, "iters": 10, "learning_rate": 1e-5, "mask_prompt": False}
    (out / "adapter_config.json").write_text(json.dumps(cfg))

    spec = read_adapter(out)
    assert spec.format == "mlx-lm" and spec.rank == 4 and spec.alpha == 12.0
    model, _ = load_base(base)
    wrapped = load_adapter(model, out)
    expect = {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"} if keys else {
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(wrapped) == expect
    assert rel_err(logits(model, ids), want) < 1e-5


# --- errors: one AdapterError naming every problem, and the model left untouched --------------------------


def _fails(model, path, *needles, **kw):
    with pytest.raises(AdapterError) as e:
        load_adapter(model, path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not lora_modules(model)  # nothing applied
    return msg


@pytest.fixture(scope="module")
def saved_adapter(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "a"
    _trained(tiny_llama_dir, out, targets=("q", "v", "down"))
    return out


def test_wrong_base_shapes_and_fingerprint(saved_adapter, tmp_path, llama3_tokenizer_dir):
    from conftest import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "wide", "llama", tokenizer_dir=llama3_tokenizer_dir, intermediate_size=96)
    model, _ = load_base(other)
    msg = _fails(model, saved_adapter, "fingerprint", "shape mismatch", "2 shape mismatch(es)",
                 "model.layers.0.mlp.down_proj.lora_a is (128, 4), model needs (96, 4)")
    assert msg.count("shape mismatch") == 1  # grouped in one problem


def test_wrong_fingerprint_same_shapes(saved_adapter, tmp_path, llama3_tokenizer_dir):
    from conftest import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "seed1", "llama", tokenizer_dir=llama3_tokenizer_dir, seed=1)
    model, _ = load_base(other)
    msg = _fails(model, saved_adapter, "fingerprint", "different base model")
    assert "missing" not in msg and "unexpected" not in msg
    # a deliberate override (e.g. the same weights re-saved) still loads
    assert load_adapter(model, saved_adapter, check_fingerprint=False)


def test_wrong_model_type(saved_adapter, tiny_qwen_dir):
    model, _ = load_base(tiny_qwen_dir)
    _fails(model, saved_adapter, "model_type is 'llama' in the adapter but 'qwen2' in the model")


def test_missing_and_unexpected_keys(saved_adapter, tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved_adapter, bad)
    w = dict(mx.load(str(bad / WEIGHTS_FILE)))
    del w["model.layers.0.self_attn.v_proj.lora_b"]
    w["model.layers.0.self_attn.k_proj.lora_a"] = mx.zeros((64, 4))
    mx.save_safetensors(str(bad / WEIGHTS_FILE), w)
    model, _ = load_base(tiny_llama_dir)
    _fails(model, bad, "2 problem(s)", "1 missing key(s): model.layers.0.self_attn.v_proj.lora_b",
           "1 unexpected key(s): model.layers.0.self_attn.k_proj.lora_a")


def test_missing_files_and_unknown_format(saved_adapter, tiny_llama_dir, tmp_path):
    model, _ = load_base(tiny_llama_dir)
    _fails(model, tmp_path / "nope", "adapter path not found")
    (tmp_path / "empty").mkdir()
    _fails(model, tmp_path / "empty", "missing adapter_config.json", "missing adapters.safetensors")
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    shutil.copy(saved_adapter / CONFIG_FILE, only_cfg / CONFIG_FILE)
    _fails(model, only_cfg, "missing adapters.safetensors")
    for cfg, needle in (({"format": "lokr"}, "unknown adapter format 'lokr'"), ({"r": 8}, "unknown adapter format"),
                        ({"peft_type": "IA3"}, "PEFT adapter type 'IA3' is not supported"),
                        ({"fine_tune_type": "dora", "lora_parameters": {}}, "fine_tune_type 'dora'")):
        d = tmp_path / f"fmt{len(list(tmp_path.iterdir()))}"
        shutil.copytree(saved_adapter, d)
        (d / CONFIG_FILE).write_text(json.dumps(cfg))
        _fails(model, d, needle)
    broken = tmp_path / "broken"
    shutil.copytree(saved_adapter, broken)
    (broken / CONFIG_FILE).write_text('{"format": "mlxtune-lora",\n  "rank": }')
    _fails(model, broken, "adapter_config.json:2: not valid JSON")
    newer = tmp_path / "newer"
    shutil.copytree(saved_adapter, newer)
    cfg = json.loads((newer / CONFIG_FILE).read_text())
    cfg["format_version"] = 2
    (newer / CONFIG_FILE).write_text(json.dumps(cfg))
    _fails(model, newer, "newer mlxtune")


def test_adapter_onto_lora_model_and_save_checks(saved_adapter, tiny_llama_dir, tmp_path):
    model, _ = load_base(tiny_llama_dir)
    with pytest.raises(AdapterError, match="no LoRA layers to save"):
        save_adapter(model, tmp_path / "x", base_path=None, fingerprint=None, rank=4, alpha=8, dropout=0.0, targets=None, layers=None)
    assert not (tmp_path / "x").exists()
    load_adapter(model, saved_adapter)
    with pytest.raises(AdapterError, match="already has LoRA layers"):
        load_adapter(model, saved_adapter)
    with pytest.raises(AdapterError, match="not the rank=8"):
        save_adapter(model, tmp_path / "y", base_path=None, fingerprint=None, rank=8, alpha=8, dropout=0.0,
                     targets=["q", "v", "down"], layers=None)
    with pytest.raises(AdapterError, match="are not the ones"):
        save_adapter(model, tmp_path / "z", base_path=None, fingerprint=None, rank=4, alpha=8, dropout=0.0,
                     targets=["q"], layers=None)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# --- saving: an interrupted save is detected; a dedicated dir is swapped whole ---------------------------------


def _save_again(model, out, **kw):
    save_adapter(model, out, base_path=None, fingerprint=None, rank=4, alpha=8.0, dropout=0.0,
                 targets=["q", "v", "down"], layers=None, **kw)


class _Killed(BaseException):
    """Stands for the process dying at this point."""


def test_interrupted_save_is_detected(saved_adapter, tiny_llama_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(saved_adapter, run)
    (run / "checkpoints" / "step_000004").mkdir(parents=True)
    (run / "checkpoints" / "step_000004" / "state.json").write_text("{}")
    model, _ = load_base(tiny_llama_dir)
    load_adapter(model, run)
    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["save_id"] == mx.load(str(run / WEIGHTS_FILE), return_metadata=True)[1][SAVE_ID_KEY]

    def killed(path, obj):
        raise _Killed

    monkeypatch.setattr(fsio, "write_json", killed)  # dies after the weights, before the config
    with pytest.raises(_Killed):
        _save_again(model, run)
    monkeypatch.undo()
    with pytest.raises(AdapterError) as e:
        read_adapter(run)
    msg = str(e.value)
    assert "come from different saves" in msg and "interrupted" in msg and "--resume" in msg
    assert str(run / "checkpoints" / "step_000004") in msg and "\n" not in msg
    _save_again(model, run)  # a complete save makes it whole again
    assert read_adapter(run).rank == 4


def test_adapter_without_save_id_still_loads(saved_adapter, tiny_llama_dir, tmp_path):
    """Adapters written before save ids existed (no id in either file) load as before."""
    old = tmp_path / "old"
    shutil.copytree(saved_adapter, old)
    cfg = json.loads((old / CONFIG_FILE).read_text())
    del cfg["save_id"]
    (old / CONFIG_FILE).write_text(json.dumps(cfg))
    mx.save_safetensors(str(old / WEIGHTS_FILE), dict(mx.load(str(old / WEIGHTS_FILE))), metadata={"format": "mlx"})
    model, _ = load_base(tiny_llama_dir)
    assert load_adapter(model, old)


def test_replace_writes_one_dir_swap(saved_adapter, tiny_llama_dir, tmp_path, monkeypatch):
    """best/ (adapter + best.json) is written as ONE directory swap; a failure mid-write leaves the old copy."""
    model, _ = load_base(tiny_llama_dir)
    load_adapter(model, saved_adapter)
    best = tmp_path / "run" / "best"
    _save_again(model, best, replace=True, extra_files={"best.json": {"step": 3}})
    assert sorted(p.name for p in best.iterdir()) == ["adapter_config.json", "adapters.safetensors", "best.json"]
    first = (best / CONFIG_FILE).read_text()

    def killed(path, obj):
        if Path(path).name == "best.json":
            raise _Killed
        return real(path, obj)

    real = fsio.write_json
    monkeypatch.setattr(fsio, "write_json", killed)
    with pytest.raises(_Killed):
        _save_again(model, best, replace=True, extra_files={"best.json": {"step": 6}})
    monkeypatch.undo()
    assert (best / CONFIG_FILE).read_text() == first and json.loads((best / "best.json").read_text()) == {"step": 3}
    assert not [p for p in best.parent.iterdir() if p.name.startswith(".")]  # the temp dir is gone
    _save_again(model, best, replace=True, extra_files={"best.json": {"step": 6}})
    assert (best / CONFIG_FILE).read_text() != first and json.loads((best / "best.json").read_text()) == {"step": 6}
    assert read_adapter(best).rank == 4


def test_non_finite_and_non_float_weights_refused():
    from mlxtune.adapters import check_finite

    ok = {"a.lora_a": mx.ones((4, 2)), "a.lora_b": mx.zeros((2, 4))}
    check_finite(ok, "x")  # finite float weights pass
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(AdapterError, match=r"^w\.safetensors: a\.lora_b holds NaN or inf \(1 such tensor"):
            check_finite({**ok, "a.lora_b": mx.array([[0.0, value, 0.0, 0.0]] * 2)}, "w.safetensors")
    with pytest.raises(AdapterError, match="a.lora_a is int32, not a float weight"):
        check_finite({**ok, "a.lora_a": mx.ones((4, 2), dtype=mx.int32)}, "w.safetensors")


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm"])
def test_exports_carry_the_base_fingerprint(fmt, saved_adapter, tiny_llama_dir, tmp_path):
    """PEFT / mlx-lm exports stamp the base's fingerprint and path; read back, it is checked like mlxtune's own
    (a match loads, a mismatch is the usual "different base model" error, none at all is accepted as before)."""
    from mlxtune.adapters import BASE_FINGERPRINT_KEY, BASE_PATH_KEY, PEFT_WEIGHTS_FILE
    from mlxtune.exports import export

    out = export(saved_adapter, fmt, tmp_path / "exp")
    wfile = out / (PEFT_WEIGHTS_FILE if fmt == "peft" else WEIGHTS_FILE)
    w, meta = mx.load(str(wfile), return_metadata=True)
    spec = read_adapter(saved_adapter)
    assert meta[BASE_FINGERPRINT_KEY] == spec.base["fingerprint"] and meta[BASE_PATH_KEY] == str(tiny_llama_dir.resolve())
    assert read_adapter(out).base["fingerprint"] == spec.base["fingerprint"]
    load_adapter(load_base(tiny_llama_dir)[0], out)  # the same base: accepted
    mx.save_safetensors(str(wfile), dict(w), metadata={**meta, BASE_FINGERPRINT_KEY: "0" * 16})
    with pytest.raises(AdapterError, match="trained on a different base model"):
        load_adapter(load_base(tiny_llama_dir)[0], out)
    mx.save_safetensors(str(wfile), dict(w), metadata={"format": meta["format"]})  # a foreign export: no stamp
    load_adapter(load_base(tiny_llama_dir)[0], out)
