"""The effectiveness study runs end to end in smoke mode and aggregates what it ran."""

from __future__ import annotations

import json

import yaml

from flexora_jax.study import aggregate, load_plan, main


def test_study_smoke(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"experiments": [{
        "name": "tiny", "seeds": [0, 1], "overrides": ["--compare=[lora,random_k]"],
        "variants": {"top1": ["--search.selection=topk", "--search.top_k=1"]}}]}))
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

    from flexora_jax.config import load_config

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/study/*.yaml")):
        plan = load_plan(path)
        for e in plan["experiments"]:
            for overrides in e["variants"].values():
                load_config(e.get("config"), list(e["overrides"]) + list(overrides or []))
