"""The built-in LLaMA-family decoder as a Flax NNX module, computed by the functional core.

``LlamaForCausalLM`` holds the same pytrees the functional core uses, as NNX variables: the base
params (``nnx.Param``, one attribute per key of :func:`flexora_jax.models.init_params`' layout, block
params stacked on a leading layer axis), the LoRA of every adapted projection (``nnx.LoRAParam``,
``layers.<module>.lora_a`` [L, d_in, r] / ``lora_b`` [L, r, d_out], and DoRA's ``lora_magnitude``
[L, d_out] with ``use_dora``) and the raw gates
(:class:`~flexora_jax.nnx.Gate`: ``layers.lora_gate`` = Flexora's alpha [L], ``layers.<module>
.lora_rank_gate`` = AutoLoRA's beta [L, r]). Its ``__call__`` rebuilds ``params`` / ``LoraParams`` /
``Gates`` from those variables and calls :func:`flexora_jax.models.llama.forward`, so the module and
the function give identical logits, and the layer scan, the attention backends and the chunked
losses are the functional core's.

Because the core parametrises the gates itself (``w = L softmax(alpha)``), this model's gates hold
raw hyperparameters (roles ``layer_logits`` / ``rank_logits``); the NNX search engine
(:mod:`flexora_jax.nnx.search`) handles both kinds. The projections here are containers, not
callable modules: LoRA comes through ``lora_config``, not :func:`~flexora_jax.nnx.add_lora`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from flax import nnx

from flexora_jax.config import LoraConfig, ModelConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates, init_gates
from flexora_jax.lora import LoraParams, init_lora, make_spec, merge
from flexora_jax.models import forward, init_params, lm_loss, load_model
from flexora_jax.nnx.variables import Gate
from flexora_jax.sharding import KERNEL_SPECS

Params = dict[str, Any]

#: ``out_sharding`` metadata (the functional core's partition rules, see flexora_jax.sharding).
_TOP_SPECS = {"embed": ("model", "fsdp"), "lm_head": ("fsdp", "model")}


def _spec(path: tuple[str, ...], ndim: int) -> dict[str, Any]:
    """Sharding metadata of a base param at ``path`` (projection kernels and biases, embeddings).

    An annotation only (``eager_sharding=False``): placement is the loader's (``load_model(mesh=...)``)
    or the caller's, through ``nnx.get_partition_spec``.
    """
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    spec = None
    if name == "kernel" and parent in KERNEL_SPECS and ndim == 3:
        spec = KERNEL_SPECS[parent]
    elif name == "bias" and parent in KERNEL_SPECS and ndim == 2:
        spec = (None, KERNEL_SPECS[parent][2])
    elif name in _TOP_SPECS and len(path) == 1 and ndim == 2:
        spec = _TOP_SPECS[name]
    return {"eager_sharding": False} if spec is None else {"out_sharding": spec, "eager_sharding": False}


class ParamNode(nnx.Module):
    """One level of the functional params as an NNX node: dict keys become attributes (not callable)."""

    def __init__(self, tree: Mapping[str, Any], path: tuple[str, ...] = ()):
        for key, value in tree.items():
            where = (*path, key)
            if isinstance(value, Mapping):
                setattr(self, key, ParamNode(value, where))
            else:
                setattr(self, key, nnx.Param(value, **_spec(where, jax.numpy.ndim(value))))


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
      gates: "layer", "rank", "both" or None: the searchable gates, at their neutral point.
      rngs: draws the base params (when ``params`` is None) and LoRA's A.
      params: base params in the functional layout (else random, ``init_std`` / ``head_std``).
      gate_power: Flexora's gate exponent (1, or 3 as the reference code).
    Example::

        model = LlamaForCausalLM.from_pretrained("path/to/hf-model", lora_config=LoraConfig(r=8), gates="layer")
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
        logits = model(input_ids, attention_mask)  # [b, t, v] fp32
    """

    def __init__(self, config: ModelConfig, lora_config: LoraConfig | None = None, gates: str | None = None, *,
                 rngs: nnx.Rngs, params: Params | None = None, gate_power: int = 1, init_std: float = 0.02,
                 head_std: float | None = None):
        if params is None:
            params = init_params(config, rngs.params(), init_std, head_std)
        self.config = config
        self.gate_power = gate_power
        for key, value in params.items():
            setattr(self, key, ParamNode(value, (key,)) if isinstance(value, Mapping) else
                    nnx.Param(value, **_spec((key,), jax.numpy.ndim(value))))
        self.lora_config = lora_config
        if lora_config is not None:
            self.set_lora(init_lora(config, lora_config, rngs.params(), params))
        if gates not in (None, "none"):
            if lora_config is None:
                raise ConfigError(f"LlamaForCausalLM: gates={gates!r} need a lora_config (gates scale LoRA only)")
            spec = make_spec(config, lora_config)
            self.set_gates(init_gates(gates, config.num_hidden_layers, dict(spec.r_max), gate_power))

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_params(cls, config: ModelConfig, params: Params, lora: LoraParams | LoraConfig | None = None,
                    gates: Gates | str | None = None, *, rngs: nnx.Rngs | None = None) -> "LlamaForCausalLM":
        """The module over given functional pytrees (``lora`` / ``gates`` as objects, or as config / kind)."""
        lora_config = lora.spec.config if isinstance(lora, LoraParams) else lora
        power = gates.power if isinstance(gates, Gates) else 1
        model = cls(config, lora_config, gates if isinstance(gates, str) else None, rngs=rngs or nnx.Rngs(0),
                    params=params, gate_power=power)
        if isinstance(lora, LoraParams):
            model.set_lora(lora)
        if isinstance(gates, Gates):
            model.set_gates(gates)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32", lora_config: LoraConfig | None = None,
                        gates: str | None = None, *, rngs: nnx.Rngs | None = None, gate_power: int = 1,
                        **load_kwargs: Any) -> "LlamaForCausalLM":
        """Load an HF checkpoint (safetensors, sharded index) via :func:`flexora_jax.models.load_model`.

        llama.c checkpoints go through :func:`flexora_jax.models.convert_llama2c` first. ``load_kwargs``
        (``mesh``, ``allow_pickle``, config overrides) are passed to ``load_model``.
        """
        config, params = load_model(path, dtype=dtype, **load_kwargs)
        return cls(config, lora_config, gates, rngs=rngs or nnx.Rngs(0), params=params, gate_power=gate_power)

    # ------------------------------------------------------------------------------ the pytrees
    def params(self) -> Params:
        """The base params in the functional layout."""
        return {key: (_to_params(v) if isinstance(v, ParamNode) else v[...]) for key, v in vars(self).items()
                if isinstance(v, ParamNode) or (isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam))}

    def lora(self) -> LoraParams | None:
        """The LoRA pytree of the functional core (None without LoRA)."""
        if self.lora_config is None:
            return None
        spec = make_spec(self.config, self.lora_config)
        weights = {m: {name[len("lora_"):]: v[...] for name, v in vars(getattr(self.layers, m)).items()
                       if isinstance(v, nnx.LoRAParam)} for m in spec.targets}
        return LoraParams(weights=weights, spec=spec)

    def gates(self) -> Gates | None:
        """The raw gates of the functional core (None without gates)."""
        layer_gate = vars(self.layers).get("lora_gate")
        targets = () if self.lora_config is None else self.lora_config.target_modules
        rank = {m: getattr(self.layers, m).lora_rank_gate[...] for m in targets
                if "lora_rank_gate" in vars(getattr(self.layers, m))}
        if layer_gate is None and not rank:
            return None
        return Gates(layer=None if layer_gate is None else layer_gate[...], rank=rank or None, power=self.gate_power)

    def set_lora(self, lora: LoraParams) -> None:
        """Put a functional ``LoraParams`` into the module (``nnx.LoRAParam`` variables, created if absent)."""
        if self.lora_config is not None and lora.spec != make_spec(self.config, self.lora_config):
            raise ConfigError("set_lora: the LoRA was built for another LoraConfig than this model's")
        self.lora_config = lora.spec.config
        for m, w in lora.weights.items():  # a [L, d_in, r], b [L, r, d_out], DoRA's magnitude [L, d_out]
            node, kernel_spec = getattr(self.layers, m), KERNEL_SPECS.get(m, (None,) * 3)
            specs = {"a": (None, kernel_spec[1], None), "b": (None, None, kernel_spec[2]),
                     "magnitude": (None, kernel_spec[2])}
            for key, value in w.items():
                meta = {"out_sharding": specs[key]} if key in specs else {}
                setattr(node, f"lora_{key}", nnx.LoRAParam(value, eager_sharding=False, **meta))

    def set_gates(self, gates: Gates) -> None:
        """Put functional raw ``Gates`` into the module (``Gate`` variables, roles ``*_logits``)."""
        layers = tuple(range(self.config.num_hidden_layers))
        self.gate_power = gates.power
        if gates.layer is not None:
            self.layers.lora_gate = Gate(gates.layer, role="layer_logits", layers=layers)
        for m, beta in (gates.rank or {}).items():
            getattr(self.layers, m).lora_rank_gate = Gate(beta, role="rank_logits", layers=layers, site=m)

    def merge_lora(self) -> "LlamaForCausalLM":
        """Fold LoRA (times its gates) into the kernels in fp32, then drop LoRA and gates (in place)."""
        lora = self.lora()
        if lora is None:
            return self
        merged = merge(self.params(), lora, self.gates())
        for m in lora.spec.targets:
            node = getattr(self.layers, m)
            node.kernel.set_value(merged["layers"][m]["kernel"])
            for name in [n for n, v in vars(node).items() if isinstance(v, (nnx.LoRAParam, Gate))]:
                delattr(node, name)
        if "lora_gate" in vars(self.layers):
            del self.layers.lora_gate
        self.lora_config = None
        return self

    # ------------------------------------------------------------------------------ forward
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, **kwargs: Any) -> jax.Array:
        """Logits [b, t, v] (fp32); ``kwargs`` go to :func:`flexora_jax.models.llama.forward` (positions, ...)."""
        return forward(self.config, self.params(), input_ids, attention_mask, lora=self.lora(), gates=self.gates(),
                       **kwargs)

    def lm_loss(self, batch: Mapping[str, jax.Array], dropout_key: jax.Array | None = None) -> jax.Array:
        """The functional core's answer-token loss of a batch (:func:`flexora_jax.models.lm_loss`, chunked)."""
        return lm_loss(self.config, self.params(), self.lora(), self.gates(), dict(batch), dropout_key)
