"""The run directory as one owner: where a run may live, who holds it, what it may replace.

Contract (``docs/reliability.md``):
- ``--output-dir`` must be a directory or a path that can become one: an existing file, a path under
  a file, an unwritable place are refused with a message naming the path before anything is written.
- A fresh run takes an empty or new directory only: a non-empty directory that holds no run is the
  user's, and is refused (nothing in it is touched).
- One process at a time: :meth:`RunDir.claim` creates ``run.lock`` exclusively, naming the holding
  process; a second run (or stage command) on the same directory is refused while that process lives.
  A lock left by a process that is gone (SIGKILL) is taken over.
- A fresh run that fails before its ``config.yaml`` is written leaves no directory behind
  (:meth:`RunDir.abandon` removes what the run created, only when it created the directory).
- Where the directory lives is not what the run computes: the config identity ignores ``output_dir``
  (a run may be resumed through another spelling of its path, or after it was moved).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from flexora_jax.errors import ConfigError
from flexora_jax.sharding import is_main_process

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """The directory of one run; process 0 owns its files, every process may read them."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))
        self.created = False  # this run made the directory itself
        self.claimed = False
        self.made: list[Path] = []  # what this run wrote before its config (removed again if it fails)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def check_usable(self) -> None:
        """Refuse a path that is a file, lies under a file, or cannot be created or written."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"output_dir {p} is an existing file, not a directory; choose a directory path")
        ancestor = p
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"output_dir {p} lies under {ancestor}, which is a file; choose a directory path")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(
                f"output_dir {p}: {ancestor} is not writable (permission denied or a read-only "
                "filesystem); choose a writable place"
            )

    def check_fresh(self, marker: str) -> None:
        """A fresh run: the directory is new or empty, or already holds a run (``marker`` exists)."""
        p = self.path
        if p.is_dir() and not (p / marker).exists():
            others = sorted(x.name for x in p.iterdir() if x.name != LOCK_FILE)
            if others:
                listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise ConfigError(
                    f"output_dir {p} is not empty ({listed}) and holds no flexora run; a run writes "
                    "into a new or empty directory, and never over your files: choose another "
                    "--output-dir"
                )

    def claim(self) -> None:
        """Create the directory (process 0) and take its lock; refused while another live process holds it."""
        if not is_main_process():
            return
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output_dir {self.path} cannot be created: {exc.strerror or exc}") from None
        lock = self.path / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder(lock)
                if holder is not None:
                    raise ConfigError(
                        f"output_dir {self.path} is in use by process {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('since')}); wait for it to end, or "
                        "choose another --output-dir"
                    ) from None
                lock.unlink(missing_ok=True)  # left by a process that is gone: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.claimed = True
            return

    def _holder(self, lock: Path) -> dict | None:
        """The live process that holds ``lock`` (None when the holder is gone or the lock is unreadable)."""
        try:
            holder = json.loads(lock.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if host != socket.gethostname():
            return holder  # another machine's process: cannot be checked, so it is respected
        return holder if pid != os.getpid() and _alive(pid) else None

    def release(self) -> None:
        """Drop the lock (at the end of a run or stage, whatever the outcome)."""
        if self.claimed:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.claimed = False

    def abandon(self) -> None:
        """Undo a fresh run that failed before its config was written: remove what it made (the directory too)."""
        self.release()
        if not is_main_process():
            return
        for made in self.made:
            shutil.rmtree(made, ignore_errors=True)
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            self.created = False
