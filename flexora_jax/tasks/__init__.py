"""Tasks (multiple-choice and generative): registry, loaders (hub and local files), splits, records, SFT.

Typical use::

    from flexora_jax import tasks
    train = tasks.load_split("piqa", "train", seed=0)        # datasets.Dataset in train.docs
    test = tasks.load_records("piqa", "test", seed=0)        # list[MCRecord] for evaluate()
    report["splits"] = [train.info.to_dict()]                # seed, sizes, source split

Prompts follow lm-evaluation-harness 0.4.13 (see ``formats.py``); each task reads the same hub
schema from the hub (``source="hub"``) or from the original release files (``source="local"``).
"""

from flexora_jax.tasks.formats import MCRecord
from flexora_jax.tasks.generative import GenRecord
from flexora_jax.tasks.local import HUB_FEATURES, default_data_dir, load_local
from flexora_jax.tasks.registry import (
    TASKS,
    Split,
    TaskSpec,
    get_task,
    list_tasks,
    load_records,
    load_source,
    load_split,
    split_report,
)
from flexora_jax.tasks.splits import DEFAULT_SEED, REST, ROLES, SplitInfo, SplitPlan

__all__ = [
    "DEFAULT_SEED",
    "GenRecord",
    "HUB_FEATURES",
    "MCRecord",
    "REST",
    "ROLES",
    "Split",
    "SplitInfo",
    "SplitPlan",
    "TASKS",
    "TaskSpec",
    "default_data_dir",
    "get_task",
    "list_tasks",
    "load_local",
    "load_records",
    "load_source",
    "load_split",
    "split_report",
]
