"""The whole run as functions: prepare -> search -> select -> fine-tune -> evaluate -> export.

``run(config)`` is what ``flexora-jax run`` does; each stage is also a function of its own that reads
what earlier stages wrote into the run directory, so a stage can be rerun, or a run resumed, from files
alone (layout: ``docs/design.md``; ``searches/<gates>/`` holds each search's gates and selection,
``methods/<method>/`` each method's selection and adapter, ``compare.json`` every method's scores).

The search and the fine-tune are the library's ``fj.search`` / ``fj.finetune`` on the decoder's problem
(:func:`flexora_jax.problem.decoder_problem`) with the run's hooks (:func:`_stage_hooks`): orbax checkpoints
every ``checkpoint.every`` steps, at the end and on a signal (restored on ``--resume``), the run log
(truncated back to the checkpoint; a non-finite step recorded as an event), a progress bar. A resumed run
writes the same gates, selection and adapter as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flexora_jax import sharding as sh
from flexora_jax import signals
from flexora_jax.adalora import AdaLoraConfig, export_adalora
from flexora_jax.adapters import export_merged, export_peft, load_peft
from flexora_jax.engine import finetune, finetune_adalora, search
from flexora_jax.errors import ConfigError, DataError, NumericsError
from flexora_jax.evaluation import evaluate
from flexora_jax.fileio import write_dir
from flexora_jax.gates import gate_values
from flexora_jax.hooks import Checkpoint, Progress
from flexora_jax.loops import Hook
from flexora_jax.lora import init_lora
from flexora_jax.nnx import LlamaForCausalLM
from flexora_jax.pipeline import report
from flexora_jax.pipeline.config import PLANTED_TASK, RunConfig, config_to_dict
from flexora_jax.pipeline.io import progress, progress_enabled, read_json, write_json
from flexora_jax.pipeline.methods import (
    SearchOutcome,
    load_search,
    method_dir,
    method_selection,
    needed_searches,
    selection_json,
)
from flexora_jax.pipeline.registry import get_method
from flexora_jax.pipeline.workspace import Workspace, prepare
from flexora_jax.problem import decoder_problem
from flexora_jax.selection import Selection
from flexora_jax.signals import stop_on_signals
from flexora_jax.train import dataset_loss, total_steps
from flexora_jax.writers import TensorBoardWriter, WandbWriter

log = logging.getLogger("flexora_jax")


# ------------------------------------------------------------------------------- stage skeleton
def _stage_hooks(ws: Workspace, stage: str) -> list[Hook]:
    """The hooks every library stage of a run gets: checkpoints (resumed only with ``--resume``), the run log,
    the metric writers ``log:`` asks for (TensorBoard in ``tensorboard/<stage>``, W&B), the one progress bar
    (the library's own is off: ``progress=False``)."""
    cfg = ws.config
    writers: list[Hook] = []
    if cfg.log.tensorboard:
        writers.append(TensorBoardWriter(ws.run_dir / "tensorboard", stage=stage))
    if cfg.log.wandb_project:
        writers.append(
            WandbWriter(
                cfg.log.wandb_project, group=ws.run_dir.name, stage=stage, config=config_to_dict(cfg), dir=ws.run_dir
            )
        )
    return [
        Checkpoint(ws.run_dir / "checkpoints" / stage, cfg.checkpoint.every, cfg.checkpoint.keep, restore=ws.resume),
        ws.log.stage_hook(stage),
        *writers,
        Progress(desc=stage, enabled=progress_enabled()),
    ]


def _timed(ws: Workspace, stage: str, body: Callable[[], Any]) -> Any:
    """Run a stage's library call, recording its wall time; a non-finite stop is logged (the run log's hook
    has written the event, the last good checkpoint is kept)."""
    t0 = time.perf_counter()
    try:
        result = body()
    except NumericsError as exc:
        log.error("%s stopped: %s (the last good checkpoint is kept)", stage, exc)
        raise
    ws.record_time(stage, time.perf_counter() - t0)
    return result


# ---------------------------------------------------------------------------------------- stages
def search_stage(ws: Workspace, kind: str = "layer") -> SearchOutcome:
    """Run (or resume, or reuse) the ``kind`` gate search ("layer", "rank", "both"); write its files."""
    cfg, sc = ws.config, ws.config.search
    out_dir = ws.run_dir / "searches" / kind
    stage = f"search_{kind}"
    signals.check(f"before {stage}")
    if ws.resume and (out_dir / "selection.json").exists():
        log.info("%s: done in a previous session, reusing %s", stage, out_dir)
        return load_search(ws.run_dir, kind)
    problem = decoder_problem(ws.model_config, ws.params, cfg.lora, seed=cfg.seed)
    result = _timed(
        ws,
        stage,
        lambda: search(
            problem,
            sc,
            ws.data.train,
            ws.data.val,
            gates=kind,
            selection=cfg.selection,
            seed=cfg.seed,
            hooks=_stage_hooks(ws, stage),
            progress=False,
            mesh=ws.mesh,
        ),
    )
    values = gate_values(result.gates, ws.num_layers)
    gates_json: dict[str, Any] = {}
    if "layer" in values:
        gates_json["layer"] = [float(x) for x in np.asarray(values["layer"])]
        gates_json["layer_alpha"] = [float(x) for x in np.asarray(result.gates.layer)]
    if "rank" in values:
        gates_json["rank"] = {m: np.asarray(v).tolist() for m, v in values["rank"].items()}
    write_json(out_dir / "gates.json", gates_json)
    write_json(out_dir / "selection.json", selection_json(ws, result.selection))
    log.info(
        "%s: %d steps in %.1f s; selected layers %s", stage, sc.steps, ws.timings[stage], list(result.selection.layers)
    )
    return SearchOutcome(kind, gates_json, result.selection)


def finetune_stage(ws: Workspace, method: str, selection: Selection) -> Any:
    """Fine-tune ``method`` on ``selection`` as its registry record says (a fresh LoRA or DoRA; AdaLoRA: its own
    stage), or resume / reuse it; export it in PEFT format."""
    cfg, ft = ws.config, ws.config.finetune
    out_dir = method_dir(ws, method)
    stage = f"finetune_{method}"
    signals.check(f"before {stage}")
    adapter = out_dir / "adapter"
    if ws.resume and (adapter / "adapter_model.safetensors").exists() and (out_dir / "selection.json").exists():
        log.info("%s: done in a previous session, reusing %s", stage, adapter)
        return load_peft(adapter, ws.model_config)
    if get_method(method).finetune == "adalora":
        return _finetune_adalora(ws, stage, out_dir)
    lora = init_lora(ws.model_config, selection.lora_config, jax.random.key(cfg.seed + 1), ws.params)  # DoRA: W0
    problem = decoder_problem(ws.model_config, ws.params, lora)
    trained, history = _timed(
        ws,
        stage,
        lambda: finetune(
            problem,
            ws.data.finetune,
            ft,
            val=ws.data.val,
            seed=cfg.seed,
            hooks=_stage_hooks(ws, stage),
            progress=False,
            mesh=ws.mesh,
        ),
    )
    if sh.is_main_process():
        write_dir(adapter, lambda tmp: export_peft(trained, tmp, base_model_name_or_path=ws.model_source))
    write_json(out_dir / "selection.json", selection_json(ws, selection))
    log.info("%s: %d steps in %.1f s on layers %s", stage, len(history), ws.timings[stage], list(selection.layers))
    return trained


def _finetune_adalora(ws: Workspace, stage: str, out_dir: Path) -> Any:
    """AdaLoRA on every layer (PEFT's loop and allocator, ``fj.finetune_adalora``: the one driver, its
    checkpoints and resume), exported rank-pruned as LoRA with ``rank_pattern`` and as a PEFT AdaLoRA adapter.

    The budget runs from ``init_r`` = 1.5 r to ``target_r`` = r (the run's ``lora.r``), warm-up and final
    phases of 10% / 20% of the steps, a mask every 5%.
    """
    cfg, ft = ws.config, ws.config.finetune
    steps = total_steps(ft, len(ws.data.finetune["input_ids"])) * ft.grad_accum
    r = cfg.lora.r
    ada = AdaLoraConfig(
        target_r=r,
        init_r=max(r + 1, round(1.5 * r)),
        tinit=steps // 10,
        tfinal=steps // 5,
        deltaT=max(1, steps // 20),
        total_step=steps,
        lora_alpha=cfg.lora.lora_alpha,
        target_modules=cfg.lora.target_modules,
    )
    problem = decoder_problem(ws.model_config, ws.params, cfg.lora, seed=cfg.seed)  # AdaLoRA reads its base only
    found = _timed(
        ws,
        stage,
        lambda: finetune_adalora(
            problem,
            ws.data.finetune,
            ada,
            lr=ft.lr,
            batch_size=ft.batch_size,
            seed=cfg.seed,
            hooks=_stage_hooks(ws, stage),
            progress=False,
            mesh=ws.mesh,
        ),
    )
    lora, layers = found.lora, found.layers
    if sh.is_main_process():
        write_dir(out_dir / "adapter", lambda tmp: export_peft(lora, tmp, base_model_name_or_path=ws.model_source))
        write_dir(
            out_dir / "adalora_adapter", lambda tmp: export_adalora(ada, found.weights, layers, ws.num_layers, tmp)
        )
    every = tuple(range(ws.num_layers))
    selection = Selection(
        layers,
        {m: every for m in lora.spec.targets},
        {m: tuple(lora.spec.rank_of(m)) for m in lora.spec.targets},
        lora.spec.config,
    )
    write_json(out_dir / "selection.json", selection_json(ws, selection))
    log.info("%s: %d steps in %.1f s; ranks %s", stage, steps, ws.timings[stage], dict(lora.spec.config.rank_pattern))
    return lora


def evaluate_stage(ws: Workspace, loras: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Held-out scores of the base model (``"base"``) and of each method's LoRA: ``{method: {task: {...}}}``.

    The planted task reports the test cross-entropy against the teacher's distributions
    (``test_loss``; the teacher's own entropy is the floor); a real task reports lm-eval style
    ``acc`` / ``acc_norm`` from :func:`flexora_jax.evaluation.evaluate`.
    """
    cfg = ws.config
    t0 = time.perf_counter()
    candidates: dict[str, Any] = ({"base": None} if cfg.eval.base else {}) | dict(loras)
    # adapters read back from disk (or kept-best host copies) go onto the mesh: the scorers follow them
    candidates = {k: None if v is None else sh.shard(v, ws.mesh) for k, v in candidates.items()}
    results: dict[str, dict[str, Any]] = {}
    bar = progress(len(candidates), 0, "evaluate", unit="model") if ws.planted is not None else None
    for name, lora in candidates.items():
        signals.check(f"in evaluate, before scoring {name!r}")
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
        if ws.planted is not None:
            test = ws.data.test
            n = len(test["input_ids"]) if not cfg.eval.limit else min(cfg.eval.limit, len(test["input_ids"]))
            test = {k: v[:n] for k, v in test.items()}
            loss = dataset_loss(ws.model_config, ws.params, lora, test, batch_size=cfg.eval.batch_size)
            results[name] = {
                PLANTED_TASK: {"test_loss": loss, "teacher_test_loss": ws.planted.teacher_test_loss, "n": n}
            }
        else:
            res = evaluate(
                LlamaForCausalLM.from_params(ws.model_config, ws.params, lora),
                ws.tokenizer,
                {cfg.task.name: ws.data.test_records},
                batch_size=cfg.eval.batch_size,
                progress=progress_enabled(),
            )
            test_loss = dataset_loss(ws.model_config, ws.params, lora, ws.data.test, batch_size=cfg.eval.batch_size)
            results[name] = {t: dict(v, test_loss=test_loss) for t, v in res.items()}
            if ws.data.test_noq is not None:
                results[name][cfg.task.name].update(_question_control(ws, lora, test_loss))
        log.info("evaluate %s: %s", name, score_line(results[name]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ws.record_time("evaluate", time.perf_counter() - t0)
    write_json(ws.run_dir / "compare.json", results)
    write_json(ws.run_dir / "eval.json", results[cfg.method])
    return results


def _question_control(ws: Workspace, lora: Any, test_loss: float) -> dict[str, float]:
    """Scores with the question removed from every test prompt (``eval.question_control``).

    ``question_gain`` = answer loss without the question minus with it: how many nats per answer
    token the model draws from the question (0 = it answers from length / wording priors alone).
    """
    cfg = ws.config
    loss = dataset_loss(ws.model_config, ws.params, lora, ws.data.test_noq, batch_size=cfg.eval.batch_size)
    res = evaluate(
        LlamaForCausalLM.from_params(ws.model_config, ws.params, lora),
        ws.tokenizer,
        {cfg.task.name: ws.data.test_records_noq},
        batch_size=cfg.eval.batch_size,
        progress=False,
    )[cfg.task.name]
    out = {"test_loss_noq": loss, "question_gain": loss - test_loss}
    out.update({f"{k}_noq": res[k] for k in ("acc", "acc_norm") if k in res})
    return out


def score_line(scores: dict[str, Any]) -> str:
    """One line of a method's scores: ``task acc 0.5, acc_norm 0.5, test_loss 2.1``."""
    parts = []
    for task, m in scores.items():
        keys = [k for k in ("acc", "acc_norm", "test_loss") if k in m]
        parts.append(f"{task} " + ", ".join(f"{k} {m[k]:.4f}" for k in keys))
    return "; ".join(parts)


def export_stage(ws: Workspace, merged: bool = False) -> None:
    """The run's main result at the top of the run directory, ``report.md`` and ``gates.png``.

    Copies the main method's ``selection.json`` and ``adapter/`` up, writes ``gates.json`` (of the
    main method's search, else of the layer search, else empty), and with ``merged`` also the base
    model with the adapter merged in (an HF directory in ``merged/``). Each output is written whole and
    atomically, and only the files the export writes are replaced: a file of yours inside ``adapter/`` stays.
    A signal stops it between outputs.
    """
    cfg = ws.config
    src = method_dir(ws, cfg.method)
    if not (src / "adapter").exists():
        raise DataError(f"{src / 'adapter'} does not exist; run the fine-tune stage first")
    signals.check("in export, before copying the adapter")
    if sh.is_main_process():
        write_dir(ws.run_dir / "adapter", lambda tmp: shutil.copytree(src / "adapter", tmp))
    signals.check("in export, before writing selection.json and gates.json")
    write_json(
        ws.run_dir / "selection.json",
        {k: v for k, v in read_json(src / "selection.json").items() if k in ("layers", "ranks", "trainable_params")},
    )
    kind = get_method(cfg.method).search or ("layer" if (ws.run_dir / "searches" / "layer").exists() else None)
    write_json(ws.run_dir / "gates.json", read_json(ws.run_dir / "searches" / kind / "gates.json") if kind else {})
    if merged:
        signals.check("in export, before writing the merged model")
        lora = load_peft(src / "adapter", ws.model_config)
        params = sh.fetch(ws.params) if jax.process_count() > 1 else ws.params  # collective: every process gathers
        if sh.is_main_process():
            export_merged(ws.model_config, params, lora, ws.run_dir / "merged", tokenizer=ws.tokenizer)
    signals.check("in export, before writing report.md")
    report.write_report(ws.run_dir, ws.config, ws.timings)


# -------------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class RunResult:
    """What a run produced (also on disk in ``run_dir``)."""

    run_dir: Path
    selections: dict[str, Selection]
    scores: dict[str, dict[str, Any]]
    planted: dict[str, Any] | None
    timings: dict[str, float]

    def summary(self) -> str:
        lines = []
        w = max([17] + [len(m) + 9 for m in self.selections])
        if self.planted is not None:
            lines.append(f"{'planted layers:':<{w}}{self.planted['layers']}")
        for m, sel in self.selections.items():
            lines.append(f"{m + ' layers:':<{w}}{list(sel.layers)}")
        for m, scores in self.scores.items():
            lines.append(f"{m + ':':<{w}}{score_line(scores)}")
        if self.planted is not None:
            first = next(iter(self.scores.values()))
            lines.append(f"{'teacher floor:':<{w}}{first[PLANTED_TASK]['teacher_test_loss']:.4f}")
        lines.append(f"{'run directory:':<{w}}{self.run_dir} ({sum(self.timings.values()):.0f} s)")
        return "\n".join(lines)


def searches_stage(ws: Workspace) -> dict[str, SearchOutcome]:
    """Every search the run's methods need."""
    return {kind: search_stage(ws, kind) for kind in needed_searches(ws.config)}


def finetune_all(ws: Workspace, searches: dict[str, SearchOutcome]) -> tuple[dict[str, Selection], dict[str, Any]]:
    selections = {m: method_selection(ws, m, searches) for m in ws.config.methods}
    loras = {m: finetune_stage(ws, m, sel) for m, sel in selections.items()}
    return selections, loras


def load_adapters(ws: Workspace) -> dict[str, Any]:
    """Each method's fine-tuned adapter, read back from ``methods/<method>/adapter``."""
    out = {}
    for m in ws.config.methods:
        adapter = method_dir(ws, m) / "adapter"
        if not adapter.exists():
            raise DataError(f"{adapter} does not exist; run `flexora-jax finetune --output-dir {ws.run_dir}` first")
        out[m] = load_peft(adapter, ws.model_config)
    return out


def run(config: RunConfig | None = None, resume: bool = False) -> RunResult:
    """The whole pipeline: prepare, search, select, fine-tune every method, evaluate, export.

    Args:
      config: the run; ``None`` runs the embedded default (a planted task).
      resume: continue the run in ``config.output_dir`` from its files and latest checkpoints.
    Raises:
      FlexoraError: a user error (config, data, checkpoint, numerics); :class:`Interrupted` on a signal.
    """
    config = config or RunConfig()
    t0 = time.perf_counter()
    with stop_on_signals(str(config.output_dir)):
        ws = prepare(config, resume=resume, stage="run")
        try:
            searches = searches_stage(ws)
            selections, loras = finetune_all(ws, searches)
            scores = evaluate_stage(ws, loras)
            export_stage(ws)
            ws.record_time("total", time.perf_counter() - t0)  # this call's wall time
        finally:
            ws.rundir.release()
    planted = ws.planted.planted_json() if ws.planted is not None else None
    timings = {k: v for k, v in ws.timings.items() if k != "total"}
    return RunResult(ws.run_dir, selections, scores, planted, timings)


def run_stage(stage: str, config: RunConfig, merged: bool = False) -> Any:
    """One stage of a run from the files of earlier stages in ``config.output_dir``.

    ``search`` writes ``searches/``; ``finetune`` reads them and writes ``methods/*/adapter``;
    ``evaluate`` reads the adapters and writes ``eval.json`` / ``compare.json``; ``export`` writes the
    top-level files, ``report.md``, ``gates.png`` (and ``merged/`` with ``merged=True``).
    """
    if stage not in ("search", "finetune", "evaluate", "export"):
        raise ConfigError(f"unknown stage {stage!r}; expected one of search, finetune, evaluate, export")
    with stop_on_signals(str(config.output_dir)):
        ws = prepare(config, resume=False, stage=stage, merged=merged)
        try:
            if stage == "search":
                return searches_stage(ws)
            if stage == "finetune":
                return finetune_all(ws, {kind: load_search(ws.run_dir, kind) for kind in needed_searches(ws.config)})
            if stage == "evaluate":
                return evaluate_stage(ws, load_adapters(ws))
            return export_stage(ws, merged=merged)
        finally:
            ws.rundir.release()
