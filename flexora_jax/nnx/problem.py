"""A Flax NNX model as a :class:`flexora_jax.problem.Problem`: the NNX face's entrance to the one engine.

:func:`problem` splits a model that :func:`flexora_jax.nnx.add_lora` adapted by variable type
(:func:`~flexora_jax.nnx.split_for_search`): ``base`` = its ``nnx.Param`` (and every other variable) plus its
gate state, ``lora`` = its ``nnx.LoRAParam``, the hyperparameters laid out by its gates
(:class:`~flexora_jax.nnx.GateLayout`); the loss merges the model back inside the jitted step and calls
``loss_fn(model, batch)``. Results are written back into the model (``nnx.update``), selections read in
its own module paths. A model that states its own problem (a ``lora_problem`` method, as
``fj.nnx.LlamaForCausalLM`` does through the decoder's functional core) is asked for it instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from flexora_jax.config import SelectionConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates
from flexora_jax.models.losses import causal_lm_loss
from flexora_jax.nnx.search import GateLayout, make_loss, select_paths, split_for_search, update_model
from flexora_jax.problem import Problem
from flexora_jax.selection import Selection

Batch = dict[str, jax.Array]
ModelLoss = Callable[[nnx.Module, Batch], jax.Array]


def causal_lm(model: nnx.Module, batch: Batch) -> jax.Array:
    """The default ``loss_fn``: next-token cross-entropy on the answer tokens, ``model(input_ids) -> logits``.

    The only loss that needs ``loss_mask`` in the data; a custom ``loss_fn`` reads what it wants.
    """
    return causal_lm_loss(model(batch["input_ids"]), batch["input_ids"], batch["loss_mask"])


def problem(model: nnx.Module, loss_fn: ModelLoss | None = None, val_loss_fn: ModelLoss | None = None) -> Problem:
    """``model`` as a :class:`Problem` (see the module docstring); ``loss_fn(model, batch)`` defaults to
    :func:`causal_lm` (a model's own ``lora_problem`` decides its default), ``val_loss_fn`` to ``loss_fn``."""
    own = getattr(model, "lora_problem", None)
    if callable(own):
        return own(loss_fn=loss_fn, val_loss_fn=val_loss_fn)
    if not isinstance(model, nnx.Module):
        raise ConfigError(f"expected a Flax NNX model (nnx.Module) or a fj.Problem, got {type(model).__name__}")

    def select_with(hyper: Gates, selection: SelectionConfig) -> Selection:
        return select_paths(model, hyper, selection.rule, selection.top_k, selection.threshold)

    def write(new_lora: Any, hyper: Gates | None) -> nnx.Module:
        return update_model(model, jax.tree.map(jax.numpy.asarray, new_lora), hyper)

    return split_problem(
        model,
        loss_fn or causal_lm,
        val_loss_fn,
        select=select_with,
        write=write,
        count=_count if loss_fn is None else _rows,
        requires=("input_ids", "loss_mask") if loss_fn is None else ("input_ids",),
        vocab_size=_logits_width(model) if loss_fn is None else None,
    )


def _logits_width(model: nnx.Module) -> int | None:
    """The vocabulary :func:`causal_lm` scores token ids against: the width of ``model(input_ids)``'s logits,
    from one abstract call on a ``[1, 2]`` batch (no compile); None when the model cannot be called that way.
    Token ids are then checked against it before the first step (an id past the logits is a NaN loss later)."""
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, 2), jax.numpy.int32)
    try:
        logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, tokens)
    except Exception:  # a model that needs more than input_ids: the data check keeps ids >= 0 only
        return None
    shape = getattr(logits, "shape", ())
    return int(shape[-1]) if len(shape) == 3 else None


def split_problem(
    model: nnx.Module,
    loss_fn: ModelLoss,
    val_loss_fn: ModelLoss | None,
    *,
    select: Callable[[Gates, SelectionConfig], Selection],
    write: Callable[[Any, Gates | None], Any],
    count: Callable[[Batch], jax.Array] | None = None,
    requires: tuple[str, ...] = ("input_ids",),
    vocab_size: int | None = None,
) -> Problem:
    """The problem of ``model`` split by variable type and merged around ``loss_fn`` inside the step, with the
    given selection rule and write-back (:func:`problem` for ``add_lora`` models, ``LlamaForCausalLM`` with a
    custom loss)."""
    graphdef, base, lora, gate_vars = split_for_search(model)
    layout = GateLayout.of(gate_vars)
    val = None if val_loss_fn is None else make_loss(graphdef, layout, val_loss_fn)
    sites = [(".".join(map(str, e.path)), e.role, e.layers, e.shape) for e in layout.entries]
    identity = {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "gates": sites,
        "loss_fn": _name(loss_fn),
        "val_loss_fn": _name(val_loss_fn),
    }
    return Problem(
        loss=make_loss(graphdef, layout, loss_fn),
        base={"model": base, "gates": gate_vars},
        lora=lora,
        layout=layout.hyper_layout(),
        select=select,
        write=write,
        val_loss=val,
        identity=identity,
        count=count or _rows,
        requires=requires,
        vocab_size=vocab_size,
    )


def _count(batch: Batch) -> jax.Array:
    return jax.numpy.sum(batch["loss_mask"][:, 1:]).astype(jax.numpy.float32)


def _rows(batch: Batch) -> jax.Array:
    first = jax.tree.leaves(batch)[0]
    return jax.numpy.asarray(jax.numpy.shape(first)[0], jax.numpy.float32)


def _name(fn: Any) -> str | None:
    return None if fn is None else f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def as_problem(
    model: Any, loss_fn: ModelLoss | None = None, val_loss_fn: ModelLoss | None = None, what: str = "fj.search"
) -> Problem:
    """The problem a public entry point runs: a :class:`Problem` as it is, an NNX model through :func:`problem`.

    A ``ModelConfig`` (the functional signature of earlier versions) is refused with the call that replaces it.
    """
    if isinstance(model, Problem):
        if loss_fn is not None or val_loss_fn is not None:
            raise ConfigError(
                f"{what}: loss_fn / val_loss_fn apply to an NNX model; a Problem carries its own loss "
                "(dataclasses.replace(problem, loss=...))"
            )
        return model
    if isinstance(model, nnx.Module):
        return problem(model, loss_fn, val_loss_fn)
    hint = ""
    if type(model).__name__ == "ModelConfig":
        hint = (
            f"; the functional form {what}(config, params, lora_config, ...) is now "
            f"{what}(fj.decoder_problem(config, params, lora_config), ...) or {what} of a "
            "fj.nnx.LlamaForCausalLM.from_params(config, params, lora_config, gates=...)"
        )
    raise ConfigError(
        f"{what}: the first argument must be a Flax NNX model with LoRA (fj.nnx.add_lora, "
        f"fj.nnx.LlamaForCausalLM) or a fj.Problem, got {type(model).__name__}{hint}"
    )


__all__ = ["as_problem", "causal_lm", "problem", "split_problem"]
