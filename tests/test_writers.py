"""Metric writers as hooks of the one engine: TensorBoard event files read back with TensorBoard's own reader,
a Weights & Biases writer against a recording stand-in of the ``wandb`` module (and the real one offline
when it is installed), on the built-in decoder and a foreign Flax NNX model, through fj.search and
fj.finetune; progress bars from the API."""

from __future__ import annotations

import dataclasses
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from test_engine import FINETUNE, SEARCH, TRAIN, VAL, make

import flexora_jax as fj
from flexora_jax.loops import RunContext
from flexora_jax.writers import TensorBoardWriter, WandbWriter, scalars

QUICK = dataclasses.replace(SEARCH, hypergradient="first_order", inner_steps=1)  # one cheap compile


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of one TensorBoard run directory, as TensorBoard loads it."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = reader.EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class FakeRun:
    """What the writer uses of a ``wandb`` run, recording every call."""

    def __init__(self, **init):
        self.init, self.logged, self.metrics, self.finished = init, [], [], None

    def log(self, data, step=None):
        self.logged.append((dict(data), step))

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def finish(self, exit_code=None):
        self.finished = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module stand-in (the real package is an optional extra): ``init`` returns a FakeRun."""
    module = types.ModuleType("wandb")
    module.run, module.runs = None, []

    def init(**kwargs):
        module.runs.append(FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_scalars_flatten_lists_and_skip_what_is_not_a_metric():
    rec = {
        "step": 3,
        "stage": "x",
        "loss": 1.5,
        "gates": [0.5, 1.5],
        "n": np.float32(2.0),
        "flag": True,
        "note": "text",
        "nested": {"a": 1.0},
    }
    assert scalars(rec) == {"loss": 1.5, "gates/0": 0.5, "gates/1": 1.5, "n": 2.0}


@pytest.mark.parametrize("kind", ["decoder", "foreign"])
def test_writers_on_search_and_finetune(kind, tmp_path, fake_wandb):
    """The same hooks serve the search and the fine-tune of the decoder and of a foreign NNX model: TensorBoard
    reads back every logged value at its step, W&B gets one finished run per stage with the same values."""
    pytest.importorskip("tensorboard")
    tb, wb = TensorBoardWriter(tmp_path / "tb"), WandbWriter(project="p", group="g", mode="offline")
    found = fj.search(make(kind), QUICK, TRAIN, VAL, hooks=[tb, wb], progress=False)
    _, history = fj.finetune(make(kind), TRAIN, FINETUNE, hooks=[tb.stage_hook("finetune_lora"), wb], progress=False)
    search = read_scalars(tmp_path / "tb" / "search")
    assert [s for s, _ in search["train_loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in search["val_loss"]], [h["val_loss"] for h in found.history], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in search["gates/2"]], [t[2] for t in found.trajectory], rtol=1e-6)
    tuned = read_scalars(tmp_path / "tb" / "finetune_lora")
    np.testing.assert_allclose([v for _, v in tuned["loss"]], [h["loss"] for h in history], rtol=1e-6)
    assert [s for s, _ in tuned["grad_norm"]] == [h["step"] for h in history]

    assert [r.init["job_type"] for r in fake_wandb.runs] == ["search", "finetune"]
    assert fake_wandb.runs[0].init["name"] == "g/search" and fake_wandb.runs[0].init["mode"] == "offline"
    assert fake_wandb.runs[0].init["config"]["config"]["steps"] == QUICK.steps  # the stage's settings recorded
    assert all(r.finished == 0 for r in fake_wandb.runs)
    logged = fake_wandb.runs[1].logged
    assert [step for _, step in logged] == [h["step"] for h in history]
    assert [d["loss"] for d, _ in logged] == pytest.approx([h["loss"] for h in history])


def _run(name: str, start: int) -> RunContext:
    return RunContext(SimpleNamespace(name=name), start, None)


def test_a_resumed_stage_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    """An interrupted stage logged steps 1..5 but checkpointed at 2; the resumed one logs 3..5 again:
    TensorBoard shows one value per step, the resumed ones."""
    pytest.importorskip("tensorboard")
    first = TensorBoardWriter(tmp_path)
    first.start(_run("finetune", 0))
    for step in range(1, 6):
        first.step(None, step, None, {"step": step, "loss": float(step)})
    first.close(None, None)
    again = TensorBoardWriter(tmp_path)
    run = _run("finetune", 2)
    again.start(run)
    for step in range(3, 6):
        again.step(run, step, None, {"step": step, "loss": 10.0 * step})
    again.close(run, None)
    assert read_scalars(tmp_path / "finetune")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_wandb_into_a_given_run_uses_a_step_axis_per_stage(fake_wandb):
    given = FakeRun()
    writer = WandbWriter(run=given)
    for name, steps in (("search", 2), ("finetune", 3)):
        run = _run(name, 0)
        writer.start(run)
        for step in range(1, steps + 1):
            writer.step(run, step, None, {"step": step, "loss": 1.0 / step})
        writer.close(run, RuntimeError("stopped") if name == "finetune" else None)
    assert given.metrics[:2] == [("search/step", None), ("search/*", "search/step")]
    assert given.logged[2] == ({"finetune/loss": 1.0, "finetune/step": 1}, None)
    assert given.finished is None and fake_wandb.runs == []  # the caller's run is the caller's to finish


def test_wandb_run_fails_with_its_stage(fake_wandb):
    writer = WandbWriter()
    run = _run("search", 0)
    writer.start(run)
    writer.close(run, RuntimeError("diverged"))
    assert fake_wandb.runs[0].finished == 1


def test_missing_optional_packages_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(fj.ConfigError, match=r"WandbWriter needs the wandb package.*flexora_jax\[wandb\]"):
        WandbWriter()


def test_real_wandb_offline(tmp_path, monkeypatch):
    """The real package, offline: a run directory with the logged history appears."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = WandbWriter(project="flexora-test", dir=tmp_path)
    run = _run("search", 0)
    writer.start(run)
    for step in (1, 2):
        writer.step(run, step, None, {"step": step, "loss": 0.5 * step, "gates": [1.0, 2.0]})
    writer.close(run, None)
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("progress, env, bars", [(True, None, 1), (None, "0", 0), (False, None, 0)])
def test_api_progress_bar_and_its_switch(progress, env, bars, monkeypatch):
    """fj.finetune shows a bar with progress=True (and by default at a terminal), none with FLEXORA_PROGRESS=0."""
    from flexora_jax import engine, hooks

    opened = []
    real = hooks.tqdm
    monkeypatch.setattr(hooks, "tqdm", lambda *a, **k: opened.append(not k.get("disable")) or real(*a, **k))
    monkeypatch.setattr(engine, "_interactive", lambda: True)
    if env is not None:
        monkeypatch.setenv("FLEXORA_PROGRESS", env)
    fj.finetune(make("decoder"), TRAIN, FINETUNE, progress=progress)
    assert sum(opened) == bars


def test_the_run_config_turns_the_writers_on(tmp_path, fake_wandb):
    """`log.tensorboard` / `log.wandb_project` add the writers to every stage of a run, named for the stage."""
    pytest.importorskip("tensorboard")
    from flexora_jax.hooks import Checkpoint, Progress
    from flexora_jax.pipeline.config import LogConfig, RunConfig
    from flexora_jax.pipeline.io import RunLog
    from flexora_jax.pipeline.stages import _stage_hooks

    def hooks(log: LogConfig) -> list:
        ws = SimpleNamespace(config=RunConfig(log=log), run_dir=tmp_path, resume=False, log=RunLog(tmp_path))
        return _stage_hooks(ws, "finetune_lora")

    assert [type(h) for h in hooks(LogConfig())][2:] == [Progress]  # off by default
    checkpoint, _, tb, wb, _ = hooks(LogConfig(tensorboard=True, wandb_project="proj"))
    assert isinstance(checkpoint, Checkpoint) and isinstance(tb, TensorBoardWriter) and isinstance(wb, WandbWriter)
    run = _run("finetune", 0)
    for writer in (tb, wb):
        writer.start(run)
        writer.step(run, 1, None, {"step": 1, "loss": 2.0})
        writer.close(run, None)
    assert read_scalars(tmp_path / "tensorboard" / "finetune_lora")["loss"] == [(1, 2.0)]
    (wandb_run,) = fake_wandb.runs
    assert wandb_run.init["project"] == "proj" and wandb_run.init["job_type"] == "finetune_lora"
    assert wandb_run.init["group"] == tmp_path.name and wandb_run.init["config"]["log"]["wandb_project"] == "proj"
