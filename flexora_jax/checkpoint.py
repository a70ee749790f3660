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

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flexora_jax.errors import CheckpointError


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (orbax stores plain arrays only)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree: Any, template: Any) -> Any:
    """Undo :func:`to_savable` where the template holds a typed key."""
    return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
                        tree, template)


class StageCheckpointer:
    """Save / restore one stage's state under ``directory`` (an absolute path is made from any path).

    Args:
      directory: where this stage's numbered checkpoints live (e.g. ``run/checkpoints/search_layer``).
      every: save every N steps (plus whatever :meth:`save` is forced to save); 0 = forced saves only.
      keep: how many checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, every: int = 10, keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.every = every
        self._ocp = ocp
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
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(to_savable(state)),
                                        meta=self._ocp.args.JsonSave(dict(meta, step=int(step))))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return True

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the latest (or given) checkpoint, shaped like ``template``; None if none."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        savable = to_savable(template)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x,
                                savable)
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract),
                                        meta=self._ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as exc:  # orbax raises ValueError / FileNotFoundError / tensorstore errors
            raise CheckpointError(f"could not restore checkpoint step {step} from {self.directory} "
                                  f"({type(exc).__name__}: {exc}); delete that step directory to fall back to "
                                  "an earlier one, or start the run afresh without --resume") from None
        return from_savable(restored["state"], template), dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()
