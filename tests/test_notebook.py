"""examples/quickstart.ipynb runs top to bottom in a fresh kernel (the venv's python, a temp working dir) on the real
SmolLM2-135M-Instruct: no cell errors, the loss curve is drawn inline, and the tuned held-out loss is below the base's.

The notebook is stored without outputs; this test is what keeps it working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
KERNEL = "mlxtune-test-python"

# Appended to the notebook for the test only: the numbers the assertions need, as one JSON line.
PROBE = """import json as _json
print("QUICKSTART_PROBE " + _json.dumps({"before": before, "after": after, "steps": result.steps,
      "answers": [before_answer, after_answer, fused_answer], "callback_losses": log.losses}))"""


def _kernelspec(root: Path) -> Path:
    """A kernelspec whose argv is this interpreter (not whatever `python` is on PATH), in a dir for JUPYTER_PATH."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mlxtune test (venv python)",
        "language": "python",
    }))
    return root


def _openblas() -> str:
    try:
        return subprocess.run(["bash", str(ROOT / "tools" / "openblas.sh"), "--path"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch, smollm2_gguf, alpaca_seed_dir):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    jupyter_dir = _kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(jupyter_dir), os.environ.get("JUPYTER_PATH")])))
    # The kernel inherits the environment. It imports this checkout's mlxtune, and the notebook finds the repo from
    # mlxtune's location (its working dir is outside the repo, and MLXTUNE_REPO is not set).
    monkeypatch.delenv("MLXTUNE_REPO", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("MLXTUNE_QUICKSTART_OUT", str(work / "runs" / "quickstart"))
    if not os.environ.get("LD_PRELOAD") and _openblas():  # 20x faster CPU matmuls (docs/CONTRACTS.md)
        monkeypatch.setenv("LD_PRELOAD", _openblas())

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=540, resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    except CellExecutionError as e:  # nbclient stops at the first failing cell
        pytest.fail(f"a notebook cell failed:\n{e}")
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look after a failure

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # the loss curve is drawn inline
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)

    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    probe = json.loads(text.split("QUICKSTART_PROBE ", 1)[1])
    assert probe["steps"] == 6
    before, after = probe["before"], probe["after"]
    assert before["n_tokens"] == after["n_tokens"] > 500  # the same held-out tokens scored twice
    assert after["loss"] < before["loss"], (before, after)
    assert all(a.strip() for a in probe["answers"])
    # everything it wrote is under the working dir given to it
    run = work / "runs" / "quickstart" / "run"
    assert (run / "adapters.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    # the notebook's callback saw every training record metrics.jsonl holds, with the same values
    logged = {str(r["step"]): r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r}
    assert probe["callback_losses"] == logged and logged
    assert (work / "runs" / "quickstart" / "fused" / "config.json").is_file()
