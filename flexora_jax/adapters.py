"""PEFT interop: LoRA adapters in and out of the ``adapter_config.json`` + ``adapter_model.safetensors`` format.

Why this module exists: a LoRA trained here must be usable by ``peft.PeftModel.from_pretrained`` on
the transformers model, and an adapter trained with PEFT must run in :func:`flexora_jax.forward`
unchanged. Both directions compute the same function, not merely load without error:

- Tensors: PEFT stores ``lora_A.weight`` as (r, in) and ``lora_B.weight`` as (out, r) under keys like
  ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``; our ``a`` [L, in, r_max] and
  ``b`` [L, r_max, out] are their transposes stacked over blocks, zero-padded beyond each true rank.
  Exports contain the true ranks only.
- Ranks and scales: every (module, block) whose rank or alpha differs from ``r`` / ``lora_alpha`` gets
  a fully qualified ``rank_pattern`` / ``alpha_pattern`` key (``model.layers.1.self_attn.q_proj``), so
  PEFT's first-match regex lookup and our suffix lookup cannot disagree. Blocks that are not adapted
  are expressed with ``layers_to_transform`` when the adapted set is a (modules x layers) rectangle,
  otherwise with ``target_modules`` listing the fully qualified module paths (PEFT matches those
  exactly).
- Reading a PEFT adapter resolves ``target_modules`` (names, fully qualified paths, a regex string or
  ``"all-linear"``), ``exclude_modules``, ``layers_to_transform``/``layers_pattern`` and the patterns
  with PEFT 0.21's own matching rules, then restates the result as an unambiguous
  :class:`~flexora_jax.config.LoraConfig` (fully qualified keys, rank 0 where a block is not adapted).
  DoRA adapters (``use_dora: true``) carry one ``lora_magnitude_vector`` [out] per adapted module (our
  ``magnitude`` row of that block). Settings that would change the function and that we do not implement (biases,
  ``fan_in_fan_out``, ``modules_to_save``, LoRA variants, ...) raise a :class:`ConfigError` naming the
  field; PEFT's bookkeeping fields are ignored; a field PEFT does not know at all is an error (the policy is
  :mod:`flexora_jax.peft_fields`, shared with ``LoraConfig.from_peft``).
- AdaLoRA adapters (``peft_type: ADALORA``) load as their SVD-form weights (:func:`load_adalora`) or, through
  :func:`load_peft`, rank-pruned as LoRA (:func:`flexora_jax.adalora.to_lora`): the same function either way.

Gates are folded into the exported B (``B * layer_gate * rank_gate`` per component), so an adapter
exported from a gated search computes the gated function under PEFT as well. LoRA on a mixture of
experts (Mixtral's ``w1`` / ``w3`` / ``w2``) goes through :mod:`flexora_jax.moe_adapters`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from flexora_jax.adalora import AdaLoraConfig, to_lora
from flexora_jax.config import ALL_MODULES, EXPERT_MODULES, LORA_MODULES, LoraConfig, ModelConfig, module_path
from flexora_jax.dora import MAGNITUDE
from flexora_jax.errors import CheckpointError, ConfigError, NumericsError, check_tree_shapes
from flexora_jax.fileio import write_bytes
from flexora_jax.gates import Gates, layer_gate_values, rank_gate_values
from flexora_jax.lora import LoraParams, LoraSpec, expert_axes, make_spec, merge
from flexora_jax.models import abstract_params
from flexora_jax.models.hf import read_safetensors, save_model, write_safetensors
from flexora_jax.moe_adapters import PREFIX as _PREFIX
from flexora_jax.moe_adapters import expert_paths, export_experts, group_experts, moe_other_paths, peft_path
from flexora_jax.moe_adapters import tensor_key as _tensor_key  # PEFT key of a lora_A / lora_B / magnitude tensor
from flexora_jax.peft_fields import ADALORA_FIELDS, ADAPTER_CONFIG, check_peft_fields, check_peft_values
from flexora_jax.validation import (
    check_config_type,
    check_finite_tree,
    check_number,
    check_path,
    read_json,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ------------------------------------------------------------------------------------------ names
def _other_module_paths(num_layers: int) -> list[str]:
    """Non-adaptable module keys of a LLaMA CausalLM (a PEFT target matching one of them is an error)."""
    keys = ["model", "model.embed_tokens", "model.norm", "model.rotary_emb", "model.layers", "lm_head"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        keys += [
            p,
            f"{p}.self_attn",
            f"{p}.mlp",
            f"{p}.mlp.act_fn",
            f"{p}.input_layernorm",
            f"{p}.post_attention_layernorm",
        ]
    return keys


# ----------------------------------------------------------------------------------------- export
def export_peft(
    lora: LoraParams,
    out_dir: str | os.PathLike,
    *,
    gates: Gates | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write ``lora`` as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    The directory loads with ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` and computes what
    ``flexora_jax.forward(config, params, tokens, lora=lora, gates=gates)`` computes (fp32 tensors,
    true ranks, per-(module, block) ``rank_pattern``/``alpha_pattern`` where they differ from ``r``).

    Args:
      lora: the LoRA params (their static spec carries targets, ranks and scales).
      out_dir: directory to create or overwrite the two files in.
      gates: gate values to fold into B, or None (plain LoRA).
      base_model_name_or_path: recorded in the config for PEFT's convenience (hub id or path).
      task_type: PEFT task type; ``"CAUSAL_LM"`` gives a ``PeftModelForCausalLM``.

    Returns:
      The adapter directory.

    Raises:
      CheckpointError: the directory cannot be written (read-only, disk full, a file in its place).
    """
    check_config_type(lora, LoraParams, "export_peft: lora")
    check_path(out_dir, "export_peft: out_dir")
    if lora.coef is not None:
        raise ConfigError(
            "export_peft: this LoRA carries a traced layout (LoraParams.traced_layout); export "
            "lora.with_spec(<its static LoraSpec>) instead"
        )
    spec = lora.spec
    cfg = spec.config
    L = spec.num_layers
    if spec.use_dora and gates is not None:
        raise ConfigError(
            "export_peft: a gated DoRA is not a PEFT DoRA adapter (the gate mixes the base and DoRA "
            "weights); export the fine-tuned DoRA without gates"
        )
    layer_w = np.asarray(layer_gate_values(gates, L), np.float64)  # [L]
    adapted: dict[tuple[str, int], tuple[int, float]] = {}  # (module, layer) -> (rank, alpha)
    tensors: dict[str, np.ndarray] = {}
    for m in [m for m in spec.targets if m not in EXPERT_MODULES]:  # experts: moe_adapters.export_experts
        a, b = np.asarray(lora.weights[m]["a"], np.float32), np.asarray(lora.weights[m]["b"], np.float32)
        fold = layer_w[:, None] * np.asarray(rank_gate_values(gates, m, (L, spec.r_max_of(m))), np.float64)
        for layer, (rank, scale) in enumerate(zip(spec.rank_of(m), spec.scale_of(m))):
            if rank == 0 or scale == 0.0:
                continue
            alpha = scale * (math.sqrt(rank) if cfg.use_rslora else rank)
            adapted[(m, layer)] = (rank, float(f"{alpha:.10g}"))
            tensors[_tensor_key(m, layer, "A")] = np.ascontiguousarray(a[layer, :, :rank].T)  # (r, in)
            b_folded = b[layer, :rank, :] * fold[layer, :rank, None]
            tensors[_tensor_key(m, layer, "B")] = np.ascontiguousarray(b_folded.T.astype(np.float32))  # (out, r)
            if spec.use_dora:
                tensors[_tensor_key(m, layer, "M")] = np.asarray(lora.weights[m][MAGNITUDE][layer], np.float32)
    experts = [m for m in spec.targets if m in EXPERT_MODULES and any(spec.rank_of(m)) and any(spec.scale_of(m))]
    if not adapted and not experts:
        raise ConfigError("export_peft: the LoRA adapts no module (every rank or scale is 0); nothing to export")
    check_finite_tree(tensors, "export_peft: the LoRA (gates folded in)", NumericsError)
    use_rslora, names, r0, alpha0 = cfg.use_rslora, list(spec.targets), cfg.r, _plain_number(cfg.lora_alpha)
    expert_targets: list[str] = []
    if experts:  # one global rank and alpha for the experts, every block (see moe_adapters)
        r0, expert_targets = export_experts(lora, gates, tensors)
        alpha0, use_rslora, names = r0, False, [m for m in names if m not in EXPERT_MODULES]
        adapted = {(m, i): (rank, float(f"{spec.scale_of(m)[i] * rank:.10g}")) for (m, i), (rank, _) in adapted.items()}
    if spec.fused:  # Phi-3: PEFT sees qkv_proj / gate_up_proj, not their parts
        adapted, tensors = _fuse_adapter(spec, adapted, tensors)
        use_rslora = False  # every scale is folded into B or restated as alpha / r
        names = list(dict.fromkeys(next((f for f, parts in spec.fused if m in dict(parts)), m) for m in spec.targets))

    modules = [m for m in names if any((m, i) in adapted for i in range(L))]
    layers = sorted({i for _, i in adapted})
    target_modules: list[str]
    layers_to_transform: list[int] | None
    if len(adapted) == len(modules) * len(layers) and (not experts or len(layers) in (0, L)):  # a rectangle:
        target_modules = modules  # names + layers_to_transform (never with experts: it would filter them too)
        layers_to_transform = None if layers in ([], list(range(L))) else layers
    else:  # mixed: PEFT matches a fully qualified path exactly
        target_modules = [module_path(m, i) for i in range(L) for m in names if (m, i) in adapted]
        layers_to_transform = None
    target_modules += expert_targets
    rank_pattern = {module_path(m, i): r for (m, i), (r, _) in adapted.items() if r != r0}
    alpha_pattern = {
        module_path(m, i): _plain_number(a)
        for (m, i), (_, a) in adapted.items()
        if not math.isclose(a, alpha0, rel_tol=1e-9)
    }
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": cfg.use_dora,
        "lora_bias": False,
        "modules_to_save": None,
        "layer_replication": None,
    }
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / ADAPTER_WEIGHTS, tensors)
        write_bytes(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    except OSError as exc:  # fileio's WriteError (a full disk, a read-only place), or the folder itself
        raise CheckpointError(
            f"export_peft: could not write the adapter to {out}: "
            f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
        ) from None
    return out


def _fuse_adapter(
    spec: LoraSpec, adapted: dict[tuple[str, int], tuple[int, float]], tensors: dict[str, np.ndarray]
) -> tuple[dict, dict[str, np.ndarray]]:
    """Phi-3: the LoRA of q / k / v (gate / up) in a block as ONE LoRA of the fused projection, as PEFT adapts it.

    A stacks the parts' A over rank, B is block-diagonal (each part's rows x its rank columns) with the
    part's scale folded in, and alpha = rank (scale 1): the fused delta is exactly the parts' deltas. The
    other modules keep their tensors, their alpha restated without rsLoRA (scale x rank).
    """
    rslora = spec.config.use_rslora

    def scale(m: str, i: int) -> float:
        rank, alpha = adapted[(m, i)]
        return alpha / (math.sqrt(rank) if rslora else rank)

    parts_of = {m: f for f, parts in spec.fused for m, _ in parts}
    out = {
        (m, i): (rank, float(f"{scale(m, i) * rank:.10g}"))
        for (m, i), (rank, _) in adapted.items()
        if m not in parts_of
    }
    for fused, parts in spec.fused:
        for i in range(spec.num_layers):
            chosen = [m for m, _ in parts if (m, i) in adapted]
            if not chosen:
                continue
            if spec.use_dora and len(chosen) < len(parts):
                raise ConfigError(
                    f"export_peft: DoRA on {chosen} of block {i} cannot be written as PEFT's DoRA on "
                    f"the fused {fused} (one magnitude over {[m for m, _ in parts]}); adapt all of them"
                )
            rank = sum(adapted[(m, i)][0] for m in chosen)
            a_parts, b = [], np.zeros((sum(rows for _, rows in parts), rank), np.float32)
            row = col = 0
            for m, rows in parts:
                if (m, i) in adapted:
                    r = adapted[(m, i)][0]
                    a_parts.append(tensors.pop(_tensor_key(m, i, "A")))
                    b[row : row + rows, col : col + r] = tensors.pop(_tensor_key(m, i, "B")) * np.float32(scale(m, i))
                    col += r
                row += rows
            tensors[_tensor_key(fused, i, "A")] = np.ascontiguousarray(np.concatenate(a_parts))
            tensors[_tensor_key(fused, i, "B")] = b
            if spec.use_dora:
                tensors[_tensor_key(fused, i, "M")] = np.concatenate(
                    [tensors.pop(_tensor_key(m, i, "M")) for m, _ in parts]
                )
            out[(fused, i)] = (rank, float(rank))
    return out, tensors


def export_merged(
    config: ModelConfig,
    params: dict[str, Any],
    lora: LoraParams,
    out_dir: str | os.PathLike,
    *,
    gates: Gates | None = None,
    tokenizer: Any = None,
    dtype: str | None = None,
) -> Path:
    """Write the base model with the (gated) LoRA merged in as an HF directory transformers loads.

    The merge is computed in fp32 and cast to the base dtype (or ``dtype`` when given). The params must be
    ``config``'s and the LoRA (gates folded in) finite, checked before anything is written.
    """
    check_config_type(config, ModelConfig, "export_merged: config")
    check_config_type(lora, LoraParams, "export_merged: lora")
    check_path(out_dir, "export_merged: out_dir")
    check_tree_shapes(params, abstract_params(config), "export_merged: params", ConfigError)
    if lora.spec.num_layers != config.num_hidden_layers:
        raise ConfigError(
            f"export_merged: the LoRA has {lora.spec.num_layers} layers, the model {config.num_hidden_layers}"
        )
    check_finite_tree(lora.weights, "export_merged: the LoRA", NumericsError)
    if gates is not None:
        check_finite_tree(gates, "export_merged: the gates", NumericsError)
    return save_model(config, merge(params, lora, gates), out_dir, tokenizer=tokenizer, dtype=dtype)


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------------------------------- load
def load_peft(adapter_dir: str | os.PathLike, config: ModelConfig) -> LoraParams:
    """Read a PEFT LoRA adapter directory (written by PEFT or by :func:`export_peft`) for ``config``'s model.

    Returns LoRA params whose spec carries the adapter's targets, per-(module, block) ranks and
    scales, so ``flexora_jax.forward(config, params, tokens, lora=...)`` computes what PEFT computes.
    Raises :class:`ConfigError` for an ``adapter_config.json`` field that is unknown or that changes
    the function in a way flexora_jax does not implement, and :class:`CheckpointError` for missing
    files, missing or unexpected tensors and shapes that do not match the base model.
    """
    directory = check_path(adapter_dir, "load_peft: adapter_dir")
    check_config_type(config, ModelConfig, "load_peft: config")
    raw, cfg_file = _read_config(directory)
    check_peft_fields(raw, cfg_file)
    check_peft_values(raw, cfg_file)
    if raw.get("peft_type") == "ADALORA":  # rank-pruned: the kept triplets, Lambda and the scale folded into B
        return to_lora(config, *_adalora(directory, raw, cfg_file, config))
    weights_file = directory / ADAPTER_WEIGHTS
    L = config.num_hidden_layers
    adapted = _resolve_targets(raw, cfg_file, config)  # (module, layer) or (module, layer, expert) keys
    r0 = check_number(raw.get("r", 8), f"{cfg_file}: r", lo=1, integer=True)
    alpha0 = check_number(raw.get("lora_alpha", 8), f"{cfg_file}: lora_alpha", lo=0, lo_open=True)
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    ranks: dict[tuple, int] = {}
    alphas: dict[tuple, float] = {}
    for key in adapted:
        path = peft_path(*key)
        rank = _pattern_value(rank_pattern, path, r0, "rank_pattern", cfg_file)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ConfigError(f"{cfg_file}: rank_pattern gives {path} rank {rank!r}; PEFT needs a positive integer")
        ranks[key] = rank
        alphas[key] = float(_pattern_value(alpha_pattern, path, alpha0, "alpha_pattern", cfg_file))

    tensors = _read_tensors(directory)
    use_dora = bool(raw.get("use_dora", False))
    expected = {
        _tensor_key(k[0], k[1], w, *k[2:]): (k, w) for k in adapted for w in ("A", "B", "M")[: 3 if use_dora else 2]
    }
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{weights_file}: missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} "
            f"({len(missing)} in all) that {ADAPTER_CONFIG} implies"
        )
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise CheckpointError(
            f"{weights_file}: unexpected tensor(s) {extra[:4]}{' ...' if len(extra) > 4 else ''} "
            f"({len(extra)} in all): {ADAPTER_CONFIG} does not adapt these modules, or the adapter "
            f"was made for a different model ({L}-layer {config.model_type} expected)"
        )
    for key, (k, w) in expected.items():
        d_in, d_out = _peft_shape(config, k[0])
        want = (ranks[k], d_in) if w == "A" else (d_out, ranks[k]) if w == "B" else (d_out,)
        got = tuple(tensors[key].shape)
        if got != want:
            if w != "M" and len(got) == 2 and (got[1] if w == "A" else got[0]) == (d_in if w == "A" else d_out):
                raise CheckpointError(
                    f"{weights_file}: tensor {key} has rank {got[0] if w == 'A' else got[1]} (shape {got}), but "
                    f"{ADAPTER_CONFIG} gives {peft_path(*k)} rank {ranks[k]} (expected shape {want})"
                )
            raise CheckpointError(
                f"{weights_file}: tensor {key} has shape {got}, expected {want}: the adapter was made for a base "
                f"model of different shape ({k[0]} of this model is {d_in} -> {d_out}: hidden_size "
                f"{config.hidden_size}, intermediate_size {config.intermediate_size}, "
                f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads of {config.head_dim})"
            )

    if config.fused_modules:
        _split_fused(config, ranks, alphas, tensors, use_dora)
    if config.num_local_experts:
        group_experts(config, ranks, alphas, tensors, bool(raw.get("use_rslora", False)))
    lora_config = _lora_config(raw, cfg_file, ranks, alphas, r0, float(alpha0), L)
    spec = make_spec(config, lora_config)
    weights = {}
    for m in spec.targets:
        (d_in, d_out), ex = config.module_shape(m), expert_axes(config, m)
        r_max = spec.r_max_of(m)
        a = np.zeros((L, *ex, d_in, r_max), np.float32)
        b = np.zeros((L, *ex, r_max, d_out), np.float32)
        for i in [i for i in range(L) if (m, i) in ranks]:
            for e in range(ex[0]) if ex else [None]:  # a mixture's experts: one LoRA each
                r, at = ranks[(m, i)], (i,) if e is None else (i, e)
                a[at][:, :r] = tensors[_tensor_key(m, i, "A", e)].T
                b[at][:r, :] = tensors[_tensor_key(m, i, "B", e)].T
        weights[m] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
        if use_dora:
            weights[m][MAGNITUDE] = jnp.asarray(
                np.stack(
                    [
                        tensors[_tensor_key(m, i, "M")] if (m, i) in ranks else np.zeros(d_out, np.float32)
                        for i in range(L)
                    ]
                )
            )
    return LoraParams(weights=weights, spec=spec)


def _read_config(directory: Path) -> tuple[dict[str, Any], Path]:
    """An adapter directory's ``adapter_config.json`` as a dict (and its path)."""
    cfg_file = directory / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise CheckpointError(f"{directory} is not a PEFT adapter directory: {ADAPTER_CONFIG} is missing")
    raw = read_json(cfg_file, "a PEFT adapter config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
    return raw, cfg_file


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as fp32 (bf16 / fp16 files too)."""
    weights_file = directory / ADAPTER_WEIGHTS
    if not weights_file.exists():
        hint = (
            " (adapter_model.bin is pickle, which flexora_jax does not read; re-save it with PEFT's "
            "save_pretrained(safe_serialization=True))"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{directory}: {ADAPTER_WEIGHTS} is missing{hint}")
    tensors = {k: v.astype(np.float32) for k, v in read_safetensors(weights_file).items()}
    check_finite_tree(tensors, str(weights_file))
    return tensors


# ---------------------------------------------------------------------------------------- AdaLoRA
def load_adalora(
    adapter_dir: str | os.PathLike, config: ModelConfig
) -> tuple[AdaLoraConfig, dict[str, dict[str, Any]], tuple[int, ...]]:
    """Read a PEFT AdaLoRA adapter (``peft_type: ADALORA``, by PEFT or :func:`flexora_jax.adalora.export_adalora`).

    Returns ``(ada_config, weights, layers)``: the allocator config, the SVD-form weights ``{module: {"a":
    [L, d_in, init_r] (P), "e": [L, init_r] (Lambda), "b": [L, init_r, d_out] (Q)}}`` and the adapted blocks,
    what :func:`~flexora_jax.adalora.as_lora`, :func:`~flexora_jax.adalora.to_lora` and
    :func:`~flexora_jax.adalora.export_adalora` take. A PEFT-saved adapter whose allocator has run holds only
    the kept triplets and ``rank_pattern`` (module -> kept mask over ``init_r``); they return to their slots and
    the pruned ones have Lambda = 0. The scale is PEFT's ``lora_alpha / (init_r + 1e-5)`` either way.
    """
    directory = Path(adapter_dir)
    raw, cfg_file = _read_config(directory)
    if raw.get("peft_type") != "ADALORA":
        raise ConfigError(
            f"{cfg_file}: peft_type {raw.get('peft_type')!r} is not an AdaLoRA adapter ('ADALORA'); "
            "load it with load_peft"
        )
    check_peft_fields(raw, cfg_file)
    return _adalora(directory, raw, cfg_file, config)


def _adalora(
    directory: Path, raw: dict[str, Any], cfg_file: Path, config: ModelConfig
) -> tuple[AdaLoraConfig, dict[str, dict[str, Any]], tuple[int, ...]]:
    if config.fused_modules:
        raise ConfigError(
            f"{cfg_file}: AdaLoRA adapters of a model with fused projections ({config.model_type}: "
            f"{sorted(config.fused_modules)}) are not supported; only LoRA / DoRA adapters are"
        )
    L = config.num_hidden_layers
    adapted = _resolve_targets(raw, cfg_file, config)
    if any(len(k) != 2 for k in adapted):
        raise ConfigError(
            f"{cfg_file}: AdaLoRA adapters on a mixture's experts are not supported; only LoRA / DoRA adapters are"
        )
    modules = tuple(m for m in ALL_MODULES if any(k[0] == m for k in adapted))
    layers = tuple(sorted({i for _, i in adapted}))
    if len(adapted) != len(modules) * len(layers):
        raise ConfigError(
            f"{cfg_file}: the AdaLoRA adapts {len(adapted)} (module, block) pairs, not every one of "
            f"modules {list(modules)} x blocks {list(layers)}; flexora_jax's AdaLoRA needs that "
            "rectangle"
        )
    try:
        ada = AdaLoraConfig(
            **{k: raw[k] for k in ADALORA_FIELDS if k in raw},
            lora_alpha=float(raw.get("lora_alpha", 8)),
            target_modules=modules,
        )
    except ConfigError as exc:
        raise ConfigError(f"{cfg_file}: {exc}") from None
    r = ada.init_r
    kept = _adalora_kept(raw.get("rank_pattern"), cfg_file, adapted, r)
    tensors = _read_tensors(directory)
    names = {f"{_PREFIX}{module_path(m, i)}.lora_{w}": (m, i, w) for m, i in adapted for w in "AEB"}
    missing = [k for k in names if k not in tensors]
    extra = sorted(k for k in tensors if k not in names)
    if missing or extra:
        raise CheckpointError(
            f"{directory / ADAPTER_WEIGHTS}: {'missing ' + str(missing[:3]) if missing else ''}"
            f"{' ' if missing and extra else ''}{'unexpected ' + str(extra[:3]) if extra else ''} "
            f"tensor(s): {ADAPTER_CONFIG} adapts {list(modules)} in blocks {list(layers)} of this "
            f"{L}-layer {config.model_type}"
        )
    weights = {}
    for m in modules:
        d_in, d_out = config.module_shape(m)
        a, e, b = np.zeros((L, d_in, r), np.float32), np.zeros((L, r), np.float32), np.zeros((L, r, d_out), np.float32)
        for i in layers:
            slots = kept[(m, i)]
            k = len(slots)
            for w, want in (("A", (k, d_in)), ("E", (k, 1)), ("B", (d_out, k))):
                key = f"{_PREFIX}{module_path(m, i)}.lora_{w}"
                if tensors[key].shape != want:
                    raise CheckpointError(
                        f"{directory / ADAPTER_WEIGHTS}: tensor {key} has shape "
                        f"{tuple(tensors[key].shape)}, expected {want} ({k} kept of init_r {r}; "
                        f"{m} is {d_in} -> {d_out} in this model)"
                    )
            prefix = f"{_PREFIX}{module_path(m, i)}.lora_"
            a[i][:, slots] = tensors[prefix + "A"].T
            e[i][slots] = tensors[prefix + "E"][:, 0]
            b[i][slots, :] = tensors[prefix + "B"].T
        weights[m] = {"a": jnp.asarray(a), "e": jnp.asarray(e), "b": jnp.asarray(b)}
    return ada, weights, layers


def _adalora_kept(
    rank_pattern: Any, cfg_file: Path, adapted: list[tuple[str, int]], init_r: int
) -> dict[tuple[str, int], np.ndarray]:
    """The ``init_r`` slots each (module, block) holds: all of them, or ``rank_pattern``'s kept mask (PEFT
    writes it once the allocator has masked, under keys like ``model.layers.0.self_attn.q_proj.lora_E``)."""
    if rank_pattern is None:
        return {k: np.arange(init_r) for k in adapted}
    if not isinstance(rank_pattern, dict):
        raise ConfigError(
            f"{cfg_file}: rank_pattern must be null or a mapping of module to kept mask, got {rank_pattern!r}"
        )
    masks = {}
    for key, mask in rank_pattern.items():
        found = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+?)(?:\.lora_E)?(?:\.\w+)?$", key)
        if (
            found is None
            or not isinstance(mask, list)
            or len(mask) != init_r
            or not all(isinstance(x, bool) for x in mask)
        ):
            raise ConfigError(
                f"{cfg_file}: rank_pattern entry {key!r}: {mask!r} is not an AdaLoRA kept mask "
                f"(a module path -> {init_r} (init_r) true / false values)"
            )
        masks[(found.group(2), int(found.group(1)))] = np.flatnonzero(mask)
    missing = [module_path(m, i) for m, i in adapted if (m, i) not in masks]
    if missing:
        raise ConfigError(
            f"{cfg_file}: rank_pattern has no kept mask for {missing[:3]} ({len(missing)} adapted module(s) in all)"
        )
    return masks


def peft_modules(config: ModelConfig) -> tuple[str, ...]:
    """The module names PEFT sees in a block of this model (Phi-3: the fused ``qkv_proj`` / ``gate_up_proj``)."""
    fused = config.fused_modules
    parts_of = {m: f for f, parts in fused.items() for m, _ in parts}
    return tuple(dict.fromkeys(parts_of.get(m, m) for m in config.linear_modules))


def _peft_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    parts = config.fused_modules.get(module)
    if parts is None:
        return config.module_shape(module)
    return config.module_shape(parts[0][0])[0], sum(rows for _, rows in parts)


def _split_fused(
    config: ModelConfig, ranks: dict, alphas: dict, tensors: dict[str, np.ndarray], use_dora: bool
) -> None:
    """Phi-3 (in place): a fused module's LoRA as LoRA on each part with the same A, rank and alpha, B (and
    DoRA's magnitude, which PEFT applies row-wise) cut by rows: exactly the fused delta."""
    for f, i in [k for k in ranks if k[0] in config.fused_modules]:
        rank, alpha = ranks.pop((f, i)), alphas.pop((f, i))
        a, b = tensors.pop(_tensor_key(f, i, "A")), tensors.pop(_tensor_key(f, i, "B"))
        mag = tensors.pop(_tensor_key(f, i, "M")) if use_dora else None
        row = 0
        for m, rows in config.fused_modules[f]:
            ranks[(m, i)], alphas[(m, i)] = rank, alpha
            tensors[_tensor_key(m, i, "A")], tensors[_tensor_key(m, i, "B")] = a, b[row : row + rows]
            if mag is not None:
                tensors[_tensor_key(m, i, "M")] = mag[row : row + rows]
            row += rows


def _resolve_targets(raw: dict[str, Any], cfg_file: Path, config: ModelConfig) -> list[tuple]:
    """The (module, layer) pairs PEFT 0.21 would adapt on a LLaMA-family CausalLM, in block order; (module,
    layer, expert) for a mixture's experts (one LoRA per expert, :mod:`flexora_jax.moe_adapters`)."""
    tm, modules, num_layers = raw.get("target_modules"), peft_modules(config), config.num_hidden_layers
    if tm is None:
        raise ConfigError(f"{cfg_file}: target_modules is null; name the adapted modules")
    layers_to_transform = raw.get("layers_to_transform")
    if isinstance(tm, str) and tm.lower() == "all-linear":
        if config.num_local_experts:
            raise ConfigError(
                f"{cfg_file}: target_modules 'all-linear' adapts the router (block_sparse_moe.gate) of "
                f"a {config.model_type} model in PEFT, which flexora_jax never adapts; list the modules"
            )
        tm = list(modules)  # PEFT: every nn.Linear except the output layer
    candidates: dict[str, tuple] = {
        module_path(m, i): (m, i) for i in range(num_layers) for m in modules if m not in EXPERT_MODULES
    }
    candidates.update(expert_paths(config))
    others = _other_module_paths(num_layers) + moe_other_paths(config)
    if isinstance(tm, str):
        if layers_to_transform is not None:
            raise ConfigError(
                f"{cfg_file}: layers_to_transform cannot be used with a regex target_modules "
                f"({tm!r}); PEFT rejects this combination too"
            )
        try:
            hits = [k for k in candidates if re.fullmatch(tm, k)]
            bad = [k for k in others if re.fullmatch(tm, k)]
        except re.error as exc:
            raise ConfigError(f"{cfg_file}: target_modules {tm!r} is not a valid regex ({exc})") from None
        if bad:
            raise ConfigError(
                f"{cfg_file}: target_modules {tm!r} selects {bad[:3]}, which flexora_jax does "
                f"not adapt (only {list(modules)} inside the decoder blocks)"
            )
    else:
        if not isinstance(tm, (list, tuple)) or not all(isinstance(t, str) for t in tm):
            raise ConfigError(
                f"{cfg_file}: target_modules must be a list of module names or a regex string, got {tm!r}"
            )
        for t in tm:
            if not any(k == t or k.endswith("." + t) for k in candidates):
                raise ConfigError(
                    f"{cfg_file}: target_modules entry {t!r} names no module flexora_jax can adapt "
                    f"in a {num_layers}-layer model (valid: {list(modules)} or "
                    f"'model.layers.<i>.self_attn|mlp.<name>')"
                )
        hits = [k for k in candidates if k in tm or any(k.endswith("." + t) for t in tm)]
        if layers_to_transform is not None:
            hits = _filter_layers(hits, tm, raw, cfg_file, num_layers)
    excl = raw.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            hits = [k for k in hits if not re.fullmatch(excl, k)]
        else:
            hits = [k for k in hits if not (k in excl or any(k.endswith("." + e) for e in excl))]
    if not hits:
        raise ConfigError(
            f"{cfg_file}: target_modules {raw.get('target_modules')!r} (with layers_to_transform "
            f"{layers_to_transform!r}, exclude_modules {excl!r}) adapts no module of this "
            f"{num_layers}-layer model"
        )
    return [candidates[k] for k in hits]


def _filter_layers(hits: list[str], tm: list[str], raw: dict[str, Any], cfg_file: Path, num_layers: int) -> list[str]:
    """PEFT's ``layers_to_transform``: only a module named exactly in target_modules escapes the filter."""
    idx = raw["layers_to_transform"]
    indexes = [idx] if isinstance(idx, int) else list(idx)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes):
        raise ConfigError(f"{cfg_file}: layers_to_transform must be an int or a list of ints, got {idx!r}")
    if isinstance(idx, list) and not indexes:
        return hits  # PEFT: an empty list means every layer
    bad = [i for i in indexes if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"{cfg_file}: layers_to_transform has index(es) {bad} out of range for this "
            f"{num_layers}-layer model (valid: 0..{num_layers - 1})"
        )
    patterns = raw.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) and patterns else list(patterns or [])
    kept = []
    for key in hits:
        if key in tm:
            kept.append(key)
            continue
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = next((mt for p in patterns if (mt := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
        if match is not None and int(match.group("idx")) in indexes:
            kept.append(key)
    return kept


def _pattern_value(pattern: dict[str, Any], path: str, default: Any, field: str, cfg_file: Path) -> Any:
    """PEFT's ``get_pattern_key``: the first key (a regex) matching a suffix of the module path wins."""
    if not isinstance(pattern, dict):
        raise ConfigError(f"{cfg_file}: {field} must be a JSON object, got {pattern!r}")
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as exc:
            raise ConfigError(f"{cfg_file}: {field} key {key!r} is not a valid regex ({exc})") from None
    return default


def _lora_config(
    raw: dict[str, Any],
    cfg_file: Path,
    ranks: dict[tuple[str, int], int],
    alphas: dict[tuple[str, int], float],
    r0: int,
    alpha0: float,
    num_layers: int,
) -> LoraConfig:
    """An unambiguous LoraConfig for the resolved adapter: fully qualified keys, rank 0 off the adapted set."""
    modules = tuple(m for m in LORA_MODULES if any(k[0] == m for k in ranks))
    layers = tuple(sorted({i for _, i in ranks}))
    rank_pattern = {
        module_path(m, i): ranks.get((m, i), 0) for i in layers for m in modules if ranks.get((m, i), 0) != r0
    }
    alpha_pattern = {module_path(m, i): a for (m, i), a in alphas.items() if a != alpha0}
    init = raw.get("init_lora_weights", True)
    try:
        return LoraConfig(
            r=r0,
            lora_alpha=alpha0,
            lora_dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
            target_modules=modules,
            layers_to_transform=None if layers == tuple(range(num_layers)) else layers,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_rslora=bool(raw.get("use_rslora", False)),
            init_lora_weights=init if init in (True, False, "gaussian") else True,
            use_dora=bool(raw.get("use_dora", False)),
        )
    except ConfigError as exc:
        raise ConfigError(f"{cfg_file}: {exc}") from None
