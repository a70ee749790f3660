"""The ``flexora-jax`` command as a package: run config and YAML loader (``config``), the run directory's
side effects (``io``), the workspace (``workspace``), the method registry (``registry``: what each method
searches, how it selects and fine-tunes; ``register`` adds one), the searches and selections of a run's
methods (``methods``), the stages and the whole run (``stages``), ``report.md`` (``report``) and the
effectiveness study (``study``).

The library below never imports this package.
"""

from flexora_jax.pipeline.config import RunConfig, load_config, save_config
from flexora_jax.pipeline.io import Interrupted
from flexora_jax.pipeline.registry import Method, get_method, method_names, register, unregister
from flexora_jax.pipeline.stages import RunResult, run, run_stage

__all__ = [
    "Interrupted",
    "Method",
    "RunConfig",
    "RunResult",
    "get_method",
    "load_config",
    "method_names",
    "register",
    "run",
    "run_stage",
    "save_config",
    "unregister",
]
