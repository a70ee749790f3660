"""``flexora_jax.nnx.LlamaForCausalLM``: the built-in decoder as an NNX module over the functional core."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flexora_jax.bilevel import make_loss_fn
from flexora_jax.config import LoraConfig, ModelConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates
from flexora_jax.lora import init_lora, merge
from flexora_jax.models import forward, init_params, save_model
from flexora_jax.nnx import (
    Gate,
    GateLayout,
    LlamaForCausalLM,
    add_lora,
    init_hyperparameters,
    make_loss,
    merge_lora,
    split_for_search,
)

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LORA = LoraConfig(r=2, lora_alpha=4.0, target_modules="all-linear", init_lora_weights=False)


#: One compiled forward per structure for the functional core and for NNX models.
fwd = jax.jit(forward, static_argnums=0)
apply = nnx.jit(lambda model, tokens, mask: model(tokens, mask))


def functional_pytrees(seed: int = 0, lora_config: LoraConfig = LORA) -> tuple[dict, object, Gates]:
    params = init_params(CONFIG, jax.random.key(seed), head_std=0.5)
    lora = init_lora(CONFIG, lora_config, jax.random.key(seed + 1))  # random B: the LoRA branch is live
    rng = np.random.default_rng(seed)
    gates = Gates(
        layer=jnp.asarray(rng.standard_normal(2), jnp.float32),
        rank={m: jnp.asarray(rng.standard_normal((2, 2)), jnp.float32) for m in lora_config.target_modules},
    )
    return params, lora, gates


def batch_with_padding() -> tuple[jax.Array, jax.Array]:
    tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, CONFIG.vocab_size)
    return tokens, jnp.ones((2, 12), jnp.int32).at[1, :4].set(0)


def test_module_equals_functional_forward():
    params, lora, gates = functional_pytrees()
    model = LlamaForCausalLM.from_params(CONFIG, params, lora, gates)
    tokens, mask = batch_with_padding()
    expected = fwd(CONFIG, params, tokens, mask, lora, gates)
    np.testing.assert_array_equal(apply(model, tokens, mask), expected)

    # split by variable type: what trains, what is searched, what is frozen
    graphdef, base, lora_state, gate_state = split_for_search(model)
    assert model.layers.q_proj.lora_a.shape == (2, 32, 2) and model.layers.lora_gate.shape == (2,)
    assert len(jax.tree.leaves(lora_state)) == 14 and len(jax.tree.leaves(gate_state)) == 8
    assert model.layers.q_proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")  # logical
    assert nnx.get_partition_spec(nnx.state(model)).layers.q_proj.kernel.get_value() == P(None, "fsdp", "model")
    np.testing.assert_array_equal(apply(nnx.merge(graphdef, base, lora_state, gate_state), tokens, mask), expected)

    merged = merge_lora(model)
    assert merged is model and model.lora() is None and not jax.tree.leaves(nnx.state(model, Gate))
    jax.tree.map(np.testing.assert_array_equal, model.params(), merge(params, lora, gates))  # fp32 fold


def test_nnx_loss_on_the_decoder_equals_the_functional_loss_and_gradients():
    params, lora, gates = functional_pytrees(1, LoraConfig(r=2, lora_alpha=4.0, init_lora_weights=False))  # q, v
    model = LlamaForCausalLM.from_params(CONFIG, params, lora, gates)
    tokens, mask = batch_with_padding()
    batch = {"input_ids": tokens, "attention_mask": mask, "loss_mask": mask}
    graphdef, base, lora_state, gate_state = split_for_search(model)
    layout = GateLayout.of(gate_state)
    assert layout.layers == (0, 1) and set(layout.sites("rank")) == {"q_proj", "v_proj"}
    neutral = init_hyperparameters(layout, "both")
    assert neutral.layer.shape == (2,) and neutral.rank["q_proj"].shape == (2, 2)
    # the raw gates are this model's hyperparameters (its gate variables hold their multipliers): the NNX
    # loss and the functional loss are one function
    nnx_loss = functools.partial(
        make_loss(graphdef, layout, lambda m, b: m.lm_loss(b)), {"model": base, "gates": gate_state}
    )
    grad = jax.jit(jax.value_and_grad(lambda loss, *a: loss(*a), argnums=(1, 2)), static_argnums=0)
    value_nnx, (dlora_nnx, dgates_nnx) = grad(nnx_loss, lora_state, gates, batch)
    value, (dlora, dgates) = grad(make_loss_fn(CONFIG, params), lora, gates, batch)
    np.testing.assert_allclose(value_nnx, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), dgates_nnx, dgates)
    for m in ("q_proj", "v_proj"):
        for which in ("a", "b"):
            np.testing.assert_allclose(
                dlora_nnx["layers"][m][f"lora_{which}"].get_value(), dlora.weights[m][which], rtol=1e-5, atol=1e-8
            )


def test_from_pretrained_and_bad_input(tmp_path):
    params, _, _ = functional_pytrees(2)
    save_model(CONFIG, params, tmp_path / "tiny")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "tiny", lora_config=LoraConfig(r=2), gates="layer")
    jax.tree.map(np.testing.assert_array_equal, model.params(), params)
    np.testing.assert_array_equal(model.lora().weights["v_proj"]["b"], 0.0)  # fresh LoRA: the base model's output
    assert model.gates().layer.shape == (2,) and model.lora().spec.targets == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match="'layers.q_proj' .*cannot take LoRA"):
        add_lora(model, ("q_proj",), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="need a lora_config"):
        LlamaForCausalLM(CONFIG, gates="layer", rngs=nnx.Rngs(0))


def test_decoder_exports_peft_and_merged_checkpoints_that_transformers_reads(tmp_path):
    """From the NNX decoder: a PEFT adapter (byte-identical to fj.export_peft, gates folded) that peft applies with
    our logits, and a merged HF checkpoint that transformers loads with our logits; the adapter reads back."""
    import peft
    import torch
    import transformers

    from flexora_jax.adapters import export_peft, load_peft
    from flexora_jax.nnx import save_peft

    params, lora, gates = functional_pytrees(3, LoraConfig(r=2, lora_alpha=4.0, init_lora_weights=False))
    save_model(CONFIG, params, tmp_path / "base")
    model = LlamaForCausalLM.from_params(CONFIG, params, lora, Gates(layer=gates.layer))
    tokens, mask = batch_with_padding()
    ours = np.asarray(apply(model, tokens, mask))
    save_peft(model, tmp_path / "nnx_adapter")
    export_peft(lora, tmp_path / "adapter", gates=Gates(layer=gates.layer))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "nnx_adapter" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(hf, str(tmp_path / "nnx_adapter")).eval()
    with torch.no_grad():
        theirs = tuned(torch.tensor(np.asarray(tokens)), attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
    keep = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(theirs[keep], ours[keep], atol=1e-4, rtol=0)
    back = LlamaForCausalLM.from_params(CONFIG, params, load_peft(tmp_path / "nnx_adapter", CONFIG))
    np.testing.assert_allclose(apply(back, tokens, mask), ours, atol=1e-5, rtol=0)

    model.merge_lora()
    save_model(model.config, model.params(), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = merged(torch.tensor(np.asarray(tokens)), attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
    np.testing.assert_allclose(theirs[keep], ours[keep], atol=1e-4, rtol=0)
