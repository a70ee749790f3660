"""Gates -> layers and ranks, and the fine-tune LoraConfig they produce."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import flexora_jax as fj
from flexora_jax.selection import Selection, select_layers, select_lora, select_ranks


def test_layer_rules():
    g = fj.Gates(layer=jnp.array([0.3, -0.1, 0.0, 1.2, -2.0, 0.05]))
    assert select_layers(g) == (0, 3, 5)  # alpha > 0: above the mean gate
    assert select_layers(g, "top_k", k=2) == (0, 3)
    w = 6 * np.exp(g.layer) / np.exp(g.layer).sum()
    assert select_layers(g, "threshold", threshold=1.5) == tuple(int(i) for i in np.flatnonzero(w >= 1.5))
    assert select_layers(fj.Gates(layer=jnp.zeros(4) - 1.0)) == (0,)  # never empty
    with pytest.raises(fj.ConfigError, match="1 <= k <= 6"):
        select_layers(g, "top_k", k=7)
    with pytest.raises(fj.ConfigError, match="topk"):
        select_layers(g, "topk", k=2)  # one spelling of the rule: top_k


def test_threshold_judges_the_gate_the_model_applies_at_power_3():
    """gates.json and the model use w = (L softmax(alpha)) ** power: the threshold must too."""
    alpha = jnp.array([0.3, -0.1, 0.0, 0.25, -2.0, 0.05])
    g = fj.Gates(layer=alpha, power=3)
    applied = np.asarray(fj.layer_gate_values(g, 6))
    base = 6 * np.exp(alpha) / np.exp(alpha).sum()
    np.testing.assert_allclose(applied, base**3, rtol=1e-5)
    # 1.4 lies between base and base ** 3 for layers 0 and 3: only the applied value keeps them
    assert select_layers(g, "threshold", threshold=1.4) == tuple(int(i) for i in np.flatnonzero(applied >= 1.4))
    assert select_layers(g, "threshold", threshold=1.4) == (0, 3)
    assert select_layers(fj.Gates(layer=alpha, power=1), "threshold", threshold=1.4) == (0,)


def test_non_finite_gates_are_refused():
    with pytest.raises(fj.NumericsError, match="not finite"):
        select_layers(fj.Gates(layer=jnp.array([0.1, jnp.nan, 0.2])))
    with pytest.raises(fj.NumericsError, match="q_proj"):
        select_ranks(fj.Gates(rank={"q_proj": jnp.full((2, 4), jnp.inf)}))


def test_rank_rule_counts_components_above_uniform():
    beta = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.3, 0.3, 0.2, 0.2]]))
    ranks = select_ranks(fj.Gates(rank={"q_proj": beta}))
    assert ranks == {"q_proj": [1, 4, 2]}


def test_select_builds_a_peft_style_lora_config():
    L = 4
    gates = fj.Gates(
        layer=jnp.array([1.0, -1.0, 0.5, -0.5]),
        rank={"q_proj": jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1]] * L)), "v_proj": jnp.zeros((L, 4))},
    )
    base = fj.LoraConfig(r=4, lora_alpha=8.0)
    sel = select_lora(gates, base, L)
    assert sel.layers == (0, 2)
    cfg = sel.lora_config
    assert cfg.layers_to_transform == (0, 2)
    assert cfg.rank_for("q_proj", 0) == 1 and cfg.rank_for("v_proj", 0) == 4
    assert cfg.scale_for("q_proj", 2) == 8.0  # lora_alpha / r_i, as PEFT with rank_pattern
    model = fj.ModelConfig(num_hidden_layers=L)
    lora = fj.init_lora(model, cfg, __import__("jax").random.key(0))
    n = fj.count_params(model, lora)["trainable"]
    info = sel.to_json(n)
    assert {k: info[k] for k in ("layers", "ranks", "trainable_params")} == {
        "layers": [0, 2],
        "ranks": {
            "model.layers.0.self_attn.q_proj": 1,
            "model.layers.2.self_attn.q_proj": 1,
            "model.layers.0.self_attn.v_proj": 4,
            "model.layers.2.self_attn.v_proj": 4,
        },
        "trainable_params": n,
    }
    assert info["modules"] == {"q_proj": [0, 1, 2, 3], "v_proj": [0, 1, 2, 3]}
    assert Selection.from_json(info) == sel  # selection.json reads back whole (decoder kind: PEFT paths)
    assert n == 2 * (1 * (64 + 64) + 4 * (64 + 64))
