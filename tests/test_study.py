"""The effectiveness study runs end to end in smoke mode and aggregates what it ran."""

from __future__ import annotations

import json

import yaml

from flexora_jax.pipeline.study import aggregate, load_plan, main


def test_study_smoke(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "experiments": [
                    {
                        "name": "tiny",
                        "seeds": [0, 1],
                        "overrides": ["--compare=[lora,random_k]", "--mesh.num_devices=1"],
                        "variants": {"top1": ["--selection.rule=top_k", "--selection.top_k=1"]},
                    }
                ]
            }
        )
    )
    out = tmp_path / "out"
    assert main([str(plan), "--out", str(out), "--smoke"]) == 0
    result = json.loads((out / "results.json").read_text())
    rec = result["tiny"]["top1"]
    assert set(rec) >= {"flexora", "lora", "random_k", "base"}
    assert rec["flexora"]["test_loss"]["n"] == 1 and rec["flexora"]["precision"]["n"] == 1
    assert rec["flexora"]["num_layers"]["mean"] == 1 and rec["random_k"]["num_layers"]["mean"] == 1
    assert "| top1 | flexora |" in (out / "results.md").read_text()
    # resumable: a second call runs nothing new and aggregates the same
    assert main([str(plan), "--out", str(out), "--smoke"]) == 0
    assert aggregate(out) == result


def test_committed_study_plans_parse():
    from pathlib import Path

    from flexora_jax.pipeline.config import load_config

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/study/*.yaml")):
        plan = load_plan(path)
        for e in plan["experiments"]:
            for overrides in e["variants"].values():
                load_config(e.get("config"), list(e["overrides"]) + list(overrides or []))


def test_rank_correlation_against_planted_ranks():
    import math

    from flexora_jax.pipeline.study import rank_correlation

    planted = {"layers": [1, 2], "ranks": {"q_proj": 8, "v_proj": 1}, "num_layers": 3}
    path = "model.layers.{}.self_attn.{}".format
    # ordering of the truth (0 outside planted layers, q above v inside) reproduced: correlation 1
    exact = {path(1, "q_proj"): 6, path(2, "q_proj"): 6, path(1, "v_proj"): 2, path(2, "v_proj"): 2}
    assert math.isclose(rank_correlation(exact, planted, 3), 1.0)
    # the reverse order inside the planted layers and ranks outside them: negative
    wrong = {
        path(0, "q_proj"): 8,
        path(0, "v_proj"): 8,
        path(1, "v_proj"): 4,
        path(2, "v_proj"): 4,
        path(1, "q_proj"): 1,
        path(2, "q_proj"): 1,
    }
    assert rank_correlation(wrong, planted, 3) < 0
    # a uniform selection carries no ranking
    uniform = {path(i, m): 4 for i in range(3) for m in ("q_proj", "v_proj")}
    assert math.isnan(rank_correlation(uniform, planted, 3))


def test_rank_by_planted_means_per_planted_rank():
    from flexora_jax.pipeline.study import rank_by_planted

    planted = {"layers": [1], "ranks": {"q_proj": 8, "v_proj": 1}, "num_layers": 2}
    path = "model.layers.{}.self_attn.{}".format
    selected = {path(0, "q_proj"): 2, path(0, "v_proj"): 4, path(1, "q_proj"): 6, path(1, "v_proj"): 1}
    assert rank_by_planted(selected, planted, 2) == {
        "rank_at_planted_0": 3.0,
        "rank_at_planted_1": 1.0,
        "rank_at_planted_8": 6.0,
    }


def test_effectiveness_doc_is_rendered_from_its_json():
    """Every table of docs/effectiveness.md is the committed JSON rendered by the study's renderer."""
    import runpy
    from pathlib import Path

    build = Path(__file__).resolve().parents[1] / "docs" / "effectiveness" / "build.py"
    assert runpy.run_path(str(build))["main"](["--check"]) == 0


def test_undefined_values_left_out_of_mean_and_marked():
    """A NaN rank correlation on one seed must not turn the mean into NaN; the table says so."""
    from flexora_jax.pipeline.study import _mean_std, render_markdown

    rc = _mean_std([0.5, float("nan"), 0.7])
    assert rc["n"] == 2 and abs(rc["mean"] - 0.6) < 1e-12
    result = {"planted": {"v": {"autolora": {"test_loss": _mean_std([1.0, 1.1, 1.2]), "rank_corr": rc}}}}
    table = render_markdown(result)
    assert "0.600 ± 0.141 (2 of 3 seeds)" in table and "| 3 |" in table


def test_aggregate_reads_the_selection_of_a_combined_method(tmp_path):
    """``flexora+autolora`` lives in ``methods/flexora_autolora``: its layers and ranks are aggregated too."""
    run = tmp_path / "exp" / "var" / "seed0"
    (run / "methods" / "flexora_autolora").mkdir(parents=True)
    (run / "compare.json").write_text(json.dumps({"flexora+autolora": {"planted": {"test_loss": 2.5}}}))
    (run / "planted.json").write_text(json.dumps({"layers": [1], "ranks": {"q_proj": 4}, "num_layers": 2}))
    (run / "methods" / "flexora_autolora" / "selection.json").write_text(
        json.dumps({"layers": [1], "trainable_params": 100, "ranks": {"model.layers.1.self_attn.q_proj": 3}})
    )
    rec = aggregate(tmp_path)["exp"]["var"]["flexora+autolora"]
    assert rec["precision"]["mean"] == 1.0 and rec["trainable_params"]["mean"] == 100
    assert abs(rec["rank_corr"]["mean"] - 1.0) < 1e-9 and rec["rank_at_planted_4"]["mean"] == 3.0


SEEDS_RUN = ["--compare=[]", "--mesh.num_devices=1"]


def test_run_seeds_from_the_command_line(tmp_path, monkeypatch):
    """`flexora-jax run --seeds=[0,1]`: one run per seed in seed<s>/, and at the top compare.json / report.md with
    the mean and sample standard deviation over the seeds per method; --resume reruns nothing; a second fresh
    multi-seed run into the same directory is refused."""
    import numpy as np
    import pytest

    from flexora_jax import cli
    from flexora_jax.pipeline.study import SMOKE_OVERRIDES

    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    out = tmp_path / "seeds"
    argv = ["run", "--quiet", "--seeds=[0,1]", "--output-dir", str(out), *SEEDS_RUN, *SMOKE_OVERRIDES]
    assert cli.main(argv) == 0
    per_seed = [
        json.loads((out / f"seed{s}" / "compare.json").read_text())["flexora"]["planted"]["test_loss"] for s in (0, 1)
    ]
    agg = json.loads((out / "compare.json").read_text())
    loss = agg["flexora"]["planted"]["test_loss"]
    assert loss["n"] == 2 and set(agg) == {"flexora", "base"}
    assert loss["mean"] == pytest.approx(np.mean(per_seed)) and loss["std"] == pytest.approx(np.std(per_seed, ddof=1))
    text = (out / "report.md").read_text()
    assert "2 seeds" in text and f"| flexora | {loss['mean']:.4f} ± {loss['std']:.4f} |" in text
    assert "[seed 1](seed1/report.md)" in text and (out / "compare.png").is_file()
    assert (out / "seed1" / "report.md").is_file() and (out / "seed0" / "gates.png").is_file()
    before = (out / "seed0" / "metrics.jsonl").read_text()
    assert cli.main(["run", "--quiet", "--resume", "--seeds=[0,1]", "--output-dir", str(out)]) == 0
    assert (out / "seed0" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "compare.json").read_text()) == agg
    assert cli.main(argv) == 2  # a fresh multi-seed run does not write over this one
    assert cli.main(["run", "--seeds=[0,0]", "--output-dir", str(tmp_path / "x")]) == 2


def test_study_is_a_command(tmp_path, capsys):
    from flexora_jax import cli

    assert cli.main(["study", str(tmp_path / "no_plan.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "flexora-jax study: error: study plan" in capsys.readouterr().err
    assert cli.main(["study", "--help"]) == 0
    assert "--smoke" in capsys.readouterr().out
