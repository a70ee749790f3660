"""Scale out with JAX's SPMD partitioner: a device mesh, partition rules, sharded steps, multi-host.

Design:
- One ``Mesh`` with three Auto axes: ``data`` (batch), ``fsdp`` (parameters and batch) and ``model``
  (tensor parallel). Every step is a ``jax.jit`` with explicit ``NamedSharding`` in/out shardings and
  the state donated; XLA's partitioner inserts every collective (no hand-written communication).
- Partition specs are derived from a leaf's *path* and shape, so one rule set covers the base params,
  the LoRA params, any optax state over them (Adam's ``mu``/``nu`` hold LoRA-shaped pytrees at the same
  relative paths) and the gates::

      embed      [v, d]         P("model", "fsdp")     lm_head   [d, v]         P("fsdp", "model")
      q/k/v/gate/up kernel [l, d, out]  P(None, "fsdp", "model")   bias [l, out]  P(None, "model")
      o/down kernel        [l, in, d]   P(None, "model", "fsdp")   norms          replicated
      LoRA a     [l, d_in, r]   P(None, <kernel's d_in axis>, None)
      LoRA b     [l, r, d_out]  P(None, None, <kernel's d_out axis>)
      gates, step counters, RNG keys    replicated
      batches    [b, ...]       P(("data", "fsdp"))  ([K, b, ...] for the search's K inner batches)

  A dimension that does not divide its mesh axis is replicated instead, with a warning, never a crash.
- Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize()`` when the
  environment asks for it; every process builds the same global mesh, feeds its own rows through
  :func:`global_batch` (``jax.make_array_from_process_local_data``) and writes files only on process 0
  (:func:`is_main_process`).
- This module knows meshes, specs and placement only: it imports no algorithm. Steps are jitted over a
  mesh by :mod:`flexora_jax.loops`, sharded checkpoints live in :mod:`flexora_jax.checkpoint`.

Example::

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, model=1))
    params = shard(params, mesh)                      # every leaf on its spec
    batch = global_batch(local_rows_of_batch, mesh)   # rows over ("data", "fsdp")
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexora_jax.config import MeshConfig  # MeshConfig lives in config (the run's mesh: section)
from flexora_jax.errors import ConfigError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

#: Spec of each linear kernel [l, d_in, d_out]: input projections shard d over fsdp and their output
#: features over model; output projections the reverse (Megatron-style column / row parallel pairs).
KERNEL_SPECS: dict[str, tuple] = {
    "q_proj": (None, "fsdp", "model"), "k_proj": (None, "fsdp", "model"), "v_proj": (None, "fsdp", "model"),
    "gate_proj": (None, "fsdp", "model"), "up_proj": (None, "fsdp", "model"),
    "o_proj": (None, "model", "fsdp"), "down_proj": (None, "model", "fsdp"),
}


# ------------------------------------------------------------------------------------------- mesh
def make_mesh(mesh_config: MeshConfig | Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, model)`` mesh with Auto axis types over ``devices`` (default: all, global).

    Args:
      mesh_config: a :class:`MeshConfig` (``flexora_jax.config.MeshConfig``, the run config's ``mesh:``
        section), a dict of axis sizes, or a (data, fsdp, model) tuple; None means all devices on ``fsdp``.
        With ``MeshConfig.num_devices`` > 0 (and no ``devices``) only the first that many devices are used.
    """
    if mesh_config is None:
        mesh_config = MeshConfig()
    elif isinstance(mesh_config, Mapping):
        unknown = set(mesh_config) - set(AXES)
        if unknown:
            raise ConfigError(f"unknown mesh axes {sorted(unknown)}; valid: {AXES}")
        mesh_config = MeshConfig(**{a: mesh_config.get(a, 1) for a in AXES})
    elif not isinstance(mesh_config, MeshConfig):
        mesh_config = MeshConfig(*mesh_config)
    if devices is None:
        devices = jax.devices()[:mesh_config.devices_to_use()]
    devices = list(devices)
    shape = mesh_config.resolve(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """``{axis: size}`` of a mesh, or of a plain dict (missing axes are 1)."""
    if isinstance(mesh, Mesh):
        return dict(mesh.shape)
    return {a: int(mesh.get(a, 1)) for a in AXES}


# ----------------------------------------------------------------------------------- partition rules
def _names(path: tuple) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def _rule(names: list[str], ndim: int) -> tuple:
    """The wanted spec (before divisibility checks) of a leaf at ``names`` with ``ndim`` dims."""
    last = names[-1] if names else ""
    parent = names[-2] if len(names) > 1 else ""
    if last in ("a", "b") and parent in KERNEL_SPECS and ndim == 3:  # LoRA A / B (and their optimizer moments)
        kernel = KERNEL_SPECS[parent]
        return (None, kernel[1], None) if last == "a" else (None, None, kernel[2])
    if last == "kernel" and parent in KERNEL_SPECS and ndim == 3:
        return KERNEL_SPECS[parent]
    if last == "bias" and parent in KERNEL_SPECS and ndim == 2:
        return (None, KERNEL_SPECS[parent][2])
    if last == "embed" and ndim == 2:
        return ("model", "fsdp")
    if last == "lm_head" and ndim == 2:
        return ("fsdp", "model")
    return ()


def _fit(spec: Sequence[Any], shape: tuple[int, ...], sizes: Mapping[str, int], where: str) -> P:
    """``spec`` with every axis that does not divide its dimension dropped (replicated), with a warning."""
    out = []
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        group = tuple(a for a in group if sizes.get(a, 1) > 1)
        n = math.prod(sizes[a] for a in group) if group else 1
        if group and shape[dim] % n:
            warnings.warn(f"sharding: {where} dim {dim} has size {shape[dim]}, not divisible by mesh axes "
                          f"{group} ({n} devices); that dimension is replicated", stacklevel=3)
            group = ()
        out.append(None if not group else group[0] if len(group) == 1 else group)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def leaf_spec(names: Sequence[str], shape: tuple[int, ...], mesh: Mesh | Mapping[str, int]) -> P:
    """The ``PartitionSpec`` of one leaf from its path names and shape (a loader building params shard by shard)."""
    names = [str(n) for n in names]
    return _fit(_rule(names, len(shape)), tuple(shape), axis_sizes(mesh), "/".join(names) or "leaf")


def partition_specs(tree: Any, mesh: Mesh | Mapping[str, int]) -> Any:
    """A ``PartitionSpec`` for every leaf of ``tree``, from its path and shape (rules in the module docstring).

    Works on base params, :class:`~flexora_jax.lora.LoraParams`, search / train states (optax states
    included), gates, and their ``jax.eval_shape`` abstractions.
    """
    sizes = axis_sizes(mesh)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: leaf_spec(_names(path), np.shape(leaf), sizes), tree)


def batch_specs(tree: Any, mesh: Mesh | Mapping[str, int], batch_dim: int = 0) -> Any:
    """Specs sharding dim ``batch_dim`` of every leaf over ``("data", "fsdp")`` (replicated if it does not divide)."""
    sizes = axis_sizes(mesh)

    def spec(path, leaf):
        shape = tuple(np.shape(leaf))
        if len(shape) <= batch_dim:
            return P()
        want = (None,) * batch_dim + (BATCH_AXES,)
        return _fit(want, shape, sizes, "batch " + "/".join(_names(path)))

    return jax.tree_util.tree_map_with_path(spec, tree)


def named(specs: Any, mesh: Mesh) -> Any:
    """``PartitionSpec`` tree -> ``NamedSharding`` tree on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every leaf of a params / LoRA / state pytree."""
    return named(partition_specs(tree, mesh), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree: Any, shardings_tree: Any) -> Any:
    """``jax.device_put`` that also places typed PRNG keys on shardings spanning several processes."""
    def one(x, s):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        return jax.device_put(x, s)

    return jax.tree.map(one, tree, shardings_tree)


def shard(tree: Any, mesh: Mesh, specs: Any = None) -> Any:
    """Place ``tree`` on ``mesh`` (specs from :func:`partition_specs` unless given).

    Host values must be equal on every process (jax checks it across hosts).
    """
    specs = partition_specs(tree, mesh) if specs is None else specs
    return put(tree, named(specs, mesh))


def global_batch(local: Any, mesh: Mesh, batch_dim: int = 0) -> Any:
    """Assemble each process's rows into global arrays sharded over ``("data", "fsdp")``.

    Every process passes the rows :func:`local_rows` names (``global batch / process_count`` rows); where
    the batch cannot be sharded (it does not divide the mesh) every process passes the whole batch.
    On a single process this is a plain sharded ``device_put``.
    """
    n = jax.process_count()

    def scaled(x):
        shape = tuple(np.shape(x))
        return tuple(d * n if i == batch_dim else d for i, d in enumerate(shape))

    specs = batch_specs(jax.tree.map(lambda x: jax.ShapeDtypeStruct(scaled(x), np.asarray(x).dtype), local),
                        mesh, batch_dim)

    def one(spec, x):
        x = np.asarray(x)
        sharded = len(spec) > batch_dim and spec[batch_dim] is not None
        shape = scaled(x) if sharded else x.shape
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, shape)

    return jax.tree.map(one, specs, local, is_leaf=lambda x: isinstance(x, P))


def local_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a global batch that this process's devices hold (what its data loader should read)."""
    spec = _fit((BATCH_AXES,), (global_rows,), axis_sizes(mesh), "batch")
    index = NamedSharding(mesh, spec).addressable_devices_indices_map((global_rows,))
    starts = [idx[0].indices(global_rows) for idx in index.values()]
    lo, hi = min(s[0] for s in starts), max(s[1] for s in starts)
    if spec == P() or jax.process_count() == 1:
        return slice(0, global_rows)
    return slice(lo, hi)


# ------------------------------------------------------------------------------------- multi-host
def initialize_distributed(force: bool = False) -> bool:
    """``jax.distributed.initialize()`` when the environment asks for it; True if running multi-process.

    It is asked for by ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``),
    by a cluster jax detects itself (a TPU pod slice, SLURM, Open MPI) when ``FLEXORA_DISTRIBUTED=1``,
    or by ``force``. On CPU the gloo collectives are switched on. Calling it twice is harmless.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    env = os.environ
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    elif not (force or env.get("FLEXORA_DISTRIBUTED") == "1"):
        return False
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on process 0 (the one that logs and writes run files)."""
    return jax.process_index() == 0


def fetch(tree: Any) -> Any:
    """Global arrays -> numpy on every process (gathers shards that live on other hosts)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
