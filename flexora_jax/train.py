"""The fine-tuning stage: a fresh LoRA on the selected layers / ranks, everything else frozen.

``train_step`` is a pure function ``(state, batch) -> (state, metrics)`` jitted with the state
donated, so the LoRA and optimizer buffers are updated in place. The optimizer is an optax chain
(global-norm clip, AdamW with a warm-up + cosine schedule) wrapped in ``optax.MultiSteps`` for gradient
accumulation; only LoRA leaves are ever seen by it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexora_jax import loops
from flexora_jax.models.attention import stage_config
from flexora_jax.models.losses import lm_loss
from flexora_jax.config import FinetuneConfig, ModelConfig
from flexora_jax.data import BatchSampler, Dataset, batches_in_order
from flexora_jax.errors import NumericsError, check_tree_shapes
from flexora_jax.gates import Gates
from flexora_jax.lora import LoraParams
from flexora_jax.sharding import fetch


class TrainState(NamedTuple):
    lora: LoraParams
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def total_steps(cfg: FinetuneConfig, n_examples: int) -> int:
    """Optimizer steps of a fine-tune over ``n_examples`` (epochs x batches / accumulation, capped)."""
    per_epoch = max(1, n_examples // cfg.batch_size)
    steps = max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


def make_optimizer(cfg: FinetuneConfig, steps: int) -> optax.GradientTransformation:
    """Clip -> AdamW/Adam/SGD with (warm-up +) cosine or constant lr, accumulated over ``grad_accum``."""
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


def init_train_state(lora: LoraParams, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh training state: the LoRA with its layout traced (:meth:`LoraParams.traced_layout`: one program
    for every selection of the same targets and ``r_max``), the optimizer over its weights only. The LoRA is
    copied: the jitted step donates its state, and the caller's arrays must stay usable."""
    lora = jax.tree.map(jnp.copy, lora.traced_layout())
    return TrainState(lora, optimizer.init(lora.weights), jnp.zeros((), jnp.int32), jax.random.key(seed))


@functools.lru_cache(maxsize=32)
def make_train_step(config: ModelConfig, cfg: FinetuneConfig, steps: int) -> Callable[..., tuple[TrainState, dict]]:
    """The pure fine-tune step ``(params, state, batch, gates=None) -> (state, {"loss", "grad_norm"})``.

    Jit it yourself (``jax.jit(step, donate_argnums=1)``) or through :func:`flexora_jax.loops.compile_step`.
    Cached on (model config, fine-tune config, steps): every fine-tune with the same settings (e.g. the
    methods of a comparison) gets the same function, hence the same compiled program.
    """
    optimizer = make_optimizer(cfg, steps)
    config = stage_config(config)  # a first-order stage: attention "auto" resolved (flash on CPU)

    def step(params: Any, state: TrainState, batch: Dataset, gates: Gates | None = None) -> tuple[TrainState, dict]:
        rng, drop = jax.random.split(state.rng)
        use_dropout = state.lora.spec.dropout > 0
        loss, grads = jax.value_and_grad(lambda w: lm_loss(config, params, state.lora.replace(weights=w), gates, batch,
                                                           drop if use_dropout else None))(state.lora.weights)
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


def dataset_loss(config: ModelConfig, params: Any, lora: LoraParams | None, data: Dataset, batch_size: int = 64,
                 gates: Gates | None = None) -> float:
    """Mean per-token loss of ``lora`` (or the base, ``lora=None``) over a whole dataset."""
    fn = make_eval_loss(config)
    total, count = 0.0, 0.0
    for batch in batches_in_order(data, batch_size):
        s, n = fn(params, lora, gates, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def check_finite(value: float, what: str, step: int) -> None:
    if not np.isfinite(value):
        raise NumericsError(f"{what} is {value} at step {step}: stopping (lower the learning rate, enable "
                            "gradient clipping, or check the data for empty targets)")


@functools.singledispatch
def finetune(config: ModelConfig, params: Any, lora: LoraParams, train: Dataset, cfg: FinetuneConfig,
             val: Dataset | None = None, seed: int = 0, callback: Callable[[int, dict], None] | None = None,
             state: TrainState | None = None, sampler_state: dict | None = None,
             mesh: Any = None) -> tuple[LoraParams, list[dict]]:
    """Train ``lora`` on ``train`` for the configured steps; returns the final (or best) LoRA and history.

    ``callback(step, record)`` is called after every step (logging, checkpoints; it may raise to stop).
    A NaN / Inf loss raises :class:`NumericsError` naming the step. ``mesh``: a ``jax.sharding.Mesh``
    (params and state placed sharded, batches assembled from each process's rows; the returned LoRA is
    sharded the same way); None runs on one device. A Flax NNX model as the first argument dispatches to
    :func:`flexora_jax.nnx.finetune_nnx` (``fj.finetune(model, train, cfg, loss_fn=...)``).
    """
    steps = total_steps(cfg, len(train["input_ids"]))
    sampler = BatchSampler(train, cfg.batch_size, seed=seed)
    if sampler_state is not None:
        sampler.restore(sampler_state)
    fresh = functools.partial(init_train_state, lora, make_optimizer(cfg, steps), seed)
    if state is None:
        state = fresh()
    else:
        check_tree_shapes(state, jax.eval_shape(fresh), "finetune: the given state")
    program = loops.compile_step(make_train_step(config, cfg, steps), loops.default_mesh(mesh),
                                 (params, state, sampler.abstract()), {2: 0})
    params, state = program.place(params, state)
    history: list[dict] = []
    best: list[Any] = [math.inf, None]
    micro_steps = steps * cfg.grad_accum

    def on_step(step: int, state: TrainState, metrics: dict) -> None:
        loss = float(metrics["loss"])
        check_finite(loss, "fine-tune loss", step)
        record = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"])}
        if val is not None and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == micro_steps):
            record["val_loss"] = dataset_loss(config, params, state.lora, val)
            if cfg.keep_best and record["val_loss"] < best[0]:
                best[:] = [record["val_loss"], fetch(state.lora)]
        history.append(record)
        if callback is not None:
            callback(step, dict(record, sampler=sampler.state(), state=state))

    state = loops.run(program, params, state, lambda: (sampler.next(),), int(state.step), micro_steps, [on_step])
    final = state.lora
    if cfg.keep_best and best[1] is not None:
        final = jax.tree.map(jnp.asarray, best[1])
    return (final if lora.coef is not None else final.with_spec(lora.spec)), history
