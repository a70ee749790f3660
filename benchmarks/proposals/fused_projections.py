"""Probe (issue 31): would fusing q/k/v (and gate/up) into one matmul each close the fine-tune gap?

torch + peft and flexora_jax both run the seven projections of a block as separate matmuls. One wider matmul
over concatenated weights uses XLA:CPU's dot better (more columns per call). This script times, per layer of
section 1's shapes, the projections' forward and input gradient (``jax.vjp`` in x) separately and fused, best of
N jitted calls, and scales the saving by the layer count against the step's median time in
``benchmarks/results/finetune.json``: the most a fused layout could give the step.
Run: ``PYTHONPATH=. python benchmarks/proposals/fused_projections.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, harness
from benchmarks.proposals.matmul_shapes import CASES, best

RESULTS = Path(__file__).resolve().parents[1] / "results" / "finetune.json"


@jax.jit
def _separate(x, *ws):
    """The frozen base's forward through separate matmuls and its input gradient (cotangent = the outputs)."""
    out, pull = jax.vjp(lambda x: [x @ w for w in ws], x)
    return pull(out)[0]


@jax.jit
def _fused(x, w):
    """The same through one matmul over the concatenated weights."""
    out, pull = jax.vjp(lambda x: x @ w, x)
    return pull(out)[0]


def step_ms(case: str) -> float | None:
    """Our step's median ms for ``case`` in the last fine-tune run, if its JSON is there."""
    if not RESULTS.exists():
        return None
    for row in json.loads(RESULTS.read_text()).get("rows", []):
        if row.get("case") == case:
            return row["flexora_jax"]["median_s"] * 1e3
    return None


def main() -> dict:
    begin = harness.start(False)
    rng = np.random.default_rng(0)
    rows = []
    for name, tokens in CASES.items():
        config = common.MODELS[name]
        d, f = config.hidden_size, config.intermediate_size
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        x = jnp.asarray(rng.standard_normal((tokens, d), np.float32))
        row = {"case": name, "tokens": tokens, "layers": config.num_hidden_layers}
        for group, widths in (("qkv", (q, kv, kv)), ("gate_up", (f, f))):
            ws = [jnp.asarray(rng.standard_normal((d, n), np.float32)) for n in widths]
            separate = best(lambda x=x, ws=ws: _separate(x, *ws).block_until_ready())
            wide = jnp.concatenate(ws, axis=1)
            together = best(lambda x=x, wide=wide: _fused(x, wide).block_until_ready())
            row[group] = {"separate_ms": separate * 1e3, "fused_ms": together * 1e3}
        saved = sum(row[g]["separate_ms"] - row[g]["fused_ms"] for g in ("qkv", "gate_up"))
        row["saved_ms_per_step"] = saved * config.num_hidden_layers
        row["step_ms"] = step_ms(name)
        if row["step_ms"]:
            row["saved_share_of_step"] = row["saved_ms_per_step"] / row["step_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    payload = {
        "command": "PYTHONPATH=. python benchmarks/proposals/fused_projections.py",
        "rows": rows,
        "peak": begin.peak,
        "load": harness.load_text({"load": {"start": begin.load, "end": harness.load_avg()}, "machine": {}}),
    }
    json.dump(payload, sys.stdout, indent=1, default=str)
    print()
    return payload


if __name__ == "__main__":
    main()
