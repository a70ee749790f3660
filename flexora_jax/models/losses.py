"""Language-model losses over the decoder's fp32 logits, and the batch loss every stage trains on.

All three cross-entropies are means over the positions a ``loss_mask`` selects (an empty mask gives 0,
not NaN) and are computed in at least fp32. :func:`lm_loss` picks one from the batch's keys, so the
search, the fine-tune and the evaluation of a loss read the same batch dictionaries.

Chunked loss: :func:`lm_loss` takes the decoder's final hidden states [b, t, d] and applies the LM head
per sequence chunk of :func:`loss_chunk` tokens, inside ``lax.map`` with each chunk under
``jax.checkpoint``: only one chunk's fp32 logits [b, c, v] exist at a time, forward and backward (the
backward recomputes them from the hidden states). A batch whose whole fp32 logits fit
``LOSS_CHUNK_BYTES`` takes one chunk, computed exactly as the unchunked loss (no map, no remat).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from flexora_jax.config import ModelConfig
from flexora_jax.errors import DataError
from flexora_jax.models.attention import accum_dtype
from flexora_jax.models.llama import Params, forward, lm_head
from flexora_jax.validation import check_array, check_mapping, check_number

Batch = dict[str, jax.Array]

#: Largest fp32 logits tensor [b, c, v] one loss chunk may hold (64 MiB).
LOSS_CHUNK_BYTES = 64 * 2**20
#: Smallest chunk, in tokens, when the logits are cut (keeps each chunk's matmul large).
MIN_LOSS_CHUNK = 64


def loss_chunk(batch: int, seq: int, vocab: int, budget: int | None = None) -> int:
    """Tokens per loss chunk: ``seq`` (one chunk) when the fp32 logits [batch, seq, vocab] fit ``budget``
    bytes (default ``LOSS_CHUNK_BYTES``, read at trace time), else the most tokens whose logits fit it
    (at least ``MIN_LOSS_CHUNK``)."""
    budget = LOSS_CHUNK_BYTES if budget is None else budget
    per_token = 4 * batch * vocab
    if per_token * seq <= budget:
        return seq
    return max(1, min(seq, max(MIN_LOSS_CHUNK, budget // per_token)))


def _masked_mean(values: jax.Array, loss_mask: jax.Array) -> jax.Array:
    mask = loss_mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy in at least fp32: integer ``targets`` [...] or distributions [..., v]."""
    logits = logits.astype(accum_dtype(logits.dtype))
    if targets.ndim == logits.ndim:
        return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def causal_lm_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the tokens where ``loss_mask`` is 1.

    ``loss_mask[b, t] = 1`` means token ``t`` is a target (predicted from position ``t - 1``); the
    first position is never a target.
    """
    return _masked_mean(token_nll(logits[:, :-1], tokens[:, 1:]), loss_mask[:, 1:])


def soft_lm_loss(logits: jax.Array, target_probs: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy against target distributions [b, t, v] (distillation / planted soft targets)."""
    return _masked_mean(token_nll(logits, target_probs), loss_mask)


def labels_lm_loss(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits[b, t]`` against ``labels[b, t]`` where ``loss_mask[b, t]`` is 1."""
    return _masked_mean(token_nll(logits, labels), loss_mask)


def batch_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(targets, weights) aligned with the logits at each position: ``target_probs`` [b, t, v] or
    ``labels`` [b, t] with ``loss_mask``; otherwise the next input token, the last position weighted 0."""
    if "target_probs" in batch:
        return batch["target_probs"], batch["loss_mask"]
    if "labels" in batch:
        return batch["labels"], batch["loss_mask"]
    shift = ((0, 0), (0, 1))
    return jnp.pad(batch["input_ids"][:, 1:], shift), jnp.pad(batch["loss_mask"][:, 1:], shift)


def _chunk_slices(t: int, chunk: int, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start of chunk ``i`` (the last one is moved back to end at ``t``) and which of its positions are new."""
    start = jnp.minimum(i * chunk, t - chunk)
    return start, start + jnp.arange(chunk) >= i * chunk


def chunked_nll_sum(
    config: ModelConfig, params: Params, hidden: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
) -> jax.Array:
    """``sum(token_nll(lm_head(hidden)) * weights)`` by chunks of ``chunk`` positions, each rematerialised.

    ``hidden`` [b, t, d] final-normed states; ``targets`` [b, t] ids or [b, t, v] distributions. A length
    that is not a multiple of ``chunk`` ends with a chunk moved back to end at ``t``, its repeated
    positions weighted 0.
    """
    t = hidden.shape[1]
    acc = accum_dtype(jnp.dtype(config.dtype))

    @jax.checkpoint
    def piece_sum(h: jax.Array, target: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum(token_nll(lm_head(config, params, h), target) * w)

    def piece(i: jax.Array) -> jax.Array:
        start, new = _chunk_slices(t, chunk, i)
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # noqa: E731
        return piece_sum(cut(hidden), cut(targets), cut(weights).astype(acc) * new.astype(acc))

    return jnp.sum(jax.lax.map(piece, jnp.arange(-(-t // chunk))))


def lm_loss(
    config: ModelConfig,
    params: Params,
    lora: Any,
    gates: Any,
    batch: Batch,
    dropout_key: jax.Array | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """Answer-token cross-entropy of a batch (soft targets when the batch has ``target_probs``).

    ``batch`` holds ``input_ids``, ``loss_mask`` and optionally ``attention_mask``; ``target_probs``
    [b, t, v] or ``labels`` [b, t] are the targets of the token after position t (aligned with
    ``logits[b, t]``, planted / distillation data); otherwise the targets are the next input tokens.
    ``chunk``: tokens per loss chunk; None = :func:`loss_chunk`'s rule, 0 = one chunk. The batch's keys,
    ``input_ids``' dtype and rank and ``chunk`` are checked when traced (a FlexoraError naming them).
    """
    check_mapping(batch, "lm_loss: batch", required_keys=("input_ids", "loss_mask"), error=DataError)
    check_array(batch["input_ids"], "lm_loss: batch['input_ids']", "iu", 2)
    if chunk is not None:
        check_number(chunk, "lm_loss: chunk", lo=0, integer=True)
    hidden = forward(
        config,
        params,
        batch["input_ids"],
        batch.get("attention_mask"),
        lora=lora,
        gates=gates,
        dropout_key=dropout_key,
        return_hidden=True,
    )
    b, t, _ = hidden.shape
    chunk = loss_chunk(b, t, config.vocab_size) if chunk is None else min(chunk, t) if chunk > 0 else t
    targets, weights = batch_targets(batch)
    if chunk >= t:
        logits = lm_head(config, params, hidden)
        if "target_probs" in batch:
            return soft_lm_loss(logits, targets, weights)
        if "labels" in batch:
            return labels_lm_loss(logits, targets, weights)
        return causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
    total = chunked_nll_sum(config, params, hidden, targets, weights, chunk)
    return total / jnp.maximum(jnp.sum(weights.astype(total.dtype)), 1.0)


def token_logprobs(
    config: ModelConfig,
    params: Params,
    hidden: jax.Array,
    positions: jax.Array,
    targets: jax.Array,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-prob [b, p] of ``targets`` [b, p] at row ``positions`` [b, p] of ``hidden`` [b, t, d], and
    whether each is the argmax; the fp32 logits exist one chunk of positions at a time (scoring)."""
    if chunk is not None:
        check_number(chunk, "token_logprobs: chunk", lo=0, integer=True)
    h = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [b, p, d]
    b, p, d = h.shape
    chunk = loss_chunk(b, p, config.vocab_size) if chunk is None else max(1, min(chunk, p))
    n = -(-p // chunk)
    pad = ((0, 0), (0, n * chunk - p))
    hs = jnp.pad(h, pad + ((0, 0),)).reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = jnp.pad(targets, pad).reshape(b, n, chunk).swapaxes(0, 1)

    def piece(x: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits = lm_head(config, params, x[0]).astype(jnp.float32)  # [b, c, v]
        picked = jnp.take_along_axis(logits, x[1][..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == x[1]

    lp, ok = jax.lax.map(piece, (hs, ts))
    return lp.swapaxes(0, 1).reshape(b, -1)[:, :p], ok.swapaxes(0, 1).reshape(b, -1)[:, :p]
