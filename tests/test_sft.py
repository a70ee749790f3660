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
requires_data = pytest.mark.skipif(
    not DATA_DIR.exists(), reason=f"reference data folder {DATA_DIR} is absent (set FLEXORA_DATA_DIR)"
)


@pytest.fixture(scope="module")
def tokenizer(tinystories_dir):
    from flexora_jax.models.hf import load_tokenizer

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
    return [
        MCRecord("toy", i, "Question: " + "word " * (i % 13) + "?\nAnswer:", ("yes", "no"), i % 2) for i in range(n)
    ]


def test_pad_dataset_gives_fixed_shape_arrays(tokenizer):
    ds = sft.sft_dataset(_records(37), tokenizer, max_length=64)
    out = sft.pad_dataset(ds, multiple=16)
    n, width = out["input_ids"].shape
    assert n == 37 and width % 16 == 0 and width >= max(len(x) for x in ds["input_ids"])
    assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
    assert out["loss_mask"].dtype == np.float32
    assert np.all(out["loss_mask"] <= out["attention_mask"]) and np.all(out["loss_mask"][:, 0] == 0)
    rows = [tuple(r[m == 1]) for r, m in zip(out["input_ids"], out["attention_mask"])]
    assert rows == [tuple(x) for x in ds["input_ids"]]  # each example once, in order
    with pytest.raises(DataError, match="no examples"):
        sft.pad_dataset(ds.select([]), "empty split")


@requires_data
def test_sft_pipeline_on_real_piqa(tokenizer):
    records = tasks.load_records("piqa", "train", data_dir=DATA_DIR)[:64]
    ds = sft.sft_dataset(records, tokenizer, max_length=512)
    assert len(ds) == 64 and set(ds.column_names) >= {"input_ids", "loss_mask", "length", "truncated"}
    batch = sft.pad_dataset(ds)
    row = int(np.argmax(batch["attention_mask"].sum(1)))
    answer = tokenizer.decode(batch["input_ids"][row][batch["loss_mask"][row] == 1])
    assert answer.strip() and batch["input_ids"].shape[1] <= 512


def test_empty_inputs_raise(tokenizer):
    with pytest.raises(DataError, match="no records"):
        sft.sft_dataset([], tokenizer, max_length=32)


def test_sft_arrays_over_long_policy_and_pairs(tokenizer):
    long = " ".join(["word"] * 60)
    pairs = [("Question: short?\nAnswer:", " yes"), ("Question: long?\nAnswer:", " " + long)]
    arrays, info = sft.sft_arrays(pairs, tokenizer, max_length=32)
    assert info == {"n": 1, "dropped": 1, "truncated": 0} and arrays["input_ids"].shape[0] == 1
    arrays, info = sft.sft_arrays(pairs, tokenizer, max_length=32, too_long="truncate")
    assert info["n"] == 2 and info["dropped"] == 0
    row = arrays["loss_mask"][1]
    assert row[:1].sum() == 0 and row.sum() == 31  # the last prompt token, then the answer's last 31 tokens
    with pytest.raises(DataError, match="does not fit max_length"):
        sft.sft_dataset(pairs, tokenizer, max_length=32)  # the strict default of the low-level function
    with pytest.raises(DataError, match="every example's answer is longer than max_length 4"):
        sft.sft_arrays(pairs[1:], tokenizer, max_length=4)
    with pytest.raises(DataError, match="too_long"):
        sft.sft_arrays(pairs, tokenizer, max_length=32, too_long="cut")
