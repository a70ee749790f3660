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
  so every AD mode works (reverse-over-reverse, forward-over-reverse, ``jacfwd``). This is backend
  "xla": the one that stages with forward-mode AD (``forward``, ``darts`` exact) run.
- Backend "flash" (:mod:`flexora_jax.models.flash`): blockwise attention with an online softmax and its
  own backward (``custom_vjp``: probabilities recomputed per tile from the saved log-sum-exp, no softmax
  reduction over keys). Twice differentiable in reverse mode, not in forward mode. :func:`stage_config`'s
  ``auto`` picks it on CPU for every stage without forward mode (the core 1.1-3.4x faster than "xla", the
  fine-tune step 1.07-1.7x); an ``auto`` nobody resolved (a bare ``llama.forward``) stays "xla".
- Backends "cudnn" / "splash": vendor fused kernels for first-order stages on NVIDIA GPU / TPU.

The variants these replaced (5-D einsum reference, unblocked flash-style custom VJPs) live in the tests
as oracles (``tests/attention_variants.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from flexora_jax.config import ATTENTION_BACKENDS, ModelConfig
from flexora_jax.errors import ConfigError
from flexora_jax.models.flash import flash_attention, flash_blocks

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


def blocked_attention_hm(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block: int, softcap: float | None = None
) -> jax.Array:
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


def recompute_blocked_attention_hm(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block: int, softcap: float | None = None
) -> jax.Array:
    """:func:`blocked_attention_hm` under ``jax.checkpoint`` (probabilities recomputed in the backward pass)."""
    return _recompute_blocked(q, k, v, bias, block, softcap)


# ------------------------------------------------------------------------------------ backends
#: Fused kernels: ``custom_vjp`` without higher-order or forward-mode rules.
FUSED_ATTENTION = ("cudnn", "splash")
_log = logging.getLogger(__name__)
_logged: set[str] = set()


def device_platform() -> str:
    """The default device's platform: "cuda", "rocm", "tpu" or "cpu"."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        return "cuda" if "cuda" in str(getattr(dev.client, "platform_version", "cuda")).lower() else "rocm"
    return dev.platform


def differentiates_twice(estimator: str | None, darts_mode: str = "exact") -> bool:
    """Whether a search estimator differentiates the loss twice (or in forward mode): ``unrolled``,
    ``forward`` and ``darts`` exact do; ``first_order``, ``darts`` finite differences and the fine-tune don't."""
    return estimator in ("unrolled", "forward") or (estimator == "darts" and darts_mode == "exact")


def needs_forward_mode(estimator: str | None, darts_mode: str = "exact") -> bool:
    """Whether a search estimator runs forward-mode AD through the loss (``jax.jacfwd`` for ``forward``,
    ``jax.jvp`` of the gate gradient for ``darts`` exact), which no ``custom_vjp`` attention supports.
    A new estimator that does forward-over-reverse must be listed here."""
    return estimator == "forward" or (estimator == "darts" and darts_mode == "exact")


#: ``auto`` where no fused vendor kernel applies, per platform and kind of stage: "flash" (our blockwise
#: custom-VJP attention, :mod:`flexora_jax.models.flash`) or "xla" (checkpointed query blocks). Measured
#: (``benchmarks/proposals/attention_notes.md``, ``python -m benchmarks.attention``): on CPU flash wins
#: first and second order; elsewhere the measured winner per row.
AUTO_FALLBACK = {("cpu", False): "flash", ("cpu", True): "flash"}


def select_attention(
    requested: str, dtype: str, *, second_order: bool = False, forward_mode: bool = False, platform: str | None = None
) -> str:
    """The attention a computation runs: "xla", "flash", "cudnn" or "splash" (the table in docs/scaling.md).

    ``second_order``: the loss is differentiated twice; ``forward_mode``: some of that is forward mode
    (``jvp``/``jacfwd``). ``auto``: XLA under forward mode (the only core with a forward-mode rule); else
    cuDNN flash on NVIDIA GPUs in bf16/fp16 and splash on TPU for first-order stages; else
    :data:`AUTO_FALLBACK`'s measured choice (XLA where not measured). A forced kernel where it cannot run
    (a fused kernel or flash under forward mode, a fused kernel under second order, wrong platform or
    dtype) is a :class:`ConfigError`.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ConfigError(f"ModelConfig.attention must be one of {ATTENTION_BACKENDS}, got {requested!r}")
    platform = device_platform() if platform is None else platform
    half = dtype in ("bfloat16", "float16")
    second_order = second_order or forward_mode
    if requested == "auto":
        if forward_mode:
            return "xla"
        if not second_order and platform == "cuda" and half:
            return "cudnn"
        if not second_order and platform == "tpu":
            return "splash"
        return AUTO_FALLBACK.get((platform, second_order), "xla")
    if requested == "flash" and forward_mode:
        raise ConfigError(
            "ModelConfig.attention='flash' is a custom-VJP attention without forward-mode derivatives, "
            "and this stage runs forward-mode AD (search.hypergradient forward or darts exact): "
            "use attention 'auto' (XLA there) or 'xla'"
        )
    if requested in FUSED_ATTENTION and second_order:
        raise ConfigError(
            f"ModelConfig.attention={requested!r} is a fused kernel without second-order or forward-mode "
            "derivatives, and this stage differentiates the loss twice (search.hypergradient unrolled, "
            "forward or darts exact): use attention 'auto' (XLA or flash there, the fused kernel "
            "elsewhere) or 'xla'"
        )
    if requested == "cudnn" and not (platform == "cuda" and half):
        raise ConfigError(
            f"ModelConfig.attention='cudnn' needs an NVIDIA GPU and dtype bfloat16/float16; "
            f"this is {platform!r} with {dtype!r}: use 'auto' or 'xla'"
        )
    if requested == "splash" and platform != "tpu":
        raise ConfigError(f"ModelConfig.attention='splash' needs a TPU; this is {platform!r}: use 'auto' or 'xla'")
    return requested


def stage_config(config: ModelConfig, estimator: str | None = None, darts_mode: str = "exact") -> ModelConfig:
    """``config`` with its attention resolved for a stage (``estimator`` None: a first-order stage)."""
    backend = select_attention(
        config.attention,
        config.dtype,
        second_order=differentiates_twice(estimator, darts_mode),
        forward_mode=needs_forward_mode(estimator, darts_mode),
    )
    return dataclasses.replace(config, attention=backend)


def _fall_back(reason: str) -> str:
    if reason not in _logged:
        _logged.add(reason)
        _log.warning("fused attention falls back to XLA: %s", reason)
    return "xla"


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, implementation: str = "cudnn"
) -> jax.Array:
    """``jax.nn.dot_product_attention`` on q [b, t, k, g, e] (GQA by head grouping), the boolean mask of
    ``bias`` (causal, padding, packed segments, windows) with ``is_causal``; "xla" runs it anywhere."""
    b, t, nk, g, e = q.shape
    out = jax.nn.dot_product_attention(
        q.reshape(b, t, nk * g, e), k, v, mask=bias > NEG_INF / 2, is_causal=True, implementation=implementation
    )
    return out.reshape(q.shape)


def splash_segments(bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splash's view of ``bias`` [b, 1, t, t]: segment ids [b, t] (1 = real key, 0 = padding, read from the
    last row), and whether the bias is exactly causal + key padding (a scalar: False for packed segments or
    windows). Splash then differs only on padding query rows (which see padding keys), whose outputs no
    real token reads."""
    t = bias.shape[-1]
    allowed = bias[:, 0] > NEG_INF / 2  # [b, t, s]
    valid = allowed[:, -1, :]
    return valid.astype(jnp.int32), jnp.all(allowed == (jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]))


def splash_mqa(
    q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, softcap: float | None = None, interpret: bool = False
) -> jax.Array:
    """Pallas splash causal attention with ``segments`` [b, t]: one MQA kernel per batch row and KV head."""
    b, t, nk, g, e = q.shape
    blk = min(512, t)
    blocks = splash.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([splash.CausalMask((t, t))] * g),
        block_sizes=blocks,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )
    qs = jnp.transpose(q, (0, 2, 3, 1, 4)) / jnp.asarray(math.sqrt(e), q.dtype)  # [b, k, g, t, e]
    ks, vs = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [b, k, s, e]

    def one(qb, kb, vb, sb):
        return kernel(qb, kb, vb, splash.SegmentIds(q=sb, kv=sb))

    out = jax.vmap(jax.vmap(one, (0, 0, 0, None)))(qs, ks, vs, segments)  # [b, k, g, t, e]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, softcap: float | None = None, interpret: bool = False
) -> jax.Array:
    """Splash (TPU) for causal + key-padding biases, GQA as MQA per KV head; any other bias (packed
    segments, windows) takes the XLA attention, chosen at run time (``lax.cond``)."""
    segments, plain = splash_segments(bias)
    return jax.lax.cond(
        plain,
        lambda: splash_mqa(q, k, v, segments, softcap, interpret),
        lambda: recompute_blocked_attention_hm(q, k, v, bias, 0, softcap),
    )


def attend(
    config: ModelConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    block: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """The decoder's attention by ``config.attention``: a stage's :func:`stage_config` has resolved it (the
    fine-tune and search steps do); an unresolved ``auto`` takes :func:`select_attention`'s first-order
    choice, except that flash becomes XLA there (the caller's AD mode is unknown, and ``jax.jvp`` /
    ``jax.jacfwd`` through a ``custom_vjp`` fail). ``block``: the query block (None: each core's default)."""
    backend = select_attention(config.attention, config.dtype)
    if config.attention == "auto" and backend == "flash":
        backend = "xla"
    if backend == "cudnn" and softcap is not None:
        backend = _fall_back("cuDNN attention has no logit soft-capping (Gemma 2)")
    if backend == "cudnn":
        return cudnn_attention(q, k, v, bias)
    if backend == "splash":
        return splash_attention(q, k, v, bias, softcap)
    t = q.shape[1]
    if backend == "flash":
        block_q, block_k = flash_blocks(t)
        return flash_attention(q, k, v, bias, block_q if block is None else block, block_k, softcap)
    return recompute_blocked_attention_hm(q, k, v, bias, query_block(t) if block is None else block, softcap)


def cached_attention_hm(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, softcap: float | None = None
) -> jax.Array:
    """:func:`attention_hm` with keys/values already heads-major, [b, k, s, e]: a KV cache, read where it lies.

    Generation's decode steps attend to the whole cache every step; keeping it heads-major means no
    per-step transpose (copy) of it. q [b, t, k, g, e], ``bias`` [b, 1, t, s]; output [b, t, k, g, e].
    """
    b, t, nk, g, e = q.shape
    qh = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, nk, g * t, e)
    scores = jnp.einsum("bkre,bkse->bkrs", qh, k, preferred_element_type=accum_dtype(q.dtype)) / math.sqrt(e)
    scores = softcap_scores(scores, softcap).reshape(b, nk, g, t, -1) + bias[:, :, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, nk, g * t, -1)
    out = jnp.einsum("bkrs,bkse->bkre", probs, v).reshape(b, nk, g, t, e)
    return jnp.transpose(out, (0, 3, 1, 2, 4))
