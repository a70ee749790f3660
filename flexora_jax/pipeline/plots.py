"""The run directory's pictures, beside ``report.md`` and linked from it.

- ``gates.png``: the layer gates ``w_l`` over a layer search (Flexora), one panel per search with layer gates;
  written only when the run has such a search (a DoRA, AdaLoRA or LoRA run gets none, not a placeholder);
- ``rank_gates.png``: AutoLoRA's rank gates after a rank / combined search: the selected rank of every
  (module, layer) and each module's gate values ``softmax(beta)`` per (component, layer), the
  selection threshold ``1 / r`` at the colour scale's centre;
- ``losses.png``: the search's training and validation loss, and every fine-tune's loss (and validation
  loss), per step, from ``metrics.jsonl``;
- ``compare.png``: every method's held-out scores with error bars (the standard error over test examples
  of one run, or the standard deviation over seeds of several).

Each function takes plain data (what :mod:`flexora_jax.pipeline.report` reads from the run's files) and
writes one PNG atomically. matplotlib is imported when a picture is drawn (its object API with the Agg
canvas: no pyplot state, no display), never at import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flexora_jax import fileio
from flexora_jax.gates import Gates
from flexora_jax.selection import select_ranks

#: What the loss curves draw of a record: the search's and the fine-tune's training loss, the validation loss.
LOSS_KEYS = ("train_loss", "loss", "val_loss")
#: A method's score and its error bar (None: none known).
Score = tuple[float, float | None]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, out: str | os.PathLike) -> Path:
    return fileio.write_with(out, lambda tmp: fig.savefig(tmp, format="png"))


def layer_gates(
    trajectories: Mapping[str, Sequence[Sequence[float]]], out: str | os.PathLike, planted: Sequence[int] | None = None
) -> Path | None:
    """``w_l`` per search step, one panel per search (``{kind: [[w per layer] per step]}``); planted layers solid,
    the others dashed when the truth is known. None (no file) when no trajectory has a step."""
    trajectories = {k: np.asarray(v, np.float64) for k, v in trajectories.items() if len(v)}
    if not trajectories:
        return None
    fig = _figure(7.5, 3.6 * len(trajectories))
    for ax, (kind, traj) in zip(
        np.atleast_1d(fig.subplots(len(trajectories), 1, squeeze=False)[:, 0]), trajectories.items()
    ):
        steps = np.arange(1, len(traj) + 1)
        for layer in range(traj.shape[1]):
            truth = planted is not None and layer in planted
            ax.plot(
                steps,
                traj[:, layer],
                "-" if planted is None or truth else "--",
                linewidth=1.6,
                label=f"layer {layer}" + (" (planted)" if truth else ""),
            )
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set(
            xlabel="search step",
            ylabel="layer gate  w = (L softmax(alpha))^p",
            title=f"Flexora layer gates during the {kind} search",
        )
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def rank_gates(
    searches: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    out: str | os.PathLike,
    layers: Mapping[str, Sequence[int]] | None = None,
) -> Path | None:
    """AutoLoRA's rank gates: per search (``{kind: {module: [L][r] softmax values}}``), the selected rank of each
    (module, layer) (0 where a combined search dropped the layer: ``layers[kind]``), then each module's gate
    values. None (no file) without a rank search."""
    searches = {k: {m: np.asarray(v, np.float64) for m, v in mods.items()} for k, mods in searches.items() if mods}
    if not searches:
        return None
    width = max(len(mods) for mods in searches.values()) + 1
    fig = _figure(3.4 * width, 3.2 * len(searches))
    grid = fig.subplots(len(searches), width, squeeze=False)
    for row, (kind, mods) in zip(grid, searches.items()):
        modules = sorted(mods)
        chosen = select_ranks(Gates(rank={m: np.log(np.maximum(mods[m], 1e-30)) for m in modules}))
        ranks = np.asarray([chosen[m] for m in modules], np.float64)  # [modules, L]
        kept = (layers or {}).get(kind)
        if kept is not None:
            ranks[:, [i for i in range(ranks.shape[1]) if i not in kept]] = 0
        r_max = max(v.shape[-1] for v in mods.values())
        im = row[0].imshow(ranks, cmap="viridis", vmin=0, vmax=r_max, aspect="auto")
        for (i, j), value in np.ndenumerate(ranks):
            row[0].text(j, i, f"{value:.0f}", ha="center", va="center", color="w" if value < r_max / 2 else "k")
        row[0].set(
            xticks=range(ranks.shape[1]),
            yticks=range(len(modules)),
            yticklabels=modules,
            xlabel="layer",
            title=f"{kind} search: selected rank",
        )
        fig.colorbar(im, ax=row[0], shrink=0.8, label="rank")
        for ax, module in zip(row[1:], modules):
            values = mods[module].T  # [r, L]
            r = values.shape[0]
            im = ax.imshow(values, cmap="RdBu_r", aspect="auto", vmin=0.0, vmax=2.0 / r)  # white: 1 / r
            ax.set(
                xticks=range(values.shape[1]),
                yticks=range(r),
                xlabel="layer",
                ylabel="component",
                title=f"{module}: softmax(beta)",
            )
            fig.colorbar(im, ax=ax, shrink=0.8, label=f"kept >= 1/r = {1.0 / r:.3g}")
        for ax in row[1 + len(modules) :]:
            ax.set_axis_off()
    return _save(fig, out)


def losses(records: Sequence[Mapping[str, Any]], out: str | os.PathLike) -> Path | None:
    """Loss per step: the searches' ``train_loss`` / ``val_loss`` on the left, every fine-tune's ``loss`` (and
    ``val_loss``) on the right, from ``metrics.jsonl`` records (the last record of a stage's step wins). None
    (no file) when nothing was logged."""
    series: dict[str, dict[int, Mapping[str, Any]]] = {}
    for rec in records:
        if "event" not in rec and isinstance(rec.get("step"), int) and any(_finite(rec.get(k)) for k in LOSS_KEYS):
            series.setdefault(str(rec.get("stage", "")), {})[rec["step"]] = rec
    panels = {
        "search": [s for s in series if s.startswith("search")],
        "fine-tune": [s for s in series if not s.startswith("search")],
    }
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    fig = _figure(6.0 * len(panels), 3.8)
    for ax, (title, stages) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for i, stage in enumerate(stages):
            steps = sorted(series[stage])
            colour = f"C{i}"
            for key, style in zip(LOSS_KEYS, ("-", "-", "--")):
                points = [(s, series[stage][s][key]) for s in steps if _finite(series[stage][s].get(key))]
                if not points:
                    continue
                xs, ys = (np.asarray(v, np.float64) for v in zip(*points))
                sparse = len(points) < len(steps) / 2  # validation every N steps: markers
                window = len(ys) // 25
                if window > 1:  # noisy per-batch losses: the raw curve faint, a running mean over it
                    ax.plot(xs, ys, style, color=colour, linewidth=0.6, alpha=0.3)
                    ys = np.convolve(ys, np.ones(window) / window, mode="same")
                    edge = window // 2
                    xs, ys = xs[edge : len(xs) - edge], ys[edge : len(ys) - edge]
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=colour,
                    marker="o" if sparse else None,
                    markersize=3,
                    linewidth=1.3,
                    label=f"{stage} {key}" + (f" (mean of {window})" if window > 1 else ""),
                )
        ax.set(xlabel="step", ylabel="loss (nats / token)", title=title)
        ax.legend(fontsize=7)
    return _save(fig, out)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def comparison(
    scores: Mapping[str, Mapping[str, Score]], out: str | os.PathLike, error: str, floor: float | None = None
) -> Path | None:
    """One panel per metric (``{metric: {method: (value, error bar)}}``), a point per method with its error bar;
    ``error`` names what the bars are; ``floor``: a line at the best reachable ``test_loss``. None (no file)
    without scores."""
    scores = {k: v for k, v in scores.items() if v}
    if not scores:
        return None
    if not any(_finite(e) for by_method in scores.values() for _, e in by_method.values()):
        error = "none recorded for these scores"
    fig = _figure(max(5.5, 0.9 * max(len(v) for v in scores.values()) + 1.5) * len(scores), 3.8)
    for ax, (metric, by_method) in zip(fig.subplots(1, len(scores), squeeze=False)[0], scores.items()):
        methods = list(by_method)
        for i, m in enumerate(methods):  # points, not bars: a bar's length from an axis cut at 0.4 misleads
            value, err = by_method[m]
            ax.errorbar([i], [value], yerr=[err] if _finite(err) else None, fmt="o", capsize=5, color=f"C{i}")
        if metric == "test_loss" and floor is not None:
            ax.axhline(floor, color="grey", linestyle=":", label="teacher floor")
            ax.legend(fontsize=7)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set(title=metric, ylabel=metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"held-out scores (error bars: {error})", fontsize=9)
    return _save(fig, out)


__all__ = ["comparison", "layer_gates", "losses", "rank_gates"]
