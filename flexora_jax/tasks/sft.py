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

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np

from flexora_jax.errors import DataError
from flexora_jax.validation import check_bool, check_number, check_tokenizer, describe

log = logging.getLogger("flexora_jax")


@contextlib.contextmanager
def datasets_quietly() -> Iterator[None]:
    """``datasets``' own progress bars (tokenizing, casting) off inside our data path, as they were afterwards.

    Their bars would interleave with the run's; a user who set ``HF_DATASETS_DISABLE_PROGRESS_BARS=0`` keeps them.
    """
    if datasets.are_progress_bars_disabled() or datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is False:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


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
    return ctx, whole[len(ctx) :]


TOO_LONG = ("error", "drop", "truncate")


def tokenize_pair(
    tokenizer: Any, prompt: str, answer: str, max_length: int, add_eos: bool = False, too_long: str = "error"
) -> dict[str, Any] | None:
    """One example: ``input_ids``, ``loss_mask`` (1 on answer tokens), ``length``, ``truncated``.

    The prompt is cut from the left to fit ``max_length``. An answer that alone leaves no room for a
    prompt token is, by ``too_long``: ``"error"`` a DataError, ``"drop"`` None (the caller counts it),
    ``"truncate"`` cut from the left too (the last prompt token and the answer's last tokens stay).
    """
    ctx, ans = encode_pair(tokenizer, prompt, answer)
    if add_eos:
        ans = ans + [tokenizer.eos_token_id]
    if not ans:
        raise DataError(f"answer {answer!r} to prompt {prompt[-80:]!r} encodes to no tokens; nothing to train on")
    if len(ans) >= max_length:
        if too_long == "drop":
            return None
        if too_long != "truncate":
            raise DataError(
                f"answer {answer[:80]!r} is {len(ans)} tokens, which does not fit max_length "
                f"{max_length} with at least one prompt token before it (too_long='drop' or "
                "'truncate' to keep going)"
            )
        ctx, ans = ctx[-1:], ans[-(max_length - 1) :]
    ids = ctx + ans
    truncated = len(ids) > max_length
    ids = ids[-max_length:]
    mask = [0] * (len(ids) - len(ans)) + [1] * len(ans)
    return {"input_ids": ids, "loss_mask": mask, "length": len(ids), "truncated": truncated}


def sft_dataset(
    records: Sequence[Any],
    tokenizer: Any,
    max_length: int,
    add_eos: bool = False,
    num_proc: int | None = None,
    too_long: str = "error",
) -> datasets.Dataset:
    """Tokenised SFT examples (columns input_ids, loss_mask, length, truncated, task, doc_id).

    ``records`` are task records (``MCRecord`` / ``GenRecord``: their ``sft_pair()``) or ``(prompt, answer)``
    pairs; ``too_long`` as in :func:`tokenize_pair` (dropped examples are left out).
    """
    records = _records(records, "sft_dataset")
    check_tokenizer(tokenizer, "sft_dataset: tokenizer")
    max_length = check_number(max_length, "sft_dataset: max_length", lo=2, integer=True)
    if too_long not in TOO_LONG:
        raise DataError(f"sft_dataset: too_long must be one of {TOO_LONG}, got {too_long!r}")
    pairs = [r if isinstance(r, (tuple, list)) else r.sft_pair() for r in records]
    if any(len(p) != 2 or not all(isinstance(x, str) for x in p) for p in pairs):
        raise DataError("sft_dataset: expected task records or (prompt, answer) string pairs")
    raw = datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _ in pairs],
            "answer": [a for _, a in pairs],
            "task": [getattr(r, "task", "pairs") for r in records],
            "doc_id": [getattr(r, "doc_id", i) for i, r in enumerate(records)],
        }
    )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out = [
            tokenize_pair(tokenizer, p, a, max_length, add_eos, too_long)
            for p, a in zip(batch["prompt"], batch["answer"])
        ]
        keep = [i for i, o in enumerate(out) if o is not None]
        cols = {k: [out[i][k] for i in keep] for k in ("input_ids", "loss_mask", "length", "truncated")}
        return cols | {k: [batch[k][i] for i in keep] for k in ("task", "doc_id")}

    with datasets_quietly():
        return raw.map(
            tokenize,
            batched=True,
            remove_columns=["prompt", "answer", "task", "doc_id"],
            num_proc=num_proc,
            desc="tokenizing SFT examples",
        )


def _records(records: Any, where: str) -> list[Any]:
    """``records`` as a list (a generator is read once), each a task record or a (prompt, answer) pair of strings."""
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
        raise DataError(
            f"{where}: records must be a list of task records or (prompt, answer) pairs, got {describe(records)}"
        )
    records = list(records)
    if not records:
        raise DataError(f"{where}: no records given; expected a non-empty training split")
    for i, r in enumerate(records):
        pair = isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(x, str) for x in r)
        if not pair and not callable(getattr(r, "sft_pair", None)):
            raise DataError(
                f"{where}: records[{i}] is {describe(r)}; expected a task record (MCRecord / GenRecord) "
                "or a (prompt, answer) pair of strings"
            )
    return records


def sft_arrays(
    records: Sequence[Any],
    tokenizer: Any,
    max_length: int,
    *,
    too_long: str = "drop",
    add_eos: bool = False,
    name: str = "dataset",
    length_key: str = "max_length",
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Task records or ``(prompt, answer)`` pairs -> the arrays ``fj.search`` / ``fj.finetune`` draw batches from.

    Returns ``(arrays, info)``: ``input_ids`` / ``attention_mask`` int32 and ``loss_mask`` float32 (1 on the
    answer tokens only), right padded to one width (a multiple of 16), and ``{"n", "dropped", "truncated"}``:
    examples kept, dropped as too long (``too_long="drop"``), and cut from the left. The command uses the
    same function, so the API and ``flexora-jax run`` treat over-long examples alike. ``name`` and
    ``length_key`` only word the error messages.
    """
    records = _records(records, name)
    check_tokenizer(tokenizer, f"{name}: tokenizer")
    max_length = check_number(max_length, f"{name}: {length_key}", lo=2, integer=True)
    add_eos = check_bool(add_eos, f"{name}: add_eos")
    ds = sft_dataset(records, tokenizer, max_length, add_eos=add_eos, too_long=too_long)
    if len(ds) == 0:
        raise DataError(
            f"{name}: every example's answer is longer than {length_key} {max_length} tokens; "
            f"expected a larger {length_key}"
        )
    info = {"n": len(ds), "dropped": len(records) - len(ds), "truncated": int(sum(ds["truncated"]))}
    if info["dropped"]:
        log.info(
            "%s: %d of %d examples dropped (answer longer than max_length %d)",
            name,
            info["dropped"],
            len(records),
            max_length,
        )
    return pad_dataset(ds, name), info


def pad_dataset(dataset: datasets.Dataset, what: str = "dataset", multiple: int = 16) -> dict[str, np.ndarray]:
    """A tokenised SFT dataset -> fixed-shape arrays, right padded to a multiple of ``multiple`` tokens.

    ``input_ids`` / ``attention_mask`` int32 and ``loss_mask`` float32, all ``[n, width]``: what the
    search and the fine-tune draw batches from (one compiled shape per run).
    """
    ids, masks = dataset["input_ids"], dataset["loss_mask"]
    if not ids:
        raise DataError(f"{what}: no examples after tokenisation")
    width = int(math.ceil(max(len(x) for x in ids) / multiple) * multiple)
    out = {
        "input_ids": np.zeros((len(ids), width), np.int32),
        "attention_mask": np.zeros((len(ids), width), np.int32),
        "loss_mask": np.zeros((len(ids), width), np.float32),
    }
    for i, (x, m) in enumerate(zip(ids, masks)):
        out["input_ids"][i, : len(x)] = x
        out["attention_mask"][i, : len(x)] = 1
        out["loss_mask"][i, : len(m)] = m
    return out
