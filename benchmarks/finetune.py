"""Figure 1: LoRA fine-tune step throughput (tokens/s), flexora_jax vs transformers + peft (torch).

Like with like: the same base weights (written by ``save_model`` and loaded by transformers), LoRA
r = 8 / alpha 16 on q, v, fp32, the same batch and sequence length, and the same optimizer
(global-norm clip 1.0, AdamW with weight decay 0, warm-up + cosine schedule); torch in train mode with
``loss.backward`` + ``clip_grad_norm_`` + ``optimizer.step`` + ``scheduler.step`` + ``zero_grad`` and as
many threads as there are cores. flexora_jax runs with the library's defaults (``ModelConfig`` and
``FinetuneConfig`` defaults; the jitted ``make_train_step`` with the state donated). Both steps are
timed round-robin in one process.

GPU mode (``--gpu``): a 1B-parameter LLaMA shape (random init), bf16 base weights, sequence 2048,
both stacks on the first CUDA device; rows add MFU (model FLOPs of :func:`common.lora_step_flops_per_token`
over the device's bf16 peak). Targets there: 1.3x torch + peft and MFU >= 40%.

DoRA mode (``--dora``): the same step with ``use_dora`` on both sides (peft's ``DoraLinearLayer``; ours
:mod:`flexora_jax.dora`), written to ``finetune_dora.json``.

Every row reports achieved FLOP/s (:func:`common.lora_step_flops_per_token` x tokens / median time) and its
share of the machine's peak measured in the same run (``harness.machine_peak``).

Spread mode (``--repeat-runs N``): the whole round-robin measurement N times in one process (compiled
once); the row pools every run's timings and adds each run's speedup and torch's winning thread setting,
with the speedup's min / median / max over runs.

    python -m benchmarks.finetune [--configs h256_l4 h768_l12] [--smoke] [--gpu] [--dora] [--repeat-runs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np

from benchmarks import common, harness
from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig
from flexora_jax.lora import init_lora
from flexora_jax.models.llama import init_params
from flexora_jax.train import init_train_state, make_optimizer, make_train_step

#: name -> (model, batch, seq, timed repeats)
CASES = {"h256_l4": ("h256_l4", 8, 128, 15), "h768_l12": ("h768_l12", 4, 128, 4)}
SMOKE = {"tiny": ("tiny", 2, 16, 2)}
GPU_CASES = {"llama_1b_bf16": ("llama_1b", 4, 2048, 10)}
STEPS = 1000  # schedule length (only the schedule's shape depends on it)
#: issue 31: ">= 1.5x torch + peft at every load" (was 1.25x before the flash attention and mixed-mode work)
TARGET_SPEEDUP_CPU = 1.5


def torch_step_fn(
    config: ModelConfig,
    params: Any,
    cfg: FinetuneConfig,
    batch: dict,
    threads: int,
    device: str = "cpu",
    lora: LoraConfig = common.LORA,
):
    """A closure running one torch + peft training step (same optimizer as ``make_optimizer``) on ``threads``
    (CPU) or on ``device``; base and LoRA weights in ``config.dtype``."""
    import torch

    model = common.torch_model(config, params, lora)
    model.to(device=device, dtype=getattr(torch, str(config.dtype)))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * STEPS)

    def lr_lambda(i: int) -> float:  # optax.warmup_cosine_decay_schedule(0, lr, warmup, STEPS)
        if i < warmup:
            return i / warmup
        return 0.5 * (1 + math.cos(math.pi * min(i - warmup, STEPS - warmup) / (STEPS - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    tb = {k: v.to(device) for k, v in common.to_torch(batch).items()}
    labels = tb["input_ids"].long().masked_fill(tb["loss_mask"] == 0, -100)
    ids, mask = tb["input_ids"].long(), tb["attention_mask"].long()

    def step() -> float:
        if device == "cpu":
            torch.set_num_threads(threads)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def jax_step_fn(
    config: ModelConfig, params: Any, cfg: FinetuneConfig, batch: dict, lora_config: LoraConfig = common.LORA
) -> tuple[Any, dict]:
    """(closure running one flexora_jax step, compile stats)."""
    lora = init_lora(config, lora_config, jax.random.key(1), params)
    state = init_train_state(lora, make_optimizer(cfg, STEPS))
    jitted = jax.jit(make_train_step(config, cfg, STEPS), donate_argnums=1)
    compiled, stats = harness.compile_stats(jitted, params, state, batch)
    cell = {"state": state}

    def step() -> float:
        cell["state"], metrics = compiled(params, cell["state"], batch)
        return float(common.block(metrics["loss"]))

    return step, stats


def _over_runs(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": ordered[0], "median": float(np.median(ordered)), "max": ordered[-1], "n": len(ordered)}


def timed_runs(fns: dict, repeats: int, runs: int) -> tuple[dict, list[dict]]:
    """``runs`` whole round-robin measurements of ``fns`` in one process: (timings pooled over every run,
    one summary per run: load at its start, each function's median, the speedup over torch's best)."""
    per_run, pooled = [], {name: [] for name in fns}
    for i in range(runs):
        load = harness.load_avg()
        timings = harness.interleaved(fns, repeats, warmup=1 if i == 0 else 0)
        for name, t in timings.items():
            pooled[name] += t["times_s"]
        medians = {name: t["median_s"] for name, t in timings.items()}
        best = min((n for n in medians if n.startswith("torch")), key=medians.get)
        per_run.append(
            {
                "load_start": load,
                "medians_s": medians,
                "torch_best": best,
                "speedup": medians[best] / medians["flexora_jax"],
            }
        )
    return {name: dict(harness.summary(ts), times_s=ts) for name, ts in pooled.items()}, per_run


def measure(
    case: str,
    model: str,
    batch_size: int,
    seq: int,
    repeats: int,
    model_overrides: dict | None = None,
    gpu: bool = False,
    dora: bool = False,
    runs: int = 1,
    peak: dict | None = None,
) -> dict:
    config = dataclasses.replace(common.MODELS[model], **(model_overrides or {}))
    lora = dataclasses.replace(common.LORA, use_dora=dora)
    cfg = FinetuneConfig(batch_size=batch_size)
    params = init_params(config, jax.random.key(0))
    batch = common.random_batch(config, batch_size, seq)
    jax_step, stats = jax_step_fn(config, params, cfg, batch, lora)
    cores = os.cpu_count() or 1
    fns = {"flexora_jax": jax_step}
    # torch at as many threads as cores, and at 1 thread: on a shared machine OpenMP's spinning
    # barriers can make the all-core setting much slower; the reference is torch's faster setting.
    if gpu:
        fns["torch_peft_cuda"] = torch_step_fn(config, params, cfg, batch, cores, device="cuda", lora=lora)
    for threads in () if gpu else sorted({cores, 1}, reverse=True):
        fns[f"torch_peft_{threads}t"] = torch_step_fn(config, params, cfg, batch, threads, lora=lora)
    first_loss = {name: fn() for name, fn in fns.items()}  # the first losses agree: same model, same batch
    timings, per_run = timed_runs(fns, repeats, runs)
    tokens = batch_size * seq
    peak = peak or harness.machine_peak()
    flops = common.lora_step_flops_per_token(config, seq, lora)  # DoRA's norms are not counted
    for t in timings.values():
        t["tokens_per_s"] = tokens / t["median_s"]
        t.update(harness.throughput(flops * tokens, t, peak))
    best = min((n for n in timings if n.startswith("torch")), key=lambda n: timings[n]["median_s"])
    jt, tt = timings["flexora_jax"]["median_s"], timings[best]["median_s"]
    return {
        "case": case,
        "model": common.describe(config),
        "batch": batch_size,
        "seq": seq,
        "lora": lora.to_dict(),
        "finetune": dataclasses.asdict(cfg),
        "first_loss": first_loss,
        "flexora_jax": {**timings.pop("flexora_jax"), **stats},
        "torch_variants": timings,
        "torch_peft": dict(timings[best], variant=best),
        "speedup": tt / jt,
        "runs": per_run,
        "speedup_over_runs": _over_runs([r["speedup"] for r in per_run]),
        "target_speedup": 1.3 if gpu else TARGET_SPEEDUP_CPU,
        "flops_per_token": flops,
        "device": jax.devices()[0].device_kind,
        "peak_flops": peak["reference_flops"],
    }


def run(
    smoke: bool = False,
    configs: list[str] | None = None,
    out_dir: str | None = None,
    command: str | None = None,
    gpu: bool = False,
    dora: bool = False,
    repeat_runs: int = 1,
    repeats: int | None = None,
) -> dict:
    """Measure every case (``repeat_runs`` whole round-robin measurements each, in this process; ``repeats``
    timed calls per run instead of the case's); writes ``finetune.json`` (``finetune_smoke.json`` in smoke
    mode, ``finetune_gpu.json`` in GPU mode)."""
    if gpu:
        common.require_gpu("finetune", torch_too=True)
    begin = harness.start(smoke)
    harness.set_threads()
    table = GPU_CASES if gpu else CASES
    cases = SMOKE if smoke else {k: v for k, v in table.items() if configs is None or k in configs}
    rows = [
        measure(name, *spec[:3], repeats or spec[3], gpu=gpu, dora=dora, runs=repeat_runs, peak=begin.peak)
        for name, spec in cases.items()
    ]
    flag = (
        (" --smoke" if smoke else " --gpu" if gpu else "")
        + (" --dora" if dora else "")
        + (f" --repeat-runs {repeat_runs}" if repeat_runs > 1 else "")
    )
    payload = {"command": command or "python -m benchmarks.finetune" + flag, "repeat_runs": repeat_runs, "rows": rows}
    name = "finetune_smoke" if smoke else "finetune_gpu" if gpu else "finetune"
    harness.write_result(name + ("_dora" if dora else ""), payload, out_dir, start=begin)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", choices=sorted(CASES) + sorted(GPU_CASES), default=None)
    p.add_argument("--gpu", action="store_true", help="1B LLaMA shape, bf16, sequence 2048, on the GPU; adds MFU")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (what the tests run)")
    p.add_argument("--dora", action="store_true", help="DoRA (use_dora) on both sides instead of LoRA")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per run (default: the case's)")
    p.add_argument(
        "--repeat-runs",
        type=int,
        default=1,
        metavar="N",
        help="repeat the whole round-robin measurement N times in this process; reports the speedup's spread over runs",
    )
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    out = run(
        a.smoke,
        a.configs,
        a.out_dir,
        harness.command_line("benchmarks.finetune", argv),
        gpu=a.gpu,
        dora=a.dora,
        repeat_runs=a.repeat_runs,
        repeats=a.repeats,
    )
    for r in out["rows"]:
        j, spread = r["flexora_jax"], r["speedup_over_runs"]
        print(
            f"{r['case']}: flexora_jax {j['median_s'] * 1e3:.1f} ms ({j['flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"{100 * j['share_of_peak']:.0f}% of peak), torch+peft {r['torch_peft']['median_s'] * 1e3:.1f} ms "
            f"({r['torch_peft']['variant']}), speedup {r['speedup']:.2f}x (over {spread['n']} runs "
            f"{spread['min']:.2f}-{spread['median']:.2f}-{spread['max']:.2f}; per run "
            f"{[(round(x['speedup'], 2), x['torch_best']) for x in r['runs']]}) (compile {j['compile_s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
