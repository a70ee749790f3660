"""Forward-pass time of the decoder, flexora_jax vs the identical transformers (torch) model.

The base weights are written by ``save_model`` and loaded by ``transformers.LlamaForCausalLM``; both
sides compute fp32 logits for the same batch (torch in eval mode under ``torch.inference_mode``,
flexora_jax's jitted ``forward`` with the library defaults), timed round-robin in one process. torch
runs with as many threads as cores and with 1 thread (the reference is its faster setting: on a shared
machine OpenMP's spinning barriers can make the all-core setting much slower).

Achieved FLOP/s: :func:`common.forward_flops_per_token` (2 N + causal attention) x tokens over the median
time, and its share of the machine's peak measured in the same run (``harness.machine_peak``).

    python -m benchmarks.forward [--smoke]
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from benchmarks import common, harness
from flexora_jax.models.llama import forward, init_params

CASES = {"h256_l4": ("h256_l4", 8, 128, 15)}
SMOKE = {"tiny": ("tiny", 2, 16, 2)}


def measure(case: str, model: str, batch_size: int, seq: int, repeats: int, peak: dict | None = None) -> dict:
    import torch

    config = common.MODELS[model]
    params = init_params(config, jax.random.key(0))
    batch = common.random_batch(config, batch_size, seq)
    fwd = jax.jit(lambda p, ids, mask: forward(config, p, ids, mask))
    compiled, stats = harness.compile_stats(fwd, params, batch["input_ids"], batch["attention_mask"])
    model_t = common.torch_model(config, params).eval()
    tb = common.to_torch(batch)
    ids, mask = tb["input_ids"].long(), tb["attention_mask"].long()

    def jax_fn():
        return common.block(compiled(params, batch["input_ids"], batch["attention_mask"]))

    def torch_fn(threads):
        def fn():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return model_t(input_ids=ids, attention_mask=mask).logits

        return fn

    cores = os.cpu_count() or 1
    fns = {"flexora_jax": jax_fn}
    for threads in sorted({cores, 1}, reverse=True):
        fns[f"torch_{threads}t"] = torch_fn(threads)
    max_diff = float(np.max(np.abs(np.asarray(jax_fn()) - fns[f"torch_{cores}t"]().numpy())))
    timings = harness.interleaved(fns, repeats, warmup=1)
    tokens = batch_size * seq
    flops = common.forward_flops_per_token(config, seq) * tokens
    for t in timings.values():
        t.update(harness.throughput(flops, t, peak or harness.machine_peak()))
    jax_t = timings.pop("flexora_jax")
    best = min(timings, key=lambda n: timings[n]["median_s"])
    return {
        "case": case,
        "model": common.describe(config),
        "batch": batch_size,
        "seq": seq,
        "max_abs_logit_diff": max_diff,
        "flexora_jax": {**jax_t, "tokens_per_s": tokens / jax_t["median_s"], **stats},
        "torch_variants": timings,
        "torch": dict(timings[best], variant=best),
        "speedup": timings[best]["median_s"] / jax_t["median_s"],
    }


def run(smoke: bool = False, out_dir: str | None = None, command: str | None = None) -> dict:
    """Measure every case; writes ``forward.json`` (``forward_smoke.json`` in smoke mode)."""
    begin = harness.start(smoke)
    harness.set_threads()
    rows = [measure(name, *spec, peak=begin.peak) for name, spec in (SMOKE if smoke else CASES).items()]
    payload = {"command": command or "python -m benchmarks.forward" + (" --smoke" if smoke else ""), "rows": rows}
    harness.write_result("forward_smoke" if smoke else "forward", payload, out_dir, start=begin)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (what the tests run)")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    out = run(a.smoke, a.out_dir, harness.command_line("benchmarks.forward", argv))
    for r in out["rows"]:
        print(
            f"{r['case']}: flexora_jax {r['flexora_jax']['median_s'] * 1e3:.1f} ms, torch "
            f"{r['torch']['median_s'] * 1e3:.1f} ms ({r['torch']['variant']}), speedup {r['speedup']:.2f}x, "
            f"max |logit diff| {r['max_abs_logit_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
