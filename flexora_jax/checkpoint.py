"""Resumable training state on disk: an orbax ``CheckpointManager`` per stage of a run.

A stage (one search, one fine-tune) saves its whole state every ``every`` steps and at its end: the
LoRA params, the optimizer states, the gates and their optimizer, the step, the RNG key (as raw key
data) and, next to the arrays, a small JSON record with the data position of every batch stream.
Restoring needs a *target* built from a fresh state of the same shapes: without one orbax turns
optax's NamedTuple states into lists and drops the static metadata (LoRA spec, gate power) that
lives in the pytree structure.

Only process 0 decides what to write elsewhere in the run directory; orbax coordinates its own
multi-host writes, so every process calls :meth:`StageCheckpointer.save`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flexora_jax.errors import CheckpointError, check_tree_shapes
from flexora_jax.sharding import partition_specs

log = logging.getLogger("flexora_jax")


class CheckpointWarning(UserWarning):
    """A checkpoint was unusable and an earlier one was used instead."""


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax logs a failed write from each of its threads (tracebacks included) before raising it: the
    caller reports the error once, as a :class:`CheckpointError`."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (orbax stores plain arrays only)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree: Any, template: Any) -> Any:
    """Undo :func:`to_savable` where the template holds a typed key."""
    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x, tree, template
    )


class StageCheckpointer:
    """Save / restore one stage's state under ``directory`` (an absolute path is made from any path).

    Args:
      directory: where this stage's numbered checkpoints live (e.g. ``run/checkpoints/search_layer``).
      every: save every N steps (plus whatever :meth:`save` is forced to save); 0 = forced saves only.
      keep: how many checkpoints to keep.
    """

    def __init__(
        self, directory: str | os.PathLike, every: int = 10, keep: int = 2, required_meta: tuple[str, ...] = ()
    ) -> None:
        self.required_meta = required_meta  # keys a usable checkpoint's metadata must hold
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
        """Save ``state`` (a pytree) and ``meta`` (JSON-able) as ``step``; a no-op if not due (unless forced)."""
        if not (force or self.due(step)):
            return False
        if self._manager.latest_step() == step:
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(to_savable(state)), meta=ocp.args.JsonSave(dict(meta, step=int(step)))
        )
        try:
            with _quiet_orbax():
                self._manager.save(step, args=args, force=True)
                self._manager.wait_until_finished()
        except Exception as exc:  # a full disk or a read-only place reaches us through orbax and tensorstore
            raise CheckpointError(
                f"could not save checkpoint step {step} in {self.directory} "
                f"({type(exc).__name__}: {exc}); the earlier checkpoints are kept"
            ) from None
        return True

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the latest (or given) checkpoint, shaped like ``template``; None if none.

        Without ``step``, a latest checkpoint that cannot be read (truncated, corrupt or mis-shaped
        files) is skipped with a warning and the previous one is restored instead; only when every
        checkpoint fails is :class:`CheckpointError` raised (naming each step and its problem).
        """
        if step is not None:
            return self._restore_step(template, step)
        steps = self.all_steps()
        if not steps:
            return None
        failures = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(template, candidate)
            except CheckpointError as exc:
                failures.append(str(exc))
                log.warning(
                    "checkpoint step %d in %s is unusable, falling back to the previous one: %s",
                    candidate,
                    self.directory,
                    exc,
                )
                warnings.warn(
                    f"checkpoint step {candidate} in {self.directory} is corrupt or unreadable; "
                    "falling back to the previous checkpoint",
                    CheckpointWarning,
                    stacklevel=2,
                )
                continue
            if failures:
                self._discard_after(candidate)
            return restored
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + " | ".join(failures)
            + "; delete that directory to restart this stage from its beginning"
        )

    def _discard_after(self, step: int) -> None:
        """Remove the unusable checkpoints after ``step`` so the resumed stage can save those steps again."""
        for s in self.all_steps():
            if s > step:
                shutil.rmtree(self.directory / str(s), ignore_errors=True)
        self._manager.reload()

    def _restore_step(self, template: Any, step: int) -> tuple[Any, dict[str, Any]]:
        savable = to_savable(template)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x, savable
        )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as exc:  # orbax raises ValueError / FileNotFoundError / tensorstore errors
            raise CheckpointError(
                f"could not restore checkpoint step {step} from {self.directory} "
                f"({type(exc).__name__}: {exc}); delete that step directory to fall back to "
                "an earlier one, or start the run afresh without --resume"
            ) from None
        state = from_savable(restored["state"], template)
        check_tree_shapes(
            state, template, f"checkpoint step {step} in {self.directory} (expected the shapes of this run's config)"
        )
        meta = restored["meta"]
        missing = [k for k in self.required_meta if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has damaged metadata (missing "
                f"{missing}); expected a JSON object with {list(self.required_meta)}"
            )
        return state, dict(meta)

    def close(self) -> None:
        self._manager.close()


# ----------------------------------------------------------------------------- sharded checkpoints
def save_sharded(directory: str | os.PathLike, tree: Any) -> Path:
    """Write a (sharded) pytree with orbax: every process writes its own shards; returns the path."""
    path = Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, to_savable(tree), force=True)
        ckpt.wait_until_finished()
    return path


def restore_sharded(directory: str | os.PathLike, template: Any, mesh: Mesh, specs: Any = None) -> Any:
    """Restore a :func:`save_sharded` checkpoint onto ``mesh`` (any mesh shape), shaped like ``template``.

    Each device reads only its shard of the new layout; ``template`` (real or ``jax.eval_shape`` values)
    gives the structure, shapes and dtypes, ``specs`` the layout (default :func:`partition_specs`).
    """
    specs = partition_specs(template, mesh) if specs is None else specs
    savable = jax.eval_shape(to_savable, template)  # typed PRNG keys -> their uint32 key data
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        savable,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(Path(directory).absolute(), abstract)
    except Exception as exc:  # orbax raises ValueError / FileNotFoundError / tensorstore errors
        raise CheckpointError(
            f"could not restore {directory} onto mesh {dict(mesh.shape)} ({type(exc).__name__}: {exc})"
        ) from None

    def unwrap(x, t):
        if not jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            return x
        return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t) if isinstance(t, jax.Array) else None)

    return jax.tree.map(unwrap, restored, template)
