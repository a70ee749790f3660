"""Atomic file and directory writes: a kill leaves the old content or the new one, never half of one.

Every file the library or the command writes goes through here (adapters, merged checkpoints, run
files, plots): the content lands in a temporary sibling first and is moved into place with
``os.replace``, which is atomic on POSIX filesystems. A write that fails (a full disk, a read-only place, a
file where a folder belongs; an ``OSError`` or a writer library's own error such as safetensors'
``SafetensorError``) raises :class:`WriteError`, a ``FlexoraError`` and an ``OSError`` naming the file meant
and the reason; the temporary file is removed and what was there before is untouched.

Only what the writer writes is replaced: :func:`write_dir` moves each file it built into an existing
directory one by one and leaves every other file there alone (a file a user put in an adapter folder stays).

A file ends with the permissions a plain ``open(path, "w")`` would give it (0644 under umask 022), whatever
the writer did: safetensors creates its files 0600.
"""

from __future__ import annotations

import errno as errnos
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from flexora_jax.errors import FlexoraError

_REASONS = {
    errnos.ENOSPC: "no space left on the device",
    errnos.EROFS: "read-only filesystem",
    errnos.EACCES: "permission denied",
    errnos.ENOTDIR: "a path component is a file, not a directory",
    errnos.EEXIST: "it already exists",
    errnos.EISDIR: "it is a directory",
    errnos.EDQUOT: "disk quota exceeded",
}


class WriteError(FlexoraError, OSError):
    """A file could not be written, as an ``OSError`` reads: ``filename`` the file meant (not its temporary
    sibling), ``strerror`` the reason, ``errno`` the system's error number (ENOSPC: a full disk) when known."""

    def __init__(self, path: str | os.PathLike, reason: str, errno: int | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.errno, self.strerror, self.filename = errno, reason, str(path)

    def __str__(self) -> str:
        return str(self.args[0])


def describe_os_error(exc: OSError) -> str:
    """An OSError as '<path>: <reason>' (a full disk and a read-only filesystem named as such)."""
    if isinstance(exc, WriteError):
        return str(exc)
    reason = _REASONS.get(exc.errno or -1, exc.strerror or str(exc))
    return f"{exc.filename or 'a file'}: {reason}"


@contextmanager
def _write_errors(path: Path, tmp: Path) -> Iterator[None]:
    """Turn what a failed write raises into a :class:`WriteError` naming the file meant (``tmp``, the temporary
    sibling, is named as ``path``): an ``OSError`` (its reason), or a writer library's error that reports one
    (safetensors: "... (os error 28)"). A ``FlexoraError`` of the writer's own keeps its type and message, the
    temporary name in it replaced by ``path``."""
    try:
        yield
    except FlexoraError as exc:
        if exc.args and isinstance(exc.args[0], str) and str(tmp) in exc.args[0]:
            exc.args = (exc.args[0].replace(str(tmp), str(path)), *exc.args[1:])
        raise
    except OSError as exc:
        where = str(exc.filename).replace(str(tmp), str(path)) if exc.filename else path
        raise WriteError(where, _REASONS.get(exc.errno or -1, exc.strerror or str(exc)), exc.errno) from exc
    except SafetensorError as exc:  # safetensors reports a failed write as its own error, the OS reason inside
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
        raise WriteError(path, _REASONS.get(code or -1, str(exc)), code) from exc


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; parent folders are created."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with _write_errors(path, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (floats that are numpy scalars included), written atomically."""
    return write_bytes(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomic write through a function that writes a file itself (``writer(tmp_path)``): safetensors, plots."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with _write_errors(path, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb"):  # created as open() creates any file: 0o666 less the umask (and default ACLs)
                pass
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
            writer(tmp)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


def _remove(tmp: Path) -> None:
    """Remove a temporary sibling (a file, or a directory a writer made in its place)."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink(missing_ok=True)


def write_dir(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Build a directory with ``writer(tmp_dir)`` next to ``path``, then put what it wrote in place.

    A new ``path`` appears whole, in one rename. Into an existing directory each file the writer made is
    moved in atomically (``os.replace``), folders recursively; a file there that the writer did not make
    is not the writer's, and stays (nothing is deleted). The previous content is touched only once the
    new one is complete.
    """
    path = Path(path)
    tmp = _tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _write_errors(path, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            writer(tmp)
            if path.is_dir() and not path.is_symlink():
                _move_into(tmp, path)
            else:
                os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _move_into(src: Path, dst: Path) -> None:
    """Move every file under ``src`` to the same place under the existing directory ``dst``, one by one."""
    for item in sorted(src.iterdir()):
        target = dst / item.name
        if item.is_dir() and not item.is_symlink():
            if target.is_dir() and not target.is_symlink():
                _move_into(item, target)
                continue
            if target.exists() or target.is_symlink():
                raise WriteError(target, "a file is where a folder is written (left as it is)", errnos.EEXIST)
        elif target.is_dir() and not target.is_symlink():
            raise WriteError(target, "a folder is where a file is written (left as it is)", errnos.EISDIR)
        os.replace(item, target)
