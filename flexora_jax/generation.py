"""Batched autoregressive generation with a KV cache, as one jitted program per shape bucket.

Design:
- ``generate(config, params, prompts, lora, gates, ...)`` left-pads the prompts into a
  ``[batch_bucket, prompt_bucket]`` array and runs :func:`_decode`, a pure function jitted per
  (config, batch bucket, prompt bucket, ``max_new_tokens``, sampling mode). Buckets are powers of two,
  so a long evaluation compiles a handful of programs.
- :func:`_decode` runs the decoder's own ``llama.block`` (given a ``KVCache``) and ``llama.lm_head``,
  the gated LoRA branch included, so generation cannot drift from the trained model: a batched prefill
  pass over the prompts (blocks under ``lax.scan``) fills the cache, then a ``lax.while_loop`` feeds one
  token per step until every row has emitted EOS or ``max_new_tokens`` tokens.
- The cache is heads-major, ``[b, k, s, e]`` per layer, so a decode step's attention is a batched
  matmul over the cache as it lies (no transpose), and each block writes only its new column, in place
  (``dynamic_update_slice`` on the loop carry; the compiled HLO shows no copy of the cache in the loop).
  Models of up to :data:`UNROLL_LAYERS` layers unroll the blocks in the decode step over per-layer
  weights and cache buffers sliced once before the loop: XLA CPU copies a dynamically sliced matmul
  operand, so a layer scan copies every layer's weights and cache at every step (about 2x slower per
  step on the benchmark model at batch 1 and 32, ``benchmarks/proposals/generation_notes.md``). Deeper
  models scan the blocks over the stacked ``[l, b, k, s, e]`` cache, so compile time and weight memory
  stay flat in depth.
- Left padding as in transformers' ``generate``: RoPE positions are ``cumsum(mask) - 1`` (padding
  gets position 1, never read), the cache columns of padding are masked out as keys, and generated
  token ``j`` of a row with ``n`` prompt tokens has position ``n + j``.
- Greedy decoding takes the argmax of the fp32 logits; sampling applies temperature, then top-k, then
  top-p (nucleus; the most likely token is always kept), with a seeded PRNG key. EOS stops a row
  in-graph (later tokens are padding); stop *strings* are matched on the host after decoding and cut
  the text at the first occurrence, as lm-evaluation-harness's ``generate_until`` does.
- Sharded params (``NamedSharding`` under a device mesh) need nothing special: ``jax.jit`` follows
  the data's shardings.

Shapes: ``b`` batch, ``p`` prompt bucket, ``s`` cache length (``p + max_new_tokens``), ``d`` hidden,
``h``/``k`` query/KV heads, ``g`` query heads per KV head, ``e`` head_dim, ``v`` vocab, ``l`` layers,
``n`` new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax.config import ModelConfig
from flexora_jax.data import bucket_of, length_buckets  # the power-of-two shapes scoring uses too
from flexora_jax.errors import ConfigError, DataError
from flexora_jax.lora import per_layer_lora
from flexora_jax.models.attention import NEG_INF
from flexora_jax.models.llama import KVCache, Params, block, embed, lm_head, rms_norm, rope_tables
from flexora_jax.validation import check_config_type, check_number, check_type, describe


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Generated continuations, one entry per prompt, in prompt order."""

    tokens: list[list[int]]  # new token ids, cut after EOS (EOS included) and at a stop string
    logprobs: list[list[float]]  # log-prob of each new token under the (unwarped) model distribution
    texts: list[str] | None  # decoded new tokens, cut at the first stop string (None without a tokenizer)
    finish_reasons: list[str]  # "eos", "stop" (a stop string) or "length" (max_new_tokens reached)


# ---------------------------------------------------------------------------------------- in-graph
#: Decode steps unroll the blocks of models with at most this many layers (see :func:`_step`); deeper
#: models scan them, so compile time and memory do not grow with depth.
UNROLL_LAYERS = 8

KV = tuple[jax.Array, jax.Array]  # keys, values
Cache = KV | list[KV]  # stacked [l, b, k, s, e], or one [b, k, s, e] pair per layer (unrolled decode)


def _bias(allowed: jax.Array) -> jax.Array:
    """Additive attention bias [b, 1, t, c] of a boolean ``allowed`` [b, t, c]."""
    return jnp.where(allowed[:, None], 0.0, NEG_INF)


def _prefill(
    config: ModelConfig, params: Params, lora_layers: Any, tokens: jax.Array, mask: jax.Array
) -> tuple[jax.Array, KV]:
    """The left-padded prompts ``tokens``/``mask`` [b, p] in one batched pass (blocks under ``lax.scan``).

    Returns the last column's normed hidden state [b, d] and the prompt's keys/values [l, b, k, p, e].
    """
    b, p = tokens.shape
    nk, e = config.num_key_value_heads, config.head_dim
    positions = jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 1)
    cos, sin = rope_tables(config, positions)
    bias = _bias(jnp.tril(jnp.ones((p, p), bool))[None] & (mask > 0)[:, None, :])

    def step(h, xs):
        layer, lora_layer, index = xs
        empty = jnp.zeros((b, nk, p, e), jnp.dtype(config.dtype))  # the prompt's columns only: scores [p, p]
        h, cache = block(
            config, layer, h, cos, sin, bias, lora_layer, None, 0.0, cache=KVCache(empty, empty, index, jnp.int32(0))
        )
        return h, (cache.k, cache.v)

    h, kv = jax.lax.scan(
        step,
        embed(config, params, tokens),
        (params["layers"], lora_layers, jnp.arange(config.num_hidden_layers, dtype=jnp.int32)),
    )
    return rms_norm(h[:, -1], params["final_norm"], config.rms_norm_eps), kv


def _decode_inputs(
    config: ModelConfig, params: Params, lora_layers: Any, prompt_kv: KV, max_new_tokens: int, unroll: bool
) -> tuple[Any, Cache]:
    """The blocks and the cache (the prompt's keys/values and room for ``max_new_tokens`` columns) as the
    decode loop holds them: stacked (scanned steps), or sliced per layer once, before the loop (unrolled)."""
    room = [(0, 0)] * 3 + [(0, max_new_tokens), (0, 0)]
    if not unroll:
        return (params["layers"], lora_layers), tuple(jnp.pad(x, room) for x in prompt_kv)
    layers, cache = [], []
    for i in range(config.num_hidden_layers):
        layers.append(jax.tree.map(lambda x, i=i: x[i], (params["layers"], lora_layers)))
        cache.append(tuple(jnp.pad(x[i], room[1:]) for x in prompt_kv))
    return layers, cache


def _step(
    config: ModelConfig,
    params: Params,
    layers: Any,
    cache: Cache,
    token: jax.Array,
    column: jax.Array,
    position: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, Cache]:
    """One decode step of ``token`` [b] at cache ``column`` and RoPE ``position`` [b].

    The token attends to itself and to the cached columns before ``column`` that are ``valid`` [b, s]
    (not padding); each block writes its keys/values into column ``column``. ``layers``/``cache`` come
    from :func:`_decode_inputs`. Unrolled (a list per layer), a step slices and copies nothing: each
    layer's weights and cache are their own buffers, written in place and read where they lie (XLA
    CPU copies a dynamically sliced operand of a matmul, which a scan over stacked layers does for
    every layer's weights and cache at every step). Returns the normed hidden state [b, d] and the
    updated cache.
    """
    s = valid.shape[1]
    bias = _bias((valid & (jnp.arange(s) <= column))[:, None])
    cos, sin = rope_tables(config, position[:, None])
    h = embed(config, params, token[:, None])
    if isinstance(cache, list):
        out = []
        for index, ((layer, lora_layer), (ck, cv)) in enumerate(zip(layers, cache)):
            h, kv = block(
                config, layer, h, cos, sin, bias, lora_layer, None, 0.0, cache=KVCache(ck, cv, jnp.int32(index), column)
            )
            out.append((kv.k, kv.v))
        return rms_norm(h[:, 0], params["final_norm"], config.rms_norm_eps), out

    def scanned(carry, xs):
        h, ck, cv = carry
        layer, lora_layer, index = xs
        h, kv = block(config, layer, h, cos, sin, bias, lora_layer, None, 0.0, cache=KVCache(ck, cv, index, column))
        return (h, kv.k, kv.v), None

    (h, *cache), _ = jax.lax.scan(scanned, (h, *cache), (*layers, jnp.arange(config.num_hidden_layers)))
    return rms_norm(h[:, 0], params["final_norm"], config.rms_norm_eps), tuple(cache)


def _choose(
    logits: jax.Array, key: jax.Array, do_sample: bool, top_k: int, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Next token [b] from logits [b, v]: argmax, or a sample after temperature / top-k / top-p."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    keep_sorted = before < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "do_sample", "top_k", "unroll"))
def _decode(
    config: ModelConfig,
    params: Params,
    lora: Any,
    gates: Any,
    tokens: jax.Array,
    mask: jax.Array,
    eos_ids: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    pad_id: jax.Array,
    *,
    max_new_tokens: int,
    do_sample: bool,
    top_k: int,
    unroll: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prefill + decode loop for left-padded ``tokens``/``mask`` [b, p] (``unroll``: see :func:`_step`).

    Returns new tokens [b, n] (``pad_id`` after a row's EOS), their log-probs [b, n] and the number of
    tokens each row generated (EOS included) [b].
    """
    b, p = tokens.shape
    lora_layers = None if lora is None else per_layer_lora(lora, gates, config.num_hidden_layers)
    mask = mask.astype(jnp.int32)
    n_prompt = jnp.sum(mask, axis=-1)  # [b]
    valid = jnp.concatenate([mask > 0, jnp.ones((b, max_new_tokens), bool)], axis=-1)  # [b, s] key columns
    h_last, prompt_kv = _prefill(config, params, lora_layers, tokens, mask)
    layers, cache = _decode_inputs(config, params, lora_layers, prompt_kv, max_new_tokens, unroll)

    def pick(h_last, step):
        logits = lm_head(config, params, h_last)
        token = _choose(logits, jax.random.fold_in(key, step), do_sample, top_k, temperature, top_p)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]

    first, first_lp = pick(h_last, 0)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    out_lp = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(first_lp)
    done = jnp.isin(first, eos_ids)
    length = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, out, out_lp, cache, done, length, last = state
        column = p + step - 1  # where the previous token goes
        h, cache = _step(config, params, layers, cache, last, column, n_prompt + step - 1, valid)
        token, lp = pick(h, step)
        token = jnp.where(done, pad_id, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        out_lp = jax.lax.dynamic_update_slice(out_lp, jnp.where(done, 0.0, lp)[:, None], (0, step))
        length = length + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        return step + 1, out, out_lp, cache, done, length, token

    state = (jnp.int32(1), out, out_lp, cache, done, length, first)
    _, out, out_lp, _, _, length, _ = jax.lax.while_loop(cond, body, state)
    return out, out_lp, length


# ---------------------------------------------------------------------------------------- host side
def _eos_ids(config: ModelConfig, tokenizer: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return [-1]  # no EOS: every row runs to max_new_tokens
    return [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else [int(i) for i in eos_token_id]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string; whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    lora: Any = None,
    gates: Any = None,
    *,
    max_new_tokens: int = 256,
    tokenizer: Any = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
) -> GenerateOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens (greedy unless ``temperature > 0``).

    Args:
      config, params: the model (``flexora_jax.load_model``); params may be sharded.
      prompts: strings (encoded with ``tokenizer``, special tokens as it adds them) or token id lists.
      lora, gates: an unmerged adapter and its gates (None: the base or merged weights).
      max_new_tokens: tokens to generate per prompt (>= 1); a static shape: one program per value.
      tokenizer: decodes the outputs into ``texts`` (and encodes string prompts).
      temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
      top_k: keep the k most likely tokens when sampling (0 = all).
      top_p: nucleus sampling: keep the most likely tokens whose mass before them is < top_p.
      seed: PRNG seed for sampling; the same seed and inputs give the same samples.
      stop: strings that end a continuation; matched on the decoded text after decoding.
      eos_token_id: id(s) that end a row in-graph; default ``config.eos_token_id``; -1: none (rows run to
        ``max_new_tokens``).
      batch_size: the largest batch per jitted call; smaller batches pad to a power of two.
      max_length: the model's context (prompt + new tokens must fit); default
        ``config.max_position_embeddings``.

    Returns:
      a :class:`GenerateOutput` (tokens, log-probs, texts, finish reasons) in prompt order.
    """
    check_config_type(config, ModelConfig, "generate: config")
    if isinstance(prompts, str) or not hasattr(prompts, "__iter__"):
        raise DataError(
            f"generate: prompts must be a list of prompts (strings or token id lists), got {describe(prompts)}"
        )
    prompts = list(prompts)
    if not prompts:
        raise DataError("generate: no prompts given")
    max_new_tokens = check_number(max_new_tokens, "generate: max_new_tokens", lo=1, integer=True)
    temperature = check_number(temperature, "generate: temperature", lo=0)
    top_k = check_number(top_k, "generate: top_k", lo=0, integer=True)
    top_p = check_number(top_p, "generate: top_p", lo=0, hi=1, lo_open=True)
    seed = check_number(seed, "generate: seed", integer=True)
    batch_size = check_number(batch_size, "generate: batch_size", lo=1, integer=True)
    if max_length is not None:
        max_length = check_number(max_length, "generate: max_length", lo=2, integer=True)
    if isinstance(stop, str) or any((not isinstance(s, str)) or s == "" for s in stop):
        raise ConfigError(f"generate: stop must be a list of non-empty strings, got {describe(stop)}")
    if stop and tokenizer is None:
        raise ConfigError("generate: stop strings need a tokenizer to decode the generated tokens")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(
            f"generate: tokenizer must have decode(ids) (fj.load_tokenizer(path)), got {describe(tokenizer)}"
        )
    if eos_token_id is not None:
        check_type(eos_token_id, int | tuple[int, ...], "generate: eos_token_id")
        given = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
        if not given or any(not (0 <= int(e) < config.vocab_size or e == -1) for e in given):  # -1: no EOS
            raise ConfigError(
                f"generate: eos_token_id {eos_token_id!r} must name token ids of the vocabulary "
                f"0..{config.vocab_size - 1} (or -1: no EOS)"
            )
    max_length = int(max_length or config.max_position_embeddings)
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ConfigError("generate: string prompts need a tokenizer (or pass token id lists)")
            ids = list(tokenizer.encode(prompt))
        else:
            prompt = prompt.tolist() if hasattr(prompt, "tolist") else prompt  # a numpy / jax row
            ids = [int(t) for t in check_type(prompt, tuple[int, ...], f"generate: prompts[{i}]", error=DataError)]
        if not ids:
            raise DataError(f"generate: prompt {i} has no tokens; start it with at least the BOS token")
        outside = [t for t in ids if not 0 <= t < config.vocab_size]
        if outside:
            raise DataError(
                f"generate: prompt {i} holds token ids {outside[:5]} outside the vocabulary 0..{config.vocab_size - 1}"
            )
        if len(ids) + max_new_tokens > max_length:
            raise DataError(
                f"generate: prompt {i} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                f"it needs {len(ids) + max_new_tokens} positions, more than the model's context "
                f"{max_length} (shorten or left-truncate the prompt, or lower max_new_tokens)"
            )
        encoded.append(ids)

    eos = _eos_ids(config, tokenizer, eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos[0] >= 0 else 0)
    prompt_buckets = length_buckets(max_length - max_new_tokens, min(16, max_length - max_new_tokens))
    batch_buckets = length_buckets(batch_size, 1)
    do_sample = temperature > 0
    key = jax.random.key(seed)
    tokens_out: list[list[int]] = [[] for _ in encoded]
    logprobs_out: list[list[float]] = [[] for _ in encoded]
    reasons = ["length"] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)  # similar lengths batch together
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        b = bucket_of(len(chunk), batch_buckets)
        p = bucket_of(max(len(encoded[i]) for i in chunk), prompt_buckets)
        tokens = np.full((b, p), pad, np.int32)
        mask = np.zeros((b, p), np.int32)
        mask[:, -1] = 1  # filler rows attend to one token
        for row, i in enumerate(chunk):
            ids = encoded[i]
            tokens[row, p - len(ids) :] = ids
            mask[row, p - len(ids) :] = 1
        out, lps, lengths = _decode(
            config,
            params,
            lora,
            gates,
            tokens,
            mask,
            jnp.asarray(eos, jnp.int32),
            jax.random.fold_in(key, start),
            jnp.float32(max(temperature, 1e-6)),
            jnp.float32(top_p),
            jnp.int32(pad),
            max_new_tokens=int(max_new_tokens),
            do_sample=do_sample,
            top_k=int(top_k),
            unroll=config.num_hidden_layers <= UNROLL_LAYERS,
        )
        out, lps, lengths = np.asarray(out), np.asarray(lps), np.asarray(lengths)
        for row, i in enumerate(chunk):
            n = int(lengths[row])
            tokens_out[i] = out[row, :n].tolist()
            logprobs_out[i] = lps[row, :n].astype(float).tolist()
            if n and tokens_out[i][-1] in eos:
                reasons[i] = "eos"

    texts = None
    if tokenizer is not None:
        texts = []
        for i, ids in enumerate(tokens_out):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, stop)
            if stopped:
                reasons[i] = "stop"
                tokens_out[i], logprobs_out[i] = _tokens_before(tokenizer, ids, logprobs_out[i], text)
            texts.append(text)
    return GenerateOutput(tokens_out, logprobs_out, texts, reasons)


def _tokens_before(tokenizer: Any, ids: list[int], logprobs: list[float], text: str) -> tuple[list[int], list[float]]:
    """The shortest prefix of ``ids`` whose decoding covers ``text`` (the tokens up to a stop string)."""
    lo, hi = 0, len(ids)
    while lo < hi:  # decoded length grows with the prefix: bisect on it
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo], logprobs[:lo]
