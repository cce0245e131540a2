"""Which examples an evaluation scores, decided before any model is loaded.

`plan_data` turns `data` (a file, a dir, a DataConfig, or None: the run's data) and `split` into a DataPlan. A file
is scored whole. Otherwise `split=None` means the test split, or when there is none the run's validation split
(its valid file, or the `data.val_split` fraction training held out of the train file, carved with the run's seed
exactly as training did), said in `DataPlan.note`; a split that does not exist, or nothing held out at all, is one
line before loading. `load_examples` then tokenizes the plan's split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")


@dataclass
class DataPlan:
    """The data to evaluate: its DataConfig, the split, a description for the report, and a note on the choice."""

    cfg: Any  # mlxtune.config.DataConfig
    split: str
    desc: str
    note: Optional[str] = None


def _data_config(data: Any, split: Optional[str], run_config: Any) -> tuple[Any, Optional[str], str]:
    """(DataConfig, split, description) for a path, a DataConfig, or None (the run config's data)."""
    from ..config import DataConfig

    if isinstance(data, DataConfig):
        return data, split, data.train
    base = run_config.data if run_config is not None else DataConfig()
    if data is None:
        if run_config is None or not base.train:
            raise ConfigError("no data: pass data=FILE_OR_DIR (CLI: --data), or an adapter from a run dir whose config.yaml names it")
        return base, split, base.train
    p = Path(data).expanduser()
    if p.is_file():  # one file: evaluate all of it
        return dataclasses.replace(base, train=str(p), valid=None, test=None, val_split=0.0), "train", str(p)
    if p.is_dir():
        return dataclasses.replace(base, train=str(p), valid=None, test=None), split, str(p)
    raise ConfigError(f"data {data}: no such file or directory")


def available_splits(cfg: Any) -> dict[str, str]:
    """The splits `cfg` yields (without tokenizing), each with where it comes from."""
    from ..data import split_sources

    sources = split_sources(cfg)
    out = {s: ", ".join(Path(f).name for f in files) for s, files in sources.items() if files}
    if "valid" not in out and cfg.val_split > 0 and "train" in out:
        out["valid"] = f"{cfg.val_split:g} of the train data held out"
    return out


def plan_data(data: Any, split: Optional[str], run_config: Any, seed: int) -> DataPlan:
    """The DataPlan for `data` and `split` (None: test, else the validation split); see the module doc."""
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of train, valid, test")
    cfg, split, desc = _data_config(data, split, run_config)
    have = available_splits(cfg)
    where = "the run's data" if data is None and run_config is not None else "the data"
    if split is None:
        if "test" in have:
            return DataPlan(cfg, "test", desc)
        if "valid" not in have:
            raise DataError(f"{desc}: nothing held out to score: {where} has no test split and no validation split "
                            f"(data.val_split is 0); pass --data FILE (all of it is scored) or --split train")
        how = have["valid"]
        if "held out" in how:  # carved from train with the seed: the run's own validation split
            how += f" at seed {seed}" + (", as training did" if data is None and run_config is not None else "")
        note = f"note: {desc} has no test split; scoring the validation split instead ({how})"
        return DataPlan(cfg, "valid", desc, note)
    if split not in have:
        others = [s for s in ("test", "valid", "train") if s in have and s != split]
        hint = f"; pass --split {others[0]}" if others else ""
        raise DataError(f"{desc}: {where} has no {split} split{hint}")
    return DataPlan(cfg, split, desc)


def load_examples(data: Any, tokenizer: Any, split: Optional[str], run_config: Any, seed: int,
                  plan: Optional[DataPlan] = None) -> tuple[list, str, int]:
    """(examples, description, max_length) from a path, a DataConfig, or a list of tokenized examples
    (`plan`: the DataPlan already made for them)."""
    if isinstance(data, (list, tuple)):
        return list(data), f"{len(data)} examples given", max((len(e.ids) for e in data), default=2)
    plan = plan or plan_data(data, split, run_config, seed)
    from ..data import load_splits

    splits = load_splits(plan.cfg, tokenizer, seed)
    examples = list(getattr(splits, plan.split))
    if not examples:
        others = [s for s in ("test", "valid", "train") if s != plan.split and getattr(splits, s)]
        hint = f"; pass --split {others[0]}" if others else ""
        raise DataError(f"{plan.desc}: the {plan.split} split is empty{hint}")
    return examples, f"{plan.desc} ({plan.split})", plan.cfg.max_length
