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
(K inner steps + hypergradient + outer update, :func:`search_step`) is one pure function of any problem's
loss, jitted once per search by the driver (:mod:`flexora_jax.engine` runs it; this module holds no loop).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexora_jax.config import ModelConfig, SearchConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates, layer_gate_values
from flexora_jax.lora import LoraParams
from flexora_jax.models.attention import stage_config
from flexora_jax.models.losses import lm_loss

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Gates | None, Batch], jax.Array]
#: ``loss(base, lora, hyper, batch, key) -> scalar``: a :class:`flexora_jax.problem.Problem`'s loss
ProblemLoss = Callable[[Any, Any, Gates | None, Batch, Any], jax.Array]


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
    """The decoder's ``loss(lora, gates, batch)`` with the frozen base closed over (never differentiated)."""

    def loss(lora, gates, batch):
        return lm_loss(config, params, lora, gates, batch)

    return loss


def inner_optimizer(search: SearchConfig) -> optax.GradientTransformation:
    """The inner optimizer from a SearchConfig (AdamW keeps ``eps_root > 0``: finite hypergradients)."""
    return _inner_optimizer(program_key(search))


@functools.lru_cache(maxsize=64)
def _inner_optimizer(search: SearchConfig) -> optax.GradientTransformation:
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
def inner_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    gates: Gates | None,
    state: InnerState,
    batch: Batch,
    reset_optimizer: bool = False,
) -> tuple[InnerState, jax.Array]:
    """One optimizer step of the LoRA params on a training batch, gates held fixed (but traced)."""
    loss, grads = jax.value_and_grad(loss_fn)(state.lora, gates, batch)
    opt_state = optimizer.init(state.lora) if reset_optimizer else state.opt_state
    updates, opt_state = optimizer.update(grads, opt_state, state.lora)
    return InnerState(optax.apply_updates(state.lora, updates), opt_state), loss


def unroll(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    gates: Gates | None,
    state: InnerState,
    batches: Batch,
    remat: bool = True,
    reset_optimizer: bool = False,
) -> tuple[InnerState, jax.Array]:
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


def hypergradient(
    estimator: str,
    train_loss: LossFn,
    val_loss: LossFn,
    optimizer: optax.GradientTransformation,
    gates: Gates,
    state: InnerState,
    train_batches: Batch,
    val_batch: Batch,
    remat: bool = True,
    reset_optimizer: bool = False,
    darts_mode: str = "exact",
    unrolled_mode: str = "mixed",
    second_order_loss: LossFn | None = None,
) -> tuple[Gates, InnerState, dict]:
    """The hypergradient w.r.t. the raw ``gates``, the advanced inner state, and metrics.

    Args:
      estimator: "unrolled", "forward", "first_order" or "darts" (see the module docstring).
      train_loss, val_loss: ``loss(lora, gates, batch)``; usually the same function.
      optimizer: the inner optax optimizer (differentiable for unrolled/forward: AdamW needs eps_root > 0).
      gates: raw gate values (the differentiated hyperparameters).
      state: inner state before this step (a constant: truncated unrolling).
      train_batches: K training batches stacked on a leading axis (darts uses only the first).
      val_batch: one validation batch.
      unrolled_mode: "mixed" (:func:`unrolled_mixed`: a forward sweep, then a reverse sweep of forward-over-
        reverse Hessian-vector products) or "reverse" (reverse mode through the rematerialised scan).
      second_order_loss: ``train_loss`` where it is differentiated twice (the same function computed with
        second-order-capable kernels); None: ``train_loss`` everywhere.
    Returns:
      (hypergradient as a Gates pytree, inner state after the K steps, metrics dict).
    """
    twice = second_order_loss or train_loss
    if estimator in ("unrolled", "forward") or (estimator == "darts" and darts_mode == "exact"):
        check_differentiable(optimizer)
    if estimator == "unrolled" and unrolled_mode == "mixed":
        return unrolled_mixed(
            train_loss, val_loss, optimizer, gates, state, train_batches, val_batch, reset_optimizer, twice
        )
    if estimator == "unrolled" and unrolled_mode != "reverse":
        raise ConfigError(f"unknown unrolled_mode {unrolled_mode!r}; valid: 'mixed', 'reverse'")
    if estimator in ("unrolled", "forward"):
        train_loss = twice

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
        implicit = darts_implicit(twice if darts_mode == "exact" else train_loss, theta, gates, batch, v, darts_mode)
        hg = jax.tree.map(lambda d, i: d - i, direct, implicit)
        return hg, stepped, {"val_loss": vloss, "train_loss": tloss}

    raise ConfigError(
        f"unknown hypergradient estimator {estimator!r}; valid: 'unrolled', 'forward', 'first_order', 'darts'"
    )


def unrolled_mixed(
    train_loss: LossFn,
    val_loss: LossFn,
    optimizer: optax.GradientTransformation,
    gates: Gates,
    state: InnerState,
    train_batches: Batch,
    val_batch: Batch,
    reset_optimizer: bool = False,
    second_order_loss: LossFn | None = None,
) -> tuple[Gates, InnerState, dict]:
    """The ``unrolled`` hypergradient in mixed mode: the same derivative as reverse mode through the K steps,
    at about three plain steps per inner step instead of about five, memory flat in K.

    1. Forward sweep (a ``lax.scan``): K inner steps, keeping each step's LoRA, optimizer state and gradient
       ``g_k`` (LoRA-sized; no activations). Only first derivatives: any attention kernel serves.
    2. ``(lambda_theta, hg) = grad L_val(theta_K, gates)``.
    3. Reverse sweep (a reverse ``lax.scan``): through step k's optimizer update ``(theta, s) <- U(g_k, s_k,
       theta_k)`` by ``jax.vjp`` (elementwise, cheap: ``mu_g``, ``mu_s``, ``mu_theta``), then one
       forward-over-reverse product ``jvp(grad_{theta,gates} L_train, (theta_k, gates), (mu_g, 0))``, which by
       the Hessian's symmetry gives both ``H_theta_theta mu_g`` (the LoRA adjoint's new term) and
       ``H_gates_theta mu_g`` (step k's share of the hypergradient) in one pass. The gradient ``g_k`` the
       update saw is reused from the forward sweep, not recomputed.
    Non-float optimizer state (step counters) is carried as a constant.
    """
    twice = second_order_loss or train_loss
    frozen = jax.lax.stop_gradient(gates)

    def forward(inner: InnerState, batch: Batch):
        loss, grads = jax.value_and_grad(train_loss)(inner.lora, frozen, batch)
        opt_state = optimizer.init(inner.lora) if reset_optimizer else inner.opt_state
        updates, opt_state = optimizer.update(grads, opt_state, inner.lora)
        return InnerState(optax.apply_updates(inner.lora, updates), opt_state), (inner, grads, loss)

    final, (inners, grads, losses) = jax.lax.scan(forward, state, train_batches)
    vloss, (lam_theta, hg) = jax.value_and_grad(val_loss, argnums=(0, 1))(final.lora, gates, val_batch)
    float_leaves, _ = _split_inexact(final.opt_state)
    lam_s = [jnp.zeros_like(x) for x in float_leaves]
    gate_grad = jax.grad(twice, argnums=(0, 1))

    def backward(carry, xs):
        lam_theta, lam_s, hg = carry
        inner, g, batch = xs
        s_float, rebuild = _split_inexact(inner.opt_state)

        def update(g, s_float, theta):
            s = optimizer.init(theta) if reset_optimizer else rebuild(s_float)
            updates, s = optimizer.update(g, s, theta)
            return optax.apply_updates(theta, updates), _split_inexact(s)[0]

        _, vjp = jax.vjp(update, g, s_float, inner.lora)
        mu_g, mu_s, mu_theta = vjp((lam_theta, lam_s))
        zero = jax.tree.map(jnp.zeros_like, gates)
        _, (h_theta, h_gates) = jax.jvp(lambda th, ga: gate_grad(th, ga, batch), (inner.lora, gates), (mu_g, zero))
        add = functools.partial(jax.tree.map, jnp.add)
        return (add(mu_theta, h_theta), mu_s, add(hg, h_gates)), None

    (_, _, hg), _ = jax.lax.scan(backward, (lam_theta, lam_s, hg), (inners, grads, train_batches), reverse=True)
    return hg, final, {"val_loss": vloss, "train_loss": jnp.mean(losses)}


def _split_inexact(tree: Any) -> tuple[list, Callable[[list], Any]]:
    """The floating leaves of ``tree`` (what is differentiated) and a function putting new ones back beside the
    others (integer step counters, kept as they are)."""
    leaves, treedef = jax.tree.flatten(tree)
    inexact = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]

    def rebuild(new: list) -> Any:
        it = iter(new)
        return jax.tree.unflatten(treedef, [next(it) if f else x for x, f in zip(leaves, inexact)])

    return [x for x, f in zip(leaves, inexact) if f], rebuild


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
        raise ConfigError(
            "the inner optimizer's update has no derivative at a zero gradient (Adam / AdamW with "
            "eps_root=0: the hypergradient is NaN while LoRA's B is 0); use eps_root > 0, e.g. "
            "optax.adamw(lr, eps_root=1e-16), or the first_order estimator"
        )


def darts_implicit(
    train_loss: LossFn, theta: LoraParams, gates: Gates, batch: Batch, v: LoraParams, mode: str = "exact"
) -> Gates:
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
def init_search_state(
    lora: Any, gates: Gates, search: SearchConfig, optimizer: optax.GradientTransformation | None = None
) -> SearchState:
    """A fresh search state (copies of ``lora`` and ``gates``: the jitted step donates its state)."""
    lora, gates = jax.tree.map(jnp.copy, (lora, gates))
    inner = optimizer or inner_optimizer(search)
    return SearchState(
        inner=InnerState(lora, inner.init(lora)),
        gates=gates,
        gate_opt_state=outer_optimizer(search).init(gates),
        step=jnp.zeros((), jnp.int32),
    )


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


def search_step(
    loss: ProblemLoss,
    search: SearchConfig,
    optimizer: optax.GradientTransformation | None = None,
    val_loss: ProblemLoss | None = None,
    second_order_loss: ProblemLoss | None = None,
) -> Callable[..., tuple[SearchState, dict]]:
    """The pure search step ``(base, state, train_batches[K], val_batch) -> (state, metrics)`` of any problem.

    ``loss(base, lora, hyper, batch, key)`` is the problem's loss (:class:`flexora_jax.problem.Problem`), the
    frozen ``base`` an argument of the step (never differentiated), ``val_loss`` the outer objective if it
    differs. K inner steps + hypergradient + outer Adam update on the gates; ``optimizer`` is the inner
    optimizer (default :func:`inner_optimizer`). For AutoLoRA's ``darts`` with ``darts_redo_inner``, the inner
    step is redone from the old LoRA with the updated gates. Cached on its arguments, so every search with the
    same problem loss and settings gets the same function, hence the same compiled program.
    ``second_order_loss``: ``loss`` as computed where it is differentiated twice (the problem's
    :meth:`~flexora_jax.problem.Problem.for_stage`); None: ``loss`` itself.
    """
    return _search_step(loss, program_key(search), optimizer, val_loss, second_order_loss)


@functools.lru_cache(maxsize=64)
def _search_step(
    loss: ProblemLoss,
    search: SearchConfig,
    optimizer: optax.GradientTransformation | None,
    val_loss: ProblemLoss | None,
    second_order_loss: ProblemLoss | None,
) -> Callable[..., tuple[SearchState, dict]]:
    inner_opt, outer_opt = optimizer or inner_optimizer(search), outer_optimizer(search)
    outer = val_loss or loss
    twice = second_order_loss or loss

    def step(base: Any, state: SearchState, train_batches: Batch, val_batch: Batch) -> tuple[SearchState, dict]:
        def train_loss(lora, gates, batch):
            return loss(base, lora, gates, batch, None)

        def valid_loss(lora, gates, batch):
            return outer(base, lora, gates, batch, None)

        def second_order(lora, gates, batch):
            return twice(base, lora, gates, batch, None)

        hg, new_inner, metrics = hypergradient(
            search.hypergradient,
            train_loss,
            valid_loss,
            inner_opt,
            state.gates,
            state.inner,
            train_batches,
            val_batch,
            remat=search.remat,
            reset_optimizer=search.reset_inner_optimizer,
            darts_mode=search.darts_mode,
            unrolled_mode=search.unrolled_mode,
            second_order_loss=second_order,
        )
        updates, gate_opt_state = outer_opt.update(hg, state.gate_opt_state, state.gates)
        gates = optax.apply_updates(state.gates, updates)
        if search.hypergradient == "darts" and search.darts_redo_inner:
            batch = jax.tree.map(lambda x: x[0], train_batches)
            new_inner, _ = inner_step(
                train_loss, inner_opt, jax.lax.stop_gradient(gates), state.inner, batch, search.reset_inner_optimizer
            )
        hg_norm = optax.tree.norm(hg)
        metrics = dict(
            metrics, hypergrad_norm=hg_norm, finite=jnp.isfinite(hg_norm) & jnp.isfinite(metrics["val_loss"])
        )
        if gates.layer is not None:
            metrics["layer_gates"] = layer_gate_values(gates)
        return SearchState(new_inner, gates, gate_opt_state, state.step + 1), metrics

    return step


def make_search_step(config: ModelConfig, search: SearchConfig) -> Callable[..., tuple[SearchState, dict]]:
    """The built-in decoder's search step ``(params, state, train_batches[K], val_batch) -> (state, metrics)``
    over a ``LoraParams`` (start from :func:`init_search_state` ``(init_lora(...), init_gates(...), search)``).

    The functional convenience over :func:`search_step`; jit it yourself (``jax.jit(step, donate_argnums=1)``).
    ``fj.search`` runs the same step through :func:`flexora_jax.problem.decoder_problem`.
    """
    twice = _plain_decoder_loss(stage_config(config, search.hypergradient, search.darts_mode))
    # as fj.search: passes that differentiate once may take the first-order stage's (fused) attention
    reverse = search.hypergradient == "forward" or search.unrolled_mode == "reverse"
    first = twice if reverse else _plain_decoder_loss(stage_config(config))
    return search_step(first, search, second_order_loss=None if first is twice else twice)


@functools.lru_cache(maxsize=32)
def _plain_decoder_loss(config: ModelConfig) -> ProblemLoss:
    def loss(params: Any, lora: LoraParams, gates: Gates | None, batch: Batch, key: Any = None) -> jax.Array:
        return lm_loss(config, params, lora, gates, batch, key)

    return loss


def nonfinite_message(step: int, metrics: dict, sc: SearchConfig) -> str:
    """Which quantity went non-finite at ``step``, and the remedies that fit this search."""
    values = {k: float(metrics[k]) for k in ("train_loss", "val_loss", "hypergrad_norm")}
    bad = ", ".join(f"{k}={v}" for k, v in values.items() if not np.isfinite(v))
    if not np.isfinite(values["train_loss"]):
        hint = (
            "the training loss itself is non-finite: check the base model's weights and the data, and lower "
            "search.inner_lr"
        )
    elif not np.isfinite(values["val_loss"]):
        hint = "the LoRA diverged in the inner steps: lower search.inner_lr or set search.inner_grad_clip"
    elif sc.hypergradient in ("unrolled", "forward", "darts"):
        hint = (
            "only the hypergradient is non-finite: keep search.inner_eps_root > 0 (Adam differentiated through), "
            "lower search.inner_lr, or use search.hypergradient=first_order"
        )
    else:
        hint = "the gate gradient is non-finite: lower search.outer_lr"
    return f"non-finite search step {step} ({bad}; search.hypergradient={sc.hypergradient}): {hint}"
