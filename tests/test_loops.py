"""The host loop's steps on a mesh of 8 virtual CPU devices equal the single-device run (search, fine-tune,
evaluation), and a sharded checkpoint restores onto another mesh.

Tolerance: fp32, 1e-5 relative. The search uses an SGD inner optimizer: through Adam the first inner
update is nearly ``lr * sign(g)``, whose derivative is ill-conditioned, so the hypergradient (itself
a small difference of per-layer terms) differs by ~1e-4 relative between reduction orders; with SGD
it agrees to ~1e-6.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flexora_jax import loops
from flexora_jax import sharding as sh
from flexora_jax.bilevel import init_search_state, make_search_step
from flexora_jax.checkpoint import restore_sharded, save_sharded
from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig, SearchConfig
from flexora_jax.evaluation import _Pack, _score_packed, pack_rows
from flexora_jax.gates import init_gates
from flexora_jax.lora import init_lora
from flexora_jax.models.llama import init_params
from flexora_jax.train import init_train_state, make_optimizer, make_train_step

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LORA = LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj"), init_lora_weights=False)
SEARCH = SearchConfig(inner_steps=2, batch_size=8, val_batch_size=8, inner_optimizer="sgd", inner_lr=0.1, remat=False)
FINETUNE = FinetuneConfig(batch_size=8, lr=1e-2, schedule="constant", grad_clip=1.0)
TRAIN_STEPS = 3
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]
RTOL = 1e-5


def _batch(rng, shape):
    return {
        "input_ids": rng.integers(0, CONFIG.vocab_size, shape).astype(np.int32),
        "attention_mask": np.ones(shape, np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }


def _search_state():
    gates = init_gates("layer", CONFIG.num_hidden_layers)
    return init_search_state(init_lora(CONFIG, LORA, jax.random.key(1)), gates, SEARCH)


def _train_state():
    return init_train_state(init_lora(CONFIG, LORA, jax.random.key(2)), make_optimizer(FINETUNE, 10), seed=3)


def _score_inputs(rng):
    """Packed scoring rows: 6 examples of 1-3 continuations sharing a prefix, 2 filler rows."""
    packs = []
    for _ in range(6):
        tok = lambda n: rng.integers(0, CONFIG.vocab_size, n).tolist()  # noqa: E731
        conts = [tok(int(rng.integers(1, 4))) for _ in range(int(rng.integers(1, 4)))]
        packs.append(_Pack(tok(int(rng.integers(2, 6))), conts, list(range(len(conts)))))
    return pack_rows(packs, 8, 16, 0)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    params = init_params(CONFIG, jax.random.key(0))
    data = {
        "train": _batch(rng, (SEARCH.inner_steps, 8, 16)),
        "val": _batch(rng, (8, 16)),
        "ft": [_batch(rng, (8, 16)) for _ in range(TRAIN_STEPS)],
        "score": _score_inputs(rng),
    }
    # the reference: the pure steps under a plain jax.jit on the default device
    state, metrics = jax.jit(make_search_step(CONFIG, SEARCH))(params, _search_state(), data["train"], data["val"])
    train_fn, tstate, losses = jax.jit(make_train_step(CONFIG, FINETUNE, 10)), _train_state(), []
    for b in data["ft"]:
        tstate, m = train_fn(params, tstate, b)
        losses.append(float(m["loss"]))
    lora = init_lora(CONFIG, LORA, jax.random.key(4))
    scores = _score_packed(CONFIG, params, lora, None, *map(jax.numpy.asarray, data["score"]))
    ref = {"search_state": state, "search": metrics, "losses": np.asarray(losses), "scores": scores, "lora": lora}
    return params, data, ref


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-30)
    assert np.max(np.abs(a - b)) <= rtol * scale, (a, b)


def _is_sharded(x):
    return x.addressable_shards[0].data.shape != x.shape


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_single_device(setup, shape):
    params, data, ref = setup
    mesh = sh.make_mesh(shape)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3

    # search step: hypergradient, losses, new gates and LoRA
    state = _search_state()
    step = loops.compile_step(
        make_search_step(CONFIG, SEARCH), mesh, (params, state, data["train"], data["val"]), {2: 1, 3: 0}
    )
    sp, state = step.place(params, state)
    new_state, metrics = step(sp, state, step.batch(data["train"], 2), step.batch(data["val"], 3))
    for key in ("val_loss", "train_loss", "hypergrad_norm"):
        _close(metrics[key], ref["search"][key])
    _close(new_state.gates.layer, ref["search_state"].gates.layer)
    for m in LORA.target_modules:
        for ab in ("a", "b"):
            _close(new_state.inner.lora.weights[m][ab], ref["search_state"].inner.lora.weights[m][ab])

    # the layout is really sharded as the rules say
    data_n, fsdp_n, model_n = shape
    kernel = sp["layers"]["q_proj"]["kernel"]
    want = P(None, "fsdp" if fsdp_n > 1 else None, "model" if model_n > 1 else None)
    assert kernel.sharding.spec == _trim(want)
    assert _is_sharded(kernel) == (fsdp_n * model_n > 1)
    assert _is_sharded(sp["layers"]["down_proj"]["kernel"]) == (fsdp_n * model_n > 1)
    lora_a = new_state.inner.lora.weights["q_proj"]["a"]
    assert lora_a.sharding.spec == _trim(P(None, "fsdp" if fsdp_n > 1 else None, None))
    lora_b = new_state.inner.lora.weights["down_proj"]["b"]
    assert lora_b.sharding.spec == _trim(P(None, None, "fsdp" if fsdp_n > 1 else None))
    assert new_state.gates.layer.sharding.is_fully_replicated
    assert metrics["val_loss"].sharding.is_fully_replicated
    train_in = step.in_shardings[2]["input_ids"]
    assert train_in.spec == _trim(P(None, _batch_axes(data_n, fsdp_n)))

    # fine-tune: the loss curve
    tstate = _train_state()
    tstep = loops.compile_step(make_train_step(CONFIG, FINETUNE, 10), mesh, (params, tstate, data["ft"][0]), {2: 0})
    tp, tstate = tstep.place(params, tstate)
    losses = []
    for b in data["ft"]:
        tstate, m = tstep(tp, tstate, tstep.batch(b, 2))
        losses.append(float(m["loss"]))
    _close(losses, ref["losses"])
    if fsdp_n > 1:  # Adam moments follow their LoRA leaves
        mu = [x for x in jax.tree.leaves(tstate.opt_state) if x.shape == lora_a.shape]
        assert mu and all(x.sharding.spec == lora_a.sharding.spec for x in mu)

    # evaluation scores: the jitted scorer follows the sharding of params, LoRA and rows (as evaluate does)
    rows = [sh.global_batch(x, mesh) for x in data["score"]]
    total, greedy = _score_packed(CONFIG, sp, sh.shard(ref["lora"], mesh), None, *rows)
    _close(total, ref["scores"][0])
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(ref["scores"][1]))


def _trim(spec):
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def _batch_axes(data_n, fsdp_n):
    axes = tuple(a for a, n in (("data", data_n), ("fsdp", fsdp_n)) if n > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def test_checkpoint_restores_onto_another_mesh(setup, tmp_path):
    params, data, _ = setup
    mesh_a, mesh_b = sh.make_mesh((2, 2, 2)), sh.make_mesh((1, 8, 1))
    fn = make_train_step(CONFIG, FINETUNE, 10)
    step_a = loops.compile_step(fn, mesh_a, (params, _train_state(), data["ft"][0]), {2: 0})
    step_b = loops.compile_step(fn, mesh_b, (params, _train_state(), data["ft"][0]), {2: 0})
    pa, state = step_a.place(params, _train_state())
    state, _ = step_a(pa, state, step_a.batch(data["ft"][0], 2))
    save_sharded(tmp_path / "ckpt", state)
    restored = restore_sharded(tmp_path / "ckpt", _train_state(), mesh_b)
    q_a = restored.lora.weights["q_proj"]["a"]
    assert q_a.sharding.mesh.shape == mesh_b.shape and q_a.sharding.spec == P(None, "fsdp")
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    pb = step_b.place(params)[0]
    cont_a, ma = step_a(pa, state, step_a.batch(data["ft"][1], 2))
    cont_b, mb = step_b(pb, restored, step_b.batch(data["ft"][1], 2))
    _close(mb["loss"], ma["loss"])
    _close(cont_b.lora.weights["v_proj"]["b"], cont_a.lora.weights["v_proj"]["b"])
    assert int(cont_b.step) == int(cont_a.step) == 2
