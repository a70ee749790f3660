"""llama2.c checkpoints (Karpathy's ``run.c`` format) converted into HF LLaMA directories.

Both export formats are read: legacy v0 (7-int header, then the weights; a negative vocab size means
an untied classifier) and version 1 (``ak42`` magic, 256-byte header, norms first). llama2.c rotates
interleaved RoPE pairs where HF rotates halves, so q/k rows are permuted on the way in; the result
loads with :func:`flexora_jax.models.hf.load_model` and with transformers alike.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flexora_jax.config import ModelConfig, module_path
from flexora_jax.errors import CheckpointError
from flexora_jax.fileio import write_with
from flexora_jax.models.hf import in_memory, params_from_hf, save_model
from flexora_jax.models.hf_import import transformers


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
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x616B3432:  # "ak42": version 1 export (norms first, 256-byte header)
        version = struct.unpack("<i", data[4:8])[0]
        if version != 1:
            raise CheckpointError(f"{path}: llama2.c export version {version} is not supported (only 0 and 1)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", data[8:36])
        shared = bool(data[36])
        offset = 256
    else:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", data[:28])
        shared = vocab > 0
        vocab = abs(vocab)
        offset = 28
        version = 0
    header = dict(
        dim=dim,
        hidden_dim=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        max_seq_len=seq,
        shared_classifier=int(shared),
        version=version,
    )
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
            raise CheckpointError(
                f"{path} is truncated: needs more than {4 * floats.size + offset} bytes for the header {header}"
            )
        arr = floats[pos : pos + n].reshape(shape).copy()
        pos += n
        return arr

    if version == 0:
        emb = take(vocab, dim)
        att_norm = take(n_layers, dim)
        wq, wk, wv, wo = (
            take(n_layers, dim, dim),
            take(n_layers, kv, dim),
            take(n_layers, kv, dim),
            take(n_layers, dim, dim),
        )
        ffn_norm = take(n_layers, dim)
        w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
        norm = take(dim)
        take(seq, head // 2)  # freq_cis_real (recomputed from theta)
        take(seq, head // 2)  # freq_cis_imag
        wcls = emb if shared else take(vocab, dim)
    else:
        att_norm, ffn_norm, norm = take(n_layers, dim), take(n_layers, dim), take(dim)
        emb = take(vocab, dim)
        wq, wk, wv, wo = (
            take(n_layers, dim, dim),
            take(n_layers, kv, dim),
            take(n_layers, kv, dim),
            take(n_layers, dim, dim),
        )
        w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
        wcls = emb if shared else take(vocab, dim)
    tensors = {"model.embed_tokens.weight": emb, "model.norm.weight": norm}
    if not shared:
        tensors["lm_head.weight"] = wcls
    for i in range(n_layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = att_norm[i]
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = ffn_norm[i]
        weights = {
            "q_proj": _permute_rope_rows(wq[i], n_heads),
            "k_proj": _permute_rope_rows(wk[i], n_kv),
            "v_proj": wv[i],
            "o_proj": wo[i],
            "gate_proj": w1[i],
            "down_proj": w2[i],
            "up_proj": w3[i],
        }
        tensors.update({f"{module_path(m, i)}.weight": w for m, w in weights.items()})
    return header, tensors


def convert_llama2c(
    checkpoint: str | os.PathLike, tokenizer_model: str | os.PathLike | None, out_dir: str | os.PathLike
) -> Path:
    """Convert a llama2.c checkpoint (+ its SentencePiece model) into an HF LLaMA directory.

    The directory (config.json, model.safetensors, tokenizer files) loads with :func:`flexora_jax.models.hf.load_model` and
    with transformers' ``LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    q/k rows are permuted from llama2.c's interleaved RoPE pairs to HF's rotate-half layout.
    """
    header, tensors = read_llama2c(checkpoint)
    config = ModelConfig(
        vocab_size=header["vocab_size"],
        hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"],
        num_attention_heads=header["n_heads"],
        num_key_value_heads=header["n_kv_heads"],
        max_position_embeddings=header["max_seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=bool(header["shared_classifier"]),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    params = params_from_hf(config, in_memory(tensors, checkpoint), str(checkpoint))
    tokenizer = None if tokenizer_model is None else sentencepiece_tokenizer(tokenizer_model)
    out = save_model(config, params, out_dir, tokenizer=tokenizer)
    if tokenizer_model is not None:  # the SentencePiece model itself, for SentencePiece users
        write_with(out / "tokenizer.model", lambda dst: shutil.copyfile(tokenizer_model, dst))
    return out


def sentencepiece_tokenizer(model_file: str | os.PathLike) -> Any:
    """A transformers LLaMA tokenizer built from a SentencePiece ``.model`` file (BOS added, no EOS)."""
    path = Path(model_file)
    if not path.exists():
        raise CheckpointError(f"tokenizer model {path} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / "tokenizer.model")
        try:
            tok = transformers.LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not a readable SentencePiece model ({type(exc).__name__}: {exc})"
            ) from None
    tok.model_max_length = 10**9  # set from the model's config when saved next to it
    if len(tok) < 3:
        raise CheckpointError(f"{path} gave a tokenizer with {len(tok)} tokens; is it a SentencePiece model?")
    return tok
