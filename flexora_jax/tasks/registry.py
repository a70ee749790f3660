"""The task table, and how to read one role (train / search-validation / test) of a task.

Each :class:`TaskSpec` names its hub dataset, the schema both sources produce, the converter to
:class:`~flexora_jax.tasks.formats.MCRecord` and the :class:`~flexora_jax.tasks.splits.SplitPlan`.
The plan is the same for both sources, so a hub run and a local run of a task see the same examples
in the same roles (e.g. HellaSwag's three roles are always cut from its 10042 validation tasks).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import datasets

from flexora_jax.errors import ConfigError, DataError, did_you_mean
from flexora_jax.tasks import formats, generative
from flexora_jax.tasks.formats import MCRecord
from flexora_jax.tasks.generative import GenRecord
from flexora_jax.tasks.local import ALIASES, HUB_FEATURES, load_local
from flexora_jax.tasks.sft import datasets_quietly
from flexora_jax.tasks.splits import (
    DEFAULT_SEED,
    REST,
    SplitInfo,
    SplitPlan,
    canonical_role,
    check_size_roles,
    resolve_sizes,
    resplit_indices,
)

Source = Literal["local", "hub"]
Record = MCRecord | GenRecord


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: where its data lives and how a document becomes a record.

    ``kind`` is ``"multiple_choice"`` (records are :class:`MCRecord`, scored by log-likelihood) or
    ``"generate"`` (records are :class:`GenRecord`, scored by exact match of generated answers).
    Tasks with few-shot prompts name the source split the shots come from (``fewshot_split``) and
    convert a whole split at once (``split_to_records``), since a prompt depends on other documents.
    """

    name: str  # registry key
    hub_path: str  # datasets.load_dataset path
    hub_name: str | None  # datasets.load_dataset config name
    schema: str  # key of local.HUB_FEATURES: the columns both sources produce
    doc_to_record: Callable[..., MCRecord] | None  # (doc, doc_id, task=) -> record; None: whole-split converter
    plan: SplitPlan  # where train / validation / test come from
    metrics: tuple[str, ...]  # the metrics lm-eval reports for this task
    kind: str = "multiple_choice"  # "multiple_choice" or "generate"
    fewshot_split: str | None = None  # source split the few-shot examples are taken from
    split_to_records: Callable[..., list[Record]] | None = None  # (rows, task, fewshot_rows, exclude_self)
    local_name: str | None = None  # the local loader's task, when another task's files are read

    @property
    def features(self) -> datasets.Features:
        return HUB_FEATURES[self.schema]

    @property
    def is_generative(self) -> bool:
        return self.kind == "generate"

    def to_records(
        self,
        docs: datasets.Dataset | Iterable[Mapping[str, Any]],
        last_question_only: bool = False,
        fewshot_docs: datasets.Dataset | None = None,
        exclude_self: bool = False,
    ) -> list[Record]:
        """Convert hub-schema documents; ``last_question_only`` selects lm-eval's RACE documents.

        ``fewshot_docs`` (the ``fewshot_split`` documents) feed few-shot prompts; ``exclude_self``
        says the documents are drawn from that same split, so none is its own example.
        """
        rows = docs.to_list() if isinstance(docs, datasets.Dataset) else list(docs)
        if self.split_to_records is not None:
            shots = None if fewshot_docs is None else fewshot_docs.to_list()
            records = self.split_to_records(rows, self.name, shots, exclude_self) if rows else []
        elif self.doc_to_record is None:
            records = formats.race_records(rows, self.name, last_question_only=last_question_only)
        else:
            records = [self.doc_to_record(doc, i, task=self.name) for i, doc in enumerate(rows)]
        if not records:
            raise DataError(f"{self.name}: no documents to convert; expected a non-empty split")
        return records


def _three_way(val: int, test: int) -> SplitPlan:
    return SplitPlan(official={}, pool="validation", sizes={"train": REST, "validation": val, "test": test})


_OFFICIAL = SplitPlan(official={"train": "train", "validation": "validation", "test": "test"})
_TRAIN_POOL = SplitPlan(official={"test": "validation"}, pool="train", sizes={"train": REST, "validation": 1000})
_ACC = ("acc",)
_ACC_NORM = ("acc", "acc_norm")
_GSM8K = SplitPlan(official={"test": "test"}, pool="train", sizes={"train": REST, "validation": 500})
_AQUA = SplitPlan(
    official={"validation": "validation", "test": "test"},
    unavailable={"train": "AQuA-RAT's 97k-example train set is not in the local files; AQuA is evaluation only"},
)
_MMLU = SplitPlan(
    official={"validation": "validation", "test": "test"},
    unavailable={
        "train": "MMLU has no train split (auxiliary_train is not in the local files); MMLU is evaluation only"
    },
)

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "hellaswag", "Rowan/hellaswag", None, "hellaswag", formats.hellaswag, _three_way(1000, 1000), _ACC_NORM
        ),
        TaskSpec("piqa", "baber/piqa", None, "piqa", formats.piqa, _three_way(338, 500), _ACC_NORM),
        TaskSpec(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            "winogrande",
            formats.winogrande,
            _three_way(250, 250),
            _ACC,
        ),
        TaskSpec("race_middle", "ehovy/race", "middle", "race", None, _OFFICIAL, _ACC),
        TaskSpec("race_high", "ehovy/race", "high", "race", None, _OFFICIAL, _ACC),
        TaskSpec("boolq", "aps/super_glue", "boolq", "boolq", formats.boolq, _three_way(500, 500), _ACC),
        TaskSpec("arc_easy", "allenai/ai2_arc", "ARC-Easy", "arc", formats.arc, _OFFICIAL, _ACC_NORM),
        TaskSpec("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "arc", formats.arc, _OFFICIAL, _ACC_NORM),
        TaskSpec("openbookqa", "allenai/openbookqa", "main", "openbookqa", formats.openbookqa, _OFFICIAL, _ACC_NORM),
        TaskSpec(
            "commonsense_qa", "tau/commonsense_qa", None, "commonsenseqa", formats.commonsenseqa, _TRAIN_POOL, _ACC
        ),
        TaskSpec(
            "commonsense_qa_cloze",
            "tau/commonsense_qa",
            None,
            "commonsenseqa",
            formats.commonsenseqa_cloze,
            _TRAIN_POOL,
            _ACC,
            local_name="commonsense_qa",
        ),
        TaskSpec("social_iqa", "allenai/social_i_qa", None, "siqa", formats.siqa, _TRAIN_POOL, _ACC),
        TaskSpec(
            "gsm8k",
            "openai/gsm8k",
            "main",
            "gsm8k",
            None,
            _GSM8K,
            ("exact_match",),
            kind="generate",
            fewshot_split="train",
            split_to_records=generative.gsm8k_records,
        ),
        TaskSpec(
            "aqua",
            "deepmind/aqua_rat",
            "raw",
            "aqua",
            None,
            _AQUA,
            ("exact_match",),
            kind="generate",
            split_to_records=generative.aqua_records,
        ),
        TaskSpec(
            "mmlu",
            "cais/mmlu",
            "all",
            "mmlu",
            None,
            _MMLU,
            ("acc", "acc_macro"),
            fewshot_split="dev",
            split_to_records=formats.mmlu_records,
        ),
    )
}


def list_tasks() -> list[str]:
    """Names of every registered task (lm-evaluation-harness 0.4.13's names where it has the task)."""
    return list(TASKS)


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` of a task name or an earlier name of it (:data:`ALIASES`); a spec passes through."""
    if isinstance(name, TaskSpec):
        return name
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}{did_you_mean(name, [*TASKS, *ALIASES])}; known tasks: {list_tasks()}")
    return TASKS[name]


def load_source(
    task: str | TaskSpec,
    source_split: str,
    source: Source = "local",
    data_dir: str | os.PathLike | None = None,
    hub_path: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """One source split (as named on the hub) in the hub schema, from the local files or the hub.

    ``hub_path`` replaces the registry's hub id (a local dataset directory in the hub schema, or a
    mirror); then the registry's config name is not passed.
    """
    spec = get_task(task)
    if source == "local":
        return load_local(spec.local_name or spec.name, source_split, data_dir)
    if source != "hub":
        raise ConfigError(f"source must be 'local' or 'hub', got {source!r}")
    path, name = (str(hub_path), None) if hub_path is not None else (spec.hub_path, spec.hub_name)
    try:
        ds = datasets.load_dataset(path, name, split=source_split)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        raise DataError(
            f"{spec.name}: could not load split {source_split!r} of hub dataset {path!r}"
            f"{'' if name is None else f' ({name})'}: {type(exc).__name__}: {exc}. Offline? Use "
            f"source='local' with data_dir (or $FLEXORA_DATA_DIR) pointing at the shared data "
            f"folder, or hub_path=<a local copy in the hub schema>"
        ) from None
    missing = [c for c in spec.features if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{spec.name}: hub dataset {path!r} split {source_split!r} lacks field(s) {missing}; "
            f"expected the columns {list(spec.features)}"
        )
    if len(ds) == 0:
        raise DataError(f"{spec.name}: hub dataset {path!r} split {source_split!r} is empty")
    with datasets_quietly():
        ds = ds.select_columns(list(spec.features))
        return ds.cast(spec.features) if ds.features != spec.features else ds


@dataclasses.dataclass(frozen=True)
class Split:
    """One role of one task: hub-schema documents plus how they were chosen."""

    task: TaskSpec
    docs: datasets.Dataset  # hub schema, in source order
    info: SplitInfo  # role, source split, seed and sizes: store with the run
    fewshot_docs: datasets.Dataset | None = None  # the task's fewshot_split, when it has one

    def records(self, last_question_only: bool = False) -> list[Record]:
        """The documents as records (``last_question_only``: RACE as lm-eval)."""
        return self.task.to_records(
            self.docs,
            last_question_only=last_question_only,
            fewshot_docs=self.fewshot_docs,
            exclude_self=self.info.source_split == self.task.fewshot_split,
        )

    def __len__(self) -> int:
        return len(self.docs)


def load_split(
    task: str | TaskSpec,
    split: str,
    *,
    source: Source = "local",
    data_dir: str | os.PathLike | None = None,
    hub_path: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    sizes: Mapping[str, int] | None = None,
) -> Split:
    """One role (``train`` / ``validation`` = search-validation / ``test``) of a task.

    Official source splits are used whole; other roles are carved from the plan's pool with
    ``seed`` and ``sizes`` (role -> count, ``-1`` = the rest; defaults from the registry). The
    returned ``info`` records all of it for the run's config and report.
    """
    spec = get_task(task)
    role = canonical_role(split)
    plan = spec.plan
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:  # numpy's seeds: ints >= 0
        raise ConfigError(f"load_split: seed must be an integer >= 0, got {seed!r}")
    if role in plan.unavailable:
        raise DataError(f"{spec.name}: no {role!r} split: {plan.unavailable[role]}")
    if role in plan.official:
        check_size_roles(plan, sizes)
        docs = load_source(spec, plan.official[role], source, data_dir, hub_path)
        info = SplitInfo(spec.name, role, source, plan.official[role], len(docs), resplit=False)
    else:
        pool = load_source(spec, plan.pool, source, data_dir, hub_path)
        concrete = resolve_sizes(plan, len(pool), sizes)
        indices = resplit_indices(len(pool), concrete, seed)[role]
        docs = pool.select(indices)
        info = SplitInfo(
            spec.name, role, source, plan.pool, len(docs), resplit=True, seed=seed, sizes=concrete, pool_size=len(pool)
        )
    if len(docs) == 0:
        raise DataError(
            f"{spec.name}: split {role!r} is empty (source split {info.source_split!r}, "
            f"sizes {info.sizes}); expected at least one example"
        )
    fewshot = None if spec.fewshot_split is None else load_source(spec, spec.fewshot_split, source, data_dir, hub_path)
    return Split(spec, docs, info, fewshot)


def load_records(task: str | TaskSpec, split: str, *, last_question_only: bool = False, **kwargs: Any) -> list[Record]:
    """``load_split(task, split, **kwargs).records()`` in one call."""
    return load_split(task, split, **kwargs).records(last_question_only=last_question_only)


def split_report(splits: Sequence[Split]) -> list[dict[str, Any]]:
    """``SplitInfo.to_dict()`` of several splits, for a run's config / report."""
    return [s.info.to_dict() for s in splits]
