"""The one host loop of the search and the fine-tune, on one device or many.

A training stage is a pure step ``(params, state, *batches) -> (state, metrics)`` (the search step of
:mod:`flexora_jax.bilevel`, the fine-tune step of :mod:`flexora_jax.train`). :func:`compile_step` jits it
once over a device mesh with explicit ``NamedSharding`` in / out shardings (the state donated, metrics
replicated); :func:`run` draws host batches, assembles them into global arrays and calls it, then hands
every step's metrics to the caller's hooks (logging, checkpoints, signals; a hook may raise to stop).

There is no separate single-device path: without a mesh the step runs on a one-device mesh
(:func:`default_mesh`), which compiles the same program a plain ``jax.jit`` would. On several devices
or processes every process draws the same global batch (same seeds) and contributes its own rows
(:meth:`Program.batch`); metrics come back replicated and are read on every process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from flexora_jax import sharding as sh
from flexora_jax.config import MeshConfig

Step = Callable[..., tuple[Any, dict]]
Hook = Callable[[int, Any, dict], None]


def default_mesh(mesh: Mesh | None = None) -> Mesh:
    """``mesh``, or a one-device mesh on the first device (the single-device run)."""
    return mesh if mesh is not None else sh.make_mesh(MeshConfig(num_devices=1))


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A step jitted over ``mesh``; :meth:`place` and :meth:`batch` put arguments where it wants them."""

    fn: Callable[..., Any]  # jax.jit with in / out shardings, argument 1 (the state) donated
    mesh: Mesh
    in_shardings: tuple  # one NamedSharding pytree per positional argument
    batch_dims: Mapping[int, int]  # positional argument -> its batch dimension

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def place(self, *args: Any) -> tuple:
        """The leading arguments (params, state, ...) on their in-shardings (a no-op where they are)."""
        return tuple(sh.put(a, s) for a, s in zip(args, self.in_shardings))

    def batch(self, batch: Any, arg: int) -> Any:
        """A batch that every process holds in full (same seed, same sampler) -> its global sharded array.

        Each process keeps only the rows :func:`flexora_jax.sharding.local_rows` gives it; on one process
        this is a sharded ``device_put``.
        """
        dim = self.batch_dims[arg]
        if jax.process_count() > 1:
            rows = int(np.shape(jax.tree.leaves(batch)[0])[dim])
            sl = sh.local_rows(self.mesh, rows)
            batch = jax.tree.map(lambda x: np.asarray(x)[(slice(None),) * dim + (sl,)], batch)
        return sh.global_batch(batch, self.mesh, dim)

    def lower(self, *args: Any) -> Any:
        return self.fn.lower(*args)


def _freeze(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=64)
def _jit(step: Step, in_key: tuple, out_key: tuple) -> Callable[..., Any]:
    in_s = tuple(jax.tree.unflatten(*k) for k in in_key)
    return jax.jit(step, in_shardings=in_s, out_shardings=jax.tree.unflatten(*out_key), donate_argnums=1)


def compile_step(step: Step, mesh: Mesh, args: Sequence[Any], batch_dims: Mapping[int, int]) -> Program:
    """``step`` jitted over ``mesh``; ``args`` are example arguments (real or abstract) giving the shapes.

    Params and state are sharded by :func:`flexora_jax.sharding.partition_specs`, batch arguments over
    ``("data", "fsdp")`` along ``batch_dims[arg]``, the metrics replicated; the state (argument 1) is
    donated. One program per (step, mesh, shapes): a second stage with the same settings reuses it.
    """
    in_s = tuple(sh.named(sh.batch_specs(a, mesh, batch_dims[i]), mesh) if i in batch_dims else sh.shardings(a, mesh)
                 for i, a in enumerate(args))
    out_s = (in_s[1], sh.replicated(mesh))
    fn = _jit(step, tuple(_freeze(s) for s in in_s), _freeze(out_s))
    return Program(fn, mesh, in_s, dict(batch_dims))


def run(program: Program, params: Any, state: Any, draw: Callable[[], Sequence[Any]], start: int, stop: int,
        hooks: Sequence[Hook] = ()) -> Any:
    """Steps ``start + 1 .. stop``: draw the host batches, run the step, call every hook with the metrics.

    Args:
      program: from :func:`compile_step`; ``params`` and ``state`` already placed (:meth:`Program.place`).
      draw: returns the step's batch arguments (positional arguments 2, 3, ...) as host arrays.
      hooks: ``hook(step, state, metrics)`` after each step, ``metrics`` as numpy on every process; a hook
        raises to stop the loop (a non-finite loss, a signal).
    Returns:
      the state after the last step.
    """
    for step in range(start, stop):
        batches = [program.batch(b, i) for i, b in enumerate(draw(), start=2)]
        state, metrics = program(params, state, *batches)
        metrics = sh.fetch(metrics)
        for hook in hooks:
            hook(step + 1, state, metrics)
    return state
