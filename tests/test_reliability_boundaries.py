"""Reliability, round three (issue 30): errors at the boundary, signals at safe points, nothing validated late.

- a failed write (a full disk: safetensors' own error, or an OSError) is a ``FlexoraError`` naming the file, from
  ``fj.export_peft``, ``fj.export_merged``, ``fj.nnx.save_adapter`` / ``save_peft`` and ``flexora-jax export
  --merged`` (status 2, no traceback), and what was there before is unchanged;
- a signal is a flag: the evaluation's scoring and generation loops, the dataset loss and the export stop at
  their next safe point; a signal after the last one still ends the command with 128 + signal;
- sizes and settings are planned before the first write: a fine-tune step over more than the data, a step count
  past the counter, planted data beyond memory, DoRA on part of Phi-3's fused projection, test requests longer
  than the model's context are refused before any search, leaving no directory;
- a command writes only what it owns: ``export`` keeps a user's file inside ``adapter/``, ``save_peft`` refuses
  two modules under one PEFT name, ``evaluate`` keeps ``total`` in ``timings.json``;
- a checkpoint of another run (another lr, estimator, K, data) is refused on the NNX decoder's fine-tune and
  search, as on every face.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import SafetensorError

import flexora_jax as fj
from flexora_jax import cli, fileio, signals
from flexora_jax.errors import CheckpointError, ConfigError, DataError, FlexoraError
from flexora_jax.pipeline.config import load_config
from flexora_jax.pipeline.workspace import prepare
from flexora_jax.tasks.formats import MCRecord

CONFIG = fj.ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LORA = fj.LoraConfig(r=2, lora_alpha=4.0)
TINY = [
    "--compare=[]",
    "--task.planted.num_layers=2",
    "--task.planted.num_planted=1",
    "--task.planted.n_train=16",
    "--task.planted.n_val=8",
    "--task.planted.n_test=8",
    "--task.planted.finetune_examples=8",
    "--search.batch_size=4",
    "--search.val_batch_size=4",
    "--finetune.batch_size=4",
    "--eval.base=false",
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main(argv)
    err = capsys.readouterr().err
    return status, " ".join(err.split())


def _assert_refused(argv: list[str], keywords: list[str], capsys, status: int = 2) -> str:
    got, err = _cli(argv, capsys)
    assert got == status and "Traceback" not in err and err.startswith("flexora-jax: error:"), err
    for word in keywords:
        assert word in err, f"{word!r} not in: {err}"
    return err


# ------------------------------------------------------------------------------------------ failed writes
def _disk_full(*_args, **_kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.fixture(scope="module")
def decoder():
    params = fj.init_params(CONFIG, jax.random.key(0))
    lora = fj.init_lora(CONFIG, LORA, jax.random.key(1))
    return params, jax.tree.map(lambda x: x + 0.5, lora)


def _foreign_lm():
    from test_nnx_foreign import BLOCK_INDEX, ForeignLM

    return fj.nnx.add_lora(
        ForeignLM(rngs=nnx.Rngs(0)), ("q", "v"), rank=2, alpha=4.0, layer_index=BLOCK_INDEX, rngs=nnx.Rngs(1)
    )


WRITERS = {
    "export_peft": lambda d, out: fj.export_peft(d[1], out),
    "export_merged": lambda d, out: fj.export_merged(CONFIG, d[0], d[1], out),
    "nnx.save_adapter": lambda d, out: fj.nnx.save_adapter(
        fj.nnx.LlamaForCausalLM(CONFIG, LORA, rngs=nnx.Rngs(1), params=d[0]), out
    ),
    "nnx.save_peft": lambda d, out: fj.nnx.save_peft(_foreign_lm(), out),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_is_a_flexora_error_naming_the_file_and_keeps_what_was_there(
    writer, decoder, tmp_path, monkeypatch
):
    """safetensors reports a full disk as its own SafetensorError: every writer turns it into a FlexoraError
    naming the file, leaves no temporary file, and the files already there (a previous save, a user's note)
    are unchanged."""
    out = tmp_path / "out"
    WRITERS[writer](decoder, out)  # a previous save ...
    (out / "NOTES.md").write_text("mine\n")  # ... and a file of the user's
    before = _snapshot(out)
    monkeypatch.setattr("flexora_jax.models.hf.save_file", _disk_full)
    monkeypatch.setattr("flexora_jax.nnx.export.save_file", _disk_full)
    with pytest.raises(FlexoraError) as info:
        WRITERS[writer](decoder, out)
    message = str(info.value)
    assert "no space left on the device" in message and str(out) in message, message
    assert ".tmp" not in message  # the file meant, not its temporary sibling
    assert _snapshot(out) == before and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_fileio_maps_os_errors_and_keeps_every_other_exception(tmp_path):
    target = tmp_path / "a.json"

    def enospc(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(fileio.WriteError) as info:
        fileio.write_with(target, enospc)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(info.value) == f"{target}: no space left on the device" and not list(tmp_path.iterdir())
    with pytest.raises(ZeroDivisionError):  # a bug in a writer is not a write failure
        fileio.write_with(target, lambda tmp: 1 / 0)
    (tmp_path / "blocked").write_text("a file where a folder is written")
    with pytest.raises(fileio.WriteError, match="blocked"):
        fileio.write_json(tmp_path / "blocked" / "x.json", {})


def test_write_dir_replaces_only_what_it_writes(tmp_path):
    out = tmp_path / "adapter"
    fileio.write_dir(out, lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"old")))
    (out / "NOTES.md").write_text("mine\n")
    fileio.write_dir(out, lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"new")))
    assert (out / "w.bin").read_bytes() == b"new" and (out / "NOTES.md").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    def fails(tmp: Path) -> None:  # a writer's own error names the folder meant, not the temporary one
        raise CheckpointError(f"could not write the adapter to {tmp}: no space left on the device")

    with pytest.raises(CheckpointError, match=f"to {out}: no space") as info:
        fileio.write_dir(out, fails)
    assert ".tmp" not in str(info.value) and (out / "w.bin").read_bytes() == b"new"


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("a small tmpfs needs mount privileges (root); not available here")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_a_real_full_disk(small_disk, decoder):
    """The same on a real 64 KB tmpfs: the merged model does not fit; a CheckpointError names the file."""
    (small_disk / "keep.txt").write_text("mine\n")
    with pytest.raises(CheckpointError, match="no space left on the device") as info:
        fj.export_merged(CONFIG, decoder[0], decoder[1], small_disk / "merged")
    assert str(small_disk / "merged") in str(info.value)
    assert (small_disk / "keep.txt").read_text() == "mine\n"
    assert not [p for p in (small_disk / "merged").iterdir()]


def test_save_peft_refuses_two_modules_under_one_name(tmp_path):
    model = _foreign_lm()
    with pytest.raises(ConfigError) as info:
        fj.nnx.save_peft(model, tmp_path / "peft", peft_name=lambda path, layer: "model.layers.0.self_attn.q_proj")
    message = str(info.value)
    assert "same PEFT name" in message and message.count("module '") == 2, message
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------------------------ signals
def test_signal_blocks_nest_and_restore_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with signals.stop_on_signals("outer"):
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested()
        with signals.stop_on_signals("inner"):  # an inner block keeps the pending signal
            assert signals.requested() and signals.STOP.where == "inner"
            with pytest.raises(signals.Interrupted, match="signal 15 at the test") as info:
                signals.check("at the test")
            assert info.value.signum == signal.SIGTERM
        assert signals.requested() and signals.STOP.where == "outer"
    assert not signals.requested() and signal.getsignal(signal.SIGTERM) is previous


def _signal_on_call(module, name: str, monkeypatch, at: int = 1) -> None:
    """Patch ``module.name`` so its ``at``-th call sends this process SIGTERM (after doing its work)."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(module, name, wrapped)


def test_evaluation_and_the_dataset_loss_stop_between_batches(tinystories_dir, monkeypatch):
    from flexora_jax import evaluation

    config, params = fj.load_model(tinystories_dir)
    tok = fj.load_tokenizer(tinystories_dir)
    records = [MCRecord("piqa", i, f"Q{i}: a cat", (" sat.", " ran away."), i % 2) for i in range(6)]
    _signal_on_call(evaluation, "_score_packed", monkeypatch)
    with signals.stop_on_signals(), pytest.raises(signals.Interrupted, match=r"scoring \(evaluate, batch 2/3\)"):
        fj.evaluate(fj.nnx.LlamaForCausalLM.from_params(config, params), tok, records, batch_size=2, progress=False)
    data = {"input_ids": np.ones((6, 8), np.int32), "loss_mask": np.ones((6, 8), np.float32)}
    with signals.stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(signals.Interrupted, match="dataset loss"):
            fj.dataset_loss(config, params, None, data, batch_size=2)


def test_generation_stops_between_batches(monkeypatch):
    from flexora_jax import evaluation
    from flexora_jax.tasks.generative import GenRecord

    class Out:
        texts = [" The answer is 1."]

    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: Out())
    _signal_on_call(evaluation, "generate", monkeypatch)

    class Tok:
        def encode(self, text):
            return [1, 2, 3]

        def __len__(self):
            return 64

    records = [GenRecord("gsm8k", i, "Q: 1?\nA:", "1", ("\n\n",), "Q", " 1") for i in range(3)]
    with signals.stop_on_signals(), pytest.raises(signals.Interrupted, match=r"generating \(gsm8k, batch 2/3\)"):
        fj.evaluate_generative(
            fj.nnx.LlamaForCausalLM.from_params(CONFIG, fj.init_params(CONFIG, jax.random.key(0))),
            Tok(),
            records,
            batch_size=1,
            progress=False,
            max_length=512,
        )


def test_a_signal_after_the_last_safe_point_still_exits_128_plus_signal(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_command", lambda args, overrides: os.kill(os.getpid(), signal.SIGTERM))
    err = _assert_refused(["evaluate", "--output-dir", "nowhere"], ["stopped by signal 15", "finished"], capsys, 143)
    assert "--resume" not in err


# -------------------------------------------------------------------------- a finished (planted) run's files
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The files a finished tiny planted run leaves (its adapter is a fresh LoRA: nothing here trains)."""
    from flexora_jax.pipeline.io import write_json
    from flexora_jax.pipeline.workspace import CONFIG_FILE

    run = tmp_path_factory.mktemp("finished") / "run"
    os.environ["FLEXORA_PROGRESS"] = "0"
    ws = prepare(load_config(overrides=[f"--output_dir={run}", *TINY]))
    ws.rundir.release()
    lora = fj.init_lora(ws.model_config, ws.config.lora, jax.random.key(0))
    fj.export_peft(jax.tree.map(lambda x: x + 0.1, lora), run / "methods" / "flexora" / "adapter")
    write_json(run / "methods" / "flexora" / "selection.json", {"layers": [0, 1], "trainable_params": 1})
    write_json(run / "searches" / "layer" / "gates.json", {"layer": [1.0, 1.0]})
    write_json(run / "timings.json", {"prepare": 1.0, "search_layer": 2.0, "finetune_flexora": 3.0, "total": 9.0})
    assert (run / CONFIG_FILE).exists()
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def test_export_writes_only_its_own_files_into_the_adapter_folder(run_copy, capsys):
    (run_copy / "adapter").mkdir()
    (run_copy / "adapter" / "NOTES.md").write_text("my notes\n")
    (run_copy / "adapter" / "adapter_config.json").write_text("{}")  # a stale copy of ours: replaced
    assert _cli(["export", "--quiet", "--output-dir", str(run_copy)], capsys)[0] == 0
    assert (run_copy / "adapter" / "NOTES.md").read_text() == "my notes\n"
    src = run_copy / "methods" / "flexora" / "adapter"
    for f in src.iterdir():
        assert (run_copy / "adapter" / f.name).read_bytes() == f.read_bytes()


def test_export_merged_on_a_full_disk_is_status_2_and_changes_nothing(run_copy, capsys, monkeypatch):
    assert _cli(["export", "--quiet", "--output-dir", str(run_copy)], capsys)[0] == 0
    before = _snapshot(run_copy)
    monkeypatch.setattr("flexora_jax.models.hf.save_file", _disk_full)
    _assert_refused(
        ["export", "--quiet", "--merged", "--output-dir", str(run_copy)],
        [str(run_copy / "merged"), "no space left on the device"],
        capsys,
    )
    assert _snapshot(run_copy) == before


def test_evaluate_keeps_the_earlier_times_total_included(run_copy, capsys):
    assert _cli(["evaluate", "--quiet", "--output-dir", str(run_copy)], capsys)[0] == 0
    timings = json.loads((run_copy / "timings.json").read_text())
    assert {"prepare": 1.0, "search_layer": 2.0, "finetune_flexora": 3.0, "total": 9.0}.items() <= timings.items()
    assert timings["evaluate"] > 0


def test_signals_stop_the_export_between_its_outputs(run_copy):
    config = load_config(run_copy / "config.yaml", [f"--output_dir={run_copy}"])
    with signals.stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(signals.Interrupted, match="export, before copying the adapter"):
            fj.run_stage("export", config)
    assert not (run_copy / "adapter").exists() and not (run_copy / "run.lock").exists()


# --------------------------------------------------------------------------- planned before the first write
@pytest.mark.parametrize(
    "args, keywords",
    [
        (
            ["--finetune.grad_accum=100000"],
            ["finetune.grad_accum 100000", "8 fine-tune training examples", "grad_accum <= 2"],
        ),
        (
            ["--finetune.epochs=1e300", "--finetune.max_steps=0"],
            ["finetune.epochs 1e+300", "step counter", "finetune.max_steps"],
        ),
        (["--task.planted.n_train=10000000000"], ["task.planted.n_train", "GiB", "lower"]),
        # a pattern key matching no adapted module was ignored: the run trained at rank r / alpha lora_alpha
        (["--lora.rank_pattern={zzz: 2}"], ["rank_pattern", "'zzz'", "match no adapted module"]),
        (["--lora.alpha_pattern={layers.9.self_attn.q_proj: 4}"], ["alpha_pattern", "layers.9.self_attn.q_proj"]),
    ],
    ids=["grad-accum", "epochs", "planted-size", "rank-pattern-typo", "alpha-pattern-past-depth"],
)
def test_sizes_are_planned_before_anything_is_written(args, keywords, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    out = tmp_path / "run"
    _assert_refused(["run", "--quiet", "--output-dir", str(out), *TINY, *args], keywords, capsys)
    assert not out.exists()
    with pytest.raises(ConfigError):
        prepare(load_config(overrides=[f"--output_dir={out}", *TINY, *args]))
    assert not out.exists()


def _with_tokenizer(model_dir: Path, tinystories_dir: Path) -> Path:
    for f in tinystories_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, model_dir / f.name)
    return model_dir


@pytest.fixture(scope="module")
def tiny_context_models(tmp_path_factory, tinystories_dir):
    """Two families with a 24-token context and stories260K's tokenizer: LLaMA (stories260K itself) and Phi-3
    (random weights, fused qkv_proj / gate_up_proj)."""
    import torch
    import transformers

    llama = tmp_path_factory.mktemp("llama24")
    shutil.copytree(tinystories_dir, llama, dirs_exist_ok=True)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 24}))
    torch.manual_seed(0)
    phi3 = tmp_path_factory.mktemp("phi3_24")
    transformers.AutoModelForCausalLM.from_config(
        transformers.Phi3Config(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=24,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    ).save_pretrained(phi3)
    return {"llama": llama, "phi3": _with_tokenizer(phi3, tinystories_dir)}


def _piqa_args(model: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--quiet",
        "--output-dir",
        str(out),
        "--task.name=piqa",
        f"--model.path={model}",
        f"--task.data_dir={data_dir}",
        "--task.n_train=64",
        "--task.n_val=8",
        "--task.n_test=8",
        "--compare=[]",
        "--search.batch_size=2",
        "--search.val_batch_size=2",
        "--finetune.batch_size=2",
        *extra,
    ]


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_test_requests_longer_than_the_context_are_refused_before_the_search(
    family, tiny_context_models, data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    out = tmp_path / "run"
    _assert_refused(
        _piqa_args(tiny_context_models[family], data_dir, out, "--method=lora"),
        ["task piqa: test example", "24-token context", "cannot be scored"],
        capsys,
    )
    assert not out.exists()  # refused before the search: no half-made run, the corrected command runs fresh


@pytest.mark.parametrize("method", ["dora", "flexora+dora"])
def test_dora_on_part_of_a_fused_projection_is_refused_before_training(
    method, tiny_context_models, data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FLEXORA_PROGRESS", "0")
    out = tmp_path / "run"
    _assert_refused(
        _piqa_args(
            tiny_context_models["phi3"], data_dir, out, f"--method={method}", "--lora.target_modules=[q_proj,v_proj]"
        ),
        [f"method '{method}'", "qkv_proj", "'k_proj'", "lora.target_modules"],
        capsys,
    )
    assert not out.exists()


def test_the_data_check_comes_first_on_a_real_task(tiny_context_models, data_dir, tmp_path):
    """The API refuses as the command does (DataError), with nothing left behind."""
    out = tmp_path / "run"
    args = _piqa_args(tiny_context_models["llama"], data_dir, out)[4:]
    with pytest.raises(DataError, match="24-token context"):
        prepare(load_config(overrides=[f"--output_dir={out}", *args]))
    assert not out.exists()


# -------------------------------------------------------------------- NNX checkpoints of another run
def test_an_nnx_decoder_checkpoint_of_another_run_is_refused(tmp_path):
    """fj.finetune / fj.search with checkpoint_dir on fj.nnx.LlamaForCausalLM: another lr, estimator, K or data
    than the checkpoint's is a CheckpointError naming it (the old LoRA never comes back silently)."""
    import dataclasses

    from test_engine import FINETUNE, SEARCH, TRAIN, VAL, _Stop, _stop_at, data, make

    ck = tmp_path / "finetune"
    with pytest.raises(_Stop):
        fj.finetune(make("nnx_decoder"), TRAIN, FINETUNE, checkpoint_dir=ck, checkpoint_every=2, callback=_stop_at(3))
    with pytest.raises(CheckpointError, match="lr=0.03"):
        fj.finetune(make("nnx_decoder"), TRAIN, dataclasses.replace(FINETUNE, lr=3e-2), checkpoint_dir=ck)
    with pytest.raises(CheckpointError, match="train"):
        fj.finetune(make("nnx_decoder"), data(7), FINETUNE, checkpoint_dir=ck)
    ck = tmp_path / "search"
    with pytest.raises(_Stop):
        fj.search(make("nnx_decoder"), SEARCH, TRAIN, VAL, checkpoint_dir=ck, checkpoint_every=2, callback=_stop_at(3))
    for change, word in (
        ({"hypergradient": "first_order", "inner_steps": 1}, "hypergradient='first_order'"),
        ({"inner_steps": 3}, "inner_steps=3"),
    ):
        with pytest.raises(CheckpointError, match=word):
            fj.search(make("nnx_decoder"), dataclasses.replace(SEARCH, **change), TRAIN, VAL, checkpoint_dir=ck)


@pytest.mark.parametrize("seed", [-1, True, 2.5])
def test_a_split_seed_numpy_refuses_is_a_config_error(seed):
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        fj.tasks.load_split("piqa", "train", seed=seed)
