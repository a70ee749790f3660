"""Atomic file and directory writes: a kill leaves the old content or the new one, never half of one.

Every file the library or the command writes goes through here (adapters, merged checkpoints, run
files, plots): the content lands in a temporary sibling first and is moved into place with
``os.replace``, which is atomic on POSIX filesystems. Errors are the caller's to turn into messages.

A file ends with the permissions a plain ``open(path, "w")`` would give it (0644 under umask 022), whatever
the writer did: safetensors creates its files 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (floats that are numpy scalars included), written atomically."""
    return write_bytes(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomic write through a function that writes a file itself (``writer(tmp_path)``): safetensors, plots."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb"):  # created as open() creates any file: 0o666 less the umask (and default ACLs)
            pass
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        writer(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_dir(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Build a directory with ``writer(tmp_dir)`` next to ``path``, then put it in place of ``path``.

    The previous directory (if any) is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
