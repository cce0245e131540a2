"""The `mlxtune` command: parse, resolve the config, call the Python API. No training logic lives here.

All argument parsing lives in this package, one module per command group, each with a `register(subparsers)`
that adds its subcommands and sets `func=handler` (and `accepts_overrides=True` for commands that take
`--section.key value` config overrides). Handlers turn arguments into API calls and print the results; the library
modules they call neither parse arguments nor print usage.
Errors in the user's input (MlxtuneError) print one line, `error: ...`, and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from ..errors import EXIT_USER_ERROR, MlxtuneError

# Modules that contribute subcommands, in the order `mlxtune --help` lists them.
COMMAND_MODULES = (
    "mlxtune.cli.train",  # train
    "mlxtune.cli.eval",  # eval
    "mlxtune.cli.generate",  # generate, chat
    "mlxtune.cli.export",  # fuse, export
    "mlxtune.cli.data",  # data inspect|convert
    "mlxtune.cli.tools",  # estimate, doctor, download
    "mlxtune.cli.push",  # push
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="mlxtune",
        description="LoRA fine-tuning for Llama 3.x and Qwen2/2.5 on MLX: train, resume, evaluate, fuse, export.",
    )
    parser.add_argument("--version", action="version", version=f"mlxtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(EXIT_USER_ERROR if argv else 0)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        code = args.func(args)
    except MlxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
