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
- ``layers``: the layer indices the gate covers (one, or the stacked layers in order);
  ``site``: the module path a rank gate belongs to.

A gate holds the *multiplier* its LoRA branch applies, in every model (``fj.nnx.LlamaForCausalLM`` too):
1.0 is plain LoRA, 0.0 removes the branch exactly. The raw hyperparameters the search differentiates
(Flexora's alpha, AutoLoRA's beta) live in a :class:`flexora_jax.gates.Gates` pytree, and one function,
:func:`flexora_jax.gates.multipliers`, maps them to these values.
"""

from __future__ import annotations

from flax import nnx

#: What a gate multiplies: one layer's LoRA branches, or each rank-1 component of one module.
GATE_ROLES = ("layer", "rank")


class Gate(nnx.Variable):
    """A gate of the LoRA branch: the hyperparameter of the bilevel search, never trained by the inner loop."""
