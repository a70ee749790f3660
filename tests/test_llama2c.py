"""llama2.c checkpoints: conversion of the real stories260K model (golden values), transformers parity, bad files."""

from __future__ import annotations

import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import flexora_jax as fj
from flexora_jax.errors import CheckpointError
from flexora_jax.models.llama2c import _permute_rope_rows, read_llama2c

GOLDEN_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)


def test_tinystories_greedy_and_nll_golden(tinystories_dir, tinystories_golden_ids):
    golden = tinystories_golden_ids
    config, params = fj.load_model(tinystories_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 5, 4)
    assert config.tie_word_embeddings and config.vocab_size == 512
    step = jax.jit(lambda p, t: fj.forward(config, p, t))
    ids = np.zeros((1, 33), np.int32)
    ids[0, 0] = 1
    for i in range(32):  # fixed shape: one compile
        ids[0, i + 1] = int(jnp.argmax(step(params, ids)[0, i]))
    assert ids[0].tolist() == golden
    probs = jax.nn.softmax(step(params, ids)[0, 0])
    assert abs(float(probs[403]) - 0.784) < 1e-3

    tok = fj.load_tokenizer(tinystories_dir)
    assert tok("Once upon a time, there was a little girl named Lily.")["input_ids"] == [1] + golden[1:16]
    text_ids = jnp.asarray([tok(GOLDEN_TEXT)["input_ids"]])
    nll = fj.causal_lm_loss(fj.forward(config, params, text_ids), text_ids, jnp.ones_like(text_ids))
    assert abs(float(nll) - 0.386) < 1e-3


def test_converted_directory_loads_in_transformers(tinystories_dir):
    config, params = fj.load_model(tinystories_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(tinystories_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tinystories_dir)
    ids = hf_tok(GOLDEN_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    np.testing.assert_allclose(np.asarray(fj.forward(config, params, ids.numpy())), ref, atol=1e-4, rtol=0)


def test_truncated_llama2c_checkpoint(tmp_path, data_dir):
    src = (data_dir / "tinystories260k" / "checkpoint_legacy.bin").read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(src[: len(src) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="truncated"):
        fj.convert_llama2c(bad, None, out)
    assert not out.exists()  # nothing half-written


def test_rope_rows_go_from_interleaved_pairs_to_halves():
    rows = _permute_rope_rows(np.arange(8, dtype=np.float32)[:, None], n_heads=2)[:, 0]
    np.testing.assert_array_equal(rows, [0, 2, 1, 3, 4, 6, 5, 7])  # per head: pairs (0,1) (2,3) -> halves


def _llama2c_bytes(w: dict, version: int, shared: bool) -> bytes:
    """A llama2.c file of the weights ``w`` in the legacy (0) or the version 1 layout."""
    L, dim = w["att_norm"].shape
    dims = (dim, w["w1"].shape[1], L, 2, 1, w["emb"].shape[0], 6)  # 2 heads, 1 KV head, 6 positions

    def floats(*names):
        return b"".join(np.asarray(w[n], "<f4").tobytes() for n in names)

    if version == 0:
        vocab = dims[5] if shared else -dims[5]
        head = struct.pack("<7i", *dims[:5], vocab, dims[6])
        body = floats("emb", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "freqs", "freqs")
    else:
        head = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, int(shared)).ljust(256, b"\0")
        body = floats("att_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
    return head + body + (b"" if shared else floats("wcls"))


@pytest.mark.parametrize("shared", [True, False])
def test_legacy_and_version1_exports_read_the_same(tmp_path, shared):
    rng = np.random.default_rng(0)
    L, dim, hidden, kv, vocab = 2, 8, 12, 4, 10
    shapes = dict(
        emb=(vocab, dim),
        att_norm=(L, dim),
        ffn_norm=(L, dim),
        norm=(dim,),
        wq=(L, dim, dim),
        wk=(L, kv, dim),
        wv=(L, kv, dim),
        wo=(L, dim, dim),
        w1=(L, hidden, dim),
        w2=(L, dim, hidden),
        w3=(L, hidden, dim),
        freqs=(6, 2),
        wcls=(vocab, dim),
    )
    w = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    (tmp_path / "v0.bin").write_bytes(_llama2c_bytes(w, 0, shared))
    (tmp_path / "v1.bin").write_bytes(_llama2c_bytes(w, 1, shared))
    h0, t0 = read_llama2c(tmp_path / "v0.bin")
    h1, t1 = read_llama2c(tmp_path / "v1.bin")
    assert (h0["version"], h1["version"]) == (0, 1)
    assert {**h0, "version": 1} == h1
    assert h1["shared_classifier"] == int(shared) and ("lm_head.weight" in t1) != shared
    chex.assert_trees_all_equal(t0, t1)
    np.testing.assert_array_equal(t1["model.layers.1.mlp.up_proj.weight"], w["w3"][1])
    np.testing.assert_array_equal(t1["model.layers.0.self_attn.q_proj.weight"], _permute_rope_rows(w["wq"][0], 2))
    if not shared:
        np.testing.assert_array_equal(t1["lm_head.weight"], w["wcls"])
