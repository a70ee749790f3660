"""The run's workspace: the run directory, the base model and the data every stage shares.

:func:`prepare` validates the config against the model, creates (or reopens) the run directory,
builds or loads the base model (sharded on the run's mesh) and prepares the task's token data: the
embedded planted task's teacher data, or a real task's SFT arrays (search train / validation,
fine-tune train, test) and its multiple-choice test records. A fresh run refuses a directory that
already holds a run; a resumed run or a stage must use the config the directory was created with.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax import sharding as sh
from flexora_jax import tasks
from flexora_jax.config import ModelConfig
from flexora_jax.data import Dataset
from flexora_jax.engine import check_finetune_sizes
from flexora_jax.errors import CheckpointError, ConfigError, DataError
from flexora_jax.fileio import write_dir
from flexora_jax.memory import plan_memory, planted_data_bytes
from flexora_jax.models import convert_llama2c, load_model_config, load_tokenizer
from flexora_jax.nnx import LlamaForCausalLM
from flexora_jax.pipeline.config import PLANTED_TASK, RunConfig, config_to_dict, load_config, save_config
from flexora_jax.pipeline.io import RunLog, progress_enabled, read_json, write_json
from flexora_jax.pipeline.registry import get_method
from flexora_jax.pipeline.rundir import RunDir
from flexora_jax.planted import PlantedConfig, make_planted_task
from flexora_jax.tasks.formats import question_removed
from flexora_jax.tasks.generative import MAX_NEW_TOKENS, GenRecord
from flexora_jax.tasks.sft import encode_pair, sft_arrays

log = logging.getLogger("flexora_jax")

CONFIG_FILE = "config.yaml"
MESH_FILE = "mesh.json"  # the mesh a run started on: a resume must use the same one


@dataclasses.dataclass
class TaskData:
    """Token datasets of a run: search train / validation, fine-tune train, held-out test."""

    train: Dataset
    val: Dataset
    finetune: Dataset
    test: Dataset
    test_records: list | None = None  # multiple-choice records of a real task (for accuracy)
    test_noq: Dataset | None = None  # eval.question_control: the test SFT data with the question removed
    test_records_noq: list | None = None  # eval.question_control: the test records with the question removed
    info: dict[str, Any] | None = None  # sizes and split provenance, written to data.json


@dataclasses.dataclass
class Workspace:
    """Everything the stages share: the config, the run directory, the base model and the data."""

    config: RunConfig
    run_dir: Path
    model_config: ModelConfig
    params: Any  # None in an export without --merged (it copies files only)
    data: TaskData | None  # None in an export: it reads no task data
    log: RunLog
    resume: bool = False
    tokenizer: Any = None
    planted: Any = None  # the PlantedTask of the embedded default
    model_source: str | None = None  # model directory recorded in the adapter config
    mesh: Any = None  # the run's jax.sharding.Mesh (one device or many); params live sharded on it
    rundir: RunDir | None = None  # the claimed run directory (its lock is released when the run or stage ends)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def record_time(self, stage: str, seconds: float) -> None:
        """Record a stage's wall time and write ``timings.json`` at once.

        Written after every stage, and read back on ``--resume``, so a run that is killed or fails
        later (or is resumed after it finished) keeps the times of the stages it already ran; a stage
        resumed from a checkpoint counts the resumed part only.
        """
        self.timings[stage] = seconds
        write_json(self.run_dir / "timings.json", self.timings)

    @property
    def num_layers(self) -> int:
        return self.model_config.num_hidden_layers


def _hard_targets(data: Dataset, n: int, seed: int) -> Dataset:
    """The first ``n`` sequences with tokens sampled from their target distributions (scarce, noisy data)."""
    probs = data["target_probs"][:n].astype(np.float64)
    rng = np.random.default_rng([seed, 7])
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(cdf.shape[:-1] + (1,)) * cdf[..., -1:]
    labels = np.minimum((cdf < u).sum(-1), probs.shape[-1] - 1).astype(np.int32)
    return {
        "input_ids": data["input_ids"][:n],
        "attention_mask": data["attention_mask"][:n],
        "loss_mask": data["loss_mask"][:n],
        "labels": labels,
    }


def _prepare_planted(config: RunConfig) -> tuple[Any, TaskData]:
    """The embedded default's teacher and its data (search train / validation, scarce fine-tune data, test)."""
    po = config.task.planted
    task = make_planted_task(
        PlantedConfig(
            num_layers=po.num_layers,
            num_planted=po.num_planted,
            soft_targets=po.soft_targets,
            n_train=po.n_train,
            n_val=po.n_val,
            n_test=po.n_test,
            seed=config.seed,
            planted_rank=po.rank,
            planted_ranks=dict(po.ranks) or None,
            targets=po.modules,
            layer_kl=float(po.layer_kl),
        )
    )
    n = po.finetune_examples or po.n_train
    if po.finetune_targets == "hard" and "target_probs" in task.train:
        finetune = _hard_targets(task.train, n, config.seed)
    else:
        finetune = {k: v[:n] for k, v in task.train.items()}
    return task, TaskData(train=task.train, val=task.val, finetune=finetune, test=task.test)


def _resolve_model(config: RunConfig, rundir: RunDir) -> str:
    """The model directory: ``model.path``, or the llama2.c checkpoint converted into ``<run>/model``."""
    ms = config.model
    if ms.path is not None:
        return ms.path
    for f in (ms.llama2c, ms.tokenizer_model):
        if not Path(f).exists():
            raise ConfigError(f"model.llama2c / model.tokenizer_model: file {f} does not exist")
    out = rundir / "model"
    if not (out / "config.json").exists() and sh.is_main_process():
        write_dir(out, lambda tmp: convert_llama2c(ms.llama2c, ms.tokenizer_model, tmp))
        rundir.made.append(out)
    return str(out)


def _prepare_task(config: RunConfig, rundir: RunDir, mesh: Any) -> tuple[ModelConfig, Any, Any, str, TaskData]:
    """A real multiple-choice task: model + tokenizer, SFT token data for search / fine-tune, test records.

    The search trains on the first ``task.n_train`` training examples and the fine-tune on the first
    ``task.n_finetune`` (default: the same ones); ``task.n_val`` search-validation examples tune the
    gates; ``task.n_test`` (or ``eval.limit``) held-out examples are scored.
    """
    tc = config.task
    source = _resolve_model(config, rundir)
    model_config, params = _load_base(config, source, mesh)
    tokenizer = load_tokenizer(source)
    _check_tokenizer(tokenizer, model_config, source)
    kwargs = dict(source=tc.source, data_dir=tc.data_dir, seed=tc.split_seed)
    try:
        splits = {role: tasks.load_split(tc.name, role, **kwargs) for role in ("train", "validation", "test")}
        records = {role: split.records() for role, split in splits.items()}
    except UnicodeDecodeError as exc:
        raise DataError(
            f"task {tc.name}: a data file under {tc.data_dir or 'the data folder'} is not UTF-8 text "
            f"({exc.reason} at byte {exc.start}); expected UTF-8 encoded files"
        ) from None
    limits = {"train": tc.n_train, "validation": tc.n_val, "test": tc.n_test or config.eval.limit}
    n_ft = tc.n_finetune or tc.n_train
    finetune_records = records["train"][:n_ft] if n_ft else records["train"]
    records = {role: recs[: limits[role]] if limits[role] else recs for role, recs in records.items()}
    max_length = min(tc.max_length, model_config.max_position_embeddings)
    # SFT examples whose gold answer alone does not fit max_length are dropped (counted in data.json) or cut
    # (task.too_long); the test records are still all scored for accuracy (lm-eval cuts from the left).
    sft_records = {
        "train": records["train"],
        "validation": records["validation"],
        "finetune": finetune_records,
        "test": records["test"],
    }
    if config.eval.question_control:  # the same held-out examples, prompts cut down to the answer cue
        sft_records["test_noq"] = [question_removed(r) for r in sft_records["test"]]
    arrays, made = {}, {}
    for name, recs in sft_records.items():
        arrays[name], made[name] = sft_arrays(
            recs,
            tokenizer,
            max_length,
            too_long=tc.too_long,
            name=f"task {tc.name} {name} split",
            length_key="task.max_length",
        )
    sizes = {
        "search_train": len(records["train"]),
        "search_validation": len(records["validation"]),
        "finetune_train": len(finetune_records),
        "test": len(records["test"]),
    }
    info = {
        "task": tc.name,
        "sizes": sizes,
        "truncated": {k: m["truncated"] for k, m in made.items()},
        "dropped_too_long": {k: m["dropped"] for k, m in made.items() if k != "test_noq"},
        "max_length": max_length,
        "splits": tasks.split_report(list(splits.values())),
    }
    data = TaskData(
        train=arrays["train"],
        val=arrays["validation"],
        finetune=arrays["finetune"],
        test=arrays["test"],
        test_records=records["test"],
        info=info,
    )
    if config.eval.question_control:
        data.test_noq = arrays["test_noq"]
        data.test_records_noq = [question_removed(r) for r in records["test"]]
    return model_config, params, tokenizer, source, data


def _load_base(config: RunConfig, source: str, mesh: Any) -> tuple[ModelConfig, Any]:
    """The base model, each parameter built straight into its sharding on the run's mesh; every weight finite.

    Loaded as the Flax NNX decoder (:class:`flexora_jax.nnx.LlamaForCausalLM`), whose params the stages use:
    the module and the functional core are one computation, so the run's adapters open in either.
    """
    model = LlamaForCausalLM.from_pretrained(
        source, dtype=config.model.dtype, allow_pickle=config.model.allow_pickle, mesh=mesh
    )
    model_config, params = model.config, model.params()
    finite = jax.tree_util.tree_map_with_path(
        lambda p, x: (jax.tree_util.keystr(p), bool(jnp.all(jnp.isfinite(x)))), params
    )
    bad = [name for name, ok in jax.tree.leaves(finite, is_leaf=lambda v: isinstance(v, tuple)) if not ok]
    if bad:
        raise CheckpointError(
            f"{source}: the checkpoint holds NaN or Inf values in {', '.join(bad[:5])}; expected "
            "finite weights (the file is damaged, or was saved from a diverged model)"
        )
    return model_config, params


def run_mesh(config: RunConfig) -> Any:
    """The run's device mesh from its ``mesh:`` section (a one-device mesh on a single device).

    Initialises ``jax.distributed`` first when the environment asks for it (a pod slice, a GPU
    cluster: :func:`flexora_jax.sharding.initialize_distributed`), so the device count is the global
    one. Raises :class:`ConfigError` when the mesh sizes do not match the devices.
    """
    sh.initialize_distributed()
    config.mesh.resolve()  # ConfigError naming the mesh keys, the sizes and the device count
    return sh.make_mesh(config.mesh)


def _check_tokenizer(tokenizer: Any, model_config: ModelConfig, source: str) -> None:
    """A tokenizer whose ids exceed the model's embedding table would index out of range silently."""
    n = len(tokenizer)
    if n > model_config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {n} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}; expected a tokenizer of at most {model_config.vocab_size} "
            "tokens (the tokenizer does not belong to this model)"
        )


def prepare(config: RunConfig, resume: bool = False, stage: str = "run", merged: bool = False) -> Workspace:
    """Validate, claim the run directory, build / load the model and the data, then write the run's config.

    Everything that can be checked is checked before the first file is written: the config against
    the model's depth and the data's sizes, the run directory (:class:`RunDir`), the config identity
    of an existing run. A fresh ``run`` refuses a directory that already holds a run (``resume=True``
    continues it) or holds other files; a resumed run or a stage must use the config the directory
    was created with. A fresh run that fails before its config is written leaves no directory. The
    ``export`` stage prepares only what it writes from (:func:`_build_export`; ``merged``: the merged model).
    """
    if config.task.name == PLANTED_TASK:  # config errors first, before the run directory is looked at
        _validate_for_layers(config, config.task.planted.num_layers, "the planted model")
    mesh = run_mesh(config)
    if config.task.name == PLANTED_TASK:  # its data is built in memory: sized before the run directory is made
        _validate_planted_size(config)
    rundir = RunDir(config.output_dir)
    rundir.check_usable()
    run_dir = rundir.path
    holds_run = (rundir / CONFIG_FILE).exists()
    if holds_run:
        _check_same_run(config, rundir, resume, stage, mesh)
    elif resume:
        raise ConfigError(
            f"--resume: {run_dir} holds no run to continue (no {CONFIG_FILE}); drop --resume to "
            "start a fresh run there, or pass the --output-dir of an existing run"
        )
    elif stage not in ("run", "search"):
        raise ConfigError(
            f"{run_dir} has no {CONFIG_FILE}: the '{stage}' stage continues a run; "
            "run `flexora-jax run` (or `search`) first"
        )
    else:
        rundir.check_fresh(CONFIG_FILE)
    rundir.claim()
    try:
        ws = (
            _build_export(config, rundir, mesh, merged)
            if stage == "export"
            else _build(config, rundir, mesh, resume, stage, fresh=not holds_run)
        )
    except BaseException:
        rundir.release() if holds_run else rundir.abandon()
        raise
    return ws


def _build(config: RunConfig, rundir: RunDir, mesh: Any, resume: bool, stage: str, fresh: bool) -> Workspace:
    run_dir = rundir.path
    if not progress_enabled():
        datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tokenizer = planted = source = None
    if config.task.name == PLANTED_TASK:
        planted, data = _prepare_planted(config)
        model_config, params = planted.config, sh.shard(planted.params, mesh)
        po = config.task.planted
        data.info = {
            "task": PLANTED_TASK,
            "sizes": {
                "search_train": po.n_train,
                "search_validation": po.n_val,
                "finetune_train": len(data.finetune["input_ids"]),
                "test": po.n_test,
            },
        }
    else:
        model_config, params, tokenizer, source, data = _prepare_task(config, rundir, mesh)
    _validate_for_layers(config, model_config.num_hidden_layers, f"the model {source}")
    _validate_methods(config, model_config, source)
    if tokenizer is not None:
        _validate_eval_requests(data.test_records, tokenizer, model_config, source)
    _validate_sizes(config, data)
    _validate_memory(config, model_config, data, mesh)
    # The config is written once the model and data are known good: a run that fails on bad input
    # leaves no config.yaml behind, so the corrected command is a fresh run again (not a --resume).
    if sh.is_main_process() and fresh:
        save_config(config, run_dir / CONFIG_FILE)
        write_json(run_dir / MESH_FILE, dict(mesh.shape))
    if planted is not None:
        write_json(run_dir / "planted.json", planted.planted_json())
    write_json(run_dir / "data.json", data.info)
    ws = Workspace(
        config=config,
        run_dir=run_dir,
        model_config=model_config,
        params=params,
        data=data,
        log=RunLog(run_dir),
        resume=resume,
        tokenizer=tokenizer,
        planted=planted,
        model_source=source,
        mesh=mesh,
        rundir=rundir,
    )
    if not fresh:  # a stage or a resume adds to the earlier stages' times
        ws.timings.update(_earlier_timings(run_dir))
    if stage == "run":
        ws.record_time("prepare", time.perf_counter() - t0)
    log.info(
        "prepared %s: %d layers, %d / %d / %d train / val / test sequences (%.1f s)",
        config.task.name,
        ws.num_layers,
        len(data.train["input_ids"]),
        len(data.val["input_ids"]),
        len(data.test["input_ids"]),
        time.perf_counter() - t0,
    )
    if mesh.size > 1:
        log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    return ws


def _build_export(config: RunConfig, rundir: RunDir, mesh: Any, merged: bool) -> Workspace:
    """The export's workspace: the files it copies need no task data (none is read or tokenised, so the data
    may have moved since the run); the model's config always, its weights and tokenizer for a merged export."""
    tokenizer = planted = source = params = None
    if config.task.name == PLANTED_TASK:  # the embedded model is computed, not read: no files behind it
        planted, _ = _prepare_planted(config)
        model_config, params = planted.config, sh.shard(planted.params, mesh) if merged else None
    else:
        source = _resolve_model(config, rundir)
        if merged:
            model_config, params = _load_base(config, source, mesh)
            tokenizer = load_tokenizer(source)
            _check_tokenizer(tokenizer, model_config, source)
        else:
            model_config = load_model_config(source)
    ws = Workspace(
        config=config,
        run_dir=rundir.path,
        model_config=model_config,
        params=params,
        data=None,
        log=RunLog(rundir.path),
        tokenizer=tokenizer,
        planted=planted,
        model_source=source,
        mesh=mesh,
        rundir=rundir,
    )
    ws.timings.update(_earlier_timings(rundir.path))
    return ws


def _earlier_timings(run_dir: Path) -> dict[str, float]:
    """The times already in ``timings.json`` (kept, ``total`` too: a stage command adds its own and drops none;
    a resumed ``run`` writes its new ``total`` at the end). Entries that are not numbers are left out."""
    path = run_dir / "timings.json"
    saved = read_json(path) if path.exists() else {}
    if not isinstance(saved, dict):
        return {}
    return {str(k): float(v) for k, v in saved.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _identity(config: RunConfig) -> dict[str, Any]:
    """What a run computes: the config without where its directory lives and which devices it runs on."""
    return {k: v for k, v in config_to_dict(config).items() if k not in ("output_dir", "mesh")}


def _check_same_run(config: RunConfig, rundir: RunDir, resume: bool, stage: str, mesh: Any) -> None:
    """An existing run may be resumed or continued by a stage only with its own config and mesh."""
    saved = rundir / CONFIG_FILE
    if stage == "run" and not resume:
        raise ConfigError(
            f"{rundir.path} already holds a run ({CONFIG_FILE} exists); pass --resume to continue "
            "it, or choose another --output-dir"
        )
    try:
        if not saved.read_bytes().strip():
            raise ConfigError("the file is empty")
        previous = load_config(saved)
    except ConfigError as exc:
        raise ConfigError(
            f"{saved} (the config of the run in {rundir.path}) is damaged: {exc}; restore it, or "
            "start a new run in another --output-dir"
        ) from None
    diff = _config_diff(_identity(previous), _identity(config))
    if diff:
        raise ConfigError(
            f"the config differs from the one {rundir.path} was run with ({saved}): "
            f"{'; '.join(diff)}; use the same settings, or another --output-dir"
        )
    mesh_file = rundir / MESH_FILE
    if (resume or stage in ("search", "finetune")) and mesh_file.exists():
        started = {k: int(v) for k, v in read_json(mesh_file).items()}
        if started != dict(mesh.shape):
            raise ConfigError(
                f"{rundir.path} was started on mesh {started} and would continue on {dict(mesh.shape)}: "
                "a resumed run reproduces an uninterrupted one bit for bit only on the same mesh; set "
                + " ".join(f"--mesh.{a}={n}" for a, n in started.items())
                + " (with as many devices), or start a new run"
            )


def device_memory_bytes() -> int | None:
    """Memory of one device: the accelerator's ``bytes_limit``, on CPU the host's available memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _validate_memory(config: RunConfig, model_config: ModelConfig, data: TaskData, mesh: Any) -> None:
    """Refuse a search or fine-tune step the memory planner puts well beyond the device's memory.

    Without this the step aborts inside XLA (exit 134, no message). The planner is calibrated within
    25% (``tests/test_memory.py``), so only a plan over 1.25x the memory is refused.
    """
    limit = device_memory_bytes()
    if limit is None:
        return
    sc, ft = config.search, config.finetune
    seq = int(data.train["input_ids"].shape[1])
    plans = {
        "search": plan_memory(
            model_config,
            config.lora,
            dict(mesh.shape),
            sc.inner_steps,
            sc.batch_size,
            seq,
            remat=sc.remat,
            inner_optimizer=sc.inner_optimizer,
            unrolled_mode=sc.unrolled_mode,
        )["search"],
        "finetune": plan_memory(
            model_config, config.lora, dict(mesh.shape), 1, ft.batch_size, seq, finetune_optimizer=ft.optimizer
        )["finetune"],
    }
    for step, plan in plans.items():
        if plan["total"] > 1.25 * limit:
            raise ConfigError(
                f"the {step} step needs about {plan['total'] / 2**30:.1f} GiB per device (memory "
                f"planner: batch {sc.batch_size if step == 'search' else ft.batch_size} x {seq} tokens"
                f"{f', K = {sc.inner_steps}' if step == 'search' else ''}), more than the "
                f"{limit / 2**30:.1f} GiB this device has; lower {step}.batch_size, "
                f"{'search.inner_steps, ' if step == 'search' else ''}task.max_length, or use more "
                "devices (mesh)"
            )


def _validate_sizes(config: RunConfig, data: TaskData) -> None:
    """Batch sizes against the data they are drawn from, and the fine-tune's length (checked before anything is
    written): an optimizer step may not span more than the training set (``grad_accum``), and the step count
    must fit the step counter (``epochs``)."""
    for key, batch, split, name in (
        ("search.batch_size", config.search.batch_size, data.train, "search training"),
        ("search.val_batch_size", config.search.val_batch_size, data.val, "search validation"),
        ("finetune.batch_size", config.finetune.batch_size, data.finetune, "fine-tune training"),
    ):
        n = len(split["input_ids"])
        if batch > n:
            raise ConfigError(
                f"{key} {batch} is larger than the {n} {name} examples; expected at most {n} (or more examples)"
            )
    check_finetune_sizes(config.finetune, len(data.finetune["input_ids"]))  # the API's check too


def _validate_planted_size(config: RunConfig) -> None:
    """The planted task's data (its teacher's distribution at every position) against the memory it is built
    in, before the run directory is created: past it the build aborts inside XLA, leaving a bare directory."""
    po, limit = config.task.planted, device_memory_bytes()
    pc = PlantedConfig()
    n = po.n_train + po.n_val + po.n_test
    need = planted_data_bytes(n, pc.seq_len, pc.vocab_size)
    if limit is not None and need > 1.25 * limit:
        raise ConfigError(
            f"task.planted.n_train + n_val + n_test = {n} sequences of {pc.seq_len} tokens need about "
            f"{need / 2**30:.1f} GiB to build (the teacher's distribution over {pc.vocab_size} tokens "
            f"at every position), more than the {limit / 2**30:.1f} GiB this device has; lower "
            "task.planted.n_train / n_val / n_test"
        )


def _validate_methods(config: RunConfig, model_config: ModelConfig, source: str | None) -> None:
    """What a method can export on this model, before it trains: DoRA on some parts of a fused projection
    (Phi-3's qkv_proj / gate_up_proj) has no PEFT form (one magnitude vector spans the whole fusion)."""
    dora = [m for m in config.methods if get_method(m).finetune == "dora"]
    if not dora or isinstance(config.lora.target_modules, str):  # "all-linear" adapts every part
        return
    targets = set(config.lora.target_modules)
    for fused, parts in model_config.fused_modules.items():
        names = [m for m, _ in parts]
        chosen = [m for m in names if m in targets]
        if chosen and len(chosen) < len(names):
            raise ConfigError(
                f"method {dora[0]!r}: DoRA on {chosen} of the model {source or ''}'s fused {fused} "
                f"cannot be written as a PEFT adapter (one DoRA magnitude spans {names}); set "
                f"lora.target_modules to include all of {names}, or use a LoRA method"
            )


def _validate_eval_requests(
    records: list | None, tokenizer: Any, model_config: ModelConfig, source: str | None
) -> None:
    """Every test request must be scorable in the model's context before the search starts: a choice (lm-eval's
    continuation) longer than the context cannot be scored (lm-eval cannot either), and a generative task needs
    room for its prompt next to the tokens it generates. Longer contexts are cut from the left, as in lm-eval."""
    context = model_config.max_position_embeddings
    for rec in records or []:
        if isinstance(rec, GenRecord):
            room = context - MAX_NEW_TOKENS.get(rec.task, 0)
            if room < 1:
                raise DataError(
                    f"task {rec.task}: generating {MAX_NEW_TOKENS[rec.task]} tokens leaves no room for a "
                    f"prompt in the {context}-token context of the model {source}; use a model with a "
                    "longer context"
                )
            continue
        for k, (ctx, cont) in enumerate(rec.requests()):
            n = len(encode_pair(tokenizer, ctx, cont)[1])
            if n > context:
                raise DataError(
                    f"task {rec.task}: test example {rec.doc_id} (choice {k}) is {n} tokens, longer than "
                    f"the {context}-token context of the model {source} (max_position_embeddings); it "
                    "cannot be scored (nor by lm-eval): use a model with a longer context, or other test "
                    "examples (task.n_test, task.split_seed)"
                )


def _validate_for_layers(config: RunConfig, num_layers: int, what: str) -> None:
    """Layer indices and counts of the run config against the model's depth (before any work is done)."""
    lt = config.lora.layers_to_transform
    if lt is not None:
        bad = [i for i in lt if i >= num_layers]
        if bad:
            raise ConfigError(
                f"lora.layers_to_transform: layer index(es) {bad} out of range; {what} has "
                f"{num_layers} layers (expected indices 0..{num_layers - 1})"
            )
    if config.baseline_k > num_layers:
        raise ConfigError(
            f"baseline_k {config.baseline_k} exceeds the {num_layers} layers of {what}; expected 0..{num_layers}"
        )
    if config.selection.rule == "top_k" and config.selection.top_k > num_layers:
        raise ConfigError(
            f"selection.top_k {config.selection.top_k} exceeds the {num_layers} layers of {what}; "
            f"expected 1..{num_layers}"
        )


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]
