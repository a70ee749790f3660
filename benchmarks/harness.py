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
- ``start(smoke)`` at the top of a runner: the load average then, and this machine's matmul peak
  (``machine_peak``: a large ``jnp.dot``, best of several, measured once per process); ``write_result(...,
  start=...)`` records both beside the load at the end and the runner's wall time.
- ``throughput(flops, timing, peak)``: achieved FLOP/s of a timed step and its share of that peak.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def summary(times: list[float]) -> dict[str, float]:
    """Median and spread of timings in seconds."""
    ordered = sorted(times)
    n = len(ordered)
    q1, q3 = ordered[n // 4], ordered[(3 * n) // 4 if n > 1 else 0]
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1], "iqr_s": q3 - q1, "n": n}


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
    fields = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
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
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")},
    }


def command_line(module: str, argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *args])


def load_avg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


@functools.cache
def matmul_peak(n: int, dtype: str = "float32", repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of the best of ``repeats`` jitted ``jnp.dot`` of two ``n x n`` matrices on the default device.

    The denominator of every "share of peak" on a CPU: what XLA's own matmul reaches on this machine now
    (2 n^3 FLOPs per call, the fastest call; cached per process, so a run measures it once).
    """
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "n": n,
        "dtype": dtype,
        "repeats": repeats,
        "best_s": best,
        "flops_per_s": 2.0 * n**3 / best,
        "times_s": times,
        "load_avg_1m": (load_avg() or [None])[0],
    }


def machine_peak(smoke: bool = False) -> dict[str, Any]:
    """The limit each step is compared with: the measured fp32 matmul peak (CPU), or the chip's bf16 peak.

    On a CPU the reference is :func:`matmul_peak` at 2048^3 fp32 (best of 10 calls); on an accelerator it is
    the datasheet dense bf16 peak of the device kind (``common.peak_flops``), i.e. the share is MFU, with the
    measured fp32 and bf16 matmuls (8192^3) recorded beside it. ``smoke``: a 256^3 matmul, best of 5.
    """
    import jax

    from benchmarks.common import peak_flops

    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    n = 256 if smoke else 2048 if backend == "cpu" else 8192
    repeats = 5 if smoke else 10  # the best of several calls: a busy machine slows some of them
    out: dict[str, Any] = {"backend": backend, "device_kind": kind, "matmul_fp32": matmul_peak(n, "float32", repeats)}
    if backend != "cpu":
        out["matmul_bf16"] = matmul_peak(n, "bfloat16", repeats)
    datasheet = peak_flops(kind)
    out["datasheet_bf16_flops"] = datasheet
    if datasheet and backend != "cpu":
        out.update(reference="datasheet bf16 peak (MFU)", reference_flops=datasheet)
    else:
        out.update(
            reference=f"measured fp32 matmul peak ({n}^3 jnp.dot, best of {out['matmul_fp32']['repeats']})",
            reference_flops=out["matmul_fp32"]["flops_per_s"],
        )
    return out


@dataclasses.dataclass(frozen=True)
class Start:
    """What a runner records when it starts: wall clock, load average, the machine's peak."""

    time: float
    load: list[float] | None
    peak: dict[str, Any]


def start(smoke: bool = False) -> Start:
    """Call first thing in a runner; pass the result to :func:`write_result` (and its peak to ``throughput``)."""
    load = load_avg()
    return Start(time.perf_counter(), load, machine_peak(smoke))


def load_text(d: dict[str, Any]) -> str:
    """ "load a -> b" (1-minute averages at a result's runner start and end), or the one at its end."""
    begin, end = (d.get("load") or {}).get("start"), (d.get("load") or {}).get("end")
    if begin and end:
        return f"load {begin[0]:.1f} -> {end[0]:.1f}"
    load = d["machine"].get("load_avg_1m")
    return "load -" if load is None else f"load {load:.1f}"


def throughput(flops: float, timing: dict[str, float], peak: dict[str, Any]) -> dict[str, Any]:
    """Achieved FLOP/s of a timed call doing ``flops`` model FLOPs, at the median and the fastest call, and
    their shares of ``peak["reference_flops"]``; ``mfu`` is the median share where the reference is a chip's
    datasheet peak (accelerators), else None."""
    ref = peak["reference_flops"]
    med, best = flops / timing["median_s"], flops / timing["min_s"]
    return {
        "flops": flops,
        "flops_per_s": med,
        "flops_per_s_best": best,
        "share_of_peak": med / ref,
        "share_of_peak_best": best / ref,
        "mfu": med / ref if peak["reference"].startswith("datasheet") else None,
    }


def write_result(
    name: str, payload: dict[str, Any], out_dir: str | os.PathLike | None = None, start: Start | None = None
) -> Path:
    """Write ``payload`` (plus machine info; with ``start``, the load at start and end, the wall time and the
    peak) as ``<out_dir>/<name>.json``; returns the path."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    data = {"benchmark": name, "machine": machine_info(), **payload}
    if start is not None:
        data.update(
            load={"start": start.load, "end": load_avg()}, wall_s=time.perf_counter() - start.time, peak=start.peak
        )
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
