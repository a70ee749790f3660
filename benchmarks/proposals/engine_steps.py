"""Issue 28's "no step slower than today": per-step wall time through the public loops (fj.search / fj.finetune)
of the functional decoder and the NNX decoder, written against both APIs so the same script runs on the commit
before the one engine (164d307^) and on HEAD: the median interval between successive callbacks (each callback
follows the step's loss read-back, so an interval is one whole step, loop overhead included).

    git worktree add /tmp/old 164d307^
    (cd /tmp/old && PYTHONPATH=. python /path/to/benchmarks/proposals/engine_steps.py)   # before
    PYTHONPATH=. python benchmarks/proposals/engine_steps.py                               # HEAD

Run them alternately (old, new, old, new) on one machine; h256_l4, fine-tune 8 x 128, search K = 4 at 4 x 64.
"""

import json
import time

import jax
import numpy as np
from flax import nnx

import flexora_jax as fj
from benchmarks import common

NEW = hasattr(fj, "decoder_problem")
config = common.MODELS["h256_l4"]
params = fj.init_params(config, jax.random.key(0))
lora_cfg = fj.LoraConfig(r=8, lora_alpha=16.0)
rng = np.random.default_rng(0)


def data(n, seq):
    t = rng.integers(0, config.vocab_size, (n, seq)).astype(np.int32)
    return {"input_ids": t, "loss_mask": np.ones(t.shape, np.float32)}


ft_data = data(8 * 40, 128)
s_train, s_val = data(4 * 4 * 40, 64), data(4 * 40, 64)
FT = fj.FinetuneConfig(max_steps=14, batch_size=8, lr=1e-3, warmup_ratio=0.0)
SC = fj.SearchConfig(hypergradient="unrolled", inner_steps=4, steps=10, batch_size=4, val_batch_size=4)


def timed(run):
    stamps = []
    run(lambda i, r: stamps.append(time.perf_counter()))
    d = np.diff(stamps)[2:]
    return float(np.median(d)) * 1000


def nnx_model():
    return fj.nnx.LlamaForCausalLM(config, lora_cfg, gates="layer", rngs=nnx.Rngs(1), params=params)


def func_ft(cb):
    if NEW:
        fj.finetune(fj.decoder_problem(config, params, lora_cfg, seed=1), ft_data, FT, callback=cb)
    else:
        fj.finetune(config, params, fj.init_lora(config, lora_cfg, jax.random.key(1), params), ft_data, FT, callback=cb)


def func_search(cb):
    if NEW:
        fj.search(fj.decoder_problem(config, params, lora_cfg, seed=1), SC, s_train, s_val, callback=cb)
    else:
        fj.search(config, params, lora_cfg, SC, s_train, s_val, callback=cb)


def nnx_ft(cb):
    fj.finetune(nnx_model(), ft_data, FT, callback=cb)


def nnx_search(cb):
    fj.search(nnx_model(), SC, s_train, s_val, callback=cb)


out = {}
for name, fn in [
    ("functional_finetune", func_ft),
    ("nnx_finetune", nnx_ft),
    ("functional_search", func_search),
    ("nnx_search", nnx_search),
]:
    out[name] = timed(fn)
print(json.dumps({"new": NEW, **out}))
