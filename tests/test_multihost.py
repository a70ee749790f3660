"""Multi-host for real: two local processes (gloo CPU collectives, 4 virtual devices each) run the search
step and fine-tune steps on one global 8-device mesh from process-local data; the results equal the
single-process run and only process 0 writes files.

Run as a script, this file is one worker process (``python test_multihost.py``, configured by the
``JAX_*`` environment variables that :func:`flexora_jax.sharding.initialize_distributed` reads).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

MESH = (2, 2, 2)
TRAIN_STEPS = 2
TIMEOUT_S = 420


def _setup():
    """Model, configs and the *global* data, identical in every process (seeded)."""
    import jax

    from flexora_jax.config import FinetuneConfig, LoraConfig, ModelConfig, SearchConfig
    from flexora_jax.models.llama import init_params

    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lora = LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj"), init_lora_weights=False)
    search = SearchConfig(
        inner_steps=2, batch_size=8, val_batch_size=8, inner_optimizer="sgd", inner_lr=0.1, remat=False
    )
    finetune = FinetuneConfig(batch_size=8, lr=1e-2, schedule="constant", grad_clip=1.0)
    rng = np.random.default_rng(0)

    def batch(shape):
        return {
            "input_ids": rng.integers(0, config.vocab_size, shape).astype(np.int32),
            "attention_mask": np.ones(shape, np.int32),
            "loss_mask": np.ones(shape, np.float32),
        }

    data = {
        "train": batch((search.inner_steps, 8, 16)),
        "val": batch((8, 16)),
        "ft": [batch((8, 16)) for _ in range(TRAIN_STEPS)],
    }
    return config, lora, search, finetune, init_params(config, jax.random.key(0)), data


def _states(config, lora_cfg, search, finetune):
    import jax

    from flexora_jax.bilevel import init_search_state
    from flexora_jax.gates import init_gates
    from flexora_jax.lora import init_lora
    from flexora_jax.train import init_train_state, make_optimizer

    sstate = init_search_state(init_lora(config, lora_cfg, jax.random.key(1)), init_gates("layer", 2), search)
    tstate = init_train_state(init_lora(config, lora_cfg, jax.random.key(2)), make_optimizer(finetune, 10), seed=3)
    return sstate, tstate


def _summary(smetrics, sstate, losses, tstate, fetch):
    return {
        "val_loss": float(fetch(smetrics["val_loss"])),
        "hypergrad_norm": float(fetch(smetrics["hypergrad_norm"])),
        "gates": np.asarray(fetch(sstate.gates.layer)).tolist(),
        "search_lora_a": np.asarray(fetch(sstate.inner.lora.weights["q_proj"]["a"])).ravel().tolist(),
        "losses": losses,
        "train_lora_b": np.asarray(fetch(tstate.lora.weights["down_proj"]["b"])).ravel().tolist(),
    }


def worker(out_dir: Path) -> None:
    import jax
    from jax.experimental import multihost_utils

    from flexora_jax import loops
    from flexora_jax import sharding as sh
    from flexora_jax.bilevel import make_search_step
    from flexora_jax.pipeline.io import write_json, write_text
    from flexora_jax.train import make_train_step

    assert sh.initialize_distributed(), "expected a multi-process run"
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    config, lora_cfg, search, finetune, params, data = _setup()
    sstate, tstate = _states(config, lora_cfg, search, finetune)
    mesh = sh.make_mesh(MESH)
    rows = sh.local_rows(mesh, 8)
    assert rows.stop - rows.start == 4, rows  # each process loads only its half of the global batch

    # the host loop's programs: every process holds the same global batch and feeds only its rows
    step = loops.compile_step(
        make_search_step(config, search), mesh, (params, sstate, data["train"], data["val"]), {2: 1, 3: 0}
    )
    p, s = step.place(params, sstate)
    tb, vb = step.batch(data["train"], 2), step.batch(data["val"], 3)
    assert tb["input_ids"].addressable_shards[0].data.shape[1] <= rows.stop - rows.start
    tstep = loops.compile_step(make_train_step(config, finetune, 10), mesh, (params, tstate, data["ft"][0]), {2: 0})
    tp, t = tstep.place(params, tstate)
    fts = [tstep.batch(b, 2) for b in data["ft"]]
    # Compile both programs first, then meet: a process still compiling would leave its peer waiting in a
    # gloo collective, which times out on a loaded machine.
    search_exec = step.lower(p, s, tb, vb).compile()
    train_exec = tstep.lower(tp, t, fts[0]).compile()
    multihost_utils.sync_global_devices("compiled")

    s, metrics = search_exec(p, s, tb, vb)
    losses = []
    for b in fts:
        t, m = train_exec(tp, t, b)
        losses.append(float(sh.fetch(m["loss"])))
    result = _summary(metrics, s, losses, t, sh.fetch)
    result["process"] = jax.process_index()
    write_json(out_dir / "result.json", result)
    write_text(out_dir / f"written_by_{jax.process_index()}.txt", "ok\n")
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    import jax

    from flexora_jax.bilevel import make_search_step
    from flexora_jax.train import make_train_step

    port = _free_port()
    repo = Path(__file__).resolve().parents[1]
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            JAX_COMPILATION_CACHE_DIR=str(repo / ".jax_cache"),
            PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)],
                env=env,
                cwd=repo,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        log = "\n".join(line for line in out.splitlines() if not line.startswith("[Gloo]"))
        assert proc.returncode == 0, f"process {i} failed:\n{log[-6000:]}"

    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "written_by_0.txt"]
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["process"] == 0

    config, lora_cfg, search, finetune, params, data = _setup()
    sstate, tstate = _states(config, lora_cfg, search, finetune)
    sstate, metrics = jax.jit(make_search_step(config, search))(params, sstate, data["train"], data["val"])
    train = jax.jit(make_train_step(config, finetune, 10))
    losses = []
    for b in data["ft"]:
        tstate, m = train(params, tstate, b)
        losses.append(float(m["loss"]))
    want = _summary(metrics, sstate, losses, tstate, lambda x: x)
    for key, value in want.items():
        a, b = np.asarray(got[key], np.float64), np.asarray(value, np.float64)
        assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-30), (key, a, b)
    assert jax.process_count() == 1


if __name__ == "__main__":
    import jax

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    worker(Path(sys.argv[1]))
