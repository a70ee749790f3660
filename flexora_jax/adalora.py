"""AdaLoRA (arXiv 2303.10512) with PEFT 0.21's field names and ``RankAllocator`` rules.

Adapter (SVD form) per adapted module and block: ``dW = P diag(Lambda) Q * lora_alpha / (ranknum + 1e-5)``;
stored stacked over the L blocks like LoRA: ``{"a": [L, d_in, init_r] (P), "e": [L, init_r] (Lambda),
"b": [L, init_r, d_out] (Q)}`` (PEFT's ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r), transposed).

Allocator (PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``), called once per step after the
gradient: for every parameter, sensitivity ``I = |p * grad p|``, smoothed ``Ibar = beta1 Ibar + (1 - beta1) I``
and uncertainty ``U = beta2 U + (1 - beta2) |I - Ibar|``; a triplet's score is ``s(E_i) + mean_in s(A_i) +
mean_out s(B_i)`` with ``s = Ibar * U``. The budget (total rank) follows the cubic schedule from
``init_r * n`` to ``target_r * n`` between ``tinit`` and ``total_step - tfinal``; every ``deltaT`` steps of that
phase the triplets whose score is at most the ``(init_bgt - budget)``-th smallest get Lambda zeroed. At
``total_step - tfinal`` the final mask is taken (budget ``target_r * n``) and kept for the rest of training.
The orthogonality regulariser is PEFT's: the mean over P and Q matrices of ``||P^T P - I||_F`` /
``||Q Q^T - I||_F``, times ``orth_reg_weight``, added to the loss.

PEFT's AdaLoRA forward is ``x A^T (E * scaling / (ranknum + 1e-5)) B^T`` with ``scaling = lora_alpha`` and
``ranknum = init_r``; :func:`to_lora` restates a (masked) AdaLoRA as a rank-pruned LoRA computing the same
function (kept components only, Lambda and the scale folded into B, ``rank_pattern`` per module path), which
runs in :func:`flexora_jax.forward` and exports with :func:`flexora_jax.adapters.export_peft`.

:func:`export_adalora` writes the AdaLoRA itself as a PEFT ``ADALORA`` adapter (all ``init_r`` components, the
pruned ones with Lambda = 0, ``rank_pattern`` null: PEFT's own layout before it resizes).

Training: :func:`make_adalora_step` is one jitted step (loss with the regulariser, gradient, AdamW, the EMA
of the allocator); the budget and the mask are host logic (:func:`allocate`), as in PEFT, and
:func:`flexora_jax.engine.finetune_adalora` runs the loop through the one driver (hooks, checkpoints, mesh).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from flexora_jax.config import LoraConfig, ModelConfig, module_path, require
from flexora_jax.fileio import write_bytes
from flexora_jax.lora import LoraParams, make_spec
from flexora_jax.models.hf import write_safetensors
from flexora_jax.models.losses import lm_loss

Weights = dict[str, dict[str, Any]]  # {module: {"a": [L, d_in, r], "e": [L, r], "b": [L, r, d_out]}}


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
    """PEFT's ``AdaLoraConfig`` fields that drive the allocator (``r`` is unused there too)."""

    target_r: int = 8  # target average rank per adapted matrix
    init_r: int = 12  # initial rank per adapted matrix
    tinit: int = 0  # warm-up steps without budget reduction
    tfinal: int = 0  # final steps with the budget fixed
    deltaT: int = 1  # steps between two masks during the budget phase
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality regulariser
    total_step: int | None = None  # total training steps (required)
    lora_alpha: float = 8.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        for name in ("target_r", "init_r", "deltaT"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"AdaLoraConfig.{name} must be an integer >= 1, got {v!r}")
        require(
            self.target_r <= self.init_r,
            f"AdaLoraConfig.target_r ({self.target_r}) must not exceed init_r "
            f"({self.init_r}): the allocator only removes rank",
        )
        require(
            isinstance(self.total_step, int) and self.total_step > 0,
            f"AdaLoraConfig.total_step must be a positive integer (the training length), got {self.total_step!r}",
        )
        require(self.tinit >= 0 and self.tfinal >= 0, "AdaLoraConfig.tinit / tfinal must be >= 0")
        require(
            self.tinit < self.total_step - self.tfinal,
            f"AdaLoraConfig: tinit ({self.tinit}) must be < total_step - tfinal ({self.total_step - self.tfinal}): "
            "no budget phase is left",
        )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            require(0.0 < v < 1.0, f"AdaLoraConfig.{name} must be in (0, 1), got {v!r}")
        require(self.orth_reg_weight >= 0, f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")


@struct.dataclass
class AllocatorState:
    """EMAs of sensitivity and uncertainty (same tree as the weights) and the kept-triplet mask."""

    exp_avg_ipt: Weights
    exp_avg_unc: Weights
    mask: dict[str, jax.Array] | None = None  # {module: [L, r] bool} of the last allocation


def init_allocator(weights: Weights) -> AllocatorState:
    """Zero EMAs (two separate buffers: a jitted step may donate both)."""
    return AllocatorState(
        exp_avg_ipt=jax.tree.map(jnp.zeros_like, weights), exp_avg_unc=jax.tree.map(jnp.zeros_like, weights)
    )


def budgets(config: AdaLoraConfig, num_matrices: int) -> tuple[int, int]:
    """(initial, target) total rank over the ``num_matrices`` adapted (module, block) pairs."""
    return config.init_r * num_matrices, config.target_r * num_matrices


def budget_schedule(config: AdaLoraConfig, step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """PEFT's cubic schedule: (budget, whether to mask at this step)."""
    if step <= config.tinit:
        return init_bgt, False
    if step > config.total_step - config.tfinal:
        return target_bgt, True
    mul = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % config.deltaT == 0


def update_ipt(config: AdaLoraConfig, state: AllocatorState, weights: Weights, grads: Weights) -> AllocatorState:
    """One EMA step of the sensitivity ``|p * g|`` and its uncertainty."""
    ipt = jax.tree.map(lambda p, g: jnp.abs(p * g), weights, grads)
    avg = jax.tree.map(lambda s, i: config.beta1 * s + (1 - config.beta1) * i, state.exp_avg_ipt, ipt)
    unc = jax.tree.map(
        lambda u, i, s: config.beta2 * u + (1 - config.beta2) * jnp.abs(i - s), state.exp_avg_unc, ipt, avg
    )
    return state.replace(exp_avg_ipt=avg, exp_avg_unc=unc)


def triplet_scores(state: AllocatorState) -> dict[str, np.ndarray]:
    """Score [L, r] of every (Lambda_i, P_i, Q_i) triplet: s(E_i) + mean_in s(P_i) + mean_out s(Q_i)."""
    out = {}
    for m, avg in state.exp_avg_ipt.items():
        s = {k: np.asarray(avg[k]) * np.asarray(state.exp_avg_unc[m][k]) for k in ("a", "e", "b")}
        out[m] = s["e"] + (s["a"].mean(axis=1) + s["b"].mean(axis=2))
    return out


def mask_to_budget(state: AllocatorState, budget: int, init_bgt: int, layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Kept triplets {module: [L, r] bool}: scores above the ``(init_bgt - budget)``-th smallest (adapted blocks)."""
    scores = triplet_scores(state)
    pool = np.concatenate([scores[m][list(layers)].ravel() for m in scores])
    k = init_bgt - budget
    threshold = -np.inf if k <= 0 else np.partition(pool, k - 1)[k - 1]
    return {m: s > threshold for m, s in scores.items()}


def update_and_allocate(
    config: AdaLoraConfig, state: AllocatorState, weights: Weights, grads: Weights, step: int, layers: tuple[int, ...]
) -> tuple[AllocatorState, Weights]:
    """PEFT's ``AdaLoraModel.update_and_allocate`` at ``step``: the new state and the (masked) weights."""
    tracked = update_ipt(config, state, weights, grads) if step < config.total_step - config.tfinal else state
    return allocate(config, state, tracked, weights, step, layers)


def allocate(
    config: AdaLoraConfig,
    state: AllocatorState,
    tracked: AllocatorState,
    weights: Weights,
    step: int,
    layers: tuple[int, ...],
) -> tuple[AllocatorState, Weights]:
    """The host half of :func:`update_and_allocate`, given ``tracked`` = ``update_ipt`` of ``state`` at this step
    (computed inside the jitted step; used only before the final phase, as PEFT does)."""
    init_bgt, target_bgt = budgets(config, len(weights) * len(layers))
    final = config.total_step - config.tfinal
    mask = None
    if step < final:
        state = tracked
        budget, due = budget_schedule(config, step, init_bgt, target_bgt)
        if due:
            mask = mask_to_budget(state, budget, init_bgt, layers)
    elif step == final:
        mask = mask_to_budget(state, budget_schedule(config, step, init_bgt, target_bgt)[0], init_bgt, layers)
        state = init_allocator(weights)
    else:
        mask = state.mask
    if mask is None:
        return state, weights
    masked = {m: {**w, "e": w["e"] * jnp.asarray(mask[m], w["e"].dtype)} for m, w in weights.items()}
    return state.replace(mask={m: jnp.asarray(v) for m, v in mask.items()}), masked


def orth_regularizer(weights: Weights, layers: tuple[int, ...]) -> jax.Array:
    """PEFT's regulariser (unweighted): mean over P, Q matrices of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``."""
    terms = []
    for w in weights.values():
        a, b = w["a"][jnp.asarray(layers)], w["b"][jnp.asarray(layers)]
        eye = jnp.eye(a.shape[-1], dtype=a.dtype)
        terms.append(jnp.sqrt(jnp.sum((jnp.einsum("ldr,lds->lrs", a, a) - eye) ** 2, axis=(1, 2))))
        terms.append(jnp.sqrt(jnp.sum((jnp.einsum("lrf,lsf->lrs", b, b) - eye) ** 2, axis=(1, 2))))
    return jnp.mean(jnp.concatenate(terms))


def to_lora(model_config: ModelConfig, config: AdaLoraConfig, weights: Weights, layers: tuple[int, ...]) -> LoraParams:
    """The rank-pruned LoRA equal to the AdaLoRA ``weights`` (components with Lambda = 0 are dropped)."""
    scale = (config.lora_alpha if config.lora_alpha > 0 else config.init_r) / (config.init_r + 1e-5)
    e = {m: np.asarray(w["e"], np.float32) for m, w in weights.items()}
    kept = {(m, i): np.flatnonzero(e[m][i]) for m in weights for i in layers}
    r0 = config.init_r
    lora_config = LoraConfig(
        r=r0,
        lora_alpha=float(r0),
        target_modules=tuple(weights),
        layers_to_transform=tuple(layers),
        rank_pattern={module_path(m, i): len(k) for (m, i), k in kept.items() if len(k) != r0},
        alpha_pattern={module_path(m, i): float(len(k)) for (m, i), k in kept.items() if 0 < len(k) != r0},
        init_lora_weights=False,
    )
    spec = make_spec(model_config, lora_config)
    out = {}
    for m, w in weights.items():
        a_in, b_in = np.asarray(w["a"], np.float32), np.asarray(w["b"], np.float32)
        r_max = spec.r_max_of(m)
        a = np.zeros(a_in.shape[:2] + (r_max,), np.float32)
        b = np.zeros((a_in.shape[0], r_max, b_in.shape[2]), np.float32)
        for i in layers:
            k = kept[(m, i)]
            a[i, :, : len(k)] = a_in[i][:, k]
            b[i, : len(k), :] = b_in[i][k, :] * (e[m][i][k] * scale)[:, None]
        out[m] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    return LoraParams(weights=out, spec=spec)


def export_adalora(
    config: AdaLoraConfig, weights: Weights, layers: tuple[int, ...], num_layers: int, out_dir: str | os.PathLike
) -> Path:
    """Write ``weights`` as a PEFT AdaLoRA adapter directory (``peft.PeftModel.from_pretrained`` loads it)."""
    tensors = {}
    for m, w in weights.items():
        a, e, b = (np.asarray(w[k], np.float32) for k in ("a", "e", "b"))
        for i in layers:
            key = f"base_model.model.{module_path(m, i)}.lora_"
            tensors[key + "A"] = np.ascontiguousarray(a[i].T)  # (r, in)
            tensors[key + "E"] = np.ascontiguousarray(e[i][:, None])  # (r, 1)
            tensors[key + "B"] = np.ascontiguousarray(b[i].T)  # (out, r)
    fields = {
        k: getattr(config, k)
        for k in (
            "target_r",
            "init_r",
            "tinit",
            "tfinal",
            "deltaT",
            "beta1",
            "beta2",
            "orth_reg_weight",
            "total_step",
            "lora_alpha",
        )
    }
    meta = {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(weights),
        "rank_pattern": None,
        "inference_mode": True,
        "layers_to_transform": None if tuple(layers) == tuple(range(num_layers)) else list(layers),
        **fields,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors)
    write_bytes(out / "adapter_config.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def init_adalora(model_config: ModelConfig, config: AdaLoraConfig, key: jax.Array) -> Weights:
    """PEFT's initialisation: P, Q ~ N(0, 0.02), Lambda = 0 (the adapted model starts as the base)."""
    out = {}
    for n, m in enumerate(config.target_modules):
        d_in, d_out = model_config.module_shape(m)
        L, r = model_config.num_hidden_layers, config.init_r
        ka, kb = jax.random.split(jax.random.fold_in(key, n))
        out[m] = {
            "a": 0.02 * jax.random.normal(ka, (L, d_in, r), jnp.float32),
            "e": jnp.zeros((L, r), jnp.float32),
            "b": 0.02 * jax.random.normal(kb, (L, r, d_out), jnp.float32),
        }
    return out


def as_lora(model_config: ModelConfig, config: AdaLoraConfig, weights: Weights, layers: tuple[int, ...]) -> LoraParams:
    """The AdaLoRA as LoRA params (differentiable): a = P, b = Lambda * Q, scale lora_alpha / (init_r + 1e-5)."""
    r = config.init_r
    scale = (config.lora_alpha if config.lora_alpha > 0 else r) / (r + 1e-5)
    spec = make_spec(
        model_config,
        LoraConfig(
            r=r,
            lora_alpha=scale * r,
            target_modules=tuple(weights),
            layers_to_transform=tuple(layers),
            init_lora_weights=False,
        ),
    )
    return LoraParams(
        weights={m: {"a": w["a"], "b": w["e"][..., None] * w["b"]} for m, w in weights.items()}, spec=spec
    )


def make_adalora_step(
    model_config: ModelConfig, config: AdaLoraConfig, layers: tuple[int, ...], optimizer: optax.GradientTransformation
) -> Any:
    """``(params, weights, opt_state, allocator, batch) -> (loss, weights, opt_state, tracked)``, one program.

    The task loss plus ``orth_reg_weight`` x the regulariser, its gradient, the optimizer step, and
    ``tracked`` = :func:`update_ipt` on the new weights and this gradient (what :func:`allocate` needs).
    The allocator's mask (None until the first allocation) stays on the host side, so the jitted part
    (``step.jitted``, over a mask-free allocator state) compiles once.
    """

    @jax.jit
    def jitted(params: Any, w: Weights, opt_state: Any, alloc: AllocatorState, batch: dict):
        def loss(w):
            task = lm_loss(model_config, params, as_lora(model_config, config, w, layers), None, batch)
            return task + config.orth_reg_weight * orth_regularizer(w, layers)

        value, grads = jax.value_and_grad(loss)(w)
        updates, opt_state = optimizer.update(grads, opt_state, w)
        w = optax.apply_updates(w, updates)
        return value, w, opt_state, update_ipt(config, alloc, w, grads)

    def step(params: Any, w: Weights, opt_state: Any, alloc: AllocatorState, batch: dict):
        loss, w, opt_state, tracked = jitted(params, w, opt_state, alloc.replace(mask=None), batch)
        return loss, w, opt_state, tracked.replace(mask=alloc.mask)

    step.jitted = jitted
    return step


def __getattr__(name: str) -> object:
    if name == "finetune_adalora":  # the hand-built loop before the one engine
        raise AttributeError(
            "flexora_jax.adalora.finetune_adalora was replaced by the engine's driver: use "
            "fj.finetune_adalora(model, data, adalora_config, ...) (checkpoints, mesh and hooks included)"
        )
    raise AttributeError(f"module 'flexora_jax.adalora' has no attribute {name!r}")
