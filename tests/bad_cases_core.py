"""Bad-input cases of the first corpus: data lines and files, configs, model dirs, GGUF files, adapters and
checkpoints, other commands (see bad_inputs_lib.py for `case` and `Ctx`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bad_inputs_lib import GOOD_ALPACA, GOOD_COMPLETION, GOOD_MESSAGES, GOOD_SHAREGPT, GOOD_TEXT, case
from reliability_helpers import alpaca_lines, make_small_model_dir, run_config, write_yaml

# --------------------------------------------------------------------------------------------------------------
# Data lines, per format: the error names file:line and the field


@case("alpaca-missing-output", "train.jsonl:2", "missing field 'output'")
def _(t): return t.bad_data(GOOD_ALPACA, '{"instruction": "x", "input": ""}')
@case("alpaca-instruction-not-string", "train.jsonl:2", "field 'instruction' must be a string")
def _(t): return t.bad_data(GOOD_ALPACA, '{"instruction": 5, "output": "y"}')
@case("alpaca-output-null", "train.jsonl:3", "missing field 'output'")
def _(t): return t.bad_data(GOOD_ALPACA, GOOD_ALPACA, '{"instruction": "x", "output": null}')
@case("alpaca-invalid-json", "train.jsonl:3", "not valid JSON")
def _(t): return t.bad_data(GOOD_ALPACA, GOOD_ALPACA, '{"instruction": "x", "output": "y"')
@case("alpaca-line-is-a-list", "train.jsonl:2", "expected a JSON object")
def _(t): return t.bad_data(GOOD_ALPACA, '["instruction", "output"]')
@case("sharegpt-not-a-list", "train.jsonl:2", "field 'conversations' must be a list")
def _(t): return t.bad_data(GOOD_SHAREGPT, '{"conversations": "hi"}')
@case("sharegpt-unknown-role", "train.jsonl:2", "unknown role \"bot\" in conversations[1]")
def _(t): return t.bad_data(GOOD_SHAREGPT, '{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}')
@case("sharegpt-turn-without-value", "train.jsonl:2", "conversations[0] has no content")
def _(t): return t.bad_data(GOOD_SHAREGPT, '{"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}')
@case("sharegpt-no-assistant", "train.jsonl:2", "no assistant turn")
def _(t): return t.bad_data(GOOD_SHAREGPT, '{"conversations": [{"from": "human", "value": "a"}]}')
@case("messages-unknown-role", "train.jsonl:2", "unknown role \"robot\" in messages[1]")
def _(t): return t.bad_data(GOOD_MESSAGES, '{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}')
@case("messages-content-number", "train.jsonl:2", "messages[1].content must be a string")
def _(t): return t.bad_data(GOOD_MESSAGES, '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]}')
@case("messages-empty", "train.jsonl:2", "messages is empty")
def _(t): return t.bad_data(GOOD_MESSAGES, '{"messages": []}')
@case("messages-turn-is-string", "train.jsonl:2", "messages[0] must be an object")
def _(t): return t.bad_data(GOOD_MESSAGES, '{"messages": ["hi", {"role": "assistant", "content": "b"}]}')
@case("messages-bad-weight", "train.jsonl:2", "messages[1].weight must be 0 or 1")
def _(t): return t.bad_data(GOOD_MESSAGES, '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}')
@case("completions-missing-completion", "train.jsonl:2", "missing field 'completion'")
def _(t): return t.bad_data(GOOD_COMPLETION, '{"prompt": "a", "completion": null}', **{"data.format": "completions"})
@case("completions-prompt-not-string", "train.jsonl:2", "field 'prompt' must be a string")
def _(t): return t.bad_data(GOOD_COMPLETION, '{"prompt": ["a"], "completion": "b"}')
@case("text-empty", "train.jsonl:2", "field 'text' is empty")
def _(t): return t.bad_data(GOOD_TEXT, '{"text": "   "}')
@case("text-not-string", "train.jsonl:2", "field 'text' must be a string")
def _(t): return t.bad_data(GOOD_TEXT, '{"text": 42}')
@case("format-forced-mismatch", "train.jsonl:1", "missing field 'messages'", "looks like alpaca")
def _(t): return t.bad_data(GOOD_ALPACA, **{"data.format": "messages"})
@case("too-long-with-on_too_long-error", "train.jsonl:1", "more than data.max_length=8")
def _(t): return t.bad_data(GOOD_ALPACA, **{"data.max_length": 8, "data.on_too_long": "error"})


# --------------------------------------------------------------------------------------------------------------
# Data files


@case("data-not-utf8", "train.jsonl:2", "not UTF-8")
def _(t): return t.train({"data.train": str(t.data_file([], raw=(GOOD_ALPACA + "\n").encode() + b'{"instruction": "\xff\xfe", "output": "x"}\n'))})
@case("data-json-list-syntax-error", "train.json:3", "not valid JSON")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=f"[\n{GOOD_ALPACA},\n{{\"instruction\" \"x\"}}\n]".encode()))})
@case("data-json-single-object", "train.json", "a JSON file must hold a list of records")
def _(t): return t.train({"data.train": str(t.data_file([], "train.json", raw=GOOD_ALPACA.encode()))})
@case("data-empty-file", "train.jsonl", "the file has no records")
def _(t): return t.train({"data.train": str(t.data_file([], raw=b""))})
@case("data-missing-with-suggestion", "trian.jsonl: no such file or dir", 'did you mean "train.jsonl"')
def _(t): t.data_file([GOOD_ALPACA]); return t.train({"data.train": str(t.tmp / "data" / "trian.jsonl")})
@case("data-dir-without-train-file", "no train file in this dir")
def _(t): (t.tmp / "empty").mkdir(); return t.train({"data.train": str(t.tmp / "empty")})
@case("data-dangling-symlink", "d/train.jsonl: a symlink to", "nowhere.jsonl, which does not exist")
def _(t):
    (t.tmp / "d").mkdir()
    os.symlink(t.tmp / "nowhere.jsonl", t.tmp / "d" / "train.jsonl")
    return t.train({"data.train": str(t.tmp / "d" / "train.jsonl")})
@case("data-dir-where-file-expected", "no train file in this dir")
def _(t):
    (t.tmp / "d" / "train.jsonl").mkdir(parents=True)  # a directory named like the data file
    return t.train({"data.train": str(t.tmp / "d")})
@case("data-corrupt-parquet", "train.parquet", "not a readable Parquet file")
def _(t): return t.train({"data.train": str(t.data_file([], "train.parquet", raw=b"PAR1 this is not parquet"))})
@case("data-unknown-format", "train.jsonl:1", "no known format in keys")
def _(t): return t.bad_data('{"question": "a", "answer": "b"}')
@case("data-valid-dir-without-valid-file", "data.valid:", "holds no valid file")
def _(t): (t.tmp / "empty").mkdir(); return t.train({"data.valid": str(t.tmp / "empty")})
@case("data-train-not-set", "data.train: not set")
def _(t): return t.train(drop=("data.train",))


# --------------------------------------------------------------------------------------------------------------
# Configs


@case("config-unknown-section", "cfg.yaml: unknown config key 'trian'", 'did you mean "train"')
def _(t): return t.train({"trian": {"max_steps": 1}})
@case("config-unknown-nested-key", "unknown config key 'lora.rnak'", 'did you mean "lora.rank"')
def _(t): return t.train({"lora.rnak": 4})
@case("config-wrong-type-int", "cfg.yaml: lora.rank: expected an integer, got 'big'")
def _(t): return t.train({"lora.rank": "big"})
@case("config-wrong-type-float", "train.learning_rate: expected a number, got [1]")
def _(t): return t.train({"train.learning_rate": [1]})
@case("config-wrong-type-bool", "train.grad_checkpoint: expected true or false, got 'sometimes'")
def _(t): return t.train({"train.grad_checkpoint": "sometimes"})
@case("config-section-not-mapping", "lora: expected a mapping of")
def _(t): return t.train({"lora": 5})
@case("config-bad-dropout", "lora.dropout: must be a finite number in [0, 1), got 1.5")
def _(t): return t.train({"lora.dropout": 1.5})
@case("config-zero-batch", "train.batch_size: must be an integer in [1, 65536], got 0")
def _(t): return t.train({"train.batch_size": 0})
@case("config-negative-max-steps", "train.max_steps: must be an integer in [1, 1000000000], got -1")
def _(t): return t.train({"train.max_steps": -1})
@case("config-format-typo", "data.format: 'alpacca' is not one of", 'did you mean "alpaca"')
def _(t): return t.train({"data.format": "alpacca"})
@case("config-max-length-1", "data.max_length: must be an integer in [2, 1048576], got 1")
def _(t): return t.train({"data.max_length": 1})
@case("config-quantize-bits", "model.quantize.bits: 7 is not one of 2, 3, 4, 5, 6, 8")
def _(t): return t.train({"model.quantize": {"bits": 7, "group_size": 32}})
@case("config-memory-guard-value", "train.memory_guard: 'maybe' is not one of warn, refuse, off")
def _(t): return t.train({"train.memory_guard": "maybe"})
@case("config-dtype", "model.dtype: 'float64' is not one of")
def _(t): return t.train({"model.dtype": "float64"})
@case("config-lora-target-typo", "lora.targets: 'q_projj'", 'did you mean "q_proj"')
def _(t): return t.train({"lora.targets": ["q_projj", "v_proj"]})
@case("config-lora-layers-out-of-range", "lora.layers=99 must be between 1 and 2")
def _(t): return t.train({"lora.layers": 99})
@case("config-model-path-not-set", "model.path: not set")
def _(t): return t.train(drop=("model.path",))
@case("config-bad-yaml", "cfg.yaml:4: not valid YAML", "cannot start any token")
def _(t): return ["train", "-c", str(t.config(text="model:\n  path: x\nlora:\n\trank: 4\n")), "--quiet"]
@case("config-yaml-is-a-list", "cfg.yaml: expected a mapping of sections")
def _(t): return ["train", "-c", str(t.config(text="- model\n- lora\n")), "--quiet"]
@case("config-file-missing", "nope.yaml: config file not found")
def _(t): return ["train", "-c", str(t.tmp / "nope.yaml")]
@case("config-path-is-a-directory", "cfgdir: is a directory, not a YAML config file")
def _(t): (t.tmp / "cfgdir").mkdir(); return ["train", "-c", str(t.tmp / "cfgdir")]
@case("override-unknown", "unknown option --lora.rnk", 'did you mean "lora.rank"')
def _(t): return t.train(None, "--lora.rnk", "4")
@case("override-missing-value", "--lora.rank: missing a value")
def _(t): return t.train(None, "--lora.rank")
@case("override-wrong-type", "train.max_steps: expected an integer, got 'many'")
def _(t): return t.train(None, "--train.max_steps", "many")
@case("output-dir-is-a-file", "output_dir: {tmp}/out.txt is a file, not a directory")
def _(t): (t.tmp / "out.txt").write_text("x"); return t.train({"output_dir": str(t.tmp / "out.txt")})


# --------------------------------------------------------------------------------------------------------------
# Model dirs


@case("model-path-missing", "does not exist")
def _(t): return t.train({"model.path": str(t.tmp / "no-such-model")})
@case("model-dangling-symlink", "does not exist")
def _(t): os.symlink(t.tmp / "gone", t.tmp / "link"); return t.train({"model.path": str(t.tmp / "link")})
@case("model-no-config-json", "model: no config.json")
def _(t): m = t.model_copy(); (m / "config.json").unlink(); return t.train({"model.path": str(m)})
@case("model-config-json-is-a-directory", "model: no config.json")
def _(t): m = t.model_copy(); (m / "config.json").unlink(); (m / "config.json").mkdir(); return t.train({"model.path": str(m)})
@case("model-config-not-json", "config.json:1: not valid JSON")
def _(t): m = t.model_copy(); (m / "config.json").write_text("{hidden_size: 32"); return t.train({"model.path": str(m)})
@case("model-config-a-list", "config.json: expected a JSON object")
def _(t): m = t.model_copy(); (m / "config.json").write_text("[1, 2]"); return t.train({"model.path": str(m)})
@case("model-config-missing-field", "config.json: missing required field(s) hidden_size")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), hidden_size=None))})
@case("model-config-wrong-type", "config.json: hidden_size: expected a positive integer, got 'big'")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), hidden_size="big"))})
@case("model-unsupported-architecture", "model_type 'gpt2' is not supported")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), model_type="gpt2"))})
@case("model-heads-not-multiple", "model/config.json: num_attention_heads=4 is not a multiple of num_key_value_heads=3")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), num_key_value_heads=3))})
@case("model-rope-yarn", "rope_scaling type 'yarn' is not supported")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), rope_scaling={"rope_type": "yarn", "factor": 4.0}))})
@case("model-sliding-window", "use_sliding_window=true is not supported")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), model_type="qwen2", use_sliding_window=True))})
@case("model-prequantized-gptq", "pre-quantized checkpoints (quant_method='gptq') are not supported")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), quantization_config={"quant_method": "gptq", "bits": 4}))})
@case("model-weights-do-not-match-config", "the weights do not match config.json", "model.embed_tokens.weight in model.safetensors has shape")
def _(t): return t.train({"model.path": str(t.edit_config_json(t.model_copy(), hidden_size=64, intermediate_size=64))})
@case("model-pickle-only", "only PyTorch pickle weights (pytorch_model.bin)", "safetensors only")
def _(t):
    m = t.model_copy()
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return t.train({"model.path": str(m)})
@case("model-truncated-safetensors", "model.safetensors: cannot read safetensors", "truncated or corrupt")
def _(t):
    m = t.model_copy()
    raw = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    return t.train({"model.path": str(m)})
@case("model-empty-safetensors", "model.safetensors: cannot read safetensors")
def _(t): m = t.model_copy(); (m / "model.safetensors").write_bytes(b""); return t.train({"model.path": str(m)})
@case("model-safetensors-is-a-directory", "model.safetensors: cannot read safetensors")
def _(t): m = t.model_copy(); (m / "model.safetensors").unlink(); (m / "model.safetensors").mkdir(); return t.train({"model.path": str(m)})
@case("model-index-missing-shard", "model.safetensors.index.json: lists shard(s) that are not in the dir: model-00002-of-00002.safetensors")
def _(t):
    m = t.model_copy()
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    return t.train({"model.path": str(m)})
@case("model-index-malformed", "model.safetensors.index.json: malformed index")
def _(t): m = t.model_copy(); (m / "model.safetensors.index.json").write_text('{"weights": []}'); return t.train({"model.path": str(m)})
@case("model-missing-tokenizer", "no tokenizer files")
def _(t):
    m = t.model_copy()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (m / f).unlink(missing_ok=True)
    return t.train({"model.path": str(m)})
@case("model-corrupt-tokenizer", "cannot load the tokenizer")
def _(t): m = t.model_copy(); (m / "tokenizer.json").write_text("{not json"); return t.train({"model.path": str(m)})
@case("model-path-is-a-plain-file", "not a model dir or .gguf file")
def _(t): (t.tmp / "weights.bin").write_bytes(b"x"); return t.train({"model.path": str(t.tmp / "weights.bin")})


# --------------------------------------------------------------------------------------------------------------
# GGUF files


def _gguf(t, arch: str = "llama") -> Path:
    from core_helpers import hf_to_gguf

    out = t.tmp / "model.gguf"
    hf_to_gguf(t.model, out)
    if arch != "llama":  # rewrite the architecture string in the header (same length keeps offsets valid)
        raw = out.read_bytes()
        out.write_bytes(raw.replace(b"llama", arch.encode(), 1))
    return out


@case("gguf-truncated", "model.gguf", "truncated")
def _(t):
    g = _gguf(t)
    raw = g.read_bytes()
    g.write_bytes(raw[: int(len(raw) * 0.6)])
    return t.train({"model.path": str(g)})
@case("gguf-not-gguf", "model.gguf: not a GGUF file")
def _(t): (t.tmp / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf" * 10); return t.train({"model.path": str(t.tmp / "model.gguf")})
@case("gguf-empty", "model.gguf")
def _(t): (t.tmp / "model.gguf").write_bytes(b""); return t.train({"model.path": str(t.tmp / "model.gguf")})
@case("gguf-unsupported-architecture", "GGUF architecture 'gemma' is not supported")
def _(t): return t.train({"model.path": str(_gguf(t, "gemma"))})


# --------------------------------------------------------------------------------------------------------------
# Adapters (fuse / export / generate), checkpoints (--resume)


def _adapter_copy(t) -> Path:
    dst = t.tmp / "adapter"
    dst.mkdir()
    for f in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(t.run / f, dst / f)
    return dst


@case("adapter-wrong-base-shapes", "adapter does not fit the model", "base hidden_size is 32 in the adapter but 48 in the model")
def _(t): return ["fuse", str(t.run), "--base", str(t.other_model), "--out", str(t.tmp / "out")]
@case("adapter-wrong-base-fingerprint", "adapter does not fit the model", "trained on a different base model")
def _(t):
    m = t.model_copy("base2")
    import mlx.core as mx

    w = dict(mx.load(str(m / "model.safetensors")))
    w = {k: v * 1.5 for k, v in w.items()}  # same shapes, different weights
    mx.save_safetensors(str(m / "model.safetensors"), w, metadata={"format": "pt"})
    return ["fuse", str(t.run), "--base", str(m), "--out", str(t.tmp / "out")]
@case("adapter-config-not-json", "adapter_config.json")
def _(t): a = _adapter_copy(t); (a / "adapter_config.json").write_text("{rank: 4"); return ["fuse", str(a), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter-truncated-weights", "adapters.safetensors")
def _(t):
    a = _adapter_copy(t)
    raw = (a / "adapters.safetensors").read_bytes()
    (a / "adapters.safetensors").write_bytes(raw[:100])
    return ["export", str(a), "--format", "peft", "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter-weights-missing", "adapter")
def _(t): a = _adapter_copy(t); (a / "adapters.safetensors").unlink(); return ["fuse", str(a), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter-rank-mismatch", "rank")
def _(t):
    a = _adapter_copy(t)
    c = json.loads((a / "adapter_config.json").read_text())
    c["rank"] = 8
    (a / "adapter_config.json").write_text(json.dumps(c))
    return ["fuse", str(a), "--base", str(t.model), "--out", str(t.tmp / "out")]
@case("adapter-path-missing", "nope")
def _(t): return ["generate", "--model", str(t.model), "--adapter", str(t.tmp / "nope"), "--prompt", "hi"]
@case("resume-path-missing", "no checkpoint there")
def _(t): return t.train(None, "--resume", str(t.tmp / "nope"))
@case("resume-without-checkpoints", "no checkpoint to resume from")
def _(t): return t.train(None, "--resume")
@case("resume-corrupt-checkpoint", "step_000002: checkpoint is unreadable")
def _(t):
    src = t.tmp / "src"
    shutil.copytree(t.run, src)
    opt = src / "checkpoints" / "step_000002" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:50])
    return t.train(None, "--resume", str(src))
@case("resume-different-lora-config", "cannot resume", "lora.rank differs")
def _(t): return t.train({"lora.rank": 8}, "--resume", str(t.run))


# --------------------------------------------------------------------------------------------------------------
# Other commands


@case("eval-bad-data", "bad.jsonl:1", "not valid JSON")
def _(t):
    f = t.data_file(["{oops"], "bad.jsonl")
    return ["eval", "--model", str(t.model), "--data", str(f), "--no-generate", "--out", str(t.tmp / "out")]
@case("data-convert-bad-line", "train.jsonl:2", "missing field 'output'")
def _(t):
    f = t.data_file([GOOD_ALPACA, '{"instruction": "x"}'])
    return ["data", "convert", str(f), "--out", str(t.tmp / "out" / "converted.jsonl")]
@case("estimate-missing-model", "does not exist")
def _(t): return ["estimate", "-c", str(t.config({"model.path": str(t.tmp / "nope")}))]
@case("estimate-bad-target", "lora.targets: 'gatee_proj'", 'did you mean "gate_proj"', "matched no linear layer")
def _(t): return ["estimate", "-c", str(t.config({"lora.targets": ["gatee_proj"]}))]
@case("download-local-path", "already a local path")
def _(t): return ["download", "model", str(t.model)]


# --------------------------------------------------------------------------------------------------------------


