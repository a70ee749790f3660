"""The pipeline: run-directory rules, baseline selections, and a shipped real-data config end to end.

(Kill / resume faults on a real run are in test_kill.py.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flexora_jax.errors import ConfigError
from flexora_jax.pipeline import methods
from flexora_jax.pipeline.config import RunConfig
from flexora_jax.pipeline.workspace import prepare
from flexora_jax.selection import Selection

REPO = Path(__file__).resolve().parents[1]


def test_a_fresh_run_refuses_an_existing_run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="--resume"):
        prepare(RunConfig(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1"):
        prepare(RunConfig(output_dir=str(tmp_path), seed=1), resume=True)


def test_baseline_selections():
    cfg = RunConfig(compare=("lora", "random_k", "lora_drop"))
    ws = SimpleNamespace(config=cfg, num_layers=6)
    flex = Selection.of_lora_config(dataclasses.replace(cfg.lora, layers_to_transform=(1, 4)), 6)
    searches = {"layer": methods.SearchOutcome("layer", {}, flex)}
    assert methods.needed_searches(cfg) == ["layer"]
    assert methods.method_selection(ws, "flexora", searches) == flex
    dora = methods.method_selection(ws, "flexora+dora", searches)
    assert dora.layers == (1, 4) and dora.lora_config.use_dora and not flex.lora_config.use_dora
    assert methods.method_selection(ws, "lora", searches).layers == tuple(range(6))
    assert methods.method_selection(ws, "lora_drop", searches).layers == (4, 5)
    rk = methods.method_selection(ws, "random_k", searches)
    assert len(rk.layers) == 2 and rk.lora_config.layers_to_transform == rk.layers
    assert methods.method_selection(ws, "random_k", searches).layers == rk.layers  # seeded
    assert methods.needed_searches(RunConfig(method="lora", compare=("lora_drop",), baseline_k=3)) == []
    assert methods.needed_searches(RunConfig(method="flexora+autolora", compare=("autolora",))) == ["both", "rank"]
    assert methods.method_selection(ws, "dora", searches).lora_config.use_dora
    assert methods.method_selection(ws, "adalora", searches).layers == tuple(range(6))  # its ranks: while it trains
    with pytest.raises(ConfigError, match="baseline_k 7 exceeds the model's 6 layers"):
        methods.method_selection(
            SimpleNamespace(config=dataclasses.replace(cfg, baseline_k=7), num_layers=6), "lora_drop", searches
        )


def test_equal_parameter_baselines_match_the_parameter_counts():
    """lora_lowrank ~ flexora's parameters over all layers; flexora_highrank = LoRA-all's on flexora's layers."""
    from flexora_jax.config import LoraConfig

    lc = LoraConfig(r=8, lora_alpha=16.0)
    cfg = RunConfig(lora=lc, compare=("lora", "lora_lowrank", "flexora_highrank"), baseline_k=3)
    assert methods.needed_searches(cfg) == ["layer"]  # highrank needs flexora's layers even with baseline_k
    ws = SimpleNamespace(config=cfg, num_layers=6)
    flex = Selection.of_lora_config(dataclasses.replace(lc, layers_to_transform=(1, 4)), 6)
    searches = {"layer": methods.SearchOutcome("layer", {}, flex)}
    low = methods.method_selection(ws, "lora_lowrank", searches)
    assert low.layers == tuple(range(6)) and low.lora_config.layers_to_transform is None
    assert low.lora_config.r == 4 and low.lora_config.lora_alpha == 8.0  # round(8 * 3 / 6); alpha / r kept
    high = methods.method_selection(ws, "flexora_highrank", searches)
    assert high.layers == (1, 4) and high.lora_config.layers_to_transform == (1, 4)
    assert high.lora_config.r == 24 and high.lora_config.lora_alpha == 48.0  # round(8 * 6 / 2)
    assert 2 * high.lora_config.r == 6 * lc.r  # same parameter count as every layer at r
    with pytest.raises(ConfigError, match="rank_pattern"):
        methods.method_selection(
            SimpleNamespace(
                config=dataclasses.replace(cfg, lora=dataclasses.replace(lc, rank_pattern={"q_proj": 2})), num_layers=6
            ),
            "lora_lowrank",
            searches,
        )


def test_every_registered_method_says_what_it_does():
    """Each method is one registry record: a description, its searches, how it selects and fine-tunes."""
    from flexora_jax.pipeline import registry

    assert registry.method_names()[:2] == ("lora", "flexora") and len(registry.METHODS) >= 11
    for name in registry.METHODS:
        m = registry.get_method(name)
        assert m.name == name and len(m.description) > 20, name
        assert (m.select.__doc__ or "").strip(), name
        assert m.search in (None, "layer", "rank", "both") and m.finetune in registry.FINETUNES
    assert registry.get_method("flexora+autolora").dirname == "flexora_autolora"
    with pytest.raises(ConfigError, match="did you mean 'flexora'"):
        registry.get_method("flexra")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(registry.get_method("lora"))
    with pytest.raises(ConfigError, match="share methods/flexora_autolora/"):
        registry.register(
            registry.Method("flexora_autolora", "clashes with flexora+autolora's folder", registry.every_layer)
        )
    with pytest.raises(ConfigError, match="reserved"):
        registry.Method("base", "compare.json's base model", registry.every_layer)
    with pytest.raises(ConfigError, match="finetune must be one of"):
        registry.Method("x", "a fine-tune nobody knows", registry.every_layer, finetune="qlora")


def first_layer(run, searches):
    """The run's LoRA on layer 0 alone."""
    return Selection.of_lora_config(dataclasses.replace(run.config.lora, layers_to_transform=(0,)), run.num_layers)


def test_a_method_added_through_the_registry_runs_the_planted_pipeline(tmp_path, monkeypatch, capsys):
    """Adding a method is one record and one register call: config validation, --help-config, the searches it
    needs, its fine-tune and its files all follow."""
    from flexora_jax import cli, pipeline

    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    with pytest.raises(ConfigError, match="method must be one of"):
        RunConfig(method="first_layer")
    pipeline.register(pipeline.Method("first_layer", "LoRA on the first layer alone (a toy).", first_layer))
    try:
        assert cli.main(["--help-config"]) == 0
        assert "  first_layer: LoRA on the first layer alone (a toy)." in capsys.readouterr().out
        out = tmp_path / "run"
        config = pipeline.load_config(
            None,
            [
                "--method=first_layer",
                "--compare=[]",
                f"--output_dir={out}",
                "--task.planted.num_layers=2",
                "--task.planted.num_planted=1",
                "--task.planted.n_train=16",
                "--task.planted.n_val=8",
                "--task.planted.n_test=8",
                "--task.planted.finetune_examples=8",
                "--finetune.max_steps=2",
                "--finetune.batch_size=4",
                "--search.batch_size=4",
                "--search.val_batch_size=4",
                "--eval.base=false",
                "--checkpoint.every=0",
                "--mesh.num_devices=1",
            ],
        )
        assert methods.needed_searches(config) == []  # no search of its own, no k
        result = pipeline.run(config)
        assert set(result.scores) == {"first_layer"} and not (out / "searches").exists()
        assert json.loads((out / "methods" / "first_layer" / "selection.json").read_text())["layers"] == [0]
        assert json.loads((out / "selection.json").read_text())["layers"] == [0]
        assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
        assert np.isfinite(result.scores["first_layer"]["planted"]["test_loss"])
    finally:
        pipeline.unregister("first_layer")
    with pytest.raises(ConfigError, match="method must be one of"):
        RunConfig(method="first_layer")


TINY_TASK = [
    "--task.n_train=16",
    "--task.n_finetune=24",
    "--task.n_val=8",
    "--task.n_test=8",
    "--task.max_length=64",
    "--search.steps=2",
    "--finetune.max_steps=2",
    "--compare=[lora]",
    "--eval.base=false",
    "--checkpoint.every=0",
    "--mesh.num_devices=1",
]


@pytest.mark.parametrize("task", ["arc_easy"])
def test_tinystories260k_config_on_a_local_task_end_to_end(tmp_path, data_dir, task, monkeypatch):
    """A shipped tinystories260k config on the local release files: every file, finite acc and loss."""
    from flexora_jax import cli

    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    monkeypatch.chdir(REPO)  # the config's model paths are relative to the repository root
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "run",
                "--quiet",
                "--config",
                f"configs/tinystories260k_{task}.yaml",
                "--output-dir",
                str(out),
                f"--task.data_dir={data_dir}",
                *TINY_TASK,
                "--eval.question_control=true",
            ]
        )
        == 0
    )
    for name in (
        "config.yaml",
        "data.json",
        "gates.json",
        "selection.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "eval.json",
        "compare.json",
        "metrics.jsonl",
        "gates.png",
        "report.md",
        "model/config.json",
    ):
        assert (out / name).is_file(), name
    sizes = json.loads((out / "data.json").read_text())["sizes"]
    assert sizes == {"search_train": 16, "search_validation": 8, "finetune_train": 24, "test": 8}
    scores = json.loads((out / "compare.json").read_text())
    assert set(scores) == {"flexora", "lora"}
    for m in scores.values():
        s = m[task]
        assert s["n"] == 8 and 0.0 <= s["acc"] <= 1.0 and 0.0 <= s["acc_norm"] <= 1.0
        assert np.isfinite(s["test_loss"]) and s["test_loss"] > 0
        # the question-removed control: same examples, prompt cut to the answer cue
        assert s["question_gain"] == pytest.approx(s["test_loss_noq"] - s["test_loss"])
        assert 0.0 <= s["acc_noq"] <= 1.0 and 0.0 <= s["acc_norm_noq"] <= 1.0
    assert json.loads((out / "eval.json").read_text()) == scores["flexora"]
    report = (out / "report.md").read_text()
    assert "| flexora |" in report and "| lora |" in report and "answer loss per token" in report

    # the run's model and adapter open in the Flax NNX decoder, which scores like the functional core
    import flexora_jax as fj
    from flexora_jax.tasks.formats import MCRecord

    decoder = fj.nnx.LlamaForCausalLM.from_pretrained(out / "model")
    lora = fj.load_peft(out / "adapter", decoder.config)
    tokenizer = fj.load_tokenizer(out / "model")
    tuned = fj.nnx.LlamaForCausalLM.from_params(decoder.config, decoder.params(), lora)
    records = [MCRecord("toy", i, f"Question {i}: which word?", ("yes", "no", "maybe"), i % 3) for i in range(4)]
    got = fj.evaluate(tuned, tokenizer, records, batch_size=4, progress=False, return_per_example=True)
    want = fj.evaluate(
        fj.nnx.LlamaForCausalLM.from_params(decoder.config, decoder.params(), lora),
        tokenizer,
        records,
        batch_size=4,
        progress=False,
        return_per_example=True,
    )
    assert got == want and got["toy"]["n"] == 4


def test_tensorboard_flag_and_one_progress_bar(tmp_path, monkeypatch):
    """`--log.tensorboard=true` writes every stage's metrics as TensorBoard events in <run>/tensorboard/<stage>
    (read back with TensorBoard's reader: the values of metrics.jsonl); and a CLI run shows one progress bar at a
    time, even where the library would add its own (an interactive terminal)."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tqdm.auto import tqdm

    from flexora_jax import cli, engine, hooks
    from flexora_jax.pipeline import io
    from flexora_jax.pipeline.study import SMOKE_OVERRIDES

    live, peak = [], [0]

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not self.disable:
                live.append(self)
                peak[0] = max(peak[0], len(live))

        def close(self):
            if self in live:
                live.remove(self)
            super().close()

    monkeypatch.setenv("FLEXORA_PROGRESS", "1")
    monkeypatch.setattr(engine, "_interactive", lambda: True)
    monkeypatch.setattr(hooks, "tqdm", Bar)
    monkeypatch.setattr(io, "tqdm", Bar)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "run",
                "--output-dir",
                str(out),
                "--log.tensorboard=true",
                "--compare=[]",
                "--eval.base=false",
                "--mesh.num_devices=1",
                *SMOKE_OVERRIDES,
            ]
        )
        == 0
    )
    assert peak[0] == 1 and not live
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["finetune_flexora", "search_layer"]
    for stage, key in (("search_layer", "val_loss"), ("search_layer", "gates/1"), ("finetune_flexora", "loss")):
        acc = reader.EventAccumulator(str(out / "tensorboard" / stage))
        acc.Reload()
        want = [(r["step"], r[key.split("/")[0]]) for r in logged if r["stage"] == stage]
        want = [(s, v[int(key.split("/")[1])] if "/" in key else v) for s, v in want]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
