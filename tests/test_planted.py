"""End to end: the search recovers layers planted in a teacher (the test that shows the search works)."""

from __future__ import annotations

import numpy as np
import pytest

import flexora_jax as fj
from flexora_jax.config import SearchConfig
from flexora_jax.engine import search
from flexora_jax.planted import PlantedConfig, make_planted_task
from flexora_jax.problem import decoder_problem

SEEDS = range(5)


@pytest.fixture(scope="module")
def tasks():
    return {seed: make_planted_task(PlantedConfig(seed=seed)) for seed in SEEDS}


def test_planted_task_is_deterministic_and_calibrated(tasks):
    again = make_planted_task(PlantedConfig(seed=0))
    np.testing.assert_array_equal(again.train["target_probs"], tasks[0].train["target_probs"])
    assert tasks[0].planted_layers != tasks[1].planted_layers  # the seed moves the planted layers
    t = tasks[0]
    delta = fj.delta_weights(t.teacher)
    energy = sum(np.sum(np.asarray(d) ** 2, axis=(1, 2)) for d in delta.values())
    assert set(np.flatnonzero(energy > 0)) == set(t.planted_layers)
    assert t.teacher_test_loss < fj.dataset_loss(t.config, t.params, None, t.test)  # teacher beats base


def test_signal_module_and_strength_are_configurable():
    """The planted deltas sit in the named modules only, and each planted layer moves the output by layer_kl."""
    from flexora_jax.planted import _kl_from_base, layer_only

    pc = PlantedConfig(seed=3, targets=("up_proj",), layer_kl=0.1, n_train=8, n_val=8, n_test=8)
    t = make_planted_task(pc)
    assert set(t.teacher.weights) == {"up_proj"} and t.planted_ranks == {"up_proj": 4}
    for layer in range(t.config.num_hidden_layers):
        kl = float(_kl_from_base(t.config, t.params, layer_only(t.teacher, layer), t.train["input_ids"]))
        if layer in t.planted_layers:
            assert 0.05 < kl < 0.2, (layer, kl)  # calibrated on other sequences: close to 0.1, not exact
        else:
            assert kl < 1e-9, (layer, kl)


def test_flexora_unrolled_search_recovers_planted_layers(tasks):
    sc = SearchConfig(hypergradient="unrolled", inner_steps=4, steps=20)
    precision, recall = [], []
    for seed, t in tasks.items():
        res = search(
            decoder_problem(t.config, t.params, fj.LoraConfig(r=4, lora_alpha=4.0), seed=seed),
            sc,
            t.train,
            t.val,
            seed=seed,
        )
        chosen, planted = set(res.selection.layers), set(t.planted_layers)
        precision.append(len(chosen & planted) / len(chosen))
        recall.append(len(chosen & planted) / len(planted))
        # the second check: the gated LoRA energy sits in the planted layers
        delta = fj.delta_weights(res.result, res.gates)
        energy = sum(np.sum(np.asarray(d) ** 2, axis=(1, 2)) for d in delta.values())
        assert energy[list(planted)].sum() / energy.sum() >= 0.5
    assert np.mean(precision) >= 0.8 and np.mean(recall) >= 0.8, (precision, recall)


def test_first_order_search_recovers_planted_layers(tasks):
    sc = SearchConfig(hypergradient="first_order", inner_steps=1, steps=100)
    hits = 0
    for seed in (0, 3):
        t = tasks[seed]
        res = search(
            decoder_problem(t.config, t.params, fj.LoraConfig(r=4, lora_alpha=4.0), seed=seed),
            sc,
            t.train,
            t.val,
            seed=seed,
        )
        hits += set(res.selection.layers) == set(t.planted_layers)
    assert hits == 2


def test_autolora_darts_search_gives_high_rank_modules_higher_ranks():
    """Teacher: rank-8 delta on q_proj, rank-1 on v_proj, in the same planted layers.

    The rank gates of a rank-1 target concentrate on one component while a rank-8 target keeps its
    mass spread, so q_proj must get the higher selected ranks (averaged over seeds and planted
    layers; single seeds are noisy, as the AutoLoRA paper's own rank patterns are).
    """
    sc = SearchConfig(hypergradient="darts", inner_steps=1, steps=40, outer_lr=0.05)
    high, low = [], []
    for seed in range(4):
        t = make_planted_task(PlantedConfig(seed=seed, planted_rank=8, planted_ranks={"q_proj": 8, "v_proj": 1}))
        res = search(
            decoder_problem(t.config, t.params, fj.LoraConfig(r=8, lora_alpha=8.0), seed=seed),
            sc,
            t.train,
            t.val,
            gates="rank",
            seed=seed,
        )
        ranks = res.selection.ranks
        assert all(1 <= r <= 8 for rs in ranks.values() for r in rs)
        high += [ranks["q_proj"][i] for i in t.planted_layers]
        low += [ranks["v_proj"][i] for i in t.planted_layers]
    assert np.mean(high) > np.mean(low), (high, low)
