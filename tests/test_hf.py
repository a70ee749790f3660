"""HF model directories: config <-> transformers, safetensors in and out (sharded too), and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import chex
import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import flexora_jax as fj
from flexora_jax import sharding as sh
from flexora_jax.config import ModelConfig, RopeScaling
from flexora_jax.errors import CheckpointError, ConfigError
from flexora_jax.models.hf import (
    config_from_hf,
    config_to_hf,
    hf_tensor_names,
    load_model,
    load_model_config,
    save_model,
    weight_files,
)
from flexora_jax.models.llama import init_params


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_config_json(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        fj.load_model(d)


def test_missing_tensor_names_file_and_tensor(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        fj.load_model(d)


def test_misshaped_tensor_names_shapes(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    state = load_file(d / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*up_proj.*\(47, 32\).*\(48, 32\)"):
        fj.load_model(d)


def test_unknown_model_type(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        fj.load_model(d)


def test_pickle_only_checkpoint_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    state = {k: torch.from_numpy(v) for k, v in load_file(d / "model.safetensors").items()}
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle"):
        fj.load_model(d)
    config, params = fj.load_model(d, allow_pickle=True)  # explicit opt-in, weights_only load
    assert params["layers"]["q_proj"]["kernel"].shape == (2, 32, 32)


def test_sharded_index_checkpoint(hf_dir, tmp_path):
    d = tmp_path / "sharded"
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    _, a = fj.load_model(d)
    _, b = fj.load_model(hf_dir)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_hub_id_offline_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local directory"):
        fj.load_model("meta-llama/Llama-3.2-1B")


# ----------------------------------------------------------------------------------- config <-> HF
CONFIGS = {
    "llama3_rope": ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(original_max_position_embeddings=16),
        eos_token_id=3,
    ),
    "qwen2_tied": ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        model_type="qwen2",
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    "mistral_head_dim": ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        model_type="mistral",
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_roundtrips_through_transformers(name):
    config = CONFIGS[name]
    hf_config = config_to_hf(config)
    assert hf_config.model_type == config.model_type
    assert config_from_hf(hf_config) == config
    assert config_from_hf(hf_config, dtype="bfloat16") == dataclasses.replace(config, dtype="bfloat16")


def test_config_from_hf_reads_first_eos_and_refuses_what_it_cannot_run():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    assert config_from_hf(transformers.LlamaConfig(eos_token_id=[7, 9], **base)).eos_token_id == 7
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        config_from_hf(transformers.LlamaConfig(hidden_act="gelu", **base))
    with pytest.raises(ConfigError, match="rope_type 'longrope'"):
        config_from_hf(
            transformers.LlamaConfig(
                rope_parameters=dict(
                    rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 4, long_factor=[1.0] * 4
                ),
                **base,
            )
        )
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        config_from_hf(transformers.GPT2Config())


def test_tensor_names_follow_module_paths():
    names = hf_tensor_names(CONFIGS["qwen2_tied"])
    assert names["model.layers.1.self_attn.k_proj.bias"] == (("layers", "k_proj", "bias"), 1, False)
    assert names["model.layers.0.mlp.down_proj.weight"] == (("layers", "down_proj", "kernel"), 0, True)
    assert "lm_head.weight" not in names and len(names) == 2 + 2 * (2 + 7 + 3)


# ------------------------------------------------------------------------------------ save and load
def test_save_and_load_roundtrip_in_bf16_replaces_a_stale_index(tmp_path):
    config = CONFIGS["qwen2_tied"]
    params = init_params(config, jax.random.key(1))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    save_model(config, params, tmp_path, dtype="bfloat16")
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert load_model_config(tmp_path) == config
    got_config, got = load_model(tmp_path, dtype="bfloat16")
    assert got_config == dataclasses.replace(config, dtype="bfloat16")
    chex.assert_trees_all_equal(got, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params))
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_save_into_a_file_names_the_path(tmp_path):
    config = CONFIGS["qwen2_tied"]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="could not write the model directory .*file"):
        save_model(config, init_params(config, jax.random.key(1)), blocker / "model")


def test_load_model_on_a_mesh_builds_each_param_in_its_sharding(tmp_path):
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    save_model(config, init_params(config, jax.random.key(5)), tmp_path)
    _, want = load_model(tmp_path)
    mesh = sh.make_mesh((2, 2, 2))
    got_config, got = load_model(tmp_path, mesh=mesh)
    assert got_config == config
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want))
    assert got["layers"]["o_proj"]["kernel"].sharding.spec == P(None, "model", "fsdp")
    assert got["embed"].sharding.spec == P("model", "fsdp")
    assert not got["lm_head"].sharding.is_fully_replicated and got["final_norm"].sharding.is_fully_replicated


def test_mesh_loading_of_sharded_index_and_pickle_checkpoints(hf_dir, tmp_path):
    mesh = sh.make_mesh((1, 4, 2))
    _, want = load_model(hf_dir)
    want = jax.tree.map(np.asarray, want)
    d = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(d, max_shard_size="20KB")
    _, got = load_model(d, mesh=mesh)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), want)
    p = tmp_path / "pickle"
    p.mkdir()
    shutil.copy(hf_dir / "config.json", p / "config.json")
    torch.save(
        {k: torch.from_numpy(v) for k, v in load_file(hf_dir / "model.safetensors").items()}, p / "pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(p, mesh=mesh)
    _, got = load_model(p, allow_pickle=True, mesh=mesh)
    assert got["layers"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "model")
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), want)


_CFG = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
}


@pytest.mark.parametrize(
    "content, words",
    [
        ([1, 2], ["holds a JSON list", "object"]),
        (None, ["holds a JSON NoneType"]),
        (b"\xff\xfe{", ["not valid JSON"]),
        ("DIR", ["cannot be read"]),
        (dict(_CFG, hidden_size="64"), ["hidden_size"]),
        (dict(_CFG, num_attention_heads=0), ["config.json"]),
        (dict(_CFG, rope_scaling={"rope_type": "llama3"}), ["rope"]),
    ],
    ids=["list", "null", "not-utf8", "directory", "string-size", "zero-heads", "llama3-no-factors"],
)
def test_malformed_config_json_is_a_checkpoint_error(tmp_path, content, words):
    cfg = tmp_path / "config.json"
    if content == "DIR":
        cfg.mkdir()
    elif isinstance(content, bytes):
        cfg.write_bytes(content)
    else:
        cfg.write_text(json.dumps(content))
    with pytest.raises(CheckpointError) as info:
        load_model_config(tmp_path)
    for word in words:
        assert word in str(info.value)


def test_malformed_index_and_missing_path_are_checkpoint_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_CFG))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(CheckpointError, match="weight_map must map"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="a model path or hub id is needed"):
        load_model(None)
