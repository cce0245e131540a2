"""`mlxtune data inspect|convert`: arguments → mlxtune.data → printed output.

    mlxtune data inspect PATH [--tokenizer SOURCE]    a rendered example with its trained tokens, length statistics
    mlxtune data convert PATH --to messages --out F   rewrite alpaca / sharegpt / completions as messages JSONL

PATH is a JSONL / JSON / Parquet file or a dir: a dir's every split (train, valid, test) is shown, or converted
into `--out DIR/<split>.jsonl`. `--tokenizer` takes any model source: a Hugging Face dir, a .gguf file, a run dir
(its config.yaml's model.path) or a hub id; only the tokenizer is loaded, never the weights. Both commands exit 2
when a file has no usable record. CSV is refused ("CSV is not supported: use JSON, JSONL or Parquet").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import DATA_FORMATS, DataConfig
from ..errors import DataError

TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "*.tiktoken", "*.jinja", "chat_template.json", "config.json")
"The files a hub id's tokenizer needs (no weights are fetched)."


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect or convert training data", description="Inspect or convert training data.")
    dsub = data.add_subparsers(dest="data_command", metavar="{inspect,convert}")
    data.set_defaults(func=lambda args: data.error("give a subcommand: inspect or convert"))

    ins = dsub.add_parser("inspect", help="show a rendered example with its trained tokens, and length statistics",
                          description="Show how records render and which tokens are trained, with length statistics.")
    ins.add_argument("file", help="a JSONL/JSON/Parquet file, a dir with train/valid/test files, or a hub dataset id")
    ins.add_argument("--tokenizer", help="a model source: Hugging Face dir, .gguf file, run dir or hub id "
                                         "(without it: records only, no tokens)")
    ins.add_argument("--template", default="auto", help="auto, tokenizer, alpaca, chatml, llama3 or a .jinja file")
    ins.add_argument("--format", default="auto", choices=("auto",) + DATA_FORMATS)
    ins.add_argument("--system-prompt", default=None)
    ins.add_argument("--max-length", type=int, default=DataConfig.max_length)
    ins.add_argument("--train-on", default="responses", choices=("responses", "all"))
    ins.add_argument("--on-bad-line", default="skip", choices=("skip", "error"), help="default: skip (and count)")
    ins.add_argument("--index", type=int, default=0, help="first example to show")
    ins.add_argument("-n", "--show", type=int, default=1, help="how many examples to show")
    ins.add_argument("--batch-size", type=int, default=4, help="for the padding estimate")
    ins.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    ins.set_defaults(func=cmd_inspect)

    conv = dsub.add_parser("convert", help="rewrite a data file as OpenAI-style messages JSONL",
                           description="Rewrite alpaca / sharegpt / completions / messages records as messages JSONL.")
    conv.add_argument("file", help="a data file, or a dir (every split is converted into --out DIR/<split>.jsonl)")
    conv.add_argument("--to", default="messages", choices=("messages",))
    conv.add_argument("--out", required=True, help="output .jsonl (a dir for a dir input), written atomically")
    conv.add_argument("--force", action="store_true", help="replace an existing --out")
    conv.add_argument("--format", default="auto", choices=("auto",) + DATA_FORMATS)
    conv.add_argument("--system-prompt", default=None, help="add this system turn where a record has none")
    conv.add_argument("--on-bad-line", default="error", choices=("error", "skip"))
    conv.set_defaults(func=cmd_convert)


def load_tokenizer(source: str, _from_run: bool = False) -> Any:
    """The tokenizer of any model source (--tokenizer): a HF dir, a .gguf file, a run dir or a hub id."""
    from ..data.sources import short_path
    from ..hub import download, is_hub_id
    from ..tokenizer import TOKENIZER_FILES
    from ..tokenizer import load_tokenizer as load_dir

    p = Path(source).expanduser()
    where = f"--tokenizer {short_path(source)}"
    if p.is_dir() and (p / "config.yaml").is_file() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        if _from_run:
            raise DataError(f"{where}: a run dir whose model is another run dir; pass the base model")
        return load_tokenizer(_run_model_path(p), _from_run=True)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from ..gguf import gguf_tokenizer

        return gguf_tokenizer(p)
    if p.is_dir():
        return load_dir(p)
    if p.exists():
        raise DataError(f"{where}: not a model dir, .gguf file or run dir")
    if not is_hub_id(source) or source.lower().endswith(".gguf"):
        raise DataError(f"{where}: no such file or dir; pass a Hugging Face model dir, a .gguf file, a run dir or "
                        f"a hub id")
    return load_dir(download(source, allow_patterns=TOKENIZER_PATTERNS))


def _run_model_path(run_dir: Path) -> str:
    """The base model of a run dir (its config.yaml's model.path)."""
    try:
        from ..runs import run_config  # the run-dir reader, where this version has it
    except ImportError:
        from ..generation import run_config_of as run_config
    cfg = run_config(run_dir)
    path = cfg.model.path if cfg is not None else None
    if not path:
        raise DataError(f"--tokenizer {run_dir}: the run's config.yaml has no model.path; pass the base model")
    if not Path(path).expanduser().is_absolute() and not Path(path).expanduser().exists():
        path = str(run_dir / path)  # stored relative to the run dir
    return str(path)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..data.sources import data_files

    cfg = DataConfig(train=args.file, format=args.format, template=args.template, system_prompt=args.system_prompt,
                     max_length=args.max_length, train_on=args.train_on, on_bad_line=args.on_bad_line, cache=False)
    files = data_files(args.file)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for k, (split, paths) in enumerate(files.items()):
        for path in paths:
            if split:
                print(f"{'' if k == 0 else chr(10)}=== {split}: {path} ===")
            if tokenizer is None:
                _inspect_records(args, cfg, path)
            else:
                _inspect_examples(args, cfg, path, tokenizer, color)
    if tokenizer is None:
        print("\npass --tokenizer MODEL (a model dir, .gguf, run dir or hub id) to see tokens, the loss mask and "
              "token lengths")
    return 0


def _inspect_records(args: argparse.Namespace, cfg: DataConfig, path: Path) -> None:
    """Without a tokenizer: the records as normalized, their lengths in characters, what was skipped."""
    from ..data import length_stats, read_records, skip_text
    from ..data.tools import normalized

    view = read_records(path, cfg.format, index=args.index, show=args.show)
    if not view.records:
        raise DataError(f"{path}: the file has no records")
    if view.first_bad is not None and cfg.on_bad_line == "error":
        l, e = view.first_bad
        raise DataError(f"{l.where}: {e.detail}{'; ' + e.fix if e.fix else ''}, or pass --on-bad-line skip")
    if not view.lengths:
        raise DataError(f"{path}: no usable records ({skip_text(view.skipped)}); fix the records (format "
                        f"{cfg.format}, detected {view.format})")
    print(f"{path}: {view.records} records, format {view.format}")
    for l, r in view.good:
        print(f"\n--- record {l.label} (normalized) ---")
        print(json.dumps(normalized(r), ensure_ascii=False, indent=2))
    print(f"\nlengths (characters): {length_stats(view.lengths)}")
    print(f"skipped: {skip_text(view.skipped) if view.skipped else 'none'}")


def _inspect_examples(args: argparse.Namespace, cfg: DataConfig, path: Path, tokenizer: Any, color: bool) -> None:
    """With a tokenizer: examples with trained tokens marked, token lengths, truncation and padding."""
    from ..data import length_stats, load_file, render_marked, skip_text
    from ..data.tools import padding_fractions
    from ..tokenizer import pad_id

    r = load_file(path, cfg, tokenizer, use_cache=False)  # no usable example: DataError (exit 2)
    print(f"{path}: {r.records} records, format {r.format}, template {r.template}, tokenizer {args.tokenizer}")
    legend = "trained tokens in green" if color else "trained tokens inside [[ ]]"
    for k in range(args.index, min(args.index + args.show, len(r.examples))):
        ex = r.examples[k]
        print(f"\n--- example {k}: {len(ex.ids)} tokens, {sum(ex.mask)} trained ({legend}) ---")
        print(render_marked(ex, tokenizer, color))
    lengths = [len(e.ids) for e in r.examples]
    trained = sum(sum(e.mask) for e in r.examples)
    print(f"\nexamples: {len(r.examples)} of {r.records} records; lengths (tokens): {length_stats(lengths)}")
    print(f"tokens: {sum(lengths):,}, trained: {trained:,} ({trained / max(1, sum(lengths)):.1%})")
    print(f"truncated to max_length={args.max_length}: {r.truncated} of {len(r.examples)}")
    print(f"skipped: {skip_text(r.skipped) if r.skipped else 'none'}")
    fr = padding_fractions(r.examples, args.batch_size, args.max_length, pad_id(tokenizer))
    print(f"padding at batch_size {args.batch_size}: packed {fr[True]:.1%}, length-bucketed {fr[False]:.1%}")


def cmd_convert(args: argparse.Namespace) -> int:
    from ..data import skip_text
    from ..data.sources import data_files, resolve_source
    from ..data.tools import convert_splits, convert_to_messages
    from ..data.sources import short_path
    from ..errors import DiskError
    from ..fsio import check_output, describe_os_error

    files = data_files(args.file)
    out = check_output(args.out, inputs=[resolve_source(args.file)], force=args.force)
    kw = dict(fmt=args.format, system_prompt=args.system_prompt, on_bad_line=args.on_bad_line)
    if "" in files and out.is_dir():
        raise DataError(f"--out {short_path(args.out)}: is a directory; name the output .jsonl file")
    try:
        if "" in files:
            (path,) = files[""]
            done = {str(out): (path, convert_to_messages(path, out, overwrite=args.force, **kw))}
        else:
            res = convert_splits(files, out, overwrite=args.force, **kw)
            done = {str(out / f"{split}.jsonl"): (files[split][0].parent, c) for split, c in res.items()}
    except OSError as e:  # nothing was left behind: the temp file or dir is removed
        raise DiskError(describe_os_error(e, out)) from None
    for target, (path, c) in done.items():
        if c.skipped:
            print(f"warning: {path}: skipped {sum(map(len, c.skipped.values()))} records: {skip_text(c.skipped)}",
                  file=sys.stderr)
        print(f"wrote {c.rows} records to {target} ({c.format} → messages)")
    return 0
