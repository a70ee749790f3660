"""Real checkpoints: llama2.c conversion (golden values), HF directories, and bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import flexora_jax as fj
from flexora_jax.errors import CheckpointError

GOLDEN_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396,
              267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385]
GOLDEN_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
               "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")


def test_tinystories_greedy_and_nll_golden(tinystories_dir):
    config, params = fj.load_model(tinystories_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 5, 4)
    assert config.tie_word_embeddings and config.vocab_size == 512
    step = jax.jit(lambda p, t: fj.forward(config, p, t))
    ids = np.zeros((1, 33), np.int32)
    ids[0, 0] = 1
    for i in range(32):  # fixed shape: one compile
        ids[0, i + 1] = int(jnp.argmax(step(params, ids)[0, i]))
    assert ids[0].tolist() == GOLDEN_IDS
    probs = jax.nn.softmax(step(params, ids)[0, 0])
    assert abs(float(probs[403]) - 0.784) < 1e-3

    tok = fj.load_tokenizer(tinystories_dir)
    assert tok("Once upon a time, there was a little girl named Lily.")["input_ids"] == [1] + GOLDEN_IDS[1:16]
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


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_config_json(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        fj.load_model(d)


def test_missing_tensor_names_file_and_tensor(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        fj.load_model(d)


def test_misshaped_tensor_names_shapes(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    state = load_file(d / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*up_proj.*\(47, 32\).*\(48, 32\)"):
        fj.load_model(d)


def test_unknown_model_type(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        fj.load_model(d)


def test_pickle_only_checkpoint_refused(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    state = {k: torch.from_numpy(v) for k, v in load_file(d / "model.safetensors").items()}
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle"):
        fj.load_model(d)
    config, params = fj.load_model(d, allow_pickle=True)  # explicit opt-in, weights_only load
    assert params["layers"]["q_proj"]["kernel"].shape == (2, 32, 32)


def test_sharded_index_checkpoint(hf_dir, tmp_path):
    d = tmp_path / "sharded"
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    _, a = fj.load_model(d)
    _, b = fj.load_model(hf_dir)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_hub_id_offline_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local directory"):
        fj.load_model("meta-llama/Llama-3.2-1B")


def test_truncated_llama2c_checkpoint(tmp_path, data_dir):
    src = (data_dir / "tinystories260k" / "checkpoint_legacy.bin").read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(src[: len(src) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="truncated"):
        fj.convert_llama2c(bad, None, out)
    assert not out.exists()  # nothing half-written
