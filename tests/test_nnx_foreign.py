"""Gated LoRA by surgery on NNX models written in other styles than flexora_jax's own decoder.

``ForeignLM``: a Python list of blocks (no scan), ``nnx.Einsum`` attention projections with head axes
as in Flax's gemma example, an MLP of ``nnx.Linear`` plus a custom projection that holds an
``nnx.Param`` and calls ``jnp.einsum`` itself, and its own path naming (``blocks.<i>``).
``StackedLM``: the same blocks created by ``nnx.vmap`` and run under ``nnx.scan`` (kernels carry a
leading layer axis, paths carry no layer index).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from flexora_jax.errors import CheckpointError, ConfigError, FlexoraError
from flexora_jax.nnx import Gate, add_lora, load_adapter, merge_lora, remove_lora, save_adapter, save_peft
from flexora_jax.nnx.surgery import count_lora_params, delta_kernel, lora_sites

VOCAB, D, HEADS, HEAD_DIM, FFN, SEQ = 64, 32, 4, 8, 64, 16
BLOCK_INDEX = r"blocks\.(\d+)"
ALL_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")


def kernel_init(std: float | None, spec: tuple | None):
    """normal(std) (lecun normal for None), partitioned over the mesh axes ``spec`` through NNX metadata."""
    init = nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)
    return init if spec is None else nnx.with_partitioning(init, spec)


class Projection(nnx.Module):
    """A model's own projection: an ``nnx.Param`` named ``w`` contracted by ``jnp.einsum`` in ``__call__``."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32, spec: tuple | None = None):
        self.w = nnx.Param(kernel_init(d_in**-0.5, spec)(rngs.params(), (d_in, d_out), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("btd,df->btf", x, self.w[...])


class Attention(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, partitioned: bool = False):
        def einsum(equation, shape, spec):
            return nnx.Einsum(
                equation,
                shape,
                rngs=rngs,
                param_dtype=dtype,
                kernel_init=kernel_init(D**-0.5, spec if partitioned else None),
            )

        self.q = einsum("BTD,NDH->BTNH", (HEADS, D, HEAD_DIM), ("model", "fsdp", None))
        self.k = einsum("BTD,NDH->BTNH", (HEADS, D, HEAD_DIM), ("model", "fsdp", None))
        self.v = einsum("BTD,NDH->BTNH", (HEADS, D, HEAD_DIM), ("model", "fsdp", None))
        self.o = einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, D), ("model", None, "fsdp"))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = self.q(x), self.k(x), self.v(x)  # [b, t, n, h]
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(HEAD_DIM)
        t = x.shape[1]
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & (mask[:, None, None, :] > 0)
        probs = jax.nn.softmax(jnp.where(allowed, logits, -1e9), axis=-1)
        return self.o(jnp.einsum("bnts,bsnh->btnh", probs, v))


class Mlp(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, partitioned: bool = False):
        def spec(s):
            return s if partitioned else None

        self.up = nnx.Linear(
            D, FFN, rngs=rngs, param_dtype=dtype, kernel_init=kernel_init(None, spec(("fsdp", "model")))
        )
        self.gate = Projection(D, FFN, rngs=rngs, dtype=dtype, spec=spec(("fsdp", "model")))
        self.down = nnx.Linear(
            FFN, D, rngs=rngs, param_dtype=dtype, kernel_init=kernel_init(None, spec(("model", "fsdp")))
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, partitioned: bool = False):
        self.norm1 = nnx.RMSNorm(D, rngs=rngs, param_dtype=dtype)
        self.attn = Attention(rngs=rngs, dtype=dtype, partitioned=partitioned)
        self.norm2 = nnx.RMSNorm(D, rngs=rngs, param_dtype=dtype)
        self.mlp = Mlp(rngs=rngs, dtype=dtype, partitioned=partitioned)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ForeignLM(nnx.Module):
    """A list of blocks; a peaked output head (``head_std``) so a planted change is visible in the output."""

    def __init__(
        self,
        num_layers: int = 3,
        *,
        rngs: nnx.Rngs,
        head_std: float = 0.5,
        dtype=jnp.float32,
        partitioned: bool = False,
    ):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs, param_dtype=dtype)
        self.blocks = nnx.List([Block(rngs=rngs, dtype=dtype, partitioned=partitioned) for _ in range(num_layers)])
        self.final_norm = nnx.RMSNorm(D, rngs=rngs, param_dtype=dtype)
        self.head = nnx.Linear(
            D, VOCAB, use_bias=False, rngs=rngs, param_dtype=dtype, kernel_init=nnx.initializers.normal(head_std)
        )

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else mask
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.final_norm(h))


class StackedLM(nnx.Module):
    """The same blocks stacked by ``nnx.vmap`` and run by ``nnx.scan``."""

    def __init__(self, num_layers: int = 3, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs=rngs)

        self.layers = create(rngs)
        self.head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs, kernel_init=nnx.initializers.normal(0.5))

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else mask

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h, block):
            return block(h, mask)

        return self.head(run(self.embed(tokens), self.layers))


#: One jitted call for every model in these tests (compiles once per model structure).
apply = nnx.jit(lambda model, tokens, mask: model(tokens, mask))


def tokens_and_mask(seed: int = 0, batch: int = 2) -> tuple[jax.Array, jax.Array]:
    tokens = jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, VOCAB)
    mask = jnp.ones((batch, SEQ), jnp.int32).at[0, -3:].set(0)  # padding on the first row
    return tokens, mask


def randomize_lora(model: nnx.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero B (and fresh A) everywhere, so the LoRA branch changes the output (numpy draws: no compiles)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state))


def soft_loss(model: nnx.Module, batch: dict) -> jax.Array:
    """Cross-entropy against soft targets ``batch["targets"]`` [b, t, v] (teacher distributions)."""
    logp = jax.nn.log_softmax(model(batch["tokens"]), axis=-1)
    return -jnp.mean(jnp.sum(batch["targets"] * logp, axis=-1))


def foreign_with_lora(seed: int = 0, gates: str | None = "both", targets=ALL_TARGETS, **kw) -> nnx.Module:
    model = ForeignLM(rngs=nnx.Rngs(seed), **kw)
    tokens, _ = tokens_and_mask()
    return add_lora(
        model,
        targets,
        rank=2,
        alpha=4.0,
        gates=gates,
        layer_index=BLOCK_INDEX,
        example_inputs=(tokens,),
        rngs=nnx.Rngs(seed + 100),
    )


# ----------------------------------------------------------------------------------------- tests
def test_foreign_model_unchanged_at_init_and_zero_gate_is_base():
    model = ForeignLM(rngs=nnx.Rngs(0))
    tokens, mask = tokens_and_mask()
    base = apply(model, tokens, mask)
    add_lora(
        model,
        ALL_TARGETS,
        rank=2,
        alpha=4.0,
        gates="both",
        layer_index=BLOCK_INDEX,
        example_inputs=(tokens,),
        rngs=nnx.Rngs(1),
    )
    sites = lora_sites(model)
    assert set(sites) == {
        f"blocks.{i}.{g}.{m}"
        for i in range(3)
        for g, ms in (("attn", "qkvo"), ("mlp", ("up", "gate", "down")))
        for m in ms
    }
    assert type(model.blocks[0].attn.q).__name__ == "LoraEinsum"
    assert type(model.blocks[0].mlp.gate).__name__ == "LoraProjection"
    assert model.blocks[1].attn.q.lora_gate is model.blocks[1].mlp.down.lora_gate  # one gate per layer
    np.testing.assert_array_equal(apply(model, tokens, mask), base)  # B = 0

    randomize_lora(model)
    adapted = apply(model, tokens, mask)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2
    for block in model.blocks:  # zero every layer gate: exactly the base
        block.attn.q.lora_gate.set_value(jnp.zeros(()))
    np.testing.assert_array_equal(apply(model, tokens, mask), base)


def test_zero_gate_removes_one_layer_exactly():
    model = foreign_with_lora(gates="layer")
    randomize_lora(model)
    tokens, mask = tokens_and_mask()
    model.blocks[1].attn.q.lora_gate.set_value(jnp.zeros(()))
    gated = apply(model, tokens, mask)
    # the same model with layer 1's LoRA removed outright
    for name in ALL_TARGETS:
        group = "attn" if name in "qkvo" else "mlp"
        remove_lora(getattr(getattr(model.blocks[1], group), name))
    np.testing.assert_array_equal(apply(model, tokens, mask), gated)


def test_lora_matches_dense_delta_and_merge():
    model = foreign_with_lora(gates="both")
    randomize_lora(model)
    nnx.update(model, jax.tree.map(lambda g: g * 0.7, nnx.state(model, Gate)))
    tokens, mask = tokens_and_mask()
    adapted = apply(model, tokens, mask)
    n_lora = count_lora_params(model)
    assert n_lora == 3 * (4 * 2 * (D + HEADS * HEAD_DIM) + 3 * 2 * (D + FFN))
    merge_lora(model)
    assert not lora_sites(model) and type(model.blocks[0].attn.q) is nnx.Einsum
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)) and not jax.tree.leaves(nnx.state(model, Gate))
    np.testing.assert_allclose(apply(model, tokens, mask), adapted, rtol=2e-5, atol=2e-5)


def test_nnx_optimizer_trains_lora_and_leaves_base_bitwise():
    model = foreign_with_lora(gates="layer")
    tokens, mask = tokens_and_mask()
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer):
        def loss(m):
            logits = m(tokens, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return value

    losses = [float(train_step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(nnx.LoRAParam)), base_before)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), nnx.state(model, nnx.LoRAParam), lora_before)
    assert all(jax.tree.leaves(changed))


def test_stacked_scan_model():
    model = StackedLM(rngs=nnx.Rngs(0))
    tokens, mask = tokens_and_mask()
    base = apply(model, tokens, mask)
    add_lora(model, ("q", "v", "gate", "down"), rank=2, gates="both", example_inputs=(tokens,), rngs=nnx.Rngs(1))
    site = lora_sites(model)["layers.attn.q"]
    assert site.stacked and site.layers == (0, 1, 2)
    assert model.layers.attn.q.lora_a.shape == (3, D, 2) and model.layers.attn.q.lora_gate.shape == (3,)
    assert model.layers.mlp.gate.lora_b.shape == (3, 2, FFN)
    np.testing.assert_array_equal(apply(model, tokens, mask), base)
    randomize_lora(model)
    assert float(jnp.max(jnp.abs(apply(model, tokens, mask) - base))) > 1e-2
    model.layers.attn.q.lora_gate.set_value(jnp.zeros((3,)))
    np.testing.assert_array_equal(apply(model, tokens, mask), base)


# ------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_flexora_errors():
    tokens, _ = tokens_and_mask()
    model = ForeignLM(rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="match no module.*blocks.0.attn.q"):
        add_lora(model, ("qq",), layer_index=BLOCK_INDEX, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="'blocks.0.attn.q' has no layer index.*layers.<i>"):
        add_lora(model, ("q",), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="'blocks.0.norm1' .*RMSNorm.* cannot take LoRA"):
        add_lora(model, ("norm1",), layer_index=BLOCK_INDEX, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="'blocks.0.mlp.gate' .*example_inputs"):
        add_lora(model, ("gate",), layer_index=BLOCK_INDEX, rngs=nnx.Rngs(0))
    with pytest.raises(FlexoraError, match="gates must be one of"):
        add_lora(model, ("q",), gates="layers", layer_index=BLOCK_INDEX, rngs=nnx.Rngs(0))
    add_lora(model, ("q",), layer_index=BLOCK_INDEX, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="'blocks.0.attn.q' already has LoRA"):
        add_lora(model, ("q",), layer_index=BLOCK_INDEX, example_inputs=(tokens,), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------- export
def test_adapter_round_trip_and_peft_export(tmp_path):
    model = foreign_with_lora(gates="both")
    randomize_lora(model)
    nnx.update(model, jax.tree.map(lambda g: g * 0.5, nnx.state(model, Gate)))
    tokens, mask = tokens_and_mask()
    expected = apply(model, tokens, mask)
    save_adapter(model, tmp_path / "native")
    fresh = ForeignLM(rngs=nnx.Rngs(0))  # the same base, no LoRA yet: rebuilt from adapter_config.json
    load_adapter(fresh, tmp_path / "native")
    assert sorted(lora_sites(fresh)) == sorted(lora_sites(model))
    np.testing.assert_array_equal(apply(fresh, tokens, mask), expected)
    with pytest.raises(CheckpointError, match="'blocks.0.attn.k'.*another model"):
        load_adapter(StackedLM(rngs=nnx.Rngs(0)), tmp_path / "native")

    def hf_name(path: str, layer: int) -> str:
        return f"model.layers.{layer}.{path.split('.', 2)[2]}"

    save_peft(model, tmp_path / "peft", peft_name=hf_name)
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 2 and len(config["target_modules"]) == 21
    assert "model.layers.2.mlp.up" in config["target_modules"]
    a = tensors["base_model.model.model.layers.2.mlp.up.lora_A.weight"]  # [r, in]
    b = tensors["base_model.model.model.layers.2.mlp.up.lora_B.weight"]  # [out, r]
    assert a.shape == (2, D) and b.shape == (FFN, 2)
    # PEFT's delta (alpha / r) B A equals the gated delta the model computes
    np.testing.assert_allclose(
        (b @ a).T * config["lora_alpha"] / 2, delta_kernel(model.blocks[2].mlp.up), rtol=1e-5, atol=1e-6
    )
