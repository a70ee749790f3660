"""``LoraConfig.from_peft``: a PEFT LoRA config (object, ``to_dict()``, ``adapter_config.json``) in whole.

The oracle is :func:`load_peft` on the adapter PEFT itself saved from the same config (whose logits
``tests/test_adapters.py`` checks against PEFT's): every (module, block) gets the same rank and scale.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import flexora_jax as fj  # noqa: E402
from flexora_jax.adapters import load_peft  # noqa: E402
from flexora_jax.config import ALL_MODULES  # noqa: E402
from flexora_jax.errors import ConfigError  # noqa: E402

L = 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(hf model directory, our ModelConfig) of a tiny random LLaMA with a non-square MLP."""
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    directory = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(hf).save_pretrained(directory)
    return directory, fj.load_model_config(directory)


def _layout(cfg: fj.LoraConfig) -> dict[tuple[str, int], tuple[int, float]]:
    """(module, block) -> (rank, scale) of every adapted pair."""
    out = {}
    for m in cfg.target_modules:
        for i in cfg.layers(L):
            if cfg.rank_for(m, i):
                out[(m, i)] = (cfg.rank_for(m, i), round(cfg.scale_for(m, i), 9))
    return out


CASES = {
    "names_layers_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[0, 2],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 5},
        use_dora=True,
    ),
    "paths_escape_layers": dict(
        r=3,
        lora_alpha=6,
        layers_to_transform=[1],
        target_modules=["model.layers.0.self_attn.q_proj", "layers.2.mlp.up_proj", "self_attn.k_proj", "mlp.gate_proj"],
        rank_pattern={"model.layers.1.mlp.gate_proj": 5},
    ),
    "all_linear_exclude_overlap": dict(
        r=2,
        lora_alpha=4,
        target_modules="all-linear",
        use_rslora=True,
        exclude_modules=["o_proj", "model.layers.1.mlp.gate_proj"],
        # PEFT: the first matching key wins; the path key never does
        rank_pattern={"mlp.up_proj": 3, "model.layers.2.mlp.up_proj": 6, "q_proj": 5},
        alpha_pattern={"layers.0.self_attn.q_proj": 7},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_peft_means_what_peft_saves(base, tmp_path, case):
    model_dir, config = base
    pc = peft.LoraConfig(task_type="CAUSAL_LM", bias="none", modules_to_save=None, **CASES[case])
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir)
    peft.get_peft_model(hf, pc).save_pretrained(tmp_path)
    expected = _layout(load_peft(tmp_path, config).spec.config)
    assert len(expected) > 2
    from_dir = fj.LoraConfig.from_peft(tmp_path)
    assert _layout(from_dir) == expected
    assert fj.LoraConfig.from_peft(tmp_path / "adapter_config.json") == from_dir
    assert _layout(fj.LoraConfig.from_peft(pc)) == expected  # the object: the same fields in PEFT's order
    assert _layout(fj.LoraConfig.from_peft(pc.to_dict())) == expected
    assert from_dir.use_dora == CASES[case].get("use_dora", False)
    assert from_dir.use_rslora == CASES[case].get("use_rslora", False)
    fj.make_spec(config, from_dir)  # a usable training config for this model


def _dict(**changes):
    d = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]).to_dict()
    d.update(changes)
    return d


def test_defaults_of_peft_are_ours():
    cfg = fj.LoraConfig.from_peft(peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    assert cfg == fj.LoraConfig(r=8, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    assert fj.LoraConfig.from_peft(_dict(target_modules="all-linear")).target_modules == ALL_MODULES


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_magic": 1}, "lora_magic"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"task_type": "SEQ_CLS"}, "task_type"),
        ({"peft_type": "ADALORA"}, "not a LoRA config"),
        ({"target_modules": r".*\.q_proj"}, "regex"),
        ({"target_modules": ["q_proj", "c_attn"]}, "c_attn"),
        ({"rank_pattern": {"^model.*": 2}}, "rank_pattern"),
        ({"layers_pattern": "h", "layers_to_transform": [0]}, "layers_pattern"),
        ({"r": 0}, "r must"),
        ({"exclude_modules": ["q_proj", "v_proj"]}, "adapts no module"),
    ],
)
def test_values_we_do_not_compute_are_refused_by_name(changes, match):
    with pytest.raises(ConfigError, match=match):
        fj.LoraConfig.from_peft(_dict(**changes))


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        fj.LoraConfig.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        fj.LoraConfig.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(_dict(bias="lora_only"), default=sorted))
    with pytest.raises(ConfigError, match=r"adapter_config\.json: bias='lora_only'"):
        fj.LoraConfig.from_peft(tmp_path)
    with pytest.raises(ConfigError, match="expected a peft.LoraConfig"):
        fj.LoraConfig.from_peft(3)
