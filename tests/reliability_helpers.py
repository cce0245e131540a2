"""Helpers for the reliability tests (faults, bad inputs, diagnostics): a small model dir that loads in milliseconds.

The shared `tiny_llama_dir` fixture carries the real Llama 3 tokenizer (128k tokens, a 17 MB tokenizer.json that
takes a second to parse, and a 128k-row embedding): right for parity tests, slow for a corpus of 70 bad inputs
and for a run that is killed and resumed many times. Here the tokenizer is byte-level BPE with no merges (256
byte tokens + 3 specials, ChatML template) and the model a random 2-layer Llama written by mlxtune itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_byte_tokenizer(out: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A byte-level BPE tokenizer (ids 0-255 = bytes, then the specials) saved as a HF tokenizer dir.

    `pad_token="<|im_end|>"` makes padding the end-of-turn token, as many chat models ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte → unicode map, in byte order, so id == byte value
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_to_char = dict(zip(bs, map(chr, cs)))
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token=pad_token,
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def make_small_model_dir(out: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                         intermediate: int = 64, seed: int = 0, model_type: str = "llama",
                         pad_token: str = "<|endoftext|>") -> Path:
    """A random float32 Llama/Qwen2 dir (config.json, model.safetensors, the byte tokenizer) for fast CLI runs."""
    import mlx.core as mx
    from transformers import AutoTokenizer

    from mlxtune.saving import save_model
    from mlxtune.model import Model, ModelArgs

    tok_dir = make_byte_tokenizer(out.parent / f".{out.name}-tokenizer", pad_token)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    mx.random.seed(seed)
    args = ModelArgs(model_type=model_type, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                     tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=tok.eos_token_id)
    model = Model(args)
    mx.eval(model.parameters())
    save_model(model, tok, out)
    return out


def alpaca_lines(n: int, seed: int = 0) -> list[str]:
    """n short, distinct Alpaca records (arithmetic), one JSON object per line."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append(json.dumps({"instruction": f"Add {a} and {b}.", "input": "" if i % 3 else f"case {i}",
                               "output": f"{a} + {b} = {a + b}"}))
    return out


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_config(tmp: Path, model_dir: Path, data: Path, *, output: str = "run", **train) -> dict:
    """A small training config (as a dict) in the style of tests/test_train.py."""
    t = {"max_steps": 6, "batch_size": 2, "grad_accumulation": 2, "learning_rate": 1e-3, "save_every": 1,
         "eval_every": 3, "log_every": 1, "keep_last": 100, "seed": 3, **train}
    return {"model": {"path": str(model_dir)}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train": str(data), "max_length": 96, "packing": True},
            "train": t, "output_dir": str(tmp / output)}


def mlxtune_proc(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """`python -m mlxtune ARGS` as a subprocess (stdout and stderr together)."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "mlxtune", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=e, cwd=ROOT, **kw)


def small_run_inputs(root: Path, n_train: int = 40, n_valid: int = 6) -> tuple[Path, Path, Path]:
    """(root, model dir, data dir with train.jsonl of `n_train` and valid.jsonl of `n_valid` alpaca records)."""
    model = make_small_model_dir(root / "model")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(alpaca_lines(n_train)) + "\n")
    (data / "valid.jsonl").write_text("\n".join(alpaca_lines(n_valid, seed=1)) + "\n")
    return root, model, data


def slow_cli_script(delay: float) -> str:
    """`python -c` source running the real CLI with every fsio.fsync_file slowed by `delay` seconds (test-side only),
    so that a test can catch a command while it holds its output or its run dir."""
    return f"""
import sys, time
import mlxtune.fsio as fsio
_fsync = fsio.fsync_file
def fsync(path):
    _fsync(path)
    time.sleep({delay})
fsio.fsync_file = fsync
from mlxtune.cli import main
sys.argv = ["mlxtune"] + sys.argv[1:]
main()
"""

