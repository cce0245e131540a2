"""fsio, the one atomic writer: whole files and dirs or nothing, never a moment without a complete copy, temps of
dead processes cleaned, full disks recognised portably, and macOS's F_FULLFSYNC used where it exists."""

from __future__ import annotations

import errno
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import pytest

from mlxtune import fsio
from mlxtune.errors import OutputExistsError


class _Killed(BaseException):
    """Stands for the process dying at this point."""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def _fill(d: Path, tag: str) -> None:
    (d / "a.txt").write_text(tag)
    (d / "b.json").write_text(json.dumps({"tag": tag}))


def _complete(d: Path, tag: str) -> bool:
    try:
        return (d / "a.txt").read_text() == tag and json.loads((d / "b.json").read_text()) == {"tag": tag}
    except (OSError, ValueError):
        return False


def test_files_are_written_whole_with_default_mode(tmp_path):
    fsio.write_bytes(tmp_path / "x.bin", b"\x00\x01")
    fsio.write_bytes(tmp_path / "x.txt", "héllo")
    fsio.write_json(tmp_path / "x.json", {"p": tmp_path, "a": mx.array([1, 2])})
    fsio.save_safetensors(tmp_path / "w.safetensors", {"w": mx.ones((2, 3))}, metadata={"k": "v"})
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01" and (tmp_path / "x.txt").read_text("utf-8") == "héllo"
    assert json.loads((tmp_path / "x.json").read_text()) == {"p": str(tmp_path), "a": [1, 2]}
    arrays, meta = mx.load(str(tmp_path / "w.safetensors"), return_metadata=True)
    assert arrays["w"].shape == (2, 3) and meta["k"] == "v"
    assert not _hidden(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {0o666 & ~umask}
    fsio.write_json(tmp_path / "x.json", [1])  # replaces
    assert json.loads((tmp_path / "x.json").read_text()) == [1]
    with pytest.raises(FileNotFoundError):
        fsio.write_bytes(tmp_path / "missing" / "x", b"")


def test_atomic_file_failure_and_overwrite(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_text("old")
    with pytest.raises(OutputExistsError, match="already exists"):
        with fsio.atomic_file(out):
            pass
    with pytest.raises(RuntimeError):
        with fsio.atomic_file(out, overwrite=True) as tmp:
            assert tmp.name.startswith(".model.gguf.tmp-") and tmp.suffix == ".gguf" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert out.read_text() == "old" and not _hidden(tmp_path)
    with fsio.atomic_file(out, overwrite=True) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and not _hidden(tmp_path)
    with fsio.atomic_file(tmp_path / "sub" / "f.txt") as tmp:  # missing parents are created
        tmp.write_text("x")
    assert (tmp_path / "sub" / "f.txt").read_text() == "x"


def test_atomic_dir_new_replace_and_failure(tmp_path):
    out = tmp_path / "best"
    with fsio.atomic_dir(out) as tmp:
        _fill(tmp, "one")
    assert _complete(out, "one") and not _hidden(tmp_path)
    with pytest.raises(OutputExistsError, match="best: already exists"):
        with fsio.atomic_dir(out) as tmp:
            _fill(tmp, "two")
    assert _complete(out, "one") and not _hidden(tmp_path)
    with pytest.raises(ValueError):
        with fsio.atomic_dir(out, overwrite=True) as tmp:
            _fill(tmp, "two")
            raise ValueError("failed while writing")
    assert _complete(out, "one") and not _hidden(tmp_path)
    with fsio.atomic_dir(out, overwrite=True) as tmp:
        _fill(tmp, "two")
    assert _complete(out, "two") and not _hidden(tmp_path)
    (tmp_path / "empty").mkdir()  # an empty dir holds nothing to lose: no overwrite needed
    with fsio.atomic_dir(tmp_path / "empty") as tmp:
        _fill(tmp, "three")
    assert _complete(tmp_path / "empty", "three")


def test_swap_never_leaves_a_moment_without_a_complete_copy(tmp_path, monkeypatch):
    """Die at each rename of a dir swap: at every moment `best` or its `.best.old-PID` is complete, and
    recover() puts the old copy back when the process died between the two renames."""
    out = tmp_path / "best"
    with fsio.atomic_dir(out) as tmp:
        _fill(tmp, "one")
    real = os.replace  # os.rename and os.replace are the same on POSIX; either may do the swap
    calls = []

    def dying(src, dst, *a, **k):
        copies = [out] + [p for p in tmp_path.iterdir() if p.name.startswith(".best.old-")]
        assert any(_complete(c, "one") or _complete(c, "two") for c in copies), "no complete copy"
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) >= 2:
            raise _Killed  # the process is dead from the second rename on: nothing else runs
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", dying)
    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(_Killed):
        with fsio.atomic_dir(out, overwrite=True) as tmp:
            _fill(tmp, "two")
    monkeypatch.undo()
    assert calls[0] == ("best", f".best.old-{os.getpid()}")
    assert not out.exists() and _complete(tmp_path / f".best.old-{os.getpid()}", "one")
    assert fsio.recover(out) is True
    assert _complete(out, "one") and not [n for n in _hidden(tmp_path) if ".old-" in n]


def test_swap_failure_puts_the_old_copy_back(tmp_path, monkeypatch):
    out = tmp_path / "best"
    with fsio.atomic_dir(out) as tmp:
        _fill(tmp, "one")
    real, n = os.rename, []

    def failing_once(src, dst):
        n.append(1)
        if len(n) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", failing_once)
    with pytest.raises(OSError):
        with fsio.atomic_dir(out, overwrite=True) as tmp:
            _fill(tmp, "two")
    monkeypatch.undo()
    assert _complete(out, "one") and not _hidden(tmp_path)


def test_stale_temps_of_dead_processes_are_cleaned(tmp_path):
    dead, me = _dead_pid(), os.getpid()
    (tmp_path / "x").mkdir()
    stale = [tmp_path / f".x.tmp-{dead}-deadbeef", tmp_path / f".x.old-{dead}", tmp_path / f".f.json.tmp-{dead}-0badcafe.json"]
    stale[0].mkdir()
    stale[1].mkdir()
    stale[2].write_text("{")
    live = tmp_path / f".x.tmp-{me}-12345678"  # ours, maybe in use
    live.mkdir()
    orphan = tmp_path / f".y.old-{dead}"  # y itself is missing: this is its only copy
    orphan.mkdir()
    (orphan / "a.txt").write_text("y")
    removed = fsio.clean_temps(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert live.exists() and (tmp_path / "y" / "a.txt").read_text() == "y" and not orphan.exists()
    other = tmp_path / f".x.tmp-{dead}-abcdef01"
    other.mkdir()
    assert fsio.recover(tmp_path / "x") is False and not other.exists() and live.exists()


def test_is_disk_full_is_portable():
    assert fsio.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    if hasattr(errno, "EDQUOT"):
        assert fsio.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not fsio.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert fsio.is_disk_full(RuntimeError("[write] Unable to write 1024 bytes to file."))
    assert not fsio.is_disk_full(RuntimeError("something else")) and not fsio.is_disk_full(ValueError("x"))
    src = inspect.getsource(fsio)
    assert "122" not in src and "(28" not in src  # errno numbers differ between Linux and macOS: names only


def test_macos_uses_full_fsync(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(F_FULLFSYNC=51, fcntl=lambda fd, op: calls.append(op))
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setitem(sys.modules, "fcntl", fake)
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    fsio.write_bytes(tmp_path / "f", b"x")
    assert calls and set(calls) == {51}


# ---------------------------------------------------------------------------------------------------------
# check_output: the one rule for every --out


def test_check_output_new_and_empty_paths_are_fine(tmp_path):
    assert fsio.check_output(tmp_path / "new" / "out") == (tmp_path / "new" / "out").resolve()
    (tmp_path / "empty").mkdir()
    assert fsio.check_output(tmp_path / "empty") == (tmp_path / "empty").resolve()


@pytest.mark.parametrize("value", [None, "", "   "])
def test_check_output_refuses_an_empty_path(value):
    with pytest.raises(fsio.MlxtuneError, match="--out: empty path"):
        fsio.check_output(value)


def test_check_output_never_replaces_without_force(tmp_path):
    (tmp_path / "f.jsonl").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("y")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    for p, what in [("f.jsonl", "an existing file"), ("d", "not empty"), ("link", "dangling symlink")]:
        with pytest.raises(OutputExistsError, match=what) as e:
            fsio.check_output(tmp_path / p, kind="--out")
        assert "--force" in str(e.value) and "\n" not in str(e.value)
        assert fsio.check_output(tmp_path / p, force=True)  # --force: allowed
    assert (tmp_path / "f.jsonl").read_text() == "x" and (tmp_path / "d" / "keep.txt").read_text() == "y"


def test_check_output_never_onto_or_inside_an_input(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data.jsonl"
    model.mkdir()
    data.write_text("{}")
    (tmp_path / "alias").symlink_to(model)
    cases = [(data, "is the input"), (model, "is the input"), (model / "fused", "is inside the input"),
             (tmp_path / "alias" / "x", "is inside the input"), (tmp_path, "holds the input")]
    for out, what in cases:
        for force in (False, True):
            with pytest.raises(fsio.MlxtuneError, match=what):
                fsio.check_output(out, inputs=[model, data, None, ""], force=force)


def test_check_output_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(fsio.MlxtuneError, match="is a file, not a directory"):
        fsio.check_output(tmp_path / "file" / "sub" / "out.jsonl")


def test_check_output_cuts_long_paths(tmp_path):
    long = tmp_path.joinpath(*["x" * 100] * 3)
    long.parent.mkdir(parents=True)
    long.write_text("x")
    with pytest.raises(OutputExistsError) as e:
        fsio.check_output(long)
    assert len(str(e.value)) < 200


def test_check_output_cleans_what_a_killed_writer_left(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".out.jsonl.tmp-{dead}-0badc0de.jsonl").write_text("half")
    (tmp_path / f".report.old-{dead}").mkdir()  # a dir swap killed between its two renames
    (tmp_path / f".report.old-{dead}" / "report.json").write_text("{}")
    assert fsio.check_output(tmp_path / "out.jsonl") == (tmp_path / "out.jsonl").resolve()
    assert not list(tmp_path.glob(".out.jsonl.tmp-*"))
    with pytest.raises(OutputExistsError):  # the old copy is back, so it is an existing output
        fsio.check_output(tmp_path / "report")
    assert (tmp_path / "report" / "report.json").read_text() == "{}"
