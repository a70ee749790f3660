"""Deterministic, resumable batch streams over in-memory numpy datasets.

A dataset here is a dict of equally long numpy arrays (``input_ids`` [N, T], ``attention_mask``,
``loss_mask``, optionally ``target_probs``). :class:`BatchSampler` draws batches from a seeded
permutation per epoch; its whole position is two integers, so a checkpoint can hold it and a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flexora_jax.errors import DataError

Dataset = dict[str, np.ndarray]


def dataset_rows(data: Dataset, name: str = "dataset", required: tuple[str, ...] = ("input_ids", "loss_mask")) -> int:
    """Validate a dataset dict; return its size. Empty or ragged data is an error naming the field."""
    if not isinstance(data, Mapping):
        raise DataError(f"{name} must be a dict of arrays, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise DataError(f"{name} is missing field(s) {missing}; it has {sorted(data)}")
    sizes = {k: len(v) for k, v in data.items()}
    n = sizes[required[0]]
    if n == 0:
        raise DataError(f"{name} is empty (0 examples)")
    ragged = {k: s for k, s in sizes.items() if s != n}
    if ragged:
        raise DataError(f"{name}: fields have different lengths: {sizes}")
    if "loss_mask" in data and not np.any(np.asarray(data["loss_mask"]).sum(axis=-1) > 0):
        raise DataError(f"{name}: no example has a target token (loss_mask is all zero)")
    return n


@dataclasses.dataclass
class BatchSampler:
    """Seeded epoch-wise shuffled batches; ``state()`` / ``restore()`` make it resumable."""

    data: Dataset
    batch_size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0  # index into this epoch's permutation
    required: tuple[str, ...] = ("input_ids", "loss_mask")  # fields the loss reads (checked once here)

    def __post_init__(self) -> None:
        self.size = dataset_rows(self.data, required=self.required)
        if self.batch_size > self.size:
            raise DataError(f"batch size {self.batch_size} is larger than the dataset ({self.size} examples)")

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self) -> Dataset:
        """The next batch (drops the ragged tail of an epoch, so every batch has one shape)."""
        if self.position + self.batch_size > self.size:
            self.epoch += 1
            self.position = 0
        idx = self._perm(self.epoch)[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {k: v[idx] for k, v in self.data.items()}

    def next_stacked(self, k: int) -> Dataset:
        """K batches stacked on a leading axis (the inputs of the inner scan)."""
        batches = [self.next() for _ in range(k)]
        return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

    def abstract(self, k: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of :meth:`next` (or of :meth:`next_stacked` with ``k``): what a step compiles for."""
        lead = (self.batch_size,) if k is None else (k, self.batch_size)
        return {key: jax.ShapeDtypeStruct(lead + v.shape[1:], v.dtype) for key, v in self.data.items()}

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.batch_size


def fingerprint(data: Dataset) -> str:
    """A short hash of a dataset's fields, shapes, dtypes and contents (what a checkpoint was trained on)."""
    digest = hashlib.sha256()
    for key in sorted(data):
        array = np.ascontiguousarray(np.asarray(data[key]))
        digest.update(f"{key}:{array.shape}:{array.dtype};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def batches_in_order(
    data: Dataset, batch_size: int, required: tuple[str, ...] = ("input_ids", "loss_mask")
) -> list[Dataset]:
    """Every example once, in order, padded to full batches with zero-weight rows (for evaluation)."""
    n = dataset_rows(data, required=required)
    out = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in data.items()}
        short = batch_size - len(chunk["input_ids"])
        if short:
            chunk = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        out.append(chunk)
    return out


def length_buckets(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself."""
    out, n = [], min_length
    while n < max_length:
        out.append(n)
        n *= 2
    return tuple(out) + (max_length,)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise DataError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")
