"""``report.md`` and ``gates.png``: what ran, what was selected, how each method scored.

Both are rebuilt from the run directory's files (``config.yaml``, ``metrics.jsonl``, ``searches/``,
``methods/``, ``compare.json``, ``planted.json``), so a resumed run reports the whole search, not only
the part after the resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexora_jax import fileio
from flexora_jax.pipeline.config import RunConfig, config_to_dict
from flexora_jax.pipeline.methods import method_dirname
from flexora_jax.sharding import is_main_process


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def gate_trajectories(run_dir: Path, kind: str) -> list[list[float]]:
    """Layer gate values per logged search step, from ``metrics.jsonl`` (last record of a step wins)."""
    by_step: dict[int, list[float]] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("stage") == f"search_{kind}" and "gates" in rec:
                by_step[int(rec["step"])] = rec["gates"]
    return [by_step[s] for s in sorted(by_step)]


def plot_gates(run_dir: Path, out: Path, planted: list[int] | None = None) -> bool:
    """Gate trajectories per layer over the search (planted layers drawn solid); False if no layer search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = next((k for k in ("layer", "both") if (run_dir / "searches" / k).exists()), None)
    traj = gate_trajectories(run_dir, kind) if kind else []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if traj:
        steps = range(1, len(traj) + 1)
        for layer in range(len(traj[0])):
            style = "-" if planted is None or layer in planted else "--"
            label = f"layer {layer}" + (" (planted)" if planted and layer in planted else "")
            ax.plot(steps, [row[layer] for row in traj], style, label=label, linewidth=1.6)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("search step")
        ax.set_ylabel("layer gate  w = L softmax(alpha)")
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no layer-gate search in this run", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Flexora layer gates during the search")
    fig.tight_layout()
    fileio.write_with(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return bool(traj)


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def render(run_dir: Path, config: dict[str, Any], timings: dict[str, float] | None = None) -> str:
    """The report's markdown."""
    planted = _read(run_dir / "planted.json")
    scores = _read(run_dir / "compare.json") or {}
    methods = [config["method"]] + [m for m in config["compare"] if m != config["method"]]
    task = config["task"]["name"]
    lines = [f"# flexora-jax run: {config['method']} on {task}", ""]
    model = config["model"]["path"] or config["model"]["llama2c"] or "planted teacher (built in)"
    s = config["search"]
    lines += [f"- model: `{model}`", f"- task: `{task}`, seed {config['seed']}",
              f"- methods: {', '.join(methods)} (main: **{config['method']}**)",
              f"- LoRA: r {config['lora']['r']}, alpha {config['lora']['lora_alpha']}, "
              f"targets {', '.join(config['lora']['target_modules'])}",
              f"- search: {s['hypergradient']} hypergradient, K = {s['inner_steps']}, {s['steps']} steps, "
              f"inner lr {s['inner_lr']}, gate lr {s['outer_lr']}, selection rule `{config['selection']['rule']}`",
              f"- fine-tune: {config['finetune']['optimizer']} lr {config['finetune']['lr']}, batch "
              f"{config['finetune']['batch_size']}, epochs {config['finetune']['epochs']}, max steps "
              f"{config['finetune']['max_steps']}"]
    data = _read(run_dir / "data.json") or {}
    if data.get("sizes"):
        z = data["sizes"]
        lines.append(f"- data: search {z.get('search_train')} train / {z.get('search_validation')} validation, "
                     f"fine-tune {z.get('finetune_train')} train, test {z.get('test')}"
                     + (f" (max length {data['max_length']}; cut from the left: {data['truncated']})"
                        if any((data.get("truncated") or {}).values()) else "")
                     + (f"; dropped from SFT (answer longer than max length): {data['dropped_too_long']}"
                        if any((data.get("dropped_too_long") or {}).values()) else ""))
        for sp in data.get("splits") or []:
            how = (f"re-split of `{sp.get('source_split')}` with seed {sp.get('seed')}" if sp.get("resplit")
                   else f"official split `{sp.get('source_split')}`")
            lines.append(f"  - {sp.get('role')} pool: {sp.get('n')} examples ({how}); the first N are used")
    lines.append("")
    lines += ["## Selection", "", "| method | layers | ranks | trainable params |", "|---|---|---|---|"]
    if planted is not None:
        lines.append(f"| *planted (truth)* | {planted['layers']} | {planted['ranks']} | |")
    for m in methods:
        sel = _read(run_dir / "methods" / method_dirname(m) / "selection.json") or {}
        lines.append(f"| {m} | {sel.get('layers')} | {sel.get('ranks') or '-'} | {sel.get('trainable_params')} |")
    if planted is not None:
        flex = _read(run_dir / "searches" / "layer" / "selection.json")
        if flex is not None:
            verdict = "exactly" if sorted(flex["layers"]) == sorted(planted["layers"]) else "NOT"
            lines += ["", f"The layer search recovered the planted layers {verdict}."]
    lines += ["", "## Held-out scores", ""]
    if scores:
        metric_keys = [k for k in ("acc", "acc_norm", "test_loss", "n") if any(
            k in v for sc in scores.values() for v in sc.values())]
        tasks = sorted({t for sc in scores.values() for t in sc})
        header = "| method | " + " | ".join(f"{t} {k}" for t in tasks for k in metric_keys) + " |"
        lines += [header, "|" + "---|" * (1 + len(tasks) * len(metric_keys))]
        for m, sc in scores.items():
            lines.append(f"| {m} | " + " | ".join(_fmt(sc.get(t, {}).get(k, "")) for t in tasks
                                                  for k in metric_keys) + " |")
        if planted is None and "test_loss" in metric_keys:
            lines += ["", "`test_loss` is the held-out answer loss per token (nats; gold answer given the "
                          "prompt, as in fine-tuning). `acc` / `acc_norm` follow lm-evaluation-harness "
                          "log-likelihood scoring. Lower loss / higher accuracy is better."]
        if planted is not None:
            floor = next(iter(scores.values()))[task]["teacher_test_loss"]
            lines += ["", f"Test loss is the cross-entropy against the teacher's next-token distributions; the "
                          f"teacher's own entropy ({floor:.4f}) is the floor. Lower is better."]
    gates = _read(run_dir / "gates.json") or {}
    if gates.get("layer"):
        lines += ["", "## Final layer gates", "", "| layer | " + " | ".join(map(str, range(len(gates["layer"]))))
                  + " |", "|" + "---|" * (1 + len(gates["layer"])),
                  "| w | " + " | ".join(f"{w:.3f}" for w in gates["layer"]) + " |", "", "![gates](gates.png)"]
    if timings:
        lines += ["", "## Timings (seconds)", "", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, config: RunConfig, timings: dict[str, float] | None = None) -> None:
    """Write ``gates.png`` and ``report.md`` of a run directory (process 0 only)."""
    if not is_main_process():
        return
    planted = _read(run_dir / "planted.json")
    plot_gates(run_dir, run_dir / "gates.png", planted["layers"] if planted else None)
    fileio.write_bytes(run_dir / "report.md", render(run_dir, config_to_dict(config), timings))
