"""The GPU benchmark in one command: fine-tune tokens/s and MFU against torch + peft, the search step over K
plain steps, and the memory planner against XLA's compiled memory analysis. Writes ``gpu.json``.

Setup: the 1B LLaMA shape (TinyLlama-1.1B's: hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632,
vocab 32000), random init, bf16 base weights and activations (LoRA, optimizer states, gates and losses
fp32), sequence 2048, LoRA r = 8 on q, v.

- Fine-tune: ``make_train_step`` with the fused attention ``auto`` picks (cuDNN flash on NVIDIA in
  bf16) and with XLA attention, and transformers + peft (bf16, its default SDPA attention, flash on
  the GPU) on the same device, timed round-robin. MFU = FLOPs/token x tokens/s / the device's datasheet
  bf16 peak (``harness.machine_peak``, which also records measured fp32 and bf16 matmul peaks) with
  FLOPs/token from :func:`common.lora_step_flops_per_token` (the frozen base 4 N: forward 2 N and the
  input-gradient half of the backward 2 N, no weight-gradient matmul; causal attention 3 x its forward;
  LoRA's matmuls 6 r (d_in + d_out) per adapted module).
- Search: one jitted search step (``unrolled`` and ``first_order``, credited with K plain steps' FLOPs)
  against K plain steps at K = 1, 4, 8, the plain steps with the fused attention and with XLA attention
  (the search resolves its own: XLA where it differentiates twice).
- Memory: ``flexora_jax.memory.plan_memory`` against XLA's compiled memory (footprint = arguments +
  non-aliased outputs + temp) of each compiled step.

    python -m benchmarks.gpu            # on a CUDA GPU (exits with a message without one)
    python -m benchmarks.gpu --smoke    # tiny shape on any device, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import jax

from benchmarks import common, harness
from benchmarks.finetune import STEPS, jax_step_fn, torch_step_fn
from benchmarks.search import plain_step_flops, plain_steps, search_variant
from flexora_jax.config import FinetuneConfig, ModelConfig, SearchConfig
from flexora_jax.memory import plan_memory
from flexora_jax.models.attention import differentiates_twice, select_attention
from flexora_jax.models.llama import init_params

GPU = dict(model="llama_1b", batch=4, seq=2048, search_batch=2, ks=(1, 4, 8), repeats=5)
SMOKE = dict(model="tiny", batch=2, seq=16, search_batch=2, ks=(1, 2), repeats=1)
ESTIMATORS = ("unrolled", "unrolled_reverse", "first_order")


def _torch_device(smoke: bool) -> str | None:
    """ "cuda" on a GPU run; in smoke mode "cuda" or "cpu", or None when torch / peft are missing."""
    try:
        import peft  # noqa: F401
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu" if smoke else None


def _backend(config: ModelConfig, estimator: str | None = None) -> str:
    return select_attention(config.attention, config.dtype, second_order=differentiates_twice(estimator))


def finetune_rows(config: ModelConfig, batch_size: int, seq: int, repeats: int, smoke: bool, peak: dict) -> dict:
    """Tokens/s and MFU of the fine-tune step: fused attention, XLA attention, torch + peft."""
    params = init_params(config, jax.random.key(0))
    cfg = FinetuneConfig(batch_size=batch_size)
    batch = common.random_batch(config, batch_size, seq)
    fns, compiled = {}, {}
    for attention in ("auto", "xla"):
        variant = dataclasses.replace(config, attention=attention)
        name = f"flexora_jax[{_backend(variant)}]"
        if name not in fns:
            fns[name], compiled[name] = jax_step_fn(variant, params, cfg, batch)
    device = _torch_device(smoke)
    if device is not None:
        fns["torch_peft"] = torch_step_fn(config, params, cfg, batch, os.cpu_count() or 1, device=device)
    first_loss = {name: fn() for name, fn in fns.items()}
    timings = harness.interleaved(fns, repeats, warmup=1)
    flops = common.lora_step_flops_per_token(config, seq)
    plan = plan_memory(config, common.LORA, {}, 1, batch_size, seq)["finetune"]["total"]
    for name, t in timings.items():
        t["tokens_per_s"] = batch_size * seq / t["median_s"]
        t.update(harness.throughput(flops * batch_size * seq, t, peak))
        if name in compiled:
            t.update(
                compiled[name], planned_bytes=plan, plan_over_xla=plan / compiled[name]["memory"]["footprint_bytes"]
            )
    return {
        "batch": batch_size,
        "seq": seq,
        "flops_per_token": flops,
        "peak_flops": peak["reference_flops"],
        "first_loss": first_loss,
        "torch_device": device,
        "variants": timings,
    }


def _search_config(est: str, k: int, batch_size: int) -> SearchConfig:
    """``unrolled`` (mixed mode, the default), ``unrolled_reverse`` (reverse mode, remat) or another estimator."""
    mode = "reverse" if est == "unrolled_reverse" else "mixed"
    return SearchConfig(
        hypergradient=est.removesuffix("_reverse"),
        inner_steps=k,
        batch_size=batch_size,
        val_batch_size=batch_size,
        unrolled_mode=mode,
    )


def search_rows(
    config: ModelConfig,
    batch_size: int,
    seq: int,
    ks: tuple[int, ...],
    repeats: int,
    peak: dict,
    estimators: tuple[str, ...] = ESTIMATORS,
    on_row: Any = None,
) -> list[dict]:
    """Per K: the search step of each estimator over K plain steps (fused and XLA attention); ``on_row(rows)``
    after each K (incremental results: a long run that is cut short keeps what it measured)."""
    params = init_params(config, jax.random.key(0))
    rows = []
    for k in ks:
        try:
            batches = common.random_batch(config, batch_size, seq, seed=1, k=k)
            val = common.random_batch(config, batch_size, seq, seed=2)
            one = jax.tree.map(lambda x: x[0], batches)
            fns, info = {}, {}
            for attention in ("auto", "xla"):
                variant = dataclasses.replace(config, attention=attention)
                name = f"plain[{_backend(variant)}]"
                if name not in fns:
                    fns[name], info[name] = plain_steps(variant, params, k, one)
            for est in estimators:
                sc = _search_config(est, k, batch_size)
                name = f"{est}[{_backend(config, sc.hypergradient)}]"
                fns[name], info[name] = search_variant(config, params, sc, batches, val)
                plan = plan_memory(config, common.LORA, {}, k, batch_size, seq)["search"]["total"]
                info[name].update(planned_bytes=plan, plan_over_xla=plan / info[name]["memory"]["footprint_bytes"])
            timings = harness.interleaved(fns, repeats, warmup=1)
        except Exception as exc:  # noqa: BLE001 (a device run keeps the rows it has and says what failed)
            rows.append({"k": k, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            if on_row is not None:
                on_row(rows)
            continue
        plains = {n: t["median_s"] for n, t in timings.items() if n.startswith("plain")}
        flops = k * plain_step_flops(config, batch_size, seq)
        for name, t in timings.items():
            t.update(info[name], **harness.throughput(flops, t, peak))
            if not name.startswith("plain"):
                t["over_k_plain"] = {p: t["median_s"] / s for p, s in plains.items()}
        rows.append({"k": k, "variants": timings})
        if on_row is not None:
            on_row(rows)
    return rows


def run(
    smoke: bool = False,
    out_dir: str | None = None,
    command: str | None = None,
    ks: tuple[int, ...] | None = None,
    estimators: tuple[str, ...] | None = None,
    repeats: int | None = None,
) -> dict:
    """Everything on the first device; writes ``gpu.json`` (``gpu_smoke.json`` with ``smoke``) after each part."""
    if not smoke and (jax.default_backend() != "gpu" or _torch_device(False) != "cuda"):
        raise SystemExit(
            f"benchmarks.gpu needs a CUDA GPU visible to jax and torch (+ peft); jax's backend is "
            f"{jax.default_backend()!r}, torch's device {_torch_device(False)!r}. "
            "`python -m benchmarks.gpu --smoke` checks the script on this device."
        )
    begin = harness.start(smoke)
    spec = dict(SMOKE if smoke else GPU)
    spec["ks"] = tuple(ks or spec["ks"])
    spec["repeats"] = repeats or spec["repeats"]
    config = common.MODELS[spec["model"]]
    name = "gpu_smoke" if smoke else "gpu"
    payload: dict[str, Any] = {
        "command": command or "python -m benchmarks.gpu" + (" --smoke" if smoke else ""),
        "device": jax.devices()[0].device_kind,
        "model": common.describe(config),
        "lora": common.LORA.to_dict(),
        "schedule_steps": STEPS,
        "peak": begin.peak,
    }
    try:
        payload["finetune"] = finetune_rows(config, spec["batch"], spec["seq"], spec["repeats"], smoke, begin.peak)
    except Exception as exc:  # noqa: BLE001 (keep going: the search rows are measured on their own)
        payload["finetune"] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "variants": {}}
    harness.write_result(name, payload, out_dir, start=begin)

    def save(rows: list[dict]) -> None:
        harness.write_result(name, dict(payload, search=rows), out_dir, start=begin)

    payload["search"] = search_rows(
        config,
        spec["search_batch"],
        spec["seq"],
        spec["ks"],
        spec["repeats"],
        begin.peak,
        tuple(estimators or ESTIMATORS),
        on_row=save,
    )
    harness.write_result(name, payload, out_dir, start=begin)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on any device (checks that the script runs)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--ks", type=int, nargs="+", default=None, help="inner steps K of the search rows (default 1 4 8)")
    p.add_argument(
        "--estimators",
        nargs="+",
        default=None,
        help=f"search estimators (default {' '.join(ESTIMATORS)}; unrolled_reverse: reverse mode)",
    )
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    out = run(
        a.smoke,
        a.out_dir,
        harness.command_line("benchmarks.gpu", argv),
        tuple(a.ks or ()) or None,
        tuple(a.estimators or ()) or None,
        a.repeats,
    )
    print(f"peak: {out['peak']['reference']}, {out['peak']['reference_flops'] / 1e9:.1f} GFLOP/s")
    if "error" in out["finetune"]:
        print(f"finetune failed: {out['finetune']['error']}")
    for name, t in out["finetune"]["variants"].items():
        print(
            f"finetune {name}: {t['tokens_per_s']:.0f} tokens/s, {t['flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"{100 * t['share_of_peak']:.1f}% of peak"
        )
    for r in out["search"]:
        if "error" in r:
            print(f"K={r['k']}: failed: {r['error']}")
            continue
        parts = ", ".join(f"{n} {v['over_k_plain']}" for n, v in r["variants"].items() if "over_k_plain" in v)
        print(f"K={r['k']}: {parts}")


if __name__ == "__main__":
    main()
