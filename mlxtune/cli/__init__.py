"""The `mlxtune` command: parse, resolve the config, call the Python API. No training logic lives here.

All argument parsing lives in this package, one module per command group, each with a `register(subparsers)`
that adds its subcommands and sets `func=handler` (and `accepts_overrides=True` for commands that take
`--section.key value` config overrides). Handlers turn arguments into API calls and print the results; the library
modules they call neither parse arguments nor print usage.
Errors in the user's input (MlxtuneError) print one line, `error: ...`, and exit with code 2; so do argument
errors, through `Parser` (every subparser is one): `error: train: the following arguments are required:
-c/--config (see mlxtune train --help)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import NoReturn, Optional, Sequence

from ..errors import EXIT_USER_ERROR, MlxtuneError, did_you_mean

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


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line in the house format, exit 2, instead of usage + message.

    Each parser records itself as the `cli_parser` default, so the innermost subcommand's parser is at hand
    after parsing (a subparser's defaults win) to report arguments nobody took."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_defaults(cli_parser=self)

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("mlxtune").strip()
        where = f"{command}: " if command else ""
        print(f"error: {where}{_bounded(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _bounded(message: str) -> str:
    """argparse's message on one line with each quoted user value cut to 60 characters, and a did-you-mean for an
    invalid choice."""
    message = re.sub(r"'([^']{57})[^']+'", r"'\1...'", " ".join(message.split()))
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
    return message if len(message) <= 400 else message[:397] + "..."


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="mlxtune",
        description="LoRA fine-tuning for Llama 3.x and Qwen2/2.5 on MLX: train, resume, evaluate, fuse, export.",
    )
    parser.add_argument("--version", action="version", version=f"mlxtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not argv:
        parser.print_help()
        sys.exit(0)
    if not getattr(args, "func", None):
        parser.error(f"unrecognized arguments: {' '.join(extra)}; give a command first" if extra else "give a command")
    if extra and not getattr(args, "accepts_overrides", False):
        args.cli_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from ..callbacks import signals_interrupt
    from ..fsio import describe_os_error

    try:
        with signals_interrupt():  # SIGTERM / SIGHUP end any command as Ctrl-C does (temps removed, 143 / 129)
            code = args.func(args)
    except MlxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:  # a file-system failure no command turned into its own message: still one line
        print(f"error: {describe_os_error(e, '.', 'running ' + str(args.command))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as e:  # Ctrl-C, or a signal (callbacks.Stopped carries 128 + its number)
        print("interrupted", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
