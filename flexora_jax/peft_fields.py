"""PEFT's ``adapter_config.json`` fields: which flexora_jax reads, which are bookkeeping, which must stay neutral.

Why a module of its own: two readers share one policy. :func:`flexora_jax.adapters.load_peft` reads an
adapter directory for a given model; :meth:`flexora_jax.config.LoraConfig.from_peft` turns a PEFT config (a
``peft.LoraConfig``, its ``to_dict()`` or an ``adapter_config.json``) into a training config without a
model. Both accept the same fields and refuse the same values, each by name with a :class:`ConfigError`:

- fields we implement (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``use_dora``, ...);
- bookkeeping that never changes the function (``task_type``, ``peft_version``, ``inference_mode``, ...);
- settings that change the function unless at their neutral value (``bias="none"``,
  ``modules_to_save=None``, ``fan_in_fan_out=False``, ...): any other value is refused;
- AdaLoRA's allocator fields (``beta1``, ``deltaT``, ``init_r``, ...) in a ``peft_type: ADALORA`` config;
- any other field: not PEFT's, refused.

This module knows PEFT and nothing of the model: :func:`lora_config_kwargs` is told the adaptable module
names and how a (module, block) path is spelled (``flexora_jax.config.module_path``).
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flexora_jax.errors import ConfigError
from flexora_jax.validation import check_bool, check_mapping, check_number, check_regex

ADAPTER_CONFIG = "adapter_config.json"

# PEFT 0.21 LoraConfig fields, by what reading them means for us.
USED_FIELDS = frozenset(
    {
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "init_lora_weights",
        "use_dora",
    }
)
METADATA_FIELDS = frozenset(
    {  # bookkeeping, or settings that only matter for other models/initialisers
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "megatron_config",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "qalora_group_size",
        "runtime_config",
        "ensure_weight_tying",
    }
)
NEUTRAL_FIELDS: dict[str, str] = {  # change the function unless at their neutral value: field -> why
    "fan_in_fan_out": "weights stored as (in, out)",
    "bias": "trained bias terms",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "layer_replication": "replicated decoder layers",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trained embedding rows",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
}
NEUTRAL_VALUES: dict[str, Any] = {"bias": "none"}
HARMLESS_INIT = (True, False, "gaussian", "orthogonal")  # initialisers that do not touch the base weights
TASK_TYPES = (None, "CAUSAL_LM")
PEFT_TYPES = ("LORA", "ADALORA")
#: PEFT 0.21 AdaLoraConfig's own fields (its ``rank_pattern`` is a {module: kept-triplet mask}, not LoRA's).
ADALORA_FIELDS = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def check_peft_fields(raw: Mapping[str, Any], where: str | os.PathLike) -> None:
    """Unknown fields and function-changing settings fail here, each naming the field (``where``: the file)."""
    peft_type = raw.get("peft_type", "LORA")
    adalora = peft_type == "ADALORA"
    known = USED_FIELDS | METADATA_FIELDS | set(NEUTRAL_FIELDS) | {"peft_type", "task_type"}
    unknown = sorted(set(raw) - known - (set(ADALORA_FIELDS) if adalora else set()))
    if unknown:
        kind = "AdaLoraConfig" if adalora else "LoraConfig"
        raise ConfigError(
            f"{where}: unknown field(s) {unknown}; they are not PEFT {kind} fields "
            "(is this a LoRA adapter_config.json?)"
        )
    if peft_type not in PEFT_TYPES:
        raise ConfigError(f"{where}: peft_type {peft_type!r} is not supported; only {list(PEFT_TYPES)} are")
    if raw.get("task_type") not in TASK_TYPES:
        raise ConfigError(
            f"{where}: task_type {raw['task_type']!r} is not supported; supported: {list(TASK_TYPES)} (a causal LM)"
        )
    for field, what in NEUTRAL_FIELDS.items():
        value = raw.get(field)
        neutral = NEUTRAL_VALUES.get(field)
        if value is not None and value != neutral and value not in (False, [], {}):
            raise ConfigError(
                f"{where}: {field}={value!r} ({what}) is not supported by flexora_jax; only {neutral!r} is"
            )
    if not isinstance(raw.get("use_dora", False), bool):
        raise ConfigError(f"{where}: use_dora must be true or false, got {raw['use_dora']!r}")
    if adalora and raw.get("use_dora"):
        raise ConfigError(f"{where}: use_dora=True with peft_type 'ADALORA': PEFT's AdaLoRA has no DoRA")
    init = raw.get("init_lora_weights", True)
    if init not in HARMLESS_INIT:
        raise ConfigError(
            f"{where}: init_lora_weights={init!r} is not supported: that initialisation "
            "modifies the base weights or selects a LoRA variant; convert the adapter to plain "
            "LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )


# ------------------------------------------------------------------------------------ reading a config
def _plain(value: Any) -> Any:
    """PEFT's ``to_dict()`` values as JSON would hold them: enums by value, sets as sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def read_peft_config(source: Any, what: str = "LoraConfig.from_peft") -> tuple[dict[str, Any], str]:
    """``(fields, where)`` of a PEFT config given as an object with ``to_dict()``, a mapping, or the path of an
    ``adapter_config.json`` (or of its directory); ``where`` names the source in error messages."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        path = path / ADAPTER_CONFIG if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{what}: {path} does not exist; expected an {ADAPTER_CONFIG} or its directory")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{what}: {path} is not valid JSON: {exc}") from None
        where = str(path)
    elif hasattr(source, "to_dict") and not isinstance(source, Mapping):
        raw, where = source.to_dict(), f"{what}({type(source).__name__})"
    elif isinstance(source, Mapping):
        raw, where = dict(source), f"{what}(dict)"
    else:
        raise ConfigError(
            f"{what}: expected a peft.LoraConfig, its to_dict(), or the path of an {ADAPTER_CONFIG}; "
            f"got {type(source).__name__}"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    return {k: _plain(v) for k, v in raw.items()}, where


# --------------------------------------------------------------------- a PEFT LoRA config, model-free
Key = tuple[str, "int | None"]  # (module, block) or (module, None) = that module in every block
_BLOCK = 987654321  # a sentinel block index to find where a path spells the block


def _parse_key(key: str, modules: Sequence[str], path_of: Callable[[str, int], str]) -> Key | None:
    """PEFT's suffix match made explicit: ``key`` must be a dotted suffix of a module path
    (``q_proj``, ``self_attn.q_proj``, ``3.self_attn.q_proj``, ..., ``model.layers.3.self_attn.q_proj``)."""
    parts = key.split(".")
    name = parts[-1]
    if name not in modules:
        return None
    template = path_of(name, _BLOCK).split(".")
    if len(parts) > len(template):
        return None
    block = None
    for got, want in zip(parts, template[-len(parts) :]):
        if want == str(_BLOCK) and got.isdigit():
            block = int(got)
        elif got != want:
            return None
    return name, block


def _keys(entries: Any, field: str, where: str, modules: Sequence[str], path_of: Callable) -> list[Key]:
    if not isinstance(entries, (list, tuple)) or not all(isinstance(t, str) for t in entries):
        raise ConfigError(f"{where}: {field} must be a list of module names, got {entries!r}")
    out = []
    for t in entries:
        parsed = _parse_key(t, modules, path_of)
        if parsed is None:
            raise ConfigError(
                f"{where}: {field} entry {t!r} names no module flexora_jax adapts (valid: "
                f"{list(modules)} or a path such as {path_of(modules[0], 0)!r}; a Phi-3 adapter "
                "under qkv_proj / gate_up_proj loads with load_peft)"
            )
        out.append(parsed)
    return out


def _pattern(
    raw: Mapping[str, Any], field: str, where: str, modules: Sequence[str], path_of: Callable, positive_int: bool
) -> dict[Key, Any]:
    """PEFT's first-matching key of ``rank_pattern`` / ``alpha_pattern`` restated for our longest-match rule.

    A key that an earlier key already covers (``q_proj`` before ``model.layers.2.self_attn.q_proj``) never
    wins in PEFT, so it is dropped; what remains gives the same value by either rule.
    """
    pattern = raw.get(field) or {}
    if not isinstance(pattern, Mapping):
        raise ConfigError(f"{where}: {field} must be a mapping of module keys to values, got {pattern!r}")
    out: dict[Key, Any] = {}
    seen: list[Key] = []
    for key, value in pattern.items():
        parsed = _parse_key(str(key), modules, path_of)
        if parsed is None:
            raise ConfigError(
                f"{where}: {field} key {key!r} is not a module name or path of "
                f"{list(modules)}; a regex key needs the model: load an adapter with load_peft"
            )
        ok = (isinstance(value, int) and value > 0) if positive_int else (isinstance(value, (int, float)) and value > 0)
        if isinstance(value, bool) or not ok:
            raise ConfigError(
                f"{where}: {field}[{key!r}] must be a positive {'integer' if positive_int else 'number'}, got {value!r}"
            )
        if not any(m == parsed[0] and i in (None, parsed[1]) for m, i in seen):
            out[parsed] = value
        seen.append(parsed)
    return out


def lora_config_kwargs(
    raw: Mapping[str, Any], where: str, modules: Sequence[str], path_of: Callable[[str, int], str]
) -> dict[str, Any]:
    """The ``LoraConfig`` keyword arguments of a PEFT LoRA config, computing what PEFT computes on any depth.

    ``target_modules`` (names, module paths or ``"all-linear"``), ``layers_to_transform`` (with PEFT's rule
    that a module named by its full path escapes it), ``exclude_modules`` and the patterns are restated with
    module names, ``layers_to_transform`` and our suffix keys; a block a module does not adapt gets rank 0.
    A regex ``target_modules`` or pattern key needs the model's module paths: :func:`load_peft` reads those.
    """
    check_peft_fields(raw, where)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ConfigError(
            f"{where}: peft_type {raw['peft_type']!r} is not a LoRA config; an AdaLoRA adapter "
            "loads with flexora_jax.adapters.load_adalora (or load_peft, rank-pruned as LoRA)"
        )
    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{where}: r must be a positive integer, got {r!r}")
    tm = raw.get("target_modules")
    if tm is None:
        raise ConfigError(f"{where}: target_modules is null; name the adapted modules")
    if isinstance(tm, str):
        if tm.lower() != "all-linear":
            raise ConfigError(
                f"{where}: target_modules {tm!r} is a regex; it needs the model's module paths "
                "(load an adapter with load_peft), or list the module names"
            )
        entries = [(m, None) for m in modules]
    else:
        entries = _keys(tm, "target_modules", where, modules, path_of)
    chosen = raw.get("layers_to_transform")
    chosen = [chosen] if isinstance(chosen, int) and not isinstance(chosen, bool) else chosen
    if chosen is not None and (
        not isinstance(chosen, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chosen)
    ):
        raise ConfigError(f"{where}: layers_to_transform must be a block index or a list of them, got {chosen!r}")
    chosen = set(chosen) if chosen else None  # PEFT: an empty list means every block
    lp = raw.get("layers_pattern")
    lp = [lp] if isinstance(lp, str) else list(lp or [])
    if any(p not in ("layers", "model.layers") for p in lp):
        raise ConfigError(
            f"{where}: layers_pattern {raw['layers_pattern']!r} matches no block list of a LLaMA "
            "model (its blocks are model.layers); expected null or 'layers'"
        )
    blocks: dict[str, set[int] | None] = {}  # module -> the blocks it adapts (None: every block)
    for m, i in entries:
        exact = i is not None and isinstance(tm, list) and path_of(m, i) in tm  # escapes layers_to_transform
        if i is None:
            new = None if chosen is None else set(chosen)
        elif chosen is None or exact or i in chosen:
            new = {i}
        else:
            continue
        old = blocks.get(m, set())
        blocks[m] = None if old is None or new is None else old | new
    excluded: dict[str, set[int]] = {}
    excl = raw.get("exclude_modules")
    if isinstance(excl, str):
        raise ConfigError(
            f"{where}: exclude_modules {excl!r} is a regex; it needs the model's module paths "
            "(load an adapter with load_peft), or list module names / paths"
        )
    for m, i in _keys(list(excl or []), "exclude_modules", where, modules, path_of):
        if i is None:
            blocks.pop(m, None)
        elif m in blocks:
            excluded.setdefault(m, set()).add(i)
    blocks = {m: s for m, s in blocks.items() if s is None or s - excluded.get(m, set())}
    if not blocks:
        raise ConfigError(
            f"{where}: target_modules {tm!r} (with layers_to_transform {raw.get('layers_to_transform')!r}"
            f", exclude_modules {excl!r}) adapts no module"
        )
    ranks = _pattern(raw, "rank_pattern", where, modules, path_of, positive_int=True)
    alphas = _pattern(raw, "alpha_pattern", where, modules, path_of, positive_int=False)
    every = None if any(s is None for s in blocks.values()) else set().union(*blocks.values())
    rank_pattern: dict[str, int] = {}
    for (m, i), v in ranks.items():
        if m in blocks and (i is None or blocks[m] is None or i in blocks[m]):
            rank_pattern[m if i is None else path_of(m, i)] = v
    for m, s in blocks.items():
        if s is not None and s != every:  # fewer blocks than the others: rank 0 by name, its blocks by path
            rank_pattern[m] = 0
            for i in s:
                rank_pattern[path_of(m, i)] = ranks.get((m, i), ranks.get((m, None), r))
        for i in excluded.get(m, ()):
            rank_pattern[path_of(m, i)] = 0
    init = raw.get("init_lora_weights", True)
    if init == "orthogonal":
        raise ConfigError(
            f"{where}: init_lora_weights='orthogonal' is not implemented for training here; "
            "use true, false or 'gaussian'"
        )
    return dict(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=tuple(blocks),
        layers_to_transform=None if every is None else tuple(sorted(every)),
        rank_pattern=rank_pattern,
        alpha_pattern={m if i is None else path_of(m, i): float(v) for (m, i), v in alphas.items()},
        use_rslora=bool(raw.get("use_rslora", False)),
        init_lora_weights=init,
        use_dora=bool(raw.get("use_dora", False)),
    )


def check_peft_values(raw: dict[str, Any], cfg_file: Path) -> None:
    """The types of the fields read: numbers (no bools, finite), flags (``"false"`` is not false), regexes
    compiled up front, each error naming the field."""
    check_number(raw.get("lora_dropout") or 0.0, f"{cfg_file}: lora_dropout", lo=0, hi=1, hi_open=True)
    if raw.get("use_rslora") is not None:
        check_bool(raw["use_rslora"], f"{cfg_file}: use_rslora")
    adalora = raw.get("peft_type") == "ADALORA"  # its rank_pattern holds kept-triplet masks (lists of bools)
    for field in ("alpha_pattern",) if adalora else ("rank_pattern", "alpha_pattern"):
        for key, value in check_mapping(raw.get(field) or {}, f"{cfg_file}: {field}").items():
            check_number(value, f"{cfg_file}: {field}[{key!r}]", lo=0, lo_open=True, integer=field == "rank_pattern")
    if adalora:
        for key, value in check_mapping(raw.get("rank_pattern") or {}, f"{cfg_file}: rank_pattern").items():
            if not (isinstance(value, list) and all(isinstance(v, bool) for v in value)):
                raise ConfigError(
                    f"{cfg_file}: rank_pattern[{key!r}] of an AdaLoRA adapter must be a list of "
                    f"true / false (the kept triplets), got {value!r:.80}"
                )
    for field in ("layers_pattern", "exclude_modules"):
        value = raw.get(field)
        if isinstance(value, str) and value:
            check_regex(value, f"{cfg_file}: {field}")
        elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{cfg_file}: {field} must be a regex string or a list of names, got {value!r}")
        elif field == "layers_pattern" and value:
            for pattern in value:
                check_regex(pattern, f"{cfg_file}: {field} entry")
