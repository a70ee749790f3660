"""The validation layer (flexora_jax.validation) and the public-API cases of issue 30 part 1.

Every case here raised a raw Python / library error or returned a silently wrong result before the layer
existed; now each is a FlexoraError naming the argument (or file and key), or a correct result. Classes of
inputs are covered by hypothesis properties: every numeric field of every config refuses a bool, every
flag refuses anything but true / false, every float refuses NaN / Inf, and a token id planted anywhere
outside the vocabulary is named by field, row and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import flexora_jax as fj
from flexora_jax import config as lib_config
from flexora_jax import validation as v
from flexora_jax.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from flexora_jax.errors import CheckpointError, ConfigError, DataError, FlexoraError, NumericsError
from flexora_jax.nnx import add_lora, load_adapter, lora_sites, save_adapter, save_peft
from flexora_jax.pipeline import config as run_config
from flexora_jax.selection import Selection
from flexora_jax.tasks.formats import MCRecord

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NOT_NUMBERS = st.one_of(
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.lists(st.integers(), max_size=2),
)
NOT_FLAGS = st.one_of(
    st.sampled_from(["false", "true", "no", "0", ""]), st.integers(), st.floats(allow_nan=True), st.none()
)


def _raises(exc_type, call, *words):
    with pytest.raises(exc_type) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    return info.value


# ------------------------------------------------------------------------------------ the layer
@SETTINGS
@given(NOT_NUMBERS)
def test_check_number_refuses_bools_strings_and_non_finite(value):
    _raises(ConfigError, lambda: v.check_number(value, "the_arg"), "the_arg")
    _raises(ConfigError, lambda: v.check_number(value, "the_arg", integer=True), "the_arg", "integer")


@SETTINGS
@given(st.integers(-50, 50), st.integers(-50, 50))
def test_check_number_range_and_integers(value, lo):
    if value >= lo:
        assert v.check_number(value, "x", lo=lo, integer=True) == value
        assert isinstance(v.check_number(np.int64(value), "x", lo=lo), float)
    else:
        _raises(ConfigError, lambda: v.check_number(value, "x", lo=lo, integer=True), ">= ")
    _raises(ConfigError, lambda: v.check_number(float(value) + 0.5, "x", integer=True), "integer")
    with pytest.raises(DataError):
        v.check_number(lo, "x", lo=lo, lo_open=True, error=DataError)


@SETTINGS
@given(NOT_FLAGS)
def test_check_bool_takes_only_true_and_false(value):
    _raises(ConfigError, lambda: v.check_bool(value, "the_flag"), "the_flag", "true or false")
    assert v.check_bool(np.bool_(True), "f") is True


def test_check_regex_compiles_once_and_counts_groups():
    assert v.check_regex(r"layers\.(\d+)", "idx", groups=1).pattern == r"layers\.(\d+)"
    _raises(ConfigError, lambda: v.check_regex("layers.([", "targets"), "targets", "not a valid regular expression")
    _raises(ConfigError, lambda: v.check_regex(r"layers\.\d", "layer_index", groups=1), "layer_index", "capture group")
    _raises(ConfigError, lambda: v.check_regex(5, "pattern"), "pattern", "5 (int)")


def test_check_mapping_names_unknown_and_missing_keys():
    assert v.check_mapping({"a": 1}, "cfg", {"a", "b"}, ("a",)) == {"a": 1}
    _raises(ConfigError, lambda: v.check_mapping([1], "cfg"), "cfg", "mapping")
    _raises(ConfigError, lambda: v.check_mapping({"c": 1}, "cfg", {"a"}), "unknown key(s) ['c']", "allowed: ['a']")
    _raises(
        CheckpointError,
        lambda: v.check_mapping({}, "f.json", required_keys=("a",), error=CheckpointError),
        "f.json",
        "missing key(s) ['a']",
    )


@pytest.mark.parametrize(
    "value, hint, ok",
    [
        (3, int, True),
        (True, int, False),
        (np.int32(3), int, True),
        (2.5, int, False),
        (2, float, True),
        (math.inf, float, False),
        (True, float, False),
        ("x", bool, False),
        (False, bool, True),
        (None, int | None, True),
        ([1, 2], tuple[int, ...], True),
        ([1, True], tuple[int, ...], False),
        ({"q": 2}, typing.Mapping[str, int], True),
        ({"q": True}, typing.Mapping[str, int], False),
        ("gaussian", bool | str, True),
        ((1, "a"), tuple[int, str], True),
        ((1,), tuple[int, str], False),
    ],
)
def test_check_type(value, hint, ok):
    if ok:
        assert v.check_type(value, hint, "field") is value
    else:
        _raises(ConfigError, lambda: v.check_type(value, hint, "field"), "field must be")


def test_check_type_text_mode_leaves_strings_to_the_parser_but_not_for_flags():
    assert v.check_type("1e-3", float, "lr", text=True) == "1e-3"  # PyYAML reads 1e-3 as a string
    assert v.check_type(12, str, "name", text=True) == 12
    _raises(ConfigError, lambda: v.check_type("false", bool, "flag", text=True), "flag", "true or false")
    _raises(ConfigError, lambda: v.check_type(True, int, "r", text=True), "r must be an integer")


def test_check_config_type_hints_how_to_build_the_config():
    assert v.check_config_type(fj.FinetuneConfig(), fj.FinetuneConfig, "cfg") is not None
    _raises(
        ConfigError,
        lambda: v.check_config_type({"max_steps": 2}, fj.FinetuneConfig, "finetune: cfg"),
        "finetune: cfg must be a FinetuneConfig",
        "FinetuneConfig(**{'max_steps': 2})",
    )


def test_check_scalar_loss_static_and_traced():
    assert v.check_scalar_loss(jnp.float32(1.0)) is not None and v.check_scalar_loss(1.5) == 1.5
    _raises(ConfigError, lambda: v.check_scalar_loss(jnp.ones((2, 3))), "loss_fn", "shape (2, 3)")
    _raises(ConfigError, lambda: v.check_scalar_loss(jnp.int32(1)), "float")
    _raises(ConfigError, lambda: v.check_scalar_loss((1.0, {}), "my_loss"), "my_loss", "tuple")
    with pytest.raises(ConfigError, match="shape \\(4,\\)"):
        jax.eval_shape(lambda x: v.check_scalar_loss(x * 2), jnp.ones(4))
    assert jax.eval_shape(lambda x: v.check_scalar_loss(jnp.sum(x)), jnp.ones(4)).shape == ()


def test_check_array_dtype_rank_shape_and_values():
    x = np.zeros((2, 3), np.int32)
    assert v.check_array(x, "x", "iu", 2, shape=(None, 3), id_range=5) is x
    _raises(DataError, lambda: v.check_array(x, "gates.layer", "f"), "gates.layer", "floating-point", "int32")
    _raises(
        ConfigError,
        lambda: v.check_array(np.ones(7), "gates.layer", shape=(3,), error=ConfigError),
        "gates.layer must have shape (3,), got (7,)",
    )
    _raises(DataError, lambda: v.check_array([1, 2], "ids"), "ids must be an array", "list")
    _raises(DataError, lambda: v.check_array(np.array([[0.0, np.inf]]), "w", finite=True), "w", "(0, 1)", "inf")
    traced = jax.eval_shape(lambda a: v.check_array(a, "t", "f", 1, finite=True, id_range=1), jnp.ones(3) * 9)
    assert traced.shape == (3,)  # a tracer's values are unknown: only its dtype and shape are checked


def test_check_finite_tree_names_the_leaves():
    tree = {"a": np.ones(3), "b": {"c": jnp.array([1.0, jnp.nan])}, "ids": np.arange(3)}
    _raises(CheckpointError, lambda: v.check_finite_tree(tree, "model.safetensors"), "model.safetensors", "['b']['c']")
    v.check_finite_tree({"a": jnp.ones(2), "b": np.zeros(2)}, "fine")


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert v.read_json(tmp_path / "ok.json") == {"a": 1}
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "dir.json").mkdir()
    for name, words in [
        ("bin.json", ["not UTF-8"]),
        ("bad.json", ["not valid JSON"]),
        ("dir.json", ["directory"]),
        ("none.json", ["does not exist"]),
    ]:
        _raises(CheckpointError, lambda name=name: v.read_json(tmp_path / name, "x"), name, *words)


# ------------------------------------------------------------------------------------- datasets
def _data(n=4, t=8, vocab=32):
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, vocab, (n, t)).astype(np.int32),
        "attention_mask": np.ones((n, t), np.int32),
        "loss_mask": np.ones((n, t), np.float32),
    }


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.update(input_ids=d["input_ids"].astype(np.float32)), ["input_ids", "integer dtype", "float32"]),
        (lambda d: d.update(input_ids=d["input_ids"][0]), ["input_ids", "2 dimension", "(8,)"]),
        (lambda d: d.pop("loss_mask"), ["missing key(s) ['loss_mask']"]),
        (lambda d: d.update(loss_mask=np.ones((3, 8), np.float32)), ["different numbers of rows"]),
        (lambda d: d.update(loss_mask=np.zeros((4, 8), np.float32)), ["loss_mask is all zero"]),
        (lambda d: d.update(loss_mask=np.full((4, 8), np.nan, np.float32)), ["loss_mask", "NaN"]),
        (lambda d: d.update(attention_mask=np.ones((4, 9), np.int32)), ["attention_mask", "(4, 9)", "like input_ids"]),
        (lambda d: d.update(target_probs=np.ones((4, 8, 31), np.float32)), ["target_probs", "31 classes"]),
        (lambda d: [d.pop(k) for k in list(d)], ["missing key(s)"]),
    ],
)
def test_check_dataset_refusals(change, words):
    data = _data()
    change(data)
    _raises(DataError, lambda: v.check_dataset(data, "train_data", vocab_size=32), *words)


def test_check_dataset_accepts_what_sft_arrays_and_custom_loss_fns_use():
    assert v.check_dataset(_data(), "train", vocab_size=32) == 4
    custom = {"tokens": np.zeros((3, 5), np.int32), "targets": np.ones((3, 5, 7), np.float32)}
    assert v.check_dataset(custom, "train", require=("tokens",), loss_mask_required=False) == 3
    _raises(DataError, lambda: v.check_dataset([1, 2], "train"), "train must be a mapping")


@SETTINGS
@given(
    st.integers(0, 3),
    st.integers(0, 7),
    st.sampled_from([-1, -7, 32, 33, 10**6]),
    st.sampled_from(["input_ids", "labels"]),
)
def test_a_token_id_outside_the_vocabulary_is_named_by_field_row_and_value(row, col, bad, field):
    data = _data()
    data["labels"] = data["input_ids"].copy()
    data[field][row, col] = bad
    err = _raises(
        DataError,
        lambda: v.check_dataset(data, "train_data", vocab_size=32),
        f"train_data['{field}']",
        f"row {row}",
        str(bad),
        "[0, 32)",
    )
    assert "learning rate" not in str(err)
    if bad < 0:  # negative ids are refused even without a vocabulary (they would wrap around)
        _raises(DataError, lambda: v.check_dataset(data, "train_data"), f"row {row}")


# ------------------------------------------------------------------------------------ the configs
CONFIGS = {
    "ModelConfig": lib_config.ModelConfig,
    "LoraConfig": lib_config.LoraConfig,
    "search": lib_config.SearchConfig,
    "selection": lib_config.SelectionConfig,
    "finetune": lib_config.FinetuneConfig,
    "eval": lib_config.EvalConfig,
    "mesh": lib_config.MeshConfig,
    "RopeScaling": lib_config.RopeScaling,
    "model": run_config.ModelSourceConfig,
    "task.planted": run_config.PlantedOptions,
    "task": run_config.TaskConfig,
    "checkpoint": run_config.CheckpointConfig,
}


def _scalar_fields():
    """(config name, class, field, kind) for every int / float / bool field (also inside an Optional)."""
    out = []
    for name, cls in CONFIGS.items():
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            kinds = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
            for kind in (bool, int, float):
                if kind in kinds:
                    out.append(pytest.param(name, cls, f.name, kind, id=f"{name}.{f.name}"))
                    break
    return out


@pytest.mark.parametrize("name, cls, field, kind", _scalar_fields())
def test_every_config_field_refuses_the_wrong_kind_of_value(name, cls, field, kind):
    """A bool where a number is meant, a string where a flag is meant, NaN / Inf where a float is meant."""
    bad = {int: [True, 2.5, "3"], float: [True, math.nan, math.inf, "0.1"], bool: ["false", 1, None]}[kind]
    for value in bad:
        _raises(ConfigError, lambda value=value: cls(**{field: value}), f"{name}.{field}")


def test_config_cases_of_the_issue():
    _raises(ConfigError, lambda: fj.LoraConfig(r=True), "LoraConfig.r", "True (bool)")
    _raises(ConfigError, lambda: fj.LoraConfig(use_rslora="false"), "LoraConfig.use_rslora", "'false'")
    _raises(ConfigError, lambda: fj.LoraConfig(lora_alpha=math.inf), "LoraConfig.lora_alpha", "inf")
    _raises(ConfigError, lambda: fj.LoraConfig(rank_pattern={"q_proj": True}), "LoraConfig.rank_pattern")
    err = _raises(ConfigError, lambda: fj.ModelConfig(num_attention_heads=0), "num_attention_heads", "positive")
    assert "modulo" not in str(err)
    assert fj.LoraConfig(layers_to_transform=1).layers_to_transform == (1,)  # PEFT's int form still reads


@pytest.mark.parametrize(
    "override, key",
    [
        ("--lora.r=true", "lora.r"),
        ("--seed=true", "seed"),
        ("--lora.use_rslora='false'", "lora.use_rslora"),
        ("--lora.lora_alpha=.inf", "lora.lora_alpha"),
        ("--finetune.lr=true", "finetune.lr"),
        ("--search.remat=1", "search.remat"),
        ("--lora.rank_pattern={q_proj: true}", "lora.rank_pattern"),
        ("--search.inner_eps_root=.nan", "search.inner_eps_root"),
        ("--task.planted.ranks={q_proj: false}", "task.planted.ranks"),
    ],
)
def test_run_config_overrides_refuse_the_wrong_kind_of_value(override, key):
    _raises(ConfigError, lambda: run_config.load_config(None, [override]), key)


def test_run_config_file_refuses_a_quoted_flag_and_keeps_valid_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('lora:\n  use_rslora: "false"\n')
    _raises(ConfigError, lambda: run_config.load_config(path), "lora.use_rslora", "true or false")
    path.write_text("lora:\n  use_rslora: false\n  lora_alpha: 8\nfinetune:\n  lr: 1e-3\n")
    cfg = run_config.load_config(path, ["--lora.r=4", "--compare=[lora]"])
    assert (cfg.lora.use_rslora, cfg.lora.lora_alpha, cfg.finetune.lr, cfg.lora.r) == (False, 8.0, 1e-3, 4)


# ---------------------------------------------------------------------------------- nnx.add_lora
class Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


TARGETS = r"layers\.\d"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(targets=None), ["targets", "None (NoneType)"]),
        (dict(targets=123), ["targets", "123 (int)"]),
        (dict(alpha="16"), ["alpha", "'16' (str)"]),
        (dict(alpha=math.inf), ["alpha", "inf"]),
        (dict(alpha=0.0), ["alpha", "> 0"]),
        (dict(rank=True), ["rank", "True (bool)"]),
        (dict(rank=2.0), ["rank", "integer"]),
        (dict(targets="layers.(["), ["targets", "not a valid regular expression"]),
        (dict(layer_index="(["), ["layer_index", "not a valid regular expression"]),
        (dict(layer_index=r"layers\.\d"), ["layer_index", "capture group"]),
        (dict(layer_index=lambda path: "one"), ["layer_index", "'one'"]),
        (dict(rngs=None), ["rngs", "Rngs", "None"]),
        (dict(layers=[99]), ["layers [99]", "[0, 1, 2]"]),
        (dict(layers=[]), ["layers is empty"]),
        (dict(layers=[True]), ["layers", "True"]),
        (dict(ranks={"layers.9": 2}), ["ranks", "layers.9", "layers.0"]),
        (dict(ranks={"layers.0": True}), ["ranks"]),
        (dict(ranks={f"layers.{i}": 0 for i in range(3)}), ["rank 0", "nothing would be adapted"]),
        (dict(use_rslora="false"), ["use_rslora", "true or false"]),
        (dict(example_inputs=5), ["example_inputs"]),
    ],
)
def test_add_lora_refuses_bad_arguments_and_leaves_the_model_unchanged(kwargs, words):
    model = Stack(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    args = dict(targets=TARGETS, rngs=nnx.Rngs(1)) | kwargs
    _raises(ConfigError, lambda: add_lora(model, args.pop("targets"), **args), "add_lora", *words)
    assert lora_sites(model) == {} and not nnx.state(model, nnx.LoRAParam)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)


def test_add_lora_layers_and_ranks_that_fit_still_work():
    model = add_lora(Stack(nnx.Rngs(0)), TARGETS, rank=2, layers=[0, 2], ranks={"layers.2": 3}, rngs=nnx.Rngs(1))
    assert {p: s.ranks for p, s in lora_sites(model).items()} == {"layers.0": (2,), "layers.2": (3,)}
    _raises(ConfigError, lambda: add_lora(Stack(nnx.Rngs(0)), 5, rngs=nnx.Rngs(1)), "targets")
    _raises(ConfigError, lambda: add_lora(None, TARGETS, rngs=nnx.Rngs(1)), "add_lora: model")


# ------------------------------------------------------------------------------ Selection.from_json
@pytest.mark.parametrize(
    "data, words",
    [
        ({"layers": [0]}, ["missing key(s) ['modules']"]),
        ([0], ["mapping"]),
        ({"layers": [0], "modules": {"a": [0]}, "extra": 1}, ["unknown key(s) ['extra']"]),
        ({"layers": [True], "modules": {}}, ["selection['layers']"]),
        ({"layers": [0], "modules": {"a": "0"}}, ["selection['modules']"]),
        ({"layers": [0], "modules": {"a": [0]}, "ranks": {"b": 2}}, ["'b'", "module"]),
        ({"layers": [0], "modules": {"a": [0, 1]}, "ranks": {"a[5]": 2}}, ["'a[5]'"]),
        ({"layers": [0], "modules": {"a": [0, 1]}, "ranks": {"a": 2}}, ["'a'", "covers layers"]),
        ({"layers": [0], "modules": {"a": [0]}, "ranks": {"a": -1}}, ["ranks", ">= 0"]),
    ],
)
def test_selection_from_json_refuses_malformed_selections(data, words):
    _raises(ConfigError, lambda: Selection.from_json(data), *words)


def test_selection_round_trips():
    sel = Selection((0, 2), {"a": (0, 1, 2), "b": (2,)}, {"a": (1, 0, 3), "b": (2,)})
    assert Selection.from_json(json.loads(json.dumps(sel.to_json()))) == sel


# -------------------------------------------------------------------------------------- sft_arrays
class CharTokenizer:
    """A character tokenizer with ``n`` ids (0 pad, 1 BOS, 2 EOS): enough for encode_pair and scoring."""

    bos_token_id, eos_token_id, pad_token_id, bos_token = 1, 2, 0, "<s>"

    def __init__(self, n: int = 64):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * add_special_tokens + [3 + ord(c) % (self.n - 3) for c in text]


PAIRS = [("What is one plus one?", " two"), ("Name a colour.", " red")]


@pytest.mark.parametrize(
    "records, tokenizer, max_length, words",
    [
        (PAIRS, None, 64, ["tokenizer", "None"]),
        ([1, 2], CharTokenizer(), 64, ["records[0]", "1 (int)"]),
        (None, CharTokenizer(), 64, ["records", "None"]),
        ("text", CharTokenizer(), 64, ["records"]),
        (PAIRS, CharTokenizer(), 8.5, ["max_length", "8.5"]),
        (PAIRS, CharTokenizer(), "64", ["max_length", "'64'"]),
        (PAIRS, CharTokenizer(), True, ["max_length", "True"]),
    ],
)
def test_sft_arrays_refuses_bad_arguments(records, tokenizer, max_length, words):
    _raises(FlexoraError, lambda: fj.sft_arrays(records, tokenizer, max_length), *words)


def test_sft_arrays_reads_a_generator_like_a_list():
    from_list, info = fj.sft_arrays(PAIRS, CharTokenizer(), 64)
    from_gen, info_gen = fj.sft_arrays((p for p in PAIRS), CharTokenizer(), 64)
    assert info == info_gen
    jax.tree.map(np.testing.assert_array_equal, from_list, from_gen)
    assert v.check_dataset(from_list, "sft", vocab_size=64) == 2


# ---------------------------------------------------------------------------- the model and losses
TINY = fj.ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(0)  # host draws: no eager compiles of init_params
    shapes = jax.eval_shape(lambda: fj.init_params(TINY, jax.random.key(0)))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)
    directory = fj.save_model(TINY, params, tmp_path_factory.mktemp("tiny") / "model")
    return params, directory


def test_lm_loss_checks_chunk_and_batch(tiny):
    params, _ = tiny
    batch = {"input_ids": jnp.ones((2, 8), jnp.int32), "loss_mask": jnp.ones((2, 8))}
    _raises(ConfigError, lambda: fj.lm_loss(TINY, params, None, None, batch, chunk=2.5), "lm_loss: chunk", "2.5")
    _raises(ConfigError, lambda: fj.lm_loss(TINY, params, None, None, batch, chunk=-1), "chunk")
    _raises(
        DataError,
        lambda: fj.lm_loss(TINY, params, None, None, {**batch, "input_ids": jnp.ones((2, 8))}),
        "input_ids",
        "integer",
    )
    _raises(DataError, lambda: fj.lm_loss(TINY, params, None, None, {"input_ids": batch["input_ids"]}), "loss_mask")


def _broken_model(tmp_path, directory, kind):
    out = tmp_path / kind
    shutil.copytree(directory, out)
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    if kind == "nan":
        weights[name][0, 0] = np.nan
    elif kind == "int8":
        weights[name] = (weights[name] * 100).astype(np.int8)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_load_model_refuses_nan_and_integer_weights(tiny, tmp_path):
    _, directory = tiny
    assert fj.load_model(directory)[0] == TINY
    nan = _broken_model(tmp_path, directory, "nan")
    _raises(CheckpointError, lambda: fj.load_model(nan), "NaN or Inf", "['layers']['q_proj']['kernel']")
    assert fj.load_model(nan, check_finite=False)[0] == TINY  # the opt-out for a checkpoint you trust
    _raises(
        CheckpointError,
        lambda: fj.load_model(_broken_model(tmp_path, directory, "int8")),
        "q_proj.weight",
        "int8",
        "dequantize",
    )


@pytest.mark.parametrize(
    "field, value",
    [("num_attention_heads", 0), ("hidden_size", True), ("tie_word_embeddings", "false"), ("vocab_size", 32.5)],
)
def test_config_json_values_are_checked_before_transformers_reads_them(tiny, tmp_path, field, value):
    _, directory = tiny
    shutil.copytree(directory, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {field: value}))
    err = _raises(CheckpointError, lambda: fj.load_model_config(tmp_path / "m"), "config.json", field)
    assert "modulo" not in str(err)


# ------------------------------------------------------------------------------------- PEFT adapters
@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    lora = fj.init_lora(TINY, fj.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False), jax.random.key(1))
    out = tmp_path_factory.mktemp("peft") / "adapter"
    fj.export_peft(lora, out)
    return lora, out


def _edited_adapter(src, tmp_path, config_change=None, raw=None, weights=None):
    out = tmp_path / "adapter"
    shutil.copytree(src, out)
    if config_change is not None:
        cfg = json.loads((out / ADAPTER_CONFIG).read_text())
        config_change(cfg)
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    if raw == "dir":
        (out / ADAPTER_CONFIG).unlink()
        (out / ADAPTER_CONFIG).mkdir()
    elif raw is not None:
        (out / ADAPTER_CONFIG).write_bytes(raw)
    if weights is not None:
        tensors = load_file(str(out / ADAPTER_WEIGHTS))
        weights(tensors)
        save_file(tensors, str(out / ADAPTER_WEIGHTS))
    return out


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(config_change=lambda c: c.update(lora_dropout="abc")), ["lora_dropout", "'abc'"]),
        (dict(config_change=lambda c: c.update(alpha_pattern={"q_proj": "big"})), ["alpha_pattern['q_proj']", "'big'"]),
        (dict(config_change=lambda c: c.update(rank_pattern={"q_proj": True})), ["rank_pattern['q_proj']"]),
        (
            dict(config_change=lambda c: c.update(layers_to_transform=[0], layers_pattern="layers.([")),
            ["layers_pattern", "not a valid regular expression"],
        ),
        (dict(config_change=lambda c: c.update(exclude_modules="([")), ["exclude_modules", "regular expression"]),
        (dict(config_change=lambda c: c.update(use_rslora="false")), ["use_rslora", "true or false"]),
        (dict(config_change=lambda c: c.update(lora_alpha=float("inf"))), ["lora_alpha"]),
        (dict(config_change=lambda c: c.update(layers_to_transform=[True])), ["layers_to_transform"]),
        (dict(raw=b"\xff\xfe{"), ["not UTF-8"]),
        (dict(raw="dir"), ["is a directory"]),
        (dict(weights=lambda t: next(iter(t.values())).__setitem__((0, 0), np.nan)), ["NaN or Inf"]),
    ],
)
def test_load_peft_refuses_malformed_adapters(peft_dir, tmp_path, change, words):
    _, src = peft_dir
    _raises(FlexoraError, lambda: fj.load_peft(_edited_adapter(src, tmp_path, **change), TINY), *words)


def test_a_nan_adapter_is_neither_exported_nor_loaded_nor_scored(peft_dir, tiny, tmp_path):
    lora, src = peft_dir
    loaded = fj.load_peft(src, TINY)
    np.testing.assert_allclose(loaded.weights["q_proj"]["b"], lora.weights["q_proj"]["b"])
    nan_lora = dataclasses.replace(lora, weights=jax.tree.map(lambda x: x * jnp.nan, lora.weights))
    _raises(NumericsError, lambda: fj.export_peft(nan_lora, tmp_path / "nan"), "export_peft", "NaN or Inf")
    assert not (tmp_path / "nan" / ADAPTER_WEIGHTS).exists()
    params, _ = tiny
    records = [MCRecord("t", i, "Pick one:", ("alpha", "beta"), 0) for i in range(2)]
    _raises(
        NumericsError,
        lambda: fj.evaluate(
            fj.nnx.LlamaForCausalLM.from_params(TINY, params, nan_lora), CharTokenizer(32), records, progress=False
        ),
        "NaN",
    )


# ------------------------------------------------------------------------------ NNX adapters on disk
@pytest.fixture(scope="module")
def nnx_adapter(tmp_path_factory):
    model = add_lora(Stack(nnx.Rngs(0)), TARGETS, rank=2, rngs=nnx.Rngs(1))
    out = save_adapter(model, tmp_path_factory.mktemp("nnx") / "adapter")
    return out


def _edit_json(path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def _drop_site_key(cfg):
    next(iter(cfg["sites"].values())).pop("alpha")
    return cfg


def _bool_rank(cfg):
    next(iter(cfg["sites"].values()))["rank"] = True
    return cfg


@pytest.mark.parametrize(
    "case, words",
    [
        (lambda d: _edit_json(d / "adapter_config.json", lambda c: [c]), ["must be a mapping", "list"]),
        (lambda d: _edit_json(d / "adapter_config.json", lambda c: c | {"sites": "layers.0"}), ["sites", "mapping"]),
        (
            lambda d: _edit_json(d / "adapter_config.json", _drop_site_key),
            ["sites['layers.0']", "missing key(s) ['alpha']"],
        ),
        (
            lambda d: _edit_json(d / "adapter_config.json", lambda c: c | {"surprise": 1}),
            ["unknown key(s) ['surprise']"],
        ),
        (lambda d: _edit_json(d / "adapter_config.json", _bool_rank), ["sites['layers.0'].rank", "True"]),
        (
            lambda d: (d / "adapter.safetensors").write_bytes((d / "adapter.safetensors").read_bytes()[:40]),
            ["adapter.safetensors", "not a readable safetensors file"],
        ),
        (lambda d: (d / "adapter.safetensors").write_bytes(b"garbage" * 9), ["not a readable safetensors file"]),
        (lambda d: (d / "adapter.safetensors").unlink(), ["adapter.safetensors is missing"]),
        (lambda d: (d / "adapter_config.json").write_bytes(b"\xff\xfe"), ["not UTF-8"]),
    ],
)
def test_load_adapter_refuses_malformed_directories(nnx_adapter, tmp_path, case, words):
    directory = tmp_path / "adapter"
    shutil.copytree(nnx_adapter, directory)
    case(directory)
    _raises(CheckpointError, lambda: load_adapter(Stack(nnx.Rngs(0)), directory), *words)


def test_nnx_adapters_refuse_nan_and_bad_peft_names(nnx_adapter, tmp_path):
    model = load_adapter(Stack(nnx.Rngs(0)), nnx_adapter)
    assert set(lora_sites(model)) == {"layers.0", "layers.1", "layers.2"}
    _raises(
        ConfigError, lambda: save_peft(model, tmp_path / "p", peft_name=lambda path, layer: None), "peft_name", "None"
    )
    model.layers[1].lora_b.set_value(jnp.full(model.layers[1].lora_b.shape, jnp.nan))
    _raises(NumericsError, lambda: save_adapter(model, tmp_path / "a"), "layers.1.lora_b")
    _raises(NumericsError, lambda: save_peft(model, tmp_path / "p"), "NaN")
    directory = tmp_path / "nan"
    shutil.copytree(nnx_adapter, directory)
    tensors = load_file(str(directory / "adapter.safetensors"))
    tensors["layers.2.lora_a"][0, 0] = np.inf
    save_file(tensors, str(directory / "adapter.safetensors"))
    _raises(CheckpointError, lambda: load_adapter(Stack(nnx.Rngs(0)), directory), "layers.2.lora_a")


# -------------------------------------------------------------------------------------- evaluate
class TinyLM(nnx.Module):
    """model(input_ids) -> logits [b, t, width], NaN everywhere with ``nan``."""

    def __init__(self, width: int = 64, nan: bool = False):
        rngs = nnx.Rngs(0)
        self.embed, self.head, self.nan = nnx.Embed(64, 8, rngs=rngs), nnx.Linear(8, width, rngs=rngs), nan

    def __call__(self, tokens):
        logits = self.head(self.embed(tokens))
        return logits * jnp.nan if self.nan else logits


RECORDS = [MCRecord("t", i, "The answer is", ("yes indeed", "no"), 0) for i in range(3)]


@pytest.mark.parametrize(
    "model, tokenizer, exc_type, words",
    [
        (TinyLM(nan=True), CharTokenizer(), NumericsError, ["NaN"]),
        (TinyLM(width=10), CharTokenizer(), ConfigError, ["shape (32, 24, 10)", "64 tokens"]),
        (TinyLM(width=60), CharTokenizer(), ConfigError, ["60", "64 tokens"]),
        (TinyLM(), None, ConfigError, ["tokenizer", "None"]),
    ],
    ids=["nan-logits", "10-wide", "narrower-than-tokenizer", "no-tokenizer"],
)
def test_evaluate_nnx_refuses_what_would_score_nonsense(model, tokenizer, exc_type, words):
    _raises(exc_type, lambda: fj.evaluate(model, tokenizer, RECORDS, progress=False), *words)


def test_evaluate_checks_its_inputs(tiny):
    params, _ = tiny
    result = fj.evaluate(TinyLM(), CharTokenizer(), RECORDS, progress=False)
    assert result["t"]["n"] == 3
    _raises(
        DataError,
        lambda: fj.evaluate(
            fj.nnx.LlamaForCausalLM.from_params(TINY, params), CharTokenizer(64), RECORDS, progress=False
        ),
        "token id",
        "vocabulary of 32",
    )
    _raises(ConfigError, lambda: fj.evaluate({"vocab_size": 32}, CharTokenizer(32), RECORDS), "NNX language model")
    _raises(DataError, lambda: fj.evaluate(TinyLM(), CharTokenizer(), None), "evaluate", "None")


# ------------------------------------------------------------- the re-check of issue 30: every public door
class SmallLM(nnx.Module):
    """An NNX language model of three residual layers over a 32-token vocabulary: logits [b, t, 32]."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])
        self.head = nnx.Linear(8, 32, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def _small_lm():
    return add_lora(SmallLM(nnx.Rngs(0)), TARGETS, rank=2, rngs=nnx.Rngs(1))


SEARCH = fj.SearchConfig(hypergradient="first_order", inner_steps=1, steps=1, batch_size=4, val_batch_size=4)
FINETUNE = fj.FinetuneConfig(max_steps=1, batch_size=4)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(seed=-1), ["seed", ">= 0", "-1"]),
        (dict(seed=True), ["seed", "True (bool)"]),
        (dict(seed="0"), ["seed", "'0' (str)"]),
        (dict(seed=1.5), ["seed", "integer"]),
        (dict(checkpoint_every=0), ["checkpoint_every", ">= 1"]),
        (dict(checkpoint_every=True), ["checkpoint_every", "True"]),
        (dict(checkpoint_dir=5), ["checkpoint_dir", "5 (int)"]),
        (dict(callback=5), ["callback", "5 (int)"]),
        (dict(hooks=None), ["hooks", "None"]),
        (dict(loss_fn=5), ["loss_fn", "5 (int)"]),
        (dict(progress="yes"), ["progress", "true or false"]),
        (dict(mesh=5), ["mesh", "Mesh"]),
    ],
)
@pytest.mark.parametrize("stage", ["search", "finetune"])
def test_search_and_finetune_check_their_keyword_arguments(stage, kwargs, words):
    """Each raised a TypeError / numpy ValueError / AttributeError, or (a bool seed, checkpoint_every=0, a
    string progress) ran silently with another meaning."""
    model, data = _small_lm(), _data(n=8, vocab=32)
    if stage == "search":
        call = lambda: fj.search(model, SEARCH, data, data, **kwargs)  # noqa: E731
    else:
        call = lambda: fj.finetune(model, data, FINETUNE, **kwargs)  # noqa: E731
    _raises(ConfigError, call, f"fj.{stage}", *words)


@pytest.mark.parametrize("stage", ["search", "finetune"])
def test_a_token_id_past_a_foreign_models_logits_is_named_not_blamed_on_the_learning_rate(stage):
    """An NNX model's default causal-LM loss scores ids against its logits' width: an id past it was a NaN
    loss "at step 1: lower the learning rate"."""
    data = _data(n=8, vocab=32)
    data["input_ids"][2, 3] = 40
    model = _small_lm()
    if stage == "search":
        call = lambda: fj.search(model, SEARCH, _data(n=8, vocab=32), data)  # noqa: E731
    else:
        call = lambda: fj.finetune(model, data, FINETUNE)  # noqa: E731
    err = _raises(DataError, call, "['input_ids']", "row 2", "40", "[0, 32)")
    assert "learning rate" not in str(err)


@pytest.mark.parametrize(
    "config, words",
    [
        (fj.FinetuneConfig(grad_accum=100000, batch_size=4), ["config.grad_accum 100000", "grad_accum <= 2"]),
        (fj.FinetuneConfig(epochs=1e300, max_steps=0, batch_size=4), ["config.epochs 1e+300", "step counter"]),
    ],
    ids=["grad-accum", "epochs"],
)
def test_finetune_sizes_are_checked_by_the_api_as_by_the_command(config, words):
    """The command refused them; fj.finetune ran 100000 micro-steps per optimizer step (effectively a hang)
    or overflowed inside jit (OverflowError)."""
    _raises(ConfigError, lambda: fj.finetune(_small_lm(), _data(n=8, vocab=32), config), "fj.finetune", *words)


def test_select_refuses_what_is_not_gates():
    for gates in (None, {"layer": np.zeros(3)}):
        _raises(ConfigError, lambda gates=gates: fj.select(_small_lm(), gates), "fj.select: gates", "Gates")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(max_new_tokens=True), ["max_new_tokens", "True (bool)"]),
        (dict(max_new_tokens=None), ["max_new_tokens", "None"]),
        (dict(temperature="0.5"), ["temperature", "'0.5' (str)"]),
        (dict(temperature=True), ["temperature", "True (bool)"]),
        (dict(top_k=2.5), ["top_k", "integer"]),
        (dict(top_p=None), ["top_p", "None"]),
        (dict(batch_size=2.5), ["batch_size", "integer"]),
        (dict(batch_size=True), ["batch_size", "True"]),
        (dict(seed="x"), ["seed", "'x'"]),
        (dict(seed=True), ["seed", "True"]),
        (dict(eos_token_id=99), ["eos_token_id", "99", "0..31"]),
        (dict(eos_token_id="x"), ["eos_token_id", "'x'"]),
        (dict(prompts=[[1.7, 2.2]]), ["prompts[0]", "integers", "1.7"]),
        (dict(prompts=[[True, 2]]), ["prompts[0]", "True"]),
        (dict(prompts=[None]), ["prompts[0]", "None"]),
        (dict(prompts=5), ["prompts", "5 (int)"]),
        (dict(stop="\n", tokenizer=CharTokenizer(32)), ["stop", "list of non-empty strings"]),
        (dict(tokenizer=CharTokenizer(32)), ["tokenizer", "decode"]),
        (dict(config={"vocab_size": 32}), ["generate: config", "ModelConfig"]),
    ],
)
def test_generate_checks_every_argument(tiny, kwargs, words):
    """Raw TypeErrors before, or silently another value: max_new_tokens=True generated 1 token, top_k=2.5 ran
    as 2, float ids were truncated, an eos id past the vocabulary padded with it and returned NaN log-probs."""
    params, _ = tiny
    args = dict(config=TINY, prompts=[[1, 2]], max_new_tokens=2) | kwargs
    _raises(FlexoraError, lambda: fj.generate(args.pop("config"), params, args.pop("prompts"), **args), *words)


@pytest.mark.parametrize(
    "records, kwargs, exc_type, words",
    [
        ({"t": None}, {}, DataError, ["task 't'", "None"]),
        ({"t": [1, 2]}, {}, DataError, ["task 't'", "records[0]", "1 (int)"]),
        ([1, 2], {}, DataError, ["task_or_records[0]", "1 (int)"]),
        (RECORDS, dict(return_per_example="x"), ConfigError, ["return_per_example", "true or false"]),
        (RECORDS, dict(progress="no"), ConfigError, ["progress", "true or false"]),
    ],
)
def test_evaluate_checks_records_and_flags(records, kwargs, exc_type, words):
    _raises(exc_type, lambda: fj.evaluate(TinyLM(), CharTokenizer(), records, **({"progress": False} | kwargs)), *words)


class IntLogits(nnx.Module):
    def __call__(self, tokens):
        return jnp.zeros(tokens.shape + (64,), jnp.int32)


def test_evaluate_refuses_integer_logits():
    """They were cast and scored as a uniform distribution (accuracy of the first choice)."""
    _raises(
        ConfigError, lambda: fj.evaluate(IntLogits(), CharTokenizer(), RECORDS, progress=False), "int32", "floating"
    )


def test_adapters_check_their_arguments_and_export_merged_refuses_nan_and_other_models(tiny, peft_dir, tmp_path):
    params, _ = tiny
    lora, src = peft_dir
    _raises(ConfigError, lambda: fj.export_peft(None, tmp_path / "p"), "export_peft: lora", "LoraParams")
    _raises(ConfigError, lambda: fj.export_peft(lora, None), "export_peft: out_dir", "None")
    _raises(ConfigError, lambda: fj.load_peft(src, None), "load_peft: config", "ModelConfig")
    _raises(ConfigError, lambda: fj.export_merged(TINY, params, None, tmp_path / "m"), "export_merged: lora")
    nan_lora = dataclasses.replace(lora, weights=jax.tree.map(lambda x: x * jnp.nan, lora.weights))
    _raises(NumericsError, lambda: fj.export_merged(TINY, params, nan_lora, tmp_path / "nan"), "NaN or Inf")
    deeper = dataclasses.replace(TINY, num_hidden_layers=3)
    _raises(
        ConfigError, lambda: fj.export_merged(deeper, params, lora, tmp_path / "deep"), "export_merged", "(3, 32, 16)"
    )
    wider = dataclasses.replace(TINY, hidden_size=32, intermediate_size=64)
    _raises(ConfigError, lambda: fj.export_merged(wider, params, lora, tmp_path / "wide"), "shape", "(32, 32)")
    assert not any(tmp_path.iterdir())  # nothing was written


def test_init_lora_and_init_gates_check_their_arguments():
    _raises(ConfigError, lambda: fj.init_lora(TINY, {"r": 2}, jax.random.key(0)), "init_lora: lora_config")
    _raises(ConfigError, lambda: fj.init_lora(TINY, fj.LoraConfig(r=2), None), "init_lora: key", "PRNG key")
    _raises(ConfigError, lambda: fj.init_lora(TINY, fj.LoraConfig(r=2), 0), "init_lora: key")
    assert fj.init_lora(TINY, fj.LoraConfig(r=2), jax.random.PRNGKey(0)).weights  # the legacy key still works
    _raises(ConfigError, lambda: fj.init_gates("layer", True), "num_layers", "True (bool)")
    _raises(ConfigError, lambda: fj.init_gates("layer", 0), "num_layers", ">= 1")


@pytest.mark.parametrize(
    "field, pattern",
    [
        ("rank_pattern", {"zzz": 2}),
        ("rank_pattern", {"layers.9.self_attn.q_proj": 2}),
        ("alpha_pattern", {"o_proj": 4.0}),  # a module the config does not target
    ],
)
def test_a_pattern_key_matching_no_adapted_module_is_refused(field, pattern):
    """It was ignored: the LoRA trained at rank r where the user asked for another (like add_lora's ranks)."""
    cfg = fj.LoraConfig(r=2, target_modules=("q_proj", "v_proj"), **{field: pattern})
    _raises(ConfigError, lambda: fj.init_lora(TINY, cfg, jax.random.key(0)), f"LoraConfig.{field}", next(iter(pattern)))
    ok = fj.LoraConfig(r=2, target_modules=("q_proj", "v_proj"), rank_pattern={"layers.1.self_attn.q_proj": 3})
    assert fj.make_spec(TINY, ok).rank_of("q_proj") == (2, 3)


def test_nnx_functions_check_their_arguments(nnx_adapter, tmp_path):
    model = load_adapter(Stack(nnx.Rngs(0)), nnx_adapter)
    before = jax.tree.map(np.asarray, nnx.state(model))
    _raises(ConfigError, lambda: save_adapter(model, tmp_path / "a", selection={"layers": [0]}), "selection")
    _raises(ConfigError, lambda: save_adapter(model, None), "save_adapter: directory")
    _raises(ConfigError, lambda: save_peft(model, tmp_path / "p", peft_name=5), "peft_name", "5 (int)")
    _raises(ConfigError, lambda: load_adapter(None, nnx_adapter), "load_adapter: model")
    sel = Selection((0,), {"layers.0": (0,)})
    _raises(ConfigError, lambda: fj.nnx.apply_selection(model, {"layers": [0]}, rngs=nnx.Rngs(0)), "selection")
    _raises(ConfigError, lambda: fj.nnx.apply_selection(model, sel, rngs=None), "apply_selection: rngs")
    _raises(ConfigError, lambda: fj.nnx.apply_selection(model, sel, gates="bogus", rngs=nnx.Rngs(0)), "gates")
    _raises(ConfigError, lambda: fj.nnx.merge_lora(None), "merge_lora: model")
    _raises(ConfigError, lambda: fj.nnx.remove_lora(None), "remove_lora: model")
    assert set(lora_sites(model)) == {"layers.0", "layers.1", "layers.2"}  # unchanged on every error
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)
    assert not any(tmp_path.iterdir())


def test_llama_from_params_checks_config_and_params(tiny):
    params, _ = tiny
    _raises(ConfigError, lambda: fj.nnx.LlamaForCausalLM.from_params({"vocab_size": 32}, params), "config")
    wider = dataclasses.replace(TINY, hidden_size=32, intermediate_size=64)
    _raises(ConfigError, lambda: fj.nnx.LlamaForCausalLM.from_params(wider, params), "LlamaForCausalLM", "shape")
    _raises(ConfigError, lambda: fj.nnx.LlamaForCausalLM.from_params(TINY, [1]), "params")


@pytest.mark.parametrize(
    "data, words",
    [
        ({"layers": [-1], "modules": {"a": [-1]}}, ["selection['layers']", "[-1]", ">= 0"]),
        ({"layers": [0, 0], "modules": {"a": [0]}}, ["selection['layers']", "distinct"]),
        ({"layers": [0], "modules": {"a": [0, -2]}}, ["selection['modules']['a']", ">= 0"]),
    ],
)
def test_selection_from_json_refuses_negative_and_repeated_layers(data, words):
    """A negative layer counted from the end of the model's layers."""
    _raises(ConfigError, lambda: Selection.from_json(data), *words)


def test_a_bytes_regex_and_a_string_flag_are_refused():
    import re

    model = Stack(nnx.Rngs(0))
    _raises(
        ConfigError,
        lambda: add_lora(model, re.compile(rb"layers\.\d"), rngs=nnx.Rngs(1)),
        "targets",
        "regular expression",
    )
    assert lora_sites(model) == {}
    _raises(ConfigError, lambda: fj.sft_arrays(PAIRS, CharTokenizer(), 64, add_eos="no"), "add_eos")


def test_model_io_and_dataset_loss_check_their_arguments(tiny, tmp_path):
    """A string flag was taken as true, an unknown dtype was a raw TypeError, NaN params were written, and
    dataset_loss scored ids past the vocabulary as NaN and a batch_size of 0 as a raw ValueError."""
    params, directory = tiny
    _raises(ConfigError, lambda: fj.load_model(directory, check_finite="no"), "load_model: check_finite", "'no'")
    _raises(ConfigError, lambda: fj.load_model(directory, allow_pickle=1), "load_model: allow_pickle")
    _raises(ConfigError, lambda: fj.save_model(TINY, params, tmp_path / "m", dtype="float99"), "float99")
    _raises(ConfigError, lambda: fj.save_model(TINY, params, tmp_path / "m", dtype="int8"), "floating")
    nan_params = jax.tree.map(lambda x: x * jnp.nan, params)
    _raises(NumericsError, lambda: fj.save_model(TINY, nan_params, tmp_path / "m"), "save_model: params", "NaN")
    assert not any(tmp_path.iterdir())  # nothing was written
    data = {"input_ids": np.ones((4, 8), np.int32), "loss_mask": np.ones((4, 8), np.float32)}
    _raises(ConfigError, lambda: fj.dataset_loss(TINY, params, None, data, batch_size=0), "batch_size", ">= 1")
    past = {**data, "input_ids": np.full((4, 8), TINY.vocab_size, np.int32)}
    _raises(DataError, lambda: fj.dataset_loss(TINY, params, None, past), "dataset_loss: data", "outside")
    assert math.isfinite(fj.dataset_loss(TINY, params, None, data, batch_size=2))
