"""KV-cache generation: parity with transformers' generate, with recomputing the full forward, golden ids."""

from __future__ import annotations

import dataclasses
import functools
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexora_jax import generation as gen
from flexora_jax.config import LoraConfig, ModelConfig
from flexora_jax.errors import ConfigError, DataError
from flexora_jax.gates import Gates
from flexora_jax.lora import init_lora, merge, per_layer_lora
from flexora_jax.models.llama import forward, init_params, lm_head

CONFIG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    eos_token_id=5,
    pad_token_id=0,
)
NEW = 12
PROMPTS = [[1, 17, 40, 8, 66, 23, 9], [1, 50], [1, 33, 71, 12, 90]]  # different lengths: left padding


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, jax.random.key(0), init_std=0.2, head_std=0.5)
    lora = init_lora(
        CONFIG,
        LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"), init_lora_weights=False),
        jax.random.key(1),
    )
    return params, lora, merge(params, lora)


def _hf_greedy(params, prompts):
    import torch
    import transformers

    from flexora_jax.models.hf import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(CONFIG, params, tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=CONFIG.eos_token_id,
            pad_token_id=0,
        )
    return [row[width:].tolist() for row in out]


def _assert_same_as_reference(ours: list[list[int]], ref: list[list[int]]) -> None:
    for o, r in zip(ours, ref):
        assert o == r[: len(o)]  # transformers pads after EOS; ours stops there
        assert len(o) == NEW or o[-1] == CONFIG.eos_token_id


@pytest.fixture(scope="module")
def greedy(model):
    params, lora, merged = model
    return {
        "base": gen.generate(CONFIG, params, PROMPTS, max_new_tokens=NEW),
        "lora": gen.generate(CONFIG, params, PROMPTS, lora=lora, max_new_tokens=NEW),
        "merged": gen.generate(CONFIG, merged, PROMPTS, max_new_tokens=NEW),
    }


def test_greedy_matches_transformers_with_left_padding(model, greedy):
    params, _, merged = model
    _assert_same_as_reference(greedy["base"].tokens, _hf_greedy(params, PROMPTS))
    _assert_same_as_reference(greedy["merged"].tokens, _hf_greedy(merged, PROMPTS))
    assert sum(len(t) for t in greedy["base"].tokens) > 2 * len(PROMPTS)  # more than a token or two each


def test_unmerged_adapter_equals_merged_weights(greedy):
    assert greedy["lora"].tokens == greedy["merged"].tokens
    assert greedy["lora"].tokens != greedy["base"].tokens  # the adapter changes the output
    np.testing.assert_allclose(
        np.concatenate(greedy["lora"].logprobs), np.concatenate(greedy["merged"].logprobs), atol=1e-4
    )


def test_kv_cache_equals_recomputing_the_full_forward(model, greedy):
    params, lora, _ = model
    fwd = jax.jit(lambda p, lo, ids, m, pos: forward(CONFIG, p, ids, m, lora=lo, positions=pos))
    width = max(map(len, PROMPTS)) + NEW  # one fixed (left-padded) width: one compiled forward per adapter
    for name, lo in (("base", None), ("lora", lora)):
        seqs = [list(p) for p in PROMPTS]
        logps = [[] for _ in PROMPTS]
        for _ in range(NEW):  # re-run the whole left-padded batch at every step, no cache
            ids = np.array([[0] * (width - len(s)) + s for s in seqs], np.int32)
            mask = np.array([[0] * (width - len(s)) + [1] * len(s) for s in seqs], np.int32)
            pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
            logits = np.asarray(fwd(params, lo, ids, mask, pos))[:, -1]
            logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
            for i, s in enumerate(seqs):
                nxt = int(np.argmax(logits[i]))
                s.append(nxt)
                logps[i].append(float(logp[i, nxt]))
        out = greedy[name]
        for i, p in enumerate(PROMPTS):
            n = len(out.tokens[i])
            assert out.tokens[i] == seqs[i][len(p) : len(p) + n], name
            np.testing.assert_allclose(out.logprobs[i], logps[i][:n], atol=1e-4)


#: The cache paths' families: GQA with LoRA and gates; a windowed and a full layer (Mistral / Qwen2);
#: Gemma 2 (windows, attention and final logit soft-capping, query_pre_attn_scalar, sandwich norms, GeGLU).
CACHE_FAMILIES = {
    "llama_gqa": CONFIG,
    "window": dataclasses.replace(CONFIG, sliding_window=4, sliding_layers=(1,)),
    "gemma2": dataclasses.replace(
        CONFIG,
        head_dim=16,
        model_type="gemma2",
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        sliding_window=4,
        sliding_layers=(0,),
        query_pre_attn_scalar=24.0,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
    ),
}


_forward = jax.jit(forward, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "unroll"))
def _cached_logits(config, params, lora, gates, tokens, mask, forced, *, max_new_tokens, unroll):
    """Logits [b, m + 1, v] of the prefill and of decode steps fed ``forced`` [b, m], as ``_decode`` runs them."""
    b, p = tokens.shape
    lora_layers = per_layer_lora(lora, gates, config.num_hidden_layers)
    h, prompt_kv = gen._prefill(config, params, lora_layers, tokens, mask)
    layers, cache = gen._decode_inputs(config, params, lora_layers, prompt_kv, max_new_tokens, unroll)
    valid = jnp.concatenate([mask > 0, jnp.ones((b, max_new_tokens), bool)], axis=-1)

    def step(cache, xs):
        token, j = xs
        h, cache = gen._step(config, params, layers, cache, token, p + j, mask.sum(-1) + j, valid)
        return cache, lm_head(config, params, h)

    _, logits = jax.lax.scan(step, cache, (forced.T, jnp.arange(forced.shape[1])))
    return jnp.concatenate([lm_head(config, params, h)[:, None], jnp.swapaxes(logits, 0, 1)], axis=1)


@pytest.mark.parametrize(
    "family,unroll", [("llama_gqa", True), ("window", True), ("gemma2", True), ("gemma2", False)]
)  # scanned: decode of models deeper than UNROLL_LAYERS
def test_cached_logits_equal_the_uncached_forward(family, unroll):
    """Prefill + teacher-forced decode steps on a left-padded batch give the full forward's logits (1e-5), with
    LoRA on every module and layer + rank gates; windows of 4 slide over prompt and generated columns."""
    config = CACHE_FAMILIES[family]
    params = init_params(config, jax.random.key(0), init_std=0.2, head_std=0.5)
    lora = init_lora(
        config, LoraConfig(r=4, lora_alpha=8.0, target_modules="all-linear", init_lora_weights=False), jax.random.key(1)
    )
    rng = np.random.default_rng(0)
    L = config.num_hidden_layers
    gates = Gates(
        layer=jnp.asarray(rng.normal(size=L), jnp.float32),
        rank={m: jnp.asarray(rng.normal(size=(L, 4)), jnp.float32) for m in lora.spec.targets},
    )
    p, m = 8, 6
    tokens = rng.integers(3, config.vocab_size, (3, p + m)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :5], mask[2, :3] = 0, 0  # prompts of 8, 3 and 5 tokens, left-padded
    positions = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
    ref = np.asarray(_forward(config, params, tokens, mask, lora, gates, positions))[:, p - 1 :]
    ours = np.asarray(
        _cached_logits(
            config, params, lora, gates, tokens[:, :p], mask[:, :p], tokens[:, p:], max_new_tokens=m + 2, unroll=unroll
        )
    )
    assert np.abs(ref).max() > 1.0  # logits big enough for 1e-5 to mean something
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_scanned_and_unrolled_decode_generate_the_same(model, greedy, monkeypatch):
    """Models deeper than UNROLL_LAYERS scan their blocks in the decode loop: same tokens and log-probs."""
    params, lora, _ = model
    monkeypatch.setattr(gen, "UNROLL_LAYERS", 0)
    out = gen.generate(CONFIG, params, PROMPTS, lora=lora, max_new_tokens=NEW)
    assert out.tokens == greedy["lora"].tokens
    np.testing.assert_allclose(np.concatenate(out.logprobs), np.concatenate(greedy["lora"].logprobs), atol=1e-5)


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "scanned"])
def test_decode_program_never_copies_the_cache(model, unroll):
    """In the compiled program no op copies or transposes a layer's cache [b, k, s, e]: each step writes its
    column in place (dynamic-update-slice; XLA would copy the buffer first if it could not). Unrolled, nothing
    slices it either: the attention reads each layer's buffer where it lies."""
    params, _, _ = model
    b, p = 4, 16
    tokens = np.ones((b, p), np.int32)
    hlo = (
        gen._decode.lower(
            CONFIG,
            params,
            None,
            None,
            tokens,
            np.ones_like(tokens),
            jnp.asarray([5], jnp.int32),
            jax.random.key(0),
            jnp.float32(1.0),
            jnp.float32(1.0),
            jnp.int32(0),
            max_new_tokens=NEW,
            do_sample=False,
            top_k=0,
            unroll=unroll,
        )
        .compile()
        .as_text()
    )
    layer = f"{b},{CONFIG.num_key_value_heads},{p + NEW},{CONFIG.head_dim}]"
    ops = re.findall(r"= f32\[(?:\d+,)?" + re.escape(layer) + r"\{[^}]*\} ([a-z-]+)\(", hlo)
    assert ops.count("dynamic-update-slice") == 2 * (CONFIG.num_hidden_layers if unroll else 1), ops  # k, v
    allowed = {"dynamic-update-slice", "fusion", "pad", "bitcast", "get-tuple-element", "parameter"}
    allowed |= set() if unroll else {"dynamic-slice"}  # scanned: XLA CPU copies the layer's slice for the matmul
    assert set(ops) <= allowed, ops


def test_no_compilation_for_new_prompt_lengths_within_a_bucket(model, greedy):
    """Prompts of other lengths in the same (batch, prompt) bucket reuse the program: XLA compiles nothing."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    params, _, _ = model
    compiled = []

    def listen(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiled.append(duration)

    prompts = [[1, 9, 4, 77, 3, 2, 60, 61, 62, 63, 64], [1, 5], [1, 44, 45, 46]]  # 11, 2, 4 tokens: bucket 16
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        out = gen.generate(CONFIG, params, prompts, max_new_tokens=NEW)
        assert compiled == [] and len(out.tokens) == 3
        jax.jit(lambda x: x * 3)(1.0)  # the listener does see a compilation
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(compiled) == 1


def test_tinystories_greedy_from_bos_matches_golden_ids(tinystories_dir, tinystories_golden_ids):
    from flexora_jax.models.hf import load_model, load_tokenizer

    golden = tinystories_golden_ids  # data/tinystories260k/SOURCE.md
    config, params = load_model(tinystories_dir)
    tokenizer = load_tokenizer(tinystories_dir)
    out = gen.generate(config, params, [[1]], max_new_tokens=32, tokenizer=tokenizer, stop=["Lily"])
    assert out.finish_reasons == ["stop"]
    assert out.texts[0] == "Once upon a time, there was a little girl named "
    assert out.tokens[0] == golden[1 : len(out.tokens[0]) + 1]
    full = gen.generate(config, params, [[1]], max_new_tokens=32)
    assert full.tokens[0] == golden[1:] and full.finish_reasons == ["length"]
    assert np.exp(full.logprobs[0][0]) == pytest.approx(0.784, abs=1e-3)


def test_sampling_is_seeded_and_warpers_reduce_to_greedy(model, greedy):
    params, _, _ = model
    kw = dict(max_new_tokens=NEW, temperature=1.5)
    a = gen.generate(CONFIG, params, PROMPTS, seed=3, **kw)
    assert a.tokens == gen.generate(CONFIG, params, PROMPTS, seed=3, **kw).tokens
    assert a.tokens != gen.generate(CONFIG, params, PROMPTS, seed=4, **kw).tokens
    assert gen.generate(CONFIG, params, PROMPTS, top_p=1e-6, **kw).tokens == greedy["base"].tokens
    logits = jax.random.normal(jax.random.key(0), (6, 40))
    t, p = jnp.float32(2.0), jnp.float32(1.0)
    top1 = [gen._choose(logits, jax.random.key(s), True, 1, t, p) for s in range(3)]
    assert all(np.array_equal(x, np.argmax(logits, -1)) for x in top1)
    top3 = np.stack([gen._choose(logits, jax.random.key(s), True, 3, t, p) for s in range(30)])
    allowed = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(np.isin(top3[:, i], allowed[i]).all() for i in range(6))
    assert len(np.unique(top3)) > 6  # it does sample


def test_sharded_params_give_the_same_tokens(model, greedy):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    params, _, _ = model
    mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))

    def place(path, x):
        name = jax.tree_util.keystr(path)
        spec = P(None, None, "model") if "kernel" in name and x.shape[-1] % 2 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree_util.tree_map_with_path(place, params)
    assert len(sharded["layers"]["q_proj"]["kernel"].sharding.device_set) == 2
    with jax.set_mesh(mesh):
        out = gen.generate(CONFIG, sharded, PROMPTS, max_new_tokens=NEW)
    assert out.tokens == greedy["base"].tokens


def test_few_programs_for_many_batches(model):
    params, _, _ = model
    before = gen._decode._cache_size()
    prompts = [[1] + [7 + (i * j) % 80 for j in range(i % 9)] for i in range(11)]
    gen.generate(CONFIG, params, prompts, max_new_tokens=NEW, batch_size=4)  # batches of 4, 4, 3 -> one shape
    assert gen._decode._cache_size() - before <= 1


def test_bad_inputs_raise_clear_errors(model):
    params, _, _ = model
    with pytest.raises(DataError, match="more than the model's context 64"):
        gen.generate(CONFIG, params, [[1] * 60], max_new_tokens=NEW)
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer >= 1"):
        gen.generate(CONFIG, params, PROMPTS, max_new_tokens=0)
    with pytest.raises(ConfigError, match="stop must be a list of non-empty strings"):
        gen.generate(CONFIG, params, PROMPTS, max_new_tokens=NEW, stop=[""])
    with pytest.raises(DataError, match="no tokens"):
        gen.generate(CONFIG, params, [[]], max_new_tokens=NEW)
    with pytest.raises(ConfigError, match="need a tokenizer"):
        gen.generate(CONFIG, params, ["text"], max_new_tokens=NEW)
