"""Evaluation: loss/perplexity against an independent numpy oracle, bits per byte on a known case, text metrics
against sacrebleu / rouge-score, prompt/reference splitting, BERTScore reported unavailable (never faked)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.data import make_batches
from mlxtune.eval import (
    bertscore,
    bits_per_byte,
    generation_examples,
    score,
    special_token_ids,
    text_metrics,
    write_report,
)
from mlxtune.model import Model, ModelArgs


def load_tiny(model_dir: Path):
    """A tiny model from a fixture dir, built directly (independent of loading.py)."""
    from transformers import AutoTokenizer

    model = Model(ModelArgs.from_hf_config(json.loads((model_dir / "config.json").read_text())))
    model.load_weights(list(model.sanitize(mx.load(str(model_dir / "model.safetensors"))).items()))
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return load_tiny(tiny_qwen_dir)


def Example(ids, mask):
    return SimpleNamespace(ids=list(ids), mask=list(mask))


def _examples(seed=0, n=5, vocab=2000):
    """Random examples of different lengths, each with a prompt (mask 0) and a target part (mask 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        L = int(rng.integers(6, 40))
        p = int(rng.integers(1, L - 2))
        out.append(Example(rng.integers(0, vocab, L).tolist(), [0] * p + [1] * (L - p)))
    return out


def _oracle_nll(model, examples) -> tuple[float, int]:
    """Sum of target NLL, example by example, from the full logits with a float64 numpy log-softmax."""
    total, count = 0.0, 0
    for ex in examples:
        ids = np.array(ex.ids)
        logits = np.array(model(mx.array(ids[None, :-1])), dtype=np.float64)[0]  # (L-1, V)
        m = logits.max(-1, keepdims=True)
        logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        mask = np.array(ex.mask[1:], dtype=bool)
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return total, count


def test_score_equals_exp_mean_nll_numpy(qwen):
    model, _ = qwen
    examples = _examples()
    want_sum, want_n = _oracle_nll(model, examples)
    got = score(model, make_batches(examples, 2, 64, False, pad_id=0))
    assert got["n_tokens"] == want_n
    assert got["loss_sum"] == pytest.approx(want_sum, rel=1e-5)
    assert got["loss"] == pytest.approx(want_sum / want_n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want_sum / want_n), rel=1e-5)


def test_score_packed_equals_unpacked_and_training_loss(qwen):
    """Packing several examples per row changes nothing (each attends only to itself), and the sum is the
    same as the training loss (loss.loss_sum) on the same batches."""
    from mlxtune.loss import batch_arrays, loss_sum

    model, _ = qwen
    examples = _examples(seed=1, n=6)
    unpacked = make_batches(examples, 3, 64, False, pad_id=0)
    packed = make_batches(examples, 2, 64, True, pad_id=0)
    a, b = score(model, unpacked), score(model, packed)
    assert a["n_tokens"] == b["n_tokens"]
    assert a["loss_sum"] == pytest.approx(b["loss_sum"], rel=1e-5)
    train_sum = sum(float(loss_sum(model, *batch_arrays(bt))[0]) for bt in packed)
    assert b["loss_sum"] == pytest.approx(train_sum, rel=1e-5)


def test_bits_per_byte_uniform_model_known_case(tiny_qwen_dir):
    """A model with a zero output layer is uniform over V: every token costs ln V nats, so
    bpb = n_text_tokens * log2(V) / UTF-8 bytes; special tokens count neither nats nor bytes."""
    model, tok = load_tiny(tiny_qwen_dir)
    model.lm_head.weight = mx.zeros_like(model.lm_head.weight)
    text = "héllo wörld ✓ — naïve café 北京"
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    text_ids = tok.encode(text, add_special_tokens=False)
    ids = [im_start] + text_ids + [im_end]
    examples = [Example(ids, [0] + [1] * (len(ids) - 1))]
    got = bits_per_byte(model, make_batches(examples, 1, 128, False, pad_id=0), tok)
    V = model.args.vocab_size
    assert got["n_bytes"] == len(text.encode("utf-8"))
    assert got["n_tokens"] == len(text_ids)  # <|im_end|> is left out
    assert got["bpb"] == pytest.approx(len(text_ids) * math.log2(V) / len(text.encode("utf-8")), rel=1e-5)
    assert im_end in special_token_ids(tok)


def test_text_metrics_match_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["The cat sat on the mat.", "Paris is the capital of France", "  forty two ", "running dogs bark loudly"]
    refs = ["The cat is sitting on the mat.", "The capital of France is Paris", "forty   two", "the dog runs and barks"]
    got = text_metrics(preds, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for k in ("rouge1", "rouge2", "rougeL"):
        want = 100 * np.mean([scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)])
        assert got[k] == pytest.approx(want)
    assert got["exact_match"] == 25.0  # only "forty two" (whitespace-normalized)
    assert got["n_examples"] == 4
    # stemming is on: "running dogs bark" vs "the dog runs and barks" share run/dog/bark
    assert got["rouge1"] > 0
    same = text_metrics(refs, refs)
    assert same["bleu"] == pytest.approx(100) and same["rougeL"] == pytest.approx(100) and same["exact_match"] == 100


def test_generation_examples_take_last_target_run_and_cut_at_stop(qwen):
    _, tok = qwen
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.encode("Q: two plus two?\nA:", add_special_tokens=False)
    answer = tok.encode(" four", add_special_tokens=False)
    newline = tok.encode("\n", add_special_tokens=False)
    ex = Example(prompt + answer + [im_end] + newline, [0] * len(prompt) + [1] * (len(answer) + 1 + len(newline)))
    text_only = Example(answer, [1] * len(answer))  # no prompt: nothing to generate from
    (g,) = generation_examples([ex, text_only], tok)
    assert g.prompt_ids == prompt
    assert g.reference == "four"


def test_bertscore_unavailable_without_local_scorer(monkeypatch):
    monkeypatch.delenv("MLXTUNE_BERTSCORE_MODEL", raising=False)
    got = bertscore(["a cat"], ["a cat"])
    assert got["available"] is False
    assert got["reason"]
    assert "f1" not in got


def test_report_files_and_bertscore_unavailable_in_report(tmp_path, monkeypatch):
    monkeypatch.delenv("MLXTUNE_BERTSCORE_MODEL", raising=False)
    base = {"loss": 2.0, "ppl": math.exp(2.0), "bpb": 1.5, "bleu": 10.0, "chrf": 30.0, "rouge1": 20.0,
            "rouge2": 5.0, "rougeL": 18.0, "exact_match": 0.0}
    tuned = {**base, "loss": 1.5, "ppl": math.exp(1.5), "bleu": 14.0, "rougeL": 25.0}
    report = {"model": "m", "adapter": "a", "data": "d (test)", "n_examples": 2, "n_generated": 2,
              "settings": {"max_tokens": 8, "temperature": 0.0, "batch_size": 2},
              "base": base, "tuned": tuned, "delta": {k: tuned[k] - base[k] for k in base},
              "bertscore": bertscore(["x"], ["y"]),
              "samples": [{"prompt": "p ``` q", "reference": "r", "base": "b", "tuned": "t"}]}
    written = write_report(report, tmp_path / "rep", [report["samples"][0]])
    names = sorted(p.name for p in written)
    assert names == ["generations.jsonl", "metrics.png", "report.json", "report.md"]
    assert (tmp_path / "rep" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "BERTScore: unavailable" in md and "| BLEU ↑ | 10.0000 | 14.0000 | +4.0000 |" in md
    assert "| BERTScore F1" not in md  # no row, no number
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["bertscore"]["available"] is False and "bertscore_f1" not in saved["tuned"]
    assert not list((tmp_path / "rep").glob(".*tmp*"))  # no temp files left behind


def test_bertscore_available_path_reports_the_scorer_numbers(tmp_path, monkeypatch):
    """The plumbing when bert_score is importable and a local scorer dir is given (a stand-in scorer here:
    the real one needs a downloaded encoder): the numbers are the scorer's means, x100."""
    import sys
    import types

    torch = pytest.importorskip("torch")
    calls = {}

    def fake_score(cands, refs, model_type, num_layers, verbose):
        calls.update(cands=cands, refs=refs, model_type=model_type, num_layers=num_layers)
        return torch.tensor([0.5, 0.7]), torch.tensor([0.6, 0.8]), torch.tensor([0.55, 0.75])

    mod = types.ModuleType("bert_score")
    mod.score = fake_score
    utils = types.ModuleType("bert_score.utils")
    utils.model2layers = {"roberta-large": 17}
    mod.utils = utils
    monkeypatch.setitem(sys.modules, "bert_score", mod)
    monkeypatch.setitem(sys.modules, "bert_score.utils", utils)
    scorer = tmp_path / "roberta-large"
    scorer.mkdir()
    (scorer / "config.json").write_text(json.dumps({"num_hidden_layers": 24}))
    got = bertscore(["a", "b"], ["c", "d"], str(scorer))
    assert got["available"] is True and got["num_layers"] == 17 and calls["model_type"] == str(scorer)
    assert got["f1"] == pytest.approx(65.0) and got["precision"] == pytest.approx(60.0)
    missing = bertscore(["a"], ["b"], str(tmp_path / "nope"))
    assert missing["available"] is False and "not a local model dir" in missing["reason"]


def test_notebook_api_names_stay_callable_after_submodule_import():
    import mlxtune
    import mlxtune.chat_repl  # noqa: F401  (importing a submodule binds its name on the package)
    import mlxtune.eval  # noqa: F401
    import mlxtune.generation  # noqa: F401

    assert callable(mlxtune.evaluate) and callable(mlxtune.generate) and callable(mlxtune.chat)
    assert mlxtune.evaluate is mlxtune.eval.evaluate and mlxtune.eval.score is score
    assert mlxtune.generate is mlxtune.generation.generate and mlxtune.chat is mlxtune.chat_repl.chat
