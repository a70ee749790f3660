"""GSM8K / AQuA / MMLU: loaders, lm-eval's prompts, answer extraction and scoring, parity with lm-eval."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from flexora_jax import evaluation, tasks
from flexora_jax.errors import DataError
from flexora_jax.nnx import LlamaForCausalLM
from flexora_jax.tasks import generative
from flexora_jax.tasks.generative import GenRecord

MMLU_N = 24  # examples for the log-likelihood parity, spread over subjects
GEN_TOKENS = 24


@pytest.fixture(scope="module")
def model(tinystories_dir):
    from flexora_jax.models.hf import load_model, load_tokenizer

    config, params = load_model(tinystories_dir)
    return config, params, load_tokenizer(tinystories_dir)


def test_gsm8k_gold_answers_all_parse_to_the_stated_number(data_dir):
    raw = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    records = tasks.load_records("gsm8k", "test", data_dir=data_dir)
    assert len(records) == len(raw) == 1319
    for rec, doc in zip(records, raw):
        stated = doc["answer"].split("####")[-1].strip().replace(",", "")
        assert rec.target == stated and int(rec.target) == int(stated)
        assert (
            generative.score(
                rec,
                f"So the total is {doc['answer'].split('####')[-1].strip()}.\n#### "
                f"{doc['answer'].split('####')[-1].strip()}",
            )["exact_match,strict-match"]
            == 1.0
        )
    assert sum("," in d["answer"].split("####")[-1] for d in raw) == 14  # SOURCE.md: commas removed


def test_gsm8k_splits_prompt_and_sft_pair(data_dir):
    train = tasks.load_split("gsm8k", "train", data_dir=data_dir)
    val = tasks.load_split("gsm8k", "validation", data_dir=data_dir)
    assert len(train) + len(val) == 7473 and len(val) == 500 and val.info.resplit
    rec = tasks.load_records("gsm8k", "test", data_dir=data_dir)[0]
    blocks = rec.prompt.split("\n\n")  # lm-eval gsm8k: 5 shots "Question: q\nAnswer: <worked answer>" + the doc
    assert len(blocks) == 6 and all(re.match(r"Question: .*\nAnswer: (?s:.*)#### -?[0-9,]+$", b) for b in blocks[:5])
    assert blocks[5].startswith("Question: Janet’s ducks") and blocks[5].endswith("\nAnswer:")
    assert rec.until == ("Question:", "</s>", "<|im_end|>")
    prompt, answer = rec.sft_pair()
    assert prompt == blocks[5] and answer.startswith(" Janet sells") and answer.endswith("#### 18")
    for r in val.records()[:50]:  # a validation document (carved from train) is never its own shot
        question = r.sft_prompt
        assert r.prompt.count(question) == 1


def test_gsm8k_sft_dataset_trains_on_the_worked_answer(data_dir, model):
    from flexora_jax.tasks.sft import sft_dataset

    _, _, tokenizer = model
    recs = tasks.load_records("gsm8k", "train", data_dir=data_dir)[:4]
    ds = sft_dataset(recs, tokenizer, max_length=512)
    row = ds[0]
    answer_ids = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    assert tokenizer.decode(answer_ids).strip() == recs[0].sft_answer.strip()


def test_gsm8k_filters_and_exact_match_match_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    outputs = [
        "Natalia sold 48/2 = 24 clips.\n#### 72",
        "The answer is $1,234.50.",
        "#### -3\n#### 4",
        "no number here",
        "It costs 5 dollars, then 7.",
        "2,125 apples. #### 2,125.",
    ]
    gold = ["72", "1234.50", "-3", "5", "7", "2125"]
    strict = RegexFilter(r"#### (\-?[0-9\.\,]+)", 0)
    flexible = RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)
    for name, filt in (("strict-match", strict), ("flexible-extract", flexible)):
        ref_preds = [p[0] for p in filt.apply([[o] for o in outputs], [{}] * len(outputs))]
        ours = [generative.gsm8k_extract(o)[name] for o in outputs]
        assert ours == ref_preds, name
        for pred, g in zip(ours, gold):
            rec = GenRecord("gsm8k", 0, "", generative.gsm8k_normalize("...\n#### " + g), (), "", "")
            ref = exact_match_hf_evaluate(
                [pred], ["...\n#### " + g], regexes_to_ignore=list(generative.GSM8K_IGNORE), ignore_case=True
            )["exact_match"]
            assert (
                generative.score(rec, "#### " + pred if name == "strict-match" else pred)[f"exact_match,{name}"] == ref
                or pred == generative.INVALID
            )


def test_aqua_records_and_letter_extraction(data_dir):
    val = tasks.load_records("aqua", "validation", data_dir=data_dir)
    test = tasks.load_records("aqua", "test", data_dir=data_dir)
    assert len(val) == len(test) == 254
    assert re.search(r"\nAnswer Choices: \(A\) .* \(B\) .* \(E\) .*\nAnswer:$", test[0].prompt)
    assert {r.target for r in test} <= set("ABCDE")
    with pytest.raises(DataError, match="no 'train' split.*evaluation only"):
        tasks.load_split("aqua", "train", data_dir=data_dir)
    cases = {
        "The answer is (C).": "C",
        "answer is: D": "D",
        "so we pick (B) here": "B",
        " E) 12": "E",
        "A train goes": "A",
        "nothing": generative.INVALID,
    }
    assert {t: generative.aqua_extract(t)["letter"] for t in cases} == cases


def test_mmlu_splits_and_prompt(data_dir):
    test = tasks.load_split("mmlu", "test", data_dir=data_dir)
    val = tasks.load_split("mmlu", "validation", data_dir=data_dir)
    assert (len(test), len(val), len(test.fewshot_docs)) == (14042, 1531, 285)
    records = test.records()
    assert len({r.group for r in records}) == 57
    rec = next(r for r in records if r.group == "high_school_biology")
    assert rec.context.startswith(
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
    )
    assert rec.context.count("\nAnswer:") == 6 and rec.context.endswith(
        "\nD. " + test.docs[rec.doc_id]["choices"][3] + "\nAnswer:"
    )
    assert rec.requests()[0] == (rec.context, " A")
    with pytest.raises(DataError, match="no 'train' split"):
        tasks.load_split("mmlu", "train", data_dir=data_dir)


def test_mmlu_loglikelihoods_match_lm_eval_and_macro_average(data_dir, model, tinystories_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    config, params, tokenizer = model
    records = tasks.load_records("mmlu", "test", data_dir=data_dir)
    picked = records[:: len(records) // MMLU_N][:MMLU_N]
    ours = evaluation.evaluate(
        LlamaForCausalLM.from_params(config, params),
        tokenizer,
        {"mmlu": picked},
        batch_size=32,
        max_length=256,
        return_per_example=True,
        progress=False,
    )["mmlu"]
    lm = HFLM(pretrained=str(tinystories_dir), device="cpu", batch_size=32, max_length=256)
    requests = [req for r in picked for req in r.requests()]
    ref = np.array(
        [
            o[0]
            for o in lm.loglikelihood(
                [
                    Instance(request_type="loglikelihood", doc={}, arguments=req, idx=i)
                    for i, req in enumerate(requests)
                ],
                disable_tqdm=True,
            )
        ]
    )
    got = np.array([ll for ex in ours["examples"] for ll in ex["loglikelihoods"]])
    assert len(got) == 4 * MMLU_N
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    correct = np.argmax(ref.reshape(MMLU_N, 4), -1) == np.array([r.gold for r in picked])
    by_subject: dict[str, list[bool]] = {}
    for r, c in zip(picked, correct):
        by_subject.setdefault(r.group, []).append(bool(c))
    assert ours["acc_micro"] == ours["acc"] == pytest.approx(correct.mean())
    assert ours["acc_macro"] == pytest.approx(np.mean([np.mean(v) for v in by_subject.values()]))
    assert set(ours["groups"]) == set(by_subject)


def test_generation_matches_lm_eval_generate_until(data_dir, model, tinystories_dir, monkeypatch):
    """evaluate() -> evaluate_generative: truncation, greedy decoding and stop strings as lm-eval's HF model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    config, params, tokenizer = model
    recs = {
        "gsm8k": tasks.load_records("gsm8k", "test", data_dir=data_dir)[:3],
        "aqua": tasks.load_records("aqua", "test", data_dir=data_dir)[:3],
    }
    for name in recs:
        monkeypatch.setitem(generative.MAX_NEW_TOKENS, name, GEN_TOKENS)
    ours = evaluation.evaluate(
        LlamaForCausalLM.from_params(config, params),
        tokenizer,
        recs,
        batch_size=4,
        return_per_example=True,
        progress=False,
    )
    assert ours["gsm8k"]["truncated"] == 3 and ours["aqua"]["truncated"] == 0  # 5-shot prompts exceed 512 tokens
    lm = HFLM(pretrained=str(tinystories_dir), device="cpu", batch_size=4, max_length=config.max_position_embeddings)
    for name, rs in recs.items():
        kwargs = {"until": list(rs[0].until), "max_gen_toks": GEN_TOKENS, "do_sample": False}
        ref = lm.generate_until(
            [
                Instance(request_type="generate_until", doc={}, arguments=(r.prompt, kwargs), idx=i)
                for i, r in enumerate(rs)
            ],
            disable_tqdm=True,
        )
        assert [ex["generation"] for ex in ours[name]["examples"]] == ref, name
        assert ours[name]["n"] == 3 and 0.0 <= ours[name]["exact_match"] <= 1.0
    assert set(ours["gsm8k"]["filters"]) == {"strict-match", "flexible-extract"}
