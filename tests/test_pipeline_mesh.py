"""``flexora-jax run`` under a device mesh: a (2, 2, 2) run on 8 virtual CPU devices equals a 1-device run.

Both runs are the embedded default (planted task) with tiny overrides, in this process (the test process
has 8 virtual devices, see conftest.py): the 1-device run uses ``mesh.num_devices=1`` (the first device,
the plain single-device code path), the other shards search, fine-tune and evaluation over all 8.

The search keeps the run's default inner optimizer (AdamW). Through Adam the first inner update is
nearly ``lr * sign(g)``, which can amplify reduction-order differences between layouts (that is why
tests/test_sharding.py uses SGD for its single-step 1e-5 check); over this whole run the gates agree to
~1e-7 and the test losses to ~1e-7 relative, well inside the 1e-4 asserted here. Should that ever
flip a selection, add ``--search.inner_optimizer=sgd`` to TINY.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from flexora_jax import pipeline
from flexora_jax import sharding as sh
from flexora_jax.config import MeshConfig
from flexora_jax.errors import ConfigError
from flexora_jax.pipeline.config import RunConfig, load_config
from flexora_jax.pipeline.io import RunLog
from flexora_jax.pipeline.workspace import prepare, run_mesh

# Tiny and compile-light (cold compile dominates: 4 layers, K=2, no compared method): ~25 s warm, ~105 s
# with an empty compile cache on a loaded 2-core machine.
TINY = [
    "--search.steps=6",
    "--search.inner_steps=2",
    "--finetune.max_steps=10",
    "--task.planted.num_layers=4",
    "--task.planted.n_train=64",
    "--task.planted.n_val=32",
    "--task.planted.n_test=32",
    "--task.planted.finetune_examples=32",
    "--compare=[]",
    "--checkpoint.every=0",
]
RTOL = 1e-4


def _run(out: Path, *mesh: str) -> Path:
    config = load_config(None, [*TINY, f"--output_dir={out}", *mesh])
    pipeline.run(config)
    return out


def _close(a, b, where):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_run_on_mesh_equals_single_device(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    assert jax.device_count() == 8
    single = _run(tmp_path / "single", "--mesh.data=1", "--mesh.fsdp=1", "--mesh.model=1", "--mesh.num_devices=1")
    sharded = _run(tmp_path / "sharded", "--mesh.data=2", "--mesh.fsdp=2", "--mesh.model=2")
    read = lambda d, f: json.loads((d / f).read_text())  # noqa: E731
    assert read(single, "selection.json") == read(sharded, "selection.json")
    for f in ("gates.json", "eval.json", "compare.json"):
        _close(read(sharded, f), read(single, f), f)
    # the fine-tune really ran sharded: its logged losses match, step by step
    losses = {d: [r["loss"] for r in RunLog(d).records("finetune_flexora")] for d in (single, sharded)}
    assert len(losses[single]) == 10
    np.testing.assert_allclose(losses[sharded], losses[single], rtol=RTOL)


def test_run_mesh_placement(tmp_path):
    """prepare() puts the base params on the run's mesh (one device: a one-device mesh, the same loop)."""
    ws = prepare(load_config(None, [*TINY, f"--output_dir={tmp_path / 'a'}", "--mesh.fsdp=4", "--mesh.data=2"]))
    assert dict(ws.mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    kernel = ws.params["layers"]["q_proj"]["kernel"]
    assert kernel.sharding.mesh.shape == ws.mesh.shape and not kernel.sharding.is_fully_replicated
    assert run_mesh(RunConfig(mesh=MeshConfig(fsdp=1, num_devices=1))).size == 1
    assert sh.make_mesh(MeshConfig(model=2, num_devices=2)).devices.size == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--mesh.data=3"], r"mesh: sizes data=3, fsdp=-1, model=1 do not fit 8 devices \(jax.device_count\(\)\)"),
        (
            ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.model=1"],
            r"mesh: sizes data=2, fsdp=2, model=1 .*needs 4 devices, but 8 are available",
        ),
        (["--mesh.data=4", "--mesh.fsdp=4"], r"needs 16 devices, but 8 are available"),
        (["--mesh.num_devices=16"], r"mesh.num_devices=16 exceeds the 8 available devices"),
        (["--mesh.fsdp=2", "--mesh.num_devices=4"], r"needs 2 devices, but 4 are available \(mesh.num_devices=4\)"),
    ],
    ids=["not-a-divisor", "too-few", "too-many", "num-devices", "num-devices-mismatch"],
)
def test_mesh_vs_device_count(tmp_path, overrides, match):
    out = tmp_path / "run"
    config = load_config(None, [*TINY, f"--output_dir={out}", *overrides])
    with pytest.raises(ConfigError, match=match):
        pipeline.run(config)
    assert not out.exists()  # refused before the run directory is made


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--mesh.data=-1"], r"mesh: at most one axis may be -1, got data=-1, fsdp=-1, model=1"),
        (["--mesh.model=0"], r"mesh: axis sizes must be positive integers or -1, got mesh.model=0"),
        (["--mesh.fsdp=-4"], r"mesh.fsdp=-4"),
        (["--mesh.num_devices=-1"], r"mesh.num_devices must be an integer >= 0"),
        (["--mesh.tensor=2"], r"unknown key 'mesh.tensor'"),
    ],
)
def test_bad_mesh_sizes(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
    with pytest.raises(ConfigError, match="at most one"):
        MeshConfig(data=-1, model=-1)


def test_mesh_yaml_section_and_reexport(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mesh: {data: 2, fsdp: -1, model: 2}\n")
    config = load_config(f)
    assert config.mesh == MeshConfig(data=2, fsdp=-1, model=2) and config.mesh.resolve(8) == (2, 2, 2)
    assert sh.MeshConfig is MeshConfig
    assert RunConfig().mesh.resolve(1) == (1, 1, 1)  # the default: everything on fsdp
