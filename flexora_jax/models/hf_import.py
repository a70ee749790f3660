"""``transformers``, imported quietly: the one place flexora_jax imports it.

transformers warns "PyTorch was not found" as it is imported without torch; flexora_jax uses only its configs
and tokenizers, so the import runs under transformers' own switch for advisory warnings, for the import alone
(the user's environment and logging settings are as they were afterwards).
"""

from __future__ import annotations

import os

_ADVICE, _advice = "TRANSFORMERS_NO_ADVISORY_WARNINGS", os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
os.environ[_ADVICE] = "1"
try:
    import transformers
finally:
    if _advice is None:
        del os.environ[_ADVICE]
    else:
        os.environ[_ADVICE] = _advice

__all__ = ["transformers"]
