"""Placeholder: being written (see issues)."""


def register_cli(sub) -> None:
    pass
