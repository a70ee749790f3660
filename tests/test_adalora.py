"""AdaLoRA's allocator against PEFT's RankAllocator step by step, the regulariser, bad configs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import flexora_jax as fj  # noqa: E402
from flexora_jax.adalora import (  # noqa: E402
    AdaLoraConfig,
    as_lora,
    export_adalora,
    init_allocator,
    orth_regularizer,
    to_lora,
    update_and_allocate,
)
from flexora_jax.adapters import export_peft, load_adalora, load_peft  # noqa: E402
from flexora_jax.config import module_path  # noqa: E402
from flexora_jax.engine import finetune_adalora  # noqa: E402
from flexora_jax.errors import CheckpointError, ConfigError  # noqa: E402

L, MODULES = 2, ("q_proj", "v_proj")
SCHEDULE = dict(
    init_r=4,
    target_r=2,
    tinit=1,
    tfinal=2,
    deltaT=2,
    total_step=10,
    beta1=0.85,
    beta2=0.9,
    orth_reg_weight=0.3,
    lora_alpha=8,
)


def _peft_model(save_to=None):
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=L,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.2,
    )
    model = transformers.LlamaForCausalLM(hf)
    if save_to is not None:
        model.save_pretrained(save_to)
    config = peft.AdaLoraConfig(target_modules=list(MODULES), init_lora_weights=False, **SCHEDULE)
    return peft.get_peft_model(model, config)


def _name(m: str, i: int, which: str) -> str:
    return f"base_model.model.{module_path(m, i)}.lora_{which}.default"


def _ours(named: dict, attr: str) -> dict:
    """Our stacked layout of PEFT's lora_A / lora_E / lora_B values (or grads)."""

    def get(m, i, w):
        return getattr(named[_name(m, i, w)], attr).detach().numpy()

    return {
        m: {
            "a": jnp.asarray(np.stack([get(m, i, "A").T for i in range(L)])),
            "e": jnp.asarray(np.stack([get(m, i, "E")[:, 0] for i in range(L)])),
            "b": jnp.asarray(np.stack([get(m, i, "B").T for i in range(L)])),
        }
        for m in MODULES
    }


def test_allocator_masks_equal_peft_step_by_step(tmp_path):
    pm = _peft_model(tmp_path / "base")
    named = dict(pm.named_parameters())
    config = AdaLoraConfig(**{k: v for k, v in SCHEDULE.items()}, target_modules=MODULES)
    state = None
    rng = torch.Generator().manual_seed(1)
    masked_steps = 0
    for step in range(SCHEDULE["total_step"]):
        with torch.no_grad():
            for n, p in named.items():
                if "lora_" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=rng))
                    p.grad = torch.randn(p.shape, generator=rng)
        weights, grads = _ours(named, "data"), _ours(named, "grad")
        state = init_allocator(weights) if state is None else state
        pm.base_model.update_and_allocate(step)
        state, weights = update_and_allocate(config, state, weights, grads, step, tuple(range(L)))
        after = _ours(named, "data")
        for m in MODULES:
            theirs = np.asarray(after[m]["e"])
            np.testing.assert_array_equal(np.asarray(weights[m]["e"]) == 0, theirs == 0, err_msg=f"step {step} {m}")
            np.testing.assert_allclose(np.asarray(weights[m]["e"]), theirs, rtol=1e-6)
        masked_steps += int(any(bool((np.asarray(weights[m]["e"]) == 0).any()) for m in MODULES))
    assert masked_steps >= 3  # masks were taken and kept
    kept = sum(int(np.asarray(state.mask[m]).sum()) for m in MODULES)
    assert kept == SCHEDULE["target_r"] * len(MODULES) * L

    # The allocated AdaLoRA as a rank-pruned LoRA: same logits here, and in PEFT from its LoRA export.
    model_config, params = fj.load_model(tmp_path / "base")
    lora = to_lora(model_config, config, weights, tuple(range(L)))
    tokens = np.random.default_rng(0).integers(0, 32, (2, 6))
    pm.eval()
    with torch.no_grad():
        expected = pm(input_ids=torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(fj.forward(model_config, params, tokens, lora=lora))
    assert np.abs(ours - np.asarray(fj.forward(model_config, params, tokens))).max() > 1e-2
    assert np.abs(ours - expected).max() < 1e-4
    export_peft(lora, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["rank_pattern"]
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "lora")).eval()(torch.tensor(tokens)).logits
    assert np.abs(theirs.numpy() - expected).max() < 1e-4
    export_adalora(config, weights, tuple(range(L)), L, tmp_path / "adalora")
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adalora")).eval()(torch.tensor(tokens)).logits
    assert np.abs(theirs.numpy() - expected).max() < 1e-4


def test_orth_regularizer_equals_peft():
    pm = _peft_model()
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 32, (2, 6)))
    total = pm.base_model(input_ids=tokens, labels=tokens).loss.item()  # AdaLoraModel.forward adds it
    plain = pm.base_model.model(input_ids=tokens, labels=tokens).loss.item()  # (not under no_grad, where PEFT's
    # in-place += on the loss does not show)
    ours = float(orth_regularizer(_ours(dict(pm.named_parameters()), "data"), tuple(range(L))))
    assert abs((total - plain) - SCHEDULE["orth_reg_weight"] * ours) < 1e-5


@pytest.mark.parametrize(
    "change,match",
    [
        ({"target_r": 5}, "target_r"),
        ({"total_step": None}, "total_step"),
        ({"tinit": 8}, "tinit"),
        ({"beta1": 1.0}, "beta1"),
    ],
)
def test_bad_config_is_named(change, match):
    with pytest.raises(ConfigError, match=match):
        AdaLoraConfig(**{**SCHEDULE, **change})


def test_finetune_allocates_the_target_budget_and_prunes_to_an_equal_lora(tmp_path):
    _peft_model(tmp_path / "base")
    model_config, params = fj.load_model(tmp_path / "base")
    config = AdaLoraConfig(**SCHEDULE, target_modules=MODULES)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (config.total_step * 4, 8)).astype(np.int32)
    data = {"input_ids": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones(tokens.shape, np.float32)}
    problem = fj.decoder_problem(model_config, params, fj.LoraConfig(r=2, target_modules=MODULES))
    found = finetune_adalora(problem, data, config, lr=1e-2, batch_size=4, progress=False)  # the one driver
    weights, losses = found.weights, [r["loss"] for r in found.history]
    assert np.isfinite(losses).all() and len(losses) == config.total_step
    assert sum(int((np.asarray(weights[m]["e"]) != 0).sum()) for m in MODULES) == config.target_r * len(MODULES) * L
    lora = to_lora(model_config, config, weights, tuple(range(L)))
    full = as_lora(model_config, config, weights, tuple(range(L)))
    np.testing.assert_allclose(
        np.asarray(fj.forward(model_config, params, tokens[:4], lora=lora)),
        np.asarray(fj.forward(model_config, params, tokens[:4], lora=full)),
        atol=1e-5,
    )


def test_adalora_method_runs_end_to_end_from_the_command(tmp_path):
    """``flexora-jax run --method=adalora``: PEFT's allocator in the fine-tune, the rank-pruned LoRA exported
    with rank_pattern (evaluated like any adapter) next to a PEFT AdaLoRA adapter; the budget ends at r."""
    import json

    from flexora_jax import cli

    out = tmp_path / "run"
    tiny = [
        "--finetune.max_steps=12",
        "--task.planted.num_layers=3",
        "--task.planted.n_train=64",
        "--task.planted.n_val=32",
        "--task.planted.n_test=32",
        "--task.planted.finetune_examples=32",
        "--checkpoint.every=0",
        "--eval.base=false",
        "--lora.r=4",
    ]
    assert cli.main(["run", "--quiet", "--output-dir", str(out), "--method=adalora", "--compare=[]", *tiny]) == 0
    selection = json.loads((out / "selection.json").read_text())
    ranks = selection["ranks"]
    assert len(ranks) == 2 * 3 and sum(ranks.values()) == 4 * 2 * 3  # target_r x matrices, as PEFT's budget
    assert (
        json.loads((out / "methods" / "adalora" / "adalora_adapter" / "adapter_config.json").read_text())["peft_type"]
        == "ADALORA"
    )
    assert json.loads((out / "eval.json").read_text())["planted"]["test_loss"] > 0


def _peft_logits(base_dir, adapter_dir, tokens) -> np.ndarray:
    fresh = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("allocated", [False, True], ids=["lambdas_zeroed", "allocator_rank_pattern"])
def test_peft_adalora_adapter_loads_as_adalora_and_as_pruned_lora(tmp_path, allocated):
    """A peft-made AdaLoRA adapter: random non-zero P / Lambda / Q with some Lambda pruned, either by hand
    (rank_pattern null, every init_r triplet saved) or by PEFT's allocator (its rank_pattern masks, only the
    kept triplets saved). Ours as AdaLoRA weights, rank-pruned through load_peft, and re-exported: PEFT's logits."""
    pm = _peft_model(tmp_path / "base")
    named = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    rng = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in named.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=rng))
        if not allocated:
            named[_name("q_proj", 0, "E")][1] = 0.0
            named[_name("v_proj", 1, "E")][[0, 3]] = 0.0
    if allocated:
        for step in range(SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1):
            for p in named.values():
                p.grad = torch.randn(p.shape, generator=rng)
            pm.base_model.update_and_allocate(step)
    pm.save_pretrained(tmp_path / "ada")
    saved = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and (saved["rank_pattern"] is not None) == allocated
    tokens = np.random.default_rng(3).integers(0, 32, (2, 6))
    theirs = _peft_logits(tmp_path / "base", tmp_path / "ada", tokens)

    model_config, params = fj.load_model(tmp_path / "base")
    ada, weights, layers = load_adalora(tmp_path / "ada", model_config)
    assert (ada.init_r, ada.target_r, ada.beta2, ada.total_step, layers) == (4, 2, 0.9, 10, (0, 1))
    pruned = sum(int((np.asarray(weights[m]["e"]) == 0).sum()) for m in MODULES)
    if allocated:  # the final mask keeps target_r x matrices (a kept triplet masked earlier may hold Lambda = 0)
        assert sum(sum(mask) for mask in saved["rank_pattern"].values()) == 2 * len(MODULES) * L
    assert pruned == 3 if not allocated else pruned >= (4 - 2) * len(MODULES) * L
    base = np.asarray(fj.forward(model_config, params, tokens))
    full = np.asarray(fj.forward(model_config, params, tokens, lora=as_lora(model_config, ada, weights, layers)))
    assert np.abs(full - base).max() > 1e-2
    np.testing.assert_allclose(full, theirs, atol=1e-4, rtol=0)
    lora = load_peft(tmp_path / "ada", model_config)  # rank-pruned as LoRA
    assert sum(sum(lora.spec.rank_of(m)) for m in lora.spec.targets) == 4 * len(MODULES) * L - pruned
    np.testing.assert_allclose(
        np.asarray(fj.forward(model_config, params, tokens, lora=lora)), theirs, atol=1e-4, rtol=0
    )
    export_adalora(ada, weights, layers, L, tmp_path / "again")
    np.testing.assert_allclose(_peft_logits(tmp_path / "base", tmp_path / "again", tokens), theirs, atol=1e-4, rtol=0)


def test_bad_adalora_adapters_are_named(tmp_path):
    _peft_model(tmp_path / "base")
    model_config, _ = fj.load_model(tmp_path / "base")
    weights = {
        m: {"a": jnp.ones((L, 16, 4)), "e": jnp.ones((L, 4)), "b": jnp.ones((L, 4, 8 if m != "q_proj" else 16))}
        for m in MODULES
    }
    config = AdaLoraConfig(**SCHEDULE, target_modules=MODULES)
    out = export_adalora(config, weights, (0, 1), L, tmp_path / "ada")
    path = out / "adapter_config.json"
    good = json.loads(path.read_text())
    for change, match in (
        ({"beta1": 1.5}, "beta1"),
        ({"bias": "all"}, "bias"),
        ({"magic": 1}, "magic"),
        ({"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True]}}, "kept mask"),
        ({"use_dora": True}, "DoRA"),
    ):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError, match=match):
            load_peft(out, model_config)
    path.write_text(json.dumps({**good, "init_r": 3}))
    with pytest.raises(CheckpointError, match=r"lora_A has shape \(4, 16\), expected \(3, 16\)"):
        load_adalora(out, model_config)
    path.write_text(json.dumps({**good, "peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="not an AdaLoRA adapter"):
        load_adalora(out, model_config)
