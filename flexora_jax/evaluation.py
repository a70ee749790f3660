"""Multiple-choice evaluation by per-choice log-likelihood, with lm-evaluation-harness's rules.

Each record's requests (``MCRecord.requests()``: target delimiter " " before each choice, or the
shared continuation under WinoGrande's partial scoring) are tokenised as lm-eval does
(:func:`flexora_jax.tasks.sft.encode_pair`: whitespace moved onto the continuation, continuation
tokens taken from the joint encoding, empty context -> BOS). A request longer than the model's
context keeps its last ``max_length + 1`` tokens, exactly like lm-eval's HF model; such requests are
counted per task in ``truncated``. A continuation longer than the context cannot be scored and
raises.

Scoring runs ONE jitted function over ``[batch_size, bucket]`` arrays. The requests of one example
share their context tokens, so they are packed into one row (the context once, then each choice,
masked from the others by ``segment_ids``; every token sees exactly what it sees in lm-eval's own
per-request pass). Rows are sorted by length, cut into fixed-size batches (the last one padded with
empty rows) and right-padded to a length bucket, so thousands of requests compile one program per
bucket.

Metrics: ``acc`` = argmax of summed continuation log-probs; ``acc_norm`` = argmax of log-prob /
character length of the choice (lm-eval: ``len(choice)``, delimiter excluded); ties go to the first
choice (``np.argmax``); stderr = sample std (ddof 1) / sqrt(n), lm-eval's ``mean_stderr``. Tasks
whose records carry a ``group`` (MMLU subjects) also report ``acc_macro`` (mean of the per-group
accuracies), ``acc_micro`` (= ``acc``, over all examples) and the per-group figures.

Generative tasks (GSM8K, AQuA; :class:`~flexora_jax.tasks.generative.GenRecord`) are scored by
:func:`evaluate_generative`: prompts are left-truncated to ``max_length - max_new_tokens`` tokens (as
lm-eval's HF model does), continued greedily by :func:`flexora_jax.generation.generate`, cut at the
task's stop strings, and the extracted answer is compared by exact match. ``evaluate`` dispatches
to it for such tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from flexora_jax import signals, tasks
from flexora_jax.config import ModelConfig
from flexora_jax.data import bucket_of, length_buckets
from flexora_jax.errors import ConfigError, DataError, NumericsError, check_positive
from flexora_jax.generation import generate
from flexora_jax.models.llama import forward
from flexora_jax.models.losses import token_logprobs
from flexora_jax.tasks import generative
from flexora_jax.tasks.formats import MCRecord
from flexora_jax.tasks.generative import MAX_NEW_TOKENS, GenRecord, score
from flexora_jax.tasks.sft import encode_pair
from flexora_jax.validation import check_bool, check_tokenizer, describe


@dataclasses.dataclass(frozen=True)
class Loglikelihoods:
    """Per-request results, in request order."""

    logprob: np.ndarray  # float64 [n]: summed log-prob of the continuation tokens
    is_greedy: np.ndarray  # bool [n]: every continuation token is the argmax
    truncated: np.ndarray  # bool [n]: the request lost tokens from the left


#: At most this many requests share one packed row (the choices of one example share their context).
PACK_REQUESTS = 8


@functools.partial(jax.jit, static_argnums=0)
def _score_packed(
    config: ModelConfig,
    params: Any,
    lora: Any,
    gates: Any,
    tokens: jax.Array,
    positions: jax.Array,
    segments: jax.Array,
    pred_pos: jax.Array,
    targets: jax.Array,
    slots: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Per request slot of packed rows: summed target log-probs and all-greedy flags, [b, PACK_REQUESTS] each.

    ``tokens``/``positions``/``segments`` [b, w] are packed rows (``forward``'s ``segment_ids``);
    ``pred_pos``/``targets``/``slots`` [b, p] list every scored token: the row position whose logits
    predict it, its id, and the request slot it belongs to (``-1``: padding).
    """
    hidden = forward(
        config, params, tokens, lora=lora, gates=gates, positions=positions, segment_ids=segments, return_hidden=True
    )  # [b, w, d]: the fp32 logits exist one chunk at a time
    token_lp, ok = token_logprobs(config, params, hidden, pred_pos, targets)  # [b, p] each
    return _slot_sums(token_lp, ok, slots)


def _slot_sums(token_lp: jax.Array, ok: jax.Array, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per request slot: summed log-probs and whether every token was the argmax, [b, PACK_REQUESTS] each."""
    onehot = slots[..., None] == jnp.arange(PACK_REQUESTS)  # [b, p, slots]
    total = jnp.sum(jnp.where(onehot, token_lp[..., None], 0.0), axis=1)
    greedy = jnp.all(jnp.where(onehot, ok[..., None], True), axis=1)
    return total, greedy


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_module(
    graphdef: nnx.GraphDef,
    vocab: int,
    state: nnx.State,
    tokens: jax.Array,
    pred_pos: jax.Array,
    targets: jax.Array,
    slots: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """:func:`_score_packed` for any NNX language model ``model(input_ids) -> logits``, on unpacked rows.

    One request per row (the context, then the continuation but its last token, right-padded): a causal
    model's logits at a position depend on earlier tokens only, so the padding changes nothing scored.
    Logits that are not ``[b, t, >= vocab]`` (the tokenizer's vocabulary) are refused when traced: an id
    past their width would be read clamped, scoring nonsense.
    """
    logits = nnx.merge(graphdef, state)(tokens)
    shape = tuple(getattr(logits, "shape", ()))
    floating = hasattr(logits, "dtype") and jnp.issubdtype(logits.dtype, jnp.floating)
    if len(shape) != 3 or shape[:2] != tokens.shape or shape[-1] < vocab or not floating:
        got = (
            f"an output of shape {shape} and dtype {logits.dtype}" if hasattr(logits, "dtype") else describe(logits, 60)
        )
        raise ConfigError(
            f"evaluate: the model maps input_ids of shape {tokens.shape} to {got}; expected floating-point "
            f"logits [batch, seq, vocab] with vocab >= the tokenizer's {vocab} tokens"
        )
    rows = jax.nn.log_softmax(jnp.take_along_axis(logits, pred_pos[..., None], axis=1).astype(jnp.float32), -1)
    token_lp = jnp.take_along_axis(rows, targets[..., None], -1)[..., 0]  # [b, p]
    return _slot_sums(token_lp, jnp.argmax(rows, -1) == targets, slots)


@dataclasses.dataclass
class _Pack:
    """Requests sharing one prefix, packed into one row: prefix, then each continuation but its last token."""

    prefix: list[int]
    conts: list[list[int]] = dataclasses.field(default_factory=list)
    requests: list[int] = dataclasses.field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(c) - 1 for c in self.conts)

    def fits(self, cont: list[int], max_length: int) -> bool:
        return len(self.conts) < PACK_REQUESTS and self.length + len(cont) - 1 <= max_length


def _packs(windows: list[tuple[list[int], list[int]]], max_length: int, pack: bool) -> list[_Pack]:
    """Group requests by identical prefix tokens (the choices of one example) into packed rows.

    A request's row position sees exactly the tokens it sees alone (the prefix and its own earlier
    continuation tokens, at the same positions), so packing changes no log-likelihood beyond float
    summation order; it only scores a shared prefix once instead of once per choice.
    """
    out: list[_Pack] = []
    open_: dict[tuple[int, ...], _Pack] = {}
    for i, (prefix, cont) in enumerate(windows):
        key = tuple(prefix)
        p = open_.get(key) if pack else None
        if p is None or not p.fits(cont, max_length):
            p = _Pack(prefix)
            out.append(p)
            open_[key] = p
        p.conts.append(cont)
        p.requests.append(i)
    return out


def score_buckets(max_length: int, step: int = 64) -> tuple[int, ...]:
    """Scoring widths: powers of two up to ``2 * step``, then every multiple of ``step``, then ``max_length``.

    Finer than the training buckets above ``2 * step`` tokens: attention costs ~t^2 per row, and
    requests sorted by length fill their batch's width closely, so a request of 130 tokens is padded
    to 192, not 256 (one program per width; 10 at max_length 512 instead of 6).
    """
    out = [b for b in length_buckets(min(max_length, 2 * step)) if b < max_length]
    out += list(range(out[-1] + step if out else step, max_length, step))
    return tuple(out) + (max_length,)


def request_windows(
    tokenizer: Any, requests: Sequence[tuple[str, str]], max_length: int
) -> tuple[list[tuple[list[int], list[int]]], list[bool]]:
    """``(prefix, continuation)`` token ids of each request as lm-eval scores it, and whether it was cut.

    lm-eval keeps the last ``max_length + 1`` tokens of context + continuation; ``prefix`` is what is
    left of the context in that window.
    """
    windows, truncated = [], []
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise DataError(f"request {i}: continuation {continuation!r} encodes to no tokens; nothing to score")
        if len(cont) > max_length:
            raise DataError(
                f"request {i}: continuation is {len(cont)} tokens, longer than the model's context "
                f"{max_length}; it cannot be scored (shorten the choice or raise max_length)"
            )
        whole = (ctx + cont)[-(max_length + 1) :]
        truncated.append(len(ctx) + len(cont) > max_length + 1)
        windows.append((whole[: len(whole) - len(cont)], cont))
    return windows, truncated


def pack_rows(packs: Sequence[_Pack], batch_size: int, width: int, pad: int) -> tuple[np.ndarray, ...]:
    """The six :func:`_score_packed` inputs for ``packs`` in ``batch_size`` rows of ``width`` tokens.

    ``(tokens, positions, segments, pred_pos, targets, slots)``: a row holds its prefix (segment 0,
    positions from 0), then each continuation but its last token (segment ``slot + 1``, positions
    continuing the prefix's); every scored token lists the row position predicting it. Rows past
    ``len(packs)`` are filler that attends to one token (no row is all ``-inf``).
    """
    n_scored = width + PACK_REQUESTS  # >= every pack's scored tokens: sum(len(cont)) <= length + #conts
    tokens = np.full((batch_size, width), pad, np.int32)
    positions = np.zeros((batch_size, width), np.int32)
    segments = np.full((batch_size, width), -1, np.int32)
    segments[:, 0] = 0
    pred_pos = np.zeros((batch_size, n_scored), np.int32)
    targets = np.zeros((batch_size, n_scored), np.int32)
    slots = np.full((batch_size, n_scored), -1, np.int32)
    for row, p in enumerate(packs):
        if p.length > width:
            raise ConfigError(f"pack_rows: a pack of {p.length} tokens does not fit width {width}")
        c = len(p.prefix)
        tokens[row, :c], positions[row, :c], segments[row, :c] = p.prefix, np.arange(c), 0
        at, k = c, 0
        for slot, cont in enumerate(p.conts):
            n = len(cont) - 1
            tokens[row, at : at + n] = cont[:-1]
            positions[row, at : at + n] = np.arange(c, c + n)
            segments[row, at : at + n] = slot + 1
            # cont[0] is predicted by the prefix's last token, cont[j] by cont[j - 1] at at + j - 1
            pred_pos[row, k : k + n + 1] = [c - 1] + list(range(at, at + n))
            targets[row, k : k + n + 1] = cont
            slots[row, k : k + n + 1] = slot
            at, k = at + n, k + n + 1
    return tokens, positions, segments, pred_pos, targets, slots


def loglikelihoods(
    config: ModelConfig,
    params: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    lora: Any = None,
    gates: Any = None,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
    pack: bool = True,
) -> Loglikelihoods:
    """lm-eval's ``loglikelihood`` for ``(context, continuation)`` pairs with our JAX model.

    ``max_length`` defaults to ``config.max_position_embeddings`` (what lm-eval reads from the HF
    config). A request keeps its last ``max_length + 1`` tokens (lm-eval's window). With ``pack``,
    requests whose windows share the same prefix tokens (the choices of one example) are scored in
    one row: the prefix once, each continuation masked from the others (``segment_ids``), so an
    example with n choices costs about one context instead of n. ``batch_size`` rows go into each
    jitted call. Returns float64 sums so callers can compare against lm-eval to 1e-3 and better.
    """

    def scorer(tokens, positions, segments, pred_pos, targets, slots):
        return _score_packed(config, params, lora, gates, tokens, positions, segments, pred_pos, targets, slots)

    return _loglikelihoods(
        scorer,
        tokenizer,
        requests,
        batch_size,
        int(max_length or config.max_position_embeddings),
        progress,
        desc,
        pack,
        config.vocab_size,
    )


def _loglikelihoods(
    scorer: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int,
    max_length: int | None,
    progress: bool,
    desc: str,
    pack: bool,
    vocab: int | None = None,
) -> Loglikelihoods:
    """:func:`loglikelihoods` over any ``scorer(*pack_rows(...)) -> (total, greedy)``; ``max_length`` None:
    no context limit (nothing truncated; the widths come from the longest request). Token ids at or past
    ``vocab`` (the model's) and NaN log-likelihoods are errors, not scores."""
    if not requests:
        raise DataError("loglikelihoods: no requests given")
    windows, truncated = request_windows(tokenizer, requests, max_length or 1 << 30)
    top = max(max(prefix + cont) for prefix, cont in windows)
    if vocab is not None and top >= vocab:
        raise DataError(
            f"{desc}: the tokenizer produced token id {top}, past the model's vocabulary of {vocab}; "
            "expected the tokenizer that belongs to this model"
        )
    longest = max(len(prefix) + len(cont) - 1 for prefix, cont in windows)
    max_length = max_length or longest
    packs = _packs(windows, max_length, pack)
    buckets = score_buckets(max_length)
    packs.sort(key=lambda p: p.length, reverse=True)
    logprob = np.zeros(len(requests), np.float64)
    greedy = np.zeros(len(requests), bool)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks = [packs[i : i + batch_size] for i in range(0, len(packs), batch_size)]
    for k, chunk in enumerate(_progress(chunks, progress, desc)):
        signals.check(f"while scoring ({desc}, batch {k + 1}/{len(chunks)})")  # a safe point between batches
        width = bucket_of(max(p.length for p in chunk), buckets)
        rows = pack_rows(chunk, batch_size, width, pad)
        total, all_greedy = scorer(*map(jnp.asarray, rows))
        total, all_greedy = np.asarray(total, np.float64), np.asarray(all_greedy)
        if np.isnan(total[: len(chunk)]).any():
            raise NumericsError(
                f"{desc}: the model's log-likelihoods are NaN (its logits hold NaN: NaN weights, "
                "an adapter that diverged, or token ids of the tokenizer past the model's input embedding); "
                "expected finite logits"
            )
        for row, p in enumerate(chunk):
            for slot, i in enumerate(p.requests):
                logprob[i], greedy[i] = total[row, slot], all_greedy[row, slot]
    return Loglikelihoods(logprob, greedy, np.asarray(truncated, bool))


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit="batch")


def _stderr(values: np.ndarray) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n); NaN below two examples."""
    if len(values) < 2:
        return math.nan
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _as_records(task_or_records: Any, limit: int | None) -> dict[str, list[MCRecord]]:
    """Normalise the ``evaluate`` input to task name -> records (test split for task names)."""
    if isinstance(task_or_records, (str, tasks.TaskSpec)):
        task_or_records = [task_or_records]
    if not hasattr(task_or_records, "__iter__"):
        raise DataError(
            f"evaluate: expected a task name, a list of task names or records, or a mapping task -> "
            f"records, got {describe(task_or_records)}"
        )
    if isinstance(task_or_records, Mapping):
        grouped = {}
        for name, recs in task_or_records.items():
            if isinstance(recs, (str, bytes)) or not hasattr(recs, "__iter__"):
                raise DataError(f"evaluate: records of task {name!r} must be a list of records, got {describe(recs)}")
            grouped[name] = list(recs)
    else:
        items = list(task_or_records)
        grouped = {}
        for i, item in enumerate(items):
            if isinstance(item, (MCRecord, GenRecord)):
                grouped.setdefault(item.task, []).append(item)
            elif isinstance(item, (str, tasks.TaskSpec)):
                spec = tasks.get_task(item)
                grouped[spec.name] = tasks.load_records(spec, "test")
            else:
                raise DataError(
                    f"evaluate: task_or_records[{i}] is {describe(item)}; expected a task name or a record "
                    "(MCRecord / GenRecord)"
                )
    for name, recs in grouped.items():
        if not recs:
            raise DataError(f"evaluate: task {name!r} has no examples; expected a non-empty split")
        bad = next(((i, r) for i, r in enumerate(recs) if not isinstance(r, (MCRecord, GenRecord))), None)
        if bad is not None:
            raise DataError(
                f"evaluate: task {name!r}: records[{bad[0]}] is {describe(bad[1])}; expected MCRecord / GenRecord"
            )
        if limit is not None:
            grouped[name] = recs[:limit]
    if not grouped:
        raise DataError("evaluate: nothing to evaluate; give task names or records")
    return grouped


def evaluate(
    model: nnx.Module,
    tokenizer: Any,
    task_or_records: Any,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    limit: int | None = None,
    return_per_example: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score tasks with lm-eval's rules; returns ``{task: {acc, acc_norm, n, acc_stderr, acc_norm_stderr,
    truncated}}``.

    Multiple-choice tasks are scored by log-likelihood; tasks with groups (MMLU) add ``acc_macro``,
    ``acc_micro`` and ``groups``; generative tasks (GSM8K, AQuA) get :func:`evaluate_generative`'s
    ``{exact_match, stderr, n, ...}`` instead.

    Args:
      model: a Flax NNX language model, its LoRA and gates included. The built-in
        ``fj.nnx.LlamaForCausalLM`` (``.from_params(config, params, lora)`` wraps the functional core's pytrees)
        is scored by the decoder's packed scorer (an example's choices in one row, chunked logits) and
        generates for generative tasks; any other model is called as ``model(input_ids) -> logits [b, t, vocab]``
        on right-padded rows, one request per row, and must be causal (multiple-choice tasks only).
      tokenizer: its tokenizer (``fj.load_tokenizer``).
      task_or_records: a task name, a list of names (each scored on its ``test`` split), a list of
        records (:class:`MCRecord` / ``GenRecord``, grouped by ``record.task``) or a mapping task -> records.
      batch_size: requests per jitted call (fixed: the last batch is padded).
      max_length: model context for truncation; default the decoder's ``max_position_embeddings`` (other
        models: no truncation).
      limit: score only the first ``limit`` examples of each task.
      return_per_example: add ``"examples"``: per example ``doc_id, gold, loglikelihoods, is_greedy``
        (per choice), ``pred, pred_norm, truncated``.
      progress: show a progress bar.

    ``truncated`` counts examples with at least one request cut from the left.
    """
    if type(model).__name__ == "ModelConfig":
        raise ConfigError(
            "fj.evaluate takes the model first: fj.evaluate(model, tokenizer, tasks); the functional "
            "form fj.evaluate(config, params, tokenizer, tasks, lora=...) is now "
            "fj.evaluate(fj.nnx.LlamaForCausalLM.from_params(config, params, lora), tokenizer, tasks)"
        )
    check_positive(batch_size=batch_size, limit=limit, max_length=max_length)
    check_bool(return_per_example, "evaluate: return_per_example")
    check_bool(progress, "evaluate: progress")
    vocab = check_tokenizer(tokenizer, "evaluate: tokenizer") or 0
    grouped = _as_records(task_or_records, limit)
    decoder = getattr(model, "decoder_pytrees", None)
    if callable(decoder):  # the built-in decoder: its functional core's packed scorer and generation
        config, params, lora, gates = decoder()
        results: dict[str, dict[str, Any]] = {}
        for name in [n for n, recs in grouped.items() if isinstance(recs[0], GenRecord)]:
            results[name] = evaluate_generative(
                model,
                tokenizer,
                grouped.pop(name),
                batch_size=batch_size,
                max_length=max_length,
                return_per_example=return_per_example,
                progress=progress,
            )
        if grouped:
            results.update(
                _evaluate_mc(
                    lambda requests: loglikelihoods(
                        config,
                        params,
                        tokenizer,
                        requests,
                        lora=lora,
                        gates=gates,
                        batch_size=batch_size,
                        max_length=max_length,
                        progress=progress,
                        desc="evaluate",
                    ),
                    grouped,
                    return_per_example,
                )
            )
        return results
    if not isinstance(model, nnx.Module):
        raise ConfigError(
            f"evaluate: model must be a Flax NNX language model (fj.nnx.LlamaForCausalLM or your own "
            f"nnx.Module returning logits), got {type(model).__name__}"
        )
    generative_tasks = sorted(n for n, recs in grouped.items() if isinstance(recs[0], GenRecord))
    if generative_tasks:
        raise ConfigError(
            f"evaluate: generative tasks {generative_tasks} need fj.nnx.LlamaForCausalLM (KV-cache "
            f"generation); a {type(model).__name__} scores multiple-choice tasks only"
        )
    graphdef, state = nnx.split(model)

    def scorer(tokens, positions, segments, pred_pos, targets, slots):
        return _score_module(graphdef, vocab, state, tokens, pred_pos, targets, slots)

    return _evaluate_mc(
        lambda requests: _loglikelihoods(
            scorer, tokenizer, requests, batch_size, max_length, progress, "evaluate", pack=False
        ),
        grouped,
        return_per_example,
    )


def _evaluate_mc(score: Any, grouped: dict[str, list[MCRecord]], return_per_example: bool) -> dict[str, dict[str, Any]]:
    """Accuracies from per-choice log-likelihoods; ``score(requests) -> Loglikelihoods``."""
    requests = [req for recs in grouped.values() for rec in recs for req in rec.requests()]
    ll = score(requests)
    results: dict[str, dict[str, Any]] = {}
    pos = 0
    for name, recs in grouped.items():
        acc, acc_norm, n_trunc, examples = [], [], 0, []
        for rec in recs:
            n = len(rec.choices)
            lls, trunc = ll.logprob[pos : pos + n], bool(ll.truncated[pos : pos + n].any())
            pos += n
            pred = int(np.argmax(lls))
            pred_norm = int(np.argmax(lls / np.asarray(rec.norm_lengths())))
            acc.append(float(pred == rec.gold))
            acc_norm.append(float(pred_norm == rec.gold))
            n_trunc += trunc
            if return_per_example:
                examples.append(
                    {
                        "doc_id": rec.doc_id,
                        "gold": rec.gold,
                        "loglikelihoods": lls.tolist(),
                        "is_greedy": ll.is_greedy[pos - n : pos].tolist(),
                        "pred": pred,
                        "pred_norm": pred_norm,
                        "truncated": trunc,
                    }
                )
        acc_a, acc_norm_a = np.asarray(acc), np.asarray(acc_norm)
        results[name] = {
            "acc": float(acc_a.mean()),
            "acc_norm": float(acc_norm_a.mean()),
            "n": len(recs),
            "acc_stderr": _stderr(acc_a),
            "acc_norm_stderr": _stderr(acc_norm_a),
            "truncated": int(n_trunc),
        }
        if any(rec.group is not None for rec in recs):
            results[name].update(_group_accuracy(recs, acc_a))
        if return_per_example:
            results[name]["examples"] = examples
    return results


def _group_accuracy(recs: Sequence[MCRecord], acc: np.ndarray) -> dict[str, Any]:
    """``acc_macro`` (mean over groups), ``acc_micro`` (over examples) and per-group acc / n."""
    groups: dict[str, list[float]] = {}
    for rec, a in zip(recs, acc):
        groups.setdefault(str(rec.group), []).append(float(a))
    per_group = {g: {"acc": float(np.mean(v)), "n": len(v)} for g, v in sorted(groups.items())}
    return {
        "acc_macro": float(np.mean([g["acc"] for g in per_group.values()])),
        "acc_micro": float(acc.mean()),
        "groups": per_group,
    }


def evaluate_generative(
    model: nnx.Module,
    tokenizer: Any,
    task: Any,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    return_per_example: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact match of greedily generated answers on a generative task (GSM8K, AQuA).

    Args:
      model, tokenizer: ``fj.nnx.LlamaForCausalLM`` (its LoRA and gates included; KV-cache generation) and its
        tokenizer.
      task: a task name / ``TaskSpec`` (its ``test`` split) or a list of ``GenRecord`` of one task.
      limit: score only the first ``limit`` examples.
      batch_size: prompts per jitted generation call.
      max_new_tokens: tokens generated per prompt; default per task (GSM8K 256 as lm-eval, AQuA 128).
      max_length: model context; default ``config.max_position_embeddings``. Prompts keep their last
        ``max_length - max_new_tokens`` tokens; ``truncated`` counts the ones that lost tokens.
      return_per_example: add ``"examples"`` (doc_id, generation, extracted answers, target, scores).
      progress: show a progress bar.

    Returns:
      ``{"exact_match", "stderr", "n", "truncated", "filters": {filter: {"exact_match", "stderr"}}}``;
      ``exact_match`` is the task's primary filter (GSM8K: lm-eval's ``strict-match``; its
      ``flexible-extract`` is under ``filters``).
    """
    decoder = getattr(model, "decoder_pytrees", None)
    if not callable(decoder):
        raise ConfigError(
            f"evaluate_generative needs fj.nnx.LlamaForCausalLM (KV-cache generation), got {type(model).__name__}"
        )
    config, params, lora, gates = decoder()
    check_tokenizer(tokenizer, "evaluate_generative: tokenizer")
    if isinstance(task, (str, tasks.TaskSpec)):
        records = tasks.load_records(task, "test")
    else:
        records = list(task)
    if limit is not None:
        records = records[:limit]
    if not records or not all(isinstance(r, GenRecord) for r in records):
        raise DataError("evaluate_generative: expected a non-empty list of GenRecord (or a generative task name)")
    names = {r.task for r in records}
    if len(names) != 1 or len({r.until for r in records}) != 1:
        raise DataError(
            f"evaluate_generative: records must come from one task with one set of stop strings, "
            f"got tasks {sorted(names)}"
        )
    name = records[0].task
    if name not in generative.EXTRACTORS:
        raise DataError(
            f"evaluate_generative: no answer extraction for task {name!r}; known: {sorted(generative.EXTRACTORS)}"
        )
    max_new_tokens = int(max_new_tokens or MAX_NEW_TOKENS[name])
    max_length = int(max_length or config.max_position_embeddings)
    keep = max_length - max_new_tokens
    if keep < 1:
        raise DataError(
            f"evaluate_generative: max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"the model's context {max_length}"
        )
    encoded = [tokenizer.encode(r.prompt) for r in records]
    truncated = [len(ids) > keep for ids in encoded]
    encoded = [ids[-keep:] for ids in encoded]
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]), reverse=True)
    texts: list[str] = [""] * len(records)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for k, chunk in enumerate(_progress(chunks, progress, f"generating {name}")):
        signals.check(f"while generating ({name}, batch {k + 1}/{len(chunks)})")  # a safe point between batches
        out = generate(
            config,
            params,
            [encoded[i] for i in chunk],
            lora=lora,
            gates=gates,
            max_new_tokens=max_new_tokens,
            tokenizer=tokenizer,
            stop=records[0].until,
            batch_size=batch_size,
            max_length=max_length,
        )
        for i, text in zip(chunk, out.texts):
            texts[i] = text
    scored = [score(r, t) for r, t in zip(records, texts)]
    _, primary = generative.EXTRACTORS[name]
    filters = {}
    for key in [k for k in scored[0] if k.startswith("exact_match,")]:
        values = np.asarray([s[key] for s in scored])
        filters[key.split(",", 1)[1]] = {"exact_match": float(values.mean()), "stderr": _stderr(values)}
    result: dict[str, Any] = {
        "exact_match": filters[primary]["exact_match"],
        "stderr": filters[primary]["stderr"],
        "n": len(records),
        "truncated": int(sum(truncated)),
        "filter": primary,
        "max_new_tokens": max_new_tokens,
        "filters": filters,
    }
    if return_per_example:
        result["examples"] = [
            {"doc_id": r.doc_id, "generation": t, "target": r.target, **s, "truncated": tr}
            for r, t, s, tr in zip(records, texts, scored, truncated)
        ]
    return result
