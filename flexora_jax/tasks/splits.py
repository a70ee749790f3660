"""Train / search-validation / test splits for every task, with deterministic seeded re-splits.

Flexora needs three disjoint sets per task: ``train`` (LoRA weights are fit on it), ``validation``
(the *search* validation set: the upper level of the bilevel search picks layers on it) and
``test`` (reported once). Where the files hold an official split for a role it is used as is;
otherwise one labelled source split (the *pool*) is permuted with a seeded NumPy generator and cut
into the missing roles. Test is cut first, then validation, then train, so a different train size
never moves an example between the evaluation sets. The seed, sizes and source of every role go
into :class:`SplitInfo`, which runs store in their config and report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from flexora_jax.errors import ConfigError, DataError

#: Roles, in the order a report lists them. "validation" is the search-validation set.
ROLES = ("train", "validation", "test")
_ALIASES = {
    "search-validation": "validation",
    "search_validation": "validation",
    "val": "validation",
    "dev": "validation",
}
#: Seed used when a caller gives none.
DEFAULT_SEED = 0
#: Size value meaning "all the pool that is left".
REST = -1


def canonical_role(split: str) -> str:
    """``train`` / ``validation`` / ``test`` for a role name or alias (``search-validation``)."""
    role = _ALIASES.get(split, split)
    if role not in ROLES:
        raise ConfigError(f"unknown split {split!r}; expected one of {list(ROLES)} (or 'search-validation')")
    return role


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Where each role of a task comes from.

    ``official`` maps roles to source splits used whole; the other roles are carved out of the
    source split ``pool`` with the sizes in ``sizes`` (``REST`` = what is left after the others).
    Roles in ``unavailable`` have no data at all (e.g. AQuA's train set is not kept locally).
    """

    official: Mapping[str, str]  # role -> source split used as is
    pool: str | None = None  # source split re-split into the remaining roles
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)  # role -> default size from the pool
    unavailable: Mapping[str, str] = dataclasses.field(default_factory=dict)  # role -> why it has no data

    def __post_init__(self) -> None:
        carved = [r for r in ROLES if r not in self.official and r not in self.unavailable]
        if set(carved) != set(self.sizes) or (carved and self.pool is None):
            raise ConfigError(
                f"SplitPlan: roles {carved} are not official, so they need a pool and sizes; "
                f"got pool={self.pool!r}, sizes={dict(self.sizes)}"
            )

    @property
    def carved_roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r not in self.official and r not in self.unavailable)


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """How one role of one task was made: record it in the run's config and report."""

    task: str
    role: str  # train / validation / test
    source: str  # "local" or "hub"
    source_split: str  # the split read from the files or the hub
    n: int  # examples in this role
    resplit: bool  # True when carved from source_split with seed and sizes
    seed: int | None = None  # permutation seed (resplit only)
    sizes: Mapping[str, int] | None = None  # every carved role's size (resplit only)
    pool_size: int | None = None  # examples in the source split before the cut (resplit only)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sizes"] = None if self.sizes is None else dict(self.sizes)
        return d


def check_size_roles(plan: SplitPlan, sizes: Mapping[str, int] | None) -> dict[str, int]:
    """``sizes`` keyed by canonical role; an error if one names an official (not re-split) role."""
    out = {}
    for role, size in (sizes or {}).items():
        role = canonical_role(role)
        if role in plan.official:
            raise ConfigError(
                f"split size for {role!r} given, but that role is the official split "
                f"{plan.official[role]!r} and is not re-split; re-split roles: "
                f"{list(plan.carved_roles)}"
            )
        out[role] = int(size)
    return out


def resolve_sizes(plan: SplitPlan, pool_size: int, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Concrete sizes of the carved roles: overrides merged on the plan's, ``REST`` filled in."""
    merged = dict(plan.sizes) | check_size_roles(plan, sizes)
    rest = [r for r, s in merged.items() if s == REST]
    if len(rest) > 1:
        raise ConfigError(f"split sizes: only one role may take the rest (-1), got {rest}")
    bad = {r: s for r, s in merged.items() if s != REST and s < 0}
    if bad:
        raise ConfigError(f"split sizes must be >= 0 (or -1 for the rest), got {bad}")
    fixed = sum(s for s in merged.values() if s != REST)
    if fixed > pool_size:
        raise DataError(f"split sizes {merged} need {fixed} examples but the pool has only {pool_size}")
    if rest:
        merged[rest[0]] = pool_size - fixed
    return merged


def resplit_indices(pool_size: int, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Seeded disjoint index sets, cut test -> validation -> train from one permutation, each sorted."""
    perm = np.random.default_rng(seed).permutation(pool_size)
    out, start = {}, 0
    for role in ("test", "validation", "train"):
        if role in sizes:
            out[role] = np.sort(perm[start : start + sizes[role]])
            start += sizes[role]
    return out
