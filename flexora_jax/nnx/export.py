"""Adapters of NNX models on disk: native (keyed by NNX paths) and PEFT (through a naming hook).

Native format, a directory that :func:`load_adapter` reads back into the same model class::

    adapter.safetensors   every nnx.LoRAParam and Gate, keyed by its dotted NNX path
                          ("blocks.0.attn.q.lora_a", "blocks.0.attn.k.lora_gate", ...)
    adapter_config.json   the LoRA sites (module path, kernel, layers, contracted axes, ranks, alpha)
                          and which gates each carries, so LoRA can be rebuilt on a fresh base model
    selection.json        the search's selection, when given (layers, ranks, modules, trainable_params)

PEFT format (:func:`save_peft`): ``adapter_model.safetensors`` + ``adapter_config.json`` as PEFT
writes them, the gate multipliers folded into B. Module names come from a hook ``peft_name(path,
layer) -> str`` mapping an NNX module path (and its layer) to the PEFT module name, e.g. for a model
whose blocks live at ``blocks.<i>``::

    save_peft(model, "adapter", peft_name=lambda path, i: f"model.layers.{i}.self_attn.{path.rsplit('.', 1)[-1]}_proj")

A is flattened over the kernel's contracted axes and B over its free axes, in kernel order (PEFT's
``lora_A.weight`` [r, d_in], ``lora_B.weight`` [d_out, r]); the hook is also where the caller vouches
that this matches the torch module's weight layout. ``LlamaForCausalLM`` uses the library's own HF
names (:func:`flexora_jax.adapters.export_peft`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from flexora_jax.config import LoraConfig
from flexora_jax.errors import CheckpointError, ConfigError, NumericsError
from flexora_jax.fileio import write_json, write_with
from flexora_jax.models.hf import read_safetensors
from flexora_jax.nnx.surgery import LoraSite, adapted_modules, attach_lora, count_lora_params, lora_scale, path_str
from flexora_jax.nnx.variables import Gate
from flexora_jax.selection import Selection
from flexora_jax.validation import (
    check_callable,
    check_config_type,
    check_finite_tree,
    check_mapping,
    check_path,
    check_type,
    read_json,
)

ADAPTER_FILE, CONFIG_FILE, SELECTION_FILE = "adapter.safetensors", "adapter_config.json", "selection.json"
PeftName = Callable[[str, int], str]
_CONFIG_KEYS = ("format", "model", "sites", "lora_config")
_SITE_FLAGS = {"layer_gate": bool, "rank_gate": bool}


def _flat(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every LoRAParam and Gate of ``model`` by dotted NNX path (a shared gate once, at its first path)."""
    state = nnx.state(model, nnx.Any(nnx.LoRAParam, Gate))
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def save_adapter(model: nnx.Module, directory: str | os.PathLike, selection: Selection | None = None) -> Path:
    """Write the model's LoRA and gates keyed by NNX paths (plus ``selection.json``); returns the directory."""
    check_config_type(model, nnx.Module, "save_adapter: model")
    out = check_path(directory, "save_adapter: directory")
    if selection is not None:
        check_config_type(selection, Selection, "save_adapter: selection")
    tensors = {key: np.asarray(v.get_value()) for key, v in _flat(model).items()}
    if not tensors:
        raise CheckpointError(f"save_adapter: {type(model).__name__} has no LoRA to save")
    check_finite_tree(tensors, f"save_adapter: the LoRA of this {type(model).__name__}", NumericsError)
    sites = {}
    for path, module in adapted_modules(model).items():
        sites[path] = {
            **dataclasses.asdict(module.lora_site),
            "layer_gate": "lora_gate" in vars(module),
            "rank_gate": "lora_rank_gate" in vars(module),
        }
    lora_config = getattr(model, "lora_config", None)  # a model over the decoder's core: its PEFT-field LoRA
    config = {
        "format": "flexora_jax.nnx",
        "model": type(model).__name__,
        "sites": sites,
        "lora_config": lora_config.to_dict() if isinstance(lora_config, LoraConfig) else None,
    }
    try:
        write_with(out / ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp)))
        write_json(out / CONFIG_FILE, config)
        if selection is not None:
            write_json(out / SELECTION_FILE, selection.to_json(count_lora_params(model)))
    except OSError as exc:  # fileio's WriteError: a full disk, a read-only place
        raise CheckpointError(
            f"save_adapter: could not write {out}: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
        ) from None
    return out


def _rebuild_sites(model: nnx.Module, sites: dict[str, dict[str, Any]], source: Path) -> None:
    """Recreate LoRA on a bare model from saved sites (no probing: the layout is in the file)."""
    modules = {path_str(p): m for p, m in nnx.iter_modules(model)}
    shared: dict[Any, Gate] = {}
    for path, raw in sites.items():
        if path not in modules:
            raise CheckpointError(
                f"load_adapter: {source} adapts module {path!r}, which this "
                f"{type(model).__name__} does not have (an adapter of another model?)"
            )
        raw = dict(raw)
        flags = raw.pop("layer_gate"), raw.pop("rank_gate")
        site = LoraSite(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        gates = {(True, True): "both", (True, False): "layer", (False, True): "rank"}.get(flags)
        attach_lora(
            modules[path],
            site,
            gates=gates,
            layers=None,
            ranks={path: site.ranks},
            shared_gates=shared,
            rngs=nnx.Rngs(0),
        )


def load_adapter(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """Load a :func:`save_adapter` directory into ``model`` (in place); LoRA is rebuilt first if absent.

    Raises CheckpointError naming the file and the key on a missing, unexpected or mis-shaped tensor.
    The selection, if saved, reads back with ``Selection.from_json(json.load(open(dir / "selection.json")))``.
    """
    check_config_type(model, nnx.Module, "load_adapter: model")
    source = check_path(directory, "load_adapter: directory")
    config = _read_config(source / CONFIG_FILE)
    if not (source / ADAPTER_FILE).is_file():
        raise CheckpointError(f"load_adapter: {source / ADAPTER_FILE} is missing; expected a save_adapter directory")
    tensors = read_safetensors(source / ADAPTER_FILE)
    check_finite_tree(tensors, f"load_adapter: {source / ADAPTER_FILE}")
    if not _flat(model) and config.get("sites"):
        _rebuild_sites(model, config["sites"], source)
    current = _flat(model)
    missing, unexpected = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"load_adapter: {source / ADAPTER_FILE} does not match this model: missing "
            f"{missing[:6]}, unexpected {unexpected[:6]}"
        )
    for key, var in current.items():
        value = tensors[key]
        if value.shape != var.get_value().shape:
            raise CheckpointError(
                f"load_adapter: {source / ADAPTER_FILE}: {key!r} has shape {value.shape}, "
                f"the model expects {var.get_value().shape}"
            )
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    return model


def _read_config(file: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a save_adapter directory, every key and site field checked (CheckpointError)."""
    config = check_mapping(
        read_json(file, "save_adapter's adapter config"), str(file), _CONFIG_KEYS, ("sites",), error=CheckpointError
    )
    if config.get("format", "flexora_jax.nnx") != "flexora_jax.nnx":
        raise CheckpointError(
            f"{file}: format {config['format']!r} is not 'flexora_jax.nnx' (a PEFT adapter? read it with fj.load_peft)"
        )
    check_mapping(config["sites"], f"{file}: sites", error=CheckpointError)
    hints = typing.get_type_hints(LoraSite) | _SITE_FLAGS
    for path, site in config["sites"].items():
        where = f"{file}: sites[{path!r}]"
        check_mapping(site, where, hints, hints, error=CheckpointError)
        for key, hint in hints.items():
            check_type(site[key], hint, f"{where}.{key}", error=CheckpointError)
    return dict(config)


PeftEntry = tuple[np.ndarray, np.ndarray, int, float]  # A [r, in], B [out, r] (gates folded), rank, alpha


def _peft_tensors(module: nnx.Module, name: PeftName | None) -> dict[tuple[str, int], PeftEntry]:
    """``{(peft module name, layer): (A [r, in], B [out, r] with gates folded, rank, alpha)}`` of one module."""
    site: LoraSite = module.lora_site
    a = np.asarray(module.lora_a.get_value(), np.float64)
    b = np.asarray(module.lora_b.get_value(), np.float64)
    coeff = np.ones(a.shape[: -1 - len(site.in_axes)] + (site.rank,)) * site.scale
    for attr in ("lora_gate", "lora_rank_gate"):
        if attr in vars(module):
            gate = np.asarray(getattr(module, attr).get_value(), np.float64)
            coeff = coeff * (gate[..., None] if attr == "lora_gate" else gate)
    if not site.stacked:
        a, b, coeff = a[None], b[None], coeff[None]
    out = {}
    for i, (layer, rank) in enumerate(zip(site.layers, site.ranks)):
        if rank == 0:
            continue
        peft_scale = lora_scale(site.alpha, rank, site.use_rslora)
        a2 = a[i].reshape(-1, site.rank)[:, :rank]
        b2 = b[i].reshape(site.rank, -1)[:rank] * (coeff[i, :rank] / peft_scale)[:, None]
        key = name(site.path, layer) if name else (site.path if not site.stacked else f"{site.path}.{layer}")
        if not isinstance(key, str) or not key:
            raise ConfigError(
                f"save_peft: peft_name({site.path!r}, {layer}) returned {key!r}; expected the PEFT "
                "module name (a non-empty string, e.g. 'model.layers.0.self_attn.q_proj')"
            )
        out[(key, layer)] = (a2.T.astype(np.float32), b2.T.astype(np.float32), rank, site.alpha)
    return out


def save_peft(
    model: nnx.Module,
    directory: str | os.PathLike,
    peft_name: PeftName | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the model's LoRA as a PEFT adapter (gates folded into B), module names from ``peft_name``.

    A model that computes through its own core and defines ``save_peft(directory, base_model_name_or_path)``
    (``LlamaForCausalLM``: HF's names already) writes its adapter itself."""
    check_config_type(model, nnx.Module, "save_peft: model")
    check_path(directory, "save_peft: directory")
    check_callable(peft_name, "save_peft: peft_name")
    own = getattr(model, "save_peft", None)
    if callable(own):
        return own(directory, base_model_name_or_path=base_model_name_or_path)
    modules = adapted_modules(model).values()
    entries, owners = {}, {}
    for module in modules:
        for (key, layer), entry in _peft_tensors(module, peft_name).items():
            here = f"module {module.lora_site.path!r} layer {layer}"
            if key in owners:  # one PEFT name, two tensors: the second would overwrite the first
                raise ConfigError(
                    f"save_peft: peft_name gives {owners[key]} and {here} the same PEFT name {key!r}; "
                    "expected one name per adapted module and layer (nothing was written)"
                )
            owners[key] = here
            entries[(key, layer)] = entry
    if not entries:
        raise CheckpointError(f"save_peft: {type(model).__name__} has no LoRA to export")
    tensors = {}
    for (key, _), (a, b, _, _) in entries.items():
        tensors[f"base_model.model.{key}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{key}.lora_B.weight"] = np.ascontiguousarray(b)
    check_finite_tree(tensors, f"save_peft: the LoRA of this {type(model).__name__}", NumericsError)
    r = max(rank for _, _, rank, _ in entries.values())
    alpha = max(al for _, _, _, al in entries.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(k for k, _ in entries),
        "rank_pattern": {k: rank for (k, _), (_, _, rank, _) in entries.items() if rank != r},
        "alpha_pattern": {k: al for (k, _), (_, _, _, al) in entries.items() if not math.isclose(al, alpha)},
        "use_rslora": any(m.lora_site.use_rslora for m in modules),
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "modules_to_save": None,
    }
    out = Path(directory)
    try:
        write_with(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        write_json(out / "adapter_config.json", config)
    except OSError as exc:  # fileio's WriteError: a full disk, a read-only place
        raise CheckpointError(
            f"save_peft: could not write {out}: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
        ) from None
    return out
