"""Model configs, batches and the identical torch (transformers + peft) model the runners compare against."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax.config import ALL_MODULES, LoraConfig, ModelConfig

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
    # GPU mode: a 1B-parameter LLaMA shape (TinyLlama-1.1B's), random init, bf16
    "llama_1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, dtype="bfloat16"),
    # seconds-long smoke mode (tests)
    "tiny": ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4),
}

#: Dense bf16 peak TFLOP/s (datasheets, no sparsity) by device-kind substring: the MFU denominator.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "TPU v4": 275.0, "TPU v5e": 197.0, "TPU v5p": 459.0}


def peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of a device kind (``jax.devices()[0].device_kind``); None when unknown (CPUs)."""
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def require_gpu(runner: str, torch_too: bool = False) -> None:
    """Stop ``runner --gpu`` with a clear message unless jax (and, with ``torch_too``, torch) sees a CUDA GPU."""
    backend = jax.default_backend()
    torch_ok = True
    if torch_too:
        import torch

        torch_ok = torch.cuda.is_available()
    if backend != "gpu" or not torch_ok:
        seen = f"jax's backend is {backend!r}" + (f", torch.cuda.is_available() is {torch_ok}" if torch_too else "")
        raise SystemExit(f"benchmarks.{runner} --gpu needs a CUDA GPU visible to jax"
                         f"{' and torch' if torch_too else ''}; {seen}")


def lora_step_flops_per_token(config: ModelConfig, seq: int) -> float:
    """Model FLOPs of one LoRA fine-tune step per token (the MFU numerator's convention).

    The frozen base needs no weight gradients, so its matmuls cost the forward (2 N) plus the
    input-gradient half of the backward (2 N): 4 N, N = the block and LM-head weights. Attention's
    ``q k^T`` and ``p v`` cost 4 L t d forward and twice that backward (all of q, k, v need gradients):
    12 L t d, counted over the full length as PaLM's MFU does. LoRA's rank-r matmuls are left out.
    """
    n = config.num_hidden_layers * sum(a * b for a, b in map(config.module_shape, ALL_MODULES))
    n += config.hidden_size * config.vocab_size
    return 4.0 * n + 12.0 * config.num_hidden_layers * seq * config.hidden_size


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

    from flexora_jax.models.hf import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(config, params, tmp)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    if lora is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_modules=list(lora.target_modules), use_dora=lora.use_dora))
    return model


def to_torch(batch: dict) -> dict:
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


def block(x: Any) -> Any:
    return jax.block_until_ready(x)
