"""The one value the search and fine-tune drivers run on: a :class:`Problem`.

What a bilevel search and a fine-tune need of a model, whichever face made it:

- ``loss(base, lora, hyper, batch, key) -> scalar``: a pure function; ``base`` is frozen (an argument of
  every compiled step, never differentiated), ``lora`` is what the inner / fine-tune optimizer trains,
  ``hyper`` the raw gates (:class:`flexora_jax.gates.Gates`, differentiated by the search; None in a
  plain fine-tune) and ``key`` a dropout PRNG key (None: deterministic);
- the initial ``base`` and ``lora`` pytrees and the hyperparameters' :class:`HyperLayout`;
- how to read a selection from final gates (``select``) and how to write results back (``write``: into
  an NNX model in place, or as the decoder's ``LoraParams``).

Three ways make one: :func:`decoder_problem` (the built-in decoder's functional core over ``params``),
``fj.nnx.LlamaForCausalLM`` (the same, as an NNX module) and :func:`flexora_jax.nnx.problem` (any Flax NNX
model that :func:`flexora_jax.nnx.add_lora` adapted). The drivers in :mod:`flexora_jax.engine` take a
problem and never ask which face made it, so every feature (mesh, checkpoints and resume, validation and
keep-best, metric writers, signals) exists once for every model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax.config import LoraConfig, ModelConfig, SelectionConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates, GateValues
from flexora_jax.lora import LoraParams, LoraSpec, init_lora
from flexora_jax.models.attention import stage_config
from flexora_jax.models.losses import lm_loss
from flexora_jax.selection import Selection, select_lora

Batch = Mapping[str, jax.Array]
#: ``loss(base, lora, hyper, batch, key) -> scalar``
ProblemLoss = Callable[[Any, Any, Gates | None, Batch, jax.Array | None], jax.Array]
GATE_KINDS = ("layer", "rank", "both")


@dataclasses.dataclass(frozen=True)
class HyperLayout:
    """The raw hyperparameters a problem's gates take: Flexora's alpha over ``num_layers`` layers (None: the
    model has no layer gates) and AutoLoRA's beta per rank-gate site (``{site: shape}``, ``[..., r]``)."""

    num_layers: int | None
    rank_sites: tuple[tuple[str, tuple[int, ...]], ...] = ()
    dtype: str = "float32"  # of the raw gates (a float64 model searches float64 gates)

    def init(self, kind: str, power: int = 1) -> Gates:
        """Raw gates of a ``kind`` search ("layer", "rank", "both") at their neutral point (alpha = beta = 0)."""
        if kind not in GATE_KINDS:
            raise ConfigError(f"search gates must be one of {GATE_KINDS}, got {kind!r}")
        layer = rank = None
        if kind in ("layer", "both"):
            if self.num_layers is None:
                raise ConfigError(
                    f"a {kind!r} search needs layer gates, and this model has none "
                    "(fj.nnx.add_lora(..., gates='layer' or 'both'))"
                )
            layer = jnp.zeros((self.num_layers,), self.dtype)
        if kind in ("rank", "both"):
            if not self.rank_sites:
                raise ConfigError(
                    f"a {kind!r} search needs rank gates, and this model has none "
                    "(fj.nnx.add_lora(..., gates='rank' or 'both'))"
                )
            rank = {site: jnp.zeros(shape, self.dtype) for site, shape in self.rank_sites}
        return Gates(layer=layer, rank=rank, power=power)


def lm_token_count(batch: Batch) -> jax.Array:
    """The number of target tokens a causal-LM loss averages over (``loss_mask[:, 1:]``; the whole mask with
    ``labels`` / ``target_probs``); 1 per row when the batch has no ``loss_mask`` (a custom loss)."""
    if "loss_mask" not in batch:
        return jnp.asarray(jnp.shape(batch["input_ids"])[0], jnp.float32)
    mask = batch["loss_mask"]
    shifted = "target_probs" not in batch and "labels" not in batch
    return jnp.sum(mask[:, 1:] if shifted else mask).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What the search and fine-tune drivers need of a model (see the module docstring).

    Fields:
      loss: ``loss(base, lora, hyper, batch, key) -> scalar``, pure.
      base, lora: the frozen and the trained pytrees (their initial values).
      layout: the hyperparameters' layout (what :meth:`HyperLayout.init` builds).
      select: ``select(hyper, SelectionConfig) -> Selection``.
      write: ``write(lora, hyper) -> result``: the values back into the model (``hyper`` None: LoRA only).
      val_loss: the outer (validation) objective if it differs from ``loss``.
      count: target tokens of a batch (the weight of its mean loss in a dataset mean).
      dropout: whether ``loss`` uses its ``key`` (fine-tune with dropout).
      identity: JSON-able description (model, LoRA layout): checkpoints refuse another problem's state.
      requires: the data fields ``loss`` reads (checked before the first step).
      vocab_size: the model's vocabulary (token ids are checked against it); None: unknown.
      model_config: the built-in decoder's config when the problem is the decoder's (``base["params"]`` its
        params): what stages built for the decoder alone (AdaLoRA) need; None for other models.
      staged: ``staged(estimator, darts_mode) -> Problem``: this problem for a stage that differentiates
        its loss twice (the decoder picks an attention with second-order derivatives there); None: itself.
    """

    loss: ProblemLoss
    base: Any
    lora: Any
    layout: HyperLayout
    select: Callable[[Gates, SelectionConfig], Selection]
    write: Callable[[Any, Gates | None], Any]
    val_loss: ProblemLoss | None = None
    count: Callable[[Batch], jax.Array] = lm_token_count
    dropout: bool = False
    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    requires: tuple[str, ...] = ("input_ids",)
    vocab_size: int | None = None
    model_config: ModelConfig | None = None
    staged: Callable[[str | None, str], Problem] | None = None

    def for_stage(self, estimator: str | None, darts_mode: str = "exact") -> Problem:
        """This problem as a stage with ``estimator`` (None: a first-order stage) computes it."""
        return self if self.staged is None else self.staged(estimator, darts_mode)

    def fingerprint(self) -> str:
        """A short hash of :attr:`identity` and the trained pytree's structure and shapes."""
        shapes = [
            (
                jax.tree_util.keystr(p),
                tuple(np.shape(x)),
                str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype),
            )
            for p, x in jax.tree_util.tree_leaves_with_path(self.lora)
        ]
        text = json.dumps({"identity": self.identity, "lora": shapes}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------- the decoder
@functools.lru_cache(maxsize=64)
def decoder_loss(config: ModelConfig, spec: LoraSpec) -> ProblemLoss:
    """The decoder's problem loss for a (layout-free) LoRA ``spec``: cached, so every problem with the same
    model and LoRA targets shares one function, hence one compiled step (:func:`flexora_jax.loops.compile_step`)."""

    def loss(base: Any, weights: Any, hyper: Gates | None, batch: Batch, key: jax.Array | None = None) -> jax.Array:
        lora = LoraParams(weights, spec, base["lora_coef"])
        return lm_loss(config, base["params"], lora, base["gates"] if hyper is None else hyper, dict(batch), key)

    return loss


def decoder_problem(
    config: ModelConfig,
    params: Any,
    lora: LoraParams | LoraConfig,
    *,
    seed: int = 0,
    gates: GateValues | None = None,
    write: Callable[[LoraParams, Gates | None], Any] | None = None,
) -> Problem:
    """The built-in decoder as a :class:`Problem`: frozen ``params``, the LoRA to train (a ``LoraParams``, or a
    ``LoraConfig`` initialised with ``seed``), raw gates over its L layers and its modules' ranks.

    ``gates``: frozen gate multipliers a fine-tune applies (None: plain LoRA); a search replaces them by the
    multipliers of the raw gates it differentiates.

    The LoRA's layout (which blocks and ranks, their scales) travels as a traced array in ``base``
    (:meth:`LoraParams.traced_layout`), so every selection with the same targets and ``r_max`` runs one
    compiled fine-tune step. ``write`` (default: return the trained ``LoraParams`` under its static spec)
    receives the LoRA and the raw gates; ``fj.nnx.LlamaForCausalLM`` passes one that updates the module.
    """
    if isinstance(lora, LoraConfig):
        lora = init_lora(config, lora, jax.random.key(seed), params)
    if not isinstance(lora, LoraParams):
        raise ConfigError(f"decoder_problem: lora must be a LoraParams or a LoraConfig, got {type(lora).__name__}")
    if lora.coef is not None:
        raise ConfigError("decoder_problem: pass the LoRA under its static spec (not LoraParams.traced_layout())")
    spec, traced = lora.spec, lora.traced_layout()
    L = config.num_hidden_layers
    layout = HyperLayout(
        L, tuple((m, (L, r)) for m, r in spec.r_max), str(jnp.dtype(jnp.promote_types(config.dtype, jnp.float32)))
    )

    def write_back(weights: Any, hyper: Gates | None) -> Any:
        result = weights if isinstance(weights, LoraParams) else LoraParams(weights, spec)  # (AdaLoRA: pruned)
        return result if write is None else write(result, hyper)

    def select(hyper: Gates, selection: SelectionConfig) -> Selection:
        return select_lora(hyper, spec.config, L, selection)

    def staged(estimator: str | None, darts_mode: str) -> Problem:
        loss = decoder_loss(stage_config(config, estimator, darts_mode), traced.spec)
        return dataclasses.replace(problem, loss=loss, staged=None)

    problem = Problem(
        loss=decoder_loss(stage_config(config), traced.spec),
        base={"params": params, "lora_coef": traced.coef, "gates": gates},
        lora=traced.weights,
        layout=layout,
        select=select,
        write=write_back,
        dropout=spec.dropout > 0,
        identity={"model": "decoder", "config": dataclasses.asdict(config), "lora": spec.config.to_dict()},
        requires=("input_ids", "loss_mask"),
        vocab_size=config.vocab_size,
        model_config=config,
        staged=staged,
    )
    return problem
