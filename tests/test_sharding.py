"""Meshes, logical axes and their rules, placement (steps over a mesh: test_loops.py; sharded checkpoints:
test_checkpoint.py)."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flexora_jax import sharding as sh
from flexora_jax.config import ConfigError, LoraConfig, ModelConfig
from flexora_jax.gates import Gates
from flexora_jax.lora import init_lora, lora_axes
from flexora_jax.models.llama import init_params, param_axes
from flexora_jax.models.losses import lm_loss
from flexora_jax.nnx import LlamaForCausalLM

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_indivisible_dims_fall_back_to_replication():
    config = ModelConfig(
        vocab_size=60, hidden_size=36, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8
    )
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    with pytest.warns(UserWarning, match="not divisible"):
        specs = sh.partition_specs(shapes, {"fsdp": 8})
    assert specs["layers"]["q_proj"]["kernel"] == P()  # d = 36 does not divide 8
    assert (
        specs["layers"]["down_proj"]["kernel"] == P(None, None, None) or specs["layers"]["down_proj"]["kernel"] == P()
    )
    assert specs["layers"]["gate_proj"]["kernel"] == P()
    with pytest.warns(UserWarning, match="not divisible"):
        specs = sh.partition_specs(shapes, {"model": 8})
    assert specs["embed"] == P()  # vocab 60
    assert specs["layers"]["up_proj"]["kernel"] == P(None, None, "model")  # f = 64
    mesh = sh.make_mesh((1, 8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placed = sh.shard(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), mesh)
    assert placed["layers"]["q_proj"]["kernel"].sharding.is_fully_replicated
    with pytest.warns(UserWarning, match="batch"):
        assert sh.batch_specs({"x": np.zeros((6, 4))}, mesh)["x"] == P()


def test_mesh_config():
    assert sh.MeshConfig(data=2, fsdp=-1, model=2).resolve(8) == (2, 2, 2)
    assert sh.MeshConfig().resolve(8) == (1, 8, 1)
    assert dict(sh.make_mesh({"model": -1, "fsdp": 1}).shape) == {"data": 1, "fsdp": 1, "model": 8}
    with pytest.raises(ConfigError, match="at most one"):
        sh.MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ConfigError, match="needs 4 devices"):
        sh.MeshConfig(data=2, fsdp=2, model=1).resolve(8)
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        sh.make_mesh({"tensor": 2})


# ------------------------------------------------------------------------------------ logical axes
SIZES = {"data": 1, "fsdp": 2, "model": 2}
COL, ROW = P(None, "fsdp", "model"), P(None, "model", "fsdp")
FAMILIES = {
    "llama_bias": (
        dict(attention_bias=True, attention_out_bias=True, mlp_bias=True),
        {
            **{f"layers/{m}/bias": P(None, "model") for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
            "layers/o_proj/bias": P(None, "fsdp"),
            "layers/down_proj/bias": P(None, "fsdp"),
        },
    ),
    "qwen3": (
        dict(model_type="qwen3", qk_norm=True, tie_word_embeddings=True),
        {"layers/q_norm": P(), "layers/k_norm": P()},
    ),
    "gemma2": (
        dict(model_type="gemma2", hidden_act="gelu_pytorch_tanh"),
        {"layers/pre_feedforward_norm": P(), "layers/post_feedforward_norm": P()},
    ),
    "mixtral": (
        dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
        {
            "layers/w1/kernel": P(None, None, "fsdp", "model"),
            "layers/w3/kernel": P(None, None, "fsdp", "model"),
            "layers/w2/kernel": P(None, None, "model", "fsdp"),
            "layers/router/kernel": P(None, "fsdp"),
        },
    ),
}


def _trim(spec):
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(sh._names(path)): leaf for path, leaf in leaves}


def _expected(config, extra):
    want = {
        "embed": P("model", "fsdp"),
        "final_norm": P(),
        "layers/input_norm": P(),
        "layers/post_attention_norm": P(),
        "layers/q_proj/kernel": COL,
        "layers/k_proj/kernel": COL,
        "layers/v_proj/kernel": COL,
        "layers/o_proj/kernel": ROW,
        **extra,
    }
    if not config.num_local_experts:
        want.update({"layers/gate_proj/kernel": COL, "layers/up_proj/kernel": COL, "layers/down_proj/kernel": ROW})
    if not config.tie_word_embeddings:
        want["lm_head"] = P("fsdp", "model")
    return want


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_params_get_the_expected_specs(family):
    """Each family's params (biases, q/k norms, sandwich norms, Mixtral's experts: no longer replicated) map to the
    table of docs/scaling.md, from the declared names and from the param_axes tree alike."""
    fields, extra = FAMILIES[family]
    config = dataclasses.replace(CONFIG, **fields)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    want = _expected(config, extra)
    assert _flat(sh.partition_specs(shapes, SIZES)) == want
    assert _flat(sh.partition_specs(shapes, SIZES, param_axes(config))) == want
    if config.num_local_experts:
        assert param_axes(config)["layers"]["w1"]["kernel"] == ("layers", "expert", "embed", "mlp")


def test_lora_axes_follow_their_kernels_and_optimizer_moments_follow_the_lora():
    """LoRA A takes its kernel's input axis, B its output axis (experts' too), DoRA's magnitude the output axis;
    Adam's mu / nu take the LoRA's axes by structure, with the decoder's names or with given ones."""
    config = dataclasses.replace(CONFIG, **FAMILIES["mixtral"][0])
    lora = init_lora(config, LoraConfig(r=2, target_modules=("q_proj", "o_proj", "w1", "w2")), jax.random.key(0))
    want = {
        "q_proj/a": P(None, "fsdp"),
        "q_proj/b": P(None, None, "model"),
        "o_proj/a": P(None, "model"),
        "o_proj/b": P(None, None, "fsdp"),
        "w1/a": P(None, None, "fsdp"),
        "w1/b": P(None, None, None, "model"),
        "w2/a": P(None, None, "model"),
        "w2/b": P(None, None, None, "fsdp"),
    }
    assert _flat(sh.partition_specs(lora.weights, SIZES)) == want
    assert _flat(sh.partition_specs(lora.weights, SIZES, lora_axes(lora.spec))) == want
    adam = optax.adam(1e-3).init(lora.weights)
    specs = sh.partition_specs(adam, SIZES, lora_axes(lora.spec))
    assert _flat(specs[0].mu) == want and _flat(specs[0].nu) == want and specs[0].count == P()
    dora = init_lora(
        CONFIG,
        LoraConfig(r=2, target_modules=("o_proj",), use_dora=True),
        jax.random.key(0),
        init_params(CONFIG, jax.random.key(1)),
    )
    assert sh.partition_specs(dora.weights, SIZES)["o_proj"]["magnitude"] == P(None, "fsdp")
    assert lora_axes(dora.spec)["o_proj"]["magnitude"] == ("layers", "embed")

    # a tree of the caller's own, named by a tree of Axes: its optimizer state follows it by structure
    mine = {"w": np.zeros((4, 6), np.float32), "v": np.zeros((6,), np.float32)}
    axes = {"w": sh.Axes("embed", "mlp"), "v": sh.Axes("mlp")}
    state = {"params": mine, "opt": optax.adam(1e-3).init(mine), "step": np.zeros((), np.int32)}
    specs = sh.partition_specs(state, SIZES, axes)
    assert specs["params"] == specs["opt"][0].mu == {"w": P("fsdp", "model"), "v": P("model")}
    assert specs["step"] == P()


def test_an_undeclared_leaf_is_an_error_naming_it():
    """A renamed param, a renamed LoRA leaf, axes of the wrong rank, a logical axis without a rule: ConfigError."""
    shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    layers = dict(shapes["layers"])
    layers["query"] = layers.pop("q_proj")
    with pytest.raises(ConfigError, match="layers/query/kernel"):
        sh.partition_specs({**shapes, "layers": layers}, SIZES)
    with pytest.raises(ConfigError, match="embedding"):
        sh.partition_specs({"embedding": shapes["embed"]}, SIZES)
    with pytest.raises(ConfigError, match="q_proj/A"):
        sh.partition_specs({"q_proj": {"A": np.zeros((2, 32, 4))}}, SIZES)
    with pytest.raises(ConfigError, match="layers/q_proj/kernel.*3 dimensions"):
        sh.leaf_spec(("layers", "q_proj", "kernel"), (32, 32), SIZES)
    with pytest.raises(ConfigError, match="'w'.*2 dimensions"):
        sh.partition_specs({"w": np.zeros((4, 6, 2))}, SIZES, {"w": sh.Axes("embed", "mlp")})
    with pytest.raises(ConfigError, match="'experts'"):
        sh.partition_specs({"w": np.zeros((4, 6))}, SIZES, {"w": sh.Axes("experts", None)})
    # scalars, typed PRNG keys and gates need no declaration
    specs = sh.partition_specs(
        {
            "count": np.zeros(()),
            "rng": jax.random.key(0),
            "gates": Gates(layer=np.zeros(2), rank={"q_proj": np.zeros((2, 4))}),
        },
        SIZES,
    )
    assert specs["count"] == specs["rng"] == specs["gates"].layer == specs["gates"].rank["q_proj"] == P()


def test_the_rules_table_override_changes_the_specs():
    config = dataclasses.replace(CONFIG, **FAMILIES["mixtral"][0])
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    specs = sh.partition_specs(shapes, SIZES, rules={"embed": None, "vocab": "fsdp", "expert": "fsdp"})
    assert specs["embed"] == P("fsdp") and specs["lm_head"] == P(None, "fsdp")
    assert specs["layers"]["q_proj"]["kernel"] == P(None, None, "model")
    assert specs["layers"]["w1"]["kernel"] == P(None, "fsdp", None, "model")
    with sh.axis_rules({"heads": None, "kv_heads": ("fsdp", "model")}), pytest.warns(UserWarning, match="earlier"):
        specs = sh.partition_specs(shapes, {"fsdp": 2, "model": 2})
        assert sh.rules_table()["heads"] is None
    assert specs["layers"]["q_proj"]["kernel"] == P(None, "fsdp")
    assert specs["layers"]["k_proj"]["kernel"] == P(None, "fsdp", "model")  # fsdp taken by embed: model only
    assert sh.rules_table()["heads"] == "model"  # the block's rules are gone after it
    with pytest.warns(UserWarning, match="earlier dimension"):  # expert and mlp both on model
        assert sh.partition_specs(shapes, SIZES, rules={"expert": "model"})["layers"]["w1"]["kernel"] == P(
            None, "model", "fsdp"
        )
    with pytest.raises(ConfigError, match="tensor"):
        sh.rules_table({"embed": "tensor"})


def test_nnx_decoder_variables_carry_the_same_names():
    """fj.nnx.LlamaForCausalLM's params and LoRA hold the logical names and their rules: nnx.get_partition_spec,
    partition_specs of its NNX state and partition_specs of the functional pytrees agree (rules in force when
    built included)."""
    params = init_params(CONFIG, jax.random.key(0))
    lora_config = LoraConfig(r=2, target_modules=("q_proj", "o_proj", "down_proj"), use_dora=True)
    for rules in ({}, {"embed": None, "mlp": "fsdp"}):
        with sh.axis_rules(rules):
            model = LlamaForCausalLM(CONFIG, lora_config, rngs=nnx.Rngs(0), params=params)
            functional = _flat(sh.partition_specs({"params": params, "lora": model.lora().weights}, SIZES))
        state = nnx.state(model)
        assert state["layers"]["o_proj"]["lora_b"].get_metadata()["out_sharding"] == ("layers", "rank", "embed")
        for specs in (nnx.get_partition_spec(state), sh.partition_specs(state, SIZES)):
            got = {
                k.replace("lora_", ""): _trim(v)
                for k, v in _flat(
                    jax.tree.map(lambda v: v.get_value(), specs, is_leaf=lambda x: isinstance(x, nnx.Variable))
                ).items()
            }
            for key, spec in functional.items():
                where = key.split("/", 1)[1] if key.startswith("params/") else "layers/" + key.split("/", 1)[1]
                assert got[where] == spec, (rules, key)


@pytest.fixture(scope="module")
def mixtral():
    """Mixtral's loss and expert-LoRA gradient, its inputs and the one-device result (one compile for both tests)."""
    config = dataclasses.replace(CONFIG, **FAMILIES["mixtral"][0])
    params = init_params(config, jax.random.key(0))
    lora = init_lora(
        config, LoraConfig(r=2, target_modules=("q_proj", "w1", "w2"), init_lora_weights=False), jax.random.key(1)
    )
    tokens = jax.random.randint(jax.random.key(2), (4, 8), 0, config.vocab_size)
    batch = {"input_ids": tokens, "attention_mask": np.ones((4, 8), np.int32), "loss_mask": np.ones((4, 8), np.float32)}

    def loss(p, w, b):
        return lm_loss(config, p, dataclasses.replace(lora, weights=w), None, b)

    fn = jax.value_and_grad(loss, argnums=1)
    return fn, (params, lora.weights, batch), jax.jit(fn)(params, lora.weights, batch)


@pytest.mark.parametrize("rules", [{}, {"expert": "model", "mlp": None}], ids=["default", "expert_parallel"])
def test_sharded_mixtral_experts_and_their_lora_equal_one_device(mixtral, rules):
    """Mixtral's expert kernels and expert LoRA, now sharded (d over fsdp and f over model, or whole experts over
    model), give the one-device loss and LoRA gradient on a (2, 2, 2) mesh."""
    fn, (params, weights, batch), expected = mixtral
    mesh = sh.make_mesh((2, 2, 2))
    p_s, w_s = (sh.shardings(t, mesh, rules=rules) for t in (params, weights))
    assert p_s["layers"]["w1"]["kernel"].spec == (
        P(None, None, "fsdp", "model") if not rules else P(None, "model", "fsdp")
    )
    got = jax.jit(fn, in_shardings=(p_s, w_s, sh.named(sh.batch_specs(batch, mesh), mesh)))(
        sh.put(params, p_s), sh.put(weights, w_s), sh.global_batch(batch, mesh)
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, expected)
