"""The searches a run's methods need, and the selection each method fine-tunes.

The methods themselves are records of :mod:`flexora_jax.pipeline.registry` (what each searches, how it
selects, how it fine-tunes). Each method's files live in ``methods/<method>/`` and each search's in
``searches/<gates>/``; a ``selection.json`` holds the PEFT-visible selection plus what the run needs to
rebuild it (``modules``, ``lora_config``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flexora_jax.lora import count_params, make_spec
from flexora_jax.pipeline.config import RunConfig
from flexora_jax.pipeline.io import read_json
from flexora_jax.pipeline.registry import get_method, method_dirname
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
    """Gate kinds to search for the run's methods, in the order the methods name them
    (:meth:`Method.searches <flexora_jax.pipeline.registry.Method.searches>`)."""
    return list(dict.fromkeys(k for m in config.methods for k in get_method(m).searches(config.baseline_k)))


def method_selection(ws: Any, method: str, searches: dict[str, SearchOutcome]) -> Selection:
    """The layers (and ranks) ``method`` fine-tunes; ``ws`` is the run (its ``config`` and ``num_layers``)."""
    return get_method(method).selection(ws, {kind: found.selection for kind, found in searches.items()})


def method_dir(ws: Workspace, method: str) -> Path:
    return ws.run_dir / "methods" / method_dirname(method)


def load_search(run_dir: Path, kind: str) -> SearchOutcome:
    """A finished search read back from ``searches/<kind>/``."""
    d = run_dir / "searches" / kind
    return SearchOutcome(kind, read_json(d / "gates.json"), Selection.from_json(read_json(d / "selection.json")))


__all__ = [
    "SearchOutcome",
    "load_search",
    "method_dir",
    "method_dirname",
    "method_selection",
    "needed_searches",
    "selection_json",
]
