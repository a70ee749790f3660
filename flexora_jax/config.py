"""Typed, frozen configs of the library: model, LoRA, search, selection, fine-tune, evaluation, mesh.

All configs are frozen dataclasses: hashable, so a ``ModelConfig`` can be a static argument of
``jax.jit``; validated in ``__post_init__`` so a bad value fails where it is written, with a message
that names the field and what was expected. The model and LoRA configs live in
:mod:`flexora_jax.model_config` (re-exported here); the command's run sections and the YAML loader are in
:mod:`flexora_jax.pipeline.config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from flexora_jax.errors import ConfigError
from flexora_jax.model_config import (
    ALL_MODULES,
    ATTENTION_BACKENDS,
    ATTENTION_MODULES,
    DTYPES,
    EXPERT_MODULES,
    FUSED_MODULES,
    GEMMA_TYPES,
    HIDDEN_ACTS,
    LORA_MODULES,
    MLP_MODULES,
    ROPE_TYPES,
    SANDWICH_TYPES,
    SUPPORTED_MODEL_TYPES,
    FrozenDict,
    LoraConfig,
    ModelConfig,
    RopeScaling,
    module_path,
    require,
)
from flexora_jax.validation import check_fields

__all__ = [
    "ALL_MODULES",
    "ATTENTION_BACKENDS",
    "ATTENTION_MODULES",
    "DTYPES",
    "EXPERT_MODULES",
    "FUSED_MODULES",
    "GEMMA_TYPES",
    "HIDDEN_ACTS",
    "LORA_MODULES",
    "MLP_MODULES",
    "ROPE_TYPES",
    "SANDWICH_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "FrozenDict",
    "LoraConfig",
    "ModelConfig",
    "RopeScaling",
    "module_path",
    "require",
    "HYPERGRADIENTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "SELECTION_RULES",
    "MESH_AXES",
    "SearchConfig",
    "SelectionConfig",
    "FinetuneConfig",
    "EvalConfig",
    "MeshConfig",
    "PRESETS",
    "PRESET_SECTIONS",
    "preset",
]


HYPERGRADIENTS = ("unrolled", "first_order", "darts", "forward")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")
SELECTION_RULES = ("positive", "top_k", "threshold")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The bilevel search: K inner LoRA steps on train data, one gate step on validation data.

    Defaults follow the planted-task regime that recovers planted layers on CPU; the papers' settings are
    the presets (:data:`PRESETS`): :meth:`flexora_reference` and :meth:`autolora_reference`.
    """

    hypergradient: str = "unrolled"  # unrolled | first_order | darts | forward (jvp, few gates)
    inner_steps: int = 4  # K, inner optimizer steps per search step
    steps: int = 40  # outer (gate) steps
    batch_size: int = 16  # training examples per inner step
    val_batch_size: int = 16  # validation examples per outer step
    inner_optimizer: str = "adamw"  # adamw | adam | sgd (any optax transform through the API)
    inner_lr: float = 3e-3  # learning rate of the inner (LoRA) optimizer
    inner_schedule: str = "constant"  # constant | cosine (over steps * inner_steps)
    inner_weight_decay: float = 0.0  # AdamW weight decay of the inner optimizer
    inner_eps_root: float = 1e-16  # > 0 so the hypergradient through Adam is finite with B = 0
    inner_grad_clip: float = 0.0  # global-norm clip of inner gradients; 0 = off
    reset_inner_optimizer: bool = False  # reference-code quirk: fresh inner optimizer state each step
    outer_lr: float = 0.01  # Adam on the raw gates
    outer_b1: float = 0.9  # Adam beta1 of the gate optimizer, in [0, 1)
    outer_b2: float = 0.999  # Adam beta2 of the gate optimizer, in [0, 1)
    gate_power: int = 1  # layer gate exponent: 1, or 3 as in the reference code
    remat: bool = True  # jax.checkpoint the inner scan body (memory flat in K; unrolled_mode "reverse" only)
    unrolled_mode: str = "mixed"  # mixed (forward-over-reverse HVPs) | reverse (to differentiate the hypergradient)
    darts_mode: str = "exact"  # exact (jvp mixed Hessian-vector product) | finite_difference
    darts_redo_inner: bool = True  # AutoLoRA: redo the inner step with the updated gates
    log_every: int = 1  # log every N search steps

    def __post_init__(self) -> None:
        check_fields(self, "search")
        require(
            self.hypergradient in HYPERGRADIENTS,
            f"search.hypergradient must be one of {HYPERGRADIENTS}, got {self.hypergradient!r}",
        )
        for name in ("inner_steps", "steps", "batch_size", "val_batch_size", "log_every"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"search.{name} must be an integer >= 1, got {v!r}")
        require(
            self.inner_optimizer in OPTIMIZERS,
            f"search.inner_optimizer must be one of {OPTIMIZERS}, got {self.inner_optimizer!r}",
        )
        require(
            self.inner_schedule in SCHEDULES,
            f"search.inner_schedule must be one of {SCHEDULES}, got {self.inner_schedule!r}",
        )
        for name in ("inner_lr", "outer_lr"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and 0 < v < 10, f"search.{name} must be in (0, 10), got {v!r}")
        require(self.inner_eps_root >= 0, f"search.inner_eps_root must be >= 0, got {self.inner_eps_root}")
        for name in ("outer_b1", "outer_b2"):  # Adam's decay rates: 1.0 divides by zero in the bias correction
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and 0 <= v < 1, f"search.{name} must be in [0, 1), got {v!r}")
        for name in ("inner_weight_decay", "inner_grad_clip"):
            v = getattr(self, name)
            require(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                f"search.{name} must be a finite number >= 0, got {v!r}",
            )
        require(self.gate_power in (1, 3), f"search.gate_power must be 1 or 3, got {self.gate_power!r}")
        require(
            self.unrolled_mode in ("mixed", "reverse"),
            f"search.unrolled_mode must be 'mixed' or 'reverse', got {self.unrolled_mode!r}",
        )
        require(
            self.darts_mode in ("exact", "finite_difference"),
            f"search.darts_mode must be 'exact' or 'finite_difference', got {self.darts_mode!r}",
        )

    @classmethod
    def flexora_reference(cls, **overrides: Any) -> SearchConfig:
        """The Flexora reference code's settings (first-order, AdamW 1e-4 cosine, batch 8, 600 steps, gate
        power 3): ``preset("flexora_paper", "search", **overrides)``."""
        return preset("flexora_paper", "search", **overrides)

    @classmethod
    def autolora_reference(cls, **overrides: Any) -> SearchConfig:
        """AutoLoRA's settings (DARTS one-step hypergradient, Adam 3e-4 both levels, outer betas 0.5 / 0.999,
        batch 32): ``preset("autolora_paper", "search", **overrides)``."""
        return preset("autolora_paper", "search", **overrides)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """How final gates become a discrete choice of layers (Flexora); ranks always use AutoLoRA's rule.

    The rules act on the gate value the model applies, ``w_l = (L * softmax(alpha)_l) ** gate_power``:
    ``positive`` keeps ``w_l > 1`` (alpha above the mean, the paper's rule), ``top_k`` the ``top_k``
    largest, ``threshold`` every ``w_l >= threshold``.
    """

    rule: str = "positive"  # positive | top_k | threshold
    top_k: int = 0  # layers kept by "top_k"
    threshold: float = 1.0  # gate value kept by "threshold" (w_l >= threshold)

    def __post_init__(self) -> None:
        check_fields(self, "selection")
        require(self.rule in SELECTION_RULES, f"selection.rule must be one of {SELECTION_RULES}, got {self.rule!r}")
        require(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"selection.top_k must be an integer >= 0, got {self.top_k!r}",
        )
        require(self.rule != "top_k" or self.top_k >= 1, "selection.rule 'top_k' needs selection.top_k >= 1")
        require(
            isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0,
            f"selection.threshold must be a finite gate value >= 0, got {self.threshold!r}",
        )


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning stage: a fresh LoRA on the selection, standard optax training loop."""

    epochs: float = 1.0  # passes over the training set (fractional allowed)
    max_steps: int = 0  # > 0 caps the number of optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (optax.MultiSteps)
    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # constant | cosine (with linear warm-up)
    warmup_ratio: float = 0.1  # fraction of the steps spent warming up linearly
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    optimizer: str = "adamw"  # adamw | adam | sgd
    eval_every: int = 0  # > 0: validation loss every N steps, best checkpoint kept
    keep_best: bool = False  # return the LoRA with the best validation loss

    def __post_init__(self) -> None:
        check_fields(self, "finetune")
        require(
            isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0,
            f"finetune.epochs must be a finite number > 0, got {self.epochs!r}",
        )
        for name in ("batch_size", "grad_accum"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"finetune.{name} must be an integer >= 1, got {v!r}")
        require(self.max_steps >= 0, f"finetune.max_steps must be >= 0, got {self.max_steps!r}")
        require(0 < self.lr < 10, f"finetune.lr must be in (0, 10), got {self.lr!r}")
        require(self.schedule in SCHEDULES, f"finetune.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        require(0 <= self.warmup_ratio < 1, f"finetune.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        require(self.optimizer in OPTIMIZERS, f"finetune.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.grad_clip >= 0, f"finetune.grad_clip must be >= 0, got {self.grad_clip!r}")
        require(
            isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"finetune.weight_decay must be a finite number >= 0, got {self.weight_decay!r}",
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation after fine-tuning."""

    batch_size: int = 32  # requests (or sequences) per jitted call
    limit: int = 0  # score only the first N test examples of each task; 0 = all
    base: bool = True  # also score the base model without LoRA
    question_control: bool = False  # also score every model with the question removed from the prompt

    def __post_init__(self) -> None:
        check_fields(self, "eval")
        require(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"eval.batch_size must be an integer >= 1, got {self.batch_size!r}",
        )
        require(isinstance(self.limit, int) and self.limit >= 0, f"eval.limit must be >= 0, got {self.limit!r}")


MESH_AXES = ("data", "fsdp", "model")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a run: axis sizes of ``(data, fsdp, model)``; one of them may be -1.

    -1 takes all the devices the other axes leave. The default puts every device on ``fsdp`` (on one
    device that is the plain single-device run). The sizes must multiply to the device count, checked
    by :meth:`resolve` once the devices are known (``jax.device_count()`` after
    ``jax.distributed.initialize()`` on a pod); ``num_devices`` > 0 builds the mesh over only the
    first ``num_devices`` devices (single-process only), e.g. a 1-device run on an 8-device host.
    """

    data: int = 1  # batch (pure data parallel: parameters replicated over it)
    fsdp: int = -1  # batch and parameters (ZeRO-3 style: params gathered per layer)
    model: int = 1  # tensor parallel (attention heads, MLP width, vocab)
    num_devices: int = 0  # use the first N devices; 0 = all of them (jax.device_count())

    def __post_init__(self) -> None:
        check_fields(self, "mesh")
        sizes = self.sizes
        bad = [
            f"mesh.{a}={v!r}"
            for a, v in zip(MESH_AXES, sizes)
            if not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1
        ]
        require(
            not bad,
            f"mesh: axis sizes must be positive integers or -1, got {', '.join(bad)} (sizes {self._sizes_text()})",
        )
        require(
            sizes.count(-1) <= 1,
            f"mesh: at most one axis may be -1, got {self._sizes_text()}; give the others explicit sizes",
        )
        require(
            isinstance(self.num_devices, int) and not isinstance(self.num_devices, bool) and self.num_devices >= 0,
            f"mesh.num_devices must be an integer >= 0 (0 = all devices), got {self.num_devices!r}",
        )

    @property
    def sizes(self) -> list[int]:
        return [self.data, self.fsdp, self.model]

    def _sizes_text(self) -> str:
        return ", ".join(f"{a}={v!r}" for a, v in zip(MESH_AXES, self.sizes))

    def resolve(self, n_devices: int | None = None) -> tuple[int, int, int]:
        """The concrete (data, fsdp, model) sizes for ``n_devices`` devices (default: the devices to use).

        ``n_devices`` defaults to ``num_devices`` or else ``jax.device_count()``. Raises
        :class:`ConfigError` naming the ``mesh`` keys, the sizes and the device count when they do not fit.
        """
        if n_devices is None:
            n_devices = self.devices_to_use()
        sizes = self.sizes
        known = math.prod(s for s in sizes if s != -1)
        where = f"mesh.num_devices={self.num_devices}" if self.num_devices else "jax.device_count()"
        if -1 in sizes:
            if n_devices % known:
                raise ConfigError(
                    f"mesh: sizes {self._sizes_text()} do not fit {n_devices} devices "
                    f"({where}): {n_devices} is not a multiple of {known}; set "
                    "mesh.data / mesh.fsdp / mesh.model so they multiply to the device count"
                )
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ConfigError(
                f"mesh: sizes {self._sizes_text()} multiply to {math.prod(sizes)}: the mesh "
                f"needs {math.prod(sizes)} devices, but {n_devices} are available ({where}); set "
                "mesh.data / mesh.fsdp / mesh.model "
                "so they multiply to the device count (use -1 for one axis to take the rest)"
            )
        return tuple(sizes)  # type: ignore[return-value]

    def devices_to_use(self) -> int:
        """``num_devices`` (checked against ``jax.device_count()``) or all devices."""
        available = jax.device_count()
        if not self.num_devices:
            return available
        if self.num_devices > available:
            raise ConfigError(
                f"mesh.num_devices={self.num_devices} exceeds the {available} available devices "
                "(jax.device_count()); expected 0 (all) or at most that many"
            )
        if self.num_devices != available and jax.process_count() > 1:
            raise ConfigError(
                f"mesh.num_devices={self.num_devices}: a subset of the {available} devices "
                f"cannot be used across {jax.process_count()} processes; set it to 0 (all)"
            )
        return self.num_devices


def _frozen(tree: dict[str, Any]) -> FrozenDict:
    return FrozenDict({k: _frozen(v) if isinstance(v, dict) else v for k, v in tree.items()})


#: Named settings, each stated once: ``{preset: {section: {field: value}}}`` over the section classes'
#: defaults (sections ``lora``, ``search``, ``finetune``). :func:`preset` builds one section; the command's
#: run config starts from ``planted_demo`` and, for a real task, from ``flexora_paper``.
#:
#: - ``flexora_paper``: the Flexora paper's / reference code's settings: LoRA r 8 / alpha 16 on q, v; the
#:   first-order search, AdamW 1e-4 cosine, batch 8, 600 gate steps, gate power 3; fine-tune 3 epochs,
#:   lr 1e-4 cosine with 10% warm-up, batch 8, clip 1.0.
#: - ``autolora_paper``: AutoLoRA's search: DARTS one-step hypergradient, Adam 3e-4 at both levels, outer betas
#:   0.5 / 0.999, batch 32.
#: - ``planted_demo``: the embedded planted demo (a 6-layer student, scarce fine-tune data): LoRA r 4 / alpha 4
#:   on q, v; the search at the SearchConfig defaults (unrolled K = 4, 40 steps); a long cosine fine-tune at
#:   3e-3 without warm-up or clipping.
PRESETS: FrozenDict = _frozen(
    {
        "flexora_paper": {
            "lora": {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": ("q_proj", "v_proj")},
            "search": {
                "hypergradient": "first_order",
                "inner_steps": 1,
                "steps": 600,
                "batch_size": 8,
                "val_batch_size": 8,
                "inner_optimizer": "adamw",
                "inner_lr": 1e-4,
                "inner_schedule": "cosine",
                "inner_grad_clip": 1.0,
                "outer_lr": 0.01,
                "gate_power": 3,
            },
            "finetune": {
                "epochs": 3.0,
                "max_steps": 0,
                "batch_size": 8,
                "lr": 1e-4,
                "schedule": "cosine",
                "warmup_ratio": 0.1,
                "grad_clip": 1.0,
                "optimizer": "adamw",
            },
        },
        "autolora_paper": {
            "search": {
                "hypergradient": "darts",
                "inner_steps": 1,
                "batch_size": 32,
                "val_batch_size": 32,
                "inner_optimizer": "adam",
                "inner_lr": 3e-4,
                "outer_lr": 3e-4,
                "outer_b1": 0.5,
                "outer_b2": 0.999,
            },
        },
        "planted_demo": {
            "lora": {"r": 4, "lora_alpha": 4.0, "target_modules": ("q_proj", "v_proj")},
            "search": {},
            "finetune": {
                "epochs": 32.0,
                "max_steps": 400,
                "batch_size": 16,
                "lr": 3e-3,
                "schedule": "cosine",
                "warmup_ratio": 0.0,
                "grad_clip": 0.0,
            },
        },
    }
)
PRESET_SECTIONS: dict[str, type] = {"lora": LoraConfig, "search": SearchConfig, "finetune": FinetuneConfig}


def preset(name: str, section: str, **overrides: Any) -> Any:
    """The ``section`` config ("lora", "search", "finetune") of preset ``name`` (:data:`PRESETS`): the section
    class's defaults, the preset's values, then ``overrides``; e.g. ``preset("flexora_paper", "search")``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    if section not in PRESET_SECTIONS:
        raise ConfigError(f"unknown preset section {section!r}; expected one of {sorted(PRESET_SECTIONS)}")
    return PRESET_SECTIONS[section](**{**PRESETS[name].get(section, {}), **overrides})


# Configs are hashable static pytrees (no leaves): a user may pass one through jax.jit as an ordinary
# argument, and it is part of the compiled program's key, not a traced value.
for _cls in (ModelConfig, LoraConfig, SearchConfig, SelectionConfig, FinetuneConfig, EvalConfig, MeshConfig):
    jax.tree_util.register_static(_cls)
