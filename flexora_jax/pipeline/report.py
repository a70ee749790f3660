"""``report.md`` and its pictures: what ran, what was selected, how each method scored and how sure that is.

Everything is rebuilt from the run directory's files (``config.yaml``, ``metrics.jsonl``, ``searches/``,
``methods/``, ``compare.json``, ``planted.json``), so a resumed run reports the whole search, not only the
part after the resume. The report shows

- every accuracy with its standard error over the test examples (lm-eval's ``*_stderr``), and, for a
  multi-seed run (:func:`render_seeds`), the mean +- standard deviation over the seeds;
- gate checks (:func:`gate_checks`): a layer gate still moving at the end of the search (its trend over
  the last steps), a selection within a small margin of the rule's threshold, rank gates on their
  threshold, each with what to do about it;
- the pictures of :mod:`flexora_jax.pipeline.plots` (gates, rank gates, loss curves, the comparison),
  linked where they belong.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flexora_jax import fileio
from flexora_jax.pipeline import plots
from flexora_jax.pipeline.config import RunConfig, config_to_dict
from flexora_jax.pipeline.io import RunLog
from flexora_jax.pipeline.methods import method_dirname
from flexora_jax.sharding import is_main_process

log = logging.getLogger("flexora_jax")

#: Score columns of the tables, in order; an accuracy's standard error is ``<key>_stderr`` (``stderr`` for
#: ``exact_match``, as :func:`flexora_jax.evaluation.evaluate_generative` names it).
SCORE_KEYS = ("acc", "acc_norm", "exact_match", "test_loss")
#: The fraction of the search's last steps whose trend tells whether a gate is still moving.
TAIL = 0.2
#: A gate moving by more than this fraction of its range over the last :data:`TAIL` of steps is flagged (an
#: exponential approach is flagged until about 90% of the way: at 95% it moves ~4% of its range in the last 20%).
MOVING = 0.05
#: A gate within this relative margin of the rule's threshold (or of the next layer, under ``top_k``).
MARGIN = 0.01


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def gate_trajectories(run_dir: Path, kind: str) -> list[list[float]]:
    """Layer gate values per logged search step, from ``metrics.jsonl`` (last record of a step wins)."""
    by_step = {int(r["step"]): r["gates"] for r in RunLog(run_dir).records(f"search_{kind}") if "gates" in r}
    return [by_step[s] for s in sorted(by_step)]


# --------------------------------------------------------------------------------------- gate checks
def _tail_slope(traj: np.ndarray, tail: float) -> tuple[np.ndarray, int]:
    """Each gate's least-squares trend per step over the last ``tail`` of the steps (at least 3), and their number."""
    n = max(3, math.ceil(tail * len(traj)))
    return np.polyfit(np.arange(n, dtype=np.float64), traj[-n:], 1)[0], n


def moving_gates(
    trajectory: Sequence[Sequence[float]], tail: float = TAIL, tolerance: float = MOVING
) -> dict[int, float]:
    """Layers whose gate is still moving when the search ends: ``{layer: change}``.

    ``change`` is the least-squares trend over the last ``tail`` of the steps (at least 3), times the
    window's length, relative to the gate's range over the whole search (the range floored at a tenth of
    the widest gate's, so a gate that hardly moved is not flagged for noise); signed (+: rising). A gate is
    flagged when ``|change| > tolerance``. Fewer than 5 steps: nothing can be told, nothing is flagged.
    """
    traj = np.asarray(trajectory, np.float64)
    if traj.ndim != 2 or len(traj) < 5:
        return {}
    slope, n = _tail_slope(traj, tail)
    span = traj.max(0) - traj.min(0)
    change = slope * (n - 1) / np.maximum(span, max(0.1 * span.max(), 1e-9))
    return {int(i): float(change[i]) for i in np.flatnonzero(np.abs(change) > tolerance)}


def boundary(w: Sequence[float], rule: str, top_k: int = 0, threshold: float = 1.0) -> float | None:
    """The gate value the rule's decision turns on: 1 (``positive``), ``threshold``, or for ``top_k`` the midpoint
    of the k-th and (k+1)-th largest gates; None when nothing is decided (``top_k`` keeping every layer)."""
    if rule in ("positive", "threshold"):
        return 1.0 if rule == "positive" else float(threshold)
    ranked = np.sort(np.asarray(w, np.float64))[::-1]
    return float(ranked[top_k - 1] + ranked[top_k]) / 2 if rule == "top_k" and 1 <= top_k < len(ranked) else None


def marginal_gates(
    w: Sequence[float], rule: str, top_k: int = 0, threshold: float = 1.0, margin: float = MARGIN
) -> dict[int, float]:
    """Layers whose selection hangs on less than ``margin`` (relative): ``{layer: the boundary it sits at}``.

    ``positive`` keeps ``w > 1`` and ``threshold`` keeps ``w >= threshold``: a gate within ``margin`` of that
    boundary; ``top_k``: the last kept and the first dropped layer when their gates differ by less than
    ``margin`` of the kept one (a tie for the k-th place).
    """
    w = np.asarray(w, np.float64)
    if rule in ("positive", "threshold"):
        edge = boundary(w, rule, top_k, threshold)
        near = np.abs(w - edge) <= margin * max(abs(edge), 1e-12)
        return {int(i): edge for i in np.flatnonzero(near)}
    if rule == "top_k" and 1 <= top_k < len(w):
        order = np.argsort(-w, kind="stable")
        kept, dropped = int(order[top_k - 1]), int(order[top_k])
        if w[kept] - w[dropped] <= margin * abs(w[kept]):
            return {kept: float(w[dropped]), dropped: float(w[kept])}
    return {}


class Check(NamedTuple):
    """One finding of the gate checks: its text, and whether it may change the selection (then it is logged)."""

    text: str
    warning: bool


def gate_checks(
    trajectory: Sequence[Sequence[float]],
    w: Sequence[float],
    selected: Sequence[int],
    selection: Mapping[str, Any],
    steps: int,
) -> list[Check]:
    """What the report says about one layer search, with what to do: a gate still moving toward the rule's
    boundary (the selection may change with more steps), gates still moving away from it (they would only
    sharpen), a selection within :data:`MARGIN` of the boundary."""
    rule, k = selection.get("rule", "positive"), selection.get("top_k", 0)
    edge = boundary(w, rule, k, selection.get("threshold", 1.0))
    where = (
        f"the boundary between places {k} and {k + 1} of `top_k`"
        if rule == "top_k"
        else f"the `{rule}` rule's threshold {edge:g}"
        if edge is not None
        else ""
    )
    moving = moving_gates(trajectory)
    slope = _tail_slope(np.asarray(trajectory, np.float64), TAIL)[0] if moving else None
    checks, away = [], []
    for layer, change in moving.items():
        if edge is None or (edge - w[layer]) * change <= 0:
            away.append(layer)
            continue
        checks.append(
            Check(
                f"layer {layer}: the gate is still {'rising' if change > 0 else 'falling'} toward {where} (w = "
                f"{w[layer]:.3f}, {change:+.0%} of its range over the last {TAIL:.0%} of the steps; at that rate it "
                f"crosses in about {(edge - w[layer]) / slope[layer]:.0f} steps): the selection may change with a longer "
                f"search: raise `search.steps` (now {steps})",
                True,
            )
        )
    if away:
        checks.append(
            Check(
                f"layers {sorted(away)}: still moving at the end of the search, away from "
                f"{where or 'the selection boundary'}: more steps would sharpen these gates, not "
                "change the selection",
                False,
            )
        )
    for layer, value in marginal_gates(w, rule, k, selection.get("threshold", 1.0)).items():
        what = "selected" if layer in selected else "not selected"
        if rule == "top_k":
            why = f"within {MARGIN:.0%} of the gate it competes with for place {k} ({value:.3f})"
            fix = "more `search.steps`, or another `selection.top_k`"
        else:
            why = f"within {MARGIN:.0%} of {where}"
            fix = (
                "more `search.steps`, or a rule that does not hang on it: `selection.rule=top_k` with "
                f"`selection.top_k={max(1, len(selected))}`"
                + (", or `selection.rule=threshold`" if rule == "positive" else "")
            )
        checks.append(
            Check(f"layer {layer}: w = {w[layer]:.4f} ({what}) is {why}; a near tie that noise can decide: {fix}", True)
        )
    return checks


def rank_checks(values: Mapping[str, Sequence[Sequence[float]]], margin: float = MARGIN) -> list[Check]:
    """Rank gates (``{module: [L][r] softmax values}``) within ``margin`` of AutoLoRA's ``1 / r`` threshold."""
    lines = []
    for module, v in sorted(values.items()):
        v = np.asarray(v, np.float64)
        r = v.shape[-1]
        near = int((np.abs(v - 1.0 / r) <= margin / r).sum())
        if near:
            lines.append(
                Check(
                    f"{module}: {near} of {v.size} rank components within {margin:.0%} of the threshold "
                    f"1/r = {1.0 / r:.3g}; their ranks are not settled: more `search.steps` or a larger "
                    "`search.outer_lr`",
                    True,
                )
            )
    return lines


def _checks(run_dir: Path, config: Mapping[str, Any]) -> list[Check]:
    """The gate checks of every search in the run directory, each prefixed with its search."""
    found: list[Check] = []
    for kind in ("layer", "rank", "both"):
        gates = _read(run_dir / "searches" / kind / "gates.json")
        if gates is None:
            continue
        checks = []
        if gates.get("layer"):
            sel = _read(run_dir / "searches" / kind / "selection.json") or {}
            checks += gate_checks(
                gate_trajectories(run_dir, kind),
                gates["layer"],
                sel.get("layers", []),
                config["selection"],
                config["search"]["steps"],
            )
        checks += rank_checks(gates.get("rank") or {})
        found += [c._replace(text=f"`{kind}` search, {c.text}") for c in checks]
    return found


# ------------------------------------------------------------------------------------------- scores
def stderr_of(scores: Mapping[str, Any], key: str) -> float | None:
    """The standard error recorded beside ``scores[key]`` (None when there is none, or it is not finite)."""
    err = scores.get(f"{key}_stderr", scores.get("stderr") if key == "exact_match" else None)
    return float(err) if isinstance(err, (int, float)) and math.isfinite(err) else None


def _fmt(x: Any, err: float | None = None) -> str:
    if not isinstance(x, float):
        return str(x)
    return f"{x:.4f} ± {err:.4f}" if err is not None else f"{x:.4f}"


def _comparison(scores: Mapping[str, Mapping[str, Any]], task: str, keys: Sequence[str]) -> dict[str, dict]:
    """``{metric: {method: (value, stderr)}}`` of one run's scores, for :func:`plots.comparison`."""
    return {
        k: {
            m: (sc[task][k], stderr_of(sc[task], k))
            for m, sc in scores.items()
            if isinstance(sc.get(task, {}).get(k), (int, float))
        }
        for k in keys
        if k != "n"
    }


def _score_table(scores: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    keys = [k for k in (*SCORE_KEYS, "n") if any(k in v for sc in scores.values() for v in sc.values())]
    tasks = sorted({t for sc in scores.values() for t in sc})
    lines = [
        "| method | " + " | ".join(f"{t} {k}" for t in tasks for k in keys) + " |",
        "|" + "---|" * (1 + len(tasks) * len(keys)),
    ]
    for m, sc in scores.items():
        lines.append(
            f"| {m} | "
            + " | ".join(_fmt(sc.get(t, {}).get(k, ""), stderr_of(sc.get(t, {}), k)) for t in tasks for k in keys)
            + " |"
        )
    return lines, keys, tasks


def _header(config: Mapping[str, Any], methods: Sequence[str], task: str) -> list[str]:
    model = config["model"]["path"] or config["model"]["llama2c"] or "planted teacher (built in)"
    s, f = config["search"], config["finetune"]
    return [
        f"- model: `{model}`",
        f"- task: `{task}`, seed {config['seed']}",
        f"- methods: {', '.join(methods)} (main: **{config['method']}**)",
        f"- LoRA: r {config['lora']['r']}, alpha {config['lora']['lora_alpha']}, "
        f"targets {', '.join(config['lora']['target_modules'])}",
        f"- search: {s['hypergradient']} hypergradient, K = {s['inner_steps']}, {s['steps']} steps, "
        f"inner lr {s['inner_lr']}, gate lr {s['outer_lr']}, selection rule `{config['selection']['rule']}`",
        f"- fine-tune: {f['optimizer']} lr {f['lr']}, batch {f['batch_size']}, epochs {f['epochs']}, "
        f"max steps {f['max_steps']}",
    ]


def _data_lines(data: Mapping[str, Any]) -> list[str]:
    if not data.get("sizes"):
        return []
    z = data["sizes"]
    lines = [
        f"- data: search {z.get('search_train')} train / {z.get('search_validation')} validation, "
        f"fine-tune {z.get('finetune_train')} train, test {z.get('test')}"
        + (
            f" (max length {data['max_length']}; cut from the left: {data['truncated']})"
            if any((data.get("truncated") or {}).values())
            else ""
        )
        + (
            f"; dropped from SFT (answer longer than max length): {data['dropped_too_long']}"
            if any((data.get("dropped_too_long") or {}).values())
            else ""
        )
    ]
    for sp in data.get("splits") or []:
        how = (
            f"re-split of `{sp.get('source_split')}` with seed {sp.get('seed')}"
            if sp.get("resplit")
            else f"official split `{sp.get('source_split')}`"
        )
        lines.append(f"  - {sp.get('role')} pool: {sp.get('n')} examples ({how}); the first N are used")
    return lines


def render(run_dir: Path, config: dict[str, Any], timings: dict[str, float] | None = None) -> str:
    """The report's markdown (pictures are linked when their files exist beside it)."""
    planted = _read(run_dir / "planted.json")
    scores = _read(run_dir / "compare.json") or {}
    methods = [config["method"]] + [m for m in config["compare"] if m != config["method"]]
    task = config["task"]["name"]
    lines = [
        f"# flexora-jax run: {config['method']} on {task}",
        "",
        *_header(config, methods, task),
        *_data_lines(_read(run_dir / "data.json") or {}),
        "",
    ]
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
        table, keys, _ = _score_table(scores)
        lines += table
        if any(stderr_of(v, k) is not None for sc in scores.values() for v in sc.values() for k in keys):
            lines += [
                "",
                "± is the standard error of the mean over the test examples (lm-eval's `*_stderr`). "
                "Differences smaller than about two standard errors are within the test set's noise; "
                "several seeds (`flexora-jax run --seeds=[0,1,2]`) also show the training's.",
            ]
        if planted is None and "test_loss" in keys:
            lines += [
                "",
                "`test_loss` is the held-out answer loss per token (nats; gold answer given the "
                "prompt, as in fine-tuning). `acc` / `acc_norm` follow lm-evaluation-harness "
                "log-likelihood scoring. Lower loss / higher accuracy is better.",
            ]
        if planted is not None:
            floor = next(iter(scores.values()))[task]["teacher_test_loss"]
            lines += [
                "",
                f"Test loss is the cross-entropy against the teacher's next-token distributions; the "
                f"teacher's own entropy ({floor:.4f}) is the floor. Lower is better.",
            ]
    lines += _picture(run_dir, "compare.png", "comparison")
    gates = _read(run_dir / "gates.json") or {}
    if gates.get("layer"):
        lines += [
            "",
            "## Final layer gates",
            "",
            "| layer | " + " | ".join(map(str, range(len(gates["layer"])))) + " |",
            "|" + "---|" * (1 + len(gates["layer"])),
            "| w | " + " | ".join(f"{w:.3f}" for w in gates["layer"]) + " |",
        ]
    lines += _picture(run_dir, "gates.png", "layer gates") + _picture(run_dir, "rank_gates.png", "rank gates")
    if any((run_dir / "searches" / k).exists() for k in ("layer", "rank", "both")):
        found = _checks(run_dir, config)
        lines += ["", "## Gate checks", ""]
        lines += [f"- {c.text}" for c in found] or [
            f"No gate is still moving over the last {TAIL:.0%} of the search, and none is within {MARGIN:.0%} of "
            "its rule's threshold."
        ]
    if (run_dir / "losses.png").exists():
        lines += ["", "## Training curves", "", "![losses](losses.png)"]
    if timings:
        lines += ["", "## Timings (seconds)", "", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"


def _picture(run_dir: Path, name: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({name})"] if (run_dir / name).exists() else []


def write_plots(run_dir: Path, config: Mapping[str, Any]) -> list[Path]:
    """Draw every picture the run's files support (:mod:`flexora_jax.pipeline.plots`); returns the files."""
    planted = _read(run_dir / "planted.json")
    searches = {k: _read(run_dir / "searches" / k / "gates.json") or {} for k in ("layer", "rank", "both")}
    layers = {k: (_read(run_dir / "searches" / k / "selection.json") or {}).get("layers") for k in searches}
    scores = _read(run_dir / "compare.json") or {}
    task = config["task"]["name"]
    floor = next(iter(scores.values()), {}).get(task, {}).get("teacher_test_loss")
    made = [
        plots.layer_gates(
            {k: gate_trajectories(run_dir, k) for k, g in searches.items() if g.get("layer")},
            run_dir / "gates.png",
            planted["layers"] if planted else None,
        ),
        plots.rank_gates(
            {k: g["rank"] for k, g in searches.items() if g.get("rank")},
            run_dir / "rank_gates.png",
            {k: v for k, v in layers.items() if v is not None and searches[k].get("layer")},
        ),
        plots.losses(RunLog(run_dir).records(), run_dir / "losses.png"),
        plots.comparison(
            _comparison(scores, task, SCORE_KEYS),
            run_dir / "compare.png",
            "standard error over the test examples",
            floor,
        ),
    ]
    return [p for p in made if p is not None]


def write_report(run_dir: Path, config: RunConfig, timings: dict[str, float] | None = None) -> None:
    """Write the pictures and ``report.md`` of a run directory (process 0 only); gate checks are also logged."""
    if not is_main_process():
        return
    data = config_to_dict(config)
    write_plots(run_dir, data)
    for check in _checks(run_dir, data):
        if check.warning:
            log.warning("gate check: %s (report.md)", check.text)
    fileio.write_bytes(run_dir / "report.md", render(run_dir, data, timings))


# --------------------------------------------------------------------------------------- several seeds
def seeds_table(result: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Mean ± sd over seeds per method (``{method: {task: {metric: {mean, std, n}}}}``) as a markdown table."""
    keys = [
        k
        for k in (*SCORE_KEYS, "num_layers", "trainable_params")
        if any(k in v for tasks in result.values() for v in tasks.values())
    ]
    tasks = sorted({t for sc in result.values() for t in sc})
    lines = [
        "| method | " + " | ".join(f"{t} {k}" for t in tasks for k in keys) + " | seeds |",
        "|" + "---|" * (2 + len(tasks) * len(keys)),
    ]
    for method, by_task in result.items():
        cells, n = [], 0
        for t in tasks:
            for k in keys:
                s = by_task.get(t, {}).get(k)
                n = max(n, s["n"]) if s else n
                whole = k in ("num_layers", "trainable_params")
                cells.append(
                    "" if not s or not s["n"] else f"{s['mean']:.0f}" if whole else f"{s['mean']:.4f} ± {s['std']:.4f}"
                )
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {n} |")
    return lines


def render_seeds(
    out: Path, config: Mapping[str, Any], seeds: Sequence[int], result: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> str:
    """``report.md`` of a multi-seed run: mean ± sd over the seeds, each seed's selection and report linked."""
    methods = [config["method"]] + [m for m in config["compare"] if m != config["method"]]
    task = config["task"]["name"]
    lines = [
        f"# flexora-jax run: {config['method']} on {task}, {len(seeds)} seeds",
        "",
        *_header(dict(config, seed=", ".join(map(str, seeds))), methods, task),
        "",
        "## Held-out scores",
        "",
        *seeds_table(result),
        "",
        f"Mean ± standard deviation over the {len(seeds)} seeds (ddof 1); each seed is a whole run (its own "
        "search, selection, fine-tune and, for a planted task, its own planted layers).",
        *_picture(out, "compare.png", "comparison"),
        "",
        "## Each seed",
        "",
        "| seed | " + " | ".join(methods) + " |",
        "|" + "---|" * (1 + len(methods)),
    ]
    for seed in seeds:
        sels = [
            (_read(out / f"seed{seed}" / "methods" / method_dirname(m) / "selection.json") or {}).get("layers")
            for m in methods
        ]
        lines.append(f"| [seed {seed}](seed{seed}/report.md) | " + " | ".join(f"layers {s}" for s in sels) + " |")
    return "\n".join(lines) + "\n"


def write_seeds_report(
    out: Path, config: RunConfig, seeds: Sequence[int], result: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> None:
    """``compare.json`` (mean, std, n per method, task and metric), ``compare.png`` and ``report.md`` of a
    multi-seed run in ``out`` (process 0 only)."""
    if not is_main_process():
        return
    data = config_to_dict(config)
    fileio.write_json(out / "compare.json", result)
    scores = {
        k: {
            m: (by_task[t][k]["mean"], by_task[t][k]["std"])
            for m, by_task in result.items()
            for t in by_task
            if by_task[t].get(k, {}).get("n")
        }
        for k in SCORE_KEYS
    }
    plots.comparison(scores, out / "compare.png", f"standard deviation over {len(seeds)} seeds")
    fileio.write_bytes(out / "report.md", render_seeds(out, data, seeds, result))
