"""RunConfig: YAML + dotted overrides through draccus, key / type / range errors, base-file chains, presets,
every file in configs/ (resolved exactly as before they became base files plus overlays)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from flexora_jax.config import PRESETS, FinetuneConfig, LoraConfig, SearchConfig, preset
from flexora_jax.errors import ConfigError
from flexora_jax.pipeline.config import RunConfig, config_to_dict, load_config, save_config
from flexora_jax.pipeline.registry import METHODS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
#: Every shipped config (and study-plan variant) resolved by the code before configs/ became base files plus
#: overlays (study variants as a hash of their resolved dict). A deliberate change of a default or a shipped
#: value regenerates it: ``cd tests && python -c "import test_config; test_config.write_resolved()"``.
RESOLVED = REPO / "tests" / "data" / "configs_resolved.json"


def test_required_keys_exist_under_their_names():
    c = load_config(
        overrides=[
            "--model.path=/m",
            "--task.name=piqa",
            "--method=lora",
            "--seed=3",
            "--lora.r=8",
            "--search.inner_steps=2",
            "--search.hypergradient=first_order",
            "--finetune.epochs=2",
            "--output_dir=/tmp/x",
        ]
    )
    assert (c.model.path, c.task.name, c.method, c.seed, c.lora.r) == ("/m", "piqa", "lora", 3, 8)
    assert (c.search.inner_steps, c.search.hypergradient, c.finetune.epochs, c.output_dir) == (
        2,
        "first_order",
        2.0,
        "/tmp/x",
    )


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


@pytest.mark.parametrize(
    "override, needle",
    [
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
    ],
)
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
    assert "base" not in config_to_dict(c)  # the chain is resolved away
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

    config = fj.ModelConfig(
        num_hidden_layers=1, vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2
    )
    params = fj.init_params(config, jax.random.key(0))
    logits = jax.jit(lambda c, p, t: fj.forward(c, p, t))(config, params, jnp.ones((1, 3), jnp.int32))
    assert logits.shape == (1, 3, 32)
    assert jax.tree.leaves(fj.LoraConfig()) == [] and jax.tree.leaves(fj.SearchConfig()) == []


def test_a_real_task_starts_from_the_papers_settings_the_demo_from_its_own():
    real = load_config(None, ["--task.name=piqa", "--model.path=/models/x", "--search.steps=7"])
    assert (real.lora.r, real.lora.lora_alpha, real.lora.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert real.search.hypergradient == "first_order" and real.search.gate_power == 3 and real.search.steps == 7
    assert (real.finetune.epochs, real.finetune.max_steps, real.finetune.lr) == (3.0, 0, 1e-4)
    for section, values in PRESETS["flexora_paper"].items():
        got = config_to_dict(real)[section]
        want = config_to_dict(dict(values))
        assert all(got[k] == v for k, v in want.items() if not (section == "search" and k == "steps")), section
    demo = load_config(None, [])
    assert (demo.lora.r, demo.search.hypergradient, demo.finetune.max_steps) == (4, "unrolled", 400)


def _changed(config: dict, defaults: dict) -> dict:
    """The fields of a resolved config that differ from the defaults (a field added later at its default, such as
    a new logging switch, leaves a study variant's digest as it was)."""
    return {
        k: (_changed(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v)
        for k, v in config.items()
        if k not in defaults or v != defaults[k]
    }


def _resolved() -> dict:
    """Every shipped config resolved: ``{"configs": {file: dict}, "study": {plan:experiment:variant: hash}}``."""
    from flexora_jax.pipeline.study import load_plan

    out: dict = {"configs": {p.name: config_to_dict(load_config(p)) for p in CONFIGS}, "study": {}}
    defaults = config_to_dict(RunConfig())
    for path in sorted((REPO / "configs" / "study").glob("*.yaml")):
        for e in load_plan(path)["experiments"]:
            for variant, overrides in e["variants"].items():
                c = config_to_dict(load_config(e.get("config"), list(e["overrides"]) + list(overrides or [])))
                digest = hashlib.sha256(json.dumps(_changed(c, defaults), sort_keys=True).encode()).hexdigest()[:16]
                out["study"][f"{path.name}:{e['name']}:{variant}"] = digest
    return out


def write_resolved(path: Path = RESOLVED) -> None:
    """:data:`RESOLVED` from the current code: one line per config."""
    data = _resolved()

    def line(key: str, value: object) -> str:
        return f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True, separators=(',', ':'))}"

    sections = [
        f' "{section}": {{\n' + ",\n".join(line(k, v) for k, v in sorted(data[section].items())) + "\n }"
        for section in ("configs", "study")
    ]
    path.write_text("{\n" + ",\n".join(sections) + "\n}\n")


def test_every_shipped_config_resolves_as_before_the_overlays():
    want, got = json.loads(RESOLVED.read_text()), _resolved()
    assert sorted(got["configs"]) == sorted(want["configs"])  # every file still ships under its name
    for name, values in want["configs"].items():
        diff = {k: (got["configs"][name][k], v) for k, v in values.items() if got["configs"][name][k] != v}
        assert not diff, f"{name}: (now, before) {diff}"
    assert got["study"] == want["study"]


def test_the_default_file_is_the_embedded_default():
    assert load_config(REPO / "configs" / "default.yaml") == RunConfig()


def test_base_chain_order_relative_paths_and_overrides(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("seed: 1\nlora: {r: 2, lora_alpha: 2.0}\ncompare: [lora]\n")
    (tmp_path / "base" / "b.yaml").write_text("base: a.yaml\nseed: 2\nlora: {r: 3}\n")  # relative to base/
    (tmp_path / "c.yaml").write_text("seed: 5\n")
    top = tmp_path / "top.yaml"
    top.write_text("base: [base/b.yaml, c.yaml]\nlora: {lora_alpha: 6.0}\n")
    c = load_config(top)
    # a.yaml, then b.yaml, then c.yaml, then the file's own keys: key by key, the last one wins
    assert (c.seed, c.lora.r, c.lora.lora_alpha, c.compare) == (5, 3, 6.0, ("lora",))
    assert load_config(top, ["--seed=9"]).seed == 9  # the command line over the whole chain
    assert load_config(tmp_path / "base" / "b.yaml").seed == 2


def test_a_base_file_that_names_a_real_task_picks_the_paper_defaults(tmp_path):
    (tmp_path / "task.yaml").write_text("task: {name: piqa}\nmodel: {path: /models/x}\n")
    (tmp_path / "top.yaml").write_text("base: task.yaml\nsearch: {steps: 7}\n")
    c = load_config(tmp_path / "top.yaml")
    assert (c.lora.r, c.search.hypergradient, c.search.steps, c.finetune.epochs) == (8, "first_order", 7, 3.0)
    back = load_config(tmp_path / "top.yaml", ["--task.name=planted", "--model.path=null"])
    assert (back.lora.r, back.search.hypergradient) == (4, "unrolled")  # the demo's, decided by the override


def test_base_chain_errors_name_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"a.yaml: its base chain is a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(a)
    a.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    a.write_text("base: [missing.yaml]\n")
    with pytest.raises(ConfigError, match=r"a.yaml: base file 'missing.yaml' .* does not exist"):
        load_config(a)
    a.write_text("base: {x: 1}\n")
    with pytest.raises(ConfigError, match=r"a.yaml: base must be a path or a list of paths"):
        load_config(a)
    b.write_text("lora: {rank: 3}\n")
    a.write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: unknown key 'lora.rank'"):  # the base file, not a.yaml
        load_config(a)
    b.write_text("seed: true\n")
    with pytest.raises(ConfigError, match=r"b.yaml: seed"):
        load_config(a)
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # only files have a base
        load_config(None, ["--base=a.yaml"])


def test_load_config_parses_once(monkeypatch):
    import draccus

    calls = []
    real = draccus.parse
    monkeypatch.setattr(draccus, "parse", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = load_config(None, ["--task.name=piqa", "--model.path=/m"])
    assert c.search.gate_power == 3 and len(calls) == 1  # the paper defaults chosen before the one parse


def test_defaults_are_stated_once_in_the_presets():
    assert SearchConfig.flexora_reference() == preset("flexora_paper", "search")
    assert SearchConfig.flexora_reference(steps=5).steps == 5
    assert SearchConfig.autolora_reference() == preset("autolora_paper", "search")
    assert SearchConfig.autolora_reference().outer_b1 == 0.5
    demo = RunConfig()
    assert demo.lora == preset("planted_demo", "lora") == LoraConfig(r=4, lora_alpha=4.0)
    assert demo.search == preset("planted_demo", "search") == SearchConfig()  # the planted regime: the defaults
    assert demo.finetune == preset("planted_demo", "finetune") and demo.finetune != FinetuneConfig()
    with pytest.raises(ConfigError, match="unknown preset 'paper'"):
        preset("paper", "search")
    with pytest.raises(TypeError):
        PRESETS["flexora_paper"]["search"]["steps"] = 1  # frozen
