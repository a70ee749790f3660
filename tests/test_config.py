"""RunConfig: YAML + dotted overrides through draccus, key / type / range errors, every file in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexora_jax.pipeline.config import METHODS, RunConfig, config_to_dict, load_config, save_config
from flexora_jax.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_required_keys_exist_under_their_names():
    c = load_config(overrides=["--model.path=/m", "--task.name=piqa", "--method=lora", "--seed=3", "--lora.r=8",
                               "--search.inner_steps=2", "--search.hypergradient=first_order",
                               "--finetune.epochs=2", "--output_dir=/tmp/x"])
    assert (c.model.path, c.task.name, c.method, c.seed, c.lora.r) == ("/m", "piqa", "lora", 3, 8)
    assert (c.search.inner_steps, c.search.hypergradient, c.finetune.epochs, c.output_dir) == (
        2, "first_order", 2.0, "/tmp/x")


def test_defaults_are_the_embedded_planted_demo():
    c = load_config()
    assert c == RunConfig()
    assert c.task.name == "planted" and c.methods == ("flexora", "lora")
    assert (c.lora.r, c.lora.lora_alpha, c.search.hypergradient, c.search.inner_steps) == (4, 4.0, "unrolled", 4)


def test_yaml_then_overrides_and_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 5\ncompare: [lora, random_k]\nlora: {r: 2, rank_pattern: {q_proj: 1}}\n")
    c = load_config(f, ["--seed=7", "--lora.target_modules=[q_proj,k_proj]"])
    assert c.seed == 7 and c.compare == ("lora", "random_k") and c.lora.r == 2
    assert dict(c.lora.rank_pattern) == {"q_proj": 1} and c.lora.target_modules == ("q_proj", "k_proj")
    save_config(c, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == c


@pytest.mark.parametrize("override, needle", [
    (["--lora.rr=3"], "'lora.rr' (did you mean 'lora.r'?)"),
    (["--nope=1"], "allowed keys: ['baseline_k'"),
    (["--seed=abc"], "seed"),
    (["--search.steps=1.5"], "search.steps"),
    (["--search.hypergradient=foo"], "'unrolled', 'first_order'"),
    (["--method=bogus"], "method must be one of"),
    (["--compare=[lora,xyz]"], "unknown method(s) ['xyz']"),
    (["--task.planted.n_trian=3"], "task.planted.n_train"),
    (["--task.planted.modules=[q_proj,mlp]"], "task.planted.modules must name modules"),
    (["--task.planted.layer_kl=0"], "task.planted.layer_kl must be a KL > 0"),
    (["--task.planted.ranks={k_proj: 2}"], "task.planted.ranks maps planted modules (['q_proj', 'v_proj'])"),
    (["--task.name=piqa"], "model.path"),
    (["seed=3"], "--section.key=value"),
])
def test_errors_name_the_key_and_what_is_allowed(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=override)
    assert needle in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 8\n  rank: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'lora.rank'.*allowed keys under 'lora'"):
        load_config(bad)
    bad.write_text("lora: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load: no Python objects
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_parses_and_validates(path):
    c = load_config(path)
    assert c.method in METHODS and all(m in METHODS for m in c.compare)
    if c.task.name != "planted":
        from flexora_jax.tasks import get_task

        get_task(c.task.name)  # a registered task
        assert c.model.path or c.model.llama2c


def test_configs_cover_the_issue():
    names = {p.stem for p in CONFIGS}
    assert "default" in names
    for model in ("llama3_8b", "llama2_7b"):
        for task in ("hellaswag", "piqa", "winogrande", "race_high"):
            assert {f"{model}_{task}_gpu", f"{model}_{task}_tpu"} <= names
    assert {"tinystories260k_piqa", "tinystories260k_hellaswag", "tinystories260k_winogrande"} <= names


def test_overriding_one_key_keeps_the_sections_run_defaults():
    c = load_config(overrides=["--finetune.max_steps=120", "--lora.r=8"])
    assert c.finetune == RunConfig().finetune.__class__(**{**RunConfig().finetune.__dict__, "max_steps": 120})
    assert c.lora.lora_alpha == RunConfig().lora.lora_alpha


def test_configs_are_static_jit_arguments():
    """A config passed to a user's jax.jit as an ordinary argument is static (hashed), not traced."""
    import jax
    import jax.numpy as jnp

    import flexora_jax as fj

    config = fj.ModelConfig(num_hidden_layers=1, vocab_size=32, hidden_size=16, intermediate_size=32,
                            num_attention_heads=2)
    params = fj.init_params(config, jax.random.key(0))
    logits = jax.jit(lambda c, p, t: fj.forward(c, p, t))(config, params, jnp.ones((1, 3), jnp.int32))
    assert logits.shape == (1, 3, 32)
    assert jax.tree.leaves(fj.LoraConfig()) == [] and jax.tree.leaves(fj.SearchConfig()) == []


def test_a_real_task_starts_from_the_papers_settings_the_demo_from_its_own():
    from flexora_jax.pipeline.config import PAPER_DEFAULTS

    real = load_config(None, ["--task.name=piqa", "--model.path=/models/x", "--search.steps=7"])
    assert (real.lora.r, real.lora.lora_alpha, real.lora.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert real.search.hypergradient == "first_order" and real.search.gate_power == 3 and real.search.steps == 7
    assert (real.finetune.epochs, real.finetune.max_steps, real.finetune.lr) == (3.0, 0, 1e-4)
    for section, values in PAPER_DEFAULTS.items():
        got = config_to_dict(real)[section]
        assert all(got[k] == v for k, v in values.items() if not (section == "search" and k == "steps")), section
    demo = load_config(None, [])
    assert (demo.lora.r, demo.search.hypergradient, demo.finetune.max_steps) == (4, "unrolled", 400)
