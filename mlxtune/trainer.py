"""The training loop in three phases: `prepare` → `_loop` → `_finish`.

    prepare   config → the run dir checked and locked (ownership.py) → model → LoRA → data → memory guard →
              resume state (fresh, or a checkpoint's checked against this run) → the compiled step; nothing is
              written before all of it passed
    _loop     one optimizer step at a time: run its micro-batches, report, validate, checkpoint, stop
    _finish   the final adapter, then the callbacks' on_train_end (loss.png)

Micro-batch j is batch `epoch_order(j // n)[j % n]`; optimizer step s consumes micro-batches [s*k, (s+1)*k)
(k = grad_accumulation); the RNG is re-seeded from (seed, j) before each, so the `ResumeState` saved whole in
every checkpoint (checkpoint.py) is all a resumed run needs to continue bit for bit. With data parallelism
(distributed.py), process r of W runs the micro-batches of a step whose index ≡ r (mod W); counts and gradients
are summed before the update, which does not depend on W. Reports go to callbacks (callbacks.py), on process 0.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import mlx.core as mx

from .callbacks import Callback, CallbackList, RunInfo, StopFlag, default_callbacks, peak_memory_gb, rss_gb
from .checkpoint import (ResumeState, RunDir, Window, abandon_newer, check_resume, data_hash, disk_errors,
                         load_checkpoint, save_checkpoint)
from .config import Config, load_config
from .errors import ConfigError, MlxtuneError
from .ownership import already_finished, claim_run_dir, start_run_dir
from .step import MicroBatches, TrainStep, all_finite, make_optimizer, memory_limit, micro_seed, nonfinite_error


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    metrics: dict = field(default_factory=dict)
    interrupted: bool = False
    stopped_early: bool = False
    best: Optional[dict] = None
    already_finished: bool = False  # --resume on a run at the end of its schedule: nothing was done
    stop_signal: Optional[int] = None  # the signal (SIGINT, SIGTERM, SIGHUP) that interrupted the run


def evaluate_loss(model, batches) -> dict:
    """Token-weighted validation loss and perplexity over `batches` (eval.score: eval mode, restored after)."""
    from .eval import score

    return score(model, batches)


def train(config: Union[str, Path, dict, Config, None] = None, *, resume: Union[bool, str, None] = None,
          overwrite: bool = False, overrides: Optional[list[str]] = None, quiet: bool = False, world=None,
          callbacks: Optional[Sequence[Callback]] = None, report_to: Optional[Sequence[str]] = None,
          **kwargs: Any) -> TrainResult:
    """Fine-tune with LoRA as `config` says; returns the run dir and final metrics.

    `config`: a YAML path, dict or Config; `overrides`: CLI-style `["--lora.rank", "32"]`; kwargs: sections as dicts
    (`train={"max_steps": 10}`) or dotted names (`**{"train.max_steps": 10}`). `resume=True` continues from the
    latest checkpoint in output_dir, `resume=PATH` from that checkpoint / run dir; `overwrite=True` replaces the run's
    results (ownership.py). `callbacks`: reporters after the built-in ones (callbacks.py); `report_to`: trackers, as
    train.report_to. `world`: a distributed.World when launched as several processes.
    """
    if report_to is not None:
        kwargs["train.report_to"] = [report_to] if isinstance(report_to, str) else list(report_to)
    with StopFlag() as flag:  # a signal before the loop stops at once
        job = prepare(config, resume=resume, overwrite=overwrite, overrides=overrides, quiet=quiet, world=world,
                      callbacks=callbacks, **kwargs)
        try:  # the run dir's lock is released on every path
            if job.world.on_main(lambda: already_finished(job.run, job.resume_path, job.state)):
                return TrainResult(job.run.root, job.state.step, {"step": job.state.step}, already_finished=True)
            flag.graceful = True
            with disk_errors(job.run, job.last_good), memory_limit(job.cfg.train.memory_limit_gb):
                job.world.on_main(lambda: _start_run_dir(job, flag))
                mx.reset_peak_memory()  # report training memory, not the transients of loading and converting
                outcome, last_val = _loop(job, flag)
            return _finish(job, outcome, last_val, flag.signum)
        finally:
            job.lock and job.lock.release()


# --------------------------------------------------------------------------------------------------------------
# Prepare


@dataclass
class Job:
    """What `prepare` builds and the loop and `_finish` use."""

    cfg: Config
    world: Any
    run: RunDir
    model: Any
    tokenizer: Any
    stream: MicroBatches
    valid_batches: list
    valid_examples: list
    optimizer: Any
    step_fn: Any
    state: ResumeState
    resume_path: Optional[Path]
    identity: dict
    lora_meta: dict
    info: dict
    callbacks: CallbackList = field(default_factory=CallbackList)
    notes: list = field(default_factory=list)
    saved_step: Optional[int] = None
    window_started: float = 0.0
    overwrite: bool = False
    lock: Any = None  # process 0's ownership.RunLock

    def last_good(self) -> Optional[Path]:
        """The newest checkpoint known to be good: this run's last save, else the one it resumed from."""
        return self.run.step_dir(self.saved_step) if self.saved_step is not None else self.resume_path


def prepare(config: Any = None, *, resume: Any = None, overwrite: bool = False, overrides: Optional[list[str]] = None,
            quiet: bool = False, world=None, callbacks: Optional[Sequence[Callback]] = None, **kwargs: Any) -> Job:
    """Everything before the first step: config → the run dir checked and locked → model → LoRA → data → memory
    guard → resume state. On any failure the lock is released (and a run dir it created removed)."""
    from .distributed import SingleProcess
    from .trackers import check_trackers

    cfg = load_config(config, overrides, **kwargs)
    check_trackers(cfg.train.report_to)  # a tracker that is not installed: one line before anything is loaded
    if not cfg.model.path:
        raise ConfigError("model.path: not set; point it at a Hugging Face model dir, a .gguf file or a hub id")
    if not cfg.data.train:
        raise ConfigError("data.train: not set; point it at a JSON/JSONL/Parquet file or a dir with train/valid/test files")
    world = world if world is not None else SingleProcess()
    run = RunDir(Path(cfg.output_dir))
    lock: list = []  # process 0's RunLock; only process 0 reads or writes the run dir (errors reach every process)
    resume_path = world.on_main(lambda: claim_run_dir(cfg, run, resume, overwrite, lock))
    try:
        job = _build(cfg, world, run, resume_path, quiet, callbacks)
    except BaseException:
        lock and lock[0].release()
        raise
    job.lock, job.overwrite = (lock or [None])[0], overwrite
    return job


def _build(cfg: Config, world, run: RunDir, resume_path: Optional[Path], quiet: bool,
           callbacks: Optional[Sequence[Callback]]) -> Job:
    """The model, LoRA, data, memory guard, resume state and compiled step of a run whose dir is claimed."""
    from . import loading
    from .distributed import make_all_reduce, shard_warning
    from .lora import adapter_weights
    from .trackers import make_trackers

    is_main, size = world.rank() == 0, world.size()
    model, tokenizer = loading.load(cfg.model.path, dtype=cfg.model.dtype, quantize=cfg.model.quantize)
    cfg, notes = _apply_lora(cfg, model, verbose=is_main and not quiet)
    model.grad_checkpoint = cfg.train.grad_checkpoint
    stream, splits, valid_batches = _load_data(cfg, model, tokenizer)
    notes += _memory_guard(cfg, model, stream.batches)
    notes += [w for w in [shard_warning(cfg.train.grad_accumulation, size)] if w]
    fingerprint = model.source["fingerprint"]
    identity = {"seed": cfg.train.seed, "fingerprint": fingerprint, "base_path": str(cfg.model.path),
                "data_hash": data_hash(stream.batches, cfg)}
    world.check_same("base model or training data", [fingerprint, identity["data_hash"]])
    optimizer = make_optimizer(cfg.train, stream.total_steps)
    state = ResumeState(total_steps=stream.total_steps, grad_accumulation=stream.k, world_size=size)
    if resume_path is not None:
        expected = {**identity, "adapter_shapes": {k: tuple(v.shape) for k, v in adapter_weights(model).items()},
                    "legacy_fingerprints": model.source.get("legacy_fingerprints", ())}
        state, more = _restore(resume_path, expected, state, model, optimizer, world)
        notes += more
    elif size > 1:  # every process starts from process 0's LoRA init, bit for bit whatever its hardware
        model.load_weights(list(world.broadcast(adapter_weights(model)).items()), strict=False)
    state.window = Window(mx.array(float(state.window.loss_sum)), mx.array(float(state.window.tokens)),
                          state.window.seen, state.window.seconds)
    all_reduce = make_all_reduce(world) if size > 1 else None
    step_fn = TrainStep(model, optimizer, cfg.train.max_grad_norm, compile=cfg.train.compile, all_reduce=all_reduce)
    model.train()
    lc = cfg.lora
    lora_meta = dict(base_path=str(cfg.model.path), fingerprint=fingerprint, rank=lc.rank, alpha=lc.alpha,
                     dropout=lc.dropout, targets=list(lc.targets), layers=lc.layers)
    from .data import padding_fraction

    b0 = stream.batches[0]
    info = dict(examples=len(splits.train), micro_batches=len(stream.batches), padding=padding_fraction(stream.batches),
                layout="packed" if b0.segment_ids is not None else "length-bucketed")
    # Trackers after the built-ins: metrics.jsonl is cut back on resume and loss.png exists before they read them.
    cbs = (CallbackList(default_callbacks(run.root, quiet=quiet) + make_trackers(cfg.train.report_to, run.root)
                        + list(callbacks or [])) if is_main else CallbackList())
    return Job(cfg, world, run, model, tokenizer, stream, valid_batches, list(splits.valid or []), optimizer, step_fn,
               state, resume_path, identity, lora_meta, info, cbs, notes)


def _apply_lora(cfg: Config, model, *, verbose: bool) -> tuple[Config, list[str]]:
    """Wrap the model with LoRA as lora.* says, or continue from lora.init_adapter. The adapter's shape (rank,
    alpha, targets, layers) replaces the config's, said in one line when it differs; its dropout does not: dropout
    is a training choice, so the config's lora.dropout is used. Returns the config with the final LoRA section."""
    from . import adapters
    from .lora import apply_lora

    lc = cfg.lora
    mx.random.seed(cfg.train.seed)
    if not lc.init_adapter:
        apply_lora(model, lc.rank, lc.alpha, lc.dropout, lc.targets, lc.layers, verbose=verbose)
        return cfg, []
    spec = adapters.read_adapter(lc.init_adapter)
    adapters.load_adapter(model, dataclasses.replace(spec, dropout=lc.dropout))
    final = dataclasses.replace(lc, rank=spec.rank, alpha=spec.alpha, targets=list(spec.targets), layers=spec.layers)
    changed = [f"{k} {getattr(lc, k)} -> {getattr(final, k)}" for k in ("rank", "alpha", "targets", "layers")
               if getattr(lc, k) != getattr(final, k)]
    note = (f"starting from the {spec.format} adapter {spec.path} (rank {spec.rank}, alpha {spec.alpha:g}, dropout "
            f"{lc.dropout:g} from lora.dropout)" + (f"; the adapter's shape replaces the config's: {', '.join(changed)}"
                                                   if changed else ""))
    return dataclasses.replace(cfg, lora=final), [note]


def _load_data(cfg: Config, model, tokenizer) -> tuple[MicroBatches, Any, list]:
    from . import data
    from .tokenizer import pad_id

    dc, tc = cfg.data, cfg.train
    splits = data.load_splits(dc, tokenizer, tc.seed)
    pad, aw = pad_id(tokenizer), data.attention_weight(model.args)  # packing "auto" keeps the cheaper layout

    def batches(examples):
        return data.make_batches(examples, tc.batch_size, dc.max_length, dc.packing, pad, attention_weight=aw)

    train_batches = batches(splits.train)
    if not train_batches:
        raise MlxtuneError(f"{dc.train}: no training batches (the training split is empty)")
    return MicroBatches(train_batches, cfg), splits, batches(splits.valid) if splits.valid else []


def _memory_guard(cfg: Config, model, batches) -> list[str]:
    """The memory estimate of the final LoRA shape against what is available: refuses (raises) or returns a warning."""
    if cfg.train.memory_guard == "off":
        return []
    from .memory import memory_guard

    check = memory_guard(cfg, model, batches)
    return [f"warning: {check.warning}"] if check is not None and getattr(check, "warning", None) else []


def _restore(path: Path, expected: dict, fresh: ResumeState, model, optimizer, world) -> tuple[ResumeState, list[str]]:
    """Load the checkpoint into the model and optimizer; its state, checked against this run's (`fresh`)."""

    def load():
        adapter, opt_state, raw = load_checkpoint(path, expected)
        notes = check_resume(path, ResumeState.from_dict(raw), grad_accumulation=fresh.grad_accumulation,
                             total_steps=fresh.total_steps, world_size=fresh.world_size)
        return adapter, opt_state, raw, notes

    adapter, opt_state, raw, notes = world.on_main(load)
    model.load_weights(list(adapter.items()), strict=False)
    optimizer.state = opt_state
    saved = ResumeState.from_dict(raw)
    # process 0 carries the window the checkpoint saved (summed over the processes that wrote it)
    window = saved.window if world.rank() == 0 else Window()
    return dataclasses.replace(saved, total_steps=fresh.total_steps, world_size=fresh.world_size,
                               grad_accumulation=fresh.grad_accumulation, window=window), notes


def _start_run_dir(job: Job, flag: "StopFlag") -> None:
    """Process 0: the run dir, config.yaml, the abandoned trajectory moved aside, notes, on_train_begin."""
    run, st = job.run, job.state
    start_run_dir(run.root, job.overwrite)  # the marker first; --overwrite: the old results removed
    from .runs import save_run_config  # paths made absolute (inside the run dir: relative to it)
    save_run_config(job.cfg, run.root)
    notes = list(job.notes)
    if job.resume_path is not None:
        notes += abandon_newer(run, st.step, job.resume_path)
        es = st.early_stopping
        if es.best_step == st.step and not run.best.exists():  # the loaded weights are the best evaluation's
            _write_best(job, {"step": st.step, "metric": job.cfg.train.early_stopping_metric, "value": es.best})
    for n in notes:
        print(n if n.startswith(("warning:", "note:")) else f"note: {n}", file=sys.stderr, flush=True)
    job.callbacks.on_train_begin(RunInfo(
        run.root, st.total_steps, st.step, job.resume_path, job.cfg.to_dict(), job.world.size(),
        fingerprint=job.identity["fingerprint"], request_stop=flag.request, **job.info))


# --------------------------------------------------------------------------------------------------------------
# The loop


def _loop(job: Job, flag: "StopFlag") -> tuple[str, dict]:
    """Optimizer steps from the resume state to the end of the schedule: returns (how it ended, last validation).
    A fresh run with validation data first validates the base model (a step-0 record; no early stopping on it).

    "done", "early_stop" (patience ran out) or "interrupted" (Ctrl-C or a callback's request_stop, on any
    process: all stop after the same step). A stop always writes a checkpoint first."""
    st, tc, cb = job.state, job.cfg.train, job.callbacks
    total, outcome, last_val = st.total_steps, "done", {}
    if st.step == 0 and job.valid_batches:  # the base model's validation, where the curve starts (not on resume)
        cb.on_eval(_validate(job)[1])
    job.window_started = time.perf_counter()
    while st.step < total:
        grad_norm, lr = _run_step(job)
        st.advance()
        if st.step % tc.log_every == 0 or st.step == total:
            cb.on_log(_report(job, grad_norm, lr))
        if job.valid_batches and (_every(st.step, tc.eval_every) or st.step == total):
            last_val, record = _validate(job)
            cb.on_eval(record)
            if _early_stopping(job, last_val):
                outcome = "early_stop"
        if job.world.any(flag.stop) and outcome == "done":
            outcome = "interrupted"
        if _every(st.step, tc.save_every) or st.step == total or outcome != "done":
            cb.on_save(st.step, _save(job))
        if outcome == "early_stop":
            es = st.early_stopping
            cb.on_log({"step": st.step, "event": "early_stop", "metric": tc.early_stopping_metric,
                       "patience": tc.early_stopping_patience, "best": es.best, "best_step": es.best_step})
            break
        if outcome == "interrupted":
            cb.on_log({"step": st.step, "event": "interrupted", "checkpoint": str(job.run.step_dir(st.step))})
            break
    return outcome, last_val


def _every(step: int, n: int) -> bool:
    return bool(n) and step % n == 0


def _run_step(job: Job) -> tuple[mx.array, mx.array]:
    """This process's micro-batches of the current step, then the update; adds to the report window."""
    from .loss import batch_arrays

    w, fn, world = job.state.window, job.step_fn, job.world
    mine = job.stream.of_step(job.state.step, world.rank(), world.size())
    losses = []  # (j, loss_sum) of this step's micro-batches, for the NaN/inf check
    if not mine:  # more processes than micro-batches in this step: contribute nothing, still all-reduce
        grad_norm, lr = fn.update()
    for j in mine:
        b = job.stream.at(j)
        mx.random.seed(micro_seed(job.cfg.train.seed, j))
        out = fn.micro(*batch_arrays(b), update=j == mine[-1])
        loss_s, n_tok = out[:2]
        if j == mine[-1]:
            grad_norm, lr = out[2:]
        losses.append((j, loss_s))
        w.loss_sum, w.tokens, w.seen = w.loss_sum + loss_s, w.tokens + n_tok, w.seen + b.n_real
        # Run this micro-batch now (asynchronously, so the next one's graph is built meanwhile). Without it
        # the k micro-batch graphs of a step pile up lazily: k=64 held 24 GB on an H100 (NOTES.md).
        mx.async_eval(fn.state, w.loss_sum, w.tokens)
    mx.eval(fn.state, w.loss_sum, w.tokens)
    # A NaN/inf loss or gradient stops the run before anything of this step is saved. The gradient norm is
    # global (all-reduced), so every process stops at the same step; local losses only name the batch.
    if not all_finite([grad_norm] + ([l for _, l in losses] if world.size() == 1 else [])):
        step = job.state.step + 1
        bad = [(j, float(l.item())) for j, l in losses if not math.isfinite(float(l.item()))]
        if bad:
            raise nonfinite_error(step, f"the loss is {bad[0][1]}", job.stream.describe(bad[0][0]), job.last_good())
        js = job.stream.of_step(job.state.step)
        where = "; ".join(job.stream.describe(j) for j in js[:3]) + ("; ..." if len(js) > 3 else "")
        raise nonfinite_error(step, f"the gradient norm is {float(grad_norm.item())}", where, job.last_good())
    return grad_norm, lr


def _window_sums(job: Job) -> tuple[float, float, float]:
    """(loss sum, target tokens, real input tokens) of the open window, summed over the processes."""
    w = job.state.window
    sums = [float(w.loss_sum.item()), float(w.tokens.item()), float(w.seen)]
    return tuple(job.world.sum_scalars(sums)) if job.world.size() > 1 else tuple(sums)


def _report(job: Job, grad_norm: mx.array, lr: mx.array) -> dict:
    """The training report of the window since the last one; the window starts afresh."""
    st = job.state
    loss_sum, toks, seen = _window_sums(job)
    now = time.perf_counter()
    dt = st.window.seconds + now - job.window_started
    st.trained_tokens += toks
    st.window, job.window_started = Window(mx.array(0.0), mx.array(0.0)), now
    return {"step": st.step, "epoch": round(st.micro_index / len(job.stream.batches), 4),
            "train_loss": loss_sum / max(toks, 1.0), "lr": float(lr.item()), "grad_norm": float(grad_norm.item()),
            "tokens_per_sec": seen / dt, "trained_tokens_per_sec": toks / dt, "trained_tokens": st.trained_tokens,
            "peak_memory_gb": peak_memory_gb(), "rss_gb": rss_gb()}


def _validate(job: Job) -> tuple[dict, dict]:
    """Validation loss (each process scores its share of the batches; the sums are added) and, with
    train.eval_generate, generation metrics from process 0. Returns (results, the eval record)."""
    from .eval import generation_metrics, loss_fields

    tc, world = job.cfg.train, job.world
    res = evaluate_loss(job.model, job.valid_batches[: tc.eval_batches][world.rank():: world.size()])
    if world.size() > 1:
        s, n = world.sum_scalars([res["loss_sum"], res["n_tokens"]])
        res = loss_fields({"loss_sum": s, "n_tokens": n})
    rec = {"step": job.state.step, "val_loss": res["loss"], "val_ppl": res["ppl"], "val_tokens": res["n_tokens"]}
    if tc.eval_generate:
        examples = job.valid_examples[: tc.eval_generate]
        gm = world.on_main(lambda: generation_metrics(job.model, job.tokenizer, examples, max_tokens=128))
        numbers = {k: v for k, v in gm.items() if isinstance(v, (int, float))}
        rec.update({f"val_{k}": v for k, v in numbers.items()})
        res = {**res, **numbers}
    return res, rec


def _early_stopping(job: Job, res: dict) -> bool:
    """Track the best evaluation, keep its adapter in best/, and say whether patience ran out."""
    tc, es, step = job.cfg.train, job.state.early_stopping, job.state.step
    name = tc.early_stopping_metric
    key = "loss" if name == "val_loss" else name.removeprefix("val_")
    if key not in res:
        raise ConfigError(f"train.early_stopping_metric: {name!r} was not computed at evaluation "
                          f"(val_loss always is; generation metrics need train.eval_generate > 0)")
    value = float(res[key])
    lower_is_better = key in ("loss", "ppl")
    if es.best is None or (value < es.best if lower_is_better else value > es.best):
        es.best, es.best_step, es.bad_evals = value, step, 0
        job.world.on_main(lambda: _write_best(job, {"step": step, "metric": name, "value": value}))
    else:
        es.bad_evals += 1
    return tc.early_stopping_patience is not None and es.bad_evals >= tc.early_stopping_patience


def _write_best(job: Job, record: dict) -> None:
    """best/: the adapter and best.json, swapped in as one directory."""
    from .adapters import save_adapter

    save_adapter(job.model, job.run.best, **job.lora_meta, replace=True, extra_files={"best.json": record})


def _save(job: Job) -> Path:
    """A checkpoint of the whole resume state; every process waits for process 0's write and raises if it failed."""
    from .lora import adapter_weights

    st = job.state
    if not all_finite(adapter_weights(job.model).values()):  # never checkpoint inf/nan weights
        raise nonfinite_error(st.step, "the update made the LoRA weights inf/nan although the loss and gradient "
                               "were finite (train.learning_rate is far too large)", "", job.last_good())
    now = time.perf_counter()
    st.window.seconds += now - job.window_started
    job.window_started = now
    loss_sum, toks, seen = _window_sums(job)
    saved = dataclasses.replace(st, window=Window(loss_sum, toks, int(seen), st.window.seconds))
    identity = {**job.identity, "epoch": st.micro_index / len(job.stream.batches)}
    path = job.world.on_main(lambda: save_checkpoint(job.run, saved, adapter_weights(job.model), job.optimizer.state,
                                                     identity, job.cfg.train.keep_last))
    job.saved_step = st.step
    return path


# --------------------------------------------------------------------------------------------------------------
# Finish


def _finish(job: Job, outcome: str, last_val: dict, stop_signal: Optional[int] = None) -> TrainResult:
    """The final adapter in the run dir, then on_train_end (loss.png); the other processes wait for process 0."""
    from .adapters import save_adapter

    job.model.eval()
    st, es = job.state, job.state.early_stopping
    metrics = {"step": st.step, **{f"val_{k}": v for k, v in last_val.items() if k in ("loss", "ppl")}}
    best = ({"metric": job.cfg.train.early_stopping_metric, "value": es.best, "step": es.best_step}
            if es.best is not None else None)
    result = TrainResult(job.run.root, st.step, metrics, outcome == "interrupted", outcome == "early_stop", best,
                         stop_signal=stop_signal)

    def final() -> None:
        with disk_errors(job.run, job.last_good):
            save_adapter(job.model, job.run.root, **job.lora_meta)
            job.callbacks.on_train_end(result)

    job.world.on_main(final)  # mlx.launch stops every process once one exits non-zero
    return result
