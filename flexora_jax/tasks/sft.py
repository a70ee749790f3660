"""SFT formatting: prompt + gold answer, loss on the answer tokens only, length-bucketed batches.

A training example is the gold request of an :class:`~flexora_jax.tasks.formats.MCRecord`
(``record.sft_pair()``): the prompt lm-eval would score and the continuation it would score, so
training and evaluation see the same text. Tokens follow lm-eval's rule (:func:`encode_pair`):
the answer's tokens are ``encode(prompt + answer)[len(encode(prompt)):]`` after moving the
prompt's trailing whitespace onto the answer. Examples longer than ``max_length`` lose tokens from
the *left* (the start of the prompt), as lm-eval truncates, and are counted in ``truncated``.

Batches are padded to a few lengths (powers of two up to ``max_length``) and a fixed batch size,
so a jitted train step compiles one program per bucket, not one per batch. The pipeline is plain
``datasets``: ``Dataset.map`` tokenises, ``Dataset.shuffle(seed)`` orders, ``with_format("numpy")``
hands arrays over.

Batch layout (all ``[batch, seq]``, right padded):
  ``input_ids`` int32; ``attention_mask`` int32, 1 on real tokens;
  ``loss_mask`` float32, ``loss_mask[b, t] = 1`` where ``input_ids[b, t]`` is an answer token to be
  predicted, i.e. the loss term at ``t`` is ``-log p(input_ids[b, t] | input_ids[b, :t])``, read from
  the logits at position ``t - 1``. Position 0 is never a target.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import datasets
import numpy as np

from flexora_jax.errors import DataError
from flexora_jax.tasks.formats import MCRecord


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids by lm-eval's rule (``LM._encode_pair`` / ``loglikelihood``).

    Trailing whitespace of the context moves to the continuation; the continuation's tokens are the
    joint encoding minus the context's; an empty context becomes the BOS token (EOS if no BOS).
    The tokenizer adds its special tokens as configured (a LLaMA tokenizer prepends BOS).
    """
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    kwargs = {}
    bos = tokenizer.bos_token
    if bos and context.startswith(bos):  # lm-eval: a string that already starts with BOS gets no second one
        kwargs["add_special_tokens"] = False
    whole = tokenizer.encode(context + continuation, **kwargs)
    ctx = tokenizer.encode(context, **kwargs)
    return ctx, whole[len(ctx):]


def tokenize_pair(tokenizer: Any, prompt: str, answer: str, max_length: int,
                  add_eos: bool = False) -> dict[str, Any]:
    """One example: ``input_ids``, ``loss_mask`` (1 on answer tokens), ``length``, ``truncated``."""
    ctx, ans = encode_pair(tokenizer, prompt, answer)
    if add_eos:
        ans = ans + [tokenizer.eos_token_id]
    if not ans:
        raise DataError(f"answer {answer!r} to prompt {prompt[-80:]!r} encodes to no tokens; nothing to train on")
    if len(ans) >= max_length:
        raise DataError(f"answer {answer[:80]!r} is {len(ans)} tokens, which does not fit max_length "
                        f"{max_length} with at least one prompt token before it")
    ids = ctx + ans
    truncated = len(ids) > max_length
    ids = ids[-max_length:]
    mask = [0] * (len(ids) - len(ans)) + [1] * len(ans)
    return {"input_ids": ids, "loss_mask": mask, "length": len(ids), "truncated": truncated}


def sft_dataset(records: Sequence[MCRecord], tokenizer: Any, max_length: int, add_eos: bool = False,
                num_proc: int | None = None) -> datasets.Dataset:
    """Tokenised SFT examples (columns input_ids, loss_mask, length, truncated, task, doc_id)."""
    if not records:
        raise DataError("sft_dataset: no records given; expected a non-empty training split")
    pairs = [r.sft_pair() for r in records]
    raw = datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "answer": [a for _, a in pairs],
                                      "task": [r.task for r in records], "doc_id": [r.doc_id for r in records]})

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out = [tokenize_pair(tokenizer, p, a, max_length, add_eos) for p, a in zip(batch["prompt"], batch["answer"])]
        return {k: [o[k] for o in out] for k in ("input_ids", "loss_mask", "length", "truncated")}

    return raw.map(tokenize, batched=True, remove_columns=["prompt", "answer"], num_proc=num_proc,
                   desc="tokenizing SFT examples")


def length_buckets(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself."""
    out, n = [], min_length
    while n < max_length:
        out.append(n)
        n *= 2
    return tuple(out) + (max_length,)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise DataError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def batches(dataset: datasets.Dataset, batch_size: int, buckets: Sequence[int], seed: int = 0,
            shuffle: bool = True, pad_id: int = 0, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a tokenised dataset in length-bucketed, fixed-size batches.

    Examples are shuffled with ``seed`` (``Dataset.shuffle``), grouped by bucket, cut into batches
    of ``batch_size`` and the batch order shuffled again, so each batch is one of
    ``len(buckets)`` shapes ``[batch_size, bucket]``. A bucket's last, short batch is filled with
    empty rows (all masks 0) unless ``drop_last``. See the module docstring for the layout.
    """
    if len(dataset) == 0:
        raise DataError("batches: the dataset is empty; expected at least one example")
    ds = dataset.shuffle(seed=seed) if shuffle else dataset
    ds = ds.with_format("numpy", columns=["input_ids", "loss_mask", "length"])
    lengths = np.asarray(ds["length"])
    sizes = np.array([bucket_of(int(n), buckets) for n in lengths])
    groups = []
    for size in sorted(set(sizes.tolist())):
        idx = np.flatnonzero(sizes == size)
        stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
        groups += [(size, idx[i:i + batch_size]) for i in range(0, stop, batch_size)]
    order = np.random.default_rng(seed).permutation(len(groups)) if shuffle else np.arange(len(groups))
    for g in order:
        size, idx = groups[g]
        rows = ds[idx]
        input_ids = np.full((batch_size, size), pad_id, np.int32)
        attention = np.zeros((batch_size, size), np.int32)
        loss_mask = np.zeros((batch_size, size), np.float32)
        for i, (ids, mask) in enumerate(zip(rows["input_ids"], rows["loss_mask"])):
            input_ids[i, :len(ids)] = ids
            attention[i, :len(ids)] = 1
            loss_mask[i, :len(ids)] = mask
        yield {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}
