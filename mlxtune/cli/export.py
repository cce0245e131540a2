"""Stub: the owner of this command group moves its argparse code and handlers here (issue #14)."""

from ..export import register_cli as register  # noqa: F401
