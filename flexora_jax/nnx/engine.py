"""``fj.search`` and ``fj.finetune`` on a Flax NNX model, through the library's one host loop.

The model is split by variable type (:func:`split_for_search`); the pure step over the split states
(:func:`flexora_jax.bilevel.search_step` for the search, a LoRA-only optax step for the fine-tune)
goes through :func:`flexora_jax.loops.compile_step` / :func:`flexora_jax.loops.run`, exactly as the
built-in decoder's: compiled once per search, one device or a mesh, the same hooks. The results are
written back into the model (``nnx.update``). Both functions are registered on ``fj.search`` /
``fj.finetune``, which dispatch on their first argument: a ``ModelConfig`` (the built-in decoder) or an
``nnx.Module``.

Resume: both take ``state`` / ``sampler_state(s)`` as the functional ones do (the callback's record holds
``state`` and ``sampler``), and ``checkpoint_dir``: adapter-only orbax checkpoints (LoRA, gates, both
optimizer states, the step, the batch positions; never the frozen base) every ``checkpoint_every``
steps and at the end, restored when the directory holds one, so an interrupted search or fine-tune
continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flexora_jax import bilevel, loops, train
from flexora_jax import selection as selection_module
from flexora_jax.bilevel import SearchState, init_search_state, search_step
from flexora_jax.checkpoint import StageCheckpointer
from flexora_jax.config import FinetuneConfig, SearchConfig, SelectionConfig
from flexora_jax.data import BatchSampler, Dataset
from flexora_jax.errors import NumericsError, check_tree_shapes
from flexora_jax.gates import Gates
from flexora_jax.models.losses import causal_lm_loss
from flexora_jax.nnx.search import (GateLayout, Selection, init_hyperparameters, make_loss, select, split_for_search,
                                    update_model)
from flexora_jax.nnx.llama import LlamaForCausalLM
from flexora_jax.nnx.variables import Gate
from flexora_jax.selection import Selection as LoraSelection
from flexora_jax.selection import select as select_lora
from flexora_jax.sharding import fetch

ModelLoss = Callable[[nnx.Module, Dataset], jax.Array]


def causal_lm(model: nnx.Module, batch: Dataset) -> jax.Array:
    """The default ``loss_fn``: next-token cross-entropy on the answer tokens, ``model(input_ids) -> logits``."""
    return causal_lm_loss(model(batch["input_ids"]), batch["input_ids"], batch["loss_mask"])


@dataclasses.dataclass
class NNXSearchResult:
    """Final raw gates (alpha / beta), the selection (in the model's own module paths; a
    :class:`flexora_jax.Selection` for ``LlamaForCausalLM``), the log, the state."""

    gates: Gates
    selection: Selection | LoraSelection
    history: list[dict]
    state: SearchState


class NNXTrainState(NamedTuple):
    """What the NNX fine-tune step reads and writes (and a checkpoint holds): LoRA, optimizer state, step."""

    lora: nnx.State
    opt_state: Any
    step: jax.Array


class _Checkpoints:
    """Adapter-only orbax checkpoints of one search / fine-tune (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike | None, every: int, total: int,
                 samplers: dict[str, BatchSampler]) -> None:
        self.total, self.samplers = total, samplers
        self.ckpt = None if directory is None else StageCheckpointer(directory, every, required_meta=("sampler",))

    def restore(self, template: Any) -> Any:
        """The latest checkpoint's state (samplers repositioned), or None."""
        restored = None if self.ckpt is None else self.ckpt.restore(template)
        if restored is None:
            return None
        state, meta = restored
        for name, sampler in self.samplers.items():
            sampler.restore(meta["sampler"][name])
        return state

    def positions(self) -> dict[str, Any]:
        return {name: sampler.state() for name, sampler in self.samplers.items()}

    def hook(self, step: int, state: Any, metrics: dict) -> None:
        """Save when due and at the last step (before the caller's callback, which may raise to stop)."""
        if self.ckpt is not None and (self.ckpt.due(step) or step == self.total):
            self.ckpt.save(step, state, {"sampler": self.positions()}, force=True)

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


def _start(fresh: Callable[[], Any], ckpt: _Checkpoints, given: Any, what: str) -> Any:
    """The state to start from: ``given`` (checked against a fresh one), else the checkpoint, else fresh."""
    if given is not None:
        check_tree_shapes(given, jax.eval_shape(fresh), f"{what}: the given state")
        return given
    template = fresh()
    restored = ckpt.restore(template)
    return template if restored is None else restored


def _record(step: int, metrics: dict, keys: tuple[str, ...], what: str) -> dict:
    record = {"step": step, **{k: float(metrics[k]) for k in keys}}
    if not all(np.isfinite(v) for k, v in record.items() if k != "step"):
        raise NumericsError(f"non-finite {what} at step {step}: {record}; lower the learning rate")
    return record


def search_nnx(model: nnx.Module, search_config: SearchConfig, train_data: Dataset, val_data: Dataset, *,
               loss_fn: ModelLoss = causal_lm, gates: str = "layer", selection: SelectionConfig = SelectionConfig(),
               seed: int = 0, callback: Callable[[int, dict], None] | None = None, mesh: Any = None,
               state: SearchState | None = None, sampler_states: dict | None = None,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 10) -> NNXSearchResult:
    """The bilevel search on an NNX model that :func:`flexora_jax.nnx.add_lora` adapted (with gates).

    ``loss_fn(model, batch)`` is both losses (default: :func:`causal_lm`). The searched LoRA and the gate
    values are written back into ``model``; the selection speaks its module paths
    (:func:`flexora_jax.nnx.apply_selection` rebuilds LoRA there). ``callback(step, record)``: the metrics
    plus ``state`` and ``sampler`` (what ``state`` / ``sampler_states`` resume from). ``checkpoint_dir``:
    save there every ``checkpoint_every`` steps and at the end, and resume from its latest checkpoint
    (the model must hold the same LoRA and gate layout); ``history`` then lists the resumed steps only.
    """
    sc = search_config
    graphdef, base, lora, gate_vars = split_for_search(model)
    layout = GateLayout.of(gate_vars)

    def fresh() -> SearchState:
        return init_search_state(lora, init_hyperparameters(layout, gates, power=sc.gate_power), sc)

    train_s, val_s = BatchSampler(train_data, sc.batch_size, seed=seed), BatchSampler(val_data, sc.val_batch_size,
                                                                                        seed=seed + 1)
    if sampler_states is not None:
        train_s.restore(sampler_states["train"])
        val_s.restore(sampler_states["val"])
    ckpt = _Checkpoints(checkpoint_dir, checkpoint_every, sc.steps, {"train": train_s, "val": val_s})
    state = _start(fresh, ckpt, state, "search")

    def losses(base: nnx.State) -> tuple[Callable, Callable]:
        loss = make_loss(graphdef, layout, loss_fn, base)
        return loss, loss

    program = loops.compile_step(search_step(losses, sc), loops.default_mesh(mesh),
                                 (base, state, train_s.abstract(sc.inner_steps), val_s.abstract()), {2: 1, 3: 0})
    base, state = program.place(base, state)
    history: list[dict] = []

    def on_step(step: int, state: SearchState, metrics: dict) -> None:
        history.append(_record(step, metrics, ("train_loss", "val_loss", "hypergrad_norm"), "search step"))
        if callback is not None:
            callback(step, dict(history[-1], state=state, sampler=ckpt.positions()))

    try:
        state = loops.run(program, base, state, lambda: (train_s.next_stacked(sc.inner_steps), val_s.next()),
                          int(state.step), sc.steps, [ckpt.hook, on_step])
    finally:
        ckpt.close()
    final = jax.tree.map(jnp.asarray, fetch(state.gates))
    update_model(model, jax.tree.map(jnp.asarray, fetch(state.inner.lora)), final)
    return NNXSearchResult(gates=final, selection=select_nnx(model, final, selection), history=history, state=state)


def select_nnx(model: nnx.Module, gates: Gates, selection: SelectionConfig = SelectionConfig()) -> Selection | LoraSelection:
    """``fj.select(model, gates, selection)``: the selection rule on a search's raw gates, for an NNX model.

    ``LlamaForCausalLM`` selects like the functional core (a :class:`flexora_jax.Selection` with its
    ``LoraConfig``); any other model gets :func:`flexora_jax.nnx.select` (its own module paths), which
    :func:`flexora_jax.nnx.apply_selection` applies.
    """
    if isinstance(model, LlamaForCausalLM):
        return select_lora(gates, model.lora_config, model.config.num_hidden_layers, selection)
    return select(model, gates, selection.rule, selection.top_k, selection.threshold)


def finetune_nnx(model: nnx.Module, train_data: Dataset, cfg: FinetuneConfig, *, loss_fn: ModelLoss = causal_lm,
                 seed: int = 0, callback: Callable[[int, dict], None] | None = None,
                 mesh: Any = None, state: NNXTrainState | None = None, sampler_state: dict | None = None,
                 checkpoint_dir: str | os.PathLike | None = None,
                 checkpoint_every: int = 10) -> tuple[nnx.Module, list[dict]]:
    """Train the model's ``nnx.LoRAParam`` on ``loss_fn`` (base and gates frozen); the result is written back.

    The same optimizer as the built-in fine-tune (:func:`flexora_jax.train.make_optimizer`), the same loop.
    ``state`` / ``sampler_state`` / ``checkpoint_dir`` / ``checkpoint_every``: resume, as in :func:`search_nnx`.
    """
    graphdef, lora, gate_vars, base = nnx.split(model, nnx.LoRAParam, Gate, ...)
    steps = train.total_steps(cfg, len(train_data["input_ids"]))
    optimizer = train.make_optimizer(cfg, steps)

    def step(base: nnx.State, state: tuple, batch: Dataset) -> tuple[tuple, dict]:
        value, grads = jax.value_and_grad(
            lambda lo: loss_fn(nnx.merge(graphdef, lo, gate_vars, base, copy=True), batch))(state.lora)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        new = NNXTrainState(optax.apply_updates(state.lora, updates), opt_state, state.step + 1)
        return new, {"loss": value, "grad_norm": optax.tree.norm(grads)}

    def fresh() -> NNXTrainState:
        return NNXTrainState(jax.tree.map(jnp.copy, lora), optimizer.init(lora), jnp.zeros((), jnp.int32))

    sampler = BatchSampler(train_data, cfg.batch_size, seed=seed)
    if sampler_state is not None:
        sampler.restore(sampler_state)
    ckpt = _Checkpoints(checkpoint_dir, checkpoint_every, steps * cfg.grad_accum, {"train": sampler})
    state = _start(fresh, ckpt, state, "finetune")
    program = loops.compile_step(step, loops.default_mesh(mesh), (base, state, sampler.abstract()), {2: 0})
    base, state = program.place(base, state)
    history: list[dict] = []

    def on_step(i: int, state: tuple, metrics: dict) -> None:
        history.append(_record(i, metrics, ("loss", "grad_norm"), "fine-tune loss"))
        if callback is not None:
            callback(i, dict(history[-1], state=state, sampler=sampler.state()))

    try:
        state = loops.run(program, base, state, lambda: (sampler.next(),), int(state.step), steps * cfg.grad_accum,
                          [ckpt.hook, on_step])
    finally:
        ckpt.close()
    nnx.update(model, jax.tree.map(jnp.asarray, fetch(state.lora)))
    return model, history


bilevel.search.register(nnx.Module)(search_nnx)
selection_module.select.register(nnx.Module)(select_nnx)
train.finetune.register(nnx.Module)(finetune_nnx)
