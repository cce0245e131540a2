"""`mlxtune fuse` and `mlxtune export`: arguments → exports.py → one line saying what was written.

    mlxtune fuse RUN_DIR --out DIR [--base PATH] [--quantize-bits N [--group-size G]] [--force]
    mlxtune export RUN_DIR --format hf|peft|mlx-lm|gguf|hf-base --out DIR [--base PATH] [--outtype f16|q8_0] [--force]
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import EXPORT_FORMATS, GGUF_OUTTYPES
from ..errors import ExportError


def register(sub: Any) -> None:
    """Add the `fuse` and `export` subcommands."""
    p = sub.add_parser(
        "fuse",
        help="merge a run's LoRA adapter into its base model (a float HF dir)",
        description="Merge the adapter of RUN_DIR (or any mlxtune / PEFT / mlx-lm adapter dir) into its base "
        "model and save a Hugging Face dir. Float by default; --quantize-bits re-quantizes the fused model.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run dir or adapter dir")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir (must not exist or be empty, unless --force)")
    p.add_argument("--base", metavar="PATH", help="base model (default: the path recorded in adapter_config.json)")
    p.add_argument("--quantize-bits", type=int, metavar="N", help="re-quantize the fused model to N bits (4 or 8)")
    p.add_argument("--group-size", type=int, metavar="G", help="quantization group size with --quantize-bits (default 64)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_fuse)

    e = sub.add_parser(
        "export",
        help="export an adapter as a fused HF dir, a PEFT or mlx-lm adapter, or GGUF",
        description="Export the adapter of RUN_DIR (or any mlxtune / PEFT / mlx-lm adapter dir).",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="run dir or adapter dir")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="hf: fused model; peft / mlx-lm: adapter (+ base/ when the base is a GGUF); gguf: fused "
                   "model for llama.cpp; hf-base: the dequantized base model as a Hugging Face dir")
    e.add_argument("--out", required=True, metavar="DIR", help="output dir (gguf: a dir, or a file ending in .gguf)")
    e.add_argument("--base", metavar="PATH", help="base model (default: the path recorded in adapter_config.json)")
    e.add_argument("--outtype", choices=GGUF_OUTTYPES, help="GGUF weight type (default f16)")
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.set_defaults(func=run_export)


def run_fuse(args: argparse.Namespace) -> int:
    """`mlxtune fuse`: merge and save; prints where the fused model went."""
    from ..exports import fuse

    if args.group_size is not None and args.quantize_bits is None:
        raise ExportError("--group-size applies only with --quantize-bits (the fused model is float otherwise)")
    q = None if args.quantize_bits is None else {"bits": args.quantize_bits, "group_size": args.group_size or 64}
    out = fuse(args.run_dir, args.out, base=args.base, quantize=q, force=args.force)
    print(f"wrote fused model to {out}" + (f" ({args.quantize_bits}-bit)" if q else ""))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """`mlxtune export`: convert or fuse; prints what was written."""
    from ..exports import describe_export, export

    out = export(args.run_dir, args.format, args.out, base=args.base, outtype=args.outtype, force=args.force)
    print(describe_export(args.format, out))
    return 0
