"""Greedy generation throughput (new tokens/s): flexora_jax's KV-cache ``generate`` vs transformers' ``generate``.

Both sides run the same weights (``save_model`` -> ``transformers.LlamaForCausalLM``, fp32) on the same
random prompts, greedy, with EOS disabled so every row generates exactly ``new`` tokens
(transformers: ``min_new_tokens = max_new_tokens``; ours: no EOS id). transformers uses its default
dynamic KV cache under ``torch.inference_mode`` with 1 thread: on this shared 2-core machine the
all-core setting was 5-10x slower (b1: 14.4 s vs 2.0 s; b32: 72 s vs 6.6 s) and its spinning OpenMP
threads slowed the runs interleaved with it (``--torch-all-cores`` adds it back). Timed round-robin
in one process after a warm-up call (so our figure excludes compilation, which is reported
separately); the first row's tokens are checked to be identical.

    python -m benchmarks.bench_generate [--smoke]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from benchmarks import common, harness
from flexora_jax.generation import _decode, generate
from flexora_jax.models.llama import init_params

#: case -> (model, batch, prompt tokens, new tokens, repeats)
CASES = {"h256_l4_b1": ("h256_l4", 1, 32, 128, 5), "h256_l4_b32": ("h256_l4", 32, 32, 128, 5)}
SMOKE = {"tiny_b1": ("tiny", 1, 8, 8, 2), "tiny_b4": ("tiny", 4, 8, 8, 2)}


def measure(
    case: str, model: str, batch: int, prompt_len: int, new: int, repeats: int, torch_all_cores: bool = False
) -> dict:
    import torch

    config = common.MODELS[model]
    params = init_params(config, jax.random.key(0), head_std=0.5)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, (batch, prompt_len)).tolist()
    model_t = common.torch_model(config, params).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def ours():
        return generate(config, params, prompts, max_new_tokens=new, eos_token_id=-1, batch_size=batch)

    def torch_fn(threads):
        def fn():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return model_t.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )

        return fn

    before = _decode._cache_size()
    t0 = time.perf_counter()
    first = ours()
    compile_s = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    fns = {"flexora_jax": ours}
    for threads in sorted({cores, 1} if torch_all_cores else {1}, reverse=True):
        fns[f"torch_{threads}t"] = torch_fn(threads)
    ref = fns["torch_1t"]()[0, prompt_len:].tolist()
    timings = harness.interleaved(fns, repeats, warmup=1)
    jax_t = timings.pop("flexora_jax")
    best = min(timings, key=lambda n: timings[n]["median_s"])
    tokens = batch * new
    for t in timings.values():
        t["tokens_per_s"] = tokens / t["median_s"]
    return {
        "case": case,
        "model": common.describe(config),
        "batch": batch,
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "same_tokens_row0": first.tokens[0] == ref,
        "flexora_jax": {
            **jax_t,
            "tokens_per_s": tokens / jax_t["median_s"],
            "first_call_s": compile_s,
            "programs_compiled": _decode._cache_size() - before,
        },
        "torch_variants": timings,
        "torch": dict(timings[best], variant=best),
        "speedup": timings[best]["median_s"] / jax_t["median_s"],
    }


def run(
    smoke: bool = False, out_dir: str | None = None, command: str | None = None, torch_all_cores: bool = False
) -> dict:
    """Measure every case; writes ``generate.json`` (``generate_smoke.json`` in smoke mode)."""
    harness.set_threads()
    rows = [measure(name, *spec, torch_all_cores=torch_all_cores) for name, spec in (SMOKE if smoke else CASES).items()]
    payload = {
        "command": command or "python -m benchmarks.bench_generate" + (" --smoke" if smoke else ""),
        "rows": rows,
    }
    harness.write_result("generate_smoke" if smoke else "generate", payload, out_dir)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--torch-all-cores", action="store_true", help="also time torch with every core")
    a = p.parse_args(argv)
    out = run(a.smoke, a.out_dir, harness.command_line("benchmarks.bench_generate", argv), a.torch_all_cores)
    for r in out["rows"]:
        print(
            f"{r['case']}: flexora_jax {r['flexora_jax']['tokens_per_s']:.0f} tok/s, torch "
            f"{r['torch']['tokens_per_s']:.0f} tok/s ({r['torch']['variant']}), speedup {r['speedup']:.2f}x, "
            f"same tokens {r['same_tokens_row0']}, first call {r['flexora_jax']['first_call_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
