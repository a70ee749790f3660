"""Flax NNX face of flexora_jax (placeholder docstring; completed below)."""

from flexora_jax.nnx.search import (GateLayout, Selection, apply_selection, gate_state, init_hyperparameters,
                                    init_search_state, make_loss, make_search_step, select, split_for_search,
                                    update_model)
from flexora_jax.nnx.surgery import LoraSite, add_lora, merge_lora, remove_lora
from flexora_jax.nnx.variables import Gate

__all__ = ["Gate", "LoraSite", "add_lora", "merge_lora", "remove_lora", "GateLayout", "Selection", "apply_selection",
           "gate_state", "init_hyperparameters", "init_search_state", "make_loss", "make_search_step", "select",
           "split_for_search", "update_model"]
