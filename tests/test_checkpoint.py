"""StageCheckpointer: exact round trips of search and fine-tune states (NamedTuples, static metadata, RNG)."""

from __future__ import annotations

import jax
import numpy as np

from flexora_jax.bilevel import init_search_state
from flexora_jax.checkpoint import StageCheckpointer
from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig, SearchConfig
from flexora_jax.gates import init_gates
from flexora_jax.lora import init_lora
from flexora_jax.train import init_train_state, make_optimizer

MC = ModelConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64)
LC = LoraConfig(r=2, target_modules=("q_proj", "v_proj"))


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _search_state(key):
    lora = init_lora(MC, LC, jax.random.key(key))
    lora = jax.tree.map(lambda x: x + 0.5, lora)  # non-zero B, so a lost leaf shows
    return init_search_state(lora, init_gates("both", 3, dict(lora.spec.r_max)), SearchConfig())


def test_search_state_round_trip(tmp_path):
    state = _search_state(0)
    state = state._replace(step=state.step + 7, gates=jax.tree.map(lambda x: x + 0.25, state.gates))
    ck = StageCheckpointer(tmp_path / "search", every=5)  # a relative-looking path is made absolute
    assert ck.restore(_search_state(1)) is None
    assert ck.save(7, state, {"sampler": {"train": {"seed": 0, "epoch": 1, "position": 48}}}, force=True)
    restored, meta = ck.restore(_search_state(1))
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # NamedTuples stay NamedTuples
    assert _leaves_equal(restored, state)
    assert restored.gates.power == state.gates.power and restored.inner.lora.spec == state.inner.lora.spec
    assert meta["sampler"]["train"]["position"] == 48 and meta["step"] == 7
    ck.close()


def test_train_state_keeps_rng_and_interval(tmp_path):
    lora = init_lora(MC, LC, jax.random.key(0))
    opt = make_optimizer(FinetuneConfig(), 10)
    state = init_train_state(lora, opt, seed=3)
    ck = StageCheckpointer(tmp_path / "ft", every=2, keep=2)
    assert not ck.save(1, state, {})  # not due
    for step in (2, 4, 6):
        assert ck.save(step, state._replace(step=state.step + step), {"k": step})
    assert ck.latest_step() == 6
    restored, meta = ck.restore(init_train_state(lora, opt, seed=9))
    assert meta["k"] == 6 and int(restored.step) == 6
    assert np.array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    assert type(restored.opt_state) is type(state.opt_state)
    ck.close()
