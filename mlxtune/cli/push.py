"""`mlxtune push RUN --repo USER/NAME`: publish a run's adapter, PEFT adapter, fused model or GGUF with a model
card on the Hugging Face Hub (`--dry-run` stages the folder and lists what would be uploaded)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the `push` subcommand."""
    from ..modelcard import WHATS

    p = sub.add_parser(
        "push", help="upload a run (adapter, PEFT adapter, fused model or GGUF) with a model card to the Hugging Face Hub",
        description="Stage what --what names from RUN with loss.png and a model card (README.md: base model, "
                    "license, training, eval results of the run's report.json, how to load it) and upload it to "
                    "the hub repo --repo (created if missing). Needs a token (`hf auth login` or HF_TOKEN).")
    p.add_argument("run", metavar="RUN", help="a training run dir (its output_dir)")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the hub model repo to upload to")
    p.add_argument("--what", default="adapter", choices=WHATS,
                   help="adapter: the run's adapter files (default); peft / mlx-lm: the adapter in that format; "
                        "fused: the merged model (HF dir); gguf: the merged model for llama.cpp")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--dry-run", action="store_true", help="only stage the folder and list what would be uploaded")
    p.add_argument("--out", metavar="DIR", help="stage into DIR (new or empty) and keep it (default: a temp dir)")
    p.add_argument("--report", metavar="PATH", help="an eval report.json (or its dir) for the card (default: the run's)")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    """Push (or stage) and print the files with their sizes, then where they went."""
    from ..publish import push

    result = push(args.run, args.repo, what=args.what, private=args.private, dry_run=args.dry_run, out=args.out,
                  report=args.report)
    total = sum(result.files.values())
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(result.files)} files ({_size(total)}) to {args.repo}" + (" (private)" if args.private else "") + ":")
    for name, size in result.files.items():
        print(f"  {size:>12,}  {name}")
    if args.dry_run:
        print(f"staged in {result.folder}; upload it with `mlxtune push {args.run} --repo {args.repo}` "
              f"or `hf upload {args.repo} {result.folder}`")
    else:
        print(f"url: {result.url}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
