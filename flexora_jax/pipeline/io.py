"""The run's side effects: process-0 file writes, the run log, progress bars and signals.

Every file of a run directory is written atomically (:mod:`flexora_jax.fileio`) and only by process 0;
every process takes part in the computation. ``metrics.jsonl`` is the run log: one JSON object per
logged step or event, truncated back to the checkpoint a resumed stage continues from. SIGTERM /
SIGINT set a flag that the stages check after each step (they save and raise :class:`Interrupted`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from flexora_jax import fileio
from flexora_jax.errors import DataError, FlexoraError
from flexora_jax.sharding import is_main_process

METRICS_FILE = "metrics.jsonl"


class Interrupted(FlexoraError):
    """SIGTERM / SIGINT arrived: the current stage saved a checkpoint; rerun with ``--resume``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


# ------------------------------------------------------------------------------------------- files
def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic write on process 0 (a kill leaves the old file or the new one, never half of one)."""
    if is_main_process():
        fileio.write_bytes(path, text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    if is_main_process():
        fileio.write_json(path, obj)


def read_json(path: str | os.PathLike) -> Any:
    """A run file's JSON; :class:`DataError` naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; run the stage that writes it first (or `flexora-jax run`)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); delete it and rerun its stage") from None


class RunLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus the last step logged per stage."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE
        self.last_step: dict[str, int] = {}

    def write(self, record: dict[str, Any]) -> None:
        self.last_step[record.get("stage", "")] = _step_of(record)
        if not is_main_process():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self, stage: str | None = None) -> list[dict[str, Any]]:
        """The log's records; lines a kill cut short, or that are not JSON objects, are skipped."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(rec, dict) and (stage is None or rec.get("stage") == stage):
                out.append(rec)
        return out

    def truncate(self, stage: str, step: int) -> None:
        """Drop ``stage`` records after ``step`` (a resumed stage re-logs them) and any cut line."""
        self.last_step[stage] = int(step)
        if not self.path.exists():
            return
        keep = [r for r in self.records()  # events (a NaN stop, an interrupt) stay as history
                if "event" in r or not (r.get("stage") == stage and _step_of(r) > step)]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def _step_of(record: dict[str, Any]) -> int:
    step = record.get("step", 0)
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


# ---------------------------------------------------------------------------------------- progress
def progress_enabled() -> bool:
    """Progress bars on process 0 unless ``FLEXORA_PROGRESS=0`` (``--quiet``)."""
    return is_main_process() and os.environ.get("FLEXORA_PROGRESS", "1") != "0"


def progress(total: int, initial: int, desc: str, unit: str = "step") -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=False, disable=not progress_enabled())


# ----------------------------------------------------------------------------------------- signals
class _StopFlag:
    signum: int | None = None
    deferred: bool = False  # inside a checkpointed loop: the loop saves at the next step, then stops
    where: str = ""  # the run directory, for the message


STOP = _StopFlag()


def _interrupted(signum: int) -> Interrupted:
    hint = f" --output-dir {STOP.where}" if STOP.where else ""
    return Interrupted(f"interrupted by signal {signum}; what the finished stages wrote is kept; continue with "
                       f"`flexora-jax run --resume{hint}`", signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGTERM / SIGINT stop the run: at once (raising :class:`Interrupted`), or, inside
    :func:`deferred_signals`, at the next step boundary, where the loop saves a checkpoint first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.signum, STOP.deferred = None, False

    def handler(signum, frame):  # noqa: ARG001
        if STOP.deferred and STOP.signum is None:
            STOP.signum = signum  # the loop saves, then raises
            return
        STOP.signum = signum
        raise _interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        STOP.signum, STOP.deferred, STOP.where = None, False, ""


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A checkpointed loop: a signal sets ``STOP.signum`` and the loop's hook saves and stops at its next step."""
    STOP.deferred = True
    try:
        yield
    finally:
        STOP.deferred = False
    if STOP.signum is not None:  # arrived after the last step's hook: stop now, everything is saved
        raise _interrupted(STOP.signum)
