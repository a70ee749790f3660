"""YaRN RoPE, Gemma 3 and Mixtral beyond the per-family parity suite of test_families.py (where their logits,
generation, save round trips and mesh loading are checked against transformers): YaRN's frequencies against
transformers' own function, LoRA on Mixtral's experts against peft (both directions, 1e-5), and the refusal of
what is not built, each naming the field or model_type.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_families import BASE, VOCAB, _batch, _hf_logits, _hf_model

import flexora_jax as fj
from flexora_jax.adapters import export_merged, export_peft
from flexora_jax.errors import CheckpointError, ConfigError
from flexora_jax.lora import delta_weights, per_layer_lora
from flexora_jax.models.hf import config_from_hf
from flexora_jax.models.llama import rope_inv_freq, yarn_attention_factor
from flexora_jax.models.moe import moe_mlp

peft = pytest.importorskip("peft")

TOL = 1e-5
_forward = jax.jit(fj.forward, static_argnums=0)


# ---------------------------------------------------------------------------------------------- YaRN
YARN = {
    "defaults": dict(factor=4.0, original_max_position_embeddings=32),
    "betas_no_truncate": dict(
        factor=8.0, original_max_position_embeddings=64, beta_fast=8, beta_slow=2, truncate=False
    ),
    "attention_factor": dict(factor=4.0, original_max_position_embeddings=32, attention_factor=0.7),
    "mscale_ratio": dict(factor=16.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.5),
    "factor_from_lengths": dict(factor=None, original_max_position_embeddings=64),  # 256 / 64
}


@pytest.mark.parametrize("case", sorted(YARN))
def test_yarn_matches_transformers_compute_yarn_parameters(case):
    """Inverse frequencies and the cos / sin scale equal transformers' _compute_yarn_parameters on head_dim 64."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(
        **{**BASE, "hidden_size": 256, "max_position_embeddings": 256},
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, **YARN[case]),
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    config = config_from_hf(hf)
    np.testing.assert_allclose(rope_inv_freq(config), inv_freq.numpy(), rtol=1e-6)
    assert yarn_attention_factor(config.rope_scaling) == pytest.approx(scale, rel=1e-12)


def test_qwen2_yarn_config_json_parity_padded_batch(tmp_path):
    """Qwen2.5's long-context config.json form (a legacy ``rope_scaling`` with ``type: yarn``): transformers'
    logits on a padded batch (full, right- and left-padded rows), positions past the original context."""
    config_hf = transformers.Qwen2Config(
        **BASE, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16)
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_hf).eval()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                **raw,
                "rope_theta": 10000.0,
                "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
            }
        )
    )
    config, params = fj.load_model(tmp_path)
    assert config.rope_scaling.rope_type == "yarn" and config.rope_scaling.factor == 4.0
    tokens, mask, positions = _batch()
    ref = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), tokens, mask, positions)
    out = np.asarray(_forward(config, params, tokens, mask, positions=positions))
    keep = mask.astype(bool)
    diff = np.abs(out[keep] - ref[keep]).max()
    print(f"qwen2_yarn: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    assert (
        np.abs(
            out
            - np.asarray(
                _forward(dataclasses.replace(config, rope_scaling=None), params, tokens, mask, positions=positions)
            )
        )[keep].max()
        > 1e-2
    )


# ------------------------------------------------------------------------------------------- refusals
def test_near_miss_families_are_refused_naming_the_model_type(tmp_path):
    for model_type, why in [("gemma3", "gemma3_text"), ("qwen2_moe", "shared expert"), ("qwen3_moe", "Qwen3-MoE")]:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(CheckpointError, match=f"model_type '{model_type}' is not supported.*{why}"):
            fj.load_model_config(tmp_path)
    with pytest.raises(ConfigError, match="model_type 'qwen2_moe'"):
        config_from_hf(transformers.Qwen2MoeConfig(**BASE))


REFUSED = {
    "router_jitter_noise": (transformers.MixtralConfig, dict(router_jitter_noise=0.1)),
    "output_router_logits": (transformers.MixtralConfig, dict(output_router_logits=True)),
    "sliding_window None with 'sliding_attention'": (
        transformers.Gemma3TextConfig,
        dict(sliding_window=None, layer_types=["sliding_attention", "full_attention"]),
    ),
    r"rope_parameters\['sliding_attention'\]": (
        transformers.Gemma3TextConfig,
        dict(
            rope_parameters={
                "full_attention": dict(rope_type="default", rope_theta=1e6),
                "sliding_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e4),
            }
        ),
    ),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_unbuilt_settings_of_the_new_families_are_refused(what):
    cls, kw = REFUSED[what]
    with pytest.raises(ConfigError, match=what):
        config_from_hf(cls(**{**BASE, **kw}))


def test_gemma3_default_layer_pattern_and_rope_bases():
    """Gemma 3's config: every 6th layer global (sliding_window_pattern), local base 10k, global 1M scaled."""
    config = config_from_hf(
        transformers.Gemma3TextConfig(
            **{**BASE, "num_hidden_layers": 7, "head_dim": 16}, rope_scaling=dict(rope_type="linear", factor=8.0)
        )
    )
    assert config.layer_windows == (4096,) * 5 + (0, 4096)
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling.factor) == (1e6, 1e4, 8.0)
    assert config.qk_norm and config.model_type == "gemma3_text"


# ------------------------------------------------------------------------------------ Mixtral's experts
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(hf_model, model_dir, config, params) of a tiny random Mixtral (4 experts, top-2, window 8)."""
    model = _hf_model("mixtral")
    directory = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(directory)
    return model, directory, *fj.load_model(directory)


TOKENS = np.random.default_rng(3).integers(3, VOCAB, size=(2, 12))
EXPERT_LORA = {
    "attention_and_experts": dict(target_modules=("q_proj", "v_proj", "w1", "w3", "w2")),
    # w1 alone (w3 exported as zeros: PEFT fuses them), ranks differ, one layer of q, rsLoRA, both gates
    "mixed_gated": dict(
        target_modules=("q_proj", "w1", "w2"),
        layers_to_transform=(1,),
        use_rslora=True,
        rank_pattern={"w2": 3, "model.layers.1.self_attn.q_proj": 1},
    ),
}


def _peft_model(directory, adapter):
    """peft's model of ``adapter`` on transformers' Mixtral (peft converts per-expert adapters to its fused experts)."""
    with warnings.catch_warnings():  # peft notes that its fused-expert rank_pattern keys match no *module*
        warnings.filterwarnings("ignore", message=".*gate_up_proj")
        return peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(directory), str(adapter)
        ).eval()


@pytest.mark.parametrize("case", sorted(EXPERT_LORA))
def test_expert_lora_exports_to_peft_and_back(case, mixtral, tmp_path):
    """LoRA on attention + experts: peft (which converts the per-expert adapter to transformers 5's fused experts)
    computes our logits to 1e-5 and load_peft reads back the same update; the merged export (expert kernels with
    their LoRA folded in) computes them in transformers."""
    model, directory, config, params = mixtral
    lora = fj.init_lora(
        config, fj.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **EXPERT_LORA[case]), jax.random.key(1)
    )
    gates = None
    if case == "mixed_gated":
        gates = fj.init_gates("both", config.num_hidden_layers, dict(lora.spec.r_max))
        gates = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), gates)
    ours = np.asarray(_forward(config, params, TOKENS, lora=lora, gates=gates))
    assert np.abs(ours - _hf_logits(model, TOKENS)).max() > 0.1
    export_peft(lora, tmp_path, gates=gates)
    assert {"w1", "w2", "w3"} <= set(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"])
    peft_model = _peft_model(directory, tmp_path)
    np.testing.assert_allclose(_hf_logits(peft_model, TOKENS), ours, atol=TOL, rtol=0)
    back, want = delta_weights(fj.load_peft(tmp_path, config)), delta_weights(lora, gates)
    assert set(back) <= set(want) | {"w3"} and all(not np.asarray(back[m]).any() for m in set(back) - set(want))
    for m in want:
        np.testing.assert_allclose(np.asarray(back[m]), np.asarray(want[m]), atol=1e-6, rtol=0)
    if case == "attention_and_experts":
        export_merged(config, params, lora, tmp_path / "merged")
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        np.testing.assert_allclose(_hf_logits(merged, TOKENS), ours, atol=TOL, rtol=0)


def _legacy_adapter(directory, config, ranks, alphas, r=2, alpha=4, target_modules=("w1", "w2", "w3")):
    """An adapter as peft writes for Mixtral on transformers 4: per-expert lora_A / lora_B of w1 / w2 / w3."""
    torch.manual_seed(4)
    tensors, d, f = {}, config.hidden_size, config.intermediate_size
    for i in range(config.num_hidden_layers):
        for e in range(config.num_local_experts):
            for m, (d_in, d_out) in {"w1": (d, f), "w2": (f, d), "w3": (d, f)}.items():
                if m not in target_modules:
                    continue
                rank = ranks.get((m, i, e), r)
                key = f"base_model.model.model.layers.{i}.block_sparse_moe.experts.{e}.{m}"
                tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(rank, d_in)
                tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(d_out, rank)
    directory.mkdir()
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    pattern = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{m}": v for (m, i, e), v in ranks.items()}
    alpha_pattern = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{m}": v for (m, i, e), v in alphas.items()}
    (directory / "adapter_config.json").write_text(
        json.dumps(
            dict(
                peft_type="LORA",
                task_type="CAUSAL_LM",
                r=r,
                lora_alpha=alpha,
                target_modules=list(target_modules),
                rank_pattern=pattern,
                alpha_pattern=alpha_pattern,
            )
        )
    )
    return tensors


def test_peft_written_expert_adapters_load(mixtral, tmp_path):
    """A per-expert adapter as peft (transformers 4) writes it: our logits equal peft's on transformers 5 (1e-5).
    With ranks / alphas that differ per expert (which peft's conversion cannot express) they equal the base
    model with each expert's W + alpha / r * B A merged in by hand."""
    model, directory, config, params = mixtral
    _legacy_adapter(tmp_path / "uniform", config, {}, {})
    peft_model = _peft_model(directory, tmp_path / "uniform")
    lora = fj.load_peft(tmp_path / "uniform", config)
    np.testing.assert_allclose(
        np.asarray(_forward(config, params, TOKENS, lora=lora)), _hf_logits(peft_model, TOKENS), atol=TOL, rtol=0
    )

    ranks, alphas = {("w1", 0, 1): 3, ("w2", 1, 2): 1}, {("w1", 0, 1): 9.0, ("w3", 1, 0): 1.0}
    tensors = _legacy_adapter(tmp_path / "per_expert", config, ranks, alphas, target_modules=("w1", "w2", "w3"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    f = config.intermediate_size
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for e in range(config.num_local_experts):
                for m, rows in {"w1": slice(0, f), "w3": slice(f, 2 * f), "w2": None}.items():
                    key = f"base_model.model.model.layers.{i}.block_sparse_moe.experts.{e}.{m}"
                    scale = alphas.get((m, i, e), 4) / ranks.get((m, i, e), 2)
                    delta = scale * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
                    if rows is None:
                        layer.mlp.experts.down_proj[e] += delta
                    else:
                        layer.mlp.experts.gate_up_proj[e, rows] += delta
    lora = fj.load_peft(tmp_path / "per_expert", config)
    np.testing.assert_allclose(
        np.asarray(_forward(config, params, TOKENS, lora=lora)), _hf_logits(reference, TOKENS), atol=5e-5, rtol=0
    )  # merged weights vs the LoRA branch: fp32 rounding of a big update


def test_expert_lora_refusals(mixtral, tmp_path):
    """Modules a model lacks, expert LoRA with dropout or DoRA, a PEFT all-linear (it adapts the router) and
    transformers 5's target_parameters layout are refused, naming them."""
    _, _, config, params = mixtral
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match=r"\['gate_proj'\].*mixture of experts.*'w1' \(gate\)"):
        fj.init_lora(config, fj.LoraConfig(target_modules=("q_proj", "gate_proj")), key)
    with pytest.raises(ConfigError, match=r"\['w2'\]: a llama block"):
        fj.init_lora(fj.ModelConfig(), fj.LoraConfig(target_modules=("w2",)), key)
    with pytest.raises(ConfigError, match="experts.*lora_dropout=0.1"):
        fj.init_lora(config, fj.LoraConfig(target_modules=("w1",), lora_dropout=0.1), key)
    with pytest.raises(ConfigError, match="experts.*use_dora=True"):
        fj.init_lora(config, fj.LoraConfig(target_modules=("w2",), use_dora=True), key, params)
    _legacy_adapter(tmp_path / "all_linear", config, {}, {})
    raw = json.loads((tmp_path / "all_linear" / "adapter_config.json").read_text())
    (tmp_path / "all_linear" / "adapter_config.json").write_text(json.dumps({**raw, "target_modules": "all-linear"}))
    with pytest.raises(ConfigError, match=r"all-linear.*router \(block_sparse_moe.gate\)"):
        fj.load_peft(tmp_path / "all_linear", config)
    (tmp_path / "all_linear" / "adapter_config.json").write_text(
        json.dumps({**raw, "target_modules": ["q_proj"], "target_parameters": ["experts.gate_up_proj"]})
    )
    with pytest.raises(ConfigError, match="target_parameters"):
        fj.load_peft(tmp_path / "all_linear", config)


def test_expert_lora_trains_and_counts(mixtral):
    """Expert LoRA gets a gradient through the routed experts (the MoE MLP of a block); its trainable count is
    per expert."""
    _, _, config, params = mixtral
    lora = fj.init_lora(
        config, fj.LoraConfig(r=2, target_modules=("w1", "w2"), init_lora_weights=False), jax.random.key(5)
    )
    layer = jax.tree.map(lambda x: x[0], params["layers"])
    x = jax.random.normal(jax.random.key(6), (2, 5, config.hidden_size))

    def loss(lo):
        lora_layer = jax.tree.map(lambda v: v[0], per_layer_lora(lo, None, config.num_hidden_layers))
        return moe_mlp(config, layer, x, lora_layer, jax.nn.silu).std()

    grads = jax.jit(jax.grad(loss))(lora)
    assert all(np.abs(np.asarray(g)[0]).max() > 0 for g in jax.tree.leaves(grads))
    n, d, f, L = config.num_local_experts, config.hidden_size, config.intermediate_size, config.num_hidden_layers
    assert fj.count_params(config, lora)["trainable"] == 2 * L * n * 2 * (d + f)
