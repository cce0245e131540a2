"""Generation: batched greedy == one-at-a-time (mlx-lm's stream_generate), per-row stopping, stop tokens, seeded
sampling that leaves MLX's global RNG alone, chat sessions with a reused KV cache, and the real SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxtune.chat_repl import ChatSession
from mlxtune.generation import encode_prompt, generate, generate_batch, inference_mode, stream
from mlxtune.tokenizer import stop_token_ids
from test_evaluate import load_tiny

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["Hi", "What is the capital of France? Answer in one word, please.", "List three colors:",
           "Write a haiku about the sea and the wind over the long grey harbour wall at dawn"]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_tiny(tiny_llama_dir)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    """The tiny Qwen's greedy outputs vary from prompt to prompt (the tiny Llama's repeat one token), so
    comparisons of generated ids are not trivially equal."""
    return load_tiny(tiny_qwen_dir)


def one_at_a_time(model, tok, prompt_ids, max_tokens, stops):
    """The reference: mlx-lm's single-prompt path, token ids up to (not including) the first stop token."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    out = []
    for r in stream_generate(model, TokenizerWrapper(tok, eos_token_ids=stops), prompt_ids, max_tokens=max_tokens):
        if r.finish_reason == "stop":
            break
        out.append(r.token)
    return out


def test_batched_greedy_equals_one_at_a_time(qwen, monkeypatch):
    import mlxtune.generation as G

    model, tok = qwen
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: real left padding
    stops = set(stop_token_ids(tok, model))
    want = [one_at_a_time(model, tok, p, 12, stops) for p in prompts]
    assert len({tuple(w) for w in want}) == len(want)
    assert generate_batch(model, tok, prompts, 12, batch_size=4) == want
    assert generate_batch(model, tok, prompts, 12, batch_size=3) == want  # a full batch and a partial one
    monkeypatch.setattr(G, "PREFILL_STEP", 7)  # prompts prefilled in chunks, some all padding for short rows
    assert generate_batch(model, tok, prompts, 12, batch_size=4) == want


def test_batched_rows_stop_on_their_own(qwen):
    """Make one row's 4th token a stop token: that row ends there, the others run on, all as when alone."""
    model, tok = qwen
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    stops = set(stop_token_ids(tok, model))
    free = [one_at_a_time(model, tok, p, 10, stops) for p in prompts]
    stop_here = free[1][3]
    stops2 = stops | {stop_here}
    want = [one_at_a_time(model, tok, p, 10, stops2) for p in prompts]
    assert want[1] == free[1][: free[1].index(stop_here)]
    assert any(len(w) == 10 for w in want)  # some rows still run to max_tokens
    assert generate_batch(model, tok, prompts, 10, batch_size=4, stop_ids=stops2) == want


def test_stop_tokens_include_end_of_turn(llama3_tokenizer, qwen_tokenizer):
    llama = set(stop_token_ids(llama3_tokenizer))
    assert {128009, 128001, 128008} <= llama  # <|eot_id|>, <|end_of_text|>, <|eom_id|>
    assert {151645, 151643} <= set(stop_token_ids(qwen_tokenizer))  # <|im_end|>, <|endoftext|>


def test_sampling_is_seeded_and_leaves_global_rng_alone(qwen):
    model, tok = qwen
    mx.random.seed(123)
    before = mx.random.state[0].tolist()
    a = generate(model, tok, "Hello", max_tokens=4, temperature=1.0, seed=7)
    b = generate(model, tok, "Hello", max_tokens=4, temperature=1.0, seed=7)
    ids = generate_batch(model, tok, [encode_prompt(tok, "Hello")], 4, temperature=1.0, top_p=0.9, seed=7)
    assert a == b
    assert mx.random.state[0].tolist() == before
    assert len(ids[0]) >= 1


def test_inference_mode_restores_training_mode(llama):
    model, tok = llama
    model.train()
    with inference_mode(model):
        assert not model.training
    assert model.training
    generate_batch(model, tok, [encode_prompt(tok, "Hi")], 2)
    assert model.training
    model.eval()


def test_chat_session_turns_reuse_cache_and_reset(qwen):
    model, tok = qwen
    s = ChatSession(model, tok, system="Be brief.", max_tokens=5)
    t1 = s.send("Hello")
    assert t1.cached_tokens == 0
    assert t1.prompt_tokens == len(encode_prompt(tok, [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hello"}]))
    t2 = s.send("And then?")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": t1.reply}, {"role": "user", "content": "And then?"}]
    assert s.messages == conv[1:] + [{"role": "assistant", "content": t2.reply}]
    assert t2.prompt_tokens == len(encode_prompt(tok, conv))
    assert t2.cached_tokens >= t1.prompt_tokens  # the first turn's prompt came from the KV cache
    # the cached continuation gives the same reply as rendering the whole conversation from scratch
    assert t2.reply == generate(model, tok, conv, max_tokens=5)
    s.reset()
    t3 = s.send("Hello")
    assert (t3.cached_tokens, t3.prompt_tokens, t3.reply) == (0, t1.prompt_tokens, t1.reply)
    s.set_system(None)  # (Qwen's template then writes its default system prompt)
    assert s.send("Hello").prompt_tokens == len(encode_prompt(tok, "Hello"))


def test_stream_reports_stop_and_length(llama):
    model, tok = llama
    rs = list(stream(model, tok, "Hi", max_tokens=3))
    assert rs[-1].finish_reason in ("stop", "length") and rs[-1].generation_tokens <= 3
    with pytest.raises(Exception, match="max_tokens"):
        list(stream(model, tok, "Hi", max_tokens=0))


def _has_gguf_loading() -> bool:
    try:
        from mlxtune.loading import load  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_gguf_loading(), reason="mlxtune/loading.py has not landed yet")
def test_cli_generate_smollm2_gguf_knows_paris(smollm2_gguf):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "mlxtune", "generate", "--model", str(smollm2_gguf),
                        "--prompt", "What is the capital of France?", "--max-tokens", "24"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "tok/s" in p.stderr and "tok/s" not in p.stdout
