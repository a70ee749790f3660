"""A LLaMA-style decoder (LLaMA, Mistral, Qwen2/3, Gemma 1-3, Phi-3, Mixtral): a pure function of params, LoRA, gates.

Design:
- ``forward(config, params, tokens, attention_mask, lora, gates)`` is pure: ``jax.grad`` picks what is
  differentiated by argument (LoRA for training, gates for the hypergradient), and the frozen base is
  never inside the trained pytree.
- Block parameters are stacked on a leading layer axis and the blocks run under ``jax.lax.scan``, so
  compile time does not grow with depth; ``config.scan_layers=False`` unrolls the blocks instead
  (same function, useful for debugging and for per-layer profiling).
- Per block and adapted module, the LoRA branch is ``((x @ A) * c) @ B`` with one coefficient vector
  ``c`` [rank] that folds together the LoRA scale, the rank mask (variable ranks), the Flexora layer
  gate and the AutoLoRA rank gate. Gate values never change shapes, so a search never recompiles.
- Base weights are in the compute dtype (``config.dtype``); LoRA A/B and gates stay fp32 and are cast
  at use; logits are fp32.
- Generation (:mod:`flexora_jax.generation`) runs the same :func:`block` with a :class:`KVCache` and
  the same :func:`embed` / :func:`lm_head`, so the cached decoder cannot drift from the trained one.
- Family differences are static Python on the config (resolved at trace time, nothing on the LLaMA
  path): biases, GeGLU, q/k norms, Gemma's sqrt(d) embedding scale and sandwich norms, soft-capping,
  scaled RoPE (Llama-3, linear, dynamic, YaRN), Mixtral's mixture-of-experts MLP (:mod:`.moe`).
  Per-layer sliding windows are a scanned [l] array (0 = full causal), so the layer scan stays one body;
  Gemma 3's sliding layers use their own RoPE base: both tables are built once and each layer picks
  its own by its window (:func:`layer_rope`), again without splitting the scan.
- Gemma's ``(1 + w)`` RMSNorm weights are stored as the effective scale ``1 + w`` (converted on HF
  load / save), so every norm here is ``w * x``.

Shapes: ``b`` batch, ``t`` sequence, ``d`` hidden, ``h``/``k`` query/KV heads, ``e`` head_dim,
``f`` MLP width, ``v`` vocab, ``r`` LoRA rank, ``l`` layers.

Param layout (HF ``(out, in)`` weights are stored transposed as ``(in, out)`` kernels)::

    {"embed": [v, d], "final_norm": [d], "lm_head": [d, v] (absent when tied),
     "layers": {"input_norm": [l, d], "post_attention_norm": [l, d],
                "pre_feedforward_norm": [l, d]?, "post_feedforward_norm": [l, d]? (Gemma 2 / 3),
                "q_norm": [l, e]?, "k_norm": [l, e]? (Qwen3, Gemma 3),
                "q_proj": {"kernel": [l, d, h*e], "bias": [l, h*e]?}, "k_proj": ..., "v_proj": ...,
                "o_proj": {"kernel": [l, h*e, d], "bias": [l, d]?}, "gate_proj": {"kernel": [l, d, f]},
                "up_proj": {"kernel": [l, d, f]}, "down_proj": {"kernel": [l, f, d]}}}

    Mixtral (``num_local_experts`` = n) has no gate/up/down_proj but ``"router": {"kernel": [l, d, n]}``,
    ``"w1"`` / ``"w3"``: ``{"kernel": [l, n, d, f]}`` and ``"w2"``: ``{"kernel": [l, n, f, d]}``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax.config import ALL_MODULES, EXPERT_MODULES, GEMMA_TYPES, SANDWICH_TYPES, ModelConfig, RopeScaling
from flexora_jax.dora import MAGNITUDE, dora_branch
from flexora_jax.errors import ConfigError, DataError
from flexora_jax.lora import per_layer_lora
from flexora_jax.models.attention import NEG_INF, accum_dtype, attend, cached_attention_hm
from flexora_jax.models.moe import moe_mlp
from flexora_jax.sharding import logical_axes

Params = dict[str, Any]


class KVCache(NamedTuple):
    """The generation cache as a block sees it, heads-major: keys/values [b, k, s, e] of this layer, or
    [l, b, k, s, e] of every layer (a layer scan's carry), of which the block uses layer ``layer``.

    :func:`block` writes the ``t`` new tokens' keys/values at columns ``column .. column + t - 1``
    (in place under jit) and attends to every column; ``layer`` also picks the sliding window.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array  # int32 scalar
    column: jax.Array  # int32 scalar


# ----------------------------------------------------------------------------------- building blocks
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32 and cast back, as HF LLaMA does."""
    x32 = x.astype(accum_dtype(x.dtype))
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [e/2], with Llama-3, linear or YaRN scaling when ``config.rope_scaling`` says so.

    Dynamic (NTK) scaling depends on the positions and is applied in :func:`rope_tables`.
    """
    e = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    s = config.rope_scaling
    if s is None or s.rope_type == "dynamic":
        return inv_freq.astype(np.float32)
    if s.rope_type == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    if s.rope_type == "yarn":
        return _yarn_inv_freq(s, inv_freq, e, config.rope_theta)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(s: RopeScaling, inv_freq: np.ndarray, e: int, theta: float) -> np.ndarray:
    """YaRN: dimensions that turn fewer than ``beta_slow`` times over the original context are interpolated
    (divided by ``factor``), more than ``beta_fast`` times kept, linearly blended between (transformers' ramp)."""

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return e * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, e - 1)
    high = high + 0.001 if low == high else high  # as transformers: no division by zero
    ramp = np.clip((np.arange(e // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return (inv_freq / s.factor * ramp + inv_freq * (1.0 - ramp)).astype(np.float32)


def yarn_attention_factor(s: RopeScaling) -> float:
    """YaRN's cos / sin scale: ``attention_factor``, else ``0.1 ln(factor) + 1`` (or the ratio of two such
    terms with ``mscale`` / ``mscale_all_dim``), as transformers' ``_compute_yarn_parameters``."""

    def get_mscale(m: float = 1.0) -> float:
        return 1.0 if s.factor <= 1 else 0.1 * m * math.log(s.factor) + 1.0

    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return get_mscale(s.mscale) / get_mscale(s.mscale_all_dim)
    return get_mscale()


def _tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv_freq = jnp.asarray(rope_inv_freq(config))
    s = config.rope_scaling
    if s is not None and s.rope_type == "dynamic":  # NTK: a larger base past max_position_embeddings
        e, m = config.head_dim, config.max_position_embeddings
        seq = jnp.maximum(jnp.max(positions) + 1, m).astype(jnp.float32)
        base = config.rope_theta * (s.factor * seq / m - (s.factor - 1)) ** (e / (e - 2))
        inv_freq = 1.0 / base ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, e/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if s is not None and s.rope_type == "yarn":
        scale = yarn_attention_factor(s)
        cos, sin = cos * scale, sin * scale
    return cos, sin


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [b, t, e] for integer positions [b, t] (HF 'rotate half' convention).

    With ``config.rope_local_theta`` (Gemma 3) the tables are [2, b, t, e]: the full-attention layers'
    (``rope_theta``, ``rope_scaling``), then the sliding layers' (``rope_local_theta``, unscaled);
    each block takes its own with :func:`layer_rope`.
    """
    cos, sin = _tables(config, positions)
    if config.rope_local_theta is None:
        return cos, sin
    local = dataclasses.replace(config, rope_theta=config.rope_local_theta, rope_scaling=None, rope_local_theta=None)
    local_cos, local_sin = _tables(local, positions)
    return jnp.stack([cos, local_cos]), jnp.stack([sin, local_sin])


def layer_rope(
    config: ModelConfig, cos: jax.Array, sin: jax.Array, window: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """The [b, t, e] tables of a layer: the sliding layers' (``window`` > 0) with ``config.rope_local_theta``."""
    if config.rope_local_theta is None:
        return cos, sin
    local = window > 0
    return jnp.where(local, cos[1], cos[0]), jnp.where(local, sin[1], sin[0])


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [b, t, heads, e] by the tables [b, t, e]; computed in fp32."""
    x32 = x.astype(accum_dtype(x.dtype))
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_bias(
    attention_mask: jax.Array | None, batch: int, seq: int, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Additive bias [b, 1, t, t]: causal, plus key padding from ``attention_mask`` [b, t].

    ``segment_ids`` [b, t] packs several sequences that share a prefix into one row: ``0`` marks the
    shared prefix, ``s > 0`` a segment that sees the prefix and its own earlier tokens only (another
    segment's tokens are masked), ``-1`` padding. The mask stays causal.
    """
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
    allowed = causal
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] > 0)
    if segment_ids is not None:
        q_seg, k_seg = segment_ids[:, None, :, None], segment_ids[:, None, None, :]
        allowed = allowed & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed = jnp.broadcast_to(allowed, (batch, 1, seq, seq))
    return jnp.where(allowed, 0.0, NEG_INF)


def window_bias(bias: jax.Array, window: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """``bias`` [b, 1, t, s] with keys more than ``window - 1`` columns before the query masked.

    Query ``i`` sits at column ``start + i``, key ``j`` at column ``j`` (as transformers counts them,
    padding included); ``window`` 0 leaves ``bias`` as it is.
    """
    t, s = bias.shape[-2:]
    q = start + jnp.arange(t, dtype=jnp.int32)[:, None]
    inside = (window <= 0) | (jnp.arange(s, dtype=jnp.int32)[None, :] > q - window)
    return jnp.where(inside, bias, NEG_INF)


# --------------------------------------------------------------------------------------- linear + LoRA
def linear(
    x: jax.Array,
    layer: Params,
    name: str,
    lora_layer: dict[str, Any] | None,
    dropout_key: jax.Array | None,
    dropout_rate: float,
) -> jax.Array:
    """``x @ W (+ b)`` plus, when ``name`` is adapted, the gated LoRA branch ``((x @ A) * c) @ B`` (or DoRA's)."""
    kernel = layer[name]["kernel"]
    y = base = jnp.einsum("btd,df->btf", x, kernel)
    if "bias" in layer[name]:
        y = y + layer[name]["bias"]
    if lora_layer is not None and name in lora_layer:
        a, b, c = lora_layer[name]["a"], lora_layer[name]["b"], lora_layer[name]["c"]  # [d,r] [r,f] [r]
        xin = x
        if dropout_key is not None and dropout_rate > 0.0:
            key = jax.random.fold_in(dropout_key, ALL_MODULES.index(name))
            keep = jax.random.bernoulli(key, 1.0 - dropout_rate, x.shape)
            xin = jnp.where(keep, x / (1.0 - dropout_rate), 0.0).astype(x.dtype)
        if MAGNITUDE in lora_layer[name]:  # DoRA (flexora_jax.dora): PEFT reuses x @ W only without dropout
            return y + dora_branch(xin, base if xin is x else None, kernel, lora_layer[name])
        down = jnp.einsum("btd,dr->btr", xin, a.astype(x.dtype)) * c.astype(x.dtype)
        y = y + jnp.einsum("btr,rf->btf", down, b.astype(x.dtype))
    return y


def block(
    config: ModelConfig,
    layer: Params,
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    bias: jax.Array,
    lora_layer: dict[str, Any] | None,
    dropout_key: jax.Array | None,
    dropout_rate: float,
    attention_block: int | None = None,
    cache: KVCache | None = None,
    window: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, KVCache]:
    """One pre-norm block: attention (GQA, RoPE) and a gated MLP (SwiGLU / GeGLU), each with a residual.

    Without ``cache``: ``h`` [b, t, d] attends to itself (``bias`` [b, 1, t, t]) and the block returns
    the new ``h``. With a :class:`KVCache` (generation): the block's keys/values are written into the
    cache first, ``h`` attends to every cache column (``bias`` [b, 1, t, s]), and the block returns
    ``(h, cache)``. With ``config.sliding_window`` the layer's window (``window``, or looked up by
    ``cache.layer``) further restricts ``bias``.
    """
    b, t, _ = h.shape
    nh, nk, e = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps

    def lin(x, name):
        return linear(x, layer, name, lora_layer, dropout_key, dropout_rate)

    x = rms_norm(h, layer["input_norm"], eps)
    q = lin(x, "q_proj").reshape(b, t, nh, e)
    k = lin(x, "k_proj").reshape(b, t, nk, e)
    v = lin(x, "v_proj").reshape(b, t, nk, e)
    if config.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], eps), rms_norm(k, layer["k_norm"], eps)
    if config.sliding_window and cache is not None:
        window = jnp.asarray(config.layer_windows, jnp.int32)[cache.layer]
    cos, sin = layer_rope(config, cos, sin, window)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if config.query_pre_attn_scalar is not None and config.query_pre_attn_scalar != e:
        q = q * jnp.asarray(math.sqrt(e / config.query_pre_attn_scalar), q.dtype)  # attention divides by sqrt(e)
    q = q.reshape(b, t, nk, nh // nk, e)  # query heads grouped by the KV head they share
    if config.sliding_window:
        bias = window_bias(bias, window, 0 if cache is None else cache.column)
    cap = config.attn_logit_softcapping
    if cache is None:
        # Blockwise, heads-major; no [b, k, g, t, s] probabilities kept for the backward pass (attention.py).
        attn = attend(config, q, k, v, bias, attention_block, cap)  # config.attention's backend
    else:
        cache, k, v = _write_cache(cache, k, v)
        attn = cached_attention_hm(q, k, v, bias, cap)
    attn = lin(attn.reshape(b, t, nh * e), "o_proj")
    sandwich = config.model_type in SANDWICH_TYPES
    h = h + (rms_norm(attn, layer["post_attention_norm"], eps) if sandwich else attn)

    x = rms_norm(h, layer["pre_feedforward_norm" if sandwich else "post_attention_norm"], eps)
    act = jax.nn.silu if config.hidden_act == "silu" else functools.partial(jax.nn.gelu, approximate=True)
    if config.num_local_experts is None:
        mlp = lin(act(lin(x, "gate_proj")) * lin(x, "up_proj"), "down_proj")
    else:
        mlp = moe_mlp(config, layer, x, lora_layer, act)
    h = h + (rms_norm(mlp, layer["post_feedforward_norm"], eps) if sandwich else mlp)
    return h if cache is None else (h, cache)


def _write_cache(cache: KVCache, k: jax.Array, v: jax.Array) -> tuple[KVCache, jax.Array, jax.Array]:
    """Write new keys/values [b, t, k, e] heads-major at the cache's column (and layer, when stacked);
    returns the cache and this layer's keys/values [b, k, s, e]."""
    zero = jnp.zeros((), jnp.int32)
    stacked = cache.k.ndim == 5
    at = (cache.layer,) * stacked + (zero, zero, jnp.asarray(cache.column, jnp.int32), zero)

    def write(buffer: jax.Array, x: jax.Array) -> jax.Array:
        x = jnp.transpose(x, (0, 2, 1, 3)).astype(buffer.dtype)
        return jax.lax.dynamic_update_slice(buffer, x[None] if stacked else x, at)

    cache = cache._replace(k=write(cache.k, k), v=write(cache.v, v))
    if not stacked:
        return cache, cache.k, cache.v
    keys, values = (jax.lax.dynamic_index_in_dim(x, cache.layer, keepdims=False) for x in (cache.k, cache.v))
    return cache, keys, values


def embed(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Token embeddings [b, t, d] in the compute dtype (times sqrt(d) for Gemma)."""
    dtype = jnp.dtype(config.dtype)
    h = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    return h * jnp.asarray(math.sqrt(config.hidden_size), dtype) if config.model_type in GEMMA_TYPES else h


def lm_head(config: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """Logits [..., v] (fp32 or wider) of final-normed hidden states [..., d]; tied heads use the embedding.

    With ``config.final_logit_softcapping`` (Gemma 2) the logits are ``cap * tanh(logits / cap)``.
    """
    dtype = jnp.dtype(config.dtype)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("...d,dv->...v", h, head.astype(dtype), preferred_element_type=accum_dtype(dtype))
    cap = config.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


# ---------------------------------------------------------------------------------------- forward
def forward(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    lora: Any = None,
    gates: Any = None,
    positions: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
    return_hidden: bool = False,
    attention_block: int | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits [b, t, v] (fp32) of the decoder for ``tokens`` [b, t].

    Args:
      config: the model's (hashable) ``ModelConfig``; static under jit.
      params: base params (layout in the module docstring), in ``config.dtype``.
      tokens: int token ids [b, t].
      attention_mask: 1 for real tokens, 0 for padding [b, t]; None means all real.
      lora: a ``flexora_jax.lora.LoraParams`` or None.
      gates: a ``flexora_jax.gates.Gates`` or None (no gate: plain LoRA).
      positions: RoPE positions [b, t]; default ``arange(t)`` (use ``cumsum(mask) - 1`` for left padding).
      dropout_key: PRNG key enabling LoRA dropout (training); None disables it.
      return_hidden: return the final normed hidden states [b, t, d] instead of logits.
      attention_block: attend by causal query blocks of this many tokens; None = the attention's default
        (``attention.attend``), 0 = one unblocked block. Same function either way (see attention.py).
      segment_ids: [b, t] packed rows: 0 = shared prefix, s > 0 = segment s (sees the prefix and
        itself), -1 = padding (see :func:`attention_bias`); give matching ``positions``. Sliding windows
        count columns of the row (as transformers does), not positions within a segment.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise DataError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(config, positions)
    bias = attention_bias(attention_mask, b, t, segment_ids)
    h = embed(config, params, tokens)

    lora_layers = None
    dropout_rate = 0.0
    if lora is not None:
        lora_layers = per_layer_lora(lora, gates, config.num_hidden_layers)
        dropout_rate = lora.spec.dropout
    elif gates is not None:
        raise ConfigError("gates were given without LoRA params: gates scale the LoRA branch only")

    def step(h, xs):
        layer, lora_layer, key, window = xs
        return block(
            config, layer, h, cos, sin, bias, lora_layer, key, dropout_rate, attention_block, window=window
        ), None

    if config.remat_layers:
        step = jax.checkpoint(step)
    keys = None if dropout_key is None else jax.random.split(dropout_key, config.num_hidden_layers)
    windows = jnp.asarray(config.layer_windows, jnp.int32) if config.sliding_window else None
    if config.scan_layers:
        h, _ = jax.lax.scan(step, h, (params["layers"], lora_layers, keys, windows))
    else:
        for i in range(config.num_hidden_layers):
            xs = jax.tree.map(lambda x: x[i], (params["layers"], lora_layers, keys, windows))  # noqa: B023 (called in this iteration)
            h, _ = step(h, xs)

    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    return h if return_hidden else lm_head(config, params, h)


# ------------------------------------------------------------------------------------------ init
def init_params(config: ModelConfig, key: jax.Array, init_std: float = 0.02, head_std: float | None = None) -> Params:
    """Random base params in ``config.dtype`` (normal(0, init_std) kernels, unit norms).

    ``head_std`` overrides the LM-head (or tied embedding) scale: a peaked output distribution makes a
    planted LoRA change visible (see the planted-task notes).
    """
    L, d = config.num_hidden_layers, config.hidden_size
    dtype = jnp.dtype(config.dtype)
    keys = iter(jax.random.split(key, 16))

    def normal(shape, std=init_std):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers: Params = {name: jnp.ones((L, d), dtype) for name in config.layer_norms}
    if config.qk_norm:
        layers.update(q_norm=jnp.ones((L, config.head_dim), dtype), k_norm=jnp.ones((L, config.head_dim), dtype))
    experts = () if config.num_local_experts is None else (config.num_local_experts,)
    for name in config.linear_modules:
        d_in, d_out = config.module_shape(name)
        layers[name] = {"kernel": normal((L, *(experts if name in EXPERT_MODULES else ()), d_in, d_out))}
        if name in config.bias_modules:
            layers[name]["bias"] = jnp.zeros((L, d_out), dtype)
    if experts:
        layers["router"] = {"kernel": normal((L, d, *experts))}
    params: Params = {
        "embed": normal((config.vocab_size, d), head_std if config.tie_word_embeddings and head_std else init_std),
        "layers": layers,
        "final_norm": jnp.ones((d,), dtype),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = normal((d, config.vocab_size), head_std or init_std)
    return params


def abstract_params(config: ModelConfig) -> Params:
    """:func:`init_params`'s tree as ``jax.ShapeDtypeStruct`` leaves: no compile, no allocation."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_axes(config: ModelConfig) -> Params:
    """The logical axis names of every base param: a tree of :class:`~flexora_jax.sharding.Axes` beside
    :func:`init_params`'s (e.g. ``layers.q_proj.kernel``: ``Axes("layers", "embed", "heads")``, Mixtral's
    ``w1``: ``Axes("layers", "expert", "embed", "mlp")``), what :func:`flexora_jax.sharding.partition_specs`
    maps to mesh axes through its rules table. A param without declared axes raises, naming it."""
    return logical_axes(abstract_params(config))


def param_shapes(config: ModelConfig) -> Params:
    """The expected shape of every base param (what loaders validate against)."""
    return jax.tree.map(lambda x: x.shape, abstract_params(config))
