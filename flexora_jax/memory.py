"""A memory planner: per-device bytes of the search step and the fine-tune step on a mesh.

Design: the persistent state is counted exactly, leaf by leaf, from the same partition rules the
sharded steps use (:func:`flexora_jax.sharding.partition_specs` on ``jax.eval_shape`` trees, so a
dimension that does not divide its mesh axis is counted replicated); the transient activations come
from a per-token model of what reverse mode keeps alive, with a few constants calibrated against
XLA's compiled memory analysis on CPU (``tests/test_memory.py`` checks the plan within 25%):

- params: the frozen base in the compute dtype, sharded over ``fsdp`` x ``model``;
- lora / optimizer: fp32 LoRA A/B and the optimizer moments (Adam/AdamW: 2 x LoRA), plus gates and
  their Adam state in the search;
- carries (search): reverse mode through the K-step inner ``lax.scan`` stores each step's input
  carry (LoRA + optimizer state): K copies;
- activations: what the backward pass of one forward keeps per layer and token (norm inputs, q/k/v,
  roped q/k, attention scores and probabilities in fp32, attention output, MLP gate/up/product, LoRA
  down-projections) plus the fp32 logits; the search differentiates through the inner gradient
  (second order), which keeps the residuals of a forward *and* a backward pass. Without remat of the
  inner scan body every one of the K steps keeps them; with remat one step's worth is alive at once.
  ``remat_layers`` on the model keeps only each block's input plus one block's residuals.

The batch dimension is split over ``data`` x ``fsdp``; heads, MLP width and vocab over ``model``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flexora_jax.config import LoraConfig, ModelConfig
from flexora_jax.errors import ConfigError
from flexora_jax.lora import init_lora
from flexora_jax.models.llama import abstract_params
from flexora_jax.models.losses import loss_chunk
from flexora_jax.sharding import AXES, axis_sizes, partition_specs

#: Calibrated against XLA's CPU memory analysis (tests/test_memory.py; hidden 96-128, 2-4 layers,
#: K = 2, remat; plan / XLA within 0.95-1.05 with the recomputing attention): the share of the per-token residual
#: model alive at the peak of a first-order backward pass, and what the second-order (hypergradient)
#: backward keeps per inner step: the forward residuals, the backward's residuals and their cotangents.
TRAIN_ACTIVATION_FACTOR = 0.83
SEARCH_ACTIVATION_FACTOR = 3.05
#: The same for ``unrolled_mode="mixed"``: the forward sweep keeps no activations (only each step's LoRA,
#: optimizer state and gradient), and one forward-over-reverse product at a time holds the forward residuals,
#: their tangents and the backward's (measured 29.3-30.6 MB against 47.6-52.1 MB in reverse mode, same test).
MIXED_SEARCH_ACTIVATION_FACTOR = 1.9

_ADAM = ("adam", "adamw")


def _sharded_bytes(tree: Any, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of an abstract pytree laid out by the partition rules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        specs = partition_specs(tree, sizes)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        n = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for axes in spec:
            for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
                n //= sizes[a]
        total += n
    return total


def _abstract(model_config: ModelConfig, lora_config: LoraConfig) -> tuple[Any, Any]:
    params = abstract_params(model_config)
    lora = jax.eval_shape(lambda: init_lora(model_config, lora_config, jax.random.key(0)))
    return params, lora


def _split(n: int, k: int) -> int:
    """``n`` split over ``k`` devices (replicated when it does not divide, as the partition rules do)."""
    return n // k if n % k == 0 else n


def activation_bytes(
    model_config: ModelConfig, lora_config: LoraConfig, sizes: Mapping[str, int], batch: int, seq: int
) -> dict[str, int]:
    """Per-device residuals of one forward pass kept for its backward: ``{"layers", "logits"}`` in bytes."""
    c = model_config
    model = sizes["model"]
    b = _split(batch, sizes["data"] * sizes["fsdp"])
    t = seq
    item = jnp.dtype(c.dtype).itemsize
    heads = _split(c.num_attention_heads, model)
    q, kv, f = _split(c.q_dim, model), _split(c.kv_dim, model), _split(c.intermediate_size, model)
    ranks = sum(lora_config.rank_for(m, 0) for m in lora_config.target_modules)
    per_token = item * (4 * c.hidden_size + 3 * q + 3 * kv + 4 * f) + 4 * ranks  # dtype residuals + fp32 LoRA
    per_token += 2 * 4 * heads * t  # attention scores and probabilities (fp32), [heads, t] per query token
    per_layer = b * t * per_token
    if c.remat_layers:  # each block keeps its input; one block's residuals are rebuilt at a time
        layers = c.num_hidden_layers * b * t * c.hidden_size * item + per_layer
    else:
        layers = c.num_hidden_layers * per_layer
    vocab = _split(c.vocab_size, model)
    chunk = loss_chunk(b, t, vocab)  # the chunked loss holds one chunk's fp32 logits at a time
    logits = 3 * b * chunk * vocab * 4 + b * t * c.hidden_size * 4  # a chunk's logits, log-softmax, cotangent + h
    return {"layers": int(layers), "logits": int(logits)}


def plan_memory(
    model_config: ModelConfig,
    lora_config: LoraConfig,
    mesh_shape: Mapping[str, int],
    inner_steps: int,
    batch: int,
    seq: int,
    remat: bool = True,
    dtype: str | None = None,
    inner_optimizer: str = "adamw",
    finetune_optimizer: str = "adamw",
    unrolled_mode: str = "mixed",
) -> dict[str, dict[str, int]]:
    """Per-device bytes of one search step and one fine-tune step.

    Args:
      model_config: the base model (``dtype`` overrides its compute dtype, e.g. "bfloat16").
      lora_config: the adapters (the search and the fine-tune are planned with the same LoRA).
      mesh_shape: ``{"data": .., "fsdp": .., "model": ..}`` (missing axes are 1).
      inner_steps: K, inner steps per search step.
      batch, seq: the *global* batch of one inner step / fine-tune step, and the sequence length.
      remat: the search's inner scan body is rematerialised (``SearchConfig.remat``; reverse mode only).
      unrolled_mode: ``SearchConfig.unrolled_mode``: "mixed" (the default search step) or "reverse".
      inner_optimizer, finetune_optimizer: "adamw" / "adam" (2 moments) or "sgd" (none).

    Returns:
      ``{"search": {...}, "finetune": {...}}``, each with ``params``, ``lora``, ``optimizer``,
      ``carries``, ``activations``, ``batch`` and ``total`` bytes per device.
    """
    if dtype is not None:
        model_config = dataclasses.replace(model_config, dtype=dtype)
    sizes = axis_sizes(dict(mesh_shape))
    unknown = set(mesh_shape) - set(AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axes {sorted(unknown)}; valid: {AXES}")
    params, lora = _abstract(model_config, lora_config)
    params_b = _sharded_bytes(params, sizes)
    lora_b = _sharded_bytes(lora, sizes)
    acts = activation_bytes(model_config, lora_config, sizes, batch, seq)
    act_fwd = acts["layers"] + acts["logits"]
    tokens_b = 3 * 4 * _split(batch, sizes["data"] * sizes["fsdp"]) * seq  # ids, attention and loss masks
    L = model_config.num_hidden_layers

    inner_opt = 2 * lora_b if inner_optimizer in _ADAM else 0
    gates = 3 * 4 * L  # layer gates + their Adam moments
    carry = lora_b + inner_opt
    if unrolled_mode not in ("mixed", "reverse"):
        raise ConfigError(f"unrolled_mode must be 'mixed' or 'reverse', got {unrolled_mode!r}")
    if unrolled_mode == "mixed":  # activations of one Hessian-vector product; each step's gradient is kept too
        search_act, carry = MIXED_SEARCH_ACTIVATION_FACTOR * act_fwd, carry + lora_b
    else:
        search_act = SEARCH_ACTIVATION_FACTOR * act_fwd * (1 if remat else inner_steps)
    search = {
        "params": params_b,
        "lora": lora_b + gates,
        "optimizer": inner_opt,
        "carries": inner_steps * carry,
        "activations": int(search_act),
        "batch": (inner_steps + 1) * tokens_b,
    }
    ft_opt = 2 * lora_b if finetune_optimizer in _ADAM else 0
    finetune = {
        "params": params_b,
        "lora": lora_b,
        "optimizer": ft_opt,
        "carries": 0,
        "activations": int(TRAIN_ACTIVATION_FACTOR * act_fwd) + 2 * lora_b,  # + gradients, updates
        "batch": tokens_b,
    }
    for plan in (search, finetune):
        plan["total"] = sum(plan.values())
    return {"search": search, "finetune": finetune}


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def memory_table(rows: list[dict[str, Any]] | Mapping[str, Any], hbm_gb: float | None = None) -> str:
    """A markdown table of plans: a :func:`plan_memory` result, or rows ``{"plan", "model", "slice", "mesh",
    "hbm_gb", "batch", "seq", "k"}`` (every key but ``plan`` optional).

    A step fits when its total is below 90% of ``hbm_gb`` (headroom for XLA's scratch and fragmentation);
    without ``hbm_gb`` the column reads "-".
    """
    if isinstance(rows, Mapping):
        if not {"search", "finetune"} <= set(rows):
            raise ConfigError(
                "memory_table takes plan_memory's result ({'search': ..., 'finetune': ...}) or a list "
                f"of rows with a 'plan' key; got a mapping with keys {sorted(rows)}"
            )
        rows = [{"plan": rows, "hbm_gb": hbm_gb}]
    lines = [
        "| model | hardware | mesh (data, fsdp, model) | batch x seq, K | step | params | LoRA + opt "
        "| K carries | activations | total GB / device | HBM GB | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mesh, hbm = r.get("mesh", {}), r.get("hbm_gb", hbm_gb)
        shape = f"({mesh.get('data', 1)}, {mesh.get('fsdp', 1)}, {mesh.get('model', 1)})"
        for step in ("search", "finetune"):
            p = r["plan"][step]
            fits = "-" if hbm is None else "yes" if p["total"] <= 0.9 * hbm * 1e9 else "no"
            lines.append(
                f"| {r.get('model', '-')} | {r.get('slice', '-')} | {shape} | {r.get('batch', '-')} x "
                f"{r.get('seq', '-')}, K={r.get('k', '-')} | {step} | {_gb(p['params'])} "
                f"| {_gb(p['lora'] + p['optimizer'])} | {_gb(p['carries'])} | {_gb(p['activations'])} "
                f"| {_gb(p['total'])} | {hbm if hbm is not None else '-'} | {fits} |"
            )
    return "\n".join(lines)


def planted_data_bytes(n_sequences: int, seq_len: int, vocab_size: int) -> int:
    """Host bytes the planted task takes while its data is built (:func:`flexora_jax.planted.make_planted_task`).

    Per token: the teacher's distribution over the vocabulary in float32 three times (the device result, its
    host copy, the split copies) plus the ids and masks (int32 / float32) twice; checked before anything is
    allocated, so ``task.planted.n_train=10**10`` is refused instead of aborting inside XLA.
    """
    return int(n_sequences) * int(seq_len) * (3 * 4 * int(vocab_size) + 2 * 12)
