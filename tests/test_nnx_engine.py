"""fj.search / fj.finetune take a Flax NNX model: the one host loop over the split states, compiled once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_nnx_search import PLANTED, planted_task

import flexora_jax as fj
from flexora_jax.nnx import Gate, apply_selection, lora_sites


def _dataset(d: dict) -> dict:
    tokens = np.asarray(d["tokens"])
    return {"input_ids": tokens, "loss_mask": np.ones(tokens.shape, np.float32), "targets": np.asarray(d["targets"])}


def _soft(model: nnx.Module, batch: dict) -> jax.Array:
    return -jnp.mean(jnp.sum(batch["targets"] * jax.nn.log_softmax(model(batch["input_ids"]), -1), -1))


def test_fj_search_then_fj_finetune_on_a_foreign_nnx_model():
    student, train, val = planted_task(0)
    train, val = _dataset(train), _dataset(val)
    sc = fj.SearchConfig(
        hypergradient="first_order",
        inner_steps=1,
        steps=150,
        inner_lr=3e-3,
        outer_lr=0.01,
        batch_size=16,
        val_batch_size=16,
    )
    result = fj.search(student, sc, train, val, loss_fn=_soft)
    assert isinstance(result, fj.SearchResult) and len(result.history) == 150
    assert result.selection.layers == PLANTED  # the planted layers, in the model's own numbering
    assert fj.select(student, result.gates) == result.selection  # fj.select dispatches on the model too
    top1 = fj.select(student, result.gates, fj.SelectionConfig(rule="top_k", top_k=1))
    assert len(top1.layers) == 1 and top1.layers[0] in PLANTED
    w = np.asarray(fj.layer_gate_values(result.gates))
    got = [float(b.attn.v.lora_gate[...]) for b in student.blocks]  # the gate values were written back
    np.testing.assert_allclose(got, w, rtol=1e-6)

    apply_selection(student, result.selection, rngs=nnx.Rngs(0))
    assert sorted(lora_sites(student)) == [f"blocks.{i}.attn.{m}" for i in PLANTED for m in "qv"]
    assert not jax.tree.leaves(nnx.state(student, Gate))
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam subclasses Param
    base = jax.tree.map(np.asarray, nnx.state(student, frozen))
    model, history = fj.finetune(
        student, train, fj.FinetuneConfig(max_steps=30, batch_size=16, lr=3e-3, warmup_ratio=0.0), loss_fn=_soft
    )
    assert model is student and len(history) == 30 and history[-1]["loss"] < history[0]["loss"]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(student, frozen)), base)


def test_the_default_loss_is_the_causal_lm_loss_on_answer_tokens():
    student, train, val = planted_task(1)
    train, val = _dataset(train), _dataset(val)
    sc = fj.SearchConfig(hypergradient="unrolled", inner_steps=2, steps=3, batch_size=8, val_batch_size=8)
    result = fj.search(student, sc, train, val)  # loss_fn defaults to fj.nnx.causal_lm
    assert len(result.history) == 3 and all(np.isfinite(r["val_loss"]) for r in result.history)
    batch = {k: v[:4] for k, v in val.items()}
    want = fj.causal_lm_loss(student(batch["input_ids"]), batch["input_ids"], batch["loss_mask"])
    np.testing.assert_allclose(fj.nnx.causal_lm(student, batch), want, rtol=1e-6)


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def callback(i: int, record: dict) -> None:
        if i == step:
            raise _Stop

    return callback


def test_interrupted_search_and_finetune_resume_bit_identically(tmp_path):
    """Adapter-only orbax checkpoints (LoRA, gates, optimizer states, step, batch positions): an interrupted
    search and fine-tune continue from their checkpoint and end bitwise where an uninterrupted run ends."""
    sc = fj.SearchConfig(
        hypergradient="unrolled", inner_steps=2, steps=6, inner_lr=3e-3, outer_lr=0.05, batch_size=8, val_batch_size=8
    )
    ft = fj.FinetuneConfig(max_steps=6, batch_size=8, lr=3e-3, warmup_ratio=0.0)

    def run(ckpt: str | None, interrupt: bool):
        student, train, val = planted_task(2)
        train, val = _dataset(train), _dataset(val)
        kw = dict(loss_fn=_soft, checkpoint_dir=ckpt and f"{ckpt}/search", checkpoint_every=3)
        if interrupt:
            with pytest.raises(_Stop):
                fj.search(student, sc, train, val, callback=_stop_at(4), **kw)
            student = planted_task(2)[0]  # a fresh process: the same model, resumed from step 3's checkpoint
        result = fj.search(student, sc, train, val, **kw)
        kw["checkpoint_dir"] = ckpt and f"{ckpt}/finetune"
        if interrupt:
            with pytest.raises(_Stop):
                fj.finetune(nnx.clone(student), train, ft, callback=_stop_at(5), **kw)
        fj.finetune(student, train, ft, **kw)
        return result, jax.tree.map(np.asarray, nnx.state(student, nnx.LoRAParam))

    want, want_lora = run(None, False)
    got, got_lora = run(str(tmp_path), True)
    assert [r["step"] for r in got.history] == [4, 5, 6]  # the resumed steps
    assert [r["val_loss"] for r in got.history] == [r["val_loss"] for r in want.history[3:]]
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, got.gates), jax.tree.map(np.asarray, want.gates)
    )
    jax.tree.map(np.testing.assert_array_equal, got_lora, want_lora)
    assert sorted(p.name for p in (tmp_path / "finetune").iterdir()) == ["3", "6"]


def test_fj_select_on_the_nnx_decoder_is_the_functional_selection():
    config = fj.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lora_config = fj.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    model = fj.nnx.LlamaForCausalLM(config, lora_config, gates="layer", rngs=nnx.Rngs(0))
    gates = fj.init_gates("layer", 4)
    gates = gates.replace(layer=jnp.asarray([0.5, -0.3, 0.2, -0.1]))
    got = fj.select(model, gates)
    assert got == fj.select_lora(gates, lora_config, 4) and got.layers == (0, 2)
