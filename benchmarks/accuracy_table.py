"""Accuracy of the pretrained tinystories260k model on the test split of every commonsense task.

The table proves the evaluation pipeline end to end on real data (tokenisation, truncation to the
model's 512-token context, scoring, acc / acc_norm, stderr); a 260K-parameter TinyStories model is
expected to sit near chance. Chance is the expected accuracy of a uniform random guess: the mean of
``1 / len(choices)`` over the scored examples.

Each task is scored with the library's ``flexora_jax.evaluation.evaluate`` on its ``test`` role
(``tasks.load_records(task, "test")``: the registry's split plan, default seed). ``--limit`` /
``--limits task=n`` score only the first n test examples of a task (``evaluate``'s ``limit``); the
JSON records n and the full split size, so a partial row says so.

    python -m benchmarks.accuracy_table                         # full test splits (long: RACE, BoolQ fill 512 tokens)
    python -m benchmarks.accuracy_table --limit 500 --limits race_middle=200 race_high=200
    python -m benchmarks.accuracy_table --smoke                 # 8 examples of 3 tasks, seconds
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import harness  # noqa: E402
from benchmarks.bench_eval import tinystories  # noqa: E402

#: The commonsense multiple-choice tasks of the registry (the generative ones and MMLU are not in this table).
TASKS = (
    "hellaswag",
    "piqa",
    "winogrande",
    "race_middle",
    "race_high",
    "boolq",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "commonsenseqa",
    "siqa",
)
SMOKE_TASKS = ("piqa", "arc_easy", "boolq")


def run(
    smoke: bool = False,
    out_dir: str | None = None,
    command: str | None = None,
    tasks_: tuple[str, ...] | None = None,
    limit: int | None = None,
    limits: dict[str, int] | None = None,
    batch_size: int = 32,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate every task; writes ``accuracy.json`` (``accuracy_smoke.json`` in smoke mode)."""
    from flexora_jax import evaluation, tasks
    from flexora_jax.nnx import LlamaForCausalLM

    begin = harness.start(smoke)
    if smoke:
        tasks_, limit, batch_size = tasks_ or SMOKE_TASKS, 8, 8
    tasks_ = tuple(tasks_ or TASKS)
    limits = dict(limits or {})
    config, params, tokenizer, _ = tinystories(data_dir)
    rows = []
    for name in tasks_:
        t0 = time.perf_counter()
        records = tasks.load_records(name, "test", data_dir=data_dir)
        load_s = time.perf_counter() - t0
        n_limit = limits.get(name, limit)
        scored = records if n_limit is None else records[:n_limit]
        t1 = time.perf_counter()
        res = evaluation.evaluate(
            LlamaForCausalLM.from_params(config, params),
            tokenizer,
            {name: scored},
            batch_size=batch_size,
            progress=False,
        )[name]
        wall = time.perf_counter() - t1
        n_choices = sum(len(r.choices) for r in scored)
        chance = sum(1.0 / len(r.choices) for r in scored) / len(scored)
        spec = tasks.get_task(name)
        row = {
            "task": name,
            "acc": res["acc"],
            "acc_stderr": res["acc_stderr"],
            "acc_norm": res["acc_norm"],
            "acc_norm_stderr": res["acc_norm_stderr"],
            "n": res["n"],
            "split_size": len(records),
            "full_split": len(scored) == len(records),
            "chance": chance,
            "choices": n_choices,
            "truncated": res["truncated"],
            "metrics": list(spec.metrics),
            "wall_s": wall,
            "load_s": load_s,
            "choices_per_s": n_choices / wall,
        }
        rows.append(row)
        print(
            f"[accuracy] {name}: acc {row['acc']:.4f} +- {row['acc_stderr']:.4f}, acc_norm {row['acc_norm']:.4f}, "
            f"chance {chance:.4f}, n {row['n']}/{len(records)}, {wall:.0f} s",
            flush=True,
        )
    payload = {
        "command": command or "python -m benchmarks.accuracy_table" + (" --smoke" if smoke else ""),
        "model": "tinystories260k (llama2.c stories260K, converted by flexora_jax.convert_llama2c)",
        "split": "test",
        "batch_size": batch_size,
        "max_length": config.max_position_embeddings,
        "limit": limit,
        "limits": limits,
        "rows": rows,
    }
    harness.write_result("accuracy_smoke" if smoke else "accuracy", payload, out_dir, start=begin)
    return payload


def table(d: dict[str, Any]) -> str:
    """The Markdown table of an ``accuracy.json`` payload (for RESULTS.md)."""
    lines = [
        "| task | acc | acc_norm | chance | n (test split size) | truncated | wall s | choices/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        n = f"{r['n']}" + ("" if r["full_split"] else f" of {r['split_size']}")
        lines.append(
            f"| {r['task']} | {r['acc']:.4f} +- {r['acc_stderr']:.4f} | {r['acc_norm']:.4f} +- "
            f"{r['acc_norm_stderr']:.4f} | {r['chance']:.4f} | {n} | {r['truncated']} | {r['wall_s']:.0f} | "
            f"{r['choices_per_s']:.1f} |"
        )
    m = d["machine"]
    lines += [
        "",
        f"tinystories260k, batch {d['batch_size']}, context {d['max_length']}; `{d['command']}`, "
        f"{m['date']}, "
        f"{m['cpu']}, {m['cpu_count']} cores, {harness.load_text(d)}.",
    ]
    return "\n".join(lines)


def _parse_limits(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        out[name] = int(n)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="8 examples of 3 tasks, seconds (what the tests run)")
    p.add_argument("--tasks", nargs="*", default=None, choices=TASKS)
    p.add_argument("--limit", type=int, default=None, help="first n test examples of every task (default: all)")
    p.add_argument("--limits", nargs="*", default=[], help="per-task overrides, task=n")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    out = run(
        a.smoke,
        a.out_dir,
        harness.command_line("benchmarks.accuracy_table", argv),
        tuple(a.tasks) if a.tasks else None,
        a.limit,
        _parse_limits(a.limits),
        a.batch_size,
    )
    print(table(harness_loaded(out)))


def harness_loaded(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with the machine info ``write_result`` adds (for printing the table)."""
    return {"machine": harness.machine_info(), **payload}


if __name__ == "__main__":
    main()
