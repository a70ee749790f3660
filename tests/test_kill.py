"""Faults on a real run: SIGTERM saves and exits cleanly; a NaN stops at its step and keeps the last good
checkpoint; SIGKILL at seeded random points (one in the middle of a checkpoint write) then --resume gives
the same files as an uninterrupted run. One uninterrupted reference run is shared by the module."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--compare=[]",
    "--task.planted.num_layers=4",
    "--task.planted.num_planted=1",
    "--task.planted.n_train=64",
    "--task.planted.n_val=32",
    "--task.planted.n_test=64",
    "--task.planted.finetune_examples=32",
    "--search.steps=6",
    "--finetune.max_steps=12",
    "--checkpoint.every=2",
    "--eval.base=false",
]
COMPARED = ("gates.json", "selection.json", "eval.json")


def _env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        FLEXORA_PROGRESS="0",
        HF_HUB_OFFLINE="1",
        JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
    )
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    env.update(extra)
    return env


def _launch(out: Path, **env: str) -> subprocess.Popen:
    resume = ["--resume"] if (out / "config.yaml").exists() else []
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "fault_cli.py"),
            "run",
            "--quiet",
            "--output-dir",
            str(out),
            *TINY,
            *resume,
        ],
        env=_env(**env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _reached(metrics: Path, stage: str, step: int) -> bool:
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("stage") == stage and rec.get("step", 0) >= step:
            return True
    return False


def _saving(run: Path) -> bool:
    ck = run / "checkpoints"
    return ck.exists() and any("tmp" in p.name for stage in ck.iterdir() for p in stage.iterdir())


def _signal_when(proc: subprocess.Popen, cond, sig: int, what: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stdout.read().decode()[-2000:]}")
        if cond():
            proc.send_signal(sig)
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"never reached {what}")


def _assert_same_as(run: Path, ref: Path) -> None:
    from safetensors.numpy import load_file

    for name in COMPARED:
        assert json.loads((run / name).read_text()) == json.loads((ref / name).read_text()), name
    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    os.environ["FLEXORA_PROGRESS"] = "0"
    # The reference runs exactly as the interrupted runs do: a CLI subprocess on one CPU device (the test
    # process has 8 virtual devices, whose programs may round differently in the last bit).
    proc = _launch(out)
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    return out


@pytest.mark.parametrize(
    "stage, step, output",
    [("search_layer", 3, "searches/layer/gates.json"), ("finetune_flexora", 5, "methods/flexora/adapter")],
)
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes_identically(
    reference, tmp_path, stage, step, output
):
    run = tmp_path / "run"
    proc = _launch(run)
    _signal_when(proc, lambda: _reached(run / "metrics.jsonl", stage, step), signal.SIGTERM, f"{stage} step {step}")
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "Traceback" not in out and "interrupted by signal 15" in out and "--resume" in out
    steps = [p.name for p in (run / "checkpoints" / stage).iterdir() if p.name.isdigit()]
    assert steps and not (run / output).exists()
    done = _launch(run)
    out = done.communicate(timeout=300)[0].decode()
    assert done.returncode == 0, out[-3000:]
    _assert_same_as(run, reference)


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_sigterm_stops_evaluate_and_export_within_seconds_then_resumes_identically(reference, tmp_path, stage):
    run, marker = tmp_path / "run", tmp_path / "inside"
    proc = _launch(run, FAULT_SLOW_STAGE=f"{stage}:3:{marker}")  # the signal lands in a 3 s call without safe points
    _signal_when(proc, marker.exists, signal.SIGTERM, f"the {stage} stage")
    sent = time.time()
    out = proc.communicate(timeout=120)[0].decode()
    assert time.time() - sent < 3 + 10, f"{stage} took {time.time() - sent:.0f} s to stop"
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "Traceback" not in out and "interrupted by signal 15" in out and "--resume" in out
    done = _launch(run)
    out = done.communicate(timeout=300)[0].decode()
    assert done.returncode == 0, out[-3000:]
    _assert_same_as(run, reference)


def _stage_command(command: str, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fault_cli.py"), command, "--quiet", "--output-dir", str(out)],
        env=_env(**env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _assert_clean_stop(proc: subprocess.Popen, sig: int) -> None:
    """Exit 128 + signal after a clean stop: the message, no traceback, no crash (a SIGSEGV is -11)."""
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + sig, f"status {proc.returncode}: {out[-2000:]}"
    assert "Traceback" not in out and f"by signal {sig}" in out and "Fatal Python error" not in out, out[-2000:]


def test_repeated_signals_during_evaluate_and_finetune_always_stop_cleanly(reference, tmp_path):
    """The signal is a flag checked at safe points, so every trial ends the same way, whatever code it lands
    in: `flexora-jax evaluate` signalled at seeded random moments inside its stage (SIGTERM, and one SIGINT), and
    a resumed fine-tune signalled at seeded random steps; each exits 128 + signal with its message, no
    traceback, no crash, and the run's finished files untouched."""
    rng = random.Random(30)
    before = (reference / "eval.json").read_bytes()
    for trial, sig in enumerate([signal.SIGTERM, signal.SIGTERM, signal.SIGINT]):
        run, marker = tmp_path / f"eval{trial}", tmp_path / f"inside{trial}"
        shutil.copytree(reference, run)
        proc = _stage_command("evaluate", run, FAULT_SLOW_STAGE=f"evaluate:2:{marker}")
        delay = rng.uniform(0.0, 1.0)  # anywhere in the 2 s call that reaches no safe point
        _signal_when(
            proc,
            lambda m=marker, d=delay: m.exists() and time.time() - m.stat().st_mtime > d,
            sig,
            "the evaluate stage",
        )
        proc.send_signal(sig)  # a second signal changes nothing
        _assert_clean_stop(proc, sig)
        assert (run / "eval.json").read_bytes() == before
    for trial in range(2):
        run = tmp_path / f"finetune{trial}"
        shutil.copytree(reference, run, ignore=shutil.ignore_patterns("methods", "adapter", "finetune_*"))
        log = run / "metrics.jsonl"
        log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if "finetune" not in line))
        proc = _launch(run)  # --resume: the search is reused, the fine-tune runs
        step = rng.randint(1, 11)
        _signal_when(
            proc,
            lambda log=log, step=step: _reached(log, "finetune_flexora", step),
            signal.SIGTERM,
            f"fine-tune step {step}",
        )
        _assert_clean_stop(proc, signal.SIGTERM)
        assert not (run / "methods" / "flexora" / "adapter").exists()


def test_nan_stops_at_its_step_keeps_the_last_good_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    proc = _launch(run, FAULT_NAN_AFTER="finetune_flexora:4")  # step 5 meets NaN data
    out = " ".join(proc.communicate(timeout=300)[0].decode().split())
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out and "fine-tune loss is nan at step 5" in out
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"stage": "finetune_flexora", "step": 5, "event": "non_finite"}.items() <= events[-1].items()
    ck = run / "checkpoints" / "finetune_flexora"
    assert max(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == 4
    assert not (run / "adapter").exists()
    assert {"prepare", "search_layer"} <= set(json.loads((run / "timings.json").read_text()))  # written per stage
    done = _launch(run)  # --resume, from step 4
    log = done.communicate(timeout=300)[0].decode()
    assert done.returncode == 0, log[-3000:]
    _assert_same_as(run, reference)
    timings = json.loads((run / "timings.json").read_text())  # the search ran in the first call only: kept
    assert {"search_layer", "finetune_flexora", "evaluate", "total"} <= set(timings)
    assert any(
        r.get("event") == "non_finite" for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    )


def test_sigkill_at_random_points_and_mid_save_then_resume_is_identical(reference, tmp_path):
    rng = random.Random(1234)
    run = tmp_path / "run"
    points = [("search_layer", rng.randint(1, 5)), ("finetune_flexora", rng.randint(1, 11))]
    # 1. a random search step
    proc = _launch(run)
    _signal_when(proc, lambda: _reached(run / "metrics.jsonl", *points[0]), signal.SIGKILL, f"{points[0]}")
    proc.wait()
    # 2. in the middle of a checkpoint write (files in orbax's temporary directory, not yet renamed)
    proc = _launch(run, FAULT_SAVE_DELAY="3")
    _signal_when(proc, lambda: _saving(run), signal.SIGKILL, "a checkpoint save")
    proc.wait()
    assert _saving(run)  # the half-written checkpoint is left behind
    # 3. a random fine-tune step
    proc = _launch(run)
    _signal_when(proc, lambda: _reached(run / "metrics.jsonl", *points[1]), signal.SIGKILL, f"{points[1]}")
    proc.wait()
    done = _launch(run)
    out = done.communicate(timeout=300)[0].decode()
    assert done.returncode == 0, out[-3000:]
    _assert_same_as(run, reference)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for stage, steps in (("search_layer", 6), ("finetune_flexora", 12)):  # re-run steps are logged once
        assert [r["step"] for r in records if r["stage"] == stage and "event" not in r] == list(range(1, steps + 1))
