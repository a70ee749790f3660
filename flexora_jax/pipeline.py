"""The whole run as functions: prepare -> search -> select -> fine-tune -> evaluate -> export.

``run(config)`` is what ``flexora-jax run`` does; each stage is also a function of its own
(:func:`prepare`, :func:`search_stage`, :func:`finetune_stage`, :func:`evaluate_stage`,
:func:`export_stage`) that reads what earlier stages wrote into the run directory, so a stage can be
rerun, or a run resumed, from files alone. The run directory layout is the contract in
``docs/design.md``; beyond it, ``searches/<gates>/`` holds each search's gates and selection,
``methods/<method>/`` each method's selection and adapter, ``compare.json`` every method's scores.

Reliability: every file is written atomically (temporary file + ``os.replace``) and only by process 0;
each search / fine-tune saves an orbax checkpoint every ``checkpoint.every`` steps and at its end, and
``resume=True`` continues from the latest one with the same data position, so a resumed run writes
the same gates, selection and adapter as an uninterrupted one. SIGTERM / SIGINT save a checkpoint and
raise :class:`Interrupted`; a NaN / Inf stops the run at that step (recorded in ``metrics.jsonl``) and
keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from flexora_jax.config import (K_METHODS, METHOD_GATES, PLANTED_TASK, LoraConfig, ModelConfig, RunConfig,
                                config_to_dict, load_config, save_config)
from flexora_jax.data import Dataset
from flexora_jax.errors import CheckpointError, ConfigError, DataError, FlexoraError, NumericsError
from flexora_jax.selection import Selection

log = logging.getLogger("flexora_jax")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


class Interrupted(FlexoraError):
    """SIGTERM / SIGINT arrived: the current stage saved a checkpoint; rerun with ``--resume``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


# ------------------------------------------------------------------------------------ file helpers
def is_main_process() -> bool:
    return jax.process_index() == 0


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic write on process 0 (a kill leaves the old file or the new one, never half of one)."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; run the stage that writes it first (or `flexora-jax run`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); delete it and rerun its stage") from None


class RunLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus the console log."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE
        self.last_step: dict[str, int] = {}

    def write(self, record: dict[str, Any]) -> None:
        self.last_step[record.get("stage", "")] = int(record.get("step", 0))
        if not is_main_process():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self, stage: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if stage is None or rec.get("stage") == stage:
                out.append(rec)
        return out

    def truncate(self, stage: str, step: int) -> None:
        """Drop ``stage`` records after ``step`` (a resumed stage re-logs them) and any cut line."""
        self.last_step[stage] = int(step)
        if not self.path.exists():
            return
        keep = [r for r in self.records()  # events (a NaN stop, an interrupt) stay as history
                if "event" in r or not (r.get("stage") == stage and int(r.get("step", 0)) > step)]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def progress_enabled() -> bool:
    """Progress bars on process 0 unless ``FLEXORA_PROGRESS=0`` (``--quiet``)."""
    return is_main_process() and os.environ.get("FLEXORA_PROGRESS", "1") != "0"


def _progress(total: int, initial: int, desc: str, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=False, disable=not progress_enabled())


# ------------------------------------------------------------------------------------------ signals
class _StopFlag:
    signum: int | None = None


_STOP = _StopFlag()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGTERM / SIGINT set a flag that the stages check after each step."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOP.signum = None

    def handler(signum, frame):  # noqa: ARG001
        if _STOP.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        _STOP.signum = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _STOP.signum = None


# -------------------------------------------------------------------------------------- workspace
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
    hf: Any = None  # the same splits as a ``datasets.DatasetDict`` (train, validation, finetune, test)
    info: dict[str, Any] | None = None  # sizes and split provenance, written to data.json


@dataclasses.dataclass
class Workspace:
    """Everything the stages share: the config, the run directory, the base model and the data."""

    config: RunConfig
    run_dir: Path
    model_config: ModelConfig
    params: Any
    data: TaskData
    log: RunLog
    resume: bool = False
    tokenizer: Any = None
    planted: Any = None  # the PlantedTask of the embedded default
    model_source: str | None = None  # model directory recorded in the adapter config
    mesh: Any = None  # the run's jax.sharding.Mesh when it spans more than one device (params live sharded on it)
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
    return {"input_ids": data["input_ids"][:n], "attention_mask": data["attention_mask"][:n],
            "loss_mask": data["loss_mask"][:n], "labels": labels}


def to_hf_dataset(data: Dataset) -> Any:
    """A dict of equal-length numpy arrays as a ``datasets.Dataset`` (one row per sequence)."""
    import datasets

    return datasets.Dataset.from_dict({k: np.asarray(v) for k, v in data.items()})


def from_hf_dataset(ds: Any, like: Dataset | None = None) -> Dataset:
    """A ``datasets.Dataset`` of fixed-shape columns back to numpy arrays (dtypes of ``like`` if given)."""
    arrays = ds.with_format("numpy")[:]
    out = {k: np.asarray(v) for k, v in arrays.items()}
    if like is not None:
        out = {k: v.astype(like[k].dtype, copy=False) for k, v in out.items()}
    return out


def _prepare_planted(config: RunConfig) -> tuple[Any, TaskData]:
    """The embedded default's teacher and its data, generated as a ``datasets.DatasetDict``."""
    import datasets

    from flexora_jax.planted import PlantedConfig, make_planted_task

    po = config.task.planted
    task = make_planted_task(PlantedConfig(num_layers=po.num_layers, num_planted=po.num_planted,
                                           soft_targets=po.soft_targets, n_train=po.n_train, n_val=po.n_val,
                                           n_test=po.n_test, seed=config.seed, planted_rank=po.rank,
                                           planted_ranks=dict(po.ranks) or None, targets=po.modules,
                                           layer_kl=float(po.layer_kl)))
    n = po.finetune_examples or po.n_train
    if po.finetune_targets == "hard" and "target_probs" in task.train:
        finetune = _hard_targets(task.train, n, config.seed)
    else:
        finetune = {k: v[:n] for k, v in task.train.items()}
    raw = {"train": task.train, "validation": task.val, "finetune": finetune, "test": task.test}
    hf = datasets.DatasetDict({name: to_hf_dataset(d) for name, d in raw.items()})
    arrays = {name: from_hf_dataset(hf[name], like=raw[name]) for name in raw}
    return task, TaskData(train=arrays["train"], val=arrays["validation"], finetune=arrays["finetune"],
                          test=arrays["test"], hf=hf)


def _pad_sft(ds: Any, what: str) -> Dataset:
    """A tokenised SFT ``datasets.Dataset`` -> fixed-shape numpy arrays (right padded to a multiple of 16)."""
    ids, masks = ds["input_ids"], ds["loss_mask"]
    if not ids:
        raise DataError(f"{what}: no examples after tokenisation")
    width = int(math.ceil(max(len(x) for x in ids) / 16) * 16)
    out = {"input_ids": np.zeros((len(ids), width), np.int32), "attention_mask": np.zeros((len(ids), width), np.int32),
           "loss_mask": np.zeros((len(ids), width), np.float32)}
    for i, (x, m) in enumerate(zip(ids, masks)):
        out["input_ids"][i, :len(x)] = x
        out["attention_mask"][i, :len(x)] = 1
        out["loss_mask"][i, :len(m)] = m
    return out


def _resolve_model(config: RunConfig, run_dir: Path) -> str:
    """The model directory: ``model.path``, or the llama2.c checkpoint converted into ``<run>/model``."""
    ms = config.model
    if ms.path is not None:
        return ms.path
    from flexora_jax.models.loading import convert_llama2c

    for f in (ms.llama2c, ms.tokenizer_model):
        if not Path(f).exists():
            raise ConfigError(f"model.llama2c / model.tokenizer_model: file {f} does not exist")
    out = run_dir / "model"
    if not (out / "config.json").exists():
        if is_main_process():
            tmp = run_dir / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            convert_llama2c(ms.llama2c, ms.tokenizer_model, tmp)
            os.replace(tmp, out)
    return str(out)


def _prepare_task(config: RunConfig, run_dir: Path, mesh: Any = None) -> tuple[ModelConfig, Any, Any, str, TaskData]:
    """A real multiple-choice task: model + tokenizer, SFT token data for search / fine-tune, test records.

    The search trains on the first ``task.n_train`` training examples and the fine-tune on the first
    ``task.n_finetune`` (default: the same ones); ``task.n_val`` search-validation examples tune the
    gates; ``task.n_test`` (or ``eval.limit``) held-out examples are scored.
    """
    import datasets

    from flexora_jax import tasks
    from flexora_jax.models.loading import load_tokenizer
    from flexora_jax.tasks.sft import sft_dataset

    tc = config.task
    source = _resolve_model(config, run_dir)
    model_config, params = _load_base(config, source, mesh)
    tokenizer = load_tokenizer(source)
    _check_tokenizer(tokenizer, model_config, source)
    kwargs = dict(source=tc.source, data_dir=tc.data_dir, seed=tc.split_seed)
    try:
        splits = {role: tasks.load_split(tc.name, role, **kwargs) for role in ("train", "validation", "test")}
        records = {role: split.records() for role, split in splits.items()}
    except UnicodeDecodeError as exc:
        raise DataError(f"task {tc.name}: a data file under {tc.data_dir or 'the data folder'} is not UTF-8 text "
                        f"({exc.reason} at byte {exc.start}); expected UTF-8 encoded files") from None
    limits = {"train": tc.n_train, "validation": tc.n_val, "test": tc.n_test or config.eval.limit}
    n_ft = tc.n_finetune or tc.n_train
    finetune_records = records["train"][:n_ft] if n_ft else records["train"]
    records = {role: recs[:limits[role]] if limits[role] else recs for role, recs in records.items()}
    max_length = min(tc.max_length, model_config.max_position_embeddings)
    # SFT examples whose gold answer alone does not fit max_length are dropped (counted in data.json);
    # the test records are still all scored for accuracy (lm-eval cuts long contexts from the left).
    sft_records = {"train": records["train"], "validation": records["validation"], "finetune": finetune_records,
                   "test": records["test"]}
    dropped = {}
    for name, recs in sft_records.items():
        sft_records[name] = _fitting(recs, tokenizer, max_length)
        dropped[name] = len(recs) - len(sft_records[name])
        if not sft_records[name]:
            raise DataError(f"task {tc.name}: every {name} example's answer is longer than task.max_length "
                            f"{max_length} tokens; expected a larger task.max_length (the model allows up to "
                            f"{model_config.max_position_embeddings})")
    if config.eval.question_control:  # the same held-out examples, prompts cut down to the answer cue
        from flexora_jax.tasks.formats import question_removed

        sft_records["test_noq"] = [question_removed(r) for r in sft_records["test"]]
    hf = datasets.DatasetDict({name: sft_dataset(recs, tokenizer, max_length) for name, recs in sft_records.items()})
    arrays = {name: _pad_sft(ds, f"task {tc.name} {name} split") for name, ds in hf.items()}
    sizes = {"search_train": len(records["train"]), "search_validation": len(records["validation"]),
             "finetune_train": len(finetune_records), "test": len(records["test"])}
    truncated = {name: int(sum(ds["truncated"])) for name, ds in hf.items()}
    info = {"task": tc.name, "sizes": sizes, "truncated": truncated, "dropped_too_long": dropped,
            "max_length": max_length,
            "splits": tasks.split_report(list(splits.values()))}
    data = TaskData(train=arrays["train"], val=arrays["validation"], finetune=arrays["finetune"],
                    test=arrays["test"], test_records=records["test"], hf=hf, info=info)
    if config.eval.question_control:
        from flexora_jax.tasks.formats import question_removed

        data.test_noq = arrays["test_noq"]
        data.test_records_noq = [question_removed(r) for r in records["test"]]
    return model_config, params, tokenizer, source, data


def _load_base(config: RunConfig, source: str, mesh: Any) -> tuple[ModelConfig, Any]:
    """The base model; on a multi-device mesh each parameter is built straight into its sharding."""
    from flexora_jax.models.loading import load_model

    if mesh is None:
        return load_model(source, dtype=config.model.dtype, allow_pickle=config.model.allow_pickle)
    from flexora_jax import sharding as sh

    try:
        return sh.load_model_sharded(source, mesh, dtype=config.model.dtype)
    except Exception:  # noqa: BLE001 - load_model below names the problem (a CheckpointError naming the file)
        pass
    # load_model raises the checkpoint's problem, or reads a pickle-only checkpoint (model.allow_pickle)
    model_config, params = load_model(source, dtype=config.model.dtype, allow_pickle=config.model.allow_pickle)
    return model_config, sh.shard(params, mesh)


def run_mesh(config: RunConfig) -> Any:
    """The run's device mesh from its ``mesh:`` section, or None when it is a single device.

    Initialises ``jax.distributed`` first when the environment asks for it (a pod slice, a GPU
    cluster: :func:`flexora_jax.sharding.initialize_distributed`), so the device count is the global
    one. Raises :class:`ConfigError` when the mesh sizes do not match the devices.
    """
    from flexora_jax import sharding as sh

    sh.initialize_distributed()
    config.mesh.resolve()  # ConfigError naming the mesh keys, the sizes and the device count
    mesh = sh.make_mesh(config.mesh)
    return None if mesh.size == 1 else mesh


def _fitting(records: list, tokenizer: Any, max_length: int) -> list:
    """The records whose gold answer leaves room for at least one prompt token within ``max_length``."""
    from flexora_jax.tasks.sft import encode_pair

    out = []
    for rec in records:
        prompt, answer = rec.sft_pair()
        if len(encode_pair(tokenizer, prompt, answer)[1]) < max_length:
            out.append(rec)
    return out


def _check_tokenizer(tokenizer: Any, model_config: ModelConfig, source: str) -> None:
    """A tokenizer whose ids exceed the model's embedding table would index out of range silently."""
    n = len(tokenizer)
    if n > model_config.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {n} tokens but the model's vocab_size is "
                              f"{model_config.vocab_size}; expected a tokenizer of at most {model_config.vocab_size} "
                              "tokens (the tokenizer does not belong to this model)")


def prepare(config: RunConfig, resume: bool = False, stage: str = "run") -> Workspace:
    """Create (or reopen) the run directory, build / load the model and the data.

    A fresh ``run`` refuses a directory that already holds a run (pass ``resume=True`` to continue it);
    a resumed run or a single stage must use the config the directory was created with.
    """
    if config.task.name == PLANTED_TASK:  # config errors first, before the run directory is looked at
        _validate_for_layers(config, config.task.planted.num_layers, "the planted model")
    mesh = run_mesh(config)
    run_dir = Path(config.output_dir).absolute()
    saved = run_dir / CONFIG_FILE
    if saved.exists():
        previous = load_config(saved)
        if stage == "run" and not resume:
            raise ConfigError(f"{run_dir} already holds a run ({CONFIG_FILE} exists); pass --resume to continue "
                              "it, or choose another --output-dir")
        # the mesh is where the run executes, not what it computes: a run may resume on another slice
        diff = _config_diff({**config_to_dict(previous), "mesh": None}, {**config_to_dict(config), "mesh": None})
        if diff:
            raise ConfigError(f"the config differs from the one {run_dir} was run with ({saved}): "
                              f"{'; '.join(diff)}; use the same settings, or another --output-dir")
    elif resume:
        raise ConfigError(f"--resume: {run_dir} holds no run to continue (no {CONFIG_FILE}); drop --resume to "
                          "start a fresh run there, or pass the --output-dir of an existing run")
    elif stage != "run" and stage != "search":
        raise ConfigError(f"{run_dir} has no {CONFIG_FILE}: the '{stage}' stage continues a run; "
                          "run `flexora-jax run` (or `search`) first")
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    if not progress_enabled():
        import datasets

        datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tokenizer = planted = source = None
    if config.task.name == PLANTED_TASK:
        planted, data = _prepare_planted(config)
        model_config, params = planted.config, planted.params
        if mesh is not None:
            from flexora_jax import sharding as sh

            params = sh.shard(params, mesh)
        write_json(run_dir / "planted.json", planted.planted_json())
        po = config.task.planted
        data.info = {"task": PLANTED_TASK, "sizes": {"search_train": po.n_train, "search_validation": po.n_val,
                                                     "finetune_train": len(data.finetune["input_ids"]),
                                                     "test": po.n_test}}
    else:
        model_config, params, tokenizer, source, data = _prepare_task(config, run_dir, mesh)
    # The config is written once the model and data are known good: a run that fails on bad input
    # leaves no config.yaml behind, so the corrected command is a fresh run again (not a --resume).
    if is_main_process():
        save_config(config, saved)
    write_json(run_dir / "data.json", data.info)
    _validate_for_layers(config, model_config.num_hidden_layers, f"the model {source}")
    ws = Workspace(config=config, run_dir=run_dir, model_config=model_config, params=params, data=data,
                   log=RunLog(run_dir), resume=resume, tokenizer=tokenizer, planted=planted, model_source=source,
                   mesh=mesh)
    if resume and (run_dir / "timings.json").exists():
        ws.timings.update({k: v for k, v in read_json(run_dir / "timings.json").items() if k != "total"})
    ws.record_time("prepare", time.perf_counter() - t0)
    log.info("prepared %s: %d layers, %d / %d / %d train / val / test sequences (%.1f s)", config.task.name,
             ws.num_layers, len(data.train["input_ids"]), len(data.val["input_ids"]),
             len(data.test["input_ids"]), ws.timings["prepare"])
    if mesh is not None:
        log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    return ws


def _validate_for_layers(config: RunConfig, num_layers: int, what: str) -> None:
    """Layer indices and counts of the run config against the model's depth (before any work is done)."""
    lt = config.lora.layers_to_transform
    if lt is not None:
        bad = [i for i in lt if i >= num_layers]
        if bad:
            raise ConfigError(f"lora.layers_to_transform: layer index(es) {bad} out of range; {what} has "
                              f"{num_layers} layers (expected indices 0..{num_layers - 1})")
    if config.baseline_k > num_layers:
        raise ConfigError(f"baseline_k {config.baseline_k} exceeds the {num_layers} layers of {what}; "
                          f"expected 0..{num_layers}")
    if config.search.selection == "topk" and config.search.top_k > num_layers:
        raise ConfigError(f"search.top_k {config.search.top_k} exceeds the {num_layers} layers of {what}; "
                          f"expected 1..{num_layers}")


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# ---------------------------------------------------------------------------------------- stages
def _stage_loop_hooks(ws: Workspace, stage: str, total: int, start: int, ckpt: Any,
                      to_state: Callable[[dict], Any], meta_of: Callable[[dict], dict],
                      loss_key: str) -> tuple[Callable[[int, dict], None], Any]:
    """The per-step callback of a search / fine-tune: log, progress bar, checkpoint, stop on a signal."""
    bar = _progress(total, start, stage)
    t_last = [time.perf_counter()]

    def callback(step: int, record: dict) -> None:
        now = time.perf_counter()
        metrics = {k: v for k, v in record.items() if k not in ("state", "sampler")}
        ws.log.write(dict(stage=stage, **metrics, seconds=round(now - t_last[0], 4)))
        t_last[0] = now
        bar.update(1)
        bar.set_postfix({loss_key: f"{record[loss_key]:.4f}"}, refresh=False)
        state = to_state(record)
        if ckpt.due(step) or step == total or _STOP.signum is not None:
            ckpt.save(step, state, meta_of(record), force=True)
        if os.environ.get(NAN_HOOK_ENV) == f"{stage}:{step}":
            _poison_data(ws.data)
        if _STOP.signum is not None:
            bar.close()
            raise Interrupted(f"interrupted by signal {_STOP.signum} at {stage} step {step}/{total}; a checkpoint "
                              f"was saved in {ckpt.directory}; continue with `flexora-jax run --resume "
                              f"--output-dir {ws.run_dir}`", _STOP.signum)

    return callback, bar


#: Test hook: ``<stage>:<step>`` turns every float array of the run's data into NaN after that step, so
#: the next step meets a real NaN loss (the NaN path is tested end to end without a divergent config).
NAN_HOOK_ENV = "FLEXORA_TEST_NAN_AFTER"


def _poison_data(data: TaskData) -> None:
    for split in (data.train, data.val, data.finetune):
        for arr in split.values():
            if np.issubdtype(arr.dtype, np.floating):
                arr[...] = np.nan


def _record_nonfinite(ws: Workspace, stage: str, exc: NumericsError) -> None:
    step = ws.log.last_step.get(stage, 0) + 1
    ws.log.write({"stage": stage, "step": step, "event": "non_finite", "message": str(exc)})
    log.error("%s stopped at step %d: %s (the last good checkpoint is kept)", stage, step, exc)


@dataclasses.dataclass
class SearchOutcome:
    """A finished search, as written to ``searches/<gates>/``."""

    kind: str
    gates: dict[str, Any]  # gates.json content
    selection: Selection


def _selection_from_json(ws: Workspace, obj: dict) -> Selection:
    lc = obj["lora_config"]
    lora_config = LoraConfig(**{**lc, "target_modules": tuple(lc["target_modules"]),
                                "layers_to_transform": (None if lc["layers_to_transform"] is None
                                                        else tuple(lc["layers_to_transform"]))})
    return Selection(layers=tuple(obj["layers"]), ranks=obj.get("rank_lists"), lora_config=lora_config)


def _selection_json(ws: Workspace, selection: Selection) -> dict[str, Any]:
    from flexora_jax.lora import count_params, make_spec

    trainable = count_params(ws.model_config, make_spec(ws.model_config, selection.lora_config))["trainable"]
    out = selection.to_json(trainable)
    out["rank_lists"] = selection.ranks
    out["lora_config"] = selection.lora_config.to_dict()
    return out


def search_stage(ws: Workspace, kind: str = "layer") -> SearchOutcome:
    """Run (or resume, or reuse) the ``kind`` gate search ("layer", "rank", "both"); write its files."""
    from flexora_jax.bilevel import init_search_state
    from flexora_jax.checkpoint import StageCheckpointer
    from flexora_jax.gates import gate_values, init_gates
    from flexora_jax.lora import init_lora
    from flexora_jax.search import search

    cfg = ws.config
    out_dir = ws.run_dir / "searches" / kind
    stage = f"search_{kind}"
    if ws.resume and (out_dir / "selection.json").exists():
        log.info("%s: done in a previous session, reusing %s", stage, out_dir)
        return SearchOutcome(kind, read_json(out_dir / "gates.json"),
                             _selection_from_json(ws, read_json(out_dir / "selection.json")))
    sc = dataclasses.replace(cfg.search, gates=kind)
    ckpt = StageCheckpointer(ws.run_dir / "checkpoints" / stage, cfg.checkpoint.every, cfg.checkpoint.keep)
    state = sampler = None
    if ws.resume:
        lora0 = init_lora(ws.model_config, cfg.lora, jax.random.key(cfg.seed))
        template = init_search_state(lora0, init_gates(kind, ws.num_layers, dict(lora0.spec.r_max),
                                                       power=sc.gate_power), sc)
        restored = ckpt.restore(template)
        if restored is not None:
            state, meta = restored
            sampler = meta["sampler"]
            log.info("%s: resuming from checkpoint step %d", stage, int(state.step))
    start = 0 if state is None else int(state.step)
    ws.log.truncate(stage, start)
    callback, bar = _stage_loop_hooks(
        ws, stage, sc.steps, start, ckpt, to_state=lambda r: r["state"],
        meta_of=lambda r: {"sampler": r["sampler"]}, loss_key="val_loss")
    t0 = time.perf_counter()
    try:
        result = search(ws.model_config, ws.params, cfg.lora, sc, ws.data.train, ws.data.val, seed=cfg.seed,
                        callback=callback, state=state, sampler_states=sampler, mesh=ws.mesh)
    except NumericsError as exc:
        _record_nonfinite(ws, stage, exc)
        raise
    finally:
        bar.close()
        ckpt.close()
    ws.record_time(stage, time.perf_counter() - t0)
    values = gate_values(result.gates, ws.num_layers)
    gates_json: dict[str, Any] = {}
    if "layer" in values:
        gates_json["layer"] = [float(x) for x in np.asarray(values["layer"])]
        gates_json["layer_alpha"] = [float(x) for x in np.asarray(result.gates.layer)]
    if "rank" in values:
        gates_json["rank"] = {m: np.asarray(v).tolist() for m, v in values["rank"].items()}
    write_json(out_dir / "gates.json", gates_json)
    write_json(out_dir / "selection.json", _selection_json(ws, result.selection))
    log.info("%s: %d steps in %.1f s; selected layers %s", stage, sc.steps, ws.timings[stage],
             list(result.selection.layers))
    return SearchOutcome(kind, gates_json, result.selection)


def needed_searches(config: RunConfig) -> list[str]:
    """Gate kinds to search for the run's methods (the K_METHODS baselines need k from a layer search)."""
    kinds = [METHOD_GATES[m] for m in config.methods if m in METHOD_GATES]
    if ("flexora_highrank" in config.methods
            or (config.baseline_k == 0 and any(m in K_METHODS for m in config.methods))):
        kinds.append("layer")
    return list(dict.fromkeys(kinds))


def method_selection(ws: Workspace, method: str, searches: dict[str, SearchOutcome]) -> Selection:
    """The layers (and ranks) ``method`` fine-tunes."""
    cfg, L = ws.config, ws.num_layers
    if method in METHOD_GATES:
        return searches[METHOD_GATES[method]].selection
    if method == "lora":
        return Selection(layers=tuple(range(L)), ranks=None,
                         lora_config=dataclasses.replace(cfg.lora, layers_to_transform=None))
    k = cfg.baseline_k or len(searches["layer"].selection.layers)
    if k > L:
        raise ConfigError(f"baseline_k {k} exceeds the model's {L} layers; expected 0..{L}")
    if method in ("lora_lowrank", "flexora_highrank"):
        if cfg.lora.rank_pattern:
            raise ConfigError(f"{method} rescales lora.r; it cannot be combined with lora.rank_pattern")
        if method == "lora_lowrank":
            layers, r = tuple(range(L)), max(1, round(cfg.lora.r * k / L))
        else:
            layers = tuple(searches["layer"].selection.layers)
            r = round(cfg.lora.r * L / max(len(layers), 1))
        scaled = dataclasses.replace(cfg.lora, r=r, lora_alpha=cfg.lora.lora_alpha * r / cfg.lora.r,
                                     layers_to_transform=layers if len(layers) < L else None)
        return Selection(layers=layers, ranks=None, lora_config=scaled)
    if method == "random_k":
        layers = tuple(sorted(int(i) for i in np.random.default_rng([cfg.seed, 11]).choice(L, k, replace=False)))
    else:  # lora_drop: the last k layers
        layers = tuple(range(L - k, L))
    return Selection(layers=layers, ranks=None, lora_config=dataclasses.replace(
        cfg.lora, layers_to_transform=layers if k < L else None))


def method_dirname(method: str) -> str:
    """The folder under ``methods/`` of a method (``flexora+autolora`` -> ``flexora_autolora``)."""
    return method.replace("+", "_")


def method_dir(ws: Workspace, method: str) -> Path:
    return ws.run_dir / "methods" / method_dirname(method)


def finetune_stage(ws: Workspace, method: str, selection: Selection) -> Any:
    """Fine-tune a fresh LoRA on ``selection`` (or resume / reuse it); export it in PEFT format."""
    from flexora_jax.adapters import export_peft, load_peft
    from flexora_jax.checkpoint import StageCheckpointer
    from flexora_jax.lora import init_lora
    from flexora_jax.train import finetune, init_train_state, make_optimizer, total_steps

    cfg = ws.config
    out_dir = method_dir(ws, method)
    stage = f"finetune_{method}"
    adapter = out_dir / "adapter"
    if ws.resume and (adapter / "adapter_model.safetensors").exists() and (out_dir / "selection.json").exists():
        log.info("%s: done in a previous session, reusing %s", stage, adapter)
        return load_peft(adapter, ws.model_config)
    lora = init_lora(ws.model_config, selection.lora_config, jax.random.key(cfg.seed + 1))
    ft = cfg.finetune
    steps = total_steps(ft, len(ws.data.finetune["input_ids"]))
    total = steps * ft.grad_accum
    ckpt = StageCheckpointer(ws.run_dir / "checkpoints" / stage, cfg.checkpoint.every, cfg.checkpoint.keep)
    state = sampler = None
    if ws.resume:
        restored = ckpt.restore(init_train_state(lora, make_optimizer(ft, steps), cfg.seed))
        if restored is not None:
            state, meta = restored
            sampler = meta["sampler"]
            log.info("%s: resuming from checkpoint step %d", stage, int(state.step))
    start = 0 if state is None else int(state.step)
    ws.log.truncate(stage, start)
    callback, bar = _stage_loop_hooks(ws, stage, total, start, ckpt, to_state=lambda r: r["state"],
                                      meta_of=lambda r: {"sampler": r["sampler"]}, loss_key="loss")
    t0 = time.perf_counter()
    try:
        trained, _ = finetune(ws.model_config, ws.params, lora, ws.data.finetune, ft, val=ws.data.val,
                              seed=cfg.seed, callback=callback, state=state, sampler_state=sampler, mesh=ws.mesh)
    except NumericsError as exc:
        _record_nonfinite(ws, stage, exc)
        raise
    finally:
        bar.close()
        ckpt.close()
    ws.record_time(stage, time.perf_counter() - t0)
    host = trained
    if ws.mesh is not None and jax.process_count() > 1:
        from flexora_jax import sharding as sh

        host = sh.fetch(trained)  # every process takes part in the gather; process 0 writes
    if is_main_process():
        tmp = out_dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export_peft(host, tmp, base_model_name_or_path=ws.model_source)
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(tmp, adapter)
    write_json(out_dir / "selection.json", _selection_json(ws, selection))
    log.info("%s: %d steps in %.1f s on layers %s", stage, total, ws.timings[stage], list(selection.layers))
    return trained


def evaluate_stage(ws: Workspace, loras: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Held-out scores of the base model (``"base"``) and of each method's LoRA: ``{method: {task: {...}}}``.

    The planted task reports the test cross-entropy against the teacher's distributions
    (``test_loss``; the teacher's own entropy is the floor); a real task reports lm-eval style
    ``acc`` / ``acc_norm`` from :func:`flexora_jax.evaluation.evaluate`.
    """
    from flexora_jax.train import dataset_loss

    cfg = ws.config
    t0 = time.perf_counter()
    candidates: dict[str, Any] = ({"base": None} if cfg.eval.base else {}) | dict(loras)
    if ws.mesh is not None:  # adapters read back from disk (or kept-best host copies) go onto the mesh too;
        from flexora_jax import sharding as sh  # the jitted scorers then follow the sharded params / LoRA

        candidates = {k: None if v is None else sh.shard(v, ws.mesh) for k, v in candidates.items()}
    results: dict[str, dict[str, Any]] = {}
    bar = _progress(len(candidates), 0, "evaluate", unit="model") if ws.planted is not None else None
    for name, lora in candidates.items():
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
        if ws.planted is not None:
            test = ws.data.test
            n = len(test["input_ids"]) if not cfg.eval.limit else min(cfg.eval.limit, len(test["input_ids"]))
            test = {k: v[:n] for k, v in test.items()}
            loss = dataset_loss(ws.model_config, ws.params, lora, test, batch_size=cfg.eval.batch_size)
            results[name] = {PLANTED_TASK: {"test_loss": loss, "teacher_test_loss": ws.planted.teacher_test_loss,
                                            "n": n}}
        else:
            from flexora_jax.evaluation import evaluate

            res = evaluate(ws.model_config, ws.params, ws.tokenizer, {cfg.task.name: ws.data.test_records},
                           lora=lora, batch_size=cfg.eval.batch_size, progress=progress_enabled())
            test_loss = dataset_loss(ws.model_config, ws.params, lora, ws.data.test, batch_size=cfg.eval.batch_size)
            results[name] = {t: dict(v, test_loss=test_loss) for t, v in res.items()}
            if ws.data.test_noq is not None:
                results[name][cfg.task.name].update(_question_control(ws, lora, test_loss))
        log.info("evaluate %s: %s", name, _score_line(results[name]))
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
    from flexora_jax.evaluation import evaluate
    from flexora_jax.train import dataset_loss

    cfg = ws.config
    loss = dataset_loss(ws.model_config, ws.params, lora, ws.data.test_noq, batch_size=cfg.eval.batch_size)
    res = evaluate(ws.model_config, ws.params, ws.tokenizer, {cfg.task.name: ws.data.test_records_noq},
                   lora=lora, batch_size=cfg.eval.batch_size, progress=False)[cfg.task.name]
    out = {"test_loss_noq": loss, "question_gain": loss - test_loss}
    out.update({f"{k}_noq": res[k] for k in ("acc", "acc_norm") if k in res})
    return out


def _score_line(scores: dict[str, Any]) -> str:
    parts = []
    for task, m in scores.items():
        keys = [k for k in ("acc", "acc_norm", "test_loss") if k in m]
        parts.append(f"{task} " + ", ".join(f"{k} {m[k]:.4f}" for k in keys))
    return "; ".join(parts)


def export_stage(ws: Workspace, merged: bool = False) -> None:
    """The run's main result at the top of the run directory, ``report.md`` and ``gates.png``.

    Copies the main method's ``selection.json`` and ``adapter/`` up, writes ``gates.json`` (of the
    main method's search, else of the layer search, else empty), and with ``merged`` also the base
    model with the adapter merged in (an HF directory in ``merged/``).
    """
    from flexora_jax import report

    cfg = ws.config
    src = method_dir(ws, cfg.method)
    if not (src / "adapter").exists():
        raise DataError(f"{src / 'adapter'} does not exist; run the fine-tune stage first")
    if is_main_process():
        tmp = ws.run_dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / "adapter", tmp)
        shutil.rmtree(ws.run_dir / "adapter", ignore_errors=True)
        os.replace(tmp, ws.run_dir / "adapter")
    write_json(ws.run_dir / "selection.json", {k: v for k, v in read_json(src / "selection.json").items()
                                                if k in ("layers", "ranks", "trainable_params")})
    kind = METHOD_GATES.get(cfg.method) or ("layer" if (ws.run_dir / "searches" / "layer").exists() else None)
    gates = read_json(ws.run_dir / "searches" / kind / "gates.json") if kind else {}
    write_json(ws.run_dir / "gates.json", gates)
    if merged:
        from flexora_jax.adapters import export_merged, load_peft

        lora = load_peft(ws.run_dir / "adapter", ws.model_config)
        params = ws.params
        if ws.mesh is not None and jax.process_count() > 1:
            from flexora_jax import sharding as sh

            params = sh.fetch(params)  # a full host copy (collective: every process gathers)
        if is_main_process():
            export_merged(ws.model_config, params, lora, ws.run_dir / "merged", tokenizer=ws.tokenizer)
    report.write_report(ws)


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
            lines.append(f"{m + ':':<{w}}{_score_line(scores)}")
        if self.planted is not None:
            first = next(iter(self.scores.values()))
            lines.append(f"{'teacher floor:':<{w}}{first[PLANTED_TASK]['teacher_test_loss']:.4f}")
        lines.append(f"{'run directory:':<{w}}{self.run_dir} ({sum(self.timings.values()):.0f} s)")
        return "\n".join(lines)


def searches_stage(ws: Workspace) -> dict[str, SearchOutcome]:
    """Every search the run's methods need."""
    return {kind: search_stage(ws, kind) for kind in needed_searches(ws.config)}


def load_searches(ws: Workspace) -> dict[str, SearchOutcome]:
    """The searches a previous ``search`` stage wrote."""
    out = {}
    for kind in needed_searches(ws.config):
        d = ws.run_dir / "searches" / kind
        out[kind] = SearchOutcome(kind, read_json(d / "gates.json"), _selection_from_json(ws, read_json(d / "selection.json")))
    return out


def finetune_all(ws: Workspace, searches: dict[str, SearchOutcome]) -> tuple[dict[str, Selection], dict[str, Any]]:
    selections = {m: method_selection(ws, m, searches) for m in ws.config.methods}
    loras = {m: finetune_stage(ws, m, sel) for m, sel in selections.items()}
    return selections, loras


def load_adapters(ws: Workspace) -> dict[str, Any]:
    """Each method's fine-tuned adapter, read back from ``methods/<method>/adapter``."""
    from flexora_jax.adapters import load_peft

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
    with stop_on_signals():
        ws = prepare(config, resume=resume, stage="run")
        searches = searches_stage(ws)
        selections, loras = finetune_all(ws, searches)
        scores = evaluate_stage(ws, loras)
        export_stage(ws)
    ws.record_time("total", time.perf_counter() - t0)  # this call's wall time
    planted = ws.planted.planted_json() if ws.planted is not None else None
    timings = {k: v for k, v in ws.timings.items() if k != "total"}
    return RunResult(ws.run_dir, selections, scores, planted, timings)


def run_stage(stage: str, config: RunConfig, merged: bool = False) -> Any:
    """One stage of a run from the files of earlier stages in ``config.output_dir``.

    ``search`` writes ``searches/``; ``finetune`` reads them and writes ``methods/*/adapter``;
    ``evaluate`` reads the adapters and writes ``eval.json`` / ``compare.json``; ``export`` writes the
    top-level files, ``report.md``, ``gates.png`` (and ``merged/`` with ``merged=True``).
    """
    with stop_on_signals():
        ws = prepare(config, resume=False, stage=stage)
        if stage == "search":
            return searches_stage(ws)
        if stage == "finetune":
            return finetune_all(ws, load_searches(ws))
        if stage == "evaluate":
            return evaluate_stage(ws, load_adapters(ws))
        if stage == "export":
            return export_stage(ws, merged=merged)
    raise ConfigError(f"unknown stage {stage!r}; expected one of search, finetune, evaluate, export")


__all__ = ["Interrupted", "RunResult", "SearchOutcome", "TaskData", "Workspace", "evaluate_stage", "export_stage",
           "finetune_stage", "method_selection", "needed_searches", "prepare", "run", "run_mesh", "run_stage",
           "search_stage"]
