"""The command's config: the run sections on top of the library configs, and the YAML loader.

A :class:`RunConfig` is a tree of frozen dataclasses (every field commented; ``flexora-jax run
--help-config`` prints them). It is read from YAML with ``--section.key=value`` overrides by
:func:`load_config` (draccus decodes the values, unknown keys are refused naming the allowed ones) and
written back fully resolved by :func:`save_config`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import draccus
import yaml

from flexora_jax.config import (
    ALL_MODULES,
    DTYPES,
    PRESETS,
    EvalConfig,
    FinetuneConfig,
    FrozenDict,
    LoraConfig,
    MeshConfig,
    SearchConfig,
    SelectionConfig,
    preset,
    require,
)
from flexora_jax.errors import ConfigError, did_you_mean
from flexora_jax.fileio import write_bytes
from flexora_jax.pipeline.registry import METHODS, get_method
from flexora_jax.validation import check_fields, check_type

PLANTED_TASK = "planted"


@dataclasses.dataclass(frozen=True)
class ModelSourceConfig:
    """Where the base model comes from (ignored by the embedded planted task, which builds its own)."""

    path: str | None = None  # HF model directory or hub id (config.json + safetensors + tokenizer)
    llama2c: str | None = None  # a llama2.c checkpoint, converted into <output_dir>/model on first use
    tokenizer_model: str | None = None  # the SentencePiece .model that goes with ``llama2c``
    dtype: str = "float32"  # compute / base-weight dtype: float32 on CPU, bfloat16 on accelerators
    allow_pickle: bool = False  # read a pickle-only (pytorch_model.bin) checkpoint: only for files you trust

    def __post_init__(self) -> None:
        check_fields(self, "model")
        require(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(
            isinstance(self.allow_pickle, bool), f"model.allow_pickle must be true or false, got {self.allow_pickle!r}"
        )
        require(
            not (self.path and self.llama2c),
            f"model.path ({self.path!r}) and model.llama2c ({self.llama2c!r}) are exclusive; set one",
        )
        require(
            self.llama2c is None or self.tokenizer_model is not None,
            "model.llama2c needs model.tokenizer_model (the SentencePiece .model of the checkpoint)",
        )


@dataclasses.dataclass(frozen=True)
class PlantedOptions:
    """The embedded planted task: a teacher with LoRA deltas in known layers (see ``planted.py``)."""

    num_layers: int = 6  # blocks of the teacher / student
    num_planted: int = 2  # layers with a planted delta, drawn from the run seed
    soft_targets: bool = True  # search data: teacher distributions (True) or sampled tokens
    n_train: int = 500  # search training sequences
    n_val: int = 200  # search validation sequences
    n_test: int = 500  # held-out test sequences (scored against the teacher's distributions)
    finetune_examples: int = 200  # fine-tune on the first N training sequences; 0 = all
    finetune_targets: str = "hard"  # "hard": tokens sampled from the teacher (scarce, noisy data); "same"
    rank: int = 4  # rank of every planted delta ...
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)  # ... or per module (AutoLoRA's target)
    modules: tuple[str, ...] = ("q_proj", "v_proj")  # the modules that carry the planted deltas
    layer_kl: float = 0.4  # signal strength: each planted layer alone moves the output by this KL (nats)

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):
            object.__setattr__(self, "modules", (self.modules,))
        check_fields(self, "task.planted")
        object.__setattr__(self, "ranks", FrozenDict(self.ranks))
        modules = tuple(self.modules)
        object.__setattr__(self, "modules", modules)
        bad = [m for m in modules if m not in ALL_MODULES]
        require(
            modules and not bad, f"task.planted.modules must name modules of {list(ALL_MODULES)}, got {list(modules)!r}"
        )
        require(len(set(modules)) == len(modules), f"task.planted.modules has duplicates: {list(modules)!r}")
        require(
            isinstance(self.layer_kl, (int, float)) and self.layer_kl > 0,
            f"task.planted.layer_kl must be a KL > 0 (nats), got {self.layer_kl!r}",
        )
        for name in ("num_layers", "num_planted", "n_train", "n_val", "n_test", "rank"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"task.planted.{name} must be an integer >= 1, got {v!r}")
        require(
            self.num_planted <= self.num_layers,
            f"task.planted.num_planted ({self.num_planted}) must be <= num_layers ({self.num_layers})",
        )
        require(
            isinstance(self.finetune_examples, int) and 0 <= self.finetune_examples <= self.n_train,
            f"task.planted.finetune_examples must be in 0..n_train ({self.n_train}), got {self.finetune_examples!r}",
        )
        require(
            self.finetune_targets in ("hard", "same"),
            f"task.planted.finetune_targets must be 'hard' or 'same', got {self.finetune_targets!r}",
        )
        for module, r in self.ranks.items():
            require(
                module in modules and isinstance(r, int) and r >= 1,
                f"task.planted.ranks maps planted modules ({list(modules)}) to ranks >= 1, got {module!r}: {r!r}",
            )


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The task: ``planted`` (the embedded default) or a multiple-choice task of the registry."""

    name: str = PLANTED_TASK  # "planted" or a task of flexora_jax.tasks (piqa, hellaswag, winogrande, ...)
    source: str = "local"  # "local": release files under data_dir; "hub": the Hugging Face Hub
    data_dir: str | None = None  # local data folder; None = $FLEXORA_DATA_DIR or ../shared/data
    split_seed: int = 0  # seed of the train / validation / test carve-up (kept fixed across runs)
    max_length: int = 256  # SFT sequence length (prompt truncated from the left)
    n_train: int = 0  # search training examples (the first N of the train split); 0 = all
    n_val: int = 0  # search-validation examples; 0 = all
    n_test: int = 0  # test examples scored; 0 = all
    n_finetune: int = 0  # fine-tune training examples (the first N of the train split); 0 = same as n_train
    too_long: str = "drop"  # an SFT example whose answer alone exceeds max_length: "drop" (counted) or "truncate"
    planted: PlantedOptions = dataclasses.field(default_factory=PlantedOptions)

    def __post_init__(self) -> None:
        check_fields(self, "task")
        require(isinstance(self.name, str) and self.name != "", "task.name must be a non-empty string")
        require(self.source in ("local", "hub"), f"task.source must be 'local' or 'hub', got {self.source!r}")
        require(
            self.too_long in ("drop", "truncate"), f"task.too_long must be 'drop' or 'truncate', got {self.too_long!r}"
        )
        require(
            isinstance(self.max_length, int) and self.max_length >= 8,
            f"task.max_length must be an integer >= 8, got {self.max_length!r}",
        )
        for name in ("n_train", "n_val", "n_test", "n_finetune"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 0, f"task.{name} must be an integer >= 0 (0 = all), got {v!r}")
        require(
            self.split_seed >= 0, f"task.split_seed must be an integer >= 0 (a numpy seed), got {self.split_seed!r}"
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Resumable orbax checkpoints under ``<output_dir>/checkpoints``."""

    every: int = 50  # save every N steps of each search / fine-tune (and at its end); 0 = only at the end
    keep: int = 2  # checkpoints kept per stage

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")
        require(
            isinstance(self.every, int) and self.every >= 0,
            f"checkpoint.every must be an integer >= 0, got {self.every!r}",
        )
        require(
            isinstance(self.keep, int) and self.keep >= 1, f"checkpoint.keep must be an integer >= 1, got {self.keep!r}"
        )


#: The defaults a real task (any ``task.name`` but ``planted``) starts from: the Flexora paper's settings,
#: the ``flexora_paper`` preset (:data:`flexora_jax.config.PRESETS`). The embedded planted demo keeps the
#: RunConfig defaults (the ``planted_demo`` preset), which are sized for its small teacher.
PAPER_PRESET = "flexora_paper"
DEMO_PRESET = "planted_demo"


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metric writers beside ``metrics.jsonl`` (which is always written): flexora_jax.writers hooks."""

    tensorboard: bool = False  # TensorBoard event files in <output_dir>/tensorboard (pip install tensorboard)
    wandb_project: str | None = None  # W&B project: each stage a run, grouped by the run directory (pip install wandb)

    def __post_init__(self) -> None:
        check_fields(self, "log")
        require(isinstance(self.tensorboard, bool), f"log.tensorboard must be true or false, got {self.tensorboard!r}")
        require(
            self.wandb_project is None or (isinstance(self.wandb_project, str) and self.wandb_project != ""),
            f"log.wandb_project must be a W&B project name or null, got {self.wandb_project!r}",
        )


def _demo(section: str) -> functools.partial:
    return functools.partial(preset, DEMO_PRESET, section)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One ``flexora-jax run``: search -> select -> fine-tune -> evaluate -> export.

    The defaults are the embedded demo: a planted task on a small LLaMA, searched with unrolled
    hypergradients and fine-tuned on scarce data next to the all-layer LoRA baseline (the ``planted_demo``
    preset of :data:`flexora_jax.config.PRESETS`).
    """

    method: str = "flexora"  # a registered method (--help-config lists them): the run's main result
    compare: tuple[str, ...] = ("lora",)  # more methods run on the same data and seeds, reported side by side
    seed: int = 0  # seeds the planted layers, LoRA init, batch order and random_k
    output_dir: str = "runs/flexora"  # the run directory (see docs/design.md)
    baseline_k: int = 0  # layers of random_k / lora_drop; 0 = as many as the flexora selection
    model: ModelSourceConfig = dataclasses.field(default_factory=ModelSourceConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    lora: LoraConfig = dataclasses.field(default_factory=_demo("lora"))
    search: SearchConfig = dataclasses.field(default_factory=_demo("search"))
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)  # gates -> layers
    finetune: FinetuneConfig = dataclasses.field(default_factory=_demo("finetune"))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh (see docs/scaling.md)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)  # TensorBoard / W&B beside metrics.jsonl

    def __post_init__(self) -> None:
        if isinstance(self.compare, str):
            object.__setattr__(self, "compare", (self.compare,))
        check_fields(self, "")
        require(self.method in METHODS, f"method must be one of {list(METHODS)}, got {self.method!r}")
        compare = tuple(self.compare)
        bad = [m for m in compare if m not in METHODS]
        require(not bad, f"compare: unknown method(s) {bad}; allowed: {list(METHODS)}")
        object.__setattr__(self, "compare", compare)
        require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**31 - 1,
            f"seed must be an integer in 0..{2**31 - 2}, got {self.seed!r}",
        )
        lt = self.lora.layers_to_transform
        require(
            lt is None or len(lt) > 0,
            "lora.layers_to_transform is empty; list at least one layer, or leave it unset (null) for every layer",
        )
        alphas = {"lora.lora_alpha": self.lora.lora_alpha} | {
            f"lora.alpha_pattern[{k!r}]": v for k, v in dict(self.lora.alpha_pattern).items()
        }
        bad_alpha = {k: v for k, v in alphas.items() if not math.isfinite(float(v))}
        require(not bad_alpha, f"{', '.join(bad_alpha)} must be finite, got {list(bad_alpha.values())}")
        require(
            not self.lora.use_dora,
            "lora.use_dora: a run chooses DoRA by method; use method / compare 'dora' "
            "or 'flexora+dora' (the searches then stay plain LoRA)",
        )
        bad = {k: v for k, v in dict(self.lora.rank_pattern).items() if v < 1}
        require(
            not bad,
            f"lora.rank_pattern gives rank 0 to {sorted(bad)}; expected ranks >= 1 (leave a module out of "
            "lora.target_modules / layers_to_transform to not adapt it)",
        )
        require(
            isinstance(self.baseline_k, int) and self.baseline_k >= 0,
            f"baseline_k must be an integer >= 0, got {self.baseline_k!r}",
        )
        require(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir must be a non-empty path")
        if self.task.name == PLANTED_TASK:
            require(
                self.model.path is None and self.model.llama2c is None,
                "task.name 'planted' builds its own teacher model; unset model.path / model.llama2c, "
                "or name a real task (e.g. task.name=piqa)",
            )
        else:
            require(
                self.model.path is not None or self.model.llama2c is not None,
                f"task.name {self.task.name!r} needs a base model: set model.path (HF directory or hub id) "
                "or model.llama2c + model.tokenizer_model",
            )
        _refuse_ignored_settings(self)

    @property
    def methods(self) -> tuple[str, ...]:
        """``method`` then ``compare``, without repeats."""
        return tuple(dict.fromkeys((self.method,) + tuple(self.compare)))


def _refuse_ignored_settings(config: RunConfig) -> None:
    """Settings the run would silently not apply are refused: the planted teacher is built in float32 whatever
    ``model.dtype`` says, and AdaLoRA allocates its own ranks on every layer (no ``layers_to_transform``,
    ``rank_pattern``, ``alpha_pattern``, rsLoRA or dropout)."""
    if config.task.name == PLANTED_TASK:
        require(
            config.model.dtype == "float32",
            f"model.dtype {config.model.dtype!r}: the planted task builds its teacher in float32 and ignores "
            "model.dtype; leave it at float32, or name a real task (a model read in that dtype)",
        )
    adalora = [m for m in config.methods if m in METHODS and get_method(m).finetune == "adalora"]
    if adalora:
        lc = config.lora
        ignored = {
            "lora.layers_to_transform": lc.layers_to_transform is not None,
            "lora.rank_pattern": bool(dict(lc.rank_pattern)),
            "lora.alpha_pattern": bool(dict(lc.alpha_pattern)),
            "lora.use_rslora": lc.use_rslora,
            "lora.lora_dropout": lc.lora_dropout > 0,
        }
        named = [k for k, on in ignored.items() if on]
        require(
            not named,
            f"method {adalora[0]} ignores {', '.join(named)}: AdaLoRA adapts every layer and allocates "
            "its own ranks (from 1.5 x lora.r down to lora.r), without dropout or rsLoRA; unset them, "
            "or run it in a run of its own",
        )


def config_to_dict(config: Any) -> Any:
    """A config dataclass as plain YAML-safe data (tuples as lists, frozen mappings as dicts)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    return config


def _section_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _dataclass_type(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls``, or None when the field is a plain value."""
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _check_keys(cls: type, data: Any, where: str, origin: str) -> None:
    """Raise :class:`ConfigError` for any key of ``data`` that is not a field, naming the allowed ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: {where or 'the config'} must be a mapping of keys to values, got {type(data).__name__} {data!r}"
        )
    fields = _section_fields(cls)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            hint = did_you_mean(str(key), fields, where + "." if where else "")
            raise ConfigError(
                f"{origin}: unknown key {path!r}{hint}; allowed keys"
                f"{' under ' + repr(where) if where else ''}: {sorted(fields)}"
            )
        sub = _dataclass_type(cls, key)
        if sub is not None and value is not None:
            _check_keys(sub, value, path, origin)


def _check_value(key: str, value: Any, origin: str) -> None:
    """Refuse a decoded YAML value whose type cannot be meant for ``key`` (the parser would coerce it):
    a bool where a number is meant (``--lora.r=true`` is not rank 1), anything but true / false where a
    flag is meant (``use_rslora: "false"``), NaN / Inf where a float is meant; nested lists and mappings too."""
    cls: Any = RunConfig
    for part in key.split(".")[:-1]:
        cls = _dataclass_type(cls, part) or cls
    hint = typing.get_type_hints(cls).get(key.split(".")[-1])
    if hint is not None and not dataclasses.is_dataclass(hint):
        check_type(value, hint, f"{origin}: {key}", text=True)


def _flatten(cls: type, data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Section dicts -> dotted ``(key, value)`` pairs down to the leaf fields."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        sub = _dataclass_type(cls, key)
        if sub is not None and isinstance(value, Mapping):
            out += _flatten(sub, value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _parse_override(arg: str) -> tuple[str, str]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form --section.key=value (e.g. --lora.r=8)")
    key, value = arg[2:].split("=", 1)
    return key, value


def _cause(exc: BaseException) -> BaseException | None:
    """The first FlexoraError in an exception's cause / context chain (a validation error in a config)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def load_config(
    path: str | Any | None = None, overrides: tuple[str, ...] | list[str] = (), base: Mapping[str, Any] | None = None
) -> RunConfig:
    """A validated :class:`RunConfig` from a YAML file plus ``--section.key=value`` overrides.

    The YAML is read with ``yaml.safe_load``. A file may build on others: a top-level ``base:`` (a path or
    a list of paths, relative to the file) names files applied first, in order, each with its own chain;
    then the file's own keys, then the overrides, each replacing what came before key by key. A missing
    base file or a cycle is a :class:`ConfigError` naming the file. Keys are checked against the dataclass
    tree (an unknown key names the allowed ones); values are decoded to the field types by draccus, which
    also parses the overrides (each value is YAML: ``--compare=[lora,flexora]``,
    ``--lora.rank_pattern={q_proj: 2}``).

    Under all of that lie the defaults: the RunConfig's (the planted demo) and, for a real task (any
    ``task.name`` but ``planted``, wherever it is set), the ``flexora_paper`` preset of
    :data:`flexora_jax.config.PRESETS`: what the files and the overrides leave unset takes the paper's
    value, not the planted demo's. ``base`` (a mapping of sections) replaces that preset when given.

    Raises:
      ConfigError: naming the file / key / value and what was expected.
    """
    layers = _chain(Path(path), ()) if path is not None else []
    parsed = [_parse_override(arg) for arg in overrides]
    if base is None:
        base = _preset_sections(PAPER_PRESET) if _task_name(layers, parsed) != PLANTED_TASK else {}
    else:
        _check_keys(RunConfig, base, "", "defaults")
    origin = "command line" if path is None else str(path)
    if len(layers) > 1:
        origin += f" (with its base files {', '.join(o for o, _ in layers[:-1])})"
    # Every leaf of the default RunConfig first: draccus fills a section's missing keys from the section
    # class's own defaults, and RunConfig's sections have run-specific defaults.
    args: list[str] = []
    for mapping in (config_to_dict(RunConfig()), base, *(data for _, data in layers)):
        for key, value in _flatten(RunConfig, mapping):
            args.append(
                f"--{key}={yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()}".removesuffix("\n...")
            )
    for arg, (key, value) in zip(overrides, parsed):
        _check_override(arg, key, value)
        args.append(arg)
    try:
        return draccus.parse(RunConfig, args=args, exit_on_error=False)
    except ConfigError:
        raise
    except Exception as exc:  # draccus: DecodingError(path, message) / ParsingError wrapping our ConfigError
        inner = _cause(exc)
        if inner is not None:
            raise ConfigError(f"{origin}: {inner}") from None
        where = getattr(exc, "key_path", None) or (exc.args[0] if len(exc.args) > 1 else None)
        key = ".".join(map(str, where)) if isinstance(where, (tuple, list)) else None
        detail = exc.args[-1] if exc.args else str(exc)
        raise ConfigError(f"{origin}: bad value for {key or 'the config'}: {detail}{_expected(key)}") from None


def _preset_sections(name: str) -> dict[str, Any]:
    """A preset as whole run sections (each section's class defaults, then the preset's values)."""
    return {section: config_to_dict(preset(name, section)) for section in PRESETS[name]}


def _task_name(layers: list[tuple[str, dict[str, Any]]], overrides: list[tuple[str, str]]) -> Any:
    """The ``task.name`` the files and overrides end with (read before parsing: it picks the defaults)."""
    name: Any = PLANTED_TASK
    for _, data in layers:
        task = data.get("task")
        if isinstance(task, Mapping) and "name" in task:
            name = task["name"]
    for key, value in overrides:
        if key in ("task", "task.name"):
            try:
                decoded = yaml.safe_load(value)
            except yaml.YAMLError:
                continue  # the parser names the bad value
            if key == "task.name":
                name = decoded
            elif isinstance(decoded, Mapping) and "name" in decoded:
                name = decoded["name"]
    return name


def _check_override(arg: str, key: str, value: str) -> None:
    nested: dict[str, Any] = {}
    cur = nested
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    _check_keys(RunConfig, nested, "", f"override {arg!r}")
    try:
        decoded = yaml.safe_load(value)
    except yaml.YAMLError:
        decoded = value  # the parser names the bad value
    _check_value(key, decoded, f"override {arg!r}")


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass a YAML file to --config") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected a YAML file"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def _chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[str, dict[str, Any]]]:
    """``(file, its keys)`` of ``path``'s base files (depth first, in order), then of ``path`` itself."""
    real = path.resolve()
    if real in seen:
        cycle = " -> ".join(str(p) for p in (*seen[seen.index(real) :], real))
        raise ConfigError(f"config file {path}: its base chain is a cycle ({cycle}); remove one of the base: entries")
    loaded = _read_yaml(path)
    data = {} if loaded is None else loaded
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__} {data!r}")
    data = dict(data)
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base must be a path or a list of paths (relative to the file), got {bases!r}")
    out: list[tuple[str, dict[str, Any]]] = []
    for b in bases:
        file = Path(b) if Path(b).is_absolute() else path.parent / b
        if not file.is_file():
            raise ConfigError(
                f"{path}: base file {b!r} ({file}) does not exist; expected a YAML file relative to {path.parent}"
            )
        out += _chain(file, (*seen, real))
    _check_keys(RunConfig, data, "", str(path))
    for key, value in _flatten(RunConfig, data):
        _check_value(key, value, str(path))
    return out + [(str(path), data)]


def _expected(key: str | None) -> str:
    """'; expected <type>' for a dotted key of RunConfig, from its type hint."""
    if not key:
        return ""
    cls: Any = RunConfig
    for part in key.split(".")[:-1]:
        cls = _dataclass_type(cls, part) or cls
    try:
        hint = typing.get_type_hints(cls)[key.split(".")[-1]]
    except KeyError:
        return ""
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return f"; expected a value of type {name}"


def save_config(config: RunConfig, path: str | Any) -> None:
    """Write the fully resolved config as YAML (atomically: a kill never leaves half a file)."""
    write_bytes(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` statements of a dataclass's source (the
    comment may sit on any line of a statement the formatter wrapped)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names:
            found = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            if found:
                out[node.target.id] = " ".join(found)
    return out


def describe_keys(config: Any = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every leaf key of the run config as ``(dotted key, type, default, meaning)``, meanings from the
    comments on the dataclass fields (what ``flexora-jax run --help-config`` prints)."""
    config = RunConfig() if config is None else config
    cls, hints = type(config), typing.get_type_hints(type(config))
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(value, f"{prefix}{f.name}.")
            continue
        kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append((prefix + f.name, kind, config_to_dict(value), comments.get(f.name, "")))
    return rows


def help_text() -> str:
    """The run config's keys, one line each: key, type, default and meaning."""
    lines = ["Every key of the run config (--section.key=value on the command line, or YAML):", ""]
    for key, kind, default, meaning in describe_keys():
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        lines.append(f"  {key} ({kind}, default {shown})" + (f": {meaning}" if meaning else ""))
    lines += ["", f"A real task (task.name other than 'planted') starts from the {PAPER_PRESET!r} preset instead:"]
    lines += [f"  {section}.{k}: {v}" for section, values in PRESETS[PAPER_PRESET].items() for k, v in values.items()]
    lines += ["", "Methods (method / compare):"]
    lines += [f"  {name}: {get_method(name).description}" for name in METHODS]
    lines += ["", "A YAML file may build on others: base: [paths relative to it], applied first, in order."]
    return "\n".join(lines)
