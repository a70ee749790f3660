"""Shared test setup: 8 virtual CPU devices, offline hub, real data location, shared fixtures."""

from __future__ import annotations

import os

# Must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# cli.main (called in this process by many tests) would turn on its persistent compilation cache; not here.
os.environ.setdefault("FLEXORA_JAX_COMPILATION_CACHE", "0")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# No persistent compilation cache in the test process itself: its programs (8 virtual devices, x64 finite
# differences) are not the subprocesses' (one device), and serialising some of them into the cache aborted
# the process in jax 0.10.2 (compilation_cache.put_executable_and_time). Subprocess tests (test_kill, the
# embedded default) still share .jax_cache through JAX_COMPILATION_CACHE_DIR.

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FLEXORA_DATA_DIR", REPO.parent / "shared" / "data"))
TINYSTORIES = DATA_DIR / "tinystories260k"

requires_data = pytest.mark.skipif(
    not DATA_DIR.exists(), reason=f"reference data folder {DATA_DIR} is absent (set FLEXORA_DATA_DIR)"
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"reference data folder {DATA_DIR} is absent (set FLEXORA_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tinystories_dir(tmp_path_factory, data_dir) -> Path:
    """The real llama2.c stories260K model converted once per session into an HF directory."""
    from flexora_jax import convert_llama2c

    out = tmp_path_factory.mktemp("tinystories260k")
    return convert_llama2c(TINYSTORIES / "checkpoint_legacy.bin", TINYSTORIES / "tok512.model", out)


@pytest.fixture(scope="session")
def tinystories_golden_ids(data_dir) -> list[int]:
    """The first 33 greedy token ids from BOS (BOS included), as SOURCE.md in the data folder records them."""
    import json
    import re

    text = (TINYSTORIES / "SOURCE.md").read_text()
    found = re.search(r"First 33 greedy token ids \(including BOS\):\s*(\[[\d, ]+\])", text)
    assert found, "SOURCE.md no longer records the 33 greedy token ids"
    return json.loads(found.group(1))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every module's compiled programs when it ends: a test process that keeps all of them (hundreds of
    test modules' worth) runs into the kernel's limit on memory mappings (vm.max_map_count) and XLA crashes."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
