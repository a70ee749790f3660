"""The search stage: run jitted search steps over train / validation streams, then select.

:func:`search` is the whole Flexora / AutoLoRA search: build LoRA and gates, compile the search step
once, feed it K stacked training batches and one validation batch per step, record the gate
trajectory, stop with a clear error on a non-finite hypergradient, and turn the final gates into a
:class:`flexora_jax.selection.Selection` for the fine-tune stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from flexora_jax.bilevel import SearchState, init_search_state, make_search_step
from flexora_jax.config import LoraConfig, ModelConfig, SearchConfig
from flexora_jax.data import BatchSampler, Dataset
from flexora_jax.errors import NumericsError
from flexora_jax.gates import Gates, gate_values, init_gates
from flexora_jax.lora import init_lora
from flexora_jax.selection import Selection, select


@dataclasses.dataclass
class SearchResult:
    """Final gates, their trajectory (one row of layer gate values per step) and the selection."""

    gates: Gates
    selection: Selection
    trajectory: list[list[float]]
    history: list[dict]
    state: SearchState


def search(config: ModelConfig, params: Any, lora_config: LoraConfig, search_config: SearchConfig,
           train: Dataset, val: Dataset, seed: int = 0, callback: Callable[[int, dict], None] | None = None,
           state: SearchState | None = None, sampler_states: dict | None = None,
           mesh: Any = None) -> SearchResult:
    """Run the search stage and select layers / ranks.

    Args:
      config, params: the frozen base model.
      lora_config: LoRA of the search model (usually all layers, the targets to choose among).
      search_config: estimator, K, steps, optimizers, selection rule.
      train, val: tokenised datasets (dicts of arrays); batches are drawn with ``seed``.
      callback: ``callback(step, record)`` after each step (logging, checkpointing); ``record`` holds
        the metrics, the gate values, the state and the sampler positions.
      state, sampler_states: resume from a checkpoint.
      mesh: a ``jax.sharding.Mesh`` of more than one device runs the step through
        :func:`flexora_jax.sharding.shard_search_step` (params and state placed sharded, batches
        assembled from each process's rows); None (or a 1-device mesh) is the single-device path.
    """
    sc = search_config
    key = jax.random.key(seed)
    if state is None:
        lora = init_lora(config, lora_config, key)
        gates = init_gates(sc.gates, config.num_hidden_layers, dict(lora.spec.r_max), power=sc.gate_power)
        state = init_search_state(lora, gates, sc)
    train_sampler = BatchSampler(train, sc.batch_size, seed=seed)
    val_sampler = BatchSampler(val, sc.val_batch_size, seed=seed + 1)
    if sampler_states is not None:
        train_sampler.restore(sampler_states["train"])
        val_sampler.restore(sampler_states["val"])
    trajectory: list[list[float]] = []
    history: list[dict] = []
    if mesh is not None and mesh.size > 1:
        return _search_sharded(config, params, lora_config, sc, state, train_sampler, val_sampler, callback, mesh)
    step_fn = make_search_step(config, sc)
    for step in range(int(state.step), sc.steps):
        state, metrics = step_fn(params, state, train_sampler.next_stacked(sc.inner_steps), val_sampler.next())
        record = _step_record(step, metrics, state.gates, config.num_hidden_layers)
        _log_step(record, state, trajectory, history, callback, train_sampler, val_sampler)
    selection = select(state.gates, lora_config, config.num_hidden_layers, sc.selection, sc.top_k, sc.threshold)
    return SearchResult(gates=state.gates, selection=selection, trajectory=trajectory, history=history, state=state)


def _step_record(step: int, metrics: dict, gates: Gates, num_layers: int) -> dict:
    """The logged record of one search step; a non-finite step stops the search with a clear error."""
    if not bool(metrics["finite"]):
        raise NumericsError(
            f"non-finite hypergradient or validation loss at search step {step + 1} "
            f"(val_loss={float(metrics['val_loss'])}); lower search.inner_lr, keep inner_eps_root > 0, "
            "or use search.hypergradient=first_order")
    record = {"step": step + 1, "val_loss": float(metrics["val_loss"]),
              "train_loss": float(metrics["train_loss"]), "hypergrad_norm": float(metrics["hypergrad_norm"])}
    values = gate_values(gates, num_layers)
    if "layer" in values:
        record["gates"] = [round(float(x), 6) for x in np.asarray(values["layer"])]
    return record


def _log_step(record: dict, state: SearchState, trajectory: list[list[float]], history: list[dict],
              callback: Callable[[int, dict], None] | None, train_sampler: BatchSampler,
              val_sampler: BatchSampler) -> None:
    """Append one step's record to the trajectory / history and hand it to the callback (with the state
    and sampler positions a checkpoint needs)."""
    if "gates" in record:
        trajectory.append(record["gates"])
    history.append(record)
    if callback is not None:
        callback(record["step"], dict(record, state=state,
                                      sampler={"train": train_sampler.state(), "val": val_sampler.state()}))


def _search_sharded(config: ModelConfig, params: Any, lora_config: LoraConfig, sc: SearchConfig,
                    state: SearchState, train_sampler: BatchSampler, val_sampler: BatchSampler,
                    callback: Callable[[int, dict], None] | None, mesh: Any) -> SearchResult:
    """:func:`search` on a multi-device mesh: the same loop through ``sharding.shard_search_step``.

    Every process draws the same global batches (same seeds) and contributes its own rows; metrics and
    gates come back replicated and are read with ``sharding.fetch`` (works across hosts).
    """
    import jax.numpy as jnp

    from flexora_jax import sharding as sh

    first = int(state.step)
    train_pos, val_pos = train_sampler.state(), val_sampler.state()
    example_train, example_val = train_sampler.next_stacked(sc.inner_steps), val_sampler.next()
    train_sampler.restore(train_pos)  # the examples only gave shapes: rewind
    val_sampler.restore(val_pos)
    step_fn = sh.shard_search_step(config, sc, mesh, params, state, example_train, example_val)
    params, state = step_fn.place(params, state)
    trajectory: list[list[float]] = []
    history: list[dict] = []
    for step in range(first, sc.steps):
        state, metrics = step_fn(params, state, step_fn.batch_from_global(train_sampler.next_stacked(sc.inner_steps), 2),
                                 step_fn.batch_from_global(val_sampler.next(), 3))
        metrics = sh.fetch(metrics)
        record = _step_record(step, metrics, jax.tree.map(jnp.asarray, sh.fetch(state.gates)),
                              config.num_hidden_layers)
        _log_step(record, state, trajectory, history, callback, train_sampler, val_sampler)
    gates = jax.tree.map(jnp.asarray, sh.fetch(state.gates))  # host-local copies, readable on every process
    selection = select(gates, lora_config, config.num_hidden_layers, sc.selection, sc.top_k, sc.threshold)
    return SearchResult(gates=gates, selection=selection, trajectory=trajectory, history=history, state=state)
