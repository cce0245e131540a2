"""Evaluation: loss, perplexity and bits per byte on a split (scoring.py); BLEU / chrF / ROUGE / exact match /
BERTScore on generations (metrics.py); `evaluate(...)`, the base-vs-tuned report and its files (report.py).

The trainer's validation uses `score(model, batches)` and `generation_metrics(model, tokenizer, examples, ...)`;
the notebook API `mlxtune.evaluate` is `evaluate` here, and `mlxtune eval` (cli/eval.py) calls it.
"""

from __future__ import annotations

from .metrics import (
    BERTSCORE_ENV,
    GenExample,
    bertscore,
    generation_examples,
    generation_metrics,
    predict,
    text_metrics,
)
from .heldout import DataPlan, plan_data
from .report import METRICS, evaluate, load_examples, summary, write_report
from .scoring import bits_per_byte, bpb_fields, loss_fields, nll_sums, perplexity, score, special_token_ids, token_nll

__all__ = [
    "BERTSCORE_ENV",
    "METRICS",
    "DataPlan",
    "GenExample",
    "bertscore",
    "bits_per_byte",
    "bpb_fields",
    "evaluate",
    "generation_examples",
    "generation_metrics",
    "load_examples",
    "loss_fields",
    "nll_sums",
    "perplexity",
    "plan_data",
    "predict",
    "score",
    "special_token_ids",
    "summary",
    "text_metrics",
    "token_nll",
    "write_report",
]
