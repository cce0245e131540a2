"""Publish a run on the Hugging Face Hub: stage a folder with a model card, then upload it.

    push(run, "USER/NAME", what="adapter" | "peft" | "mlx-lm" | "fused" | "gguf", private=False, dry_run=False)

The staged folder holds, for `what`:
- adapter: the run's adapter files as they are (adapters.safetensors + adapter_config.json, mlxtune's format);
- peft:    a PEFT adapter (`exports.export(run, "peft", ...)`), for `PeftModel.from_pretrained`;
- mlx-lm:  an mlx-lm adapter (`exports.export(run, "mlx-lm", ...)`), for `mlx_lm.load(base, adapter_path=...)`;
- fused:   the merged model as a Hugging Face dir (`exports.export(run, "hf", ...)`), for transformers / mlx-lm;
- gguf:    the merged model as GGUF (`exports.export(run, "gguf", ...)`), for llama.cpp;
plus loss.png and the model card, README.md (modelcard.py). When the run's base is a hub model, the adapter
config names it by its hub id (not the local snapshot path), so the published adapter finds its base anywhere.

`dry_run` stages only: into `out`, or a new temp dir that is kept; the result lists the files. Otherwise the
hub is checked first (offline mode, no token: one MlxtuneError saying which, before anything is written), the
folder is staged in a temp dir (or `out`, which is kept), and uploaded with huggingface_hub (`create_repo(...,
exist_ok=True)`, `upload_folder`); the temp dir is removed whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import fsio
from .errors import ConfigError, MlxtuneError
from .hub import is_hub_id
from .modelcard import WHATS, base_hub_id, write_model_card

PathLike = Union[str, os.PathLike]

EXPORT_FORMAT = {"peft": "peft", "mlx-lm": "mlx-lm", "fused": "hf", "gguf": "gguf"}
"The exports.export format that makes each `what` (the adapter is copied as it is)."
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
EXTRA_FILES = ("loss.png",)
COMMIT_MESSAGE = "Upload with mlxtune push"


@dataclass
class PushResult:
    """What `push` staged and where it went."""

    folder: Path
    "The staged folder (removed after an upload unless `out` was given)."
    files: dict[str, int] = field(default_factory=dict)
    "Relative path → size in bytes, of everything staged (what is, or would be, uploaded)."
    repo_id: str = ""
    url: Optional[str] = None
    "The repo's URL after an upload; None for a dry run."
    private: bool = False


# ---------------------------------------------------------------------------------------------------------
# Public API


def push(run: PathLike, repo_id: str, *, what: str = "adapter", private: bool = False, dry_run: bool = False,
         out: Optional[PathLike] = None, report: Optional[PathLike] = None) -> PushResult:
    """Stage `what` from the run dir `run` with a model card and upload it to the hub repo `repo_id` (created if
    missing). `dry_run`: only stage (into `out`, or a kept temp dir). `report`: an eval report.json for the card
    (default: the run's own, see modelcard.find_report)."""
    run = Path(run).expanduser()
    _check_request(run, repo_id, what, out)
    token = None if dry_run else hub_token(repo_id)  # offline / no token: one line, nothing written
    holder = None
    if out is not None:
        folder = Path(out).expanduser()
    else:
        holder = Path(tempfile.mkdtemp(prefix="mlxtune-push-"))
        folder = holder / repo_id.split("/")[-1]
    try:
        stage(run, folder, what=what, repo_id=repo_id, report=report, online=not dry_run)
        result = PushResult(folder=folder, files=list_files(folder), repo_id=repo_id, private=private)
        if not dry_run:
            result.url = upload(folder, repo_id, private=private, token=token)
    except BaseException:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)
        raise
    if holder is not None and not dry_run:
        shutil.rmtree(holder, ignore_errors=True)
    return result


def stage(run: PathLike, folder: PathLike, *, what: str, repo_id: Optional[str] = None,
          report: Optional[PathLike] = None, online: bool = False) -> Path:
    """Build `folder` (new, or empty) holding `what` from `run`, loss.png and README.md; atomically (fsio)."""
    run, folder = Path(run), Path(folder)
    with fsio.atomic_dir(folder) as tmp:
        if what == "adapter":
            for name in ADAPTER_FILES:
                shutil.copy2(run / name, tmp / name)
        else:
            from .exports import export

            export(run, format=EXPORT_FORMAT[what], out=tmp)
        for name in EXTRA_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, tmp / name)
        _name_base_by_hub_id(tmp, what)
        write_model_card(tmp, run_dir=run, what=what, repo_id=repo_id, report=report, online=online)
    return folder


def list_files(folder: PathLike) -> dict[str, int]:
    """Relative path → size in bytes of every file under `folder`, sorted."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def hub_token(repo_id: str) -> str:
    """The Hugging Face token to push with; one MlxtuneError when offline mode is on or there is no token."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise MlxtuneError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it where the hub "
                           f"is reachable, or stage the folder with --dry-run --out DIR and upload it later with "
                           f"`hf upload {repo_id} DIR`")
    token = get_token()
    if not token:
        raise MlxtuneError(f"cannot push to {repo_id}: no Hugging Face token; log in with `hf auth login` (a token "
                           f"with write access) or set HF_TOKEN")
    return token


def upload(folder: PathLike, repo_id: str, *, private: bool = False, token: Optional[str] = None) -> str:
    """Create `repo_id` if missing and upload `folder` as one commit; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=COMMIT_MESSAGE)
    except Exception as e:  # network, auth, permissions: classified in one line
        raise push_error(repo_id, e, api.endpoint) from None
    return str(getattr(repo, "url", None) or f"{api.endpoint}/{repo_id}")


def push_error(repo_id: str, exc: BaseException, endpoint: str) -> MlxtuneError:
    """One line for a failed upload: offline, refused token, no write access, unreachable, or the hub's reason."""
    names = {c.__name__ for c in type(exc).__mro__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    reason = " ".join(str(exc).split())[:200]
    later = f"or stage it with --dry-run --out DIR and upload it later with `hf upload {repo_id} DIR`"
    if "OfflineModeIsEnabled" in names:
        return MlxtuneError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it, {later}")
    if status == 401:
        return MlxtuneError(f"cannot push to {repo_id}: the hub refused the token (401); log in again with "
                            f"`hf auth login` or set HF_TOKEN")
    if status == 403:
        return MlxtuneError(f"cannot push to {repo_id}: the token may not write there (403); use a token with write "
                            f"access to that namespace (`hf auth login`)")
    if status is None and (names & {"ConnectionError", "ConnectError", "Timeout", "TimeoutException", "TimeoutError",
                                    "NetworkError", "TransportError", "OSError"}):
        return MlxtuneError(f"cannot push to {repo_id}: the Hugging Face hub ({endpoint}) is unreachable "
                            f"({type(exc).__name__}: {reason}); check the network or proxy, {later}")
    return MlxtuneError(f"cannot push to {repo_id}: {type(exc).__name__}: {reason}")


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _check_request(run: Path, repo_id: str, what: str, out: Optional[PathLike]) -> None:
    if what not in WHATS:
        raise ConfigError(f"--what: {what!r} is not one of {', '.join(WHATS)}")
    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise ConfigError(f"--repo: {str(repo_id)[:100]!r} is not a hub repo id; expected USER/NAME")
    missing = [name for name in ADAPTER_FILES if not (run / name).is_file()]
    if missing:
        raise ConfigError(f"{run}: not a training run dir (no {', '.join(missing)}); pass the run's output_dir")
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not empty; choose a new dir")


def _name_base_by_hub_id(folder: Path, what: str) -> None:
    """In a staged adapter's config, name a hub base by its id instead of this machine's path to it."""
    path = folder / "adapter_config.json"
    if what not in ("adapter", "peft") or not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if what == "adapter" and isinstance(cfg.get("base_model"), dict):
        hub_id = base_hub_id(str(cfg["base_model"].get("path") or ""))
        if hub_id and hub_id != cfg["base_model"].get("path"):
            cfg["base_model"]["path"] = hub_id
            fsio.write_json(path, cfg)
    elif what == "peft":
        hub_id = base_hub_id(str(cfg.get("base_model_name_or_path") or ""))
        if hub_id and hub_id != cfg.get("base_model_name_or_path"):
            cfg["base_model_name_or_path"] = hub_id
            fsio.write_json(path, cfg)


__all__ = ["push", "stage", "upload", "hub_token", "push_error", "list_files", "PushResult"]
