"""One validation layer at the public boundary: numbers, flags, regexes, mappings, typed fields, arrays, datasets.

Every public function and loader checks what it is handed through these helpers, so a bad argument or a
bad value read back from JSON raises a :class:`~flexora_jax.errors.FlexoraError` naming the argument (or
file and key), the value and what was expected, never a ``TypeError``, ``re.error``, ``KeyError`` or a
silently wrong result. The rules are the same everywhere:

- numbers: a bool is never a number (``rank=True`` is not rank 1), strings are not numbers, NaN and Inf
  are refused, ranges are explicit (:func:`check_number`);
- flags: only ``True`` / ``False`` (the string ``"false"`` is not false-y here, :func:`check_bool`);
- regexes are compiled once, up front, with the number of groups they must have (:func:`check_regex`);
- mappings read back from JSON have known and required keys (:func:`check_mapping`), and typed values
  (:func:`check_type`, :func:`check_fields` for a frozen config dataclass's annotations);
- arrays: dtype kind, rank, finiteness and token-id range (:func:`check_array`, :func:`check_dataset`),
  weights: finiteness per tensor (:func:`check_finite_tree`).

The checks are cheap: dtype / rank / type checks are static (they also run on tracers, at trace time);
value checks (finiteness, id range) run on host arrays handed in by the user or read from disk, never
inside a jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from collections import abc
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexora_jax.errors import CheckpointError, ConfigError, DataError, FlexoraError

Error = type[FlexoraError]

__all__ = [
    "check_array",
    "check_bool",
    "check_callable",
    "check_config_type",
    "check_dataset",
    "check_fields",
    "check_finite_tree",
    "check_key",
    "check_mapping",
    "check_number",
    "check_path",
    "check_regex",
    "check_scalar_loss",
    "check_tokenizer",
    "check_type",
    "describe",
    "read_json",
]


def describe(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, with its type: ``'16' (str)``, ``True (bool)``."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


# ------------------------------------------------------------------------------------------ scalars
def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_number(
    value: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    integer: bool = False,
    lo_open: bool = False,
    hi_open: bool = False,
    error: Error = ConfigError,
) -> Any:
    """``value`` as a plain ``int`` (``integer``) or ``float``, else ``error`` naming ``name``.

    Refuses bools (``True`` is not 1 here), strings, None, NaN / Inf and values outside ``[lo, hi]``
    (``lo_open`` / ``hi_open`` exclude the ends). An integral float is not an integer (``8.0`` for a rank).
    """
    kind = "an integer" if integer else "a finite number"
    bounds = (
        f"{'>' if lo_open else '>='} {lo}" if lo is not None else "",
        f"{'<' if hi_open else '<='} {hi}" if hi is not None else "",
    )
    expected = kind + (" " + " and ".join(b for b in bounds if b) if any(bounds) else "")
    if not (_is_int(value) if integer else _is_real(value)) or not math.isfinite(value):
        raise error(f"{name} must be {expected}, got {describe(value)}")
    value = int(value) if integer else float(value)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    ):
        raise error(f"{name} must be {expected}, got {value!r}")
    return value


def check_bool(value: Any, name: str, error: Error = ConfigError) -> bool:
    """``value`` if it is ``True`` or ``False`` (numpy's too), else ``error``: ``"false"`` or 1 are not flags."""
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be true or false, got {describe(value)}")
    return bool(value)


def check_regex(pattern: Any, name: str, groups: int = 0, error: Error = ConfigError) -> re.Pattern:
    """``pattern`` (a string or a compiled str regex, not bytes) compiled, with at least ``groups`` capture groups."""
    if not isinstance(pattern, (str, re.Pattern)) or not isinstance(getattr(pattern, "pattern", ""), str):
        raise error(f"{name} must be a regular expression (a string), got {describe(pattern)}")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise error(f"{name} {pattern!r} is not a valid regular expression ({exc})") from None
    if compiled.groups < groups:
        raise error(
            f"{name} {compiled.pattern!r} has {compiled.groups} capture group(s); expected {groups} "
            f"(e.g. r'layers\\.(\\d+)' captures the layer index)"
        )
    return compiled


def check_callable(value: Any, name: str, optional: bool = True, error: Error = ConfigError) -> Any:
    """``value`` if it is callable (or None when ``optional``), else ``error`` naming ``name``."""
    if (value is None and not optional) or (value is not None and not callable(value)):
        raise error(f"{name} must be a function{' or None' if optional else ''}, got {describe(value)}")
    return value


def check_key(key: Any, name: str, error: Error = ConfigError) -> Any:
    """``key`` if it is a JAX PRNG key: ``jax.random.key(seed)`` or a legacy ``PRNGKey`` (uint32 ``[..., 2]``)."""
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", ()))
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    legacy = dtype is not None and not typed and np.dtype(dtype) == np.uint32 and shape[-1:] == (2,)
    if not (typed or legacy):
        raise error(f"{name} must be a JAX PRNG key (jax.random.key(seed)), got {describe(key)}")
    return key


def check_path(value: Any, name: str, optional: bool = False, error: Error = ConfigError) -> Path | None:
    """``value`` (a string or ``os.PathLike``; None when ``optional``) as a ``Path``, else ``error`` naming ``name``."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or value == "":
        raise error(
            f"{name} must be a path (a string or os.PathLike){' or None' if optional else ''}, got {describe(value)}"
        )
    return Path(value)


def check_config_type(obj: Any, cls: type | tuple[type, ...], name: str, error: Error = ConfigError) -> Any:
    """``obj`` if it is an instance of ``cls``; a dict handed for a config dataclass gets a hint to build one."""
    if isinstance(obj, cls):
        return obj
    classes = cls if isinstance(cls, tuple) else (cls,)
    wanted = " or ".join(
        c.__name__ if c.__module__.startswith(("flexora_jax", "builtins")) else f"{c.__module__}.{c.__qualname__}"
        for c in classes
    )
    hint = ""
    if isinstance(obj, Mapping) and len(classes) == 1 and dataclasses.is_dataclass(classes[0]):
        hint = f"; build one from the dict: {classes[0].__name__}(**{repr(dict(obj))[:60]})"
    raise error(f"{name} must be a {wanted}, got {describe(obj)}{hint}")


# ------------------------------------------------------------------------------------ typed values
def _union_args(hint: Any) -> tuple[Any, ...] | None:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def _plural(text: str) -> str:
    return " or ".join(w.removeprefix("an ").removeprefix("a ") + "s" for w in text.split(" or "))


def _hint_text(hint: Any) -> str:
    """What a type hint asks for, in words: ``tuple[int, ...] | None`` -> 'a list of integers or null'."""
    union = _union_args(hint)
    if union is not None:
        return " or ".join(dict.fromkeys(_hint_text(h) for h in union))
    simple = {
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        type(None): "null",
        Any: "any value",
    }
    if hint in simple:
        return simple[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list, abc.Sequence):
        return f"a list of {_plural(_hint_text(args[0]))}" if args else "a list"
    if origin in (dict, abc.Mapping):
        return f"a mapping to {_plural(_hint_text(args[1]))}" if len(args) == 2 else "a mapping"
    return f"a {getattr(hint, '__name__', str(hint))}"


def _accepts(value: Any, hint: Any, text: bool) -> bool:
    """Whether ``value`` fits ``hint``; ``text``: the value was decoded from YAML / command-line text, where a
    string may still be parsed into a number or a list later (never into a bool) and a scalar may be a string."""
    union = _union_args(hint)
    if union is not None:
        return any(_accepts(value, h, text) for h in union)
    if hint is Any or hint is object or isinstance(hint, typing.TypeVar):
        return True
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if text and isinstance(value, str):
        return True
    if hint is type(None):
        return value is None
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_real(value) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str) or (text and (_is_real(value) or isinstance(value, bool)))
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if origin in (tuple, list, abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        if args and args[-1] is not Ellipsis and origin is tuple:
            return len(args) == len(value) and all(_accepts(v, h, text) for v, h in zip(value, args))
        return not args or all(_accepts(v, args[0], text) for v in value)
    if origin in (dict, abc.Mapping):
        return isinstance(value, Mapping) and (
            len(args) != 2 or all(_accepts(k, args[0], text) and _accepts(v, args[1], text) for k, v in value.items())
        )
    return not isinstance(origin, type) or isinstance(value, origin)


def check_type(value: Any, hint: Any, name: str, *, text: bool = False, error: Error = ConfigError) -> Any:
    """``value`` if it fits the type hint ``hint`` (unions, ``tuple[int, ...]``, ``Mapping[str, float]`` ...),
    else ``error`` naming ``name``: bools are not numbers, floats must be finite, lists are checked item by item.

    ``text=True`` for values decoded from YAML / the command line before a parser converts them: a string
    is then accepted where a number or list is meant (the parser reads it or fails), never where a flag is.
    """
    if not _accepts(value, hint, text):
        float_like = _is_real(value) and not math.isfinite(value)
        raise error(
            f"{name} must be {_hint_text(hint)}, got {describe(value)}"
            f"{' (NaN and Inf are refused)' if float_like else ''}"
        )
    return value


@functools.cache
def _field_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def check_fields(obj: Any, prefix: str, error: Error = ConfigError) -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation (:func:`check_type`),
    errors named ``<prefix>.<field>``: the first line of a config's ``__post_init__``."""
    for name, hint in _field_hints(type(obj)):
        check_type(getattr(obj, name), hint, f"{prefix}.{name}" if prefix else name, error=error)


def check_mapping(
    obj: Any,
    name: str,
    known_keys: Iterable[str] | None = None,
    required_keys: Iterable[str] = (),
    error: Error = ConfigError,
) -> Mapping[str, Any]:
    """``obj`` if it is a mapping with string keys, no key outside ``known_keys`` (None: any) and every
    key of ``required_keys``; the error names the unknown / missing keys and the allowed ones."""
    if not isinstance(obj, Mapping):
        raise error(f"{name} must be a mapping (a JSON object), got {describe(obj)}")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise error(f"{name} has non-string key(s) {bad[:5]}")
    if known_keys is not None:
        known = set(known_keys)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise error(f"{name} has unknown key(s) {unknown}; allowed: {sorted(known)}")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise error(f"{name} is missing key(s) {missing}; it has {sorted(obj)}")
    return obj


def read_json(path: str | os.PathLike, what: str = "", error: Error = CheckpointError) -> Any:
    """The JSON value in ``path``; a missing file, a directory, non-UTF-8 bytes or bad JSON are ``error``
    naming the file (``what`` says what it should hold)."""
    path = Path(path)
    about = f" ({what})" if what else ""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except IsADirectoryError:
        raise error(f"{path} is a directory; expected a JSON file{about}") from None
    except FileNotFoundError:
        raise error(f"{path} does not exist; expected a JSON file{about}") from None
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); expected a JSON file{about}") from None
    except UnicodeDecodeError as exc:
        raise error(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected a JSON file{about}"
        ) from None
    except ValueError as exc:
        raise error(f"{path} is not valid JSON ({exc}); expected a JSON file{about}") from None


# ------------------------------------------------------------------------------------------- arrays
def _host(x: Any) -> np.ndarray | None:
    """``x`` as a host array for value checks, None for a tracer (only its shape and dtype are known)."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _id_bounds(id_range: int | tuple[int, int]) -> tuple[int, int]:
    return (0, int(id_range)) if _is_int(id_range) else (int(id_range[0]), int(id_range[1]))


def check_array(
    x: Any,
    name: str,
    dtype_kind: str | None = None,
    ndim: int | Sequence[int] | None = None,
    *,
    shape: Sequence[int | None] | None = None,
    finite: bool = False,
    id_range: int | tuple[int, int] | None = None,
    error: Error = DataError,
) -> Any:
    """``x`` (a numpy / jax array, unchanged) if it has a dtype of a kind in ``dtype_kind`` (numpy's kinds:
    ``"iu"`` integers, ``"f"`` floats, ``"b"`` bools), rank ``ndim`` (or one of them), the ``shape`` given
    (None: any size on that axis), only finite values (``finite``) and values in ``[0, id_range)`` /
    ``[lo, hi)`` (``id_range``: token ids against a vocabulary).

    Shape and dtype are checked on tracers too; value checks are skipped for tracers. The id-range error
    names the row and the value.
    """
    got, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if got is None or dtype is None:
        raise error(f"{name} must be an array (numpy or jax), got {describe(x)}")
    got = tuple(got)
    dtype = np.dtype(dtype)
    kind = "f" if jnp.issubdtype(dtype, jnp.floating) else dtype.kind  # bfloat16 is kind 'V' to numpy
    if dtype_kind is not None and kind not in dtype_kind:
        names = {"i": "an integer", "u": "an integer", "f": "a floating-point", "b": "a bool"}
        wanted = " or ".join(dict.fromkeys(names.get(k, k) for k in dtype_kind))
        raise error(f"{name} must have {wanted} dtype, got {dtype}")
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim or ())
    if ndims and len(got) not in ndims:
        raise error(f"{name} must have {' or '.join(map(str, ndims))} dimension(s), got shape {got}")
    if shape is not None and (len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got))):
        wanted = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise error(f"{name} must have shape {wanted}, got {got}")
    if not (finite or id_range is not None) or (host := _host(x)) is None:
        return x
    if finite and kind == "f" and not np.all(np.isfinite(host)):
        where = np.argwhere(~np.isfinite(host))[0]
        raise error(
            f"{name} holds NaN or Inf (first at index {tuple(int(i) for i in where)}: "
            f"{host[tuple(where)].item()!r}); expected finite values"
        )
    if id_range is not None and host.size:
        lo, hi = _id_bounds(id_range)
        bad = np.argwhere((host < lo) | (host >= hi))
        if len(bad):
            at = tuple(int(i) for i in bad[0])
            row = f"row {at[0]}" + (f", position {at[1]}" if len(at) > 1 else "") if at else "it"
            raise error(
                f"{name}: {row} holds id {host[at].item()!r}, outside [{lo}, {hi}) ({len(bad)} such value(s)); "
                f"expected token ids of the model's vocabulary (negative ids would wrap, ids >= {hi} are "
                "read past the embedding)"
            )
    return x


def check_finite_tree(tree: Any, what: str, error: Error = CheckpointError, limit: int = 5) -> None:
    """``error`` naming up to ``limit`` leaves of ``tree`` that hold NaN or Inf (floating leaves only).

    Host arrays are checked on the host; device arrays in one reduction each and one transfer of their
    flags: meant for weights at load / export time.
    """
    leaves = [
        (jax.tree_util.keystr(p), x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    if not leaves:
        return
    device = [jnp.all(jnp.isfinite(x)) for _, x in leaves if not isinstance(x, np.ndarray)]
    device = iter(np.asarray(jnp.stack(device)) if device else ())
    flags = [bool(np.isfinite(x).all()) if isinstance(x, np.ndarray) else next(device) for _, x in leaves]
    bad = [name for (name, _), ok in zip(leaves, flags) if not ok]
    if bad:
        raise error(
            f"{what} holds NaN or Inf values in {', '.join(bad[:limit])}"
            f"{f' (and {len(bad) - limit} more)' if len(bad) > limit else ''}; expected finite weights "
            "(a damaged file, or saved from a diverged model)"
        )


#: What check_dataset knows about the fields of a training / evaluation dataset (data.py's layout).
_FIELDS = {  # field -> (dtype kinds, ndim, finite, token ids)
    "input_ids": ("iu", 2, False, True),
    "labels": ("iu", 2, False, True),
    "attention_mask": ("biuf", 2, False, False),
    "loss_mask": ("biuf", 2, True, False),
    "target_probs": ("f", 3, True, False),
}


def check_dataset(
    data: Any,
    what: str,
    vocab_size: int | None = None,
    require: Sequence[str] = ("input_ids",),
    loss_mask_required: bool = True,
) -> int:
    """Validate a dataset dict ``{field: array [n, ...]}`` (what ``fj.search`` / ``fj.finetune`` draw batches
    from); return ``n``. Raises :class:`DataError` naming ``what``, the field and, for values, the row.

    Every field is an array with the same ``n >= 1`` rows. Known fields: ``input_ids`` / ``labels`` integer
    ``[n, t]`` with ids in ``[0, vocab_size)`` (``>= 0`` without a vocabulary); ``attention_mask`` /
    ``loss_mask`` ``[n, t]`` like ``input_ids``, ``loss_mask`` finite, non-negative and not all zero;
    ``target_probs`` floating ``[n, t, vocab]``, finite. Other fields (a custom ``loss_fn``'s) are checked
    for rows only.
    """
    check_mapping(
        data, what, required_keys=tuple(require) + (("loss_mask",) if loss_mask_required else ()), error=DataError
    )
    n = None
    for field, value in data.items():
        name = f"{what}[{field!r}]"
        kinds, ndim, finite, ids = _FIELDS.get(field, (None, None, False, False))
        id_range = (0, vocab_size if vocab_size is not None else np.iinfo(np.int64).max) if ids else None
        check_array(value, name, kinds, ndim, finite=finite, id_range=id_range)
        if len(value.shape) == 0:
            raise DataError(f"{name} must have one row per example, got a scalar")
        n = value.shape[0] if n is None else n
        if value.shape[0] != n:
            rows = {k: v.shape[0] for k, v in data.items() if len(getattr(v, "shape", ())) > 0}
            raise DataError(f"{what}: fields have different numbers of rows: {rows}")
    if not n:
        raise DataError(f"{what} is empty (0 examples)")
    width = data["input_ids"].shape if "input_ids" in data else None
    for field in ("attention_mask", "loss_mask", "labels"):
        if field in data and width is not None and tuple(data[field].shape) != tuple(width):
            raise DataError(
                f"{what}[{field!r}] has shape {tuple(data[field].shape)}, expected {tuple(width)} like input_ids"
            )
    if "target_probs" in data and vocab_size is not None and data["target_probs"].shape[-1] != vocab_size:
        raise DataError(
            f"{what}['target_probs'] has {data['target_probs'].shape[-1]} classes, expected the "
            f"model's vocab_size {vocab_size}"
        )
    if "loss_mask" in data and (mask := _host(data["loss_mask"])) is not None:
        if np.any(mask < 0):
            raise DataError(f"{what}['loss_mask']: row {int(np.argwhere(mask < 0)[0][0])} has a negative weight")
        if not np.any(mask > 0):
            raise DataError(f"{what}: no example has a target token (loss_mask is all zero)")
    return int(n)


def check_scalar_loss(value: Any, name: str = "loss_fn") -> Any:
    """``value`` if it is a scalar floating-point loss (a 0-d array or a float; tracers too), else
    :class:`ConfigError`: ``loss_fn(model, batch)`` must return the batch's mean loss, not per-token values."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if isinstance(value, float) and not isinstance(value, bool):
        return value
    if shape is None or dtype is None:
        raise ConfigError(f"{name} must return a scalar loss (a 0-d float array), got {describe(value)}")
    if tuple(shape) != () or not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(
            f"{name} must return a scalar float loss, got an array of shape {tuple(shape)} and dtype "
            f"{np.dtype(dtype)}; reduce it (e.g. the mean over target tokens) and keep it floating"
        )
    return value


def check_tokenizer(tokenizer: Any, name: str = "tokenizer") -> int | None:
    """Refuse what is not a tokenizer (``encode`` callable); return its vocabulary size (``len``, else
    ``vocab_size``; None when it tells neither)."""
    if not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError(
            f"{name} must be a tokenizer with an encode(text) method (fj.load_tokenizer(path) or "
            f"transformers.AutoTokenizer), got {describe(tokenizer)}"
        )
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    return int(size) if _is_int(size) else None
