"""Typed, frozen configs for the model, LoRA and gates.

All configs are frozen dataclasses: hashable, so a ``ModelConfig`` can be a static argument of
``jax.jit``; validated in ``__post_init__`` so a bad value fails where it is written, with a message
that names the field and what was expected. ``LoraConfig`` uses PEFT's field names and meanings so an
adapter round-trips through ``adapter_config.json`` unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from flexora_jax.errors import ConfigError

#: Linear modules of a LLaMA block that LoRA can adapt, in block order.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES


def module_path(module: str, layer: int) -> str:
    """The HF / PEFT path of ``module`` in block ``layer``, e.g. ``model.layers.3.self_attn.q_proj``.

    The one place that spells a module's path: checkpoint tensor names, PEFT adapter keys,
    ``rank_pattern`` keys and ``selection.json`` all build on it.
    """
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{group}.{module}"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: finite-difference checks (x64 mode)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3`` in ``config.rope_parameters``)."""

    factor: float = 8.0  # how much the context was extended
    low_freq_factor: float = 1.0  # wavelengths above original/low_freq_factor are scaled by 1/factor
    high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # context length before extension


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-style decoder (LLaMA 1-3, Mistral, Qwen2 checkpoints)."""

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
    model_type: str = "llama"  # HF model_type of the source checkpoint
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute / base-weight dtype; LoRA, gates and logits stay fp32
    scan_layers: bool = True  # run blocks under lax.scan (compile time flat in depth)
    remat_layers: bool = False  # jax.checkpoint each block (less activation memory, more compute)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0,
                f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0,
                   f"ModelConfig.{name} must be a positive integer, got {value!r}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               f"ModelConfig: num_attention_heads {self.num_attention_heads} must be a multiple of "
               f"num_key_value_heads {self.num_key_value_heads}")
        _check(self.head_dim % 2 == 0, f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        _check(self.dtype in DTYPES, f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.model_type in SUPPORTED_MODEL_TYPES,
               f"ModelConfig.model_type {self.model_type!r} is not supported; "
               f"supported: {SUPPORTED_MODEL_TYPES}")
        _check(self.rms_norm_eps > 0, f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

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
        per_layer = 2 * self.hidden_size + sum(a * b for a, b in map(self.module_shape, ALL_MODULES))
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_hidden_layers * per_layer + self.hidden_size + head

    # ----------------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "ModelConfig":
        """Build from a ``transformers`` config object (LlamaConfig, MistralConfig, Qwen2Config)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        legacy_scaling = getattr(hf_config, "rope_scaling", None)
        if not rope and legacy_scaling:
            rope = dict(legacy_scaling)
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        elif rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: 'default', 'llama3'")
        attention_bias = bool(getattr(hf_config, "attention_bias", model_type == "qwen2"))
        if model_type == "qwen2":
            attention_bias = True
        kwargs = dict(
            vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            max_position_embeddings=hf_config.max_position_embeddings, rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=attention_bias, model_type=model_type,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=_first(getattr(hf_config, "eos_token_id", None)),
            pad_token_id=getattr(hf_config, "pad_token_id", None),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> Any:
        """The matching ``transformers`` config (LlamaConfig / MistralConfig / Qwen2Config)."""
        import transformers

        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            hidden_act="silu", rope_parameters=rope,
        )
        if self.model_type == "qwen2":
            return transformers.Qwen2Config(**common)
        if self.model_type == "mistral":
            return transformers.MistralConfig(head_dim=self.head_dim, sliding_window=None, **common)
        return transformers.LlamaConfig(head_dim=self.head_dim, attention_bias=self.attention_bias,
                                        mlp_bias=False, **common)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


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
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None  # None = all blocks
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False  # scale = lora_alpha / sqrt(r)
    init_lora_weights: bool | str = True  # True: A kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r), B = 0

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
            tm = ALL_MODULES if tm == "all-linear" else (tm,)
        tm = tuple(tm)
        bad = [m for m in tm if m not in ALL_MODULES]
        _check(not bad, f"LoraConfig.target_modules: unknown module(s) {bad}; "
                        f"valid choices: {list(ALL_MODULES)} or 'all-linear'")
        _check(len(tm) > 0, "LoraConfig.target_modules is empty; name at least one module")
        # Canonical block order, no duplicates: the same config always means the same pytree.
        object.__setattr__(self, "target_modules", tuple(m for m in ALL_MODULES if m in tm))
        _check(isinstance(self.r, int) and self.r > 0, f"LoraConfig.r must be a positive integer, got {self.r!r}")
        _check(self.lora_alpha > 0, f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.layers_to_transform is not None:
            layers = (self.layers_to_transform,) if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            layers = tuple(sorted(set(int(i) for i in layers)))
            _check(all(i >= 0 for i in layers), f"LoraConfig.layers_to_transform has negative indices: {layers}")
            object.__setattr__(self, "layers_to_transform", layers)
        for key, rank in dict(self.rank_pattern).items():
            _check(isinstance(rank, int) and rank >= 0,
                   f"LoraConfig.rank_pattern[{key!r}] must be a non-negative integer, got {rank!r}")
        for key, alpha in dict(self.alpha_pattern).items():
            _check(alpha > 0, f"LoraConfig.alpha_pattern[{key!r}] must be > 0, got {alpha!r}")
        _check(self.init_lora_weights in (True, False, "gaussian"),
               f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        # Freeze the mappings into sorted tuples so the config stays hashable (a static jit argument).
        object.__setattr__(self, "rank_pattern", _FrozenDict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", _FrozenDict(self.alpha_pattern))

    def validate_for(self, config: ModelConfig) -> None:
        """Check layer indices against a model; raise naming the valid range."""
        n = config.num_hidden_layers
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if i >= n]
            _check(not bad, f"LoraConfig.layers_to_transform: layer index(es) {bad} out of range; "
                            f"the model has {n} layers (valid: 0..{n - 1})")
            _check(len(self.layers_to_transform) > 0, "LoraConfig.layers_to_transform is empty")

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


class _FrozenDict(dict):
    """A dict that hashes by its sorted items (configs must be hashable to be static jit args)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("this mapping is frozen")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


HYPERGRADIENTS = ("unrolled", "first_order", "darts", "forward")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")
SELECTION_RULES = ("positive", "topk", "threshold")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The bilevel search: K inner LoRA steps on train data, one gate step on validation data.

    Defaults follow the planted-task regime that recovers planted layers on CPU; the paper's reference
    settings are :meth:`flexora_reference` and :meth:`autolora_reference`.
    """

    gates: str = "layer"  # "layer" (Flexora), "rank" (AutoLoRA) or "both"
    hypergradient: str = "unrolled"  # unrolled | first_order | darts | forward (jvp, few gates)
    inner_steps: int = 4  # K, inner optimizer steps per search step
    steps: int = 40  # outer (gate) steps
    batch_size: int = 16  # training examples per inner step
    val_batch_size: int = 16  # validation examples per outer step
    inner_optimizer: str = "adamw"  # adamw | adam | sgd (any optax transform through the API)
    inner_lr: float = 3e-3
    inner_schedule: str = "constant"  # constant | cosine (over steps * inner_steps)
    inner_weight_decay: float = 0.0
    inner_eps_root: float = 1e-16  # > 0 so the hypergradient through Adam is finite with B = 0
    inner_grad_clip: float = 0.0  # global-norm clip of inner gradients; 0 = off
    reset_inner_optimizer: bool = False  # reference-code quirk: fresh inner optimizer state each step
    outer_lr: float = 0.01  # Adam on the raw gates
    outer_b1: float = 0.9
    outer_b2: float = 0.999
    gate_power: int = 1  # layer gate exponent: 1, or 3 as in the reference code
    remat: bool = True  # jax.checkpoint the inner scan body (memory flat in K)
    darts_mode: str = "exact"  # exact (jvp mixed Hessian-vector product) | finite_difference
    darts_redo_inner: bool = True  # AutoLoRA: redo the inner step with the updated gates
    selection: str = "positive"  # positive (alpha > 0) | topk | threshold
    top_k: int = 0  # layers kept by "topk"
    threshold: float = 1.0  # gate value w_l kept by "threshold" (w_l >= threshold)
    log_every: int = 1

    def __post_init__(self) -> None:
        _check(self.gates in ("layer", "rank", "both"),
               f"search.gates must be 'layer', 'rank' or 'both', got {self.gates!r}")
        _check(self.hypergradient in HYPERGRADIENTS,
               f"search.hypergradient must be one of {HYPERGRADIENTS}, got {self.hypergradient!r}")
        for name in ("inner_steps", "steps", "batch_size", "val_batch_size", "log_every"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"search.{name} must be an integer >= 1, got {v!r}")
        _check(self.inner_optimizer in OPTIMIZERS,
               f"search.inner_optimizer must be one of {OPTIMIZERS}, got {self.inner_optimizer!r}")
        _check(self.inner_schedule in SCHEDULES,
               f"search.inner_schedule must be one of {SCHEDULES}, got {self.inner_schedule!r}")
        for name in ("inner_lr", "outer_lr"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0 < v < 10, f"search.{name} must be in (0, 10), got {v!r}")
        _check(self.inner_eps_root >= 0, f"search.inner_eps_root must be >= 0, got {self.inner_eps_root}")
        _check(self.gate_power in (1, 3), f"search.gate_power must be 1 or 3, got {self.gate_power!r}")
        _check(self.darts_mode in ("exact", "finite_difference"),
               f"search.darts_mode must be 'exact' or 'finite_difference', got {self.darts_mode!r}")
        _check(self.selection in SELECTION_RULES,
               f"search.selection must be one of {SELECTION_RULES}, got {self.selection!r}")
        _check(self.top_k >= 0, f"search.top_k must be >= 0, got {self.top_k}")
        _check(self.selection != "topk" or self.top_k >= 1, "search.selection 'topk' needs search.top_k >= 1")

    @classmethod
    def flexora_reference(cls, **overrides: Any) -> "SearchConfig":
        """The Flexora reference code's settings (first-order, AdamW 1e-4 cosine, batch 8, 600 steps)."""
        base = dict(gates="layer", hypergradient="first_order", inner_steps=1, steps=600, batch_size=8,
                    val_batch_size=8, inner_optimizer="adamw", inner_lr=1e-4, inner_schedule="cosine",
                    inner_grad_clip=1.0, outer_lr=0.01, gate_power=3, selection="positive")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def autolora_reference(cls, **overrides: Any) -> "SearchConfig":
        """AutoLoRA's settings (DARTS one-step hypergradient, Adam 3e-4 both levels, outer betas 0.5/0.999)."""
        base = dict(gates="rank", hypergradient="darts", inner_steps=1, batch_size=32, val_batch_size=32,
                    inner_optimizer="adam", inner_lr=3e-4, outer_lr=3e-4, outer_b1=0.5, outer_b2=0.999)
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning stage: a fresh LoRA on the selection, standard optax training loop."""

    epochs: float = 1.0  # passes over the training set (fractional allowed)
    max_steps: int = 0  # > 0 caps the number of optimizer steps
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (optax.MultiSteps)
    lr: float = 3e-3
    schedule: str = "cosine"  # constant | cosine (with linear warm-up)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    optimizer: str = "adamw"
    eval_every: int = 0  # > 0: validation loss every N steps, best checkpoint kept
    keep_best: bool = False  # return the LoRA with the best validation loss

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"finetune.epochs must be > 0, got {self.epochs!r}")
        for name in ("batch_size", "grad_accum"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"finetune.{name} must be an integer >= 1, got {v!r}")
        _check(self.max_steps >= 0, f"finetune.max_steps must be >= 0, got {self.max_steps!r}")
        _check(0 < self.lr < 10, f"finetune.lr must be in (0, 10), got {self.lr!r}")
        _check(self.schedule in SCHEDULES, f"finetune.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(0 <= self.warmup_ratio < 1, f"finetune.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        _check(self.optimizer in OPTIMIZERS, f"finetune.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.grad_clip >= 0, f"finetune.grad_clip must be >= 0, got {self.grad_clip!r}")


# ============================================================================ the run (pipeline) config
#: What ``method:`` / ``compare:`` may name. ``lora``: every layer (the baseline); ``flexora``: the
#: layers a layer-gate search selects; ``autolora``: every layer at the ranks a rank-gate search
#: selects; ``flexora+autolora``: both from one combined search; ``random_k``: as many layers as the
#: flexora selection, drawn with the run seed; ``lora_drop``: the last k layers. Equal-parameter
#: baselines: ``lora_lowrank``: every layer at rank ``max(1, round(r * k / L))`` (about flexora's
#: parameter count spread over all layers); ``flexora_highrank``: flexora's layers at rank
#: ``round(r * L / k)`` (LoRA-all's parameter count on fewer layers). Both keep ``lora_alpha / r``.
METHODS = ("lora", "flexora", "autolora", "flexora+autolora", "random_k", "lora_drop", "lora_lowrank",
           "flexora_highrank")
#: Methods whose layers or rank follow the size of the flexora selection (k): they need a layer search.
K_METHODS = ("random_k", "lora_drop", "lora_lowrank", "flexora_highrank")
#: The gate kind a method's search uses (methods without a search are absent).
METHOD_GATES = {"flexora": "layer", "autolora": "rank", "flexora+autolora": "both"}
PLANTED_TASK = "planted"


@dataclasses.dataclass(frozen=True)
class ModelSourceConfig:
    """Where the base model comes from (ignored by the embedded planted task, which builds its own)."""

    path: str | None = None  # HF model directory or hub id (config.json + safetensors + tokenizer)
    llama2c: str | None = None  # a llama2.c checkpoint, converted into <output_dir>/model on first use
    tokenizer_model: str | None = None  # the SentencePiece .model that goes with ``llama2c``
    dtype: str = "float32"  # compute / base-weight dtype: float32 on CPU, bfloat16 on accelerators
    allow_pickle: bool = False  # read a pickle-only (pytorch_model.bin) checkpoint: only for files you trust

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(isinstance(self.allow_pickle, bool), f"model.allow_pickle must be true or false, got {self.allow_pickle!r}")
        _check(not (self.path and self.llama2c),
               f"model.path ({self.path!r}) and model.llama2c ({self.llama2c!r}) are exclusive; set one")
        _check(self.llama2c is None or self.tokenizer_model is not None,
               "model.llama2c needs model.tokenizer_model (the SentencePiece .model of the checkpoint)")


@dataclasses.dataclass(frozen=True)
class PlantedOptions:
    """The embedded planted task: a teacher with LoRA deltas in known layers (see ``planted.py``)."""

    num_layers: int = 6  # blocks of the teacher / student
    num_planted: int = 2  # layers with a planted delta, drawn from the run seed
    soft_targets: bool = True  # search data: teacher distributions (True) or sampled tokens
    n_train: int = 500  # search training sequences
    n_val: int = 200  # search validation sequences
    n_test: int = 500  # held-out test sequences (scored against the teacher's distributions)
    finetune_examples: int = 200  # fine-tune on the first N training sequences; 0 = all
    finetune_targets: str = "hard"  # "hard": tokens sampled from the teacher (scarce, noisy data); "same"
    rank: int = 4  # rank of every planted delta ...
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)  # ... or per module (AutoLoRA's target)
    modules: tuple[str, ...] = ("q_proj", "v_proj")  # the modules that carry the planted deltas
    layer_kl: float = 0.4  # signal strength: each planted layer alone moves the output by this KL (nats)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", _FrozenDict(self.ranks))
        modules = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules)
        object.__setattr__(self, "modules", modules)
        bad = [m for m in modules if m not in ALL_MODULES]
        _check(modules and not bad, f"task.planted.modules must name modules of {list(ALL_MODULES)}, got {list(modules)!r}")
        _check(len(set(modules)) == len(modules), f"task.planted.modules has duplicates: {list(modules)!r}")
        _check(isinstance(self.layer_kl, (int, float)) and self.layer_kl > 0,
               f"task.planted.layer_kl must be a KL > 0 (nats), got {self.layer_kl!r}")
        for name in ("num_layers", "num_planted", "n_train", "n_val", "n_test", "rank"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"task.planted.{name} must be an integer >= 1, got {v!r}")
        _check(self.num_planted <= self.num_layers,
               f"task.planted.num_planted ({self.num_planted}) must be <= num_layers ({self.num_layers})")
        _check(isinstance(self.finetune_examples, int) and 0 <= self.finetune_examples <= self.n_train,
               f"task.planted.finetune_examples must be in 0..n_train ({self.n_train}), "
               f"got {self.finetune_examples!r}")
        _check(self.finetune_targets in ("hard", "same"),
               f"task.planted.finetune_targets must be 'hard' or 'same', got {self.finetune_targets!r}")
        for module, r in self.ranks.items():
            _check(module in modules and isinstance(r, int) and r >= 1,
                   f"task.planted.ranks maps planted modules ({list(modules)}) to ranks >= 1, "
                   f"got {module!r}: {r!r}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The task: ``planted`` (the embedded default) or a multiple-choice task of the registry."""

    name: str = PLANTED_TASK  # "planted" or a task of flexora_jax.tasks (piqa, hellaswag, winogrande, ...)
    source: str = "local"  # "local": release files under data_dir; "hub": the Hugging Face Hub
    data_dir: str | None = None  # local data folder; None = $FLEXORA_DATA_DIR or ../shared/data
    split_seed: int = 0  # seed of the train / validation / test carve-up (kept fixed across runs)
    max_length: int = 256  # SFT sequence length (prompt truncated from the left)
    n_train: int = 0  # search training examples (the first N of the train split); 0 = all
    n_val: int = 0  # search-validation examples; 0 = all
    n_test: int = 0  # test examples scored; 0 = all
    n_finetune: int = 0  # fine-tune training examples (the first N of the train split); 0 = same as n_train
    planted: PlantedOptions = dataclasses.field(default_factory=PlantedOptions)

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name != "", "task.name must be a non-empty string")
        _check(self.source in ("local", "hub"), f"task.source must be 'local' or 'hub', got {self.source!r}")
        _check(isinstance(self.max_length, int) and self.max_length >= 8,
               f"task.max_length must be an integer >= 8, got {self.max_length!r}")
        for name in ("n_train", "n_val", "n_test", "n_finetune"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"task.{name} must be an integer >= 0 (0 = all), got {v!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation after fine-tuning."""

    batch_size: int = 32  # requests (or sequences) per jitted call
    limit: int = 0  # score only the first N test examples of each task; 0 = all
    base: bool = True  # also score the base model without LoRA
    question_control: bool = False  # also score every model with the question removed from the prompt

    def __post_init__(self) -> None:
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"eval.batch_size must be an integer >= 1, got {self.batch_size!r}")
        _check(isinstance(self.limit, int) and self.limit >= 0, f"eval.limit must be >= 0, got {self.limit!r}")


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
        _check(not bad, f"mesh: axis sizes must be positive integers or -1, got {', '.join(bad)} "
                        f"(sizes {self._sizes_text()})")
        _check(sizes.count(-1) <= 1, f"mesh: at most one axis may be -1, got {self._sizes_text()}; "
                                     "give the others explicit sizes")
        _check(isinstance(self.num_devices, int) and not isinstance(self.num_devices, bool)
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
        import jax

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


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Resumable orbax checkpoints under ``<output_dir>/checkpoints``."""

    every: int = 50  # save every N steps of each search / fine-tune (and at its end); 0 = only at the end
    keep: int = 2  # checkpoints kept per stage

    def __post_init__(self) -> None:
        _check(isinstance(self.every, int) and self.every >= 0,
               f"checkpoint.every must be an integer >= 0, got {self.every!r}")
        _check(isinstance(self.keep, int) and self.keep >= 1,
               f"checkpoint.keep must be an integer >= 1, got {self.keep!r}")


def _default_run_lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4.0, target_modules=("q_proj", "v_proj"))


def _default_run_search() -> SearchConfig:
    return SearchConfig(hypergradient="unrolled", inner_steps=4, steps=40, inner_lr=3e-3, outer_lr=0.01,
                        batch_size=16, val_batch_size=16)


def _default_run_finetune() -> FinetuneConfig:
    return FinetuneConfig(epochs=32.0, max_steps=400, batch_size=16, lr=3e-3, schedule="cosine",
                          warmup_ratio=0.0, grad_clip=0.0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One ``flexora-jax run``: search -> select -> fine-tune -> evaluate -> export.

    The defaults are the embedded demo: a planted task on a small LLaMA, searched with unrolled
    hypergradients and fine-tuned on scarce data next to the all-layer LoRA baseline.
    """

    method: str = "flexora"  # one of METHODS: the run's main result (adapter/, selection.json, eval.json)
    compare: tuple[str, ...] = ("lora",)  # more METHODS run on the same data and seeds, reported side by side
    seed: int = 0  # seeds the planted layers, LoRA init, batch order and random_k
    output_dir: str = "runs/flexora"  # the run directory (see docs/design.md)
    baseline_k: int = 0  # layers of random_k / lora_drop; 0 = as many as the flexora selection
    model: ModelSourceConfig = dataclasses.field(default_factory=ModelSourceConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    lora: LoraConfig = dataclasses.field(default_factory=_default_run_lora)
    search: SearchConfig = dataclasses.field(default_factory=_default_run_search)
    finetune: FinetuneConfig = dataclasses.field(default_factory=_default_run_finetune)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh (see docs/scaling.md)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method must be one of {list(METHODS)}, got {self.method!r}")
        compare = (self.compare,) if isinstance(self.compare, str) else tuple(self.compare)
        bad = [m for m in compare if m not in METHODS]
        _check(not bad, f"compare: unknown method(s) {bad}; allowed: {list(METHODS)}")
        object.__setattr__(self, "compare", compare)
        _check(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(isinstance(self.baseline_k, int) and self.baseline_k >= 0,
               f"baseline_k must be an integer >= 0, got {self.baseline_k!r}")
        _check(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir must be a non-empty path")
        if self.task.name == PLANTED_TASK:
            _check(self.model.path is None and self.model.llama2c is None,
                   "task.name 'planted' builds its own teacher model; unset model.path / model.llama2c, "
                   "or name a real task (e.g. task.name=piqa)")
        else:
            _check(self.model.path is not None or self.model.llama2c is not None,
                   f"task.name {self.task.name!r} needs a base model: set model.path (HF directory or hub id) "
                   "or model.llama2c + model.tokenizer_model")
        if self.search.gates != "layer":
            raise ConfigError("search.gates is set per method (flexora: layer, autolora: rank, "
                              f"flexora+autolora: both); leave it at 'layer', got {self.search.gates!r}")

    @property
    def methods(self) -> tuple[str, ...]:
        """``method`` then ``compare``, without repeats."""
        return tuple(dict.fromkeys((self.method,) + tuple(self.compare)))


def config_to_dict(config: Any) -> Any:
    """A config dataclass as plain YAML-safe data (tuples as lists, frozen mappings as dicts)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    return config


def _section_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _dataclass_type(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls``, or None when the field is a plain value."""
    import typing

    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _check_keys(cls: type, data: Any, where: str, origin: str) -> None:
    """Raise :class:`ConfigError` for any key of ``data`` that is not a field, naming the allowed ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: {where or 'the config'} must be a mapping of keys to values, "
                          f"got {type(data).__name__} {data!r}")
    fields = _section_fields(cls)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
            raise ConfigError(f"{origin}: unknown key {path!r}{hint}; allowed keys"
                              f"{' under ' + repr(where) if where else ''}: {sorted(fields)}")
        sub = _dataclass_type(cls, key)
        if sub is not None and value is not None:
            _check_keys(sub, value, path, origin)


def _flatten(cls: type, data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Section dicts -> dotted ``(key, value)`` pairs down to the leaf fields."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        sub = _dataclass_type(cls, key)
        if sub is not None and isinstance(value, Mapping):
            out += _flatten(sub, value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _parse_override(arg: str) -> tuple[str, str]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form --section.key=value (e.g. --lora.r=8)")
    key, value = arg[2:].split("=", 1)
    return key, value


def _cause(exc: BaseException) -> BaseException | None:
    """The first FlexoraError in an exception's cause / context chain (a validation error in a config)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def load_config(path: str | Any | None = None, overrides: tuple[str, ...] | list[str] = (),
                base: Mapping[str, Any] | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from a YAML file plus ``--section.key=value`` overrides.

    The YAML is read with ``yaml.safe_load``; keys are checked against the dataclass tree (an unknown
    key names the allowed ones); values are decoded to the field types by draccus, which also parses
    the overrides (each value is YAML: ``--compare=[lora,flexora]``, ``--lora.rank_pattern={q_proj: 2}``).
    ``base`` is a dict applied before the file (used for defaults of a sub-command).

    Raises:
      ConfigError: naming the file / key / value and what was expected.
    """
    import draccus
    import yaml

    data: dict[str, Any] = {}
    origin = "command line"
    if base:
        _check_keys(RunConfig, base, "", "defaults")
    if path is not None:
        origin = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        loaded = {} if loaded is None else loaded
        _check_keys(RunConfig, loaded, "", origin)
        data = loaded
    # Every leaf of the default RunConfig first: draccus fills a section's missing keys from the
    # section class's own defaults, and RunConfig's sections have run-specific defaults.
    args: list[str] = []
    for source, mapping in (("defaults", config_to_dict(RunConfig())), ("defaults", base or {}), (origin, data)):
        for key, value in _flatten(RunConfig, mapping):
            args.append(f"--{key}={yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()}"
                        .removesuffix("\n..."))
    for arg in overrides:
        key, value = _parse_override(arg)
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        _check_keys(RunConfig, nested, "", f"override {arg!r}")
        args.append(arg)
    try:
        return draccus.parse(RunConfig, args=args, exit_on_error=False)
    except ConfigError:
        raise
    except Exception as exc:  # draccus: DecodingError(path, message) / ParsingError wrapping our ConfigError
        inner = _cause(exc)
        if inner is not None:
            raise ConfigError(f"{origin}: {inner}") from None
        where = getattr(exc, "key_path", None) or (exc.args[0] if len(exc.args) > 1 else None)
        key = ".".join(map(str, where)) if isinstance(where, (tuple, list)) else None
        detail = exc.args[-1] if exc.args else str(exc)
        raise ConfigError(f"{origin}: bad value for {key or 'the config'}: {detail}"
                          f"{_expected(key)}") from None


def _expected(key: str | None) -> str:
    """'; expected <type>' for a dotted key of RunConfig, from its type hint."""
    import typing

    if not key:
        return ""
    cls: Any = RunConfig
    for part in key.split(".")[:-1]:
        cls = _dataclass_type(cls, part) or cls
    try:
        hint = typing.get_type_hints(cls)[key.split(".")[-1]]
    except KeyError:
        return ""
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return f"; expected a value of type {name}"


def save_config(config: RunConfig, path: str | Any) -> None:
    """Write the fully resolved config as YAML (atomically: a kill never leaves half a file)."""
    import os

    import yaml

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
