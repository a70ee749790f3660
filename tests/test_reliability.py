"""Bad input, table-driven: every case exits 2 from the command (one paragraph, no traceback) and raises
the matching :class:`FlexoraError` subclass from the API, with a message naming what is wrong; no case
touches a run directory that already exists. Plus: a corrupt latest checkpoint falls back to the previous
one with a warning.

The cases that need a model use the real stories260K checkpoint (converted once per session) and a
synthetic PIQA data folder, so nothing here trains or compiles a search.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flexora_jax import cli, pipeline
from flexora_jax.errors import CheckpointError, ConfigError, DataError, FlexoraError
from flexora_jax.pipeline.config import RunConfig, load_config, save_config
from flexora_jax.pipeline.workspace import prepare

PIQA_POOL = 900  # piqa is re-split from one labelled file: 338 validation + 500 test + the rest for training


# ------------------------------------------------------------------------------------------- fixtures
def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A run directory that already holds a finished run's files (must survive every bad command)."""
    run = tmp_path_factory.mktemp("existing") / "run"
    (run / "adapter").mkdir(parents=True)
    save_config(RunConfig(output_dir=str(run)), run / "config.yaml")
    (run / "eval.json").write_text('{"planted": {"test_loss": 2.5, "n": 500}}\n')
    (run / "metrics.jsonl").write_text('{"stage": "search_layer", "step": 1, "val_loss": 3.0}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return run


def _piqa_rows(n: int = PIQA_POOL) -> tuple[list[str], list[str]]:
    rows = [
        json.dumps({"goal": f"How do I open jar {i}?", "sol1": "Turn the lid.", "sol2": "Eat the lid."})
        for i in range(n)
    ]
    return rows, [str(i % 2) for i in range(n)]


def _write_piqa(root: Path, rows: list[str] | bytes, labels: list[str]) -> Path:
    d = root / "piqa"
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, bytes):
        (d / "valid.jsonl").write_bytes(rows)
    else:
        (d / "valid.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (d / "valid-labels.lst").write_text("\n".join(labels) + "\n")
    return root


def _data_case(tmp: Path, kind: str) -> Path:
    rows, labels = _piqa_rows()
    if kind == "missing_folder":
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp
    if kind == "bad_json":
        rows[5] = '{"goal": "x", "sol1": '
    elif kind == "missing_field":
        rows[7] = json.dumps({"goal": "x", "sol1": "y"})
    elif kind == "wrong_type":
        rows[3] = json.dumps({"goal": 5, "sol1": "y", "sol2": "z"})
    elif kind == "not_object":
        rows[2] = "[1, 2, 3]"
    elif kind == "label_range":
        labels[11] = "7"
    elif kind == "misaligned":
        labels = labels[:-3]
    elif kind == "empty":
        rows, labels = [], []
    elif kind == "non_utf8":
        raw = ("\n".join(rows) + "\n").encode("utf-8")
        return _write_piqa(tmp, raw[:100] + b"\xff\xfe\xfa" + raw[100:], labels)
    elif kind == "too_long":
        long = " ".join(["once upon a time there was a little dog"] * 20)
        rows = [json.dumps({"goal": "Tell a story.", "sol1": long, "sol2": long}) for _ in rows]
    return _write_piqa(tmp, rows, labels)


def _model_case(src: Path, tmp: Path, kind: str) -> Path:
    """A copy of the converted stories260K model directory, broken in one way."""
    if kind == "missing_dir":
        return tmp / "no-such-model"
    d = tmp / "model"
    shutil.copytree(src, d)
    weights = d / "model.safetensors"
    if kind == "no_config":
        (d / "config.json").unlink()
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "misshaped":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = cfg["intermediate_size"] + 8
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "pickle_only":
        weights.unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle")
    elif kind == "tokenizer_mismatch":
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(d))
        tok.add_tokens([f"<extra_{i}>" for i in range(20)])
        tok.save_pretrained(str(d))
    elif kind == "is_file":
        return weights
    elif kind == "bad_config_json":
        (d / "config.json").write_text("{not json")
    return d


# ----------------------------------------------------------------------------------------- the table
E = pytest.param
# (case id, argv builder key, extra args, exception type, message keywords)
CONFIG_CASES = [
    E(["--lora.rr=3"], ConfigError, ["unknown key", "lora.rr", "did you mean"], id="unknown-key"),
    E(["--lora.r=0"], ConfigError, ["LoraConfig.r", "positive integer", "0"], id="r-zero"),
    E(["--lora.r=abc"], ConfigError, ["lora.r", "abc"], id="r-not-int"),
    E(["--lora.lora_dropout=1.5"], ConfigError, ["lora_dropout", "[0, 1)", "1.5"], id="dropout-range"),
    E(["--lora.target_modules=[q_proj,fc9]"], ConfigError, ["target_modules", "fc9", "valid choices"], id="module"),
    E(["--search.inner_steps=0"], ConfigError, ["search.inner_steps", ">= 1", "0"], id="K-zero"),
    E(["--search.steps=-4"], ConfigError, ["search.steps", ">= 1", "-4"], id="steps-negative"),
    E(["--search.inner_lr=-0.1"], ConfigError, ["search.inner_lr", "(0, 10)", "-0.1"], id="inner-lr"),
    E(["--search.outer_lr=1e9"], ConfigError, ["search.outer_lr", "(0, 10)"], id="outer-lr-huge"),
    E(["--finetune.lr=100"], ConfigError, ["finetune.lr", "(0, 10)", "100"], id="finetune-lr"),
    E(["--finetune.batch_size=0"], ConfigError, ["finetune.batch_size", ">= 1"], id="batch-zero"),
    E(["--search.hypergradient=magic"], ConfigError, ["search.hypergradient", "magic", "unrolled"], id="estimator"),
    E(["--selection.rule=top_k"], ConfigError, ["selection.rule", "top_k >= 1"], id="top-k-without-k"),
    E(["--selection.rule=topk"], ConfigError, ["selection.rule", "topk", "top_k"], id="one-spelling"),
    E(["--lora.layers_to_transform=[-1]"], ConfigError, ["layers_to_transform", "negative"], id="layer-negative"),
    E(
        ["--lora.layers_to_transform=[9]"],
        ConfigError,
        ["layers_to_transform", "[9]", "6 layers", "0..5"],
        id="layer-out-of-range",
    ),
    E(["--baseline_k=7", "--compare=[random_k]"], ConfigError, ["baseline_k", "7", "6 layers"], id="k-too-big"),
    E(["--method=nope"], ConfigError, ["method must be one of", "nope"], id="method"),
    E(["--compare=[lora,bogus]"], ConfigError, ["compare", "bogus", "allowed"], id="compare"),
    E(["--seed=abc"], ConfigError, ["seed", "abc"], id="seed-type"),
    E(["--checkpoint.keep=0"], ConfigError, ["checkpoint.keep", ">= 1"], id="keep-zero"),
    E(["--search.gates=rank"], ConfigError, ["unknown key", "search.gates"], id="gates-per-method"),
    E(["--task.name=piqa"], ConfigError, ["needs a base model", "model.path"], id="task-without-model"),
    E(
        ["--model.path=/m", "--model.llama2c=/c", "--model.tokenizer_model=/t"],
        ConfigError,
        ["exclusive"],
        id="two-models",
    ),
    E(["--task.planted.num_planted=9"], ConfigError, ["num_planted", "num_layers"], id="planted-range"),
    E(["--model.allow_pickle=maybe"], ConfigError, ["allow_pickle"], id="bool-type"),
    # settings that would be silently ignored, or fail late (issue 30)
    E(["--model.dtype=float16"], ConfigError, ["model.dtype 'float16'", "planted", "float32"], id="planted-dtype"),
    E(
        ["--method=adalora", "--lora.layers_to_transform=[0]"],
        ConfigError,
        ["adalora", "lora.layers_to_transform"],
        id="adalora-layers",
    ),
    E(
        ["--compare=[adalora]", "--lora.rank_pattern={q_proj: 2}"],
        ConfigError,
        ["adalora", "lora.rank_pattern"],
        id="adalora-rank-pattern",
    ),
    E(
        ["--task.name=piqa", "--model.path=/m", "--task.split_seed=-1"],
        ConfigError,
        ["task.split_seed", "-1"],
        id="split-seed-negative",
    ),
    E(["--search.inner_eps_root=.inf"], ConfigError, ["search.inner_eps_root", "finite"], id="eps-root-inf"),
    E(["--task.planted.layer_kl=.inf"], ConfigError, ["task.planted.layer_kl", "finite"], id="layer-kl-inf"),
]


def _assert_cli_fails(argv: list[str], keywords: list[str], capsys, status: int = 2) -> None:
    capsys.readouterr()
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert "Traceback" not in err and flat.startswith("flexora-jax: error:"), err
    for word in keywords:
        assert word in flat, f"{word!r} not in: {flat}"


def _assert_api_fails(make, exc_type, keywords) -> None:
    with pytest.raises(exc_type) as info:
        make()
    assert isinstance(info.value, FlexoraError)
    msg = " ".join(str(info.value).split())
    for word in keywords:
        assert word in msg, f"{word!r} not in: {msg}"


@pytest.mark.parametrize("args, exc_type, keywords", CONFIG_CASES)
def test_bad_config_values(args, exc_type, keywords, existing_run, capsys, monkeypatch):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    before = _snapshot(existing_run)
    _assert_cli_fails(["run", "--quiet", "--output-dir", str(existing_run), *args], keywords, capsys)
    _assert_api_fails(
        lambda: pipeline.run(load_config(overrides=[f"--output_dir={existing_run}", *args]), resume=True),
        exc_type,
        keywords,
    )
    assert _snapshot(existing_run) == before


@pytest.mark.parametrize(
    "text, keywords",
    [
        E("lora: {r: 4\n", ["not valid YAML"], id="yaml-syntax"),
        E("- a\n- b\n", ["must be a mapping"], id="yaml-list"),
        E(
            "!!python/object/apply:os.system ['echo pwned']\n",
            ["not valid YAML", "python/object"],
            id="yaml-unsafe-tag",
        ),
        E("lora:\n  r: 4\n  alpha: 3\n", ["unknown key 'lora.alpha'", "lora_alpha"], id="yaml-unknown-nested"),
        E("search: 5\n", ["search", "must be a mapping"], id="yaml-section-scalar"),
        E(None, ["does not exist"], id="config-missing"),
    ],
)
def test_bad_config_files(text, keywords, tmp_path, existing_run, capsys):
    before = _snapshot(existing_run)
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    _assert_cli_fails(["run", "--config", str(path), "--output-dir", str(existing_run)], [str(path), *keywords], capsys)
    _assert_api_fails(lambda: load_config(path), ConfigError, keywords)
    assert _snapshot(existing_run) == before


def test_run_dir_misuse(existing_run, tmp_path, capsys):
    before = _snapshot(existing_run)
    # a fresh run into a directory that holds one
    _assert_cli_fails(["run", "--output-dir", str(existing_run)], ["already holds a run", "--resume"], capsys)
    # --resume with a config that differs from the directory's
    _assert_cli_fails(
        ["run", "--resume", "--output-dir", str(existing_run), "--seed=5"], ["differs", "seed: 0 -> 5"], capsys
    )
    # --resume of a directory that holds no run
    _assert_cli_fails(
        ["run", "--resume", "--output-dir", str(tmp_path / "fresh")], ["--resume", "holds no run"], capsys
    )
    assert not (tmp_path / "fresh" / "config.yaml").exists()
    _assert_api_fails(
        lambda: prepare(RunConfig(output_dir=str(tmp_path / "fresh2")), resume=True), ConfigError, ["holds no run"]
    )
    # an override that is not --key=value
    _assert_cli_fails(["run", "--output-dir", str(existing_run), "--lora.r"], ["--section.key=value"], capsys)
    assert _snapshot(existing_run) == before


DATA_CASES = [
    E("missing_folder", ["piqa", "not found", "data_dir"], id="data-folder-missing"),
    E("bad_json", ["valid.jsonl:6", "not valid JSON"], id="data-bad-json"),
    E("missing_field", ["valid.jsonl:8", "missing field 'sol2'"], id="data-missing-field"),
    E("wrong_type", ["valid.jsonl:4", "'goal'", "expected str"], id="data-wrong-type"),
    E("not_object", ["valid.jsonl:3", "expected a JSON object"], id="data-not-object"),
    E("label_range", ["valid-labels.lst", "'7'", "out of range", "0 or 1"], id="data-label-range"),
    E("misaligned", ["900 examples", "897 labels", "line-aligned"], id="data-misaligned"),
    E("empty", ["piqa"], id="data-empty-split"),
    E("non_utf8", ["piqa", "not UTF-8"], id="data-non-utf8"),
    E("too_long", ["longer than task.max_length", "16"], id="data-context-too-long"),
]


def _task_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--output-dir",
        str(out),
        "--task.name=piqa",
        f"--model.path={model}",
        f"--task.data_dir={data}",
        "--task.n_train=8",
        "--task.n_val=4",
        "--task.n_test=4",
        "--compare=[]",
        *extra,
    ]


@pytest.mark.parametrize("kind, keywords", DATA_CASES)
def test_bad_task_data(kind, keywords, tinystories_dir, tmp_path, existing_run, capsys, monkeypatch):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    before = _snapshot(existing_run)
    data = _data_case(tmp_path / "data", kind)
    extra = ["--task.max_length=16"] if kind == "too_long" else []
    out = tmp_path / "out"
    _assert_cli_fails(["run", "--quiet", *_task_args(tinystories_dir, data, out, *extra)], keywords, capsys)
    assert not (out / "config.yaml").exists()  # a failed fresh run leaves no half-made run behind
    args = _task_args(tinystories_dir, data, tmp_path / "out-api", *extra)
    config = load_config(overrides=[f"--output_dir={args[1]}", *args[2:]])
    _assert_api_fails(lambda: prepare(config), DataError, keywords)
    assert _snapshot(existing_run) == before


MODEL_CASES = [
    E("missing_dir", CheckpointError, ["no-such-model", "does not exist"], id="model-missing"),
    E("no_config", CheckpointError, ["config.json"], id="model-no-config"),
    E("bad_config_json", CheckpointError, ["config.json", "not valid JSON"], id="model-config-json"),
    E("truncated", CheckpointError, ["model.safetensors", "not a readable safetensors"], id="model-truncated"),
    E("misshaped", CheckpointError, ["has shape", "expected", "config.json"], id="model-misshaped"),
    E("pickle_only", CheckpointError, ["pickle", "safetensors only", "allow_pickle"], id="model-pickle-refused"),
    E(
        "tokenizer_mismatch",
        CheckpointError,
        ["tokenizer has 532 tokens", "vocab_size is 512"],
        id="model-tokenizer-mismatch",
    ),
    E("is_file", CheckpointError, ["is a file", "directory"], id="model-is-file"),
]


@pytest.mark.parametrize("kind, exc_type, keywords", MODEL_CASES)
def test_bad_model_checkpoints(
    kind, exc_type, keywords, tinystories_dir, data_dir, tmp_path, existing_run, capsys, monkeypatch
):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    before = _snapshot(existing_run)
    model = _model_case(tinystories_dir, tmp_path, kind)
    out = tmp_path / "out"
    _assert_cli_fails(["run", "--quiet", *_task_args(model, data_dir, out)], keywords, capsys)
    args = _task_args(model, data_dir, tmp_path / "out-api")
    config = load_config(overrides=[f"--output_dir={args[1]}", *args[2:]])
    _assert_api_fails(lambda: prepare(config), exc_type, keywords)
    assert _snapshot(existing_run) == before


# -------------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A real PEFT export of a small LoRA (non-zero B) for a 3-layer model."""
    import jax

    from flexora_jax.adapters import export_peft
    from flexora_jax.config import LoraConfig, ModelConfig
    from flexora_jax.lora import init_lora

    mc = ModelConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    lora = init_lora(mc, LoraConfig(r=2, target_modules=("q_proj", "v_proj")), jax.random.key(0))
    lora = jax.tree.map(lambda x: x + 0.5, lora)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    export_peft(lora, out)
    return out, mc


def _adapter_case(src: Path, tmp: Path, kind: str) -> Path:
    d = tmp / "adapter"
    shutil.copytree(src, d)
    cfg_file = d / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if kind == "no_weights":
        (d / "adapter_model.safetensors").unlink()
    elif kind == "no_config":
        cfg_file.unlink()
    elif kind == "config_not_json":
        cfg_file.write_text("{oops")
    elif kind == "layers_out_of_range":
        cfg["layers_to_transform"] = [0, 5]
        cfg_file.write_text(json.dumps(cfg))
    elif kind == "truncated":
        w = d / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:40])
    elif kind == "unsupported_field":
        cfg["use_dora"] = "yes"  # DoRA is supported; a non-bool value is not
        cfg_file.write_text(json.dumps(cfg))
    return d


ADAPTER_CASES = [
    E("other_model", CheckpointError, ["shape"], id="adapter-other-model"),
    E("no_weights", CheckpointError, ["adapter_model.safetensors", "missing"], id="adapter-no-weights"),
    E("no_config", CheckpointError, ["adapter_config.json", "missing"], id="adapter-no-config"),
    E("config_not_json", CheckpointError, ["adapter_config.json", "not valid JSON"], id="adapter-config-json"),
    E("layers_out_of_range", ConfigError, ["layers_to_transform", "out of range"], id="adapter-layer-range"),
    E("truncated", CheckpointError, ["adapter_model.safetensors"], id="adapter-truncated"),
    E("unsupported_field", ConfigError, ["use_dora"], id="adapter-dora"),
]


@pytest.mark.parametrize("kind, exc_type, keywords", ADAPTER_CASES)
def test_adapters_that_do_not_fit(kind, exc_type, keywords, adapter_dir, tmp_path):
    from flexora_jax.adapters import load_peft
    from flexora_jax.config import ModelConfig

    src, mc = adapter_dir
    d = _adapter_case(src, tmp_path, kind)
    target = ModelConfig(num_hidden_layers=3, hidden_size=48, intermediate_size=64) if kind == "other_model" else mc
    before = _snapshot(d)
    _assert_api_fails(lambda: load_peft(d, target), exc_type, keywords)
    assert _snapshot(d) == before


def test_at_least_thirty_cases():
    n = len(CONFIG_CASES) + 6 + 5 + len(DATA_CASES) + len(MODEL_CASES) + len(ADAPTER_CASES)
    assert n >= 30


# ------------------------------------------------------------------------------- checkpoint fallback
def _ckpt_states():
    import jax

    from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig
    from flexora_jax.lora import init_lora
    from flexora_jax.train import init_train_state, make_optimizer

    mc = ModelConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    lora = init_lora(mc, LoraConfig(r=2), jax.random.key(0))
    opt = make_optimizer(FinetuneConfig(), 10)
    return lambda: init_train_state(lora, opt, seed=0)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "meta_empty", "meta_wrong_type"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, damage):
    import jax

    from flexora_jax.checkpoint import CheckpointWarning, StageCheckpointer

    fresh = _ckpt_states()
    ck = StageCheckpointer(tmp_path / "ck", every=1, keep=3, required_meta=("sampler",))
    for step in (1, 2, 3):
        state = fresh()
        state = state._replace(step=state.step + step, lora=jax.tree.map(lambda x: x + step, state.lora))
        assert ck.save(step, state, {"sampler": {"position": step}})
    ck.close()
    files = [
        p
        for p in (tmp_path / "ck" / "3").rglob("*")
        if p.is_file() and p.stat().st_size > 0 and "meta" not in p.parts and "_CHECKPOINT_METADATA" not in p.name
    ]
    metas = [p for p in (tmp_path / "ck" / "3" / "meta").rglob("*") if p.is_file()]
    assert files and metas
    if damage.startswith("meta"):
        files = []
        for f in metas:
            f.write_text("{}" if damage == "meta_empty" else "[1, 2]")
    for f in files:
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        elif damage == "garbage":
            f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))
        else:
            f.unlink()
    ck = StageCheckpointer(tmp_path / "ck", every=1, keep=3, required_meta=("sampler",))
    with pytest.warns(CheckpointWarning, match="step 3"):
        restored, meta = ck.restore(fresh())
    assert int(restored.step) == 2 and meta["sampler"]["position"] == 2
    assert ck.all_steps() == [1, 2]  # the unusable step is dropped, so the resumed stage can save it again
    ck.close()


def test_every_checkpoint_corrupt_is_a_checkpoint_error(tmp_path):
    from flexora_jax.checkpoint import StageCheckpointer

    fresh = _ckpt_states()
    ck = StageCheckpointer(tmp_path / "ck", every=1, keep=2)
    ck.save(1, fresh(), {})
    ck.close()
    for f in (tmp_path / "ck" / "1").rglob("*"):
        if f.is_file() and "meta" not in f.parts and "_CHECKPOINT_METADATA" not in f.name:
            f.write_bytes(b"")
    ck = StageCheckpointer(tmp_path / "ck", every=1, keep=2)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        ck.restore(fresh())
    ck.close()
