"""Rewrite the tables of ``benchmarks/RESULTS.md`` from the JSON files in ``benchmarks/results/``.

Each table sits between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->`` markers; the prose
around them (how to run, where a target is missed and why) is kept as written. Every table names the
command that produced it, the date, the machine with its load average at the runner's start and end,
and the machine's peak measured in the same run (``harness.machine_peak``); a field an older JSON lacks
is shown as "-".

    python -m benchmarks.report
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_DIR, load_text

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _spread(t: dict) -> str:
    return f"{_ms(t['median_s'])} ({_ms(t['min_s'])}-{_ms(t['max_s'])})"


def _machine(d: dict) -> str:
    m = d["machine"]
    return f"{m['cpu']}, {m['cpu_count']} cores, {load_text(d)}"


def _flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _rate(t: dict) -> str:
    """Achieved FLOP/s at the median and its share of the run's peak, e.g. "12.3 GFLOP/s (41%)"."""
    if t.get("flops_per_s") is None:
        return "-"
    return f"{_flops(t['flops_per_s'])} ({100 * t['share_of_peak']:.0f}%)"


def _share(t: dict) -> str:
    return "-" if t.get("share_of_peak") is None else f"{100 * t['share_of_peak']:.0f}%"


def _peak(d: dict) -> str:
    """The limit the shares are taken against, as recorded by the run (``-`` for an older JSON)."""
    p = d.get("peak")
    return "-" if not p else f"{_flops(p['reference_flops'])} ({p['reference']})"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _footer(d: dict) -> str:
    return f"Command `{d['command']}`, {d['machine']['date']}, {_machine(d)}; peak {_peak(d)}."


def table_forward(d: dict) -> str:
    lines = [
        "| config | batch x seq | flexora_jax ms (min-max) | torch ms (min-max) | torch/flexora_jax "
        "| flexora_jax FLOP/s (share of peak) | torch FLOP/s (share) | max abs logit diff | command | date "
        "| machine | peak |",
        "|---" * 12 + "|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['case']} | {r['batch']} x {r['seq']} | {_spread(r['flexora_jax'])} | "
            f"{_spread(r['torch'])} [{r['torch']['variant']}] | **{r['speedup']:.2f}x** | "
            f"{_rate(r['flexora_jax'])} | {_rate(r['torch'])} | {r['max_abs_logit_diff']:.1e} | "
            f"`{d['command']}` | {d['machine']['date']} | {_machine(d)} | {_peak(d)} |"
        )
    return "\n".join(lines)


def _threads(r: dict) -> str:
    return ", ".join(f"{n.rsplit('_', 1)[1]} {_ms(t['median_s'])}" for n, t in r["torch_variants"].items())


def _over_runs(r: dict) -> str:
    s = r.get("speedup_over_runs")
    if not s or s["n"] < 2:
        return "-"
    return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} ({s['n']} runs)"


def table_finetune(d: dict) -> str:
    """Section 1 (and 1b, DoRA): tokens/s, speedup, FLOP/s of both stacks; each run's speedup when repeated."""
    lines = [
        "| config | batch x seq | flexora_jax tokens/s (ms/step) | torch+peft tokens/s (ms/step) | "
        "speedup (target) | speedup min / median / max over runs | flexora_jax FLOP/s (share of peak) "
        "| torch FLOP/s (share) | torch ms by threads | compile s | command | date | machine | peak |",
        "|---" * 14 + "|",
    ]
    for r in d["rows"]:
        j, t = r["flexora_jax"], r["torch_peft"]
        met = "met" if r["speedup"] >= r["target_speedup"] else "**missed**"
        lines.append(
            f"| {r['case']} | {r['batch']} x {r['seq']} | {j['tokens_per_s']:.0f} ({_spread(j)}) | "
            f"{t['tokens_per_s']:.0f} ({_spread(t)}) [{t['variant']}] | **{r['speedup']:.2f}x** (>= {r['target_speedup']}x: {met}) | "
            f"{_over_runs(r)} | {_rate(j)} | {_rate(t)} | {_threads(r)} | {j['compile_s']:.1f} | "
            f"`{d['command']}` | {d['machine']['date']} | {_machine(d)} | {_peak(d)} |"
        )
    runs = [(r["case"], i, x) for r in d["rows"] for i, x in enumerate(r.get("runs", [])) if len(r["runs"]) > 1]
    if runs:
        lines += [
            "",
            "Each run of the repeated measurement (one process, compiled once; load = 1-minute average at "
            "the run's start):",
            "",
            "| config | run | load | flexora_jax ms | torch ms by threads | torch's faster setting | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for case, i, x in runs:
            med = x["medians_s"]
            torch_ms = ", ".join(f"{n.rsplit('_', 1)[1]} {_ms(s)}" for n, s in med.items() if n.startswith("torch"))
            load = "-" if not x.get("load_start") else f"{x['load_start'][0]:.1f}"
            lines.append(
                f"| {case} | {i + 1} | {load} | {_ms(med['flexora_jax'])} | {torch_ms} | "
                f"{x['torch_best'].rsplit('_', 1)[1]} | {x['speedup']:.2f}x |"
            )
    return "\n".join(lines)


def table_finetune_gpu(d: dict) -> str:
    """GPU mode of the fine-tune runner: tokens/s and MFU of both stacks on one GPU."""
    lines = [
        "| config | batch x seq | GPU | flexora_jax tokens/s (MFU) | torch+peft tokens/s (MFU) | "
        "speedup (target 1.3x) | MFU target 40% | command | date |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        j, t = r["flexora_jax"], r["torch_peft"]

        def mfu(x):
            return "n/a" if x.get("mfu") is None else f"{100 * x['mfu']:.1f}%"

        met = "met" if r["speedup"] >= r["target_speedup"] else "**missed**"
        mfu_met = "n/a" if j.get("mfu") is None else ("met" if j["mfu"] >= 0.4 else "**missed**")
        lines.append(
            f"| {r['case']} (random init) | {r['batch']} x {r['seq']} | {r['device']} | "
            f"{j['tokens_per_s']:.0f} ({mfu(j)}) | {t['tokens_per_s']:.0f} ({mfu(t)}) | "
            f"**{r['speedup']:.2f}x** ({met}) | {mfu_met} | `{d['command']}` | {d['machine']['date']} |"
        )
    return "\n".join(lines)


def table_adalora(d: dict) -> str:
    lines = [
        "| config | batch x seq | adapter | flexora_jax ms/step (min) | torch+peft ms/step (min) [best variant] "
        "| ratio (torch / ours) | flexora_jax FLOP/s (share of peak) | torch FLOP/s (share) | compile s | command "
        "| date | machine | peak |",
        "|---" * 13 + "|",
    ]
    for r in d["rows"]:
        j, t, a = r["flexora_jax"], r["torch_peft"], r["adalora"]
        modules = ", ".join(m.split("_")[0] for m in a["target_modules"])
        lines.append(
            f"| {r['case']} | {r['batch']} x {r['seq']} | AdaLoRA {a['init_r']} -> {a['target_r']}, "
            f"{modules} | {_ms(j['median_s'])} ({_ms(j['min_s'])}) | {_ms(t['median_s'])} "
            f"({_ms(t['min_s'])}) [{t['variant']}] | **{r['speedup']:.2f}x** | {_rate(j)} | {_rate(t)} | "
            f"{j['compile_s']:.1f} | `{d['command']}` | {d['machine']['date']} | {_machine(d)} | {_peak(d)} |"
        )
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def table_search(d: dict) -> str:
    names = []
    for r in d["rows"]:
        names += [n for n in r["variants"] if n != "plain" and n not in names]
    head = "| K | plain step ms (FLOP/s, share of peak) | " + " | ".join(f"{n} / K plain (share)" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in d["rows"]:
        v = r["variants"]
        cells = [
            f"{v[n]['ratio_to_plain']:.2f}x" + (f" ({_share(v[n])})" if "share_of_peak" in v[n] else "")
            if n in v
            else "-"
            for n in names
        ]
        lines.append(f"| {r['k']} | {_ms(r['plain_step_s'])} ({_rate(v['plain'])}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Compiled memory of the `unrolled` search step (XLA memory analysis; footprint = arguments + "
        "non-aliased outputs + temp), MiB: mixed mode (the default), reverse mode with and without remat:",
        "",
        "| K | mixed: temp | mixed: footprint | reverse remat: temp | reverse remat: footprint | "
        "reverse no remat: temp | reverse no remat: footprint |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        cells = []
        for name in ("unrolled", "unrolled_reverse", "unrolled_noremat"):
            mem = r["variants"].get(name, {}).get("memory", {})
            cells += [_mb(mem.get("temp_bytes")), _mb(mem.get("footprint_bytes"))]
        lines.append(f"| {r['k']} | " + " | ".join(cells) + " |")
    mr, t = d["memory_ratio_kmax_over_kmin"], d["targets"]
    unrolled = {r["k"]: r["variants"]["unrolled"]["ratio_to_plain"] for r in d["rows"] if "unrolled" in r["variants"]}
    k_worst = max(unrolled, key=unrolled.get, default=None)
    at4 = unrolled.get(4)
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    dc, m = d["deep_compile"], d["model"]
    flat = mr.get("mixed", mr.get("remat"))
    mem_ok = flat is not None and flat <= t["memory_ratio"]
    lines += [
        "",
        f"- `unrolled` (mixed mode) at K = 4 (the issue's row): **{fmt(at4)}** (target <= {t['time_ratio']}x: "
        f"{_verdict(at4 is not None and at4 <= t['time_ratio'])}); worst over K: {fmt(unrolled.get(k_worst))} at "
        f"K = {k_worst} (the validation pass and the first HVP are not amortised over few inner steps).",
        f"- Memory footprint K={mr['k_max']} / K={mr['k_min']}: mixed **{fmt(flat)}** (target <= "
        f"{t['memory_ratio']}x: {_verdict(mem_ok)}), reverse with remat {fmt(mr.get('remat'))}, without "
        f"{fmt(mr.get('no_remat'))}.",
        f"- First compile of the `unrolled` search step, {dc['model']['num_hidden_layers']} layers, hidden "
        f"{dc['model']['hidden_size']}, K = {dc['k']}: **{dc['first_compile_s']:.1f} s** (lower "
        f"{dc['lower_s']:.1f} s + compile {dc['compile_s']:.1f} s; target < {dc['target_s']:.0f} s: "
        f"{_verdict(dc['first_compile_s'] < dc['target_s'])}).",
        "- Share of peak: a search step is credited with K plain steps' FLOPs, so its share is the plain "
        "step's divided by the ratio.",
        f"- Model hidden {m['hidden_size']} / {m['num_hidden_layers']} layers / vocab {m['vocab_size']}, batch "
        f"{d['batch']} x {d['seq']}, LoRA r=8 on q,v. {_footer(d)}",
    ]
    return "\n".join(lines)


def table_search_parts(d: dict) -> str:
    """Section 2: the time of each part of one unrolled search step, against K plain steps."""
    cols = (
        ("plain", "K plain steps"),
        ("search_step", "search step"),
        ("inner_forward", "(a) inner forward sweep"),
        ("val_grad", "(c) val loss + grad"),
        ("outer_update", "(d) outer update"),
    )
    lines = [
        "| K | "
        + " | ".join(f"{title} ms (/ K plain)" for _, title in cols)
        + " | reverse sweep = step - a - c - d, ms (/ K plain) | search step FLOP/s (share of peak) | attention |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for r in d["rows"]:
        p = r["parts"]
        cells = [f"{_ms(p[n]['median_s'])} ({p[n]['over_k_plain']:.2f}x)" for n, _ in cols]
        lines.append(
            f"| {r['k']} | " + " | ".join(cells) + f" | **{_ms(r['reverse_sweep_s'])} "
            f"({r['reverse_sweep_over_k_plain']:.2f}x)** | {_rate(p['search_step'])} | {r['attention']} |"
        )
    m = d["model"]
    lines += [
        "",
        f"Estimator `unrolled` (remat {d['rows'][0]['remat'] if d['rows'] else '-'}); medians of interleaved "
        f"calls. Model hidden {m['hidden_size']} / {m['num_hidden_layers']} layers / vocab {m['vocab_size']}, "
        f"batch {d['batch']} x {d['seq']}, LoRA r=8 on q,v. {_footer(d)}",
    ]
    return "\n".join(lines)


def table_nnx_step(d: dict) -> str:
    t, mem, hlo = d["timings"], d["memory"], d["hlo_chars"]
    spec = d["spec"]
    lines = [
        "| step | functional median (min) ms | NNX median (min) ms | NNX / functional (median, min) "
        "| compiled temp bytes (functional, NNX) | HLO chars (functional, NNX) "
        "| share of peak (functional, NNX) |",
        "|---|---|---|---|---|---|---|",
    ]
    for step, title in (("search", f"search, unrolled K = {spec['k']}"), ("finetune", "fine-tune")):
        f, n = t[f"{step}_functional"], t[f"{step}_nnx"]
        temp = "-"
        if f"{step}_functional" in mem:
            temp = f"{mem[step + '_functional']['temp_bytes']:,} / {mem[step + '_nnx']['temp_bytes']:,}"
        lines.append(
            f"| {title} | {_ms(f['median_s'])} ({_ms(f['min_s'])}) | {_ms(n['median_s'])} "
            f"({_ms(n['min_s'])}) | {n['median_s'] / f['median_s']:.2f}x, {n['min_s'] / f['min_s']:.2f}x | "
            f"{temp} | {hlo[step + '_functional']:,} / {hlo[step + '_nnx']:,} | {_share(f)}, {_share(n)} |"
        )
    compiles = ", ".join(f"{n} for a search of {k} steps" for k, n in d["compiles_per_search"].items())
    m = d["model"]
    lines += [
        "",
        f"XLA compilations of `fj.search` on an NNX model: {compiles} (the first search also compiles its "
        f"setup programs). Model hidden {m['hidden_size']} / {m['num_hidden_layers']} layers, batch "
        f"{spec['batch']} x {spec['seq']}, LoRA r 8 on q, v. {_footer(d)}",
    ]
    return "\n".join(lines)


def table_lora_layout(d: dict) -> str:
    m, (traced, static) = d["memory"], d["compile"]
    mib = 2**20
    lines = [
        "| figure | stacked on all blocks | selected blocks only |",
        "|---|---|---|",
        f"| fine-tune state of a selection of {m['selection']}, Llama-2-7B shape, r 8 on q, v (A, B fp32 + "
        f"AdamW moments) | {m['stacked_state_bytes'] / mib:.1f} MiB | "
        f"{m['selected_only_state_bytes'] / mib:.1f} MiB |",
        f"| the same, as a share of the bf16 base ({m['base_bytes'] / 2**30:.2f} GiB) | "
        f"{100 * m['stacked_over_base']:.2f}% | {100 * m['selected_only_state_bytes'] / m['base_bytes']:.2f}% |",
        "",
        f"| fine-tune step over {traced['selections']} selections | programs | compile + first step, total |",
        "|---|---|---|",
        f"| layout traced (`LoraParams.traced_layout`) | **{traced['programs']}** | {traced['total_s']:.1f} s |",
        f"| layout static (in the pytree structure) | {static['programs']} | {static['total_s']:.1f} s "
        f"({static['total_s'] / max(static['programs'], 1):.1f} s each) |",
        "",
        _footer(d),
    ]
    return "\n".join(lines)


def _memory_logits_table(d: dict) -> str:
    from benchmarks import memory_logits

    return memory_logits.table(d) + "\n\n" + _footer(d)


def table_loss_chunk_step(d: dict) -> str:
    lines = ["| loss | fine-tune step ms, median (min-max) | / unchunked |", "|---|---|---|"]
    for name, t in d["timings"].items():
        lines.append(f"| {name} | {_spread(t)} | **{d['ratio_to_unchunked'][name]:.2f}x** |")
    m = d["model"]
    lines += [
        "",
        f"Model hidden {m['hidden_size']} / {m['num_hidden_layers']} layers / vocab {m['vocab_size']}, batch "
        f"{d['batch']} x {d['seq']}; default rule: {d['default_chunk']} tokens per chunk. {_footer(d)}",
    ]
    return "\n".join(lines)


def table_gpu(d: dict) -> str:
    """``benchmarks.gpu``: fine-tune tokens/s and MFU per attention, the search over K plain steps, the planner."""
    f = d["finetune"]
    lines = [
        "| fine-tune variant | tokens/s | FLOP/s (MFU) | compile s | plan_memory / XLA footprint |",
        "|---|---|---|---|---|",
    ]
    if "error" in f:
        lines.append(f"| failed: {f['error'][:200]} | - | - | - | - |")
    for name, t in f["variants"].items():
        plan = "-" if t.get("plan_over_xla") is None else f"{t['plan_over_xla']:.2f}"
        compile_s = "-" if t.get("compile_s") is None else f"{t['compile_s']:.1f}"
        lines.append(f"| {name} | {t['tokens_per_s']:.0f} | {_rate(t)} | {compile_s} | {plan} |")
    lines += [
        "",
        "| K | step | ms | / K plain (per plain variant) | FLOP/s (MFU) | plan_memory / XLA footprint |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["search"]:
        if "error" in r:
            lines.append(f"| {r['k']} | failed: {r['error'][:200]} | - | - | - | - |")
            continue
        for name, t in r["variants"].items():
            over = ", ".join(f"{p}: {x:.2f}x" for p, x in t.get("over_k_plain", {}).items()) or "-"
            plan = "-" if t.get("plan_over_xla") is None else f"{t['plan_over_xla']:.2f}"
            lines.append(f"| {r['k']} | {name} | {_ms(t['median_s'])} | {over} | {_rate(t)} | {plan} |")
    m = d["model"]
    lines += [
        "",
        f"{d['device']}; model hidden {m['hidden_size']} / {m['num_hidden_layers']} layers, {m['dtype']}, "
        f"fine-tune batch {f.get('batch', '-')} x {f.get('seq', '-')}. {_footer(d)}",
    ]
    return "\n".join(lines)


def table_memory_plan(d: dict) -> str:
    return d["table"] + "\n\n" + f"Command `{d['command']}`, {d['machine']['date']} (no device needed)."


def table_run_all(d: dict) -> str:
    """The whole ``run_all``: each runner's wall time and load at its start and end, and the machine's peak."""
    lines = ["| runner | wall s | load at start (1, 5, 15 min) | load at end |", "|---|---|---|---|"]
    fmt = lambda x: "-" if not x else ", ".join(f"{v:.1f}" for v in x)  # noqa: E731
    for name, r in d["runners"].items():
        lines.append(f"| {name} | {r['wall_s']:.0f} | {fmt(r['load_start'])} | {fmt(r['load_end'])} |")
    lines += ["", f"Total {d['wall_s'] / 60:.0f} min. {_footer(d)}"]
    return "\n".join(lines)


def _scaling_table(d: dict) -> str:
    from benchmarks import bench_scaling

    return bench_scaling.table(d)


def _eval_table(d: dict) -> str:
    from benchmarks import bench_eval

    return bench_eval.table(d)


def _accuracy_table(d: dict) -> str:
    from benchmarks import accuracy_table

    return accuracy_table.table(d)


def _end_to_end_table(d: dict) -> str:
    from benchmarks import end_to_end

    return end_to_end.table(d)


def table_generate(d: dict) -> str:
    lines = [
        "| case | batch | prompt + new tokens | flexora_jax tokens/s | transformers tokens/s "
        "| speedup (target > 1x) | same tokens | first call s | command | date | machine |",
        "|---" * 11 + "|",
    ]
    for r in d["rows"]:
        ours, ref = r["flexora_jax"], r["torch"]
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['prompt_tokens']} + {r['new_tokens']} | "
            f"{ours['tokens_per_s']:.0f} | {ref['tokens_per_s']:.0f} [{ref.get('variant', '')}] | "
            f"**{r['speedup']:.2f}x** ({_verdict(r['speedup'] > 1)}) | {r['same_tokens_row0']} | "
            f"{ours['first_call_s']:.1f} | `{d['command']}` | {d['machine']['date']} | {_machine(d)} |"
        )
    return "\n".join(lines)


#: marker name -> (JSON file in the results folder, renderer)
TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "run_all": ("run_all.json", table_run_all),
    "finetune": ("finetune.json", table_finetune),
    "finetune_gpu": ("finetune_gpu.json", table_finetune_gpu),
    "finetune_dora": ("finetune_dora.json", table_finetune),
    "adalora": ("adalora.json", table_adalora),
    "memory_logits": ("memory_logits.json", _memory_logits_table),
    "loss_chunk_step": ("loss_chunk_step.json", table_loss_chunk_step),
    "gpu": ("gpu.json", table_gpu),
    "lora_layout": ("lora_layout.json", table_lora_layout),
    "nnx_step": ("nnx_step.json", table_nnx_step),
    "forward": ("forward.json", table_forward),
    "search": ("search.json", table_search),
    "search_parts": ("search_parts.json", table_search_parts),
    "generate": ("generate.json", table_generate),
    "eval": ("eval.json", _eval_table),
    "accuracy": ("accuracy.json", _accuracy_table),
    "scaling": ("scaling.json", _scaling_table),
    "memory_plan": ("memory_plan.json", table_memory_plan),
    "end_to_end": ("end_to_end.json", _end_to_end_table),
}


def update(results_dir: str | Path = RESULTS_DIR, md_path: str | Path = RESULTS_MD) -> list[str]:
    """Replace every marked table whose JSON exists; returns the names updated."""
    md_path = Path(md_path)
    text = md_path.read_text()
    done = []
    for name, (file, render) in TABLES.items():
        src = Path(results_dir) / file
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not src.exists() or not pattern.search(text):
            continue
        data: dict[str, Any] = json.loads(src.read_text())
        table = render(data)
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
        done.append(name)
    md_path.write_text(text)
    return done


if __name__ == "__main__":
    print("updated:", ", ".join(update()) or "nothing")
