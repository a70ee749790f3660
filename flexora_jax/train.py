"""The fine-tuning stage's pure pieces: a fresh LoRA on the selected layers / ranks, everything else frozen.

:func:`train_step` is a pure function ``(base, state, batch) -> (state, metrics)`` over any problem's loss
(:class:`flexora_jax.problem.Problem`), jitted by the driver with the state donated, so the LoRA and
optimizer buffers are updated in place. The optimizer is an optax chain (global-norm clip, AdamW with a
warm-up + cosine schedule) wrapped in ``optax.MultiSteps`` for gradient accumulation, or any optax
transformation; only LoRA leaves are ever seen by it. The loop is :mod:`flexora_jax.engine`'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexora_jax import signals
from flexora_jax.bilevel import ProblemLoss
from flexora_jax.config import FinetuneConfig, ModelConfig
from flexora_jax.data import Dataset, batches_in_order
from flexora_jax.errors import NumericsError
from flexora_jax.gates import Gates
from flexora_jax.lora import LoraParams
from flexora_jax.models.attention import stage_config
from flexora_jax.models.losses import lm_loss
from flexora_jax.validation import check_dataset, check_number


class TrainState(NamedTuple):
    """What the fine-tune step reads and writes (and a checkpoint holds): LoRA, optimizer state, step, key."""

    lora: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def total_steps(cfg: FinetuneConfig, n_examples: int) -> int:
    """Optimizer steps of a fine-tune over ``n_examples`` (epochs x batches / accumulation, capped)."""
    per_epoch = max(1, n_examples // cfg.batch_size)
    steps = max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


@functools.lru_cache(maxsize=64)
def make_optimizer(cfg: FinetuneConfig, steps: int) -> optax.GradientTransformation:
    """Clip -> AdamW/Adam/SGD with (warm-up +) cosine or constant lr, accumulated over ``grad_accum``.

    Cached: the same settings give the same transformation, hence the same compiled fine-tune step."""
    warmup = int(cfg.warmup_ratio * steps)
    if cfg.schedule == "cosine" and warmup > 0:
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(steps, warmup + 1), end_value=0.0)
    elif cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.lr, max(steps, 1))
    else:
        lr = cfg.lr
    if cfg.optimizer == "sgd":
        opt = optax.sgd(lr)
    elif cfg.optimizer == "adam":
        opt = optax.adam(lr)
    else:
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    if cfg.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum)
    return opt


def init_train_state(lora: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh training state over ``lora`` (copied: the jitted step donates its state).

    A decoder ``LoraParams`` gets its layout traced (:meth:`LoraParams.traced_layout`: one program for every
    selection of the same targets and ``r_max``) and the optimizer runs over its weights only.
    """
    if isinstance(lora, LoraParams):
        lora = lora.traced_layout()
        return TrainState(
            jax.tree.map(jnp.copy, lora), optimizer.init(lora.weights), jnp.zeros((), jnp.int32), jax.random.key(seed)
        )
    lora = jax.tree.map(jnp.copy, lora)
    return TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32), jax.random.key(seed))


def train_step(
    loss: ProblemLoss, optimizer: optax.GradientTransformation, dropout: bool = False
) -> Callable[..., tuple[TrainState, dict]]:
    """The pure fine-tune step ``(base, state, batch) -> (state, {"loss", "grad_norm"})`` of any problem.

    ``loss(base, lora, hyper, batch, key)`` is the problem's (hyper None: the model's own frozen gates),
    ``key`` a fresh dropout key per step when ``dropout``. Cached on its arguments: one function, hence one
    compiled program, for every fine-tune of the same problem loss and optimizer.
    """
    return _train_step(loss, optimizer, dropout)


@functools.lru_cache(maxsize=64)
def _train_step(
    loss: ProblemLoss, optimizer: optax.GradientTransformation, dropout: bool
) -> Callable[..., tuple[TrainState, dict]]:
    def step(base: Any, state: TrainState, batch: Dataset) -> tuple[TrainState, dict]:
        rng, key = jax.random.split(state.rng)
        value, grads = jax.value_and_grad(lambda w: loss(base, w, None, batch, key if dropout else None))(state.lora)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        return TrainState(lora, opt_state, state.step + 1, rng), {"loss": value, "grad_norm": optax.tree.norm(grads)}

    return step


@functools.lru_cache(maxsize=32)
def make_train_step(config: ModelConfig, cfg: FinetuneConfig, steps: int) -> Callable[..., tuple[TrainState, dict]]:
    """The built-in decoder's fine-tune step ``(params, state, batch, gates=None) -> (state, {"loss", "grad_norm"})``
    over a :func:`init_train_state` of a ``LoraParams``: the functional convenience (``fj.finetune`` runs
    :func:`train_step` over :func:`flexora_jax.problem.decoder_problem`, the same computation).

    Jit it yourself (``jax.jit(step, donate_argnums=1)``). Cached on (model config, fine-tune config, steps).
    """
    optimizer = make_optimizer(cfg, steps)
    config = stage_config(config)  # a first-order stage: attention "auto" resolved (flash on CPU)

    def step(params: Any, state: TrainState, batch: Dataset, gates: Gates | None = None) -> tuple[TrainState, dict]:
        rng, drop = jax.random.split(state.rng)
        use_dropout = state.lora.spec.dropout > 0
        loss, grads = jax.value_and_grad(
            lambda w: lm_loss(
                config, params, state.lora.replace(weights=w), gates, batch, drop if use_dropout else None
            )
        )(state.lora.weights)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora.weights)
        lora = state.lora.replace(weights=optax.apply_updates(state.lora.weights, updates))
        return TrainState(lora, opt_state, state.step + 1, rng), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


@functools.lru_cache(maxsize=32)
def make_eval_loss(config: ModelConfig) -> Callable[..., jax.Array]:
    """Jitted ``(params, lora, gates, batch) -> (sum of token losses, token count)`` for exact means."""

    @jax.jit
    def eval_sums(params, lora, gates, batch):
        mask = batch["loss_mask"]
        loss = lm_loss(config, params, lora, gates, batch)
        n = jnp.sum(mask[:, 1:] if ("target_probs" not in batch and "labels" not in batch) else mask)
        return loss * n, n

    return eval_sums


def dataset_loss(
    config: ModelConfig,
    params: Any,
    lora: LoraParams | None,
    data: Dataset,
    batch_size: int = 64,
    gates: Gates | None = None,
) -> float:
    """Mean per-token loss of ``lora`` (or the base, ``lora=None``) over a whole dataset (its token ids
    checked against the vocabulary first: an id past the embedding would read as a NaN loss)."""
    check_number(batch_size, "dataset_loss: batch_size", lo=1, integer=True)
    check_dataset(data, "dataset_loss: data", config.vocab_size, loss_mask_required=False)
    fn = make_eval_loss(config)
    total, count = 0.0, 0.0
    for batch in batches_in_order(data, batch_size):
        signals.check("while computing a dataset loss")  # a safe point between batches
        s, n = fn(params, lora, gates, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def check_finite(value: float, what: str, step: int) -> None:
    if not np.isfinite(value):
        raise NumericsError(
            f"{what} is {value} at step {step}: stopping (lower the learning rate, enable "
            "gradient clipping, or check the data for empty targets)"
        )
