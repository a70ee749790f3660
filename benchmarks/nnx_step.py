"""The Flax NNX face against the functional core: the same decoder's search step and fine-tune step.

    python -m benchmarks.nnx_step [--smoke]

Side by side in one process, interleaved: the built-in decoder's search step through the functional
path (``bilevel.make_search_step`` over params / LoRA / gates) and through the NNX path
(``LlamaForCausalLM`` split by variable type, ``nnx.merge`` inside the jitted loss), and the same for a
fine-tune step (value and gradient of the LoRA loss + AdamW). Reports the time ratio NNX / functional,
the compiled programs' sizes (XLA memory analysis and HLO text length), and the XLA compilations of a
whole ``fj.search`` on an NNX model (a first one of 4 steps, then one of 12: the step compiles once per
search, never per step). Both steps also report achieved FLOP/s and its share of the machine's peak (a search
step counted as K plain steps' worth, :func:`common.lora_step_flops_per_token`). The fine-tune step runs the
search's inner optimizer settings (AdamW, constant lr, no clipping), as ``benchmarks.search``'s plain steps do.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flexora_jax as fj
from benchmarks import common, harness
from flexora_jax import nnx as fnnx
from flexora_jax.bilevel import init_search_state, make_search_step
from flexora_jax.config import FinetuneConfig, SearchConfig
from flexora_jax.gates import init_gates
from flexora_jax.lora import init_lora
from flexora_jax.models.llama import init_params
from flexora_jax.train import init_train_state, make_optimizer, make_train_step

FULL = dict(model="h256_l4", batch=4, seq=64, k=4, repeats=5)
SMOKE = dict(model="tiny", batch=2, seq=8, k=2, repeats=1)


def _nnx_train_step(graphdef, optimizer):
    def step(base, state, batch):
        lora, opt_state = state
        loss, grads = jax.value_and_grad(lambda lo: nnx.merge(graphdef, base, lo, copy=True).lm_loss(batch))(lora)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return (optax.apply_updates(lora, updates), opt_state), {"loss": loss}

    return jax.jit(step, donate_argnums=1)


def _hlo_size(jitted, *args) -> int:
    return len(jitted.lower(*args).as_text())


def _compiles_of_a_search(model, search, data) -> int:
    """XLA compilations during one ``fj.search`` on an NNX model (the step and the few setup programs)."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fj.search(model, search, data, data, loss_fn=lambda m, b: m.lm_loss(b), progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return count[0]


def run(smoke: bool = False, out_dir: str | None = None, command: str | None = None) -> dict:
    """Measure; writes ``nnx_step.json`` (``nnx_step_smoke.json`` in smoke mode) and returns the payload."""
    begin = harness.start(smoke)
    spec = SMOKE if smoke else FULL
    config = common.MODELS[spec["model"]]
    search = SearchConfig(
        hypergradient="unrolled", inner_steps=spec["k"], steps=4, batch_size=spec["batch"], val_batch_size=spec["batch"]
    )
    # the inner optimizer's settings (what benchmarks.search's plain steps run: one compiled step for both)
    ft = FinetuneConfig(
        batch_size=spec["batch"], lr=search.inner_lr, schedule="constant", grad_clip=0.0, optimizer="adamw"
    )
    params = init_params(config, jax.random.key(0))
    lora = init_lora(config, common.LORA, jax.random.key(1))
    gates = init_gates("layer", config.num_hidden_layers)
    batches = common.random_batch(config, spec["batch"], spec["seq"], seed=1, k=spec["k"])
    val = common.random_batch(config, spec["batch"], spec["seq"], seed=2)

    # search step: functional vs NNX
    f_search = jax.jit(make_search_step(config, search), donate_argnums=1)
    model = fnnx.LlamaForCausalLM.from_params(config, params, lora, gates)
    graphdef, base, lora_s, gates_s = fnnx.split_for_search(model)
    n_search = fnnx.make_split_search_step(graphdef, gates_s, lambda m, b: m.lm_loss(b), search)
    hyper = fnnx.init_hyperparameters(gates_s, "layer")
    cells = {"f": init_search_state(lora, gates, search), "n": init_search_state(lora_s, hyper, search)}
    sizes = {
        "search_functional": _hlo_size(f_search, params, cells["f"], batches, val),
        "search_nnx": _hlo_size(n_search, base, cells["n"], batches, val),
    }
    memory = {
        "search_functional": harness.memory_stats(f_search.lower(params, cells["f"], batches, val).compile()),
        "search_nnx": harness.memory_stats(n_search.lower(base, cells["n"], batches, val).compile()),
    }

    def run_f():
        cells["f"], m = f_search(params, cells["f"], batches, val)
        return common.block(m["val_loss"])

    def run_n():
        cells["n"], m = n_search(base, cells["n"], batches, val)
        return common.block(m["val_loss"])

    # fine-tune step: functional vs NNX (the same AdamW over the same LoRA)
    one = jax.tree.map(lambda x: x[0], batches)
    optimizer = make_optimizer(ft, 1)
    f_train = jax.jit(make_train_step(config, ft, 1), donate_argnums=1)
    tmodel = fnnx.LlamaForCausalLM.from_params(config, params, lora)
    tgraph, tlora, tbase = nnx.split(tmodel, nnx.LoRAParam, ...)
    n_train = _nnx_train_step(tgraph, optimizer)
    tcells = {"f": init_train_state(lora, optimizer), "n": (jax.tree.map(jnp.copy, tlora), optimizer.init(tlora))}
    sizes.update(
        finetune_functional=_hlo_size(f_train, params, tcells["f"], one),
        finetune_nnx=_hlo_size(n_train, tbase, tcells["n"], one),
    )

    def train_f():
        tcells["f"], m = f_train(params, tcells["f"], one)
        return common.block(m["loss"])

    def train_n():
        tcells["n"], m = n_train(tbase, tcells["n"], one)
        return common.block(m["loss"])

    timings = harness.interleaved(
        {"search_functional": run_f, "search_nnx": run_n, "finetune_functional": train_f, "finetune_nnx": train_n},
        spec["repeats"],
        warmup=1,
    )
    step_flops = common.lora_step_flops_per_token(config, spec["seq"]) * spec["batch"] * spec["seq"]
    for name, t in timings.items():  # a search step is credited with K plain steps' worth
        t.update(harness.throughput(step_flops * (spec["k"] if name.startswith("search") else 1), t, begin.peak))
    ids = common.random_batch(config, 8 * spec["batch"], spec["seq"], seed=3)
    # the first search also compiles the small setup programs (init, copies); a second, longer one
    # compiles only its step, once (smoke: first-order searches, a cheaper compile that counts the same)
    steps = (1, 3) if smoke else (4, 12)
    counted = dataclasses.replace(search, hypergradient="first_order") if smoke else search
    compiles = {
        n: _compiles_of_a_search(
            fnnx.LlamaForCausalLM.from_params(config, params, lora, gates), dataclasses.replace(counted, steps=n), ids
        )
        for n in steps
    }
    med = {k: v["median_s"] for k, v in timings.items()}
    result = {
        "command": command or "python -m benchmarks.nnx_step" + (" --smoke" if smoke else ""),
        "spec": spec,
        "model": common.describe(config),
        "timings": timings,
        "hlo_chars": sizes,
        "memory": memory,
        "compiles_per_search": compiles,
        "compiles_of_a_second_search": compiles[steps[1]],
        "ratio_search": med["search_nnx"] / med["search_functional"],
        "ratio_finetune": med["finetune_nnx"] / med["finetune_functional"],
    }
    harness.write_result("nnx_step_smoke" if smoke else "nnx_step", result, out_dir, start=begin)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    a = parser.parse_args(argv)
    result = run(a.smoke, a.out_dir, harness.command_line("benchmarks.nnx_step", argv))
    print({k: result[k] for k in ("ratio_search", "ratio_finetune", "compiles_per_search", "hlo_chars")})
    return result


if __name__ == "__main__":
    main()
