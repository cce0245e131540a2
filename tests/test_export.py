"""Export and fuse against the real consumers: PEFT over transformers, mlx-lm's loader and fuse, the CLI.

Oracles: transformers + peft (torch, CPU, float32) and mlx-lm 0.32. Every adapter has non-zero random A and B,
and each test checks the adapter moves the logits far more than the tolerance.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from export_helpers import load_base, logits, mlx_lm_base_copy, randomize_lora, rel_err, tokens, torch_logits, tree

from mlxtune.adapters import load_adapter, read_adapter, save_adapter
from mlxtune.errors import AdapterError, ExportError
from mlxtune.exports import export, fuse
from mlxtune.lora import apply_lora


def _run(base_dir, run, *, rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"), layers=None, seed=0):
    """Random non-zero LoRA on the base, saved as a run dir; returns (model with LoRA, ids, lora logits, base logits)."""
    model, _ = load_base(base_dir)
    ids = tokens(model.args.vocab_size)
    base_logits = logits(model, ids)
    apply_lora(model, rank=rank, alpha=alpha, targets=list(targets), layers=layers, verbose=False)
    randomize_lora(model, seed)
    save_adapter(model, run, base_path=base_dir, fingerprint=model.source["fingerprint"], rank=rank, alpha=alpha,
                 dropout=0.0, targets=list(targets), layers=layers)
    want = logits(model, ids)
    assert rel_err(want, base_logits) > 2e-2  # the adapter matters: equality below cannot pass by accident
    return model, ids, want, base_logits


def _hf(base_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


# --- PEFT ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,targets,layers", [("qwen", ("q", "v", "o", "down"), [1]), ("llama", ("q", "k", "v", "o", "gate", "up", "down"), None)])
def test_peft_export_matches_peft(family, targets, layers, tiny_qwen_dir, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    base_dir = tiny_qwen_dir if family == "qwen" else tiny_llama_dir
    _, ids, want, _ = _run(base_dir, tmp_path / "run", rank=4, alpha=12.0, targets=targets, layers=layers)
    out = export(tmp_path / "run", "peft", tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4 and cfg["lora_alpha"] == 12.0
    assert cfg["base_model_name_or_path"] == str(base_dir.resolve())
    assert cfg["layers_to_transform"] == layers
    w = mx.load(str(out / "adapter_model.safetensors"))
    assert w["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert w["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)

    peft_model = PeftModel.from_pretrained(_hf(base_dir), str(out)).eval()
    assert rel_err(torch_logits(peft_model, ids), want) <= 1e-4
    # and our own reader takes the PEFT files back
    model, _ = load_base(base_dir)
    load_adapter(model, out)
    assert rel_err(logits(model, ids), want) <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_imports(rslora, tiny_llama_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    hf = _hf(tiny_llama_dir)
    ids = tokens(hf.config.vocab_size)
    base_logits = torch_logits(hf, ids)
    cfg = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                     layers_to_transform=[0], use_rslora=rslora, task_type="CAUSAL_LM")
    pm = get_peft_model(hf, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # PEFT starts B at zero; a zero B would prove nothing
    pm.eval()
    want = torch_logits(pm, ids)
    assert rel_err(want, base_logits) > 2e-2
    pm.save_pretrained(tmp_path / "peft_in")

    spec = read_adapter(tmp_path / "peft_in")
    assert spec.format == "peft" and spec.rank == 4 and spec.dropout == 0.1
    model, _ = load_base(tiny_llama_dir)
    wrapped = load_adapter(model, tmp_path / "peft_in")
    assert sorted(wrapped) == [f"model.layers.0.{p}" for p in ("mlp.down_proj", "mlp.gate_proj", "self_attn.k_proj", "self_attn.q_proj")]
    assert rel_err(logits(model, ids), want) <= 1e-4
    # PEFT in, mlx-lm out works too (conversion between the formats)
    export(tmp_path / "peft_in", "mlx-lm", tmp_path / "mlx_lm_out")
    again, _ = load_base(tiny_llama_dir)
    load_adapter(again, tmp_path / "mlx_lm_out")
    assert rel_err(logits(again, ids), want) <= 1e-4


# --- mlx-lm -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [[1], [0]])
def test_mlx_lm_export_load_and_fuse(layers, tiny_llama_dir, tmp_path):
    """mlx_lm.load(base, adapter_path=export) gives our logits, and mlx-lm's fuse gives our fused weights."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load as mlx_lm_load

    from mlxtune.lora import merge_lora

    base = mlx_lm_base_copy(tiny_llama_dir, tmp_path / "base")
    model, ids, want, _ = _run(base, tmp_path / "run", rank=4, alpha=8.0, targets=("q", "v", "down"), layers=layers)
    out = export(tmp_path / "run", "mlx-lm", tmp_path / "mlx")
    cfg = json.loads((out / "adapter_config.json").read_text())
    # layers [0] of 2 is not a final run: written as layers 0-1 with zeros in layer 1
    assert cfg["num_layers"] == 2 - layers[0]
    assert cfg["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}
    assert cfg["fine_tune_type"] == "lora"

    theirs, _ = mlx_lm_load(str(base), adapter_path=str(out))
    theirs.eval()
    assert rel_err(np.array(theirs(mx.array(ids))), want) <= 1e-4

    fused = [(n, m.fuse(dequantize=True)) for n, m in theirs.named_modules() if hasattr(m, "fuse") and hasattr(m, "lora_a")]
    theirs.update_modules(tree_unflatten(fused))
    merge_lora(model)
    ours_w, theirs_w = dict(tree_flatten(model.parameters())), dict(tree_flatten(theirs.parameters()))
    assert sorted(ours_w) == sorted(theirs_w)
    for k in ours_w:
        np.testing.assert_allclose(np.array(ours_w[k]), np.array(theirs_w[k]), rtol=0, atol=1e-6, err_msg=k)

    # and back in: our reader takes the mlx-lm files
    back, _ = load_base(base)
    load_adapter(back, out)
    assert rel_err(logits(back, ids), want) <= 1e-5


# --- fuse and hf export ---------------------------------------------------------------------------------------


def test_fuse_and_hf_export(tiny_qwen_dir, tmp_path):
    _, ids, want, _ = _run(tiny_qwen_dir, tmp_path / "run", targets=("q", "v", "o", "up", "down"), layers=None)
    fused_dir = fuse(tmp_path / "run", tmp_path / "fused")
    model, _ = load_base(fused_dir)
    assert rel_err(logits(model, ids), want) <= 1e-5
    assert not any("lora" in k for k in mx.load(str(next(fused_dir.glob("*.safetensors")))))
    hf_dir = export(tmp_path / "run", "hf", tmp_path / "hf")
    assert rel_err(torch_logits(_hf(hf_dir), ids), want) <= 1e-4  # transformers reads it


def test_fuse_quantized_base(tiny_qwen_dir, tmp_path):
    """QLoRA: fuse loads the base quantized as recorded, merges in float -> equals quantized base + LoRA."""
    import mlx.nn as nn

    q = {"bits": 4, "group_size": 64}
    model, _ = load_base(tiny_qwen_dir, quantize=q)
    ids = tokens(model.args.vocab_size)
    base_logits = logits(model, ids)
    apply_lora(model, rank=4, alpha=8.0, verbose=False)
    randomize_lora(model)
    save_adapter(model, tmp_path / "run", base_path=tiny_qwen_dir, fingerprint=model.source["fingerprint"], rank=4,
                 alpha=8.0, dropout=0.0, targets=None, layers=None)
    want = logits(model, ids)
    assert rel_err(want, base_logits) > 2e-2

    fused, _ = load_base(fuse(tmp_path / "run", tmp_path / "fused"))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())  # float by default
    assert rel_err(logits(fused, ids), want) <= 1e-5

    requant, _ = load_base(fuse(tmp_path / "run", tmp_path / "fused8", quantize={"bits": 8, "group_size": 64}))
    assert isinstance(requant.layers[0].self_attn.q_proj, nn.QuantizedLinear) and requant.layers[0].self_attn.q_proj.bits == 8
    err = rel_err(logits(requant, ids), want)
    assert err <= 2e-2 and err < rel_err(base_logits, want) / 5  # quantization noise, not a lost adapter


def test_fused_dir_tokenizer_loads_in_transformers_and_mlx_lm(tiny_qwen_dir, tmp_path):
    """tokenizer_config.json names a real class (transformers 4.x cannot load 5.x's `TokenizersBackend`; the 4.x
    check itself is benchmarks/check_transformers4.py), carries the chat template inline, and loads in 5.x + mlx-lm."""
    import mlx_lm
    from transformers import AutoConfig, AutoTokenizer

    _run(tiny_qwen_dir, tmp_path / "run", targets=("q", "v"))
    fused_dir = fuse(tmp_path / "run", tmp_path / "fused")
    cfg = json.loads((fused_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] in ("Qwen2Tokenizer", "PreTrainedTokenizerFast")  # the model's own, or generic
    assert "is_local" not in cfg and "local_files_only" not in cfg
    assert cfg["chat_template"] == (fused_dir / "chat_template.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(str(fused_dir))
    src = AutoTokenizer.from_pretrained(str(tiny_qwen_dir))
    msgs = [{"role": "user", "content": "2 + 2?"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == src.apply_chat_template(msgs, tokenize=False)
    assert tok("hello world")["input_ids"] == src("hello world")["input_ids"]
    assert AutoConfig.from_pretrained(str(fused_dir)).model_type == "qwen2"
    model, mtok = mlx_lm.load(str(fused_dir))
    assert mtok.encode("hello world") == src.encode("hello world")


def test_peft_export_of_an_mlx_quantized_base_writes_a_float_base(tiny_qwen_dir, tmp_path, capsys):
    """transformers cannot read mlx-lm's quantized layout: the PEFT export writes the base (dequantized) beside
    the adapter and points at it; PEFT then gives the logits of the adapter over that dequantized base."""
    from peft import PeftModel

    from mlxtune.saving import save_model

    qmodel, tok = load_base(tiny_qwen_dir, quantize={"bits": 8, "group_size": 32}, tokenizer=True)
    qdir = save_model(qmodel, tok, tmp_path / "q8", dequantize=False)
    assert "quantization" in json.loads((qdir / "config.json").read_text())
    _, ids, _, _ = _run(qdir, tmp_path / "run", targets=("q", "v"))
    assert _cli("export", tmp_path / "run", "--format", "peft", "--out", tmp_path / "peft") == 0
    assert "a Hugging Face dir written from q8, which PEFT cannot load as a base" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    base = tmp_path / "peft" / "base"
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    assert "quantization" not in json.loads((base / "config.json").read_text())
    model, _ = load_base(base)  # mlxtune's view of the same function: adapter over the float base
    load_adapter(model, tmp_path / "run", check_fingerprint=False)  # (trained on the quantized weights)
    want = logits(model, ids)
    got = torch_logits(PeftModel.from_pretrained(_hf(base), str(tmp_path / "peft")).eval(), ids)
    assert rel_err(got, want) <= 1e-4


# --- errors and output handling ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tiny_llama_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "run"
    _run(tiny_llama_dir, run, targets=("q", "v"))
    return run


def _cli(*argv):
    from mlxtune.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code


def test_cli_errors_write_nothing(small_run, tmp_path, capsys, llama3_tokenizer_dir):
    from conftest import make_tiny_model_dir

    out = tmp_path / "out"
    before = tree(tmp_path)
    # unknown --format
    assert _cli("export", small_run, "--format", "onnx", "--out", out) == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    # missing run dir / files
    assert _cli("export", tmp_path / "no_run", "--format", "peft", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "adapter path not found" in err and err.count("\n") == 1
    # wrong base: shapes (a wider MLP) and fingerprint, one error
    wide = make_tiny_model_dir(tmp_path / "wide", "llama", tokenizer_dir=llama3_tokenizer_dir, intermediate_size=96,
                               num_hidden_layers=3)
    before = tree(tmp_path)
    for fmt in ("hf", "gguf"):
        assert _cli("export", small_run, "--format", fmt, "--out", out, "--base", wide) == 2
        err = capsys.readouterr().err
        assert "fingerprint" in err and "num_hidden_layers is 2 in the adapter but 3 in the model" in err, err
    assert _cli("fuse", small_run, "--out", out, "--base", wide) == 2
    capsys.readouterr()
    # a recorded base that moved away
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(small_run, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model"]["path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    before = tree(tmp_path)
    assert _cli("fuse", moved, "--out", out) == 2
    assert "not found; pass --base" in capsys.readouterr().err
    assert _cli("export", moved, "--format", "peft", "--out", out, "--outtype", "q8_0") == 2
    assert "outtype" in capsys.readouterr().err
    assert tree(tmp_path) == before  # nothing written by any failure
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export(small_run, "onnx", out)
    with pytest.raises(AdapterError):
        fuse(tmp_path / "no_run", out)
    assert tree(tmp_path) == before


def test_cli_out_exists_and_force(small_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert _cli("export", small_run, "--format", "peft", "--out", out) == 0  # an empty dir is fine
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    (out / "stale.txt").write_text("old")
    assert _cli("export", small_run, "--format", "mlx-lm", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert _cli("export", small_run, "--format", "mlx-lm", "--out", out, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapters.safetensors"]  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind

    q = tmp_path / "q8"
    assert _cli("fuse", small_run, "--out", q, "--quantize-bits", "7") == 2
    assert "model.quantize.bits: 7" in capsys.readouterr().err
    assert _cli("fuse", small_run, "--out", q, "--group-size", "32") == 2
    assert "--group-size applies only with --quantize-bits" in capsys.readouterr().err
    assert not q.exists()
    assert _cli("fuse", small_run, "--out", q, "--quantize-bits", "8", "--group-size", "32") == 0
    assert json.loads((q / "config.json").read_text())["quantization"] == {"bits": 8, "group_size": 32}
