"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) with PEFT 0.21's conventions, as array functions.

Per adapted module, with the kernel ``W`` stored (in, out), the LoRA update ``dW = A diag(c) B`` (``c`` the
static scale and rank mask) and a trained magnitude ``m`` [out] (fp32), DoRA's weight is
``m * (W + dW) / ||W + dW||`` where the norm is taken per output column over the input dimension
(PEFT's ``get_weight_norm``: ``torch.linalg.norm(W + s * B @ A, dim=1)`` in its (out, in) layout). ``m``
starts at that norm, so a fresh DoRA computes the base model (or the LoRA model, when B starts random).

The forward is PEFT's ``DoraLinearLayer.forward``: the branch added to the base output ``y = x W + bias``
is ``(m / n - 1) * (x' W) + (m / n) * (x' A diag(c) B)`` with ``x'`` the LoRA input: ``x`` itself without
dropout (then ``x W`` is the base output without its bias) and the dropped-out ``x`` in training with
dropout (then ``x' W`` is recomputed, as PEFT does). The norm ``n`` is computed in fp32.

Gradients: without gates (fine-tuning) ``n`` is detached as in PEFT (DoRA section 4.3), so the training
gradient equals PEFT's. With gates (a search) ``n`` is not detached: the hypergradient is then the exact
derivative of the gated function (finite differences agree), through the inner steps as well.

Gates: the Flexora layer gate ``g`` (``w_l ** power``) multiplies the whole DoRA branch, so a block computes
``x W + g * [(m / n - 1) x W + (m / n) x A diag(c) B]``: ``g = 1`` is DoRA, ``g = 0`` is the base exactly,
and the weight is linear in ``g``, as for LoRA. The reference code's hooks would instead scale the
LoRA input of ``lora_magnitude_vector``, ``lora_A`` and ``lora_B`` (``g**2`` inside the norm, ``g**3`` on
``x A B``), leaving ``(m / n - 1) x W`` ungated, so its zero gate is not the base model; we do not copy
that. Rank gates (AutoLoRA) would rescale components inside the norm and are refused with DoRA.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

#: Key of the magnitude leaf in ``LoraParams.weights[module]`` ([L, d_out], fp32).
MAGNITUDE = "magnitude"
#: Key of the per-block gate in a DoRA ``per_layer_lora`` entry ([L]: layer gate x adapted mask).
GATE = "g"
#: Marker key in a ``per_layer_lora`` entry: the norm is not detached (a gated search); value unused.
EXACT_NORM = "exact_norm"


def _wide(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def lora_update(a: jax.Array, c: jax.Array, b: jax.Array) -> jax.Array:
    """``A diag(c) B`` in fp32 (or wider): [..., d_in, d_out] from a [..., d_in, r], c [..., r], b [..., r, d_out]."""
    dt = _wide(a.dtype)
    return jnp.einsum("...dr,...r,...rf->...df", a.astype(dt), c.astype(dt), b.astype(dt))


def column_norm(kernel: jax.Array, update: jax.Array) -> jax.Array:
    """``||W + dW||`` per output column (over the input axis), fp32 (or wider) [..., d_out]."""
    w = kernel.astype(_wide(kernel.dtype)) + update
    return jnp.sqrt(jnp.sum(w * w, axis=-2))


def dora_branch(x: jax.Array, base_out: jax.Array | None, kernel: jax.Array, lp: dict[str, Any]) -> jax.Array:
    """The DoRA output added on top of the base layer's output, for one block.

    Args:
      x: the LoRA input [b, t, d_in] (dropped out in training with dropout).
      base_out: ``x @ W`` without bias when ``x`` is the undropped input; None to recompute it from ``x``.
      kernel: W [d_in, d_out] in the compute dtype.
      lp: ``{"a", "b", "c", "magnitude", "g"}`` (+ ``"exact_norm"`` under gates) of this block.
    """
    a, b, c = lp["a"], lp["b"], lp["c"]
    norm = column_norm(kernel, lora_update(a, c, b))
    if EXACT_NORM not in lp:
        norm = jax.lax.stop_gradient(norm)
    scale = (lp[MAGNITUDE] / norm).astype(x.dtype)  # [d_out]
    if base_out is None:
        base_out = jnp.einsum("btd,df->btf", x, kernel)
    down = jnp.einsum("btd,dr->btr", x, a.astype(x.dtype)) * c.astype(x.dtype)
    lora_out = jnp.einsum("btr,rf->btf", down, b.astype(x.dtype))
    return ((scale - 1) * base_out + scale * lora_out) * lp[GATE].astype(x.dtype)


def dora_merge(kernel: jax.Array, update: jax.Array, magnitude: jax.Array, gate: jax.Array) -> jax.Array:
    """Stacked merged kernels in fp32: ``W + g * (m * (W + dW) / ||W + dW|| - W)`` ([L, d_in, d_out]; g [L])."""
    w = kernel.astype(_wide(kernel.dtype))
    dora = (magnitude / column_norm(kernel, update))[:, None, :] * (w + update)
    return w + gate[:, None, None] * (dora - w)
