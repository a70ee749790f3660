"""Hub-schema documents -> multiple-choice records, following lm-evaluation-harness exactly.

Every task is reduced to one :class:`MCRecord`: a context, the choices, the gold index and, for
"partial" scoring (WinoGrande), the shared continuation. ``MCRecord.requests()`` yields the
``(context, continuation)`` log-likelihood requests lm-eval would build for the same document, so
scoring and SFT formatting read one definition of each prompt.

The ``doc_to_*`` functions below transcribe lm-eval 0.4.13's task configs (``lm_eval/tasks/<task>/``):
hellaswag ``utils.process_docs``, piqa, winogrande ``preprocess_winogrande``, arc, openbookqa,
super_glue/boolq, race ``preprocess_race``, commonsense_qa, siqa, mmlu
(``default/_default_template_yaml``). Where lm-eval differs from
``docs/evaluation.md`` (siqa's ``Q: .. A:`` prompt, commonsense_qa's lettered choices) lm-eval wins.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flexora_jax.errors import DataError

#: lm-eval's default ``target_delimiter`` (between the context and each choice).
TARGET_DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class MCRecord:
    """One multiple-choice example, ready to score or to format for SFT.

    Ordinary tasks share ``context`` and score each choice as the continuation. Partial scoring
    (``continuation is not None``, WinoGrande) instead puts each choice into its own context and
    scores the one shared ``continuation``; then ``context`` is empty and ``choices`` hold the
    per-option contexts, which is also what lm-eval measures for ``acc_norm``'s lengths.
    """

    task: str  # registry name of the task
    doc_id: int  # position of the document in its split
    context: str  # the prompt shared by all choices ("" under partial scoring)
    choices: tuple[str, ...]  # choice texts (partial scoring: one context per choice)
    gold: int  # index of the correct choice
    continuation: str | None = None  # shared scored text under partial scoring, else None
    target_delimiter: str = TARGET_DELIMITER  # put between context and continuation
    group: str | None = None  # sub-task for macro averages (MMLU subject), else None

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise DataError(f"{self.task} doc {self.doc_id}: needs at least 2 choices, got {list(self.choices)}")
        empty = [i for i, c in enumerate(self.choices) if not isinstance(c, str) or not c.strip()]
        if empty:
            raise DataError(
                f"{self.task} doc {self.doc_id}: choice(s) {empty} are empty; expected text for every "
                "choice (acc_norm divides by its length)"
            )
        if not 0 <= self.gold < len(self.choices):
            raise DataError(
                f"{self.task} doc {self.doc_id}: gold label {self.gold} is out of range; "
                f"expected 0..{len(self.choices) - 1} for {len(self.choices)} choices"
            )

    @property
    def is_partial(self) -> bool:
        return self.continuation is not None

    def requests(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pairs lm-eval scores, one per choice."""
        if self.continuation is not None:
            return [(c, self.target_delimiter + self.continuation) for c in self.choices]
        return [(self.context, self.target_delimiter + c) for c in self.choices]

    def norm_lengths(self) -> list[float]:
        """Character lengths ``acc_norm`` divides by (lm-eval: ``len(choice)``, no delimiter)."""
        return [float(len(c)) for c in self.choices]

    def sft_pair(self) -> tuple[str, str]:
        """(prompt, answer) for supervised fine-tuning: the gold request."""
        return self.requests()[self.gold]


def _field(doc: Mapping[str, Any], name: str, task: str, doc_id: int) -> Any:
    if name not in doc or doc[name] is None:
        raise DataError(f"{task} doc {doc_id}: missing field {name!r}; fields present: {sorted(doc)}")
    return doc[name]


def _index(value: Any, options: Sequence[Any], task: str, doc_id: int, field: str) -> int:
    try:
        return list(options).index(value)
    except ValueError:
        raise DataError(f"{task} doc {doc_id}: {field}={value!r} is not one of {list(options)}") from None


def _int_label(value: Any, task: str, doc_id: int, field: str, offset: int = 0) -> int:
    try:
        return int(value) - offset
    except (TypeError, ValueError):
        raise DataError(f"{task} doc {doc_id}: {field}={value!r} is not an integer label") from None


# --------------------------------------------------------------------------------------- hellaswag
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: strip, ' [title]' -> '. ', drop [..], collapse '  '."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag(doc: Mapping[str, Any], doc_id: int, task: str = "hellaswag") -> MCRecord:
    ctx = _field(doc, "ctx_a", task, doc_id) + " " + _field(doc, "ctx_b", task, doc_id).capitalize()
    query = hellaswag_preprocess(_field(doc, "activity_label", task, doc_id) + ": " + ctx)
    choices = tuple(hellaswag_preprocess(e) for e in _field(doc, "endings", task, doc_id))
    return MCRecord(task, doc_id, query, choices, _int_label(_field(doc, "label", task, doc_id), task, doc_id, "label"))


# --------------------------------------------------------------------------------------- piqa
def piqa(doc: Mapping[str, Any], doc_id: int, task: str = "piqa") -> MCRecord:
    context = f"Question: {_field(doc, 'goal', task, doc_id)}\nAnswer:"
    choices = (_field(doc, "sol1", task, doc_id), _field(doc, "sol2", task, doc_id))
    label = _int_label(_field(doc, "label", task, doc_id), task, doc_id, "label")
    return MCRecord(task, doc_id, context, choices, label)


# --------------------------------------------------------------------------------------- winogrande
def winogrande(doc: Mapping[str, Any], doc_id: int, task: str = "winogrande") -> MCRecord:
    """Partial scoring: each option fills the blank in its own context; the rest is scored."""
    sentence = _field(doc, "sentence", task, doc_id)
    if "_" not in sentence:
        raise DataError(f"{task} doc {doc_id}: sentence has no '_' blank: {sentence!r}")
    idx = sentence.index("_")
    options = (_field(doc, "option1", task, doc_id), _field(doc, "option2", task, doc_id))
    gold = _index(str(_field(doc, "answer", task, doc_id)), ("1", "2"), task, doc_id, "answer")
    return MCRecord(
        task, doc_id, "", tuple(sentence[:idx] + o for o in options), gold, continuation=sentence[idx + 1 :].strip()
    )


# --------------------------------------------------------------------------------------- arc / obqa / csqa
def _choices(doc: Mapping[str, Any], task: str, doc_id: int) -> tuple[list[str], list[str]]:
    choices = _field(doc, "choices", task, doc_id)
    if not isinstance(choices, Mapping) or "text" not in choices or "label" not in choices:
        raise DataError(
            f"{task} doc {doc_id}: field 'choices' must be {{'text': [...], 'label': [...]}}, got {choices!r}"
        )
    return list(choices["text"]), list(choices["label"])


def arc(doc: Mapping[str, Any], doc_id: int, task: str = "arc") -> MCRecord:
    texts, labels = _choices(doc, task, doc_id)
    gold = _index(_field(doc, "answerKey", task, doc_id), labels, task, doc_id, "answerKey")
    context = f"Question: {_field(doc, 'question', task, doc_id)}\nAnswer:"
    return MCRecord(task, doc_id, context, tuple(texts), gold)


def openbookqa(doc: Mapping[str, Any], doc_id: int, task: str = "openbookqa") -> MCRecord:
    texts, labels = _choices(doc, task, doc_id)
    gold = _index(_field(doc, "answerKey", task, doc_id).lstrip(), labels, task, doc_id, "answerKey")
    return MCRecord(task, doc_id, _field(doc, "question_stem", task, doc_id), tuple(texts), gold)


CSQA_LETTERS = ("A", "B", "C", "D", "E")


def commonsenseqa(doc: Mapping[str, Any], doc_id: int, task: str = "commonsense_qa") -> MCRecord:
    """lm-eval's commonsense_qa: the options are listed in the prompt, the choices are letters."""
    texts, _ = _choices(doc, task, doc_id)
    if len(texts) != 5:
        raise DataError(f"{task} doc {doc_id}: expected 5 choices, got {len(texts)}")
    question = _field(doc, "question", task, doc_id).strip()
    lines = "".join(f"\n{letter}. {text}" for letter, text in zip(CSQA_LETTERS, texts))
    gold = _index(_field(doc, "answerKey", task, doc_id), CSQA_LETTERS, task, doc_id, "answerKey")
    return MCRecord(task, doc_id, f"Question: {question}{lines}\nAnswer:", CSQA_LETTERS, gold)


def commonsenseqa_cloze(doc: Mapping[str, Any], doc_id: int, task: str = "commonsense_qa_cloze") -> MCRecord:
    """CommonsenseQA as a cloze task: ``Question: ..\nAnswer:`` scored on the answer *text*.

    Not an lm-eval task (lm-eval lists the options and scores letters). The effectiveness study uses
    it because its held-out answer loss measures how well a model predicts the answer words, which a
    single letter token cannot show for a model that does not read option lists.
    """
    texts, _ = _choices(doc, task, doc_id)
    question = _field(doc, "question", task, doc_id).strip()
    gold = _index(_field(doc, "answerKey", task, doc_id), CSQA_LETTERS[: len(texts)], task, doc_id, "answerKey")
    return MCRecord(task, doc_id, f"Question: {question}\nAnswer:", tuple(texts), gold)


def question_removed(record: MCRecord) -> MCRecord:
    """The same record with the question taken out of its prompt: only the answer cue is left.

    The cue is the prompt's last line (``"A:"``, ``"Answer:"``); a one-line prompt becomes empty (the
    choices are then scored after BOS). Comparing a model's answer loss or accuracy on these records
    with the full ones shows how much it *uses* the question rather than answer-length or wording
    priors. Partial scoring (WinoGrande) has no separate question, so it is refused.
    """
    if record.is_partial:
        raise DataError(
            f"{record.task}: the question-removed control needs a shared prompt; this task uses "
            "partial scoring (each choice in its own context), which has no question to remove"
        )
    cue = record.context.rsplit("\n", 1)[-1] if "\n" in record.context else ""
    return dataclasses.replace(record, context=cue)


# --------------------------------------------------------------------------------------- boolq / siqa
def boolq(doc: Mapping[str, Any], doc_id: int, task: str = "boolq") -> MCRecord:
    context = f"{_field(doc, 'passage', task, doc_id)}\nQuestion: {_field(doc, 'question', task, doc_id)}?\nAnswer:"
    label = _int_label(_field(doc, "label", task, doc_id), task, doc_id, "label")
    return MCRecord(task, doc_id, context, ("no", "yes"), label)


def siqa(doc: Mapping[str, Any], doc_id: int, task: str = "social_iqa") -> MCRecord:
    context = f"Q: {_field(doc, 'context', task, doc_id)} {_field(doc, 'question', task, doc_id)}\nA:"
    choices = tuple(_field(doc, k, task, doc_id) for k in ("answerA", "answerB", "answerC"))
    gold = _int_label(_field(doc, "label", task, doc_id), task, doc_id, "label", offset=1)
    return MCRecord(task, doc_id, context, choices, gold)


# --------------------------------------------------------------------------------------- race
RACE_LETTERS = ("A", "B", "C", "D")


def race_records(
    docs: Iterable[Mapping[str, Any]], task: str = "race", last_question_only: bool = False
) -> list[MCRecord]:
    """RACE with lm-eval's multi-question prompt, from per-question rows (``ehovy/race`` schema).

    lm-eval's document is one article: the earlier questions of the article are written into the
    prompt with their answers (cloze questions ending ``"  _  ."`` filled in place), and only the
    last question is scored. Here every question becomes a record in that format with the
    questions before it as its prefix, so the last question of each article is exactly lm-eval's
    document; ``last_question_only=True`` keeps just those (lm-eval's ``n``).
    Consecutive rows with the same ``example_id`` form one article.
    """
    records: list[MCRecord] = []
    prev_id, article, solved = None, "", ""
    rows = list(docs)
    for i, doc in enumerate(rows):
        example_id = _field(doc, "example_id", task, i)
        if example_id != prev_id:
            prev_id, article, solved = example_id, _field(doc, "article", task, i), ""
        options = list(_field(doc, "options", task, i))
        if len(options) != 4:
            raise DataError(f"{task} doc {i}: expected 4 options, got {len(options)}")
        question = _field(doc, "question", task, i)
        gold = _index(_field(doc, "answer", task, i), RACE_LETTERS, task, i, "answer")
        is_last = i + 1 == len(rows) or rows[i + 1].get("example_id") != example_id
        if is_last or not last_question_only:
            context = "Article: " + article + "\n\n" + solved + question
            records.append(MCRecord(task, i, context, tuple(options), gold))
        if question[-6:] == "  _  .":
            solved += question[:-5] + options[gold] + "\n"
        else:
            solved += "Question: " + question + "\n" + "Answer: " + options[gold] + "\n"
    return records


# --------------------------------------------------------------------------------------- mmlu
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_FEWSHOT = 5


def mmlu_question(doc: Mapping[str, Any], task: str, doc_id: int) -> str:
    """lm-eval's mmlu ``doc_to_text``: the stripped question, the lettered choices, ``Answer:``."""
    choices = list(_field(doc, "choices", task, doc_id))
    if len(choices) != 4:
        raise DataError(f"{task} doc {doc_id}: expected 4 choices, got {len(choices)}")
    lines = "".join(f"\n{letter}. {c}" for letter, c in zip(MMLU_LETTERS, choices))
    return f"{_field(doc, 'question', task, doc_id).strip()}{lines}\nAnswer:"


def mmlu_records(
    docs: Iterable[Mapping[str, Any]],
    task: str = "mmlu",
    fewshot_docs: Iterable[Mapping[str, Any]] | None = None,
    exclude_self: bool = False,
    num_fewshot: int = MMLU_FEWSHOT,
) -> list[MCRecord]:
    """MMLU with lm-eval's default 5-shot prompt: the subject's first ``num_fewshot`` dev questions.

    Context = "The following are multiple choice questions (with answers) about {subject}.\\n\\n" +
    per shot ``doc_to_text + " " + letter + "\\n\\n"`` + ``doc_to_text``; the choices are " A".." D"
    (lm-eval's ``first_n`` sampler, ``fewshot_split: dev``). ``group`` is the subject.
    """
    shots: dict[str, list[str]] = {}
    for j, shot in enumerate(fewshot_docs or []):
        subject = _field(shot, "subject", task, j)
        if len(shots.setdefault(subject, [])) < num_fewshot:
            answer = _int_label(_field(shot, "answer", task, j), task, j, "answer")
            shots[subject].append(f"{mmlu_question(shot, task, j)} {MMLU_LETTERS[answer]}\n\n")
    records = []
    for i, doc in enumerate(docs):
        subject = _field(doc, "subject", task, i)
        if fewshot_docs is not None and len(shots.get(subject, [])) < num_fewshot:
            raise DataError(
                f"{task} doc {i}: subject {subject!r} has {len(shots.get(subject, []))} few-shot "
                f"examples in the dev split, expected {num_fewshot}"
            )
        about = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {about}.\n\n"
        context = description + "".join(shots.get(subject, [])) + mmlu_question(doc, task, i)
        gold = _int_label(_field(doc, "answer", task, i), task, i, "answer")
        records.append(MCRecord(task, i, context, MMLU_LETTERS, gold, group=subject))
    return records
