"""SFT tokenisation (answer-only loss mask, left truncation) and length-bucketed batching."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flexora_jax import tasks
from flexora_jax.errors import DataError
from flexora_jax.tasks import sft
from flexora_jax.tasks.formats import MCRecord

DATA_DIR = Path(os.environ.get("FLEXORA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
requires_data = pytest.mark.skipif(not DATA_DIR.exists(),
                                   reason=f"reference data folder {DATA_DIR} is absent (set FLEXORA_DATA_DIR)")


@pytest.fixture(scope="module")
def tokenizer(tinystories_dir):
    from flexora_jax.models.loading import load_tokenizer

    return load_tokenizer(tinystories_dir)


def test_encode_pair_follows_lm_eval(tokenizer):
    ctx, cont = sft.encode_pair(tokenizer, "Question: why?\nAnswer: ", "because")  # trailing space moves
    assert ctx == tokenizer.encode("Question: why?\nAnswer:")
    assert ctx + cont == tokenizer.encode("Question: why?\nAnswer: because")
    assert ctx[0] == tokenizer.bos_token_id
    ctx, cont = sft.encode_pair(tokenizer, "", " once upon")  # empty context -> BOS
    assert ctx == [tokenizer.bos_token_id] and cont == tokenizer.encode(" once upon", add_special_tokens=False)


def test_loss_mask_marks_exactly_the_answer_tokens(tokenizer):
    ex = sft.tokenize_pair(tokenizer, "Question: What is red?\nAnswer:", " a ball", max_length=64)
    ids, mask = np.array(ex["input_ids"]), np.array(ex["loss_mask"])
    assert not ex["truncated"] and mask[0] == 0 and ex["length"] == len(ids)
    assert tokenizer.decode(ids[mask == 1]).strip() == "a ball"
    assert mask.tolist() == sorted(mask.tolist())  # prompt zeros, then answer ones


def test_left_truncation_is_counted_and_keeps_the_answer(tokenizer):
    prompt = "Once upon a time there was a little dog. " * 10 + "Answer:"
    full = sft.tokenize_pair(tokenizer, prompt, " yes", max_length=1000)
    cut = sft.tokenize_pair(tokenizer, prompt, " yes", max_length=16)
    assert cut["truncated"] and cut["length"] == 16
    assert cut["input_ids"] == full["input_ids"][-16:] and cut["loss_mask"] == full["loss_mask"][-16:]
    with pytest.raises(DataError, match="does not fit max_length 4"):
        sft.tokenize_pair(tokenizer, "Q:", " a very long answer indeed", max_length=4)


def _records(n: int) -> list[MCRecord]:
    return [MCRecord("toy", i, "Question: " + "word " * (i % 13) + "?\nAnswer:", ("yes", "no"), i % 2)
            for i in range(n)]


def test_bucketed_batches_have_few_fixed_shapes_and_cover_every_example(tokenizer):
    ds = sft.sft_dataset(_records(37), tokenizer, max_length=64)
    buckets = sft.length_buckets(64, min_length=8)
    assert buckets == (8, 16, 32, 64)
    out = list(sft.batches(ds, batch_size=4, buckets=buckets, seed=1))
    shapes = {b["input_ids"].shape for b in out}
    assert shapes <= {(4, n) for n in buckets} and len(shapes) <= len(buckets)
    for b in out:
        assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32
        assert np.all(b["loss_mask"] <= b["attention_mask"]) and np.all(b["loss_mask"][:, 0] == 0)
    rows = [tuple(r[m == 1]) for b in out for r, m in zip(b["input_ids"], b["attention_mask"]) if m.any()]
    expected = [tuple(x) for x in ds["input_ids"]]
    assert sorted(rows) == sorted(expected)  # each example exactly once
    again = list(sft.batches(ds, batch_size=4, buckets=buckets, seed=1))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, again))
    other = list(sft.batches(ds, batch_size=4, buckets=buckets, seed=2))
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, other))
    dropped = list(sft.batches(ds, batch_size=4, buckets=buckets, seed=1, drop_last=True))
    assert all(b["attention_mask"].any(axis=1).all() for b in dropped)


@requires_data
def test_sft_pipeline_on_real_piqa(tokenizer):
    records = tasks.load_records("piqa", "train", data_dir=DATA_DIR)[:64]
    ds = sft.sft_dataset(records, tokenizer, max_length=512)
    assert len(ds) == 64 and set(ds.column_names) >= {"input_ids", "loss_mask", "length", "truncated"}
    batch = next(sft.batches(ds, batch_size=8, buckets=sft.length_buckets(512)))
    row = int(np.argmax(batch["attention_mask"].sum(1)))
    answer = tokenizer.decode(batch["input_ids"][row][batch["loss_mask"][row] == 1])
    assert answer.strip() and batch["input_ids"].shape[1] in sft.length_buckets(512)


def test_empty_inputs_raise(tokenizer):
    with pytest.raises(DataError, match="no records"):
        sft.sft_dataset([], tokenizer, max_length=32)
