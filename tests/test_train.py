"""Training: token-weighted accumulation, compiled == eager, exact resume after SIGKILL, Ctrl-C, early stopping,
the schedule, chunked loss, and bad inputs (one line, exit 2, no run dir)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxtune.config import TrainConfig
from mlxtune.lora import apply_lora
from mlxtune.model import Model, ModelArgs
from mlxtune.step import TrainStep, lr_schedule, make_optimizer

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(seed=0, vocab=300, dropout=0.0):
    mx.random.seed(seed)
    m = Model(ModelArgs(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab))
    apply_lora(m, 4, 8, dropout=dropout, verbose=False)
    for _, l in m.named_modules():
        if hasattr(l, "lora_b"):
            l.lora_b = 0.05 * mx.random.normal(l.lora_b.shape)  # non-zero so the LoRA path is exercised
    m.train()
    return m


def _batch(rng, B, L, vocab=300):
    inp = rng.integers(0, vocab, (B, L)).astype(np.int32)
    tgt = rng.integers(0, vocab, (B, L)).astype(np.int32)
    mask = np.zeros((B, L), np.float32)
    for i, n in enumerate(rng.integers(3, L, B)):  # different numbers of target tokens per row
        mask[i, :n] = 1
    return inp, tgt, mask


def _train(split, compile, steps=2, dropout=0.0, sgd=False, fused=True):
    """Parameters after `steps` updates; with sgd=True, the first update's delta (= -lr * grad, exactly)."""
    import mlx.optimizers as optim

    rng = np.random.default_rng(0)
    data = [_batch(rng, 4, 24) for _ in range(steps)]
    m = tiny_model(dropout=dropout)
    before = dict(tree_flatten(m.trainable_parameters()))
    opt = optim.SGD(learning_rate=1.0) if sgd else make_optimizer(TrainConfig(learning_rate=1e-2, warmup_ratio=0.0), 10)
    st = TrainStep(m, opt, None if sgd else 1.0, compile=compile)
    for inp, tgt, mask in data[: 1 if sgd else steps]:
        for sl in split:
            mx.random.seed(1)
            st.micro(mx.array(inp[sl]), mx.array(tgt[sl]), mx.array(mask[sl]), update=fused and sl is split[-1])
        if not fused:
            st.update()
        mx.eval(st.state)
    after = dict(tree_flatten(m.trainable_parameters()))
    return {k: after[k] - before[k] for k in after} if sgd else after


def _max_rel(a, b):
    return max(float(mx.abs(a[k] - b[k]).max() / (mx.abs(b[k]).max() + 1e-12)) for k in b)


@pytest.mark.parametrize("split", [[slice(0, 2), slice(2, 4)], [slice(i, i + 1) for i in range(4)]], ids=["2x2", "4x1"])
def test_accumulation_equals_one_batch(split):
    """k micro-batches of size b give the update of one batch of k*b, token-weighted (rows differ in length)."""
    one = _train([slice(0, 4)], compile=True, sgd=True)
    acc = _train(split, compile=True, sgd=True)
    assert _max_rel(acc, one) <= 1e-5
    assert min(float(mx.abs(v).max()) for v in one.values()) > 0  # every LoRA matrix moved


def test_compiled_equals_eager():
    assert _max_rel(_train([slice(0, 2), slice(2, 4)], compile=True), _train([slice(0, 2), slice(2, 4)], compile=False)) <= 1e-6


def test_fused_last_micro_equals_separate_update():
    split = [slice(0, 2), slice(2, 4)]
    assert _max_rel(_train(split, compile=True, fused=True), _train(split, compile=True, fused=False)) <= 1e-6


def test_token_weighting_is_not_a_mean_of_means():
    """Guard against the test above passing vacuously: averaging per-micro-batch means gives a different update."""
    rng = np.random.default_rng(0)
    inp, tgt, mask = _batch(rng, 4, 24)
    mask[:2] = 0
    mask[:2, :2] = 1  # first micro-batch: 4 tokens; second: many
    from mlxtune.loss import loss_sum

    m = tiny_model()
    s1, n1 = loss_sum(m, mx.array(inp[:2]), mx.array(tgt[:2]), mx.array(mask[:2]))
    s2, n2 = loss_sum(m, mx.array(inp[2:]), mx.array(tgt[2:]), mx.array(mask[2:]))
    weighted = (s1 + s2) / (n1 + n2)
    mean_of_means = (s1 / n1 + s2 / n2) / 2
    assert abs(float(weighted - mean_of_means)) > 1e-3


def test_chunked_loss_equals_full():
    from mlxtune.loss import chunked_ce_sum

    m = tiny_model()
    rng = np.random.default_rng(1)
    inp, tgt, mask = _batch(rng, 3, 40)
    h = m(mx.array(inp), return_hidden=True)
    full = chunked_ce_sum(m.project, h, mx.array(tgt), mx.array(mask), chunk_size=10_000)
    chunked = chunked_ce_sum(m.project, h, mx.array(tgt), mx.array(mask), chunk_size=7)
    logits = np.array(m(mx.array(inp)), dtype=np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = ((lse - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]) * mask).sum()
    assert abs(float(full) - ref) / ref < 1e-5 and abs(float(chunked) - ref) / ref < 1e-5

    def g(chunk):
        return mx.grad(lambda hh: chunked_ce_sum(m.project, hh, mx.array(tgt), mx.array(mask), chunk_size=chunk))(h)

    assert float(mx.abs(g(7) - g(10_000)).max()) < 1e-5


def test_fused_loss_gradient_equals_autodiff():
    """The hand-written chunk gradient (loss._ce_sum_fused) against autodiff through the same chunks, in float32
    and in bfloat16 (the GPU dtype), chunked and in one piece, with masked tokens."""
    from mlxtune.loss import chunked_ce_sum

    m = tiny_model()
    rng = np.random.default_rng(2)
    inp, tgt, mask = _batch(rng, 3, 40)
    h = m(mx.array(inp), return_hidden=True)
    for dtype, tol in ((mx.float32, 1e-5), (mx.bfloat16, 2e-2)):
        m.set_dtype(dtype)  # LoRA factors too: fine for a loss test
        hd = h.astype(dtype)
        for chunk in (7, 10_000):
            def g(fused):
                f = lambda hh: chunked_ce_sum(m.project, hh, mx.array(tgt), mx.array(mask), chunk_size=chunk, fused=fused)  # noqa: E731
                return mx.value_and_grad(f)(hd)

            (v1, g1), (v0, g0) = g(True), g(False)
            assert abs(float(v1) - float(v0)) <= 1e-6 * abs(float(v0))
            err = float(mx.abs(g1.astype(mx.float32) - g0.astype(mx.float32)).max() / mx.abs(g0.astype(mx.float32)).max())
            assert err <= tol, (dtype, chunk, err)
            assert float(mx.abs(g0).max()) > 0


def test_trainable_output_projection_gets_its_gradient():
    """A custom gradient would drop the output weights' own gradient: loss_sum uses autodiff when they train."""
    from mlxtune.loss import loss_sum

    m = tiny_model()
    m.output_weight().unfreeze()
    rng = np.random.default_rng(3)
    inp, tgt, mask = _batch(rng, 2, 16)
    grads = nn.value_and_grad(m, lambda mod: loss_sum(mod, mx.array(inp), mx.array(tgt), mx.array(mask), chunk_size=5)[0])(m)[1]
    g = dict(tree_flatten(grads))
    w = [k for k in g if "embed_tokens" in k or "lm_head" in k]
    assert w and float(mx.abs(g[w[0]]).max()) > 0


def test_schedule_warmup_then_cosine():
    f = lr_schedule(1.0, total_steps=100, warmup_steps=10, kind="cosine", min_ratio=0.1)
    lrs = [float(f(mx.array(s))) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] > 0.1 - 1e-6
    const = lr_schedule(2.0, 50, 0, "constant")
    assert float(const(mx.array(30))) == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------------------------
# End to end through the CLI on a tiny model with the real Llama 3 tokenizer and the Alpaca seed data.


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, alpaca_seed_dir):
    d = tmp_path_factory.mktemp("data")
    lines = (alpaca_seed_dir / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (d / "valid.jsonl").write_text("\n".join(lines[24:30]) + "\n")
    return d


def _config(tmp_path, model_dir, data_dir, **train):
    t = {"max_steps": 6, "batch_size": 2, "grad_accumulation": 2, "learning_rate": 1e-3, "save_every": 2,
         "eval_every": 3, "log_every": 1, "keep_last": 10, "seed": 3, **train}
    cfg = {"model": {"path": str(model_dir)}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
           "data": {"train": str(data_dir), "max_length": 64, "packing": True},
           "train": t, "output_dir": str(tmp_path / "run")}
    p = tmp_path / "cfg.yaml"
    import yaml

    p.write_text(yaml.safe_dump(cfg))
    return p


def _mlxtune(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mlxtune", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT, **kw)


def _losses(run):
    return {r["step"]: r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r}


def _adapter(run):
    return {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir, tiny_data):
    tmp = tmp_path_factory.mktemp("full")
    cfg = _config(tmp, tiny_llama_dir, tiny_data)
    p = _mlxtune("train", "-c", str(cfg))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return tmp / "run", out


def test_train_run_dir_layout(uninterrupted):
    run, out = uninterrupted
    for f in ("config.yaml", "adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png"):
        assert (run / f).is_file(), f
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_000002", "step_000004", "step_000006"]
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "train_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "tokens_per_sec", "trained_tokens", "peak_memory_gb", "rss_gb", "grad_norm"):
        assert key in train[0]
    assert any("val_loss" in r for r in recs)
    assert "tok/s" in out and "run dir:" in out
    # the resolved config re-runs as is
    from mlxtune.config import load_config

    assert load_config(run / "config.yaml").train.max_steps == 6


def test_resume_after_sigkill_is_bitwise_equal(tmp_path, tiny_llama_dir, tiny_data, uninterrupted):
    """Kill -9 right after the step-2 checkpoint lands, resume: same adapters (bitwise) and same losses."""
    full_run, _ = uninterrupted
    cfg = _config(tmp_path, tiny_llama_dir, tiny_data)
    run = tmp_path / "run"
    p = _mlxtune("train", "-c", str(cfg))
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_000002").is_dir():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "adapters.safetensors").exists()
    r = _mlxtune("train", "-c", str(cfg), "--resume")
    out, _ = r.communicate(timeout=600)
    assert r.returncode == 0, out
    assert "resuming from" in out
    a, b = _adapter(run), _adapter(full_run)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert _losses(run) == _losses(full_run)
    assert sorted(_losses(run)) == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_checkpoints_and_exits_cleanly(tmp_path, tiny_llama_dir, tiny_data):
    cfg = _config(tmp_path, tiny_llama_dir, tiny_data, max_steps=400, save_every=1000, eval_every=1000)
    run = tmp_path / "run"
    p = _mlxtune("train", "-c", str(cfg))
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert "interrupted at step" in out and "--resume" in out
    cps = list((run / "checkpoints").iterdir())
    assert len(cps) == 1 and (cps[0] / "state.json").is_file()
    assert (run / "adapters.safetensors").is_file()


def test_resume_refuses_mismatched_checkpoint(tmp_path, tiny_llama_dir, tiny_data, uninterrupted, capsys):
    from mlxtune.cli import main

    full_run, _ = uninterrupted
    cfg = _config(tmp_path, tiny_llama_dir, tiny_data)
    with pytest.raises(SystemExit) as e:
        main(["train", "-c", str(cfg), "--resume", str(full_run), "--lora.rank", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "cannot resume" in err and "lora.rank differs" in err
    assert len(err.splitlines()) == 1


def test_existing_run_needs_resume(tmp_path, tiny_llama_dir, tiny_data, uninterrupted, capsys):
    from mlxtune.cli import main

    full_run, _ = uninterrupted
    cfg = _config(tmp_path, tiny_llama_dir, tiny_data)
    with pytest.raises(SystemExit) as e:
        main(["train", "-c", str(cfg), "--output_dir", str(full_run)])
    assert e.value.code == 2
    assert "add --resume" in capsys.readouterr().err


def test_early_stopping_on_crafted_curve(tmp_path, tiny_llama_dir, tiny_data, monkeypatch):
    """Validation losses 5, 4, 3.5, 3.6, 3.7, 3.8 with patience 2: stop at the 5th evaluation; best/ = eval 3. The
    base model's step-0 validation (1.0 here, lower than all) is not an early-stopping candidate."""
    import mlxtune.trainer as trainer

    curve = iter([1.0, 5.0, 4.0, 3.5, 3.6, 3.7, 3.8, 3.9])
    snapshots = {}

    def fake_eval(model, batches):
        from mlxtune.lora import adapter_weights

        v = next(curve)
        snapshots[v] = {k: np.array(a) for k, a in adapter_weights(model).items()}
        return {"loss_sum": v, "n_tokens": 1.0, "loss": v, "ppl": math.exp(v)}

    monkeypatch.setattr(trainer, "evaluate_loss", fake_eval)
    cfg = _config(tmp_path, tiny_llama_dir, tiny_data, max_steps=20, eval_every=1, save_every=100,
                  early_stopping_patience=2)
    res = trainer.train(cfg, quiet=True)
    assert res.stopped_early and res.steps == 5
    assert res.best == {"metric": "val_loss", "value": 3.5, "step": 3}
    best = {k: np.array(v) for k, v in mx.load(str(tmp_path / "run" / "best" / "adapters.safetensors")).items()}
    assert all(np.array_equal(best[k], snapshots[3.5][k]) for k in best)
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 3
    assert (tmp_path / "run" / "checkpoints" / "step_000005").is_dir()


# --------------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming file/line/field, exit code 2, no run dir.


def _bad_data(tmp_path, name, text):
    d = tmp_path / name
    d.mkdir()
    (d / "train.jsonl").write_text(text)
    return d


@pytest.mark.parametrize(
    "case, expect",
    [
        ("unknown_key", 'unknown option --train.lerning_rate (did you mean "train.learning_rate"?)'),
        ("wrong_type", "train.max_steps: expected an integer"),
        ("missing_data", "does-not-exist"),
        ("no_output", "train.jsonl:2"),
        ("not_json", "train.jsonl:3"),
        ("empty", "train.jsonl"),
    ],
)
def test_bad_inputs_one_line_exit_2_no_run_dir(case, expect, tmp_path, tiny_llama_dir, capsys):
    from mlxtune.cli import main

    good = '{"instruction": "Say hi", "input": "", "output": "hi"}\n'
    data = {
        "no_output": good + '{"instruction": "Say hi", "input": ""}\n',
        "not_json": good + good + "{not json\n",
        "empty": "",
    }
    d = _bad_data(tmp_path, "d", data.get(case, good * 4))
    cfg = _config(tmp_path, tiny_llama_dir, d)
    extra = {"unknown_key": ["--train.lerning_rate", "1"], "wrong_type": ["--train.max_steps", "many"],
             "missing_data": ["--data.train", str(tmp_path / "does-not-exist.jsonl")]}.get(case, [])
    with pytest.raises(SystemExit) as e:
        main(["train", "-c", str(cfg), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert expect in err
    assert not (tmp_path / "run").exists()


def test_checkpoint_inputs_are_only_differentiable(monkeypatch):
    """mx.checkpoint asks for the gradient of every input; CUDA's attention refuses one for its mask. So a packed,
    checkpointed layer must pass only float parameters and hidden states — never the bool mask or int ids."""
    import mlxtune.model as M

    real = mx.checkpoint
    seen = []

    def spy(fn):
        wrapped = real(fn)

        def call(*args):
            for a in [v for _, v in tree_flatten(list(args))]:
                seen.append(a.dtype)
            return wrapped(*args)

        return call

    monkeypatch.setattr(M.mx, "checkpoint", spy)
    m = tiny_model(dropout=0.1)
    m.grad_checkpoint = True
    seg = mx.array([[1] * 10 + [2] * 14, [1] * 24])
    inp = mx.array(np.random.default_rng(0).integers(0, 300, (2, 24)).astype(np.int32))
    from mlxtune.loss import loss_sum

    g = mx.grad(lambda params: (m.update(params), loss_sum(m, inp, inp, mx.ones((2, 24)), seg)[0])[1])(m.trainable_parameters())
    mx.eval(g)
    assert seen and all(d in (mx.float32, mx.bfloat16, mx.float16) for d in seen), set(seen)


def test_packed_checkpointed_gradients_equal_plain():
    from mlxtune.loss import loss_sum

    seg = mx.array([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
    inp = mx.array(np.random.default_rng(0).integers(0, 300, (2, 24)).astype(np.int32))
    grads = []
    for ck in (False, True):
        m = tiny_model(dropout=0.1)
        m.grad_checkpoint = ck
        mx.random.seed(5)
        _, g = __import__("mlx.nn", fromlist=["nn"]).value_and_grad(m, lambda mm: loss_sum(mm, inp, inp, mx.ones((2, 24)), seg)[0])(m)
        grads.append(dict(tree_flatten(g)))
    assert _max_rel(grads[1], grads[0]) <= 1e-6


def test_continue_training_from_imported_peft_adapter(tmp_path, tiny_llama_dir, tiny_data, uninterrupted):
    """lora.init_adapter: start from an adapter in another format (here the PEFT export of a finished run).
    With a vanishing learning rate the result is the imported adapter; the run's config records its shape."""
    import mlxtune.trainer as trainer
    from mlxtune.config import load_config
    from mlxtune.exports import export

    full_run, _ = uninterrupted
    peft_dir = export(full_run, "peft", tmp_path / "peft")
    cfg = _config(tmp_path, tiny_llama_dir, tiny_data, max_steps=2, learning_rate=1e-12, save_every=100, eval_every=100)
    res = trainer.train(cfg, quiet=True, lora={"init_adapter": str(peft_dir), "rank": 8, "dropout": 0.0})
    saved = load_config(res.run_dir / "config.yaml")
    assert saved.lora.rank == 4 and saved.lora.init_adapter == str(peft_dir)
    a, b = _adapter(res.run_dir), _adapter(full_run)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
