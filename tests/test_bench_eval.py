"""Smoke runs of the evaluation benchmarks (benchmarks/bench_eval.py, benchmarks/accuracy_table.py).

Seconds each, no timing thresholds: they check that both runners run end to end on the real
tinystories260k model, that ours and lm-eval score the same requests to the same log-likelihoods,
and that the JSON payloads carry what RESULTS.md's tables are rendered from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# benchmarks/ is a top-level package next to tests/; `.venv/bin/pytest` (unlike `python -m pytest`) does
# not put the repository root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("torch")
pytest.importorskip("lm_eval")


def _load(path):
    data = json.loads(path.read_text())
    assert data["machine"]["versions"]["jax"]
    assert data["command"].startswith("python -m benchmarks")
    return data


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, data_dir):  # data_dir (conftest) skips when the shared data folder is absent
    return tmp_path_factory.mktemp("bench_eval")


def test_bench_eval_smoke(out_dir, data_dir):
    from benchmarks import bench_eval

    payload = bench_eval.run(smoke=True, out_dir=str(out_dir), data_dir=str(data_dir))
    (row,) = _load(out_dir / "eval_smoke.json")["rows"]
    assert row == json.loads(json.dumps(payload["rows"][0], default=str))
    assert row["requests"] == sum(t["choices"] for t in row["tasks"].values()) > 0
    assert row["max_abs_loglikelihood_diff"] < 1e-3  # same model, same requests, same scores
    assert row["is_greedy_agreement"] == 1.0
    j, t = row["flexora_jax"], row["lm_eval"]
    assert j["choices_per_s"] > 0 and j["cold_choices_per_s"] > 0 and t["choices_per_s"] > 0
    assert j["compiled_programs"] >= 1 and j["cold_s"] > 0
    assert row["speedup"] > 0 and row["speedup_with_compile"] > 0
    tok = row["tokens"]
    assert tok["ours_padded_tokens"] >= tok["real_tokens"] and tok["lm_eval_padded_tokens"] >= tok["real_tokens"]
    assert f"| {row['requests']} (4 x piqa, arc_easy) |" in bench_eval.table(_load(out_dir / "eval_smoke.json"))


def test_accuracy_table_smoke(out_dir, data_dir):
    from benchmarks import accuracy_table

    accuracy_table.run(smoke=True, out_dir=str(out_dir), data_dir=str(data_dir))
    data = _load(out_dir / "accuracy_smoke.json")
    assert [r["task"] for r in data["rows"]] == list(accuracy_table.SMOKE_TASKS)
    for r in data["rows"]:
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
        assert r["n"] == 8 and not r["full_split"] and r["split_size"] > 8
        assert 0.0 < r["chance"] <= 0.5 and r["wall_s"] > 0
    chance = {r["task"]: r["chance"] for r in data["rows"]}
    assert chance["piqa"] == 0.5 and chance["boolq"] == 0.5 and chance["arc_easy"] <= 0.34
    assert "| piqa |" in accuracy_table.table(data)
