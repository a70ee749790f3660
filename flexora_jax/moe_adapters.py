"""PEFT interop for LoRA on a mixture of experts (Mixtral's ``w1`` / ``w3`` / ``w2``): names, export, import.

Why a module of its own: PEFT's two Mixtral layouts differ from every dense module's, and
:mod:`flexora_jax.adapters` calls in here for them only.

- The layout written and read: PEFT's per-expert LoRA as transformers 4 names the experts,
  ``base_model.model.model.layers.<i>.block_sparse_moe.experts.<e>.<w>.lora_A.weight`` (r, in) /
  ``lora_B.weight`` (out, r) with ``target_modules`` naming ``w1`` / ``w2`` / ``w3``. Hub adapters for
  Mixtral have it, and peft >= 0.19 on transformers 5 converts it on load (``PeftModel.from_pretrained``):
  the experts become one ``target_parameters`` LoRA of the fused ``gate_up_proj`` (w1 and w3 side by side,
  A stacked over rank, B block-diagonal, rank ``2 r`` and alpha ``2 lora_alpha``) and one of ``down_proj``.
- That conversion keeps one global rank and alpha for the experts and adapts them in every block, and it
  needs w1 and w3 together. So the export writes every block and every expert of each targeted expert
  module (w3 with w1 and w1 with w3: a zero LoRA is exactly no change) at one rank ``R`` (the largest:
  smaller ranks zero-padded), with each block's scale and gates folded into B, and states ``r = lora_alpha
  = R``; attention modules keep their own ranks and alphas through ``rank_pattern`` / ``alpha_pattern``
  (restated without rsLoRA, which the conversion's doubled alpha would break).
- Import reads any per-expert adapter of that layout (ranks and alphas may even differ per expert):
  each block's experts share one rank (the largest, zero-padded) and one scale (the first adapted
  expert's, the others' folded into their B), the layout of :mod:`flexora_jax.lora`.
- The layout peft writes when it trains on transformers 5 itself (``target_parameters`` over
  ``mlp.experts.gate_up_proj`` / ``down_proj``, experts flattened into the rank axis) is refused by
  :mod:`flexora_jax.adapters` naming ``target_parameters``.
"""

from __future__ import annotations

import math

import numpy as np

from flexora_jax.config import EXPERT_MODULES, ModelConfig, module_path
from flexora_jax.gates import Gates, layer_gate_values, rank_gate_values
from flexora_jax.lora import LoraParams

PREFIX = "base_model.model."  # PeftModel wraps the CausalLM: base_model (LoraModel) . model (the CausalLM)
_FUSED_PAIR = ("w1", "w3")  # fused into gate_up_proj by transformers 5: PEFT needs both or neither


def peft_path(module: str, layer: int, expert: int | None = None) -> str:
    """The HF / PEFT module path; for an expert module, expert ``expert``'s (``...experts.<e>.w1``)."""
    path = module_path(module, layer)
    return path if expert is None else f"{path.rsplit('.', 1)[0]}.{expert}.{module}"


def tensor_key(module: str, layer: int, which: str, expert: int | None = None) -> str:
    """PEFT's key of ``lora_A`` / ``lora_B`` (``which`` "A" / "B") or DoRA's magnitude (``which`` "M")."""
    if which == "M":
        return f"{PREFIX}{peft_path(module, layer, expert)}.lora_magnitude_vector"
    return f"{PREFIX}{peft_path(module, layer, expert)}.lora_{which}.weight"


def expert_paths(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Every expert projection's PEFT path -> (module, layer, expert); empty for a dense model."""
    return {
        peft_path(m, i, e): (m, i, e)
        for i in range(config.num_hidden_layers)
        for m in EXPERT_MODULES
        for e in range(config.num_local_experts or 0)
    }


def moe_other_paths(config: ModelConfig) -> list[str]:
    """A mixture's modules LoRA never adapts (the router ``block_sparse_moe.gate`` and the containers)."""
    out = []
    for i in range(config.num_hidden_layers if config.num_local_experts else 0):
        p = f"model.layers.{i}.block_sparse_moe"
        out += [p, f"{p}.gate", f"{p}.experts"] + [f"{p}.experts.{e}" for e in range(config.num_local_experts)]
        out += [f"{p}.experts.{e}.act_fn" for e in range(config.num_local_experts)]
    return out


def export_experts(lora: LoraParams, gates: Gates | None, tensors: dict[str, np.ndarray]) -> tuple[int, list[str]]:
    """Add the expert LoRA tensors to ``tensors`` (see the module docstring); returns (R, expert target names).

    Each block's scale, layer gate and rank gates are folded into B, so the adapter states ``lora_alpha = r = R``.
    """
    spec, L = lora.spec, lora.spec.num_layers
    targeted = [m for m in spec.targets if m in EXPERT_MODULES]
    written = [m for m in EXPERT_MODULES if m in targeted or (m in _FUSED_PAIR and set(_FUSED_PAIR) & set(targeted))]
    rank_max = max(1, max(max(spec.rank_of(m)) for m in targeted))
    layer_w = np.asarray(layer_gate_values(gates, L), np.float64)
    for m in written:
        source = m if m in targeted else next(p for p in _FUSED_PAIR if p != m)  # w1 and w3 have one shape
        a, b = np.asarray(lora.weights[source]["a"], np.float32), np.asarray(lora.weights[source]["b"], np.float32)
        experts, d_in, d_out = a.shape[1], a.shape[2], b.shape[3]
        fold = (
            (
                layer_w[:, None]
                * np.asarray(rank_gate_values(gates, m, (L, spec.r_max_of(m))), np.float64)
                * np.asarray(spec.scale_of(m))[:, None]
            )
            if m in targeted
            else np.zeros((L, 1))
        )
        for i in range(L):
            rank = spec.rank_of(m)[i] if m in targeted else 0
            for e in range(experts):
                a_e, b_e = np.zeros((rank_max, d_in), np.float32), np.zeros((d_out, rank_max), np.float32)
                a_e[:rank] = a[i, e, :, :rank].T
                b_e[:, :rank] = (b[i, e, :rank, :] * fold[i, :rank, None]).T
                tensors[tensor_key(m, i, "A", e)], tensors[tensor_key(m, i, "B", e)] = a_e, b_e
    return rank_max, [m for m in ("w1", "w2", "w3") if m in written]


def group_experts(
    config: ModelConfig, ranks: dict, alphas: dict, tensors: dict[str, np.ndarray], use_rslora: bool
) -> None:
    """In place: per-expert entries ``(module, layer, expert)`` of an imported adapter become one entry
    ``(module, layer)`` per block, at the largest rank, with the first adapted expert's alpha and the other
    experts' scale ratios folded into their B (zeros for experts the adapter leaves out); the function is unchanged.
    """

    def scale(rank: int, alpha: float) -> float:
        return alpha / (math.sqrt(rank) if use_rslora else rank)

    for m, i in sorted({(k[0], k[1]) for k in ranks if len(k) == 3}):
        keys = [(m, i, e) for e in range(config.num_local_experts) if (m, i, e) in ranks]
        rank = max(ranks[k] for k in keys)
        common = scale(ranks[keys[0]], alphas[keys[0]])
        d_in, d_out = config.module_shape(m)
        for e in range(config.num_local_experts):
            a_e, b_e = np.zeros((rank, d_in), np.float32), np.zeros((d_out, rank), np.float32)
            if (m, i, e) in ranks:
                r_e = ranks.pop((m, i, e))
                ratio = scale(r_e, alphas.pop((m, i, e))) / common
                a_e[:r_e] = tensors.pop(tensor_key(m, i, "A", e))
                b_e[:, :r_e] = tensors.pop(tensor_key(m, i, "B", e)) * np.float32(ratio)
            tensors[tensor_key(m, i, "A", e)], tensors[tensor_key(m, i, "B", e)] = a_e, b_e
        ranks[(m, i)] = rank
        alphas[(m, i)] = common * (math.sqrt(rank) if use_rslora else rank)
