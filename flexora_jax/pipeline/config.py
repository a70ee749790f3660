"""The command's config: the run sections on top of the library configs, and the YAML loader.

A :class:`RunConfig` is a tree of frozen dataclasses (every field commented; ``flexora-jax run
--help-config`` prints them). It is read from YAML with ``--section.key=value`` overrides by
:func:`load_config` (draccus decodes the values, unknown keys are refused naming the allowed ones) and
written back fully resolved by :func:`save_config`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from typing import Any, Mapping

import draccus
import yaml

from flexora_jax.config import (ALL_MODULES, DTYPES, EvalConfig, FinetuneConfig, LoraConfig, MeshConfig, SearchConfig,
                                SelectionConfig, FrozenDict, require)
from flexora_jax.errors import ConfigError, did_you_mean
from flexora_jax.fileio import write_bytes
from flexora_jax.validation import check_fields, check_type

#: What ``method:`` / ``compare:`` may name. ``lora``: every layer (the baseline); ``flexora``: the
#: layers a layer-gate search selects; ``autolora``: every layer at the ranks a rank-gate search
#: selects; ``flexora+autolora``: both from one combined search; ``random_k``: as many layers as the
#: flexora selection, drawn with the run seed; ``lora_drop``: the last k layers. Equal-parameter
#: baselines: ``lora_lowrank``: every layer at rank ``max(1, round(r * k / L))`` (about flexora's
#: parameter count spread over all layers); ``flexora_highrank``: flexora's layers at rank
#: ``round(r * L / k)`` (LoRA-all's parameter count on fewer layers). Both keep ``lora_alpha / r``.
#: ``dora`` / ``flexora+dora``: DoRA (flexora_jax.dora) on every layer / on flexora's layers.
#: ``adalora``: PEFT's AdaLoRA (flexora_jax.adalora) on every layer, its budget from ``init_r`` = 1.5 r down
#: to ``target_r`` = r, exported rank-pruned as LoRA with ``rank_pattern`` (and as a PEFT AdaLoRA adapter).
METHODS = ("lora", "flexora", "autolora", "flexora+autolora", "random_k", "lora_drop", "lora_lowrank",
           "flexora_highrank", "dora", "flexora+dora", "adalora")
#: Methods that fine-tune DoRA instead of LoRA (their searches, if any, use plain LoRA).
DORA_METHODS = ("dora", "flexora+dora")
#: Methods whose layers or rank follow the size of the flexora selection (k): they need a layer search.
K_METHODS = ("random_k", "lora_drop", "lora_lowrank", "flexora_highrank")
#: The gate kind a method's search uses (methods without a search are absent).
METHOD_GATES = {"flexora": "layer", "autolora": "rank", "flexora+autolora": "both", "flexora+dora": "layer"}
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
        require(isinstance(self.allow_pickle, bool), f"model.allow_pickle must be true or false, got {self.allow_pickle!r}")
        require(not (self.path and self.llama2c),
               f"model.path ({self.path!r}) and model.llama2c ({self.llama2c!r}) are exclusive; set one")
        require(self.llama2c is None or self.tokenizer_model is not None,
               "model.llama2c needs model.tokenizer_model (the SentencePiece .model of the checkpoint)")


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
        require(modules and not bad, f"task.planted.modules must name modules of {list(ALL_MODULES)}, got {list(modules)!r}")
        require(len(set(modules)) == len(modules), f"task.planted.modules has duplicates: {list(modules)!r}")
        require(isinstance(self.layer_kl, (int, float)) and self.layer_kl > 0,
               f"task.planted.layer_kl must be a KL > 0 (nats), got {self.layer_kl!r}")
        for name in ("num_layers", "num_planted", "n_train", "n_val", "n_test", "rank"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"task.planted.{name} must be an integer >= 1, got {v!r}")
        require(self.num_planted <= self.num_layers,
               f"task.planted.num_planted ({self.num_planted}) must be <= num_layers ({self.num_layers})")
        require(isinstance(self.finetune_examples, int) and 0 <= self.finetune_examples <= self.n_train,
               f"task.planted.finetune_examples must be in 0..n_train ({self.n_train}), "
               f"got {self.finetune_examples!r}")
        require(self.finetune_targets in ("hard", "same"),
               f"task.planted.finetune_targets must be 'hard' or 'same', got {self.finetune_targets!r}")
        for module, r in self.ranks.items():
            require(module in modules and isinstance(r, int) and r >= 1,
                   f"task.planted.ranks maps planted modules ({list(modules)}) to ranks >= 1, "
                   f"got {module!r}: {r!r}")


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
        require(self.too_long in ("drop", "truncate"), f"task.too_long must be 'drop' or 'truncate', got {self.too_long!r}")
        require(isinstance(self.max_length, int) and self.max_length >= 8,
               f"task.max_length must be an integer >= 8, got {self.max_length!r}")
        for name in ("n_train", "n_val", "n_test", "n_finetune"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 0, f"task.{name} must be an integer >= 0 (0 = all), got {v!r}")



@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Resumable orbax checkpoints under ``<output_dir>/checkpoints``."""

    every: int = 50  # save every N steps of each search / fine-tune (and at its end); 0 = only at the end
    keep: int = 2  # checkpoints kept per stage

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")
        require(isinstance(self.every, int) and self.every >= 0,
               f"checkpoint.every must be an integer >= 0, got {self.every!r}")
        require(isinstance(self.keep, int) and self.keep >= 1,
               f"checkpoint.keep must be an integer >= 1, got {self.keep!r}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metric writers beside ``metrics.jsonl`` (which is always written): flexora_jax.writers hooks."""

    tensorboard: bool = False  # TensorBoard event files in <output_dir>/tensorboard (pip install tensorboard)
    wandb_project: str | None = None  # W&B project: each stage a run, grouped by the run directory (pip install wandb)

    def __post_init__(self) -> None:
        check_fields(self, "log")
        require(isinstance(self.tensorboard, bool), f"log.tensorboard must be true or false, got {self.tensorboard!r}")
        require(self.wandb_project is None or (isinstance(self.wandb_project, str) and self.wandb_project != ""),
                f"log.wandb_project must be a W&B project name or null, got {self.wandb_project!r}")


def _default_run_lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4.0, target_modules=("q_proj", "v_proj"))


def _default_run_search() -> SearchConfig:
    return SearchConfig(hypergradient="unrolled", inner_steps=4, steps=40, inner_lr=3e-3, outer_lr=0.01,
                        batch_size=16, val_batch_size=16)


def _default_run_finetune() -> FinetuneConfig:
    return FinetuneConfig(epochs=32.0, max_steps=400, batch_size=16, lr=3e-3, schedule="cosine",
                          warmup_ratio=0.0, grad_clip=0.0)


#: What a real task (any ``task.name`` but ``planted``) starts from: the Flexora paper's settings
#: (LoRA r 8 / alpha 16 on q, v; the reference code's first-order search, AdamW 1e-4 cosine, batch 8,
#: 600 gate steps, gate power 3; fine-tune 3 epochs, lr 1e-4 cosine with 10% warm-up, batch 8, clip 1.0).
#: The embedded planted demo keeps the RunConfig defaults, which are sized for its small teacher.
PAPER_DEFAULTS: dict[str, Any] = {
    "lora": {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "search": {"hypergradient": "first_order", "inner_steps": 1, "steps": 600, "batch_size": 8, "val_batch_size": 8,
               "inner_optimizer": "adamw", "inner_lr": 1e-4, "inner_schedule": "cosine", "inner_grad_clip": 1.0,
               "outer_lr": 0.01, "gate_power": 3},
    "finetune": {"epochs": 3.0, "max_steps": 0, "batch_size": 8, "lr": 1e-4, "schedule": "cosine",
                 "warmup_ratio": 0.1, "grad_clip": 1.0, "optimizer": "adamw"},
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One ``flexora-jax run``: search -> select -> fine-tune -> evaluate -> export.

    The defaults are the embedded demo: a planted task on a small LLaMA, searched with unrolled
    hypergradients and fine-tuned on scarce data next to the all-layer LoRA baseline.
    """

    method: str = "flexora"  # one of METHODS: the run's main result (adapter/, selection.json, eval.json)
    compare: tuple[str, ...] = ("lora",)  # more METHODS run on the same data and seeds, reported side by side
    seed: int = 0  # seeds the planted layers, LoRA init, batch order and random_k
    output_dir: str = "runs/flexora"  # the run directory (see docs/design.md)
    baseline_k: int = 0  # layers of random_k / lora_drop; 0 = as many as the flexora selection
    model: ModelSourceConfig = dataclasses.field(default_factory=ModelSourceConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    lora: LoraConfig = dataclasses.field(default_factory=_default_run_lora)
    search: SearchConfig = dataclasses.field(default_factory=_default_run_search)
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)  # gates -> layers
    finetune: FinetuneConfig = dataclasses.field(default_factory=_default_run_finetune)
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
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**31 - 1,
                f"seed must be an integer in 0..{2**31 - 2}, got {self.seed!r}")
        lt = self.lora.layers_to_transform
        require(lt is None or len(lt) > 0, "lora.layers_to_transform is empty; list at least one layer, or leave it "
                                           "unset (null) for every layer")
        alphas = {"lora.lora_alpha": self.lora.lora_alpha} | {f"lora.alpha_pattern[{k!r}]": v
                                                             for k, v in dict(self.lora.alpha_pattern).items()}
        bad_alpha = {k: v for k, v in alphas.items() if not math.isfinite(float(v))}
        require(not bad_alpha, f"{', '.join(bad_alpha)} must be finite, got {list(bad_alpha.values())}")
        require(not self.lora.use_dora, "lora.use_dora: a run chooses DoRA by method; use method / compare 'dora' "
                                        "or 'flexora+dora' (the searches then stay plain LoRA)")
        bad = {k: v for k, v in dict(self.lora.rank_pattern).items() if v < 1}
        require(not bad, f"lora.rank_pattern gives rank 0 to {sorted(bad)}; expected ranks >= 1 (leave a module out of "
                         "lora.target_modules / layers_to_transform to not adapt it)")
        require(isinstance(self.baseline_k, int) and self.baseline_k >= 0,
               f"baseline_k must be an integer >= 0, got {self.baseline_k!r}")
        require(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir must be a non-empty path")
        if self.task.name == PLANTED_TASK:
            require(self.model.path is None and self.model.llama2c is None,
                   "task.name 'planted' builds its own teacher model; unset model.path / model.llama2c, "
                   "or name a real task (e.g. task.name=piqa)")
        else:
            require(self.model.path is not None or self.model.llama2c is not None,
                   f"task.name {self.task.name!r} needs a base model: set model.path (HF directory or hub id) "
                   "or model.llama2c + model.tokenizer_model")

    @property
    def methods(self) -> tuple[str, ...]:
        """``method`` then ``compare``, without repeats."""
        return tuple(dict.fromkeys((self.method,) + tuple(self.compare)))


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
        raise ConfigError(f"{origin}: {where or 'the config'} must be a mapping of keys to values, "
                          f"got {type(data).__name__} {data!r}")
    fields = _section_fields(cls)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            hint = did_you_mean(str(key), fields, where + "." if where else "")
            raise ConfigError(f"{origin}: unknown key {path!r}{hint}; allowed keys"
                              f"{' under ' + repr(where) if where else ''}: {sorted(fields)}")
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


def load_config(path: str | Any | None = None, overrides: tuple[str, ...] | list[str] = (),
                base: Mapping[str, Any] | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from a YAML file plus ``--section.key=value`` overrides.

    The YAML is read with ``yaml.safe_load``; keys are checked against the dataclass tree (an unknown
    key names the allowed ones); values are decoded to the field types by draccus, which also parses
    the overrides (each value is YAML: ``--compare=[lora,flexora]``, ``--lora.rank_pattern={q_proj: 2}``).
    ``base`` is a dict applied before the file (used for defaults of a sub-command). A real task (any
    ``task.name`` but ``planted``) starts from :data:`PAPER_DEFAULTS` unless ``base`` is given: what the
    file and the overrides leave unset takes the paper's value, not the planted demo's.

    Raises:
      ConfigError: naming the file / key / value and what was expected.
    """
    config = _load(path, overrides, base)
    if base is None and config.task.name != PLANTED_TASK:
        config = _load(path, overrides, PAPER_DEFAULTS)
    return config


def _load(path: str | Any | None, overrides: tuple[str, ...] | list[str], base: Mapping[str, Any] | None) -> RunConfig:
    data: dict[str, Any] = {}
    origin = "command line"
    if base:
        _check_keys(RunConfig, base, "", "defaults")
    if path is not None:
        origin = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory; pass a YAML file to --config") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected "
                              "a YAML file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        loaded = {} if loaded is None else loaded
        _check_keys(RunConfig, loaded, "", origin)
        for key, value in _flatten(RunConfig, loaded):
            _check_value(key, value, origin)
        data = loaded
    # Every leaf of the default RunConfig first: draccus fills a section's missing keys from the
    # section class's own defaults, and RunConfig's sections have run-specific defaults.
    args: list[str] = []
    for source, mapping in (("defaults", config_to_dict(RunConfig())), ("defaults", base or {}), (origin, data)):
        for key, value in _flatten(RunConfig, mapping):
            args.append(f"--{key}={yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()}"
                        .removesuffix("\n..."))
    for arg in overrides:
        key, value = _parse_override(arg)
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
        raise ConfigError(f"{origin}: bad value for {key or 'the config'}: {detail}"
                          f"{_expected(key)}") from None


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
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of a dataclass's source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^\s+(\w+)\s*:\s*[^#]+?#\s*(.*)$", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            out[m.group(1)] = m.group(2).strip()
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
    lines += ["", "A real task (task.name other than 'planted') takes these defaults instead where they differ:"]
    lines += [f"  {section}.{k}: {v}" for section, values in PAPER_DEFAULTS.items() for k, v in values.items()]
    return "\n".join(lines)
