"""The bad-input corpus: every case exits with code 2 and ONE line `error: ...` naming the file / line / field,
writes nothing (no run dir, no --out dir), and leaves every pre-existing file byte-identical.

Cases run in-process through `mlxtune.cli.main([...])` on one small model dir (byte-level tokenizer, 2 layers:
reliability_helpers.py), so the whole corpus takes seconds. They live in tests/bad_cases_*.py, one file per area,
registered with `bad_inputs_lib.case`. Tests run as root in CI, so unreadable paths are made with a directory
where a file is expected, dangling symlinks and the like, never chmod.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest

from bad_inputs_lib import CASES, Ctx, base  # noqa: F401  (base is the module-scoped fixture)

for _f in sorted(Path(__file__).parent.glob("bad_cases_*.py")):
    importlib.import_module(_f.stem)


@pytest.mark.timeout(30)  # no case may hang: 30 s at most, whatever the input (a FIFO, /dev/zero, an alias bomb)
@pytest.mark.parametrize("build, expect", CASES)
def test_bad_input(build, expect, base, tmp_path, capsys):
    from mlxtune.cli import main

    root, model, data, run, other = base
    t = Ctx(tmp_path, model, data, run, other)
    argv = build(t)
    before = {**_snapshot(root), **_snapshot(tmp_path)}  # every file that exists before the command
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert e.value.code == 2, err
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line: {err!r}"
    for s in expect:
        assert s.replace("{tmp}", str(tmp_path)) in errors[0], f"{s!r} not in {errors[0]!r}"
    assert not (tmp_path / "run").exists(), "a run dir was written"
    assert not (tmp_path / "out").exists(), "an output dir was written"
    after = {**_snapshot(root), **_snapshot(tmp_path)}
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"pre-existing files modified or removed: {changed[:5]}"


def _snapshot(d: Path) -> dict:
    """Every file under `d`: its bytes' hash and its mtime."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_corpus_size():
    assert len(CASES) >= 250
