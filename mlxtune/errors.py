"""User-facing errors.

Every problem caused by the user's input (a config key, a data line, a model dir, an adapter) is raised as an
`MlxtuneError` whose message is one line naming where (file, line, field) and what, ideally with the fix.
The CLI prints it as `error: <message>` and exits with code 2; the Python API lets it propagate.
Internal invariants use `assert`.
"""

from __future__ import annotations

import difflib
from typing import Iterable

EXIT_USER_ERROR = 2


class MlxtuneError(Exception):
    """A problem with the user's input; the message is one line that says where, what and how to fix it."""

    def __init__(self, message: str):
        # Keep the promise of one line even when a caller formats a multi-line message.
        super().__init__(" ".join(str(message).split("\n")).strip())


class ConfigError(MlxtuneError):
    """Bad configuration: unknown key, wrong type, invalid value."""


class DataError(MlxtuneError):
    """Bad training data: a malformed line, an unknown role, an empty dataset."""


class ModelLoadError(MlxtuneError):
    """A model dir or file that cannot be loaded: missing or mis-shaped weights, bad config.json."""


class AdapterError(MlxtuneError):
    """An adapter that does not fit the base model, or is missing files."""


class CheckpointError(MlxtuneError):
    """A checkpoint that cannot be written or resumed from."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""


class OutputExistsError(MlxtuneError):
    """An output path that already exists and was not ours to replace (pass --force / overwrite=True)."""


class DiskError(MlxtuneError):
    """A write that failed in the file system (full disk, read-only dir, missing parent): names the path and the fix."""


class ExportError(MlxtuneError):
    """A bad export request: unknown format or outtype, an existing --out, a model GGUF cannot hold."""
