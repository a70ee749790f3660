"""The Flax NNX variable type of the gates, next to ``nnx.Param`` (frozen base) and ``nnx.LoRAParam``.

A :class:`Gate` is a variable of its own type so that ``nnx.split(model, nnx.LoRAParam, Gate, ...)``
separates the three roles of a gated-LoRA model, ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``
never touches it, and the bilevel search can hand it to ``jax.grad`` as the hyperparameter. It
subclasses ``nnx.Variable``, not ``nnx.Param``: a trainer that trains every ``Param`` must not train
the gates either.

Every gate carries metadata saying what it multiplies (read it with ``gate.get_metadata()``):

- ``role="layer"``: the multiplier of one layer's LoRA branch, shared by all adapted modules of that
  layer (Flexora). Shape ``()`` for a module of one layer, ``[L]`` for modules stacked over layers.
- ``role="rank"``: one multiplier per rank-1 component of one module (AutoLoRA). Shape ``[r]`` or
  ``[L, r]``.
- ``role="layer_logits"`` / ``role="rank_logits"``: the raw Flexora alpha [L] / AutoLoRA beta
  [L, r] of :class:`~flexora_jax.nnx.LlamaForCausalLM`, whose functional core applies the
  parametrisation itself (see :mod:`flexora_jax.gates`).
- ``layers``: the layer indices the gate covers (one, or the stacked layers in order);
  ``site``: the module path a rank gate belongs to.
"""

from __future__ import annotations

from flax import nnx

#: Gate roles whose value multiplies the LoRA branch directly.
MULTIPLIER_ROLES = ("layer", "rank")
#: Gate roles holding raw hyperparameters that the model parametrises itself.
LOGIT_ROLES = ("layer_logits", "rank_logits")


class Gate(nnx.Variable):
    """A gate of the LoRA branch: the hyperparameter of the bilevel search, never trained by the inner loop."""
