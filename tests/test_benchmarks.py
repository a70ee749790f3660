"""Every benchmark runner in its smoke mode (tiny sizes), so none of them rots.

No timing thresholds: these check that each runner runs end to end, that both sides of a comparison
compute the same thing, and that the JSON and the RESULTS.md tables are written.
"""

from __future__ import annotations

import json
import shutil

import jax
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks import adalora, finetune, forward, harness, report, search  # noqa: E402


def _load(path):
    data = json.loads(path.read_text())
    assert data["machine"]["versions"]["jax"]
    assert data["command"].startswith("python -m benchmarks")
    return data


def test_harness_summary_and_interleaving():
    calls = []
    out = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # round-robin, warm-up first
    assert out["a"]["n"] == 3 and out["a"]["min_s"] <= out["a"]["median_s"] <= out["a"]["max_s"]


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    forward.run(smoke=True, out_dir=str(out))
    finetune.run(smoke=True, out_dir=str(out))
    search.run(smoke=True, out_dir=str(out))
    return out


def test_forward_smoke(smoke_results):
    (row,) = _load(smoke_results / "forward_smoke.json")["rows"]
    assert row["max_abs_logit_diff"] < 1e-4  # the torch model is the same function
    assert row["flexora_jax"]["median_s"] > 0 and row["torch"]["median_s"] > 0 and row["speedup"] > 0
    assert row["flexora_jax"]["memory"]["argument_bytes"] > 0


def test_finetune_smoke(smoke_results):
    (row,) = _load(smoke_results / "finetune_smoke.json")["rows"]
    losses = list(row["first_loss"].values())
    assert max(losses) - min(losses) < 1e-4  # same model, same batch, same first loss
    assert row["flexora_jax"]["tokens_per_s"] > 0 and row["torch_peft"]["tokens_per_s"] > 0
    assert row["flexora_jax"]["compile_s"] > 0


def test_adalora_smoke(tmp_path):
    """The AdaLoRA step side by side with peft's AdaLoraModel: both losses carry the orthogonality term."""
    adalora.run(smoke=True, out_dir=str(tmp_path))
    (row,) = _load(tmp_path / "adalora_smoke.json")["rows"]
    losses = list(row["first_loss"].values())
    assert max(losses) - min(losses) < 5e-3  # same base and batch; only the random P, Q draws differ
    assert row["flexora_jax"]["median_s"] > 0 and row["torch_peft"]["median_s"] > 0 and row["speedup"] > 0


def test_finetune_gpu_mode_needs_a_gpu_and_counts_flops():
    from benchmarks import common

    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit, match="finetune --gpu needs a CUDA GPU visible to jax and torch"):
            finetune.run(gpu=True)
        with pytest.raises(SystemExit, match="search --gpu needs a CUDA GPU visible to jax;"):
            search.run(gpu=True)
    cfg = common.MODELS["tiny"]  # d 32, f 64, 2 layers, vocab 64, MHA
    n = 2 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 64
    assert common.lora_step_flops_per_token(cfg, 16) == 4 * n + 12 * 2 * 16 * 32
    assert common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and common.peak_flops("cpu") is None
    rows = report.table_finetune_gpu({"command": "python -m benchmarks.finetune --gpu", "machine": {"date": "d"},
                                      "rows": [{"case": "c", "batch": 4, "seq": 2048, "device": "H100",
                                                "flexora_jax": {"tokens_per_s": 10.0, "mfu": 0.45},
                                                "torch_peft": {"tokens_per_s": 5.0, "mfu": 0.2},
                                                "speedup": 2.0, "target_speedup": 1.3}]})
    assert "45.0%" in rows and "**2.00x** (met)" in rows


def test_search_smoke(smoke_results):
    data = _load(smoke_results / "search_smoke.json")
    ks = [r["k"] for r in data["rows"]]
    assert ks == list(search.SMOKE["ks"])
    for r in data["rows"]:
        assert "plain" in r["variants"] and "unrolled" in r["variants"] and "unrolled_noremat" in r["variants"]
        for v in r["variants"].values():
            assert v["ratio_to_plain"] > 0 and v["memory"]["footprint_bytes"] > 0
    assert {"first_order", "forward", "darts"} <= set(data["rows"][0]["variants"])
    assert data["memory_ratio_kmax_over_kmin"]["remat"] is not None
    assert data["deep_compile"]["first_compile_s"] > 0


def test_report_rewrites_tables(smoke_results, tmp_path):
    for name in ("forward", "finetune", "search"):
        shutil.copy(smoke_results / f"{name}_smoke.json", tmp_path / f"{name}.json")
    md = tmp_path / "RESULTS.md"
    md.write_text("intro\n" + "".join(f"<!-- BEGIN {n} -->\nold\n<!-- END {n} -->\nkept {n}\n"
                                      for n in ("forward", "finetune", "search")))
    assert sorted(report.update(tmp_path, md)) == ["finetune", "forward", "search"]
    text = md.read_text()
    assert "old" not in text and "kept search" in text and "intro" in text
    assert "| tiny |" in text and "python -m benchmarks" in text


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
    assert traced["programs"] == 1 and static["programs"] == static["selections"] == 3
    m = out["memory"]
    # A and B of q, v in 32 blocks (4096 x 8 each side, fp32) and AdamW's two moments; the scalar counters aside
    assert abs(m["stacked_state_bytes"] - 3 * 32 * 2 * 2 * 4096 * 8 * 4) < 64
    assert m["stacked_over_base"] < 0.01
