"""Golden tests with the real Llama 3 and Qwen tokenizers: for every format, the ids and loss mask of a known
multi-turn example equal what the chat template renders, turn by turn.

The expected ids are built independently of mlxtune: from explicit strings of each turn (header, content,
end-of-turn token), each tokenized on its own, and cross-checked against `apply_chat_template` on the whole
conversation and on its prefixes. Trained: each assistant turn's content and its end-of-turn token; never
system/user text, the assistant header, or the newline after `<|im_end|>`.
"""

from __future__ import annotations

import json

import pytest

from mlxtune.config import DataConfig
from mlxtune.data import encode_conversation, load_splits

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Explain briefly."},
    {"role": "assistant", "content": "6, because 3 doubled is 6.\nDone."},
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=["llama3", "qwen"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def family(tok) -> str:
    return "llama3" if tok.bos_token == "<|begin_of_text|>" else "qwen"


def segments(tok, messages):
    """The conversation as (string, trained) pieces, written out by hand from each template's definition."""
    if family(tok) == "llama3":
        segs = [("<|begin_of_text|>", 0)]
        for m in messages:
            head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            if m["role"] == "assistant":
                segs += [(head, 0), (m["content"] + "<|eot_id|>", 1)]
            else:
                segs += [(head + m["content"] + "<|eot_id|>", 0)]
        return segs
    segs = [] if messages[0]["role"] == "system" else [(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n", 0)]
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", 0), (m["content"] + "<|im_end|>", 1), ("\n", 0)]
        else:
            segs += [(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0)]
    return segs


def expected(tok, messages):
    ids, mask = [], []
    for text, trained in segments(tok, messages):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    # The hand-written pieces are exactly the chat template's rendering ...
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # ... and each assistant turn's training starts right after the template's generation prompt.
    starts = [len(tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
              for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert starts == [i for i in range(len(mask)) if mask[i] and not mask[i - 1]]
    return ids, mask


def load_one(tmp_path, record, tok, **cfg):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    splits = load_splits(DataConfig(train=str(path), val_split=0.0, **cfg), tok, seed=0)
    assert len(splits.train) == 2 and splits.train[0] == splits.train[1]
    return splits.train[0]


def records():
    """The same multi-turn conversation in every conversational format (alpaca/completions: one turn)."""
    alpaca_conv = [{"role": "user", "content": "Add the numbers.\n\n2 and 2"}, {"role": "assistant", "content": "4."}]
    return {
        "messages": ({"messages": CONV}, CONV, {}),
        "sharegpt": ({"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in CONV]}, CONV, {}),
        "completions": ({"prompt": "What is 2+2?", "completion": "4."}, CONV[1:3], {}),
        "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "4."}, alpaca_conv, {"template": "tokenizer"}),
    }


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "completions", "alpaca"])
def test_formats_match_chat_template_turn_by_turn(tmp_path, tok, fmt):
    record, conv, cfg = records()[fmt]
    ex = load_one(tmp_path, record, tok, **cfg)
    ids, mask = expected(tok, conv)
    assert ex.ids == ids
    assert ex.mask == mask
    # Every assistant turn (not only the last) is trained, each with its end-of-turn token.
    eot = tok.convert_tokens_to_ids("<|eot_id|>" if family(tok) == "llama3" else "<|im_end|>")
    n_assistant = sum(m["role"] == "assistant" for m in conv)
    assert sum(1 for t, m in zip(ex.ids, ex.mask) if t == eot and m) == n_assistant


def test_no_double_bos_and_template_bos(tok):
    ex = encode_conversation(CONV, tok)
    bos = tok.bos_token_id
    if family(tok) == "llama3":
        assert ex.ids[0] == bos and ex.ids[1] != bos and ex.mask[0] == 0
    else:
        assert bos is None or bos not in ex.ids


def test_train_on_all(tmp_path, tok):
    ex = load_one(tmp_path, {"messages": CONV}, tok, train_on="all")
    ids, _ = expected(tok, CONV)
    assert ex.ids == ids and ex.mask == [0] + [1] * (len(ids) - 1)


def test_system_prompt_added_where_missing(tok):
    conv = CONV[1:]
    ex = encode_conversation(conv, tok, system_prompt="Be kind.")
    ids, mask = expected(tok, [{"role": "system", "content": "Be kind."}] + conv)
    assert (ex.ids, ex.mask) == (ids, mask)
    # and a conversation that has one keeps its own
    assert encode_conversation(CONV, tok, system_prompt="Be kind.").ids == expected(tok, CONV)[0]


def test_weight_zero_turn_not_trained(tok):
    conv = [dict(m) for m in CONV]
    conv[2]["weight"] = 0
    ex = encode_conversation(conv, tok)
    ids, mask = expected(tok, CONV)
    first = mask.index(1)
    second = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]][1]
    assert ex.ids == ids
    assert ex.mask == [0] * second + mask[second:] and first < second


def test_builtin_templates_equal_tokenizer_templates(tok):
    name = "llama3" if family(tok) == "llama3" else "chatml"
    assert encode_conversation(CONV, tok, template=name) == encode_conversation(CONV, tok, template="tokenizer")
    assert encode_conversation(CONV[1:], tok, template=name) == encode_conversation(CONV[1:], tok, template="tokenizer")


def test_text_format(tmp_path, tok):
    text = "The quick brown fox.\nIt jumps."
    ex = load_one(tmp_path, {"text": text}, tok)
    body = tok(text, add_special_tokens=False)["input_ids"]
    if family(tok) == "llama3":
        assert ex.ids == [tok.bos_token_id] + body + [tok.eos_token_id]
    else:
        assert ex.ids == body + [tok.eos_token_id]
    assert ex.mask == [0] + [1] * (len(ex.ids) - 1)


# ---------------------------------------------------------------------------------------------------------
# The Alpaca recipe template


def alpaca_expected(tok, instruction, inp, output):
    prompt = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{inp}\n\n" if inp else "") + "### Response:\n"
    bos = [tok.bos_token_id] if family(tok) == "llama3" else []
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    o = tok(output, add_special_tokens=False)["input_ids"]
    return bos + p + o + [tok.eos_token_id], [0] * (len(bos) + len(p)) + [1] * (len(o) + 1)


@pytest.mark.parametrize("line", [2, 5])  # line 2 has an input, line 5 has none
def test_alpaca_recipe_mask_is_response_and_eos(tmp_path, tok, alpaca_seed_dir, line):
    rec = json.loads((alpaca_seed_dir / "train.jsonl").read_text().splitlines()[line - 1])
    assert bool(rec["input"]) == (line == 2)
    ex = load_one(tmp_path, rec, tok)  # template: auto → the alpaca recipe for Alpaca data
    ids, mask = alpaca_expected(tok, rec["instruction"], rec["input"], rec["output"])
    for i, (a, b, ma, mb) in enumerate(zip(ex.ids, ids, ex.mask, mask)):  # token by token
        assert (a, ma) == (b, mb), f"token {i}: got {a}/{ma}, expected {b}/{mb}"
    assert len(ex.ids) == len(ids)
    trained = [t for t, m in zip(ex.ids, ex.mask) if m]
    assert tok.decode(trained) == rec["output"] + tok.eos_token
    assert ("### Input:" in tok.decode(ex.ids)) == bool(rec["input"])
