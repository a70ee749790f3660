"""The decoder's attention cores side by side: checkpointed query blocks ("xla") vs blockwise flash ("flash").

Per case (batch, tokens, heads, head dim) and core, timed round-robin in one process (``harness.interleaved``,
medians): the forward alone (scoring), forward + backward (a fine-tune step's attention), and the gradient
of a function of the gradient (the ``unrolled`` hypergradient's reverse-over-reverse; small cases only).
Every core is checked against the first one (values and gradients) before it is timed. ``--step`` adds the
whole LoRA fine-tune step (``make_train_step``, ``benchmarks.finetune``'s model, batch and optimizer) with
``ModelConfig.attention`` set to each core. ``--blocks 32x1024 64x128`` adds flash with those (query block x
key tile) sizes; ``--gpu --dtypes float32 bfloat16`` times the 1B LLaMA shape at 2048 tokens (cuDNN too, in
bf16 on an NVIDIA GPU). Writes ``benchmarks/results/attention.json`` (``attention_smoke.json`` with ``--smoke``,
``attention_gpu.json`` with ``--gpu``).

    python -m benchmarks.attention [--smoke] [--cases h256_t128 ...] [--blocks QxK ...] [--step] [--gpu]
                                   [--dtypes float32 bfloat16] [--out-dir D]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, harness
from flexora_jax.config import FinetuneConfig
from flexora_jax.lora import init_lora
from flexora_jax.models.attention import cudnn_attention, device_platform, query_block, recompute_blocked_attention_hm
from flexora_jax.models.flash import flash_attention, flash_blocks
from flexora_jax.models.llama import attention_bias, init_params
from flexora_jax.train import init_train_state, make_optimizer, make_train_step

#: name -> (batch, tokens, query heads, KV heads, head dim, timed repeats, time the second order)
CASES = {
    "h256_t128": (8, 128, 8, 8, 32, 15, True),
    "h768_t128": (4, 128, 12, 12, 64, 15, True),
    "h256_t512": (2, 512, 8, 8, 32, 7, False),
    "h768_t512": (1, 512, 12, 12, 64, 7, False),
    "h256_t1024": (1, 1024, 8, 8, 32, 5, False),
    "h768_t1024": (1, 1024, 12, 12, 64, 5, False),
}
SMOKE = {"tiny_gqa": (2, 40, 4, 2, 8, 1, True)}
#: ``--gpu``: the 1B LLaMA shape of ``benchmarks.gpu`` (GQA 32 / 4 heads, head dim 64) at 2048 tokens
GPU_CASES = {"llama1b_t2048": (2, 2048, 32, 4, 64, 10, True)}
#: fine-tune step cases: name -> (model in benchmarks.common.MODELS, batch, tokens, timed repeats)
STEP_CASES = {"h256_l4": ("h256_l4", 8, 128, 12)}
SMOKE_STEP = {"tiny": ("tiny", 2, 16, 1)}
Core = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def cores(t: int, blocks: list[tuple[int, int]], dtype: str = "float32") -> dict[str, Core]:
    """The cores compared at ``t`` tokens: the XLA default, flash's default, flash at each ``blocks`` size,
    and cuDNN's fused attention on an NVIDIA GPU in bf16 / fp16."""
    out: dict[str, Core] = {
        "xla": lambda q, k, v, bias: recompute_blocked_attention_hm(q, k, v, bias, query_block(t)),
        "flash": lambda q, k, v, bias: flash_attention(q, k, v, bias, *flash_blocks(t)),
    }
    for bq, bk in blocks:
        out[f"flash_{bq}x{bk}"] = lambda q, k, v, bias, bq=bq, bk=bk: flash_attention(q, k, v, bias, bq, bk)
    if dtype in ("bfloat16", "float16") and device_platform() == "cuda":
        out["cudnn"] = cudnn_attention
    return out


def _inputs(b: int, t: int, h: int, nk: int, e: int, dtype: str = "float32") -> tuple[jax.Array, ...]:
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, nk, h // nk, e), dtype)
    k, v = (jax.random.normal(key, (b, t, nk, e), dtype) for key in ks[1:3])
    mask = np.ones((b, t), np.int32)
    mask[0, : t // 8] = 0  # one left-padded row: fully masked query rows are part of the work
    return q, k, v, jax.random.normal(ks[3], q.shape, dtype), attention_bias(jnp.asarray(mask), b, t).astype(dtype)


def _programs(core: Core, w: jax.Array, bias: jax.Array) -> dict[str, Callable]:
    def loss(q, k, v):
        return jnp.sum(core(q, k, v, bias) * w)

    def grad_norm(q, k, v):
        return sum(jnp.sum(g * g) for g in jax.grad(loss, (0, 1, 2))(q, k, v))

    return {
        "forward": jax.jit(lambda q, k, v: core(q, k, v, bias)),
        "forward_backward": jax.jit(jax.value_and_grad(loss, (0, 1, 2))),
        "second_order": jax.jit(jax.grad(grad_norm, (0, 1, 2))),
    }


def _max_diff(a: Any, b: Any) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def measure_cores(
    case: str,
    b: int,
    t: int,
    h: int,
    nk: int,
    e: int,
    repeats: int,
    second: bool,
    blocks: list[tuple[int, int]],
    dtype: str = "float32",
) -> dict:
    """Compile and time every core's programs; the max abs difference of each to the first core's result."""
    q, k, v, w, bias = _inputs(b, t, h, nk, e, dtype)
    live = (jnp.max(bias[:, 0], axis=-1) > -1.0)[:, :, None, None, None]  # rows that see a key
    kinds = ("forward", "forward_backward") + (("second_order",) if second else ())
    row: dict[str, Any] = {
        "case": case,
        "dtype": dtype,
        "batch": b,
        "tokens": t,
        "heads": h,
        "kv_heads": nk,
        "head_dim": e,
        "flash_blocks": flash_blocks(t),
        "xla_query_block": query_block(t),
    }
    for kind in kinds:
        fns, compile_s, results = {}, {}, {}
        for name, core in cores(t, blocks, dtype).items():
            if name == "cudnn" and kind == "second_order":
                continue  # no second-order rule
            compiled, stats = harness.compile_stats(_programs(core, w, bias)[kind], q, k, v)
            out = compiled(q, k, v)
            results[name] = jax.tree.map(lambda x: x.astype(jnp.float32), out * live if kind == "forward" else out)
            compile_s[name] = stats["compile_s"]
            fns[name] = lambda compiled=compiled: jax.block_until_ready(compiled(q, k, v))
        timings = harness.interleaved(fns, repeats, warmup=1)
        ref = next(iter(results.values()))
        row[kind] = {
            name: {
                **timings[name],
                "compile_s": compile_s[name],
                "max_abs_diff": _max_diff(results[name], ref),
                "speedup_vs_xla": timings["xla"]["median_s"] / timings[name]["median_s"],
            }
            for name in fns
        }
        print(
            f"{case} {dtype} {kind}: "
            + ", ".join(f"{n} {r['median_s'] * 1e3:.1f} ms ({r['speedup_vs_xla']:.2f}x)" for n, r in row[kind].items()),
            flush=True,
        )
    return row


def measure_step(case: str, model: str, batch_size: int, seq: int, repeats: int, backends: list[str]) -> dict:
    """The LoRA fine-tune step of ``benchmarks.finetune`` with each attention backend, round-robin."""
    cfg = FinetuneConfig(batch_size=batch_size)
    params = init_params(common.MODELS[model], jax.random.key(0))
    batch = common.random_batch(common.MODELS[model], batch_size, seq)
    fns, stats, first = {}, {}, {}
    for backend in backends:
        config = dataclasses.replace(common.MODELS[model], attention=backend)
        state = init_train_state(init_lora(config, common.LORA, jax.random.key(1), params), make_optimizer(cfg, 1000))
        step = make_train_step.__wrapped__(config, cfg, 1000)  # uncached: one fresh program per backend
        compiled, stats[backend] = harness.compile_stats(jax.jit(step, donate_argnums=1), params, state, batch)
        cell = {"state": state}

        def run(compiled=compiled, cell=cell) -> float:
            cell["state"], metrics = compiled(params, cell["state"], batch)
            return float(metrics["loss"])

        first[backend], fns[backend] = run(), run
    timings = harness.interleaved(fns, repeats, warmup=1)
    return {
        "case": case,
        "model": common.describe(common.MODELS[model]),
        "batch": batch_size,
        "seq": seq,
        "first_loss": first,
        "steps": {
            n: {**timings[n], **stats[n], "speedup_vs_xla": timings["xla"]["median_s"] / timings[n]["median_s"]}
            for n in backends
        },
    }


def run(
    smoke: bool = False,
    cases: list[str] | None = None,
    blocks: list[tuple[int, int]] | None = None,
    step: bool = False,
    out_dir: str | None = None,
    command: str | None = None,
    gpu: bool = False,
    dtypes: tuple[str, ...] = ("float32",),
) -> dict:
    """Measure; writes ``attention.json`` (``attention_smoke.json``, ``attention_gpu.json``); returns the payload."""
    table = SMOKE if smoke else GPU_CASES if gpu else CASES
    table = {k: v for k, v in table.items() if smoke or cases is None or k in cases}
    rows = [
        measure_cores(name, *spec, blocks=blocks or [], dtype=dtype) for name, spec in table.items() for dtype in dtypes
    ]
    steps = []
    if step or smoke:
        steps = [
            measure_step(name, *spec, backends=["xla", "flash"])
            for name, spec in (SMOKE_STEP if smoke else STEP_CASES).items()
        ]
    payload = {
        "command": command or "python -m benchmarks.attention" + (" --smoke" if smoke else ""),
        "rows": rows,
        "steps": steps,
    }
    harness.write_result("attention_smoke" if smoke else "attention_gpu" if gpu else "attention", payload, out_dir)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (what the tests run)")
    p.add_argument("--cases", nargs="*", choices=sorted(CASES) + sorted(GPU_CASES), default=None)
    p.add_argument("--gpu", action="store_true", help="the 1B LLaMA attention shape at 2048 tokens (GPU_CASES)")
    p.add_argument("--dtypes", nargs="*", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--blocks", nargs="*", default=[], help="extra flash tilings, QUERYxKEY (e.g. 64x128)")
    p.add_argument("--step", action="store_true", help="also time the whole fine-tune step per backend")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    blocks = [tuple(int(x) for x in s.lower().split("x")) for s in a.blocks]
    out = run(
        a.smoke,
        a.cases,
        blocks,
        a.step,
        a.out_dir,
        harness.command_line("benchmarks.attention", argv),
        a.gpu,
        tuple(a.dtypes),
    )
    for row in out["steps"]:
        print(
            f"step {row['case']}: "
            + ", ".join(
                f"{n} {r['median_s'] * 1e3:.1f} ms ({r['speedup_vs_xla']:.2f}x)" for n, r in row["steps"].items()
            )
        )


if __name__ == "__main__":
    main()
