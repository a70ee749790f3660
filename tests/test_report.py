"""``report.md`` and its pictures from a run directory's files: standard errors beside accuracies, gate checks
(moving and marginal gates, on synthetic trajectories), plots only where there is something to draw, the
multi-seed report. No training: the run directories are written by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flexora_jax.pipeline import report
from flexora_jax.pipeline.config import ModelSourceConfig, RunConfig, TaskConfig, config_to_dict
from flexora_jax.pipeline.report import Check, boundary, gate_checks, marginal_gates, moving_gates, rank_checks

PNG = b"\x89PNG\r\n\x1a\n"


def converging(steps: int = 50, final: float = 1.4, tau: float = 6.0) -> np.ndarray:
    return 1.0 + (final - 1.0) * (1.0 - np.exp(-np.arange(1, steps + 1) / tau))


def test_a_gate_still_climbing_is_moving_a_converged_one_is_not():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 51)
    traj = np.stack(
        [
            converging(),  # settled long before the end
            1.0 + 0.01 * steps,  # climbing at a constant rate to the last step
            1.5 - 0.01 * steps,  # falling likewise
            1.0 + 1e-4 * rng.standard_normal(50),  # never moved: noise only
            converging(final=0.6),
        ],
        axis=1,
    )
    moving = moving_gates(traj)
    assert set(moving) == {1, 2}
    assert moving[1] == pytest.approx(9 / 49) and moving[2] == pytest.approx(-9 / 49)  # 9 of 49 steps' rise
    assert moving_gates(traj[:4]) == {}  # too short to tell
    # an exponential approach: flagged at 71% of the way (time constant 40 of 50 steps), not at 95% (50 / 3)
    assert moving_gates(converging(tau=40.0)[:, None]) == {0: pytest.approx(0.105, abs=0.005)}
    assert moving_gates(converging(tau=50 / 3)[:, None]) == {}


def test_marginal_selections_per_rule():
    w = [1.007, 0.5, 1.5, 0.995, 0.9]
    assert marginal_gates(w, "positive") == {0: 1.0, 3: 1.0}
    assert marginal_gates(w, "threshold", threshold=0.9) == {4: 0.9}
    assert marginal_gates(w, "positive", margin=0.001) == {}
    assert marginal_gates([1.2, 1.199, 0.5], "top_k", top_k=1) == {0: 1.199, 1: 1.2}  # a tie for place 1
    assert marginal_gates([1.2, 1.1, 0.5], "top_k", top_k=1) == {}
    assert marginal_gates([1.2, 1.1], "top_k", top_k=2) == {}  # every layer kept: nothing hangs on it


def test_gate_checks_say_what_to_do():
    t = np.arange(40)
    traj = np.stack(
        [
            0.6 + 0.01 * t,  # rising toward the threshold 1: may cross with more steps
            converging(40, 1.007),  # settled just above it: marginal
            converging(40, 0.5),  # settled well below: fine
            1.0 + 0.01 * t,
        ],
        axis=1,
    )  # rising, but away from the threshold
    w = traj[-1].tolist()
    checks = gate_checks(
        traj, w, selected=[1, 3], selection={"rule": "positive", "top_k": 0, "threshold": 1.0}, steps=40
    )
    assert [c.warning for c in checks] == [True, False, True]
    toward, away, marginal = (c.text for c in checks)
    assert toward.startswith("layer 0: the gate is still rising toward the `positive` rule's threshold 1 (w = 0.990")
    assert "crosses in about 1 steps" in toward and "raise `search.steps` (now 40)" in toward
    assert away.startswith("layers [3]: still moving at the end of the search, away from") and "not change" in away
    assert marginal.startswith("layer 1: w = 1.00") and "(selected)" in marginal
    assert "`selection.rule=top_k` with `selection.top_k=2`" in marginal
    assert gate_checks(traj[:, 2:3], w[2:3], [], {"rule": "positive"}, 40) == []
    # top_k: the boundary is between places k and k + 1; a kept gate falling toward it is flagged
    falling = np.stack([1.6 - 0.01 * t, converging(40, 1.0), converging(40, 0.5)], axis=1)
    (check,) = gate_checks(falling, falling[-1].tolist(), [0], {"rule": "top_k", "top_k": 1}, 40)
    assert check.warning and check.text.startswith(
        "layer 0: the gate is still falling toward the boundary between places 1 and 2 of `top_k`"
    )
    assert boundary([1.21, 1.0, 0.5], "top_k", 1) == pytest.approx(1.105) and boundary([1.0], "top_k", 1) is None
    uniform = {"q_proj": np.full((3, 4), 0.25), "v_proj": [[0.7, 0.1, 0.1, 0.1]] * 3}
    assert rank_checks(uniform) == [
        Check(
            "q_proj: 12 of 12 rank components within 1% of the threshold 1/r = 0.25; "
            "their ranks are not settled: more `search.steps` or a larger "
            "`search.outer_lr`",
            True,
        )
    ]


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def real_task_run(run_dir, searches=("layer", "rank")) -> RunConfig:
    """A finished flexora run on a real task (compare: lora, autolora), written by hand."""
    config = RunConfig(
        method="flexora",
        compare=("lora", "autolora"),
        task=TaskConfig(name="piqa"),
        model=ModelSourceConfig(path="some/model"),
    )
    steps = 30
    traj = np.stack([0.5 + 0.016 * np.arange(steps), converging(steps, 1.004), converging(steps, 0.4)], axis=1)
    records = [
        {
            "stage": "search_layer",
            "step": i + 1,
            "train_loss": 2.0 - 0.01 * i,
            "val_loss": 2.1 - 0.01 * i,
            "hypergrad_norm": 0.1,
            "gates": traj[i].tolist(),
        }
        for i in range(steps)
    ]
    records += [
        {"stage": f"finetune_{m}", "step": i + 1, "loss": 2.0 / (i + 1), "grad_norm": 1.0}
        for m in ("flexora", "lora")
        for i in range(10)
    ]
    records.append({"stage": "finetune_lora", "step": 10, "val_loss": 1.1, "loss": 0.2, "grad_norm": 1.0})
    _write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records) + '{"cut li')
    if "layer" in searches:
        _write(run_dir / "searches" / "layer" / "gates.json", {"layer": traj[-1].tolist()})
        _write(run_dir / "searches" / "layer" / "selection.json", {"layers": [1]})
        _write(run_dir / "gates.json", {"layer": traj[-1].tolist()})
    if "rank" in searches:
        ranks = {"q_proj": [[0.4, 0.3, 0.2, 0.1]] * 3, "v_proj": [[0.25, 0.25, 0.25, 0.25]] * 3}
        _write(run_dir / "searches" / "rank" / "gates.json", {"rank": ranks})
    for m, layers in (("flexora", [1]), ("lora", [0, 1, 2]), ("autolora", [0, 1, 2])):
        _write(run_dir / "methods" / m / "selection.json", {"layers": layers, "trainable_params": 100 * len(layers)})
    scores = {
        m: {
            "piqa": {
                "acc": acc,
                "acc_norm": acc,
                "acc_stderr": 0.0884,
                "acc_norm_stderr": 0.0884,
                "n": 32,
                "test_loss": loss,
            }
        }
        for m, acc, loss in (("base", 0.5, 2.0), ("flexora", 0.53125, 1.5), ("lora", 0.5625, 1.4))
    }
    _write(run_dir / "compare.json", scores)
    return config


def test_report_shows_stderr_checks_and_links_every_picture(tmp_path, caplog):
    config = real_task_run(tmp_path)
    report.write_report(tmp_path, config, {"search_layer": 1.0})
    assert len([r for r in caplog.records if "gate check" in r.getMessage()]) == 3  # also on the terminal
    text = (tmp_path / "report.md").read_text()
    assert "| flexora | 0.5312 ± 0.0884 | 0.5312 ± 0.0884 | 1.5000 | 32 |" in text
    assert "standard error of the mean over the test examples" in text
    checks = text.split("## Gate checks")[1]
    assert "- `layer` search, layer 0: the gate is still rising toward the `positive` rule's threshold 1" in checks
    assert "- `layer` search, layer 1: w = 1.00" in checks and "a near tie" in checks
    assert "- `rank` search, v_proj: 12 of 12 rank components" in checks and "q_proj" not in checks
    for name in ("gates.png", "rank_gates.png", "losses.png", "compare.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG), name
        assert f"]({name})" in text, name


def test_a_run_without_searches_gets_no_gate_pictures_or_checks(tmp_path):
    config = real_task_run(tmp_path, searches=())
    config = RunConfig(method="dora", compare=(), task=config.task, model=config.model)
    report.write_report(tmp_path, config)
    text = (tmp_path / "report.md").read_text()
    assert not (tmp_path / "gates.png").exists() and not (tmp_path / "rank_gates.png").exists()
    assert "gates.png" not in text and "Gate checks" not in text
    assert (tmp_path / "compare.png").exists() and (tmp_path / "losses.png").exists()


def test_a_settled_search_reports_no_warning(tmp_path):
    config = real_task_run(tmp_path, searches=("layer",))
    traj = np.stack([converging(30, 1.5), converging(30, 0.5)], axis=1)
    _write(
        tmp_path / "metrics.jsonl",
        "".join(
            json.dumps({"stage": "search_layer", "step": i + 1, "gates": row}) + "\n"
            for i, row in enumerate(traj.tolist())
        ),
    )
    _write(tmp_path / "searches" / "layer" / "gates.json", {"layer": traj[-1].tolist()})
    report.write_report(tmp_path, config)
    assert "No gate is still moving over the last 20% of the search" in (tmp_path / "report.md").read_text()


def test_seed_report_shows_mean_and_sd(tmp_path):
    config = RunConfig(compare=("lora",))
    result = {
        "flexora": {
            "planted": {
                "test_loss": {"mean": 1.25, "std": 0.05, "n": 3},
                "num_layers": {"mean": 2.0, "std": 0.0, "n": 3},
            }
        },
        "lora": {"planted": {"test_loss": {"mean": 1.5, "std": 0.1, "n": 3}}},
    }
    report.write_seeds_report(tmp_path, config, [0, 1, 2], result)
    text = (tmp_path / "report.md").read_text()
    assert "| flexora | 1.2500 ± 0.0500 | 2 | 3 |" in text and "| lora | 1.5000 ± 0.1000 |  | 3 |" in text
    assert "[seed 2](seed2/report.md)" in text and "](compare.png)" in text
    assert json.loads((tmp_path / "compare.json").read_text()) == result
    assert config_to_dict(config)["seed"] == 0  # the config is not changed by rendering it


def test_log_section_of_the_run_config():
    from flexora_jax.errors import ConfigError
    from flexora_jax.pipeline.config import load_config

    assert load_config(None, ["--log.tensorboard=true"]).log.tensorboard is True
    assert load_config(None, []).log.wandb_project is None  # both off by default
    for bad, needle in (
        (["--log.tensorboard=3"], "log.tensorboard must be true or false"),
        (['--log.wandb_project=""'], "log.wandb_project must be a W&B project name"),
        (["--log.tensorbord=true"], "did you mean 'log.tensorboard'"),
    ):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, bad)
