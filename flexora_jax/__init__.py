"""flexora_jax: find where an LLM should be fine-tuned with LoRA, then fine-tune it there.

The public API is flat: ``import flexora_jax as fj`` and use ``fj.forward``, ``fj.load_model``,
``fj.init_lora``, ``fj.init_gates``, ... Everything is a pure function over three pytrees: the frozen
base ``params``, the trained ``lora`` and the hyperparameter ``gates``.
"""

from flexora_jax.adapters import export_merged, export_peft, load_peft
from flexora_jax.bilevel import SearchState, hypergradient, init_search_state, make_search_step, unroll
from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig, RopeScaling, SearchConfig
from flexora_jax.errors import CheckpointError, ConfigError, DataError, FlexoraError, NumericsError
from flexora_jax.gates import Gates, gate_values, init_gates, layer_gate_values, rank_gate_values
from flexora_jax.lora import LoraParams, LoraSpec, count_params, delta_weights, init_lora, make_spec, merge, unmerge
from flexora_jax.search import SearchResult, search
from flexora_jax.selection import Selection, select, select_layers, select_ranks
from flexora_jax.train import dataset_loss, finetune
from flexora_jax.evaluation import evaluate, evaluate_generative
from flexora_jax.generation import GenerateOutput, generate
from flexora_jax.models import (causal_lm_loss, convert_llama2c, forward, init_params, load_config, load_model,
                                load_tokenizer, save_model, soft_lm_loss)

from flexora_jax import memory, sharding
from flexora_jax.pipeline import run, run_stage
from flexora_jax.config import RunConfig, load_config as load_run_config

__version__ = "0.1.0"
