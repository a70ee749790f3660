"""Property-based (hypothesis): config parsing round-trips and rejects garbage with ConfigError only;
the local data loaders turn any corrupt JSON-lines input into DataError, never another exception."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexora_jax.errors import ConfigError, DataError
from flexora_jax.pipeline.config import METHODS, RunConfig, config_to_dict, load_config

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

valid_overrides = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 2),  # negative or larger seeds are refused (numpy rejects them late)
        "method": st.sampled_from(METHODS),
        "lora.r": st.integers(1, 64),
        "lora.lora_alpha": st.floats(0.01, 1e4, allow_nan=False),
        "search.inner_steps": st.integers(1, 64),
        "search.inner_lr": st.floats(1e-8, 9.9, allow_nan=False),
        "finetune.max_steps": st.integers(0, 10**6),
        "checkpoint.every": st.integers(0, 1000),
    }
)


@FAST
@given(values=valid_overrides)
def test_valid_overrides_round_trip_through_the_saved_yaml(values, tmp_path_factory):
    args = [
        f"--{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix(chr(10) + '...')}"
        for k, v in values.items()
    ]
    config = load_config(overrides=args)
    d = config_to_dict(config)
    for key, v in values.items():
        section, _, leaf = key.rpartition(".")
        got = d[section][leaf] if section else d[leaf]
        assert got == v, key
    path = tmp_path_factory.mktemp("rt") / "config.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    assert load_config(path) == config


@FAST
@given(
    key=st.sampled_from(
        [
            "seed",
            "lora.r",
            "search.inner_steps",
            "search.inner_lr",
            "finetune.lr",
            "checkpoint.keep",
            "method",
            "compare",
            "task.planted.n_train",
            "lora.lora_dropout",
        ]
    ),
    value=st.one_of(
        st.text(max_size=12),
        st.integers(-(10**9), 10**9),
        st.floats(allow_nan=True),
        st.lists(st.integers(-5, 5), max_size=3),
    ),
)
def test_garbage_values_raise_config_error_only(key, value):
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        load_config(overrides=[f"--{key}={text}"])
    except ConfigError as exc:
        assert str(exc)
    except Exception as exc:  # anything else is a bug: a user error must be a ConfigError
        raise AssertionError(f"--{key}={text!r} raised {type(exc).__name__}: {exc}") from exc


@FAST
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=4
    )
)
def test_unknown_or_garbage_yaml_documents_raise_config_error(doc):
    try:
        load_config(overrides=[], base=doc) if doc else None
    except ConfigError:
        return
    assert all(k in {f for f in RunConfig.__dataclass_fields__} for k in doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
piqa_like = st.fixed_dictionaries({}, optional={"goal": json_values, "sol1": json_values, "sol2": json_values})
line = st.one_of(st.text(max_size=40), json_values.map(json.dumps), piqa_like.map(json.dumps))


@FAST
@given(
    lines=st.lists(line, min_size=1, max_size=5),
    labels=st.lists(st.sampled_from(["0", "1", "2", "x", ""]), min_size=1, max_size=5),
)
def test_piqa_loader_raises_only_data_error(lines, labels, tmp_path_factory):
    from flexora_jax.tasks import local

    root = tmp_path_factory.mktemp("piqa")
    (root / "piqa").mkdir()
    (root / "piqa" / "valid.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (root / "piqa" / "valid-labels.lst").write_text("\n".join(labels))
    try:
        rows = local._piqa(Path(root), "validation")
    except DataError:
        return
    assert all(isinstance(r["goal"], str) and r["label"] in (0, 1) for r in rows)


@FAST
@given(lines=st.lists(line, min_size=1, max_size=5))
def test_arc_loader_raises_only_data_error(lines, tmp_path_factory):
    from flexora_jax.tasks import local

    root = tmp_path_factory.mktemp("arc")
    (root / "arc").mkdir()
    (root / "arc" / "ARC-Easy-Test.jsonl").write_text("\n".join(lines), encoding="utf-8")
    try:
        rows = local._arc("Easy")(Path(root), "test")
    except DataError:
        return
    assert all(r["answerKey"] in r["choices"]["label"] for r in rows)


@FAST
@given(
    kwargs=st.fixed_dictionaries(
        {},
        optional={
            "r": st.one_of(st.integers(-3, 70), st.floats(allow_nan=True), st.text(max_size=3)),
            "lora_alpha": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)),
            "target_modules": st.one_of(
                st.text(max_size=12), st.lists(st.sampled_from(["q_proj", "v_proj", "zz", ""]))
            ),
            "layers_to_transform": st.one_of(st.none(), st.lists(st.integers(-3, 9), max_size=4)),
            "rank_pattern": st.dictionaries(
                st.sampled_from(["q_proj", "model.layers.0.self_attn.v_proj"]), st.integers(-2, 9), max_size=2
            ),
            "use_dora": st.one_of(st.booleans(), st.text(max_size=2)),
        },
    ),
    rule=st.one_of(st.sampled_from(["positive", "top_k", "threshold", "topk"]), st.text(max_size=5)),
    k=st.integers(-2, 9),
    threshold=st.floats(allow_nan=True, allow_infinity=True),
)
def test_api_inputs_raise_flexora_errors_only(kwargs, rule, k, threshold):
    """The library's configs and the selection API on fuzzed inputs: a FlexoraError or a valid result."""
    import jax.numpy as jnp

    import flexora_jax as fj

    try:
        lora = fj.LoraConfig(**kwargs)
        fj.make_spec(fj.ModelConfig(num_hidden_layers=4), lora)
    except fj.FlexoraError:
        pass
    try:
        layers = fj.select_layers(fj.Gates(layer=jnp.array([0.3, -0.1, 0.2, -1.0])), rule, k, threshold)
        assert layers and all(0 <= i < 4 for i in layers)
    except fj.FlexoraError:
        pass
