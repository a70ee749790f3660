"""Scale out with JAX's SPMD partitioner: a device mesh, partition rules, sharded steps, multi-host.

Design:
- One ``Mesh`` with three Auto axes: ``data`` (batch), ``fsdp`` (parameters and batch) and ``model``
  (tensor parallel). Every step is a ``jax.jit`` with explicit ``NamedSharding`` in/out shardings and
  the state donated; XLA's partitioner inserts every collective (no hand-written communication).
- Sharding by logical axes (as MaxText): every array has a tuple of logical axis names (:class:`Axes`), one
  per dimension, and one rules table (:data:`DEFAULT_RULES`, overridable per call or in an
  :func:`axis_rules` block) maps logical axes to mesh axes. The built-in decoder's names::

      embed      [vocab, embed]                 lm_head  [embed, vocab]         final_norm  [norm]
      q_proj     [layers, embed, heads]         k/v_proj [layers, embed, kv_heads]
      o_proj     [layers, heads, embed]         biases   [layers, <kernel's out axis>]
      gate/up    [layers, embed, mlp]           down     [layers, mlp, embed]
      w1/w3      [layers, expert, embed, mlp]   w2       [layers, expert, mlp, embed]   router [layers, embed, expert]
      norms      [layers, norm]                 q/k_norm [layers, head_dim]
      LoRA a     [layers, (expert,) <kernel's in axis>, rank]   b  [layers, (expert,) rank, <kernel's out axis>]
      DoRA magnitude [layers, <out axis>]       AdaLoRA e, traced layouts [layers, rank]
      gates, step counters, RNG keys: replicated
      batches    [b, ...]  P(("data", "fsdp"))  ([K, b, ...] for the search's K inner batches)

  and the default rules ``vocab, heads, kv_heads, mlp -> model``, ``embed -> fsdp``, ``layers, expert, rank,
  norm, head_dim -> None`` give embed ``P("model", "fsdp")``, q_proj ``P(None, "fsdp", "model")``, o_proj
  ``P(None, "model", "fsdp")``, the experts ``P(None, None, "fsdp", "model")``.
  ``models.llama.param_axes(config)`` and ``lora.lora_axes(spec)`` give the trees of names beside the params
  and the LoRA; :func:`partition_specs` finds a leaf's names from NNX metadata, from given axes trees
  (matched by structure, so optimizer moments follow their leaves) or from :data:`DECODER_AXES` by
  relative path. A leaf with no names is an error naming it, never a silent replication; a dimension that
  does not divide its mesh axes is replicated instead, with a warning, never a crash.
- NNX variables carry the same names: ``fj.nnx.LlamaForCausalLM`` and its LoRA hold ``out_sharding`` (the
  logical names) and ``sharding_rules`` metadata (:func:`sharding_metadata`), so ``nnx.get_partition_spec``
  and :func:`partition_specs` agree; an ``add_lora``'d model's LoRA inherits its kernel's annotation.
- Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize()`` when the
  environment asks for it; every process builds the same global mesh, feeds its own rows through
  :func:`global_batch` (``jax.make_array_from_process_local_data``) and writes files only on process 0
  (:func:`is_main_process`).
- This module knows meshes, specs and placement only: it imports no algorithm. Steps are jitted over a
  mesh by :mod:`flexora_jax.loops`, sharded checkpoints live in :mod:`flexora_jax.checkpoint`.

Example::

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, model=1))
    params = shard(params, mesh)                      # every leaf on its spec
    with axis_rules({"embed": None}):                 # another layout: params replicated over fsdp
        specs = partition_specs(params, mesh, param_axes(config))
    batch = global_batch(local_rows_of_batch, mesh)   # rows over ("data", "fsdp")
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flexora_jax.config import MeshConfig  # MeshConfig lives in config (the run's mesh: section)
from flexora_jax.errors import ConfigError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------------------------------- mesh
def make_mesh(
    mesh_config: MeshConfig | Mapping[str, int] | Sequence[int] | None = None, devices: Sequence[Any] | None = None
) -> Mesh:
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
        devices = jax.devices()[: mesh_config.devices_to_use()]
    devices = list(devices)
    shape = mesh_config.resolve(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """``{axis: size}`` of a mesh, or of a plain dict (missing axes are 1)."""
    if isinstance(mesh, Mesh):
        return dict(mesh.shape)
    return {a: int(mesh.get(a, 1)) for a in AXES}


# ----------------------------------------------------------------------------------- logical axes
class Axes(tuple):
    """The logical axis names of one array, one per dimension (``None``: an unnamed dimension, never sharded).

    A pytree leaf (a tuple subclass), so a tree of ``Axes`` sits beside the tree of arrays it names, e.g.
    ``Axes("layers", "embed", "heads")`` for a q_proj kernel [l, d, h*e].
    """

    def __new__(cls, *names: str | None) -> Axes:
        return super().__new__(cls, names)

    def __getnewargs__(self) -> tuple:
        return tuple(self)

    def __repr__(self) -> str:
        return f"Axes{tuple.__repr__(self)}"


#: Logical axis -> mesh axis (a name of :data:`AXES`, a tuple of them, or None: replicated). Override per call
#: (``rules=``) or for a block of code (:func:`axis_rules`); an override replaces the entries it names.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = MappingProxyType(
    {
        "vocab": "model",
        "embed": "fsdp",
        "heads": "model",
        "kv_heads": "model",
        "mlp": "model",
        "expert": None,
        "layers": None,
        "rank": None,
        "norm": None,
        "head_dim": None,
    }
)

#: Logical axes of each projection kernel of a block after its layer axis: ``(d_in, d_out)`` (column / row
#: parallel pairs: input projections shard d over ``embed`` and their outputs over heads / mlp, output
#: projections the reverse), a mixture's experts with their expert axis first.
KERNEL_AXES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "q_proj": ("embed", "heads"),
        "k_proj": ("embed", "kv_heads"),
        "v_proj": ("embed", "kv_heads"),
        "o_proj": ("heads", "embed"),
        "gate_proj": ("embed", "mlp"),
        "up_proj": ("embed", "mlp"),
        "down_proj": ("mlp", "embed"),
        "w1": ("expert", "embed", "mlp"),
        "w3": ("expert", "embed", "mlp"),
        "w2": ("expert", "mlp", "embed"),
    }
)
LAYER_NORMS = ("input_norm", "post_attention_norm", "pre_feedforward_norm", "post_feedforward_norm")
#: Replicated whatever its shape: gate values (raw or multipliers), raw PRNG keys.
REPLICATED = "replicated"


def _decoder_table() -> dict[tuple[str, ...], Axes | str]:
    """Path suffix -> logical axes of every leaf the built-in decoder's pytrees hold: params, LoRA (its
    optimizer moments and AdaLoRA's factors at the same relative paths), layouts, gates."""
    table: dict[tuple[str, ...], Axes | str] = {
        ("embed",): Axes("vocab", "embed"),
        ("lm_head",): Axes("embed", "vocab"),
        ("final_norm",): Axes("norm"),
        ("layers", "q_norm"): Axes("layers", "head_dim"),
        ("layers", "k_norm"): Axes("layers", "head_dim"),
        ("layers", "router", "kernel"): Axes("layers", "embed", "expert"),
        ("layer",): REPLICATED,
        ("rank", "*"): REPLICATED,
        ("rng",): REPLICATED,
    }
    table.update({("layers", n): Axes("layers", "norm") for n in LAYER_NORMS})
    for m, (*lead, d_in, d_out) in KERNEL_AXES.items():
        table[("layers", m, "kernel")] = Axes("layers", *lead, d_in, d_out)
        table[("layers", m, "bias")] = Axes("layers", d_out)
        table[(m, "a")] = Axes("layers", *lead, d_in, "rank")  # LoRA A: the kernel's input axis
        table[(m, "b")] = Axes("layers", *lead, "rank", d_out)  # LoRA B: the kernel's output axis
        table[(m, "magnitude")] = Axes("layers", d_out)  # DoRA
        table[(m, "e")] = Axes("layers", "rank")  # AdaLoRA's singular values
        for holder in ("coef", "lora_coef", "mask"):  # traced layouts, AdaLoRA's kept-triplet mask
            table[(holder, m)] = Axes("layers", "rank")
    return table


#: The built-in decoder's logical axes by path suffix (``models.llama.param_axes`` and ``lora.lora_axes`` build
#: their trees from it; :func:`partition_specs` looks leaves up in it).
DECODER_AXES: Mapping[tuple[str, ...], Axes | str] = MappingProxyType(_decoder_table())

_RULES: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("flexora_axis_rules", default=None)


def rules_table(rules: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """The rules in force (:data:`DEFAULT_RULES`, then any :func:`axis_rules` block) with ``rules`` over them."""
    table = dict(_RULES.get() or DEFAULT_RULES)
    if rules is None:
        return table
    for name, target in rules.items() if isinstance(rules, Mapping) else rules:
        group = (target,) if isinstance(target, str) else tuple(target or ())
        if not isinstance(name, str) or name in AXES or not all(isinstance(a, str) and a in AXES for a in group):
            raise ConfigError(
                f"sharding rules: {name!r} -> {target!r}; a rule maps a logical axis name (not a mesh "
                f"axis) to a mesh axis of {AXES}, a tuple of them, or None (replicated)"
            )
        table[name] = target if target is None or isinstance(target, str) else tuple(target)
    return table


@contextlib.contextmanager
def axis_rules(rules: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> Iterator[dict[str, Any]]:
    """Use ``rules`` over the current rules inside the block (every :func:`partition_specs`, compiled step and
    ``fj.nnx.LlamaForCausalLM`` built there), e.g. ``with axis_rules({"embed": None, "expert": "fsdp"}):``."""
    token = _RULES.set(rules_table(rules))
    try:
        yield _RULES.get()
    finally:
        _RULES.reset(token)


def mesh_axes(axes: Sequence[Any], rules: Mapping[str, Any] | None = None, where: str = "leaf") -> tuple:
    """Logical axes -> the mesh axes of a ``PartitionSpec`` (mesh axis names pass through; before divisibility)."""
    table = rules_table() if rules is None else rules

    def one(name: Any) -> Any:
        if name is None or name in AXES:
            return name
        if isinstance(name, (tuple, list)):  # one dimension over several axes
            group = [one(part) for part in name]
            return tuple(a for g in group for a in ((g,) if isinstance(g, str) else g or ())) or None
        if name not in table:
            raise ConfigError(
                f"sharding: {where} has the logical axis {name!r}, which no rule maps to the mesh "
                f"(rules for {sorted(table)}); add one: rules={{{name!r}: 'model'}} (or None)"
            )
        return table[name]

    return tuple(one(n) for n in axes)


def _names(path: tuple) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def declared_axes(names: Sequence[str]) -> Axes | str | None:
    """The :data:`DECODER_AXES` entry of the longest suffix of ``names`` (None: no entry)."""
    names = tuple(str(n) for n in names)
    for k in range(min(3, len(names)), 0, -1):
        if names[-k:] in DECODER_AXES:
            return DECODER_AXES[names[-k:]]
    return DECODER_AXES.get((names[-2], "*")) if len(names) > 1 else None


def leaf_axes(names: Sequence[str], shape: Sequence[int], dtype: Any = None) -> Axes | str:
    """The logical axes of a leaf at path ``names`` (:data:`REPLICATED` for scalars, PRNG keys and gates).

    Raises:
      ConfigError naming the path when nothing declares its axes, or when its declaration has another rank.
    """
    where = "/".join(map(str, names)) or "leaf"
    if len(shape) == 0 or (dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)):
        return REPLICATED
    axes = declared_axes(names)
    if axes is None:
        raise ConfigError(
            f"sharding: no logical axes for the leaf {where!r} (shape {tuple(shape)}); a renamed or "
            "new param must be declared: pass its axes (partition_specs(tree, mesh, axes=...), a tree "
            "of sharding.Axes beside the params) or add it to sharding.DECODER_AXES"
        )
    return _check_rank(axes, tuple(shape), where)


def _check_rank(axes: Axes | str, shape: tuple[int, ...], where: str) -> Axes | str:
    if axes != REPLICATED and len(axes) != len(shape):
        raise ConfigError(
            f"sharding: the leaf {where!r} has shape {shape}, but its logical axes {axes} name {len(axes)} dimensions"
        )
    return axes


def logical_axes(tree: Any) -> Any:
    """The tree of :class:`Axes` beside ``tree`` (arrays or ``jax.eval_shape`` structs), from :data:`DECODER_AXES`;
    an undeclared leaf raises :class:`ConfigError` naming it (:data:`REPLICATED` leaves become all-None axes)."""

    def one(path, leaf):
        axes = leaf_axes(_names(path), np.shape(leaf), getattr(leaf, "dtype", None))
        return Axes(*(None,) * len(np.shape(leaf))) if axes == REPLICATED else axes

    return jax.tree_util.tree_map_with_path(one, tree)


def sharding_metadata(axes: Sequence[str | None], rules: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """NNX variable metadata for ``axes``: ``out_sharding`` (the logical names) and the ``sharding_rules`` that map
    them, so ``nnx.get_partition_spec`` and :func:`partition_specs` resolve them alike."""
    table = rules_table(rules)
    names = tuple(axes)
    return {
        "out_sharding": names,
        "sharding_rules": tuple((a, table[a]) for a in dict.fromkeys(names) if a is not None and a in table),
    }


# ----------------------------------------------------------------------------------- partition specs
def _fit(spec: Sequence[Any], shape: tuple[int, ...], sizes: Mapping[str, int], where: str) -> P:
    """``spec`` with every axis that does not divide its dimension dropped (replicated), with a warning; a mesh
    axis that an earlier dimension already uses is dropped from the later one (two logical axes ruled onto one
    mesh axis), with a warning too."""
    out, used = [], set()
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        group = tuple(a for a in group if sizes.get(a, 1) > 1)
        if used & set(group):
            warnings.warn(
                f"sharding: {where} dim {dim} maps to mesh axes {group}, of which an earlier dimension "
                f"uses {sorted(used & set(group))}; that dimension is not sharded over those",
                stacklevel=3,
            )
            group = tuple(a for a in group if a not in used)
        n = math.prod(sizes[a] for a in group) if group else 1
        if group and shape[dim] % n:
            warnings.warn(
                f"sharding: {where} dim {dim} has size {shape[dim]}, not divisible by mesh axes "
                f"{group} ({n} devices); that dimension is replicated",
                stacklevel=3,
            )
            group = ()
        used |= set(group)
        out.append(None if not group else group[0] if len(group) == 1 else group)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _spec(
    axes: Axes | str, shape: tuple[int, ...], sizes: Mapping[str, int], rules: Mapping[str, Any], where: str
) -> P:
    if _check_rank(axes, shape, where) == REPLICATED:
        return P()
    return _fit(mesh_axes(axes, rules, where), shape, sizes, where)


def _variable_spec(var: nnx.Variable, where: str, sizes: Mapping[str, int], rules: Mapping[str, Any]) -> P:
    """An NNX variable's spec from its ``out_sharding`` metadata: logical names resolved by its own
    ``sharding_rules``, then flax's ``logical_axis_rules`` in force, then ``rules`` (as ``nnx.get_partition_spec``
    resolves them); unannotated variables are replicated, as NNX places them."""
    meta = var.get_metadata()
    names = meta.get("out_sharding")
    if not names:
        return P()
    table = {**rules, **dict(flax_spmd.get_logical_axis_rules() or ()), **dict(meta.get("sharding_rules") or ())}
    return _fit(mesh_axes(names, table, where), tuple(np.shape(var.get_value())), sizes, where)


def leaf_spec(
    names: Sequence[str], shape: tuple[int, ...], mesh: Mesh | Mapping[str, int], rules: Mapping[str, Any] | None = None
) -> P:
    """The ``PartitionSpec`` of one leaf from its path names and shape (a loader building params shard by shard)."""
    names, shape = [str(n) for n in names], tuple(shape)
    return _spec(leaf_axes(names, shape), shape, axis_sizes(mesh), rules_table(rules), "/".join(names) or "leaf")


def partition_specs(
    tree: Any,
    mesh: Mesh | Mapping[str, int],
    axes: Any = None,
    *,
    rules: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
) -> Any:
    """A ``PartitionSpec`` for every leaf of ``tree``: its logical axes mapped to mesh axes by the rules table.

    Where a leaf's logical axes come from, first match first:

    - an NNX variable: its ``out_sharding`` metadata (``fj.nnx.LlamaForCausalLM``, an ``add_lora``'d model);
    - ``axes``: a tree of :class:`Axes` (or a list of such trees, e.g. ``[param_axes(config),
      lora_axes(spec)]``); every subtree of ``tree`` with the same structure takes it, so an optimizer's
      moments (Adam's ``mu`` / ``nu`` mirror the LoRA tree) follow their leaves;
    - scalars and PRNG keys are replicated;
    - the built-in decoder's declarations (:data:`DECODER_AXES`) by relative path: base params, LoRA (and
      its optimizer moments), traced layouts, gates.

    Any other leaf raises :class:`ConfigError` naming its path. Works on base params, LoRA, search / train
    states (optax states included), gates and their ``jax.eval_shape`` abstractions.
    """
    sizes, table = axis_sizes(mesh), rules_table(rules)
    given = [] if axes is None else list(axes) if isinstance(axes, list) else [axes]
    known = [(jax.tree.structure(a), a) for a in given]

    def match(node: Any) -> Any:
        if not known or isinstance(node, nnx.Variable):
            return None
        structure = jax.tree.structure(node)
        return None if structure.num_nodes == 1 else next((a for s, a in known if s == structure), None)

    def leaf(path: tuple, x: Any, ax: Axes | None = None) -> Any:
        names = _names(path)
        where = "/".join(names) or "leaf"
        if isinstance(x, nnx.Variable):
            return x.replace(_variable_spec(x, where, sizes, table))
        shape = tuple(np.shape(x))
        return _spec(
            leaf_axes(names, shape, getattr(x, "dtype", None)) if ax is None else ax, shape, sizes, table, where
        )

    def node(path: tuple, x: Any) -> Any:
        hit = match(x)
        if hit is None:
            return leaf(path, x)
        return jax.tree_util.tree_map_with_path(lambda p, ax, y: leaf(path + p, y, ax), hit, x)

    return jax.tree_util.tree_map_with_path(
        node, tree, is_leaf=lambda x: isinstance(x, nnx.Variable) or match(x) is not None
    )


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


def shardings(tree: Any, mesh: Mesh, axes: Any = None, *, rules: Mapping[str, Any] | None = None) -> Any:
    """``NamedSharding`` of every leaf of a params / LoRA / state pytree (:func:`partition_specs`)."""
    return named(partition_specs(tree, mesh, axes, rules=rules), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree: Any, shardings_tree: Any) -> Any:
    """``jax.device_put`` that also places typed PRNG keys on shardings spanning several processes."""

    def one(x, s):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        return jax.device_put(x, s)

    return jax.tree.map(one, tree, shardings_tree)


def shard(tree: Any, mesh: Mesh, specs: Any = None, axes: Any = None, *, rules: Mapping[str, Any] | None = None) -> Any:
    """Place ``tree`` on ``mesh`` (specs from :func:`partition_specs` with ``axes`` / ``rules`` unless given).

    Host values must be equal on every process (jax checks it across hosts).
    """
    specs = partition_specs(tree, mesh, axes, rules=rules) if specs is None else specs
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

    specs = batch_specs(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(scaled(x), np.asarray(x).dtype), local), mesh, batch_dim
    )

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
