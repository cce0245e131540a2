"""Generation metrics: greedy completions of held-out prompts compared with their references.

An example's prompt is its ids up to the last run of target tokens (the final assistant turn, after every
earlier turn) and its reference is that run, up to its end-of-turn token, decoded. Generation is batched
(generation.generate_batch) and deterministic. Scores are on a 0-100 scale: BLEU and chrF are sacrebleu's
corpus-level scores; ROUGE-1/2/L are the mean per-example F1 of rouge-score with Porter stemming, x100; exact
match is the percentage of predictions equal to their reference after trimming and collapsing whitespace.
BERTScore (F1 x100) is computed only when `bert_score` and torch are installed and a local scorer model is
given; otherwise it is reported as unavailable, with the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import mlx.nn as nn

from ..generation import generate_batch
from ..tokenizer import stop_token_ids, unwrap

BERTSCORE_ENV = "MLXTUNE_BERTSCORE_MODEL"


@dataclass
class GenExample:
    """A held-out prompt (token ids, ending where the model should start answering) and its reference text."""

    prompt_ids: list[int]
    reference: str


def generation_examples(examples: Sequence[Any], tokenizer: Any, stop_ids: Optional[set[int]] = None) -> list[GenExample]:
    """Split tokenized examples (`.ids`, `.mask`) into prompt and reference: the reference is the last run of
    target tokens (mask == 1) up to its first stop token; the prompt is everything before it. Examples with no
    target run or no prompt before it (e.g. plain text) are left out."""
    tok = unwrap(tokenizer)
    stops = set(stop_token_ids(tokenizer)) if stop_ids is None else stop_ids
    out = []
    for ex in examples:
        ids, mask = (list(ex.ids), list(ex.mask)) if hasattr(ex, "ids") else (list(ex[0]), list(ex[1]))
        end = len(mask)
        while end > 0 and not mask[end - 1]:
            end -= 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        if end == 0 or start == 0:
            continue
        ref = ids[start:end]
        cut = next((k for k, t in enumerate(ref) if t in stops), len(ref))
        out.append(GenExample(ids[:start], tok.decode(ref[:cut], skip_special_tokens=True).strip()))
    return out


def _normalize(s: str) -> str:
    return " ".join(s.split())


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """BLEU, chrF (sacrebleu, corpus level), ROUGE-1/2/L F1 (rouge-score, stemmed, mean over examples) and
    exact match, all on a 0-100 scale, plus n_examples."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"n_examples": 0}
    preds, refs = list(predictions), list(references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL")}
    for p, r in zip(preds, refs):
        for k, v in scorer.score(r, p).items():
            rouge[k] += v.fmeasure
    return {
        "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
        **{k: 100.0 * v / n for k, v in rouge.items()},
        "exact_match": 100.0 * sum(_normalize(p) == _normalize(r) for p, r in zip(preds, refs)) / n,
        "n_examples": n,
    }


def bertscore(predictions: Sequence[str], references: Sequence[str], scorer_model: Optional[str] = None) -> dict:
    """{"available": True, "f1", "precision", "recall", "model"} (x100), or {"available": False, "reason"}.

    Needs `bert_score` and torch (pip install 'mlxtune[bertscore]') and a local scorer model dir (argument, or
    the MLXTUNE_BERTSCORE_MODEL environment variable): nothing is downloaded, and nothing is made up.
    """
    scorer_model = scorer_model or os.environ.get(BERTSCORE_ENV)
    try:
        import bert_score  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return {"available": False, "reason": f"{e.name} is not installed (pip install 'mlxtune[bertscore]')"}
    if not scorer_model:
        return {"available": False,
                "reason": f"no local scorer model: pass --bertscore-model DIR (or set {BERTSCORE_ENV}) to a local encoder such as roberta-large"}
    d = Path(scorer_model)
    if not (d / "config.json").is_file():
        return {"available": False, "reason": f"{d}: not a local model dir (no config.json)"}
    from bert_score import score as bs_score
    from bert_score.utils import model2layers

    n_layers = model2layers.get(d.name) or json.loads((d / "config.json").read_text()).get("num_hidden_layers")
    P, R, F = bs_score(list(predictions), list(references), model_type=str(d), num_layers=n_layers, verbose=False)
    return {"available": True, "model": str(d), "num_layers": n_layers, "precision": 100.0 * float(P.mean()),
            "recall": 100.0 * float(R.mean()), "f1": 100.0 * float(F.mean())}


def predict(model: nn.Module, tokenizer: Any, gen_examples: Sequence[GenExample], *, max_tokens: int = 256,
            batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            on_batch: Optional[Callable[[int], None]] = None) -> list[str]:
    """Batched completions of the examples' prompts, decoded (special tokens dropped) and trimmed;
    `on_batch(n)` after each batch of n prompts (progress)."""
    tok = unwrap(tokenizer)
    outs = generate_batch(model, tokenizer, [g.prompt_ids for g in gen_examples], max_tokens, temperature, top_p,
                          seed=seed, batch_size=batch_size, on_batch=on_batch)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs]


def generation_metrics(model: nn.Module, tokenizer: Any, examples: Sequence[Any], *, max_tokens: int = 256,
                       batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Generate for tokenized held-out examples (`.ids`, `.mask`) and score: {"bleu", "chrf", "rouge1",
    "rouge2", "rougeL", "exact_match", "n_examples"} (0-100). For the trainer's `train.eval_generate`; the
    model's training/eval mode is restored afterwards and MLX's global random state is not touched."""
    gens = generation_examples(examples, tokenizer)
    preds = predict(model, tokenizer, gens, max_tokens=max_tokens, batch_size=batch_size,
                    temperature=temperature, top_p=top_p, seed=seed)
    return text_metrics(preds, [g.reference for g in gens])
