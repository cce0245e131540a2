"""Portable run dirs: the paths in a run's `config.yaml`, written so that any folder can use the run, and read back.

At train time `portable_config` resolves every local path the config names (model.path, data.train / valid / test,
lora.init_adapter, a .jinja data.template, output_dir) to an absolute path, and stores a path that lies inside the
run dir relative to it, so a run dir moved together with such files keeps working; hub ids are left as they are.

Every command that takes `--adapter RUN` reads the run through `run_config`: a relative path is looked up against
the run dir first, then (run dirs written before paths were made absolute held paths relative to the folder
training ran in) against that folder (the run dir minus the recorded output_dir), the current dir and the run dir's
parent. A base model that is nowhere is one line naming config.yaml, the recorded path and `--model PATH`;
`model=` (the CLI's `--model`) replaces the recorded base.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .config import TEMPLATE_CHOICES, Config, load_config
from .errors import ConfigError, ModelLoadError
from . import fsio
from .fsio import write_bytes
from .hub import is_hub_id

PathLike = Union[str, os.PathLike]

PATH_FIELDS = (("model", "path"), ("data", "train"), ("data", "valid"), ("data", "test"), ("lora", "init_adapter"),
               ("data", "template"))
"The (section, key) of every config value that may be a local path."


def _short(s: str, n: int = 60) -> str:
    """A path for a message, cut to `n` characters keeping its end (where the name is)."""
    return fsio.short_path(s, n)


def _is_path_value(section: str, key: str, value: Any) -> bool:
    """Whether a config value is a path to resolve (not empty, not a template name)."""
    if not isinstance(value, str) or not value:
        return False
    return not (section == "data" and key == "template" and value in TEMPLATE_CHOICES)


# ---------------------------------------------------------------------------------------------------------
# Writing (train time)


def portable_config(cfg_dict: dict, run_dir: PathLike) -> dict:
    """A copy of a config dict (Config.to_dict()) with its local paths absolute, or relative to `run_dir` when
    inside it; hub ids (a value with the shape org/name that is no local path) untouched. output_dir becomes the
    run dir's absolute path. Paths resolve against the current dir, as the trainer read them."""
    out = copy.deepcopy(cfg_dict)
    root = Path(os.path.abspath(Path(run_dir).expanduser()))  # abspath, not resolve: a symlink stays as named
    for section, key in PATH_FIELDS:
        node = out.get(section) or {}
        value = node.get(key)
        if not _is_path_value(section, key, value):
            continue
        p = Path(value).expanduser()
        if not p.exists() and is_hub_id(value):
            continue
        p = Path(os.path.abspath(p))
        try:
            node[key] = p.relative_to(root).as_posix() or "."
        except ValueError:
            node[key] = str(p)
    out["output_dir"] = str(root)
    return out


def save_run_config(cfg: Config, run_dir: PathLike) -> Path:
    """Write `run_dir/config.yaml` (atomically) with portable paths; returns its path."""
    path = Path(run_dir) / "config.yaml"
    write_bytes(path, yaml.safe_dump(portable_config(cfg.to_dict(), run_dir), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------
# Reading (generate, chat, eval)


def find_run_config(adapter: PathLike) -> Optional[Path]:
    """The run's config.yaml for a run dir, or for a checkpoint / best dir inside one (run/checkpoints/step_N)."""
    p = Path(adapter).expanduser()
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def _search_dirs(root: Path, output_dir: Any) -> list[Path]:
    """Where a relative path of this run may live: the run dir, the folder training ran in, the cwd, the parent."""
    dirs = [root]
    rec = Path(output_dir) if isinstance(output_dir, str) and output_dir else None
    if rec is not None and not rec.is_absolute():
        parts = [q for q in rec.parts if q not in (".", "")]
        if parts and len(root.parts) > len(parts) and tuple(root.parts[-len(parts):]) == tuple(parts):
            dirs.append(Path(*root.parts[: -len(parts)]))
    dirs += [Path.cwd(), root.parent]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _locate(value: str, dirs: list[Path]) -> Optional[Path]:
    """The first existing `dir / value` (an absolute value: itself when it exists)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    return next((d / p for d in dirs if (d / p).exists()), None)


def resolve_paths(tree: dict, config_path: Path, *, model: Optional[PathLike] = None, require_base: bool = True) -> dict:
    """The config dict with its relative paths resolved (see the module doc); raises ModelLoadError when the
    base model is missing, no `model` replaces it and `require_base`."""
    out = copy.deepcopy(tree)
    root = Path(os.path.abspath(config_path.parent))
    dirs = _search_dirs(root, out.get("output_dir"))
    for section, key in PATH_FIELDS:
        node = out.get(section)
        if not isinstance(node, dict):
            continue
        value = node.get(key)
        if not _is_path_value(section, key, value):
            continue
        found = _locate(value, dirs)
        if found is not None:
            node[key] = str(found)
            continue
        local = Path(value).is_absolute() or not is_hub_id(value)  # else a hub id: fetched (or cached) at load
        if (section, key) == ("model", "path") and model is None and require_base and local:
            raise ModelLoadError(f"{_short(str(config_path), 80)}: model.path {_short(value)!r} does not exist (the base "
                                 f"the run was trained on, as recorded); pass --model PATH to use the base where it is now")
    if model is not None:
        out.setdefault("model", {})["path"] = str(model)
    return out


def run_config(run_dir: PathLike, *, model: Optional[PathLike] = None, require_base: bool = True) -> Config:
    """The Config of a run dir (or of a checkpoint / best dir inside one) with its paths resolved (see the module
    doc); `model` replaces the recorded base; `require_base=False` skips the check that the base exists (the
    caller has the model loaded). ConfigError when there is no config.yaml."""
    cfg_path = find_run_config(run_dir)
    if cfg_path is None:
        raise ConfigError(f"{_short(str(run_dir), 80)}: no config.yaml here (not a training run dir); pass --model PATH "
                          f"with an adapter dir, or the run dir that training wrote")
    try:
        tree = yaml.safe_load(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{_short(str(cfg_path), 80)}: not a readable run config ({type(e).__name__}); the run dir "
                          f"is damaged: pass --model PATH and --data to evaluate without it") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{_short(str(cfg_path), 80)}: expected a mapping of sections (model, lora, data, train, "
                          f"output_dir); the run dir is damaged")
    return load_config(resolve_paths(tree, cfg_path, model=model, require_base=require_base))
