"""Run every benchmark runner, then rewrite the tables of ``benchmarks/RESULTS.md``.

    python -m benchmarks.run_all            # full sizes, about 15 minutes on a 2-core CPU
    python -m benchmarks.run_all --smoke    # tiny sizes (what tests/test_benchmarks.py runs)
    python -m benchmarks.run_all --only forward finetune
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402

from benchmarks import (accuracy_table, bench_eval, bench_generate, bench_scaling, end_to_end, finetune,  # noqa: E402
                        forward, report, search)

RUNNERS = {"forward": forward.run, "finetune": finetune.run, "search": search.run,
           "end_to_end": functools.partial(end_to_end.run, search_steps=100), "generate": bench_generate.run, "scaling": bench_scaling.run, "eval": bench_eval.run,
           "accuracy": functools.partial(accuracy_table.run, limit=500,
                                         limits={"race_middle": 150, "race_high": 150, "boolq": 250})}


def run_all(smoke: bool = False, only: list[str] | None = None, out_dir: str | None = None,
            update_md: bool = True) -> dict:
    results = {}
    for name, fn in RUNNERS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        results[name] = fn(smoke=smoke, out_dir=out_dir, command="python -m benchmarks.run_all"
                           + (" --smoke" if smoke else ""))
        print(f"[run_all] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if update_md and not smoke:
        print("[run_all] RESULTS.md tables updated:", ", ".join(report.update(out_dir or report.RESULTS_DIR)))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; RESULTS.md is left alone")
    p.add_argument("--only", nargs="*", choices=sorted(RUNNERS), default=None)
    p.add_argument("--out-dir", default=None, help="where the JSON files go (default benchmarks/results)")
    a = p.parse_args(argv)
    run_all(a.smoke, a.only, a.out_dir)


if __name__ == "__main__":
    main()
