"""Mixtral's sparse mixture-of-experts MLP: a softmax router, top-k experts per token, SwiGLU experts.

What it computes (transformers' ``MixtralSparseMoeBlock``): router logits ``x @ W_router`` [b, t, n],
softmax over all n experts in fp32, the top ``k = num_experts_per_tok`` probabilities renormalised to sum
to 1, and ``sum_j p_j * w2_j(act(w1_j x) * w3_j x)`` over the chosen experts ``j``. No capacity limit,
no token dropping: every token's output depends on that token only, so padding cannot leak.

How: densely. Every expert runs on every token ([b, t, n, f] activations) and the experts a token was
not routed to get weight 0; the result equals the sparse sum (the zeros are exact) and the router's
gradient flows through the kept probabilities as in transformers.

- Cost: ``n / k`` times the FLOPs of sparse dispatch (4x for Mixtral's 8 / 2) and [b, t, n, f]
  activation memory, but no data-dependent shapes: one static program for jit, scan, remat, vmap and
  the partitioner, and the expert kernels are used as stored ([l, n, d, f]), never gathered per token
  (a per-token gather would move ``b * t * k`` copies of d x f weights).
- The efficient alternative for large n is sort-by-expert dispatch with a grouped matmul
  (``jax.lax.ragged_dot`` over tokens sorted by expert, then an unsort): ``k / n`` of these FLOPs,
  data-dependent group sizes inside a fixed buffer. Correctness first: the tiny and mid-size models
  this library searches LoRA layouts on are dominated by attention and the LM head, not by this.

LoRA on the experts (targets ``w1`` / ``w3`` / ``w2``): each expert has its own A [n, d_in, r] and
B [n, r, d_out] under one per-layer coefficient vector ``c`` [r] (scale, rank mask, gates), as PEFT's
per-expert LoRA. The router is never adapted.

Sharding (:mod:`flexora_jax.sharding`): the expert kernels' logical axes are ``[layers, expert, embed, mlp]`` (w1 /
w3) and ``[layers, expert, mlp, embed]`` (w2), the router's ``[layers, embed, expert]``, each expert LoRA's A / B
its kernel's with ``rank`` in place of the contracted / free axis. The default rules shard d and f as the dense
MLP's and keep every expert on every device (``expert -> None``); ``rules={"expert": "model", "mlp": None}`` puts
whole experts on the ``model`` axis instead (expert parallelism: the partitioner sums the experts' outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flexora_jax.config import ModelConfig


def expert_linear(x: jax.Array, layer: dict[str, Any], name: str, lora_layer: dict[str, Any] | None) -> jax.Array:
    """Every expert's projection ``name``: x [b, t, d_in] (shared input) or [b, t, n, d_in] -> [b, t, n, d_out].

    Plus, when ``name`` is adapted, each expert's LoRA branch ``((x @ A_j) * c) @ B_j``.
    """
    kernel = layer[name]["kernel"]  # [n, d_in, d_out]
    spec = "btd,ndf->btnf" if x.ndim == 3 else "btnd,ndf->btnf"
    y = jnp.einsum(spec, x, kernel)
    if lora_layer is not None and name in lora_layer:
        a, b, c = lora_layer[name]["a"], lora_layer[name]["b"], lora_layer[name]["c"]  # [n,d,r] [n,r,f] [r]
        down = jnp.einsum(spec.replace("f", "r"), x, a.astype(x.dtype)) * c.astype(x.dtype)
        y = y + jnp.einsum("btnr,nrf->btnf", down, b.astype(x.dtype))
    return y


def route(config: ModelConfig, router: jax.Array, x: jax.Array) -> jax.Array:
    """Per-token expert weights [b, t, n] (fp32): the renormalised top-k router probabilities, 0 elsewhere."""
    logits = jnp.einsum("btd,dn->btn", x, router).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, index = jax.lax.top_k(probs, config.num_experts_per_tok)  # [b, t, k]
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    return jnp.sum(jax.nn.one_hot(index, config.num_local_experts, dtype=jnp.float32) * top[..., None], axis=-2)


def moe_mlp(
    config: ModelConfig,
    layer: dict[str, Any],
    x: jax.Array,
    lora_layer: dict[str, Any] | None,
    act: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """The MoE MLP of one block on normed hidden states x [b, t, d] -> [b, t, d] (see the module docstring)."""
    weights = route(config, layer["router"]["kernel"], x)  # [b, t, n]
    hidden = act(expert_linear(x, layer, "w1", lora_layer)) * expert_linear(x, layer, "w3", lora_layer)
    out = expert_linear(hidden, layer, "w2", lora_layer)  # [b, t, n, d]
    return jnp.einsum("btnd,btn->btd", out, weights.astype(out.dtype))
