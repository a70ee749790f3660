"""The built-in LLaMA-family decoder as a Flax NNX module, computed by the functional core.

``LlamaForCausalLM`` holds the same pytrees the functional core uses, as NNX variables: the base
params (``nnx.Param``, one attribute per key of :func:`flexora_jax.models.init_params`' layout, block
params stacked on a leading layer axis), the LoRA of every adapted projection (``nnx.LoRAParam``,
``layers.<module>.lora_a`` [L, d_in, r] / ``lora_b`` [L, r, d_out], and DoRA's ``lora_magnitude``
[L, d_out] with ``use_dora``: the stacked layout of :func:`~flexora_jax.nnx.add_lora`) and the gates
(:class:`~flexora_jax.nnx.Gate`, multipliers as in every model: ``layers.lora_gate`` [L] per layer,
``layers.<module>.lora_rank_gate`` [L, r] per rank-1 component). Its ``__call__`` rebuilds ``params`` /
``LoraParams`` / ``GateValues`` from those variables and calls :func:`flexora_jax.models.llama.forward`, so
the module and the function give identical logits, and the layer scan, the attention backends and the
chunked losses are the functional core's.

The engine sees it as the decoder's :class:`~flexora_jax.problem.Problem` (:meth:`lora_problem`, over
:func:`flexora_jax.problem.decoder_problem`): ``fj.search`` / ``fj.finetune`` run the functional core with
the LoRA layout traced, selections are the decoder's (``layers_to_transform``, ``rank_pattern``), and
results are written back here. The projections are containers, not callable modules: LoRA comes through
``lora_config`` (and :meth:`apply_selection`), not :func:`~flexora_jax.nnx.add_lora`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flexora_jax.adapters import export_peft
from flexora_jax.config import LoraConfig, ModelConfig
from flexora_jax.errors import ConfigError, check_tree_shapes
from flexora_jax.gates import Gates, GateValues, multipliers
from flexora_jax.lora import LoraParams, init_lora, make_spec, merge
from flexora_jax.models import abstract_params, forward, init_params, lm_loss, load_model
from flexora_jax.nnx.problem import ModelLoss, split_problem
from flexora_jax.nnx.variables import Gate
from flexora_jax.problem import Problem, decoder_problem
from flexora_jax.selection import Selection
from flexora_jax.sharding import REPLICATED, leaf_axes, sharding_metadata
from flexora_jax.validation import check_config_type

Params = dict[str, Any]


def _spec(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """Sharding metadata of a base param or LoRA leaf at ``path``: its logical axes (the functional core's, from
    :data:`flexora_jax.sharding.DECODER_AXES`) and the rules that map them (:func:`sharding_metadata`).

    An annotation only (``eager_sharding=False``): placement is the loader's (``load_model(mesh=...)``)
    or the caller's, through ``nnx.get_partition_spec`` (or :func:`flexora_jax.sharding.partition_specs`).
    """
    axes = leaf_axes(path, jnp.shape(value))
    return {**({} if axes == REPLICATED else sharding_metadata(axes)), "eager_sharding": False}


class ParamNode(nnx.Module):
    """One level of the functional params as an NNX node: dict keys become attributes (not callable)."""

    def __init__(self, tree: Mapping[str, Any], path: tuple[str, ...] = ()):
        for key, value in tree.items():
            where = (*path, key)
            if isinstance(value, Mapping):
                setattr(self, key, ParamNode(value, where))
            else:
                setattr(self, key, nnx.Param(value, **_spec(where, value)))


def _to_params(node: nnx.Module) -> Params:
    """The functional params back from a node (base ``nnx.Param`` only; LoRA and gates excluded)."""
    out = {}
    for key, value in vars(node).items():
        if isinstance(value, ParamNode):
            out[key] = _to_params(value)
        elif isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam):
            out[key] = value[...]
    return out


class LlamaForCausalLM(nnx.Module):
    """A LLaMA-family causal LM (LLaMA, Mistral, Qwen2/3, ... as ``ModelConfig`` describes) as an NNX module.

    Args:
      config: the model's ``ModelConfig`` (static).
      lora_config: LoRA on the projections (PEFT fields); None for the bare model.
      gates: "layer", "rank", "both" or None: the searchable gates, at their neutral point (multipliers 1).
      rngs: draws the base params (when ``params`` is None) and LoRA's A.
      params: base params in the functional layout (else random, ``init_std`` / ``head_std``).
    Example::

        model = LlamaForCausalLM.from_pretrained("path/to/hf-model", lora_config=LoraConfig(r=8), gates="layer")
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
        logits = model(input_ids, attention_mask)  # [b, t, v] fp32
    """

    def __init__(
        self,
        config: ModelConfig,
        lora_config: LoraConfig | None = None,
        gates: str | None = None,
        *,
        rngs: nnx.Rngs,
        params: Params | None = None,
        init_std: float = 0.02,
        head_std: float | None = None,
    ):
        check_config_type(config, ModelConfig, "LlamaForCausalLM: config")
        if lora_config is not None:
            check_config_type(lora_config, LoraConfig, "LlamaForCausalLM: lora_config")
        if params is None:
            params = init_params(config, rngs.params(), init_std, head_std)
        else:
            check_tree_shapes(params, abstract_params(config), "LlamaForCausalLM: params", ConfigError)
        self.config = config
        for key, value in params.items():
            setattr(
                self,
                key,
                ParamNode(value, (key,)) if isinstance(value, Mapping) else nnx.Param(value, **_spec((key,), value)),
            )
        self.lora_config = lora_config
        if lora_config is not None:
            self.set_lora(init_lora(config, lora_config, rngs.params(), params))
        if gates not in (None, "none"):
            if lora_config is None:
                raise ConfigError(f"LlamaForCausalLM: gates={gates!r} need a lora_config (gates scale LoRA only)")
            self.add_gates(gates)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_params(
        cls,
        config: ModelConfig,
        params: Params,
        lora: LoraParams | LoraConfig | None = None,
        gates: Gates | GateValues | str | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> LlamaForCausalLM:
        """The module over given functional pytrees (``lora`` / ``gates`` as objects, or as config / kind;
        raw ``Gates`` are stored as their multipliers)."""
        lora_config = lora.spec.config if isinstance(lora, LoraParams) else lora
        model = cls(
            config, lora_config, gates if isinstance(gates, str) else None, rngs=rngs or nnx.Rngs(0), params=params
        )
        if isinstance(lora, LoraParams):
            model.set_lora(lora)
        if isinstance(gates, (Gates, GateValues)):
            model.set_gates(gates)
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: str = "float32",
        lora_config: LoraConfig | None = None,
        gates: str | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        **load_kwargs: Any,
    ) -> LlamaForCausalLM:
        """Load an HF checkpoint (safetensors, sharded index) via :func:`flexora_jax.models.load_model`.

        llama.c checkpoints go through :func:`flexora_jax.models.convert_llama2c` first. ``load_kwargs``
        (``mesh``, ``allow_pickle``, config overrides) are passed to ``load_model``.
        """
        config, params = load_model(path, dtype=dtype, **load_kwargs)
        return cls(config, lora_config, gates, rngs=rngs or nnx.Rngs(0), params=params)

    # ------------------------------------------------------------------------------ the pytrees
    def params(self) -> Params:
        """The base params in the functional layout."""
        return {
            key: (_to_params(v) if isinstance(v, ParamNode) else v[...])
            for key, v in vars(self).items()
            if isinstance(v, ParamNode) or (isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam))
        }

    def lora(self) -> LoraParams | None:
        """The LoRA pytree of the functional core (None without LoRA)."""
        if self.lora_config is None:
            return None
        spec = make_spec(self.config, self.lora_config)
        weights = {
            m: {
                name[len("lora_") :]: v[...]
                for name, v in vars(getattr(self.layers, m)).items()
                if isinstance(v, nnx.LoRAParam)
            }
            for m in spec.targets
        }
        return LoraParams(weights=weights, spec=spec)

    def gates(self) -> GateValues | None:
        """The gate multipliers the core applies (None without gates)."""
        layer_gate = vars(self.layers).get("lora_gate")
        targets = () if self.lora_config is None else self.lora_config.target_modules
        rank = {
            m: getattr(self.layers, m).lora_rank_gate[...]
            for m in targets
            if "lora_rank_gate" in vars(getattr(self.layers, m))
        }
        if layer_gate is None and not rank:
            return None
        return GateValues(layer=None if layer_gate is None else layer_gate[...], rank=rank or None)

    def set_lora(self, lora: LoraParams) -> None:
        """Put a functional ``LoraParams`` into the module (``nnx.LoRAParam`` variables, created if absent)."""
        if self.lora_config is not None and lora.spec != make_spec(self.config, self.lora_config):
            raise ConfigError("set_lora: the LoRA was built for another LoraConfig than this model's")
        self.lora_config = lora.spec.config
        for m, w in lora.weights.items():  # a [L, d_in, r], b [L, r, d_out], DoRA's magnitude [L, d_out]
            node = getattr(self.layers, m)
            for key, value in w.items():  # the LoRA's logical axes: A the kernel's in axis, B its out axis
                setattr(node, f"lora_{key}", nnx.LoRAParam(value, **_spec((m, key), value)))

    def set_gates(self, gates: Gates | GateValues) -> None:
        """Put gates into the module as ``Gate`` variables holding multipliers (raw ``Gates`` are mapped by
        :func:`flexora_jax.gates.multipliers`)."""
        values = multipliers(gates, self.config.num_hidden_layers)
        layers = tuple(range(self.config.num_hidden_layers))
        if values.layer is not None:
            self.layers.lora_gate = Gate(values.layer, role="layer", layers=layers)
        for m, rank in (values.rank or {}).items():
            getattr(self.layers, m).lora_rank_gate = Gate(rank, role="rank", layers=layers, site=m)

    def add_gates(self, kind: str) -> None:
        """Neutral gates (multipliers 1) of ``kind`` ("layer", "rank", "both") on the LoRA of this model."""
        if self.lora_config is None:
            raise ConfigError("add_gates: the model has no LoRA (lora_config=None); gates scale LoRA only")
        spec = make_spec(self.config, self.lora_config)
        L = self.config.num_hidden_layers
        self.set_gates(
            GateValues(
                layer=jnp.ones((L,)) if kind in ("layer", "both") else None,
                rank={m: jnp.ones((L, r)) for m, r in spec.r_max} if kind in ("rank", "both") else None,
            )
        )

    def drop_gates(self) -> None:
        for node in [
            self.layers,
            *(
                getattr(self.layers, m)
                for m in (self.lora_config or LoraConfig()).target_modules
                if hasattr(self.layers, m)
            ),
        ]:
            for name in [n for n, v in vars(node).items() if isinstance(v, Gate)]:
                delattr(node, name)

    def decoder_pytrees(self) -> tuple[ModelConfig, Params, LoraParams | None, GateValues | None]:
        """``(config, params, lora, gates)``: this module as the functional core's pytrees (what the decoder's
        scorers and generation take)."""
        return self.config, self.params(), self.lora(), self.gates()

    # ------------------------------------------------------------------------------ the engine
    def lora_problem(self, loss_fn: ModelLoss | None = None, val_loss_fn: ModelLoss | None = None) -> Problem:
        """This model as the engine's problem: the decoder's functional core (:func:`decoder_problem`, the
        LoRA layout traced) with the default loss, or the model merged around ``loss_fn(model, batch)``;
        selections follow the decoder's rule, results are written back into this module."""
        lora = self.lora()
        if lora is None:
            raise ConfigError(
                "LlamaForCausalLM has no LoRA to train; build it with a lora_config "
                "(LlamaForCausalLM(config, LoraConfig(...), gates=...))"
            )
        decoder = decoder_problem(self.config, self.params(), lora, gates=self.gates(), write=self._write)
        if loss_fn is None and val_loss_fn is None:
            return decoder
        if decoder.dropout:  # merged around a model loss, the LoRA branch sees no dropout key
            raise ConfigError(
                f"LlamaForCausalLM: lora_dropout={lora.spec.dropout} applies with the model's own loss only; "
                "with loss_fn / val_loss_fn the fine-tune would run without dropout. Build the model with "
                "lora_dropout=0, or leave loss_fn and val_loss_fn out"
            )
        return split_problem(
            self,
            loss_fn or _own_loss,
            val_loss_fn,
            select=decoder.select,
            write=lambda lora, hyper: self._write(self.lora(), hyper, state=lora),
            vocab_size=decoder.vocab_size if loss_fn is None else None,  # its own LM loss reads input_ids
        )

    def _write(self, lora: LoraParams, hyper: Gates | None, state: Any = None) -> LlamaForCausalLM:
        if state is not None:
            nnx.update(self, state)
        elif self.lora_config is not None and lora.spec.config != self.lora_config:  # another layout (AdaLoRA's)
            self._drop_lora()
            self.set_lora(lora)
        else:
            self.set_lora(lora)
        if hyper is not None:
            self.set_gates(hyper)
        return self

    def _drop_lora(self) -> None:
        """Remove LoRA and gates (the model computes the base again)."""
        self.drop_gates()
        for m in (self.lora_config or LoraConfig()).target_modules:
            node = getattr(self.layers, m)
            for name in [n for n, v in vars(node).items() if isinstance(v, nnx.LoRAParam)]:
                delattr(node, name)
        self.lora_config = None

    def apply_selection(self, selection: Selection, *, gates: str | None = None, rngs: nnx.Rngs) -> LlamaForCausalLM:
        """A fresh LoRA on the selected layers and ranks (``selection.lora_config``, or the selection applied to
        this model's LoRA config), in place; the searched LoRA and gates are dropped (``gates``: new neutral
        gates of that kind)."""
        if self.lora_config is None:
            raise ConfigError("apply_selection: the model has no LoRA config to restrict")
        cfg = selection.to_lora_config(self.lora_config)
        self._drop_lora()
        self.set_lora(init_lora(self.config, cfg, rngs.params(), self.params()))
        if gates not in (None, "none"):
            self.add_gates(gates)
        return self

    def merge_lora(self) -> LlamaForCausalLM:
        """Fold LoRA (times its gates) into the kernels in fp32, then drop LoRA and gates (in place)."""
        lora = self.lora()
        if lora is None:
            return self
        merged = merge(self.params(), lora, self.gates())
        self.drop_gates()
        for m in lora.spec.targets:
            node = getattr(self.layers, m)
            node.kernel.set_value(merged["layers"][m]["kernel"])
            for name in [n for n, v in vars(node).items() if isinstance(v, nnx.LoRAParam)]:
                delattr(node, name)
        self.lora_config = None
        return self

    def save_peft(self, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
        """This decoder's LoRA as a PEFT adapter (``fj.export_peft``, gates folded into B); what
        :func:`flexora_jax.nnx.save_peft` calls for it."""
        return export_peft(self.lora(), directory, gates=self.gates(), base_model_name_or_path=base_model_name_or_path)

    # ------------------------------------------------------------------------------ forward
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, **kwargs: Any) -> jax.Array:
        """Logits [b, t, v] (fp32); ``kwargs`` go to :func:`flexora_jax.models.llama.forward` (positions, ...)."""
        return forward(
            self.config, self.params(), input_ids, attention_mask, lora=self.lora(), gates=self.gates(), **kwargs
        )

    def lm_loss(self, batch: Mapping[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array:
        """The functional core's answer-token loss of a batch (:func:`flexora_jax.models.lm_loss`, chunked)."""
        return lm_loss(self.config, self.params(), self.lora(), self.gates(), dict(batch), dropout_key)


def _own_loss(model: LlamaForCausalLM, batch: Any) -> Any:
    return model.lm_loss(batch)
