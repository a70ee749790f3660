"""Figure 2: the cost of one search step against K plain LoRA steps, per hypergradient estimator.

For K = 1, 2, 4, 8, 16, 32 inner steps: the time of one jitted search step (``make_search_step``:
K inner steps + hypergradient + outer update) divided by the time of K plain LoRA training steps
(``make_train_step`` with the same AdamW, no clipping, constant lr, called K times), both timed
round-robin in one process; and XLA's compiled memory analysis of the search step with and without
remat of the inner scan body. ``darts`` runs one inner step whatever K is, so it is measured at K = 1
only. Also the first (cold) compile time of the search step of a 32-layer model (scan over layers).

FLOPs: a search step is credited with K plain steps' worth (K x :func:`common.lora_step_flops_per_token` x
tokens), so its achieved FLOP/s is the useful work of K plain steps over its time, and its share of the
machine's peak (``harness.machine_peak``, measured in the same run) is the plain step's share divided by the
ratio.

Parts mode (``--parts``, :func:`run_parts`, writes ``search_parts.json``): the time of each part of one
``unrolled`` search step, from public functions only, interleaved in one process: (a) the inner forward
sweep, K inner steps by ``bilevel.unroll`` under jit with no outer gradient; (b) the full jitted search step;
(c) the validation loss and its gradient w.r.t. LoRA and gates alone; (d) the outer Adam update of the
gates alone; the reverse sweep through the K inner steps is (b) - (a) - (c) - (d) (with remat it includes
recomputing the inner forward).

    python -m benchmarks.search [--smoke] [--ks 1 2 4] [--estimators unrolled first_order]
    python -m benchmarks.search --parts [--ks 1 4] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Any

import jax
import optax

from benchmarks import common, harness
from flexora_jax.bilevel import init_search_state, inner_optimizer, make_search_step, outer_optimizer, unroll
from flexora_jax.config import FinetuneConfig, SearchConfig
from flexora_jax.gates import init_gates
from flexora_jax.lora import init_lora
from flexora_jax.models.attention import stage_config
from flexora_jax.models.llama import init_params
from flexora_jax.models.losses import lm_loss
from flexora_jax.train import init_train_state, make_optimizer, make_train_step

FULL = dict(
    model="h256_l4",
    batch=4,
    seq=64,
    ks=(1, 2, 4, 8, 16, 32),
    repeats=3,
    estimators=("unrolled", "first_order", "forward", "darts"),
    deep_model="h256_l32",
    deep_k=4,
)
# smoke (seconds count: every variant is a compile): K = 1 with ``unrolled`` (remat on / off) and ``darts`` (its
# K = 1 branch), K = 2 with ``unrolled`` (remat, for the memory ratio); ``first_order`` and ``forward`` take the
# same code path here (a SearchConfig field) and are tested in tests/test_bilevel.py
SMOKE = dict(
    model="tiny",
    batch=2,
    seq=8,
    ks=(1, 2),
    repeats=1,
    estimators=("unrolled", "darts"),
    deep_model="tiny",
    deep_k=1,
    later_estimators=("unrolled",),
    later_noremat=False,
)
# GPU mode: the 1B LLaMA shape in bf16 at sequence 2048 (batch 2: K unrolled inner steps fit with remat)
GPU = dict(
    model="llama_1b",
    batch=2,
    seq=2048,
    ks=(1, 2, 4, 8),
    repeats=3,
    estimators=("unrolled", "first_order"),
    deep_model="llama_1b",
    deep_k=4,
)
TARGET_TIME_RATIO = 3.0  # search step <= 3x the time of K plain steps
TARGET_MEMORY_RATIO = 1.5  # with remat: memory at K = 32 <= 1.5x memory at K = 1


def _fresh_lora(config):
    return init_lora(config, common.LORA, jax.random.key(1))


def search_variant(config, params, search: SearchConfig, batches, val) -> tuple[Any, dict]:
    """(closure running one search step, compile stats) for ``search``."""
    gates = init_gates("layer", config.num_hidden_layers)
    state = init_search_state(_fresh_lora(config), gates, search)
    compiled, stats = harness.compile_stats(
        jax.jit(make_search_step(config, search), donate_argnums=1), params, state, batches, val
    )
    cell = {"state": state}

    def step():
        cell["state"], metrics = compiled(params, cell["state"], batches, val)
        return common.block(metrics["val_loss"])

    return step, stats


def plain_steps(config, params, k: int, batch) -> tuple[Any, dict]:
    """(closure running K plain LoRA steps with the inner optimizer's settings, compile stats)."""
    cfg = FinetuneConfig(
        batch_size=batch["input_ids"].shape[0],
        lr=SearchConfig().inner_lr,
        schedule="constant",
        grad_clip=0.0,
        optimizer="adamw",
    )
    state = init_train_state(_fresh_lora(config), make_optimizer(cfg, 1))
    compiled, stats = harness.compile_stats(
        jax.jit(make_train_step(config, cfg, 1), donate_argnums=1), params, state, batch
    )
    cell = {"state": state}

    def steps():
        for _ in range(k):
            cell["state"], metrics = compiled(params, cell["state"], batch)
        return common.block(metrics["loss"])

    return steps, stats


def measure_k(
    config,
    params,
    k: int,
    estimators,
    batch: int,
    seq: int,
    repeats: int,
    peak: dict | None = None,
    noremat: bool = True,
) -> dict:
    """Every estimator's search step (``unrolled`` also without remat, unless ``noremat`` is False) against K plain
    steps at one K."""
    batches = common.random_batch(config, batch, seq, seed=1, k=k)
    val = common.random_batch(config, batch, seq, seed=2)
    one = jax.tree.map(lambda x: x[0], batches)
    fns, compile_info = {}, {}
    fns["plain"], compile_info["plain"] = plain_steps(config, params, k, one)
    for est in estimators:
        if est == "darts" and k != 1:
            continue
        modes = [("", "mixed", True)]  # unrolled: mixed mode (the default), and reverse mode with / without remat
        if est == "unrolled":
            modes += [("_reverse", "reverse", True)] + ([("_noremat", "reverse", False)] if noremat else [])
        for suffix, mode, remat in modes:
            name = f"{est}{suffix}"
            search = SearchConfig(
                hypergradient=est,
                inner_steps=k,
                batch_size=batch,
                val_batch_size=batch,
                remat=remat,
                unrolled_mode=mode,
            )
            fns[name], compile_info[name] = search_variant(config, params, search, batches, val)
    timings = harness.interleaved(fns, repeats, warmup=1)
    plain = timings["plain"]["median_s"]
    flops = k * plain_step_flops(config, batch, seq)  # every variant: K plain steps' worth
    rows = {
        name: {
            **t,
            **compile_info[name],
            **harness.throughput(flops, t, peak or harness.machine_peak()),
            "ratio_to_plain": t["median_s"] / plain,
        }
        for name, t in timings.items()
    }
    return {"k": k, "plain_step_s": plain / k, "plain_step_flops": flops / k, "variants": rows}


def plain_step_flops(config, batch: int, seq: int) -> float:
    """Model FLOPs of one plain LoRA step on a ``batch x seq`` batch (the unit a search step is counted in)."""
    return common.lora_step_flops_per_token(config, seq) * batch * seq


def deep_compile(model: str, k: int, batch: int, seq: int, fresh: bool = True) -> dict:
    """First compile of the unrolled search step of a deep model, from abstract shapes (nothing runs).

    ``fresh`` traces a new function, so nothing compiled earlier in the process is reused; smoke mode turns it
    off, so the tiny model's step compiled here is the K = 1 step measured next (one compile, not two)."""
    config = common.MODELS[model]
    search = SearchConfig(hypergradient="unrolled", inner_steps=k, batch_size=batch, val_batch_size=batch)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    state = jax.eval_shape(
        lambda: init_search_state(_fresh_lora(config), init_gates("layer", config.num_hidden_layers), search)
    )
    batches = jax.eval_shape(lambda: common.random_batch(config, batch, seq, k=k))
    val = jax.eval_shape(lambda: common.random_batch(config, batch, seq))
    step = make_search_step(config, search)
    if fresh:
        step = functools.partial(step)  # a new callable: traced and compiled afresh, whatever ran before
    t0 = time.perf_counter()
    _, stats = harness.compile_stats(jax.jit(step, donate_argnums=1), params, state, batches, val)
    return {
        "model": common.describe(config),
        "k": k,
        "batch": batch,
        "seq": seq,
        "search": dataclasses.asdict(search),
        "first_compile_s": time.perf_counter() - t0,
        **stats,
        "target_s": 60.0,
    }


def run(
    smoke: bool = False,
    out_dir: str | None = None,
    command: str | None = None,
    ks: tuple[int, ...] | None = None,
    estimators: tuple[str, ...] | None = None,
    gpu: bool = False,
) -> dict:
    """Measure every K; writes ``search.json`` (``search_smoke.json`` in smoke mode, ``search_gpu.json``
    in GPU mode)."""
    if gpu:
        common.require_gpu("search")
    begin = harness.start(smoke)
    spec = dict(SMOKE if smoke else GPU if gpu else FULL)
    spec["ks"] = tuple(ks or spec["ks"])
    spec["estimators"] = tuple(estimators or spec["estimators"])
    config = common.MODELS[spec["model"]]
    params = init_params(config, jax.random.key(0))
    deep = deep_compile(spec["deep_model"], spec["deep_k"], spec["batch"], spec["seq"], fresh=not smoke)
    later = spec.get("later_estimators", spec["estimators"])
    rows = [
        measure_k(
            config,
            params,
            k,
            spec["estimators"] if i == 0 else later,
            spec["batch"],
            spec["seq"],
            spec["repeats"],
            begin.peak,
            noremat=i == 0 or spec.get("later_noremat", True),
        )
        for i, k in enumerate(spec["ks"])
    ]
    mem = {
        name: {r["k"]: r["variants"][name]["memory"] for r in rows if name in r["variants"]}
        for name in ("unrolled", "unrolled_reverse", "unrolled_noremat")
    }
    k_lo, k_hi = min(spec["ks"]), max(spec["ks"])

    def mem_ratio(name):
        m = mem.get(name, {})
        if k_lo not in m or k_hi not in m:
            return None
        return m[k_hi]["footprint_bytes"] / m[k_lo]["footprint_bytes"]

    payload = {
        "command": command or "python -m benchmarks.search" + (" --smoke" if smoke else " --gpu" if gpu else ""),
        "device": jax.devices()[0].device_kind,
        "model": common.describe(config),
        "batch": spec["batch"],
        "seq": spec["seq"],
        "lora": common.LORA.to_dict(),
        "rows": rows,
        "memory_ratio_kmax_over_kmin": {
            "mixed": mem_ratio("unrolled"),
            "remat": mem_ratio("unrolled_reverse"),
            "no_remat": mem_ratio("unrolled_noremat"),
            "k_min": k_lo,
            "k_max": k_hi,
        },
        "deep_compile": deep,
        "targets": {"time_ratio": TARGET_TIME_RATIO, "memory_ratio": TARGET_MEMORY_RATIO},
    }
    harness.write_result("search_smoke" if smoke else "search_gpu" if gpu else "search", payload, out_dir, start=begin)
    return payload


PARTS_KS = (1, 4)
SMOKE_PARTS_KS = (1,)


def measure_parts(
    config, params, k: int, batch: int, seq: int, repeats: int, peak: dict, estimator: str = "unrolled"
) -> dict:
    """Median time of each part of one ``estimator`` search step and of K plain steps, interleaved.

    Public functions only (``unroll``, the losses, the inner / outer optimizers, ``make_search_step``), so it
    measures whatever the library's search step does today; the first-order parts run the attention of a
    first-order stage and the step its own (``stage_config``, as ``make_search_step`` chooses them).
    """
    search = SearchConfig(hypergradient=estimator, inner_steps=k, batch_size=batch, val_batch_size=batch)
    staged = stage_config(config, estimator, search.darts_mode)
    first = stage_config(config)
    batches = common.random_batch(config, batch, seq, seed=1, k=k)
    val = common.random_batch(config, batch, seq, seed=2)
    gates = init_gates("layer", config.num_hidden_layers)
    state = init_search_state(_fresh_lora(config), gates, search)
    inner_opt, outer_opt = inner_optimizer(search), outer_optimizer(search)

    def losses(p):  # the frozen base is an argument, as in the search step (not a constant of the program)
        return lambda lora, g, b: lm_loss(first, p, lora, g, b)

    def inner_sweep(p, inner, g, bs):  # (a): K inner steps, no outer gradient
        return unroll(losses(p), inner_opt, g, inner, bs, search.remat, search.reset_inner_optimizer)

    def val_grad(p, lora, g, b):  # (c): the reverse sweep's seed and the gates' direct partial
        return jax.value_and_grad(losses(p), argnums=(0, 1))(lora, g, b)

    def outer_update(hg, opt_state, g):  # (d)
        updates, opt_state = outer_opt.update(hg, opt_state, g)
        return optax.apply_updates(g, updates), opt_state

    jitted = {
        "inner_forward": (jax.jit(inner_sweep), (params, state.inner, state.gates, batches)),
        "val_grad": (jax.jit(val_grad), (params, state.inner.lora, state.gates, val)),
        "outer_update": (jax.jit(outer_update), (state.gates, state.gate_opt_state, state.gates)),
    }
    fns, info = {}, {}
    fns["plain"], info["plain"] = plain_steps(config, params, k, jax.tree.map(lambda x: x[0], batches))
    fns["search_step"], info["search_step"] = search_variant(config, params, search, batches, val)
    for name, (fn, args) in jitted.items():
        compiled, info[name] = harness.compile_stats(fn, *args)
        fns[name] = functools.partial(lambda c, a: common.block(c(*a)), compiled, args)
    timings = harness.interleaved(fns, repeats, warmup=1)
    med = {name: t["median_s"] for name, t in timings.items()}
    reverse = med["search_step"] - med["inner_forward"] - med["val_grad"] - med["outer_update"]
    plain = med["plain"]
    flops = k * plain_step_flops(config, batch, seq)
    parts = {name: {**t, **info[name], "over_k_plain": t["median_s"] / plain} for name, t in timings.items()}
    parts["search_step"].update(harness.throughput(flops, timings["search_step"], peak))
    parts["plain"].update(harness.throughput(flops, timings["plain"], peak))
    return {
        "k": k,
        "estimator": estimator,
        "remat": search.remat,
        "attention": {"first_order": first.attention, "second_order": staged.attention},
        "parts": parts,
        "reverse_sweep_s": reverse,
        "reverse_sweep_over_k_plain": reverse / plain,
        "search_over_k_plain": med["search_step"] / plain,
    }


def run_parts(
    smoke: bool = False, out_dir: str | None = None, command: str | None = None, ks: tuple[int, ...] | None = None
) -> dict:
    """The parts of one ``unrolled`` search step per K; writes ``search_parts.json`` (``_smoke`` in smoke mode)."""
    begin = harness.start(smoke)
    spec = SMOKE if smoke else FULL
    ks = tuple(ks or (SMOKE_PARTS_KS if smoke else PARTS_KS))
    config = common.MODELS[spec["model"]]
    params = init_params(config, jax.random.key(0))
    rows = [
        measure_parts(
            config, params, k, spec["batch"], spec["seq"], max(spec["repeats"], 1 if smoke else 5), begin.peak
        )
        for k in ks
    ]
    payload = {
        "command": command or "python -m benchmarks.search --parts" + (" --smoke" if smoke else ""),
        "model": common.describe(config),
        "batch": spec["batch"],
        "seq": spec["seq"],
        "lora": common.LORA.to_dict(),
        "rows": rows,
    }
    harness.write_result("search_parts_smoke" if smoke else "search_parts", payload, out_dir, start=begin)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (what the tests run)")
    p.add_argument("--ks", nargs="*", type=int, default=None)
    p.add_argument("--estimators", nargs="*", default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--gpu", action="store_true", help="1B LLaMA shape, bf16, sequence 2048, on the GPU")
    p.add_argument("--parts", action="store_true", help="time the parts of one unrolled search step instead")
    a = p.parse_args(argv)
    if a.parts:
        out = run_parts(a.smoke, a.out_dir, harness.command_line("benchmarks.search", argv), a.ks)
        for r in out["rows"]:
            print(
                f"K={r['k']}: "
                + ", ".join(
                    f"{n} {v['median_s'] * 1e3:.1f} ms ({v['over_k_plain']:.2f}x K plain)"
                    for n, v in r["parts"].items()
                )
                + f"; reverse sweep {r['reverse_sweep_s'] * 1e3:.1f} ms ({r['reverse_sweep_over_k_plain']:.2f}x)"
            )
        return
    out = run(a.smoke, a.out_dir, harness.command_line("benchmarks.search", argv), a.ks, a.estimators, gpu=a.gpu)
    for r in out["rows"]:
        parts = ", ".join(f"{n} {v['ratio_to_plain']:.2f}x" for n, v in r["variants"].items() if n != "plain")
        print(f"K={r['k']}: plain step {r['plain_step_s'] * 1e3:.1f} ms; search / K plain: {parts}")
    print("memory K_max/K_min:", out["memory_ratio_kmax_over_kmin"])
    print(f"32-layer first compile: {out['deep_compile']['first_compile_s']:.1f} s")


if __name__ == "__main__":
    main()
