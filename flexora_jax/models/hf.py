"""Hugging Face checkpoints in and out: tensor names, configs, safetensors, hub ids, tokenizers.

Loading never unpickles: weights come from safetensors only (``pytorch_model.bin`` is refused with a
message saying how to convert it, unless the caller opts in with ``allow_pickle=True``, which uses
``torch.load(weights_only=True)``). Every tensor name and shape is checked against the config before
any param is built, so a bad checkpoint raises a :class:`CheckpointError` naming the file and the
tensor, and no partial params are ever handed back.

With a device ``mesh``, :func:`load_model` builds each param straight into its sharding
(:func:`flexora_jax.sharding.leaf_spec`): every device's block is read from the safetensors files as
a slice, so no process ever holds a full copy of a sharded tensor, only the rows its devices need.

Never silently wrong: a config field that changes the computation and is not implemented (see
:mod:`.hf_config`, whose ``config_from_hf`` / ``config_to_hf`` this module re-exports) or a checkpoint
tensor the model would not use is refused, naming it. Family
conversions: Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are split into q/k/v/gate/up on load and
fused back on save; Gemma's ``(1 + w)`` norm weights are stored as ``1 + w``; Mixtral's experts
(``block_sparse_moe.experts.<j>.w1/w2/w3``, the names ``save_pretrained`` writes) are stacked to
[l, n, d_in, d_out] kernels and its router (``block_sparse_moe.gate``) is ``router``.

Every file is written atomically through :mod:`flexora_jax.fileio`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import snapshot_download
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from flexora_jax.config import EXPERT_MODULES, GEMMA_TYPES, SUPPORTED_MODEL_TYPES, ModelConfig, module_path
from flexora_jax.errors import CheckpointError, ConfigError, NumericsError
from flexora_jax.fileio import write_bytes, write_with
from flexora_jax.model_config import SIZE_FIELDS
from flexora_jax.models.hf_config import config_from_hf, config_to_hf, unsupported_model_type
from flexora_jax.models.hf_import import transformers
from flexora_jax.models.llama import Params, param_shapes
from flexora_jax.sharding import leaf_spec
from flexora_jax.validation import check_bool, check_finite_tree, check_number

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
_PICKLE_FILES = (PICKLE_WEIGHTS, "pytorch_model.bin.index.json")
#: config.json fields checked before transformers reads them (it divides by the head count, bool("false") is True):
#: the sizes (model_config.SIZE_FIELDS) and these flags.
_FLAG_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_bidirectional_attention")


# ------------------------------------------------------------------------------------------- names
#: Block norm param -> HF module name (under ``model.layers.{i}``).
_NORMS = {
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_feedforward_norm": "pre_feedforward_layernorm",
    "post_feedforward_norm": "post_feedforward_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}


def hf_tensor_names(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | tuple[int, int] | None, bool]]:
    """HF tensor name -> (param path, layer index (or (layer, expert)) or None, transpose?) for every base tensor."""
    names: dict[str, tuple[tuple[str, ...], int | tuple[int, int] | None, bool]] = {
        "model.embed_tokens.weight": (("embed",), None, False),
        "model.norm.weight": (("final_norm",), None, False),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), None, True)
    norms = config.layer_norms + (("q_norm", "k_norm") if config.qk_norm else ())
    for i in range(config.num_hidden_layers):
        for norm in norms:
            names[f"model.layers.{i}.{_NORMS[norm]}.weight"] = (("layers", norm), i, False)
        for m in config.linear_modules:
            if m in EXPERT_MODULES:
                for e in range(config.num_local_experts or 0):
                    names[f"model.layers.{i}.block_sparse_moe.experts.{e}.{m}.weight"] = (
                        ("layers", m, "kernel"),
                        (i, e),
                        True,
                    )
                continue
            names[f"{module_path(m, i)}.weight"] = (("layers", m, "kernel"), i, True)
            if m in config.bias_modules:
                names[f"{module_path(m, i)}.bias"] = (("layers", m, "bias"), i, False)
        if config.num_local_experts:
            names[f"model.layers.{i}.block_sparse_moe.gate.weight"] = (("layers", "router", "kernel"), i, True)
    return names


def fused_rows(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Phi-3: module weight name -> (fused HF weight name, first row, rows); empty for other families."""
    out = {}
    for i in range(config.num_hidden_layers):
        for fused, parts in config.fused_modules.items():
            start = 0
            for m, rows in parts:
                out[f"{module_path(m, i)}.weight"] = (
                    f"{module_path(m, i).rsplit('.', 1)[0]}.{fused}.weight",
                    start,
                    rows,
                )
                start += rows
    return out


def _unfuse(config: ModelConfig, tensors: TensorSource) -> TensorSource:
    """``tensors`` with each fused Phi-3 tensor seen as its modules' tensors (row slices, read on demand)."""
    split = {n: v for n, v in fused_rows(config).items() if v[0] in tensors.files}
    if not split:
        return tensors
    fused = {v[0] for v in split.values()}
    files = {n: f for n, f in tensors.files.items() if n not in fused}
    files.update({n: tensors.files[v[0]] for n, v in split.items()})

    def shape(name: str) -> tuple[int, ...]:
        return (split[name][2],) + tensors.shape(split[name][0])[1:] if name in split else tensors.shape(name)

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        if name not in split:
            return tensors.read(name, index)
        src, start, rows = split[name]
        lo, hi, _ = index[0].indices(rows)
        return tensors.read(src, (slice(start + lo, start + hi),) + tuple(index[1:]))

    return TensorSource(files, shape, read)


def _norm_offset(config: ModelConfig, path: tuple[str, ...]) -> float:
    """1.0 for Gemma's ``(1 + w)`` RMSNorm weights (stored here as ``1 + w``), else 0.0."""
    return 1.0 if config.model_type in GEMMA_TYPES and path[-1].endswith("_norm") else 0.0


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


# ---------------------------------------------------------------------------------- model directory
def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise download a hub snapshot (config, safetensors, tokenizer).

    Offline (no network or ``HF_HUB_OFFLINE=1``) a hub id fails at once with a message that says how
    to use a local directory instead.
    """
    if not isinstance(path_or_hub_id, (str, os.PathLike)) or not str(path_or_hub_id):
        raise CheckpointError(
            f"a model path or hub id is needed (a directory with config.json and safetensors), got {path_or_hub_id!r}"
        )
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the model *directory* (with config.json and safetensors)")
        return path
    text = str(path_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise CheckpointError(f"model directory {text} does not exist")
    try:
        local = snapshot_download(
            repo_id=text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        )
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the user
        raise CheckpointError(
            f"could not fetch {text!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download the model elsewhere (config.json, *.safetensors, "
            "tokenizer files) and pass the local directory instead, e.g. --model.path=/path/to/model"
        ) from None
    return Path(local)


def load_model_config(path_or_hub_id: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """:class:`ModelConfig` from a model directory's config.json (through transformers' config classes)."""
    directory = resolve_model_dir(path_or_hub_id)
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(
            f"{directory} has no config.json; a model directory needs config.json "
            f"plus {SAFETENSORS} (or {SAFETENSORS_INDEX})"
        )
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{cfg_file} cannot be read ({exc.strerror or exc}); expected a JSON file") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} holds a JSON {type(raw).__name__}; expected an object of config fields")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{cfg_file}: {unsupported_model_type(model_type)}")
    for key in [k for k in SIZE_FIELDS if raw.get(k) is not None]:
        check_number(raw[key], f"{cfg_file}: {key}", lo=1, integer=True, error=CheckpointError)
    for key in [k for k in _FLAG_FIELDS if raw.get(k) is not None]:
        check_bool(raw[key], f"{cfg_file}: {key}", error=CheckpointError)
    try:
        return config_from_hf(transformers.AutoConfig.for_model(**raw), **overrides)
    except Exception as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, ``model.safetensors`` or ``*.safetensors``."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(
                f"{index}: weight_map must map tensor names to shard file names, got {type(weight_map).__name__}"
            )
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    if (directory / SAFETENSORS).exists():
        return [directory / SAFETENSORS]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [f for f in _PICKLE_FILES if (directory / f).exists()]
    if pickles:
        raise CheckpointError(
            f"{directory} has only pickle weights ({pickles[0]}); pickle can execute code, so flexora_jax "
            "reads safetensors only. Convert it (transformers: model.save_pretrained(dir, "
            "safe_serialization=True)) or pass allow_pickle=True if you trust the file"
        )
    raise CheckpointError(f"{directory} has no weights: expected {SAFETENSORS} or {SAFETENSORS_INDEX}")


# ------------------------------------------------------------------------------------ tensor sources
@dataclasses.dataclass(frozen=True)
class TensorSource:
    """HF-named tensors read on demand: the file each comes from, its shape, and a block of it."""

    files: Mapping[str, Path]  # tensor name -> the file it is read from (for messages)
    shape: Callable[[str], tuple[int, ...]]
    read: Callable[[str, tuple[slice, ...]], np.ndarray]  # (name, index) -> that block, as stored


def in_memory(tensors: Mapping[str, np.ndarray], file: str | os.PathLike) -> TensorSource:
    """A :class:`TensorSource` over arrays already read (llama2.c, pickle), all from ``file``."""
    return TensorSource(
        {name: Path(file) for name in tensors},
        lambda name: tuple(np.shape(tensors[name])),
        lambda name, index: np.asarray(tensors[name][index]),
    )


def _open_safetensors(files: list[Path], stack: contextlib.ExitStack) -> TensorSource:
    """A :class:`TensorSource` reading slices of safetensors files (open while ``stack`` is)."""
    readers, where = {}, {}
    for f in files:
        try:
            readers[f] = stack.enter_context(safe_open(str(f), framework="numpy"))
        except Exception as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        where.update({name: f for name in readers[f].keys()})

    def read(name: str, index: tuple[slice, ...]) -> np.ndarray:
        try:
            return np.asarray(readers[where[name]].get_slice(name)[index])
        except Exception as exc:
            raise CheckpointError(f"{where[name]}: tensor {name} is unreadable ({type(exc).__name__}: {exc})") from None

    return TensorSource(where, lambda name: tuple(readers[where[name]].get_slice(name).get_shape()), read)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy arrays in their stored dtype."""
    with contextlib.ExitStack() as stack:
        source = _open_safetensors([Path(path)], stack)
        return {name: source.read(name, tuple(slice(None) for _ in source.shape(name))) for name in source.files}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> Path:
    """Write ``tensors`` as a safetensors file (PyTorch-tagged, as transformers and PEFT expect), atomically."""
    return write_with(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata={"format": "pt"}))


_QUANTIZED = (
    "integer (quantized) weights would be cast to float without their scales, so they are refused; "
    "load a floating-point (float32 / bfloat16 / float16) checkpoint or dequantize it first"
)


def _read_pickle(file: Path) -> dict[str, np.ndarray]:
    import torch  # heavy and optional: only for a trusted pickle checkpoint

    state = torch.load(str(file), map_location="cpu", weights_only=True)
    quantized = sorted(k for k, v in state.items() if not v.is_floating_point())
    if quantized:
        raise CheckpointError(f"{file}: tensor(s) {quantized[:5]} are not floating point; {_QUANTIZED}")
    return {k: v.float().numpy() for k, v in state.items()}


# ------------------------------------------------------------------------------------------ params
def params_from_hf(config: ModelConfig, tensors: TensorSource, source: str, mesh: Mesh | None = None) -> Params:
    """Stacked params from HF-named tensors, every name and shape checked before anything is built.

    Without ``mesh`` each param is one host array moved to the default device; with a ``mesh`` each is
    built into its :func:`~flexora_jax.sharding.leaf_spec` sharding from the blocks its devices hold.
    """
    names, tensors = hf_tensor_names(config), _unfuse(config, tensors)
    missing = [n for n in names if n not in tensors.files]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all) for a {config.num_hidden_layers}-layer {config.model_type} model"
        )
    _refuse_unused(config, tensors, names, source)
    shapes = param_shapes(config)
    by_path: dict[tuple[str, ...], dict[tuple[int, ...], tuple[str, bool]]] = {}
    for name, (path, layer, transpose) in names.items():
        key = () if layer is None else (layer,) if isinstance(layer, int) else tuple(layer)  # stacked axes' indices
        want = _get(shapes, path)[len(key) :]
        want_hf = tuple(reversed(want)) if transpose else tuple(want)
        if tensors.shape(name) != want_hf:
            raise CheckpointError(
                f"{tensors.files[name]}: tensor {name} has shape {tensors.shape(name)}, "
                f"expected {want_hf} from config.json"
            )
        by_path.setdefault(path, {})[key] = (name, transpose)
    target = jnp.dtype(config.dtype)

    def read(name: str, transpose: bool, index: tuple[slice, ...], offset: float) -> np.ndarray:
        arr = tensors.read(name, tuple(reversed(index)) if transpose else index)
        if arr.dtype.kind in "iub":
            raise CheckpointError(f"{tensors.files[name]}: tensor {name} is stored as {arr.dtype}; {_QUANTIZED}")
        arr = arr.T if transpose else arr
        return (arr.astype(np.float32) + offset if offset else arr).astype(target)

    def build(path: tuple[str, ...], shape: tuple[int, ...]) -> jax.Array:
        entries, offset = by_path[path], _norm_offset(config, path)

        def gather(key: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:  # stack the stored tensors
            if key in entries:
                return read(*entries[key], index, offset)
            return np.stack([gather(key + (i,), index[1:]) for i in range(*index[0].indices(shape[len(key)]))])

        def block(index: tuple[slice, ...]) -> np.ndarray:
            return gather((), tuple(slice(*s.indices(n)) for s, n in zip(index, shape)))

        if mesh is None:
            return jnp.asarray(block(tuple(slice(None) for _ in shape)))
        return jax.make_array_from_callback(shape, NamedSharding(mesh, leaf_spec(path, shape, mesh)), block)

    params: Params = {}
    for path in by_path:
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = build(path, tuple(_get(shapes, path)))
    return params


def _refuse_unused(config: ModelConfig, tensors: TensorSource, names: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` naming any checkpoint tensor the model would not use.

    Ignored: RoPE ``inv_freq`` buffers (recomputed) and an ``lm_head.weight`` equal to the tied embedding.
    """
    extra = sorted(n for n in tensors.files if n not in names and not n.endswith("rotary_emb.inv_freq"))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        head, emb = (
            tensors.read(n, tuple(slice(None) for _ in tensors.shape(n)))
            for n in ("lm_head.weight", "model.embed_tokens.weight")
        )
        if head.shape == emb.shape and np.array_equal(head, emb):
            extra.remove("lm_head.weight")
    if extra:
        raise CheckpointError(
            f"{source}: tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)} in all) would not "
            f"be used by a {config.model_type} model as config.json describes it (biases, norms or heads the "
            "config does not declare); refusing rather than computing a different function"
        )


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: str = "float32",
    allow_pickle: bool = False,
    mesh: Mesh | None = None,
    check_finite: bool = True,
    **config_overrides: Any,
) -> tuple[ModelConfig, Params]:
    """``(ModelConfig, params)`` from an HF model directory or hub id.

    Reads config.json through transformers' config classes and the weights from ``model.safetensors``
    or a sharded ``model.safetensors.index.json``. With a ``mesh`` every param is built straight into
    its sharding (see the module docstring). Raises :class:`CheckpointError` naming the file and the
    tensor or key on any problem (integer / quantized tensors, and with ``check_finite`` a NaN or Inf
    weight: one reduction per param, skip it for a checkpoint you trust); nothing partial is returned.
    """
    check_bool(allow_pickle, "load_model: allow_pickle")
    check_bool(check_finite, "load_model: check_finite")
    directory = resolve_model_dir(path_or_hub_id)
    config = load_model_config(directory, dtype=dtype, **config_overrides)
    with contextlib.ExitStack() as stack:
        try:
            files = weight_files(directory)
            tensors = _open_safetensors(files, stack)
            source = str(files[0] if len(files) == 1 else directory / SAFETENSORS_INDEX)
        except CheckpointError:
            pickle_file = directory / PICKLE_WEIGHTS
            if not allow_pickle or not pickle_file.exists():
                raise
            tensors, source = in_memory(_read_pickle(pickle_file), pickle_file), str(pickle_file)
        params = params_from_hf(config, tensors, source, mesh)
    if check_finite:
        check_finite_tree(params, f"{source}: the checkpoint")
    return config, params


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> Any:
    """The model's tokenizer (``transformers.AutoTokenizer``), never with remote code."""
    directory = resolve_model_dir(path_or_hub_id)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"could not load a tokenizer from {directory} ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------------ saving
def hf_state_dict(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Params as HF-named (out, in) numpy tensors (what ``save_pretrained`` would write)."""
    out = {}
    for name, (path, layer, transpose) in hf_tensor_names(config).items():
        arr = np.asarray(_get(params, path) if layer is None else _get(params, path)[layer])
        offset = _norm_offset(config, path)
        arr = (arr.astype(np.float32) - offset).astype(arr.dtype) if offset else arr
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    for name, (fused, _, _) in fused_rows(config).items():  # Phi-3: rows in module order
        out[fused] = np.concatenate([out[fused], out.pop(name)]) if fused in out else out.pop(name)
    return out


def save_model(
    config: ModelConfig, params: Params, out_dir: str | os.PathLike, tokenizer: Any = None, dtype: str | None = None
) -> Path:
    """Write an HF model directory (config.json + model.safetensors [+ tokenizer]) transformers can load.

    Each file lands atomically; a stale sharded index is removed so loaders read the new weights.
    An unwritable directory raises :class:`CheckpointError` naming it and the reason; NaN / Inf params
    (:class:`NumericsError`) and an unknown ``dtype`` are refused before the first write.
    """
    out = Path(out_dir)
    try:
        target = jnp.dtype(dtype or config.dtype)
    except TypeError:
        raise ConfigError(
            f"save_model: dtype {dtype!r} is not a dtype; expected e.g. 'float32' or 'bfloat16'"
        ) from None
    if not jnp.issubdtype(target, jnp.floating):
        raise ConfigError(f"save_model: dtype {target} is not a floating-point dtype; expected e.g. 'bfloat16'")
    check_finite_tree(params, "save_model: params", NumericsError)  # before anything is written
    state = {k: v.astype(target) for k, v in hf_state_dict(config, params).items()}
    hf_config = config_to_hf(config)
    hf_config.dtype = str(target)
    try:
        write_safetensors(out / SAFETENSORS, state)
        (out / SAFETENSORS_INDEX).unlink(missing_ok=True)
        write_bytes(out / "config.json", hf_config.to_json_string(use_diff=True))
        if tokenizer is not None:
            tokenizer.model_max_length = config.max_position_embeddings
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save_pretrained(tmp)
                for f in sorted(Path(tmp).iterdir()):
                    write_with(out / f.name, lambda dst, src=f: shutil.copyfile(src, dst))
    except OSError as exc:
        raise CheckpointError(f"could not write the model directory {out}: {exc.strerror or exc}") from None
    return out
