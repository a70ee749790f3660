"""Blockwise (flash) causal attention with its own backward pass, in plain JAX (CPU, and any device's XLA).

Shapes as in :mod:`flexora_jax.models.attention`: ``q`` [b, t, k, g, e] (query heads grouped by the KV
head they share), ``k``/``v`` [b, t, k, e], ``bias`` [b, 1, t, t] additive (0 allowed, ``NEG_INF``
masked), causal (every key after its query masked: then the key tiles above the diagonal, which are
skipped, would carry probability exactly 0). The bias carries key padding, the evaluator's packed
segments and sliding windows; ``softcap`` is Gemma 2's logit soft-capping.

- Layout: queries heads-major with the rows token-major, ``[b, k, t*g, e]`` (row ``i*g + j`` is token
  ``i``, head ``j`` of the group), so a query block is one contiguous row range and the GQA group shares
  each key tile; k/v ``[b, k, t, e]``. One transpose in, one out.
- Forward: for each static query block, the key tiles up to its diagonal with an online softmax (running
  row max ``m`` and row sum ``l``; one tile covering the whole causal prefix is the exact softmax). It
  keeps q, k, v, the output and ``(m, log l)``: [b, k, t*g] vectors, no [t, t] tensor.
- Backward (``jax.custom_vjp``): each tile's probabilities are recomputed from the scores and
  ``(m, log l)``; with ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``: no softmax reduction over keys and
  no stored probabilities. ``m`` and ``log l`` are kept apart, not summed: a fully masked row
  (``m = NEG_INF``) would absorb ``log l`` and lose its uniform 1/n, so it gets the forward's
  probabilities back exactly, and no row gives NaN.
- AD: the forward and backward rules are plain ``jnp`` with static slices, so reverse-over-reverse works
  (the ``unrolled`` hypergradient differentiates the backward as ordinary code). Forward mode (``jvp``,
  ``jacfwd``) is impossible through a ``custom_vjp``: ``attention.select_attention`` sends stages that
  need it to the checkpointed query-blocked attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

#: Default tiles (measured on CPU, ``benchmarks/proposals/attention_notes.md``): query blocks of at least
#: ``FLASH_QUERY_BLOCK`` tokens and key tiles of at least ``FLASH_KEY_BLOCK``, both growing with ``t`` so
#: that a sequence has at most ``MAX_QUERY_BLOCKS`` query blocks of at most ``MAX_KEY_TILES`` key tiles
#: (at most 72 tiles in all: the unrolled program, and its compile time, stay bounded at long contexts).
FLASH_QUERY_BLOCK = 64
FLASH_KEY_BLOCK = 128
MAX_QUERY_BLOCKS = 16
MAX_KEY_TILES = 8


def flash_blocks(t: int) -> tuple[int, int]:
    """The default (query block, key tile) for ``t`` tokens: (64, 128) up to 1024 tokens."""
    return max(FLASH_QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS)), max(FLASH_KEY_BLOCK, -(-t // MAX_KEY_TILES))


def _tiles(t: int, block_q: int, block_k: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Static causal tiling: (query start, query stop, [(key start, key stop), ...]) per query block,
    the key tiles covering ``[0, query stop)`` in steps of ``block_k``."""
    block_q = t if block_q <= 0 else min(block_q, t)
    block_k = t if block_k <= 0 else block_k
    out = []
    for qs in range(0, t, block_q):
        qe = min(qs + block_q, t)
        out.append((qs, qe, [(ks, min(ks + block_k, qe)) for ks in range(0, qe, block_k)]))
    return out


def _acc(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _to_rows(q: jax.Array) -> jax.Array:
    """q [b, t, k, g, e] -> [b, k, t*g, e] (rows token-major)."""
    b, t, nk, g, e = q.shape
    return jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(b, nk, t * g, e)


def _from_rows(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    b, t, nk, g, e = shape
    return jnp.transpose(x.reshape(b, nk, t, g, e), (0, 2, 1, 3, 4))


def _kv(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 1, 3))  # [b, s, k, e] -> [b, k, s, e]


def _tile_scores(
    qr: jax.Array,
    kh: jax.Array,
    bias: jax.Array,
    g: int,
    q_span: tuple[int, int],
    k_span: tuple[int, int],
    softcap: float | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Scores of one tile [b, k, n*g, sk] (scaled, soft-capped, plus bias), and ``tanh`` of the capped
    scores (for the backward) when soft-capping."""
    (qs, qe), (ks, ke) = q_span, k_span
    b, nk, _, e = qr.shape
    s = jnp.einsum(
        "bkre,bkse->bkrs", qr[:, :, qs * g : qe * g], kh[:, :, ks:ke], preferred_element_type=_acc(qr.dtype)
    ) * (1.0 / math.sqrt(e))
    tanh = None
    if softcap is not None:
        tanh = jnp.tanh(s / softcap)
        s = softcap * tanh
    s = s.reshape(b, nk, qe - qs, g, ke - ks) + bias[:, :, qs:qe, None, ks:ke].astype(s.dtype)
    return s.reshape(b, nk, (qe - qs) * g, ke - ks), tanh


def _forward(q, k, v, bias, block_q, block_k, softcap):
    """Output [b, t, k, g, e] and the residuals: q, k, v and the output as given / returned (the backward
    transposes them again rather than keep second copies), row max and log row sum [b, k, t*g]."""
    b, t, nk, g, e = q.shape
    qr, kh, vh = _to_rows(q), _kv(k), _kv(v)
    acc = _acc(q.dtype)
    outs, ms, logls = [], [], []
    for qs, qe, key_tiles in _tiles(t, block_q, block_k):
        m = rowsum = o = None
        for span in key_tiles:
            s, _ = _tile_scores(qr, kh, bias, g, (qs, qe), span, softcap)
            tile_max = jnp.max(s, axis=-1, keepdims=True)
            m_new = tile_max if m is None else jnp.maximum(m, tile_max)
            p = jnp.exp(s - m_new)
            pv = jnp.einsum(
                "bkrs,bkse->bkre", p.astype(q.dtype), vh[:, :, span[0] : span[1]], preferred_element_type=acc
            )
            if m is None:
                rowsum, o = jnp.sum(p, axis=-1, keepdims=True), pv
            else:
                scale = jnp.exp(m - m_new)
                rowsum, o = rowsum * scale + jnp.sum(p, axis=-1, keepdims=True), o * scale + pv
            m = m_new
        outs.append((o / rowsum).astype(q.dtype))
        ms.append(m[..., 0])
        logls.append(jnp.log(rowsum[..., 0]))
    out = _from_rows(jnp.concatenate(outs, axis=2), q.shape)
    stats = (jnp.concatenate(ms, axis=2), jnp.concatenate(logls, axis=2))
    return out, (q, k, v, out, stats)


def _backward(block_q, block_k, softcap, res, dout):
    """dq, dk, dv (and a zero bias cotangent) from the residuals, tile by tile."""
    q, k, v, out, (m, logl), bias = res
    b, t, nk, g, e = q.shape
    qr, kh, vh, do = _to_rows(q), _kv(k), _kv(v), _to_rows(dout)
    dt, acc = q.dtype, _acc(q.dtype)
    delta = _to_rows(jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1, keepdims=True))[..., 0]  # rowsum(dO * O)
    dqs, dk_parts, dv_parts = [], {}, {}
    for qs, qe, key_tiles in _tiles(t, block_q, block_k):
        rows = slice(qs * g, qe * g)
        do_i = do[:, :, rows]
        dq_i = None
        for ks, ke in key_tiles:
            s, tanh = _tile_scores(qr, kh, bias, g, (qs, qe), (ks, ke), softcap)
            p = jnp.exp(s - m[:, :, rows, None] - logl[:, :, rows, None])
            dv = jnp.einsum("bkrs,bkre->bkse", p.astype(dt), do_i, preferred_element_type=acc)
            dp = jnp.einsum("bkre,bkse->bkrs", do_i, vh[:, :, ks:ke], preferred_element_type=acc)
            ds = p * (dp - delta[:, :, rows, None])
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = (ds * (1.0 / math.sqrt(e))).astype(dt)
            dq = jnp.einsum("bkrs,bkse->bkre", ds, kh[:, :, ks:ke], preferred_element_type=acc)
            dk = jnp.einsum("bkrs,bkre->bkse", ds, qr[:, :, rows], preferred_element_type=acc)
            dq_i = dq if dq_i is None else dq_i + dq
            dk_parts.setdefault((ks, ke), []).append(dk)
            dv_parts.setdefault((ks, ke), []).append(dv)
        dqs.append(dq_i)
    dq = _from_rows(jnp.concatenate(dqs, axis=2).astype(dt), (b, t, nk, g, e))
    return dq, _sum_tiles(dk_parts, t, dt), _sum_tiles(dv_parts, t, dt), jnp.zeros_like(bias)


def _sum_tiles(parts: dict[tuple[int, int], list[jax.Array]], t: int, dtype: jnp.dtype) -> jax.Array:
    """Key-side gradients [b, t, k, e] from per-tile contributions over possibly overlapping key spans:
    each elementary span between tile boundaries is the sum of the slices covering it."""
    cuts = sorted({0, t} | {c for span in parts for c in span})
    pieces = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        covering = [x[:, :, lo - ks : hi - ks] for (ks, ke), xs in parts.items() if ks <= lo and hi <= ke for x in xs]
        pieces.append(functools.reduce(jnp.add, covering))
    return jnp.transpose(jnp.concatenate(pieces, axis=2).astype(dtype), (0, 2, 1, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block_q: int, block_k: int, softcap: float | None = None
) -> jax.Array:
    """Causal blockwise attention (module docstring); ``block_q``/``block_k`` <= 0 mean the whole sequence.

    Equals the softmax attention up to float summation order on every query row that sees a key; a
    fully masked row attends uniformly to the keys of its block's causal prefix (padding; never read).
    ``bias`` is a mask: its cotangent is zero.
    """
    return _forward(q, k, v, bias, block_q, block_k, softcap)[0]


def _flash_fwd(q, k, v, bias, block_q, block_k, softcap):
    out, res = _forward(q, k, v, bias, block_q, block_k, softcap)
    return out, (*res, bias)


flash_attention.defvjp(_flash_fwd, _backward)
