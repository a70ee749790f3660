"""Rewrite the tables of ``benchmarks/RESULTS.md`` from the JSON files in ``benchmarks/results/``.

Each table sits between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->`` markers; the prose
around them (how to run, where a target is missed and why) is kept as written.

    python -m benchmarks.report
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness import RESULTS_DIR

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _spread(t: dict) -> str:
    return f"{_ms(t['median_s'])} ({_ms(t['min_s'])}-{_ms(t['max_s'])})"


def _machine(d: dict) -> str:
    m = d["machine"]
    return f"{m['cpu']}, {m['cpu_count']} cores, load {m['load_avg_1m']:.1f}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def table_forward(d: dict) -> str:
    lines = ["| config | batch x seq | flexora_jax ms (min-max) | torch ms (min-max) | torch/flexora_jax "
             "| max abs logit diff | command | date | machine |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['case']} | {r['batch']} x {r['seq']} | {_spread(r['flexora_jax'])} | "
                     f"{_spread(r['torch'])} [{r['torch']['variant']}] | **{r['speedup']:.2f}x** | "
                     f"{r['max_abs_logit_diff']:.1e} | `{d['command']}` | {d['machine']['date']} | {_machine(d)} |")
    return "\n".join(lines)


def table_finetune(d: dict) -> str:
    lines = ["| config | batch x seq | flexora_jax tokens/s (ms/step) | torch+peft tokens/s (ms/step) | "
             "speedup (target 1.25x) | torch at all cores, ms | compile s | command | date | machine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        j, t = r["flexora_jax"], r["torch_peft"]
        allcores = max(r["torch_variants"], key=lambda n: int(n.rsplit("_", 1)[1][:-1]))
        met = "met" if r["speedup"] >= r["target_speedup"] else "**missed**"
        lines.append(f"| {r['case']} | {r['batch']} x {r['seq']} | {j['tokens_per_s']:.0f} ({_spread(j)}) | "
                     f"{t['tokens_per_s']:.0f} ({_spread(t)}) [{t['variant']}] | **{r['speedup']:.2f}x** ({met}) | "
                     f"{_ms(r['torch_variants'][allcores]['median_s'])} | {j['compile_s']:.1f} | `{d['command']}` | "
                     f"{d['machine']['date']} | {_machine(d)} |")
    return "\n".join(lines)


def table_finetune_gpu(d: dict) -> str:
    """GPU mode of the fine-tune runner: tokens/s and MFU of both stacks on one GPU."""
    lines = ["| config | batch x seq | GPU | flexora_jax tokens/s (MFU) | torch+peft tokens/s (MFU) | "
             "speedup (target 1.3x) | MFU target 40% | command | date |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        j, t = r["flexora_jax"], r["torch_peft"]

        def mfu(x):
            return "n/a" if x.get("mfu") is None else f"{100 * x['mfu']:.1f}%"

        met = "met" if r["speedup"] >= r["target_speedup"] else "**missed**"
        mfu_met = "n/a" if j.get("mfu") is None else ("met" if j["mfu"] >= 0.4 else "**missed**")
        lines.append(f"| {r['case']} (random init) | {r['batch']} x {r['seq']} | {r['device']} | "
                     f"{j['tokens_per_s']:.0f} ({mfu(j)}) | {t['tokens_per_s']:.0f} ({mfu(t)}) | "
                     f"**{r['speedup']:.2f}x** ({met}) | {mfu_met} | `{d['command']}` | {d['machine']['date']} |")
    return "\n".join(lines)


def table_search(d: dict) -> str:
    names = []
    for r in d["rows"]:
        names += [n for n in r["variants"] if n != "plain" and n not in names]
    head = "| K | plain step ms | " + " | ".join(f"{n} / K plain" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in d["rows"]:
        cells = [f"{r['variants'][n]['ratio_to_plain']:.2f}x" if n in r["variants"] else "-" for n in names]
        lines.append(f"| {r['k']} | {_ms(r['plain_step_s'])} | " + " | ".join(cells) + " |")
    lines += ["", "Compiled memory of the `unrolled` search step (XLA memory analysis; footprint = arguments + "
              "non-aliased outputs + temp), MiB:", "",
              "| K | remat: temp | remat: footprint | no remat: temp | no remat: footprint |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        on, off = r["variants"].get("unrolled", {}).get("memory", {}), r["variants"].get("unrolled_noremat", {}).get("memory", {})
        lines.append(f"| {r['k']} | {_mb(on.get('temp_bytes'))} | {_mb(on.get('footprint_bytes'))} | "
                     f"{_mb(off.get('temp_bytes'))} | {_mb(off.get('footprint_bytes'))} |")
    mr, t = d["memory_ratio_kmax_over_kmin"], d["targets"]
    worst = max((r["variants"]["unrolled"]["ratio_to_plain"] for r in d["rows"] if "unrolled" in r["variants"]),
                default=float("nan"))
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    dc = d["deep_compile"]
    lines += ["", f"- `unrolled` (remat) worst ratio over K: **{worst:.2f}x** (target <= {t['time_ratio']}x: "
              f"{'met' if worst <= t['time_ratio'] else '**missed**'}).",
              f"- Memory footprint K={mr['k_max']} / K={mr['k_min']}: remat **{fmt(mr['remat'])}** (target <= "
              f"{t['memory_ratio']}x: {'met' if mr['remat'] is not None and mr['remat'] <= t['memory_ratio'] else '**missed**'}), "
              f"no remat {fmt(mr['no_remat'])}.",
              f"- First compile of the `unrolled` search step, {dc['model']['num_hidden_layers']} layers, hidden "
              f"{dc['model']['hidden_size']}, K = {dc['k']}: **{dc['first_compile_s']:.1f} s** (lower {dc['lower_s']:.1f} s "
              f"+ compile {dc['compile_s']:.1f} s; target < {dc['target_s']:.0f} s: "
              f"{'met' if dc['first_compile_s'] < dc['target_s'] else '**missed**'}).",
              f"- Model hidden {d['model']['hidden_size']} / {d['model']['num_hidden_layers']} layers / vocab "
              f"{d['model']['vocab_size']}, batch {d['batch']} x {d['seq']}, LoRA r=8 on q,v. Command `{d['command']}`, "
              f"{d['machine']['date']}, {_machine(d)}."]
    return "\n".join(lines)


def table_generate(d: dict) -> str:
    lines = ["| case | batch | prompt + new tokens | flexora_jax tokens/s | transformers tokens/s | speedup (target > 1x) "
             "| same tokens | first call s | command | date | machine |", "|---" * 11 + "|"]
    for r in d["rows"]:
        ours, ref = r["flexora_jax"], r["torch"]
        verdict = "met" if r["speedup"] > 1 else "**missed**"
        lines.append(f"| {r['case']} | {r['batch']} | {r['prompt_tokens']} + {r['new_tokens']} | {ours['tokens_per_s']:.0f} "
                     f"| {ref['tokens_per_s']:.0f} [{ref.get('variant', '')}] | **{r['speedup']:.2f}x** ({verdict}) "
                     f"| {r['same_tokens_row0']} | {ours['first_call_s']:.1f} | `{d['command']}` | {d['machine']['date']} "
                     f"| {_machine(d)} |")
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


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "forward": ("forward.json", table_forward),
    "finetune": ("finetune.json", table_finetune),
    "finetune_gpu": ("finetune_gpu.json", table_finetune_gpu),
    "search": ("search.json", table_search),
    "generate": ("generate.json", table_generate),
    "scaling": ("scaling.json", _scaling_table),
    "eval": ("eval.json", _eval_table),
    "accuracy": ("accuracy.json", _accuracy_table),
    "end_to_end": ("end_to_end.json", lambda d: __import__("benchmarks.end_to_end", fromlist=["table"]).table(d)),
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
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
        done.append(name)
    md_path.write_text(text)
    return done


if __name__ == "__main__":
    print("updated:", ", ".join(update()) or "nothing")
