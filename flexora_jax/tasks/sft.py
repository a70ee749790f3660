"""SFT formatting: prompt + gold answer, loss on the answer tokens only, padded fixed-shape arrays.

A training example is the gold request of an :class:`~flexora_jax.tasks.formats.MCRecord`
(``record.sft_pair()``): the prompt lm-eval would score and the continuation it would score, so
training and evaluation see the same text. Tokens follow lm-eval's rule (:func:`encode_pair`):
the answer's tokens are ``encode(prompt + answer)[len(encode(prompt)):]`` after moving the
prompt's trailing whitespace onto the answer. Examples longer than ``max_length`` lose tokens from
the *left* (the start of the prompt), as lm-eval truncates, and are counted in ``truncated``.

:func:`pad_dataset` right pads a split to one width (a multiple of 16), so a jitted step compiles one
program per run. The pipeline is plain ``datasets``: ``Dataset.map`` tokenises.

Array layout (all ``[batch, seq]``, right padded):
  ``input_ids`` int32; ``attention_mask`` int32, 1 on real tokens;
  ``loss_mask`` float32, ``loss_mask[b, t] = 1`` where ``input_ids[b, t]`` is an answer token to be
  predicted, i.e. the loss term at ``t`` is ``-log p(input_ids[b, t] | input_ids[b, :t])``, read from
  the logits at position ``t - 1``. Position 0 is never a target.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

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


def pad_dataset(dataset: datasets.Dataset, what: str = "dataset", multiple: int = 16) -> dict[str, np.ndarray]:
    """A tokenised SFT dataset -> fixed-shape arrays, right padded to a multiple of ``multiple`` tokens.

    ``input_ids`` / ``attention_mask`` int32 and ``loss_mask`` float32, all ``[n, width]``: what the
    search and the fine-tune draw batches from (one compiled shape per run).
    """
    ids, masks = dataset["input_ids"], dataset["loss_mask"]
    if not ids:
        raise DataError(f"{what}: no examples after tokenisation")
    width = int(math.ceil(max(len(x) for x in ids) / multiple) * multiple)
    out = {"input_ids": np.zeros((len(ids), width), np.int32), "attention_mask": np.zeros((len(ids), width), np.int32),
           "loss_mask": np.zeros((len(ids), width), np.float32)}
    for i, (x, m) in enumerate(zip(ids, masks)):
        out["input_ids"][i, :len(x)] = x
        out["attention_mask"][i, :len(x)] = 1
        out["loss_mask"][i, :len(m)] = m
    return out
