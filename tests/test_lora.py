"""LoRA params: pytree structure, the forward branch, variable ranks, counts, merge/unmerge, frozen base."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flexora_jax as fj
from flexora_jax.lora import per_layer_lora
from flexora_jax.models.llama import linear

CONFIG = fj.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
LORA = fj.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=("q_proj", "k_proj", "down_proj"),
    rank_pattern={"model.layers.1.self_attn.q_proj": 2, "k_proj": 3},
    alpha_pattern={"down_proj": 2.0},
    init_lora_weights=False,
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)))
_forward = jax.jit(fj.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return fj.init_params(CONFIG, jax.random.key(0), init_std=0.1)


@pytest.fixture(scope="module")
def lora():
    return fj.init_lora(CONFIG, LORA, jax.random.key(1))


def test_leaves_are_exactly_the_fp32_ab_arrays():
    bf16 = dataclasses.replace(CONFIG, dtype="bfloat16")
    lora = fj.init_lora(bf16, LORA, jax.random.key(1))
    leaves = jax.tree.leaves(lora)
    expected = [lora.weights[m][k] for m in sorted(lora.weights) for k in ("a", "b")]
    assert len(leaves) == 2 * len(LORA.target_modules)
    assert all(any(x is y for y in expected) for x in leaves)
    assert all(x.dtype == jnp.float32 for x in leaves)
    for m in lora.spec.targets:
        d_in, d_out = CONFIG.module_shape(m)
        r = lora.spec.r_max_of(m)
        assert lora.weights[m]["a"].shape == (2, d_in, r) and lora.weights[m]["b"].shape == (2, r, d_out)
    assert jax.tree.map(lambda x: x * 0, lora).spec is lora.spec  # the spec is static metadata


def test_spec_resolves_patterns_and_rslora():
    spec = fj.make_spec(CONFIG, LORA)
    assert spec.rank_of("q_proj") == (4, 2) and spec.rank_of("k_proj") == (3, 3)
    assert spec.scale_of("q_proj") == (2.0, 4.0) and spec.scale_of("down_proj") == (0.5, 0.5)
    assert spec.r_max_of("q_proj") == 4 and spec.r_max_of("k_proj") == 3
    rs = fj.make_spec(CONFIG, fj.LoraConfig(r=4, lora_alpha=8, use_rslora=True, layers_to_transform=(1,)))
    assert rs.scale_of("q_proj") == (0.0, 4.0) and rs.rank_of("v_proj") == (0, 4)


def test_components_beyond_the_rank_are_zero(lora):
    a, b = lora.weights["q_proj"]["a"], lora.weights["q_proj"]["b"]
    assert jnp.all(a[1, :, 2:] == 0) and jnp.all(b[1, 2:, :] == 0)
    assert jnp.all(a[0] != 0) and jnp.all(b[0] != 0)


def test_init_with_zero_b_is_the_base_model(params):
    lora = fj.init_lora(CONFIG, dataclasses.replace(LORA, init_lora_weights=True), jax.random.key(1))
    assert all(jnp.all(lora.weights[m]["b"] == 0) for m in lora.spec.targets)
    assert jnp.any(lora.weights["q_proj"]["a"] != 0)
    np.testing.assert_array_equal(_forward(CONFIG, params, TOKENS, lora=lora), _forward(CONFIG, params, TOKENS))


def test_linear_adds_scale_times_bax(params, lora):
    """The branch of one block is exactly ``scale * (x A_r) B_r`` with the true rank r."""
    x = jax.random.normal(jax.random.key(2), (2, 5, CONFIG.hidden_size))
    stacked = per_layer_lora(lora, None, CONFIG.num_hidden_layers)
    layer1 = jax.tree.map(lambda t: t[1], params["layers"])
    lora1 = jax.tree.map(lambda t: t[1], stacked)
    got = linear(x, layer1, "q_proj", lora1, None, 0.0)
    a, b = np.asarray(lora.weights["q_proj"]["a"][1, :, :2]), np.asarray(lora.weights["q_proj"]["b"][1, :2])
    want = np.asarray(x) @ np.asarray(layer1["q_proj"]["kernel"]) + 4.0 * (np.asarray(x) @ a) @ b
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(
        linear(x, layer1, "v_proj", lora1, None, 0.0), linear(x, layer1, "v_proj", None, None, 0.0)
    )


def test_delta_weights_match_numpy(lora):
    deltas = fj.delta_weights(lora)
    for m in lora.spec.targets:
        for layer, (r, s) in enumerate(zip(lora.spec.rank_of(m), lora.spec.scale_of(m))):
            a, b = np.asarray(lora.weights[m]["a"][layer]), np.asarray(lora.weights[m]["b"][layer])
            np.testing.assert_allclose(deltas[m][layer], s * a[:, :r] @ b[:r], atol=1e-6)


def test_count_params_llama3_8b_shape():
    llama3 = fj.ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    )
    counts = fj.count_params(llama3, fj.make_spec(llama3, fj.LoraConfig(r=8, target_modules=("q_proj", "v_proj"))))
    assert counts["trainable"] == 3_407_872 == 32 * 106_496
    assert counts["base"] == 8_030_261_248  # the published Llama-3-8B parameter count
    assert counts["total"] == counts["base"] + counts["trainable"]
    assert counts["trainable_percent"] == pytest.approx(100 * 3_407_872 / (8_030_261_248 + 3_407_872))
    half = fj.LoraConfig(
        r=8,
        target_modules=("q_proj", "v_proj"),
        layers_to_transform=tuple(range(16)),
        rank_pattern={"model.layers.0.self_attn.q_proj": 2},
    )
    assert fj.count_params(llama3, fj.make_spec(llama3, half))["trainable"] == 16 * 106_496 - 6 * (4096 + 4096)


def test_count_params_uses_true_ranks(lora):
    d, f, q, kv = 32, 48, CONFIG.q_dim, CONFIG.kv_dim
    want = (4 + 2) * (d + q) + (3 + 3) * (d + kv) + (4 + 4) * (f + d)
    assert fj.count_params(CONFIG, lora)["trainable"] == want


def test_merge_gives_the_adapter_logits(params, lora):
    merged = fj.merge(params, lora)
    np.testing.assert_allclose(_forward(CONFIG, merged, TOKENS), _forward(CONFIG, params, TOKENS, lora=lora), atol=1e-5)
    assert merged["layers"]["v_proj"]["kernel"] is params["layers"]["v_proj"]["kernel"]


def test_merge_unmerge_fp32_exact(params, lora):
    back = fj.unmerge(fj.merge(params, lora), lora)
    for m in ("q_proj", "k_proj", "down_proj"):
        np.testing.assert_allclose(back["layers"][m]["kernel"], params["layers"][m]["kernel"], atol=1e-6, rtol=0)
    assert not np.allclose(fj.merge(params, lora)["layers"]["q_proj"]["kernel"], params["layers"]["q_proj"]["kernel"])


def test_merge_bf16_is_computed_in_fp32_and_cast(params, lora):
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    merged = fj.merge(bf16, lora)
    kernel = merged["layers"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = bf16["layers"]["q_proj"]["kernel"].astype(jnp.float32) + fj.delta_weights(lora)["q_proj"]
    np.testing.assert_array_equal(kernel, want.astype(jnp.bfloat16))  # one rounding, from fp32
    back = fj.unmerge(merged, lora)["layers"]["q_proj"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(back, np.float32), np.asarray(bf16["layers"]["q_proj"]["kernel"], np.float32), atol=2e-2
    )


def test_adamw_step_touches_lora_leaves_only(params, lora):
    base_before = jax.tree.map(np.array, params)

    def loss(lora, params):
        return fj.causal_lm_loss(fj.forward(CONFIG, params, TOKENS, lora=lora), TOKENS, jnp.ones_like(TOKENS))

    opt = optax.adamw(1e-2, weight_decay=0.1)
    state = opt.init(lora)
    assert {x.shape for x in jax.tree.leaves(state) if x.ndim} <= {x.shape for x in jax.tree.leaves(lora)}

    @jax.jit
    def step(lora, state, params):
        grads = jax.grad(loss)(lora, params)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, grads

    new, _, grads = step(lora, state, params)
    assert isinstance(grads, fj.LoraParams) and grads.spec is lora.spec and new.spec is lora.spec
    jax.tree.map(np.testing.assert_array_equal, params, base_before)  # bit-identical base
    for m in lora.spec.targets:
        for k in ("a", "b"):
            assert not np.array_equal(new.weights[m][k], lora.weights[m][k])
    # Components beyond the true rank get zero gradient and stay zero (even under weight decay).
    assert jnp.all(grads.weights["q_proj"]["a"][1, :, 2:] == 0)
    assert jnp.all(new.weights["q_proj"]["a"][1, :, 2:] == 0) and jnp.all(new.weights["q_proj"]["b"][1, 2:] == 0)


def test_jit_does_not_recompile_for_new_lora_values(params, lora):
    _forward(CONFIG, params, TOKENS, lora=lora)
    compiled = _forward._cache_size()  # the cache is shared by every jit of fj.forward: compare counts
    _forward(CONFIG, params, TOKENS, lora=jax.tree.map(lambda x: 2 * x, lora))
    assert _forward._cache_size() == compiled


def test_dropout_only_with_a_key(params, lora):
    drop = fj.LoraParams(weights=lora.weights, spec=fj.make_spec(CONFIG, dataclasses.replace(LORA, lora_dropout=0.5)))
    plain = _forward(CONFIG, params, TOKENS, lora=lora)
    np.testing.assert_array_equal(_forward(CONFIG, params, TOKENS, lora=drop), plain)
    keyed = fj.forward(CONFIG, params, TOKENS, lora=drop, dropout_key=jax.random.key(0))
    assert not np.allclose(keyed, plain)


def test_one_fine_tune_program_serves_every_selection(params):
    """The fine-tune traces the layout: selections of other blocks / ranks / scales (same targets and r_max)
    reuse one compiled step and one optimizer-state shape; blocks outside a selection stay exactly zero and
    the traced LoRA computes what the static one does."""
    from flexora_jax import loops

    config = dataclasses.replace(CONFIG, num_hidden_layers=4)
    p4 = fj.init_params(config, jax.random.key(0))
    base = fj.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    layouts = [
        dataclasses.replace(base, layers_to_transform=(1,)),
        dataclasses.replace(base, layers_to_transform=(0, 3), rank_pattern={"model.layers.0.self_attn.v_proj": 2}),
        dataclasses.replace(base, lora_alpha=3, use_rslora=True, alpha_pattern={"model.layers.2.self_attn.q_proj": 5}),
    ]
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(0, 64, (16, 8)).astype(np.int32), "loss_mask": np.ones((16, 8), np.float32)}
    ft = fj.FinetuneConfig(max_steps=2, batch_size=4, lr=1e-2, warmup_ratio=0.0)
    before = loops._jit.cache_info().currsize
    states = []
    for i, lc in enumerate(layouts):
        lora = fj.init_lora(config, dataclasses.replace(lc, init_lora_weights=False), jax.random.key(i))
        np.testing.assert_allclose(
            fj.lm_loss(config, p4, lora.traced_layout(), None, data),
            fj.lm_loss(config, p4, lora, None, data),
            rtol=1e-6,
        )
        trained, _ = fj.finetune(fj.decoder_problem(config, p4, lora), data, ft)
        assert trained.spec == lora.spec and trained.coef is None  # back to the static layout
        for m in base.target_modules:
            off = np.asarray(lora.spec.coefficients(m)) == 0  # [L, r]: not adapted
            assert not np.asarray(trained.weights[m]["a"]).transpose(0, 2, 1)[off].any()
            assert not np.asarray(trained.weights[m]["b"])[off].any()
        states.append(jax.tree.structure(fj.init_train_state(lora, fj.train.make_optimizer(ft, 2))))
    assert loops._jit.cache_info().currsize - before == 1  # one program for the three selections
    assert states[0] == states[1] == states[2]  # one optimizer-state shape
    with pytest.raises(fj.ConfigError, match="traced layout"):
        fj.export_peft(lora.traced_layout(), "/nonexistent")
