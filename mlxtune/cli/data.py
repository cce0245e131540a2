"""`mlxtune data inspect|convert`: arguments → mlxtune.data → printed output.

    mlxtune data inspect FILE [--tokenizer DIR]       a rendered example with its trained tokens, length statistics
    mlxtune data convert FILE --to messages --out F   rewrite alpaca / sharegpt / completions as messages JSONL
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import DATA_FORMATS, DataConfig
from ..errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect or convert training data", description="Inspect or convert training data.")
    dsub = data.add_subparsers(dest="data_command", metavar="{inspect,convert}")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    ins = dsub.add_parser("inspect", help="show a rendered example with its trained tokens, and length statistics",
                          description="Show how records render and which tokens are trained, with length statistics.")
    ins.add_argument("file", help="a JSONL/JSON/Parquet file, a dir with train.jsonl, or a hub dataset id")
    ins.add_argument("--tokenizer", help="a Hugging Face model/tokenizer dir (without it: records only, no tokens)")
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
    conv.add_argument("file")
    conv.add_argument("--to", default="messages", choices=("messages",))
    conv.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    conv.add_argument("--format", default="auto", choices=("auto",) + DATA_FORMATS)
    conv.add_argument("--system-prompt", default=None, help="add this system turn where a record has none")
    conv.add_argument("--on-bad-line", default="error", choices=("error", "skip"))
    conv.set_defaults(func=cmd_convert)


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer from a local dir (or a model id in the local cache), for --tokenizer."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise DataError(f"--tokenizer {name}: cannot load a tokenizer from it ({type(e).__name__}); give a Hugging "
                        f"Face model dir with tokenizer.json / tokenizer_config.json") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..data import train_file

    cfg = DataConfig(train=args.file, format=args.format, template=args.template, system_prompt=args.system_prompt,
                     max_length=args.max_length, train_on=args.train_on, on_bad_line=args.on_bad_line, cache=False)
    path = train_file(args.file)
    if args.tokenizer is None:
        _inspect_records(args, cfg, path)
    else:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        _inspect_examples(args, cfg, path, color)
    return 0


def _inspect_records(args: argparse.Namespace, cfg: DataConfig, path: Path) -> None:
    """Without a tokenizer: the records as normalized, their lengths in characters, what was skipped."""
    from ..data import length_stats, read_records, skip_text
    from ..data.tools import char_length, normalized

    view = read_records(path, cfg.format)
    print(f"{path}: {view.records} records, format {view.format}")
    for l, r in view.good[args.index : args.index + args.show]:
        print(f"\n--- record {l.label} (normalized) ---")
        print(json.dumps(normalized(r), ensure_ascii=False, indent=2))
    chars = [char_length(r) for _, r in view.good]
    if chars:
        print(f"\nlengths (characters): {length_stats(chars)}")
    print(f"skipped: {skip_text(view.skipped) if view.skipped else 'none'}")
    print("pass --tokenizer DIR to see tokens, the loss mask and token lengths")


def _inspect_examples(args: argparse.Namespace, cfg: DataConfig, path: Path, color: bool) -> None:
    """With a tokenizer: examples with trained tokens marked, token lengths, truncation and padding."""
    from ..data import length_stats, load_file, render_marked, skip_text
    from ..data.tools import padding_fractions
    from ..tokenizer import pad_id

    tokenizer = load_tokenizer(args.tokenizer)
    r = load_file(path, cfg, tokenizer, use_cache=False)
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
    from ..data import convert_to_messages, skip_text, train_file

    path = train_file(args.file)
    out = Path(args.out)
    res = convert_to_messages(path, out, fmt=args.format, system_prompt=args.system_prompt, on_bad_line=args.on_bad_line)
    if res.skipped:
        print(f"warning: {path}: skipped {sum(map(len, res.skipped.values()))} records: {skip_text(res.skipped)}",
              file=sys.stderr)
    print(f"wrote {res.rows} records to {out} ({res.format} → messages)")
    return 0
