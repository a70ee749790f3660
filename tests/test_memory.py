"""The memory planner against XLA's compiled memory analysis (CPU, single device) and its sharded arithmetic."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flexora_jax.bilevel import init_search_state, make_search_step
from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig, SearchConfig
from flexora_jax.errors import ConfigError
from flexora_jax.gates import init_gates
from flexora_jax.lora import init_lora
from flexora_jax.memory import memory_table, plan_memory
from flexora_jax.models.llama import init_params
from flexora_jax.train import init_train_state, make_optimizer, make_train_step

CONFIG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
LORA = LoraConfig(r=8, target_modules=("q_proj", "v_proj"))
K, BATCH, SEQ = 2, 8, 64


def _footprint(compiled) -> int:
    """Arguments + outputs not aliased to donated arguments + scratch: the live bytes of one call."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def _abstract_batch(shape):
    return {
        "input_ids": jax.ShapeDtypeStruct(shape, np.int32),
        "attention_mask": jax.ShapeDtypeStruct(shape, np.int32),
        "loss_mask": jax.ShapeDtypeStruct(shape, np.float32),
    }


@pytest.mark.parametrize("unrolled_mode", ["mixed", "reverse"])
def test_plan_matches_xla_memory_analysis(unrolled_mode):
    search = SearchConfig(
        inner_steps=K, batch_size=BATCH, val_batch_size=BATCH, remat=True, unrolled_mode=unrolled_mode
    )
    finetune = FinetuneConfig(batch_size=BATCH, schedule="constant")
    params = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    lora = lambda: init_lora(CONFIG, LORA, jax.random.key(1))  # noqa: E731
    sstate = jax.eval_shape(lambda: init_search_state(lora(), init_gates("layer", 2), search))
    tstate = jax.eval_shape(lambda: init_train_state(lora(), make_optimizer(finetune, 10)))
    xla_search = _footprint(
        jax.jit(make_search_step(CONFIG, search), donate_argnums=1)
        .lower(params, sstate, _abstract_batch((K, BATCH, SEQ)), _abstract_batch((BATCH, SEQ)))
        .compile()
    )
    xla_train = _footprint(
        jax.jit(make_train_step(CONFIG, finetune, 10), donate_argnums=1)
        .lower(params, tstate, _abstract_batch((BATCH, SEQ)))
        .compile()
    )
    plan = plan_memory(CONFIG, LORA, {}, K, BATCH, SEQ, remat=True, unrolled_mode=unrolled_mode)
    assert plan["search"]["total"] == pytest.approx(xla_search, rel=0.25)
    assert plan["finetune"]["total"] == pytest.approx(xla_train, rel=0.25)


def test_plan_shards_and_scales():
    one = plan_memory(CONFIG, LORA, {}, K, BATCH, SEQ)
    fsdp = plan_memory(CONFIG, LORA, {"fsdp": 8}, K, BATCH, SEQ)
    tp = plan_memory(CONFIG, LORA, {"model": 4}, K, BATCH, SEQ)
    assert fsdp["search"]["params"] < one["search"]["params"] / 7  # norms stay replicated
    assert fsdp["search"]["activations"] == pytest.approx(one["search"]["activations"] / 8, rel=1e-3)
    assert tp["finetune"]["activations"] < one["finetune"]["activations"] / 2  # hidden-sized residuals stay whole
    no_remat = plan_memory(CONFIG, LORA, {}, 4, BATCH, SEQ, remat=False, unrolled_mode="reverse")
    remat = plan_memory(CONFIG, LORA, {}, 4, BATCH, SEQ, remat=True, unrolled_mode="reverse")
    assert no_remat["search"]["activations"] == 4 * remat["search"]["activations"]
    assert (
        remat["search"]["carries"]
        == 2 * plan_memory(CONFIG, LORA, {}, K, BATCH, SEQ, unrolled_mode="reverse")["search"]["carries"]
    )  # K = 4 vs 2
    mixed = plan_memory(CONFIG, LORA, {}, 4, BATCH, SEQ)
    assert mixed["search"]["activations"] == one["search"]["activations"]  # flat in K: no residuals kept per step
    assert mixed["search"]["total"] < remat["search"]["total"]
    bf16 = plan_memory(CONFIG, LORA, {}, K, BATCH, SEQ, dtype="bfloat16")
    assert bf16["finetune"]["params"] == pytest.approx(one["finetune"]["params"] / 2, rel=1e-6)
    assert bf16["finetune"]["lora"] == one["finetune"]["lora"]  # LoRA stays fp32
    table = memory_table(
        [
            {
                "model": "tiny",
                "slice": "cpu x8",
                "mesh": {"fsdp": 8},
                "hbm_gb": 1,
                "batch": BATCH,
                "seq": SEQ,
                "k": K,
                "plan": fsdp,
            }
        ]
    )
    assert table.count("\n") == 3 and "| search |" in table and "| yes |" in table
    with pytest.raises(ValueError, match="unknown mesh axes"):
        plan_memory(CONFIG, LORA, {"tensor": 2}, K, BATCH, SEQ)


def test_memory_table_takes_plan_memory_output():
    plan = plan_memory(CONFIG, LoraConfig(r=4), {"fsdp": 1}, inner_steps=2, batch=2, seq=16)
    table = memory_table(plan, hbm_gb=80)
    assert table.count("\n") == 3 and "| search |" in table and "| finetune |" in table and "| yes |" in table
    assert "| - |" in memory_table(plan)  # no HBM size: the fits column reads "-"
    with pytest.raises(ConfigError, match="plan_memory"):
        memory_table({"search": plan["search"]})
