"""Training data: files → records → conversations or text → (ids, loss mask) examples → batches.

Pipeline (one module per stage)
    sources     a JSONL file, a JSON list, a Parquet file, a dir with train/valid/test files, or a hub dataset id;
                one JSON object per line (row), streamed (never the whole file in memory; only regular files;
                no CSV); problems are reported as `file:line: what; how to fix`
    formats     alpaca, sharegpt, messages, completions or text: detected from the first record that has one's
                keys (`data.format: auto`) or forced; every record normalizes to messages [{role, content}]
                (roles system / user / assistant) or to raw text
    templates   the tokenizer's chat template, or a built-in (`alpaca`, `chatml`, `llama3`), or a .jinja file
    encode      `Example(ids, mask)`: mask[i] == 1 when ids[i] is a training target (the loss-mask rules are there)
    cache       tokenized files cached under `$MLXTUNE_CACHE/data`, keyed by content, tokenizer and settings
    splits      `load_splits`: files → examples → train / valid / test, bad records reported per `on_bad_line`
    batching    `make_batches` (length-bucketed or packed), `epoch_order` (seeded, resumable)
    tools       the logic behind `mlxtune data inspect|convert`
    records     the types passed between the stages (Line, Record, BadRecord, Example, FileResult)
"""

from .batching import (
    DEFAULT_ATTENTION_WEIGHT,
    PAD_MULTIPLE,
    Batch,
    attention_weight,
    epoch_order,
    estimated_cost,
    make_batches,
    pack,
    padding_fraction,
)
from .cache import cache_dir, tokenizer_fingerprint
from .encode import Encoder, Rendered, encode_conversation, mask_from_spans
from .formats import (FORMAT_KEYS, ROLES, SHAREGPT_ROLES, detect_format, normalize, parse_lines, parse_stream,
                      to_messages)
from .records import BadRecord, Example, FileResult, Line, Record, skip_text
from .sources import (DATA_SUFFIXES, MAX_RECORD_BYTES, SPLIT_NAMES, check_data_file, data_files, read_lines,
                      resolve_source, split_files, split_sources, train_file)
from .splits import Splits, encode_stream, load_file, load_splits
from .templates import TEMPLATE_DIR, TEMPLATE_TOKENS, builtin_template, resolve_template
from .tools import convert_to_messages, length_stats, read_records, render_marked

__all__ = [
    "BadRecord", "Batch", "DATA_SUFFIXES", "DEFAULT_ATTENTION_WEIGHT", "Encoder", "Example", "FORMAT_KEYS", "FileResult",
    "Line", "MAX_RECORD_BYTES", "PAD_MULTIPLE", "check_data_file", "data_files", "encode_stream", "parse_stream", "ROLES", "Record", "Rendered", "SHAREGPT_ROLES", "SPLIT_NAMES", "Splits", "TEMPLATE_DIR",
    "TEMPLATE_TOKENS", "attention_weight", "builtin_template", "cache_dir", "convert_to_messages", "detect_format",
    "encode_conversation", "epoch_order", "estimated_cost", "length_stats", "load_file", "load_splits",
    "make_batches", "mask_from_spans", "normalize", "pack", "padding_fraction", "parse_lines", "read_lines",
    "read_records", "render_marked", "resolve_source", "resolve_template", "skip_text", "split_files",
    "split_sources", "to_messages", "tokenizer_fingerprint", "train_file",
]
