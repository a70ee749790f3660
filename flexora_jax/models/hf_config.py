"""Hugging Face ``config.json`` <-> :class:`~flexora_jax.config.ModelConfig` (the config half of :mod:`.hf`).

Never silently wrong: every transformers config field that changes the computation is either mapped to a
``ModelConfig`` field or refused with a :class:`ConfigError` naming it (unknown activations, RoPE types,
partial rotary, quantisation, bidirectional attention, training-time router noise, ...). RoPE maps
``rope_parameters`` (or a legacy ``rope_scaling``) to :class:`RopeScaling`, including YaRN with
transformers' defaults, and Gemma 3's per-layer-type parameters to ``rope_theta`` / ``rope_scaling``
(full attention) plus ``rope_local_theta`` (sliding layers).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from flexora_jax.config import SANDWICH_TYPES, SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from flexora_jax.errors import ConfigError
from flexora_jax.models.hf_import import transformers

_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh"}


def _rope_scaling(hf_config: Any) -> tuple[float, RopeScaling | None, float | None]:
    """``(rope_theta, RopeScaling or None, local theta or None)`` from ``rope_parameters`` (or a legacy
    ``rope_scaling``); Gemma 3 nests them per layer type: ``full_attention``, ``sliding_attention`` (local)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if not rope and legacy_scaling:
        rope = dict(legacy_scaling)
    local_theta = None
    if hf_config.model_type == "gemma3_text" and set(rope) == {"full_attention", "sliding_attention"}:
        local = dict(rope["sliding_attention"])
        local_type = local.get("rope_type", local.get("type", "default"))
        if local_type != "default" or local.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(
                f"rope_parameters['sliding_attention'] {local} is not supported: the sliding layers' "
                "RoPE must be rope_type 'default' (scaling applies to rope_parameters['full_attention'])"
            )
        rope, local_theta = dict(rope["full_attention"]), float(local.get("rope_theta", 10000.0))
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise ConfigError(f"per-layer-type rope_parameters {sorted(rope)} are not supported")
    partial = float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0))
    if partial != 1.0:
        raise ConfigError(f"partial_rotary_factor {partial} is not supported; only 1.0 (RoPE on the whole head)")
    theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "llama3":
        return (
            theta,
            RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            ),
            local_theta,
        )
    if rope_type in ("linear", "dynamic"):
        return theta, RopeScaling(factor=float(rope["factor"]), rope_type=rope_type), local_theta
    if rope_type == "yarn":
        return theta, _yarn(hf_config, rope), local_theta
    if rope_type != "default":
        raise ConfigError(
            f"rope_type {rope_type!r} is not supported; supported: 'default', 'llama3', 'linear', 'dynamic', 'yarn'"
        )
    return theta, None, local_theta


def _yarn(hf_config: Any, rope: Mapping[str, Any]) -> RopeScaling:
    """YaRN's fields with transformers' defaults (``_compute_yarn_parameters``)."""
    original = int(rope.get("original_max_position_embeddings") or hf_config.max_position_embeddings)
    factor = rope.get("factor")
    optional = {
        k: (None if rope.get(k) is None else float(rope[k])) for k in ("attention_factor", "mscale", "mscale_all_dim")
    }
    return RopeScaling(
        rope_type="yarn",
        factor=float(hf_config.max_position_embeddings / original if factor is None else factor),
        original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        truncate=bool(rope.get("truncate", True)),
        **optional,
    )


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` for transformers (Gemma 3: per layer type)."""
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    s = config.rope_scaling
    if s is not None and s.rope_type == "llama3":
        rope.update(
            {
                k: getattr(s, k)
                for k in (
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                    "rope_type",
                )
            }
        )
    elif s is not None and s.rope_type == "yarn":
        rope.update(
            {
                k: v
                for k, v in dataclasses.asdict(s).items()
                if v is not None and k not in ("low_freq_factor", "high_freq_factor")
            }
        )
    elif s is not None:
        rope.update(rope_type=s.rope_type, factor=s.factor)
    if config.model_type != "gemma3_text":
        return rope
    local = config.rope_theta if config.rope_local_theta is None else config.rope_local_theta
    return {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}}


def _family_fields(hf_config: Any, model_type: str) -> dict[str, Any]:
    """The per-family ModelConfig fields, refusing every HF setting that changes the computation unimplemented."""
    get = functools.partial(getattr, hf_config)
    act_key = "hidden_activation" if model_type in SANDWICH_TYPES else "hidden_act"
    act = get(act_key, "silu")
    if act not in _ACTS:
        raise ConfigError(f"{act_key} {act!r} is not supported; supported: {sorted(_ACTS)}")
    if get("quantization_config", None):
        raise ConfigError("quantization_config: quantized checkpoints are not supported; load a full-precision one")
    if get("use_bidirectional_attention", False):
        raise ConfigError("use_bidirectional_attention=True is not supported (the decoder is causal)")
    if get("mlp_bias", False) and model_type != "llama":
        raise ConfigError(f"mlp_bias=True is not supported for model_type {model_type!r}")
    bias = bool(get("attention_bias", False)) and model_type != "mistral"
    fields: dict[str, Any] = dict(
        hidden_act=_ACTS[act],
        attention_bias=bias or model_type == "qwen2",
        attention_out_bias=bias,
        mlp_bias=bool(get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
    )
    window = get("sliding_window", None) if model_type != "llama" else None
    if model_type == "gemma3_text" and not window and "sliding_attention" in (get("layer_types", None) or []):
        raise ConfigError(
            f"sliding_window {window!r} with 'sliding_attention' layer_types is not supported for "
            "gemma3_text (those layers would keep their own RoPE base without a window); "
            "set sliding_window"
        )
    if window:
        layer_types = list(get("layer_types", None) or ["sliding_attention"] * hf_config.num_hidden_layers)
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ConfigError(f"layer_types {unknown} are not supported; only 'sliding_attention' and 'full_attention'")
        if model_type in ("mistral", "phi3", "mixtral"):  # these ignore layer_types: every layer is windowed
            layer_types = ["sliding_attention"] * hf_config.num_hidden_layers
        fields.update(
            sliding_window=int(window),
            sliding_layers=tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention"),
        )
    if model_type == "mixtral":
        fields.update(_moe_fields(hf_config))
    if model_type in SANDWICH_TYPES:
        fields.update(
            query_pre_attn_scalar=get("query_pre_attn_scalar"),
            attn_logit_softcapping=get("attn_logit_softcapping", None),
            final_logit_softcapping=get("final_logit_softcapping", None),
        )
    return fields


def _moe_fields(hf_config: Any) -> dict[str, Any]:
    """Mixtral's expert count and top-k; training-time router options that change the step are refused."""
    if float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0) > 0:
        raise ConfigError(
            f"router_jitter_noise {hf_config.router_jitter_noise} is not supported (random router "
            "input noise in training); set it to 0.0"
        )
    if getattr(hf_config, "output_router_logits", False):
        raise ConfigError(
            "output_router_logits=True is not supported: the router's load-balancing loss "
            "(router_aux_loss_coef) is not implemented; set it to false to train without it"
        )
    return dict(
        num_local_experts=int(hf_config.num_local_experts), num_experts_per_tok=int(hf_config.num_experts_per_tok)
    )


#: Why a near-miss family is refused (added to the unsupported-model_type message).
_UNSUPPORTED_HINTS = {
    "gemma3": " (the multimodal Gemma 3, Gemma3ForConditionalGeneration; its text model alone, model_type "
    "'gemma3_text' as in google/gemma-3-1b, is supported)",
    "qwen2_moe": " (Qwen-MoE: its shared expert and sigmoid shared-expert gate are not implemented; Mixtral is)",
    "qwen3_moe": " (Qwen3-MoE is not implemented; Mixtral is)",
}


def unsupported_model_type(model_type: Any) -> str:
    """The message for a model_type the decoder does not implement (names it and the supported ones)."""
    return (
        f"model_type {model_type!r} is not supported{_UNSUPPORTED_HINTS.get(model_type, '')}; "
        f"supported: {list(SUPPORTED_MODEL_TYPES)}"
    )


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a ``transformers`` config (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, Mixtral).

    Every setting that changes the computation is either implemented or refused with a
    :class:`ConfigError` naming it (never silently ignored).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(unsupported_model_type(model_type))
    theta, scaling, local_theta = _rope_scaling(hf_config)
    eos = getattr(hf_config, "eos_token_id", None)
    kwargs = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        max_position_embeddings=hf_config.max_position_embeddings,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        model_type=model_type,
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_id=eos[0] if isinstance(eos, (list, tuple)) and eos else eos,  # the first of several
        pad_token_id=getattr(hf_config, "pad_token_id", None),
        **_family_fields(hf_config, model_type),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


_HF_CONFIGS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "mixtral": "MixtralConfig",
}


def config_to_hf(config: ModelConfig) -> transformers.PretrainedConfig:
    """The matching ``transformers`` config (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi3, Mixtral)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        rope_parameters=_rope_parameters(config),
    )
    kwargs["hidden_activation" if config.model_type in SANDWICH_TYPES else "hidden_act"] = config.hidden_act
    if config.model_type != "qwen2":
        kwargs["head_dim"] = config.head_dim
    if config.model_type not in ("qwen2", "mistral", "phi3", "mixtral"):
        kwargs["attention_bias"] = config.attention_out_bias
    if config.model_type == "llama":
        kwargs["mlp_bias"] = config.mlp_bias
    windows = config.layer_windows
    if config.model_type != "llama":
        kwargs["sliding_window"] = config.sliding_window
    if config.model_type in ("qwen2", "qwen3") + SANDWICH_TYPES:
        kwargs["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
    if config.model_type in ("qwen2", "qwen3"):
        kwargs.update(
            use_sliding_window=config.sliding_window is not None,
            max_window_layers=next((i for i, w in enumerate(windows) if w), len(windows)),
        )
    if config.model_type in SANDWICH_TYPES:
        kwargs.update(
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_logit_softcapping=config.attn_logit_softcapping,
            final_logit_softcapping=config.final_logit_softcapping,
        )
    if config.num_local_experts:
        kwargs.update(num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok)
    return getattr(transformers, _HF_CONFIGS[config.model_type])(**kwargs)
