"""Runner 3: Flexora end to end (search + fine-tune on the selection) vs LoRA on all layers, wall time.

The paper's recipe, proportionally reduced: Flexora searches one epoch of 4800 / 200 examples (600
first-order steps, batch 8) and fine-tunes 20000 examples x 3 epochs (7500 steps, batch 8), i.e. the
fine-tune has 12.5x the search's steps. Here both methods run through the real pipeline
(``flexora_jax.run``) on the planted task with the same ratio: ``search.steps`` first-order steps, then
``12.5 x search.steps`` fine-tune steps for the selected layers and for all layers. Wall time of each
stage comes from the run's ``timings.json``; compile time is inside those stages, as a user sees it.

    python -m benchmarks.end_to_end [--search-steps 600] [--smoke]   # 600: the recipe unreduced (~4 min)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from benchmarks.harness import command_line, load_text, machine_info, start, write_result  # noqa: E402

TARGET = 1.3  # Flexora end to end at most 1.3x LoRA-all


def run(
    smoke: bool = False, out_dir: str | None = None, command: str | None = None, search_steps: int | None = None
) -> dict[str, Any]:
    from flexora_jax.pipeline import load_config
    from flexora_jax.pipeline import run as run_pipeline

    begin = start(smoke)
    steps = search_steps or (3 if smoke else 600)
    finetune_steps = int(round(12.5 * steps))
    overrides = [
        f"--search.steps={steps}",
        "--search.hypergradient=first_order",
        "--search.inner_steps=1",
        "--search.batch_size=8",
        "--search.val_batch_size=8",
        f"--finetune.max_steps={finetune_steps}",
        "--finetune.epochs=1000",  # enough epochs that max_steps, the recipe's 12.5x, is what stops it
        "--finetune.batch_size=8",
        "--compare=[lora]",
        "--checkpoint.every=100000",
        "--eval.base=false",
    ]
    if smoke:  # tiny sizes on one device (the tests' process has 8 virtual CPU devices)
        overrides += [
            "--mesh.num_devices=1",
            "--task.planted.n_train=64",
            "--task.planted.n_val=32",
            "--task.planted.n_test=32",
            "--task.planted.finetune_examples=32",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        result = run_pipeline(load_config(None, overrides + [f"--output_dir={run_dir}"]))
        timings = json.loads((run_dir / "timings.json").read_text())
        selection = json.loads((run_dir / "selection.json").read_text())
    del result
    search_s = sum(v for k, v in timings.items() if k.startswith("search_"))
    flexora_s = search_s + timings["finetune_flexora"]
    lora_s = timings["finetune_lora"]
    payload = {
        "benchmark": "end_to_end",
        "machine": machine_info(),
        "command": command or command_line("benchmarks.end_to_end"),
        "config": {
            "search_steps": steps,
            "finetune_steps": finetune_steps,
            "hypergradient": "first_order",
            "batch": 8,
            "task": "planted (6 layers, hidden 64)",
            "smoke": smoke,
        },
        "selected_layers": selection["layers"],
        "search_s": search_s,
        "finetune_flexora_s": timings["finetune_flexora"],
        "flexora_total_s": flexora_s,
        "lora_all_s": lora_s,
        "ratio": flexora_s / lora_s,
        "target": TARGET,
    }
    write_result("end_to_end_smoke" if smoke else "end_to_end", payload, out_dir, start=begin)
    return payload


def table(d: dict[str, Any]) -> str:
    c = d["config"]
    verdict = "met" if d["ratio"] <= d["target"] else "**missed**"
    m = d["machine"]
    return "\n".join(
        [
            "| recipe (search / fine-tune steps) | selected layers | search s | fine-tune selected s | Flexora total s "
            "| LoRA-all fine-tune s | Flexora / LoRA-all (target <= 1.3x) | command | date | machine |",
            "|---" * 10 + "|",
            f"| {c['search_steps']} first-order / {c['finetune_steps']}, batch {c['batch']} | {d['selected_layers']} "
            f"| {d['search_s']:.1f} | {d['finetune_flexora_s']:.1f} | {d['flexora_total_s']:.1f} | {d['lora_all_s']:.1f} "
            f"| **{d['ratio']:.2f}x** ({verdict}) | `{d['command']}` | {m['date']} | {m.get('cpu', '')}, "
            f"{m.get('cpu_count', '')} cores, {load_text(d)} |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--search-steps", type=int, default=None)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    d = run(smoke=args.smoke, out_dir=args.out_dir, search_steps=args.search_steps)
    print(table(d))


if __name__ == "__main__":
    main()
