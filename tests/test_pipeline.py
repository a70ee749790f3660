"""The pipeline: a run killed with SIGKILL mid-search and mid-fine-tune, resumed, equals an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flexora_jax import pipeline
from flexora_jax.config import RunConfig, load_config
from flexora_jax.errors import ConfigError
from flexora_jax.selection import Selection

REPO = Path(__file__).resolve().parents[1]
# A shorter version of the embedded default: still searches, selects and fine-tunes.
SMALL = ["--compare=[]", "--search.steps=9", "--finetune.max_steps=90", "--checkpoint.every=3"]


def _env() -> dict[str, str]:
    env = dict(os.environ, FLEXORA_PROGRESS="0", HF_HUB_OFFLINE="1",
               JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexora_jax.cli", "run", "--quiet", "--output-dir", str(out),
                             *SMALL, *extra], env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, metrics: Path, stage: str, step: int, timeout: float = 150.0) -> None:
    """SIGKILL ``proc`` as soon as ``metrics.jsonl`` shows ``stage`` at ``step`` (or later)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {stage} step {step}: {proc.stdout.read().decode()[-2000:]}")
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("stage") == stage and rec.get("step", 0) >= step:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{stage} never reached step {step}")


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_sigkill_mid_search_and_mid_finetune_then_resume_is_identical(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    reference = pipeline.run(load_config(overrides=SMALL + [f"--output_dir={ref_dir}"]))
    assert reference.selections["flexora"].layers == tuple(reference.planted["layers"])

    _kill_when(_cli(cut_dir), cut_dir / "metrics.jsonl", "search_layer", 5)
    assert not (cut_dir / "searches" / "layer" / "gates.json").exists()  # killed mid-search
    _kill_when(_cli(cut_dir, "--resume"), cut_dir / "metrics.jsonl", "finetune_flexora", 30)
    assert (cut_dir / "searches" / "layer" / "gates.json").exists()
    assert not (cut_dir / "methods" / "flexora" / "adapter").exists()  # killed mid-fine-tune
    done = _cli(cut_dir, "--resume")
    out = done.communicate(timeout=300)[0].decode()
    assert done.returncode == 0, out[-3000:]

    for name in ("gates.json", "selection.json", "eval.json"):
        assert json.loads((cut_dir / name).read_text()) == json.loads((ref_dir / name).read_text()), name
    a, b = _adapter(ref_dir), _adapter(cut_dir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    steps = [r["step"] for r in map(json.loads, (cut_dir / "metrics.jsonl").read_text().splitlines())
             if r["stage"] == "search_layer"]
    assert steps == list(range(1, 10))  # re-run steps are logged once


def test_a_fresh_run_refuses_an_existing_run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="--resume"):
        pipeline.prepare(RunConfig(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1"):
        pipeline.prepare(RunConfig(output_dir=str(tmp_path), seed=1), resume=True)


def test_baseline_selections():
    cfg = RunConfig(compare=("lora", "random_k", "lora_drop"))
    ws = SimpleNamespace(config=cfg, num_layers=6)
    flex = Selection(layers=(1, 4), ranks=None, lora_config=cfg.lora)
    searches = {"layer": pipeline.SearchOutcome("layer", {}, flex)}
    assert pipeline.needed_searches(cfg) == ["layer"]
    assert pipeline.method_selection(ws, "lora", searches).layers == tuple(range(6))
    assert pipeline.method_selection(ws, "lora_drop", searches).layers == (4, 5)
    rk = pipeline.method_selection(ws, "random_k", searches)
    assert len(rk.layers) == 2 and rk.lora_config.layers_to_transform == rk.layers
    assert pipeline.method_selection(ws, "random_k", searches).layers == rk.layers  # seeded
    assert pipeline.needed_searches(RunConfig(method="lora", compare=("lora_drop",), baseline_k=3)) == []
    assert pipeline.needed_searches(RunConfig(method="flexora+autolora", compare=("autolora",))) == ["both", "rank"]


def test_equal_parameter_baselines_match_the_parameter_counts():
    """lora_lowrank ~ flexora's parameters over all layers; flexora_highrank = LoRA-all's on flexora's layers."""
    from flexora_jax.config import LoraConfig

    lc = LoraConfig(r=8, lora_alpha=16.0)
    cfg = RunConfig(lora=lc, compare=("lora", "lora_lowrank", "flexora_highrank"), baseline_k=3)
    assert pipeline.needed_searches(cfg) == ["layer"]  # highrank needs flexora's layers even with baseline_k
    ws = SimpleNamespace(config=cfg, num_layers=6)
    flex = Selection(layers=(1, 4), ranks=None, lora_config=dataclasses.replace(lc, layers_to_transform=(1, 4)))
    searches = {"layer": pipeline.SearchOutcome("layer", {}, flex)}
    low = pipeline.method_selection(ws, "lora_lowrank", searches)
    assert low.layers == tuple(range(6)) and low.lora_config.layers_to_transform is None
    assert low.lora_config.r == 4 and low.lora_config.lora_alpha == 8.0  # round(8 * 3 / 6); alpha / r kept
    high = pipeline.method_selection(ws, "flexora_highrank", searches)
    assert high.layers == (1, 4) and high.lora_config.layers_to_transform == (1, 4)
    assert high.lora_config.r == 24 and high.lora_config.lora_alpha == 48.0  # round(8 * 6 / 2)
    assert 2 * high.lora_config.r == 6 * lc.r  # same parameter count as every layer at r
    with pytest.raises(ConfigError, match="rank_pattern"):
        pipeline.method_selection(SimpleNamespace(config=dataclasses.replace(
            cfg, lora=dataclasses.replace(lc, rank_pattern={"q_proj": 2})), num_layers=6), "lora_lowrank", searches)


TINY_TASK = ["--task.n_train=16", "--task.n_finetune=24", "--task.n_val=8", "--task.n_test=8", "--task.max_length=64",
             "--search.steps=2", "--finetune.max_steps=2", "--compare=[lora]", "--eval.base=false",
             "--checkpoint.every=0"]


@pytest.mark.parametrize("task", ["arc_easy"])
def test_tinystories260k_config_on_a_local_task_end_to_end(tmp_path, data_dir, task, monkeypatch):
    """A shipped tinystories260k config on the local release files: every file, finite acc and loss."""
    from flexora_jax import cli

    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    monkeypatch.chdir(REPO)  # the config's model paths are relative to the repository root
    out = tmp_path / "run"
    assert cli.main(["run", "--quiet", "--config", f"configs/tinystories260k_{task}.yaml", "--output-dir", str(out),
                     f"--task.data_dir={data_dir}", *TINY_TASK, "--eval.question_control=true"]) == 0
    for name in ("config.yaml", "data.json", "gates.json", "selection.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "eval.json", "compare.json", "metrics.jsonl", "gates.png",
                 "report.md", "model/config.json"):
        assert (out / name).is_file(), name
    sizes = json.loads((out / "data.json").read_text())["sizes"]
    assert sizes == {"search_train": 16, "search_validation": 8, "finetune_train": 24, "test": 8}
    scores = json.loads((out / "compare.json").read_text())
    assert set(scores) == {"flexora", "lora"}
    for m in scores.values():
        s = m[task]
        assert s["n"] == 8 and 0.0 <= s["acc"] <= 1.0 and 0.0 <= s["acc_norm"] <= 1.0
        assert np.isfinite(s["test_loss"]) and s["test_loss"] > 0
        # the question-removed control: same examples, prompt cut to the answer cue
        assert s["question_gain"] == pytest.approx(s["test_loss_noq"] - s["test_loss"])
        assert 0.0 <= s["acc_noq"] <= 1.0 and 0.0 <= s["acc_norm_noq"] <= 1.0
    assert json.loads((out / "eval.json").read_text()) == scores["flexora"]
    report = (out / "report.md").read_text()
    assert "| flexora |" in report and "| lora |" in report and "answer loss per token" in report
