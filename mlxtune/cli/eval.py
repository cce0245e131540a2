"""`mlxtune eval`: score a split and generate for it, one model or base vs base + adapter; print the summary.

--out follows fsio.check_output (never an input; an existing non-empty dir only with --force), except that a
previous report dir of eval's own (nothing in it but report files) is rewritten in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def register(sub: Any) -> None:
    """Add the `eval` subcommand."""
    from ..eval.metrics import BERTSCORE_ENV

    p = sub.add_parser(
        "eval", help="evaluate a model / adapter: loss, perplexity, bits/byte, BLEU, ROUGE, ...; --compare base vs tuned",
        description="Score a data split (loss, perplexity, bits per byte) and generate for it (BLEU, chrF, ROUGE, "
                    "exact match, BERTScore when available); write report.md, report.json, generations.jsonl "
                    "(and metrics.png with --compare) to --out.")
    p.add_argument("--model", help="base model: a HF model dir or a .gguf file (default: from --adapter's run dir)")
    p.add_argument("--adapter", help="an adapter dir or a training run dir (its config.yaml supplies model and data)")
    p.add_argument("--data", help="a data file (all of it is evaluated) or a dir with train/valid/test files (default: the run's data)")
    p.add_argument("--split", default=None, choices=("train", "valid", "test"),
                   help="which split (default: test, else the run's validation split, said in the output)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per generation (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch for scoring and generation (default 8)")
    p.add_argument("--compare", action="store_true", help="base model without the adapter vs with it, on the same examples")
    p.add_argument("--no-generate", action="store_true", help="only score (loss, perplexity, bits/byte); no generation metrics")
    p.add_argument("--bertscore-model", default=None, help=f"a local encoder dir for BERTScore (or set {BERTSCORE_ENV})")
    p.add_argument("--samples", type=int, default=5, help="side-by-side samples in the report (default 5)")
    p.add_argument("--report-to", default="", metavar="TRACKERS",
                   help="also log the report to tensorboard and/or wandb (comma list), into the run's tracker runs")
    p.add_argument("--out", required=True, help="report dir (report.md, report.json, generations.jsonl, metrics.png)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out that is not an eval report dir")
    p.set_defaults(func=cmd_eval)


def _is_report_dir(out: Path) -> bool:
    """A previous report of eval's own: report.json and nothing but report files."""
    from ..eval.report import holds_only_reports

    return (out / "report.json").is_file() and holds_only_reports(out)


def _check_out(args: argparse.Namespace) -> None:
    """--out before anything loads: not a file, not an input, and not someone else's non-empty dir (--force)."""
    from ..fsio import check_output

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out[:60]}: exists and is not a directory; --out names a report dir")
    inputs = [args.model, args.data]
    if args.adapter:  # the adapter's files: a report dir inside the run dir (RUN/eval) is fine
        a = Path(args.adapter).expanduser()
        inputs += [a / f for f in ("adapters.safetensors", "adapter_config.json", "config.yaml")] if a.is_dir() else [a]
    check_output(out, inputs=inputs, force=args.force or _is_report_dir(out))


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation, print the metrics table to stdout and the report's path to stderr."""
    from ..eval import evaluate, summary

    if args.model is None and args.adapter is None:
        raise ConfigError("pass --model PATH (and --data), or --adapter RUN_DIR of a training run")
    _check_out(args)
    from ..eval.progress import stderr_log
    from ..trackers import check_trackers, log_eval_report

    report_to = [s.strip() for s in (args.report_to or "").split(",") if s.strip()]
    check_trackers(report_to, where="--report-to")  # before anything is loaded
    report = evaluate(args.model, None, args.data, args.adapter, split=args.split, max_examples=args.max_examples,
                      max_tokens=args.max_tokens, batch_size=args.batch_size, compare=args.compare,
                      generate=not args.no_generate, bertscore_model=args.bertscore_model, n_samples=args.samples,
                      out=args.out, log=stderr_log)
    print(summary(report))
    if report_to:
        from ..generation import find_run_config

        cfg = find_run_config(args.adapter) if args.adapter else None
        log_eval_report(report_to, cfg.parent if cfg else Path(args.out), report)
    print(f"report: {Path(args.out) / 'report.md'}", file=sys.stderr)
    return 0
