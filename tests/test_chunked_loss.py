"""The chunked LM loss equals the unchunked one (values, LoRA/gate gradients, hypergradients), and scoring's
chunked per-token log-probs equal a direct log-softmax."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import flexora_jax as fj
from flexora_jax.bilevel import InnerState, make_loss_fn, unroll
from flexora_jax.config import SearchConfig
from flexora_jax.engine import search
from flexora_jax.models.llama import forward
from flexora_jax.models.losses import LOSS_CHUNK_BYTES, MIN_LOSS_CHUNK, lm_loss, loss_chunk, token_logprobs
from flexora_jax.planted import PlantedConfig, make_planted_task
from flexora_jax.problem import decoder_problem

CONFIG = fj.ModelConfig(
    vocab_size=37,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)
B, T = 3, 10  # T is not a multiple of the chunks tested (3, 4)


def _batch(kind: str, padded: bool, dtype=np.float32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)
    attn = np.ones((B, T), np.int32)
    loss_mask = (rng.random((B, T)) < 0.7).astype(dtype)
    if padded:
        attn[0, 7:], attn[2, 4:] = 0, 0
        loss_mask = loss_mask * attn
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
    if kind == "labels":
        batch["labels"] = rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)
    if kind == "soft":
        batch["target_probs"] = np.asarray(jax.nn.softmax(rng.normal(size=(B, T, CONFIG.vocab_size)) * 2), dtype)
    return jax.tree.map(jnp.asarray, batch)


@functools.cache
def _model(dtype: str = "float32"):
    cfg = dataclasses.replace(CONFIG, dtype=dtype)
    params = fj.init_params(cfg, jax.random.key(0), init_std=0.3, head_std=0.5)
    lcfg = fj.LoraConfig(r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"), init_lora_weights=False)
    lora = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), fj.init_lora(cfg, lcfg, jax.random.key(1)))
    gates = fj.init_gates("layer", cfg.num_hidden_layers)
    gates = jax.tree.map(lambda x: x + jnp.asarray([0.3, -0.2], x.dtype).astype(jnp.dtype(dtype)), gates)
    return cfg, params, lora, gates


@functools.cache
def _value_and_grads(chunk: int):
    cfg, params, _, _ = _model()
    return jax.jit(jax.value_and_grad(lambda lo, g, b: lm_loss(cfg, params, lo, g, b, chunk=chunk), argnums=(0, 1)))


@pytest.mark.parametrize("kind", ["causal", "labels", "soft"])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_loss_and_gradients_equal_the_unchunked(kind, padded):
    _, _, lora, gates = _model()
    batch = _batch(kind, padded)
    want, (want_lora, want_gates) = _value_and_grads(0)(lora, gates, batch)
    for chunk in (3,):  # 10 = 3 + 3 + 3 + 1: the last chunk overlaps the one before
        got, (got_lora, got_gates) = _value_and_grads(chunk)(lora, gates, batch)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves((got_lora, got_gates)), jax.tree.leaves((want_lora, want_gates))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_rule_keeps_small_batches_whole_and_bounds_large_logits():
    assert loss_chunk(8, 128, 512) == 128  # the CPU benchmark / test sizes: one chunk, unchanged program
    c = loss_chunk(1, 2048, 128256)
    assert MIN_LOSS_CHUNK <= c < 2048 and 4 * c * 128256 <= LOSS_CHUNK_BYTES
    assert loss_chunk(64, 2048, 128256) == MIN_LOSS_CHUNK  # never below the floor
    assert loss_chunk(1, 10, 10**9) == 10  # ... nor above the sequence


def test_chunked_unrolled_hypergradient_matches_float64_finite_differences():
    """d L_val(theta_1(gates), gates) / d gates through an AdamW step, every loss chunked (chunk 3 of 10)."""
    with jax.enable_x64(True):
        cfg, params, lora, gates = _model("float64")
        opt = optax.adamw(1e-2, eps_root=1e-16)
        state = InnerState(lora, opt.init(lora))
        train = jax.tree.map(lambda x: x[None], _batch("causal", True, np.float64))  # K = 1
        val = _batch("labels", True, np.float64)

        def loss(lo, g, b):
            return lm_loss(cfg, params, lo, g, b, chunk=3)

        @jax.jit
        def objective(g):
            new_state, _ = unroll(loss, opt, g, state, train)
            return loss(new_state.lora, g, val)

        hg = jax.grad(objective)(gates)
        flat, unravel = ravel_pytree(gates)
        eps = 1e-5
        fd = np.array(
            [
                (objective(unravel(flat.at[i].add(eps))) - objective(unravel(flat.at[i].add(-eps)))) / (2 * eps)
                for i in range(flat.size)
            ]
        )
        got = np.asarray(ravel_pytree(hg)[0])
        assert np.linalg.norm(got - fd) / np.linalg.norm(fd) < 1e-6, (got, fd)
        # and the same hypergradient as the unchunked loss
        ref = jax.jit(
            jax.grad(
                lambda g: make_loss_fn(cfg, params)(
                    unroll(make_loss_fn(cfg, params), opt, g, state, train)[0].lora, g, val
                )
            )
        )(gates)
        np.testing.assert_allclose(got, ravel_pytree(ref)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 4])
def test_token_logprobs_match_a_direct_log_softmax(chunk):
    cfg, params, lora, gates = _model()
    batch = _batch("causal", False)
    rng = np.random.default_rng(1)
    pos = jnp.asarray(rng.integers(0, T, (B, 7)), jnp.int32)
    tgt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 7)), jnp.int32)
    logits = forward(cfg, params, batch["input_ids"], lora=lora, gates=gates)
    logp = jax.nn.log_softmax(logits, -1)
    rows = jnp.arange(B)[:, None]
    tgt = tgt.at[:, 0].set(jnp.argmax(logits[rows[:, 0], pos[:, 0]], -1))  # some greedy hits
    hidden = forward(cfg, params, batch["input_ids"], lora=lora, gates=gates, return_hidden=True)
    lp, ok = token_logprobs(cfg, params, hidden, pos, tgt, chunk)
    np.testing.assert_allclose(lp, logp[rows, pos, tgt], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ok, jnp.argmax(logits, -1)[rows, pos] == tgt)
    assert bool(ok[:, 0].all())


# ------------------------------------------------------------------------------------ bf16 end to end
def test_bf16_search_selects_what_the_fp32_search_selects():
    """Planted task: bf16 base weights and activations, fp32 LoRA / gates / optimizer states / loss; the
    unrolled search picks the same layers as in fp32."""
    task = make_planted_task(PlantedConfig(seed=0, seq_len=16, n_train=64, n_val=32, n_test=8))
    sc = SearchConfig(hypergradient="unrolled", inner_steps=4, steps=20)
    lcfg = fj.LoraConfig(r=4, lora_alpha=4.0)
    cfg16 = dataclasses.replace(task.config, dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), task.params)
    res16 = search(decoder_problem(cfg16, params16, lcfg), sc, task.train, task.val, seed=0)
    res32 = search(decoder_problem(task.config, task.params, lcfg), sc, task.train, task.val, seed=0)
    assert res16.selection.layers == res32.selection.layers
    assert set(res32.selection.layers) == set(task.planted_layers)
    floats = [
        x
        for x in jax.tree.leaves((res16.state.inner, res16.state.gates, res16.state.gate_opt_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    batch = jax.tree.map(lambda x: jnp.asarray(x[:2]), task.val)
    hidden = forward(cfg16, params16, batch["input_ids"], lora=res16.result, gates=res16.gates, return_hidden=True)
    assert hidden.dtype == jnp.bfloat16
    assert lm_loss(cfg16, params16, res16.result, res16.gates, batch).dtype == jnp.float32
