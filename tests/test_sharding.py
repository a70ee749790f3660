"""Meshes, partition rules and placement (steps over a mesh: test_loops.py; sharded checkpoints: test_checkpoint.py)."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flexora_jax import sharding as sh
from flexora_jax.config import ConfigError, ModelConfig
from flexora_jax.models.llama import init_params

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def test_indivisible_dims_fall_back_to_replication():
    config = ModelConfig(vocab_size=60, hidden_size=36, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, head_dim=8)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    with pytest.warns(UserWarning, match="not divisible"):
        specs = sh.partition_specs(shapes, {"fsdp": 8})
    assert specs["layers"]["q_proj"]["kernel"] == P()  # d = 36 does not divide 8
    assert specs["layers"]["down_proj"]["kernel"] == P(None, None, None) or \
        specs["layers"]["down_proj"]["kernel"] == P()
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
