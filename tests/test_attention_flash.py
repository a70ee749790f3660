"""The blockwise flash attention (``models/flash.py``) against the checkpointed XLA attention it replaces on CPU:
values, gradients, reverse-over-reverse second derivatives (fp32, every mask the decoder builds), float64
finite differences of its custom backward and of a second-order quantity, fully masked rows, and the
decoder with ``attention="flash"`` against ``"xla"``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexora_jax as fj
from flexora_jax.models.attention import recompute_blocked_attention_hm
from flexora_jax.models.flash import _tiles, flash_attention, flash_blocks
from flexora_jax.models.llama import attention_bias, window_bias
from flexora_jax.models.losses import lm_loss

B, T, NK, G, E = 2, 9, 2, 2, 4  # GQA: 2 KV heads, 2 query heads each
#: query blocks [0,4) [4,8) [8,9) against key tiles of 3 ([0,3) [3,4) | [0,3) [3,6) [6,8) | ...): several
#: tiles per row (the online softmax), ragged blocks and tiles
TILING = (4, 3)
CASES = {  # name -> (key padding, packed segments, window, softcap)
    "causal": (False, False, 0, None),
    "padding": (True, False, 0, None),
    "segments": (False, True, 0, None),
    "window": (True, False, 4, None),
    "softcap": (True, False, 0, 3.0),
    "everything": (True, True, 5, 3.0),
}


def _inputs(case: str, dtype=jnp.float32, seed: int = 0):
    padding, segments, window, softcap = CASES[case]
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, NK, G, E), dtype)
    k, v = (jax.random.normal(key, (B, T, NK, E), dtype) for key in ks[1:3])
    w = jax.random.normal(ks[3], q.shape, dtype)
    mask = np.ones((B, T), np.int32)
    if padding:
        mask[0, T - 2 :] = 0  # right padding
        mask[1, :3] = 0  # left padding: fully masked query rows
    seg = jnp.asarray([[0] * 3 + [1] * 2 + [2] * 3 + [-1], [0] * 5 + [1] * 4], jnp.int32) if segments else None
    bias = attention_bias(jnp.asarray(mask), B, T, seg).astype(dtype)
    if window:
        bias = window_bias(bias, jnp.int32(window))
    live = (jnp.max(bias[:, 0], axis=-1) > -1.0)[:, :, None, None, None].astype(dtype)  # rows that see a key
    return (q, k, v), bias, softcap, w * live


def _xla(bias, softcap):
    return lambda q, k, v: recompute_blocked_attention_hm(q, k, v, bias, 0, softcap)


def _flash(bias, softcap, tiling):
    return lambda q, k, v: flash_attention(q, k, v, bias, *tiling, softcap)


def _loss(core, w):
    return lambda q, k, v: jnp.sum(jnp.sin(core(q, k, v)) * w)  # w is 0 on fully masked rows


def _grad_norm(core, w):
    """A second-order quantity: a function of the gradient (what the unrolled hypergradient differentiates)."""

    def f(q, k, v):
        dq, dk, dv = jax.grad(_loss(core, w), (0, 1, 2))(q, k, v)
        return jnp.sum(dq**2) + jnp.sum(jnp.cos(dk)) + jnp.sum(dv * v)

    return f


@functools.partial(jax.jit, static_argnums=(5, 6))
def _orders(q, k, v, bias, w, tiling, softcap):
    """Output, gradient and reverse-over-reverse gradient of flash (tiling) or the XLA attention (None):
    one compiled program per tiling and soft-cap, shared by every mask."""
    core = _xla(bias, softcap) if tiling is None else _flash(bias, softcap, tiling)
    args = (q, k, v)
    return core(*args), jax.grad(_loss(core, w), (0, 1, 2))(*args), jax.grad(_grad_norm(core, w), (0, 1, 2))(*args)


def _rel_diff(a, b) -> float:
    """max |a - b| / max(1, max |b|) over a pytree."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(1.0, max(float(jnp.max(jnp.abs(y))) for y in lb))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb)) / scale


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_gradients_and_second_order_match_the_xla_attention(case):
    args, bias, softcap, w = _inputs(case)
    live = w != 0
    want_out, want_grad, want_second = _orders(*args, bias, w, None, softcap)
    out, grad, second = _orders(*args, bias, w, TILING, softcap)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert _rel_diff(jnp.where(live, out, 0), jnp.where(live, want_out, 0)) < 1e-5
    assert _rel_diff(grad, want_grad) < 1e-5
    assert _rel_diff(second, want_second) < 1e-5


@pytest.mark.parametrize("tiling", [(5, 1024), (0, 0)])
def test_other_tilings(tiling):
    """One key tile per query block, and one block for the whole sequence: values and gradients."""
    args, bias, softcap, w = _inputs("everything")
    want = jax.jit(jax.value_and_grad(_loss(_xla(bias, softcap), w), (0, 1, 2)))(*args)
    got = jax.jit(jax.value_and_grad(_loss(_flash(bias, softcap, tiling), w), (0, 1, 2)))(*args)
    assert _rel_diff(got, want) < 1e-5


def test_fully_masked_rows_are_finite_in_every_order():
    """Left padding and a segment-id padding row: rows that see no key give no NaN in values, gradients
    (with a nonzero cotangent on those rows too) or second derivatives."""
    args, bias, softcap, _ = _inputs("everything")
    w = jnp.ones_like(args[0])  # the dead rows' outputs are read as well
    assert bool(jnp.all(jnp.max(bias[:, 0], axis=-1)[1, :3] < -1.0))  # rows 0-2 of batch 1 see nothing
    out, grad, second = _orders(*args, bias, w, TILING, softcap)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((out, grad, second)))
    # a dead row attends uniformly to the keys of its block's causal prefix (its block is tokens 0-3)
    np.testing.assert_allclose(
        out[1, 0], jnp.broadcast_to(jnp.mean(args[2][1, :4], axis=0)[:, None], (NK, G, E)), atol=1e-6
    )


def test_float64_finite_differences_of_the_backward_and_of_a_second_order_quantity():
    """The custom backward against central differences of the forward, and reverse-over-reverse (which
    differentiates the custom backward as code) against central differences of that backward."""
    with jax.enable_x64(True):
        args, bias, softcap, w = _inputs("everything", jnp.float64)
        core = _flash(bias, softcap, TILING)
        rng = np.random.default_rng(1)
        dirs = tuple(jnp.asarray(rng.normal(size=x.shape)) for x in args)
        eps = 1e-6

        def check(f):
            """|central difference - exact| / max(1, |exact|) of f's derivative along ``dirs``."""
            value_and_grad = jax.jit(jax.value_and_grad(f, (0, 1, 2)))
            fd = (
                value_and_grad(*(x + eps * d for x, d in zip(args, dirs)))[0]
                - value_and_grad(*(x - eps * d for x, d in zip(args, dirs)))[0]
            ) / (2 * eps)
            exact = sum(float(jnp.vdot(g, d)) for g, d in zip(value_and_grad(*args)[1], dirs))
            return abs(float(fd) - exact) / max(1.0, abs(exact))

        assert check(_loss(core, w)) < 1e-8  # the custom backward
        assert check(_grad_norm(core, w)) < 1e-7  # reverse-over-reverse through it


def test_forward_mode_is_refused_by_the_custom_vjp():
    """Why ``select_attention`` sends forward-mode stages to "xla" (tests/test_attention_backends.py)."""
    args, bias, softcap, w = _inputs("causal")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(_flash(bias, softcap, TILING), args, args)


def test_tiles_are_causal_and_cover_every_visible_key():
    for t, bq, bk in [(13, 4, 3), (13, 5, 1024), (128, 32, 64), (7, 0, 0), (7, 1, 1)]:
        seen = np.zeros((t, t), bool)
        for qs, qe, keys in _tiles(t, bq, bk):
            for ks, ke in keys:
                assert ke <= qe and ks < ke
                seen[qs:qe, ks:ke] = True
        assert np.all(seen[np.tril_indices(t)])  # every (query, earlier-or-same key) pair is in a tile
    for t in (7, 128, 1024, 2048, 8192):  # at most 72 tiles, whatever the length
        assert sum(len(keys) for _, _, keys in _tiles(t, *flash_blocks(t))) <= 72


# ---------------------------------------------------------------------------------------- the decoder
GEMMA2 = fj.ModelConfig(
    vocab_size=48,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    model_type="gemma2",
    hidden_act="gelu_pytorch_tanh",
    sliding_window=5,
    sliding_layers=(0,),
    query_pre_attn_scalar=16.0,
    attn_logit_softcapping=4.0,
    final_logit_softcapping=10.0,
)


def test_decoder_with_flash_equals_the_xla_attention():
    """Gemma-2 shape (GQA, soft-capping, one windowed layer), left + right padding: logits and LoRA gradients."""
    b, t = 2, 12
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, GEMMA2.vocab_size, (b, t)), jnp.int32)
    mask = np.ones((b, t), np.int32)
    mask[0, :3], mask[1, 9:] = 0, 0
    batch = {"input_ids": ids, "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask, jnp.float32)}
    params = fj.init_params(GEMMA2, jax.random.key(0), init_std=0.3)
    lora = fj.init_lora(
        GEMMA2,
        fj.LoraConfig(r=2, target_modules=("q_proj", "k_proj", "v_proj"), init_lora_weights=False),
        jax.random.key(1),
    )

    def loss_and_grad(attention):
        config = dataclasses.replace(GEMMA2, attention=attention)
        return jax.jit(jax.value_and_grad(lambda wts: lm_loss(config, params, lora.replace(weights=wts), None, batch)))(
            lora.weights
        )

    (l0, g0), (l1, g1) = loss_and_grad("xla"), loss_and_grad("flash")
    assert abs(float(l0) - float(l1)) < 1e-5
    assert _rel_diff(g1, g0) < 1e-5
