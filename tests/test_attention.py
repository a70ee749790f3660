"""Attention cores vs the reference einsum attention: values, first and second derivatives, masks, GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_variants import (
    ATTENTION,
    flash_attention,
    flash_attention_hm,
    recompute_attention_hm,
    reference_attention,
)

from flexora_jax.models.attention import blocked_attention_hm, query_block, recompute_blocked_attention_hm
from flexora_jax.models.llama import attention_bias


def _blocked(block):
    return lambda q, k, v, bias: recompute_blocked_attention_hm(q, k, v, bias, block)


# t = 7 below: blocks of 3 give spans [0,3) [3,6) [6,7) (a ragged last one).
CORES = {"recompute_hm": recompute_attention_hm, "flash": flash_attention, "flash_hm": flash_attention_hm}


def _live_rows(bias):
    """[b, t, 1, 1, 1]: 1 where the query sees at least one key. A fully masked query row (left padding)
    attends uniformly to every key in the reference but to the keys of its block when blocked; such rows
    are padding and never reach a real position, so blocked cores are compared on live rows only."""
    return (jnp.max(bias[:, 0], axis=-1) > -1.0)[:, :, None, None, None].astype(bias.dtype)


def _inputs(nk, g, mask, dtype=jnp.float32, t=7, e=4):
    b = 2
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, nk, g, e), dtype)
    k = jax.random.normal(ks[1], (b, t, nk, e), dtype)
    v = jax.random.normal(ks[2], (b, t, nk, e), dtype)
    w = jax.random.normal(ks[3], (b, t, nk, g, e), dtype)
    am = None
    if mask == "left_pad":  # batch row 1 left-padded: its first query rows are fully masked
        am = jnp.array([[1] * t, [0, 0] + [1] * (t - 2)])
    elif mask == "right_pad":
        am = jnp.array([[1] * t, [1] * (t - 3) + [0] * 3])
    bias = attention_bias(am, b, t).astype(dtype)
    return q, k, v, bias, w


def _loss(core, bias, w):
    return lambda q, k, v: jnp.sum(jnp.sin(core(q, k, v, bias)) * w * _live_rows(bias))


def _max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("name", sorted(CORES))
@pytest.mark.parametrize("nk,g", [(2, 1), (2, 3), (1, 4)])  # MHA, GQA, MQA
@pytest.mark.parametrize("mask", [None, "left_pad", "right_pad"])
def test_values_and_gradients(name, nk, g, mask):
    core = CORES[name]
    q, k, v, bias, w = _inputs(nk, g, mask)
    live = _live_rows(bias)
    assert _max_diff(core(q, k, v, bias) * live, reference_attention(q, k, v, bias) * live) < 1e-5
    grads = jax.grad(_loss(core, bias, w), (0, 1, 2))(q, k, v)
    ref = jax.grad(_loss(reference_attention, bias, w), (0, 1, 2))(q, k, v)
    assert _max_diff(grads, ref) < 1e-5


@pytest.mark.parametrize("name", sorted(CORES))
@pytest.mark.parametrize("mask", [None, "left_pad"])
def test_second_derivative_reverse_over_reverse(name, mask):
    q, k, v, bias, w = _inputs(2, 2, mask)

    def outer(core):
        def f(q, k, v):
            dq, dk, dv = jax.grad(_loss(core, bias, w), (0, 1, 2))(q, k, v)
            return jnp.sum(dq**2) + jnp.sum(jnp.cos(dk)) + jnp.sum(dv * v)

        return jax.grad(f, (0, 1, 2))(q, k, v)

    assert _max_diff(outer(CORES[name]), outer(reference_attention)) < 1e-4


@pytest.mark.parametrize("mask", [None, "left_pad"])
def test_recompute_forward_mode(mask):
    """The default core (checkpoint-based) supports jvp / jacfwd, as the `forward` hypergradient needs."""
    q, k, v, bias, w = _inputs(2, 2, mask)
    tangents = tuple(jnp.ones_like(x) for x in (q, k, v))
    _, t1 = jax.jvp(lambda *a: recompute_attention_hm(*a, bias), (q, k, v), tangents)
    _, t0 = jax.jvp(lambda *a: reference_attention(*a, bias), (q, k, v), tangents)
    assert _max_diff(t1, t0) < 1e-5
    # forward-over-reverse (the `darts` exact mixed Hessian-vector product pattern)
    hv = lambda core: jax.jvp(lambda q: jax.grad(_loss(core, bias, w))(q, k, v), (q,), (tangents[0],))[1]
    assert _max_diff(hv(recompute_attention_hm), hv(reference_attention)) < 1e-4
    # and forward-over-reverse through the custom-VJP cores as well
    assert _max_diff(hv(flash_attention_hm), hv(reference_attention)) < 1e-4
    # the default (blocked, checkpointed) core: jvp and forward-over-reverse
    _, t2 = jax.jvp(lambda *a: _blocked(3)(*a, bias), (q, k, v), tangents)
    live = _live_rows(bias)
    assert _max_diff(t2 * live, t0 * live) < 1e-5
    assert _max_diff(hv(_blocked(3)), hv(reference_attention)) < 1e-4


@pytest.mark.parametrize("nk,g,mask", [(2, 3, "left_pad"), (1, 4, "right_pad")])
def test_blocked_values_gradients_and_second_derivative(nk, g, mask):
    """The decoder's default core (blocks of 3 over t = 7: spans [0,3) [3,6) [6,7)) vs the reference."""
    core = _blocked(3)
    q, k, v, bias, w = _inputs(nk, g, mask)
    live = _live_rows(bias)
    assert _max_diff(core(q, k, v, bias) * live, reference_attention(q, k, v, bias) * live) < 1e-5
    grad = lambda c: jax.grad(_loss(c, bias, w), (0, 1, 2))(q, k, v)
    assert _max_diff(grad(core), grad(reference_attention)) < 1e-5

    def outer(c):
        return jax.grad(
            lambda q, k, v: sum(jnp.sum(x**2) for x in jax.grad(_loss(c, bias, w), (0, 1, 2))(q, k, v)), (0, 1, 2)
        )(q, k, v)

    assert _max_diff(outer(core), outer(reference_attention)) < 1e-4


def test_blocked_attention_default_block_and_long_sequences():
    assert [query_block(t) for t in (7, 128, 512, 2048)] == [32, 32, 32, 128]
    blocked = jax.jit(blocked_attention_hm, static_argnums=4)
    q, k, v, bias, w = _inputs(2, 2, "right_pad", t=40, e=8)  # default blocks [0,32) [32,40)
    ref = reference_attention(q, k, v, bias)
    assert _max_diff(blocked(q, k, v, bias, query_block(40)), ref) < 1e-5
    assert _max_diff(blocked(q, k, v, bias, 0), ref) < 1e-5  # 0 = one unblocked block
    q, k, v, bias, w = _inputs(2, 2, "right_pad", t=12, e=8)
    ref = reference_attention(q, k, v, bias)
    for block in (1, 5, 11, 12):  # one-token blocks, ragged last blocks, one block
        assert _max_diff(blocked(q, k, v, bias, block), ref) < 1e-5


def test_float64_exact():
    with jax.enable_x64(True):
        q, k, v, bias, w = _inputs(2, 3, "left_pad", dtype=jnp.float64)
        ref = jax.grad(_loss(reference_attention, bias, w), (0, 1, 2))(q, k, v)
        for core in CORES.values():
            assert _max_diff(jax.grad(_loss(core, bias, w), (0, 1, 2))(q, k, v), ref) < 1e-12


def test_registry():
    assert {"recompute_hm", "flash", "flash_hm", "xla", "blocked_hm", "recompute_blocked_hm"} <= set(ATTENTION)
