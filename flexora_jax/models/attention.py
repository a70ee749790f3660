"""Causal GQA attention cores for the decoder (see ``benchmarks/proposals/attention_notes.md``).

Shapes: ``q`` [b, t, k, g, e] (query heads grouped by the KV head they share), ``k``/``v`` [b, s, k, e],
``bias`` [b, 1, t, s] additive (0 allowed, ``-1e30`` masked: causal + key padding). Output [b, t, k, g, e].

- ``reference_attention``: the plain einsum attention; its VJP keeps the ``[b, k, g, t, s]``
  probabilities as residuals (the layer scan stacks them per layer).
- ``recompute_attention``: the same math under ``jax.checkpoint``: only q, k, v (and the loop-invariant
  bias) are kept; the probabilities are recomputed in the backward pass. Differentiable in every mode
  (reverse-over-reverse, forward-over-reverse, ``jacfwd``), values bit-identical to the reference.
- ``flash_attention``: a ``jax.custom_vjp`` that keeps q, k, v, the output and the per-row logsumexp
  and uses the flash-attention backward (``dS = P * (dP - rowsum(dO * O))``). Its backward is plain
  ``jnp``, so it is twice differentiable in reverse mode, but forward mode (``jax.jvp``/``jacfwd``)
  through it is not supported (a JAX ``custom_vjp`` limitation).
- ``*_hm`` variants: the same math with heads-major batched matmuls (``[b, k, g*t, e] x [b, k, s, e]``,
  one transpose of q/k/v in, one of the output back) instead of the 5-D einsums, which XLA CPU wraps in
  layout copies of ``[b, k, g, t, s]`` tensors. ``recompute_attention_hm`` is the decoder's default: it
  keeps the checkpoint variant's "every AD mode works" property (the ``forward`` hypergradient uses
  ``jacfwd``), at the speed of the custom-VJP one on CPU (measurements in the notes).
- ``blocked_attention_hm``: causal attention with the queries cut into static blocks; block i scores
  only the keys it can see (``[:stop_i]``): about half the score FLOPs and bytes of the full tensor,
  and each block's scores are small enough to stay in cache (4-9x faster than ``_hm_reference`` on
  CPU at 256-512 tokens, ``benchmarks/RESULTS.md``). ``recompute_blocked_attention_hm`` is it under
  ``jax.checkpoint``: the decoder's default, for training and scoring alike, with the block size from
  :func:`query_block`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def _acc(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _scores(q, k, bias):
    e = q.shape[-1]
    s = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=_acc(q.dtype)) / math.sqrt(e)
    return s + bias[:, :, None]  # [b, k, g, t, s]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Softmax attention with an additive bias (the decoder's original formulation)."""
    probs = jax.nn.softmax(_scores(q, k, bias), axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v)


recompute_attention = jax.checkpoint(reference_attention)


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
    acc = _acc(q.dtype)
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

ATTENTION = {"xla": reference_attention, "recompute": recompute_attention, "flash": flash_attention}


# ------------------------------------------------------- flash, heads-major layout (batched matmuls)
def _hm_scores(qh, kh, bias):
    # qh [b, k, g*t, e] (rows ordered g-major), kh [b, k, s, e] -> [b, k, g*t, s] + bias
    b, nk, gt, e = qh.shape
    t = bias.shape[-2]
    s = jnp.einsum("bkre,bkse->bkrs", qh, kh, preferred_element_type=_acc(qh.dtype)) / math.sqrt(e)
    s = s.reshape(b, nk, gt // t, t, -1) + bias[:, :, None]
    return s.reshape(b, nk, gt, -1)


def _to_hm(q, k, v):
    b, t, nk, g, e = q.shape
    qh = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, nk, g * t, e)
    return qh, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def _from_hm_q(x, shape):
    b, t, nk, g, e = shape
    return jnp.transpose(x.reshape(b, nk, g, t, e), (0, 3, 1, 2, 4))


def _flash_hm_fwd_impl(q, k, v, bias):
    qh, kh, vh = _to_hm(q, k, v)
    s = _hm_scores(qh, kh, bias)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    oh = jnp.einsum("bkrs,bkse->bkre", p.astype(q.dtype), vh, preferred_element_type=_acc(q.dtype))
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
    acc = _acc(q.dtype)
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
    return (_from_hm_q(dqh, q.shape), jnp.transpose(dkh, (0, 2, 1, 3)), jnp.transpose(dvh, (0, 2, 1, 3)),
            jnp.zeros_like(bias))


flash_attention_hm.defvjp(_flash_hm_fwd, _flash_hm_bwd)
ATTENTION["flash_hm"] = flash_attention_hm


def _hm_reference(q, k, v, bias):
    qh, kh, vh = _to_hm(q, k, v)
    probs = jax.nn.softmax(_hm_scores(qh, kh, bias), axis=-1).astype(q.dtype)
    oh = jnp.einsum("bkrs,bkse->bkre", probs, vh)
    return _from_hm_q(oh, q.shape)


#: Heads-major batched matmuls, probabilities recomputed in the backward (the previous default core).
recompute_attention_hm = jax.checkpoint(_hm_reference)

ATTENTION["xla_hm"] = _hm_reference
ATTENTION["recompute_hm"] = recompute_attention_hm


def blocked_attention_hm(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block: int) -> jax.Array:
    """Causal attention by static query blocks: block ``[start, stop)`` attends to keys ``[:stop]`` only.

    Requires a causal ``bias`` (every key after a query is masked), as ``attention_bias`` builds:
    then the skipped keys would carry probability exactly 0, so the result equals
    :func:`reference_attention` up to float summation order. Sequences of at most ``block`` tokens
    take the unblocked path. Differentiable in every mode (static slices); under
    :func:`recompute_blocked_attention_hm` the backward recomputes each block's probabilities.
    """
    b, t, nk, g, e = q.shape
    if block <= 0 or t <= block:
        return _hm_reference(q, k, v, bias)
    q5 = jnp.transpose(q, (0, 2, 3, 1, 4))  # [b, k, g, t, e]
    kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [b, k, s, e]
    acc, outs = _acc(q.dtype), []
    for start in range(0, t, block):
        stop = min(start + block, t)
        n = stop - start
        qb = q5[:, :, :, start:stop].reshape(b, nk, g * n, e)
        scores = jnp.einsum("bkre,bkse->bkrs", qb, kh[:, :, :stop], preferred_element_type=acc) / math.sqrt(e)
        scores = scores.reshape(b, nk, g, n, stop) + bias[:, :, None, start:stop, :stop]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, nk, g * n, stop)
        outs.append(jnp.einsum("bkrs,bkse->bkre", probs, vh[:, :, :stop]).reshape(b, nk, g, n, e))
    return jnp.transpose(jnp.concatenate(outs, axis=3), (0, 3, 1, 2, 4))


#: Smallest query block; blocks grow past it only to keep at most ``MAX_QUERY_BLOCKS`` per sequence.
QUERY_BLOCK = 32
MAX_QUERY_BLOCKS = 16


def query_block(t: int) -> int:
    """The default query block for ``t`` tokens: 32, or ``ceil(t / 16)`` for long sequences.

    Small blocks keep each block's scores in cache (measured best on CPU at 32); the cap on the number
    of blocks bounds the unrolled program (and its compile time) at long contexts.
    """
    return max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))


#: The decoder's default core: causal query blocks, probabilities recomputed in the backward pass
#: (the layer scan keeps q, k, v per layer). Differentiable in every AD mode.
recompute_blocked_attention_hm = jax.checkpoint(blocked_attention_hm, static_argnums=(4,))
ATTENTION["blocked_hm"] = lambda q, k, v, bias: blocked_attention_hm(q, k, v, bias, query_block(q.shape[1]))
ATTENTION["recompute_blocked_hm"] = lambda q, k, v, bias: recompute_blocked_attention_hm(
    q, k, v, bias, query_block(q.shape[1]))
