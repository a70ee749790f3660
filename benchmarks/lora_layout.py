"""LoRA layout: a traced layout (one program for every selection) against a static one (one per selection).

Issue 20 asked to choose by measurement between (a) a traced layer / rank layout over LoRA arrays stacked
on all L blocks and (b) arrays holding only the selected blocks. Two figures decide it:

- memory: the fine-tune state (LoRA A / B fp32 + AdamW's two moments) of a 1-of-32-layer selection at the
  Llama-2-7B shape (r 8 on q, v), stacked on all 32 blocks vs only the selected one, next to the bf16 base;
  shapes from ``jax.eval_shape`` (nothing is allocated);
- compile time: the jitted fine-tune step of a 32-layer model (small width) for five selections, once with
  the layout traced (:meth:`flexora_jax.LoraParams.traced_layout`, what ``init_train_state`` does) and once
  with it static (the layout in the pytree structure, as before): programs compiled and seconds spent.

    python -m benchmarks.lora_layout [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig
from flexora_jax.lora import init_lora
from flexora_jax.models.llama import init_params
from flexora_jax.train import TrainState, init_train_state, make_optimizer, make_train_step

LLAMA2_7B = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    dtype="bfloat16",
)
SMALL_32 = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=32,
    num_attention_heads=4,
    num_key_value_heads=4,
)
LORA = LoraConfig(r=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj"))
SELECTIONS = ((7,), (0, 31), (3, 9, 27), tuple(range(0, 32, 4)), None)  # None: every layer


def _bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory(config: ModelConfig) -> dict:
    """Bytes of the 1-of-L fine-tune state, stacked vs selected-only, and of the base."""
    one = dataclasses.replace(LORA, layers_to_transform=(7,))
    opt = make_optimizer(FinetuneConfig(), 1000)
    state = jax.eval_shape(lambda: init_train_state(init_lora(config, one, jax.random.key(0)), opt))
    stacked = _bytes((state.lora.weights, state.opt_state))
    per_block = stacked / config.num_hidden_layers  # every leaf is [L, ...] (plus two scalar counters)
    base = config.num_params() * jnp.dtype(config.dtype).itemsize
    return {
        "model": "llama2_7b",
        "selection": "1 of 32 layers",
        "base_bytes": int(base),
        "stacked_state_bytes": stacked,
        "selected_only_state_bytes": int(per_block),
        "stacked_over_base": stacked / base,
        "saved_by_selected_only_bytes": int(stacked - per_block),
    }


def compile_times(config: ModelConfig, traced: bool, selections: tuple = SELECTIONS) -> dict:
    """Programs and compile seconds of the fine-tune step over ``selections`` (layout traced or static)."""
    params = init_params(config, jax.random.key(0))
    cfg = FinetuneConfig(batch_size=2)
    opt = make_optimizer(cfg, 1000)
    batch = {"input_ids": np.zeros((2, 32), np.int32), "loss_mask": np.ones((2, 32), np.float32)}
    step = jax.jit(make_train_step(config, cfg, 1000), donate_argnums=1)
    seconds, start = [], step._cache_size()  # jit wrappers of one function share its cache
    for layers in selections:
        lora = init_lora(config, dataclasses.replace(LORA, layers_to_transform=layers), jax.random.key(1))
        if traced:
            state = init_train_state(lora, opt)
        else:  # the layout in the structure: what every fine-tune compiled before
            state = TrainState(lora, opt.init(lora.weights), jnp.zeros((), jnp.int32), jax.random.key(0))
        t0 = time.perf_counter()
        before = step._cache_size()
        jax.block_until_ready(step(params, state, batch))
        seconds.append(time.perf_counter() - t0 if step._cache_size() > before else 0.0)
    return {
        "layout": "traced" if traced else "static",
        "selections": len(selections),
        "programs": step._cache_size() - start,
        "compile_and_first_step_s": seconds,
        "total_s": sum(seconds),
    }


def run(smoke: bool = False, out_dir: str | None = None, command: str | None = None) -> dict:
    begin = harness.start(smoke)
    small = dataclasses.replace(SMALL_32, num_hidden_layers=4) if smoke else SMALL_32
    selections = ((1,), None) if smoke else SELECTIONS  # smoke: two selections, 1 program traced vs 2 static
    rows = {
        "memory": memory(LLAMA2_7B),
        "compile": [compile_times(small, True, selections), compile_times(small, False, selections)],
    }
    payload = {"command": command or "python -m benchmarks.lora_layout" + (" --smoke" if smoke else ""), **rows}
    harness.write_result("lora_layout_smoke" if smoke else "lora_layout", payload, out_dir, start=begin)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    out = run(a.smoke, a.out_dir, harness.command_line("benchmarks.lora_layout", argv))
    m = out["memory"]
    print(
        f"memory: base {m['base_bytes'] / 2**30:.2f} GiB; 1-of-32 LoRA state stacked "
        f"{m['stacked_state_bytes'] / 2**20:.1f} MiB ({100 * m['stacked_over_base']:.2f}% of the base), "
        f"selected-only {m['selected_only_state_bytes'] / 2**20:.2f} MiB"
    )
    for c in out["compile"]:
        print(f"{c['layout']}: {c['programs']} program(s) for {c['selections']} selections, {c['total_s']:.1f} s")


if __name__ == "__main__":
    main()
