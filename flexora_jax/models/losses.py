"""Language-model losses over the decoder's fp32 logits, and the batch loss every stage trains on.

All three cross-entropies are means over the positions a ``loss_mask`` selects (an empty mask gives 0,
not NaN) and are computed in at least fp32. :func:`lm_loss` picks one from the batch's keys, so the
search, the fine-tune and the evaluation of a loss read the same batch dictionaries.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from flexora_jax.config import ModelConfig
from flexora_jax.models.attention import accum_dtype
from flexora_jax.models.llama import Params, forward

Batch = dict[str, jax.Array]


def _masked_mean(values: jax.Array, loss_mask: jax.Array) -> jax.Array:
    mask = loss_mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def causal_lm_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the tokens where ``loss_mask`` is 1.

    ``loss_mask[b, t] = 1`` means token ``t`` is a target (predicted from position ``t - 1``); the
    first position is never a target.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(accum_dtype(logits.dtype)),
                                                          tokens[:, 1:])
    return _masked_mean(nll, loss_mask[:, 1:])


def soft_lm_loss(logits: jax.Array, target_probs: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy against target distributions [b, t, v] (distillation / planted soft targets)."""
    logp = jax.nn.log_softmax(logits.astype(accum_dtype(logits.dtype)), axis=-1)
    return _masked_mean(-jnp.sum(target_probs * logp, axis=-1), loss_mask)


def labels_lm_loss(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits[b, t]`` against ``labels[b, t]`` where ``loss_mask[b, t]`` is 1."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(accum_dtype(logits.dtype)), labels)
    return _masked_mean(nll, loss_mask)


def lm_loss(config: ModelConfig, params: Params, lora: Any, gates: Any, batch: Batch,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Answer-token cross-entropy of a batch (soft targets when the batch has ``target_probs``).

    ``batch`` holds ``input_ids``, ``loss_mask`` and optionally ``attention_mask``; ``target_probs``
    [b, t, v] or ``labels`` [b, t] are the targets of the token after position t (aligned with
    ``logits[b, t]``, planted / distillation data); otherwise the targets are the next input tokens.
    """
    logits = forward(config, params, batch["input_ids"], batch.get("attention_mask"), lora=lora, gates=gates,
                     dropout_key=dropout_key)
    if "target_probs" in batch:
        return soft_lm_loss(logits, batch["target_probs"], batch["loss_mask"])
    if "labels" in batch:
        return labels_lm_loss(logits, batch["labels"], batch["loss_mask"])
    return causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
