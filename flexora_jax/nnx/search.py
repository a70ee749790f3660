"""The bilevel search over NNX states: Flexora / AutoLoRA on any gated-LoRA NNX model.

The model is split once by variable type (:func:`split_for_search`): a graphdef, the frozen base
(``nnx.Param`` and every other variable), the LoRA state (``nnx.LoRAParam``, what the inner optimizer
trains) and the gate state (:class:`~flexora_jax.nnx.Gate`). The search differentiates w.r.t. *raw*
hyperparameters, a :class:`flexora_jax.gates.Gates` (Flexora's alpha over the adapted layers,
AutoLoRA's beta per module path); inside the jitted loss they become the gate values
(:func:`gate_state`: ``w = L softmax(alpha)``, ``softmax(beta)``), the model is rebuilt by
``nnx.merge`` and the user's ``loss_fn(model, batch)`` is called. So the loss is a pure function
``loss(lora, hyper, batch)`` and :func:`flexora_jax.bilevel.hypergradient` runs on it unchanged,
every estimator included. Stacked layers need nothing special: a stacked gate takes its slice of ``w``.

A search step is one jitted function of ``(base, SearchState, train_batches[K], val_batch)``,
compiled once per search (gate values never change shapes). After the search, :func:`select` reads
layers / ranks in terms of the model's module paths and :func:`apply_selection` rebuilds LoRA on
exactly those (a fresh LoRA, no gates unless asked).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flexora_jax.bilevel import SearchState, init_search_state, search_step
from flexora_jax.config import SearchConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates, layer_gate_values
from flexora_jax.nnx.surgery import LoraSite, adapted_modules, attach_lora, lora_sites, remove_lora
from flexora_jax.nnx.variables import LOGIT_ROLES, Gate
from flexora_jax.selection import select_layers, select_ranks
from flexora_jax.validation import check_mapping, check_number, check_type

Batch = dict[str, jax.Array]
ModelLoss = Callable[[nnx.Module, Batch], jax.Array]

__all__ = ["GateEntry", "GateLayout", "Selection", "apply_selection", "gate_state", "init_hyperparameters",
           "init_search_state", "make_loss", "make_search_step", "select", "split_for_search", "update_model"]


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
    role: str  # "layer", "rank", "layer_logits" or "rank_logits" (see flexora_jax.nnx.variables)
    layers: tuple[int, ...]  # the layers it covers
    site: str | None  # the module (path, or module name for LlamaForCausalLM) of a rank gate
    shape: tuple[int, ...]
    dtype: Any
    metadata: tuple[tuple[str, Any], ...]  # the rest of its metadata (sharding), kept on rebuild


@dataclasses.dataclass(frozen=True)
class GateLayout:
    """Static map from raw hyperparameters to the gate state: the adapted layers and every gate variable."""

    entries: tuple[GateEntry, ...]

    @classmethod
    def of(cls, gates: nnx.State) -> "GateLayout":
        entries = []
        for path, var in nnx.to_flat_state(gates):
            meta = dict(var.get_metadata())
            role, layers, site = meta.pop("role", None), tuple(meta.pop("layers", ())), meta.pop("site", None)
            if role is None:
                raise ConfigError(f"gate {'.'.join(map(str, path))!r} has no role metadata; create gates with add_lora")
            value = var.get_value()
            entries.append(GateEntry(tuple(path), role, layers, site, tuple(value.shape), value.dtype,
                                     tuple(sorted(meta.items()))))
        return cls(tuple(entries))

    @property
    def layers(self) -> tuple[int, ...]:
        """The adapted layers, sorted: the L of Flexora's ``w = L softmax(alpha)``."""
        layered = [e for e in self.entries if e.role in ("layer", "layer_logits")] or self.entries
        return tuple(sorted({i for e in layered for i in e.layers}))

    def sites(self, role: str) -> dict[str, tuple[int, ...]]:
        """``{site: shape}`` of the rank gates (role "rank" or "rank_logits")."""
        return {e.site: e.shape for e in self.entries if e.role == role}


def init_hyperparameters(layout: GateLayout | nnx.State, kind: str = "layer", power: int = 1) -> Gates:
    """Raw hyperparameters at their neutral point (alpha = 0, beta = 0) for a search of ``kind``."""
    layout = layout if isinstance(layout, GateLayout) else GateLayout.of(layout)
    if kind not in ("layer", "rank", "both"):
        raise ConfigError(f"search gates must be 'layer', 'rank' or 'both', got {kind!r}")
    roles = {e.role for e in layout.entries}
    dtype = jnp.result_type(*(e.dtype for e in layout.entries)) if layout.entries else jnp.float32
    layer = rank = None
    if kind in ("layer", "both"):
        if not roles & {"layer", "layer_logits"}:
            raise ConfigError(f"a {kind!r} search needs layer gates; the model has gate roles {sorted(roles)} "
                              "(add_lora(..., gates='layer' or 'both'))")
        layer = jnp.zeros((len(layout.layers),), dtype)
    if kind in ("rank", "both"):
        sites = {**layout.sites("rank"), **layout.sites("rank_logits")}
        if not sites:
            raise ConfigError(f"a {kind!r} search needs rank gates; the model has gate roles {sorted(roles)} "
                              "(add_lora(..., gates='rank' or 'both'))")
        rank = {site: jnp.zeros(shape, dtype) for site, shape in sites.items()}
    return Gates(layer=layer, rank=rank, power=power)


def _entry_value(entry: GateEntry, hyper: Gates, w: jax.Array | None, position: Mapping[int, int]) -> jax.Array:
    if entry.role in LOGIT_ROLES:
        raw = hyper.layer if entry.role == "layer_logits" else (hyper.rank or {}).get(entry.site)
        return jnp.zeros(entry.shape) if raw is None else raw
    if entry.role == "layer":
        if w is None:
            return jnp.ones(entry.shape)
        return w[np.asarray([position[i] for i in entry.layers])].reshape(entry.shape)
    beta = (hyper.rank or {}).get(entry.site)
    return jnp.ones(entry.shape) if beta is None else jax.nn.softmax(beta, axis=-1)


def gate_state(layout: GateLayout, hyper: Gates) -> nnx.State:
    """The gate state for raw hyperparameters: Flexora ``w = (L softmax(alpha))^p``, AutoLoRA ``softmax(beta)``."""
    layers = layout.layers
    w = None if hyper.layer is None else layer_gate_values(hyper, len(layers))
    position = {layer: i for i, layer in enumerate(layers)}
    flat = []
    for e in layout.entries:
        value = jnp.asarray(_entry_value(e, hyper, w, position), e.dtype)
        meta = dict(e.metadata, role=e.role, layers=e.layers, **({} if e.site is None else {"site": e.site}))
        flat.append((e.path, Gate(value, **meta)))
    return nnx.from_flat_state(flat)


def make_loss(graphdef: nnx.GraphDef, layout: GateLayout, loss_fn: ModelLoss,
              base: nnx.State) -> Callable[[nnx.State, Gates, Batch], jax.Array]:
    """``loss(lora, hyper, batch)``: merge the model inside the (jitted) loss and call ``loss_fn(model, batch)``."""
    def loss(lora: nnx.State, hyper: Gates, batch: Batch) -> jax.Array:
        # copy=True: fresh variables at the current trace level, which NNX transforms inside the model
        # (nnx.scan over stacked layers) require; base arrives from the outer jit.
        return loss_fn(nnx.merge(graphdef, base, lora, gate_state(layout, hyper), copy=True), batch)
    return loss


def make_search_step(graphdef: nnx.GraphDef, gates: nnx.State | GateLayout, loss_fn: ModelLoss,
                     search: SearchConfig, optimizer: optax.GradientTransformation | None = None,
                     val_loss_fn: ModelLoss | None = None) -> Callable[..., tuple[SearchState, dict]]:
    """One jitted search step ``(base, state, train_batches[K], val_batch) -> (state, metrics)``.

    Args:
      graphdef, gates: from :func:`split_for_search` (the gate state fixes the hyperparameter layout).
      loss_fn: ``loss_fn(model, batch) -> scalar``, called on the merged model inside the step.
      search: estimator ("unrolled", "first_order", "darts", "forward"), K, learning rates.
      optimizer: the inner optimizer (default :func:`flexora_jax.bilevel.inner_optimizer`).
      val_loss_fn: the outer objective if it differs from ``loss_fn``.
    The state is donated; the base is an argument (never differentiated), so one compiled program
    serves the whole search. Start from :func:`init_search_state` ``(lora, hyper, search)``.
    """
    layout = gates if isinstance(gates, GateLayout) else GateLayout.of(gates)

    def losses(base: nnx.State) -> tuple[Callable, Callable]:
        train_loss = make_loss(graphdef, layout, loss_fn, base)
        return train_loss, train_loss if val_loss_fn is None else make_loss(graphdef, layout, val_loss_fn, base)

    return jax.jit(search_step(losses, search, optimizer), donate_argnums=1)


def update_model(model: nnx.Module, lora: nnx.State, hyper: Gates | None = None) -> nnx.Module:
    """Write searched LoRA (and the gate values of ``hyper``) back into ``model``, in place."""
    nnx.update(model, lora)
    if hyper is not None:
        nnx.update(model, gate_state(GateLayout.of(nnx.state(model, Gate)), hyper))
    return model


# ------------------------------------------------------------------------------------ selection
@dataclasses.dataclass(frozen=True)
class Selection:
    """The search's discrete outcome in the model's own module paths."""

    layers: tuple[int, ...]  # layers that keep LoRA
    modules: Mapping[str, tuple[int, ...]]  # every searched module path -> its layers (stacked: all of them)
    ranks: Mapping[str, tuple[int, ...]]  # module path -> rank per layer of ``modules[path]``, 0 where not selected
    #                                       (rank search only; modules of unselected layers are absent)

    def to_json(self, trainable_params: int | None = None) -> dict[str, Any]:
        """``selection.json``: ``layers``, ``ranks`` (``path`` or ``path[layer]`` for stacked modules), ``modules``."""
        ranks = {}
        for path, per_layer in self.ranks.items():
            layers = self.modules[path]
            for layer, r in zip(layers, per_layer):
                if r:
                    ranks[path if len(layers) == 1 else f"{path}[{layer}]"] = int(r)
        out: dict[str, Any] = {"layers": list(self.layers), "ranks": ranks,
                               "modules": {p: list(v) for p, v in self.modules.items()}}
        if trainable_params is not None:
            out["trainable_params"] = int(trainable_params)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str = "selection") -> "Selection":
        """The selection :meth:`to_json` wrote; a malformed one (a key missing or unknown, a value of the wrong
        type, a rank naming a module or layer the selection does not have) is a ConfigError naming ``name``."""
        check_mapping(data, name, ("layers", "ranks", "modules", "trainable_params"), ("layers", "modules"))
        check_type(data["layers"], tuple[int, ...], f"{name}['layers']")
        check_type(data["modules"], Mapping[str, tuple[int, ...]], f"{name}['modules']")
        check_type(data.get("ranks", {}), Mapping[str, int], f"{name}['ranks']")
        modules = {p: tuple(v) for p, v in data["modules"].items()}
        ranks: dict[str, list[int]] = {}
        for key, r in data.get("ranks", {}).items():
            where = f"{name}['ranks'][{key!r}]"
            path, bracket, layer = key.partition("[")
            layers = modules.get(path)
            index = layer[:-1] if bracket and layer.endswith("]") else None
            if layers is None or bracket and (index is None or not index.isdigit() or int(index) not in layers):
                raise ConfigError(f"{where}: expected '<module path>' or '<module path>[<layer>]' naming a module and "
                                  f"layer of {name}['modules'] ({sorted(modules)[:8]})")
            if not bracket and len(layers) != 1:
                raise ConfigError(f"{where}: module {path!r} covers layers {layers}; name one as '{path}[<layer>]'")
            per_layer = ranks.setdefault(path, [0] * len(layers))
            per_layer[layers.index(int(index)) if bracket else 0] = check_number(r, where, lo=0, integer=True)
        return cls(tuple(data["layers"]), modules, {p: tuple(v) for p, v in ranks.items()})


def select(model: nnx.Module, hyper: Gates, rule: str = "positive", k: int = 0, threshold: float = 1.0) -> Selection:
    """Layers (Flexora rule on alpha) and ranks (AutoLoRA rule on beta) of a model adapted by ``add_lora``.

    ``LlamaForCausalLM`` selects like the functional core: ``flexora_jax.selection.select(hyper, lora_config, L)``.
    """
    sites = lora_sites(model)
    if not sites:
        raise ConfigError(f"select: {type(model).__name__} has no add_lora sites; for LlamaForCausalLM use "
                          "flexora_jax.selection.select(hyper, model.lora_config, num_layers)")
    layout = GateLayout.of(nnx.state(model, Gate))
    if hyper.layer is not None:
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


def apply_selection(model: nnx.Module, selection: Selection, *, gates: str | None = None,
                    rngs: nnx.Rngs) -> nnx.Module:
    """Replace the searched LoRA of ``model`` by a fresh one on the selected layers and ranks only (in place).

    Ranks and scale follow PEFT (``alpha / r_i``); a stacked module keeps its layer axis and masks the
    layers and rank components left out (through its gates, which then hold 0 / 1 masks).
    """
    sites: dict[str, LoraSite] = {s.path: s for s in lora_sites(model).values()}
    for path, layers in selection.modules.items():
        if path not in sites or sites[path].layers != tuple(layers):
            raise ConfigError(
                f"apply_selection: the selection names module {path!r} (layers {tuple(layers)}), which this model "
                f"does not adapt that way; its adapted modules: {sorted(sites)[:12]} (a selection from another model?)")
    modules = {path: module for path, module in adapted_modules(model).items() if path in selection.modules}
    old = {path: sites[path] for path in selection.modules}
    remove_lora(model)
    shared: dict[Any, Gate] = {}
    for path, site in old.items():
        ranks = {path: selection.ranks[path]} if path in selection.ranks else None
        attach_lora(modules[path], site, gates=gates, layers=selection.layers, ranks=ranks,
                    shared_gates=shared, rngs=rngs)
    return model

