"""PEFT interop against real PEFT: export here -> PeftModel, PeftModel -> load here, merged export.

The oracle is ``transformers`` + ``peft`` on a tiny random GQA LLaMA whose MLP is non-square, so a
transposed or mis-routed tensor cannot pass; every LoRA has non-zero B.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import flexora_jax as fj  # noqa: E402
from flexora_jax.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_merged, export_peft, load_peft  # noqa: E402
from flexora_jax.config import module_path  # noqa: E402
from flexora_jax.errors import CheckpointError, ConfigError  # noqa: E402
from flexora_jax.gates import Gates  # noqa: E402

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 7))
_forward = jax.jit(fj.forward, static_argnums=0)


def _hf_config(**overrides) -> transformers.LlamaConfig:
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(hf_model, model_dir, config, params) of a tiny random LLaMA saved and loaded back."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_hf_config()).eval()
    directory = tmp_path_factory.mktemp("base")
    model.save_pretrained(directory)
    config, params = fj.load_model(directory)
    return model, directory, config, params


def _peft_logits(model_dir: Path, adapter_dir: Path) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(torch.tensor(TOKENS)).logits.numpy()


def _logits(config, params, lora=None, gates=None) -> np.ndarray:
    return np.asarray(_forward(config, params, TOKENS, lora=lora, gates=gates))


def _assert_changes_base(config, params, lora_logits) -> None:
    """The adapter must move the logits far beyond the tolerance, or equality proves nothing."""
    assert np.abs(lora_logits - _logits(config, params)).max() > 100 * TOL


EXPORT_CASES = {
    "rank_and_alpha_pattern": fj.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "k_proj": 3},
        alpha_pattern={"down_proj": 5.0},
        init_lora_weights=False,
    ),
    "layers_to_transform": fj.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=("q_proj", "gate_proj", "up_proj"),
        layers_to_transform=(0, 2),
        init_lora_weights=False,
    ),
    "mixed_rank_zero_rslora": fj.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=("v_proj", "down_proj"),
        use_rslora=True,
        rank_pattern={"model.layers.0.self_attn.v_proj": 0, "model.layers.2.mlp.down_proj": 2},
        init_lora_weights=False,
    ),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_in_peft_with_same_logits(base, tmp_path, case):
    model, model_dir, config, params = base
    lora = fj.init_lora(config, EXPORT_CASES[case], jax.random.key(1))
    ours = _logits(config, params, lora)
    _assert_changes_base(config, params, ours)
    export_peft(lora, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    np.testing.assert_allclose(_peft_logits(model_dir, tmp_path), ours, atol=TOL, rtol=0)

    # Exported tensors carry the true ranks in PEFT's torch layouts.
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    for m in lora.spec.targets:
        d_in, d_out = config.module_shape(m)
        for layer, rank in enumerate(lora.spec.rank_of(m)):
            key = f"base_model.model.{module_path(m, layer)}"
            if rank == 0:
                assert f"{key}.lora_A.weight" not in tensors
                continue
            assert tensors[f"{key}.lora_A.weight"].shape == (rank, d_in)
            assert tensors[f"{key}.lora_B.weight"].shape == (d_out, rank)


def test_mixed_selection_is_written_as_module_paths(base, tmp_path):
    _, _, config, _ = base
    lora = fj.init_lora(config, EXPORT_CASES["mixed_rank_zero_rslora"], jax.random.key(1))
    export_peft(lora, tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert "model.layers.0.self_attn.v_proj" not in cfg["target_modules"]
    assert "model.layers.0.mlp.down_proj" in cfg["target_modules"]
    assert cfg["rank_pattern"] == {"model.layers.2.mlp.down_proj": 2}
    assert cfg["layers_to_transform"] is None


def test_export_roundtrip_is_exact(base, tmp_path):
    _, _, config, params = base
    lora = fj.init_lora(config, EXPORT_CASES["rank_and_alpha_pattern"], jax.random.key(2))
    export_peft(lora, tmp_path)
    back = load_peft(tmp_path, config)
    assert back.spec.ranks == lora.spec.ranks
    for (m, s), (m2, s2) in zip(back.spec.scales, lora.spec.scales):
        assert m == m2 and np.allclose(s, s2, rtol=1e-9)
    for m in lora.spec.targets:
        for k in ("a", "b"):
            np.testing.assert_array_equal(back.weights[m][k], lora.weights[m][k])


def test_gated_export_folds_gates(base, tmp_path):
    model, model_dir, config, params = base
    lora = fj.init_lora(config, EXPORT_CASES["rank_and_alpha_pattern"], jax.random.key(3))
    L = config.num_hidden_layers
    rng = np.random.default_rng(3)
    gates = Gates(
        layer=jax.numpy.asarray(rng.normal(size=L), jax.numpy.float32),
        rank={
            m: jax.numpy.asarray(rng.normal(size=(L, lora.spec.r_max_of(m))), jax.numpy.float32)
            for m in lora.spec.targets
        },
        power=3,
    )
    ours = _logits(config, params, lora, gates)
    assert np.abs(ours - _logits(config, params, lora)).max() > 100 * TOL
    export_peft(lora, tmp_path, gates=gates)
    np.testing.assert_allclose(_peft_logits(model_dir, tmp_path), ours, atol=TOL, rtol=0)


PEFT_CASES = {
    "rank_alpha_layers": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        layers_to_transform=[0, 2],
        alpha_pattern={"v_proj": 3},
        # PEFT: the first matching key wins, not the longest (up_proj: 3 in layer 2 too).
        # save_pretrained sorts the keys, so only a sorted overlap survives a reload.
        rank_pattern={"mlp.up_proj": 3, "model.layers.2.mlp.up_proj": 6, "q_proj": 2},
    ),
    "regex_rslora": dict(
        r=5,
        lora_alpha=7,
        target_modules=r".*\.(k_proj|gate_proj)",
        use_rslora=True,
        exclude_modules=["model.layers.1.mlp.gate_proj"],
    ),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear", rank_pattern={"^model.layers.1.*": 3}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_loads_here_with_same_logits(base, tmp_path, case):
    model, model_dir, config, params = base
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **PEFT_CASES[case])
    ).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(TOKENS)).logits.numpy()
    peft_model.save_pretrained(tmp_path)
    lora = load_peft(tmp_path, config)
    if case == "rank_alpha_layers":
        assert lora.spec.rank_of("up_proj") == (3, 0, 3) and lora.spec.rank_of("q_proj") == (2, 0, 2)
    ours = _logits(config, params, lora)
    _assert_changes_base(config, params, ours)
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_bf16_adapter_is_read_as_fp32(base, tmp_path):
    from safetensors.torch import load_file, save_file

    config = base[2]
    lora = fj.init_lora(config, EXPORT_CASES["layers_to_transform"], jax.random.key(6))
    export_peft(lora, tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    back = load_peft(tmp_path, config)
    for m in lora.spec.targets:
        assert back.weights[m]["a"].dtype == jax.numpy.float32
        np.testing.assert_allclose(back.weights[m]["a"], lora.weights[m]["a"], atol=1e-2)


def test_merged_export_loads_in_transformers(base, tmp_path):
    _, _, config, params = base
    lora = fj.init_lora(config, EXPORT_CASES["layers_to_transform"], jax.random.key(4))
    ours = _logits(config, params, lora)
    export_merged(config, params, lora, tmp_path)
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = merged(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture()
def exported(base, tmp_path):
    _, _, config, _ = base
    lora = fj.init_lora(config, EXPORT_CASES["rank_and_alpha_pattern"], jax.random.key(5))
    export_peft(lora, tmp_path)
    return tmp_path


def _edit_config(directory: Path, **changes) -> None:
    path = directory / ADAPTER_CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_mismatched_base_shapes_name_key_and_shapes(base, exported):
    _, _, config, _ = base
    import dataclasses

    wider = dataclasses.replace(config, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"down_proj\.lora_A\.weight has shape \(4, 96\), expected \(4, 128\)"):
        load_peft(exported, wider)
    deeper = dataclasses.replace(config, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.3\."):
        load_peft(exported, deeper)
    shallower = dataclasses.replace(config, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*layers\.2\."):
        load_peft(exported, shallower)


def test_unknown_field_is_named(base, exported):
    _edit_config(exported, lora_magic=1)
    with pytest.raises(ConfigError, match="lora_magic"):
        load_peft(exported, base[2])


@pytest.mark.parametrize(
    "field,value",
    [
        ("use_dora", "yes"),
        ("bias", "all"),
        ("fan_in_fan_out", True),
        ("modules_to_save", ["lm_head"]),
        ("lora_bias", True),
        ("init_lora_weights", "pissa"),
        ("peft_type", "IA3"),
        ("target_modules", ["q_proj", "c_attn"]),
        ("target_modules", ["lm_head"]),
    ],
)
def test_function_changing_settings_are_refused(base, exported, field, value):
    _edit_config(exported, **{field: value})
    with pytest.raises(ConfigError, match=field if field != "target_modules" else value[-1]):
        load_peft(exported, base[2])


def test_dora_flag_without_magnitudes_names_the_tensor(base, exported):
    _edit_config(exported, use_dora=True)
    with pytest.raises(CheckpointError, match="lora_magnitude_vector"):
        load_peft(exported, base[2])


def test_harmless_peft_metadata_is_accepted(base, exported):
    _edit_config(
        exported,
        base_model_name_or_path="meta-llama/x",
        peft_version="0.21.2",
        inference_mode=False,
        megatron_core="megatron.core",
        loftq_config={},
        auto_mapping=None,
        use_dora=False,
        modules_to_save=[],
        init_lora_weights="gaussian",
    )
    load_peft(exported, base[2])


def test_missing_key_and_rank_mismatch_are_named(base, exported):
    from safetensors.numpy import load_file, save_file

    config = base[2]
    path = exported / ADAPTER_WEIGHTS
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, path)
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.self_attn\.q_proj\.lora_B\.weight"):
        load_peft(exported, config)
    save_file({**tensors, key: np.zeros((64, 3), np.float32)}, path)
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_B\.weight has rank 3 .*rank 2"):
        load_peft(exported, config)


def test_missing_files_are_named(base, tmp_path):
    with pytest.raises(CheckpointError, match=ADAPTER_CONFIG):
        load_peft(tmp_path, base[2])
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing.*pickle"):
        load_peft(tmp_path, base[2])


def test_unwritable_export_names_path_and_reason(base, tmp_path):
    config = base[2]
    lora = fj.init_lora(config, EXPORT_CASES["layers_to_transform"], jax.random.key(7))
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the adapter directory belongs")
    with pytest.raises(CheckpointError, match=r"could not write the adapter to .*taken.*: File exists"):
        export_peft(lora, blocker)
    with pytest.raises(CheckpointError, match=r"could not write the adapter to .*taken/adapter: Not a directory"):
        export_peft(lora, blocker / "adapter")
