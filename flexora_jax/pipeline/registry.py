"""The methods a run can compare, as a registry: what each searches, how it selects, how it fine-tunes.

A method is one :class:`Method` record; :func:`register` adds it. Adding a method is a record and one
``register`` line: ``method:`` / ``compare:`` validation, ``flexora-jax --help-config``, the command's
method list, the searches a run needs (:func:`flexora_jax.pipeline.methods.needed_searches`) and the
fine-tune it gets (:func:`flexora_jax.pipeline.stages.finetune_stage`) all read the registry.

A method's ``select(run, searches)`` receives the run (its ``config``, the :class:`RunConfig`, and the
model's ``num_layers``) and the finished searches by gate kind (``{"layer": Selection, ...}``), and returns
the :class:`~flexora_jax.selection.Selection` it fine-tunes (its ``lora_config`` is what the fine-tune trains).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from flexora_jax.errors import ConfigError, did_you_mean
from flexora_jax.problem import GATE_KINDS
from flexora_jax.selection import Selection

#: How a method fine-tunes its selection: ``lora`` (a fresh LoRA, ``fj.finetune``), ``dora`` (the same with
#: DoRA's magnitude, ``use_dora``), ``adalora`` (PEFT's AdaLoRA, ``fj.finetune_adalora``: it finds its own ranks).
FINETUNES = ("lora", "dora", "adalora")
RESERVED = ("base",)  # compare.json's key for the base model without LoRA


class Run(Protocol):
    """What a method's ``select`` reads of the run (the stages pass their workspace)."""

    config: Any  # the run's RunConfig
    num_layers: int


Select = Callable[[Run, Mapping[str, Selection]], Selection]


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the registry.

    Fields:
      name: what ``method:`` / ``compare:`` name (lower case, digits, ``_``, ``+``, ``-``); its files live in
        ``methods/<dirname>/`` (``+`` -> ``_``).
      description: one sentence for ``--help-config`` and the docs.
      select: ``select(run, searches) -> Selection``, the layers and ranks it fine-tunes.
      search: the gate kind of the search it reads ("layer", "rank", "both"), None for no search of its own.
      needs_k: it uses k, the number of layers the flexora selection keeps: a layer search runs for it
        unless the run sets ``baseline_k``.
      finetune: one of :data:`FINETUNES`.
    """

    name: str
    description: str
    select: Select
    search: str | None = None
    needs_k: bool = False
    finetune: str = "lora"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_+\-]*", self.name):
            raise ConfigError(f"Method: name must be lower-case letters, digits, '_', '+' or '-', got {self.name!r}")
        if self.name in RESERVED:
            raise ConfigError(f"Method: the name {self.name!r} is reserved (compare.json's base model)")
        if not isinstance(self.description, str) or not self.description.strip():
            raise ConfigError(f"Method {self.name!r}: description must say what it does")
        if not callable(self.select):
            raise ConfigError(f"Method {self.name!r}: select must be a function (run, searches) -> Selection")
        if self.search is not None and self.search not in GATE_KINDS:
            raise ConfigError(f"Method {self.name!r}: search must be None or one of {GATE_KINDS}, got {self.search!r}")
        if self.finetune not in FINETUNES:
            raise ConfigError(f"Method {self.name!r}: finetune must be one of {FINETUNES}, got {self.finetune!r}")

    @property
    def dirname(self) -> str:
        return method_dirname(self.name)

    def searches(self, baseline_k: int = 0) -> tuple[str, ...]:
        """The gate kinds of the searches it reads (its own; a layer search for k unless ``baseline_k``)."""
        kinds = () if self.search is None else (self.search,)
        return kinds + (("layer",) if self.needs_k and not baseline_k and "layer" not in kinds else ())

    def selection(self, run: Run, searches: Mapping[str, Selection]) -> Selection:
        """What it fine-tunes: :attr:`select`'s selection, with DoRA switched on for ``finetune="dora"``."""
        found = self.select(run, searches)
        if self.finetune == "dora" and found.lora_config is not None:
            found = dataclasses.replace(found, lora_config=dataclasses.replace(found.lora_config, use_dora=True))
        return found


_REGISTRY: dict[str, Method] = {}


def method_dirname(name: str) -> str:
    """The folder under ``methods/`` of a method (``flexora+autolora`` -> ``flexora_autolora``)."""
    return name.replace("+", "_")


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace``: over a method of the same name); returns it."""
    if not isinstance(method, Method):
        raise ConfigError(f"register: expected a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ConfigError(f"method {method.name!r} is already registered; pass replace=True to replace it")
    clash = [m for m in _REGISTRY.values() if m.dirname == method.dirname and m.name != method.name]
    if clash:
        raise ConfigError(f"method {method.name!r} would share methods/{method.dirname}/ with {clash[0].name!r}")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove a method from the registry; returns it."""
    return _REGISTRY.pop(get_method(name).name)


def get_method(name: str) -> Method:
    """The registered method ``name``; :class:`ConfigError` naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown method {name!r}{did_you_mean(str(name), _REGISTRY)}; registered: {list(_REGISTRY)}"
        ) from None


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in registration order."""
    return tuple(_REGISTRY)


class _Names(Sequence[str]):
    """The registered names as a live sequence (``name in METHODS`` sees methods registered later)."""

    def __getitem__(self, index: Any) -> Any:
        return method_names()[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return repr(method_names())


#: What ``method:`` / ``compare:`` may name: the registry's names, live.
METHODS: Sequence[str] = _Names()


# ------------------------------------------------------------------------------ the built-in methods
def _k(run: Run, searches: Mapping[str, Selection]) -> int:
    """k: ``baseline_k``, or as many layers as the flexora selection keeps."""
    L = run.num_layers
    k = run.config.baseline_k or len(searches["layer"].layers)
    if k > L:
        raise ConfigError(f"baseline_k {k} exceeds the model's {L} layers; expected 0..{L}")
    return k


def _on_layers(run: Run, layers: Sequence[int], **changes: Any) -> Selection:
    """The run's LoRA (with ``changes``) on ``layers`` (``layers_to_transform`` unset when that is every layer)."""
    L = run.num_layers
    layers = tuple(layers)
    return Selection.of_lora_config(
        dataclasses.replace(run.config.lora, layers_to_transform=layers if len(layers) < L else None, **changes), L
    )


def every_layer(run: Run, searches: Mapping[str, Selection]) -> Selection:
    """The run's LoRA on every layer."""
    return _on_layers(run, range(run.num_layers))


def searched(kind: str) -> Select:
    """The selection the ``kind`` search found."""

    def select(run: Run, searches: Mapping[str, Selection]) -> Selection:
        return searches[kind]

    select.__doc__ = f"The selection of the {kind!r} gate search."
    return select


def random_k(run: Run, searches: Mapping[str, Selection]) -> Selection:
    """k layers drawn with the run seed."""
    k = _k(run, searches)
    rng = np.random.default_rng([run.config.seed, 11])
    return _on_layers(run, sorted(int(i) for i in rng.choice(run.num_layers, k, replace=False)))


def last_k(run: Run, searches: Mapping[str, Selection]) -> Selection:
    """The last k layers."""
    k = _k(run, searches)
    return _on_layers(run, range(run.num_layers - k, run.num_layers))


def _rescaled(run: Run, layers: Sequence[int], r: int, method: str) -> Selection:
    lora = run.config.lora
    if lora.rank_pattern:
        raise ConfigError(f"{method} rescales lora.r; it cannot be combined with lora.rank_pattern")
    return _on_layers(run, layers, r=r, lora_alpha=lora.lora_alpha * r / lora.r)


def lowrank(run: Run, searches: Mapping[str, Selection]) -> Selection:
    """Every layer at rank ``max(1, round(r * k / L))``, ``lora_alpha / r`` kept."""
    L, k = run.num_layers, _k(run, searches)
    return _rescaled(run, range(L), max(1, round(run.config.lora.r * k / L)), "lora_lowrank")


def highrank(run: Run, searches: Mapping[str, Selection]) -> Selection:
    """The flexora selection's layers at rank ``round(r * L / k)``, ``lora_alpha / r`` kept."""
    _k(run, searches)
    layers = searches["layer"].layers
    return _rescaled(run, layers, round(run.config.lora.r * run.num_layers / max(len(layers), 1)), "flexora_highrank")


for _method in (
    Method("lora", "LoRA on every layer (the baseline).", every_layer),
    Method("flexora", "the layers a layer-gate search selects (Flexora).", searched("layer"), search="layer"),
    Method(
        "autolora", "every layer at the ranks a rank-gate search selects (AutoLoRA).", searched("rank"), search="rank"
    ),
    Method(
        "flexora+autolora",
        "the layers and ranks of one combined layer + rank gate search.",
        searched("both"),
        search="both",
    ),
    Method(
        "random_k",
        "as many layers as the flexora selection (or baseline_k), drawn with the run seed.",
        random_k,
        needs_k=True,
    ),
    Method("lora_drop", "the last k layers (k: the flexora selection's size, or baseline_k).", last_k, needs_k=True),
    Method(
        "lora_lowrank",
        "every layer at rank max(1, round(r * k / L)): about flexora's parameter count spread "
        "over all layers (lora_alpha / r kept).",
        lowrank,
        needs_k=True,
    ),
    Method(
        "flexora_highrank",
        "flexora's layers at rank round(r * L / k): LoRA-all's parameter count on fewer layers (lora_alpha / r kept).",
        highrank,
        search="layer",
        needs_k=True,
    ),
    Method("dora", "DoRA (flexora_jax.dora) on every layer.", every_layer, finetune="dora"),
    Method(
        "flexora+dora",
        "DoRA on the layers a layer-gate search selects (the search itself is plain LoRA).",
        searched("layer"),
        search="layer",
        finetune="dora",
    ),
    Method(
        "adalora",
        "PEFT's AdaLoRA on every layer, its budget from init_r = 1.5 r down to target_r = r; exported "
        "rank-pruned as LoRA with rank_pattern (and as a PEFT AdaLoRA adapter).",
        every_layer,
        finetune="adalora",
    ),
):
    register(_method)

__all__ = [
    "FINETUNES",
    "METHODS",
    "Method",
    "Run",
    "Select",
    "every_layer",
    "get_method",
    "highrank",
    "last_k",
    "lowrank",
    "method_dirname",
    "method_names",
    "random_k",
    "register",
    "searched",
    "unregister",
]
