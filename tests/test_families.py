"""Decoder families against transformers: logits (padded batches), greedy generation, save round trips,
PEFT adapters, and the refusal of every config field or tensor the decoder would not honour.

One tiny random checkpoint per family, written by transformers itself (module-scoped fixture), with
perturbed norms and biases so a dropped or swapped tensor cannot hide.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import flexora_jax as fj
from flexora_jax import sharding as sh
from flexora_jax.adapters import export_peft
from flexora_jax.errors import CheckpointError, ConfigError
from flexora_jax.models.hf import config_from_hf, config_to_hf, save_model

peft = pytest.importorskip("peft")

TOL = 1e-4
VOCAB = 128
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = {
    "llama_bias": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "llama_linear_rope": (
        transformers.LlamaConfig,
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ),
    "llama_dynamic_rope": (
        transformers.LlamaConfig,
        dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    ),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=8)),
    "qwen2_window": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16, tie_word_embeddings=True)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            tie_word_embeddings=True,
            sliding_window=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
        ),
    ),
    "phi3_window": (transformers.Phi3Config, dict(sliding_window=8)),  # fused qkv_proj / gate_up_proj
    # YaRN: the ramp spans dims 0..2 of 8 (beta_fast 4), attention factor 0.1 ln 4 + 1 on cos / sin
    "llama_yarn": (
        transformers.LlamaConfig,
        dict(
            head_dim=16,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=4.0
            ),
        ),
    ),
    # Gemma 3: [sliding, full] layers, local RoPE base 100 on the sliding one, linear scaling on the full one
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            head_dim=16,
            tie_word_embeddings=True,
            sliding_window=8,
            sliding_window_pattern=2,
            query_pre_attn_scalar=24,
            final_logit_softcapping=5.0,
            rope_local_base_freq=100.0,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        ),
    ),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}
_forward = jax.jit(fj.forward, static_argnums=0)


def _hf_model(name: str):
    cls, kw = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**BASE, **kw}))
    with torch.no_grad():  # non-trivial norms and biases
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, hf_model, model_dir, config, params) of one family's random checkpoint."""
    model = _hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    config, params = fj.load_model(directory)
    return request.param, model, directory, config, params


def _batch():
    """40 tokens x 3 rows: full, right-padded, left-padded (with positions counting real tokens only)."""
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=(3, 40))
    mask = np.ones_like(tokens)
    mask[1, 27:] = 0
    mask[2, :11] = 0
    positions = np.where(mask > 0, np.cumsum(mask, axis=-1) - 1, 1)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask=None, positions=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
        return model(torch.tensor(tokens), **kw).logits.numpy()


def test_logit_parity_padded_batch(family):
    name, model, _, config, params = family
    tokens, mask, positions = _batch()
    ref = _hf_logits(model, tokens, mask, positions)
    out = np.asarray(_forward(config, params, tokens, mask, positions=positions))
    keep = mask.astype(bool)
    diff = np.abs(out[keep] - ref[keep]).max()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_nnx_decoder_matches_transformers_and_the_functional_core(family):
    """fj.nnx.LlamaForCausalLM.from_pretrained on each family: transformers' logits (padded batch) to TOL, and
    bitwise the functional core's."""
    name, model, directory, config, params = family
    decoder = fj.nnx.LlamaForCausalLM.from_pretrained(directory)
    tokens, mask, positions = _batch()
    out = np.asarray(decoder(tokens, mask, positions=positions))
    keep = mask.astype(bool)
    assert np.abs(out[keep] - _hf_logits(model, tokens, mask, positions)[keep]).max() <= TOL
    np.testing.assert_array_equal(out, np.asarray(fj.forward(config, params, tokens, mask, positions=positions)))


def test_num_params_counts_what_transformers_counts(family):
    _, model, _, config, params = family
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(params))


def test_greedy_generation_parity(family):
    name, model, _, config, params = family
    prompts = [list(range(5, 19)), list(range(40, 50))]  # 14 and 10 tokens: windows of 8 slide
    new = 6
    ours = fj.generate(config, params, prompts, max_new_tokens=new, max_length=64, eos_token_id=-1).tokens
    width = max(map(len, prompts))
    ids = np.zeros((2, width), np.int64)
    att = np.zeros((2, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], att[i, width - len(p) :] = p, 1
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(att),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert ours == ref[:, width:].tolist(), name


def test_save_roundtrip_reloads_in_transformers(family, tmp_path):
    name, _, _, config, params = family
    save_model(config, params, tmp_path)
    assert fj.load_model_config(tmp_path) == config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens, mask, positions = _batch()
    out = np.asarray(_forward(config, params, tokens, mask, positions=positions))
    keep = mask.astype(bool)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask, positions)[keep], out[keep], atol=TOL, rtol=0)
    _, again = fj.load_model(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize("name", ["gemma", "gemma2", "qwen3", "phi3_window"])
def test_lora_export_loads_in_peft(name, tmp_path):
    model = _hf_model(name)
    model.save_pretrained(tmp_path / "base")
    config, params = fj.load_model(tmp_path / "base")
    lora = fj.init_lora(
        config,
        fj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        jax.random.key(1),
    )
    tokens = np.random.default_rng(1).integers(3, VOCAB, size=(2, 9))
    ours = np.asarray(_forward(config, params, tokens, lora=lora))
    assert np.abs(ours - np.asarray(_forward(config, params, tokens))).max() > 100 * TOL
    if name == "gemma2":  # soft-capping and windows under AD
        grads = jax.grad(lambda l: _forward(config, params, tokens, lora=l).sum())(lora)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    export_peft(lora, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(_hf_logits(peft_model, tokens), ours, atol=TOL, rtol=0)
    back = fj.load_peft(tmp_path / "adapter", config)
    np.testing.assert_allclose(np.asarray(_forward(config, params, tokens, lora=back)), ours, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------- Phi-3's fused names
@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    model = _hf_model("phi3_window")
    directory = tmp_path_factory.mktemp("phi3_base")
    model.save_pretrained(directory)
    return model, directory, *fj.load_model(directory)


@pytest.mark.parametrize("case", ["q_v_subset_gated", "rslora_rank_pattern", "dora_all_parts"])
def test_phi3_lora_exports_under_fused_names(case, phi3, tmp_path):
    """LoRA on q / v (or gate / up) of Phi-3 is PEFT's LoRA on the fused qkv_proj (gate_up_proj): A stacked over
    rank, B block-diagonal with each part's scale folded in; peft computes the same logits and we read it back."""
    model, directory, config, params = phi3
    kw = {
        "q_v_subset_gated": dict(target_modules=("q_proj", "v_proj", "o_proj"), layers_to_transform=(1,)),
        "rslora_rank_pattern": dict(
            target_modules=("q_proj", "up_proj", "down_proj"),
            use_rslora=True,
            rank_pattern={"up_proj": 2},
            alpha_pattern={"model.layers.0.self_attn.q_proj": 3},
        ),
        "dora_all_parts": dict(target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), use_dora=True),
    }[case]
    lora = fj.init_lora(
        config, fj.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw), jax.random.key(3), params
    )
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(4), x.shape), lora)  # DoRA's m too
    gates = None
    if case == "q_v_subset_gated":
        gates = fj.init_gates("layer", config.num_hidden_layers)
        gates = gates.replace(layer=gates.layer.at[1].set(0.7))
    tokens = np.random.default_rng(2).integers(3, VOCAB, size=(2, 20))
    ours = np.asarray(_forward(config, params, tokens, lora=lora, gates=gates))
    export_peft(lora, tmp_path / "adapter", gates=gates)
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    names = {t.rsplit(".", 1)[-1] for t in raw["target_modules"]}
    assert names & {"qkv_proj", "gate_up_proj"} and not names & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    peft_model = peft.PeftModel.from_pretrained(_hf_model("phi3_window"), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(_hf_logits(peft_model, tokens), ours, atol=TOL, rtol=0)
    back = fj.load_peft(tmp_path / "adapter", config)
    np.testing.assert_allclose(np.asarray(_forward(config, params, tokens, lora=back)), ours, atol=TOL, rtol=0)


def test_phi3_peft_native_adapters_load(phi3, tmp_path):
    """Adapters peft itself writes on Phi-3 (qkv_proj, gate_up_proj; LoRA and DoRA) load with peft's logits; a
    DoRA on only some parts of a fused projection is refused at export, naming them."""
    model, directory, config, params = phi3
    tokens = np.random.default_rng(5).integers(3, VOCAB, size=(2, 20))
    for use_dora in (False, True):
        torch.manual_seed(1)
        pm = peft.get_peft_model(
            _hf_model("phi3_window"),
            peft.LoraConfig(
                r=4,
                lora_alpha=6,
                target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                init_lora_weights=False,
                use_dora=use_dora,
                layers_to_transform=[0] if use_dora else None,
            ),
        ).eval()
        pm.save_pretrained(tmp_path / f"native{use_dora}")
        lora = fj.load_peft(tmp_path / f"native{use_dora}", config)
        np.testing.assert_allclose(
            np.asarray(_forward(config, params, tokens, lora=lora)), _hf_logits(pm, tokens), atol=TOL, rtol=0
        )
    partial = fj.init_lora(
        config, fj.LoraConfig(r=2, target_modules=("q_proj",), use_dora=True), jax.random.key(0), params
    )
    with pytest.raises(ConfigError, match=r"fused qkv_proj"):
        export_peft(partial, tmp_path / "partial")


# ----------------------------------------------------------------------------------- config <-> HF
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_config_roundtrips_through_transformers(name):
    cls, kw = FAMILIES[name]
    config = config_from_hf(cls(**{**BASE, **kw}))
    assert config_from_hf(config_to_hf(config)) == config


def test_family_traits_read_from_hf_configs():
    qwen2 = config_from_hf(
        transformers.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    )
    assert qwen2.layer_windows == (0, 8) and qwen2.attention_bias and not qwen2.attention_out_bias
    assert config_from_hf(transformers.Qwen2Config(**BASE, sliding_window=8)).sliding_window is None
    assert config_from_hf(transformers.MistralConfig(**BASE, sliding_window=8)).layer_windows == (8, 8)
    gemma2 = config_from_hf(transformers.Gemma2Config(**BASE, head_dim=16))
    assert gemma2.layer_windows == (4096, 0) and gemma2.hidden_act == "gelu_pytorch_tanh"
    llama = config_from_hf(transformers.LlamaConfig(**BASE, attention_bias=True))
    assert llama.bias_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------------------ refusals
REFUSED = {
    "rope_type 'longrope'": (
        transformers.Phi3Config,
        dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 4, long_factor=[1.0] * 4)),
    ),
    "partial_rotary_factor": (
        transformers.LlamaConfig,
        dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
    ),
    "hidden_act 'relu'": (transformers.MistralConfig, dict(hidden_act="relu")),
    "use_bidirectional_attention": (transformers.GemmaConfig, dict(use_bidirectional_attention=True)),
    "layer_types .*chunked_attention": (
        transformers.Qwen3Config,
        dict(use_sliding_window=True, sliding_window=8, layer_types=["chunked_attention", "full_attention"]),
    ),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_unimplemented_config_fields_are_refused(what):
    cls, kw = REFUSED[what]
    with pytest.raises(ConfigError, match=what):
        config_from_hf(cls(**{**BASE, **kw}))


@pytest.mark.parametrize("model_type", ["olmo", "gpt_neox"])
def test_unsupported_families_are_refused_by_name(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **BASE}))
    with pytest.raises(CheckpointError, match=f"model_type '{model_type}'"):
        fj.load_model(tmp_path)


def test_unused_checkpoint_tensors_are_refused_by_name(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "attention_bias": True}))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "attention_bias": False}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias"):
        fj.load_model(tmp_path)


def test_tied_head_copy_and_rope_buffers_are_accepted(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "tie_word_embeddings": True}))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(state, tmp_path / "model.safetensors")
    fj.load_model(tmp_path)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0  # an untied head under a tied config
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        fj.load_model(tmp_path)


TRAIT_OFF = {
    "llama_linear_rope": dict(rope_scaling=None),
    "llama_dynamic_rope": dict(rope_scaling=None),
    "llama_yarn": dict(rope_scaling=None),
    "gemma3": dict(rope_local_theta=None),
    "mixtral": dict(num_experts_per_tok=1),
    "mistral_window": dict(sliding_window=None),
    "qwen2_window": dict(sliding_window=None),
    "phi3_window": dict(sliding_window=None),
    "qwen3": dict(qk_norm=False),
    "gemma": dict(model_type="llama", hidden_act="silu"),
    "gemma2": dict(
        sliding_window=None, attn_logit_softcapping=None, final_logit_softcapping=None, query_pre_attn_scalar=None
    ),
}


def test_each_family_trait_changes_the_logits(family):
    """Parity is not vacuous: switching the family's trait off moves the logits far past the tolerance."""
    name, _, _, config, params = family
    tokens, mask, positions = _batch()
    off_config, off_params = dataclasses.replace(config, **TRAIT_OFF.get(name, {})), params
    if name == "llama_bias":
        off_params = {
            **params,
            "layers": {k: ({"kernel": v["kernel"]} if isinstance(v, dict) else v) for k, v in params["layers"].items()},
        }
    on = np.asarray(_forward(config, params, tokens, mask, positions=positions))
    off = np.asarray(_forward(off_config, off_params, tokens, mask, positions=positions))
    assert np.abs(on - off)[mask.astype(bool)].max() > 100 * TOL


def test_family_params_get_partition_specs(family):
    """New leaves (biases, q/k norms, sandwich norms) fit the sharding rules: kernels' biases follow their
    output axis, norms are replicated."""
    _, _, _, config, params = family
    specs = sh.partition_specs(params, {"data": 1, "fsdp": 2, "model": 2})
    for name, leaf in specs["layers"].items():
        if isinstance(leaf, dict) and "bias" in leaf:
            assert leaf["bias"] == sh.P(None, leaf["kernel"][-1]), name  # the kernel's output axis
        elif not isinstance(leaf, dict):
            assert leaf == sh.P(), name


def test_family_loads_onto_a_mesh(family):
    """Mesh loading reads every param as device blocks: Phi-3's fused rows and Gemma's norm offsets too."""
    _, _, directory, _, params = family
    _, got = fj.load_model(directory, mesh=sh.make_mesh((2, 2, 2)))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), params)


def test_load_model_refuses_an_unimplemented_field_as_a_checkpoint_error(tmp_path):
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 4, long_factor=[1.0] * 4)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*rope_type 'longrope'"):
        fj.load_model(tmp_path)
