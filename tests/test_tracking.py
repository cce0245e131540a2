"""Experiment tracking (issue #17): TensorBoard and W&B read back with their own readers hold every step of
metrics.jsonl exactly once, also after a SIGKILL and a resume; a missing extra is one ConfigError with the pip
command; `eval --report-to` lands in the run's TensorBoard dir and W&B run. W&B runs offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlxtune.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("tensorboardX")
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def _records(steps, offset=0.0):
    """Training records for `steps` (and a validation record every 3rd step, and at step 0 before step 1: the base
    model's), as the trainer makes them."""
    out = []
    for s in steps:
        if s == 1:
            out.append({"step": 0, "val_loss": 2.6 + offset, "val_ppl": 13.5, "val_tokens": 164})
        out.append({"step": s, "epoch": s / 10, "train_loss": 3.0 - 0.1 * s + offset, "lr": 1e-3 / s,
                    "grad_norm": 0.5 + s, "tokens_per_sec": 100.0 * s, "trained_tokens": 64.0 * s,
                    "peak_memory_gb": 0.1, "rss_gb": 0.7})
        if s % 3 == 0:
            out.append({"step": s, "val_loss": 2.5 - 0.05 * s + offset, "val_ppl": 12.0, "val_tokens": 164})
    return out


# One training session in its own process, as the trainer drives the trackers: each record is appended to
# metrics.jsonl first (MetricsWriter runs before the trackers), then handed on. `kill_after` SIGKILLs the process
# after that step, with TensorBoard's buffer flushed and W&B's not.
SESSION = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from mlxtune.callbacks import truncate_metrics
    from mlxtune.trackers import make_trackers

    run, start, kill_after, records = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    truncate_metrics(run / "metrics.jsonl", start)  # what MetricsWriter does on resume
    trackers = make_trackers(["tensorboard", "wandb"], run)
    info = {"run_dir": run, "start_step": start, "config": {"lora": {"rank": 4}, "train": {"max_steps": 8}},
            "fingerprint": "f00dfeed", "is_main": True}
    for t in trackers:
        t.on_train_begin(info)
    for r in records:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(r) + "\\n")
        for t in trackers:
            (t.on_eval if "val_loss" in r else t.on_log)(dict(r))
        if r["step"] == kill_after and "val_loss" not in r:
            trackers[0].on_save(r["step"], run / "checkpoints")  # flushes TensorBoard
            os.kill(os.getpid(), signal.SIGKILL)
    for t in trackers:
        t.on_train_end(None)
""")


def _session(run: Path, start: int, records: list, kill_after: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "mlxtune-tests"}
    return subprocess.run([sys.executable, "-c", SESSION, str(run), str(start), str(kill_after), json.dumps(records)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows it (EventAccumulator, purging what a restart superseded);
    fails when a tag holds a step twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def wandb_records(run: Path) -> list[dict]:
    """Every record of the run's offline W&B dirs, read by wandb's own reader (`wandb leet inspect --json`)."""
    out = []
    for d in sorted((run / "wandb").glob("offline-run-*")):
        p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(d), "--json"], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out += [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    return out


def wandb_history(run: Path) -> dict[int, dict]:
    """{step: row} over every W&B session of the run; fails when a step was logged twice for the same key."""
    rows: dict[int, dict] = {}
    for rec in wandb_records(run):
        if rec.get("type") == "history":
            item = rec["history"]["item"]
            row = rows.setdefault(int(item["_step"]), {})
            twice = {k for k in item if not k.startswith("_")} & set(row)
            assert not twice, f"step {item['_step']}: {sorted(twice)} logged twice"
            row.update(item)
    return rows


def wandb_summary(run: Path) -> dict:
    summary: dict = {}
    for rec in wandb_records(run):
        if rec.get("type") == "summary":
            summary.update(rec["summary"].get("update", {}))
    return summary


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_against_metrics(run: Path) -> None:
    recs = _metrics(run)
    tb = tensorboard_scalars(run)
    wb = wandb_history(run)
    for key in ("train_loss", "lr", "grad_norm", "tokens_per_sec", "trained_tokens", "peak_memory_gb", "val_loss",
                "val_ppl"):
        want = {r["step"]: r[key] for r in recs if key in r}
        assert want, key
        assert tb[key] == pytest.approx(want, rel=1e-6), key  # TensorBoard stores float32
        assert {s: row[key] for s, row in wb.items() if key in row} == want, key


# ---------------------------------------------------------------------------------------------------------


def test_resume_after_sigkill_logs_each_step_once(tmp_path):
    """Session 1 is SIGKILLed after step 5 (checkpoint at 4); session 2 resumes from step 4 with different values
    for steps 5.. (a resumed run re-produces them): both readers hold steps 1..8 once, with metrics.jsonl's values."""
    run = tmp_path / "run"
    run.mkdir()
    first = _session(run, 0, _records(range(1, 7)), kill_after=5)
    assert first.returncode == -9, first.stderr
    second = _session(run, 4, _records(range(5, 9), offset=100.0))
    assert second.returncode == 0, second.stderr
    assert [r["step"] for r in _metrics(run) if "train_loss" in r] == list(range(1, 9))
    _check_against_metrics(run)
    assert tensorboard_scalars(run)["train_loss"][5] == pytest.approx(3.0 - 0.5 + 100.0)
    # one W&B run: the same id in every session, the killed session's partial offline dir gone
    state = json.loads((run / "wandb.json").read_text())
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[1] for d in dirs] == [state["id"]]
    assert [s["finished"] for s in state["sessions"]] == [True] and state["sessions"][0]["last_step"] == 8
    summary = wandb_summary(run)
    assert summary["base_model_fingerprint"] == "f00dfeed"
    runs = [r for r in wandb_records(run) if r.get("type") == "run"]
    assert runs and runs[0]["run"]["config"]["update"]["lora"] == {"rank": 4}


def test_clean_resume_continues_the_same_runs(tmp_path):
    """A finished session (Ctrl-C checkpoints its last step), then a resume: one W&B run, TensorBoard's steps once,
    the config as text once, the loss curve image logged at the end."""
    run = tmp_path / "run"
    run.mkdir()
    assert _session(run, 0, _records(range(1, 5))).returncode == 0
    (run / "loss.png").write_bytes(_png())
    p = _session(run, 4, _records(range(5, 7)))
    assert p.returncode == 0, p.stderr
    _check_against_metrics(run)
    state = json.loads((run / "wandb.json").read_text())
    assert [s["last_step"] for s in state["sessions"]] == [4, 6]
    assert len({d.name.rsplit("-", 1)[1] for d in (run / "wandb").glob("offline-run-*")}) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("loss_curve")] == [6]
    # the text as TensorBoard's UI reads it (its plugin accumulator, whose purge covers text too): once
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator

    ui = PluginAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    ui.Reload()
    config = ui.Tensors("config/text_summary")
    assert [e.step for e in config] == [0] and b"rank: 4" in config[0].tensor_proto.string_val[0]
    assert wandb_history(run)[6]["loss_curve._type"] == "image-file"


def _png() -> bytes:
    import io

    from matplotlib.figure import Figure

    buf = io.BytesIO()
    Figure(figsize=(1, 1)).savefig(buf, format="png")
    return buf.getvalue()


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("tensorboard", "tensorboardX")])
def test_missing_extra_is_one_line_with_the_pip_command(monkeypatch, tmp_path, name, module):
    from mlxtune.trackers import check_trackers, make_trackers

    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    for call in (lambda: check_trackers([name]), lambda: make_trackers([name], tmp_path / "run")):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"pip install 'mlxtune[{name}]'" in msg and module in msg
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="is not one of"):
        check_trackers(["mlflow"])


def test_eval_report_goes_to_the_runs_trackers(tmp_path):
    """log_eval_report on a trained run dir: TensorBoard scalars at the run's last step, the W&B run's summary."""
    from mlxtune.trackers import log_eval_report

    run = tmp_path / "run"
    run.mkdir()
    assert _session(run, 0, _records(range(1, 4))).returncode == 0
    report = {"data": "data/test.jsonl", "n_examples": 6, "n_generated": 6,
              "metrics": {"loss": 2.1, "ppl": 8.2, "bleu": 12.5, "rougeL": 30.0}}
    code = ("import json, sys; from mlxtune.trackers import log_eval_report; "
            "log_eval_report(['tensorboard', 'wandb'], sys.argv[1], json.loads(sys.argv[2]))")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, "-c", code, str(run), json.dumps(report)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    tb = tensorboard_scalars(run)
    assert tb["eval/bleu"] == {3: pytest.approx(12.5)} and tb["eval/n_examples"] == {3: 6.0}
    assert tb["train_loss"].keys() == {1, 2, 3}
    summary = wandb_summary(run)
    assert summary["eval/bleu"] == 12.5 and summary["eval/rougeL"] == 30.0
    state = json.loads((run / "wandb.json").read_text())
    assert {d.name.rsplit("-", 1)[1] for d in (run / "wandb").glob("offline-run-*")} == {state["id"]}
    assert callable(log_eval_report)


def test_eval_scalars_of_a_comparison():
    from mlxtune.trackers import eval_scalars, scalars

    report = {"base": {"loss": 2.0, "bleu": 1.0}, "tuned": {"loss": 1.5, "bleu": 3.0},
              "delta": {"loss": -0.5, "bleu": 2.0}, "n_examples": 4, "data": "x"}
    assert eval_scalars(report) == {"eval/base/loss": 2.0, "eval/base/bleu": 1.0, "eval/tuned/loss": 1.5,
                                    "eval/tuned/bleu": 3.0, "eval/delta/loss": -0.5, "eval/delta/bleu": 2.0,
                                    "eval/n_examples": 4.0}
    assert scalars({"step": 3, "event": "early_stop", "best": 1.5, "stopped": True}) == {"best": 1.5}


# ---------------------------------------------------------------------------------------------------------
# A real run of the trainer (a tiny Llama with a 512-token BPE: milliseconds per step)


@pytest.fixture(scope="module")
def bpe_assets(tmp_path_factory, alpaca_seed_dir):
    from conftest import make_bpe_model_dir

    root = tmp_path_factory.mktemp("bpe")
    data = root / "data"
    data.mkdir()
    lines = (alpaca_seed_dir / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[24:30]) + "\n")
    texts = [v for line in lines for v in json.loads(line).values() if isinstance(v, str)]
    make_bpe_model_dir(root / "model", texts)
    return root / "model", data


def _train_config(tmp_path: Path, assets, **train) -> Path:
    import yaml

    model_dir, data_dir = assets
    t = {"max_steps": 8, "batch_size": 2, "learning_rate": 1e-2, "save_every": 4, "eval_every": 3, "log_every": 1,
         "keep_last": 10, "seed": 3, **train}
    cfg = {"model": {"path": str(model_dir)}, "lora": {"rank": 4, "alpha": 8},
           "data": {"train": str(data_dir), "max_length": 64, "packing": True}, "train": t,
           "output_dir": str(tmp_path / "run")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# The trainer with the trackers as user callbacks (`train(..., callbacks=...)`); KILL > 0 SIGKILLs the process
# when the record of that step is reported, RESUME continues the run.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from mlxtune.callbacks import Callback
    from mlxtune.trackers import make_trackers
    from mlxtune.trainer import train

    class KillAt(Callback):
        def __init__(self, step):
            self.step = step
        def on_log(self, record):
            if record.get("step") == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg, run, kill, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    callbacks = make_trackers(["tensorboard", "wandb"], run) + ([KillAt(kill)] if kill else [])
    train(cfg, resume=True if resume else None, quiet=True, callbacks=callbacks)
""")


def _drive(cfg: Path, run: Path, kill: int = 0, resume: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-c", DRIVER, str(cfg), str(run), str(kill), "1" if resume else "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_run_killed_and_resumed_reports_each_step_once(tmp_path, bpe_assets):
    """The trainer drives the trackers: SIGKILL at step 6 (checkpoint at 4), resume: TensorBoard and W&B hold each
    step of metrics.jsonl once, with its values; the base fingerprint and the loss curve are logged."""
    cfg, run = _train_config(tmp_path, bpe_assets), tmp_path / "run"
    first = _drive(cfg, run, kill=6)
    assert first.returncode == -9, first.stderr[-3000:]
    second = _drive(cfg, run, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["step"] for r in _metrics(run) if "train_loss" in r] == list(range(1, 9))
    _check_against_metrics(run)
    fingerprint = json.loads((run / "adapter_config.json").read_text())["base_model"]["fingerprint"]
    assert wandb_summary(run)["base_model_fingerprint"] == fingerprint
    assert "loss_curve._type" in wandb_history(run)[8]
    state = json.loads((run / "wandb.json").read_text())
    assert [d.name.rsplit("-", 1)[1] for d in (run / "wandb").glob("offline-run-*")] == [state["id"]]


def test_report_to_in_the_config(tmp_path, bpe_assets):
    """`--train.report_to tensorboard,wandb` through the CLI: both trackers hold the run's metrics."""
    cfg, run = _train_config(tmp_path, bpe_assets, max_steps=4), tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, "-m", "mlxtune", "train", "-c", str(cfg), "--train.report_to",
                        "tensorboard,wandb"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    _check_against_metrics(run)


def test_report_to_missing_extra_exit_2_no_run_dir(tmp_path, bpe_assets):
    cfg, run = _train_config(tmp_path, bpe_assets, report_to=["wandb"]), tmp_path / "run"
    code = "import sys; sys.modules['wandb'] = None; from mlxtune.cli import main; main(sys.argv[1:])"
    p = subprocess.run([sys.executable, "-c", code, "train", "-c", str(cfg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'mlxtune[wandb]'" in err[0]
    assert not run.exists()
