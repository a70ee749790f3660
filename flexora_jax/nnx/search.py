"""The bilevel search over NNX states: Flexora / AutoLoRA on any gated-LoRA NNX model.

The model is split once by variable type (:func:`split_for_search`): a graphdef, the frozen base
(``nnx.Param`` and every other variable), the LoRA state (``nnx.LoRAParam``, what the inner optimizer
trains) and the gate state (:class:`~flexora_jax.nnx.Gate`). The search differentiates w.r.t. *raw*
hyperparameters, a :class:`flexora_jax.gates.Gates` (Flexora's alpha over the adapted layers,
AutoLoRA's beta per module path); inside the jitted loss they become the gate values
(:func:`gate_state`, through :func:`flexora_jax.gates.multipliers`: ``w = L softmax(alpha)``,
``softmax(beta)``), the model is rebuilt by ``nnx.merge`` and the user's ``loss_fn(model, batch)`` is
called. So the loss is a pure function ``loss(base, lora, hyper, batch, key)`` (:func:`make_loss`, a
:class:`flexora_jax.problem.Problem`'s loss) and every hypergradient estimator runs on it unchanged. Stacked layers need nothing special: a stacked gate takes its slice of ``w``.

A search step is one jitted function of ``(base, SearchState, train_batches[K], val_batch)``,
compiled once per search (gate values never change shapes). After the search, :func:`select_paths` reads
layers / ranks in terms of the model's module paths and :func:`apply_selection` rebuilds LoRA on
exactly those (a fresh LoRA, no gates unless asked).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flexora_jax.bilevel import ProblemLoss, SearchState, init_search_state, search_step
from flexora_jax.config import SearchConfig, SelectionConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates, GateValues, multipliers
from flexora_jax.nnx.surgery import GATE_CHOICES, LoraSite, adapted_modules, attach_lora, lora_sites, remove_lora
from flexora_jax.nnx.variables import GATE_ROLES, Gate
from flexora_jax.problem import HyperLayout
from flexora_jax.selection import Selection, select_layers, select_ranks
from flexora_jax.validation import check_config_type, check_scalar_loss

Batch = dict[str, jax.Array]
ModelLoss = Callable[[nnx.Module, Batch], jax.Array]

__all__ = [
    "GateEntry",
    "GateLayout",
    "Selection",
    "apply_selection",
    "gate_state",
    "init_hyperparameters",
    "init_search_state",
    "make_loss",
    "make_split_search_step",
    "select_paths",
    "split_for_search",
    "update_model",
]


def split_for_search(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, base, lora, gates)``: the model split by variable type; ``nnx.merge`` takes them back."""
    graphdef, lora, gates, base = nnx.split(model, nnx.LoRAParam, Gate, ...)
    if not jax.tree.leaves(lora):
        raise ConfigError(f"split_for_search: {type(model).__name__} has no nnx.LoRAParam; add_lora(...) first")
    return graphdef, base, lora, gates


@dataclasses.dataclass(frozen=True)
class GateEntry:
    """One gate variable of the model: where it sits in the gate state and what it multiplies."""

    path: tuple  # its path in the gate state
    role: str  # "layer" or "rank" (see flexora_jax.nnx.variables)
    layers: tuple[int, ...]  # the layers it covers
    site: str | None  # the module path of a rank gate
    shape: tuple[int, ...]
    dtype: Any
    metadata: tuple[tuple[str, Any], ...]  # the rest of its metadata (sharding), kept on rebuild


@dataclasses.dataclass(frozen=True)
class GateLayout:
    """Static map from raw hyperparameters to the gate state: the adapted layers and every gate variable."""

    entries: tuple[GateEntry, ...]

    @classmethod
    def of(cls, gates: nnx.State) -> GateLayout:
        entries = []
        for path, var in nnx.to_flat_state(gates):
            meta = dict(var.get_metadata())
            role, layers, site = meta.pop("role", None), tuple(meta.pop("layers", ())), meta.pop("site", None)
            if role not in GATE_ROLES:
                raise ConfigError(
                    f"gate {'.'.join(map(str, path))!r} has role {role!r}, expected one of {GATE_ROLES}; "
                    "create gates with fj.nnx.add_lora"
                )
            value = var.get_value()
            entries.append(
                GateEntry(tuple(path), role, layers, site, tuple(value.shape), value.dtype, tuple(sorted(meta.items())))
            )
        return cls(tuple(entries))

    @property
    def layers(self) -> tuple[int, ...]:
        """The adapted layers, sorted: the L of Flexora's ``w = L softmax(alpha)``."""
        layered = [e for e in self.entries if e.role == "layer"] or self.entries
        return tuple(sorted({i for e in layered for i in e.layers}))

    def sites(self, role: str = "rank") -> dict[str, tuple[int, ...]]:
        """``{site: shape}`` of the gates of ``role`` that have a site (the rank gates)."""
        return {e.site: e.shape for e in self.entries if e.role == role}

    def hyper_layout(self) -> HyperLayout:
        """The raw hyperparameters these gates take: alpha over :attr:`layers` (if any layer gate), beta per site."""
        has_layer = any(e.role == "layer" for e in self.entries)
        dtype = jnp.result_type(*(e.dtype for e in self.entries)) if self.entries else jnp.float32
        return HyperLayout(
            len(self.layers) if has_layer else None,
            tuple(sorted(self.sites("rank").items())),
            str(jnp.dtype(jnp.promote_types(dtype, jnp.float32))),
        )


def init_hyperparameters(layout: GateLayout | nnx.State, kind: str = "layer", power: int = 1) -> Gates:
    """Raw hyperparameters at their neutral point (alpha = 0, beta = 0) for a search of ``kind``."""
    layout = layout if isinstance(layout, GateLayout) else GateLayout.of(layout)
    return layout.hyper_layout().init(kind, power)


def _entry_value(entry: GateEntry, values: GateValues, position: Mapping[int, int]) -> jax.Array:
    if entry.role == "layer":
        if values.layer is None:
            return jnp.ones(entry.shape)
        return values.layer[np.asarray([position[i] for i in entry.layers])].reshape(entry.shape)
    rank = (values.rank or {}).get(entry.site)
    return jnp.ones(entry.shape) if rank is None else rank


def gate_state(layout: GateLayout, hyper: Gates) -> nnx.State:
    """The gate state (multipliers) of raw hyperparameters, through :func:`flexora_jax.gates.multipliers`:
    Flexora ``w = (L softmax(alpha))^p`` over the adapted layers, AutoLoRA ``softmax(beta)`` per module."""
    layers = layout.layers
    values = multipliers(hyper, len(layers) if hyper.layer is not None else None)
    position = {layer: i for i, layer in enumerate(layers)}
    flat = []
    for e in layout.entries:
        value = jnp.asarray(_entry_value(e, values, position), e.dtype)
        meta = dict(e.metadata, role=e.role, layers=e.layers, **({} if e.site is None else {"site": e.site}))
        flat.append((e.path, Gate(value, **meta)))
    return nnx.from_flat_state(flat)


def make_loss(graphdef: nnx.GraphDef, layout: GateLayout, loss_fn: ModelLoss) -> ProblemLoss:
    """The problem loss ``loss(base, lora, hyper, batch, key)`` of a split model: ``base`` is
    ``{"model": <its base state>, "gates": <its gate state>}``; the model is merged inside the (jitted) loss,
    with the gates of raw ``hyper`` (a search) or, with ``hyper`` None, its own frozen gates (a fine-tune),
    and ``loss_fn(model, batch)`` is called. Cached on its arguments: every search or fine-tune of the same
    model structure and loss reuses one function, hence its compiled step."""
    try:
        return _cached_loss(graphdef, layout, loss_fn)
    except TypeError:  # an unhashable loss_fn or metadata: build it afresh
        return _make_loss(graphdef, layout, loss_fn)


@functools.lru_cache(maxsize=32)
def _cached_loss(graphdef: nnx.GraphDef, layout: GateLayout, loss_fn: ModelLoss) -> ProblemLoss:
    return _make_loss(graphdef, layout, loss_fn)


def _make_loss(graphdef: nnx.GraphDef, layout: GateLayout, loss_fn: ModelLoss) -> ProblemLoss:
    def loss(base: Any, lora: nnx.State, hyper: Gates | None, batch: Batch, key: Any = None) -> jax.Array:
        gates = base["gates"] if hyper is None else gate_state(layout, hyper)
        # copy=True: fresh variables at the current trace level, which NNX transforms inside the model
        # (nnx.scan over stacked layers) require; base arrives from the outer jit.
        return check_scalar_loss(loss_fn(nnx.merge(graphdef, base["model"], lora, gates, copy=True), batch))

    return loss


def make_split_search_step(
    graphdef: nnx.GraphDef,
    gates: nnx.State | GateLayout,
    loss_fn: ModelLoss,
    search: SearchConfig,
    optimizer: optax.GradientTransformation | None = None,
    val_loss_fn: ModelLoss | None = None,
) -> Callable[..., tuple[SearchState, dict]]:
    """One jitted search step ``(base, state, train_batches[K], val_batch) -> (state, metrics)``, by hand.

    Args:
      graphdef, gates: from :func:`split_for_search` (the gate state fixes the hyperparameter layout).
      loss_fn: ``loss_fn(model, batch) -> scalar``, called on the merged model inside the step.
      search: estimator ("unrolled", "first_order", "darts", "forward"), K, learning rates.
      optimizer: the inner optimizer (default :func:`flexora_jax.bilevel.inner_optimizer`).
      val_loss_fn: the outer objective if it differs from ``loss_fn``.
    The state is donated; the base is an argument (never differentiated), so one compiled program
    serves the whole search. Start from :func:`init_search_state` ``(lora, hyper, search)``. ``fj.search``
    runs the same step through :func:`flexora_jax.nnx.problem`.
    """
    layout = gates if isinstance(gates, GateLayout) else GateLayout.of(gates)
    gate_vars = gates if not isinstance(gates, GateLayout) else gate_state(layout, Gates())
    val = None if val_loss_fn is None else make_loss(graphdef, layout, val_loss_fn)
    step = search_step(make_loss(graphdef, layout, loss_fn), search, optimizer, val)

    def on_base(base: nnx.State, state: SearchState, train_batches: Batch, val_batch: Batch):
        return step({"model": base, "gates": gate_vars}, state, train_batches, val_batch)

    return jax.jit(on_base, donate_argnums=1)


def update_model(model: nnx.Module, lora: nnx.State, hyper: Gates | None = None) -> nnx.Module:
    """Write searched LoRA (and the gate values of ``hyper``) back into ``model``, in place."""
    nnx.update(model, lora)
    if hyper is not None:
        nnx.update(model, gate_state(GateLayout.of(nnx.state(model, Gate)), hyper))
    return model


# ------------------------------------------------------------------------------------ selection
def select_paths(
    model: nnx.Module, hyper: Gates, rule: str = "positive", k: int = 0, threshold: float = 1.0
) -> Selection:
    """Layers (Flexora rule on alpha) and ranks (AutoLoRA rule on beta) of a model adapted by ``add_lora``,
    in its own module paths (``fj.select(model, gates, selection)`` calls this, or the decoder's rule)."""
    own = getattr(model, "lora_problem", None)
    if callable(own):  # a model that states its own problem (fj.nnx.LlamaForCausalLM) selects through it
        return own().select(hyper, SelectionConfig(rule, top_k=k, threshold=threshold))
    sites = lora_sites(model)
    if not sites:
        raise ConfigError(f"select_paths: {type(model).__name__} has no LoRA added by fj.nnx.add_lora")
    layout = GateLayout.of(nnx.state(model, Gate))
    if hyper.layer is not None:
        if np.shape(hyper.layer) != (len(layout.layers),):
            raise ConfigError(
                f"select_paths: the layer gates have shape {np.shape(hyper.layer)}, the model adapts "
                f"{len(layout.layers)} layers {layout.layers} (gates from another model?)"
            )
        chosen = select_layers(Gates(layer=np.asarray(hyper.layer), power=hyper.power), rule, k, threshold)
        layers = tuple(layout.layers[i] for i in chosen)
    else:
        layers = tuple(sorted({i for s in sites.values() for i in s.layers}))
    modules = {s.path: s.layers for s in sites.values()}
    ranks = {}
    for path, beta in (hyper.rank or {}).items():
        rows = np.asarray(beta).reshape(-1, np.shape(beta)[-1])
        counts = select_ranks(Gates(rank={path: rows}))[path]
        per_layer = tuple(r if layer in layers else 0 for r, layer in zip(counts, modules[path]))
        if any(per_layer):
            ranks[path] = per_layer
    return Selection(layers, modules, ranks)


def apply_selection(model: nnx.Module, selection: Selection, *, gates: str | None = None, rngs: nnx.Rngs) -> nnx.Module:
    """Replace the searched LoRA of ``model`` by a fresh one on the selected layers and ranks only (in place).

    Ranks and scale follow PEFT (``alpha / r_i``); a stacked module keeps its layer axis and masks the
    layers and rank components left out (through its gates, which then hold 0 / 1 masks). A model with its
    own ``apply_selection`` method (``fj.nnx.LlamaForCausalLM``) applies it itself.
    """
    check_config_type(model, nnx.Module, "apply_selection: model")
    check_config_type(selection, Selection, "apply_selection: selection")
    check_config_type(rngs, nnx.Rngs, "apply_selection: rngs")
    if gates not in GATE_CHOICES:
        raise ConfigError(f"apply_selection: gates must be one of {GATE_CHOICES}, got {gates!r}")
    own = getattr(model, "apply_selection", None)
    if callable(own):
        return own(selection, gates=gates, rngs=rngs)
    sites: dict[str, LoraSite] = {s.path: s for s in lora_sites(model).values()}
    for path, layers in selection.modules.items():
        if path not in sites or sites[path].layers != tuple(layers):
            raise ConfigError(
                f"apply_selection: the selection names module {path!r} (layers {tuple(layers)}), which this model "
                f"does not adapt that way; its adapted modules: {sorted(sites)[:12]} (a selection from another model?)"
            )
    modules = {path: module for path, module in adapted_modules(model).items() if path in selection.modules}
    old = {path: sites[path] for path in selection.modules}
    remove_lora(model)
    shared: dict[Any, Gate] = {}
    for path, site in old.items():
        ranks = {path: selection.ranks[path]} if path in selection.ranks else None
        attach_lora(
            modules[path], site, gates=gates, layers=selection.layers, ranks=ranks, shared_gates=shared, rngs=rngs
        )
    return model
