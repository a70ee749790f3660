"""The model and LoRA configs: what a decoder is (``ModelConfig``, ``RopeScaling``) and what LoRA adapts
(``LoraConfig``, with PEFT's field names and meanings so an adapter round-trips through
``adapter_config.json`` unchanged), plus the module names and paths they share.

Frozen, validated dataclasses like every config of the library; :mod:`flexora_jax.config` re-exports them
beside the training configs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from flexora_jax import peft_fields
from flexora_jax.errors import ConfigError
from flexora_jax.validation import check_fields

#: Linear modules of a LLaMA block that LoRA can adapt, in block order.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
#: ModelConfig's sizes, each a positive integer (or None where the field allows it); also checked in config.json.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
#: Each expert's projections in a mixture-of-experts MLP (Mixtral's names: w1 gate, w3 up, w2 down), block order.
EXPERT_MODULES = ("w1", "w3", "w2")
LORA_MODULES = ALL_MODULES + EXPERT_MODULES  # what LoraConfig.target_modules may name (the model decides which exist)
#: Phi-3's fused projections -> the modules they hold, in row order (checkpoints and PEFT adapters use these).
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def module_path(module: str, layer: int) -> str:
    """The HF / PEFT path of ``module`` in block ``layer``, e.g. ``model.layers.3.self_attn.q_proj``.

    The one place that spells a module's path: checkpoint tensor names, PEFT adapter keys,
    ``rank_pattern`` keys and ``selection.json`` all build on it. An expert module means every expert's
    (``model.layers.3.block_sparse_moe.experts.w1``; PEFT's key of expert 5 is ``...experts.5.w1``).
    """
    group = "self_attn" if module in ATTENTION_MODULES or module == "qkv_proj" else "mlp"
    return f"model.layers.{layer}.{'block_sparse_moe.experts' if module in EXPERT_MODULES else group}.{module}"


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral")
ROPE_TYPES = ("llama3", "linear", "dynamic", "yarn")  # scaled RoPE variants (RopeScaling.rope_type)
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")  # SwiGLU / GeGLU (tanh-approximate GELU)
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")  # sqrt(d)-scaled embeddings, (1 + w) RMSNorm
SANDWICH_TYPES = ("gemma2", "gemma3_text")  # norms after attention and after the MLP too
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: finite-difference checks (x64 mode)
ATTENTION_BACKENDS = ("auto", "xla", "flash", "cudnn", "splash")  # models.attention.select_attention decides "auto"


def require(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond`` (the validation of every config field)."""
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Scaled RoPE (``config.rope_parameters``): Llama-3 (default), ``linear``, ``dynamic`` (NTK) or ``yarn``.

    ``linear`` divides every frequency by ``factor``; ``dynamic`` raises the base when a sequence is
    longer than ``max_position_embeddings`` (as transformers does); both use ``factor`` only. ``yarn``
    blends interpolated and original frequencies over a ramp set by ``beta_fast`` / ``beta_slow`` and
    scales cos / sin (``models.llama.yarn_attention_factor``; transformers' ``_compute_yarn_parameters``).
    """

    factor: float = 8.0  # how much the context was extended
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are scaled by 1/factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: context length before extension
    rope_type: str = "llama3"  # one of ROPE_TYPES
    beta_fast: float = 32.0  # yarn: rotations below which a frequency is extrapolated (kept)
    beta_slow: float = 1.0  # yarn: rotations above which a frequency is interpolated (divided by factor)
    attention_factor: float | None = None  # yarn: cos / sin scale; None = from factor, mscale, mscale_all_dim
    mscale: float | None = None  # yarn: attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

    def __post_init__(self) -> None:
        check_fields(self, "RopeScaling")
        require(
            self.rope_type in ROPE_TYPES, f"RopeScaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}"
        )
        require(
            self.factor >= 1.0 if self.rope_type == "dynamic" else self.factor > 0,
            f"RopeScaling.factor must be > 0 (>= 1 for dynamic), got {self.factor}",
        )
        require(
            self.attention_factor is None or self.attention_factor > 0,
            f"RopeScaling.attention_factor must be > 0 or None, got {self.attention_factor!r}",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-style decoder (LLaMA 1-3, Mistral, Qwen2/3, Gemma 1-3, Phi-3, Mixtral).

    Family traits fixed by ``model_type``: Gemma scales embeddings by sqrt(d) and uses ``(1 + w)``
    RMSNorm weights; Gemma 2 / 3 add norms after attention and MLP (sandwich norms). A mixture of
    experts (Mixtral) replaces the MLP when ``num_local_experts`` is set (:mod:`flexora_jax.models.moe`).
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
    rope_local_theta: float | None = None  # RoPE base (unscaled) of the sliding-window layers (Gemma 3)
    num_local_experts: int | None = None  # MoE MLP with this many experts (Mixtral); None = dense MLP
    num_experts_per_tok: int = 2  # MoE: experts each token is routed to (top-k of the router's softmax)
    model_type: str = "llama"  # HF model_type of the source checkpoint
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute / base-weight dtype; LoRA, gates and logits stay fp32
    scan_layers: bool = True  # run blocks under lax.scan (compile time flat in depth)
    remat_layers: bool = False  # jax.checkpoint each block (less activation memory, more compute)
    attention: str = "auto"  # attention backend, one of ATTENTION_BACKENDS (models.attention.select_attention)

    def __post_init__(self) -> None:
        check_fields(self, "ModelConfig")  # types first: bools are not sizes, floats are finite
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            require(value is None or value > 0, f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"ModelConfig: num_attention_heads {self.num_attention_heads} must be a multiple of "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        require(self.head_dim % 2 == 0, f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        require(self.dtype in DTYPES, f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(
            self.attention in ATTENTION_BACKENDS,
            f"ModelConfig.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}",
        )
        require(
            self.model_type in SUPPORTED_MODEL_TYPES,
            f"ModelConfig.model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}",
        )
        require(self.rms_norm_eps > 0, f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        require(
            self.hidden_act in HIDDEN_ACTS,
            f"ModelConfig.hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}",
        )
        require(
            self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
            f"ModelConfig.sliding_window must be a positive integer or None, got {self.sliding_window!r}",
        )
        if self.sliding_layers is not None:
            layers = tuple(sorted(set(int(i) for i in self.sliding_layers)))
            require(
                all(0 <= i < self.num_hidden_layers for i in layers),
                f"ModelConfig.sliding_layers must be layer indices in [0, {self.num_hidden_layers}), got {layers}",
            )
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
        require(
            self.rope_local_theta is None or self.rope_local_theta > 0,
            f"ModelConfig.rope_local_theta must be > 0 or None, got {self.rope_local_theta!r}",
        )
        if self.sliding_window is None or (self.rope_local_theta == self.rope_theta and self.rope_scaling is None):
            object.__setattr__(self, "rope_local_theta", None)  # canonical: no layer uses a different RoPE
        if self.num_local_experts is not None:
            e, k = self.num_local_experts, self.num_experts_per_tok
            require(
                isinstance(e, int) and e > 0 and isinstance(k, int) and 0 < k <= e and not self.mlp_bias,
                f"ModelConfig: num_local_experts must be a positive integer (got {e!r}), num_experts_per_tok an "
                f"integer in [1, num_local_experts] (got {k!r}) and mlp_bias False (got {self.mlp_bias!r})",
            )

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer: the sliding window in keys, 0 for full causal attention."""
        layers = range(self.num_hidden_layers) if self.sliding_layers is None else self.sliding_layers
        return tuple(
            self.sliding_window if self.sliding_window and i in layers else 0 for i in range(self.num_hidden_layers)
        )

    @property
    def bias_modules(self) -> tuple[str, ...]:
        """The linear modules that carry a bias."""
        return tuple(
            m
            for m in ALL_MODULES
            if (self.attention_bias and m in ("q_proj", "k_proj", "v_proj"))
            or (self.attention_out_bias and m == "o_proj")
            or (self.mlp_bias and m in MLP_MODULES)
        )

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Names of the [l, d] norm weights of a block (Gemma 2 / 3 add norms after attention and MLP)."""
        extra = ("pre_feedforward_norm", "post_feedforward_norm") if self.model_type in SANDWICH_TYPES else ()
        return ("input_norm", "post_attention_norm") + extra

    @property
    def linear_modules(self) -> tuple[str, ...]:
        """The linear modules of a block, block order: attention, then the MLP's (or each expert's) projections."""
        return ATTENTION_MODULES + (MLP_MODULES if self.num_local_experts is None else EXPERT_MODULES)

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
        """(d_in, d_out) of a linear module of one block (of one expert, for ``EXPERT_MODULES``)."""
        d, f = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (d, self.q_dim),
            "k_proj": (d, self.kv_dim),
            "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
            "w1": (d, f),
            "w3": (d, f),
            "w2": (f, d),
        }
        if module not in self.linear_modules:
            raise ConfigError(
                f"module {module!r} is not in a {self.model_type} block; valid modules: {self.linear_modules}"
            )
        return shapes[module]

    def num_params(self) -> int:
        """Parameter count of the base model (embedding + blocks + final norm + head)."""
        experts = self.num_local_experts or 1
        per_layer = len(self.layer_norms) * self.hidden_size + sum(
            math.prod(self.module_shape(m)) * (experts if m in EXPERT_MODULES else 1) for m in self.linear_modules
        )
        per_layer += self.hidden_size * (self.num_local_experts or 0)  # the router
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
    layers_to_transform: tuple[int, ...] | int | None = None  # None = all blocks (an int: that one block)
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)  # module name / path -> rank
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)  # module name / path -> alpha
    use_rslora: bool = False  # scale = lora_alpha / sqrt(r)
    init_lora_weights: bool | str = True  # True: A kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r), B = 0
    use_dora: bool = False  # DoRA: a trained magnitude per output column (flexora_jax.dora)

    def __post_init__(self) -> None:
        check_fields(self, "LoraConfig")  # types first: r=True, use_rslora="false", lora_alpha=inf are refused
        tm = self.target_modules
        if not isinstance(tm, str) and len(tm) > 1 and all(isinstance(m, str) and len(m) == 1 for m in tm):
            tm = "".join(tm)  # a command-line string the union decoder split into characters ("all-linear")
        if isinstance(tm, str):
            tm = ALL_MODULES if tm == "all-linear" else (tm,)
        tm = tuple(tm)
        bad = [m for m in tm if m not in LORA_MODULES]
        require(
            not bad,
            f"LoraConfig.target_modules: unknown module(s) {bad}; "
            f"valid choices: {list(LORA_MODULES)} or 'all-linear' (= {list(ALL_MODULES)})",
        )
        require(len(tm) > 0, "LoraConfig.target_modules is empty; name at least one module")
        # Canonical block order, no duplicates: the same config always means the same pytree.
        object.__setattr__(self, "target_modules", tuple(m for m in LORA_MODULES if m in tm))
        require(isinstance(self.r, int) and self.r > 0, f"LoraConfig.r must be a positive integer, got {self.r!r}")
        require(self.lora_alpha > 0, f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        require(0.0 <= self.lora_dropout < 1.0, f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.layers_to_transform is not None:
            layers = (
                (self.layers_to_transform,) if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            )
            layers = tuple(sorted(set(int(i) for i in layers)))
            require(all(i >= 0 for i in layers), f"LoraConfig.layers_to_transform has negative indices: {layers}")
            object.__setattr__(self, "layers_to_transform", layers)
        for key, rank in dict(self.rank_pattern).items():
            require(
                isinstance(rank, int) and rank >= 0,
                f"LoraConfig.rank_pattern[{key!r}] must be a non-negative integer, got {rank!r}",
            )
        for key, alpha in dict(self.alpha_pattern).items():
            require(alpha > 0, f"LoraConfig.alpha_pattern[{key!r}] must be > 0, got {alpha!r}")
        require(
            self.init_lora_weights in (True, False, "gaussian"),
            f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}",
        )
        require(isinstance(self.use_dora, bool), f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        # Freeze the mappings into sorted tuples so the config stays hashable (a static jit argument).
        object.__setattr__(self, "rank_pattern", FrozenDict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", FrozenDict(self.alpha_pattern))

    @classmethod
    def from_peft(cls, source: Any) -> LoraConfig:
        """The LoraConfig of a PEFT LoRA config: a ``peft.LoraConfig``, its ``to_dict()``, or the path of an
        ``adapter_config.json`` (or its directory). Not ``LoraConfig(**peft_config.to_dict())``: this one reads
        every PEFT field, keeps what computes the same here (module paths, ``layers_to_transform``,
        ``exclude_modules``, PEFT's first-match patterns), and raises :class:`ConfigError` naming any field whose
        value we do not implement (``bias="all"``, ``modules_to_save``, ...) or that PEFT does not know."""
        raw, where = peft_fields.read_peft_config(source)
        kwargs = peft_fields.lora_config_kwargs(raw, where, ALL_MODULES, module_path)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def validate_for(self, config: ModelConfig) -> None:
        """Check layer indices against a model; raise naming the valid range."""
        n = config.num_hidden_layers
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if i >= n]
            require(
                not bad,
                f"LoraConfig.layers_to_transform: layer index(es) {bad} out of range; "
                f"the model has {n} layers (valid: 0..{n - 1})",
            )
            require(len(self.layers_to_transform) > 0, "LoraConfig.layers_to_transform is empty")
        # A pattern key that matches no adapted module path would be ignored silently (a typo, a layer past the
        # model's depth): name it. Phi-3's fused projections are paths too (PEFT adapters name them).
        modules = (*self.target_modules, *config.fused_modules)
        paths = [module_path(m, i) for m in modules for i in range(n)]
        for field in ("rank_pattern", "alpha_pattern"):
            unmatched = [k for k in getattr(self, field) if not any(p == k or p.endswith("." + k) for p in paths)]
            require(
                not unmatched,
                f"LoraConfig.{field} key(s) {unmatched} match no adapted module of this {n}-layer model "
                f"(target_modules {list(self.target_modules)}); expected a module name ('q_proj') or the end "
                f"of a module path ('layers.0.self_attn.q_proj', e.g. {paths[0]!r})",
            )

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
