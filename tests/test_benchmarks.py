"""Every benchmark runner in its smoke mode (tiny sizes), so none of them rots.

No timing thresholds: these check that each runner runs end to end, that both sides of a comparison
compute the same thing, that the FLOP convention and the peak are what RESULTS.md says, and that the JSON
and every RESULTS.md table are written. The runners of one fixture share their compiled programs (same
tiny model and shapes), which is most of this file's time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks import (  # noqa: E402
    adalora,
    common,
    finetune,
    forward,
    harness,
    memory_logits,
    nnx_step,
    report,
    run_all,
    search,
)
from flexora_jax.config import LoraConfig  # noqa: E402
from flexora_jax.models.attention import stage_config  # noqa: E402


def _load(path):
    data = json.loads(path.read_text())
    assert data["machine"]["versions"]["jax"]
    assert data["command"].startswith("python -m benchmarks")
    return data


def _recorded_start(data):
    """A runner's JSON: load average at its start and end, its wall time and the peak of the same run."""
    assert len(data["load"]["start"]) == 3 and len(data["load"]["end"]) == 3 and data["wall_s"] > 0
    assert data["peak"]["reference_flops"] > 0 and data["peak"]["matmul_fp32"]["flops_per_s"] > 0


def _rated(t, flops):
    assert t["flops"] == pytest.approx(flops)
    assert t["flops_per_s"] == pytest.approx(flops / t["median_s"]) and 0 < t["share_of_peak"]


def test_harness_summary_and_interleaving():
    calls = []
    out = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # round-robin, warm-up first
    assert out["a"]["n"] == 3 and out["a"]["min_s"] <= out["a"]["median_s"] <= out["a"]["max_s"]


def test_peak_is_measured_once_per_process_and_shares_are_taken_against_it():
    first = harness.matmul_peak(64)
    assert harness.matmul_peak(64) is first  # cached: one measurement per process and size
    assert first["best_s"] == min(first["times_s"])
    assert first["flops_per_s"] == pytest.approx(2 * 64**3 / first["best_s"])
    peak = harness.machine_peak(smoke=True)
    if jax.default_backend() == "cpu":
        assert peak["reference"].startswith("measured fp32 matmul") and peak["datasheet_bf16_flops"] is None
        assert peak["reference_flops"] == peak["matmul_fp32"]["flops_per_s"]
    t = harness.throughput(1e9, {"median_s": 0.5, "min_s": 0.25}, {"reference": "datasheet", "reference_flops": 4e9})
    assert t["flops_per_s"] == 2e9 and t["share_of_peak"] == 0.5 and t["share_of_peak_best"] == 1.0 and t["mfu"] == 0.5
    assert (
        harness.throughput(1.0, {"median_s": 1.0, "min_s": 1.0}, {"reference": "measured", "reference_flops": 2.0})[
            "mfu"
        ]
        is None
    )


def test_flop_convention_and_datasheet_peaks():
    cfg = common.MODELS["tiny"]  # d 32, f 64, 2 layers, vocab 64, MHA, q_dim 32
    n = 2 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 64
    assert common.base_matmul_params(cfg) == n
    attention = 4 * 32 * 2 * (16 + 1) / 2  # causal: the mean query sees (t + 1) / 2 keys, in each of 2 layers
    assert common.attention_flops_per_token(cfg, 16) == attention
    lora = 6 * 8 * (32 + 32) * 2 * 2  # r 8 on q and v (32 -> 32) in 2 layers: forward, input and weight gradients
    assert common.lora_step_flops_per_token(cfg, 16) == 4 * n + 3 * attention + lora
    assert common.forward_flops_per_token(cfg, 16) == 2 * n + attention
    one_layer = LoraConfig(r=4, target_modules=("gate_proj",), layers_to_transform=(1,))
    assert common.lora_flops_per_token(cfg, one_layer) == 6 * 4 * (32 + 64)
    windowed = dataclasses.replace(cfg, sliding_window=4)
    assert common.attention_flops_per_token(windowed, 16) == 4 * 32 * 2 * (1 + 2 + 3 + 4 * 13) / 16
    assert common.peak_flops("NVIDIA H200") == common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.peak_flops("NVIDIA H100 PCIe") == 756e12 and common.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.peak_flops("TPU v5 lite") == 197e12 and common.peak_flops("TPU v5") == 459e12
    assert common.peak_flops("TPU v4") == 275e12 and common.peak_flops("cpu") is None


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    forward.run(smoke=True, out_dir=str(out))
    finetune.run(smoke=True, out_dir=str(out), repeat_runs=2)
    search.run(smoke=True, out_dir=str(out))
    search.run_parts(smoke=True, out_dir=str(out))  # its K plain steps and search step are compiled above
    nnx_step.run(smoke=True, out_dir=str(out))  # its functional search and fine-tune steps are the search's
    return out


def test_forward_smoke(smoke_results):
    data = _load(smoke_results / "forward_smoke.json")
    _recorded_start(data)
    (row,) = data["rows"]
    assert row["max_abs_logit_diff"] < 1e-4  # the torch model is the same function
    assert row["flexora_jax"]["median_s"] > 0 and row["torch"]["median_s"] > 0 and row["speedup"] > 0
    assert row["flexora_jax"]["memory"]["argument_bytes"] > 0
    flops = common.forward_flops_per_token(common.MODELS["tiny"], row["seq"]) * row["batch"] * row["seq"]
    _rated(row["flexora_jax"], flops)
    _rated(row["torch"], flops)


def test_finetune_smoke_repeats_whole_runs(smoke_results):
    data = _load(smoke_results / "finetune_smoke.json")
    _recorded_start(data)
    assert data["repeat_runs"] == 2 and "--repeat-runs 2" in data["command"]
    (row,) = data["rows"]
    losses = list(row["first_loss"].values())
    assert max(losses) - min(losses) < 1e-4  # same model, same batch, same first loss
    assert row["flexora_jax"]["tokens_per_s"] > 0 and row["torch_peft"]["tokens_per_s"] > 0
    assert row["flexora_jax"]["compile_s"] > 0
    _rated(row["flexora_jax"], row["flops_per_token"] * row["batch"] * row["seq"])
    # two whole round-robin runs, pooled: every call of both runs is in the row's timings
    assert len(row["runs"]) == 2 and row["flexora_jax"]["n"] == 2 * finetune.SMOKE["tiny"][3]
    spread = row["speedup_over_runs"]
    assert spread["n"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert sorted(r["speedup"] for r in row["runs"]) == [spread["min"], spread["max"]]
    for r in row["runs"]:
        assert r["torch_best"].startswith("torch_peft_") and len(r["load_start"]) == 3
        assert r["speedup"] == pytest.approx(r["medians_s"][r["torch_best"]] / r["medians_s"]["flexora_jax"])


def test_adalora_smoke(tmp_path):
    """The AdaLoRA step side by side with peft's AdaLoraModel: both losses carry the orthogonality term."""
    adalora.run(smoke=True, out_dir=str(tmp_path))
    data = _load(tmp_path / "adalora_smoke.json")
    _recorded_start(data)
    (row,) = data["rows"]
    losses = list(row["first_loss"].values())
    assert max(losses) - min(losses) < 5e-3  # same base and batch; only the random P, Q draws differ
    assert row["flexora_jax"]["median_s"] > 0 and row["torch_peft"]["median_s"] > 0 and row["speedup"] > 0
    assert row["flexora_jax"]["share_of_peak"] > 0
    assert "AdaLoRA 12 -> 8, q, v" in report.table_adalora(data)


def test_finetune_gpu_mode_needs_a_gpu():
    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit, match="finetune --gpu needs a CUDA GPU visible to jax and torch"):
            finetune.run(gpu=True)
        with pytest.raises(SystemExit, match="search --gpu needs a CUDA GPU visible to jax;"):
            search.run(gpu=True)
    rows = report.table_finetune_gpu(
        {
            "command": "python -m benchmarks.finetune --gpu",
            "machine": {"date": "d"},
            "rows": [
                {
                    "case": "c",
                    "batch": 4,
                    "seq": 2048,
                    "device": "H100",
                    "flexora_jax": {"tokens_per_s": 10.0, "mfu": 0.45},
                    "torch_peft": {"tokens_per_s": 5.0, "mfu": 0.2},
                    "speedup": 2.0,
                    "target_speedup": 1.3,
                }
            ],
        }
    )
    assert "45.0%" in rows and "**2.00x** (met)" in rows


def test_search_smoke(smoke_results):
    data = _load(smoke_results / "search_smoke.json")
    _recorded_start(data)
    assert [r["k"] for r in data["rows"]] == list(search.SMOKE["ks"])
    k1, k2 = data["rows"]
    assert {"plain", "unrolled", "unrolled_reverse", "unrolled_noremat", "darts"} == set(k1["variants"])
    assert {"plain", "unrolled", "unrolled_reverse"} == set(k2["variants"])
    for r in data["rows"]:
        for v in r["variants"].values():
            assert v["ratio_to_plain"] > 0 and v["memory"]["footprint_bytes"] > 0
            _rated(v, r["k"] * r["plain_step_flops"])  # a search step is credited with K plain steps' FLOPs
    assert data["memory_ratio_kmax_over_kmin"]["remat"] is not None
    assert data["memory_ratio_kmax_over_kmin"]["no_remat"] is None  # smoke: no remat at K = 1 only
    assert data["deep_compile"]["first_compile_s"] > 0


def test_search_parts_smoke(smoke_results):
    data = _load(smoke_results / "search_parts_smoke.json")
    _recorded_start(data)
    assert "--parts" in data["command"]
    (row,) = data["rows"]
    parts = row["parts"]
    assert set(parts) == {"plain", "search_step", "inner_forward", "val_grad", "outer_update"}
    med = {n: p["median_s"] for n, p in parts.items()}
    assert row["reverse_sweep_s"] == pytest.approx(
        med["search_step"] - med["inner_forward"] - med["val_grad"] - med["outer_update"]
    )
    assert row["search_over_k_plain"] == pytest.approx(med["search_step"] / med["plain"])
    assert all(p["over_k_plain"] > 0 for p in parts.values()) and parts["search_step"]["share_of_peak"] > 0
    # the attention of the first-order passes and of the Hessian-vector products, as the search step picks them
    assert row["attention"] == {
        "first_order": stage_config(common.MODELS["tiny"]).attention,
        "second_order": stage_config(common.MODELS["tiny"], "unrolled").attention,
    }


def test_nnx_step_smoke(smoke_results):
    data = _load(smoke_results / "nnx_step_smoke.json")
    _recorded_start(data)
    assert set(data["timings"]) == {"search_functional", "search_nnx", "finetune_functional", "finetune_nnx"}
    assert data["ratio_search"] > 0 and data["ratio_finetune"] > 0
    # the same program both ways: XLA's memory analysis of the two search steps agrees
    # (not byte-equal: the NNX problem's hyperparameter pytree and the loss closures' layouts differ; within 5%)
    f_temp, n_temp = data["memory"]["search_functional"]["temp_bytes"], data["memory"]["search_nnx"]["temp_bytes"]
    assert n_temp == pytest.approx(f_temp, rel=0.05)
    assert data["compiles_of_a_second_search"] == 1  # a search compiles its step once, never once per step
    k, b, t = data["spec"]["k"], data["spec"]["batch"], data["spec"]["seq"]
    step = common.lora_step_flops_per_token(common.MODELS["tiny"], t) * b * t
    _rated(data["timings"]["search_nnx"], k * step)
    _rated(data["timings"]["finetune_nnx"], step)


def test_memory_logits_smoke(tmp_path):
    """The compiled-memory table at tiny sizes (the step-ratio table renders from its committed JSON, below)."""
    d = memory_logits.run(smoke=True, out_dir=str(tmp_path))
    assert {(r["step"], r["chunked"]) for r in d["rows"]} == {("finetune", False), ("finetune", True)}
    assert all(r["memory"]["temp_bytes"] > 0 for r in d["rows"])
    _recorded_start(_load(tmp_path / "memory_logits_smoke.json"))
    render = report.TABLES["memory_logits"][1]
    assert "| finetune | chunked |" in render(_load(tmp_path / "memory_logits_smoke.json"))


def test_every_table_renders_from_a_smoke_run(smoke_results, tmp_path):
    renamed = {
        "forward": "forward_smoke",
        "finetune": "finetune_smoke",
        "search": "search_smoke",
        "search_parts": "search_parts_smoke",
        "nnx_step": "nnx_step_smoke",
    }
    for name, smoke in renamed.items():
        shutil.copy(smoke_results / f"{smoke}.json", tmp_path / report.TABLES[name][0])
    md = tmp_path / "RESULTS.md"
    md.write_text("intro\n" + "".join(f"<!-- BEGIN {n} -->\nold\n<!-- END {n} -->\nkept {n}\n" for n in renamed))
    assert sorted(report.update(tmp_path, md)) == sorted(renamed)
    text = md.read_text()
    assert "old" not in text and "kept search" in text and "intro" in text
    assert "| tiny |" in text and "python -m benchmarks" in text and "GFLOP/s" in text and "-> " in text
    assert "(2 runs)" in text and "| tiny | 2 |" in text  # the spread over runs and each run's row
    assert "reverse sweep" in text and "(a) inner forward sweep" in text


def test_results_md_has_a_marker_per_table_and_the_committed_json_renders(tmp_path):
    """Every renderer has its marker in RESULTS.md, and the JSON files in benchmarks/results render (older
    ones lack the load, the peak and the FLOP/s, which show as "-")."""
    text = report.RESULTS_MD.read_text()
    for name in report.TABLES:
        assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text, name
    md = tmp_path / "RESULTS.md"
    shutil.copy(report.RESULTS_MD, md)
    done = report.update(report.RESULTS_DIR, md)
    present = {n for n, (f, _) in report.TABLES.items() if (report.RESULTS_DIR / f).exists()}
    assert set(done) == present and md.read_text().count("<!-- BEGIN") == text.count("<!-- BEGIN")


def test_run_all_records_each_runner_and_skips_gpu_runners_without_a_gpu(tmp_path, monkeypatch):
    from benchmarks import memory_plan

    called = []

    def fake(smoke, out_dir, command):
        called.append(command)
        return {}

    monkeypatch.setattr(run_all, "RUNNERS", {"memory_plan": memory_plan.run, "fake": fake, "gpu": fake})
    results = run_all.run_all(smoke=True, out_dir=str(tmp_path))
    gpu_ran = jax.default_backend() == "gpu"
    assert called == ["python -m benchmarks.run_all --only fake --smoke"] * (1 + gpu_ran)
    assert set(results) == {"memory_plan", "fake"} | ({"gpu"} if gpu_ran else set())
    data = _load(tmp_path / "run_all_smoke.json")
    _recorded_start(data)
    assert set(data["runners"]) == set(results) and all(r["wall_s"] >= 0 for r in data["runners"].values())
    assert "| memory_plan |" in report.table_run_all(data)
    plan = _load(tmp_path / "memory_plan_smoke.json")
    assert "Llama-3-70B" in report.table_memory_plan(plan)


def test_gpu_table_renders():
    t = {"median_s": 0.5, "min_s": 0.4, "tokens_per_s": 100.0, "flops_per_s": 3e14, "share_of_peak": 0.3}
    d = {
        "command": "python -m benchmarks.gpu",
        "machine": {"date": "d", "cpu": "c", "cpu_count": 16, "load_avg_1m": 1.0},
        "device": "NVIDIA H200",
        "model": {"hidden_size": 2048, "num_hidden_layers": 22, "dtype": "bfloat16"},
        "finetune": {
            "batch": 4,
            "seq": 2048,
            "variants": {"flexora_jax[cudnn]": {**t, "compile_s": 9.0, "plan_over_xla": 1.1}},
        },
        "search": [{"k": 4, "variants": {"plain[cudnn]": t, "unrolled[xla]": {**t, "over_k_plain": {"plain": 2.5}}}}],
    }
    text = report.table_gpu(d)
    assert "300.0 TFLOP/s (30%)" in text and "plain: 2.50x" in text and "NVIDIA H200" in text


def test_end_to_end_smoke(tmp_path):
    from benchmarks import end_to_end

    d = end_to_end.run(smoke=True, out_dir=str(tmp_path))
    assert (tmp_path / "end_to_end_smoke.json").exists()
    assert d["flexora_total_s"] > d["search_s"] > 0 and d["lora_all_s"] > 0
    assert d["ratio"] == d["flexora_total_s"] / d["lora_all_s"]
    assert "first-order" in end_to_end.table(d)


def test_lora_layout_smoke(tmp_path):
    """The traced layout compiles one fine-tune program for every selection; the static one, one each."""
    from benchmarks import lora_layout

    out = lora_layout.run(smoke=True, out_dir=str(tmp_path))
    traced, static = out["compile"]
    assert traced["programs"] == 1 and static["programs"] == static["selections"] == 2
    m = out["memory"]
    # A and B of q, v in 32 blocks (4096 x 8 each side, fp32) and AdamW's two moments; the scalar counters aside
    assert abs(m["stacked_state_bytes"] - 3 * 32 * 2 * 2 * 4096 * 8 * 4) < 64
    assert m["stacked_over_base"] < 0.01
    data = _load(Path(tmp_path) / "lora_layout_smoke.json")
    assert "| **1** |" in report.table_lora_layout(data)
