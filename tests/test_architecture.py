"""The package's shape, checked from its source: no import circles, few function-local imports (heavy optional
dependencies only), small modules, no test hooks, no repeated blocks, a flat public API, a mesh layer that
imports no algorithm. ``python -m pytest tests/test_architecture.py -q`` is the command anyone can run."""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flexora_jax"
MAX_LINES = 600
#: The only third-party modules a function may import locally: heavy and optional at run time.
LOCAL_IMPORT_ALLOWED = ("torch", "matplotlib", "lm_eval", "tensorboard", "wandb")
MAX_LOCAL_IMPORTS = 6
REPEAT_LINES = 6


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, is function-local) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    local_nodes = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in local_nodes) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from flexora_jax import sharding` imports a module
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in MODULES else node.module, id(node) in local_nodes))
    return out


def _package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        if name == "flexora_jax":
            continue  # the flat public API imports everything; nothing in the package imports it
        for target, _ in _imports(path):
            if target in MODULES and target != name and target != "flexora_jax":
                edges[name].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_circle_counting_function_local_imports():
    edges = _package_edges()
    assert not any(target == "flexora_jax" for targets in edges.values() for target in targets)
    assert _cycles(edges) == []


def test_function_local_imports_only_for_heavy_optional_dependencies():
    local = [(name, target) for name, path in MODULES.items() for target, is_local in _imports(path) if is_local]
    bad = [(n, t) for n, t in local if t.split(".")[0] not in LOCAL_IMPORT_ALLOWED]
    assert bad == []
    assert len(local) <= MAX_LOCAL_IMPORTS, local


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_no_test_hooks_in_the_package():
    for name, path in MODULES.items():
        text = path.read_text()
        for marker in ("FLEXORA_TEST", "test hook", "Test hook", "monkey"):
            assert marker not in text, f"{name}: {marker!r}"


def _normalised(line: str) -> str:
    return " ".join(line.split("#", 1)[0].split())


def test_no_block_of_six_lines_stands_twice():
    """Exact repeats of six consecutive meaningful lines (the ``duplicates`` tool also finds same-shape ones)."""
    seen: dict[tuple[str, ...], tuple[str, int]] = {}
    repeats = []
    for name, path in MODULES.items():
        lines = [_normalised(x) for x in path.read_text().splitlines()]
        lines = [x for x in lines if x and x not in (")", "]", "}", "else:", "try:", '"""')
                 and not x.startswith(("import ", "from "))]  # import blocks alike are not repeated logic
        for i in range(len(lines) - REPEAT_LINES + 1):
            block = tuple(lines[i:i + REPEAT_LINES])
            first = seen.setdefault(block, (name, i))
            if first[0] != name or i - first[1] >= REPEAT_LINES:
                repeats.append((first, (name, i), block[0]))
    assert repeats == []


def test_public_api_is_flat_and_complete():
    fj = importlib.import_module("flexora_jax")
    assert len(fj.__all__) == len(set(fj.__all__))
    for name in fj.__all__:
        assert hasattr(fj, name), name
    assert callable(fj.search) and callable(fj.run)  # no function hides a module of the same name
    assert not any((PACKAGE / f"{name}.py").exists() for name in fj.__all__ if callable(getattr(fj, name)))


def test_sharding_imports_no_algorithm():
    targets = {t for t, _ in _imports(MODULES["flexora_jax.sharding"]) if t.startswith("flexora_jax")}
    assert targets <= {"flexora_jax.config", "flexora_jax.errors"}, targets


def test_the_library_never_imports_the_command():
    for name, path in MODULES.items():
        if name.startswith("flexora_jax.pipeline") or name in ("flexora_jax", "flexora_jax.cli"):
            continue
        assert not [t for t, _ in _imports(path) if t.startswith("flexora_jax.pipeline")], name


def test_every_runtime_dependency_is_imported():
    """A dependency in pyproject.toml that nothing imports is not a dependency (chex included)."""
    import tomllib

    deps = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_").lower() for d in deps}
    module_of = {"orbax_checkpoint": "orbax", "pyyaml": "yaml"}
    imported = {t.split(".")[0].lower() for path in MODULES.values() for t, _ in _imports(path)}
    indirect = {"sentencepiece"}  # read by transformers' LlamaTokenizer for llama2.c's tokenizer.model
    missing = sorted(n for n in names - indirect if module_of.get(n, n) not in imported)
    assert missing == []


def test_the_core_and_the_gpu_benchmark_import_without_datasets_or_draccus():
    """The accelerator image has jax, flax, optax, orbax, transformers, torch and peft but not datasets or
    draccus: the model / search / fine-tune code and benchmarks/gpu.py must not need them."""
    import subprocess
    import sys

    code = ("import sys, flexora_jax as fj, flexora_jax.bilevel, flexora_jax.train, benchmarks.gpu; "
            "assert 'datasets' not in sys.modules and 'draccus' not in sys.modules, 'eager import'; "
            "fj.run; assert 'draccus' in sys.modules")  # the command layer still loads on first use
    proc = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
