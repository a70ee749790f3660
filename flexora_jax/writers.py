"""Metric writers as hooks of the one driver: TensorBoard event files and Weights & Biases runs.

Each writer is a :class:`~flexora_jax.loops.Hook`, so it serves every stage (search, fine-tune, AdaLoRA) of
every model (the built-in decoder, any Flax NNX model) the same way: pass it in ``hooks=[...]`` of
``fj.search`` / ``fj.finetune`` / ``fj.finetune_adalora``. A step's record becomes flat scalars
(:func:`scalars`: numbers as they are, a list such as the layer gates as ``gates/0``, ``gates/1``, ...),
written on process 0 only. ``metrics.jsonl`` stays :class:`flexora_jax.hooks.JsonlLogger`.

- :class:`TensorBoardWriter`: one TensorBoard run per stage (``<logdir>/<stage>/events.out.tfevents.*``),
  tags are the record's keys, so the fine-tunes of several methods share one chart per metric. Written with
  the ``tensorboard`` package's pure-Python event writer (``pip install 'flexora_jax[tensorboard]'``; no
  TensorFlow). A resumed stage first writes a ``SessionLog.START`` at the step it continues from, so
  TensorBoard drops the steps the interrupted run logged after its checkpoint (they are logged again).
- :class:`WandbWriter`: one W&B run per stage (grouped by ``group``, ``job_type`` = the stage), finished when
  the stage ends; or, given a run (``run=`` or an active ``wandb.run``), that run, with stage-prefixed keys
  on each stage's own step axis. ``pip install 'flexora_jax[wandb]'``; ``WANDB_MODE=offline`` works offline.

Example::

    tb = fj.writers.TensorBoardWriter("runs/tb")
    fj.search(model, search_config, train, val, hooks=[tb])
    fj.finetune(model, train, hooks=[tb])        # tensorboard --logdir runs/tb
"""

from __future__ import annotations

import copy
import importlib.util
import numbers
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flexora_jax.errors import ConfigError
from flexora_jax.loops import Hook, RunContext
from flexora_jax.sharding import is_main_process

#: Record keys that are not metrics (the step is the x axis; the stage names the run).
NOT_METRICS = ("step", "stage", "event", "message")


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A step's record as flat ``{name: float}``: numbers kept (NaN / Inf too), a list or tuple of numbers
    as ``name/0``, ``name/1``, ... (the layer gates), anything else (text, booleans, nested data) left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_METRICS:
            continue
        if _number(value):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)) and all(_number(v) for v in value):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars are Real


class MetricWriter(Hook):
    """A hook that writes each step's :func:`scalars` under the stage's name (``stage``, else the driver's
    stage name: ``search``, ``finetune``, ``adalora``); :meth:`stage_hook` names it for one stage of a run."""

    def __init__(self, stage: str | None = None) -> None:
        self.stage = stage

    def stage_hook(self, stage: str) -> MetricWriter:
        """This writer for one named stage (``search_layer``, ``finetune_lora``, ...), sharing its settings."""
        hook = copy.copy(self)
        hook.stage = stage
        return hook

    def name(self, run: RunContext) -> str:
        return self.stage or run.stage.name

    def step(self, run: RunContext, step: int, state: Any, record: dict) -> None:
        if is_main_process():
            self.write(run, step, scalars(record))

    def write(self, run: RunContext, step: int, values: dict[str, float]) -> None:
        """Write one step's scalars (subclasses)."""


def _require(package: str, writer: str) -> None:
    """Refuse a writer whose optional package is missing when it is made, not steps later when it starts."""
    if sys.modules.get(package) is None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{writer} needs the {package} package, which is not installed: pip install "
            f"'flexora_jax[{package}]' (or pip install {package})"
        )


# ----------------------------------------------------------------------------------------- TensorBoard
class TensorBoardWriter(MetricWriter):
    """TensorBoard event files: ``<logdir>/<stage>/`` per stage, one scalar per record key and step.

    Args:
      logdir: the TensorBoard log directory (``tensorboard --logdir <logdir>``).
      stage: the run name inside ``logdir`` (default: the stage's name).
      flush_secs: how often pending events reach the disk (they always do when the stage ends).
    """

    def __init__(self, logdir: str | os.PathLike, stage: str | None = None, flush_secs: float = 10.0) -> None:
        super().__init__(stage)
        _require("tensorboard", "TensorBoardWriter")
        self.logdir, self.flush_secs = Path(logdir), flush_secs
        self._writer: Any = None
        self._event: Any = None  # tensorboard's event_pb2 (imported when a stage starts)

    def start(self, run: RunContext) -> None:
        if not is_main_process():
            return
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event = event_pb2
        self._writer = EventFileWriter(str(self.logdir / self.name(run)), flush_secs=self.flush_secs)
        # steps after run.start were logged by an interrupted run and come again: TensorBoard drops them
        restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=run.start + 1, session_log=restart))

    def write(self, run: RunContext, step: int, values: dict[str, float]) -> None:
        event = self._event.Event(wall_time=time.time(), step=step)
        for tag, value in values.items():
            event.summary.value.add(tag=tag, simple_value=value)
        self._writer.add_event(event)

    def close(self, run: RunContext, error: BaseException | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------------------------- Weights & Biases
class WandbWriter(MetricWriter):
    """Weights & Biases: each stage its own run (``wandb.init(group=group, job_type=<stage>, ...)``, finished
    at the stage's end, failed if the stage failed), or stage-prefixed keys in a given run.

    Args:
      project, group, config, dir: passed to ``wandb.init`` (``group`` ties a search and its fine-tunes
        together; the run's config is the stage's identity: its settings, seed and data fingerprints, updated
        with ``config``).
      run: log into this run (not finished here) instead; an active ``wandb.run`` is used the same way.
        Its keys are ``<stage>/<metric>`` against ``<stage>/step`` (``define_metric``), so stages of
        different lengths share one run.
      stage: the stage's name (default: the driver's stage name).
      init_kwargs: more ``wandb.init`` arguments (``mode="offline"``, ``tags``, ``entity``, ...).
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        group: str | None = None,
        config: Mapping[str, Any] | None = None,
        dir: str | os.PathLike | None = None,
        run: Any = None,
        stage: str | None = None,
        **init_kwargs: Any,
    ) -> None:
        super().__init__(stage)
        _require("wandb", "WandbWriter")
        self.project, self.group, self.config, self.dir = project, group, config, dir
        self.run, self.init_kwargs = run, init_kwargs
        self._target: Any = None
        self._owned = False
        self._prefix = ""

    def start(self, run: RunContext) -> None:
        if not is_main_process():
            return
        import wandb

        name = self.name(run)
        given = self.run if self.run is not None else wandb.run
        if given is not None:
            self._target, self._owned, self._prefix = given, False, f"{name}/"
            given.define_metric(f"{name}/step")
            given.define_metric(f"{name}/*", step_metric=f"{name}/step")
            return
        if self.dir is not None:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
        config = {**dict(getattr(run.stage, "identity", None) or {}), **dict(self.config or {})}
        self._target = wandb.init(
            project=self.project,
            group=self.group,
            job_type=name,
            name=f"{self.group}/{name}" if self.group else name,
            config=config,
            dir=None if self.dir is None else str(self.dir),
            **self.init_kwargs,
        )
        self._owned, self._prefix = True, ""

    def write(self, run: RunContext, step: int, values: dict[str, float]) -> None:
        logged = {self._prefix + k: v for k, v in values.items()}
        if self._owned:
            self._target.log(logged, step=step)
        else:
            self._target.log({**logged, f"{self._prefix}step": step})

    def close(self, run: RunContext, error: BaseException | None) -> None:
        if self._target is not None and self._owned:
            self._target.finish(exit_code=0 if error is None else 1)
        self._target, self._owned = None, False


__all__ = ["MetricWriter", "NOT_METRICS", "TensorBoardWriter", "WandbWriter", "scalars"]
