"""Gates -> a discrete choice: which layers keep LoRA (Flexora) and each module's rank (AutoLoRA).

Selection runs outside jit on final gate values and returns a :class:`LoraConfig` for the fine-tune
stage (``layers_to_transform`` and a PEFT ``rank_pattern``), so the fine-tune compiles once for the
chosen shapes and exports with the true ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flexora_jax.config import ATTENTION_MODULES, LoraConfig, SELECTION_RULES
from flexora_jax.gates import Gates


def select_layers(gates: Gates, rule: str = "positive", k: int = 0, threshold: float = 1.0) -> tuple[int, ...]:
    """Layers to keep from the layer gate alpha [L].

    - ``positive``: alpha_l > 0, i.e. gate value above the mean gate (the paper's rule);
    - ``topk``: the k layers with the largest alpha;
    - ``threshold``: gate value ``w_l = L softmax(alpha)_l >= threshold``.
    Never empty: if no layer passes, the single best layer is kept.
    """
    if gates is None or gates.layer is None:
        raise ValueError("select_layers needs layer gates (search.gates 'layer' or 'both')")
    alpha = np.asarray(gates.layer, np.float64)
    L = alpha.size
    if rule == "positive":
        keep = np.flatnonzero(alpha > 0)
    elif rule == "topk":
        if not 1 <= k <= L:
            raise ValueError(f"top-k selection needs 1 <= k <= {L}, got k={k}")
        keep = np.sort(np.argsort(-alpha, kind="stable")[:k])
    elif rule == "threshold":
        w = L * np.exp(alpha - alpha.max()) / np.exp(alpha - alpha.max()).sum()
        keep = np.flatnonzero(w >= threshold)
    else:
        raise ValueError(f"unknown selection rule {rule!r}; valid: {SELECTION_RULES}")
    if keep.size == 0:
        keep = np.array([int(np.argmax(alpha))])
    return tuple(int(i) for i in keep)


def select_ranks(gates: Gates) -> dict[str, list[int]]:
    """AutoLoRA ranks: per module and layer, #{j : softmax(beta)_j >= 1 / r_max}, in [1, r_max]."""
    if gates is None or gates.rank is None:
        raise ValueError("select_ranks needs rank gates (search.gates 'rank' or 'both')")
    out = {}
    for module, beta in gates.rank.items():
        beta = np.asarray(beta, np.float64)
        r_max = beta.shape[-1]
        p = np.exp(beta - beta.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        # a tiny tolerance: at a uniform softmax every component sits exactly on the threshold
        out[module] = [int(max(1, n)) for n in (p >= (1.0 / r_max) * (1 - 1e-6)).sum(-1)]
    return out


def module_path(module: str, layer: int) -> str:
    """PEFT's module path of ``module`` in block ``layer`` (a rank_pattern key)."""
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{group}.{module}"


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


def select(gates: Gates, base: LoraConfig, num_layers: int, rule: str = "positive", k: int = 0,
           threshold: float = 1.0) -> Selection:
    """Layers (if layer gates) and ranks (if rank gates) -> a fine-tune :class:`LoraConfig`."""
    layers = (select_layers(gates, rule, k, threshold) if gates.layer is not None
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
