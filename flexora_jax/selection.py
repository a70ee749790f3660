"""Gates -> a discrete choice: which layers keep LoRA (Flexora) and each module's rank (AutoLoRA).

Selection runs outside jit on final gate values and returns a :class:`LoraConfig` for the fine-tune
stage (``layers_to_transform`` and a PEFT ``rank_pattern``), so the fine-tune compiles once for the
chosen shapes and exports with the true ranks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from flexora_jax.config import SELECTION_RULES, LoraConfig, SelectionConfig, module_path
from flexora_jax.errors import ConfigError, NumericsError
from flexora_jax.gates import Gates


def select_layers(gates: Gates, rule: str = "positive", k: int = 0, threshold: float = 1.0) -> tuple[int, ...]:
    """Layers to keep from the layer gates, judged on the gate value the model applies.

    ``w_l = (L * softmax(alpha)_l) ** power`` (what multiplies the LoRA branch, and what ``gates.json``
    reports):

    - ``positive``: ``alpha_l > 0`` (the paper's rule; at mean-zero alpha the same as ``w_l > 1``);
    - ``top_k``: the k layers with the largest gate;
    - ``threshold``: ``w_l >= threshold``.
    Never empty: if no layer passes, the single best layer is kept.
    Raises:
      ConfigError: no layer gates, an unknown rule or k out of range; NumericsError: non-finite gates.
    """
    if gates is None or gates.layer is None:
        raise ConfigError("select_layers needs layer gates (a 'layer' or 'both' search)")
    alpha = np.asarray(gates.layer, np.float64)
    if not np.all(np.isfinite(alpha)):
        raise NumericsError(f"layer gates are not finite ({alpha.tolist()}); the search diverged, nothing to select")
    L = alpha.size
    w = (L * np.exp(alpha - alpha.max()) / np.exp(alpha - alpha.max()).sum()) ** gates.power
    if rule == "positive":
        keep = np.flatnonzero(alpha > 0)
    elif rule == "top_k":
        if not 1 <= k <= L:
            raise ConfigError(f"top_k selection needs 1 <= k <= {L} (the model's layers), got k={k}")
        keep = np.sort(np.argsort(-w, kind="stable")[:k])
    elif rule == "threshold":
        keep = np.flatnonzero(w >= threshold)
    else:
        raise ConfigError(f"unknown selection rule {rule!r}; valid: {SELECTION_RULES}")
    if keep.size == 0:
        keep = np.array([int(np.argmax(alpha))])
    return tuple(int(i) for i in keep)


def select_ranks(gates: Gates) -> dict[str, list[int]]:
    """AutoLoRA ranks: per module and layer, #{j : softmax(beta)_j >= 1 / r_max}, in [1, r_max]."""
    if gates is None or gates.rank is None:
        raise ConfigError("select_ranks needs rank gates (a 'rank' or 'both' search)")
    out = {}
    for module, beta in gates.rank.items():
        beta = np.asarray(beta, np.float64)
        if not np.all(np.isfinite(beta)):
            raise NumericsError(f"rank gates of {module} are not finite; the search diverged, nothing to select")
        r_max = beta.shape[-1]
        p = np.exp(beta - beta.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        # a tiny tolerance: at a uniform softmax every component sits exactly on the threshold
        out[module] = [int(max(1, n)) for n in (p >= (1.0 / r_max) * (1 - 1e-6)).sum(-1)]
    return out


@dataclasses.dataclass(frozen=True)
class Selection:
    """The search's discrete outcome; ``lora_config`` is what the fine-tune stage trains."""

    layers: tuple[int, ...]
    ranks: dict[str, list[int]] | None
    lora_config: LoraConfig

    def to_json(self, trainable_params: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": list(self.layers), "ranks": {}}
        if self.ranks is not None:
            out["ranks"] = {module_path(m, i): r for m, rs in self.ranks.items()
                            for i, r in enumerate(rs) if i in self.layers}
        if trainable_params is not None:
            out["trainable_params"] = int(trainable_params)
        return out


@functools.singledispatch
def select(gates: Gates, base: LoraConfig, num_layers: int,
           selection: SelectionConfig = SelectionConfig()) -> Selection:
    """Layers (if layer gates) and ranks (if rank gates) -> a fine-tune :class:`LoraConfig`.

    A Flax NNX model as the first argument dispatches to :func:`flexora_jax.nnx.select_nnx`
    (``fj.select(model, gates, selection)``: the selection in the model's own module paths).
    """
    if gates is None:
        raise ConfigError("select needs gates from a search (layer, rank or both), got None")
    layers = (select_layers(gates, selection.rule, selection.top_k, selection.threshold) if gates.layer is not None
              else tuple(base.layers(num_layers)))
    ranks = select_ranks(gates) if gates.rank is not None else None
    pattern: dict[str, int] = dict(base.rank_pattern)
    if ranks is not None:
        for m, rs in ranks.items():
            for i in layers:
                if rs[i] != base.r:
                    pattern[module_path(m, i)] = rs[i]
    cfg = dataclasses.replace(base, layers_to_transform=layers if len(layers) < num_layers else None,
                              rank_pattern=pattern)
    return Selection(layers=layers, ranks=ranks, lora_config=cfg)
