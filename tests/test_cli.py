"""``flexora-jax``: the embedded default end to end, and user errors as exit status 2 without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexora_jax import cli

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = (
    "config.yaml",
    "gates.json",
    "selection.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "eval.json",
    "metrics.jsonl",
    "gates.png",
    "report.md",
    "planted.json",
    "compare.json",
)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`flexora-jax run` with no config: the embedded planted demo, run once for the module.

    A subprocess on one CPU device, as a user runs it (this test process has 8 virtual devices, over
    which the run would shard its steps and take twice as long on a 2-core machine).
    """
    out = tmp_path_factory.mktemp("default") / "run"
    env = dict(os.environ, FLEXORA_PROGRESS="0", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "flexora_jax.cli", "run", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_embedded_default_end_to_end(default_run, capsys):
    for name in RUN_FILES:
        assert (default_run / name).is_file(), name
    assert any((default_run / "checkpoints").iterdir())
    planted = json.loads((default_run / "planted.json").read_text())
    selection = json.loads((default_run / "selection.json").read_text())
    assert selection["layers"] == planted["layers"] and set(planted) == {"layers", "ranks", "num_layers"}
    assert selection["trainable_params"] == len(planted["layers"]) * 2 * 4 * (64 + 64)
    gates = json.loads((default_run / "gates.json").read_text())
    assert len(gates["layer"]) == 6
    assert sorted(range(6), key=lambda i: -gates["layer"][i])[:2] == planted["layers"]
    scores = json.loads((default_run / "compare.json").read_text())
    flex, lora, base = (scores[m]["planted"]["test_loss"] for m in ("flexora", "lora", "base"))
    assert flex < lora and flex < base  # scarce data: the selected layers beat all-layer LoRA
    assert json.loads((default_run / "eval.json").read_text())["planted"]["test_loss"] == flex
    report = (default_run / "report.md").read_text()
    assert "recovered the planted layers exactly" in report and "| lora |" in report
    stages = {json.loads(line)["stage"] for line in (default_run / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"search_layer", "finetune_flexora", "finetune_lora"}


def test_export_stage_reruns_from_files(default_run):
    (default_run / "report.md").unlink()
    assert cli.main(["export", "--output-dir", str(default_run), "--quiet"]) == 0
    assert (default_run / "report.md").is_file()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--lora.rr=3"], "unknown key 'lora.rr'"),
        (["run", "--search.hypergradient=nope"], "search.hypergradient must be one of"),
        (["run", "--config", "/no/such.yaml"], "/no/such.yaml does not exist"),
        (["finetune"], "pass --output-dir"),
        (["evaluate", "--output-dir", "/tmp/flexora-no-such-run"], "has no config.yaml"),
    ],
)
def test_user_errors_exit_2_with_one_paragraph(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err.replace("\n", " ") and "Traceback" not in err


def test_console_entry_point_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "flexora_jax.cli", "--seed=abc", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad value for seed" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_config_keys_with_type_default_and_meaning(capsys):
    assert cli.main(["--help-config"]) == 0
    out = capsys.readouterr().out
    for line in (
        "  seed (int, default 0): seeds the planted layers",
        "  search.inner_steps (int, default 4): K, inner optimizer steps per search step",
        "  lora.target_modules (tuple[str, ...] | str, default [q_proj, v_proj]): module names",
        "  finetune.epochs (float, default 32.0): passes over the training set",
        "  selection.rule (str, default positive): positive | top_k | threshold",
    ):
        assert line in out, line
    assert "A real task" in out and "search.gate_power: 3" in out  # the paper defaults a real task takes
    keys = [ln.split(" (")[0].strip() for ln in out.splitlines() if ln.startswith("  ") and " (" in ln]
    assert all(": " in ln for ln in out.splitlines() if ln.startswith("  ") and " (" in ln)  # every key explained
    assert len(keys) == len(set(keys)) > 60


@pytest.mark.parametrize("command", ["run", "evaluate", "export"])
def test_each_command_has_its_own_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: flexora-jax {command}") and cli.ABOUT[command].split()[0] in out


def test_export_reads_no_task_data(tmp_path, data_dir, monkeypatch):
    """`flexora-jax export` writes from the run's files: with the task data gone since the run it still
    succeeds, ``--merged`` too (the model and its tokenizer are read, the task data is not)."""
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    monkeypatch.chdir(REPO)  # the config's model paths are relative to the repository root
    data = tmp_path / "data"
    data.mkdir()
    (data / "piqa").symlink_to(data_dir / "piqa")
    out = tmp_path / "run"
    tiny = [
        "--method=lora",
        "--compare=[]",
        "--task.n_train=16",
        "--task.n_val=8",
        "--task.n_test=4",
        "--task.max_length=64",
        "--finetune.max_steps=1",
        "--finetune.batch_size=4",
        "--eval.base=false",
        "--search.batch_size=4",
        "--search.val_batch_size=4",
        "--checkpoint.every=0",
        "--mesh.num_devices=1",
        f"--model.llama2c={data_dir / 'tinystories260k' / 'checkpoint_legacy.bin'}",
        f"--model.tokenizer_model={data_dir / 'tinystories260k' / 'tok512.model'}",
    ]
    assert (
        cli.main(
            [
                "run",
                "--quiet",
                "--config",
                "configs/tinystories260k_piqa.yaml",
                "--output-dir",
                str(out),
                f"--task.data_dir={data}",
                *tiny,
            ]
        )
        == 0
    )
    (data / "piqa").unlink()
    (out / "report.md").unlink()
    assert cli.main(["export", "--quiet", "--merged", "--output-dir", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
