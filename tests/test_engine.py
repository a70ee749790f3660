"""One engine: the built-in decoder (as a functional problem and as ``fj.nnx.LlamaForCausalLM``) and a foreign
Flax NNX model go through the same driver, with the same features: checkpoints with bit-identical resume, a
checkpoint refused for another run, validation and keep-best, metric writers, AdaLoRA, one signature each."""

from __future__ import annotations

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_nnx_foreign import BLOCK_INDEX, ForeignLM

import flexora_jax as fj
from flexora_jax.adalora import AdaLoraConfig
from flexora_jax.engine import finetune_adalora
from flexora_jax.hooks import JsonlLogger

CONFIG = fj.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LORA = fj.LoraConfig(r=2, lora_alpha=4.0)
KINDS = ("decoder", "nnx_decoder", "foreign")
SEARCH = fj.SearchConfig(
    hypergradient="unrolled", inner_steps=2, steps=4, batch_size=4, val_batch_size=4, outer_lr=0.05
)
FINETUNE = fj.FinetuneConfig(max_steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.0)


def make(kind: str):
    """A fresh model of ``kind`` (the same values every call): what a new process would rebuild."""
    params = fj.init_params(CONFIG, jax.random.key(0), head_std=0.5)
    if kind == "decoder":
        return fj.decoder_problem(CONFIG, params, LORA, seed=1)
    if kind == "nnx_decoder":
        return fj.nnx.LlamaForCausalLM(CONFIG, LORA, gates="layer", rngs=nnx.Rngs(1), params=params)
    model = ForeignLM(3, rngs=nnx.Rngs(0), head_std=0.5)
    return fj.nnx.add_lora(
        model, ("q", "v"), rank=2, alpha=4.0, gates="layer", layer_index=BLOCK_INDEX, rngs=nnx.Rngs(1)
    )


def data(seed: int, n: int = 24) -> dict:
    tokens = np.random.default_rng(seed).integers(0, 64, (n, 16)).astype(np.int32)
    return {"input_ids": tokens, "loss_mask": np.ones(tokens.shape, np.float32)}


TRAIN, VAL = data(0), data(1)


def lora_of(result) -> list[np.ndarray]:
    """The trained LoRA arrays of what the engine returned (an NNX model, or the decoder's LoraParams)."""
    if isinstance(result, nnx.Module):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(result, nnx.LoRAParam))]
    return [np.asarray(x) for x in jax.tree.leaves(result.weights)]


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def callback(i: int, record: dict) -> None:
        if i == step:
            raise _Stop

    return callback


@pytest.mark.parametrize("kind", KINDS)
def test_search_and_finetune_resume_bit_identically_on_every_face(kind, tmp_path):
    """Every face: an interrupted search and fine-tune resume from their checkpoints (a fresh model, as in a
    new process) and end bitwise where uninterrupted ones end; the run log hook writes every step once."""

    def run(ckpt, interrupt: bool):
        model = make(kind)
        kw = dict(checkpoint_dir=ckpt and ckpt / "search", checkpoint_every=2)
        if interrupt:
            with pytest.raises(_Stop):
                fj.search(model, SEARCH, TRAIN, VAL, callback=_stop_at(3), **kw)
            model = make(kind)
        log = JsonlLogger(tmp_path / f"{interrupt}.jsonl")
        found = fj.search(model, SEARCH, TRAIN, VAL, hooks=[log], **kw)
        tuned = make(kind) if kind == "decoder" else model
        kw["checkpoint_dir"] = ckpt and ckpt / "finetune"
        if interrupt:
            with pytest.raises(_Stop):
                fj.finetune(tuned, TRAIN, FINETUNE, callback=_stop_at(3), **kw)
            tuned = make(kind) if kind == "decoder" else tuned
        result, history = fj.finetune(tuned, TRAIN, FINETUNE, **kw)
        return found, result, history, log.records()

    want, want_result, want_history, _ = run(None, False)
    got, got_result, got_history, records = run(tmp_path, True)
    assert [r["step"] for r in got.history] == [3, 4] and [r["step"] for r in got_history] == [3, 4]
    assert [r["step"] for r in records] == [3, 4] and all("val_loss" in r for r in records)
    np.testing.assert_array_equal(np.asarray(got.gates.layer), np.asarray(want.gates.layer))
    assert got.selection == want.selection and len(want.trajectory) == 4
    assert [r["loss"] for r in got_history] == [r["loss"] for r in want_history[2:]]
    for a, b in zip(lora_of(got_result), lora_of(want_result)):
        np.testing.assert_array_equal(a, b)
    if kind != "decoder":  # the searched gates were written into the model as multipliers
        gate = [np.asarray(v) for v in jax.tree.leaves(nnx.state(got_result, fj.nnx.Gate))]
        assert gate and np.all(np.concatenate([np.ravel(g) for g in gate]) > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(kind, tmp_path):
    with pytest.raises(_Stop):
        fj.search(make(kind), SEARCH, TRAIN, VAL, checkpoint_dir=tmp_path, checkpoint_every=2, callback=_stop_at(3))
    other = fj.SearchConfig(**{**SEARCH.__dict__, "inner_lr": 1e-2})
    with pytest.raises(fj.CheckpointError, match="inner_lr"):
        fj.search(make(kind), other, TRAIN, VAL, checkpoint_dir=tmp_path)
    with pytest.raises(fj.CheckpointError, match="train"):  # other data
        fj.search(make(kind), SEARCH, data(5), VAL, checkpoint_dir=tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_validation_and_keep_best_on_every_face(kind):
    cfg = fj.FinetuneConfig(max_steps=4, batch_size=4, lr=5e-2, warmup_ratio=0.0, eval_every=2, keep_best=True)
    result, history = fj.finetune(make(kind), TRAIN, cfg, val=VAL)
    logged = [r["val_loss"] for r in history if "val_loss" in r]
    assert [r["step"] for r in history if "val_loss" in r] == [2, 4] and len(logged) == 2
    problem = (
        result.lora_problem()
        if isinstance(result, fj.nnx.LlamaForCausalLM)
        else (
            fj.nnx.problem(result)
            if isinstance(result, nnx.Module)
            else fj.decoder_problem(CONFIG, fj.init_params(CONFIG, jax.random.key(0), head_std=0.5), result)
        )
    )
    got = fj.hooks.dataset_mean(problem.loss, problem.count, problem.base, problem.lora, None, VAL)
    np.testing.assert_allclose(got, min(logged), rtol=1e-5)  # the returned LoRA is the best one


@pytest.mark.parametrize("kind", ("decoder", "nnx_decoder"))
def test_adalora_runs_through_the_driver_and_resumes(kind, tmp_path):
    ada = AdaLoraConfig(target_r=1, init_r=2, tinit=1, tfinal=1, deltaT=1, total_step=5, lora_alpha=4.0)

    def run(ckpt, interrupt):
        if interrupt:
            with pytest.raises(_Stop):
                finetune_adalora(
                    make(kind), TRAIN, ada, batch_size=4, checkpoint_dir=ckpt, checkpoint_every=2, callback=_stop_at(3)
                )
        return finetune_adalora(make(kind), TRAIN, ada, batch_size=4, checkpoint_dir=ckpt, checkpoint_every=2)

    want, got = run(None, False), run(tmp_path, True)
    jax.tree.map(np.testing.assert_array_equal, got.weights, want.weights)
    ranks = [r for m in got.lora.spec.targets for r in got.lora.spec.rank_of(m)]
    assert sum(ranks) == ada.target_r * 2 * 3  # the final budget: target_r x adapted matrices
    if kind == "nnx_decoder":  # the rank-pruned LoRA was written into the module
        assert got.result.lora_config == got.lora.spec.config


def test_one_signature_per_entry_point_and_clear_errors_for_the_old_forms():
    for fn in (fj.search, fj.finetune, fj.select):
        assert next(iter(inspect.signature(fn).parameters)) == "model"
    assert "model" in (fj.search.__doc__ or "") and not hasattr(fj.search, "register")
    params = fj.init_params(CONFIG, jax.random.key(0))
    with pytest.raises(fj.ConfigError, match="decoder_problem"):
        fj.search(CONFIG, params, LORA, SEARCH, TRAIN, VAL)
    with pytest.raises(fj.ConfigError, match="model first"):
        fj.select(fj.init_gates("layer", 3), LORA, 3)
    with pytest.raises(fj.ConfigError, match="FinetuneConfig"):
        fj.finetune(make("foreign"), TRAIN, {"max_steps": 2})
    with pytest.raises(fj.ConfigError, match="optax.GradientTransformation"):
        fj.finetune(make("foreign"), TRAIN, FINETUNE, optimizer="lion")
    with pytest.raises(fj.ConfigError, match="loss_fn"):
        fj.search(make("decoder"), SEARCH, TRAIN, VAL, loss_fn=lambda m, b: 0.0)
    # the NNX face's names from before the one engine point at their replacements (as numpy's removed aliases do)
    for name, new in [
        ("search_nnx", "fj.search"),
        ("finetune_nnx", "fj.finetune"),
        ("select_nnx", "fj.select"),
        ("Selection", "fj.Selection"),
        ("NNXSearchResult", "fj.SearchResult"),
        ("NNXTrainState", "fj.TrainState"),
        ("make_search_step", "make_split_search_step"),
    ]:
        with pytest.raises(AttributeError, match=new):
            getattr(fj.nnx, name)
    with pytest.raises(AttributeError, match="fj.finetune_adalora"):
        fj.adalora.finetune_adalora  # noqa: B018
    assert not hasattr(fj.nnx, "no_such_name") and fj.finetune_adalora is finetune_adalora


@pytest.mark.parametrize(
    "bad, words",
    [
        ({**TRAIN, "input_ids": TRAIN["input_ids"].astype(np.float32)}, ["input_ids", "integer"]),
        ({**TRAIN, "input_ids": TRAIN["input_ids"][0]}, ["input_ids"]),
        ({**TRAIN, "input_ids": np.where(TRAIN["input_ids"] == 3, 64, TRAIN["input_ids"])}, ["input_ids", "64"]),
        ({**TRAIN, "input_ids": np.where(TRAIN["input_ids"] == 3, -1, TRAIN["input_ids"])}, ["input_ids", "-1"]),
        ({"input_ids": TRAIN["input_ids"]}, ["loss_mask"]),
    ],
)
def test_bad_data_is_refused_before_the_first_step(bad, words):
    """Wrong dtype / rank, token ids outside the decoder's vocabulary (not blamed on the learning rate later),
    a missing loss_mask for the default loss: a DataError naming the field, before anything compiles."""
    with pytest.raises(fj.DataError) as info:
        fj.search(make("decoder"), SEARCH, bad, VAL)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_a_loss_fn_must_return_a_scalar_and_a_model_must_have_lora():
    with pytest.raises(fj.ConfigError, match="scalar"):
        fj.finetune(make("foreign"), TRAIN, FINETUNE, loss_fn=lambda model, batch: model(batch["input_ids"]).mean(-1))
    with pytest.raises(fj.ConfigError, match="LoRA"):
        fj.finetune(ForeignLM(3, rngs=nnx.Rngs(0)), TRAIN, FINETUNE)
    with pytest.raises(fj.ConfigError, match="LoRA"):
        fj.finetune(fj.nnx.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)), TRAIN, FINETUNE)


def test_any_optax_transformation_and_a_custom_loss_without_loss_mask():
    """An optax transformation (or a factory of one) as the inner and fine-tune optimizer; a custom loss reads
    only what it needs (no ``loss_mask`` in the data)."""

    def loss(model, batch):
        return jnp.mean(jax.nn.logsumexp(model(batch["input_ids"]), -1))

    ids = {"input_ids": TRAIN["input_ids"]}
    model = make("foreign")
    found = fj.search(
        model,
        SEARCH,
        ids,
        ids,
        loss_fn=loss,
        optimizer=lambda steps: optax.adamw(optax.cosine_decay_schedule(3e-3, steps), eps_root=1e-16),
    )
    assert len(found.history) == 4 and all(np.isfinite(r["val_loss"]) for r in found.history)
    before = lora_of(model)
    _, history = fj.finetune(model, ids, FINETUNE, loss_fn=loss, optimizer=optax.lion(1e-3))
    assert len(history) == 4 and np.isfinite([r["loss"] for r in history]).all()
    assert all(np.abs(a - b).max() > 0 for a, b in zip(lora_of(model), before))  # lion moved every LoRA array
    with pytest.raises(fj.ConfigError, match="eps_root"):  # differentiated through: the probe still applies
        fj.search(model, SEARCH, ids, ids, loss_fn=loss, optimizer=optax.adam(1e-3))
    json.dumps(found.history)  # plain floats


@pytest.mark.parametrize("kind", ("decoder", "nnx_decoder"))
def test_a_mesh_run_ends_where_one_device_ends_on_the_decoder_faces(kind):
    """fj.search and fj.finetune with ``mesh=`` (data x fsdp x model) on the functional decoder and on
    fj.nnx.LlamaForCausalLM end where the one-device runs end (the foreign model's mesh test is in
    test_nnx_search.py): gates, selection, fine-tuned LoRA (1e-5 absolute: Adam normalises near-zero gradients)."""

    def run(mesh):
        model = make(kind)
        found = fj.search(model, SEARCH, TRAIN, VAL, mesh=mesh)
        tuned = make(kind) if kind == "decoder" else model  # the NNX model holds the searched LoRA and gates
        result, history = fj.finetune(tuned, TRAIN, FINETUNE, mesh=mesh)
        return found, lora_of(result), [r["loss"] for r in history]

    want, got = run(None), run(fj.sharding.make_mesh((2, 2, 2)))
    np.testing.assert_allclose(np.asarray(got[0].gates.layer), np.asarray(want[0].gates.layer), rtol=1e-5)
    assert got[0].selection == want[0].selection
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_adalora_on_a_mesh_ends_where_one_device_ends():
    """The AdaLoRA fine-tune through the driver on a (2, 2, 2) mesh: the same pruned ranks and weights."""
    ada = AdaLoraConfig(target_r=1, init_r=2, tinit=1, tfinal=1, deltaT=1, total_step=4, lora_alpha=4.0)
    want = finetune_adalora(make("decoder"), TRAIN, ada, batch_size=4)
    got = finetune_adalora(make("decoder"), TRAIN, ada, batch_size=4, mesh=fj.sharding.make_mesh((2, 2, 2)))
    assert got.lora.spec == want.lora.spec
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got.weights, want.weights)


def test_lora_dropout_with_a_custom_loss_is_refused_on_the_nnx_decoder():
    """LlamaForCausalLM's dropout lives in the decoder's own loss: a custom loss_fn would silently train
    without it, so the problem is refused naming both, before anything runs."""
    model = fj.nnx.LlamaForCausalLM(
        CONFIG, fj.LoraConfig(r=2, lora_alpha=4.0, lora_dropout=0.1), gates="layer", rngs=nnx.Rngs(1)
    )
    assert model.lora_problem().dropout  # the own loss keeps it
    with pytest.raises(fj.ConfigError, match="lora_dropout=0.1.*loss_fn"):
        fj.finetune(model, TRAIN, FINETUNE, loss_fn=fj.nnx.causal_lm)
