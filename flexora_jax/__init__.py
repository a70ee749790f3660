"""flexora_jax: find where an LLM should be fine-tuned with LoRA, then fine-tune it there.

The public API is flat: ``import flexora_jax as fj`` and use ``fj.forward``, ``fj.load_model``,
``fj.init_lora``, ``fj.init_gates``, ``fj.search``, ``fj.select``, ``fj.finetune``, ... Everything is a
pure function over three pytrees: the frozen base ``params``, the trained ``lora`` and the
hyperparameter ``gates``. ``fj.search`` / ``fj.finetune`` / ``fj.select`` take a model (any Flax NNX model with
LoRA, ``fj.nnx.LlamaForCausalLM``) or a ``fj.Problem`` and run it through one engine. Submodules for the rest:
``fj.sharding`` (meshes, placement), ``fj.loops`` (the driver), ``fj.hooks`` (checkpoints, validation, metric
writers), ``fj.signals``, ``fj.memory`` (the memory planner), ``fj.pipeline`` (what ``flexora-jax run`` does).
"""

import importlib
from typing import Any

from flexora_jax import hooks, loops, memory, nnx, sharding, signals
from flexora_jax.adapters import export_merged, export_peft, load_peft
from flexora_jax.bilevel import SearchState, hypergradient, init_search_state, make_search_step, search_step, unroll
from flexora_jax.config import (
    EvalConfig,
    FinetuneConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    RopeScaling,
    SearchConfig,
    SelectionConfig,
)
from flexora_jax.engine import Optimizer, SearchResult, finetune, finetune_adalora, search, select
from flexora_jax.errors import CheckpointError, ConfigError, DataError, FlexoraError, NumericsError
from flexora_jax.gates import (
    Gates,
    GateValues,
    gate_values,
    init_gates,
    layer_gate_values,
    multipliers,
    rank_gate_values,
)
from flexora_jax.generation import GenerateOutput, generate
from flexora_jax.lora import LoraParams, LoraSpec, count_params, delta_weights, init_lora, make_spec, merge, unmerge
from flexora_jax.models import (
    causal_lm_loss,
    config_from_hf,
    config_to_hf,
    convert_llama2c,
    forward,
    init_params,
    labels_lm_loss,
    lm_loss,
    load_model,
    load_model_config,
    load_tokenizer,
    save_model,
    soft_lm_loss,
)
from flexora_jax.problem import HyperLayout, Problem, decoder_problem
from flexora_jax.selection import Selection, select_layers, select_lora, select_ranks
from flexora_jax.train import TrainState, dataset_loss, init_train_state, make_train_step, train_step

__version__ = "0.1.0"

#: Imported on first use: the data and command layers bring in ``datasets`` and ``draccus``, which the
#: model, LoRA, search and fine-tune code does not need (a benchmark on a bare accelerator image, say).
_LAZY = {
    "evaluate": ("flexora_jax.evaluation", "evaluate"),
    "evaluate_generative": ("flexora_jax.evaluation", "evaluate_generative"),
    "sft_arrays": ("flexora_jax.tasks.sft", "sft_arrays"),
    "tasks": ("flexora_jax.tasks", None),
    "pipeline": ("flexora_jax.pipeline", None),
    "RunConfig": ("flexora_jax.pipeline", "RunConfig"),
    "RunResult": ("flexora_jax.pipeline", "RunResult"),
    "run": ("flexora_jax.pipeline", "run"),
    "run_stage": ("flexora_jax.pipeline", "run_stage"),
    "load_run_config": ("flexora_jax.pipeline", "load_config"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'flexora_jax' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    # the model and its checkpoints
    "ModelConfig",
    "RopeScaling",
    "forward",
    "init_params",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "save_model",
    "convert_llama2c",
    "config_from_hf",
    "config_to_hf",
    "lm_loss",
    "causal_lm_loss",
    "soft_lm_loss",
    "labels_lm_loss",
    # LoRA, gates, adapters
    "LoraConfig",
    "LoraParams",
    "LoraSpec",
    "init_lora",
    "make_spec",
    "count_params",
    "delta_weights",
    "merge",
    "unmerge",
    "Gates",
    "GateValues",
    "init_gates",
    "multipliers",
    "gate_values",
    "layer_gate_values",
    "rank_gate_values",
    "export_peft",
    "load_peft",
    "export_merged",
    # the engine: a problem, the drivers' entry points, the pure steps
    "Problem",
    "HyperLayout",
    "decoder_problem",
    "Optimizer",
    "search",
    "finetune",
    "finetune_adalora",
    "select",
    "SearchConfig",
    "SearchState",
    "SearchResult",
    "init_search_state",
    "search_step",
    "make_search_step",
    "hypergradient",
    "unroll",
    "SelectionConfig",
    "Selection",
    "select_lora",
    "select_layers",
    "select_ranks",
    "FinetuneConfig",
    "TrainState",
    "init_train_state",
    "train_step",
    "make_train_step",
    "dataset_loss",
    # data, evaluation and generation
    "sft_arrays",
    "EvalConfig",
    "evaluate",
    "evaluate_generative",
    "GenerateOutput",
    "generate",
    # scale-out and the command
    "MeshConfig",
    "RunConfig",
    "RunResult",
    "run",
    "run_stage",
    "load_run_config",
    # errors
    "FlexoraError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "NumericsError",
    # submodules
    "hooks",
    "loops",
    "memory",
    "nnx",
    "pipeline",
    "sharding",
    "signals",
    "tasks",
]
