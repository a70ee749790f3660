"""The bilevel search over NNX states on foreign NNX models: exact hypergradients, every estimator,
planted-layer recovery, selection in the model's own paths."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_nnx_foreign import (
    BLOCK_INDEX,
    SEQ,
    VOCAB,
    ForeignLM,
    StackedLM,
    apply,
    foreign_with_lora,
    randomize_lora,
    soft_loss,
    tokens_and_mask,
)

from flexora_jax.bilevel import InnerState, hypergradient, init_search_state
from flexora_jax.config import SearchConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates
from flexora_jax.nnx import (
    Gate,
    GateLayout,
    add_lora,
    apply_selection,
    gate_state,
    init_hyperparameters,
    make_loss,
    make_split_search_step,
    merge_lora,
    select_paths,
    split_for_search,
    update_model,
)
from flexora_jax.nnx.surgery import count_lora_params, delta_kernel, lora_sites
from flexora_jax.selection import Selection


def soft_batches(n: int, seed: int, lead: tuple[int, ...] = (), dtype=np.float32) -> dict:
    """Random tokens with random soft targets [*lead, n, SEQ, VOCAB] (numpy draws: no compiles)."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((*lead, n, SEQ, VOCAB))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return {
        "tokens": jnp.asarray(rng.integers(0, VOCAB, (*lead, n, SEQ))),
        "targets": jnp.asarray(probs / probs.sum(-1, keepdims=True), dtype),
    }


def perturbed(hyper: Gates, seed: int, scale: float = 0.3) -> Gates:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), hyper)


def test_unrolled_hypergradient_matches_float64_finite_differences():
    with jax.enable_x64(True):
        model = ForeignLM(2, rngs=nnx.Rngs(0))  # built in fp32 (ops already compiled), then widened: no fp64 init
        nnx.update(model, jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), nnx.state(model, nnx.Param)))
        tokens, _ = tokens_and_mask()
        add_lora(
            model,
            ("q", "o", "gate"),
            rank=2,
            gates="both",
            layer_index=BLOCK_INDEX,
            example_inputs=(tokens,),
            rngs=nnx.Rngs(1),
        )
        randomize_lora(model, scale=0.1)
        train, val = soft_batches(4, 0, lead=(2,), dtype=np.float64), soft_batches(4, 5, dtype=np.float64)
        graphdef, base, lora, gates = split_for_search(model)
        layout = GateLayout.of(gates)
        hyper = perturbed(init_hyperparameters(layout, "both"), 3)
        assert hyper.layer.dtype == jnp.float64 and hyper.layer.shape == (2,)
        loss = functools.partial(make_loss(graphdef, layout, soft_loss), {"model": base, "gates": gates})
        opt = optax.adamw(1e-2, eps_root=1e-16)
        # One compiled function: the hypergradient, the state after K inner steps, and the objective
        # L_val(theta_K(h), h) in its metrics (what the finite differences evaluate).
        run = jax.jit(lambda h, s: hypergradient("unrolled", loss, loss, opt, h, s, train, val, remat=False))
        # Warm Adam's moments first (K steps): its very first step is nearly sign(g), smooth only at scales
        # far below any usable finite-difference step.
        _, state, _ = run(hyper, InnerState(lora, opt.init(lora)))
        hg, _, _ = run(hyper, state)
        directions = [
            Gates(layer=jnp.asarray([1.0, 0.0]), rank=jax.tree.map(jnp.zeros_like, hyper.rank)),
            perturbed(jax.tree.map(jnp.zeros_like, hyper), 7, scale=1.0),
        ]
        eps = 1e-5
        for d in directions:
            plus, minus = (jax.tree.map(lambda h, v: h + s * eps * v, hyper, d) for s in (1, -1))
            fd = (run(plus, state)[2]["val_loss"] - run(minus, state)[2]["val_loss"]) / (2 * eps)
            exact = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(hg), jax.tree.leaves(d)))
            assert abs(float(exact) - float(fd)) <= 1e-4 * abs(float(fd)), (float(exact), float(fd))


@pytest.mark.parametrize("estimator", ["darts", "forward"])  # unrolled / first_order: the tests below
def test_every_estimator_runs_compiled_once(estimator):
    model = foreign_with_lora(gates="layer", num_layers=2, targets=("q", "gate"))
    train, val = soft_batches(4, 0, lead=(2,)), soft_batches(4, 1)
    graphdef, base, lora, gates = split_for_search(model)
    search = SearchConfig(hypergradient=estimator, inner_steps=2)
    step = make_split_search_step(graphdef, gates, soft_loss, search)
    state = init_search_state(lora, init_hyperparameters(gates, "layer"), search)
    for _ in range(2):
        state, metrics = step(base, state, train, val)
        assert bool(metrics["finite"]) and float(metrics["hypergrad_norm"]) > 0
    assert step._cache_size() == 1
    assert int(state.step) == 2 and state.gates.layer.shape == (2,)


def test_stacked_model_hypergradient():
    model = StackedLM(rngs=nnx.Rngs(0))
    tokens, _ = tokens_and_mask()
    add_lora(model, ("q", "gate"), rank=2, gates="both", example_inputs=(tokens,), rngs=nnx.Rngs(1))
    train, val = soft_batches(4, 0, lead=(2,)), soft_batches(4, 1)
    graphdef, base, lora, gates = split_for_search(model)
    layout = GateLayout.of(gates)
    assert layout.layers == (0, 1, 2) and set(layout.sites("rank")) == {"layers.attn.q", "layers.mlp.gate"}
    search = SearchConfig(hypergradient="unrolled", inner_steps=2)
    step = make_split_search_step(graphdef, gates, soft_loss, search)
    hyper = init_hyperparameters(layout, "both")
    assert hyper.rank["layers.attn.q"].shape == (3, 2)
    state, metrics = step(base, init_search_state(lora, hyper, search), train, val)
    assert bool(metrics["finite"]) and float(metrics["hypergrad_norm"]) > 0
    values = gate_state(layout, state.gates)
    w = nnx.to_flat_state(values)
    assert all(v.get_value().shape in ((3,), (3, 2)) for _, v in w)


# ------------------------------------------------------------------------------------ planted recovery
PLANTED, LAYERS, STEPS, BATCH = (1, 2), 4, 150, 16


def planted_task(seed: int) -> tuple[nnx.Module, dict, dict]:
    """A student (LoRA on q, v of all layers, layer gates) and data from a teacher with q/v deltas in PLANTED.

    Each planted delta is a random rank-4 matrix scaled to half its kernel's Frobenius norm (equal strength in
    both planted layers); the base has a peaked output head so the change shows in the targets.
    """
    base = ForeignLM(LAYERS, rngs=nnx.Rngs(seed), head_std=0.5)
    teacher = nnx.clone(base)
    add_lora(teacher, ("q", "v"), rank=4, gates=None, layer_index=BLOCK_INDEX, layers=PLANTED, rngs=nnx.Rngs(seed))
    for i, (_, m) in enumerate(sorted(nnx.iter_modules(teacher), key=lambda pm: str(pm[0]))):
        if "lora_site" in vars(m):
            ka, kb = jax.random.split(jax.random.key(1000 * seed + i))
            m.lora_a.set_value(jax.random.normal(ka, m.lora_a.shape))
            m.lora_b.set_value(jax.random.normal(kb, m.lora_b.shape))
            ratio = jnp.linalg.norm(delta_kernel(m)) / jnp.linalg.norm(m.kernel[...])
            m.lora_b.set_value(m.lora_b[...] * 0.5 / ratio)
    merge_lora(teacher)
    tokens = jax.random.randint(jax.random.key(seed + 3), (700, SEQ), 0, VOCAB)
    probs = jax.nn.softmax(jax.jit(lambda m, t: m(t))(teacher, tokens), -1)
    student = add_lora(
        base, ("q", "v"), rank=4, alpha=4.0, gates="layer", layer_index=BLOCK_INDEX, rngs=nnx.Rngs(seed + 4)
    )
    return student, {"tokens": tokens[:500], "targets": probs[:500]}, {"tokens": tokens[500:], "targets": probs[500:]}


def test_planted_layers_recovered_on_five_seeds():
    search = SearchConfig(hypergradient="first_order", inner_steps=1, steps=STEPS, inner_lr=3e-3, outer_lr=0.01)
    step = None
    for seed in range(5):
        student, train, val = planted_task(seed)
        graphdef, base, lora, gates = split_for_search(student)
        step = step or make_split_search_step(graphdef, gates, soft_loss, search)  # one compile for all seeds
        state = init_search_state(lora, init_hyperparameters(gates, "layer"), search)
        rng = np.random.default_rng(seed)
        for _ in range(STEPS):
            t, v = rng.integers(0, 500, (1, BATCH)), rng.integers(0, 200, BATCH)
            state, _ = step(base, state, jax.tree.map(lambda x: x[t], train), jax.tree.map(lambda x: x[v], val))
        selection = select_paths(student, state.gates)
        assert selection.layers == PLANTED, (seed, np.asarray(state.gates.layer))
    assert step._cache_size() == 1

    # the selection in the model's own paths, applied: LoRA on the planted layers only, no gates
    update_model(student, state.inner.lora, state.gates)
    w = LAYERS * jax.nn.softmax(state.gates.layer)
    np.testing.assert_allclose([float(b.attn.v.lora_gate[...]) for b in student.blocks], w, rtol=1e-6)
    apply_selection(student, selection, rngs=nnx.Rngs(0))
    assert sorted(lora_sites(student)) == [f"blocks.{i}.attn.{m}" for i in PLANTED for m in "qv"]
    assert not jax.tree.leaves(nnx.state(student, Gate))
    info = selection.to_json(count_lora_params(student))
    assert info["layers"] == list(PLANTED) and info["trainable_params"] == 2 * 2 * 4 * (32 + 32)
    assert Selection.from_json(info) == selection


# ------------------------------------------------------------------------------------ selection
def test_selection_layers_and_ranks_in_model_paths():
    model = foreign_with_lora(gates="both")
    layout = GateLayout.of(nnx.state(model, Gate))
    hyper = init_hyperparameters(layout, "both")
    beta = hyper.rank["blocks.2.mlp.up"].at[0].set(3.0)  # one dominant component: rank 1
    hyper = Gates(layer=jnp.asarray([0.5, -0.5, 0.2]), rank={**hyper.rank, "blocks.2.mlp.up": beta})
    selection = select_paths(model, hyper)
    assert selection.layers == (0, 2)
    assert selection.ranks["blocks.2.mlp.up"] == (1,) and selection.ranks["blocks.0.attn.q"] == (2,)
    info = selection.to_json()
    assert info["ranks"]["blocks.2.mlp.up"] == 1 and "blocks.1.attn.q" not in info["ranks"]
    assert Selection.from_json(info) == selection

    other = foreign_with_lora(gates="layer", targets=("q", "v"))
    with pytest.raises(ConfigError, match="'blocks.0.attn.k'.*another model"):
        apply_selection(other, selection, rngs=nnx.Rngs(0))

    apply_selection(model, selection, gates="layer", rngs=nnx.Rngs(0))
    sites = lora_sites(model)
    assert len(sites) == 14 and sites["blocks.2.mlp.up"].rank == 1 and sites["blocks.2.mlp.up"].scale == 4.0
    assert model.blocks[2].mlp.up.lora_a.shape == (32, 1)
    with pytest.raises(ConfigError, match="needs rank gates"):
        init_hyperparameters(nnx.state(model, Gate), "rank")


def test_stacked_selection_masks_layers_and_ranks():
    model = StackedLM(rngs=nnx.Rngs(0))
    tokens, mask = tokens_and_mask()
    add_lora(model, ("q",), rank=2, gates="both", rngs=nnx.Rngs(1))
    hyper = Gates(layer=jnp.asarray([1.0, -1.0, 1.0]), rank={"layers.attn.q": jnp.asarray([[3.0, 0.0]] * 3)})
    selection = select_paths(model, hyper)
    assert selection.layers == (0, 2) and selection.ranks == {"layers.attn.q": (1, 0, 1)}
    assert selection.to_json()["ranks"] == {"layers.attn.q[0]": 1, "layers.attn.q[2]": 1}
    apply_selection(model, selection, rngs=nnx.Rngs(2))
    q = model.layers.attn.q
    np.testing.assert_array_equal(q.lora_gate[...], [1.0, 0.0, 1.0])
    assert q.lora_a.shape == (3, 32, 1) and count_lora_params(model) == 2 * 1 * (32 + 32)
    randomize_lora(model)
    with_lora = apply(model, tokens, mask)
    merged = merge_lora(nnx.clone(model))
    np.testing.assert_allclose(apply(merged, tokens, mask), with_lora, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------ mesh
def test_mesh_hypergradient_matches_one_device():
    """Kernels partitioned through NNX metadata on a (2, 2, 2) mesh; LoRA follows; the same hypergradient."""
    mesh = Mesh(
        np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3
    )
    tokens, _ = tokens_and_mask()
    train, val = soft_batches(4, 0, lead=(1,)), soft_batches(4, 1)

    def hypergradient_of(model):
        rng = np.random.default_rng(0)
        for var in jax.tree.leaves(nnx.state(model, nnx.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable)):
            value = var.get_value()
            random = jnp.asarray(0.1 * rng.standard_normal(value.shape), value.dtype)
            var.set_value(jax.device_put(random, value.sharding))  # keeps the LoRA variable's placement
        graphdef, base, lora, gates = split_for_search(model)
        layout = GateLayout.of(gates)
        loss = functools.partial(make_loss(graphdef, layout, soft_loss), {"model": base, "gates": gates})
        opt = optax.adamw(1e-2, eps_root=1e-16)
        hyper = perturbed(init_hyperparameters(layout, "both"), 3)
        run = jax.jit(lambda h, s, t, v: hypergradient("first_order", loss, loss, opt, h, s, t, v)[0])
        return run(hyper, InnerState(lora, opt.init(lora)), train, val)

    with nnx.use_eager_sharding(False):  # annotated, not placed: the same values on one device and on the mesh
        base = ForeignLM(2, rngs=nnx.Rngs(0), partitioned=True)
    lora_kw = dict(rank=2, gates="both", layer_index=BLOCK_INDEX, example_inputs=(tokens,))
    expected = hypergradient_of(add_lora(nnx.clone(base), ("q", "o", "up", "gate"), rngs=nnx.Rngs(1), **lora_kw))
    with jax.set_mesh(mesh):
        state = nnx.state(base)  # place every variable by its NNX metadata (what nnx.get_partition_spec reads)
        nnx.update(
            base,
            jax.tree.map(
                lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), state, nnx.get_partition_spec(state)
            ),
        )
        model = add_lora(base, ("q", "o", "up", "gate"), rngs=nnx.Rngs(1), **lora_kw)
        q, gate = model.blocks[0].attn.q, model.blocks[0].mlp.gate
        assert q.kernel.get_value().sharding.spec == P("model", "fsdp", None)
        assert q.lora_a.get_metadata()["out_sharding"] == ("fsdp", None)  # the kernel's d_in axis, rank replicated
        assert q.lora_b.get_value().sharding.spec == P(None, "model", None)
        assert gate.lora_a.get_value().sharding.spec == P("fsdp", None)
        assert gate.lora_b.get_value().sharding.spec == P(None, "model")
        assert q.lora_gate.get_value().sharding.is_fully_replicated
        train = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(None, ("data", "fsdp")))), train)
        val = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))), val)
        sharded = hypergradient_of(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), sharded, expected)


def test_mesh_search_and_finetune_match_one_device():
    """fj.search and fj.finetune of the foreign model, kernels partitioned through NNX metadata on a (2, 2, 2)
    mesh, end where the one-device runs end (gates, searched LoRA, fine-tuned LoRA to 1e-5 absolute: Adam
    normalises the near-zero gradient entries, so relative agreement there is float noise)."""
    import flexora_jax as fj

    mesh = Mesh(
        np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (48, SEQ))
    logits = 2.0 * rng.standard_normal((48, SEQ, VOCAB))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    data = {
        "input_ids": tokens,
        "tokens": tokens,
        "loss_mask": np.ones((48, SEQ), np.float32),
        "targets": (probs / probs.sum(-1, keepdims=True)).astype(np.float32),
    }
    train, val = {k: v[:32] for k, v in data.items()}, {k: v[32:] for k, v in data.items()}
    sc = SearchConfig(
        hypergradient="unrolled", inner_steps=2, steps=3, inner_lr=1e-2, outer_lr=0.1, batch_size=8, val_batch_size=8
    )
    ft = fj.FinetuneConfig(max_steps=3, batch_size=8, lr=1e-2, warmup_ratio=0.0)
    lora_kw = dict(rank=2, gates="both", layer_index=BLOCK_INDEX, example_inputs=(jnp.asarray(tokens[:2]),))

    def run(model, mesh_or_none):
        found = fj.search(model, sc, train, val, loss_fn=soft_loss, gates="both", mesh=mesh_or_none)
        searched = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
        fj.finetune(model, train, ft, loss_fn=soft_loss, mesh=mesh_or_none)
        return (
            jax.tree.map(np.asarray, found.gates),
            searched,
            jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam)),
        )

    with nnx.use_eager_sharding(False):
        base = ForeignLM(2, rngs=nnx.Rngs(0), partitioned=True)
    expected = run(add_lora(nnx.clone(base), ("q", "o", "up"), rngs=nnx.Rngs(1), **lora_kw), None)
    with jax.set_mesh(mesh):
        state = nnx.state(base)
        nnx.update(
            base,
            jax.tree.map(
                lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), state, nnx.get_partition_spec(state)
            ),
        )
        model = add_lora(base, ("q", "o", "up"), rngs=nnx.Rngs(1), **lora_kw)
        assert model.blocks[0].attn.q.kernel.get_value().sharding.spec == P("model", "fsdp", None)
        sharded = run(model, mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), sharded, expected)
