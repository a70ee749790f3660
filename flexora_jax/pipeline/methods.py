"""The methods a run compares, and the selection each one fine-tunes.

``flexora`` / ``autolora`` / ``flexora+autolora`` take their layers and ranks from a gate search;
``lora`` adapts every layer (``dora`` too, with DoRA; ``flexora+dora``: DoRA on flexora's layers);
``random_k`` / ``lora_drop`` take as many layers as the flexora selection (or ``baseline_k``), drawn
with the run seed / the last ones; ``lora_lowrank`` / ``flexora_highrank`` are the equal-parameter baselines. Each method's files live in ``methods/<method>/`` and each
search's in ``searches/<gates>/``; a ``selection.json`` holds the PEFT-visible selection plus what
the run needs to rebuild it (``modules``, ``lora_config``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from flexora_jax.errors import ConfigError
from flexora_jax.lora import count_params, make_spec
from flexora_jax.pipeline.config import DORA_METHODS, K_METHODS, METHOD_GATES, RunConfig
from flexora_jax.pipeline.io import read_json
from flexora_jax.pipeline.workspace import Workspace
from flexora_jax.selection import Selection


@dataclasses.dataclass
class SearchOutcome:
    """A finished search, as written to ``searches/<gates>/``."""

    kind: str
    gates: dict[str, Any]  # gates.json content
    selection: Selection


def selection_json(ws: Workspace, selection: Selection) -> dict[str, Any]:
    """``selection.json`` of a search or a method: the PEFT-visible selection, its ``lora_config`` and the
    trainable count (:meth:`Selection.to_json`; :meth:`Selection.from_json` reads it back)."""
    trainable = count_params(ws.model_config, make_spec(ws.model_config, selection.lora_config))["trainable"]
    return selection.to_json(trainable)



def needed_searches(config: RunConfig) -> list[str]:
    """Gate kinds to search for the run's methods (the K_METHODS baselines need k from a layer search)."""
    kinds = [METHOD_GATES[m] for m in config.methods if m in METHOD_GATES]
    if ("flexora_highrank" in config.methods
            or (config.baseline_k == 0 and any(m in K_METHODS for m in config.methods))):
        kinds.append("layer")
    return list(dict.fromkeys(kinds))


def method_selection(ws: Workspace, method: str, searches: dict[str, SearchOutcome]) -> Selection:
    """The layers (and ranks) ``method`` fine-tunes."""
    cfg, L = ws.config, ws.num_layers
    if method in METHOD_GATES:
        found = searches[METHOD_GATES[method]].selection
        return dataclasses.replace(found, lora_config=dataclasses.replace(
            found.lora_config, use_dora=True)) if method in DORA_METHODS else found
    if method in ("lora", "dora", "adalora"):  # adalora: its own ranks, found while it trains
        return Selection.of_lora_config(dataclasses.replace(cfg.lora, layers_to_transform=None,
                                                            use_dora=method == "dora"), L)
    k = cfg.baseline_k or len(searches["layer"].selection.layers)
    if k > L:
        raise ConfigError(f"baseline_k {k} exceeds the model's {L} layers; expected 0..{L}")
    if method in ("lora_lowrank", "flexora_highrank"):
        if cfg.lora.rank_pattern:
            raise ConfigError(f"{method} rescales lora.r; it cannot be combined with lora.rank_pattern")
        if method == "lora_lowrank":
            layers, r = tuple(range(L)), max(1, round(cfg.lora.r * k / L))
        else:
            layers = tuple(searches["layer"].selection.layers)
            r = round(cfg.lora.r * L / max(len(layers), 1))
        scaled = dataclasses.replace(cfg.lora, r=r, lora_alpha=cfg.lora.lora_alpha * r / cfg.lora.r,
                                     layers_to_transform=layers if len(layers) < L else None)
        return Selection.of_lora_config(scaled, L)
    if method == "random_k":
        layers = tuple(sorted(int(i) for i in np.random.default_rng([cfg.seed, 11]).choice(L, k, replace=False)))
    else:  # lora_drop: the last k layers
        layers = tuple(range(L - k, L))
    return Selection.of_lora_config(dataclasses.replace(cfg.lora, layers_to_transform=layers if k < L else None), L)


def method_dirname(method: str) -> str:
    """The folder under ``methods/`` of a method (``flexora+autolora`` -> ``flexora_autolora``)."""
    return method.replace("+", "_")


def method_dir(ws: Workspace, method: str) -> Path:
    return ws.run_dir / "methods" / method_dirname(method)



def load_search(run_dir: Path, kind: str) -> SearchOutcome:
    """A finished search read back from ``searches/<kind>/``."""
    d = run_dir / "searches" / kind
    return SearchOutcome(kind, read_json(d / "gates.json"), Selection.from_json(read_json(d / "selection.json")))
