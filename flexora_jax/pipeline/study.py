"""The effectiveness study: many runs of the pipeline, aggregated into tables.

A study plan (YAML) lists experiments; each experiment is a base run config plus variants (dotted
overrides) and seeds. Every (experiment, variant, seed) is one ordinary ``flexora_jax.run`` in its own
directory, so every number in the write-up comes from the same code path users run, and the study is
resumable: a finished run (its ``compare.json`` exists) is skipped, an interrupted one resumes from its
checkpoints. ``aggregate`` turns the run directories into ``results.json`` (mean and std over seeds of
held-out loss, accuracy, trainable parameters, wall time, precision / recall of the selected
layers against the planted ones and, for rank-selecting methods, the rank correlation of the selected
ranks with the planted ones) and a markdown table per experiment.

    flexora-jax study configs/study/planted.yaml --out study/planted [--smoke] [--only EXPERIMENT]

(``python -m flexora_jax.pipeline.study`` is the same command). One config over several seeds, without a
plan, is ``flexora-jax run --seeds=[0,1,2]`` (:func:`run_seeds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flexora_jax import fileio
from flexora_jax.errors import ConfigError, FlexoraError
from flexora_jax.pipeline import report
from flexora_jax.pipeline.config import RunConfig, load_config, save_config
from flexora_jax.pipeline.methods import method_dirname
from flexora_jax.pipeline.rundir import RunDir
from flexora_jax.pipeline.stages import run
from flexora_jax.sharding import is_main_process

SMOKE_OVERRIDES = [
    "--search.steps=3",
    "--finetune.max_steps=5",
    "--task.planted.n_train=64",
    "--task.planted.n_val=32",
    "--task.planted.n_test=32",
    "--task.planted.finetune_examples=32",
    "--task.n_train=16",
    "--task.n_val=8",
    "--task.n_test=8",
    "--checkpoint.every=1000",
]


#: Scores of the question-removed control (``eval.question_control``), aggregated when present.
CONTROL_KEYS = ("test_loss_noq", "question_gain", "acc_noq", "acc_norm_noq")


def load_plan(path: str | Path) -> dict[str, Any]:
    """Read and check a study plan: ``{experiments: [{name, config, seeds, variants: {name: [overrides]}}]}``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"study plan {path} does not exist")
    plan = yaml.safe_load(path.read_text()) or {}
    exps = plan.get("experiments")
    if not isinstance(exps, list) or not exps:
        raise ConfigError(f"{path}: 'experiments' must be a non-empty list")
    for i, e in enumerate(exps):
        unknown = set(e) - {"name", "config", "seeds", "variants", "overrides"}
        if unknown or "name" not in e:
            raise ConfigError(
                f"{path}: experiment {i} has unknown keys {sorted(unknown)} or no 'name'; "
                "allowed: name, config, seeds, variants, overrides"
            )
        e.setdefault("seeds", [0, 1, 2])
        e.setdefault("variants", {"default": []})
        e.setdefault("overrides", [])
        if e.get("config"):
            cfg = (path.parent / e["config"]) if not Path(e["config"]).is_absolute() else Path(e["config"])
            if not cfg.exists():
                cfg = Path(e["config"])
            e["config"] = str(cfg)
    return plan


def run_plan(plan_path: str | Path, out: str | Path, smoke: bool = False, only: str | None = None) -> dict[str, Any]:
    """Run every missing run of the plan (resumable), then aggregate; returns the aggregate."""
    plan = load_plan(plan_path)
    out = Path(out).resolve()
    for e in plan["experiments"]:
        if only and e["name"] != only:
            continue
        seeds = e["seeds"][:1] if smoke else e["seeds"]
        for variant, overrides in e["variants"].items():
            for seed in seeds:
                run_dir = out / e["name"] / variant / f"seed{seed}"
                if (run_dir / "compare.json").exists():
                    continue
                extra = list(e["overrides"]) + list(overrides or []) + [f"--seed={seed}", f"--output_dir={run_dir}"]
                if smoke:
                    extra += SMOKE_OVERRIDES
                config = load_config(e.get("config"), extra)
                t0 = time.perf_counter()
                run(config, resume=run_dir.exists())
                print(f"[study] {e['name']}/{variant}/seed{seed}: {time.perf_counter() - t0:.1f} s", flush=True)
    result = aggregate(out)
    fileio.write_json(out / "results.json", result)
    fileio.write_bytes(out / "results.md", render_markdown(result))
    return result


def _mean_std(xs: list[float]) -> dict[str, float]:
    """Mean and std over the seeds where ``x`` is defined.

    Undefined values (``None``, or NaN: e.g. a rank correlation when every slot got the same rank) are
    left out rather than poisoning the mean; ``n`` says how many seeds remain, and the table marks it.
    """
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def _rank_slots(selected: dict[str, int], planted: dict[str, Any], num_layers: int) -> tuple[list[int], list[int]]:
    """(planted, selected) rank of every (layer, module) slot; see :func:`rank_correlation`."""
    truth, chosen = [], []
    for layer in range(num_layers):
        for m in sorted(planted["ranks"]):
            truth.append(planted["ranks"][m] if layer in planted["layers"] else 0)
            key = next((k for k in selected if k.endswith(f".{m}") and f"layers.{layer}." in k), None)
            chosen.append(selected[key] if key is not None else 0)
    return truth, chosen


def rank_by_planted(selected: dict[str, int], planted: dict[str, Any], num_layers: int) -> dict[str, float]:
    """Mean selected rank per planted rank: ``{"rank_at_planted_0": ..., "rank_at_planted_8": ...}``."""
    truth, chosen = _rank_slots(selected, planted, num_layers)
    return {
        f"rank_at_planted_{t}": float(np.mean([c for tt, c in zip(truth, chosen) if tt == t]))
        for t in sorted(set(truth))
    }


def rank_correlation(selected: dict[str, int], planted: dict[str, Any], num_layers: int) -> float:
    """Spearman correlation of selected vs planted LoRA ranks over every (layer, module) slot.

    ``selected`` maps peft-style module paths (``model.layers.{i}.self_attn.q_proj``) to ranks, a missing
    slot meaning rank 0; the planted rank of a slot is ``planted["ranks"][module]`` in a planted layer
    and 0 elsewhere. NaN when either side is constant (no ranking to correlate).
    """
    truth, chosen = _rank_slots(selected, planted, num_layers)
    if len(set(truth)) < 2 or len(set(chosen)) < 2:
        return float("nan")
    from scipy.stats import spearmanr  # scipy.stats is slow to import: only the study's summary needs it

    return float(spearmanr(truth, chosen).statistic)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def collect(run_dir: Path, slot: dict[str, Any]) -> None:
    """Append one finished run's values to ``slot`` (``{method: {metric: [values]}}``, search times under
    ``_search_<kind>``): held-out scores, selection sizes, planted precision / recall / rank agreement, times."""
    scores = _read(run_dir / "compare.json")
    planted = _read(run_dir / "planted.json")
    timings = _read(run_dir / "timings.json") or {}
    for method, tasks in scores.items():
        task_scores = next(iter(tasks.values()))
        rec = slot.setdefault(method, {})
        for key in ("test_loss", "acc", "acc_norm", "exact_match", *CONTROL_KEYS):
            if key in task_scores:
                rec.setdefault(key, []).append(task_scores[key])
        if "teacher_test_loss" in task_scores:
            rec.setdefault("floor", []).append(task_scores["teacher_test_loss"])
        sel = _read(run_dir / "methods" / method_dirname(method) / "selection.json")
        if sel is not None:
            rec.setdefault("trainable_params", []).append(sel.get("trainable_params"))
            rec.setdefault("num_layers", []).append(len(sel.get("layers", [])))
            if planted is not None:
                chosen, truth = set(sel["layers"]), set(planted["layers"])
                rec.setdefault("precision", []).append(len(chosen & truth) / max(len(chosen), 1))
                rec.setdefault("recall", []).append(len(chosen & truth) / max(len(truth), 1))
                if sel.get("ranks") and "num_layers" in planted:
                    rec.setdefault("rank_corr", []).append(
                        rank_correlation(sel["ranks"], planted, planted["num_layers"])
                    )
                    for key, value in rank_by_planted(sel["ranks"], planted, planted["num_layers"]).items():
                        rec.setdefault(key, []).append(value)
        wall = timings.get(f"finetune_{method}")
        if wall is not None:
            rec.setdefault("finetune_s", []).append(wall)
    for key, value in timings.items():
        if key.startswith("search_"):
            slot.setdefault("_" + key, {}).setdefault("search_s", []).append(value)


def _stats(slot: dict[str, Any]) -> dict[str, Any]:
    return {m: {k: _mean_std(v) for k, v in rec.items()} for m, rec in slot.items()}


def aggregate(out: str | Path) -> dict[str, Any]:
    """``{experiment: {variant: {method: {metric: {mean, std, n}}}}}`` from finished run directories."""
    out = Path(out)
    result: dict[str, Any] = {}
    for compare in sorted(out.glob("*/*/seed*/compare.json")):
        run_dir = compare.parent
        collect(run_dir, result.setdefault(run_dir.parent.parent.name, {}).setdefault(run_dir.parent.name, {}))
    return {exp: {var: _stats(methods) for var, methods in variants.items()} for exp, variants in result.items()}


# ------------------------------------------------------------------------------ one run, several seeds
SEEDS_FILE = "seeds.json"


def run_seeds(config: RunConfig, seeds: Sequence[int], resume: bool = False) -> dict[str, Any]:
    """``flexora-jax run --seeds=[0,1,2]``: the run once per seed, into ``<output_dir>/seed<s>``, then the mean and
    standard deviation over the seeds per method in ``<output_dir>/compare.json`` (``{method: {task: {metric:
    {mean, std, n}}}}``), ``report.md`` and ``compare.png``. Returns that aggregate.

    A fresh multi-seed run takes a new or empty directory (``seeds.json`` and ``config.yaml`` mark it as one);
    ``resume`` skips the seeds that finished and resumes the one that was interrupted.
    """
    if (
        not isinstance(seeds, (list, tuple))
        or not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(f"--seeds must be a list of distinct integers >= 0, e.g. --seeds=[0,1,2], got {seeds!r}")
    top = RunDir(config.output_dir)
    top.check_usable()
    if not resume and (top / SEEDS_FILE).exists():
        raise ConfigError(
            f"output_dir {top.path} holds a multi-seed run already; continue it with --resume, or choose "
            "another --output-dir"
        )
    if not resume:
        top.check_fresh(SEEDS_FILE)
    if is_main_process() and not (top / SEEDS_FILE).exists():
        save_config(config, top / "config.yaml")  # what --resume reads back
    if is_main_process():
        fileio.write_json(top / SEEDS_FILE, {"seeds": list(seeds)})
    for seed in seeds:
        run_dir = top / f"seed{seed}"
        if resume and (run_dir / "report.md").exists():
            continue
        run(dataclasses.replace(config, seed=seed, output_dir=str(run_dir)), resume=resume and run_dir.exists())
    slot: dict[str, Any] = {}
    for seed in seeds:
        collect(top / f"seed{seed}", slot)
    task = config.task.name
    result = {m: {task: rec} for m, rec in _stats(slot).items() if not m.startswith("_")}
    report.write_seeds_report(top.path, config, seeds, result)
    return result


def render_markdown(result: dict[str, Any]) -> str:
    """One table per experiment: rows (variant, method), mean +- std over seeds."""
    base_cols = [
        "test_loss",
        "floor",
        "acc",
        "precision",
        "recall",
        "rank_corr",
        "num_layers",
        "trainable_params",
        "finetune_s",
    ]
    lines = []
    for exp, variants in result.items():
        present = {k for methods in variants.values() for rec in methods.values() for k in rec}
        cols = [c for c in base_cols if c in present or c == "test_loss"]
        if "rank_corr" in cols:
            at = cols.index("rank_corr") + 1
            cols[at:at] = sorted(
                (c for c in present if c.startswith("rank_at_planted_")), key=lambda c: int(c.rsplit("_", 1)[1])
            )
        cols[2:2] = [c for c in ("question_gain", "acc_noq") if c in present]
        lines += [
            f"### {exp}",
            "",
            "| variant | method | " + " | ".join(cols) + " | seeds |",
            "|---" * (len(cols) + 3) + "|",
        ]
        for var, methods in variants.items():
            for method, rec in methods.items():
                if method.startswith("_"):
                    continue
                cells = []
                n = max((v["n"] for v in rec.values()), default=0)
                for c in cols:
                    m = rec.get(c)
                    if m is None or m["n"] == 0:
                        cells.append("")
                    elif c in ("trainable_params", "num_layers"):
                        cells.append(f"{m['mean']:.0f}")
                    else:
                        partial = f" ({m['n']} of {n} seeds)" if m["n"] < n else ""
                        cells.append(f"{m['mean']:.3f} ± {m['std']:.3f}{partial}")
                lines.append(f"| {var} | {method} | " + " | ".join(cells) + f" | {n} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m flexora_jax.pipeline.study") -> int:
    """The study command (``flexora-jax study PLAN --out DIR``); returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", help="study plan YAML (configs/study/*.yaml)")
    parser.add_argument("--out", required=True, help="results directory (one run directory per run)")
    parser.add_argument("--smoke", action="store_true", help="one seed, tiny sizes: checks the plan runs")
    parser.add_argument("--only", default=None, help="run only this experiment")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    try:
        result = run_plan(args.plan, args.out, smoke=args.smoke, only=args.only)
    except FlexoraError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
