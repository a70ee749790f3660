"""The timing harness every runner shares.

- ``interleaved(fns, repeats, warmup)``: calls several zero-argument functions round-robin, so ours and
  the reference see the same machine load (this 2-core machine is shared; run-to-run noise is about
  +-20%); each function must block until its result is ready (``jax.block_until_ready``).
- ``summary(times)``: median and spread (min, max, interquartile range) of N timings.
- ``compile_stats(jitted, *args)``: lowering and compile time measured separately from the run time,
  and XLA's compiled memory analysis; returns the compiled executable so it is timed without a second
  compile.
- ``machine_info()`` / ``write_result(...)``: every JSON in ``benchmarks/results/`` records the machine,
  the library versions, the command and the config next to the figures.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def summary(times: list[float]) -> dict[str, float]:
    """Median and spread of timings in seconds."""
    ordered = sorted(times)
    n = len(ordered)
    q1, q3 = ordered[n // 4], ordered[(3 * n) // 4 if n > 1 else 0]
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1],
            "iqr_s": q3 - q1, "n": n}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time each function ``repeats`` times, round-robin, after ``warmup`` untimed calls of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: dict(summary(ts), times_s=ts) for name, ts in times.items()}


def memory_stats(compiled: Any) -> dict[str, int | None]:
    """XLA's compiled memory analysis in bytes (``peak`` is None where the backend does not report it)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f)) for f in fields}
    peak = getattr(m, "peak_memory_in_bytes", 0)
    out["peak_bytes"] = int(peak) if peak else None
    # Live footprint of one call: arguments + outputs not aliased to (donated) arguments + scratch.
    out["footprint_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def compile_stats(jitted: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
    """Lower and compile ``jitted`` for ``args``; returns (compiled executable, {lower_s, compile_s, memory})."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "memory": memory_stats(compiled)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - a missing optional package is reported as None
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a figure was measured."""
    import jax

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "platform": platform.platform(), "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")},
    }


def command_line(module: str, argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *args])


def write_result(name: str, payload: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` (plus machine info) as ``<out_dir>/<name>.json``; returns the path."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    data = {"benchmark": name, "machine": machine_info(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def set_threads(n: int | None = None) -> int:
    """Give torch the same cores JAX uses (all of them, unless ``n``)."""
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
