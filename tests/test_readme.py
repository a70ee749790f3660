"""The README's Python examples run as written (on the real stories260K model and the local PIQA files)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_shows_a_whole_run_and_the_pure_functions():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    for step in ("fj.sft_arrays", "fj.search", "found.selection", "fj.finetune", "fj.evaluate", "save_peft"):
        assert step in blocks[0], step


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_python_example_runs(index, data_dir, tmp_path, monkeypatch, capsys):
    """Each block exactly as written (no substitution): the first converts the real stories260K model itself."""
    monkeypatch.setenv("FLEXORA_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index]
    namespace: dict = {}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    assert capsys.readouterr().out.strip()
    if index == 2:  # bring your own Flax NNX model
        assert namespace["history"] and np.isfinite([r["loss"] for r in namespace["history"]]).all()
        assert namespace["found"].selection.layers and len(namespace["found"].history) == 10
    if index == 0:
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        assert namespace["info"]["n"] + namespace["info"]["dropped"] == 256
        assert 0.0 <= namespace["scores"]["piqa"]["acc"] <= 1.0
        assert np.isfinite([r["loss"] for r in namespace["history"]]).all()
        layers = namespace["found"].selection.layers
        assert namespace["model"].lora().spec.layers == tuple(layers)  # the fine-tune adapts the selected layers only
