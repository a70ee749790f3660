"""The LLaMA-style decoder and its checkpoint I/O."""

from flexora_jax.models.llama import causal_lm_loss, forward, init_params, soft_lm_loss
from flexora_jax.models.loading import (convert_llama2c, load_config, load_model, load_tokenizer,
                                        save_model)

__all__ = ["forward", "init_params", "causal_lm_loss", "soft_lm_loss", "load_model", "load_config",
           "load_tokenizer", "save_model", "convert_llama2c"]
