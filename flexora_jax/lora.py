"""LoRA adapters as a pytree next to (never inside) the frozen base params.

A :class:`LoraParams` holds the trainable A/B matrices of every adapted module, stacked over *all*
L blocks so the layer scan stays uniform, plus a static :class:`LoraSpec` (hashable, not a pytree
leaf) that says which blocks are adapted, each (module, block)'s rank and scale. Blocks that are not
adapted get scale 0 and are never exported or counted. Variable ranks (AutoLoRA, ``rank_pattern``)
are stored as ``r_max`` columns plus a rank mask; exports contain the true ranks.

What compiles when: the spec (adapted blocks, ranks, scales) is *static*, part of the pytree's
structure. The fine-tune does not compile per selection: :func:`flexora_jax.train.init_train_state` moves
the layout into a traced array (:meth:`LoraParams.traced_layout`: the per-(block, rank) coefficients
``coef`` next to a layout-free spec), so every selection with the same targets and ``r_max`` runs one
compiled step and one optimizer-state shape (a search never recompiles either: gate values are traced).
The arrays keep all L blocks, so a selection of 1 of L layers still holds L blocks of A / B (zero
outside the selection, and they stay zero: their gradient is exactly 0) and their optimizer moments;
``benchmarks/lora_layout.py`` measures that cost (0.4% of a 7B base's bytes for 1 of 32 layers) against
the compile it saves. The trainable count (:func:`count_params`) is the true one.

Because the spec is static metadata, ``jax.grad`` and any ``optax`` optimizer see only A and B:
the frozen base cannot be trained by accident, and an optimizer state covers LoRA leaves only.

Layout (fp32 whatever the base dtype): ``weights[module] = {"a": [L, d_in, r_max], "b": [L, r_max, d_out]}``
(``a`` is PEFT's ``lora_A.weight`` transposed, ``b`` is ``lora_B.weight`` transposed), plus
``"magnitude": [L, d_out]`` (PEFT's ``lora_magnitude_vector``) with ``use_dora`` (see :mod:`flexora_jax.dora`).
A mixture of experts' projections (``w1`` / ``w3`` / ``w2``, :mod:`flexora_jax.models.moe`) carry an expert
axis: ``a`` [L, n, d_in, r_max], ``b`` [L, n, r_max, d_out], one LoRA per expert under the block's shared
rank, scale and gates (the router is never adapted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flexora_jax.config import EXPERT_MODULES, LoraConfig, ModelConfig
from flexora_jax.dora import EXACT_NORM, GATE, MAGNITUDE, column_norm, dora_merge, lora_update
from flexora_jax.errors import ConfigError
from flexora_jax.gates import Gates, layer_gate_values, rank_gate_values
from flexora_jax.sharding import Axes, declared_axes
from flexora_jax.validation import check_config_type, check_key


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static description of a LoRA pytree: targets, adapted blocks, ranks and scales."""

    config: LoraConfig  # the LoraConfig it was built from (PEFT fields)
    num_layers: int  # L of the base model
    targets: tuple[str, ...]  # adapted module names, block order
    layers: tuple[int, ...]  # adapted block indices
    r_max: tuple[tuple[str, int], ...]  # per module: stored rank (columns of A)
    ranks: tuple[tuple[str, tuple[int, ...]], ...]  # per module: true rank in each block (0 = not adapted)
    scales: tuple[tuple[str, tuple[float, ...]], ...]  # per module: lora scale in each block (0 = not adapted)
    #: Phi-3: fused projection -> ((module, rows), ...): PEFT adapters name the fused modules (export_peft)
    fused: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()

    @property
    def dropout(self) -> float:
        return float(self.config.lora_dropout)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.use_dora)

    def adapted_mask(self, module: str) -> np.ndarray:
        """[L] float32: 1 where ``module`` is adapted in the block."""
        return (np.asarray(self.rank_of(module)) > 0).astype(np.float32)

    def rank_of(self, module: str) -> tuple[int, ...]:
        return dict(self.ranks)[module]

    def scale_of(self, module: str) -> tuple[float, ...]:
        return dict(self.scales)[module]

    def r_max_of(self, module: str) -> int:
        return dict(self.r_max)[module]

    def layout_free(self) -> LoraSpec:
        """This spec with every block adapted at ``r_max`` and scale 1: what a traced layout compiles against.

        Specs that differ only in blocks, ranks and scales (``layers_to_transform``, ``rank_pattern``,
        ``alpha_pattern``, ``r``, ``lora_alpha``, rsLoRA) map to one layout-free spec.
        """
        L = self.num_layers
        config = LoraConfig(
            r=1,
            lora_alpha=1.0,
            target_modules=self.targets,
            lora_dropout=self.config.lora_dropout,
            use_dora=self.config.use_dora,
        )
        return dataclasses.replace(
            self,
            config=config,
            layers=tuple(range(L)),
            ranks=tuple((m, (r,) * L) for m, r in self.r_max),
            scales=tuple((m, (1.0,) * L) for m, _ in self.r_max),
        )

    def coefficients(self, module: str) -> np.ndarray:
        """Static per-component multiplier [L, r_max]: scale where a component exists, else 0."""
        r_max = self.r_max_of(module)
        ranks = np.asarray(self.rank_of(module))[:, None]
        mask = (np.arange(r_max)[None, :] < ranks).astype(np.float32)
        return mask * np.asarray(self.scale_of(module), np.float32)[:, None]


def make_spec(model_config: ModelConfig, lora_config: LoraConfig) -> LoraSpec:
    """Resolve a LoraConfig against a model: adapted blocks, per-block ranks and scales."""
    lora_config.validate_for(model_config)
    _check_targets(model_config, lora_config)
    L = model_config.num_hidden_layers
    layers = lora_config.layers(L)
    ranks, scales, r_max = [], [], []
    for m in lora_config.target_modules:
        rk = tuple(lora_config.rank_for(m, i) if i in layers else 0 for i in range(L))
        sc = tuple(lora_config.scale_for(m, i) if i in layers else 0.0 for i in range(L))
        ranks.append((m, rk))
        scales.append((m, sc))
        r_max.append((m, max(max(rk), 1)))
    return LoraSpec(
        config=lora_config,
        num_layers=L,
        targets=lora_config.target_modules,
        layers=layers,
        r_max=tuple(r_max),
        ranks=tuple(ranks),
        scales=tuple(scales),
        fused=tuple(model_config.fused_modules.items()),
    )


def _check_targets(model_config: ModelConfig, lora_config: LoraConfig) -> None:
    """Every target is a module of the model's blocks; expert LoRA takes no dropout and no DoRA (nor does PEFT's)."""
    missing = [m for m in lora_config.target_modules if m not in model_config.linear_modules]
    if missing:
        hint = (
            " (its MLP is a mixture of experts: 'w1' (gate), 'w3' (up) and 'w2' (down) adapt every expert's "
            "projections; the router is never adapted)"
            if model_config.num_local_experts
            else " (w1 / w3 / w2 are the experts' projections of a mixture-of-experts MLP)"
        )
        raise ConfigError(
            f"LoraConfig.target_modules {missing}: a {model_config.model_type} block has no such module"
            f"{hint}; its modules: {list(model_config.linear_modules)}"
        )
    experts = [m for m in lora_config.target_modules if m in EXPERT_MODULES]
    if experts and (lora_config.lora_dropout or lora_config.use_dora):
        raise ConfigError(
            f"LoraConfig: LoRA on the experts {experts} is plain LoRA without dropout (got lora_dropout="
            f"{lora_config.lora_dropout}, use_dora={lora_config.use_dora}), as PEFT's LoRA on expert "
            "weights; target only attention modules for those, or set them off"
        )


def expert_axes(model_config: ModelConfig, module: str) -> tuple[int, ...]:
    """``(n,)`` for a mixture's expert module (its LoRA has an expert axis after the layer axis), else ``()``."""
    return (model_config.num_local_experts,) if module in EXPERT_MODULES else ()


def lora_axes(spec: LoraSpec) -> dict[str, dict[str, Axes]]:
    """The logical axis names of a LoRA's weights (the tree of :attr:`LoraParams.weights`, hence of its optimizer
    moments): A ``[layers, (expert,) <kernel's in axis>, rank]``, B ``[layers, (expert,) rank, <kernel's out
    axis>]``, DoRA's magnitude ``[layers, <out axis>]``, so A / B shard as their kernel does, the rank replicated."""
    keys = ("a", "b", MAGNITUDE) if spec.use_dora else ("a", "b")
    return {m: {k: declared_axes((m, k)) for k in keys} for m in spec.targets}


@struct.dataclass
class LoraParams:
    """Trainable LoRA weights (pytree leaves) and their static :class:`LoraSpec`."""

    weights: dict[str, dict[str, jax.Array]]
    spec: LoraSpec = struct.field(pytree_node=False)
    #: the layout as traced arrays {module: [L, r_max]} (scale x rank mask), with a layout-free ``spec``;
    #: None: the layout is the static spec's. See :meth:`traced_layout`.
    coef: dict[str, jax.Array] | None = None

    def traced_layout(self) -> LoraParams:
        """The same LoRA (the same function) with its layout traced: one compiled program for every selection
        with the same targets and ``r_max``. :meth:`with_spec` turns it back for export and counting."""
        if self.coef is not None:
            return self
        return LoraParams(
            self.weights,
            self.spec.layout_free(),
            {m: jnp.asarray(self.spec.coefficients(m)) for m in self.spec.targets},
        )

    def with_spec(self, spec: LoraSpec) -> LoraParams:
        """These weights under a static ``spec`` (the one :meth:`traced_layout` started from)."""
        return LoraParams(self.weights, spec)


def init_lora(
    model_config: ModelConfig, lora_config: LoraConfig, key: jax.Array, params: dict[str, Any] | None = None
) -> LoraParams:
    """Fresh LoRA params with PEFT's initialisation (``params``: the base, needed by DoRA only).

    ``init_lora_weights=True``: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming-uniform, a = sqrt(5)),
    B = 0, so the adapted model starts equal to the base. ``"gaussian"``: A ~ N(0, 1/r), B = 0.
    ``False``: B is random too (U(-1/sqrt(r), 1/sqrt(r))), useful for tests. Components beyond a
    block's rank and blocks that are not adapted are zero. With ``use_dora`` the magnitude starts at
    the column norms of ``W0 + s * B A`` (PEFT's ``DoraLinearLayer.update_layer``); 0 in blocks not adapted.
    """
    check_config_type(model_config, ModelConfig, "init_lora: model_config")
    check_config_type(lora_config, LoraConfig, "init_lora: lora_config")
    check_key(key, "init_lora: key")
    spec = make_spec(model_config, lora_config)
    if spec.use_dora and params is None:
        raise ConfigError(
            "init_lora: DoRA (use_dora=True) starts its magnitude at the base weights' column norms; "
            "pass the base params (init_lora(config, lora_config, key, params))"
        )
    L = model_config.num_hidden_layers
    init = lora_config.init_lora_weights
    weights = {}
    for i, m in enumerate(spec.targets):
        d_in, d_out = model_config.module_shape(m)
        r, ex = spec.r_max_of(m), expert_axes(model_config, m)
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        if init == "gaussian":
            a = jax.random.normal(ka, (L, *ex, d_in, r), jnp.float32) / r
        else:
            bound = 1.0 / np.sqrt(d_in)
            a = jax.random.uniform(ka, (L, *ex, d_in, r), jnp.float32, -bound, bound)
        if init is False:
            bound_b = 1.0 / np.sqrt(r)
            b = jax.random.uniform(kb, (L, *ex, r, d_out), jnp.float32, -bound_b, bound_b)
        else:
            b = jnp.zeros((L, *ex, r, d_out), jnp.float32)
        present = jnp.asarray(spec.coefficients(m) != 0, jnp.float32).reshape(L, *(1,) * len(ex), 1, r)  # [L, .., 1, r]
        weights[m] = {"a": a * present, "b": b * jnp.swapaxes(present, -1, -2)}
        if spec.use_dora:
            update = lora_update(weights[m]["a"], jnp.asarray(spec.coefficients(m)), weights[m]["b"])
            norms = column_norm(params["layers"][m]["kernel"], update)
            weights[m][MAGNITUDE] = norms * jnp.asarray(spec.adapted_mask(m))[:, None]  # 0 where not adapted
    return LoraParams(weights=weights, spec=spec)


def per_layer_lora(lora: LoraParams, gates: Gates | None, num_layers: int) -> dict[str, dict[str, jax.Array]]:
    """Stacked per-block inputs of the layer scan: ``{module: {"a", "b", "c"}}`` with c [L, r].

    ``c`` folds the static scale and rank mask with the layer gate and the rank gate; it is the one
    place where gate values enter the forward pass. With DoRA, ``c`` is the static part only and the
    layer gate (times the adapted mask) is ``"g"`` [L], which multiplies the whole DoRA branch.
    """
    if lora.spec.num_layers != num_layers:
        raise ConfigError(f"LoRA was built for {lora.spec.num_layers} layers, the model has {num_layers}")
    layer_w = layer_gate_values(gates, num_layers)  # [L]
    if lora.spec.use_dora and gates is not None and gates.rank is not None:
        raise ConfigError(
            "DoRA (use_dora=True) cannot take rank gates (AutoLoRA): they would rescale components "
            "inside DoRA's weight norm; search ranks with plain LoRA, or use layer gates only"
        )
    out = {}
    for m in lora.spec.targets:
        coeff = jnp.asarray(lora.spec.coefficients(m) if lora.coef is None else lora.coef[m])  # [L, r]
        w = lora.weights[m]
        if lora.spec.use_dora:
            adapted = jnp.any(coeff != 0, axis=-1).astype(jnp.float32)  # [L]
            out[m] = {"a": w["a"], "b": w["b"], "c": coeff, MAGNITUDE: w[MAGNITUDE], GATE: layer_w * adapted}
            if gates is not None:
                out[m][EXACT_NORM] = jnp.zeros((num_layers,), jnp.float32)
            continue
        c = coeff * layer_w[:, None] * rank_gate_values(gates, m, coeff.shape)
        out[m] = {"a": w["a"], "b": w["b"], "c": c}
    return out


def delta_weights(lora: LoraParams, gates: Gates | None = None) -> dict[str, jax.Array]:
    """The dense update of every adapted module, fp32 [L, d_in, d_out] ([L, n, d_in, d_out] for experts; gates in)."""
    if lora.spec.use_dora:
        raise ConfigError("delta_weights: a DoRA update depends on the base weights; use merge(params, lora, gates)")
    stacked = per_layer_lora(lora, gates, lora.spec.num_layers)
    return {m: jnp.einsum("l...dr,lr,l...rf->l...df", v["a"], v["c"], v["b"]) for m, v in stacked.items()}


def merge(params: dict[str, Any], lora: LoraParams, gates: Gates | None = None, sign: float = 1.0) -> dict[str, Any]:
    """Base params with the LoRA update added (``sign=-1`` removes it), in fp32 then cast back.

    DoRA: each kernel becomes ``W + g * (m * (W + dW) / ||W + dW|| - W)`` (PEFT's merge at ``g = 1``).
    """
    dora = lora.spec.use_dora
    if dora and sign != 1.0:
        raise ConfigError(
            "unmerge: a DoRA merge rescales the base weights by norms it does not keep; "
            "keep the unmerged base params instead"
        )
    deltas = per_layer_lora(lora, gates, lora.spec.num_layers) if dora else delta_weights(lora, gates)
    layers = dict(params["layers"])
    for m, delta in deltas.items():
        kernel = layers[m]["kernel"]
        if dora:
            update = lora_update(delta["a"], delta["c"], delta["b"])
            if kernel.shape != update.shape:
                raise ConfigError(f"LoRA for {m} has shape {update.shape}, base kernel {kernel.shape}")
            layers[m] = {
                **layers[m],
                "kernel": dora_merge(kernel, update, delta[MAGNITUDE], delta[GATE]).astype(kernel.dtype),
            }
            continue
        if kernel.shape != delta.shape:
            raise ConfigError(f"LoRA for {m} has shape {delta.shape}, base kernel {kernel.shape}")
        merged = (kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype)
        layers[m] = {**layers[m], "kernel": merged}
    return {**params, "layers": layers}


def unmerge(params: dict[str, Any], lora: LoraParams, gates: Gates | None = None) -> dict[str, Any]:
    """Inverse of :func:`merge` (exact in fp32; up to rounding in lower precision)."""
    return merge(params, lora, gates, sign=-1.0)


def count_params(model_config: ModelConfig, lora: LoraParams | LoraSpec) -> dict[str, int | float]:
    """Trainable LoRA parameters (true ranks, adapted blocks only) vs the base model's total."""
    if isinstance(lora, LoraParams) and lora.coef is not None:
        raise ConfigError(
            "count_params: this LoRA carries a traced layout (LoraParams.traced_layout); count "
            "lora.with_spec(<its static LoraSpec>) or the spec itself"
        )
    spec = lora.spec if isinstance(lora, LoraParams) else lora
    trainable = 0
    for m in spec.targets:
        d_in, d_out = model_config.module_shape(m)
        trainable += sum(r * (d_in + d_out) + (d_out if spec.use_dora and r else 0) for r in spec.rank_of(m)) * int(
            np.prod(expert_axes(model_config, m))
        )
    base = model_config.num_params()
    return {
        "trainable": int(trainable),
        "base": int(base),
        "total": int(base + trainable),
        "trainable_percent": 100.0 * trainable / (base + trainable),
    }
