"""The public entry points of the one engine: ``fj.search``, ``fj.finetune``, ``fj.select``.

Each takes a *model*: a Flax NNX model with LoRA (``fj.nnx.add_lora`` on any model, or
``fj.nnx.LlamaForCausalLM``) or a :class:`~flexora_jax.problem.Problem` (``fj.decoder_problem(config, params,
lora_config)`` for the functional core). Whatever it is, it becomes one problem value
(:func:`flexora_jax.nnx.problem.as_problem`) and runs through one driver per stage
(:func:`flexora_jax.loops.drive`) with the same hooks (:mod:`flexora_jax.hooks`): one device or a mesh,
checkpoints and resume, validation and keep-best, metric writers, progress, callbacks, signals. The
pure steps are :func:`flexora_jax.bilevel.search_step` and :func:`flexora_jax.train.train_step`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexora_jax.adalora import (
    AdaLoraConfig,
    AllocatorState,
    allocate,
    as_lora,
    init_adalora,
    init_allocator,
    orth_regularizer,
    to_lora,
    update_ipt,
)
from flexora_jax.bilevel import SearchState, init_search_state, nonfinite_message, search_step
from flexora_jax.config import FinetuneConfig, SearchConfig, SelectionConfig
from flexora_jax.data import BatchSampler, Dataset, fingerprint
from flexora_jax.errors import ConfigError, NumericsError
from flexora_jax.gates import Gates
from flexora_jax.hooks import Callback, Checkpoint, Progress, Validation, dataset_mean, host_tree
from flexora_jax.loops import Hook, Stage, drive
from flexora_jax.models.losses import lm_loss
from flexora_jax.nnx.problem import ModelLoss, as_problem
from flexora_jax.problem import Problem
from flexora_jax.selection import Selection
from flexora_jax.sharding import fetch
from flexora_jax.train import TrainState, check_finite, make_optimizer, total_steps, train_step
from flexora_jax.validation import (
    check_bool,
    check_callable,
    check_config_type,
    check_dataset,
    check_number,
    check_path,
    check_type,
)

MAX_STEPS = 2**31 - 1  # the step counter (int32) of every stage

#: An optax transformation, or a factory ``f(total_steps) -> transformation`` (for schedules).
Optimizer = optax.GradientTransformation | Callable[[int], optax.GradientTransformation]


@dataclasses.dataclass
class SearchResult:
    """A finished search: the final raw ``gates`` (host), the ``selection``, the per-step ``history``, the
    layer gate values per step (``trajectory``), the final ``state`` and ``result`` (what the problem wrote
    back: the NNX model itself, or the searched decoder ``LoraParams``)."""

    gates: Gates
    selection: Selection
    history: list[dict]
    trajectory: list[list[float]]
    state: SearchState
    result: Any = None


def _optimizer(optimizer: Optimizer | None, steps: int, what: str) -> optax.GradientTransformation | None:
    """An optax transformation from ``optimizer`` (a factory is called with the stage's total optimizer steps)."""
    if optimizer is None or isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if callable(optimizer):
        built = optimizer(steps)
        if isinstance(built, optax.GradientTransformation):
            return built
        raise ConfigError(
            f"{what}: the optimizer factory returned {type(built).__name__}, expected an optax.GradientTransformation"
        )
    raise ConfigError(
        f"{what}: optimizer must be an optax.GradientTransformation (e.g. optax.lion(1e-4)) or a "
        f"factory steps -> transformation, got {type(optimizer).__name__}; the config's optimizer "
        "names (adamw, adam, sgd) are used when optimizer is None"
    )


def _check_config(value: Any, cls: type, what: str) -> None:
    check_config_type(value, cls, what)


def _check_data(problem: Problem, data: Any, what: str) -> int:
    """The data a stage draws from: the fields its loss reads, ids inside the model's vocabulary, finite values."""
    return check_dataset(
        data,
        what,
        vocab_size=problem.vocab_size,
        require=problem.requires,
        loss_mask_required="loss_mask" in problem.requires,
    )


def check_finetune_sizes(cfg: FinetuneConfig, n: int, prefix: str = "finetune.", what: str = "") -> None:
    """A fine-tune's length against its ``n`` training examples, before the first step: an optimizer step may
    not span more than the training set (``grad_accum``: 100000 is effectively a hang) and the step count must
    fit the step counter (``epochs``: 1e300 overflows it). ``prefix`` names the keys (the command's
    ``finetune.``, the API's ``config.``), ``what`` the caller."""
    per_epoch = max(1, n // cfg.batch_size)
    if cfg.grad_accum > per_epoch:
        raise ConfigError(
            f"{what}{prefix}grad_accum {cfg.grad_accum} x {prefix}batch_size {cfg.batch_size} is "
            f"{cfg.grad_accum * cfg.batch_size} examples per optimizer step, more than the {n} fine-tune "
            f"training examples (an epoch is {per_epoch} batches); expected grad_accum <= {per_epoch}"
        )
    micro_steps = total_steps(cfg, n) * cfg.grad_accum
    if micro_steps > MAX_STEPS:
        raise ConfigError(
            f"{what}{prefix}epochs {cfg.epochs:g} over {n} examples in batches of {cfg.batch_size} is "
            f"{micro_steps:.3g} steps, more than the step counter holds ({MAX_STEPS}); lower "
            f"{prefix}epochs, or cap the steps with {prefix}max_steps"
        )


def _check_arguments(what: str, seed: Any, mesh: Any, loss_fns: dict[str, Any] | None = None) -> None:
    """The arguments every stage takes besides its hooks: ``seed`` (an integer >= 0: numpy refuses a negative
    one deep inside the sampler, a bool is not a seed), ``mesh`` and the loss functions (callables or None)."""
    check_number(seed, f"{what}: seed", lo=0, integer=True)
    if mesh is not None:
        check_config_type(mesh, jax.sharding.Mesh, f"{what}: mesh")
    for name, fn in (loss_fns or {}).items():
        check_callable(fn, f"{what}: {name}")


def _hooks(
    given: Sequence[Hook],
    checkpoint_dir: str | os.PathLike | None,
    checkpoint_every: int,
    progress: bool | None,
    callback: Callable[[int, dict], None] | None,
    front: Sequence[Hook] = (),
    what: str = "fj.search",
) -> list:
    """The stage's hooks in order: the engine's own (validation), the checkpoint, the caller's, progress, callback."""
    check_type(given, tuple[Any, ...], f"{what}: hooks")
    check_path(checkpoint_dir, f"{what}: checkpoint_dir", optional=True)
    check_number(checkpoint_every, f"{what}: checkpoint_every", lo=1, integer=True)
    if progress is not None:
        check_bool(progress, f"{what}: progress")
    check_callable(callback, f"{what}: callback")
    for h in given:
        if not isinstance(h, Hook):
            raise ConfigError(f"hooks: expected fj.hooks.Hook instances, got {type(h).__name__}")
    out = list(front)
    if checkpoint_dir is not None:
        out.append(Checkpoint(checkpoint_dir, checkpoint_every))
    out += list(given)
    if progress is None:
        progress = os.environ.get("FLEXORA_PROGRESS", "1") != "0" and _interactive()
    if progress:
        out.append(Progress())
    if callback is not None:
        out.append(Callback(callback))
    return out


def _interactive() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _refuse_functional_form(fn: Callable) -> Callable:
    """The earlier functional form ``fj.search(config, params, lora_config, ...)`` / ``fj.finetune(config, params,
    lora, ...)`` fails with the call that replaces it, not with Python's arity error (``inspect.signature`` and
    ``help()`` still show the one signature)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args and type(args[0]).__name__ == "ModelConfig":
            as_problem(args[0], what=f"fj.{fn.__name__}")
        return fn(*args, **kwargs)

    return wrapper


@_refuse_functional_form
def search(
    model: Any,
    search_config: SearchConfig,
    train: Dataset,
    val: Dataset,
    *,
    gates: str = "layer",
    selection: SelectionConfig = SelectionConfig(),
    loss_fn: ModelLoss | None = None,
    val_loss_fn: ModelLoss | None = None,
    optimizer: Optimizer | None = None,
    seed: int = 0,
    hooks: Sequence[Hook] = (),
    callback: Callable[[int, dict], None] | None = None,
    progress: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    state: SearchState | None = None,
    sampler_states: dict | None = None,
    mesh: Any = None,
) -> SearchResult:
    """Run the bilevel search on ``model`` and select layers / ranks.

    Args:
      model: a Flax NNX model with LoRA and gates (``fj.nnx.add_lora(..., gates=...)``,
        ``fj.nnx.LlamaForCausalLM``) or a :class:`~flexora_jax.problem.Problem` (``fj.decoder_problem``).
      search_config: estimator, K, steps, learning rates (:class:`~flexora_jax.SearchConfig`).
      train, val: tokenised datasets (dicts of arrays); batches are drawn with ``seed``.
      gates: "layer" (Flexora), "rank" (AutoLoRA) or "both".
      selection: how the final layer gates become layers.
      loss_fn, val_loss_fn: ``loss_fn(model, batch) -> scalar`` of an NNX model (default: the model's LM loss;
        only the default needs ``loss_mask`` in the data).
      optimizer: the inner (LoRA) optimizer, any optax transformation or a factory of one called with the
        number of inner steps; default from the config. Differentiated through: Adam-like ones need
        ``eps_root > 0`` (checked).
      hooks: :class:`flexora_jax.loops.Hook` objects (metric writers, ...); ``callback(step, record)`` after each
        step (``record`` holds the metrics, ``state`` and ``sampler``); ``progress``: a progress bar (default:
        on at an interactive terminal unless ``FLEXORA_PROGRESS=0``).
      checkpoint_dir, checkpoint_every: adapter-only orbax checkpoints every N steps and at the end; a
        directory holding one resumes from it (the same model, settings and data, else a CheckpointError).
      state, sampler_states: resume from a state and batch positions held in memory.
      mesh: a ``jax.sharding.Mesh`` (base and state sharded, batches assembled from each process's rows).
    Returns:
      a :class:`SearchResult`; the searched LoRA and the gates are written back into an NNX model.
    Raises:
      NumericsError: a non-finite hypergradient or validation loss, naming the step.
    """
    _check_arguments("fj.search", seed, mesh, {"loss_fn": loss_fn, "val_loss_fn": val_loss_fn})
    problem = as_problem(model, loss_fn, val_loss_fn, "fj.search")
    _check_config(search_config, SearchConfig, "fj.search: search_config")
    _check_config(selection, SelectionConfig, "fj.search: selection")
    sc = search_config
    _check_data(problem, train, "fj.search: train")
    _check_data(problem, val, "fj.search: val")
    twice = problem.for_stage(sc.hypergradient, sc.darts_mode)  # where the loss is differentiated twice
    # mixed-mode unrolled, first_order and darts differentiate the training loss twice only in Hessian-vector
    # products: every other pass may use the first-order (fused-attention) loss
    first = twice if sc.hypergradient == "forward" or sc.unrolled_mode == "reverse" else problem.for_stage(None)
    inner = _optimizer(optimizer, sc.steps * sc.inner_steps, "fj.search")
    hyper = problem.layout.init(gates, sc.gate_power)
    train_s = BatchSampler(train, sc.batch_size, seed=seed, required=problem.requires)
    val_s = BatchSampler(val, sc.val_batch_size, seed=seed + 1, required=problem.requires)
    trajectory: list[list[float]] = []

    def record(step: int, metrics: dict) -> dict:
        if not bool(metrics["finite"]):
            raise NumericsError(nonfinite_message(step, metrics, sc))
        rec = {"step": step, **{k: float(metrics[k]) for k in ("val_loss", "train_loss", "hypergrad_norm")}}
        if "layer_gates" in metrics:
            rec["gates"] = [round(float(x), 6) for x in np.asarray(metrics["layer_gates"])]
            trajectory.append(rec["gates"])
        return rec

    stage = Stage(
        name="search",
        step=search_step(first.loss, sc, inner, first.val_loss, twice.loss),
        fresh=lambda: init_search_state(problem.lora, hyper, sc, inner),
        samplers={"train": train_s, "val": val_s},
        draw=lambda: (train_s.next_stacked(sc.inner_steps), val_s.next()),
        abstract=lambda: (train_s.abstract(sc.inner_steps), val_s.abstract()),
        batch_dims={2: 1, 3: 0},
        total=sc.steps,
        record=record,
        identity={
            "stage": "search",
            "problem": problem.fingerprint(),
            "gates": gates,
            "seed": seed,
            "config": dataclasses.asdict(sc),
            "optimizer": _opt_name(optimizer),
            "train": fingerprint(train),
            "val": fingerprint(val),
        },
    )
    state, history = drive(
        stage,
        problem.base,
        hooks=_hooks(hooks, checkpoint_dir, checkpoint_every, progress, callback),
        mesh=mesh,
        state=state,
        sampler_states=sampler_states,
    )
    final = jax.tree.map(jnp.asarray, fetch(state.gates))
    result = problem.write(jax.tree.map(jnp.asarray, fetch(state.inner.lora)), final)
    return SearchResult(
        gates=final,
        selection=problem.select(final, selection),
        history=history,
        trajectory=trajectory,
        state=state,
        result=result,
    )


@_refuse_functional_form
def finetune(
    model: Any,
    train: Dataset,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    val: Dataset | None = None,
    loss_fn: ModelLoss | None = None,
    optimizer: Optimizer | None = None,
    seed: int = 0,
    hooks: Sequence[Hook] = (),
    callback: Callable[[int, dict], None] | None = None,
    progress: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    state: TrainState | None = None,
    sampler_state: dict | None = None,
    mesh: Any = None,
) -> tuple[Any, list[dict]]:
    """Train the LoRA of ``model`` on ``train`` (base and gates frozen); returns ``(result, history)``.

    ``model`` and the keyword arguments are :func:`search`'s (``optimizer``: any optax transformation or a
    factory called with the number of optimizer steps; default: the config's clip + AdamW schedule;
    ``config.grad_accum > 1`` wraps it in ``optax.MultiSteps``). ``val`` with ``config.eval_every > 0``: the
    validation loss every N steps in the history and, with ``config.keep_best``, the best LoRA returned.
    ``result`` is what the problem wrote back: the NNX model (updated in place) or the trained decoder
    ``LoraParams``. A NaN / Inf loss raises :class:`NumericsError` naming the step.
    """
    _check_arguments("fj.finetune", seed, mesh, {"loss_fn": loss_fn})
    problem = as_problem(model, loss_fn, None, "fj.finetune")
    _check_config(config, FinetuneConfig, "fj.finetune: config")
    cfg = config
    n = _check_data(problem, train, "fj.finetune: train")
    if val is not None:
        _check_data(problem, val, "fj.finetune: val")
    check_finetune_sizes(cfg, n, "config.", "fj.finetune: ")
    steps = total_steps(cfg, n)
    opt = _optimizer(optimizer, steps, "fj.finetune")
    if opt is None:
        opt = make_optimizer(cfg, steps)
    elif cfg.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum)
    sampler = BatchSampler(train, cfg.batch_size, seed=seed, required=problem.requires)
    staged = problem.for_stage(None)

    def record(step: int, metrics: dict) -> dict:
        rec = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
        check_finite(rec["loss"], "fine-tune loss", step)
        return rec

    front = []
    if val is not None and cfg.eval_every > 0:
        front.append(
            Validation(
                lambda base, st: dataset_mean(staged.loss, staged.count, base, st.lora, None, val),
                cfg.eval_every,
                cfg.keep_best,
            )
        )
    stage = Stage(
        name="finetune",
        step=train_step(staged.loss, opt, problem.dropout),
        fresh=lambda: TrainState(
            jax.tree.map(jnp.copy, problem.lora), opt.init(problem.lora), jnp.zeros((), jnp.int32), jax.random.key(seed)
        ),
        samplers={"train": sampler},
        draw=lambda: (sampler.next(),),
        abstract=lambda: (sampler.abstract(),),
        batch_dims={2: 0},
        total=steps * cfg.grad_accum,
        record=record,
        identity={
            "stage": "finetune",
            "problem": problem.fingerprint(),
            "seed": seed,
            "config": dataclasses.asdict(cfg),
            "optimizer": _opt_name(optimizer),
            "train": fingerprint(train),
        },
    )
    hooks_list = _hooks(hooks, checkpoint_dir, checkpoint_every, progress, callback, front, "fj.finetune")
    state, history = drive(
        stage,
        problem.base,
        hooks=hooks_list,
        mesh=mesh,
        state=state,
        sampler_states=None if sampler_state is None else {"train": sampler_state},
    )
    best = front[0].best if front and cfg.keep_best else None
    final = best if best is not None else jax.tree.map(jnp.asarray, fetch(state.lora))
    return problem.write(final, None), history


class AdaState(NamedTuple):
    """What the AdaLoRA step reads and writes: weights (P, Lambda, Q), optimizer state, the allocator before
    this step (``alloc``, with its mask) and after its EMA update (``tracked``), the step."""

    weights: Any
    opt_state: Any
    alloc: AllocatorState
    tracked: AllocatorState
    step: jax.Array


@dataclasses.dataclass
class AdaLoraResult:
    """A finished AdaLoRA fine-tune: its ``weights`` (PEFT's P / Lambda / Q, pruned Lambdas at 0), the same
    adapter rank-pruned as LoRA (``lora``, with ``rank_pattern``), what the problem wrote back (``result``: the
    NNX decoder updated in place, or ``lora``), the adapted ``layers`` and the per-step ``history``."""

    weights: Any
    lora: Any
    result: Any
    layers: tuple[int, ...]
    history: list[dict]


def finetune_adalora(
    model: Any,
    train: Dataset,
    config: AdaLoraConfig,
    *,
    lr: float = 1e-3,
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    optimizer: Optimizer | None = None,
    seed: int = 0,
    hooks: Sequence[Hook] = (),
    callback: Callable[[int, dict], None] | None = None,
    progress: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    mesh: Any = None,
) -> AdaLoraResult:
    """AdaLoRA (PEFT's loop and ``RankAllocator``) on the built-in decoder through the one driver.

    ``model``: ``fj.nnx.LlamaForCausalLM`` or a decoder problem (``fj.decoder_problem``): AdaLoRA's SVD-form
    adapter lives on the decoder's stacked projections. ``config.total_step`` optimizer steps of ``lr``
    (AdamW; or ``optimizer``) on ``batch_size`` examples of ``train`` each, each step followed by the host
    allocator (sensitivity EMAs, budget, mask) as PEFT's ``update_and_allocate``; ``layers`` defaults to every
    layer. Hooks, checkpoints, progress and
    mesh as in :func:`finetune` (the allocator's EMAs and mask are part of the checkpointed state).
    """
    _check_arguments("fj.finetune_adalora", seed, mesh)
    problem = as_problem(model, what="fj.finetune_adalora")
    _check_config(config, AdaLoraConfig, "fj.finetune_adalora: config")
    cfg = problem.model_config
    if cfg is None:
        raise ConfigError(
            "fj.finetune_adalora: AdaLoRA is built for the decoder's stacked projections "
            "(fj.nnx.LlamaForCausalLM or fj.decoder_problem); this model has no AdaLoRA adapter"
        )
    _check_data(problem, train, "fj.finetune_adalora: train")
    layers = tuple(range(cfg.num_hidden_layers) if layers is None else sorted(int(i) for i in layers))
    opt = _optimizer(optimizer, config.total_step, "fj.finetune_adalora") or optax.adamw(lr, weight_decay=0.0)
    sampler = BatchSampler(train, batch_size, seed=seed, required=problem.requires)
    params_key = "params"

    def step(base: Any, state: AdaState, batch: Dataset) -> tuple[AdaState, dict]:
        def loss(w):
            task = lm_loss(cfg, base[params_key], as_lora(cfg, config, w, layers), None, batch)
            return task + config.orth_reg_weight * orth_regularizer(w, layers)

        value, grads = jax.value_and_grad(loss)(state.weights)
        updates, opt_state = opt.update(grads, state.opt_state, state.weights)
        weights = optax.apply_updates(state.weights, updates)
        tracked = update_ipt(config, state.alloc, weights, grads).replace(mask=None)  # the mask: alloc's
        return AdaState(weights, opt_state, state.alloc, tracked, state.step + 1), {"loss": value}

    def fresh() -> AdaState:
        weights = init_adalora(cfg, config, jax.random.key(seed))
        alloc = init_allocator(weights).replace(mask={m: jnp.ones(w["e"].shape, bool) for m, w in weights.items()})
        return AdaState(weights, opt.init(weights), alloc, alloc.replace(mask=None), jnp.zeros((), jnp.int32))

    def allocate_on_host(i: int, state: AdaState, metrics: Any) -> AdaState:
        before = host_tree(state.alloc)
        alloc, weights = allocate(
            config, before, host_tree(state.tracked).replace(mask=before.mask), host_tree(state.weights), i - 1, layers
        )
        return state._replace(weights=host_tree(weights), alloc=host_tree(alloc))

    def record(i: int, metrics: dict) -> dict:
        rec = {"step": i, "loss": float(metrics["loss"])}
        check_finite(rec["loss"], "AdaLoRA loss", i)
        return rec

    stage = Stage(
        name="adalora",
        step=step,
        fresh=fresh,
        samplers={"train": sampler},
        draw=lambda: (sampler.next(),),
        abstract=lambda: (sampler.abstract(),),
        batch_dims={2: 0},
        total=config.total_step,
        record=record,
        host_update=allocate_on_host,
        identity={
            "stage": "adalora",
            "problem": problem.fingerprint(),
            "seed": seed,
            "lr": lr,
            "layers": layers,
            "batch_size": batch_size,
            "config": dataclasses.asdict(config),
            "optimizer": _opt_name(optimizer),
            "train": fingerprint(train),
        },
    )
    state, history = drive(
        stage,
        problem.base,
        hooks=_hooks(hooks, checkpoint_dir, checkpoint_every, progress, callback, what="fj.finetune_adalora"),
        mesh=mesh,
    )
    weights = jax.tree.map(jnp.asarray, host_tree(state.weights))
    lora = to_lora(cfg, config, weights, layers)
    return AdaLoraResult(weights, lora, problem.write(lora, None), layers, history)


def select(model: Any, gates: Gates, selection: SelectionConfig = SelectionConfig()) -> Selection:
    """The selection rule on a search's raw ``gates``, for ``model`` (an NNX model with LoRA or a Problem):
    the decoder's layers and ranks (with its fine-tune ``lora_config``), or an NNX model's own module paths
    (which :func:`flexora_jax.nnx.apply_selection` applies)."""
    if isinstance(model, Gates):
        raise ConfigError(
            "fj.select takes the model first: fj.select(model, gates, selection); the decoder's "
            "functional rule is fj.select_lora(gates, lora_config, num_layers, selection)"
        )
    _check_config(selection, SelectionConfig, "fj.select: selection")
    check_config_type(gates, Gates, "fj.select: gates")
    return as_problem(model, what="fj.select").select(gates, selection)


def _opt_name(optimizer: Any) -> str | None:
    if optimizer is None:
        return None
    return getattr(optimizer, "__qualname__", None) or type(optimizer).__name__


__all__ = [
    "AdaLoraResult",
    "AdaState",
    "Optimizer",
    "Problem",
    "SearchResult",
    "check_finetune_sizes",
    "finetune",
    "finetune_adalora",
    "search",
    "select",
]
