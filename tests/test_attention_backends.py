"""The attention backend choice: the decision table, clear errors for fused kernels where they cannot run,
no fused kernel in any search step that differentiates twice, and the fused paths' numerics against the
library's attention (cuDNN's through jax.nn.dot_product_attention's XLA implementation, splash in Pallas
interpret mode)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexora_jax as fj
from flexora_jax.bilevel import init_search_state, make_search_step
from flexora_jax.config import SearchConfig
from flexora_jax.errors import ConfigError, FlexoraError
from flexora_jax.models import attention as attn
from flexora_jax.models.llama import attention_bias
from flexora_jax.train import make_optimizer

CUDA, TPU, CPU = "cuda", "tpu", "cpu"


@pytest.mark.parametrize(
    "requested,dtype,second_order,platform,want",
    [
        ("auto", "bfloat16", False, CUDA, "cudnn"),
        ("auto", "float16", False, CUDA, "cudnn"),
        ("auto", "float32", False, CUDA, "xla"),  # cuDNN flash needs half precision
        ("auto", "bfloat16", True, CUDA, "xla"),  # differentiated twice: never a fused kernel
        ("auto", "bfloat16", False, "rocm", "xla"),
        ("auto", "bfloat16", False, TPU, "splash"),
        ("auto", "float32", False, TPU, "splash"),
        ("auto", "bfloat16", True, TPU, "xla"),
        ("auto", "bfloat16", False, CPU, "flash"),  # CPU: our blockwise flash attention, first order
        ("auto", "float32", True, CPU, "flash"),  # ... and reverse-over-reverse (the unrolled hypergradient)
        ("xla", "bfloat16", True, CUDA, "xla"),
        ("flash", "bfloat16", False, CUDA, "flash"),  # plain JAX: runs anywhere when forced
        ("flash", "float32", True, TPU, "flash"),
        ("cudnn", "bfloat16", False, CUDA, "cudnn"),
        ("splash", "bfloat16", False, TPU, "splash"),
        ("cudnn", "bfloat16", True, CUDA, ConfigError),  # forced fused kernel + second order
        ("splash", "float32", True, TPU, ConfigError),
        ("cudnn", "float32", False, CUDA, ConfigError),
        ("cudnn", "bfloat16", False, CPU, ConfigError),
        ("splash", "bfloat16", False, CUDA, ConfigError),
        ("pallas", "bfloat16", False, CUDA, ConfigError),
    ],
)
def test_decision_table(requested, dtype, second_order, platform, want):
    if isinstance(want, str):
        assert attn.select_attention(requested, dtype, second_order=second_order, platform=platform) == want
    else:
        with pytest.raises(want, match="attention"):
            attn.select_attention(requested, dtype, second_order=second_order, platform=platform)


@pytest.mark.parametrize(
    "requested,platform,dtype,want",
    [
        ("auto", CPU, "float32", "xla"),
        ("auto", CUDA, "bfloat16", "xla"),
        ("auto", TPU, "bfloat16", "xla"),
        ("xla", CPU, "float32", "xla"),
        ("flash", CPU, "float32", ConfigError),
        ("cudnn", CUDA, "bfloat16", ConfigError),
    ],
)
def test_forward_mode_stages_get_the_xla_attention(requested, platform, dtype, want):
    """jvp / jacfwd cannot go through a custom_vjp: forward mode always runs the checkpointed XLA attention."""
    if isinstance(want, str):
        assert attn.select_attention(requested, dtype, second_order=True, forward_mode=True, platform=platform) == want
    else:
        with pytest.raises(want, match="forward"):
            attn.select_attention(requested, dtype, second_order=True, forward_mode=True, platform=platform)


@pytest.mark.parametrize(
    "estimator,darts_mode,second,forward",
    [
        ("unrolled", "exact", True, False),
        ("forward", "exact", True, True),
        ("darts", "exact", True, True),
        ("darts", "finite_difference", False, False),
        ("first_order", "exact", False, False),
        (None, "exact", False, False),
    ],
)
def test_which_stages_differentiate_twice(estimator, darts_mode, second, forward):
    assert attn.differentiates_twice(estimator, darts_mode) is second
    assert attn.needs_forward_mode(estimator, darts_mode) is forward


def test_config_field_is_validated():
    with pytest.raises(FlexoraError, match="attention"):
        fj.ModelConfig(attention="pallas")
    assert fj.ModelConfig().attention == "auto" and fj.ModelConfig(attention="flash").attention == "flash"


# ----------------------------------------------------------------------- search steps on a pretend GPU
TINY = fj.ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    dtype="bfloat16",
)


def _search_jaxpr(
    estimator: str,
    darts_mode: str = "exact",
    config: fj.ModelConfig = TINY,
    grad_of_hypergradient: bool = False,
    unrolled_mode: str = "mixed",
) -> str:
    sc = SearchConfig(
        hypergradient=estimator,
        inner_steps=1,
        batch_size=2,
        val_batch_size=2,
        darts_mode=darts_mode,
        unrolled_mode=unrolled_mode,
    )
    params = fj.init_params(config, jax.random.key(0))
    lora = fj.init_lora(config, fj.LoraConfig(r=2, target_modules=("q_proj", "v_proj")), jax.random.key(1))
    state = init_search_state(lora, fj.init_gates("layer", config.num_hidden_layers), sc)
    ids = jnp.zeros((1, 2, 8), jnp.int32)
    batches = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    val = jax.tree.map(lambda x: x[0], batches)
    step = make_search_step(config, sc)
    if grad_of_hypergradient:  # d/d(gates) of the norm of the hypergradient: one order more

        def f(gates):
            return step(params, state._replace(gates=gates), batches, val)[1]["hypergrad_norm"]

        return str(jax.make_jaxpr(jax.grad(f))(state.gates))
    return str(jax.make_jaxpr(step)(params, state, batches, val))


FUSED_MARKERS = ("cudnn", "custom_vjp", "pallas")


@pytest.fixture
def pretend_gpu(monkeypatch) -> list:
    """A CUDA platform for the decision, and cuDNN calls recorded (then run by XLA: no cuDNN on this CPU)."""
    calls: list = []

    def recorded(q, k, v, bias, implementation="cudnn"):
        calls.append(q.shape)
        return attn.recompute_blocked_attention_hm(q, k, v, bias, 0)

    monkeypatch.setattr(attn, "device_platform", lambda: CUDA)
    monkeypatch.setattr(attn, "cudnn_attention", recorded)
    return calls


@pytest.mark.parametrize("estimator,darts_mode", [("unrolled", "exact"), ("forward", "exact"), ("darts", "exact")])
def test_second_order_search_steps_hold_no_fused_kernel(pretend_gpu, estimator, darts_mode):
    text = _search_jaxpr(estimator, darts_mode, unrolled_mode="reverse")
    assert not [m for m in FUSED_MARKERS if m in text] and not pretend_gpu


def test_mixed_mode_unrolled_takes_the_fused_kernel_in_its_first_order_passes_only(pretend_gpu):
    """Mixed mode differentiates the training loss twice only in its Hessian-vector products (XLA attention
    there); the inner steps' gradients and the validation gradient are first order (cuDNN on a GPU)."""
    _search_jaxpr("unrolled")
    assert pretend_gpu


def test_grad_of_the_hypergradient_traces_on_a_pretend_gpu(pretend_gpu):
    """Differentiating the hypergradient itself is one order more for every pass: reverse mode, XLA attention."""
    text = _search_jaxpr("unrolled", grad_of_hypergradient=True, unrolled_mode="reverse")
    assert not [m for m in FUSED_MARKERS if m in text] and not pretend_gpu


def test_forcing_a_fused_kernel_into_a_second_order_search_is_a_config_error(monkeypatch):
    monkeypatch.setattr(attn, "device_platform", lambda: CUDA)
    with pytest.raises(ConfigError, match="differentiates the loss twice"):
        make_search_step(dataclasses.replace(TINY, attention="cudnn"), SearchConfig(hypergradient="unrolled"))


@pytest.mark.parametrize("estimator,darts_mode", [("first_order", "exact"), ("darts", "finite_difference")])
def test_first_order_search_steps_use_cudnn_on_a_gpu(pretend_gpu, estimator, darts_mode):
    """The control: the same pretend GPU routes a first-order step to cuDNN (one call per traced block)."""
    _search_jaxpr(estimator, darts_mode)
    assert pretend_gpu


@pytest.fixture
def cpu_flash_calls(monkeypatch) -> list:
    """A CPU platform for the decision, and flash attention calls recorded (then run)."""
    calls: list = []
    real = attn.flash_attention

    def recorded(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(attn, "device_platform", lambda: CPU)
    monkeypatch.setattr(attn, "flash_attention", recorded)
    return calls


@pytest.mark.parametrize(
    "estimator,darts_mode,uses_flash",
    [
        ("unrolled", "exact", True),
        ("first_order", "exact", True),
        ("forward", "exact", False),
        ("darts", "exact", True),
    ],
)
def test_cpu_search_steps_use_flash_except_under_forward_mode(cpu_flash_calls, estimator, darts_mode, uses_flash):
    """On CPU ``auto`` runs flash in reverse-mode stages; ``forward`` (jacfwd) traces the XLA attention, which
    has a forward-mode rule (tracing it through flash would raise). ``darts`` exact takes flash in its first-order
    passes and XLA in its ``jvp`` of the gate gradient."""
    _search_jaxpr(estimator, darts_mode, config=dataclasses.replace(TINY, dtype="float32"))  # not TINY: cached steps
    assert bool(cpu_flash_calls) is uses_flash


def test_finetune_step_takes_flash_and_a_bare_forward_stays_jvp_able_on_cpu(cpu_flash_calls):
    """``make_train_step`` resolves ``auto`` for its (first-order) stage: flash on CPU. A bare ``forward``
    with an unresolved ``auto`` cannot know its caller's AD mode, so it runs XLA, which ``jax.jvp`` can
    differentiate (``hypergradient("forward", ...)`` on a hand-made loss relies on it)."""
    config = dataclasses.replace(TINY, dtype="float32", num_hidden_layers=1)  # not TINY: cached steps
    params = fj.init_params(config, jax.random.key(0))
    ids = jnp.zeros((2, 8), jnp.int32)
    jax.jvp(lambda p: fj.forward(config, p, ids), (params,), (params,))
    assert not cpu_flash_calls
    lora = fj.init_lora(config, fj.LoraConfig(r=2, target_modules=("q_proj", "v_proj")), jax.random.key(1))
    state = fj.init_train_state(lora, make_optimizer(fj.FinetuneConfig(), 10))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    jax.make_jaxpr(fj.make_train_step(config, fj.FinetuneConfig(), 10))(params, state, batch)
    assert cpu_flash_calls


# ------------------------------------------------------------------------------------------ numerics
def _qkv(b=2, t=16, nk=2, g=2, e=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, nk, g, e)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, nk, e)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, nk, e)), jnp.float32)
    return q, k, v


def _valid_rows(bias):
    return np.asarray(bias[:, 0].max(-1) > attn.NEG_INF / 2)  # query rows that see at least one key


@pytest.mark.parametrize("case", ["causal", "padding", "segments"])
def test_dot_product_attention_path_equals_the_library_attention(case):
    """cuDNN's call (mask + is_causal + GQA by head grouping) run by jax's XLA implementation on CPU."""
    b, t = 2, 16
    q, k, v = _qkv(b, t)
    mask = np.ones((b, t), np.int32)
    segments = None
    if case == "padding":
        mask[0, 11:] = 0
        mask[1, :3] = 0  # left padding too
    if case == "segments":
        segments = jnp.asarray(np.repeat([[0] * 6 + [1] * 4 + [2] * 4 + [-1] * 2], b, 0), jnp.int32)
    bias = attention_bias(jnp.asarray(mask), b, t, segments)
    want = attn.recompute_blocked_attention_hm(q, k, v, bias, 4)
    got = attn.cudnn_attention(q, k, v, bias, implementation="xla")
    rows = _valid_rows(bias)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-5, rtol=1e-5)


def test_splash_reads_key_padding_and_refuses_other_biases():
    b, t = 2, 8
    mask = np.ones((b, t), np.int32)
    mask[0, 5:], mask[1, :2] = 0, 0  # right and left padding
    seg, plain = attn.splash_segments(attention_bias(jnp.asarray(mask), b, t))
    np.testing.assert_array_equal(seg, mask)
    assert bool(plain)
    packed = jnp.asarray([[0] * 4 + [1] * 2 + [2] * 2] * b, jnp.int32)
    assert not bool(attn.splash_segments(attention_bias(None, b, t, packed))[1])


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_splash_in_interpret_mode_equals_the_library_attention(softcap):
    """The Pallas splash kernel run by the Pallas interpreter on CPU: causal + key padding + GQA."""
    b, t = 1, 128
    q, k, v = _qkv(b, t, nk=1, g=2, e=128)
    mask = np.ones((b, t), np.int32)
    mask[0, 100:] = 0
    bias = attention_bias(jnp.asarray(mask), b, t)
    try:
        got = attn.splash_mqa(q, k, v, attn.splash_segments(bias)[0], softcap, interpret=True)
    except Exception as err:  # noqa: BLE001 - the interpreter's coverage of TPU-only features varies
        pytest.skip(f"Pallas splash does not run in interpret mode on this CPU: {type(err).__name__}: {err}")
    want = attn.recompute_blocked_attention_hm(q, k, v, bias, 0, softcap)
    np.testing.assert_allclose(np.asarray(got)[0, :100], np.asarray(want)[0, :100], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="this checks the message on a machine without a GPU")
def test_gpu_benchmark_without_a_gpu_exits_with_a_message():
    from benchmarks import gpu  # benchmarks import torch only inside functions

    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--smoke"):
        gpu.run()
