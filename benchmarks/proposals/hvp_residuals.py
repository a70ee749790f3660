"""Probe (issue 31): would keeping the forward sweep's residuals make the mixed-mode HVP cheaper?

The mixed reverse sweep (``bilevel.unrolled_mixed``) pays, per inner step, one forward-over-reverse product
``jvp(grad_{lora,gates} L_train, (lora_k, gates), (v, 0))``: the primal forward and backward of the step again,
plus their tangents. ``jax.linearize`` in the forward sweep would compute the step's gradient *and* keep the
residuals of the tangent map, so the reverse sweep would pay the tangent half only, at the price of storing
those residuals for every inner step (memory linear in K, which the default design refuses).

This script times, interleaved in one process, on the search benchmark's model and batch (h256_l4, 4 x 64,
LoRA r = 8 on q, v), with the attention the search step uses for each pass:

- ``plain_grad``: ``value_and_grad`` of the training loss w.r.t. LoRA (a plain step without the optimizer);
- ``hvp_jvp``: today's per-step product (jvp of the gradient);
- ``linearize``: the gradient plus the residuals (what the forward sweep would pay instead of ``plain_grad``);
- ``hvp_from_residuals``: the linearized map applied to ``(v, 0)`` (what the reverse sweep would pay);

and the bytes of residuals one inner step would keep. Run: ``python benchmarks/proposals/hvp_residuals.py``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from benchmarks import common, harness
from flexora_jax.gates import init_gates
from flexora_jax.lora import init_lora
from flexora_jax.models.attention import stage_config
from flexora_jax.models.llama import init_params
from flexora_jax.models.losses import lm_loss


def main() -> dict:
    begin = harness.start(False)
    config = common.MODELS["h256_l4"]
    params = init_params(config, jax.random.key(0))
    lora = init_lora(config, common.LORA, jax.random.key(1))
    gates = init_gates("layer", config.num_hidden_layers)
    batch = common.random_batch(config, 4, 64, seed=1)
    first, twice = stage_config(config), stage_config(config, "unrolled")
    v = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), lora)

    def grad_all(cfg, p, lo, g, b):
        return jax.grad(lambda lo_, g_: lm_loss(cfg, p, lo_, g_, b), argnums=(0, 1))(lo, g)

    plain = jax.jit(lambda p, lo, g, b: jax.value_and_grad(lambda x: lm_loss(first, p, x, g, b))(lo))
    hvp_jvp = jax.jit(
        lambda p, lo, g, b, t: jax.jvp(
            lambda x, y: grad_all(twice, p, x, y, b), (lo, g), (t, jax.tree.map(jnp.zeros_like, g))
        )[1]
    )
    linearize = jax.jit(lambda p, lo, g, b: jax.linearize(lambda x: grad_all(twice, p, x, g, b), lo))
    apply = jax.jit(lambda lin, t: lin(t))
    _, lin = linearize(params, lora, gates, batch)
    residual_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(lin))
    fns = {
        "plain_grad": lambda: common.block(plain(params, lora, gates, batch)),
        "hvp_jvp": lambda: common.block(hvp_jvp(params, lora, gates, batch, v)),
        "linearize": lambda: common.block(linearize(params, lora, gates, batch)[0]),
        "hvp_from_residuals": lambda: common.block(apply(lin, v)),
    }
    timings = harness.interleaved(fns, 7, warmup=2)
    base = timings["plain_grad"]["median_s"]
    rows = {
        name: {"median_ms": t["median_s"] * 1e3, "over_plain_grad": t["median_s"] / base} for name, t in timings.items()
    }
    same = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), hvp_jvp(params, lora, gates, batch, v), apply(lin, v)
    )
    payload = {
        "rows": rows,
        "residual_mib_per_inner_step": residual_bytes / 2**20,
        "max_abs_diff_hvp": max(jax.tree_util.tree_leaves(same)),
        "attention": {"first_order": first.attention, "second_order": twice.attention},
        "load": harness.load_text({"load": {"start": begin.load, "end": harness.load_avg()}, "machine": {}}),
    }
    json.dump(payload, sys.stdout, indent=1)
    print()
    return payload


if __name__ == "__main__":
    main()
