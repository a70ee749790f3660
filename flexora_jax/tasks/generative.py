"""Generative tasks (GSM8K, AQuA): prompt -> generated text -> extracted answer -> exact match.

A :class:`GenRecord` holds the evaluation prompt (few-shot examples included), the stop strings and
the gold answer, plus the (prompt, answer) pair used for supervised fine-tuning, so
``tasks/sft.py`` trains on the same documents ``evaluate_generative`` scores.

GSM8K follows lm-evaluation-harness 0.4.13's ``gsm8k`` task (``lm_eval/tasks/gsm8k/gsm8k.yaml``):
5-shot "Question: ...\\nAnswer: <worked chain-of-thought answer ending '#### N'>" examples drawn from
the train split with ``random.Random(1234)`` (lm-eval's default ``fewshot_random_seed``, one stream
over the documents in order), stop strings ``Question:``, ``</s>``, ``<|im_end|>``, two answer
filters ('strict-match': the first ``#### N``; 'flexible-extract': the last number in the text) and
``exact_match`` after removing ``,``, ``$``, everything up to ``#### `` and a final ``.``, case
folded. (Not ``gsm8k_cot``, whose 8 hand-written shots end "The answer is N.".)

AQuA has no lm-eval generative task; ours is zero-shot: "Question: ...\\nAnswer Choices: (A) ...
(E) ...\\nAnswer:", stop at a blank line or ``Question:``, and the option letter is extracted from
the generation by the first pattern that matches (:data:`AQUA_PATTERNS`): "answer is (X)", then
"(X)", then the first standalone capital A-E. Exact match against ``correct``.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flexora_jax.errors import DataError

INVALID = "[invalid]"  # lm-eval's RegexFilter fallback when nothing matches

GSM8K_FEWSHOT = 5
GSM8K_FEWSHOT_SEED = 1234
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")

AQUA_LETTERS = ("A", "B", "C", "D", "E")
AQUA_UNTIL = ("\n\n", "Question:")
AQUA_PATTERNS = (re.compile(r"answer is\s*:?\s*\(?([A-E])\b"), re.compile(r"\(([A-E])\)"), re.compile(r"\b([A-E])\b"))

#: Generation length per task (lm-eval's ``max_gen_toks`` default is 256).
MAX_NEW_TOKENS = {"gsm8k": 256, "aqua": 128}


@dataclasses.dataclass(frozen=True)
class GenRecord:
    """One generative example: what the model is prompted with and what counts as right."""

    task: str  # registry name of the task
    doc_id: int  # position of the document in its split
    prompt: str  # evaluation prompt, few-shot examples included
    target: str  # gold answer after the task's normalisation (compared by exact match)
    until: tuple[str, ...]  # stop strings: the generation is cut at the first one
    sft_prompt: str  # zero-shot prompt for fine-tuning
    sft_answer: str  # the worked answer trained on (leading delimiter included)

    def sft_pair(self) -> tuple[str, str]:
        """(prompt, answer) for supervised fine-tuning."""
        return self.sft_prompt, self.sft_answer


def _field(doc: Mapping[str, Any], name: str, task: str, doc_id: int) -> Any:
    if name not in doc or doc[name] is None:
        raise DataError(f"{task} doc {doc_id}: missing field {name!r}; fields present: {sorted(doc)}")
    return doc[name]


# --------------------------------------------------------------------------------------- gsm8k
def gsm8k_normalize(text: str) -> str:
    """lm-eval's gsm8k ``exact_match`` normalisation (``regexes_to_ignore`` then lower-case)."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def _regex_filter(pattern: re.Pattern, text: str, group_select: int) -> str:
    """lm-eval's ``RegexFilter`` + ``take_first`` for one response."""
    match = pattern.findall(text)
    if not match:
        return INVALID
    match = match[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def gsm8k_extract(text: str) -> dict[str, str]:
    """Both lm-eval filters: ``strict-match`` (first ``#### N``) and ``flexible-extract`` (last number)."""
    return {
        "strict-match": _regex_filter(GSM8K_STRICT, text, 0),
        "flexible-extract": _regex_filter(GSM8K_FLEXIBLE, text, -1),
    }


def gsm8k_question(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def gsm8k_records(
    rows: Sequence[Mapping[str, Any]],
    task: str = "gsm8k",
    fewshot_rows: Sequence[Mapping[str, Any]] | None = None,
    exclude_self: bool = False,
    num_fewshot: int = GSM8K_FEWSHOT,
) -> list[GenRecord]:
    """GSM8K documents -> records with lm-eval's 5-shot prompt (shots sampled from ``fewshot_rows``).

    ``exclude_self``: the documents come from the few-shot pool itself (a validation set carved from
    train), so a document never sees itself as a shot (lm-eval samples n + 1 and drops it).
    """
    rnd = random.Random(GSM8K_FEWSHOT_SEED)
    pool = list(fewshot_rows or [])
    if fewshot_rows is not None and len(pool) < num_fewshot + exclude_self:
        raise DataError(f"{task}: {num_fewshot} few-shot examples need a pool of at least that many, got {len(pool)}")
    records = []
    for i, doc in enumerate(rows):
        question, answer = _field(doc, "question", task, i), _field(doc, "answer", task, i)
        if "####" not in answer:
            raise DataError(f"{task} doc {i}: answer has no '#### <number>' line: {answer[-80:]!r}")
        prefix = ""
        if pool:
            picks = [pool[j] for j in rnd.sample(range(len(pool)), num_fewshot + exclude_self)]
            if exclude_self:
                kept = [s for s in picks if s["question"] != question]
                picks = kept[:num_fewshot]
            prefix = "".join(f"{gsm8k_question(s['question'])} {s['answer']}\n\n" for s in picks)
        prompt = gsm8k_question(question)
        records.append(GenRecord(task, i, prefix + prompt, gsm8k_normalize(answer), GSM8K_UNTIL, prompt, " " + answer))
    return records


# --------------------------------------------------------------------------------------- aqua
def aqua_extract(text: str) -> dict[str, str]:
    """The option letter: the first of :data:`AQUA_PATTERNS` that matches, else ``[invalid]``."""
    for pattern in AQUA_PATTERNS:
        m = pattern.search(text)
        if m:
            return {"letter": m.group(1)}
    return {"letter": INVALID}


def aqua_records(
    rows: Sequence[Mapping[str, Any]],
    task: str = "aqua",
    fewshot_rows: Sequence[Mapping[str, Any]] | None = None,
    exclude_self: bool = False,
) -> list[GenRecord]:
    """AQuA-RAT documents -> zero-shot records (options listed as "(A) ..."; gold = ``correct``)."""
    records = []
    for i, doc in enumerate(rows):
        options = list(_field(doc, "options", task, i))
        if len(options) != 5 or any(not o.startswith(f"{c})") for o, c in zip(options, AQUA_LETTERS)):
            raise DataError(f"{task} doc {i}: expected 5 options prefixed 'A)'..'E)', got {options}")
        correct = _field(doc, "correct", task, i)
        if correct not in AQUA_LETTERS:
            raise DataError(f"{task} doc {i}: correct={correct!r} is not one of {list(AQUA_LETTERS)}")
        listed = " ".join(f"({o[0]}) {o[2:].strip()}" for o in options)
        prompt = f"Question: {_field(doc, 'question', task, i)}\nAnswer Choices: {listed}\nAnswer:"
        rationale = _field(doc, "rationale", task, i)
        records.append(GenRecord(task, i, prompt, correct, AQUA_UNTIL, prompt, " " + rationale))
    return records


#: task name -> (answer extraction, the filter reported as ``exact_match``).
EXTRACTORS = {"gsm8k": (gsm8k_extract, "strict-match"), "aqua": (aqua_extract, "letter")}


def score(record: GenRecord, generation: str) -> dict[str, float | str]:
    """Per filter: the extracted answer and its exact match with the record's target."""
    extract, _ = EXTRACTORS[record.task]
    out: dict[str, float | str] = {}
    for name, pred in extract(generation).items():
        norm = gsm8k_normalize(pred) if record.task == "gsm8k" else pred
        out[name] = pred
        out[f"exact_match,{name}"] = float(norm == record.target)
    return out
