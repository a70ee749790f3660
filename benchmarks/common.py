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
    "h256_l4": ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8
    ),
    "h768_l12": ModelConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12
    ),
    "h256_l32": ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=32, num_attention_heads=8
    ),
    # GPU mode: a 1B-parameter LLaMA shape (TinyLlama-1.1B's), random init, bf16
    "llama_1b": ModelConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        dtype="bfloat16",
    ),
    # seconds-long smoke mode (tests)
    "tiny": ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
}

#: Dense bf16 peak TFLOP/s per JAX device (datasheets, no sparsity) by ``device_kind`` substring: the MFU
#: denominator. The first match wins, so a longer name comes before its prefix ("H100 PCIe" before "H100",
#: "L40S" before "L40" before "L4", "A100" before "A10", "TPU v5 lite" = v5e before "TPU v5" = v5p).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v4": 275.0,
}


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
        raise SystemExit(
            f"benchmarks.{runner} --gpu needs a CUDA GPU visible to jax{' and torch' if torch_too else ''}; {seen}"
        )


def base_matmul_params(config: ModelConfig) -> int:
    """N: the weights of the base model's matmuls (every block's seven linear modules and the LM head)."""
    n = config.num_hidden_layers * sum(a * b for a, b in map(config.module_shape, ALL_MODULES))
    return n + config.hidden_size * config.vocab_size


def attention_flops_per_token(config: ModelConfig, seq: int) -> float:
    """Forward FLOPs of ``q k^T`` and ``p v`` per token, summed over layers, under the causal mask.

    A query at position i sees ``i + 1`` keys (at most ``sliding_window`` on the windowed layers), so each
    layer does ``2 x 2 x keys x q_dim`` FLOPs per query with ``keys`` the mean over positions: ``(t + 1) / 2``
    without a window. This counts the work a causal kernel cannot skip, not the masked half a dense
    implementation also computes (PaLM's ``12 L t d`` counts all ``t x t`` scores: up to ~2x higher).
    """
    pos = np.arange(1, seq + 1, dtype=np.float64)
    full = float(pos.mean())
    windowed = float(np.minimum(pos, config.sliding_window).mean()) if config.sliding_window else full
    n_windowed = 0
    if config.sliding_window:
        n_windowed = len(config.sliding_layers) if config.sliding_layers is not None else config.num_hidden_layers
    keys = (config.num_hidden_layers - n_windowed) * full + n_windowed * windowed
    return 4.0 * keys * config.num_attention_heads * config.head_dim


def lora_flops_per_token(config: ModelConfig, lora: LoraConfig, backward: bool = True) -> float:
    """LoRA's rank-r matmuls per token: ``x A`` and ``(x A) B``, 2 r (d_in + d_out) forward per adapted module;
    the backward doubles that twice over (input gradient and A / B's weight gradients): 6 r (d_in + d_out)."""
    layers = config.num_hidden_layers if lora.layers_to_transform is None else len(lora.layers_to_transform)
    per_layer = sum(2.0 * lora.r * sum(config.module_shape(m)) for m in lora.target_modules)
    return (3.0 if backward else 1.0) * layers * per_layer


def forward_flops_per_token(config: ModelConfig, seq: int, lora: LoraConfig | None = None) -> float:
    """Model FLOPs of a forward pass per token: 2 N + causal attention (+ LoRA's forward with ``lora``)."""
    extra = 0.0 if lora is None else lora_flops_per_token(config, lora, backward=False)
    return 2.0 * base_matmul_params(config) + attention_flops_per_token(config, seq) + extra


def lora_step_flops_per_token(config: ModelConfig, seq: int, lora: LoraConfig | None = None) -> float:
    """Model FLOPs of one LoRA fine-tune step per token (the numerator of every "share of peak" and MFU).

    The convention, written once: the frozen base needs no weight gradients, so its matmuls cost the
    forward 2 N plus the input-gradient half of the backward 2 N: **4 N** (N = :func:`base_matmul_params`).
    Attention's ``q k^T`` and ``p v`` cost A forward (:func:`attention_flops_per_token`, causal: the
    mean query sees (t + 1) / 2 keys) and 2 A backward (gradients of q, k and v): **3 A**. LoRA's matmuls
    (``lora``, default :data:`LORA`) add **6 r (d_in + d_out)** per adapted module (forward, input gradient,
    A / B gradients). Not counted: norms, RoPE, softmax, the loss, the optimizer (elementwise); the
    embedding lookup (a gather); and the input gradient the lowest layer does not need.
    """
    lora = LORA if lora is None else lora
    return (
        4.0 * base_matmul_params(config)
        + 3.0 * attention_flops_per_token(config, seq)
        + lora_flops_per_token(config, lora)
    )


#: LoRA r = 8 on q, v (PEFT's defaults for LLaMA; the pitfalls.md reference).
LORA = LoraConfig(r=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj"))


def describe(config: ModelConfig) -> dict[str, Any]:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "dtype",
        "scan_layers",
        "remat_layers",
    )
    return {k: getattr(config, k) for k in keys}


def random_batch(config: ModelConfig, batch: int, seq: int, seed: int = 0, k: int | None = None) -> dict:
    """A full (no padding) batch of random tokens; with ``k`` a stack of k batches on a leading axis."""
    rng = np.random.default_rng(seed)
    shape = (batch, seq) if k is None else (k, batch, seq)
    ids = rng.integers(0, config.vocab_size, shape, dtype=np.int32)
    return {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones(shape, jnp.int32),
        "loss_mask": jnp.ones(shape, jnp.float32),
    }


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

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=lora.r,
                lora_alpha=lora.lora_alpha,
                lora_dropout=lora.lora_dropout,
                target_modules=list(lora.target_modules),
                use_dora=lora.use_dora,
            ),
        )
    return model


def to_torch(batch: dict) -> dict:
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


def block(x: Any) -> Any:
    return jax.block_until_ready(x)
