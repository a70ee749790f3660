"""The run directory has one owner (pipeline/rundir.py): unusable paths, foreign files, concurrent runs, a
full disk, a read-only place, a damaged run on resume, the config identity (path spelling, mesh). Every
case: status 2 or a FlexoraError naming the problem, no traceback, nothing pre-existing changed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexora_jax import cli
from flexora_jax import sharding as sh
from flexora_jax.config import MeshConfig
from flexora_jax.errors import ConfigError, FlexoraError
from flexora_jax.pipeline.config import RunConfig, load_config, save_config
from flexora_jax.pipeline.io import RunLog
from flexora_jax.pipeline.rundir import LOCK_FILE, RunDir
from flexora_jax.pipeline.workspace import MESH_FILE, _check_same_run

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--compare=[]",
    "--task.planted.num_layers=2",
    "--task.planted.num_planted=1",
    "--task.planted.n_train=32",
    "--task.planted.n_val=16",
    "--task.planted.n_test=16",
    "--task.planted.finetune_examples=16",
    "--search.steps=2",
    "--finetune.max_steps=2",
    "--checkpoint.every=1",
    "--eval.base=false",
    "--mesh.num_devices=1",
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _fails(argv: list[str], capsys, *keywords: str) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and err.startswith("flexora-jax: error:"), err
    for word in keywords:
        assert word in err, f"{word!r} not in: {err}"
    return err


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A directory that holds a run's config (enough for the identity and damage checks)."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, [f"--output_dir={run}", *TINY]), run / "config.yaml")
    return run


def test_output_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    _fails(["run", "--output-dir", str(f), *TINY], capsys, str(f), "is an existing file")
    _fails(["run", "--output-dir", str(f / "run"), *TINY], capsys, "lies under", str(f), "is a file")
    assert f.read_text() == "mine\n"


def test_a_fresh_run_never_writes_into_a_foreign_non_empty_directory(tmp_path, capsys):
    d = tmp_path / "mine"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "notes.txt").write_text("keep me\n")
    (d / "report.md").write_text("my report\n")
    before = _snapshot(d)
    _fails(["run", "--output-dir", str(d), *TINY], capsys, "is not empty", "adapter", "report.md", "holds no")
    assert _snapshot(d) == before and not (d / LOCK_FILE).exists()


def test_a_failed_fresh_run_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    _fails(
        ["run", "--output-dir", str(out), *TINY, "--search.batch_size=999"],
        capsys,
        "search.batch_size 999",
        "32 search training examples",
    )
    assert not out.exists()


def test_the_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir()
        (run / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "now"}))
        _fails(["run", "--output-dir", str(run), *TINY], capsys, "in use by process", str(holder.pid))
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # the holder's lock stays
    finally:
        holder.kill()
        holder.wait()
    rd = RunDir(run)
    rd.claim()  # the holder is gone: its lock is taken over
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    rd.release()
    assert not (run / LOCK_FILE).exists()


def test_two_runs_at_once_one_is_refused(tmp_path):
    """Two real processes start a run in the same directory: exactly one runs, the other exits 2 naming it."""
    run = tmp_path / "run"
    env = dict(os.environ, FLEXORA_PROGRESS="0", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    argv = [
        sys.executable,
        "-m",
        "flexora_jax.cli",
        "run",
        "--quiet",
        "--output-dir",
        str(run),
        *TINY,
        "--search.steps=30",
    ]
    first = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / LOCK_FILE).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert "in use by process" in " ".join(second.stderr.split()) or "already holds a run" in second.stderr
    steps = [r["step"] for r in RunLog(run).records("search_layer") if "event" not in r]
    assert steps == list(range(1, 31))  # one writer: no interleaved log


def test_identity_ignores_how_the_path_is_spelled_and_where_it_lives(finished_run, tmp_path, monkeypatch):
    mesh = sh.make_mesh(MeshConfig(num_devices=1))
    monkeypatch.chdir(finished_run.parent)
    for spelling in (f"{finished_run}/", "run", "./run//"):
        config = load_config(None, [f"--output_dir={spelling}", *TINY])
        _check_same_run(config, RunDir(spelling), resume=True, stage="run", mesh=mesh)
    moved = tmp_path / "moved"
    finished_run.rename(moved)
    _check_same_run(load_config(None, [f"--output_dir={moved}", *TINY]), RunDir(moved), True, "run", mesh)


def test_a_resume_on_another_mesh_is_refused_with_the_reason(finished_run):
    (finished_run / MESH_FILE).write_text(json.dumps({"data": 1, "fsdp": 2, "model": 1}))
    config = load_config(None, [f"--output_dir={finished_run}", *TINY])
    with pytest.raises(ConfigError, match=r"started on mesh .*'fsdp': 2.*--mesh.fsdp=2"):
        _check_same_run(config, RunDir(finished_run), True, "run", sh.make_mesh(MeshConfig(num_devices=1)))
    # evaluate / export read finished files: any mesh will do
    _check_same_run(config, RunDir(finished_run), False, "evaluate", sh.make_mesh(MeshConfig(num_devices=1)))


@pytest.mark.parametrize("damage", ["random_bytes", "empty", "not_a_mapping"])
def test_a_damaged_run_config_is_named(finished_run, damage, capsys):
    cfg = finished_run / "config.yaml"
    cfg.write_bytes(
        {"random_bytes": os.urandom(256) + b"\xff\xfe", "empty": b"", "not_a_mapping": b"- 1\n- 2\n"}[damage]
    )
    before = _snapshot(finished_run)
    _fails(["run", "--resume", "--output-dir", str(finished_run), *TINY], capsys, "config.yaml")
    assert _snapshot(finished_run) == before


def test_the_run_log_survives_damaged_lines(tmp_path):
    log = RunLog(tmp_path)
    log.path.write_bytes(
        b'{"stage": "s", "step": 1}\n[1, 2]\n"text"\n{"stage": "s", "step": "x"}\n\xff\xfe{bad\n'
        b'{"stage": "s", "step": 2}\n{"stage": "s", "step": 3}\n'
    )
    assert [r.get("step") for r in log.records("s")] == [1, "x", 2, 3]
    log.truncate("s", 2)
    assert [r.get("step") for r in log.records("s")] == [1, "x", 2]


@pytest.fixture
def read_only_dir(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    dst.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(dst)], capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs mount privileges (root); not available here")
    yield dst
    subprocess.run(["umount", str(dst)], check=False)


def test_a_read_only_place_is_refused_before_anything_runs(read_only_dir, capsys):
    _fails(["run", "--output-dir", str(read_only_dir / "run"), *TINY], capsys, str(read_only_dir), "read-only")


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("a small tmpfs needs mount privileges (root); not available here")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_a_full_disk_is_a_clear_error_and_keeps_what_was_written(small_disk, capsys, monkeypatch):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    keep = small_disk / "keep.txt"
    keep.write_text("mine\n")
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * 40_000)  # leave a few KB: enough for the config, not for a checkpoint
    err = _fails(["run", "--quiet", "--output-dir", str(small_disk / "run"), *TINY], capsys)
    assert "no space left" in err or "could not save checkpoint" in err, err
    assert keep.read_text() == "mine\n"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        [
            "seed",
            "lora.r",
            "lora.target_modules",
            "lora.layers_to_transform",
            "lora.rank_pattern",
            "search.steps",
            "search.outer_b1",
            "finetune.epochs",
            "selection.rule",
            "selection.top_k",
            "mesh.fsdp",
            "task.name",
            "eval.limit",
            "output_dir",
            "bogus.key",
        ]
    ),
    value=st.one_of(
        st.integers(-(10**12), 10**12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.lists(st.integers(-3, 40), max_size=4),
    ),
)
def test_fuzzed_command_lines_end_in_status_2_and_create_nothing(key, value, tmp_path_factory, capsys):
    """A stage command on a directory without a run, with any override: status 2, one paragraph, nothing made."""
    root = tmp_path_factory.mktemp("fuzz")
    out = root / "nothing-here"
    capsys.readouterr()
    status = cli.main(["evaluate", "--output-dir", str(out), f"--{key}={json.dumps(value)}"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and err.startswith("flexora-jax: error:"), err
    assert not out.exists() and list(root.iterdir()) == []


def test_every_refusal_is_a_flexora_error(tmp_path):
    RunDir(tmp_path / "new").check_fresh("config.yaml")  # a new directory is fine
    with pytest.raises(FlexoraError, match="is an existing file"):
        RunDir(__file__).check_usable()
    with pytest.raises(ConfigError, match="seed"):
        RunConfig(seed=-1)


def test_a_step_far_beyond_the_device_memory_is_refused_before_it_runs(monkeypatch):
    """Without the planner check such a step aborts inside XLA (exit 134, no message)."""
    import numpy as np

    from flexora_jax.config import ModelConfig
    from flexora_jax.pipeline import workspace

    big = ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        dtype="bfloat16",
        remat_layers=True,
    )
    config = load_config(None, ["--task.name=piqa", "--model.path=/m", "--search.batch_size=16"])
    data = workspace.TaskData(train={"input_ids": np.zeros((32, 2048), np.int32)}, val={}, finetune={}, test={})
    mesh = sh.make_mesh(MeshConfig(num_devices=1))
    monkeypatch.setattr(workspace, "device_memory_bytes", lambda: 16 * 2**30)
    with pytest.raises(ConfigError, match=r"the search step needs about .* GiB per device .* 16.0 GiB"):
        workspace._validate_memory(config, big, data, mesh)
    monkeypatch.setattr(workspace, "device_memory_bytes", lambda: 2**40)  # a terabyte: fits
    workspace._validate_memory(config, big, data, mesh)
