"""The one atomic file and directory writer: whatever kills the process, a path holds a complete copy.

Every file is written to a hidden temp beside its target, `.NAME.tmp-PID-RAND` (plus the target's suffix, so a
library writer that insists on one, like `mx.save_safetensors`, keeps it), fsynced, renamed over the target
(`os.replace`, atomic on POSIX) and the directory fsynced. A directory is built in such a temp dir and swapped
into place: an existing copy is first renamed to `.NAME.old-PID`, the new one renamed to NAME, and only then is
the old copy deleted — there is never a moment without one complete copy on disk, and `recover(path)` puts the
old copy back if the process died between the two renames.

fsync reaches the storage: on macOS `os.fsync` only reaches the drive's cache, so `fcntl.F_FULLFSYNC` is used
there when available. Directory fsync is skipped where the platform refuses it. A full disk is recognised by
`errno.ENOSPC` / `errno.EDQUOT` (looked up by name: the numbers differ between Linux and macOS) or by MLX's
writer errors.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from .errors import MlxtuneError, OutputExistsError

PathLike = Union[str, os.PathLike]

_DISK_FULL = tuple(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))
# .NAME.tmp-PID-RAND[.suffix] and .NAME.old-PID: the hidden names this module leaves while it works.
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]{8})?(?:\.[^.]*)?$")


# ---------------------------------------------------------------------------------------------------------
# fsync policy


def _fsync_fd(fd: int) -> None:
    if sys.platform == "darwin":
        import fcntl

        full = getattr(fcntl, "F_FULLFSYNC", None)
        if full is not None:
            try:
                fcntl.fcntl(fd, full)
                return
            except OSError:  # a file system without F_FULLFSYNC (e.g. some network mounts): plain fsync
                pass
    os.fsync(fd)


def fsync_file(path: PathLike) -> None:
    """Flush a file's data to storage (F_FULLFSYNC on macOS)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (renames, new files) to storage; a no-op where the platform refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        _fsync_fd(fd)
    except OSError:  # EINVAL / EBADF: this file system does not sync directories
        pass
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """Whether a write failed for lack of space: ENOSPC or EDQUOT, or MLX's writer error ("[write]", ...)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    if isinstance(exc, RuntimeError):  # MLX reports "[write] Unable to write N bytes to file." without an errno
        msg = str(exc)
        return "[write]" in msg or "[save_safetensors]" in msg
    return False


def describe_os_error(exc: BaseException, path: PathLike, doing: str = "writing") -> str:
    """One line for a failed file-system call: the path (the error's own, else `path`), what happened, the fix.
    Full disk, read-only or unwritable place, missing parent, a file where a dir belongs — recognised by the
    exception class or by errno name, never by number."""
    where = Path(getattr(exc, "filename", None) or path)
    for p in (where, *where.parents):  # a hidden temp names the target it stands for
        m = _HIDDEN.match(p.name)
        if m:
            where = p.parent / m["name"]
            break
    where = short_path(where)
    why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    code = getattr(exc, "errno", None)
    if is_disk_full(exc):
        fix = "free some space"
    elif isinstance(exc, PermissionError) or code == getattr(errno, "EROFS", None):
        fix = "the place is read-only or not yours: choose a writable path"
    elif isinstance(exc, FileNotFoundError):
        fix = "a directory on the way is missing (or a symlink points nowhere): create it or choose another path"
    elif isinstance(exc, (NotADirectoryError, FileExistsError, IsADirectoryError)):
        fix = "a file stands where a directory belongs (or the reverse): choose another path"
    else:
        fix = "check the path and the disk"
    return f"{where}: {why} while {doing}; {fix}"


# ---------------------------------------------------------------------------------------------------------
# Names and removal


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"


def _old_path(path: Path) -> Path:
    return path.parent / f".{path.name}.old-{os.getpid()}"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (os.kill(pid, 0); own pid: yes; Windows: assumed yes)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume alive, remove nothing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    import psutil  # a dependency; imported here to keep `import mlxtune.fsio` light

    try:  # a killed process whose parent has not reaped it yet (a zombie) still answers os.kill: it is dead
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone meanwhile
        return False
    except psutil.Error:  # AccessDenied: trust os.kill
        return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(dirpath)


def _check_free(path: Path) -> None:
    """Refuse to replace an existing path (an empty directory does not count: it holds nothing to lose)."""
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    raise OutputExistsError(f"{path}: already exists; choose another path, or pass overwrite=True (--force) to replace it")


# ---------------------------------------------------------------------------------------------------------
# The one rule for every --out


_SPECIAL_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> Optional[str]:
    """None for a regular file (`os.stat(path).st_mode`), else what it is ("a directory", "a FIFO (named pipe)", ...):
    the one check before reading a user's file, made without opening it (a FIFO would block, a device never end)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")


def short_path(path: Any, n: int = 60) -> str:
    """A user path for a one-line message, cut to `n` characters (keeping the end, where the name is)."""
    s = os.fspath(path)
    return s if len(s) <= n else "..." + s[-(n - 3):]


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Optional[PathLike], *, inputs: Any = (), force: bool = False, kind: str = "--out") -> Path:
    """The one rule for every output path (`fuse`, `export`, `eval`, `data convert` --out): returns it resolved.

    Never replaces an existing file, symlink or non-empty dir unless `force` (OutputExistsError); never writes
    onto or inside an input, nor (since `force` would delete it) over a dir holding an input; an empty path, a
    parent that is a file, or an input given as None is handled. `inputs`: paths read by the command (files or
    dirs; None and "" are skipped). `kind` names the option in the one-line error (`--out`, `output_dir`).
    Temps that a killed writer left beside `out` are cleaned first (`recover`).
    """
    if out is None or not os.fspath(out).strip():
        raise MlxtuneError(f"{kind}: empty path; name a new file or directory")
    raw = Path(os.fspath(out)).expanduser()
    where = f"{kind} {short_path(raw)}"
    target = raw.resolve()  # follows symlinks: a link to a model dir is the model dir
    for inp in inputs or ():
        if inp is None or not os.fspath(inp).strip():
            continue
        src = Path(os.fspath(inp)).expanduser().resolve()
        if _inside(target, src):
            what = "is" if target == src else "is inside"
            raise MlxtuneError(f"{where}: {what} the input {short_path(src)}; write the output somewhere else")
        if _inside(src, target):
            raise MlxtuneError(f"{where}: holds the input {short_path(src)}, which replacing it would delete; "
                               "write the output somewhere else")
    try:  # what a killed writer left beside `out`: its temps removed, a copy lost mid-swap put back
        recover(target)
    except OSError:
        pass  # a read-only place: the write itself will say so
    if raw.is_symlink() and not raw.exists():
        if not force:
            raise OutputExistsError(f"{where}: is a dangling symlink; remove it, choose another path, or pass "
                                    "--force to replace it")
        return target
    ancestor = target
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if ancestor != target and not ancestor.is_dir():
        raise MlxtuneError(f"{where}: {short_path(ancestor)} is a file, not a directory; choose another path")
    if target.exists() and not force:
        if target.is_dir() and not any(target.iterdir()):
            return target
        what = "a directory that is not empty" if target.is_dir() else "an existing file"
        raise OutputExistsError(f"{where}: already exists ({what}); choose another path, or pass --force to "
                                "replace it")
    return target


# ---------------------------------------------------------------------------------------------------------
# Atomic files


@contextmanager
def atomic_file(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temp path beside `path` for a writer to create; on success it is fsynced and renamed
    over `path` (one atomic rename), on error removed. Missing parent dirs are created.

    Without `overwrite`, an existing `path` raises OutputExistsError (before and again after writing).
    """
    path = Path(path)
    if not overwrite and _exists(path):
        _check_free(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        yield tmp
        if not overwrite and _exists(path):
            _check_free(path)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: PathLike, data: Union[bytes, str]) -> None:
    """Atomically write `data` (str: UTF-8) to `path`, replacing it; the parent dir must exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "parent directory does not exist", str(path.parent))
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_file(path, overwrite=True) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 less the umask, as open() gives
        with os.fdopen(fd, "wb") as f:
            f.write(raw)


def _json_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if hasattr(o, "tolist"):  # mx.array, numpy arrays and scalars
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json_object(path: PathLike, error: type = MlxtuneError) -> dict:
    """A JSON file that must hold an object: one `error` naming the file (and line) when it is unreadable, not UTF-8,
    not JSON, or not an object. The one JSON reader for the files mlxtune's artifacts are made of."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def write_json(path: PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented UTF-8 JSON with a final newline (paths and arrays converted)."""
    write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def save_safetensors(path: PathLike, arrays: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Atomically write `arrays` with `mx.save_safetensors`; the parent dir must exist."""
    import mlx.core as mx

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "parent directory does not exist", str(path.parent))
    with atomic_file(path, overwrite=True) as tmp:
        mx.save_safetensors(str(tmp), dict(arrays), metadata=dict(metadata or {}))


# ---------------------------------------------------------------------------------------------------------
# Atomic directories


@contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temp dir beside `path` to fill; on success it is fsynced and swapped into place.

    An existing `path` (with `overwrite`) is renamed to `.NAME.old-PID`, the temp renamed to `path`, then the
    old copy deleted: one complete copy exists at every moment. On error the temp is removed and `path` is
    untouched. Without `overwrite` an existing non-empty `path` raises OutputExistsError. Missing parent dirs
    are created.
    """
    path = Path(path)
    recover(path)
    if not overwrite and _exists(path):
        _check_free(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp: Path, path: Path, overwrite: bool) -> None:
    if not _exists(path):
        os.rename(tmp, path)
        fsync_dir(path.parent)
        return
    if not overwrite:
        _check_free(path)  # something appeared while we worked
    old = _old_path(path)
    if _exists(old):  # left by an earlier process with our pid; `path` is complete, so it is a spare copy
        _remove(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old copy back; the caller removes the temp
        raise
    fsync_dir(path.parent)
    _remove(old)


def recover(path: PathLike) -> bool:
    """After a crash: when `path` is missing, restore the newest `.NAME.old-PID` left by a dead process (or
    this one); then remove temps of `path` left by dead processes. Returns True when a copy was restored."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    restored = False
    olds, temps = [], []
    for p in path.parent.iterdir():
        m = _HIDDEN.match(p.name)
        if not m or m["name"] != path.name:
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and pid_alive(pid):
            continue  # another live process is mid-write: not ours to touch
        (olds if m["kind"] == "old" else temps).append(p)
    if olds and not _exists(path):
        newest = max(olds, key=lambda p: p.lstat().st_mtime)
        os.rename(newest, path)
        fsync_dir(path.parent)
        olds.remove(newest)
        restored = True
    for p in olds:  # `path` is complete: these are spare copies
        _remove(p)
    for p in temps:
        if int(_HIDDEN.match(p.name)["pid"]) != os.getpid():
            _remove(p)
    return restored


def clean_temps(directory: PathLike) -> list[Path]:
    """Remove hidden temps (`.NAME.tmp-PID-...`) that dead processes left in `directory`, and their spare
    `.NAME.old-PID` copies when NAME exists (a missing NAME is restored from its old copy: see recover).
    Returns the paths removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in sorted(d.iterdir()):
        m = _HIDDEN.match(p.name)
        if not m or pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old":
            if not _exists(d / m["name"]):
                recover(d / m["name"])
                continue
        _remove(p)
        removed.append(p)
    return removed
