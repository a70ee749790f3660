"""Gates: a pytree through jit/grad/scan/sharding; layer and rank gates' exact effect on the LoRA branch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexora_jax as fj
from flexora_jax.gates import Gates

CONFIG = fj.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
LORA = fj.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=("q_proj", "v_proj", "up_proj"),
    rank_pattern={"model.layers.2.self_attn.v_proj": 2},
    init_lora_weights=False,
)
L = CONFIG.num_hidden_layers
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)))
_forward = jax.jit(fj.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return fj.init_params(CONFIG, jax.random.key(0), init_std=0.1)


@pytest.fixture(scope="module")
def lora():
    return fj.init_lora(CONFIG, LORA, jax.random.key(1))


def _ranks(lora):
    return dict(lora.spec.r_max)


def _scale_b(lora, factor):
    """The same LoRA with every B multiplied by ``factor`` (a scalar or [L] per layer)."""
    f = jnp.broadcast_to(jnp.asarray(factor, jnp.float32), (L,))[:, None, None]
    return fj.LoraParams({m: {"a": w["a"], "b": w["b"] * f} for m, w in lora.weights.items()}, lora.spec)


def _loss(gates, lora, params):
    logits = fj.forward(CONFIG, params, TOKENS, lora=lora, gates=gates)
    return fj.causal_lm_loss(logits, TOKENS, jnp.ones_like(TOKENS))


# ------------------------------------------------------------------------------------------ pytree
def test_kinds_and_leaves(lora):
    assert fj.init_gates("none", L) is None
    for kind, n_leaves in (("layer", 1), ("rank", 3), ("both", 4)):
        g = fj.init_gates(kind, L, _ranks(lora), power=3)
        assert g.kind == kind and g.power == 3 and len(jax.tree.leaves(g)) == n_leaves
    g = fj.init_gates("rank", L, _ranks(lora))
    assert g.rank["v_proj"].shape == (L, 4) and g.layer is None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown gate kind"):
        fj.init_gates("layers", L)
    with pytest.raises(ValueError, match="power"):
        fj.init_gates("layer", L, power=2)
    with pytest.raises(ValueError, match="ranks"):
        fj.init_gates("rank", L)
    with pytest.raises(ValueError, match="shape"):
        fj.layer_gate_values(Gates(layer=jnp.zeros(L + 1)), L)
    with pytest.raises(ValueError, match="no entry for module 'k_proj'"):
        fj.rank_gate_values(Gates(rank={"q_proj": jnp.zeros((L, 4))}), "k_proj", (L, 4))


def test_gates_without_lora_raise(params):
    with pytest.raises(ValueError, match="gates were given without LoRA"):
        fj.forward(CONFIG, params, TOKENS, gates=fj.init_gates("layer", L))


def test_passes_through_jit_grad_scan_vmap_and_sharding(lora):
    g = fj.init_gates("both", L, _ranks(lora), power=3)
    out = jax.jit(lambda g: jax.tree.map(lambda x: x + 1, g))(g)
    assert isinstance(out, Gates) and out.power == 3 and jnp.all(out.layer == 1)

    grads = jax.grad(lambda g: jnp.sum(fj.layer_gate_values(g, L) * jnp.arange(L)))(
        Gates(layer=jnp.asarray([0.3, -0.2, 0.1]), power=3)
    )
    assert isinstance(grads, Gates) and grads.power == 3 and grads.rank is None and grads.layer.shape == (L,)

    stacked = jax.tree.map(lambda x: jnp.stack([x, x + 1.0]), g)  # two search steps' gates
    _, ws = jax.lax.scan(lambda c, gi: (c, fj.layer_gate_values(gi, L)), None, stacked)
    assert ws.shape == (2, L)
    assert jax.vmap(lambda gi: fj.rank_gate_values(gi, "q_proj", (L, 4)))(stacked).shape == (2, L, 4)

    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(g, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert isinstance(sharded, Gates) and sharded.layer.sharding.mesh.size == devices.size
    np.testing.assert_array_equal(jax.jit(fj.layer_gate_values, static_argnums=1)(sharded, L), np.ones(L))


# --------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("power", [1, 3])
def test_neutral_layer_gate_is_plain_lora(params, lora, power):
    gates = fj.init_gates("layer", L, power=power)
    np.testing.assert_allclose(fj.layer_gate_values(gates, L), np.ones(L), atol=1e-6)
    np.testing.assert_allclose(
        _forward(CONFIG, params, TOKENS, lora=lora, gates=gates), _forward(CONFIG, params, TOKENS, lora=lora), atol=1e-5
    )


@pytest.mark.parametrize("power", [1, 3])
def test_zero_layer_gate_removes_exactly_that_layer(params, lora, power):
    gates = Gates(layer=jnp.asarray([0.0, -jnp.inf, 0.0]), power=power)
    w = fj.layer_gate_values(gates, L)
    np.testing.assert_allclose(w, [1.5**power, 0.0, 1.5**power], rtol=1e-6)
    deltas = fj.delta_weights(lora, gates)
    plain = fj.delta_weights(lora)
    for m in lora.spec.targets:
        assert jnp.all(deltas[m][1] == 0)
        np.testing.assert_allclose(deltas[m][0], 1.5**power * plain[m][0], rtol=1e-5, atol=1e-7)
    # Same logits as a LoRA that never adapted layer 1, with the surviving layers scaled by w.
    without = fj.LoraParams(
        _scale_b(lora, 1.5**power).weights, fj.make_spec(CONFIG, dataclasses.replace(LORA, layers_to_transform=(0, 2)))
    )
    np.testing.assert_allclose(
        _forward(CONFIG, params, TOKENS, lora=lora, gates=gates),
        _forward(CONFIG, params, TOKENS, lora=without),
        atol=1e-5,
    )


def test_power_three(lora):
    alpha = jnp.asarray([0.5, -1.0, 0.25])
    w1 = fj.layer_gate_values(Gates(layer=alpha, power=1), L)
    w3 = fj.layer_gate_values(Gates(layer=alpha, power=3), L)
    want = L * np.exp(alpha) / np.exp(alpha).sum()
    np.testing.assert_allclose(w1, want, rtol=1e-6)
    np.testing.assert_allclose(w3, want**3, rtol=1e-6)
    np.testing.assert_allclose(np.mean(w1), 1.0, rtol=1e-6)  # the mean gate stays 1 for power 1


def test_rank_gates_at_init_scale_each_component_by_one_over_r_max(params, lora):
    gates = fj.init_gates("rank", L, _ranks(lora))
    for m in lora.spec.targets:  # v_proj has true rank 2 in layer 2, but softmax runs over r_max = 4
        np.testing.assert_allclose(fj.rank_gate_values(gates, m, (L, 4)), np.full((L, 4), 0.25), rtol=1e-6)
    np.testing.assert_allclose(
        _forward(CONFIG, params, TOKENS, lora=lora, gates=gates),
        _forward(CONFIG, params, TOKENS, lora=_scale_b(lora, 0.25)),
        atol=1e-5,
    )


def test_one_hot_rank_gate_keeps_one_component(params, lora):
    beta = jnp.asarray([[0.0, -jnp.inf, -jnp.inf, -jnp.inf]] * L)
    gates = Gates(rank={m: beta for m in lora.spec.targets})
    first_only = fj.LoraParams(
        {m: {"a": w["a"].at[:, :, 1:].set(0), "b": w["b"]} for m, w in lora.weights.items()}, lora.spec
    )
    np.testing.assert_allclose(
        _forward(CONFIG, params, TOKENS, lora=lora, gates=gates),
        _forward(CONFIG, params, TOKENS, lora=first_only),
        atol=1e-5,
    )


def test_both_gates_multiply(lora):
    rng = np.random.default_rng(1)
    layer = jnp.asarray(rng.normal(size=L), jnp.float32)
    rank = {m: jnp.asarray(rng.normal(size=(L, 4)), jnp.float32) for m in lora.spec.targets}
    both = fj.delta_weights(lora, Gates(layer=layer, rank=rank, power=3))
    rank_only = fj.delta_weights(lora, Gates(rank=rank))
    w = np.asarray(fj.layer_gate_values(Gates(layer=layer, power=3), L))
    for m in lora.spec.targets:
        np.testing.assert_allclose(both[m], w[:, None, None] * np.asarray(rank_only[m]), rtol=1e-5, atol=1e-7)
    values = fj.gate_values(Gates(layer=layer, rank=rank, power=3), L)
    np.testing.assert_allclose(values["layer"], w, rtol=1e-6)
    np.testing.assert_allclose(np.sum(values["rank"]["q_proj"], axis=-1), np.ones(L), rtol=1e-6)


# -------------------------------------------------------------------------------------- hypergradient
def test_hypergradient_is_finite_and_nonzero_once_b_is_nonzero(params, lora):
    gates = fj.init_gates("both", L, _ranks(lora), power=3)
    grad = jax.jit(jax.grad(_loss))(gates, lora, params)
    for leaf in jax.tree.leaves(grad):
        assert jnp.all(jnp.isfinite(leaf)) and jnp.any(leaf != 0)
    zero_b = fj.init_lora(CONFIG, dataclasses.replace(LORA, init_lora_weights=True), jax.random.key(1))
    grad0 = jax.jit(jax.grad(_loss))(gates, zero_b, params)
    assert all(jnp.all(leaf == 0) for leaf in jax.tree.leaves(grad0))


def test_hypergradient_matches_finite_differences(params, lora):
    alpha = jnp.asarray([0.2, -0.1, 0.05])
    loss = jax.jit(lambda a: _loss(Gates(layer=a, power=3), lora, params))
    grad = jax.jit(jax.grad(loss))(alpha)
    eps = 1e-2
    for i in range(L):
        e = jnp.zeros(L).at[i].set(eps)
        fd = (loss(alpha + e) - loss(alpha - e)) / (2 * eps)
        np.testing.assert_allclose(grad[i], fd, rtol=5e-2, atol=1e-4)
    assert np.abs(np.sum(grad)) < 1e-4 * np.abs(grad).max() + 1e-6  # softmax: shifting all alphas changes nothing
