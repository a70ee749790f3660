"""What the chunked LM loss saves: XLA's compiled memory of the fine-tune step (and the K = 1 unrolled
search step) at a large vocabulary, with and without chunking. Compile only: nothing runs.

Model: one layer, hidden 64 (so the logits dominate), vocab 128256 (Llama 3), batch 1 x 2048 tokens,
fp32, LoRA r = 8 on q, v. "unchunked" sets ``losses.LOSS_CHUNK_BYTES`` above the logits' size, so
the loss takes one chunk: the full [b, t, v] fp32 logits, as before chunking.

    python -m benchmarks.memory_logits [--vocab 128256] [--seq 2048] [--out-dir DIR]
    python -m benchmarks.memory_logits --step-ratio   # CPU fine-tune step (h256_l4, 8 x 128): chunking's cost

``--step-ratio`` times the fine-tune step of ``benchmarks.finetune``'s default case round-robin in one
process with the loss unchunked (the program before chunking), with the default rule (one chunk at this
size: the same program) and forced to 64-token chunks (what a large vocabulary would get); it runs the
steps, so it is for small models.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax

from benchmarks import common, harness
from benchmarks.finetune import jax_step_fn
from flexora_jax.bilevel import init_search_state, make_search_step
from flexora_jax.config import FinetuneConfig, ModelConfig, SearchConfig
from flexora_jax.gates import init_gates
from flexora_jax.lora import init_lora
from flexora_jax.memory import plan_memory
from flexora_jax.models import losses
from flexora_jax.models.llama import init_params
from flexora_jax.train import init_train_state, make_optimizer, make_train_step


def model(vocab: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )


def _abstract(fn: Callable[[], Any]) -> Any:
    return jax.eval_shape(fn)


def finetune_args(config: ModelConfig, batch: int, seq: int) -> tuple[Callable, tuple]:
    cfg = FinetuneConfig(batch_size=batch)
    lora = init_lora(config, common.LORA, jax.random.key(1))
    state = _abstract(lambda: init_train_state(lora, make_optimizer(cfg, 100)))
    return make_train_step(config, cfg, 100), (state, _abstract(lambda: common.random_batch(config, batch, seq)))


def search_args(config: ModelConfig, batch: int, seq: int) -> tuple[Callable, tuple]:
    sc = SearchConfig(hypergradient="unrolled", inner_steps=1, batch_size=batch, val_batch_size=batch)
    gates = init_gates("layer", config.num_hidden_layers)
    state = _abstract(lambda: init_search_state(init_lora(config, common.LORA, jax.random.key(1)), gates, sc))
    batches = _abstract(lambda: common.random_batch(config, batch, seq, k=1))
    return make_search_step(config, sc), (state, batches, _abstract(lambda: common.random_batch(config, batch, seq)))


def measure(vocab: int, seq: int, batch: int = 1, steps: tuple[str, ...] = ("finetune", "search_unrolled_k1")) -> dict:
    config = model(vocab)
    params = _abstract(lambda: init_params(config, jax.random.key(0)))
    logits_bytes = 4 * batch * seq * vocab
    rows, default_budget = [], losses.LOSS_CHUNK_BYTES
    try:
        for chunked in (False, True):
            losses.LOSS_CHUNK_BYTES = default_budget if chunked else 2 * logits_bytes
            chunk = losses.loss_chunk(batch, seq, vocab)
            for step_name, build in (("finetune", finetune_args), ("search_unrolled_k1", search_args)):
                if step_name not in steps:
                    continue
                fn, args = build(config, batch, seq)
                fresh = lambda *a, fn=fn: fn(*a)  # noqa: E731 - a new function: traced again under this budget
                _, stats = harness.compile_stats(jax.jit(fresh, donate_argnums=1), params, *args)
                rows.append({"step": step_name, "chunked": chunked, "chunk_tokens": chunk, **stats})
    finally:
        losses.LOSS_CHUNK_BYTES = default_budget
    plan = plan_memory(config, common.LORA, {}, 1, batch, seq)
    for r in rows:
        if r["chunked"]:
            base = next(x for x in rows if x["step"] == r["step"] and not x["chunked"])
            r["temp_saved_bytes"] = base["memory"]["temp_bytes"] - r["memory"]["temp_bytes"]
            r["saved_over_logits"] = r["temp_saved_bytes"] / logits_bytes
    return {
        "model": common.describe(config),
        "batch": batch,
        "seq": seq,
        "logits_bytes": logits_bytes,
        "loss_chunk_bytes": default_budget,
        "rows": rows,
        "planner": {k: v["total"] for k, v in plan.items()},
    }


def step_ratio(model_name: str = "h256_l4", batch: int = 8, seq: int = 128, repeats: int = 15) -> dict:
    """Fine-tune step time, unchunked vs the default rule vs 64-token chunks, interleaved in one process."""
    config = common.MODELS[model_name]
    params = init_params(config, jax.random.key(0))
    data = common.random_batch(config, batch, seq)
    fns, default_budget = {}, losses.LOSS_CHUNK_BYTES
    try:
        for name, budget in (("unchunked", 2**62), ("default", default_budget), ("chunk64", 1)):
            losses.LOSS_CHUNK_BYTES = budget
            make_train_step.cache_clear()  # a fresh step function: traced under this budget
            fns[name], _ = jax_step_fn(config, params, FinetuneConfig(batch_size=batch), data)
    finally:
        losses.LOSS_CHUNK_BYTES = default_budget
    timings = harness.interleaved(fns, repeats, warmup=1)
    base = timings["unchunked"]["median_s"]
    return {
        "model": common.describe(config),
        "batch": batch,
        "seq": seq,
        "default_chunk": losses.loss_chunk(batch, seq, config.vocab_size),
        "timings": timings,
        "ratio_to_unchunked": {n: t["median_s"] / base for n, t in timings.items()},
    }


def table(d: dict) -> str:
    """Markdown table of a ``memory_logits`` result."""
    mib = 2**20
    lines = [
        f"fp32 logits [b, t, v] = {d['batch']} x {d['seq']} x {d['model']['vocab_size']}: "
        f"{d['logits_bytes'] / mib:.0f} MiB",
        "",
        "| step | loss | chunk (tokens) | XLA temp MiB | footprint MiB | temp saved MiB | saved / logits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        m = r["memory"]
        saved = f"{r['temp_saved_bytes'] / mib:.0f}" if "temp_saved_bytes" in r else "-"
        ratio = f"{r['saved_over_logits']:.2f}x" if "saved_over_logits" in r else "-"
        lines.append(
            f"| {r['step']} | {'chunked' if r['chunked'] else 'unchunked'} | {r['chunk_tokens']} | "
            f"{m['temp_bytes'] / mib:.0f} | {m['footprint_bytes'] / mib:.0f} | {saved} | {ratio} |"
        )
    return "\n".join(lines)


def run(
    smoke: bool = False,
    out_dir: str | None = None,
    command: str | None = None,
    step_ratio_mode: bool = False,
    vocab: int = 128256,
    seq: int = 2048,
) -> dict:
    """The compiled-memory table (``memory_logits.json``) or, with ``step_ratio_mode``, the fine-tune step's
    time with and without chunking (``loss_chunk_step.json``); ``smoke``: tiny sizes, ``_smoke`` names."""
    begin = harness.start(smoke)
    flag = " --step-ratio" if step_ratio_mode else ""
    command = command or "python -m benchmarks.memory_logits" + flag + (" --smoke" if smoke else "")
    if step_ratio_mode:
        payload = {"command": command, **(step_ratio("tiny", 2, 16, 1) if smoke else step_ratio())}
        name = "loss_chunk_step"
    else:
        payload = {"command": command, **(measure(1024, 64, steps=("finetune",)) if smoke else measure(vocab, seq))}
        name = "memory_logits"
    harness.write_result(name + ("_smoke" if smoke else ""), payload, out_dir, start=begin)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--step-ratio", action="store_true", help="time the CPU fine-tune step instead (chunking's cost)")
    a = p.parse_args(argv)
    out = run(a.smoke, a.out_dir, harness.command_line("benchmarks.memory_logits", argv), a.step_ratio, a.vocab, a.seq)
    if a.step_ratio:
        print({n: round(r, 3) for n, r in out["ratio_to_unchunked"].items()})
    else:
        print(table(out))


if __name__ == "__main__":
    main()
