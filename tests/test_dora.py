"""DoRA against real PEFT (export, import, merged and unmerged), gate equivalences, hypergradient vs FD.

The oracle is ``transformers`` + ``peft`` 0.21 on a tiny random GQA LLaMA with a non-square MLP; every
adapter has non-zero B and a magnitude moved away from its initial norms, so each term matters.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import flexora_jax as fj  # noqa: E402
from flexora_jax import cli  # noqa: E402
from flexora_jax.adapters import export_peft, load_peft  # noqa: E402
from flexora_jax.bilevel import InnerState, hypergradient, make_loss_fn, unroll  # noqa: E402
from flexora_jax.dora import MAGNITUDE  # noqa: E402
from flexora_jax.errors import ConfigError  # noqa: E402
from flexora_jax.gates import Gates  # noqa: E402
from flexora_jax.lora import per_layer_lora  # noqa: E402
from flexora_jax.models.hf import read_safetensors  # noqa: E402
from flexora_jax.models.llama import linear  # noqa: E402

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 7))
_forward = jax.jit(fj.forward, static_argnums=0)
DORA = fj.LoraConfig(
    r=3,
    lora_alpha=6,
    target_modules=("q_proj", "v_proj", "down_proj"),
    layers_to_transform=(0, 2),
    init_lora_weights=False,
    use_dora=True,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(model_dir, config, params) of a tiny random GQA LLaMA saved and loaded back."""
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        max_position_embeddings=64,
    )
    directory = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(hf).save_pretrained(directory)
    config, params = fj.load_model(directory)
    return directory, config, params


def _dora(config, params, lora_config=DORA, seed=1):
    """A DoRA with random B and a magnitude 0.5..1.5 x its initial norms (adapted blocks only)."""
    lora = fj.init_lora(config, lora_config, jax.random.key(seed), params)
    rng = np.random.default_rng(seed)
    weights = {
        m: {**w, MAGNITUDE: w[MAGNITUDE] * rng.uniform(0.5, 1.5, w[MAGNITUDE].shape)} for m, w in lora.weights.items()
    }
    return lora.replace(weights=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), weights))


def _logits(config, params, lora=None, gates=None) -> np.ndarray:
    return np.asarray(_forward(config, params, TOKENS, lora=lora, gates=gates))


def _peft_model(model_dir, adapter_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def test_export_loads_in_peft_unmerged_and_merged(base, tmp_path):
    model_dir, config, params = base
    lora = _dora(config, params)
    ours = _logits(config, params, lora)
    assert np.abs(ours - _logits(config, params)).max() > 100 * TOL  # the adapter matters
    export_peft(lora, tmp_path / "a")
    model = _peft_model(model_dir, tmp_path / "a")
    assert np.abs(_torch_logits(model) - ours).max() < TOL
    merged_peft = _torch_logits(model.merge_and_unload())
    merged_ours = _logits(config, fj.merge(params, lora))
    assert np.abs(merged_peft - ours).max() < TOL
    assert np.abs(merged_ours - ours).max() < TOL
    back = load_peft(tmp_path / "a", config)
    assert (back.spec.use_dora, back.spec.ranks, back.spec.scales) == (True, lora.spec.ranks, lora.spec.scales)
    for m in lora.spec.targets:
        for k in ("a", "b", MAGNITUDE):
            np.testing.assert_array_equal(np.asarray(back.weights[m][k]), np.asarray(lora.weights[m][k]))


def test_peft_dora_adapter_loads_here(base, tmp_path):
    model_dir, config, params = base
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    peft_config = peft.LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[1, 2],
        init_lora_weights=False,
        use_dora=True,
    )
    pm = peft.get_peft_model(model, peft_config).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    pm.save_pretrained(tmp_path / "p")
    expected = _torch_logits(pm)
    lora = load_peft(tmp_path / "p", config)
    assert lora.spec.use_dora and lora.spec.layers == (1, 2)
    assert np.abs(_logits(config, params, lora) - expected).max() < TOL
    assert np.abs(_logits(config, fj.merge(params, lora)) - expected).max() < TOL
    assert np.abs(_torch_logits(pm.merge_and_unload()) - expected).max() < TOL


def test_training_gradient_equals_peft(base, tmp_path):
    """PEFT detaches the weight norm: the gradients of A, B and the magnitude agree with it."""
    model_dir, config, params = base
    lora = _dora(config, params)
    export_peft(lora, tmp_path / "a")
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir)
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "a"), is_trainable=True).eval()
    probe = np.random.default_rng(3).normal(size=(2, 7, 128)).astype(np.float32)
    (pm(torch.tensor(TOKENS)).logits * torch.tensor(probe)).sum().backward()
    grads = jax.grad(lambda lo: jnp.sum(fj.forward(config, params, TOKENS, lora=lo) * probe))(lora)
    named = dict(pm.named_parameters())
    for m, i in [("q_proj", 0), ("down_proj", 2)]:
        path = f"base_model.model.{fj.config.module_path(m, i)}"
        want = {
            "a": named[f"{path}.lora_A.default.weight"].grad.numpy().T,
            "b": named[f"{path}.lora_B.default.weight"].grad.numpy().T,
            MAGNITUDE: named[f"{path}.lora_magnitude_vector.default.weight"].grad.numpy(),
        }
        for k, w in want.items():
            got = np.asarray(grads.weights[m][k][i])
            assert np.abs(got - w).max() <= 1e-3 * np.abs(w).max(), (m, i, k)


def test_gates_all_ones_is_dora_and_zero_is_base(base):
    _, config, params = base
    lora = _dora(config, params)
    ones = Gates(layer=jnp.zeros(3))  # w = L * softmax(0) = 1
    np.testing.assert_allclose(_logits(config, params, lora, ones), _logits(config, params, lora), atol=1e-5)
    off = Gates(layer=jnp.asarray([0.0, 0.0, -jnp.inf]))  # w = (1.5, 1.5, 0): block 2 is the base exactly
    merged = fj.merge(params, lora, off)
    np.testing.assert_array_equal(
        np.asarray(merged["layers"]["q_proj"]["kernel"][2]), np.asarray(params["layers"]["q_proj"]["kernel"][2])
    )
    np.testing.assert_allclose(_logits(config, merged), _logits(config, params, lora, off), atol=1e-4)
    layer = jax.tree.map(lambda x: x[0], params["layers"])
    stacked = per_layer_lora(lora, Gates(layer=jnp.zeros(3)), 3)
    lora_layer = jax.tree.map(lambda x: x[0], stacked)
    lora_layer["q_proj"]["g"] = jnp.zeros(())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 64)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(linear(x, layer, "q_proj", lora_layer, None, 0.0)),
        np.asarray(linear(x, layer, "q_proj", None, None, 0.0)),
    )


def test_unrolled_hypergradient_through_dora_matches_finite_differences():
    with jax.enable_x64(True):
        cfg = fj.ModelConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            dtype="float64",
        )
        params = fj.init_params(cfg, jax.random.key(0), init_std=0.3, head_std=0.5)
        lcfg = fj.LoraConfig(
            r=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"), init_lora_weights=False, use_dora=True
        )
        lora = jax.tree.map(lambda x: x.astype(jnp.float64), _dora(cfg, params, lcfg))
        rng = np.random.default_rng(0)
        gates = Gates(layer=jnp.asarray(rng.normal(0, 0.3, 3)))
        tokens = rng.integers(0, 32, size=(4, 4, 8)).astype(np.int32)
        ones = np.ones(tokens.shape, np.float64)
        batches = {"input_ids": tokens[:3], "attention_mask": ones[:3].astype(np.int32), "loss_mask": ones[:3]}
        val = {"input_ids": tokens[3], "attention_mask": ones[3].astype(np.int32), "loss_mask": ones[3]}
        opt = optax.adam(5e-2, eps_root=1e-16)
        loss = make_loss_fn(cfg, params)
        state = InnerState(lora, opt.init(lora))
        objective = jax.jit(lambda g: loss(unroll(loss, opt, g, state, batches)[0].lora, g, val))
        hg, _, _ = jax.jit(lambda g: hypergradient("unrolled", loss, loss, opt, g, state, batches, val))(gates)
        eps, fd = 1e-5, np.zeros(3)
        for j in range(3):
            step = np.zeros(3)
            step[j] = eps
            fd[j] = (objective(Gates(layer=gates.layer + step)) - objective(Gates(layer=gates.layer - step))) / (
                2 * eps
            )
        assert np.linalg.norm(np.asarray(hg.layer) - fd) <= 1e-4 * np.linalg.norm(fd)
        assert np.abs(fd).max() > 1e-4


def test_bad_configs_are_named(base, tmp_path):
    _, config, params = base
    with pytest.raises(ConfigError, match="pass the base params"):
        fj.init_lora(config, DORA, jax.random.key(0))
    lora = _dora(config, params)
    rank_gates = fj.init_gates("rank", 3, dict(lora.spec.r_max))
    with pytest.raises(ConfigError, match="rank gates"):
        _logits(config, params, lora, rank_gates)
    with pytest.raises(ConfigError, match="DoRA"):
        fj.unmerge(params, lora)
    with pytest.raises(ConfigError, match="gated DoRA"):
        export_peft(lora, tmp_path / "x", gates=Gates(layer=jnp.zeros(3)))
    with pytest.raises(ConfigError, match="use_dora"):
        fj.LoraConfig(use_dora="yes")


def test_count_includes_magnitude(base):
    _, config, params = base
    plain = fj.count_params(config, fj.make_spec(config, dataclasses.replace(DORA, use_dora=False)))["trainable"]
    dora = fj.count_params(config, fj.make_spec(config, DORA))["trainable"]
    assert dora - plain == 2 * (64 + 32 + 64)  # two blocks x (q_proj, v_proj, down_proj) output sizes


def test_dora_methods_run_end_to_end_from_the_command(tmp_path):
    """``flexora-jax run --method=flexora+dora --compare=[dora]`` on the embedded planted task, tiny."""
    out = tmp_path / "run"
    tiny = [
        "--search.steps=4",
        "--search.inner_steps=2",
        "--finetune.max_steps=6",
        "--task.planted.num_layers=4",
        "--task.planted.n_train=64",
        "--task.planted.n_val=32",
        "--task.planted.n_test=32",
        "--task.planted.finetune_examples=32",
        "--checkpoint.every=0",
    ]
    assert (
        cli.main(["run", "--quiet", "--output-dir", str(out), "--method=flexora+dora", "--compare=[dora]", *tiny]) == 0
    )
    chosen = json.loads((out / "selection.json").read_text())
    for method, layers in (("flexora_dora", chosen["layers"]), ("dora", [0, 1, 2, 3])):
        adapter = out / "methods" / method / "adapter"
        assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
        keys = read_safetensors(adapter / "adapter_model.safetensors")
        assert sorted(int(k.split(".")[4]) for k in keys if k.endswith("q_proj.lora_magnitude_vector")) == layers
    assert set(json.loads((out / "compare.json").read_text())) >= {"flexora+dora", "dora"}
    assert cli.main(["run", "--quiet", "--output-dir", str(tmp_path / "bad"), "--lora.use_dora=true", *tiny]) == 2
