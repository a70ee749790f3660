"""Scoring parity with lm-evaluation-harness (HFLM on the same checkpoint) and evaluate()'s contract."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from flexora_jax import evaluation, tasks
from flexora_jax.errors import DataError
from flexora_jax.nnx import LlamaForCausalLM
from flexora_jax.tasks.formats import MCRecord

DATA_DIR = Path(os.environ.get("FLEXORA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(
    not DATA_DIR.exists(), reason=f"reference data folder {DATA_DIR} is absent (set FLEXORA_DATA_DIR)"
)

PARITY_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "boolq")
N_PER_TASK = 20
BATCH = 16
MAX_LENGTH = 256  # below the model's 512 so BoolQ truncates, and the test stays fast


@pytest.fixture(scope="module")
def model(tinystories_dir):
    from flexora_jax.models.hf import load_model, load_tokenizer

    config, params = load_model(tinystories_dir)
    return config, params, load_tokenizer(tinystories_dir)


@pytest.fixture(scope="module")
def records():
    return {t: tasks.load_records(t, "test", data_dir=DATA_DIR)[:N_PER_TASK] for t in PARITY_TASKS}


@pytest.fixture(scope="module")
def lm_eval_lls(tinystories_dir, records):
    """lm-eval's own (log-likelihood, is_greedy) for every request, via its HF model class."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tinystories_dir), device="cpu", batch_size=BATCH, max_length=MAX_LENGTH)
    requests = [req for t in PARITY_TASKS for r in records[t] for req in r.requests()]
    out = lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=req, idx=i) for i, req in enumerate(requests)],
        disable_tqdm=True,
    )
    return lm.max_length, np.array([o[0] for o in out]), np.array([o[1] for o in out])


COMPILED = {}


@pytest.fixture(scope="module")
def ours(model, records):
    config, params, tokenizer = model
    before = evaluation._score_packed._cache_size()
    out = evaluation.evaluate(
        LlamaForCausalLM.from_params(config, params),
        tokenizer,
        records,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        return_per_example=True,
        progress=False,
    )
    COMPILED["programs"] = evaluation._score_packed._cache_size() - before
    return out


def test_loglikelihoods_match_lm_eval(ours, lm_eval_lls):
    max_length, ref_ll, _ = lm_eval_lls
    assert max_length == MAX_LENGTH
    got = np.array([ll for t in PARITY_TASKS for ex in ours[t]["examples"] for ll in ex["loglikelihoods"]])
    assert got.shape == ref_ll.shape and len(got) >= 5 * N_PER_TASK * 2
    np.testing.assert_allclose(got, ref_ll, atol=1e-3, rtol=0)


def test_acc_and_acc_norm_match_lm_eval(ours, records, lm_eval_lls):
    _, ref_ll, _ = lm_eval_lls
    pos = 0
    for t in PARITY_TASKS:
        acc, acc_norm = [], []
        for rec in records[t]:  # lm-eval's process_results: argmax(lls), argmax(lls / len(choice))
            lls = ref_ll[pos : pos + len(rec.choices)]
            pos += len(rec.choices)
            acc.append(float(np.argmax(lls) == rec.gold))
            acc_norm.append(float(np.argmax(lls / np.array([float(len(c)) for c in rec.choices])) == rec.gold))
        assert ours[t]["acc"] == np.mean(acc) and ours[t]["acc_norm"] == np.mean(acc_norm), t
        assert ours[t]["n"] == N_PER_TASK
        expected = math.sqrt(sum((x - np.mean(acc)) ** 2 for x in acc) / (len(acc) - 1)) / math.sqrt(len(acc))
        assert ours[t]["acc_stderr"] == pytest.approx(expected)


def test_greedy_flags_match_lm_eval(ours, lm_eval_lls):
    _, _, ref_greedy = lm_eval_lls
    got = np.array([g for t in PARITY_TASKS for ex in ours[t]["examples"] for g in ex["is_greedy"]])
    assert np.array_equal(got, ref_greedy)


def test_truncation_is_counted_per_task(ours):
    assert ours["boolq"]["truncated"] > 0  # passages exceed the context: cut from the left, as lm-eval
    assert ours["piqa"]["truncated"] == 0
    assert any(ex["truncated"] for ex in ours["boolq"]["examples"])


def test_few_compiled_programs(ours):
    assert 1 <= COMPILED["programs"] <= len(evaluation.score_buckets(MAX_LENGTH))  # 100 examples, ~280 requests


def test_bad_inputs_raise_clear_errors(model):
    config, params, tokenizer = model
    with pytest.raises(DataError, match="no examples"):
        evaluation.evaluate(LlamaForCausalLM.from_params(config, params), tokenizer, {"piqa": []}, progress=False)
    long_choice = MCRecord("toy", 0, "Q:", ("word " * 200, "b"), 0)
    with pytest.raises(DataError, match="longer than the model's context 64"):
        evaluation.evaluate(
            LlamaForCausalLM.from_params(config, params), tokenizer, [long_choice], max_length=64, progress=False
        )
    with pytest.raises(DataError, match="out of range"):
        MCRecord("toy", 0, "Q:", ("a", "b"), 2)


def test_packed_choices_equal_one_request_per_row(model, records):
    """Packing an example's choices into one row (shared context, segment masks) changes no score."""
    config, params, tokenizer = model
    reqs = [req for t in PARITY_TASKS for r in records[t][:6] for req in r.requests()]
    packed = evaluation.loglikelihoods(
        config, params, tokenizer, reqs, batch_size=BATCH, max_length=MAX_LENGTH, progress=False
    )
    single = evaluation.loglikelihoods(
        config, params, tokenizer, reqs, batch_size=BATCH, max_length=MAX_LENGTH, progress=False, pack=False
    )
    np.testing.assert_allclose(packed.logprob, single.logprob, atol=2e-4, rtol=0)
    assert (packed.is_greedy == single.is_greedy).all() and (packed.truncated == single.truncated).all()
    packs = evaluation._packs([([1, 5], [6, 7])] * 10 + [([2], [6])], 64, True)  # at most PACK_REQUESTS a row
    assert [p.requests for p in packs] == [list(range(8)), [8, 9], [10]] and packs[0].length == 2 + 8
    assert [p.requests for p in evaluation._packs([([1, 5], [6, 7])] * 3, 4, True)] == [[0, 1], [2]]  # width


def test_evaluate_takes_an_nnx_model(model, records):
    """``fj.evaluate(model, tokenizer, tasks)`` on the NNX decoder (LoRA and gates included) gives the functional
    scores exactly; any other NNX language model is scored one request per row with the same rules."""
    import jax
    from flax import nnx

    import flexora_jax as fj
    from flexora_jax.errors import ConfigError
    from flexora_jax.nnx import LlamaForCausalLM
    from flexora_jax.tasks.generative import GenRecord

    config, params, tokenizer = model
    subset = {t: records[t][:4] for t in ("hellaswag", "boolq", "winogrande")}
    lora = fj.init_lora(
        config, fj.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")), jax.random.key(0)
    )
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), lora)
    gates = fj.init_gates("layer", config.num_hidden_layers)
    gates = gates.replace(layer=gates.layer.at[0].set(-1.0))
    kw = dict(batch_size=BATCH, max_length=MAX_LENGTH, return_per_example=True, progress=False)
    want = evaluation.evaluate(LlamaForCausalLM.from_params(config, params, lora, gates), tokenizer, subset, **kw)
    decoder = LlamaForCausalLM.from_params(config, params, lora, gates)
    assert fj.evaluate(decoder, tokenizer, subset, **kw) == want

    class Wrapped(nnx.Module):  # a model the library does not know: model(input_ids) -> logits
        def __init__(self, inner: nnx.Module):
            self.inner = inner

        def __call__(self, input_ids):
            return self.inner(input_ids)

    got = fj.evaluate(Wrapped(decoder), tokenizer, subset, **kw)
    for t in subset:
        assert got[t]["truncated"] == want[t]["truncated"] and got[t]["n"] == want[t]["n"]
        np.testing.assert_allclose(
            [e["loglikelihoods"] for e in got[t]["examples"]],
            [e["loglikelihoods"] for e in want[t]["examples"]],
            atol=2e-4,
            rtol=0,
        )
        assert [e["pred"] for e in got[t]["examples"]] == [e["pred"] for e in want[t]["examples"]]
    with pytest.raises(ConfigError, match="generative tasks"):
        fj.evaluate(
            Wrapped(decoder),
            tokenizer,
            [GenRecord("gsm8k", 0, "1 + 1 =", "2", ("\n",), "1 + 1 =", " 2")],
            progress=False,
        )
