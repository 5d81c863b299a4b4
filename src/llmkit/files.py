"""The one way llmkit writes files: to a temporary sibling, flushed to disk, then renamed into place.

A reader (or a process killed with SIGKILL half-way) therefore sees the old file or the new one, never half of
one. Folders are written the same way (`atomic_dir`). Every temporary name is `.<name>.<random>.tmp`, so what a
kill leaves behind is recognisable and `remove_leftovers` clears it at the next start. Reading JSON goes through
`read_json` so a corrupt file is a one-line error naming it, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import CheckpointError


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a folder's entries) to the disk, so a rename that follows survives a power cut."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some file systems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`; on any failure the old `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the final one gets normal permissions
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `dst` in one rename, so readers never see a
    half-written folder (and a failure leaves the old one in place)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the finished folder gets normal permissions
    try:
        yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that list them
            fsync_path(f)
        fsync_path(tmp)
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old.", suffix=".tmp"))
            os.replace(dst, old / "x")
        os.replace(tmp, dst)
        fsync_path(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(folder: str | Path, also: str = "") -> list[Path]:
    """Delete the temporary files and folders that a killed writer left in `folder` (not below it); returns them.

    Only llmkit's own temporary names match (`.*.tmp`, plus the glob `also`), so a user's files are never touched.
    Call it only when no other process writes to `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted({*folder.glob(".*.tmp"), *(folder.glob(also) if also else ())})
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def read_json(path: str | Path, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """A JSON object from a file, or a one-line `error` naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
