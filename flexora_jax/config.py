"""Typed, frozen configs of the library: model, LoRA, search, selection, fine-tune, evaluation, mesh.

All configs are frozen dataclasses: hashable, so a ``ModelConfig`` can be a static argument of
``jax.jit``; validated in ``__post_init__`` so a bad value fails where it is written, with a message
that names the field and what was expected. ``LoraConfig`` uses PEFT's field names and meanings so an
adapter round-trips through ``adapter_config.json`` unchanged. The command's run sections and the YAML
loader are in :mod:`flexora_jax.pipeline.config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax

from flexora_jax.errors import ConfigError

#: Linear modules of a LLaMA block that LoRA can adapt, in block order.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
#: Phi-3's fused projections -> the modules they hold, in row order (checkpoints and PEFT adapters use these).
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def module_path(module: str, layer: int) -> str:
    """The HF / PEFT path of ``module`` in block ``layer``, e.g. ``model.layers.3.self_attn.q_proj``.

    The one place that spells a module's path: checkpoint tensor names, PEFT adapter keys,
    ``rank_pattern`` keys and ``selection.json`` all build on it.
    """
    group = "self_attn" if module in ATTENTION_MODULES or module == "qkv_proj" else "mlp"
    return f"model.layers.{layer}.{group}.{module}"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
ROPE_TYPES = ("llama3", "linear", "dynamic")  # scaled RoPE variants (RopeScaling.rope_type)
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")  # SwiGLU / GeGLU (tanh-approximate GELU)
GEMMA_TYPES = ("gemma", "gemma2")  # sqrt(d)-scaled embeddings, (1 + w) RMSNorm
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: finite-difference checks (x64 mode)
ATTENTION_BACKENDS = ("auto", "xla", "flash", "cudnn", "splash")  # models.attention.select_attention decides "auto"


def require(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond`` (the validation of every config field)."""
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Scaled RoPE (``config.rope_parameters``): Llama-3 (default), ``linear`` or ``dynamic`` (NTK).

    ``linear`` divides every frequency by ``factor``; ``dynamic`` raises the base when a sequence is
    longer than ``max_position_embeddings`` (as transformers does); both use ``factor`` only.
    """

    factor: float = 8.0  # how much the context was extended
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are scaled by 1/factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: context length before extension
    rope_type: str = "llama3"  # one of ROPE_TYPES

    def __post_init__(self) -> None:
        require(self.rope_type in ROPE_TYPES, f"RopeScaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        require(self.factor >= 1.0 if self.rope_type == "dynamic" else self.factor > 0,
                f"RopeScaling.factor must be > 0 (>= 1 for dynamic), got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-style decoder (LLaMA 1-3, Mistral, Qwen2/3, Gemma 1/2, Phi-3 checkpoints).

    Family traits fixed by ``model_type``: Gemma scales embeddings by sqrt(d) and uses ``(1 + w)``
    RMSNorm weights; Gemma 2 adds norms after attention and MLP (sandwich norms).
    """

    vocab_size: int = 256  # tokens in the vocabulary
    hidden_size: int = 64  # model width d
    intermediate_size: int = 128  # SwiGLU hidden width
    num_hidden_layers: int = 2  # transformer blocks L
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int | None = None  # KV heads (GQA); None means = num_attention_heads
    head_dim: int | None = None  # per-head width; None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # longest sequence the model is meant for
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # Llama-3 scaling, None for default RoPE
    tie_word_embeddings: bool = False  # LM head shares the token embedding
    attention_bias: bool = False  # biases on q/k/v (Qwen2: True)
    attention_out_bias: bool = False  # bias on o_proj (HF attention_bias of Llama / Qwen3 / Gemma)
    mlp_bias: bool = False  # biases on gate/up/down (Llama mlp_bias)
    hidden_act: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    sliding_window: int | None = None  # attend to at most this many latest keys (Mistral / Qwen / Gemma 2)
    sliding_layers: tuple[int, ...] | None = None  # the windowed layers; None = all (when sliding_window)
    qk_norm: bool = False  # RMSNorm of each query / key head before RoPE (Qwen3)
    query_pre_attn_scalar: float | None = None  # scores scaled by this**-0.5, not head_dim**-0.5 (Gemma 2)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    model_type: str = "llama"  # HF model_type of the source checkpoint
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute / base-weight dtype; LoRA, gates and logits stay fp32
    scan_layers: bool = True  # run blocks under lax.scan (compile time flat in depth)
    remat_layers: bool = False  # jax.checkpoint each block (less activation memory, more compute)
    attention: str = "auto"  # attention backend, one of ATTENTION_BACKENDS (models.attention.select_attention)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0,
                   f"ModelConfig.{name} must be a positive integer, got {value!r}")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
               f"ModelConfig: num_attention_heads {self.num_attention_heads} must be a multiple of "
               f"num_key_value_heads {self.num_key_value_heads}")
        require(self.head_dim % 2 == 0, f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        require(self.dtype in DTYPES, f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(self.attention in ATTENTION_BACKENDS,
                f"ModelConfig.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        require(self.model_type in SUPPORTED_MODEL_TYPES,
               f"ModelConfig.model_type {self.model_type!r} is not supported; "
               f"supported: {SUPPORTED_MODEL_TYPES}")
        require(self.rms_norm_eps > 0, f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        require(self.hidden_act in HIDDEN_ACTS, f"ModelConfig.hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        require(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
                f"ModelConfig.sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.sliding_layers is not None:
            layers = tuple(sorted(set(int(i) for i in self.sliding_layers)))
            require(all(0 <= i < self.num_hidden_layers for i in layers),
                    f"ModelConfig.sliding_layers must be layer indices in [0, {self.num_hidden_layers}), got {layers}")
            object.__setattr__(self, "sliding_layers", layers)
        # Canonical form: None = every layer windowed; no windowed layer = no window.
        if self.sliding_window is None or self.sliding_layers == tuple(range(self.num_hidden_layers)):
            object.__setattr__(self, "sliding_layers", None)
        elif self.sliding_layers == ():
            object.__setattr__(self, "sliding_window", None)
            object.__setattr__(self, "sliding_layers", None)
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            require(value is None or value > 0, f"ModelConfig.{name} must be > 0 or None, got {value!r}")

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer: the sliding window in keys, 0 for full causal attention."""
        layers = range(self.num_hidden_layers) if self.sliding_layers is None else self.sliding_layers
        return tuple(self.sliding_window if self.sliding_window and i in layers else 0
                     for i in range(self.num_hidden_layers))

    @property
    def bias_modules(self) -> tuple[str, ...]:
        """The linear modules that carry a bias."""
        return tuple(m for m in ALL_MODULES if (self.attention_bias and m in ("q_proj", "k_proj", "v_proj"))
                     or (self.attention_out_bias and m == "o_proj") or (self.mlp_bias and m in MLP_MODULES))

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Names of the [l, d] norm weights of a block (Gemma 2 adds norms after attention and MLP)."""
        extra = ("pre_feedforward_norm", "post_feedforward_norm") if self.model_type == "gemma2" else ()
        return ("input_norm", "post_attention_norm") + extra

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def fused_modules(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Phi-3: fused projection -> ((module, rows), ...) in row order; empty for unfused families."""
        if self.model_type != "phi3":
            return {}
        return {f: tuple((m, self.module_shape(m)[1]) for m in parts) for f, parts in FUSED_MODULES.items()}

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a linear module of one block."""
        d, f = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (d, self.q_dim), "k_proj": (d, self.kv_dim), "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
        }
        if module not in shapes:
            raise ConfigError(f"unknown module {module!r}; valid modules: {ALL_MODULES}")
        return shapes[module]

    def num_params(self) -> int:
        """Parameter count of the base model (embedding + blocks + final norm + head)."""
        per_layer = len(self.layer_norms) * self.hidden_size + sum(a * b for a, b in map(self.module_shape, ALL_MODULES))
        per_layer += sum(self.module_shape(m)[1] for m in self.bias_modules) + 2 * self.head_dim * self.qk_norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_hidden_layers * per_layer + self.hidden_size + head


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters with PEFT's field names and meanings.

    ``target_modules`` is a tuple of module names or ``"all-linear"``; ``layers_to_transform`` is
    ``None`` (every block) or a tuple of block indices; ``rank_pattern`` / ``alpha_pattern`` map a
    key to a rank / alpha, where the key is a module name (``"q_proj"``) or a PEFT-style path
    (``"model.layers.3.self_attn.q_proj"``) matched as a suffix of the module path. When several
    keys match, the longest (most specific) wins, independent of key order; PEFT takes the first
    matching key in dict order instead, so ``export_peft`` writes only fully-qualified keys and
    exported adapters mean the same thing on both sides.
    """

    r: int = 8  # rank of every module unless rank_pattern says otherwise
    lora_alpha: float = 16.0  # scale = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA input, training only
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")  # module names, or "all-linear"
    layers_to_transform: tuple[int, ...] | None = None  # None = all blocks
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)  # module name / path -> rank
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)  # module name / path -> alpha
    use_rslora: bool = False  # scale = lora_alpha / sqrt(r)
    init_lora_weights: bool | str = True  # True: A kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r), B = 0
    use_dora: bool = False  # DoRA: a trained magnitude per output column (flexora_jax.dora)

    def __post_init__(self) -> None:
        tm = self.target_modules
        if not isinstance(tm, str) and len(tm) > 1 and all(isinstance(m, str) and len(m) == 1 for m in tm):
            tm = "".join(tm)  # a command-line string the union decoder split into characters ("all-linear")
        if isinstance(tm, str):
            tm = ALL_MODULES if tm == "all-linear" else (tm,)
        tm = tuple(tm)
        bad = [m for m in tm if m not in ALL_MODULES]
        require(not bad, f"LoraConfig.target_modules: unknown module(s) {bad}; "
                        f"valid choices: {list(ALL_MODULES)} or 'all-linear'")
        require(len(tm) > 0, "LoraConfig.target_modules is empty; name at least one module")
        # Canonical block order, no duplicates: the same config always means the same pytree.
        object.__setattr__(self, "target_modules", tuple(m for m in ALL_MODULES if m in tm))
        require(isinstance(self.r, int) and self.r > 0, f"LoraConfig.r must be a positive integer, got {self.r!r}")
        require(self.lora_alpha > 0, f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        require(0.0 <= self.lora_dropout < 1.0, f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.layers_to_transform is not None:
            layers = (self.layers_to_transform,) if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            layers = tuple(sorted(set(int(i) for i in layers)))
            require(all(i >= 0 for i in layers), f"LoraConfig.layers_to_transform has negative indices: {layers}")
            object.__setattr__(self, "layers_to_transform", layers)
        for key, rank in dict(self.rank_pattern).items():
            require(isinstance(rank, int) and rank >= 0,
                   f"LoraConfig.rank_pattern[{key!r}] must be a non-negative integer, got {rank!r}")
        for key, alpha in dict(self.alpha_pattern).items():
            require(alpha > 0, f"LoraConfig.alpha_pattern[{key!r}] must be > 0, got {alpha!r}")
        require(self.init_lora_weights in (True, False, "gaussian"),
               f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        require(isinstance(self.use_dora, bool), f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        # Freeze the mappings into sorted tuples so the config stays hashable (a static jit argument).
        object.__setattr__(self, "rank_pattern", FrozenDict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", FrozenDict(self.alpha_pattern))

    def validate_for(self, config: ModelConfig) -> None:
        """Check layer indices against a model; raise naming the valid range."""
        n = config.num_hidden_layers
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if i >= n]
            require(not bad, f"LoraConfig.layers_to_transform: layer index(es) {bad} out of range; "
                            f"the model has {n} layers (valid: 0..{n - 1})")
            require(len(self.layers_to_transform) > 0, "LoraConfig.layers_to_transform is empty")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers_to_transform is None else tuple(self.layers_to_transform)

    def _pattern_lookup(self, pattern: Mapping[str, Any], module: str, layer: int) -> Any:
        """The most specific key that matches the module path as a suffix wins (order-independent)."""
        path = module_path(module, layer)
        best, best_len = None, -1
        for key, value in pattern.items():
            if path == key or path.endswith("." + key):
                if len(key) > best_len:
                    best, best_len = value, len(key)
        return best

    def rank_for(self, module: str, layer: int) -> int:
        r = self._pattern_lookup(self.rank_pattern, module, layer)
        return self.r if r is None else int(r)

    def alpha_for(self, module: str, layer: int) -> float:
        a = self._pattern_lookup(self.alpha_pattern, module, layer)
        return float(self.lora_alpha if a is None else a)

    def scale_for(self, module: str, layer: int) -> float:
        r = self.rank_for(module, layer)
        if r == 0:
            return 0.0
        alpha = self.alpha_for(module, layer)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["layers_to_transform"] = None if self.layers_to_transform is None else list(self.layers_to_transform)
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        return d


class FrozenDict(dict):
    """A dict that hashes by its sorted items (configs must be hashable to be static jit args)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("this mapping is frozen")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


HYPERGRADIENTS = ("unrolled", "first_order", "darts", "forward")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")
SELECTION_RULES = ("positive", "top_k", "threshold")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The bilevel search: K inner LoRA steps on train data, one gate step on validation data.

    Defaults follow the planted-task regime that recovers planted layers on CPU; the paper's reference
    settings are :meth:`flexora_reference` and :meth:`autolora_reference`.
    """

    hypergradient: str = "unrolled"  # unrolled | first_order | darts | forward (jvp, few gates)
    inner_steps: int = 4  # K, inner optimizer steps per search step
    steps: int = 40  # outer (gate) steps
    batch_size: int = 16  # training examples per inner step
    val_batch_size: int = 16  # validation examples per outer step
    inner_optimizer: str = "adamw"  # adamw | adam | sgd (any optax transform through the API)
    inner_lr: float = 3e-3  # learning rate of the inner (LoRA) optimizer
    inner_schedule: str = "constant"  # constant | cosine (over steps * inner_steps)
    inner_weight_decay: float = 0.0  # AdamW weight decay of the inner optimizer
    inner_eps_root: float = 1e-16  # > 0 so the hypergradient through Adam is finite with B = 0
    inner_grad_clip: float = 0.0  # global-norm clip of inner gradients; 0 = off
    reset_inner_optimizer: bool = False  # reference-code quirk: fresh inner optimizer state each step
    outer_lr: float = 0.01  # Adam on the raw gates
    outer_b1: float = 0.9  # Adam beta1 of the gate optimizer, in [0, 1)
    outer_b2: float = 0.999  # Adam beta2 of the gate optimizer, in [0, 1)
    gate_power: int = 1  # layer gate exponent: 1, or 3 as in the reference code
    remat: bool = True  # jax.checkpoint the inner scan body (memory flat in K)
    darts_mode: str = "exact"  # exact (jvp mixed Hessian-vector product) | finite_difference
    darts_redo_inner: bool = True  # AutoLoRA: redo the inner step with the updated gates
    log_every: int = 1  # log every N search steps

    def __post_init__(self) -> None:
        require(self.hypergradient in HYPERGRADIENTS,
               f"search.hypergradient must be one of {HYPERGRADIENTS}, got {self.hypergradient!r}")
        for name in ("inner_steps", "steps", "batch_size", "val_batch_size", "log_every"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"search.{name} must be an integer >= 1, got {v!r}")
        require(self.inner_optimizer in OPTIMIZERS,
               f"search.inner_optimizer must be one of {OPTIMIZERS}, got {self.inner_optimizer!r}")
        require(self.inner_schedule in SCHEDULES,
               f"search.inner_schedule must be one of {SCHEDULES}, got {self.inner_schedule!r}")
        for name in ("inner_lr", "outer_lr"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and 0 < v < 10, f"search.{name} must be in (0, 10), got {v!r}")
        require(self.inner_eps_root >= 0, f"search.inner_eps_root must be >= 0, got {self.inner_eps_root}")
        for name in ("outer_b1", "outer_b2"):  # Adam's decay rates: 1.0 divides by zero in the bias correction
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and 0 <= v < 1, f"search.{name} must be in [0, 1), got {v!r}")
        for name in ("inner_weight_decay", "inner_grad_clip"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                    f"search.{name} must be a finite number >= 0, got {v!r}")
        require(self.gate_power in (1, 3), f"search.gate_power must be 1 or 3, got {self.gate_power!r}")
        require(self.darts_mode in ("exact", "finite_difference"),
               f"search.darts_mode must be 'exact' or 'finite_difference', got {self.darts_mode!r}")

    @classmethod
    def flexora_reference(cls, **overrides: Any) -> "SearchConfig":
        """The Flexora reference code's settings (first-order, AdamW 1e-4 cosine, batch 8, 600 steps)."""
        base = dict(hypergradient="first_order", inner_steps=1, steps=600, batch_size=8,
                    val_batch_size=8, inner_optimizer="adamw", inner_lr=1e-4, inner_schedule="cosine",
                    inner_grad_clip=1.0, outer_lr=0.01, gate_power=3)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def autolora_reference(cls, **overrides: Any) -> "SearchConfig":
        """AutoLoRA's settings (DARTS one-step hypergradient, Adam 3e-4 both levels, outer betas 0.5/0.999)."""
        base = dict(hypergradient="darts", inner_steps=1, batch_size=32, val_batch_size=32,
                    inner_optimizer="adam", inner_lr=3e-4, outer_lr=3e-4, outer_b1=0.5, outer_b2=0.999)
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """How final gates become a discrete choice of layers (Flexora); ranks always use AutoLoRA's rule.

    The rules act on the gate value the model applies, ``w_l = (L * softmax(alpha)_l) ** gate_power``:
    ``positive`` keeps ``w_l > 1`` (alpha above the mean, the paper's rule), ``top_k`` the ``top_k``
    largest, ``threshold`` every ``w_l >= threshold``.
    """

    rule: str = "positive"  # positive | top_k | threshold
    top_k: int = 0  # layers kept by "top_k"
    threshold: float = 1.0  # gate value kept by "threshold" (w_l >= threshold)

    def __post_init__(self) -> None:
        require(self.rule in SELECTION_RULES, f"selection.rule must be one of {SELECTION_RULES}, got {self.rule!r}")
        require(isinstance(self.top_k, int) and self.top_k >= 0,
                f"selection.top_k must be an integer >= 0, got {self.top_k!r}")
        require(self.rule != "top_k" or self.top_k >= 1, "selection.rule 'top_k' needs selection.top_k >= 1")
        require(isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0,
               f"selection.threshold must be a finite gate value >= 0, got {self.threshold!r}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning stage: a fresh LoRA on the selection, standard optax training loop."""

    epochs: float = 1.0  # passes over the training set (fractional allowed)
    max_steps: int = 0  # > 0 caps the number of optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (optax.MultiSteps)
    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # constant | cosine (with linear warm-up)
    warmup_ratio: float = 0.1  # fraction of the steps spent warming up linearly
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    optimizer: str = "adamw"  # adamw | adam | sgd
    eval_every: int = 0  # > 0: validation loss every N steps, best checkpoint kept
    keep_best: bool = False  # return the LoRA with the best validation loss

    def __post_init__(self) -> None:
        require(isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0,
                f"finetune.epochs must be a finite number > 0, got {self.epochs!r}")
        for name in ("batch_size", "grad_accum"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, f"finetune.{name} must be an integer >= 1, got {v!r}")
        require(self.max_steps >= 0, f"finetune.max_steps must be >= 0, got {self.max_steps!r}")
        require(0 < self.lr < 10, f"finetune.lr must be in (0, 10), got {self.lr!r}")
        require(self.schedule in SCHEDULES, f"finetune.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        require(0 <= self.warmup_ratio < 1, f"finetune.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        require(self.optimizer in OPTIMIZERS, f"finetune.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.grad_clip >= 0, f"finetune.grad_clip must be >= 0, got {self.grad_clip!r}")
        require(isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"finetune.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")


# ============================================================================ the run (pipeline) config
#: What ``method:`` / ``compare:`` may name. ``lora``: every layer (the baseline); ``flexora``: the
#: layers a layer-gate search selects; ``autolora``: every layer at the ranks a rank-gate search
#: selects; ``flexora+autolora``: both from one combined search; ``random_k``: as many layers as the
#: flexora selection, drawn with the run seed; ``lora_drop``: the last k layers. Equal-parameter
#: baselines: ``lora_lowrank``: every layer at rank ``max(1, round(r * k / L))`` (about flexora's
#: parameter count spread over all layers); ``flexora_highrank``: flexora's layers at rank

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation after fine-tuning."""

    batch_size: int = 32  # requests (or sequences) per jitted call
    limit: int = 0  # score only the first N test examples of each task; 0 = all
    base: bool = True  # also score the base model without LoRA
    question_control: bool = False  # also score every model with the question removed from the prompt

    def __post_init__(self) -> None:
        require(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"eval.batch_size must be an integer >= 1, got {self.batch_size!r}")
        require(isinstance(self.limit, int) and self.limit >= 0, f"eval.limit must be >= 0, got {self.limit!r}")


MESH_AXES = ("data", "fsdp", "model")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a run: axis sizes of ``(data, fsdp, model)``; one of them may be -1.

    -1 takes all the devices the other axes leave. The default puts every device on ``fsdp`` (on one
    device that is the plain single-device run). The sizes must multiply to the device count, checked
    by :meth:`resolve` once the devices are known (``jax.device_count()`` after
    ``jax.distributed.initialize()`` on a pod); ``num_devices`` > 0 builds the mesh over only the
    first ``num_devices`` devices (single-process only), e.g. a 1-device run on an 8-device host.
    """

    data: int = 1  # batch (pure data parallel: parameters replicated over it)
    fsdp: int = -1  # batch and parameters (ZeRO-3 style: params gathered per layer)
    model: int = 1  # tensor parallel (attention heads, MLP width, vocab)
    num_devices: int = 0  # use the first N devices; 0 = all of them (jax.device_count())

    def __post_init__(self) -> None:
        sizes = self.sizes
        bad = [f"mesh.{a}={v!r}" for a, v in zip(MESH_AXES, sizes)
               if not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1]
        require(not bad, f"mesh: axis sizes must be positive integers or -1, got {', '.join(bad)} "
                        f"(sizes {self._sizes_text()})")
        require(sizes.count(-1) <= 1, f"mesh: at most one axis may be -1, got {self._sizes_text()}; "
                                     "give the others explicit sizes")
        require(isinstance(self.num_devices, int) and not isinstance(self.num_devices, bool)
               and self.num_devices >= 0,
               f"mesh.num_devices must be an integer >= 0 (0 = all devices), got {self.num_devices!r}")

    @property
    def sizes(self) -> list[int]:
        return [self.data, self.fsdp, self.model]

    def _sizes_text(self) -> str:
        return ", ".join(f"{a}={v!r}" for a, v in zip(MESH_AXES, self.sizes))

    def resolve(self, n_devices: int | None = None) -> tuple[int, int, int]:
        """The concrete (data, fsdp, model) sizes for ``n_devices`` devices (default: the devices to use).

        ``n_devices`` defaults to ``num_devices`` or else ``jax.device_count()``. Raises
        :class:`ConfigError` naming the ``mesh`` keys, the sizes and the device count when they do not fit.
        """
        if n_devices is None:
            n_devices = self.devices_to_use()
        sizes = self.sizes
        known = math.prod(s for s in sizes if s != -1)
        where = (f"mesh.num_devices={self.num_devices}" if self.num_devices
                 else "jax.device_count()")
        if -1 in sizes:
            if n_devices % known:
                raise ConfigError(f"mesh: sizes {self._sizes_text()} do not fit {n_devices} devices "
                                  f"({where}): {n_devices} is not a multiple of {known}; set "
                                  "mesh.data / mesh.fsdp / mesh.model so they multiply to the device count")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ConfigError(f"mesh: sizes {self._sizes_text()} multiply to {math.prod(sizes)}: the mesh "
                              f"needs {math.prod(sizes)} devices, but {n_devices} are available ({where}); set mesh.data / mesh.fsdp / mesh.model "
                              "so they multiply to the device count (use -1 for one axis to take the rest)")
        return tuple(sizes)  # type: ignore[return-value]

    def devices_to_use(self) -> int:
        """``num_devices`` (checked against ``jax.device_count()``) or all devices."""
        available = jax.device_count()
        if not self.num_devices:
            return available
        if self.num_devices > available:
            raise ConfigError(f"mesh.num_devices={self.num_devices} exceeds the {available} available devices "
                              "(jax.device_count()); expected 0 (all) or at most that many")
        if self.num_devices != available and jax.process_count() > 1:
            raise ConfigError(f"mesh.num_devices={self.num_devices}: a subset of the {available} devices "
                              f"cannot be used across {jax.process_count()} processes; set it to 0 (all)")
        return self.num_devices


# Configs are hashable static pytrees (no leaves): a user may pass one through jax.jit as an ordinary
# argument, and it is part of the compiled program's key, not a traced value.
for _cls in (ModelConfig, LoraConfig, SearchConfig, SelectionConfig, FinetuneConfig, EvalConfig, MeshConfig):
    jax.tree_util.register_static(_cls)
