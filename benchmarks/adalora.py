"""AdaLoRA fine-tune step, flexora_jax vs transformers + peft (torch), timed side by side.

Like with like: the same base weights, AdaLoRA on q, v with init_r 12 -> target_r 8 (lora_alpha 16), the
budget phase from step 0 with a mask every 10 steps (``deltaT``), the orthogonality regulariser, AdamW
(weight decay 0, constant lr), the same batch. A timed step is everything PEFT's loop does per step:
forward with the regulariser, backward, optimizer step, ``update_and_allocate`` (the sensitivity EMAs
every step, the budget mask every ``deltaT``). Ours: :func:`flexora_jax.adalora.make_adalora_step` (one
jitted program) then :func:`flexora_jax.adalora.allocate` on the host; theirs: ``peft.AdaLoraModel``
with ``update_and_allocate(global_step)`` after ``optimizer.step()``. Both advance the same step counter,
so each timed call does the same allocator work on both sides.

Achieved FLOP/s: :func:`common.lora_step_flops_per_token` with rank ``init_r`` on the AdaLoRA modules (the
P diag(E) Q matmuls cost what a rank-``init_r`` LoRA does; the regulariser's Gram matrices are not counted),
and its share of the machine's peak measured in the same run.

    python -m benchmarks.adalora [--configs h256_l4] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import jax
import optax

from benchmarks import common, harness
from flexora_jax.adalora import AdaLoraConfig, allocate, init_adalora, init_allocator, make_adalora_step
from flexora_jax.config import LoraConfig, ModelConfig
from flexora_jax.models.llama import init_params

#: name -> (model, batch, seq, timed repeats)
CASES = {"h256_l4": ("h256_l4", 8, 128, 15)}
SMOKE = {"tiny": ("tiny", 2, 16, 2)}
LR = 1e-3
ADALORA = AdaLoraConfig(
    target_r=8,
    init_r=12,
    tinit=0,
    tfinal=0,
    deltaT=10,
    total_step=1000,
    lora_alpha=16.0,
    target_modules=("q_proj", "v_proj"),
)


def torch_step_fn(config: ModelConfig, params: Any, batch: dict, threads: int):
    """One torch + peft AdaLoRA training step per call (PEFT's loop), on ``threads`` CPU threads."""
    import peft
    import torch

    model = common.torch_model(config, params)
    a = ADALORA
    model = peft.get_peft_model(
        model,
        peft.AdaLoraConfig(
            target_r=a.target_r,
            init_r=a.init_r,
            tinit=a.tinit,
            tfinal=a.tfinal,
            deltaT=a.deltaT,
            beta1=a.beta1,
            beta2=a.beta2,
            orth_reg_weight=a.orth_reg_weight,
            total_step=a.total_step,
            lora_alpha=a.lora_alpha,
            target_modules=list(a.target_modules),
            task_type="CAUSAL_LM",
        ),
    )  # a bare PeftModel skips the regulariser
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    tb = common.to_torch(batch)
    labels = tb["input_ids"].long().masked_fill(tb["loss_mask"] == 0, -100)
    ids, mask = tb["input_ids"].long(), tb["attention_mask"].long()
    counter = [0]

    def step() -> float:
        torch.set_num_threads(threads)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)  # AdaLoraModel adds the regulariser
        out.loss.backward()
        opt.step()
        model.base_model.update_and_allocate(counter[0])
        opt.zero_grad(set_to_none=True)
        counter[0] += 1
        return float(out.loss.detach())

    return step


def jax_step_fn(config: ModelConfig, params: Any, batch: dict) -> tuple[Any, dict]:
    """(closure running one flexora_jax AdaLoRA step, compile stats)."""
    layers = tuple(range(config.num_hidden_layers))
    opt = optax.adamw(LR, weight_decay=0.0)
    weights = init_adalora(config, ADALORA, jax.random.key(1))
    cell = {"w": weights, "opt": opt.init(weights), "alloc": init_allocator(weights), "step": 0}
    step_fn = make_adalora_step(config, ADALORA, layers, opt)
    compiled, stats = harness.compile_stats(step_fn.jitted, params, cell["w"], cell["opt"], cell["alloc"], batch)

    def step() -> float:  # what step_fn does, with the AOT-compiled program
        alloc = cell["alloc"]
        loss, w, cell["opt"], tracked = compiled(params, cell["w"], cell["opt"], alloc.replace(mask=None), batch)
        cell["alloc"], cell["w"] = allocate(ADALORA, alloc, tracked.replace(mask=alloc.mask), w, cell["step"], layers)
        cell["step"] += 1
        return float(common.block(loss))

    return step, stats


def measure(case: str, model: str, batch_size: int, seq: int, repeats: int, peak: dict | None = None) -> dict:
    config = common.MODELS[model]
    params = init_params(config, jax.random.key(0))
    batch = common.random_batch(config, batch_size, seq)
    jax_step, stats = jax_step_fn(config, params, batch)
    fns = {"flexora_jax": jax_step}
    cores = os.cpu_count() or 1
    for threads in sorted({cores, 1}, reverse=True):  # torch's faster thread setting is the reference
        fns[f"torch_peft_{threads}t"] = torch_step_fn(config, params, batch, threads)
    first_loss = {name: fn() for name, fn in fns.items()}  # the same: task loss + 0.5 x the regulariser
    timings = harness.interleaved(fns, repeats, warmup=1)
    lora = LoraConfig(r=ADALORA.init_r, target_modules=ADALORA.target_modules)
    flops = common.lora_step_flops_per_token(config, seq, lora) * batch_size * seq
    for t in timings.values():
        t.update(harness.throughput(flops, t, peak or harness.machine_peak()))
    best = min((n for n in timings if n.startswith("torch")), key=lambda n: timings[n]["median_s"])
    jt, tt = timings["flexora_jax"]["median_s"], timings[best]["median_s"]
    return {
        "case": case,
        "model": common.describe(config),
        "batch": batch_size,
        "seq": seq,
        "adalora": dataclasses.asdict(ADALORA),
        "lr": LR,
        "first_loss": first_loss,
        "flexora_jax": {**timings.pop("flexora_jax"), **stats},
        "torch_variants": timings,
        "torch_peft": dict(timings[best], variant=best),
        "speedup": tt / jt,
    }


def run(
    smoke: bool = False, configs: list[str] | None = None, out_dir: str | None = None, command: str | None = None
) -> dict:
    """Measure every case; writes ``adalora.json`` (``adalora_smoke.json`` in smoke mode)."""
    begin = harness.start(smoke)
    harness.set_threads()
    cases = SMOKE if smoke else {k: v for k, v in CASES.items() if configs is None or k in configs}
    rows = [measure(name, *spec, peak=begin.peak) for name, spec in cases.items()]
    payload = {"command": command or "python -m benchmarks.adalora" + (" --smoke" if smoke else ""), "rows": rows}
    harness.write_result("adalora_smoke" if smoke else "adalora", payload, out_dir, start=begin)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", choices=sorted(CASES), default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (what the tests run)")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    out = run(a.smoke, a.configs, a.out_dir, harness.command_line("benchmarks.adalora", argv))
    for r in out["rows"]:
        j, t = r["flexora_jax"], r["torch_peft"]
        print(
            f"{r['case']}: flexora_jax {j['median_s'] * 1e3:.1f} ms ({100 * j['share_of_peak']:.0f}% of peak), "
            f"torch+peft {t['median_s'] * 1e3:.1f} ms ({t['variant']}), speedup {r['speedup']:.2f}x; "
            f"first losses {r['first_loss']}"
        )


if __name__ == "__main__":
    main()
