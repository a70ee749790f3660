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

GateKind = Literal["none", "layer", "rank", "both"]
GATE_KINDS = ("none", "layer", "rank", "both")


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


def init_gates(kind: GateKind, num_layers: int, ranks: dict[str, int] | None = None,
               power: int = 1) -> Gates | None:
    """Gates at their neutral point (alpha = 0, beta = 0); None for ``kind="none"``.

    Args:
      kind: "none", "layer" (Flexora), "rank" (AutoLoRA) or "both".
      num_layers: L, the number of transformer blocks.
      ranks: r_max per adapted module (needed for rank gates), e.g. ``lora.spec.r_max``.
      power: exponent of the layer gate (1, or 3 to reproduce the reference code).
    """
    if kind not in GATE_KINDS:
        raise ConfigError(f"unknown gate kind {kind!r}; valid: {GATE_KINDS}")
    if power not in (1, 3):
        raise ConfigError(f"gate power must be 1 or 3, got {power!r}")
    if kind == "none":
        return None
    layer = jnp.zeros((num_layers,), jnp.float32) if kind in ("layer", "both") else None
    rank = None
    if kind in ("rank", "both"):
        if not ranks:
            raise ConfigError("rank gates need the rank of every adapted module (ranks={module: r})")
        rank = {m: jnp.zeros((num_layers, r), jnp.float32) for m, r in ranks.items()}
    return Gates(layer=layer, rank=rank, power=power)


def layer_gate_values(gates: Gates | None, num_layers: int | None = None) -> jax.Array:
    """Multiplier of each block's LoRA branch, [L]; all ones without a layer gate.

    ``num_layers`` defaults to the gates' own length; it is needed only when there is no layer gate.
    """
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
    return w ** gates.power


def rank_gate_values(gates: Gates | None, module: str, shape: tuple[int, int]) -> jax.Array:
    """Multiplier of each rank-1 component of ``module``, [L, r]; all ones without a rank gate."""
    if gates is None or gates.rank is None:
        return jnp.ones(shape, jnp.float32)
    if module not in gates.rank:
        raise ConfigError(f"rank gates have no entry for module {module!r}; they cover {sorted(gates.rank)}")
    beta = jnp.asarray(gates.rank[module])
    beta = beta.astype(jnp.promote_types(beta.dtype, jnp.float32))
    if beta.shape != shape:
        raise ConfigError(f"rank gate of {module!r} has shape {beta.shape}, expected {shape}")
    return jax.nn.softmax(beta, axis=-1)


def gate_values(gates: Gates | None, num_layers: int | None = None) -> dict:
    """All gate values as plain arrays (for logging and ``gates.json``)."""
    out: dict = {}
    if gates is None:
        return out
    if gates.layer is not None:
        out["layer"] = layer_gate_values(gates, num_layers)
    if gates.rank is not None:
        out["rank"] = {m: jax.nn.softmax(b, axis=-1) for m, b in gates.rank.items()}
    return out
