"""The hyperparameter pytree that Flexora and AutoLoRA optimise.

What is differentiated w.r.t. what: the search differentiates the *validation* loss w.r.t. the raw
gate values held in :class:`Gates` (``layer`` = Flexora's alpha, ``rank`` = AutoLoRA's beta). The
values that multiply the LoRA branch are smooth functions of those raw values, computed inside the
forward pass, so ``jax.grad`` w.r.t. a ``Gates`` is exactly the hypergradient:

- layer gate (Flexora): ``w = (L * softmax(alpha)) ** power``, shape [L]. At ``alpha = 0`` every
  ``w_l = 1`` (the search starts as plain LoRA) and the mean gate stays 1 while mass moves between
  layers. ``power=3`` reproduces the reference code, which applies the gate three times.
- rank gate (AutoLoRA): ``softmax(beta_m)`` over the r components of module ``m`` in each layer,
  shape [L, r]. At a constant ``beta`` each component is scaled by ``1 / r``.

Both may be present at once (a combined search). ``Gates`` is a registered pytree (a Flax struct
dataclass) so it passes through jit, grad, scan and sharding; ``power`` is static metadata.
Gate values never change shapes, so the search never recompiles.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from flexora_jax.errors import ConfigError
from flexora_jax.validation import check_number

GateKind = Literal["none", "layer", "rank", "both"]
GATE_KINDS = ("none", "layer", "rank", "both")


@struct.dataclass
class GateValues:
    """The multipliers the LoRA branch applies (what :func:`multipliers` makes of raw :class:`Gates`).

    ``layer`` [L] multiplies every adapted module of a block; ``rank`` {module: [L, r]} each rank-1
    component; None = ones. A model's gate variables hold these values (``fj.nnx.Gate``), never the raw
    hyperparameters, so a gate of 0 removes its LoRA branch exactly.
    """

    layer: jax.Array | None = None
    rank: dict[str, jax.Array] | None = None


@struct.dataclass
class Gates:
    """Raw gate hyperparameters: ``layer`` [L] (alpha) and/or ``rank`` {module: [L, r]} (beta)."""

    layer: jax.Array | None = None
    rank: dict[str, jax.Array] | None = None
    power: int = struct.field(pytree_node=False, default=1)

    @property
    def kind(self) -> str:
        if self.layer is not None and self.rank is not None:
            return "both"
        return "layer" if self.layer is not None else "rank" if self.rank is not None else "none"


def init_gates(kind: GateKind, num_layers: int, ranks: dict[str, int] | None = None, power: int = 1) -> Gates | None:
    """Gates at their neutral point (alpha = 0, beta = 0); None for ``kind="none"``.

    Args:
      kind: "none", "layer" (Flexora), "rank" (AutoLoRA) or "both".
      num_layers: L, the number of transformer blocks.
      ranks: r_max per adapted module (needed for rank gates), e.g. ``lora.spec.r_max``.
      power: exponent of the layer gate (1, or 3 to reproduce the reference code).
    """
    if kind not in GATE_KINDS:
        raise ConfigError(f"unknown gate kind {kind!r}; valid: {GATE_KINDS}")
    if power not in (1, 3) or isinstance(power, bool):
        raise ConfigError(f"gate power must be 1 or 3, got {power!r}")
    num_layers = check_number(num_layers, "init_gates: num_layers", lo=1, integer=True)
    if kind == "none":
        return None
    layer = jnp.zeros((num_layers,), jnp.float32) if kind in ("layer", "both") else None
    rank = None
    if kind in ("rank", "both"):
        if not ranks:
            raise ConfigError("rank gates need the rank of every adapted module (ranks={module: r})")
        rank = {m: jnp.zeros((num_layers, r), jnp.float32) for m, r in ranks.items()}
    return Gates(layer=layer, rank=rank, power=power)


def multipliers(gates: Gates | GateValues | None, num_layers: int | None = None) -> GateValues | None:
    """The one map from raw gates to the multipliers the model applies: Flexora ``(L softmax(alpha))^p``,
    AutoLoRA ``softmax(beta)`` per module and layer. :class:`GateValues` pass through unchanged."""
    if gates is None or isinstance(gates, GateValues):
        return gates
    layer = None if gates.layer is None else layer_gate_values(gates, num_layers)
    rank = None if gates.rank is None else {m: jax.nn.softmax(_fp32(b), axis=-1) for m, b in gates.rank.items()}
    return GateValues(layer=layer, rank=rank)


def _fp32(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def layer_gate_values(gates: Gates | GateValues | None, num_layers: int | None = None) -> jax.Array:
    """Multiplier of each block's LoRA branch, [L]; all ones without a layer gate.

    ``num_layers`` defaults to the gates' own length; it is needed only when there is no layer gate.
    """
    if isinstance(gates, GateValues) and gates.layer is not None:
        w = _fp32(gates.layer)
        if num_layers is not None and w.shape != (num_layers,):
            raise ConfigError(f"layer gate values have shape {w.shape}, expected ({num_layers},)")
        return w
    if gates is None or gates.layer is None:
        if num_layers is None:
            raise ConfigError("layer_gate_values: without layer gates, pass num_layers")
        return jnp.ones((num_layers,), jnp.float32)
    num_layers = jnp.shape(gates.layer)[0] if num_layers is None else num_layers
    alpha = jnp.asarray(gates.layer)
    alpha = alpha.astype(jnp.promote_types(alpha.dtype, jnp.float32))
    if alpha.shape != (num_layers,):
        raise ConfigError(f"layer gate has shape {alpha.shape}, expected ({num_layers},)")
    w = num_layers * jax.nn.softmax(alpha)
    return w**gates.power


def rank_gate_values(gates: Gates | GateValues | None, module: str, shape: tuple[int, int]) -> jax.Array:
    """Multiplier of each rank-1 component of ``module``, [L, r]; all ones without a rank gate."""
    if gates is None or gates.rank is None:
        return jnp.ones(shape, jnp.float32)
    if module not in gates.rank:
        raise ConfigError(f"rank gates have no entry for module {module!r}; they cover {sorted(gates.rank)}")
    value = _fp32(gates.rank[module])
    if value.shape != shape:
        raise ConfigError(f"rank gate of {module!r} has shape {value.shape}, expected {shape}")
    return value if isinstance(gates, GateValues) else jax.nn.softmax(value, axis=-1)


def gate_values(gates: Gates | GateValues | None, num_layers: int | None = None) -> dict:
    """All gate multipliers as a plain dict (for logging and ``gates.json``): ``layer`` and / or ``rank``."""
    values = multipliers(gates, num_layers)
    if values is None:
        return {}
    return {k: v for k, v in (("layer", values.layer), ("rank", values.rank)) if v is not None}
