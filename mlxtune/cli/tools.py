"""`mlxtune estimate`, `mlxtune doctor` and `mlxtune download`: arguments → memory.py / doctor.py / hub.py → output.

    mlxtune estimate -c CONFIG [--section.key value ...]   peak memory of a training step, from the config alone
    mlxtune doctor [-c CONFIG]                              Python, MLX, backend, memory, BLAS, write access, extras
    mlxtune download model|data ID [--revision R]           hub → the standard Hugging Face cache (safe files only)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError

SAFE_SUFFIXES = (".json", ".safetensors", ".model", ".tiktoken", ".txt", ".jinja", ".gguf", ".jsonl", ".parquet")
"--include patterns must end in one of these: file types that cannot run code when read."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="predict peak training memory from a config (no weights loaded)",
                       description="Predict the peak memory of a training step from the config alone: config.json or "
                                   "GGUF metadata, micro-batches of train.batch_size x data.max_length. Overrides work "
                                   "as for train: --train.batch_size 2 --train.grad_checkpoint true")
    p.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=run_estimate, accepts_overrides=True)

    d = sub.add_parser("doctor", help="check Python, MLX, backend, memory, BLAS speed, write access and extras",
                       description="Check the environment; each line is ok, warn or fail with the fix. Exit code 1 "
                                   "when something fails.")
    d.add_argument("-c", "--config", help="also check this config's output_dir")
    d.add_argument("--output-dir", help="the output dir to check (default: runs/)")
    d.add_argument("--no-blas", action="store_true", help="skip the matmul speed test")
    d.set_defaults(func=run_doctor)

    dl = sub.add_parser("download", help="fetch a model or dataset into the Hugging Face cache (safe files only)",
                        description="Download into the standard Hugging Face cache with progress; an interrupted "
                                    "download resumes. Models: safetensors, JSON and tokenizer files only (never "
                                    "pickles or code). Data: JSON, JSONL and Parquet files.")
    dl.add_argument("kind", choices=("model", "data"))
    dl.add_argument("id", metavar="ID", help="hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    dl.add_argument("--include", action="append", default=[], metavar="PATTERN",
                    help="also fetch files matching PATTERN (e.g. '*Q8_0.gguf'); safe file types only")
    dl.set_defaults(func=run_download)


def estimate_table(est) -> list[str]:
    """The breakdown of a MemoryEstimate, one term a line, and the peak."""
    from ..memory import format_bytes

    n = est.notes
    rows = [
        ("weights", est.weights, n.get("weights", "")),
        ("LoRA parameters", est.lora, n.get("lora", "float32")),
        ("AdamW state", est.optimizer, "m and v, float32"),
        ("gradients", est.gradients, "accumulator + this step's"),
        ("activations", est.activations, n.get("activations", "")),
        ("backward temporaries", est.backward, "one layer's cotangents and attention gradients"),
        ("logits / loss", est.logits, n.get("logits", "")),
    ]
    if est.eval_kv:
        rows.append(("eval KV cache", est.eval_kv, n.get("eval_kv", "")))
    out = [f"  {name:<22}{format_bytes(v):>10}   {note}" for name, v, note in rows]
    out.append(f"  {'peak (estimated)':<22}{format_bytes(est.total):>10}   "
               + ("training step" if est.train_peak >= est.eval_peak else "evaluation with generation"))
    return out


def run_estimate(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..memory import advice, available_memory, backend, config_shapes, estimate, format_bytes, model_spec

    cfg = load_config(args.config, args.overrides)
    est = estimate(cfg)
    budget, where = available_memory()
    if args.json:
        print(json.dumps({**est.to_dict(), "available": budget, "available_source": where}, indent=2))
        return 0
    print(f"model       {cfg.model.path} ({est.notes.get('weights', '')})")
    print(f"micro-batch {est.batch_size} x {est.length} positions ({'packed rows' if est.packed else 'padded'}), "
          f"grad checkpointing {'on' if est.grad_checkpoint else 'off'}")
    for line in estimate_table(est):
        print(line)
    if budget is not None:
        print(f"available   {format_bytes(budget)} ({where}): {'fits' if est.total <= budget else 'does NOT fit'}")
        if est.total > budget:
            spec = model_spec(cfg.model.path, cfg.model.dtype, cfg.model.quantize)
            print(f"            {advice(cfg, spec, config_shapes(cfg), budget)}")
    print("(an estimate, +-15%; `train.memory_guard` checks it again with the real batches before training)")
    if backend() == "cuda":
        print("note: calibrated on MLX's CPU backend; on CUDA (an H100) measured peaks ran 1.1-1.6x this estimate, "
              "most with gradient checkpointing: leave headroom")
    return 0


def check_line(c) -> str:
    """`status name detail — fix: ...` (the fix only when the status is not ok)."""
    fix = f" — fix: {c.fix}" if c.fix and c.status != "ok" else ""
    return f"{c.status:<5} {c.name:<14} {c.detail}{fix}"


def run_doctor(args: argparse.Namespace) -> int:
    from ..doctor import run_checks

    out = args.output_dir
    if args.config:
        from ..config import load_config

        out = load_config(args.config).output_dir
        out = str(Path(out).parent if Path(out).name else out)
    checks = run_checks(out, blas=not args.no_blas)
    for c in checks:
        print(check_line(c))
    failed = [c for c in checks if c.status == "fail"]
    print(f"{len(failed)} failed, {sum(c.status == 'warn' for c in checks)} warnings")
    return 1 if failed else 0


def run_download(args: argparse.Namespace) -> int:
    from .. import hub

    repo_id = args.id
    if Path(repo_id).expanduser().exists():
        raise ConfigError(f"{repo_id}: already a local path; use it directly (model.path / data.train: {repo_id})")
    for pat in args.include:
        if not pat.lower().endswith(SAFE_SUFFIXES):
            raise ConfigError(f"--include {pat!r}: only {', '.join(SAFE_SUFFIXES)} files are fetched "
                              "(pickles and code can run arbitrary code)")
    model = args.kind == "model"
    patterns = list(hub.MODEL_FILES if model else hub.DATA_FILES) + list(args.include)
    path = hub.download(repo_id, repo_type="model" if model else "dataset", allow_patterns=patterns,
                        revision=args.revision)
    field = "model.path" if model else "data.train"
    print(f"downloaded {repo_id} to {path}")
    print(f"use it as {field}: {repo_id} (resolved from the cache, also offline) or {field}: {path}")
    return 0
