"""Hugging Face hub: the one hub-id pattern, the files fetched, downloads, and their errors in one line.

Models are fetched as safetensors, JSON and tokenizer files only (`MODEL_FILES`: no pickles, no code);
datasets as JSON / JSONL / Parquet (`DATA_FILES`). Everything goes to the standard Hugging Face cache, so an
interrupted download resumes and a cached repo is found offline. huggingface_hub is imported only when used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import ConfigError, DataError, MlxtuneError, ModelLoadError

MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
"allow_patterns for a model repo: config, weights and tokenizer files (no pickles, no code)."
DATA_FILES = ("*.jsonl", "*.json", "*.parquet", "*/*.jsonl", "*/*.json", "*/*.parquet")
"allow_patterns for a dataset repo: JSON, JSONL and Parquet files, at the top level or one dir down."

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(s: Union[str, os.PathLike]) -> bool:
    """Whether `s` has the shape of a hub repo id, `org/name` (says nothing of whether it exists).

    Callers check for a local path first; a string that names an existing file or dir is a path.
    """
    s = str(s)
    return bool(_HUB_ID.fullmatch(s)) and ".." not in s and "--" not in s and len(s) <= 96


def download(
    repo_id: str,
    *,
    repo_type: str = "model",
    allow_patterns: Optional[Sequence[str]] = None,
    local_only: bool = False,
    revision: Optional[str] = None,
) -> Path:
    """The local snapshot dir of `repo_id` (repo_type "model" or "dataset"), downloaded into the Hugging Face
    cache unless `local_only` (then only the cache is searched). `allow_patterns` defaults to MODEL_FILES or
    DATA_FILES. Any failure raises `hub_error(...)`: ModelLoadError for a model, DataError for a dataset."""
    if repo_type not in ("model", "dataset"):
        raise ConfigError(f"download: repo_type {repo_type!r} is not model or dataset")
    if not is_hub_id(repo_id):
        raise ConfigError(f"{repo_id!r} is not a hub id; expected org/name")
    if allow_patterns is None:
        allow_patterns = MODEL_FILES if repo_type == "model" else DATA_FILES
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise _error_class(repo_type)(f"{repo_id}: fetching from the hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        path = snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=list(allow_patterns),
                                 local_files_only=local_only)
    except Exception as e:  # offline, DNS, timeouts, proxies, unknown or gated repos: classified by hub_error
        raise hub_error(repo_id, e, repo_type=repo_type, local_only=local_only) from None
    return Path(path)


def _error_class(repo_type: str) -> type:
    return DataError if repo_type == "dataset" else ModelLoadError


def hub_error(repo_id: str, exc: BaseException, *, repo_type: str = "model", local_only: bool = False) -> MlxtuneError:
    """One line for a failed hub fetch: not cached (local_only), not found, gated, offline or unreachable, each
    with the fix. ModelLoadError for a model, DataError for a dataset."""
    kind = "dataset" if repo_type == "dataset" else "model"
    field = "data.train" if kind == "dataset" else "model.path"
    flag = " --repo-type dataset" if kind == "dataset" else ""
    local = (f"download it where the hub is reachable (`hf download {repo_id}{flag} --local-dir DIR`) and pass the "
             f"local dir: {field}: DIR")
    names = {c.__name__ for c in type(exc).__mro__}
    cls = _error_class(repo_type)
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        constants = None
    cache = getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
    if "GatedRepoError" in names:
        return cls(f"{repo_id}: a gated {kind}; accept its terms on the hub and log in (`hf auth login`), or {local}")
    if names & {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"} and "LocalEntryNotFoundError" not in names:
        return cls(f"{repo_id}: the hub has no accessible {kind} of that name or revision ({type(exc).__name__}); "
                   f"check the id, or log in (`hf auth login`) for a private or gated repo")
    if local_only:
        return cls(f"{repo_id}: not a local path and not in the Hugging Face cache ({cache}); fetch it first "
                   f"(`mlxtune download {'model' if kind == 'model' else 'data'} {repo_id}`) or pass a local dir")
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return cls(f"cannot download {repo_id}: offline mode (HF_HUB_OFFLINE=1) and it is not in the cache ({cache}), "
                   f"so the hub is unreachable from here; unset HF_HUB_OFFLINE, or {local}")
    reason = str(exc).split("\n")[0][:160]
    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    return cls(f"cannot download {repo_id}: the Hugging Face hub ({endpoint}) is unreachable ({type(exc).__name__}: "
               f"{reason}); check the network or proxy and run it again (it resumes), or {local}")
