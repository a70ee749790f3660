"""Real checkpoints in and out: HF directories (safetensors), hub ids, llama2.c files, tokenizers.

Loading never unpickles: weights come from safetensors only (``pytorch_model.bin`` is refused with a
message saying how to convert it, unless the caller opts in with ``allow_pickle=True``, which uses
``torch.load(weights_only=True)``). Every tensor is checked against the shape the config implies
before anything is returned, so a bad checkpoint raises a :class:`CheckpointError` naming the file
and the tensor, and no partial params are ever handed back.
"""

from __future__ import annotations

import json
import os
import struct as _struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from flexora_jax.config import ATTENTION_MODULES, ModelConfig, SUPPORTED_MODEL_TYPES
from flexora_jax.errors import CheckpointError
from flexora_jax.models.llama import Params, param_shapes

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------------- name mapping
def _hf_name(module: str, layer: int, kind: str = "weight") -> str:
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{group}.{module}.{kind}"


def hf_tensor_names(config: ModelConfig) -> dict[str, tuple]:
    """HF tensor name -> (param path, layer index or None, transpose?) for every base tensor."""
    names: dict[str, tuple] = {"model.embed_tokens.weight": (("embed",), None, False),
                               "model.norm.weight": (("final_norm",), None, False)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), None, True)
    for i in range(config.num_hidden_layers):
        names[f"model.layers.{i}.input_layernorm.weight"] = (("layers", "input_norm"), i, False)
        names[f"model.layers.{i}.post_attention_layernorm.weight"] = (("layers", "post_attention_norm"), i, False)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            names[_hf_name(m, i)] = (("layers", m, "kernel"), i, True)
            if config.attention_bias and m in ("q_proj", "k_proj", "v_proj"):
                names[_hf_name(m, i, "bias")] = (("layers", m, "bias"), i, False)
    return names


def _get(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


# --------------------------------------------------------------------------------------- loading
def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise download a hub snapshot (config, safetensors, tokenizer).

    Offline (no network or ``HF_HUB_OFFLINE=1``) a hub id fails at once with a message that says how
    to use a local directory instead.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the model *directory* (with config.json and safetensors)")
        return path
    text = str(path_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise CheckpointError(f"model directory {text} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=text, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the user
        raise CheckpointError(
            f"could not fetch {text!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download the model elsewhere (config.json, *.safetensors, "
            "tokenizer files) and pass the local directory instead, e.g. --model.path=/path/to/model"
        ) from None
    return Path(local)


def load_config(path_or_hub_id: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """``ModelConfig`` from a model directory's config.json (through transformers' config classes)."""
    directory = resolve_model_dir(path_or_hub_id)
    cfg_file = directory / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{directory} has no config.json; a model directory needs config.json "
                              "plus model.safetensors (or model.safetensors.index.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not supported; "
                              f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    import transformers

    hf_config = transformers.AutoConfig.for_model(**raw)
    try:
        return ModelConfig.from_hf(hf_config, **overrides)
    except Exception as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / _SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    single = directory / _SAFETENSORS
    if single.exists():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [f for f in _PICKLE_FILES if (directory / f).exists()]
    if pickles:
        raise CheckpointError(
            f"{directory} has only pickle weights ({pickles[0]}); pickle can execute code, so flexora_jax "
            "reads safetensors only. Convert it (transformers: model.save_pretrained(dir, "
            "safe_serialization=True)) or pass allow_pickle=True if you trust the file")
    raise CheckpointError(f"{directory} has no weights: expected {_SAFETENSORS} or {_SAFETENSORS_INDEX}")


def _read_tensors(files: list[Path]) -> dict[str, tuple[np.ndarray, Path]]:
    from safetensors import safe_open

    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="flax") as reader:
                for name in reader.keys():
                    tensors[name] = (np.asarray(reader.get_tensor(name)), f)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors


def _read_pickle(directory: Path) -> dict[str, tuple[np.ndarray, Path]]:
    import torch

    f = directory / "pytorch_model.bin"
    state = torch.load(str(f), map_location="cpu", weights_only=True)
    return {k: (v.float().numpy(), f) for k, v in state.items()}


def params_from_hf_tensors(config: ModelConfig, tensors: dict[str, tuple[np.ndarray, Path]],
                           source: str) -> Params:
    """Assemble stacked params from HF-named tensors, checking every name and shape first."""
    expected = param_shapes(config)
    names = hf_tensor_names(config)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all) for a {config.num_hidden_layers}-layer {config.model_type} model")
    for name, (path, layer, transpose) in names.items():
        arr, f = tensors[name]
        shape = _get(expected, path)
        want = shape[1:] if layer is not None else shape
        want_hf = tuple(reversed(want)) if transpose else tuple(want)
        if tuple(arr.shape) != want_hf:
            raise CheckpointError(f"{f}: tensor {name} has shape {tuple(arr.shape)}, expected {want_hf} "
                                  f"from config.json")
    dtype = jnp.dtype(config.dtype)
    out: dict = {}
    stacks: dict[tuple, list] = {}
    for name, (path, layer, transpose) in names.items():
        arr = tensors[name][0]
        arr = arr.T if transpose else arr
        if layer is None:
            _set(out, path, jnp.asarray(arr, dtype=dtype))
        else:
            stacks.setdefault(path, [None] * config.num_hidden_layers)[layer] = arr
    for path, arrs in stacks.items():
        _set(out, path, jnp.asarray(np.stack(arrs), dtype=dtype))
    return out


def _set(tree: dict, path: tuple, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_model(path_or_hub_id: str | os.PathLike, dtype: str = "float32", allow_pickle: bool = False,
               **config_overrides: Any) -> tuple[ModelConfig, Params]:
    """``(ModelConfig, params)`` from an HF model directory or hub id.

    Reads config.json through transformers' config classes and the weights from ``model.safetensors``
    or a sharded ``model.safetensors.index.json``. Raises :class:`CheckpointError` naming the file and
    the tensor or key on any problem; nothing partial is returned.
    """
    directory = resolve_model_dir(path_or_hub_id)
    config = load_config(directory, dtype=dtype, **config_overrides)
    try:
        files = _weight_files(directory)
        tensors = _read_tensors(files)
        source = str(files[0] if len(files) == 1 else directory / _SAFETENSORS_INDEX)
    except CheckpointError:
        if not allow_pickle or not (directory / "pytorch_model.bin").exists():
            raise
        tensors, source = _read_pickle(directory), str(directory / "pytorch_model.bin")
    return config, params_from_hf_tensors(config, tensors, source)


def load_tokenizer(path_or_hub_id: str | os.PathLike):
    """The model's tokenizer (``transformers.AutoTokenizer``), never with remote code."""
    import transformers

    directory = resolve_model_dir(path_or_hub_id)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"could not load a tokenizer from {directory} ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------- saving
def hf_state_dict(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Params as HF-named (out, in) numpy tensors (what ``save_pretrained`` would write)."""
    out = {}
    for name, (path, layer, transpose) in hf_tensor_names(config).items():
        arr = np.asarray(_get(params, path) if layer is None else _get(params, path)[layer])
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def save_model(config: ModelConfig, params: Params, out_dir: str | os.PathLike,
               tokenizer: Any = None, dtype: str | None = None) -> Path:
    """Write an HF model directory (config.json + model.safetensors [+ tokenizer]) transformers can load.

    Files are written to a temporary name and renamed, so an interrupted save leaves no half file.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = jnp.dtype(dtype or config.dtype)
    state = {k: np.asarray(jnp.asarray(v).astype(target)) for k, v in hf_state_dict(config, params).items()}
    hf_config = config.to_hf()
    hf_config.dtype = str(target)
    tmp = out / (_SAFETENSORS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / _SAFETENSORS)
    hf_config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------------------ llama2.c
def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama2.c rotates interleaved pairs (x[2i], x[2i+1]); HF rotates halves: reorder q/k rows."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_llama2c(checkpoint: str | os.PathLike) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Header and HF-named tensors of a llama2.c checkpoint (legacy v0 or version 1 export)."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"llama2.c checkpoint {path} does not exist")
    data = path.read_bytes()
    if len(data) < 28:
        raise CheckpointError(f"{path} is too short ({len(data)} bytes) to be a llama2.c checkpoint")
    magic = _struct.unpack("<I", data[:4])[0]
    if magic == 0x616B3432:  # "ak42": version 1 export (norms first, 256-byte header)
        version = _struct.unpack("<i", data[4:8])[0]
        if version != 1:
            raise CheckpointError(f"{path}: llama2.c export version {version} is not supported (only 0 and 1)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = _struct.unpack("<7i", data[8:36])
        shared = bool(data[36])
        offset = 256
    else:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = _struct.unpack("<7i", data[:28])
        shared = vocab > 0
        vocab = abs(vocab)
        offset = 28
        version = 0
    header = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  vocab_size=vocab, max_seq_len=seq, shared_classifier=int(shared), version=version)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq) <= 0 or dim % n_heads:
        raise CheckpointError(f"{path}: implausible llama2.c header {header}")
    head = dim // n_heads
    kv = n_kv * head
    usable = offset + 4 * ((len(data) - offset) // 4)
    floats = np.frombuffer(data[:usable], dtype="<f4", offset=offset)
    pos = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > floats.size:
            raise CheckpointError(f"{path} is truncated: needs more than {4 * floats.size + offset} bytes "
                                  f"for the header {header}")
        arr = floats[pos:pos + n].reshape(shape).copy()
        pos += n
        return arr

    if version == 0:
        emb = take(vocab, dim)
        att_norm = take(n_layers, dim)
        wq, wk, wv, wo = take(n_layers, dim, dim), take(n_layers, kv, dim), take(n_layers, kv, dim), take(n_layers, dim, dim)
        ffn_norm = take(n_layers, dim)
        w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
        norm = take(dim)
        take(seq, head // 2)  # freq_cis_real (recomputed from theta)
        take(seq, head // 2)  # freq_cis_imag
        wcls = emb if shared else take(vocab, dim)
    else:
        att_norm, ffn_norm, norm = take(n_layers, dim), take(n_layers, dim), take(dim)
        emb = take(vocab, dim)
        wq, wk, wv, wo = take(n_layers, dim, dim), take(n_layers, kv, dim), take(n_layers, kv, dim), take(n_layers, dim, dim)
        w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
        wcls = emb if shared else take(vocab, dim)
    tensors = {"model.embed_tokens.weight": emb, "model.norm.weight": norm}
    if not shared:
        tensors["lm_head.weight"] = wcls
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = att_norm[i]
        tensors[p + "post_attention_layernorm.weight"] = ffn_norm[i]
        tensors[p + "self_attn.q_proj.weight"] = _permute_rope_rows(wq[i], n_heads)
        tensors[p + "self_attn.k_proj.weight"] = _permute_rope_rows(wk[i], n_kv)
        tensors[p + "self_attn.v_proj.weight"] = wv[i]
        tensors[p + "self_attn.o_proj.weight"] = wo[i]
        tensors[p + "mlp.gate_proj.weight"] = w1[i]
        tensors[p + "mlp.down_proj.weight"] = w2[i]
        tensors[p + "mlp.up_proj.weight"] = w3[i]
    return header, tensors


def convert_llama2c(checkpoint: str | os.PathLike, tokenizer_model: str | os.PathLike | None,
                    out_dir: str | os.PathLike) -> Path:
    """Convert a llama2.c checkpoint (+ its SentencePiece model) into an HF LLaMA directory.

    The directory (config.json, model.safetensors, tokenizer files) loads with :func:`load_model` and
    with transformers' ``LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    q/k rows are permuted from llama2.c's interleaved RoPE pairs to HF's rotate-half layout.
    """
    header, tensors = read_llama2c(checkpoint)
    config = ModelConfig(
        vocab_size=header["vocab_size"], hidden_size=header["dim"], intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"], num_attention_heads=header["n_heads"],
        num_key_value_heads=header["n_kv_heads"], max_position_embeddings=header["max_seq_len"],
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=bool(header["shared_classifier"]),
        bos_token_id=1, eos_token_id=2, pad_token_id=None)
    params = params_from_hf_tensors(config, {k: (v, Path(checkpoint)) for k, v in tensors.items()}, str(checkpoint))
    tokenizer = None
    if tokenizer_model is not None:
        tokenizer = sentencepiece_tokenizer(tokenizer_model)
    out = save_model(config, params, out_dir, tokenizer=tokenizer)
    if tokenizer_model is not None:
        import shutil

        shutil.copy(tokenizer_model, out / "tokenizer.model")  # for SentencePiece users
    return out


def sentencepiece_tokenizer(model_file: str | os.PathLike):
    """A transformers LLaMA tokenizer built from a SentencePiece ``.model`` file (BOS added, no EOS)."""
    import shutil
    import tempfile

    import transformers

    path = Path(model_file)
    if not path.exists():
        raise CheckpointError(f"tokenizer model {path} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / "tokenizer.model")
        try:
            tok = transformers.LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable SentencePiece model ({type(exc).__name__}: {exc})") from None
    tok.model_max_length = 10**9  # set from the model's config when saved next to it
    if len(tok) < 3:
        raise CheckpointError(f"{path} gave a tokenizer with {len(tok)} tokens; is it a SentencePiece model?")
    return tok
