"""``flexora-jax`` with injected faults, for the tests that kill or break a real run in a subprocess.

    python tests/fault_cli.py run --output-dir DIR ...     (the same arguments as ``flexora-jax``)

Faults, from the environment (test hooks live here, never in the package):
- ``FAULT_NAN_AFTER=<stage>:<step>``: once ``<stage>`` has logged ``<step>``, every float array of the run's
  data becomes NaN, so the next step meets a real NaN loss (the NaN path end to end, no divergent config);
- ``FAULT_SAVE_DELAY=<seconds>``: every checkpoint save pauses after its files are written into orbax's
  temporary directory and before the rename, so a test can kill a run in the middle of a save;
- ``FAULT_SLOW_STAGE=<stage>:<seconds>:<marker file>``: the ``search``, ``finetune``, ``evaluate`` or ``export``
  stage first touches the marker file, then blocks for that long as one long call that reaches no safe point
  would (short sleeps, no signal check), then runs: a signal sent meanwhile must stop the stage at its first
  safe point, with exit status 128 + signal.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np
from orbax.checkpoint._src.path import atomicity

from flexora_jax import cli
from flexora_jax.pipeline import io, stages


def _nan_after(spec: str) -> None:
    stage, step = spec.rsplit(":", 1)
    workspaces = []
    prepare, write = stages.prepare, io.RunLog.write

    def capturing_prepare(*args, **kwargs):
        ws = prepare(*args, **kwargs)
        workspaces.append(ws)
        return ws

    def poisoning_write(self, record):
        write(self, record)
        if record.get("stage") == stage and record.get("step") == int(step) and "event" not in record:
            for split in (workspaces[-1].data.train, workspaces[-1].data.val, workspaces[-1].data.finetune):
                for arr in split.values():
                    if np.issubdtype(arr.dtype, np.floating):
                        arr[...] = np.nan

    stages.prepare = capturing_prepare
    io.RunLog.write = poisoning_write


def _slow_stage(spec: str) -> None:
    stage, seconds, marker = spec.split(":", 2)
    original = getattr(stages, f"{stage}_stage")

    def slow(*args, **kwargs):
        Path(marker).touch()
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return original(*args, **kwargs)

    setattr(stages, f"{stage}_stage", slow)


def _save_delay(seconds: float) -> None:
    cls = atomicity.AtomicRenameTemporaryPath
    original = cls.finalize

    async def finalize(self, *args, **kwargs):
        await asyncio.sleep(seconds)
        return await original(self, *args, **kwargs)

    cls.finalize = finalize


if __name__ == "__main__":
    if os.environ.get("FAULT_NAN_AFTER"):
        _nan_after(os.environ["FAULT_NAN_AFTER"])
    if os.environ.get("FAULT_SLOW_STAGE"):
        _slow_stage(os.environ["FAULT_SLOW_STAGE"])
    if float(os.environ.get("FAULT_SAVE_DELAY", "0") or 0) > 0:
        _save_delay(float(os.environ["FAULT_SAVE_DELAY"]))
    sys.exit(cli.main())
