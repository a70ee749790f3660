"""Hypergradients are right (finite differences in float64) and the search step compiles once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flexora_jax as fj
from flexora_jax.bilevel import (
    InnerState,
    _search_step,
    darts_implicit,
    hypergradient,
    inner_step,
    make_loss_fn,
    unroll,
)
from flexora_jax.config import SearchConfig
from flexora_jax.data import BatchSampler

L = 3


def _setup(rank_gates: bool = False, nonzero_b: bool = False):
    """A tiny float64 model, LoRA on q/v, gates, K=5 train batches and a validation batch."""
    cfg = fj.ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=L,
        num_attention_heads=2,
        num_key_value_heads=1,
        dtype="float64",
    )
    params = fj.init_params(cfg, jax.random.key(0), init_std=0.3, head_std=0.5)
    lcfg = fj.LoraConfig(
        r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"), init_lora_weights=False if nonzero_b else True
    )
    lora = fj.init_lora(cfg, lcfg, jax.random.key(1))
    lora = jax.tree.map(lambda x: x.astype(jnp.float64), lora)
    kind = "both" if rank_gates else "layer"
    gates = fj.init_gates(kind, L, dict(lora.spec.r_max))
    rng = np.random.default_rng(0)
    gates = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float64), gates)
    tokens = rng.integers(0, 32, size=(6, 4, 8)).astype(np.int32)
    batches = {
        "input_ids": tokens[:5],
        "attention_mask": np.ones_like(tokens[:5]),
        "loss_mask": np.ones(tokens[:5].shape, np.float64),
    }
    val = {
        "input_ids": tokens[5],
        "attention_mask": np.ones_like(tokens[5]),
        "loss_mask": np.ones(tokens[5].shape, np.float64),
    }
    return cfg, params, lora, gates, batches, val


def _fd_grad(f, gates, eps=1e-5):
    """Central finite differences of a scalar function of a Gates pytree, leaf by leaf."""
    leaves, treedef = jax.tree.flatten(gates)
    grads = []
    for i, leaf in enumerate(leaves):
        flat = np.asarray(leaf).ravel()
        g = np.zeros_like(flat)
        for j in range(flat.size):

            def shifted(delta):
                new = flat.copy()
                new[j] += delta
                ls = list(leaves)
                ls[i] = jnp.asarray(new.reshape(leaf.shape))
                return float(f(jax.tree.unflatten(treedef, ls)))

            g[j] = (shifted(eps) - shifted(-eps)) / (2 * eps)
        grads.append(g.reshape(leaf.shape))
    return jax.tree.unflatten(treedef, grads)


def _rel_err(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("opt_name,k", [("adamw", 1), ("adamw", 2), ("adamw", 5), ("sgd", 1), ("sgd", 2), ("sgd", 5)])
def test_unrolled_hypergradient_matches_finite_differences(opt_name, k):
    with jax.enable_x64(True):
        cfg, params, lora, gates, batches, val = _setup()
        opt = optax.adamw(1e-2, eps_root=1e-16) if opt_name == "adamw" else optax.sgd(0.5)
        loss = make_loss_fn(cfg, params)
        state = InnerState(lora, opt.init(lora))
        kb = jax.tree.map(lambda x: x[:k], batches)

        @jax.jit
        def objective(g):
            new_state, _ = unroll(loss, opt, g, state, kb)
            return loss(new_state.lora, g, val)

        hg, _, _ = jax.jit(lambda g: hypergradient("unrolled", loss, loss, opt, g, state, kb, val))(gates)
        fd = _fd_grad(objective, gates)
        assert _rel_err(hg, fd) <= 1e-4
        assert float(np.abs(hg.layer).max()) > 0


def test_unrolled_matches_fd_through_indirect_path_with_rank_gates():
    """Non-zero B and both gate kinds: the indirect (through-training) path carries real signal."""
    with jax.enable_x64(True):
        cfg, params, lora, gates, batches, val = _setup(rank_gates=True, nonzero_b=True)
        opt = optax.adam(5e-2, eps_root=1e-16)
        loss = make_loss_fn(cfg, params)
        state = InnerState(lora, opt.init(lora))
        kb = jax.tree.map(lambda x: x[:3], batches)

        @jax.jit
        def objective(g):
            return loss(unroll(loss, opt, g, state, kb)[0].lora, g, val)

        hg, _, _ = hypergradient("unrolled", loss, loss, opt, gates, state, kb, val)
        direct = jax.grad(lambda g: loss(unroll(loss, opt, jax.lax.stop_gradient(g), state, kb)[0].lora, g, val))(gates)
        assert _rel_err(hg, _fd_grad(objective, gates)) <= 1e-4
        assert _rel_err(hg, direct) > 1e-3  # the unrolled estimator is not just the direct term


def test_forward_mode_equals_reverse_mode_and_remat_and_python_loop():
    with jax.enable_x64(True):
        cfg, params, lora, gates, batches, val = _setup(rank_gates=True, nonzero_b=True)
        opt = optax.adamw(1e-2, eps_root=1e-16)
        loss = make_loss_fn(cfg, params)
        state = InnerState(lora, opt.init(lora))

        def hg(estimator, **kw):  # jitted: op-by-op dispatch of the unrolled scan is slow
            return jax.jit(lambda g, s: hypergradient(estimator, loss, loss, opt, g, s, batches, val, **kw))(
                gates, state
            )

        rev, s_rev, _ = hg("unrolled", unrolled_mode="reverse", remat=True)
        norem, _, _ = hg("unrolled", unrolled_mode="reverse", remat=False)
        mixed, s_mixed, _ = hg("unrolled")  # the default: forward sweep + forward-over-reverse HVPs
        fwd, s_fwd, _ = hg("forward")
        assert _rel_err(norem, rev) < 1e-10
        assert _rel_err(mixed, rev) < 1e-10
        assert _rel_err(fwd, rev) < 1e-10
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), s_mixed.lora, s_rev.lora)

        def python_loop(g):
            s = state
            for i in range(5):
                s, _ = inner_step(loss, opt, g, s, jax.tree.map(lambda x: x[i], batches))
            return loss(s.lora, g, val), s

        (_, s_loop), loop_grad = jax.jit(jax.value_and_grad(python_loop, has_aux=True))(gates)
        assert _rel_err(loop_grad, rev) < 1e-10
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), s_loop.lora, s_rev.lora)


@pytest.mark.parametrize("reset", [False, True])
def test_mixed_mode_equals_reverse_mode_in_float32(reset):
    """The mixed-mode unrolled hypergradient is reverse mode's to 1e-5 in float32: a clipped AdamW chain (integer
    step counters in its state), layer and rank gates, non-zero B, and the reference code's optimizer reset."""
    cfg, params, lora, gates, batches, val = _setup(rank_gates=True, nonzero_b=True)
    cfg = dataclasses.replace(cfg, dtype="float32")
    params, lora, gates, batches, val = jax.tree.map(
        lambda x: x.astype(np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating) else x,
        (params, lora, gates, batches, val),
    )
    loss = make_loss_fn(cfg, params)
    opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(1e-2, eps_root=1e-16))
    state = InnerState(lora, opt.init(lora))
    kb = jax.tree.map(lambda x: x[:3], batches)

    @jax.jit
    def both(g, s):
        return [
            hypergradient("unrolled", loss, loss, opt, g, s, kb, val, reset_optimizer=reset, unrolled_mode=mode)[0]
            for mode in ("mixed", "reverse")
        ]

    mixed, reverse = both(gates, state)
    assert _rel_err(mixed, reverse) < 1e-5
    assert float(np.abs(mixed.layer).max()) > 0 and float(np.abs(mixed.rank["q_proj"]).max()) > 0


def test_first_order_is_the_direct_partial():
    with jax.enable_x64(True):
        cfg, params, lora, gates, batches, val = _setup(nonzero_b=True)
        opt = optax.adamw(1e-2, eps_root=1e-16)
        loss = make_loss_fn(cfg, params)
        state = InnerState(lora, opt.init(lora))
        hg, new_state, _ = hypergradient("first_order", loss, loss, opt, gates, state, batches, val)
        stepped, _ = unroll(loss, opt, gates, state, batches)
        direct = jax.grad(lambda g: loss(stepped.lora, g, val))(gates)
        assert _rel_err(hg, direct) < 1e-12
        jax.tree.map(np.testing.assert_array_equal, new_state.lora, stepped.lora)


def test_darts_exact_matches_finite_differences_of_its_definition():
    with jax.enable_x64(True):
        cfg, params, lora, gates, batches, val = _setup(rank_gates=True, nonzero_b=True)
        loss = make_loss_fn(cfg, params)
        batch = jax.tree.map(lambda x: x[0], batches)
        v = jax.grad(loss)(lora, gates, val)
        exact = darts_implicit(loss, lora, gates, batch, v, "exact")
        # definition: d/dgates <grad_theta L_train(theta, gates), v>
        definition = _fd_grad(
            lambda g: sum(
                jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(jax.grad(loss)(lora, g, batch)), jax.tree.leaves(v))
            ),
            gates,
        )
        assert _rel_err(exact, definition) <= 1e-4
        fd = darts_implicit(loss, lora, gates, batch, v, "finite_difference")  # AutoLoRA's eps = 0.01/||v||
        assert _rel_err(fd, exact) <= 1e-3
        # and the full darts estimator = direct - implicit at theta' = one inner step
        opt = optax.adam(1e-2, eps_root=1e-16)
        state = InnerState(lora, opt.init(lora))
        hg, stepped, _ = hypergradient("darts", loss, loss, opt, gates, state, batches, val)
        v2, direct = jax.grad(loss, argnums=(0, 1))(stepped.lora, gates, val)
        expected = jax.tree.map(lambda d, i: d - i, direct, darts_implicit(loss, stepped.lora, gates, batch, v2))
        assert _rel_err(hg, expected) < 1e-12


def test_adamw_without_eps_root_is_refused_and_with_it_finite():
    """The pitfall: sqrt of a zero second moment with B = 0 makes every hypergradient NaN. The probe in
    ``hypergradient`` refuses such an inner optimizer up front (ConfigError naming eps_root); the same
    optimizer really does give NaN when the probe is skipped."""
    cfg, params, lora, gates, batches, val = _setup()
    loss = make_loss_fn(cfg, params)
    lora32 = jax.tree.map(lambda x: x.astype(jnp.float32), lora)
    gates32 = jax.tree.map(lambda x: x.astype(jnp.float32), gates)
    two = jax.tree.map(lambda x: x[:2], batches)

    def run(opt):
        return jax.jit(lambda g, s: hypergradient("unrolled", loss, loss, opt, g, s, two, val))(  # noqa: B023
            gates32, InnerState(lora32, opt.init(lora32))
        )[0]

    with pytest.raises(fj.ConfigError, match="eps_root"):
        run(optax.adamw(1e-2, eps_root=0.0))
    with pytest.raises(fj.ConfigError, match="eps_root"):
        hypergradient(
            "darts", loss, loss, optax.adam(1e-2), gates32, InnerState(lora32, optax.adam(1e-2).init(lora32)), two, val
        )
    hg = run(optax.adamw(1e-2, eps_root=1e-16))
    assert bool(np.all(np.isfinite(hg.layer)))
    skipped = optax.adamw(1e-2, eps_root=0.0)  # what the probe prevents: NaN, through unroll directly
    state0 = InnerState(lora32, skipped.init(lora32))
    g = jax.grad(lambda g: loss(unroll(loss, skipped, g, state0, two)[0].lora, g, val))(gates32)
    assert not bool(np.all(np.isfinite(g.layer)))


def test_search_step_compiles_once_and_state_carries_on():
    cfg = fj.ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=L, num_attention_heads=2
    )
    params = fj.init_params(cfg, jax.random.key(0), init_std=0.3, head_std=0.5)
    rng = np.random.default_rng(0)
    data = {
        "input_ids": rng.integers(0, 32, (40, 8)).astype(np.int32),
        "attention_mask": np.ones((40, 8), np.int32),
        "loss_mask": np.ones((40, 8), np.float32),
    }
    sc = SearchConfig(inner_steps=2, steps=6, batch_size=4, val_batch_size=4)
    _search_step.cache_clear()
    problem = fj.decoder_problem(cfg, params, fj.LoraConfig(r=2))
    res = fj.search(problem, sc, data, data, seed=0)
    sampler = BatchSampler(data, 4)
    first, twice = problem.for_stage(None), problem.for_stage(sc.hypergradient)  # what fj.search builds
    program = fj.loops.compile_step(
        fj.search_step(first.loss, sc, None, None, twice.loss),
        fj.loops.default_mesh(),
        (problem.base, res.state, sampler.abstract(2), sampler.abstract()),
        {2: 1, 3: 0},
    )
    assert program.fn._cache_size() == 1  # six steps, one compiled program (the loop's, found again)
    assert int(res.state.step) == 6 and len(res.trajectory) == 6
    assert not np.allclose(res.trajectory[0], res.trajectory[-1])
    assert abs(float(np.mean(res.trajectory[-1])) - 1.0) < 1e-5  # L * softmax keeps the mean gate at 1
    # same seed, same gates
    res2 = fj.search(fj.decoder_problem(cfg, params, fj.LoraConfig(r=2)), sc, data, data, seed=0)
    np.testing.assert_array_equal(np.asarray(res.gates.layer), np.asarray(res2.gates.layer))
    assert program.fn._cache_size() == 1  # a second search with the same settings reuses the program
    longer = dataclasses.replace(sc, steps=9)  # only the number of steps changes: the same program
    res3 = fj.search(fj.decoder_problem(cfg, params, fj.LoraConfig(r=2)), longer, data, data, seed=0)
    assert int(res3.state.step) == 9 and program.fn._cache_size() == 1
    assert _search_step.cache_info().currsize == 1
