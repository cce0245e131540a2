"""The loss curve (issue #16): a fresh run with validation data validates the base model at step 0 (metrics.jsonl,
the console, loss.png), loss.png is a real picture with the smoothed training curve, a resume does not repeat the
step-0 record, and the smoothing is the centered moving average its docstring says.

In-process runs of the tiny 2-layer Llama with a byte-level tokenizer (reliability_helpers): seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reliability_helpers import run_config, small_run_inputs

from mlxtune.callbacks import Callback, plot_loss, read_curves, smooth, smoothing_half_window


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    root, model, data = small_run_inputs(root, 24, 6)
    only_train = root / "only_train"
    only_train.mkdir()
    (only_train / "train.jsonl").write_text((data / "train.jsonl").read_text())
    return root, model, data, only_train


@pytest.fixture(autouse=True)
def _cache(setup, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(setup[0] / "cache"))


def _train(cfg: dict, **kw):
    from mlxtune.trainer import train

    return train(cfg, **kw)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Seen(Callback):
    """Keeps every validation record a callback receives; asks to stop after step `stop_at` (0: never)."""

    def __init__(self, stop_at: int = 0):
        self.evals, self.stop_at, self.info = [], stop_at, None

    def on_train_begin(self, info):
        self.info = info

    def on_eval(self, record):
        self.evals.append(record)

    def on_log(self, record):
        if self.stop_at and record.get("step") == self.stop_at:
            self.info.request_stop()


def test_step0_validation_in_metrics_console_and_callbacks(setup, tmp_path, capsys):
    """The first record of a fresh run is the base model's validation (step 0, val_loss/val_ppl/val_tokens like
    every validation record, on train.eval_batches batches), callbacks get it, the console says what it is; the
    trained model's last validation is lower than the base's on this learnable data."""
    root, model, data, _ = setup
    seen = Seen()
    cfg = run_config(tmp_path, model, data, max_steps=6, eval_every=3, save_every=6, eval_batches=1)
    res = _train(cfg, callbacks=[seen])
    recs = _records(res.run_dir)
    first = recs[0]
    assert first["step"] == 0 and set(first) == {"step", "val_loss", "val_ppl", "val_tokens"}
    assert first["val_ppl"] == pytest.approx(np.exp(first["val_loss"]), rel=1e-5)
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 3, 6]
    assert {r["val_tokens"] for r in vals} == {first["val_tokens"]}  # the same (eval_batches-capped) batches
    assert [r["step"] for r in seen.evals] == [0, 3, 6]
    assert vals[-1]["val_loss"] < first["val_loss"]
    assert [r["step"] for r in recs if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    # eval_batches caps the step-0 validation like the loop's: fewer tokens than the whole split
    whole = _train(run_config(tmp_path, model, data, output="whole", max_steps=1, eval_every=0, save_every=0),
                   quiet=True)
    assert _records(whole.run_dir)[0]["val_tokens"] > first["val_tokens"]
    out = capsys.readouterr().out
    assert f"step 0 (the base model, before training): val loss {first['val_loss']:.4f}" in out


def test_no_validation_data_no_step0_record(setup, tmp_path):
    """Without validation data (a single train file, val_split 0) there is no step-0 record: training reports only."""
    root, model, _, only_train = setup
    cfg = run_config(tmp_path, model, only_train, max_steps=2, save_every=0)
    cfg["data"]["val_split"] = 0.0
    res = _train(cfg, quiet=True)
    recs = _records(res.run_dir)
    assert recs and all("train_loss" in r for r in recs) and recs[0]["step"] == 1


def test_resume_does_not_repeat_step0(setup, tmp_path):
    """Stopped after step 2 and resumed: one step-0 record, and metrics.jsonl's steps equal an uninterrupted run's."""
    root, model, data, _ = setup
    over = dict(max_steps=4, eval_every=2, save_every=2, log_every=1)
    full = _train(run_config(tmp_path, model, data, output="full", **over), quiet=True)
    cfg = run_config(tmp_path, model, data, output="split", **over)
    first = _train(cfg, quiet=True, callbacks=[Seen(stop_at=2)])
    assert first.interrupted and first.steps == 2
    seen = Seen()
    second = _train(cfg, quiet=True, resume=True, callbacks=[seen])
    assert second.steps == 4
    assert [r["step"] for r in seen.evals] == [4]  # the resumed session does not validate the base again
    key = lambda r: (r["step"], "val_loss" in r, "event" in r)  # noqa: E731
    a = [key(r) for r in _records(second.run_dir) if "event" not in r]
    assert a == [key(r) for r in _records(full.run_dir)]
    assert sum(1 for r in _records(second.run_dir) if r["step"] == 0) == 1
    assert _records(second.run_dir)[0]["val_loss"] == _records(full.run_dir)[0]["val_loss"]


def _image(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))


def test_loss_png_is_drawn(setup, tmp_path):
    """loss.png of a run: a PNG of the figure's size, with real content (not one colour), with the base point."""
    root, model, data, _ = setup
    res = _train(run_config(tmp_path, model, data, max_steps=6, eval_every=3, save_every=0), quiet=True)
    png = res.run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    img = _image(png)
    assert img.shape[:2] == (440, 770)  # 7 x 4 inches at 110 dpi
    rgb = img[..., :3]
    assert rgb.std() > 0.05 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    # the base point's marker (tab:red) is drawn, and the train curves (tab:blue) are
    assert _has_colour(rgb, (0xD6, 0x27, 0x28)) and _has_colour(rgb, (0x1F, 0x77, 0xB4))


def _has_colour(rgb: np.ndarray, colour: tuple, tol: float = 0.02, pixels: int = 20) -> bool:
    want = np.array(colour) / 255.0
    return int((np.abs(rgb - want).max(axis=-1) < tol).sum()) >= pixels


def test_plot_without_base_and_without_validation(tmp_path):
    """plot_loss on hand-written records: train-only, validation without a step 0 (a run from before), a torn last
    line; nothing to plot gives None and no file."""
    m = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train_loss": 3.0 / s + 0.2 * (-1) ** s} for s in range(1, 41)]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "train_lo')
    assert plot_loss(m, tmp_path / "a.png") == tmp_path / "a.png"
    assert _image(tmp_path / "a.png")[..., :3].std() > 0.05
    assert not _has_colour(_image(tmp_path / "a.png")[..., :3], (0xD6, 0x27, 0x28))  # no base point drawn
    with open(m, "a") as f:
        f.write("\n" + json.dumps({"step": 20, "val_loss": 1.5}) + "\n")
    train, val = read_curves(m)
    assert len(train) == 40 and val == [(20, 1.5)]
    assert plot_loss(m, tmp_path / "b.png") is not None
    m.write_text('{"step": 1, "event": "interrupted"}\n')
    assert plot_loss(m, tmp_path / "c.png") is None and not (tmp_path / "c.png").exists()
    assert plot_loss(tmp_path / "missing.jsonl", tmp_path / "d.png") is None


def _reference(values, h):
    """The centered moving average, cut at the ends, as two numpy convolutions."""
    v = np.asarray(values, dtype=np.float64)
    k = np.ones(2 * h + 1)
    window = slice(h, h + len(v))  # "full" then the centred part: "same" is the kernel's length when it is longer
    return np.convolve(v, k, mode="full")[window] / np.convolve(np.ones_like(v), k, mode="full")[window]


@pytest.mark.parametrize("n, h", [(1, 1), (2, 1), (5, 0), (5, 1), (9, 2), (40, 3), (101, 5), (7, 10)])
def test_smooth_matches_numpy(n, h):
    rng = np.random.default_rng(n * 31 + h)
    values = (3.0 * np.exp(-np.arange(n) / 30) + rng.normal(0, 0.3, n)).tolist()
    assert np.allclose(smooth(values, h), _reference(values, h), rtol=0, atol=1e-12)


def test_smooth_default_window_and_edges():
    """The default half window is n // 20 (at least 1); a constant stays constant; a line keeps its interior."""
    assert [smoothing_half_window(n) for n in (1, 9, 20, 40, 399, 1000)] == [1, 1, 1, 2, 19, 50]
    values = list(np.linspace(3, 1, 200))
    assert np.allclose(smooth(values), _reference(values, 10), atol=1e-12)
    assert np.allclose(smooth(values)[10:-10], values[10:-10], atol=1e-12)  # no lag, unlike an EMA
    assert smooth([2.5] * 7, 3) == [2.5] * 7 and smooth([], 2) == []
