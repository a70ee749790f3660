"""The LLaMA-style decoder (``llama``), its attention core, losses, and checkpoint I/O (``hf``, ``llama2c``)."""

from flexora_jax.models.hf import (
    config_from_hf,
    config_to_hf,
    load_model,
    load_model_config,
    load_tokenizer,
    save_model,
)
from flexora_jax.models.llama import abstract_params, forward, init_params
from flexora_jax.models.llama2c import convert_llama2c
from flexora_jax.models.losses import causal_lm_loss, labels_lm_loss, lm_loss, soft_lm_loss

__all__ = [
    "forward",
    "init_params",
    "abstract_params",
    "causal_lm_loss",
    "soft_lm_loss",
    "labels_lm_loss",
    "lm_loss",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "save_model",
    "convert_llama2c",
    "config_from_hf",
    "config_to_hf",
]
