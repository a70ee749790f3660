"""The decoder is the same function as transformers' PyTorch LLaMA / Qwen2 (logit parity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import flexora_jax as fj

torch.manual_seed(0)


def _hf_model(kind: str, **kw):
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    base.update(kw)
    cfg = (transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig)(**base)
    model = (transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.LlamaForCausalLM)(cfg)
    with torch.no_grad():  # non-trivial norms and biases so a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


CASES = {
    "mha_untied": ("llama", {}),
    "gqa_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gqa_llama3_rope": (
        "llama",
        dict(
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2_bias": ("qwen2", dict(num_key_value_heads=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity_with_transformers(case, tmp_path):
    kind, kw = CASES[case]
    model = _hf_model(kind, **kw)
    model.save_pretrained(tmp_path)
    config, params = fj.load_model(tmp_path)
    assert config.num_key_value_heads == model.config.num_key_value_heads
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(3, 40))
    mask = np.ones_like(tokens)
    mask[1, 30:] = 0  # right padding
    mask[2, 12:] = 0
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    for scan in (True, False):
        cfg = config if scan else type(config)(**{**config.__dict__, "scan_layers": False})
        out = np.asarray(fj.forward(cfg, params, tokens, attention_mask=mask))
        assert out.dtype == np.float32
        keep = mask.astype(bool)  # padded positions are undefined in both
        np.testing.assert_allclose(out[keep], ref[keep], atol=1e-4, rtol=0)


def test_bf16_compute_close_to_fp32_and_logits_fp32(tmp_path):
    model = _hf_model("llama", num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    cfg32, p32 = fj.load_model(tmp_path)
    cfg16, p16 = fj.load_model(tmp_path, dtype="bfloat16")
    assert (
        p16["layers"]["q_proj"]["kernel"].dtype == np.dtype("bfloat16")
        or str(p16["layers"]["q_proj"]["kernel"].dtype) == "bfloat16"
    )
    tokens = np.arange(32)[None] % 97
    a = np.asarray(fj.forward(cfg32, p32, tokens))
    b = fj.forward(cfg16, p16, tokens)
    assert b.dtype == np.float32
    assert np.abs(a - np.asarray(b)).max() < 0.1


def test_padding_mask_isolates_padded_keys():
    cfg = fj.ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    import jax

    params = fj.init_params(cfg, jax.random.key(0))
    tokens = np.array([[5, 6, 7, 8, 9, 10]])
    other = np.array([[5, 6, 7, 8, 40, 41]])
    mask = np.array([[1, 1, 1, 1, 0, 0]])
    a = np.asarray(fj.forward(cfg, params, tokens, attention_mask=mask))
    b = np.asarray(fj.forward(cfg, params, other, attention_mask=mask))
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)  # pad content cannot leak
