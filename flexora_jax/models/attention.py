"""The decoder's causal GQA attention core (measurements: ``benchmarks/proposals/attention_notes.md``).

Shapes: ``q`` [b, t, k, g, e] (query heads grouped by the KV head they share), ``k``/``v`` [b, s, k, e],
``bias`` [b, 1, t, s] additive (0 allowed, :data:`NEG_INF` masked: causal + key padding). Output
[b, t, k, g, e].

- Heads-major batched matmuls (``[b, k, g*t, e] x [b, k, s, e]``, one transpose of q/k/v in and one of
  the output back) instead of 5-D einsums, which XLA CPU wraps in layout copies of ``[b, k, g, t, s]``
  tensors.
- :func:`blocked_attention_hm` cuts the queries into static causal blocks; block i scores only the
  keys it can see (``[:stop_i]``): about half the score FLOPs and bytes of the full tensor, and each
  block's scores stay in cache (4-9x faster than unblocked on CPU at 256-512 tokens,
  ``benchmarks/RESULTS.md``).
- :func:`recompute_blocked_attention_hm` is it under ``jax.checkpoint``: the layer scan keeps q, k, v
  instead of the probabilities, which the backward pass recomputes. Plain ``jnp`` with static slices,
  so every AD mode works (reverse-over-reverse, forward-over-reverse, ``jacfwd``): the hypergradient
  estimators need that, and fused kernels lack second-order AD.

The variants this replaced (5-D einsum reference, flash-style custom VJPs) live in the tests as
oracles (``tests/attention_variants.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: Finite "minus infinity" for masks: a fully masked row gives a uniform softmax, not NaN.
NEG_INF = -1e30

#: Smallest query block; blocks grow past it only to keep at most ``MAX_QUERY_BLOCKS`` per sequence.
QUERY_BLOCK = 32
MAX_QUERY_BLOCKS = 16


def accum_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype: at least fp32 (fp64 stays fp64, for finite-difference checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def softcap_scores(s: jax.Array, softcap: float | None) -> jax.Array:
    """``softcap * tanh(s / softcap)`` (Gemma 2's attention logit soft-capping); ``s`` when None."""
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _hm_scores(qh: jax.Array, kh: jax.Array, bias: jax.Array, softcap: float | None = None) -> jax.Array:
    """Scaled (soft-capped) scores plus bias: qh [b, k, g*t, e] (rows g-major), kh [b, k, s, e] -> [b, k, g*t, s]."""
    b, nk, gt, e = qh.shape
    t = bias.shape[-2]
    s = jnp.einsum("bkre,bkse->bkrs", qh, kh, preferred_element_type=accum_dtype(qh.dtype)) / math.sqrt(e)
    s = softcap_scores(s, softcap)
    s = s.reshape(b, nk, gt // t, t, -1) + bias[:, :, None]
    return s.reshape(b, nk, gt, -1)


def _to_hm(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [b, t, k, g, e] -> [b, k, g*t, e]; k/v [b, s, k, e] -> [b, k, s, e]."""
    b, t, nk, g, e = q.shape
    qh = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, nk, g * t, e)
    return qh, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def _from_hm_q(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[b, k, g*t, e] back to the query layout ``shape`` = (b, t, k, g, e)."""
    b, t, nk, g, e = shape
    return jnp.transpose(x.reshape(b, nk, g, t, e), (0, 3, 1, 2, 4))


def attention_hm(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, softcap: float | None = None) -> jax.Array:
    """Unblocked softmax attention, heads-major; any key length ``s`` (a KV cache too)."""
    qh, kh, vh = _to_hm(q, k, v)
    probs = jax.nn.softmax(_hm_scores(qh, kh, bias, softcap), axis=-1).astype(q.dtype)
    oh = jnp.einsum("bkrs,bkse->bkre", probs, vh)
    return _from_hm_q(oh, q.shape)


def blocked_attention_hm(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block: int,
                         softcap: float | None = None) -> jax.Array:
    """Causal attention by static query blocks: block ``[start, stop)`` attends to keys ``[:stop]`` only.

    Requires a causal ``bias`` (every key after a query is masked), as ``llama.attention_bias``
    builds: then the skipped keys would carry probability exactly 0, so the result equals
    :func:`attention_hm` up to float summation order. ``block <= 0`` or sequences of at most
    ``block`` tokens take the unblocked path.
    """
    b, t, nk, g, e = q.shape
    if block <= 0 or t <= block:
        return attention_hm(q, k, v, bias, softcap)
    q5 = jnp.transpose(q, (0, 2, 3, 1, 4))  # [b, k, g, t, e]
    kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [b, k, s, e]
    acc, outs = accum_dtype(q.dtype), []
    for start in range(0, t, block):
        stop = min(start + block, t)
        n = stop - start
        qb = q5[:, :, :, start:stop].reshape(b, nk, g * n, e)
        scores = jnp.einsum("bkre,bkse->bkrs", qb, kh[:, :, :stop], preferred_element_type=acc) / math.sqrt(e)
        scores = softcap_scores(scores, softcap).reshape(b, nk, g, n, stop) + bias[:, :, None, start:stop, :stop]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, nk, g * n, stop)
        outs.append(jnp.einsum("bkrs,bkse->bkre", probs, vh[:, :, :stop]).reshape(b, nk, g, n, e))
    return jnp.transpose(jnp.concatenate(outs, axis=3), (0, 3, 1, 2, 4))


def query_block(t: int) -> int:
    """The default query block for ``t`` tokens: 32, or ``ceil(t / 16)`` for long sequences.

    Small blocks keep each block's scores in cache (measured best on CPU at 32); the cap on the number
    of blocks bounds the unrolled program (and its compile time) at long contexts.
    """
    return max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))


#: The decoder's core: causal query blocks, probabilities recomputed in the backward pass (the layer
#: scan keeps q, k, v per layer). ``block`` and ``softcap`` are static; block 0 = one unblocked block.
_recompute_blocked = jax.checkpoint(blocked_attention_hm, static_argnums=(4, 5))


def recompute_blocked_attention_hm(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block: int,
                                   softcap: float | None = None) -> jax.Array:
    """:func:`blocked_attention_hm` under ``jax.checkpoint`` (probabilities recomputed in the backward pass)."""
    return _recompute_blocked(q, k, v, bias, block, softcap)
