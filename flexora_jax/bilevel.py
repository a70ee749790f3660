"""The bilevel search: LoRA descends the training loss, the gates descend the validation loss.

What is differentiated w.r.t. what:
- the *inner* problem trains the LoRA params ``theta`` on training batches with the gates held as
  arguments: ``theta_{k+1} = opt_step(theta_k, grad_theta L_train(theta_k, gates))``;
- the *outer* problem moves the raw gate values (:class:`flexora_jax.gates.Gates`) along the
  hypergradient ``d L_val(theta_K(gates), gates) / d gates``.

Estimators (one function, :func:`hypergradient`):
- ``unrolled``: reverse mode through the K inner steps, which run as one ``jax.lax.scan`` whose carry
  is ``(lora, optimizer state)``. The scan body is rematerialised (``jax.checkpoint``) by default, so
  the backward pass stores only the K small carries and recomputes each step's activations: memory is
  flat in K beyond the LoRA state, and on CPU the step is even faster (less memory traffic).
- ``forward``: the same total derivative by forward mode (``jax.jacfwd``), one tangent per gate value:
  no reverse storage at all; cheaper than reverse mode when there are few gates (layer gates of a
  shallow model).
- ``first_order``: K inner steps, then only the direct partial ``dL_val/dgates`` at the new theta
  (what the Flexora reference code does).
- ``darts``: AutoLoRA's one-step estimator: direct partial at ``theta' = step(theta)`` minus the mixed
  second derivative ``d/dgates <grad_theta L_train(theta', gates), v>`` with
  ``v = dL_val/dtheta'``; computed exactly (forward-over-reverse, ``jax.jvp`` of the gate gradient) or
  by AutoLoRA's central finite difference (eps = 0.01 / ||v||).

The inner state carries on from one search step to the next (truncated, online unrolling): the
hypergradient of step t differentiates only through the K steps of step t. A whole search step
(K inner steps + hypergradient + outer update) is one jitted function, compiled once per search.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexora_jax import loops
from flexora_jax.config import LoraConfig, ModelConfig, SearchConfig, SelectionConfig
from flexora_jax.data import BatchSampler, Dataset
from flexora_jax.errors import ConfigError, NumericsError, check_tree_shapes
from flexora_jax.gates import GateKind, Gates, gate_values, init_gates
from flexora_jax.lora import LoraParams, init_lora
from flexora_jax.selection import Selection, select
from flexora_jax.sharding import fetch
from flexora_jax.models.attention import stage_config
from flexora_jax.models.losses import lm_loss

Batch = dict[str, jax.Array]
LossFn = Callable[[LoraParams, Gates | None, Batch], jax.Array]


class InnerState(NamedTuple):
    """What the inner loop carries: LoRA params and their optimizer state."""

    lora: LoraParams
    opt_state: Any


class SearchState(NamedTuple):
    """Everything a search step reads and writes (and a checkpoint holds)."""

    inner: InnerState
    gates: Gates
    gate_opt_state: Any
    step: jax.Array


def make_loss_fn(config: ModelConfig, params: Any) -> LossFn:
    """``loss(lora, gates, batch)`` with the frozen base closed over (never differentiated)."""
    def loss(lora, gates, batch):
        return lm_loss(config, params, lora, gates, batch)
    return loss


def inner_optimizer(search: SearchConfig) -> optax.GradientTransformation:
    """The inner optimizer from a SearchConfig (AdamW keeps ``eps_root > 0``: finite hypergradients)."""
    total = search.steps * search.inner_steps
    lr = search.inner_lr if search.inner_schedule == "constant" else optax.cosine_decay_schedule(search.inner_lr, total)
    if search.inner_optimizer == "sgd":
        opt = optax.sgd(lr)
    elif search.inner_optimizer == "adam":
        opt = optax.adam(lr, eps_root=search.inner_eps_root)
    else:
        opt = optax.adamw(lr, eps_root=search.inner_eps_root, weight_decay=search.inner_weight_decay)
    if search.inner_grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(search.inner_grad_clip), opt)
    return opt


def outer_optimizer(search: SearchConfig) -> optax.GradientTransformation:
    return optax.adam(search.outer_lr, b1=search.outer_b1, b2=search.outer_b2)


# -------------------------------------------------------------------------------------- inner loop
def inner_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, gates: Gates | None,
               state: InnerState, batch: Batch, reset_optimizer: bool = False) -> tuple[InnerState, jax.Array]:
    """One optimizer step of the LoRA params on a training batch, gates held fixed (but traced)."""
    loss, grads = jax.value_and_grad(loss_fn)(state.lora, gates, batch)
    opt_state = optimizer.init(state.lora) if reset_optimizer else state.opt_state
    updates, opt_state = optimizer.update(grads, opt_state, state.lora)
    return InnerState(optax.apply_updates(state.lora, updates), opt_state), loss


def unroll(loss_fn: LossFn, optimizer: optax.GradientTransformation, gates: Gates | None, state: InnerState,
           batches: Batch, remat: bool = True, reset_optimizer: bool = False) -> tuple[InnerState, jax.Array]:
    """K inner steps as one ``lax.scan`` over ``batches`` (leading axis K); returns state and K losses.

    With ``remat`` the body is ``jax.checkpoint``-ed: reverse mode through the scan keeps only the
    carries and recomputes each step's forward pass, so memory does not grow with activations x K.
    """
    def body(carry, batch):
        return inner_step(loss_fn, optimizer, gates, carry, batch, reset_optimizer)

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, state, batches)


# ---------------------------------------------------------------------------------- hypergradients
def _tree_dot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _tree_norm(a: Any) -> jax.Array:
    return jnp.sqrt(_tree_dot(a, a))


def hypergradient(estimator: str, train_loss: LossFn, val_loss: LossFn, optimizer: optax.GradientTransformation,
                  gates: Gates, state: InnerState, train_batches: Batch, val_batch: Batch, remat: bool = True,
                  reset_optimizer: bool = False, darts_mode: str = "exact") -> tuple[Gates, InnerState, dict]:
    """The hypergradient w.r.t. the raw ``gates``, the advanced inner state, and metrics.

    Args:
      estimator: "unrolled", "forward", "first_order" or "darts" (see the module docstring).
      train_loss, val_loss: ``loss(lora, gates, batch)``; usually the same function.
      optimizer: the inner optax optimizer (differentiable for unrolled/forward: AdamW needs eps_root > 0).
      gates: raw gate values (the differentiated hyperparameters).
      state: inner state before this step (a constant: truncated unrolling).
      train_batches: K training batches stacked on a leading axis (darts uses only the first).
      val_batch: one validation batch.
    Returns:
      (hypergradient as a Gates pytree, inner state after the K steps, metrics dict).
    """
    if estimator in ("unrolled", "forward") or (estimator == "darts" and darts_mode == "exact"):
        check_differentiable(optimizer)
    if estimator in ("unrolled", "forward"):
        def objective(g):
            new_state, losses = unroll(train_loss, optimizer, g, state, train_batches, remat, reset_optimizer)
            return val_loss(new_state.lora, g, val_batch), (new_state, losses)

        if estimator == "unrolled":
            (vloss, (new_state, losses)), hg = jax.value_and_grad(objective, has_aux=True)(gates)
        else:
            hg, (new_state, losses) = jax.jacfwd(objective, has_aux=True)(gates)
            vloss = val_loss(new_state.lora, gates, val_batch)
        return hg, new_state, {"val_loss": vloss, "train_loss": jnp.mean(losses)}

    if estimator == "first_order":
        frozen = jax.lax.stop_gradient(gates)
        new_state, losses = unroll(train_loss, optimizer, frozen, state, train_batches, remat, reset_optimizer)
        vloss, hg = jax.value_and_grad(lambda g: val_loss(new_state.lora, g, val_batch))(gates)
        return hg, new_state, {"val_loss": vloss, "train_loss": jnp.mean(losses)}

    if estimator == "darts":
        batch = jax.tree.map(lambda x: x[0], train_batches)
        stepped, tloss = inner_step(train_loss, optimizer, gates, state, batch, reset_optimizer)
        theta = stepped.lora
        vloss, (v, direct) = jax.value_and_grad(val_loss, argnums=(0, 1))(theta, gates, val_batch)
        implicit = darts_implicit(train_loss, theta, gates, batch, v, darts_mode)
        hg = jax.tree.map(lambda d, i: d - i, direct, implicit)
        return hg, stepped, {"val_loss": vloss, "train_loss": tloss}

    raise ConfigError(f"unknown hypergradient estimator {estimator!r}; "
                      "valid: 'unrolled', 'forward', 'first_order', 'darts'")


def check_differentiable(optimizer: optax.GradientTransformation) -> None:
    """Refuse an inner optimizer whose update has no derivative at a zero second moment.

    LoRA starts with B = 0, so some gradients are exactly 0 at the first step; through Adam / AdamW with
    ``eps_root = 0`` the derivative of ``sqrt(nu)`` at ``nu = 0`` is infinite and every hypergradient
    becomes NaN. Probed on a scalar at trace time (a few eager operations).
    """
    with jax.ensure_compile_time_eval():
        zero = {"x": jnp.zeros((), jnp.float32)}
        state = optimizer.init(zero)
        one = {"x": jnp.ones((), jnp.float32)}
        tangent = jax.jvp(lambda g: optimizer.update(g, state, zero)[0], (zero,), (one,))[1]
        finite = bool(jnp.isfinite(tangent["x"]))
    if not finite:
        raise ConfigError("the inner optimizer's update has no derivative at a zero gradient (Adam / AdamW with "
                          "eps_root=0: the hypergradient is NaN while LoRA's B is 0); use eps_root > 0, e.g. "
                          "optax.adamw(lr, eps_root=1e-16), or the first_order estimator")


def darts_implicit(train_loss: LossFn, theta: LoraParams, gates: Gates, batch: Batch, v: LoraParams,
                   mode: str = "exact") -> Gates:
    """``d/dgates <grad_theta L_train(theta, gates), v>``: AutoLoRA's implicit (second-order) term.

    ``exact`` is the mixed Hessian-vector product by forward-over-reverse (``jax.jvp`` of the gate
    gradient along ``v``); ``finite_difference`` is AutoLoRA's central difference with
    eps = 0.01 / ||v||.
    """
    gate_grad = jax.grad(train_loss, argnums=1)

    if mode == "exact":
        return jax.jvp(lambda th: gate_grad(th, gates, batch), (theta,), (v,))[1]
    if mode == "finite_difference":
        eps = 0.01 / jnp.maximum(_tree_norm(v), 1e-12)
        plus = jax.tree.map(lambda t, d: t + eps * d, theta, v)
        minus = jax.tree.map(lambda t, d: t - eps * d, theta, v)
        gp, gm = gate_grad(plus, gates, batch), gate_grad(minus, gates, batch)
        return jax.tree.map(lambda a, b: (a - b) / (2 * eps), gp, gm)
    raise ConfigError(f"unknown darts mode {mode!r}; valid: 'exact', 'finite_difference'")


# ------------------------------------------------------------------------------------- search step
def init_search_state(lora: LoraParams, gates: Gates, search: SearchConfig) -> SearchState:
    """A fresh search state (copies of ``lora`` and ``gates``: the jitted step donates its state)."""
    lora, gates = jax.tree.map(jnp.copy, (lora, gates))
    return SearchState(inner=InnerState(lora, inner_optimizer(search).init(lora)), gates=gates,
                       gate_opt_state=outer_optimizer(search).init(gates), step=jnp.zeros((), jnp.int32))


def program_key(search: SearchConfig) -> SearchConfig:
    """``search`` with the fields that do not change the compiled step set to fixed values.

    The number of outer steps enters the program only through a cosine inner schedule; batch sizes come
    in through the batches' shapes; ``log_every`` is host-side. So a longer search, or another batch size
    of the same shape, reuses the compiled step.
    """
    fixed: dict[str, Any] = {"batch_size": 1, "val_batch_size": 1, "log_every": 1}
    if search.inner_schedule == "constant":
        fixed["steps"] = 1
    return dataclasses.replace(search, **fixed)


def make_search_step(config: ModelConfig, search: SearchConfig) -> Callable[..., tuple[SearchState, dict]]:
    """The pure search step for ``config`` and ``search`` (see :func:`_search_step`), cached on what changes it."""
    return _search_step(config, program_key(search))


def search_step(losses: Callable[[Any], tuple[LossFn, LossFn]], search: SearchConfig,
                optimizer: optax.GradientTransformation | None = None) -> Callable[..., tuple[SearchState, dict]]:
    """The pure search step ``(base, state, train_batches[K], val_batch) -> (state, metrics)`` of any model.

    ``losses(base)`` gives ``(train_loss, val_loss)``, each ``loss(lora, gates, batch)`` with the frozen
    base closed over (never differentiated): the built-in decoder's params or a Flax NNX model's base state.
    K inner steps + hypergradient + outer Adam update on the gates; ``optimizer`` is the inner optimizer
    (default :func:`inner_optimizer`). For AutoLoRA's ``darts`` with ``darts_redo_inner``, the inner step is
    redone from the old LoRA with the updated gates.
    """
    inner_opt, outer_opt = optimizer or inner_optimizer(search), outer_optimizer(search)

    def step(base: Any, state: SearchState, train_batches: Batch, val_batch: Batch) -> tuple[SearchState, dict]:
        train_loss, val_loss = losses(base)
        hg, new_inner, metrics = hypergradient(
            search.hypergradient, train_loss, val_loss, inner_opt, state.gates, state.inner, train_batches, val_batch,
            remat=search.remat, reset_optimizer=search.reset_inner_optimizer, darts_mode=search.darts_mode)
        updates, gate_opt_state = outer_opt.update(hg, state.gate_opt_state, state.gates)
        gates = optax.apply_updates(state.gates, updates)
        if search.hypergradient == "darts" and search.darts_redo_inner:
            batch = jax.tree.map(lambda x: x[0], train_batches)
            new_inner, _ = inner_step(train_loss, inner_opt, jax.lax.stop_gradient(gates), state.inner, batch,
                                      search.reset_inner_optimizer)
        hg_norm = optax.tree.norm(hg)
        metrics = dict(metrics, hypergrad_norm=hg_norm,
                       finite=jnp.isfinite(hg_norm) & jnp.isfinite(metrics["val_loss"]))
        return SearchState(new_inner, gates, gate_opt_state, state.step + 1), metrics

    return step


@functools.lru_cache(maxsize=32)
def _search_step(config: ModelConfig, search: SearchConfig) -> Callable[..., tuple[SearchState, dict]]:
    """The built-in decoder's search step ``(params, state, train_batches[K], val_batch) -> (state, metrics)``.

    Jit it yourself (``jax.jit(step, donate_argnums=1)``) or let :func:`flexora_jax.loops.compile_step` jit
    it over a mesh; cached on the configs, so every search with the same settings gets the same function
    and therefore the same compiled program.
    """
    config = stage_config(config, search.hypergradient, search.darts_mode)  # XLA attention where AD is second order

    def losses(params: Any) -> tuple[LossFn, LossFn]:
        loss = make_loss_fn(config, params)
        return loss, loss

    return search_step(losses, search)


# ------------------------------------------------------------------------------------- host loop
@dataclasses.dataclass
class SearchResult:
    """Final gates (host copies), their trajectory (layer gate values per step), the selection, the state."""

    gates: Gates
    selection: Selection
    trajectory: list[list[float]]
    history: list[dict]
    state: SearchState


@functools.singledispatch
def search(config: ModelConfig, params: Any, lora_config: LoraConfig, search_config: SearchConfig,
           train: Dataset, val: Dataset, *, gates: GateKind = "layer", selection: SelectionConfig = SelectionConfig(),
           seed: int = 0, callback: Callable[[int, dict], None] | None = None, state: SearchState | None = None,
           sampler_states: dict | None = None, mesh: Any = None) -> SearchResult:
    """Run the bilevel search and select layers / ranks.

    Args:
      config, params: the frozen base model.
      lora_config: LoRA of the search model (usually all layers: the targets to choose among).
      search_config: estimator, K, steps, optimizers.
      train, val: tokenised datasets (dicts of arrays); batches are drawn with ``seed``.
      gates: "layer" (Flexora), "rank" (AutoLoRA) or "both".
      selection: how the final layer gates become layers.
      callback: ``callback(step, record)`` after each step (logging, checkpoints); ``record`` holds the
        metrics, the gate values, the state and the sampler positions. It may raise to stop the search.
      state, sampler_states: resume from a checkpoint.
      mesh: a ``jax.sharding.Mesh`` (params and state are placed sharded on it, batches assembled from
        each process's rows); None runs on one device.
    Raises:
      NumericsError: a non-finite hypergradient or validation loss, naming the step.

    A Flax NNX model as the first argument dispatches to :func:`flexora_jax.nnx.search_nnx`
    (``fj.search(model, search_config, train, val, loss_fn=...)``).
    """
    sc = search_config

    def fresh() -> SearchState:
        lora = init_lora(config, lora_config, jax.random.key(seed))
        return init_search_state(lora, init_gates(gates, config.num_hidden_layers, dict(lora.spec.r_max),
                                                  power=sc.gate_power), sc)

    if state is None:
        state = fresh()
    else:
        check_tree_shapes(state, jax.eval_shape(fresh), "search: the given state")
    train_sampler = BatchSampler(train, sc.batch_size, seed=seed)
    val_sampler = BatchSampler(val, sc.val_batch_size, seed=seed + 1)
    if sampler_states is not None:
        train_sampler.restore(sampler_states["train"])
        val_sampler.restore(sampler_states["val"])
    example = (train_sampler.abstract(sc.inner_steps), val_sampler.abstract())
    program = loops.compile_step(make_search_step(config, sc), loops.default_mesh(mesh), (params, state, *example),
                                 {2: 1, 3: 0})
    params, state = program.place(params, state)
    trajectory: list[list[float]] = []
    history: list[dict] = []

    def on_step(step: int, state: SearchState, metrics: dict) -> None:
        if not bool(metrics["finite"]):
            raise NumericsError(_nonfinite_message(step, metrics, sc))
        record = {"step": step, "val_loss": float(metrics["val_loss"]), "train_loss": float(metrics["train_loss"]),
                  "hypergrad_norm": float(metrics["hypergrad_norm"])}
        values = gate_values(_host(state.gates), config.num_hidden_layers)
        if "layer" in values:
            record["gates"] = [round(float(x), 6) for x in np.asarray(values["layer"])]
            trajectory.append(record["gates"])
        history.append(record)
        if callback is not None:
            callback(step, dict(record, state=state,
                                sampler={"train": train_sampler.state(), "val": val_sampler.state()}))

    state = loops.run(program, params, state, lambda: (train_sampler.next_stacked(sc.inner_steps), val_sampler.next()),
                      int(state.step), sc.steps, [on_step])
    final = _host(state.gates)
    return SearchResult(gates=final, selection=select(final, lora_config, config.num_hidden_layers, selection),
                        trajectory=trajectory, history=history, state=state)


def _nonfinite_message(step: int, metrics: dict, sc: SearchConfig) -> str:
    """Which quantity went non-finite at ``step``, and the remedies that fit this search."""
    values = {k: float(metrics[k]) for k in ("train_loss", "val_loss", "hypergrad_norm")}
    bad = ", ".join(f"{k}={v}" for k, v in values.items() if not np.isfinite(v))
    if not np.isfinite(values["train_loss"]):
        hint = ("the training loss itself is non-finite: check the base model's weights and the data, and lower "
                "search.inner_lr")
    elif not np.isfinite(values["val_loss"]):
        hint = "the LoRA diverged in the inner steps: lower search.inner_lr or set search.inner_grad_clip"
    elif sc.hypergradient in ("unrolled", "forward", "darts"):
        hint = ("only the hypergradient is non-finite: keep search.inner_eps_root > 0 (Adam differentiated through), "
                "lower search.inner_lr, or use search.hypergradient=first_order")
    else:
        hint = "the gate gradient is non-finite: lower search.outer_lr"
    return f"non-finite search step {step} ({bad}; search.hypergradient={sc.hypergradient}): {hint}"


def _host(tree: Any) -> Any:
    """Host-local copies of (possibly sharded, multi-process) arrays, readable on every process."""
    return jax.tree.map(jnp.asarray, fetch(tree))
