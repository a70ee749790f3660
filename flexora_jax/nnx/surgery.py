"""Gated LoRA on any Flax NNX model by surgery: :func:`add_lora`, :func:`merge_lora`, :func:`remove_lora`.

Every module whose path matches the targets keeps its identity, its path and its kernel; it gains
``lora_a`` / ``lora_b`` (``nnx.LoRAParam``), its gates (:class:`~flexora_jax.nnx.Gate`) and a static
``lora_site`` (:class:`LoraSite`), and its class becomes a subclass (``LoraLinear`` for
``nnx.Linear``) whose ``__call__`` runs the original one with the LoRA term added at the kernel's
contraction (:mod:`flexora_jax.nnx.intercept`). So code that reads ``model.blocks[0].attn.q.kernel``
keeps working, and the adapter's NNX paths sit next to the kernels they adapt.

Layout of one adapted module whose kernel has contracted axes ``in`` and free axes ``out`` (per layer)::

    lora_a         LoRAParam [*stack, *in, r]     kaiming-uniform (PEFT's init), fp32 (fp64 with fp64 kernels)
    lora_b         LoRAParam [*stack, r, *out]    zeros: the adapted model computes exactly what it did
    lora_gate      Gate      [*stack]             layer gate, one variable shared by the layer's modules
    lora_rank_gate Gate      [*stack, r]          rank gate, one per module
    y = base(x) + ((x . A) * scale * lora_gate * lora_rank_gate) . B

``*stack`` is empty for a module that belongs to one layer (its index read from its path,
``layers.<i>`` by default) and ``[L]`` for a module whose layers are stacked on the kernel's leading
axis (``nnx.scan`` / ``nnx.vmap`` models); under ``nnx.scan`` each step sees one layer's slice.
LoRA variables carry their kernel's sharding (its ``out_sharding`` metadata at the kernel's input / output axes,
mesh or logical axis names, with the kernel's ``sharding_rules``; for placed arrays the ``NamedSharding`` too),
the rank dimension replicated; gates are replicated. :func:`flexora_jax.sharding.partition_specs` reads the
same metadata when a step is compiled over a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flexora_jax.errors import ConfigError
from flexora_jax.nnx.intercept import ContractionError, call_intercepted, lora_contraction, split_dimensions
from flexora_jax.nnx.variables import Gate
from flexora_jax.validation import check_bool, check_config_type, check_number, check_regex, check_type, describe

#: Default layer-index pattern: ``layers.<i>``, ``layers_<i>`` or ``layers/<i>`` in the dotted path.
DEFAULT_LAYER_PATTERN = r"(?:^|\.)layers[._/](\d+)(?:\.|$)"
GATE_CHOICES = (None, "none", "layer", "rank", "both")
_LORA_ATTRS = ("lora_a", "lora_b", "lora_gate", "lora_rank_gate", "lora_site")

Targets = Sequence[str] | str | Callable[[str, nnx.Module], bool]
LayerIndex = str | Callable[[str], int | None] | None


@dataclasses.dataclass(frozen=True)
class LoraSite:
    """Static description of one adapted module, stored on it as ``lora_site``."""

    path: str  # the module's dotted NNX path when LoRA was added, e.g. "blocks.0.attn.q"
    kernel: str  # attribute name of the kernel Param it adapts
    layers: tuple[int, ...]  # its layer, or the stacked layers in kernel order
    stacked: bool  # the kernel carries a leading layer axis (one slice per layer)
    in_axes: tuple[int, ...] | None  # contracted kernel axes (one layer's layout); None while probing
    out_axes: tuple[int, ...] | None  # free kernel axes (one layer's layout)
    rank: int  # columns of A (the largest rank when stacked layers have different ranks)
    ranks: tuple[int, ...]  # true rank per layer in ``layers`` (0: a stacked layer without LoRA)
    alpha: float  # lora_alpha
    use_rslora: bool  # scale = alpha / sqrt(rank) instead of alpha / rank

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def path_str(path: Sequence[Any]) -> str:
    """An NNX path tuple as the dotted string used for matching, errors and export keys."""
    return ".".join(str(p) for p in path)


def lora_sites(model: nnx.Module) -> dict[str, LoraSite]:
    """``{current module path: LoraSite}`` of every adapted module of ``model``."""
    return {path: m.lora_site for path, m in _adapted(model)}


def count_lora_params(model: nnx.Module) -> int:
    """LoRA parameters that train: true ranks on adapted layers only (masked stacked layers excluded)."""
    total = 0
    for _, m in _adapted(model):
        site = m.lora_site
        s = int(site.stacked)
        d_in = math.prod(m.lora_a.shape[s:-1])
        d_out = math.prod(m.lora_b.shape[s + 1 :])
        total += sum(site.ranks) * (d_in + d_out)
    return int(total)


# ------------------------------------------------------------------------------------ matching
def _matcher(targets: Targets) -> Callable[[str, nnx.Module], bool]:
    """Names match the path's tail (``"q"`` matches ``"blocks.0.attn.q"``), a string is a full-match regex."""
    if callable(targets):
        return targets
    if isinstance(targets, (str, re.Pattern)):
        pattern = check_regex(targets, "add_lora: targets")
        return lambda path, _: pattern.fullmatch(path) is not None
    names = tuple(targets) if isinstance(targets, (list, tuple, set, frozenset)) else ()
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"add_lora: targets must be module names (a non-empty list of strings), a regex string or "
            f"a predicate (path, module) -> bool, got {describe(targets)}"
        )
    return lambda path, _: any(path == n or path.endswith("." + n) for n in names)


def _layer_index(layer_index: LayerIndex) -> Callable[[str], int | None]:
    """``path -> layer or None`` from a function or a regex whose first group is the layer (checked up front)."""
    if callable(layer_index):
        find = layer_index
    else:
        pattern = check_regex(
            DEFAULT_LAYER_PATTERN if layer_index is None else layer_index, "add_lora: layer_index", groups=1
        )

        def find(path: str) -> Any:
            found = pattern.search(path)
            return None if found is None else found.group(1)

    def index(path: str) -> int | None:
        found = find(path)
        if isinstance(found, str):
            found = int(found) if found.isdigit() else found
        return None if found is None else check_number(found, f"add_lora: layer_index of {path!r}", lo=0, integer=True)

    return index


def _ndim(variable: nnx.Variable) -> int:
    return int(np.ndim(variable.get_value()))


def _kernel_name(module: nnx.Module, path: str) -> str:
    """The attribute holding the kernel: ``kernel`` if present, else the module's only Param of rank >= 2."""
    found = [
        name
        for name, v in vars(module).items()
        if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam) and _ndim(v) >= 2
    ]
    if not callable(module) or not found:
        raise ConfigError(
            f"add_lora: module {path!r} ({type(module).__name__}) cannot take LoRA: expected a callable "
            "projection holding a kernel nnx.Param of rank >= 2 (nnx.Linear, nnx.LinearGeneral, nnx.Einsum or a "
            "module contracting its own Param with jnp.einsum / jax.lax.dot_general)"
        )
    if "kernel" in found:
        return "kernel"
    if len(found) > 1:
        raise ConfigError(
            f"add_lora: module {path!r} holds several kernel-like Params {found}; "
            "name one of them 'kernel' or target a module with one kernel"
        )
    return found[0]


def _static_axes(module: nnx.Module, path: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(in_axes, out_axes) of one layer's kernel for Flax's own projections; None when only a call can tell."""
    if isinstance(module, nnx.Linear):
        return (0,), (1,)
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ContractionError(
                f"add_lora: module {path!r} is a batched nnx.LinearGeneral; LoRA supports "
                "kernels contracted over input features only"
            )
        n_in = len(module.in_features)
        return tuple(range(n_in)), tuple(range(n_in, n_in + len(module.out_features)))
    if isinstance(module, nnx.Einsum) and module.einsum_str and "." not in module.einsum_str:
        inputs, out = module.einsum_str.split("->")
        lhs, rhs = inputs.split(",")
        if any(c in lhs and c in out for c in rhs):
            raise ContractionError(
                f"add_lora: module {path!r} ({module.einsum_str}) has kernel batch axes; "
                "LoRA supports kernels contracted over input features only"
            )
        return (tuple(i for i, c in enumerate(rhs) if c not in out), tuple(i for i, c in enumerate(rhs) if c in out))
    return None


# ------------------------------------------------------------------------------------ the LoRA call
def _coefficients(module: nnx.Module) -> jax.Array:
    """``scale * layer gate * rank gate`` per rank component, [*stack, r] (the one place gates enter)."""
    site: LoraSite = module.lora_site
    a = module.lora_a[...]
    dtype = a.dtype
    coeff = jnp.full(a.shape[: -1 - len(site.in_axes)] + (a.shape[-1],), site.scale, dtype)
    gate = vars(module).get("lora_gate")
    if gate is not None:
        coeff = coeff * gate[...].astype(dtype)[..., None]
    rank_gate = vars(module).get("lora_rank_gate")
    if rank_gate is not None:
        coeff = coeff * rank_gate[...].astype(dtype)
    return coeff


def _lora_call(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    """The adapted module's ``__call__``: the original call, LoRA added at the kernel's contraction."""
    site: LoraSite = self.lora_site
    call = type(self).lora_base_class.__call__
    if site.in_axes is None:
        return call_intercepted(self, call, site.kernel, args, kwargs, functools.partial(_record, site), site.path)
    a, b = self.lora_a[...], self.lora_b[...]
    if a.ndim != len(site.in_axes) + 1:
        raise ContractionError(
            f"module {site.path!r} holds LoRA stacked over {len(site.layers)} layers (lora_a {a.shape}); call it "
            "one layer at a time (under nnx.scan / nnx.vmap), as its kernel is"
        )
    hook = functools.partial(
        lora_contraction,
        a=a,
        b=b,
        coeff=_coefficients(self),
        in_axes=site.in_axes,
        out_axes=site.out_axes,
        path=site.path,
    )
    return call_intercepted(self, call, site.kernel, args, kwargs, hook, site.path)


@functools.cache
def lora_class(cls: type) -> type:
    """The LoRA subclass of a module class (``nnx.Linear`` -> ``LoraLinear``); one per class."""

    def body(ns: dict) -> None:
        ns.update(
            __call__=_lora_call,
            lora_base_class=cls,
            __module__=__name__,
            __doc__=f"{cls.__name__} with a gated LoRA branch (see flexora_jax.nnx.add_lora).",
        )

    return types.new_class(f"Lora{cls.__name__}", (cls,), {}, body)


# ------------------------------------------------------------------------------------ probing
_PROBE = threading.local()


def _record(site: LoraSite, operands, kernel_index, kernel_axes, dimension_numbers, out):
    """Probe hook: note which kernel axes one call contracts (and the kernel's per-call rank)."""
    contracted, _, _ = split_dimensions(kernel_index, kernel_axes, dimension_numbers, site.path)
    _PROBE.records.setdefault(site.path, set()).add((tuple(sorted(contracted)), len(kernel_axes)))
    return out


def _probe(model: nnx.Module, found: list[tuple[str, nnx.Module, str]], example_inputs: tuple) -> dict[str, tuple]:
    """Call the model abstractly once to learn how each module contracts its kernel."""
    placeholder = dict(
        layers=(), stacked=False, in_axes=None, out_axes=None, rank=0, ranks=(), alpha=0.0, use_rslora=False
    )
    originals = [type(m) for _, m, _ in found]
    _PROBE.records = {}
    try:
        for path, module, kernel in found:
            module.lora_site = LoraSite(path=path, kernel=kernel, **placeholder)
            object.__setattr__(module, "__class__", lora_class(type(module)))
        nnx.eval_shape(lambda m, *xs: m(*xs), model, *example_inputs)
        records = _PROBE.records
    finally:
        for (_, module, _), cls in zip(found, originals):
            object.__setattr__(module, "__class__", cls)
            del module.lora_site
        _PROBE.records = None
    out = {}
    for path, _, _ in found:
        seen = records.get(path, set())
        if len(seen) != 1:
            what = "is never called" if not seen else f"contracts its kernel in {len(seen)} different ways"
            raise ContractionError(
                f"add_lora: module {path!r} {what} when the model runs on example_inputs; "
                "LoRA needs one contraction layout per module"
            )
        out[path] = next(iter(seen))
    return out


# ------------------------------------------------------------------------------------ add_lora
def _sharding_meta(kernel: nnx.Variable, axes: Sequence[int | None]) -> dict[str, Any]:
    """Metadata of a LoRA / gate variable: the kernel's spec at ``axes`` (None = replicated)."""
    meta = kernel.get_metadata()
    out = {k: meta[k] for k in ("mesh", "sharding_rules") if k in meta}
    spec = meta.get("out_sharding")
    if spec:
        out["out_sharding"] = tuple(None if ax is None else spec[ax] for ax in axes)
    return out


def _place(value: jax.Array, kernel: nnx.Variable, axes: Sequence[int | None]) -> jax.Array:
    """Put ``value`` on the kernel's mesh with the kernel's spec at ``axes`` (when the kernel is placed)."""
    sharding = getattr(kernel[...], "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return value
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    derived = PartitionSpec(*(None if a is None else spec[a] for a in axes))
    return jax.device_put(value, NamedSharding(sharding.mesh, derived))


def _new_var(
    kind: type, value: jax.Array, kernel: nnx.Variable, axes: Sequence[int | None], **meta: Any
) -> nnx.Variable:
    """A LoRA / gate variable placed like its kernel (annotation kept; no eager resharding by NNX)."""
    return kind(_place(value, kernel, axes), **_sharding_meta(kernel, axes), eager_sharding=False, **meta)


def _resolve_ranks(
    site_path: str, n_layers: int, rank: int, ranks: Mapping[str, Any] | None, active: Sequence[bool]
) -> tuple[int, ...]:
    """Per-layer true ranks of one module (``ranks[path]`` overrides ``rank``; inactive layers get 0)."""
    value = rank if ranks is None else ranks.get(site_path, rank)
    per_layer = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n_layers
    if len(per_layer) != n_layers or not all(
        isinstance(r, (int, np.integer)) and not isinstance(r, (bool, np.bool_)) and r >= 0 for r in per_layer
    ):
        raise ConfigError(
            f"add_lora: ranks[{site_path!r}] = {value!r}; expected a rank >= 0"
            f"{'' if n_layers == 1 else f' or one per stacked layer ({n_layers})'}"
        )
    return tuple(int(r) if on else 0 for r, on in zip(per_layer, active))


def add_lora(
    model: nnx.Module,
    targets: Targets,
    rank: int = 8,
    alpha: float = 16.0,
    *,
    gates: str | None = "layer",
    layer_index: LayerIndex = None,
    layers: Sequence[int] | None = None,
    ranks: Mapping[str, int | Sequence[int]] | None = None,
    use_rslora: bool = False,
    example_inputs: tuple | None = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Attach gated LoRA to every module of ``model`` matched by ``targets`` (in place; returns ``model``).

    Args:
      model: any Flax NNX model.
      targets: module names matched against the path's tail (``("q", "v")``), a regex full-matched
        against the dotted path (``r".*attn\\.(q|v)"``), or a predicate ``(path, module) -> bool``.
      rank, alpha: LoRA rank r and lora_alpha (scale alpha / r, or alpha / sqrt(r) with ``use_rslora``).
      gates: "layer" (Flexora: one gate per layer), "rank" (AutoLoRA: one per rank component), "both",
        or None. Gates start at 1 (plain LoRA); a zero layer gate removes that layer's LoRA exactly.
      layer_index: regex with one group (the layer) searched in the dotted path, or a function
        ``path -> int | None``; default ``layers.<i>`` / ``layers_<i>`` / ``layers/<i>``. Modules stacked
        over layers (leading kernel axis) take their layers from that axis instead.
      layers: adapt only these layers (stacked modules keep the others at gate 0).
      ranks: per-module rank overrides ``{path: r}`` (``{path: (r_0, ..., r_L-1)}`` for stacked
        modules); rank 0 leaves a module out.
      example_inputs: positional inputs of ``model(...)`` (arrays or ``jax.ShapeDtypeStruct``), needed
        only when a matched module is not a Flax projection with a known layout: one abstract call
        shows how each such module contracts its kernel.
      rngs: the ``nnx.Rngs`` drawing A's initialisation (``rngs.params()``).
    Raises:
      ConfigError (a FlexoraError) naming the argument, the path and what was expected when an argument has
      the wrong type or range (a bool rank, an infinite alpha, a broken regex, a layer_index regex without a
      group), targets match nothing, ``layers`` / ``ranks`` name layers / modules the targets do not cover,
      nothing would be adapted, a module cannot take LoRA, a path has no layer index, or a module already has
      LoRA. The model is left unchanged on every error.
    """
    check_config_type(model, nnx.Module, "add_lora: model")
    check_config_type(rngs, nnx.Rngs, "add_lora: rngs")
    if gates not in GATE_CHOICES:
        raise ConfigError(f"add_lora: gates must be one of {GATE_CHOICES}, got {gates!r}")
    rank = check_number(rank, "add_lora: rank", lo=1, integer=True)
    alpha = check_number(alpha, "add_lora: alpha", lo=0, lo_open=True)
    use_rslora = check_bool(use_rslora, "add_lora: use_rslora")
    check_type(layers, tuple[int, ...] | None, "add_lora: layers")
    check_type(ranks, Mapping[str, int | tuple[int, ...]] | None, "add_lora: ranks")
    check_type(example_inputs, tuple[Any, ...] | None, "add_lora: example_inputs")
    if layers is not None and not layers:
        raise ConfigError("add_lora: layers is empty, so nothing would be adapted; pass None for every layer")
    matches, index_of = _matcher(targets), _layer_index(layer_index)
    modules = [(path_str(p), m) for p, m in nnx.iter_modules(model) if p]
    found = []
    for path, module in modules:
        if not matches(path, module):
            continue
        if isinstance(vars(module).get("lora_site"), LoraSite):
            raise ConfigError(f"add_lora: module {path!r} already has LoRA; merge_lora or remove_lora first")
        found.append((path, module, _kernel_name(module, path)))
    if not found:
        kernels = [p for p, m in modules if any(isinstance(v, nnx.Param) and _ndim(v) >= 2 for v in vars(m).values())]
        raise ConfigError(f"add_lora: targets {targets!r} match no module; modules holding a kernel: {kernels[:12]}")
    axes = {path: _static_axes(module, path) for path, module, _ in found}
    unknown = [item for item in found if axes[item[0]] is None]
    if unknown:
        if example_inputs is None:
            raise ConfigError(
                f"add_lora: module {unknown[0][0]!r} ({type(unknown[0][1]).__name__}) computes its own contraction; "
                "pass example_inputs=(...) (the model's positional inputs) so one abstract call can show its layout"
            )
        for path, (contracted, ndim) in _probe(model, unknown, tuple(example_inputs)).items():
            axes[path] = (contracted, tuple(i for i in range(ndim) if i not in contracted))
    sites = [
        _site(module, path, kernel_name, *axes[path], index_of(path), rank, alpha, use_rslora)
        for path, module, kernel_name in found
    ]
    _check_coverage(sites, layers, ranks)
    shared_gates: dict[Any, Gate] = {}
    for (_, module, _), site in zip(found, sites):
        attach_lora(module, site, gates=gates, layers=layers, ranks=ranks, shared_gates=shared_gates, rngs=rngs)
    return model


def _check_coverage(sites: list[LoraSite], layers: Sequence[int] | None, ranks: Mapping[str, Any] | None) -> None:
    """Before any module changes: ``layers`` and ``ranks`` name only matched layers / modules, and some
    module keeps a rank > 0 (``layers=[99]``, ``ranks={"layers.9": 2}`` are errors, not silent no-ops)."""
    known = sorted({i for site in sites for i in site.layers})
    outside = sorted(set(layers or ()) - set(known))
    if outside:
        raise ConfigError(f"add_lora: layers {outside} are not layers of the matched modules (their layers: {known})")
    unknown = sorted(set(ranks or ()) - {site.path for site in sites})
    if unknown:
        raise ConfigError(
            f"add_lora: ranks names module(s) {unknown} that targets do not match; matched modules: "
            f"{[site.path for site in sites][:12]}"
        )
    if not any(
        any(
            _resolve_ranks(
                site.path, len(site.layers), site.rank, ranks, [layers is None or i in layers for i in site.layers]
            )
        )
        for site in sites
    ):
        raise ConfigError(
            f"add_lora: every matched module gets rank 0 (ranks={dict(ranks or {})!r}, "
            f"layers={layers!r}); nothing would be adapted"
        )


def _site(
    module: nnx.Module,
    path: str,
    kernel_name: str,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    index: int | None,
    rank: int,
    alpha: float,
    use_rslora: bool,
) -> LoraSite:
    """The site of one matched module: its layers (from the path, or the kernel's leading layer axis)."""
    kernel = getattr(module, kernel_name)
    stack = kernel.ndim - len(in_axes) - len(out_axes)
    if stack not in (0, 1):
        raise ContractionError(
            f"add_lora: module {path!r}: kernel of shape {kernel.shape} vs a per-call layout of "
            f"{len(in_axes) + len(out_axes)} axes; expected at most one leading layer axis"
        )
    if stack == 0 and index is None:
        raise ConfigError(
            f"add_lora: module path {path!r} has no layer index; expected 'layers.<i>' (or "
            "'layers_<i>', 'layers/<i>') in the path, or pass layer_index=<regex or function>"
        )
    if stack and index is not None:
        raise ConfigError(
            f"add_lora: module {path!r} is stacked over layers (kernel {kernel.shape}) and also has "
            f"layer index {index} in its path; pass a layer_index that finds none"
        )
    own = tuple(range(kernel.shape[0])) if stack else (index,)
    return LoraSite(
        path=path,
        kernel=kernel_name,
        layers=own,
        stacked=bool(stack),
        in_axes=tuple(in_axes),
        out_axes=tuple(out_axes),
        rank=rank,
        ranks=(),
        alpha=float(alpha),
        use_rslora=use_rslora,
    )


def attach_lora(
    module: nnx.Module,
    site: LoraSite,
    *,
    gates: str | None,
    layers: Sequence[int] | None,
    ranks: Mapping[str, Any] | None,
    shared_gates: dict[Any, Gate],
    rngs: nnx.Rngs,
) -> None:
    """Create one module's LoRA variables and gates for ``site`` and switch its class to the LoRA subclass.

    ``site.rank`` is the default rank (``ranks[site.path]`` overrides it); ``shared_gates`` holds the
    layer gates already made, so every module of a layer shares one.
    """
    kernel = getattr(module, site.kernel)
    stack = int(site.stacked)
    active = [layers is None or i in layers for i in site.layers]
    site_ranks = _resolve_ranks(site.path, len(site.layers), site.rank, ranks, active)
    if not any(site_ranks):
        return
    site = dataclasses.replace(site, rank=max(site_ranks), ranks=site_ranks)
    r, lead = site.rank, tuple(range(stack))
    shifted_in, shifted_out = [stack + ax for ax in site.in_axes], [stack + ax for ax in site.out_axes]
    in_dims = tuple(kernel.shape[ax] for ax in shifted_in)
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    bound = 1.0 / math.sqrt(math.prod(in_dims))
    a = jax.random.uniform(rngs.params(), kernel.shape[:stack] + in_dims + (r,), dtype, -bound, bound)
    b = jnp.zeros(kernel.shape[:stack] + (r,) + tuple(kernel.shape[ax] for ax in shifted_out), dtype)
    module.lora_a = _new_var(nnx.LoRAParam, a, kernel, (*lead, *shifted_in, None))
    module.lora_b = _new_var(nnx.LoRAParam, b, kernel, (*lead, None, *shifted_out))
    mask = np.asarray([float(x > 0) for x in site_ranks]).reshape(kernel.shape[:stack])
    if gates in ("layer", "both") or not all(site_ranks):
        key = ("stacked", site.layers) if stack else site.layers[0]
        if key not in shared_gates:
            shared_gates[key] = _new_var(
                Gate, jnp.asarray(mask, dtype), kernel, (None,) * stack, role="layer", layers=site.layers
            )
        module.lora_gate = shared_gates[key]
    if gates in ("rank", "both") or len(set(x for x in site_ranks if x)) > 1:
        # A stacked module with different ranks per layer keeps r columns and masks the rest here, rescaled
        # so that layer l's scale is alpha / r_l.
        cols = np.arange(r)[None, :] < np.asarray(site_ranks)[:, None]
        rescale = np.asarray(
            [lora_scale(site.alpha, x, site.use_rslora) / site.scale if x else 0.0 for x in site_ranks]
        )
        values = (cols * rescale[:, None]).reshape(kernel.shape[:stack] + (r,))
        module.lora_rank_gate = _new_var(
            Gate, jnp.asarray(values, dtype), kernel, (*lead, None), role="rank", layers=site.layers, site=site.path
        )
    module.lora_site = site
    object.__setattr__(module, "__class__", lora_class(type(module)))


# ------------------------------------------------------------------------------------ merge / remove
def _adapted(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    return [(path_str(p), m) for p, m in nnx.iter_modules(model) if isinstance(vars(m).get("lora_site"), LoraSite)]


def adapted_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Adapted modules by the path they were adapted under (``LoraSite.path``)."""
    return {m.lora_site.path: m for _, m in _adapted(model)}


def delta_kernel(module: nnx.Module) -> jax.Array:
    """The dense update of one adapted module in its kernel's layout (gates and scale included), fp32 or wider."""
    site: LoraSite = module.lora_site
    s = int(site.stacked)
    a, b = module.lora_a[...], module.lora_b[...]
    lead, r = a.shape[:s], a.shape[-1]
    in_dims, out_dims = a.shape[s:-1], b.shape[s + 1 :]
    delta = jnp.einsum(
        "...ir,...r,...ro->...io", a.reshape(*lead, -1, r), _coefficients(module), b.reshape(*lead, r, -1)
    ).reshape(*lead, *in_dims, *out_dims)
    source = [*range(s), *(s + x for x in site.in_axes), *(s + x for x in site.out_axes)]
    return jnp.transpose(delta, [source.index(k) for k in range(delta.ndim)])


def _detach(module: nnx.Module) -> None:
    for name in _LORA_ATTRS:
        if name in vars(module):
            delattr(module, name)
    object.__setattr__(module, "__class__", type(module).lora_base_class)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every LoRA branch (times its gates and scale) into its kernel and remove it (PEFT's merge_and_unload).

    The sum is computed in fp32 (or wider) and cast to the kernel's dtype. In place; returns ``model``.
    A model that computes through its own core and defines ``merge_lora()`` (``LlamaForCausalLM``) folds
    its LoRA itself.
    """
    check_config_type(model, nnx.Module, "merge_lora: model")
    own = getattr(model, "merge_lora", None)
    if callable(own):
        return own()
    for _, module in _adapted(model):
        kernel = getattr(module, module.lora_site.kernel)
        value = kernel[...]
        wide = value.astype(jnp.promote_types(value.dtype, jnp.float32))
        kernel.set_value((wide + delta_kernel(module)).astype(value.dtype))
        _detach(module)
    return model


def remove_lora(model: nnx.Module) -> nnx.Module:
    """Drop every LoRA branch without merging it: the model computes as before :func:`add_lora`."""
    check_config_type(model, nnx.Module, "remove_lora: model")
    for _, module in _adapted(model):
        _detach(module)
    return model
