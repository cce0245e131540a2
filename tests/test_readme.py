"""The README's "Use it from the shell" command list, executed verbatim (issue #16).

Each line of that fenced bash block runs as written (the `mlxtune` of this venv, in a temporary working folder);
only what the lines name is made small and temporary: `configs/llama3.2-3b.yaml` is the real recipe with its model
swapped for a tiny random Llama with a byte-level tokenizer, 2 steps and short rows; `my.jsonl` is 30 tiny Alpaca
records; `path/to/model` is that tiny model; the recipe's own `data/alpaca_seed` holds 30 other records (a line
that forgets `--data.train my.jsonl` trains on, or resumes with, other data). The `--resume` line is run as after a
stop: the run's last checkpoint is removed first, so it really continues from step 1 (and would be refused if the
line's data differed from the first line's). The Hugging Face hub is offline (HF_HUB_OFFLINE=1, a temporary
HF_HOME): `mlxtune download` needs the network, so its line is expected to end with its one-line offline error and
exit 2. `chat` gets one message, then /exit, on stdin. About 60 s on an idle 2-core CPU (each command is a fresh
process that imports MLX and transformers).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reliability_helpers import ROOT, alpaca_lines, make_small_model_dir

MLXTUNE = Path(sys.executable).parent / "mlxtune"
SECTION = "## Use it from the shell"
OFFLINE = {"download"}
"Commands that need the network: exit 2 with one `error:` line naming the offline mode."


def readme_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The argv of each line of the first ```bash block after the section heading (comments dropped)."""
    text = readme.read_text()
    start = text.index(SECTION)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no ```bash block after {SECTION!r}"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


def _workdir(tmp: Path) -> Path:
    """The folder the commands run in, holding the files they name (tiny ones)."""
    work = tmp / "work"
    model = make_small_model_dir(work / "path" / "to" / "model")
    (work / "my.jsonl").write_text("\n".join(alpaca_lines(30)) + "\n")
    (work / "data" / "alpaca_seed").mkdir(parents=True)
    (work / "data" / "alpaca_seed" / "train.jsonl").write_text("\n".join(alpaca_lines(30, seed=5)) + "\n")
    recipe = yaml.safe_load((ROOT / "configs" / "llama3.2-3b.yaml").read_text())
    recipe["model"].update(path=str(model), dtype="float32")
    recipe["data"].update(max_length=96)
    recipe["train"].update(max_steps=2, batch_size=2, grad_accumulation=2, grad_checkpoint=False, save_every=1)
    (work / "configs").mkdir()
    (work / "configs" / "llama3.2-3b.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return work


@pytest.mark.timeout(300)
def test_readme_shell_commands_run_verbatim(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 10 and all(argv[0] == "mlxtune" for argv in commands), commands
    work = _workdir(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MLXTUNE_CACHE": str(tmp_path / "cache"),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    timings = []
    for argv in commands:
        name = argv[1]
        stdin = "Hello there\n/exit\n" if name == "chat" else ""
        if "--resume" in argv:  # as after a stop during step 2: the step-2 checkpoint is not there
            shutil.rmtree(work / "runs" / "llama" / "checkpoints" / "step_000002")
        t0 = time.perf_counter()
        p = subprocess.run([str(MLXTUNE), *argv[1:]], cwd=work, env=env, input=stdin, capture_output=True, text=True,
                           timeout=240)
        timings.append((" ".join(argv[:3]), round(time.perf_counter() - t0, 1)))
        shown = f"$ {shlex.join(argv)}\nexit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        assert "Traceback" not in p.stderr, shown
        if name in OFFLINE:
            errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
            assert p.returncode == 2 and len(errors) == 1 and "offline" in errors[0], shown
        else:
            assert p.returncode == 0, shown
        if "--resume" in argv:
            assert "resuming from runs/llama/checkpoints/step_000001" in p.stdout, shown
    print(timings)
    # what the lines say they produce is there
    run = work / "runs" / "llama"
    for path in (run / "adapters.safetensors", run / "metrics.jsonl", run / "eval" / "report.md",
                 work / "llama-tuned" / "config.json", work / "llama-peft" / "adapter_config.json",
                 work / "my-messages.jsonl"):
        assert path.is_file(), path
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "val_loss" in records[0]  # the base model's validation, once
    assert [r["step"] for r in records if "train_loss" in r][-1] == 2 and sum(r["step"] == 0 for r in records) == 1
