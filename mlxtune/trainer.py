"""The training loop, top to bottom: load → LoRA → data → resume → steps (report, eval, checkpoint) → save.

`mlxtune train -c CONFIG [--resume [PATH]] [--section.key value ...]` and `mlxtune.train(config, **overrides)`.

The loop walks a global stream of micro-batches: micro-batch j is batch `epoch_order(epoch = j // n)[j % n]`,
and optimizer step s consumes micro-batches [s*k, (s+1)*k) (k = grad_accumulation). The cursor saved in a
checkpoint is a step number, so resuming continues the same stream, the same schedule and the same RNG (the RNG
is re-seeded from (seed, j) before every micro-batch). With data parallelism (distributed.py), process r of W
runs the micro-batches of each step whose index ≡ r (mod W); counts and gradients are summed before the update,
so the update does not depend on W.

Everything the user can get wrong (config, model dir, data) is checked before the run dir is created.
"""

from __future__ import annotations

import errno
import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import numpy as np

from .checkpoint import RunDir, clean_partial, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint, write_json_atomic
from .config import Config, load_config
from .errors import CheckpointError, ConfigError, MlxtuneError
from .monitor import Monitor, peak_memory_gb, plot_loss, rss_gb, truncate_metrics


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    metrics: dict = field(default_factory=dict)
    interrupted: bool = False
    stopped_early: bool = False
    best: Optional[dict] = None


def _micro_seed(seed: int, micro_index: int) -> int:
    """The RNG seed for global micro-batch j: the same whichever process runs it (so W processes == 1)."""
    h = hashlib.blake2b(f"{seed}:{micro_index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little")


def _data_hash(batches, cfg: Config) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.data.max_length, cfg.data.packing, cfg.train.batch_size, cfg.data.shuffle, cfg.train.seed]).encode())
    for b in batches:
        h.update(np.ascontiguousarray(b.inputs).tobytes())
        h.update(np.ascontiguousarray(b.loss_mask).tobytes())
    return h.hexdigest()


class _StopFlag:
    """First Ctrl-C: finish the current step, checkpoint, exit cleanly. Second: stop at once."""

    def __init__(self):
        self.stop = False
        self._prev = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: finishing this step, writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


def _all_finite(arrays) -> bool:
    """True when every value of every (evaluated) array is finite; one host sync."""
    return bool(mx.all(mx.stack([mx.all(mx.isfinite(a)) for a in arrays])).item())


def _nonfinite_error(step: int, what: str, where: str, good: Optional[Path]) -> MlxtuneError:
    """One line: the step and the batch where training diverged, and where the last good checkpoint is."""
    resume = (f"the last good checkpoint is {good} (its weights are finite; if the loss was already climbing, use an "
              f"earlier one or start over): resume with --resume PATH and a lower train.learning_rate, or check the "
              f"examples of that batch") if good else (
              "no checkpoint was written before it: lower train.learning_rate, or check the examples of that batch")
    at = f" at {where}" if where else ""
    return MlxtuneError(f"step {step}: {what}{at}; training stopped and this step was not saved; {resume}")


@contextmanager
def _disk_errors(run: RunDir, good):
    """A full disk outside save_checkpoint (metrics, best/, the final adapter, loss.png) → one line, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or run.root
        raise MlxtuneError(f"{where}: {e.strerror} while writing the run; free some space, then continue with --resume "
                           f"(last checkpoint: {good() or 'none'})") from None
    except RuntimeError as e:  # MLX's safetensors writer: "[write] Unable to write N bytes to file."
        if not str(e).startswith(("[write]", "[save_safetensors]")):
            raise
        raise MlxtuneError(f"{run.root}: could not write ({e}); is the disk full? free some space, then continue with "
                           f"--resume (last checkpoint: {good() or 'none'})") from None


@contextmanager
def _memory_limit(gb: Optional[float]):
    """train.memory_limit_gb: MLX's memory limit for the duration of training, the previous one restored after.

    Above the limit, MLX evaluation waits for the device before queueing more work, so the inputs that queued GPU
    command buffers keep alive cannot pile up beyond the step's live set (docs/TROUBLESHOOTING.md). None: untouched."""
    if gb is None:
        yield
        return
    previous = mx.set_memory_limit(int(gb * 1e9))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def evaluate_loss(model, batches) -> dict:
    """Token-weighted validation loss and perplexity over `batches` (evaluate.score: eval mode, restored after)."""
    from .evaluate import score

    return score(model, batches)


def train(config: Union[str, Path, dict, Config, None] = None, *, resume: Union[bool, str, None] = None,
          overrides: Optional[list[str]] = None, quiet: bool = False, world=None, **kwargs: Any) -> TrainResult:
    """Fine-tune with LoRA as `config` says; returns the run dir and final metrics.

    `config`: a YAML path, dict or Config; `overrides`: CLI-style `["--lora.rank", "32"]`; kwargs: sections as dicts
    (`train={"max_steps": 10}`) or dotted names (`**{"train.max_steps": 10}`). `resume=True` continues from the
    latest checkpoint in output_dir, `resume=PATH` from that checkpoint / run dir.
    """
    from . import adapters, batching, data as data_mod, loading
    from .lora import adapter_weights, apply_lora
    from .step import TrainStep, make_optimizer

    cfg = load_config(config, overrides, **kwargs)
    tc, dc = cfg.train, cfg.data
    if not cfg.model.path:
        raise ConfigError("model.path: not set; point it at a Hugging Face model dir, a .gguf file or a hub id")
    if not dc.train:
        raise ConfigError("data.train: not set; point it at a JSON/JSONL/Parquet file or a dir with train/valid/test files")
    from .distributed import SingleProcess, shard_warning

    world = world if world is not None else SingleProcess()
    rank, size = world.rank(), world.size()
    is_main = rank == 0
    run = RunDir(Path(cfg.output_dir))

    # --- Validate inputs before anything is written ------------------------------------------------------
    def check_run_dir() -> Optional[Path]:
        if not resume and latest_checkpoint(run) is not None:
            raise CheckpointError(
                f"{run.root}: already holds a run with checkpoints; add --resume to continue it or choose another --output_dir"
            )
        return resolve_resume(run, resume) if resume else None

    # Only process 0 reads or writes the run dir (on several hosts the others need not see it); an error there
    # is raised on every process (distributed.py).
    resume_path = world.on_main(check_run_dir)
    model, tokenizer = loading.load(cfg.model.path, dtype=cfg.model.dtype, quantize=cfg.model.quantize)
    splits = data_mod.load_splits(dc, tokenizer, tc.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    aw = batching.attention_weight(model.args)  # packing "auto" keeps the layout with the lower estimated compute
    train_batches = batching.make_batches(splits.train, tc.batch_size, dc.max_length, dc.packing, pad_id, attention_weight=aw)
    valid_batches = (batching.make_batches(splits.valid, tc.batch_size, dc.max_length, dc.packing, pad_id, attention_weight=aw)
                     if splits.valid else [])
    if not train_batches:
        raise MlxtuneError(f"{dc.train}: no training batches (the training split is empty)")
    n_batches, k = len(train_batches), tc.grad_accumulation
    total_micro = math.ceil(tc.epochs * n_batches)
    total_steps = tc.max_steps if tc.max_steps is not None else max(1, math.ceil(total_micro / k))
    total_micro = max(total_micro, total_steps * k) if tc.max_steps is not None else total_micro

    if tc.memory_guard != "off":  # the estimate against available memory: warn, or refuse with what to change
        from .diagnostics import memory_guard

        memory_guard(cfg, model, train_batches)

    mx.random.seed(tc.seed)
    if cfg.lora.init_adapter:  # continue from an existing adapter (any format adapters.py reads)
        spec = adapters.read_adapter(cfg.lora.init_adapter)
        adapters.load_adapter(model, cfg.lora.init_adapter)
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(
            cfg.lora, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=list(spec.targets), layers=spec.layers))
        if is_main and not quiet:
            print(f"starting from the {spec.format} adapter {spec.path} (rank {spec.rank}, alpha {spec.alpha:g})")
    else:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, cfg.lora.layers,
                   verbose=is_main and not quiet)
    model.grad_checkpoint = tc.grad_checkpoint
    fingerprint = model.source["fingerprint"]
    expected = {
        "fingerprint": fingerprint,
        "base_path": str(cfg.model.path),
        "adapter_shapes": {k_: tuple(v.shape) for k_, v in adapter_weights(model).items()},
        "data_hash": _data_hash(train_batches, cfg),
    }
    optimizer = make_optimizer(tc, total_steps)
    start_step, early, resumed_tokens = 0, {"best": None, "best_step": None, "bad_evals": 0}, 0.0
    world.check_same("base model or training data", [fingerprint, expected["data_hash"]])
    if resume_path is not None:
        adapter, opt_state, state = world.on_main(lambda: load_checkpoint(resume_path, expected))
        model.load_weights(list(adapter.items()), strict=False)
        optimizer.state = opt_state
        start_step = int(state["step"])
        early = state.get("early_stopping", early)
        resumed_tokens = float(state.get("trained_tokens", 0.0))
    elif size > 1:  # every process starts from process 0's LoRA init, bit for bit whatever its hardware
        model.load_weights(list(world.broadcast(adapter_weights(model)).items()), strict=False)

    # --- The run dir ----------------------------------------------------------------------------------------
    def make_run_dir() -> None:
        run.root.mkdir(parents=True, exist_ok=True)
        clean_partial(run)
        cfg.save(run.config)
        if resume_path is not None:
            truncate_metrics(run.metrics, start_step)
        elif run.metrics.exists():
            run.metrics.unlink()

    world.on_main(make_run_dir)
    lora_meta = dict(base_path=str(cfg.model.path), fingerprint=fingerprint, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                     dropout=cfg.lora.dropout, targets=list(cfg.lora.targets), layers=cfg.lora.layers)
    all_reduce = None
    if size > 1:
        from .distributed import make_all_reduce

        all_reduce = make_all_reduce(world)
    step_fn = TrainStep(model, optimizer, tc.max_grad_norm, compile=tc.compile, all_reduce=all_reduce)
    model.train()

    monitor = Monitor(run.metrics, total_steps, start_step, quiet=quiet, is_main=is_main)
    if is_main and not quiet:
        pad = batching.padding_fraction(train_batches)
        what = "resuming from " + str(resume_path) if resume_path else "training"
        layout = "packed" if train_batches[0].segment_ids is not None else "length-bucketed"
        print(f"{what}: {len(splits.train)} examples in {n_batches} {layout} micro-batches ({pad:.1%} padding), "
              f"{total_steps} steps x {k} accumulation" + (f" over {size} processes" if size > 1 else "") +
              f"; run dir {run.root}", flush=True)
    if is_main and shard_warning(k, size):
        print(shard_warning(k, size), file=sys.stderr, flush=True)

    orders: dict[int, list[int]] = {}

    def batch_at(j: int):
        epoch = j // n_batches
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batching.epoch_order(n_batches, tc.seed, epoch, dc.shuffle)
        return train_batches[orders[epoch][j % n_batches]]

    def checkpoint_state(step: int) -> dict:
        return {"micro_index": step * k, "seed": tc.seed, "epoch": step * k / n_batches, "early_stopping": early,
                "fingerprint": fingerprint, "base_path": str(cfg.model.path), "data_hash": expected["data_hash"],
                "total_steps": total_steps, "world_size": size, "trained_tokens": trained_tokens}

    def save(step: int) -> None:  # every process waits for process 0's write and raises if it failed
        if not _all_finite(adapter_weights(model).values()):  # never checkpoint inf/nan weights
            raise _nonfinite_error(step, "the update made the LoRA weights inf/nan although the loss and gradient "
                                   "were finite (train.learning_rate is far too large)", "", last_good())
        world.on_main(lambda: save_checkpoint(run, step, adapter_weights(model), optimizer.state,
                                              checkpoint_state(step), tc.keep_last))

    # --- The loop ---------------------------------------------------------------------------------------------
    step = start_step
    window = {"loss": mx.array(0.0), "tokens": mx.array(0.0), "seen": 0, "t0": time.perf_counter()}
    trained_tokens, last_val, stopped_early, interrupted = resumed_tokens, {}, False, False
    mx.reset_peak_memory()  # report training memory, not the transients of loading and converting the model
    last_saved = start_step if resume_path is not None else -1

    def last_good() -> Optional[Path]:
        return run.step_dir(last_saved) if last_saved > start_step else resume_path

    def micro_name(j: int) -> str:  # where global micro-batch j comes from, for the NaN/inf error
        epoch, pos = divmod(j, n_batches)
        b = batching.epoch_order(n_batches, tc.seed, epoch, dc.shuffle)[pos]
        return f"micro-batch {j} (epoch {epoch + 1}, position {pos + 1} of {n_batches}: training batch #{b})"

    if tc.memory_limit_gb is not None and is_main and not quiet:
        print(f"memory limit: {float(tc.memory_limit_gb)} GB (MLX evaluation waits for the device when active memory "
              f"exceeds it)", flush=True)
    with _StopFlag() as flag, _disk_errors(run, last_good), _memory_limit(tc.memory_limit_gb):
        while step < total_steps:
            first, last = step * k, min((step + 1) * k, total_micro)
            mine = [j for j in range(first, last) if j % size == rank]
            step_losses = []  # (j, loss_sum) of this step's micro-batches, for the NaN/inf check
            if not mine:  # more processes than micro-batches in this step: contribute nothing, still all-reduce
                grad_norm, lr = step_fn.update()
            for j in mine:
                b = batch_at(j)
                mx.random.seed(_micro_seed(tc.seed, j))
                seg = None if b.segment_ids is None else mx.array(b.segment_ids)
                out = step_fn.micro(mx.array(b.inputs), mx.array(b.targets), mx.array(b.loss_mask), seg, update=j == mine[-1])
                if j == mine[-1]:
                    loss_s, n_tok, grad_norm, lr = out
                else:
                    loss_s, n_tok = out
                step_losses.append((j, loss_s))
                window["loss"] = window["loss"] + loss_s
                window["tokens"] = window["tokens"] + n_tok
                # Run this micro-batch now (asynchronously, so the next one's graph is built meanwhile). Without it
                # the k micro-batch graphs of a step pile up lazily: k=64 held 24 GB on an H100 (NOTES.md).
                mx.async_eval(step_fn.state, window["loss"], window["tokens"])
                window["seen"] += int((b.inputs != pad_id).sum()) if b.segment_ids is None else int((b.segment_ids > 0).sum())
            mx.eval(step_fn.state, window["loss"], window["tokens"])
            # A NaN/inf loss or gradient stops the run before anything of this step is saved. The gradient norm is
            # global (all-reduced), so every process stops at the same step; local losses only name the batch.
            if not _all_finite([grad_norm] + ([l for _, l in step_losses] if size == 1 else [])):
                bad = [(j, float(l.item())) for j, l in step_losses if not math.isfinite(float(l.item()))]
                if bad:
                    raise _nonfinite_error(step + 1, f"the loss is {bad[0][1]}", micro_name(bad[0][0]), last_good())
                where = "; ".join(micro_name(j) for j in range(first, min(last, first + 3))) + ("; ..." if last > first + 3 else "")
                raise _nonfinite_error(step + 1, f"the gradient norm is {float(grad_norm.item())}", where, last_good())
            step += 1

            if step % tc.log_every == 0 or step == total_steps:
                loss_sum_, toks = float(window["loss"].item()), float(window["tokens"].item())
                if size > 1:
                    loss_sum_, toks, seen = (float(x) for x in world.sum_scalars([loss_sum_, toks, window["seen"]]))
                else:
                    seen = window["seen"]
                dt = time.perf_counter() - window["t0"]
                trained_tokens += toks
                rec = {"step": step, "epoch": round(step * k / n_batches, 4), "train_loss": loss_sum_ / max(toks, 1.0),
                       "lr": float(lr.item()), "grad_norm": float(grad_norm.item()), "tokens_per_sec": seen / dt,
                       "trained_tokens_per_sec": toks / dt, "trained_tokens": trained_tokens,
                       "peak_memory_gb": peak_memory_gb(), "rss_gb": rss_gb()}
                monitor.log(rec, f"step {step}/{total_steps} | loss {rec['train_loss']:.4f} | lr {rec['lr']:.2e} | "
                                 f"{rec['tokens_per_sec']:,.0f} tok/s | trained {int(trained_tokens):,} tok | "
                                 f"peak {rec['peak_memory_gb']:.2f} GB | rss {rec['rss_gb']:.2f} GB | eta {monitor.eta(step)}")
                window = {"loss": mx.array(0.0), "tokens": mx.array(0.0), "seen": 0, "t0": time.perf_counter()}
            monitor.advance(step)
            stop = world.any(flag.stop)  # Ctrl-C may reach the processes at different steps: all stop at this one

            if valid_batches and ((tc.eval_every and step % tc.eval_every == 0) or step == total_steps):
                last_val = _validate(model, tokenizer, valid_batches, splits.valid, cfg, step, monitor, world)
                stop_now = _early_stopping(early, last_val, tc, step, run, model, lora_meta, world, adapters)
                if stop_now:
                    stopped_early = True
            if (tc.save_every and step % tc.save_every == 0) or step == total_steps or stopped_early or stop:
                save(step)
                last_saved = step
            if stopped_early:
                monitor.log({"step": step, "event": "early_stop"}, f"early stopping at step {step}: "
                            f"{tc.early_stopping_metric} has not improved for {tc.early_stopping_patience} evaluations "
                            f"(best {early['best']:.4f} at step {early['best_step']}, kept in {run.best})")
                break
            if stop:
                interrupted = True
                monitor.log({"step": step, "event": "interrupted"},
                            f"interrupted at step {step}; checkpoint in {run.step_dir(step)}; continue with --resume")
                break
    monitor.close()
    model.eval()

    def save_final() -> None:
        with _disk_errors(run, last_good):
            adapters.save_adapter(model, run.root, **lora_meta)
            plot_loss(run.metrics, run.loss_png)

    world.on_main(save_final)  # the others wait for it: mlx.launch stops every process once one exits non-zero
    metrics = {"step": step, **{f"val_{k_}": v for k_, v in last_val.items() if k_ in ("loss", "ppl")}}
    return TrainResult(run.root, step, metrics, interrupted, stopped_early,
                       {"metric": tc.early_stopping_metric, "value": early["best"], "step": early["best_step"]}
                       if early["best"] is not None else None)


def _validate(model, tokenizer, valid_batches, valid_examples, cfg: Config, step: int, monitor: Monitor, world) -> dict:
    tc = cfg.train
    # each process evaluates its share of the batches and the sums are added, so every process sees the same numbers
    res = evaluate_loss(model, valid_batches[: tc.eval_batches][world.rank():: world.size()])
    if world.size() > 1:
        s, n = world.sum_scalars([res["loss_sum"], res["n_tokens"]])
        from .evaluate import _ppl

        res = {"loss_sum": s, "n_tokens": n, "loss": s / max(n, 1.0), "ppl": _ppl(s / max(n, 1.0))}
    rec = {"step": step, "val_loss": res["loss"], "val_ppl": res["ppl"], "val_tokens": res["n_tokens"]}
    line = f"step {step}: val loss {res['loss']:.4f} | val ppl {res['ppl']:.3f}"
    if tc.eval_generate:
        from .evaluate import generation_metrics

        gm = world.on_main(lambda: generation_metrics(model, tokenizer, valid_examples[: tc.eval_generate], max_tokens=128))
        for k_, v in gm.items():
            if isinstance(v, (int, float)):
                rec[f"val_{k_}"] = v
                res[k_] = v
        line += " | " + " | ".join(f"{k_} {v:.4f}" for k_, v in gm.items() if isinstance(v, (int, float)) and k_ != "n_examples")
    monitor.log(rec, line)
    return res


def _early_stopping(early: dict, res: dict, tc, step: int, run: RunDir, model, lora_meta: dict, world,
                    adapters) -> bool:
    """Track the best evaluation, keep its adapter in best/, and say whether patience ran out."""
    name = tc.early_stopping_metric
    key = "loss" if name == "val_loss" else name.removeprefix("val_")
    if key not in res:
        raise ConfigError(f"train.early_stopping_metric: {name!r} was not computed at evaluation "
                          f"(val_loss always is; generation metrics need train.eval_generate > 0)")
    value = float(res[key])
    lower_is_better = key in ("loss", "ppl")
    better = early["best"] is None or (value < early["best"] if lower_is_better else value > early["best"])
    if better:
        early.update(best=value, best_step=step, bad_evals=0)
        def save_best() -> None:
            adapters.save_adapter(model, run.best, **lora_meta)
            write_json_atomic(run.best / "best.json", {"step": step, "metric": name, "value": value})

        world.on_main(save_best)
    else:
        early["bad_evals"] += 1
    return tc.early_stopping_patience is not None and early["bad_evals"] >= tc.early_stopping_patience


# --------------------------------------------------------------------------------------------------------------
# CLI


def register_cli(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune with LoRA from a YAML config",
        description="Fine-tune with LoRA. Any config field can be overridden: --lora.rank 32 --train.learning_rate 2e-4",
    )
    p.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from the latest checkpoint in output_dir, or from PATH (a step dir or run dir)")
    p.add_argument("--quiet", action="store_true", help="no per-step reports")
    p.set_defaults(func=_cli_train, accepts_overrides=True)


def _cli_train(args) -> int:
    from .distributed import DistributedError, is_peer_lost, maybe_init

    world = maybe_init()  # None unless started by mlx.launch (or mpirun) as one of several processes
    try:
        result = train(args.config, resume=args.resume, overrides=args.overrides, quiet=args.quiet, world=world)
    except RuntimeError as e:
        if world is None or not is_peer_lost(e):
            raise
        raise DistributedError(f"process {world.rank()}: {e} (another process failed or was killed; see its output)") from None
    if world is None or world.rank() == 0:
        print(f"run dir: {result.run_dir}")
        print(f"adapter: {result.run_dir / 'adapters.safetensors'} (+ adapter_config.json)")
        if result.metrics.get("val_loss") is not None:
            print(f"final val loss {result.metrics['val_loss']:.4f} (ppl {result.metrics['val_ppl']:.3f})")
    return 130 if result.interrupted else 0
