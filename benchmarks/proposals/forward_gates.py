"""Probe (issue 31): how the ``forward`` hypergradient's cost grows with the number of gates.

``forward`` differentiates the K inner steps with ``jax.jacfwd``: one tangent per gate, pushed through every
inner step's gradient (forward-over-reverse), so its cost grows linearly with the number of gates L, while
``unrolled`` (one reverse or mixed sweep) does not depend on L. This script measures both against K plain steps
on the search benchmark's shape (hidden 256, batch 4 x 64, LoRA r = 8 on q, v, K = 4) at L = 2, 4, 8, 16 layers
(one gate per layer) with ``benchmarks.search.measure_k``. Run: ``python benchmarks/proposals/forward_gates.py``.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax

from benchmarks import common, harness, search
from flexora_jax.models.llama import init_params


def main(layers=(2, 4, 8, 16), k: int = 4) -> dict:
    begin = harness.start(False)
    rows = []
    for n in layers:
        config = dataclasses.replace(common.MODELS["h256_l4"], num_hidden_layers=n)
        params = init_params(config, jax.random.key(0))
        out = search.measure_k(config, params, k, ("unrolled", "forward"), 4, 64, 3, begin.peak, noremat=False)
        ratios = {name: round(v["ratio_to_plain"], 2) for name, v in out["variants"].items()}
        rows.append({"layers": n, "plain_step_ms": out["plain_step_s"] * 1e3, "over_k_plain": ratios})
        print(json.dumps(rows[-1]), flush=True)
    payload = {
        "k": k,
        "rows": rows,
        "load": harness.load_text({"load": {"start": begin.load, "end": harness.load_avg()}, "machine": {}}),
    }
    json.dump(payload, sys.stdout, indent=1)
    print()
    return payload


if __name__ == "__main__":
    main()
