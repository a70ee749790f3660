"""The run's side effects: process-0 file writes, the run log, progress bars and signals.

Every file of a run directory is written atomically (:mod:`flexora_jax.fileio`) and only by process 0;
every process takes part in the computation. ``metrics.jsonl`` is the run log: one JSON object per
logged step or event, truncated back to the checkpoint a resumed stage continues from. Signals are
:mod:`flexora_jax.signals` (a flag checked at safe points; :class:`Interrupted` re-exported here).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flexora_jax import fileio
from flexora_jax.errors import DataError
from flexora_jax.hooks import JsonlLogger
from flexora_jax.sharding import is_main_process
from flexora_jax.signals import Interrupted

METRICS_FILE = "metrics.jsonl"


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


class RunLog(JsonlLogger):
    """A run's ``metrics.jsonl`` (:class:`flexora_jax.hooks.JsonlLogger`): one JSON object per step or event;
    :meth:`stage_hook` makes it a stage's hook."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__(Path(run_dir) / METRICS_FILE)


# ---------------------------------------------------------------------------------------- progress
def progress_enabled() -> bool:
    """Progress bars on process 0 unless ``FLEXORA_PROGRESS=0`` (``--quiet``)."""
    return is_main_process() and os.environ.get("FLEXORA_PROGRESS", "1") != "0"


def progress(total: int, initial: int, desc: str, unit: str = "step") -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        disable=not progress_enabled(),
    )


__all__ = [
    "Interrupted",
    "METRICS_FILE",
    "RunLog",
    "progress",
    "progress_enabled",
    "read_json",
    "write_json",
    "write_text",
]
