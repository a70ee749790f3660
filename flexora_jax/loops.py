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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from flexora_jax import sharding as sh
from flexora_jax import signals
from flexora_jax.config import MeshConfig
from flexora_jax.errors import check_tree_shapes

Step = Callable[..., tuple[Any, dict]]


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
    in_s = tuple(
        sh.named(sh.batch_specs(a, mesh, batch_dims[i]), mesh) if i in batch_dims else sh.shardings(a, mesh)
        for i, a in enumerate(args)
    )
    out_s = (in_s[1], sh.replicated(mesh))
    fn = _jit(step, tuple(_freeze(s) for s in in_s), _freeze(out_s))
    return Program(fn, mesh, in_s, dict(batch_dims))


# ------------------------------------------------------------------------------------ the driver
@dataclasses.dataclass
class Stage:
    """One training stage as the driver runs it (built by :mod:`flexora_jax.engine` from a problem).

    Fields:
      name: "search", "finetune" or "adalora" (what logs and checkpoints call it).
      step: the pure step ``(base, state, *batches) -> (state, metrics)``.
      fresh: a fresh state (also the shape template of a restore).
      samplers: the stage's batch streams by name (their positions are checkpointed).
      draw: the host batches of one step (positional arguments 2, 3, ...).
      abstract: their shapes and dtypes (what the step compiles for).
      batch_dims: positional argument -> its batch dimension.
      total: the last step.
      record: ``record(step, metrics) -> dict`` of host floats (raises ``NumericsError`` when non-finite).
      host_update: ``host_update(step, state, metrics) -> state``, host logic between steps (AdaLoRA's
        allocator); None: none.
      identity: JSON-able: what a checkpoint of this stage must match to be resumed.
    """

    name: str
    step: Step
    fresh: Callable[[], Any]
    samplers: Mapping[str, Any]
    draw: Callable[[], Sequence[Any]]
    abstract: Callable[[], Sequence[Any]]
    batch_dims: Mapping[int, int]
    total: int
    record: Callable[[int, Mapping[str, Any]], dict]
    host_update: Callable[[int, Any, Mapping[str, Any]], Any] | None = None
    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def positions(self) -> dict[str, Any]:
        """Every batch stream's position (what a checkpoint stores beside the state)."""
        return {name: sampler.state() for name, sampler in self.samplers.items()}

    def reposition(self, positions: Mapping[str, Any]) -> None:
        for name, sampler in self.samplers.items():
            sampler.restore(positions[name])


@dataclasses.dataclass
class RunContext:
    """What hooks see of a running stage: the stage, its first step, the mesh, the base and the history."""

    stage: Stage
    start: int
    mesh: Mesh
    base: Any = None
    history: list[dict] = dataclasses.field(default_factory=list)


class Hook:
    """A driver hook; override what you need. Hooks run in order after every step; one may raise to stop.

    ``resume(stage, template)`` may return a state to start from (a checkpoint), ``start`` runs once the
    program is compiled, ``step`` after each step with the step's record (a hook may add keys to it for the
    hooks after it, as validation does), ``close`` once at the end (``error``: the exception that ended
    the stage, or None).
    """

    def resume(self, stage: Stage, template: Any) -> Any | None:  # noqa: ARG002
        return None

    def start(self, run: RunContext) -> None:
        pass

    def step(self, run: RunContext, step: int, state: Any, record: dict) -> None:
        pass

    def close(self, run: RunContext, error: BaseException | None) -> None:
        pass


def drive(
    stage: Stage,
    base: Any,
    *,
    hooks: Sequence[Hook] = (),
    mesh: Mesh | None = None,
    state: Any = None,
    sampler_states: Mapping[str, Any] | None = None,
) -> tuple[Any, list[dict]]:
    """Run ``stage`` from its start to ``stage.total``: the one loop of every search and fine-tune.

    The start state is ``state`` (checked against a fresh one) or, failing that, the first hook's
    :meth:`Hook.resume` (a checkpoint), or a fresh state; ``sampler_states`` repositions the batch streams.
    The step is compiled once over ``mesh`` (None: one device), then every step draws its host batches,
    runs, reads the metrics back, records them and calls every hook; a requested stop
    (:mod:`flexora_jax.signals`) raises :class:`~flexora_jax.signals.Interrupted` after the hooks, so a
    checkpoint hook has saved first. Returns the final state and the records of the steps run.
    """
    if sampler_states is not None:
        stage.reposition(sampler_states)
    if state is not None:
        check_tree_shapes(state, jax.eval_shape(stage.fresh), f"{stage.name}: the given state")
    else:
        template = stage.fresh()
        state = next((s for s in (h.resume(stage, template) for h in hooks) if s is not None), template)
    mesh = default_mesh(mesh)
    program = compile_step(stage.step, mesh, (base, state, *stage.abstract()), stage.batch_dims)
    base, state = program.place(base, state)
    run = RunContext(stage, int(np.asarray(sh.fetch(state.step))), mesh, base)
    error: BaseException | None = None
    try:
        for h in hooks:
            h.start(run)
        for step in range(run.start + 1, stage.total + 1):
            batches = [program.batch(b, i) for i, b in enumerate(stage.draw(), start=2)]
            state, metrics = program(base, state, *batches)
            metrics = sh.fetch(metrics)
            record = stage.record(step, metrics)
            if stage.host_update is not None:
                state = stage.host_update(step, state, metrics)
            run.history.append(record)
            for h in hooks:
                h.step(run, step, state, record)
            signals.check(f"at {stage.name} step {step}/{stage.total}")
    except BaseException as exc:
        error = exc
        raise
    finally:
        for h in hooks:
            h.close(run, error)
    return state, run.history
