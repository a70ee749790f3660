"""One exception family for everything a user can get wrong.

Every error a user can cause (a bad config key, a missing file, a mis-shaped tensor, an empty
dataset, a NaN loss) is raised as a subclass of :class:`FlexoraError`, with a message that names the
file, key, value and what was expected. The command line turns these into exit status 2 and a
one-paragraph message instead of a traceback.
"""

from __future__ import annotations


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
