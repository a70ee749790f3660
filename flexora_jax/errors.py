"""One exception family for everything a user can get wrong.

Every error a user can cause (a bad config key, a missing file, a mis-shaped tensor, an empty
dataset, a NaN loss) is raised as a subclass of :class:`FlexoraError`, with a message that names the
file, key, value and what was expected. The command line turns these into exit status 2 and a
one-paragraph message instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import chex


class FlexoraError(Exception):
    """Base class of every user-facing error raised by flexora_jax."""


class ConfigError(FlexoraError, ValueError):
    """A config key that does not exist, a value of the wrong type, or out of range."""


class CheckpointError(FlexoraError):
    """A model, adapter or training checkpoint that is missing, truncated, mis-shaped or unsafe."""


class DataError(FlexoraError, ValueError):
    """A dataset file or record that is missing, malformed, out of range or empty."""


class NumericsError(FlexoraError, FloatingPointError):
    """A NaN or Inf in a loss, gradient or hypergradient."""


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word`` (``prefix`` + it), else ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def check_tree_shapes(tree: Any, template: Any, what: str, error: type[FlexoraError] | None = None) -> None:
    """Raise ``error`` (default :class:`CheckpointError`) naming ``what`` unless ``tree`` has ``template``'s
    structure and shapes: e.g. params of another model size, caught before they are wrapped or written.

    Built on chex (``chex.assert_trees_all_equal_structs`` / ``_shapes``), so ``chex.disable_asserts()``
    turns the check off in production runs that trust their inputs. ``template`` may be abstract
    (``jax.eval_shape``).
    """
    try:
        chex.assert_trees_all_equal_structs(tree, template)
        chex.assert_trees_all_equal_shapes(tree, template)
    except AssertionError as exc:
        raise (error or CheckpointError)(f"{what} does not match the expected structure / shapes: {exc}") from None


def check_positive(**values: Any) -> None:
    """Raise :class:`ConfigError` naming every argument that is not a positive integer (None means unset)."""
    bad = {
        k: v for k, v in values.items() if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1)
    }
    if bad:
        raise ConfigError(", ".join(f"{k}={v!r}" for k, v in bad.items()) + ": expected positive integers")
