"""Probe (issue 31): are the fine-tune step's matmuls themselves slower in XLA:CPU than in torch?

The LoRA fine-tune step of section 1 is mostly the frozen base's matmuls: per layer the seven projections
forward and their input gradients backward, plus the LM head. This script times exactly those fp32 matmul shapes
(tokens x d_in @ d_in x d_out forward, tokens x d_out @ d_out x d_in for the input gradient) one by one, best of
N calls, in ``jax.jit(jnp.dot)`` (all shapes first) and ``torch.mm`` (at 2, then 1 threads), and sums them with each shape's count
per step: the matmul time of one step in each library, against the step times of section 1.
Run: ``PYTHONPATH=. python benchmarks/proposals/matmul_shapes.py``.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import common, harness

CASES = {"h256_l4": 8 * 128, "h768_l12": 4 * 128}  # model -> tokens per step (section 1's batch x seq)


def shapes(config, tokens: int) -> dict[tuple[int, int, int], int]:
    """(m, k, n) -> count per step: the seven projections and the LM head, forward and input gradient."""
    d, f, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    per_layer = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    out: dict[tuple[int, int, int], int] = {}
    for k, n in per_layer * n_layers + [(d, v)]:
        for shape in ((tokens, k, n), (tokens, n, k)):  # forward, input gradient
            out[shape] = out.get(shape, 0) + 1
    return out


def best(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> dict:
    begin = harness.start(False)
    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    rows = []
    for name, tokens in CASES.items():
        config = common.MODELS[name]
        total = {"jax": 0.0, "torch_2t": 0.0, "torch_1t": 0.0}
        operands = {
            shape: (rng.standard_normal(shape[:2], np.float32), rng.standard_normal(shape[1:], np.float32))
            for shape in shapes(config, tokens)
        }
        # every jax call before any torch call: torch's OpenMP threads spin after each call and would steal the
        # cores from a jax call timed right after one (measured: up to 1.3x slower jax matmuls when interleaved)
        for shape, (a, b) in operands.items():
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            total["jax"] += shapes(config, tokens)[shape] * best(lambda ja=ja, jb=jb: dot(ja, jb).block_until_ready())
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for shape, (a, b) in operands.items():
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                total[f"torch_{threads}t"] += shapes(config, tokens)[shape] * best(
                    lambda ta=ta, tb=tb: torch.mm(ta, tb)
                )
        flops = sum(2 * m * k * n * c for (m, k, n), c in shapes(config, tokens).items())
        row = {
            "case": name,
            "tokens": tokens,
            "matmul_ms": {key: value * 1e3 for key, value in total.items()},
            "matmul_gflop": flops / 1e9,
            "torch_best_over_jax": min(total["torch_2t"], total["torch_1t"]) / total["jax"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    payload = {
        "rows": rows,
        "peak": begin.peak,
        "load": harness.load_text({"load": {"start": begin.load, "end": harness.load_avg()}, "machine": {}}),
    }
    json.dump(payload, sys.stdout, indent=1, default=str)
    print()
    return payload


if __name__ == "__main__":
    main()
