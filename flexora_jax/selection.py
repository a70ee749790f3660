"""Gates -> a discrete choice: which layers keep LoRA (Flexora) and each module's rank (AutoLoRA).

Selection runs outside jit on final gate values and returns a :class:`LoraConfig` for the fine-tune
stage (``layers_to_transform`` and a PEFT ``rank_pattern``), so the fine-tune compiles once for the
chosen shapes and exports with the true ranks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from flexora_jax.config import SELECTION_RULES, LoraConfig, SelectionConfig, module_path
from flexora_jax.errors import ConfigError, NumericsError
from flexora_jax.gates import Gates
from flexora_jax.validation import check_mapping, check_number, check_type


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


_PEFT_KEY = re.compile(r"^model\.layers\.(\d+)\.\w+\.(\w+)$")
_STACKED_KEY = re.compile(r"^(.*)\[(\d+)\]$")


@dataclasses.dataclass(frozen=True)
class Selection:
    """A search's discrete outcome, keyed by module path: the layers that keep LoRA and each module's ranks.

    One class for every model. ``modules`` maps each searched module path to its layers: the decoder's
    module names (``q_proj``, stacked over all L blocks) or an NNX model's paths (``blocks.0.attn.q``, or a
    stacked ``layers.attn.q``). ``ranks`` (after a rank search) maps a path to the rank of each of its
    layers, 0 where the layer is not selected. ``lora_config`` is the decoder's fine-tune LoRA
    (``layers_to_transform``, ``rank_pattern``: :meth:`to_lora_config`), None for other models.
    """

    layers: tuple[int, ...]
    modules: Mapping[str, tuple[int, ...]]
    ranks: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    lora_config: LoraConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "modules", {str(p): tuple(int(i) for i in v) for p, v in self.modules.items()})
        object.__setattr__(self, "ranks", {str(p): tuple(int(r) for r in v) for p, v in (self.ranks or {}).items()})
        for path, per_layer in self.ranks.items():
            if path not in self.modules or len(per_layer) != len(self.modules[path]):
                raise ConfigError(
                    f"Selection: ranks of {path!r} ({per_layer}) do not match its layers {self.modules.get(path)}"
                )

    @classmethod
    def of_lora_config(cls, lora_config: LoraConfig, num_layers: int) -> Selection:
        """The decoder's selection that ``lora_config`` describes (its ``layers_to_transform``)."""
        every = tuple(range(num_layers))
        return cls(
            tuple(lora_config.layers(num_layers)),
            {m: every for m in lora_config.target_modules},
            lora_config=lora_config,
        )

    def rank_of(self, path: str, layer: int) -> int | None:
        """The searched rank of ``path`` in ``layer`` (None without a rank search for it)."""
        per_layer = self.ranks.get(path)
        return None if per_layer is None else per_layer[self.modules[path].index(layer)]

    def to_lora_config(self, base: LoraConfig) -> LoraConfig:
        """``base`` restricted to the selection: ``layers_to_transform`` and the searched ranks in
        ``rank_pattern`` (PEFT's module paths); what the decoder fine-tunes."""
        num_layers = len(next(iter(self.modules.values()), ()))
        pattern: dict[str, int] = dict(base.rank_pattern)
        for module, per_layer in self.ranks.items():
            for layer, r in zip(self.modules[module], per_layer):
                if r and r != base.r:
                    pattern[module_path(module, layer)] = r
        layers = self.layers if len(self.layers) < num_layers else None
        return dataclasses.replace(base, layers_to_transform=layers, rank_pattern=pattern)

    def _rank_key(self, path: str, layer: int) -> str:
        if self.lora_config is not None:
            return module_path(path, layer)
        return path if len(self.modules[path]) == 1 else f"{path}[{layer}]"

    def to_json(self, trainable_params: int | None = None) -> dict[str, Any]:
        """``selection.json``: ``layers``, ``ranks`` ({PEFT path or ``path[layer]``: r}, selected layers only),
        ``modules``, and the decoder's ``lora_config``; :meth:`from_json` reads it back."""
        ranks = {
            self._rank_key(p, layer): r
            for p, per_layer in self.ranks.items()
            for layer, r in zip(self.modules[p], per_layer)
            if r
        }
        out: dict[str, Any] = {
            "layers": list(self.layers),
            "ranks": ranks,
            "modules": {p: list(v) for p, v in self.modules.items()},
        }
        if self.lora_config is not None:
            out["lora_config"] = self.lora_config.to_dict()
        if trainable_params is not None:
            out["trainable_params"] = int(trainable_params)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str = "selection") -> Selection:
        """A selection :meth:`to_json` wrote; a malformed one (a key missing or unknown, a value of the wrong type,
        a rank naming a module or layer it does not have) is a :class:`ConfigError` naming ``name`` and the key."""
        check_mapping(
            data, name, ("layers", "ranks", "modules", "trainable_params", "lora_config"), ("layers", "modules")
        )
        check_type(data["layers"], tuple[int, ...], f"{name}['layers']")
        check_type(data["modules"], Mapping[str, tuple[int, ...]], f"{name}['modules']")
        check_type(data.get("ranks") or {}, Mapping[str, int], f"{name}['ranks']")
        named = {f"{name}['layers']": data["layers"]}
        named.update({f"{name}['modules'][{p!r}]": v for p, v in data["modules"].items()})
        for where, layers in named.items():  # a negative index would count from the end of a list of layers
            if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise ConfigError(f"{where} = {list(layers)}: expected distinct layer indices >= 0")
        lora_config = None if data.get("lora_config") is None else _lora_config(data["lora_config"])
        modules = {p: tuple(v) for p, v in data["modules"].items()}
        ranks: dict[str, list[int]] = {}
        for key, r in (data.get("ranks") or {}).items():
            where = f"{name}['ranks'][{key!r}]"
            peft, stacked = _PEFT_KEY.match(key), _STACKED_KEY.match(key)
            if lora_config is not None and peft and peft.group(2) in modules:
                path, layer = peft.group(2), int(peft.group(1))
            elif stacked and stacked.group(1) in modules:
                path, layer = stacked.group(1), int(stacked.group(2))
            elif key in modules and len(modules[key]) == 1:
                path, layer = key, modules[key][0]
            elif key in modules:
                raise ConfigError(f"{where}: module {key!r} covers layers {modules[key]}; name one as '{key}[<layer>]'")
            else:
                raise ConfigError(
                    f"{where}: expected '<module path>' or '<module path>[<layer>]' naming a module of "
                    f"{name}['modules'] ({sorted(modules)[:8]}), or a PEFT module path"
                )
            if layer not in modules[path]:
                raise ConfigError(f"{where}: layer {layer} is not one of module {path!r}'s layers {modules[path]}")
            per_layer = ranks.setdefault(path, [0] * len(modules[path]))
            per_layer[modules[path].index(layer)] = int(check_number(r, where, lo=0, integer=True))
        return cls(tuple(data["layers"]), modules, {p: tuple(v) for p, v in ranks.items()}, lora_config)


def _lora_config(obj: Any) -> LoraConfig:
    if not isinstance(obj, Mapping):
        raise ConfigError(
            f"Selection.from_json: 'lora_config' must be a mapping of LoraConfig fields, got {obj!r:.200}"
        )
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ConfigError(f"Selection.from_json: 'lora_config' has unknown field(s) {unknown}; known: {sorted(known)}")
    return LoraConfig(**obj)


def select_lora(
    gates: Gates, base: LoraConfig, num_layers: int, selection: SelectionConfig = SelectionConfig()
) -> Selection:
    """The decoder's selection from its gates: layers (if layer gates) and ranks (if rank gates).

    The result's ``lora_config`` is ``base`` restricted to it (:meth:`Selection.to_lora_config`), what the
    fine-tune stage trains; ``fj.select(model_or_problem, gates)`` calls this for the built-in decoder.
    """
    if gates is None:
        raise ConfigError("select needs gates from a search (layer, rank or both), got None")
    if gates.layer is not None and np.shape(gates.layer) != (num_layers,):
        raise ConfigError(
            f"select: the layer gates have shape {np.shape(gates.layer)}, the model has {num_layers} "
            "layers (gates from another model?)"
        )
    layers = (
        select_layers(gates, selection.rule, selection.top_k, selection.threshold)
        if gates.layer is not None
        else tuple(base.layers(num_layers))
    )
    every = tuple(range(num_layers))
    ranks = {}
    if gates.rank is not None:
        ranks = {m: tuple(r if i in layers else 0 for i, r in enumerate(rs)) for m, rs in select_ranks(gates).items()}
    found = Selection(layers, {m: every for m in base.target_modules}, ranks)
    return dataclasses.replace(found, lora_config=found.to_lora_config(base))
