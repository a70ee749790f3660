"""Scaling: search-step and fine-tune-step throughput on 1, 2, 4 and 8 virtual CPU devices.

XLA reads the device count once at start-up, so each device count runs in its own worker process
(``--worker N`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``); the parent runs them one
after the other and reports throughput (tokens / s) and the ratio to one device. The workers shard
with :mod:`flexora_jax.sharding` (mesh ``(1, N, 1)``: batch and parameters over ``fsdp``) and time
with the shared harness (search and fine-tune round-robin, medians).

Virtual CPU devices share the machine's cores: the ratios say how well the sharded program keeps
them busy (and what the partitioner's collectives cost), not what N real accelerators would give.

    python -m benchmarks.bench_scaling [--smoke] [--devices 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

FULL = dict(model="h256_l4", batch=16, seq=64, k=2, repeats=5, devices=(1, 2, 4, 8))
SMOKE = dict(model="tiny", batch=8, seq=16, k=2, repeats=2, devices=(1, 2))
_MARK = "SCALING_RESULT "


def worker(spec: dict) -> dict:
    """Time one search step and one fine-tune step on every device of this process."""
    import jax

    from benchmarks import common, harness
    from flexora_jax import loops
    from flexora_jax import sharding as sh
    from flexora_jax.bilevel import init_search_state, make_search_step
    from flexora_jax.config import FinetuneConfig, SearchConfig
    from flexora_jax.gates import init_gates
    from flexora_jax.lora import init_lora
    from flexora_jax.models.llama import init_params
    from flexora_jax.train import init_train_state, make_optimizer, make_train_step

    config = common.MODELS[spec["model"]]
    b, t, k = spec["batch"], spec["seq"], spec["k"]
    n = jax.device_count()
    mesh = sh.make_mesh((1, n, 1))
    params = init_params(config, jax.random.key(0))
    search = SearchConfig(inner_steps=k, batch_size=b, val_batch_size=b)
    finetune = FinetuneConfig(batch_size=b, schedule="constant")
    lora = init_lora(config, common.LORA, jax.random.key(1))
    sstate = init_search_state(lora, init_gates("layer", config.num_hidden_layers), search)
    tstate = init_train_state(init_lora(config, common.LORA, jax.random.key(2)), make_optimizer(finetune, 100))
    train_batches = common.random_batch(config, b, t, seed=1, k=k)
    val = common.random_batch(config, b, t, seed=2)
    one = common.random_batch(config, b, t, seed=3)

    sstep = loops.compile_step(
        make_search_step(config, search), mesh, (params, sstate, train_batches, val), {2: 1, 3: 0}
    )
    tstep = loops.compile_step(make_train_step(config, finetune, 100), mesh, (params, tstate, one), {2: 0})
    sp, sstate = sstep.place(params, sstate)
    tp, tstate = tstep.place(params, tstate)
    tb, vb, ob = sstep.batch(train_batches, 2), sstep.batch(val, 3), tstep.batch(one, 2)
    _, search_compile = harness.compile_stats(sstep.fn, sp, sstate, tb, vb)
    _, train_compile = harness.compile_stats(tstep.fn, tp, tstate, ob)
    cell = {"s": sstate, "t": tstate}

    def run_search():
        cell["s"], m = sstep(sp, cell["s"], tb, vb)
        return common.block(m["val_loss"])

    def run_train():
        cell["t"], m = tstep(tp, cell["t"], ob)
        return common.block(m["loss"])

    timings = harness.interleaved({"search": run_search, "finetune": run_train}, spec["repeats"], warmup=1)
    tokens = {"search": (k + 1) * b * t, "finetune": b * t}  # K inner batches + the validation batch
    return {
        "devices": n,
        "mesh": dict(mesh.shape),
        "steps": {
            name: dict(
                timings[name],
                tokens_per_step=tokens[name],
                tokens_per_s=tokens[name] / timings[name]["median_s"],
                memory=(search_compile if name == "search" else train_compile)["memory"],
            )
            for name in timings
        },
    }


def run(
    smoke: bool = False, out_dir: str | None = None, command: str | None = None, devices: tuple[int, ...] | None = None
) -> dict:
    """Run one worker per device count; writes ``scaling.json`` (``scaling_smoke.json`` in smoke mode)."""
    from benchmarks import common, harness

    begin = harness.start(smoke)
    spec = dict(SMOKE if smoke else FULL)
    spec["devices"] = tuple(devices or spec["devices"])
    repo = Path(__file__).resolve().parents[1]
    rows = []
    for n in spec["devices"]:
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_scaling", "--worker", json.dumps(spec)],
            env=env,
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"scaling worker with {n} devices failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        rows.append(json.loads(lines[-1][len(_MARK) :]))
        print(
            f"[scaling] {n} device(s): "
            + ", ".join(f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in rows[-1]["steps"].items()),
            flush=True,
        )
    base = rows[0]["steps"]
    for r in rows:
        for name, v in r["steps"].items():
            v["ratio_to_1"] = v["tokens_per_s"] / base[name]["tokens_per_s"]
    payload = {
        "command": command or "python -m benchmarks.bench_scaling" + (" --smoke" if smoke else ""),
        "model": common.describe(common.MODELS[spec["model"]]),
        "lora": common.LORA.to_dict(),
        "batch": spec["batch"],
        "seq": spec["seq"],
        "k": spec["k"],
        "rows": rows,
        "note": "virtual CPU devices share the same cores; mesh (1, N, 1)",
    }
    harness.write_result("scaling_smoke" if smoke else "scaling", payload, out_dir, start=begin)
    return payload


def _ms(t: dict) -> str:
    return f"{t['median_s'] * 1e3:.0f} ({t['min_s'] * 1e3:.0f}-{t['max_s'] * 1e3:.0f})"


def table(d: dict) -> str:
    """Markdown for ``benchmarks/RESULTS.md`` (``report.TABLES["scaling"]``)."""
    from benchmarks import harness

    lines = [
        "| devices | mesh (data, fsdp, model) | search ms (min-max) | search tok/s | search vs 1 "
        "| fine-tune ms (min-max) | fine-tune tok/s | fine-tune vs 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        s, f = r["steps"]["search"], r["steps"]["finetune"]
        mesh = r["mesh"]
        lines.append(
            f"| {r['devices']} | ({mesh['data']}, {mesh['fsdp']}, {mesh['model']}) "
            f"| {_ms(s)} | {s['tokens_per_s']:.0f} | {s['ratio_to_1']:.2f}x "
            f"| {_ms(f)} | {f['tokens_per_s']:.0f} | {f['ratio_to_1']:.2f}x |"
        )
    m, machine = d["model"], d["machine"]
    lines.append("")
    lines.append(
        f"Model hidden {m['hidden_size']} / {m['num_hidden_layers']} layers / vocab {m['vocab_size']}, "
        f"batch {d['batch']} x {d['seq']}, K = {d['k']}, LoRA r=8 on q,v; {d['note']}. Command "
        f"`{d['command']}`, {machine['date']}, {machine['cpu']}, {machine['cpu_count']} cores, "
        f"{harness.load_text(d)}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, two device counts (what the tests run)")
    p.add_argument("--devices", nargs="*", type=int, default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        print(_MARK + json.dumps(worker(json.loads(a.worker)), default=float), flush=True)
        return
    from benchmarks import harness

    out = run(a.smoke, a.out_dir, harness.command_line("benchmarks.bench_scaling", argv), a.devices)
    for r in out["rows"]:
        print(
            f"{r['devices']} device(s): "
            + ", ".join(f"{k} {v['tokens_per_s']:.0f} tok/s ({v['ratio_to_1']:.2f}x)" for k, v in r["steps"].items())
        )


if __name__ == "__main__":
    main()
