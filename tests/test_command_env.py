"""What the command does to its surroundings: no import noise, no foreign progress bars, files that honour the
umask, and a persistent compilation cache that only the command (never ``import flexora_jax``) turns on."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import jax
import numpy as np
import pytest

import flexora_jax as fj
from flexora_jax import cli
from flexora_jax.tasks.sft import sft_arrays

REPO = Path(__file__).resolve().parents[1]
NO_TORCH = "PyTorch was not found"


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (cli.CACHE_ENV, "JAX_COMPILATION_CACHE_DIR", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "XLA_FLAGS")
    }
    env.update(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_without_torch_the_command_is_quiet_and_only_it_sets_the_compilation_cache(tmp_path):
    """torch hidden (as on an install without it): transformers alone warns, flexora_jax's import and command do
    not, and leave transformers' switch as they found it. The cache: none after ``import flexora_jax``, none with
    the switch or the flag, then the documented directory."""
    control = _python("import sys; sys.modules['torch'] = None; import transformers", tmp_path)
    assert NO_TORCH in control.stderr
    proc = _python(
        f"""
        import os, sys
        sys.modules["torch"] = None
        import jax, flexora_jax
        from flexora_jax import cli
        seen = [jax.config.jax_compilation_cache_dir]
        missing = ["export", "--output-dir", "{tmp_path / "no-run"}"]
        os.environ["{cli.CACHE_ENV}"] = "0"
        assert cli.main(missing) == 2
        seen.append(jax.config.jax_compilation_cache_dir)
        del os.environ["{cli.CACHE_ENV}"]
        assert cli.main(["--no-compilation-cache", *missing]) == 2
        seen.append(jax.config.jax_compilation_cache_dir)
        assert cli.main(missing) == 2 and cli.main(["--help"]) == 0
        seen.append(jax.config.jax_compilation_cache_dir)
        print(seen, os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS"))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NO_TORCH not in proc.stderr
    assert "has no config.yaml" in " ".join(proc.stderr.split())  # the command ran (and failed as a user error)
    expected = [None, None, None, str(tmp_path / "xdg" / "flexora_jax" / "jax")]
    assert proc.stdout.strip().splitlines()[-1] == f"{expected} None"


@pytest.mark.parametrize(
    "env,flag,expected",
    [
        ({"XDG_CACHE_HOME": "/x"}, True, "/x/flexora_jax/jax"),
        ({"HOME": "/h"}, True, "/h/.cache/flexora_jax/jax"),
        ({"HOME": "/h", cli.CACHE_ENV: "1"}, True, "/h/.cache/flexora_jax/jax"),
        ({cli.CACHE_ENV: "/elsewhere/jax"}, True, "/elsewhere/jax"),
        ({"XDG_CACHE_HOME": "/x", cli.CACHE_ENV: "0"}, True, None),
        ({"XDG_CACHE_HOME": "/x", cli.CACHE_ENV: "off"}, True, None),
        ({"XDG_CACHE_HOME": "/x"}, False, None),
    ],
)
def test_compilation_cache_directory_and_switch(env, flag, expected):
    got = cli.compilation_cache_dir(flag, env)
    assert (None if got is None else str(got)) == expected


class _CharTokenizer:
    """One token per character (ids 3..), BOS 1: enough for the SFT path, no files."""

    bos_token_id, eos_token_id, bos_token = 1, 2, "<s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [3 + (ord(c) % 50) for c in text]


@pytest.fixture()
def datasets_bars():
    """datasets' progress bars on for one test (a quiet command run earlier in this process turns them off)."""
    if datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is True:
        pytest.skip("HF_DATASETS_DISABLE_PROGRESS_BARS=1 is set")
    was_off = datasets.are_progress_bars_disabled()
    datasets.enable_progress_bars()
    yield
    if was_off:
        datasets.disable_progress_bars()


def test_datasets_progress_bars_stay_off_in_the_data_path(capfd, datasets_bars):
    datasets.Dataset.from_dict({"x": [1, 2]}).map(lambda b: b, batched=True, desc="control bar")
    assert "control bar" in capfd.readouterr().err  # the bars show here unless we turn them off
    arrays, info = sft_arrays([("Question: 2 + 2 =", " 4"), ("Sky:", " blue")], _CharTokenizer(), 32)
    assert info["n"] == 2 and arrays["input_ids"].shape == (2, 32)
    assert "tokenizing" not in capfd.readouterr().err
    assert not datasets.are_progress_bars_disabled()  # restored


@pytest.fixture()
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_model_files_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    config = fj.ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    params = fj.init_params(config, jax.random.key(0))
    lora = fj.init_lora(config, fj.LoraConfig(r=2, init_lora_weights=False), jax.random.key(1))
    fj.save_model(config, params, tmp_path / "saved")
    fj.export_merged(config, params, lora, tmp_path / "merged")
    fj.export_peft(lora, tmp_path / "adapter")
    files = [
        tmp_path / "saved" / "model.safetensors",
        tmp_path / "saved" / "config.json",
        tmp_path / "merged" / "model.safetensors",
        tmp_path / "adapter" / "adapter_model.safetensors",
        tmp_path / "adapter" / "adapter_config.json",
    ]
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o666 & ~mask) for f in files}
    np.testing.assert_array_equal(fj.load_model(tmp_path / "merged")[1]["embed"], params["embed"])


def test_converted_llama2c_files_honour_the_umask(tmp_path, umask, data_dir):
    umask(0o022)
    out = fj.convert_llama2c(
        data_dir / "tinystories260k" / "checkpoint_legacy.bin",
        data_dir / "tinystories260k" / "tok512.model",
        tmp_path / "model",
    )
    assert {f.name: oct(_mode(f)) for f in out.iterdir()} == {f.name: "0o644" for f in out.iterdir()}
