"""memory.py, doctor.py and `mlxtune download`: the memory estimate against measured peaks, memory_guard, doctor,
download (offline), and the rule that a model dir never runs code.

    python tests/test_diagnostics.py --calibrate     # the estimate vs measured table over ~30 configs (subprocesses)
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_helpers import alpaca_lines, make_small_model_dir, run_config, write_yaml  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# The memory model against mx.get_peak_memory() around real TrainStep steps


def measure_peak(c: dict) -> dict:
    """Build a random float32 model of config `c`, run 2 optimizer steps of `k` micro-batches the way the trainer
    does (compiled step, async eval after every micro-batch, the last one fused with the update) and return
    {"measured": peak bytes above what was allocated before, "estimate": MemoryEstimate.total, ...}."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from mlxtune.config import TrainConfig
    from mlxtune.lora import apply_lora
    from mlxtune.memory import LoraPlan, estimate_memory, weight_bytes
    from mlxtune.model import Model, ModelArgs
    from mlxtune.step import TrainStep, make_optimizer

    nl, r = c["nl"], c.get("r", 8)
    targets, layers, dropout = c.get("targets"), c.get("layers"), c.get("dropout", 0.0)
    args = ModelArgs(model_type="llama", hidden_size=c["D"], intermediate_size=c["F"], num_hidden_layers=nl,
                     num_attention_heads=c["H"], num_key_value_heads=c["K"], vocab_size=c["V"], tie_word_embeddings=True)
    import gc

    mx.random.seed(0)
    gc.collect()  # an earlier test's model and step (reference cycles) must not be freed during this measurement
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = Model(args)
    wrapped = apply_lora(model, r, 2 * r, dropout, targets, layers, verbose=False)
    model.grad_checkpoint = c.get("ckpt", False)
    model.train()
    mx.eval(model.parameters())
    step = TrainStep(model, make_optimizer(TrainConfig(), 10), 1.0)
    mx.eval(step.state)
    B, L, V, k = c["B"], c["L"], c["V"], c.get("k", 1)
    rng = np.random.default_rng(0)
    seg = None
    if c.get("packed"):
        seg = mx.array(np.repeat(np.arange(1, 5), L // 4)[None].repeat(B, 0).astype(np.int32))
    for _ in range(2):
        for j in range(k):
            inputs = mx.array(rng.integers(0, V, (B, L)).astype(np.int32))
            targets_ = mx.array(rng.integers(0, V, (B, L)).astype(np.int32))
            out = step.micro(inputs, targets_, mx.ones((B, L)), seg, update=j == k - 1)
            mx.async_eval(step.state, out)
        mx.eval(step.state)
    measured = mx.get_peak_memory() - before
    wb, n_params = weight_bytes(args, "float32")
    est = estimate_memory(args, weight_bytes=wb, dtype="float32", batch_size=B, length=L,
                          lora=LoraPlan.from_paths(r, wrapped, dropout), packed=bool(c.get("packed")),
                          grad_checkpoint=c.get("ckpt", False))
    lora_bytes = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    actual_weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) - lora_bytes
    del model, step
    return {"measured": measured, "estimate": est.total, "weights": wb, "actual_weights": actual_weights,
            "lora": est.lora, "actual_lora": lora_bytes, "activations": est.activations, "logits": est.logits}


# Held out from the calibration grid below: they vary hidden size, heads, length, packing, checkpointing,
# dropout and the chunked loss.
TEST_CONFIGS = {
    "d192-gqa3-L256x2": dict(D=192, F=512, H=3, K=1, nl=4, V=2000, B=2, L=256),
    "d256-L768-packed-6layers": dict(D=256, F=688, H=4, K=2, nl=6, V=1000, B=1, L=768, packed=True),
    "d384-L256x2-checkpointed": dict(D=384, F=1024, H=6, K=2, nl=4, V=1000, B=2, L=256, ckpt=True),
    "d128-L1024-chunked-loss-dropout": dict(D=128, F=344, H=4, K=4, nl=4, V=32000, B=1, L=1024, dropout=0.05),
}


@pytest.mark.parametrize("name", list(TEST_CONFIGS))
def test_estimate_within_15_percent_of_measured_peak(name):
    r = measure_peak(TEST_CONFIGS[name])
    assert r["weights"] == r["actual_weights"]  # the counted base size is exact
    assert r["lora"] == r["actual_lora"]
    ratio = r["estimate"] / r["measured"]
    print(f"{name}: measured {r['measured'] / 1e6:.1f} MB, estimated {r['estimate'] / 1e6:.1f} MB ({ratio:.3f})")
    assert 0.85 <= ratio <= 1.15, r


def test_quantized_weight_bytes_exact(tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxtune.config import QuantizeConfig
    from mlxtune.quant import quantize_model
    from mlxtune.memory import weight_bytes
    from mlxtune.model import Model, ModelArgs

    args = ModelArgs(model_type="qwen2", hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    m = Model(args)
    m.set_dtype(mx.bfloat16)
    quantize_model(m, QuantizeConfig(bits=4, group_size=64))
    actual = sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    assert weight_bytes(args, "bfloat16", {"bits": 4, "group_size": 64})[0] == actual


# --------------------------------------------------------------------------------------------------------------
# estimate from the config alone


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    model = make_small_model_dir(root / "model")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(alpaca_lines(12)) + "\n")
    return root, model, data


def _main(argv, capsys) -> tuple[int, str, str]:
    from mlxtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_estimate_reads_no_weights(small, tmp_path, capsys, monkeypatch):
    import mlx.core as mx

    root, model, data = small
    cfg = write_yaml(tmp_path / "cfg.yaml", run_config(tmp_path, model, data))

    def no_load(*a, **k):
        raise AssertionError("estimate loaded weights")

    monkeypatch.setattr(mx, "load", no_load)
    code, out, err = _main(["estimate", "-c", str(cfg), "--json", "--train.batch_size", "3"], capsys)
    assert code == 0, err
    est = json.loads(out)
    assert est["batch_size"] == 3 and est["length"] == 96  # the real budget: rows of data.max_length
    assert est["total"] == max(est["train_peak"], est["eval_peak"]) > est["weights"] > 0
    code, out, err = _main(["estimate", "-c", str(cfg)], capsys)
    assert code == 0
    assert "peak (estimated)" in out and "activations" in out and "logits / loss" in out
    assert "fits" in out


def test_estimate_gguf_from_metadata(smollm2_gguf):
    import time

    from mlxtune.memory import model_spec

    t = time.perf_counter()
    spec = model_spec(smollm2_gguf, dtype="float32")
    assert time.perf_counter() - t < 5  # metadata only: the 98 MB of tensors are not read
    a = spec.args
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads,
            a.vocab_size, a.tie_word_embeddings) == (30, 576, 1536, 9, 3, 49152, True)
    assert spec.n_params == 134_515_008  # SmolLM2-135M
    assert spec.weight_bytes == 4 * spec.n_params


def test_estimate_checkpointing_and_batch_lower_the_peak(small, tmp_path):
    from mlxtune.memory import estimate

    root, model, data = small
    cfg = run_config(tmp_path, model, data)
    cfg["data"]["max_length"] = 1024
    base = estimate(cfg)
    ckpt = estimate(cfg, train={"grad_checkpoint": True})
    half = estimate(cfg, train={"batch_size": 1})
    evalgen = estimate(cfg, train={"eval_generate": 4})
    assert ckpt.activations < base.activations and half.total < base.total
    assert evalgen.eval_kv > 0 and base.eval_kv == 0


# --------------------------------------------------------------------------------------------------------------
# memory_guard


def test_memory_guard_refuses_with_advice_and_writes_nothing(small, tmp_path, capsys, monkeypatch):
    import mlxtune.memory as memory

    root, model, data = small
    monkeypatch.setenv("MLXTUNE_CACHE", str(root / "cache"))
    monkeypatch.setattr(memory, "available_memory", lambda: (1_000_000, "RAM available (test)"))
    cfg = write_yaml(tmp_path / "cfg.yaml", run_config(tmp_path, model, data, memory_guard="refuse"))
    code, out, err = _main(["train", "-c", str(cfg), "--quiet"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1
    assert line.startswith("error: train.memory_guard: the estimated peak memory")
    assert "exceeds the 1.0 MB RAM available (test)" in line
    for fix in ("train.grad_checkpoint: true", "train.batch_size: 1 with train.grad_accumulation: 4", "model.quantize: {bits: 4}"):
        assert fix in line, line
    assert not (tmp_path / "run").exists()


def test_memory_guard_warns_and_trains(small, tmp_path, capsys, monkeypatch):
    import mlxtune.memory as memory

    root, model, data = small
    monkeypatch.setenv("MLXTUNE_CACHE", str(root / "cache"))
    monkeypatch.setattr(memory, "available_memory", lambda: (1_000_000, "RAM available (test)"))
    cfg = write_yaml(tmp_path / "cfg.yaml", run_config(tmp_path, model, data, max_steps=1, eval_every=0))
    code, out, err = _main(["train", "-c", str(cfg), "--quiet"], capsys)
    assert code == 0
    warnings = [l for l in err.splitlines() if l.startswith("warning: train.memory_guard")]
    assert len(warnings) == 1 and "train.memory_guard: refuse stops instead" in warnings[0]
    assert (tmp_path / "run" / "adapters.safetensors").is_file()


def test_memory_guard_quiet_when_it_fits(small, tmp_path):
    from mlxtune.config import load_config
    from mlxtune.loading import load
    from mlxtune.memory import available_memory, memory_guard

    root, model_dir, data = small
    budget, where = available_memory()
    assert budget and budget > 0 and where
    cfg = load_config(run_config(tmp_path, model_dir, data))
    model, tok = load(model_dir)
    check = memory_guard(cfg, model, _batches(2, 96, 4))
    assert check is not None and check.fits and check.warning is None
    est = check.estimate
    assert est.batch_size == 2 and est.length == 96 and est.total < budget


def _batches(B: int, L: int, n: int) -> list:
    """`n` padded micro-batches of B rows x L positions (the guard reads their shapes only)."""
    from types import SimpleNamespace

    import numpy as np

    return [SimpleNamespace(inputs=np.zeros((B, L), np.int32), segment_ids=None) for _ in range(n)]


def test_memory_guard_counts_the_lora_the_model_has(small, tmp_path, monkeypatch):
    """Once LoRA is applied (e.g. from lora.init_adapter, whose rank wins over lora.rank), the guard counts the
    model's LoRA layers, not the config's plan; without LoRA it counts lora.plan_lora's selection."""
    import mlxtune.memory as memory
    from mlxtune.config import load_config
    from mlxtune.loading import load
    from mlxtune.lora import apply_lora, lora_modules

    root, model_dir, data = small
    monkeypatch.setattr(memory, "available_memory", lambda: (1_000_000, "RAM available (test)"))
    cfg = load_config(run_config(tmp_path, model_dir, data), lora={"rank": 4, "layers": 1})
    model, _ = load(model_dir)
    planned = memory.memory_guard(cfg, model, _batches(2, 96, 1))
    assert planned.warning and "train.memory_guard: refuse stops instead" in planned.warning
    wrapped = apply_lora(model, 16, 32.0, 0.0, ["q_proj", "v_proj"], None, verbose=False)
    applied = memory.memory_guard(cfg, model, _batches(2, 96, 1))
    args = model.args
    D, K, hd = args.hidden_size, args.num_key_value_heads, args.head_dim
    per_layer = 16 * (D + args.num_attention_heads * hd) + 16 * (D + K * hd)  # rank 16: q_proj and v_proj
    actual = sum(m.lora_a.nbytes + m.lora_b.nbytes for m in lora_modules(model).values())
    assert applied.estimate.lora == 4 * args.num_hidden_layers * per_layer == actual
    assert len(wrapped) == 2 * args.num_hidden_layers
    assert "rank 4" in planned.estimate.notes["lora"] and "x 1 layers" in planned.estimate.notes["lora"]
    assert "rank 16" in applied.estimate.notes["lora"] and "2 projections" in applied.estimate.notes["lora"]


def test_estimate_uses_the_lora_plan(small, tmp_path):
    """estimate() selects LoRA layers as apply_lora does (lora.plan_lora): an int lora.layers is the LAST n
    layers, so fewer layers need a backward pass; a misspelled target is a config error with did-you-mean."""
    from mlxtune.errors import ConfigError
    from mlxtune.memory import estimate

    root, model, data = small
    cfg = run_config(tmp_path, model, data)
    every = estimate(cfg)
    last = estimate(cfg, lora={"layers": 1})
    assert last.lora * 2 == every.lora and last.activations < every.activations
    assert "1 layers x" in last.notes["activations"]  # one layer from the lowest LoRA layer up: the last one
    with pytest.raises(ConfigError, match="q_prj.*q_proj"):
        estimate(cfg, lora={"targets": ["q_prj"]})


# --------------------------------------------------------------------------------------------------------------
# doctor


def test_doctor_lines_and_exit_code(tmp_path, capsys, monkeypatch):
    import mlxtune.doctor as doctor

    monkeypatch.setattr(doctor, "blas_gflops", lambda *a, **k: 90.0)
    code, out, err = _main(["doctor", "--output-dir", str(tmp_path / "runs")], capsys)
    assert code == 0, out
    lines = out.strip().splitlines()
    for name in ("python", "mlx", "backend", "memory", "output dir", "hub cache", "data cache", "torch", "pyarrow",
                 "matplotlib", "gguf", "peft", "bert-score"):
        assert any(re.match(rf"(ok|warn|fail)\s+{re.escape(name)}\b", l) for l in lines), (name, out)
    if sys.platform.startswith("linux"):
        assert any(l.startswith("ok    blas") and "90.0 GFLOP/s" in l for l in lines), out
    assert lines[-1].startswith("0 failed")


def test_doctor_slow_blas_fix_only_on_linux(tmp_path, monkeypatch):
    import mlx.core as mx

    import mlxtune.doctor as doctor

    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("the BLAS check runs on the CPU backend")
    monkeypatch.setattr(doctor, "blas_gflops", lambda *a, **k: 4.8)
    monkeypatch.setattr(sys, "platform", "linux")
    blas = [c for c in doctor.run_checks(str(tmp_path)) if c.name == "blas"][0]
    assert blas.status == "warn" and "libopenblas0-pthread" in blas.fix and "LD_PRELOAD" in blas.fix
    monkeypatch.setattr(sys, "platform", "darwin")
    blas = [c for c in doctor.run_checks(str(tmp_path)) if c.name == "blas"][0]
    assert blas.status == "warn" and "LD_PRELOAD" not in blas.fix and "openblas" not in blas.fix.lower()


def test_doctor_fails_on_unwritable_output_dir(tmp_path, capsys, monkeypatch):
    import mlxtune.doctor as doctor

    monkeypatch.setattr(doctor, "blas_gflops", lambda *a, **k: 90.0)
    (tmp_path / "afile").write_text("x")  # a file where the output dir's parent should be (root ignores chmod)
    code, out, err = _main(["doctor", "--no-blas", "--output-dir", str(tmp_path / "afile" / "runs")], capsys)
    assert code == 1
    line = [l for l in out.splitlines() if "output dir" in l][0]
    assert line.startswith("fail") and "is a file, not a directory" in line and "fix:" in line


# --------------------------------------------------------------------------------------------------------------
# download: offline and unreachable hub → one line, exit 2, how to use a local dir instead


def _download(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    e.update({"HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1", **env})
    return subprocess.run([sys.executable, "-m", "mlxtune", "download", "model", "some-org/some-model"],
                          capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)


def test_download_offline_mode(tmp_path):
    r = _download({"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download some-org/some-model: offline mode (HF_HUB_OFFLINE=1)")
    assert "--local-dir DIR" in err[0] and "model.path: DIR" in err[0]
    assert not list((tmp_path / "hf").rglob("*.json"))


def test_download_unreachable_hub(tmp_path):
    r = _download({"HF_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)  # loopback port 9 (discard): refused at once
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "the Hugging Face hub (http://127.0.0.1:9) is unreachable" in err[0] and "model.path: DIR" in err[0]


def test_download_fetches_safe_files_only(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = {}

    def fake_snapshot(repo_id, **kw):
        calls.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    code, out, err = _main(["download", "model", "org/name", "--revision", "v1"], capsys)
    assert code == 0 and calls["repo_id"] == "org/name" and calls["revision"] == "v1"
    patterns = calls["allow_patterns"]
    for unsafe in ("pytorch_model.bin", "model.pt", "model.pth", "modeling_evil.py", "weights.pkl", "model.ckpt",
                   "tf_model.h5", "flax_model.msgpack", "model.onnx"):
        assert not any(fnmatch.fnmatch(unsafe, p) for p in patterns), unsafe
    for safe in ("model-00001-of-00002.safetensors", "config.json", "tokenizer.json", "tokenizer.model", "merges.txt"):
        assert any(fnmatch.fnmatch(safe, p) for p in patterns), safe
    code, out, err = _main(["download", "data", "org/ds"], capsys)
    assert code == 0 and calls["repo_type"] == "dataset"
    code, out, err = _main(["download", "model", "org/name", "--include", "*.bin"], capsys)
    assert code == 2 and "only" in err and "pickles and code" in err


# --------------------------------------------------------------------------------------------------------------
# Model dirs never run code: no pickle, no remote code


def test_trust_remote_code_is_never_true():
    """Every mention of trust_remote_code in the library passes False."""
    files = sorted((ROOT / "mlxtune").rglob("*.py"))  # subpackages too (cli/, data/, eval/, gguf/)
    assert len(files) > 20
    for f in files:
        for m in re.finditer(r"trust_remote_code\s*=\s*([^,)\s]+)", f.read_text()):
            assert m.group(1) == "False", f"{f.relative_to(ROOT)}: trust_remote_code={m.group(1)}"


MARKER_CODE = "import pathlib; pathlib.Path({marker!r}).write_text('pwned')\n"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(marker=self.marker),))


def test_model_dir_code_and_pickles_are_never_executed(small, tmp_path, monkeypatch):
    """A dir with a malicious pickle (.bin, .pt), a custom tokenizer class in a .py file (auto_map) and a custom
    model class: loading reads the safetensors and the tokenizer.json, and nothing in the dir runs."""
    import pickle
    import shutil

    import transformers

    from mlxtune.errors import ModelLoadError
    from mlxtune.loading import load

    root, model, data = small
    d = tmp_path / "model"
    shutil.copytree(model, d)
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (d / name).write_bytes(pickle.dumps(_Evil(str(marker))))
    (d / "tokenization_evil.py").write_text(MARKER_CODE.format(marker=str(marker)) + "class EvilTokenizer: pass\n")
    (d / "modeling_evil.py").write_text(MARKER_CODE.format(marker=str(marker)) + "class EvilModel: pass\n")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))

    seen = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(spy))
    try:
        m, tok = load(d)
        assert tok is not None
    except ModelLoadError as e:  # refusing the custom tokenizer is fine too; running it is not
        assert "tokenizer" in str(e)
    assert seen and all(v is False for v in seen)
    assert not marker.exists(), "code from the model dir ran"

    # weights only as pickles: refused before anything is unpickled
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="only PyTorch pickle weights"):
        load(d)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# The calibration table (not a test): python tests/test_diagnostics.py --calibrate

CALIBRATION_BASE = dict(D=256, F=688, H=4, K=2, V=1000, B=1, L=512, nl=4)
CALIBRATION_GRID = [
    {}, {"K": 1}, {"K": 4}, {"packed": True}, {"ckpt": True}, {"ckpt": True, "packed": True}, {"ckpt": True, "L": 1024},
    {"ckpt": True, "nl": 2}, {"ckpt": True, "nl": 8}, {"ckpt": True, "D": 512, "F": 1376, "H": 8, "K": 4},
    {"ckpt": True, "L": 256, "B": 4}, {"dropout": 0.1}, {"targets": ["q_proj", "v_proj"]},
    {"targets": ["o_proj", "down_proj"]}, {"layers": 2}, {"V": 8000}, {"V": 32000, "B": 2}, {"V": 32000, "B": 4},
    {"V": 65536, "B": 2}, {"L": 128, "B": 4}, {"L": 1024}, {"L": 256, "B": 2, "nl": 8},
    {"D": 512, "F": 1376, "H": 8, "K": 4}, {"D": 128, "F": 344, "H": 2, "K": 1, "nl": 8}, {"r": 32},
    {"D": 384, "F": 1024, "H": 6, "K": 2, "L": 384, "B": 2, "packed": True}, {"k": 4},
]


def _calibrate() -> None:
    rows = [("calibration", {**CALIBRATION_BASE, **g}) for g in CALIBRATION_GRID]
    rows += [(f"test: {name}", c) for name, c in TEST_CONFIGS.items()]
    print(f"{'set':<12} {'config':<72} {'measured MB':>12} {'estimate MB':>12} {'ratio':>6}")
    for label, c in rows:
        out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(c)], capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        diff = {k: v for k, v in c.items() if CALIBRATION_BASE.get(k) != v}
        print(f"{label.split(':')[0]:<12} {json.dumps(diff if label == 'calibration' else c):<72} "
              f"{r['measured'] / 1e6:>12.1f} {r['estimate'] / 1e6:>12.1f} {r['estimate'] / r['measured']:>6.3f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure_peak(json.loads(sys.argv[2]))))
    elif sys.argv[1:2] == ["--calibrate"]:
        _calibrate()
    else:
        print(__doc__)
