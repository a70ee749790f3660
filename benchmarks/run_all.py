"""Run every benchmark runner, then rewrite every table of ``benchmarks/RESULTS.md`` from their JSON.

    python -m benchmarks.run_all            # every runner at full size (an hour or more on a 2-core CPU)
    python -m benchmarks.run_all --smoke --out-dir /tmp/b   # tiny sizes; RESULTS.md is left alone
    python -m benchmarks.run_all --only forward finetune    # some runners; their tables are rewritten

Each runner records the load average at its start and end and the machine's matmul peak (measured once per
process, ``harness.machine_peak``); a full run also writes ``run_all.json``: every runner's wall time and
load, rendered as the "run_all" table. The command beside each table is the ``--only`` call that redoes it.
The GPU runners (``finetune_gpu``, ``search_gpu``, ``gpu``) run only where jax sees a GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

from benchmarks import (  # noqa: E402
    accuracy_table,
    adalora,
    bench_eval,
    bench_generate,
    bench_scaling,
    end_to_end,
    finetune,
    forward,
    gpu,
    harness,
    lora_layout,
    memory_logits,
    memory_plan,
    nnx_step,
    report,
    search,
)

#: name -> runner(smoke=, out_dir=, command=); the order of a full run (short runners first)
RUNNERS: dict[str, Callable[..., dict]] = {
    "forward": forward.run,
    "finetune": functools.partial(finetune.run, repeat_runs=3),
    "finetune_dora": functools.partial(finetune.run, configs=["h256_l4"], dora=True),
    "adalora": adalora.run,
    "search_parts": search.run_parts,
    "search": search.run,
    "nnx_step": nnx_step.run,
    "lora_layout": lora_layout.run,
    "memory_logits": memory_logits.run,
    "loss_chunk_step": functools.partial(memory_logits.run, step_ratio_mode=True),
    "memory_plan": memory_plan.run,
    "end_to_end": end_to_end.run,
    "generate": bench_generate.run,
    "scaling": bench_scaling.run,
    "eval": bench_eval.run,
    "accuracy": functools.partial(
        accuracy_table.run, limit=500, limits={"race_middle": 150, "race_high": 150, "boolq": 250}
    ),
    "finetune_gpu": functools.partial(finetune.run, gpu=True),
    "search_gpu": functools.partial(search.run, gpu=True),
    "gpu": gpu.run,
}
GPU_ONLY = ("finetune_gpu", "search_gpu", "gpu")


def run_all(
    smoke: bool = False, only: list[str] | None = None, out_dir: str | None = None, update_md: bool = True
) -> dict:
    """Run the runners (``only`` some); returns {name: payload}. A full run writes ``run_all.json``."""
    begin = harness.start(smoke)
    results, runners = {}, {}
    for name, fn in RUNNERS.items():
        if only and name not in only:
            continue
        if name in GPU_ONLY and jax.default_backend() != "gpu":
            print(f"[run_all] {name} skipped: jax's backend is {jax.default_backend()!r}, not a GPU", flush=True)
            continue
        load, t0 = harness.load_avg(), time.perf_counter()
        command = f"python -m benchmarks.run_all --only {name}" + (" --smoke" if smoke else "")
        results[name] = fn(smoke=smoke, out_dir=out_dir, command=command)
        runners[name] = {"wall_s": time.perf_counter() - t0, "load_start": load, "load_end": harness.load_avg()}
        loads = harness.load_text({"load": {"start": load, "end": runners[name]["load_end"]}, "machine": {}})
        print(f"[run_all] {name} done in {runners[name]['wall_s']:.0f} s ({loads})", flush=True)
    if not only:
        payload = {"command": "python -m benchmarks.run_all" + (" --smoke" if smoke else ""), "runners": runners}
        harness.write_result("run_all_smoke" if smoke else "run_all", payload, out_dir, start=begin)
    if update_md and not smoke:
        print("[run_all] RESULTS.md tables updated:", ", ".join(report.update(out_dir or report.RESULTS_DIR)))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; RESULTS.md is left alone")
    p.add_argument("--only", nargs="*", choices=list(RUNNERS), default=None)
    p.add_argument("--out-dir", default=None, help="where the JSON files go (default benchmarks/results)")
    a = p.parse_args(argv)
    run_all(a.smoke, a.only, a.out_dir)


if __name__ == "__main__":
    main()
