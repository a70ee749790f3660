"""Hooks of the one driver (:func:`flexora_jax.loops.drive`): checkpoints, validation, logs, progress, callbacks.

Every feature around a training loop is a :class:`~flexora_jax.loops.Hook`, so it exists once and serves
every stage (search, fine-tune, AdaLoRA) of every model (the built-in decoder, any Flax NNX model):

- :class:`Checkpoint`: adapter-only orbax checkpoints (the stage's state, never the frozen base, plus the
  batch positions and the stage's identity) every N steps, at the end and on a stop request; resumes from
  the latest one, refusing a checkpoint written for another model, config or data.
- :class:`Validation`: the validation loss every N steps and, with ``keep_best``, the best LoRA.
- :class:`JsonlLogger`: one JSON object per step in a ``metrics.jsonl`` (truncated back to the step a
  resumed stage continues from; a non-finite stop or an interrupt is recorded as an event).
- :class:`Progress`: a tqdm bar; :class:`Callback`: ``fn(step, record)`` with the state and batch positions.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flexora_jax import fileio, signals
from flexora_jax.checkpoint import StageCheckpointer
from flexora_jax.data import Dataset, batches_in_order
from flexora_jax.errors import CheckpointError, NumericsError
from flexora_jax.loops import Hook, RunContext, Stage
from flexora_jax.sharding import fetch, is_main_process

log = logging.getLogger("flexora_jax")


class Checkpoint(Hook):
    """Save the stage's state every ``every`` steps, at its last step and when a stop is requested; resume.

    ``directory`` holds this stage's numbered orbax checkpoints. A checkpoint records the stage's identity
    (model and LoRA layout, config, data, seed): resuming from one written for anything else is a
    :class:`CheckpointError` naming what differs, never a silent mix.
    """

    def __init__(self, directory: str | os.PathLike, every: int = 10, keep: int = 2, restore: bool = True) -> None:
        self.directory, self.every, self.keep, self.restore = Path(directory), every, keep, restore
        self._ckpt: StageCheckpointer | None = None

    def _manager(self) -> StageCheckpointer:
        if self._ckpt is None:
            self._ckpt = StageCheckpointer(self.directory, self.every, self.keep, required_meta=("sampler",))
        return self._ckpt

    @property
    def latest_step(self) -> int | None:
        return self._manager().latest_step()

    def resume(self, stage: Stage, template: Any) -> Any | None:
        if not self.restore:
            return None
        restored = self._manager().restore(template)
        if restored is None:
            return None
        state, meta = restored
        _check_identity(meta.get("identity"), stage.identity, self.directory)
        stage.reposition(meta["sampler"])
        log.info("%s: resuming from checkpoint step %d in %s", stage.name, int(meta["step"]), self.directory)
        return state

    def step(self, run: RunContext, step: int, state: Any, record: dict) -> None:
        ckpt = self._manager()
        if ckpt.due(step) or step == run.stage.total or signals.requested():
            ckpt.save(step, state, {"sampler": run.stage.positions(), "identity": dict(run.stage.identity)}, force=True)

    def close(self, run: RunContext, error: BaseException | None) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None


def _check_identity(saved: Any, current: Mapping[str, Any], directory: Path) -> None:
    """Refuse a checkpoint whose identity differs from this stage's, naming the differing entries."""
    if saved is None:  # written before identities were stored: nothing to compare
        return
    current = json.loads(json.dumps(dict(current), default=str))
    if saved == current:
        return
    keys = sorted(set(saved) | set(current))
    diff = [
        f"{k}: checkpoint {_short(saved.get(k))} vs now {_short(current.get(k))}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    raise CheckpointError(
        f"the checkpoint in {directory} belongs to another run ({'; '.join(diff)}); resume with "
        "the settings and data it was written with, or use another checkpoint directory"
    )


def _short(value: Any) -> str:
    if isinstance(value, Mapping) and value:
        return "{" + ", ".join(f"{k}={v!r}" for k, v in list(value.items())[:12]) + "}"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class Validation(Hook):
    """Mean validation loss every ``every`` steps and at the last step (added to the record as ``val_loss``).

    ``evaluate(base, state) -> float`` computes it; with ``keep_best`` the hook keeps a host copy of
    ``pick(state)`` (the LoRA) at the best validation loss in :attr:`best`.
    """

    def __init__(
        self,
        evaluate: Callable[[Any, Any], float],
        every: int,
        keep_best: bool = False,
        pick: Callable[[Any], Any] = lambda state: state.lora,
    ) -> None:
        self.evaluate, self.every, self.keep_best, self.pick = evaluate, every, keep_best, pick
        self.best_loss, self.best = math.inf, None

    def step(self, run: RunContext, step: int, state: Any, record: dict) -> None:
        if self.every <= 0 or not (step % self.every == 0 or step == run.stage.total):
            return
        record["val_loss"] = loss = float(self.evaluate(run.base, state))
        if self.keep_best and loss < self.best_loss:
            self.best_loss, self.best = loss, jax.tree.map(jnp.asarray, fetch(self.pick(state)))


def dataset_mean(
    loss: Callable[..., jax.Array],
    count: Callable[[Any], jax.Array],
    base: Any,
    lora: Any,
    hyper: Any,
    data: Dataset,
    batch_size: int = 64,
) -> float:
    """Mean per-token loss over a whole dataset: each batch's mean weighted by its target-token count."""
    total, tokens = 0.0, 0.0
    for batch in batches_in_order(data, batch_size):
        value, n = _weighted(loss, count, base, lora, hyper, batch)
        total, tokens = total + float(value), tokens + float(n)
    return total / max(tokens, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weighted(
    loss: Callable[..., jax.Array], count: Callable[[Any], jax.Array], base: Any, lora: Any, hyper: Any, batch: Any
) -> tuple[jax.Array, jax.Array]:
    n = count(batch)
    return loss(base, lora, hyper, batch, None) * n, n


class JsonlLogger(Hook):
    """``metrics.jsonl``: one JSON object per step (``stage``, the record, ``seconds`` since the last one).

    On start the file is truncated back to the step the stage continues from (a resumed stage logs its
    steps again), keeping events; a non-finite stop is written as an event. Only process 0 writes.
    """

    def __init__(self, path: str | os.PathLike, stage: str | None = None) -> None:
        self.path, self.stage = Path(path), stage
        self.last_step: dict[str, int] = {}
        self._t = time.perf_counter()

    def write(self, record: Mapping[str, Any]) -> None:
        self.last_step[str(record.get("stage", ""))] = _step_of(record)
        if not is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")
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
                continue
            if isinstance(rec, dict) and (stage is None or rec.get("stage") == stage):
                out.append(rec)
        return out

    def truncate(self, stage: str, step: int) -> None:
        """Drop ``stage`` records after ``step`` (a resumed stage logs them again) and any cut line."""
        self.last_step[stage] = int(step)
        if not self.path.exists() or not is_main_process():
            return
        keep = [r for r in self.records() if "event" in r or not (r.get("stage") == stage and _step_of(r) > step)]
        fileio.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def stage_hook(self, stage: str) -> JsonlLogger:
        """This log as the hook of one named stage (``search_layer``, ...), sharing its file and step record."""
        hook = copy.copy(self)
        hook.stage = stage
        return hook

    def _name(self, run: RunContext) -> str:
        return self.stage or run.stage.name

    def start(self, run: RunContext) -> None:
        self.truncate(self._name(run), run.start)
        self._t = time.perf_counter()

    def step(self, run: RunContext, step: int, state: Any, record: dict) -> None:
        now = time.perf_counter()
        self.write({"stage": self._name(run), **record, "seconds": round(now - self._t, 4)})
        self._t = now

    def close(self, run: RunContext, error: BaseException | None) -> None:
        if isinstance(error, NumericsError):
            name = self._name(run)
            self.write(
                {
                    "stage": name,
                    "step": self.last_step.get(name, run.start) + 1,
                    "event": "non_finite",
                    "message": str(error),
                }
            )


def _step_of(record: Mapping[str, Any]) -> int:
    step = record.get("step", 0)
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


class Progress(Hook):
    """A progress bar on stderr (process 0), showing ``key`` of the latest record."""

    def __init__(self, desc: str | None = None, key: str | None = None, enabled: bool = True) -> None:
        self.desc, self.key, self.enabled = desc, key, enabled and is_main_process()
        self._bar: Any = None

    def start(self, run: RunContext) -> None:
        self._bar = tqdm(
            total=run.stage.total,
            initial=run.start,
            desc=self.desc or run.stage.name,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
            disable=not self.enabled,
        )

    def step(self, run: RunContext, step: int, state: Any, record: dict) -> None:
        self._bar.update(1)
        key = self.key or next((k for k in ("val_loss", "loss", "train_loss") if k in record), None)
        if key in record:
            self._bar.set_postfix({key: f"{record[key]:.4f}"}, refresh=False)

    def close(self, run: RunContext, error: BaseException | None) -> None:
        if self._bar is not None:
            self._bar.close()


class Callback(Hook):
    """``fn(step, record)`` after each step; ``record`` also holds ``state`` and ``sampler`` (the batch
    positions): what ``state=`` / ``sampler_states=`` resume from. ``fn`` may raise to stop the stage."""

    def __init__(self, fn: Callable[[int, dict], None]) -> None:
        self.fn = fn

    def step(self, run: RunContext, step: int, state: Any, record: dict) -> None:
        self.fn(step, dict(record, state=state, sampler=run.stage.positions()))


def host_tree(tree: Any) -> Any:
    """Host-local numpy copies of (possibly sharded, multi-process) arrays."""
    return jax.tree.map(np.asarray, fetch(tree))
