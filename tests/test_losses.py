"""LM losses against a direct log-softmax computation, and lm_loss's choice of targets by batch keys."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax.config import ModelConfig
from flexora_jax.models.llama import forward, init_params
from flexora_jax.models.losses import causal_lm_loss, labels_lm_loss, lm_loss, soft_lm_loss

CONFIG = ModelConfig(
    vocab_size=23,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
RNG = np.random.default_rng(0)
LOGITS = jnp.asarray(RNG.normal(size=(2, 6, 23)), jnp.float32)
TOKENS = jnp.asarray(RNG.integers(0, 23, (2, 6)), jnp.int32)
MASK = jnp.asarray([[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0]], jnp.int32)


def _nll(logits, targets):
    return -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(targets)[..., None], -1)[..., 0]


def test_causal_loss_is_the_masked_mean_next_token_nll():
    want = _nll(LOGITS[:, :-1], TOKENS[:, 1:])[np.asarray(MASK[:, 1:]) > 0].mean()
    chex.assert_trees_all_close(causal_lm_loss(LOGITS, TOKENS, MASK), want, rtol=1e-6)
    chex.assert_shape(causal_lm_loss(LOGITS, TOKENS, MASK), ())
    assert float(causal_lm_loss(LOGITS, TOKENS, jnp.zeros_like(MASK))) == 0.0  # an empty mask is 0, not NaN


def test_one_hot_soft_targets_equal_labels():
    labels = TOKENS
    want = _nll(LOGITS, labels)[np.asarray(MASK) > 0].mean()
    chex.assert_trees_all_close(labels_lm_loss(LOGITS, labels, MASK), want, rtol=1e-6)
    one_hot = jax.nn.one_hot(labels, 23)
    chex.assert_trees_all_close(soft_lm_loss(LOGITS, one_hot, MASK), labels_lm_loss(LOGITS, labels, MASK), rtol=1e-6)


def test_lm_loss_picks_targets_from_the_batch_keys():
    params = init_params(CONFIG, jax.random.key(0))
    batch = {"input_ids": TOKENS, "loss_mask": MASK, "attention_mask": jnp.ones_like(TOKENS)}
    logits = forward(CONFIG, params, TOKENS, batch["attention_mask"])
    labels = jnp.roll(TOKENS, 1, axis=1)
    probs = jax.nn.softmax(LOGITS, -1)
    chex.assert_trees_all_close(lm_loss(CONFIG, params, None, None, batch), causal_lm_loss(logits, TOKENS, MASK))
    chex.assert_trees_all_close(
        lm_loss(CONFIG, params, None, None, {**batch, "labels": labels}), labels_lm_loss(logits, labels, MASK)
    )
    chex.assert_trees_all_close(
        lm_loss(CONFIG, params, None, None, {**batch, "labels": labels, "target_probs": probs}),
        soft_lm_loss(logits, probs, MASK),
    )
