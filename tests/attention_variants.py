"""Attention variants kept as test oracles (the decoder uses ``flexora_jax.models.attention`` only).

- ``reference_attention``: plain 5-D einsum attention with an additive bias (the original formulation).
- ``recompute_attention``: the same under ``jax.checkpoint``.
- ``flash_attention`` / ``flash_attention_hm``: ``jax.custom_vjp`` cores that keep q, k, v, the output
  and the per-row logsumexp and use the flash-attention backward (``dS = P * (dP - rowsum(dO * O))``);
  plain ``jnp``, so twice differentiable in reverse mode; forward mode through the 5-D one is not
  supported (a ``custom_vjp`` limitation).
- ``ATTENTION``: every variant by name, the decoder's cores included.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flexora_jax.models.attention import (
    _from_hm_q,
    _hm_scores,
    _to_hm,
    accum_dtype,
    attention_hm,
    blocked_attention_hm,
    query_block,
    recompute_blocked_attention_hm,
)


def _scores(q, k, bias):
    e = q.shape[-1]
    s = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=accum_dtype(q.dtype)) / math.sqrt(e)
    return s + bias[:, :, None]  # [b, k, g, t, s]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Softmax attention with an additive bias (the decoder's original formulation)."""
    probs = jax.nn.softmax(_scores(q, k, bias), axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v)


recompute_attention = jax.checkpoint(reference_attention)
recompute_attention_hm = jax.checkpoint(attention_hm)


# ------------------------------------------------------------------------------ flash-style custom VJP
def _flash_fwd_impl(q, k, v, bias):
    s = _scores(q, k, bias)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = (p / l).astype(q.dtype)
    o = jnp.einsum("bkgts,bske->btkge", p, v)
    # logsumexp kept as (row max, log row sum): for a fully masked row m = -1e30 absorbs log(l) in
    # floating point, and exp(s - m - log l) must still give the uniform 1 / s of the forward.
    return o, (m, jnp.log(l))


@jax.custom_vjp
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Reference-equal attention whose VJP recomputes the probabilities from the saved logsumexp."""
    return _flash_fwd_impl(q, k, v, bias)[0]


def _flash_fwd(q, k, v, bias):
    o, lse = _flash_fwd_impl(q, k, v, bias)
    return o, (q, k, v, bias, o, lse)


def _flash_bwd(res, do):
    q, k, v, bias, o, lse = res
    e = q.shape[-1]
    acc = accum_dtype(q.dtype)
    m, logl = lse
    p = jnp.exp(_scores(q, k, bias) - m - logl)  # [b, k, g, t, s], fp32
    dv = jnp.einsum("bkgts,btkge->bske", p.astype(q.dtype), do)
    dp = jnp.einsum("btkge,bske->bkgts", do, v, preferred_element_type=acc)
    delta = jnp.einsum("btkge,btkge->bkgt", do.astype(acc), o.astype(acc))
    ds = (p * (dp - delta[..., None]) / math.sqrt(e)).astype(q.dtype)
    dq = jnp.einsum("bkgts,bske->btkge", ds, k)
    dk = jnp.einsum("bkgts,btkge->bske", ds, q)
    return dq, dk, dv, jnp.zeros_like(bias)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------- flash, heads-major layout (batched matmuls)
def _flash_hm_fwd_impl(q, k, v, bias):
    qh, kh, vh = _to_hm(q, k, v)
    s = _hm_scores(qh, kh, bias)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    oh = jnp.einsum("bkrs,bkse->bkre", p.astype(q.dtype), vh, preferred_element_type=accum_dtype(q.dtype))
    oh = (oh / l).astype(q.dtype)
    return _from_hm_q(oh, q.shape), (m, jnp.log(l))


@jax.custom_vjp
def flash_attention_hm(q, k, v, bias):
    return _flash_hm_fwd_impl(q, k, v, bias)[0]


def _flash_hm_fwd(q, k, v, bias):
    o, stats = _flash_hm_fwd_impl(q, k, v, bias)
    return o, (q, k, v, bias, o, stats)


def _flash_hm_bwd(res, do):
    q, k, v, bias, o, (m, logl) = res
    acc = accum_dtype(q.dtype)
    e = q.shape[-1]
    qh, kh, vh = _to_hm(q, k, v)
    doh = _to_hm(do, k, v)[0]
    p = jnp.exp(_hm_scores(qh, kh, bias) - m - logl)  # [b, k, g*t, s]
    dvh = jnp.einsum("bkrs,bkre->bkse", p.astype(q.dtype), doh)
    dp = jnp.einsum("bkre,bkse->bkrs", doh, vh, preferred_element_type=acc)
    delta = jnp.sum(do.astype(acc) * o.astype(acc), axis=-1)  # [b, t, k, g]
    delta = jnp.transpose(delta, (0, 2, 3, 1)).reshape(p.shape[:-1] + (1,))
    ds = (p * (dp - delta) * (1.0 / math.sqrt(e))).astype(q.dtype)
    dqh = jnp.einsum("bkrs,bkse->bkre", ds, kh)
    dkh = jnp.einsum("bkrs,bkre->bkse", ds, qh)
    return (
        _from_hm_q(dqh, q.shape),
        jnp.transpose(dkh, (0, 2, 1, 3)),
        jnp.transpose(dvh, (0, 2, 1, 3)),
        jnp.zeros_like(bias),
    )


flash_attention_hm.defvjp(_flash_hm_fwd, _flash_hm_bwd)

ATTENTION = {
    "xla": reference_attention,
    "recompute": recompute_attention,
    "flash": flash_attention,
    "flash_hm": flash_attention_hm,
    "xla_hm": attention_hm,
    "recompute_hm": recompute_attention_hm,
    "blocked_hm": lambda q, k, v, bias: blocked_attention_hm(q, k, v, bias, query_block(q.shape[1])),
    "recompute_blocked_hm": lambda q, k, v, bias: recompute_blocked_attention_hm(
        q, k, v, bias, query_block(q.shape[1])
    ),
}
