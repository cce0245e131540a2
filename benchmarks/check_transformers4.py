"""Does a fused mlxtune dir load in transformers 4.x? (issue 16: tokenizer_class must be a real class)

    .venv/bin/python benchmarks/check_transformers4.py [--venv /tmp/mlxtune-tf4] [--spec 'transformers>=4.45,<5']

1. Builds (with this checkout's mlxtune) a small random Llama dir, trains nothing: applies LoRA with random non-zero
   B and fuses it (`merge_lora` + `save_model`, the code `mlxtune fuse` runs) into <venv>/fused.
2. Creates an isolated venv (once) and installs `transformers>=4.45,<5` and torch (the CPU wheel pip finds).
3. In that venv: AutoConfig, AutoTokenizer (the class tokenizer_config.json names, the chat template) and
   AutoModelForCausalLM load the fused dir; the logits of a prompt are compared with mlxtune's (float32).
Prints what loaded; exits 1 when anything failed to load or the logits differ by more than 1e-4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "What is 2 + 2?"
CHECK = r"""
import json, sys
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
d, want_file = sys.argv[1], sys.argv[2]
print("transformers", transformers.__version__, "torch", torch.__version__)
cfg = AutoConfig.from_pretrained(d)
print("AutoConfig:", type(cfg).__name__, "layers", cfg.num_hidden_layers, "rope_theta", getattr(cfg, "rope_theta", None))
tok = AutoTokenizer.from_pretrained(d)
print("AutoTokenizer:", type(tok).__name__, "vocab", len(tok), "eos", tok.eos_token)
msgs = [{"role": "user", "content": %r}]
text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
print("chat template renders:", repr(text[:60]))
model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
print("AutoModelForCausalLM:", type(model).__name__)
want = json.load(open(want_file))
ids = torch.tensor([want["ids"]])
with torch.no_grad():
    got = model(ids).logits[0].numpy()
import numpy as np
diff = float(np.abs(got - np.array(want["logits"], dtype=np.float32)).max())
print(f"max |logits - mlxtune's| = {diff:.2e}")
sys.exit(0 if diff <= 1e-4 else 1)
""" % PROMPT


def build_fused(out: Path) -> Path:
    """A fused dir written by mlxtune (random LoRA merged) and mlxtune's float32 logits for PROMPT."""
    import mlx.core as mx
    from reliability_helpers import make_small_model_dir

    from mlxtune.loading import load
    from mlxtune.lora import apply_lora, lora_modules, merge_lora
    from mlxtune.saving import save_model

    import shutil

    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    base = make_small_model_dir(out.parent / "base")
    model, tok = load(base, dtype="float32")
    apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], verbose=False)
    mx.random.seed(3)
    for m in lora_modules(model).values():
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    merge_lora(model)
    save_model(model, tok, out, overwrite=True)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    (out.parent / "want.json").write_text(json.dumps({"ids": ids, "logits": logits.tolist()}))
    cls = json.loads((out / "tokenizer_config.json").read_text()).get("tokenizer_class")
    print(f"fused dir {out}: tokenizer_config.json tokenizer_class = {cls}")
    return out


def ensure_venv(path: Path, spec: str) -> Path:
    py = path / "bin" / "python"
    if not py.exists():
        venv.create(path, with_pip=True)
    has = subprocess.run([str(py), "-c", "import transformers, torch"], capture_output=True).returncode == 0
    if not has:
        # torch: a CPU wheel where one lies on disk (the PyPI default pulls the CUDA stack, gigabytes)
        cpu = sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl")) if Path("/opt/wheels").is_dir() else []
        torch = [str(cpu[-1])] if cpu else ["torch", "--index-url", "https://download.pytorch.org/whl/cpu",
                                            "--extra-index-url", "https://pypi.org/simple"]
        subprocess.run([str(py), "-m", "pip", "install", "-q", spec, *torch], check=True)
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mlxtune-tf4"))
    ap.add_argument("--spec", default="transformers>=4.45,<5")
    args = ap.parse_args()
    work = args.venv / "work"
    work.mkdir(parents=True, exist_ok=True)
    fused = build_fused(work / "fused")
    py = ensure_venv(args.venv, args.spec)
    rc = subprocess.run([str(py), "-c", CHECK, str(fused), str(work / "want.json")]).returncode
    print("OK: the fused dir loads in transformers 4.x" if rc == 0 else f"FAILED (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
