"""Flexora / AutoLoRA on Flax NNX models: the built-in decoder as an NNX module, gated LoRA on any NNX model.

Names read next to ``flax.nnx``::

    from flax import nnx
    from flexora_jax import nnx as fnnx

    model = MyFlaxModel(rngs=nnx.Rngs(0))                      # any NNX model (or fnnx.LlamaForCausalLM)
    fnnx.add_lora(model, ("q", "v"), rank=8, gates="layer", rngs=nnx.Rngs(1))
    graphdef, base, lora, gates = fnnx.split_for_search(model)  # nnx.Param / nnx.LoRAParam / fnnx.Gate
    result = fj.search(model, search_config, train, val, loss_fn=loss_fn)  # the one engine; or by hand:
    step = fnnx.make_split_search_step(graphdef, gates, loss_fn, search_config)   # loss_fn(model, batch)
    state = fnnx.init_search_state(lora, fnnx.init_hyperparameters(gates, "layer"), search_config)
    state, metrics = step(base, state, train_batches, val_batch)            # jitted, compiled once
    selection = fj.select(model, state.gates)                  # layers / ranks in the model's own paths
    fnnx.apply_selection(model, selection, rngs=nnx.Rngs(2))   # fresh LoRA on those only
    nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam) # fine-tune with any NNX trainer
    fnnx.save_adapter(model, "out/adapter", selection)         # safetensors by NNX path + selection.json
    fnnx.save_peft(model, "out/peft", peft_name=lambda path, layer: ...)  # PEFT names through a hook
    fnnx.merge_lora(model)                                     # fold LoRA x gates into the kernels (fp32)

Design: why split by variable type keeps the bilevel core pure.
A gated-LoRA model holds three kinds of state with three different roles: the frozen base
(``nnx.Param``), the LoRA adapters the inner loop trains (``nnx.LoRAParam``) and the gates, the
hyperparameters the outer loop differentiates (:class:`Gate`). ``nnx.split(model, nnx.LoRAParam,
Gate, ...)`` turns the one stateful module into exactly the three pytrees the functional core
(:mod:`flexora_jax.bilevel`) is written over, plus a static graphdef. Merging them back happens inside
the jitted loss, so every transform the core applies (``jax.grad`` w.r.t. LoRA, reverse mode through
a ``lax.scan`` of K inner steps w.r.t. the gates, ``jax.jvp`` for DARTS, forward mode) sees a pure
function ``loss(base, lora, hyper, batch, key)`` of explicit arguments: no hidden module state, no mutation
under a transform, nothing the core has to know about NNX, and the same estimators, verified
against finite differences, serve any model. Variable types are also what NNX users already select
on (``nnx.Optimizer(..., wrt=nnx.LoRAParam)``, ``nnx.state(model, Gate)``), so the searched model
trains with their own tools afterwards.

The gate variables hold the *multipliers* of the LoRA branch (1.0 = plain LoRA, 0 = no LoRA), not
Flexora's alpha, in every model (``LlamaForCausalLM`` too): the parametrisations that couple modules
(``w = L softmax(alpha)`` over all layers, ``softmax(beta)`` per module) are one function,
:func:`flexora_jax.gates.multipliers`, applied to the raw hyperparameters inside the jitted loss. A
module then needs nothing but its own gate, which is what makes layers stacked under ``nnx.scan``
simple (each step sees its slice) and keeps a zero gate an exact removal.

One engine: :func:`problem` makes a model the same :class:`flexora_jax.problem.Problem` value the built-in
decoder makes (``LlamaForCausalLM.lora_problem``), and ``fj.search`` / ``fj.finetune`` run every problem
through one driver with the same hooks.

LoRA attaches to any projection by re-evaluating the module's call with the LoRA term added where
its kernel is contracted (:mod:`flexora_jax.nnx.intercept`), so ``nnx.Linear``, ``nnx.Einsum``,
``nnx.LinearGeneral`` and a model's own ``jnp.einsum`` modules are all one case.
"""

from flexora_jax.nnx.export import load_adapter, save_adapter, save_peft
from flexora_jax.nnx.llama import LlamaForCausalLM
from flexora_jax.nnx.problem import as_problem, causal_lm, problem
from flexora_jax.nnx.search import (
    GateLayout,
    apply_selection,
    gate_state,
    init_hyperparameters,
    init_search_state,
    make_loss,
    make_split_search_step,
    select_paths,
    split_for_search,
    update_model,
)
from flexora_jax.nnx.surgery import LoraSite, add_lora, count_lora_params, lora_sites, merge_lora, remove_lora
from flexora_jax.nnx.variables import Gate

#: Names the NNX face had before the one engine, and where each went: a clear AttributeError, not a bare one.
_MOVED = {
    "search_nnx": "fj.search(model, search_config, train, val, ...)",
    "finetune_nnx": "fj.finetune(model, data, finetune_config, ...)",
    "select_nnx": "fj.select(model, gates, selection_config)",
    "select": "fj.select(model, gates, selection_config) (or fj.nnx.select_paths for the model's own paths)",
    "Selection": "fj.Selection (one Selection keyed by module path, for every model)",
    "NNXSearchResult": "fj.SearchResult",
    "NNXTrainState": "fj.TrainState (fj.finetune's state= / checkpoint_dir= resume it)",
    "make_search_step": "fj.nnx.make_split_search_step (or fj.search, which drives it)",
}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        raise AttributeError(f"flexora_jax.nnx.{name} was replaced by the one engine: use {_MOVED[name]}")
    raise AttributeError(f"module 'flexora_jax.nnx' has no attribute {name!r}")


__all__ = [
    # variables and models
    "Gate",
    "LlamaForCausalLM",
    # the engine's entrance: an NNX model as a fj.Problem (fj.search / fj.finetune / fj.select take the model)
    "problem",
    "as_problem",
    "causal_lm",
    # surgery
    "LoraSite",
    "add_lora",
    "merge_lora",
    "remove_lora",
    "lora_sites",
    "count_lora_params",
    # search over NNX states
    "split_for_search",
    "GateLayout",
    "init_hyperparameters",
    "gate_state",
    "make_loss",
    "make_split_search_step",
    "init_search_state",
    "update_model",
    "select_paths",
    "apply_selection",
    # export
    "save_adapter",
    "load_adapter",
    "save_peft",
]
