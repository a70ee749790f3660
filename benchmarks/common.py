"""Model configs, batches and the identical torch (transformers + peft) model the runners compare against."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax.config import LoraConfig, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The benchmark models. vocab 512 is the llama2.c TinyStories tokenizer (the pitfalls.md reference
#: 177 ms/step uses a small vocab); the 768/12 config is GPT-2-small sized with a LLaMA-sized vocab.
MODELS: dict[str, ModelConfig] = {
    "h256_l4": ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=8),
    "h768_l12": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=12),
    "h256_l32": ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=32,
                            num_attention_heads=8),
    # seconds-long smoke mode (tests)
    "tiny": ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4),
}

#: LoRA r = 8 on q, v (PEFT's defaults for LLaMA; the pitfalls.md reference).
LORA = LoraConfig(r=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj"))


def describe(config: ModelConfig) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "dtype", "scan_layers", "remat_layers")
    return {k: getattr(config, k) for k in keys}


def random_batch(config: ModelConfig, batch: int, seq: int, seed: int = 0, k: int | None = None) -> dict:
    """A full (no padding) batch of random tokens; with ``k`` a stack of k batches on a leading axis."""
    rng = np.random.default_rng(seed)
    shape = (batch, seq) if k is None else (k, batch, seq)
    ids = rng.integers(0, config.vocab_size, shape, dtype=np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(shape, jnp.int32),
            "loss_mask": jnp.ones(shape, jnp.float32)}


def torch_model(config: ModelConfig, params: Any, lora: LoraConfig | None = None):
    """The same base weights as a ``transformers.LlamaForCausalLM`` (fp32), wrapped by peft when ``lora``."""
    import torch
    import transformers

    from flexora_jax.models.loading import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(config, params, tmp)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    if lora is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_modules=list(lora.target_modules)))
    return model


def to_torch(batch: dict) -> dict:
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


def block(x: Any) -> Any:
    return jax.block_until_ready(x)
