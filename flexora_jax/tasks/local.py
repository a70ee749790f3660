"""Local-file loaders: the original release files in ``../shared/data`` -> ``datasets.Dataset``.

The Hugging Face Hub is not always reachable, so every task can also be read from the files its
authors released (see each folder's SOURCE.md). Each loader returns the *same schema* as the hub
dataset named in the registry (:data:`HUB_FEATURES`), so the converters in ``formats.py`` serve both
sources. Loaders validate as they parse and raise :class:`~flexora_jax.errors.DataError` naming the
file, line, field, value and what was expected.

Where the local files lost information the hub has, the loader reconstructs it and says so:
- hellaswag: the text file keeps ``activity_label: ctx`` but not the ``ctx_a`` / ``ctx_b`` split.
  lm-eval capitalises ``ctx_b``; we take ``ctx_b`` to be the fragment after the last ". " when it
  starts lower-case (ActivityNet contexts: 3236 of 10042), which is where the split falls there.
- arc train: only the LLM-Adapters instruction form exists; the question and options are parsed
  back out and labelled A, B, C, ...; ids are ``<file stem>-<line>``.
- winogrande validation: parsed back out of LLM-Adapters' instruction form (dev set, 1267).
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Features, Sequence, Value

from flexora_jax.errors import DataError

_S = Value("string")
_CHOICES = {"text": Sequence(_S), "label": Sequence(_S)}

#: The hub dataset schema each loader reproduces, per hub dataset.
HUB_FEATURES: dict[str, Features] = {
    "hellaswag": Features(
        {
            "ind": Value("int32"),
            "activity_label": _S,
            "ctx_a": _S,
            "ctx_b": _S,
            "ctx": _S,
            "endings": Sequence(_S),
            "source_id": _S,
            "split": _S,
            "split_type": _S,
            "label": _S,
        }
    ),
    "piqa": Features({"goal": _S, "sol1": _S, "sol2": _S, "label": Value("int64")}),
    "winogrande": Features({"sentence": _S, "option1": _S, "option2": _S, "answer": _S}),
    "arc": Features({"id": _S, "question": _S, "choices": _CHOICES, "answerKey": _S}),
    "openbookqa": Features({"id": _S, "question_stem": _S, "choices": _CHOICES, "answerKey": _S}),
    "boolq": Features(
        {"question": _S, "passage": _S, "idx": Value("int32"), "label": ClassLabel(names=["False", "True"])}
    ),
    "race": Features({"example_id": _S, "article": _S, "answer": _S, "question": _S, "options": Sequence(_S)}),
    "commonsenseqa": Features({"id": _S, "question": _S, "question_concept": _S, "choices": _CHOICES, "answerKey": _S}),
    "siqa": Features({"context": _S, "question": _S, "answerA": _S, "answerB": _S, "answerC": _S, "label": _S}),
    "gsm8k": Features({"question": _S, "answer": _S}),
    "aqua": Features({"question": _S, "options": Sequence(_S), "rationale": _S, "correct": _S}),
    "mmlu": Features(
        {"question": _S, "subject": _S, "choices": Sequence(_S), "answer": ClassLabel(names=["A", "B", "C", "D"])}
    ),
}


def default_data_dir() -> Path:
    """``$FLEXORA_DATA_DIR``, else ``../shared/data`` next to the repository root."""
    env = os.environ.get("FLEXORA_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


# --------------------------------------------------------------------------------------- helpers
def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(
            f"{path} not found; expected {what} there (set data_dir or $FLEXORA_DATA_DIR "
            f"to the folder holding the task folders)"
        )
    return path


def _get(row: dict, key: str, where: str, kind: type = str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r}; fields present: {sorted(row)}")
    value = row[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r}={value!r} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _jsonl(path: Path, lines: Iterable[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(location, object) for each non-empty line; location is ``file:line`` for error messages."""
    if lines is None:
        lines = _require(path, "a JSON-lines file").read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _labels(path: Path, lines: Iterable[str] | None = None) -> list[str]:
    if lines is None:
        lines = _require(path, "a labels file, one label per line").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _aligned(features: list, labels: list, feat_path: Path, label_path: Path) -> None:
    if len(features) != len(labels):
        raise DataError(
            f"{feat_path} has {len(features)} examples but {label_path} has {len(labels)} labels; "
            "they must be line-aligned"
        )


def _json_array(path: Path) -> list[dict]:
    try:
        data = json.loads(_require(path, "a JSON array file").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array, got {type(data).__name__}")
    return data


def _no_split(task: str, split: str, available: tuple[str, ...], why: str) -> DataError:
    return DataError(
        f"{task}: split {split!r} is not available in the local files ({why}); available: {list(available)}"
    )


# --------------------------------------------------------------------------------------- hellaswag
_HS_FRAGMENT = re.compile(r"^(.*\.) ([a-z][^.]*)$")


def _hellaswag(data_dir: Path, split: str) -> list[dict]:
    if split != "validation":
        raise _no_split("hellaswag", split, ("validation",), "only the validation tasks are kept")
    path = _require(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2", "HellaSwag's 6-line text file")
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    rows = []
    for i in range(0, len(lines), 6):
        where = f"{path}:{i + 1}"
        head, label = lines[i], lines[i + 1].strip()
        if ": " not in head:
            raise DataError(f"{where}: expected '<activity_label>: <context>', got {head!r}")
        if label not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{i + 2}: gold label {label!r} is out of range; expected 0..3")
        activity, ctx = head.split(": ", 1)
        m = _HS_FRAGMENT.match(ctx)
        ctx_a, ctx_b = (m.group(1), m.group(2)) if m else (ctx, "")
        rows.append(
            {
                "ind": i // 6,
                "activity_label": activity,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx,
                "endings": lines[i + 2 : i + 6],
                "source_id": "",
                "split": "val",
                "split_type": "",
                "label": label,
            }
        )
    return rows


# --------------------------------------------------------------------------------------- piqa
def _piqa(data_dir: Path, split: str) -> list[dict]:
    if split != "validation":
        raise _no_split("piqa", split, ("validation",), "train.jsonl is not kept, tests.jsonl is unlabelled")
    feat_path, label_path = data_dir / "piqa" / "valid.jsonl", data_dir / "piqa" / "valid-labels.lst"
    docs = list(_jsonl(feat_path))
    labels = _labels(label_path)
    _aligned(docs, labels, feat_path, label_path)
    rows = []
    for (where, doc), label in zip(docs, labels):
        if label not in ("0", "1"):
            raise DataError(f"{label_path}: label {label!r} for {where} is out of range; expected 0 or 1")
        rows.append(
            {
                "goal": _get(doc, "goal", where),
                "sol1": _get(doc, "sol1", where),
                "sol2": _get(doc, "sol2", where),
                "label": int(label),
            }
        )
    return rows


# --------------------------------------------------------------------------------------- winogrande
_WG = re.compile(
    r"^Please choose the correct answer to fill in the blank to complete the given sentence: "
    r"(?P<sentence>.*)\n\nOption1: (?P<o1>.*) Option2: (?P<o2>.*) Answer format: option1/option2$",
    re.DOTALL,
)


def _winogrande(data_dir: Path, split: str) -> list[dict]:
    if split != "validation":
        raise _no_split("winogrande", split, ("validation",), "only the dev set survives, in LLM-Adapters form")
    path = data_dir / "llm_adapters" / "winogrande" / "test.json"
    rows = []
    for n, item in enumerate(_json_array(path)):
        where = f"{path}[{n}]"
        m = _WG.match(_get(item, "instruction", where))
        if not m:
            raise DataError(
                f"{where}: instruction does not match the WinoGrande template "
                f"'...sentence: <s>\\n\\nOption1: <a> Option2: <b> Answer format: option1/option2'"
            )
        answer = _get(item, "answer", where)
        if answer not in ("option1", "option2"):
            raise DataError(f"{where}: answer {answer!r} is out of range; expected 'option1' or 'option2'")
        rows.append({"sentence": m["sentence"], "option1": m["o1"], "option2": m["o2"], "answer": answer[-1]})
    return rows


# --------------------------------------------------------------------------------------- arc
_ARC_OPTION = re.compile(r" ?Answer(\d+): ")


def _arc_instruction(item: dict, where: str) -> tuple[str, list[str], int]:
    instruction = _get(item, "instruction", where)
    prefix = "Please choose the correct answer to the question: "
    if not instruction.startswith(prefix) or "\n\nAnswer format:" not in instruction:
        raise DataError(f"{where}: instruction does not match the ARC template '{prefix}<q>\\n\\nAnswer1: ...'")
    body = instruction[len(prefix) : instruction.rindex("\n\nAnswer format:")]
    question, _, options = body.partition("\n\n")
    parts = _ARC_OPTION.split(options)
    numbers, texts = parts[1::2], parts[2::2]
    if parts[0] or numbers != [str(k) for k in range(1, len(numbers) + 1)] or len(texts) < 2:
        raise DataError(f"{where}: could not parse the options 'Answer1: .. Answer2: ..' from {options!r}")
    answer = _get(item, "answer", where)
    if not re.fullmatch(r"answer\d+", answer) or not 1 <= int(answer[6:]) <= len(texts):
        raise DataError(f"{where}: answer {answer!r} is out of range; expected answer1..answer{len(texts)}")
    return question, texts, int(answer[6:]) - 1


def _arc(level: str) -> Callable[[Path, str], list[dict]]:
    def load(data_dir: Path, split: str) -> list[dict]:
        name = f"ARC-{level}"
        if split == "train":
            path = data_dir / "llm_adapters" / name / "train.json"
            rows = []
            for n, item in enumerate(_json_array(path)):
                question, texts, gold = _arc_instruction(item, f"{path}[{n}]")
                labels = [chr(ord("A") + k) for k in range(len(texts))]
                rows.append(
                    {
                        "id": f"{name}-train-{n}",
                        "question": question,
                        "choices": {"text": texts, "label": labels},
                        "answerKey": labels[gold],
                    }
                )
            return rows
        files = {"validation": "Dev", "test": "Test"}
        if split not in files:
            raise _no_split(name, split, ("train", "validation", "test"), "unknown split")
        path = data_dir / "arc" / f"{name}-{files[split]}.jsonl"
        rows = []
        for where, doc in _jsonl(path):
            question = _get(doc, "question", where, dict)
            choices = _get(question, "choices", where + " question", list)
            texts = [_get(c, "text", where + " choice") for c in choices]
            labels = [_get(c, "label", where + " choice") for c in choices]
            key = _get(doc, "answerKey", where)
            if key not in labels:
                raise DataError(f"{where}: answerKey {key!r} is out of range; expected one of {labels}")
            rows.append(
                {
                    "id": _get(doc, "id", where),
                    "question": _get(question, "stem", where + " question"),
                    "choices": {"text": texts, "label": labels},
                    "answerKey": key,
                }
            )
        return rows

    return load


# --------------------------------------------------------------------------------------- openbookqa
def _obqa_choices(packed: str) -> list[str] | None:
    """'(A) a (B) b (C) c (D) d' -> [a, b, c, d], cutting at the first marker of each letter in turn.

    One train row repeats '(D)' inside the last option; cutting in order keeps it in option D.
    """
    if not packed.startswith("(A) "):
        return None
    texts, start = [], 4
    for letter in "BCD":
        cut = packed.find(f" ({letter}) ", start)
        if cut < 0:
            return None
        texts.append(packed[start:cut])
        start = cut + 5
    return texts + [packed[start:]]


def _openbookqa(data_dir: Path, split: str) -> list[dict]:
    files = {"train": "train", "validation": "dev", "test": "test"}
    if split not in files:
        raise _no_split("openbookqa", split, tuple(files), "unknown split")
    path = _require(data_dir / "openbookqa" / f"{files[split]}.tsv", "an OpenBookQA TSV file")
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            where = f"{path}:{n}"
            texts = _obqa_choices(_get(row, "Choices", where))
            labels = ["A", "B", "C", "D"]
            if texts is None:
                raise DataError(
                    f"{where}: field 'Choices'={row['Choices']!r} does not parse as '(A) .. (B) .. (C) .. (D) ..'"
                )
            key = _get(row, "Answer Key", where)
            if key not in labels:
                raise DataError(f"{where}: 'Answer Key' {key!r} is out of range; expected one of {labels}")
            rows.append(
                {
                    "id": _get(row, "ID", where),
                    "question_stem": _get(row, "Question Stem", where),
                    "choices": {"text": texts, "label": labels},
                    "answerKey": key,
                }
            )
    return rows


# --------------------------------------------------------------------------------------- boolq
_BOOLQ_LABELS = {"false": 0, "true": 1, False: 0, True: 1}


def _boolq(data_dir: Path, split: str) -> list[dict]:
    if split != "validation":
        raise _no_split("boolq", split, ("validation",), "train with passages is not kept, test is unlabelled")
    rows = []
    for where, doc in _jsonl(data_dir / "boolq" / "val.jsonl"):
        label = _get(doc, "label", where, object)
        if label not in _BOOLQ_LABELS:  # the file writes "true"/"false" strings; JSON booleans also accepted
            raise DataError(f"{where}: label {label!r} is out of range; expected true or false")
        rows.append(
            {
                "question": _get(doc, "question", where),
                "passage": _get(doc, "passage", where),
                "idx": _get(doc, "idx", where, int),
                "label": _BOOLQ_LABELS[label],
            }
        )
    return rows


# --------------------------------------------------------------------------------------- race
@functools.lru_cache(maxsize=4)
def _race_archive(path: Path) -> dict[tuple[str, str], list[tuple[int, str, dict]]]:
    """(split dir, level) -> [(number, member name, passage)] from one RACE tarball."""
    out: dict[tuple[str, str], list[tuple[int, str, dict]]] = {}
    with tarfile.open(_require(path, "a RACE tarball")) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or not parts[3].endswith(".txt"):
                continue
            where = f"{path}:{member.name}"
            try:
                passage = json.loads(tar.extractfile(member).read().decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{where}: not a JSON passage ({exc})") from None
            out.setdefault((parts[1], parts[2]), []).append((int(parts[3][:-4]), member.name, passage))
    for items in out.values():
        items.sort(key=lambda t: t[0])
    return out


def _race(level: str) -> Callable[[Path, str], list[dict]]:
    def load(data_dir: Path, split: str) -> list[dict]:
        dirs = {
            "train": ("RACE-train.tar.gz", "train"),
            "validation": ("RACE-dev-test.tar.gz", "dev"),
            "test": ("RACE-dev-test.tar.gz", "test"),
        }
        if split not in dirs:
            raise _no_split(f"race_{level}", split, tuple(dirs), "unknown split")
        archive, sub = dirs[split]
        path = data_dir / "race" / archive
        rows = []
        for _, name, passage in _race_archive(path).get((sub, level), []):
            where = f"{path}:{name}"
            questions = _get(passage, "questions", where, list)
            options = _get(passage, "options", where, list)
            answers = _get(passage, "answers", where, list)
            if not len(questions) == len(options) == len(answers):
                raise DataError(
                    f"{where}: {len(questions)} questions, {len(options)} option lists and "
                    f"{len(answers)} answers; expected equal lengths"
                )
            for q, opts, ans in zip(questions, options, answers):
                if ans not in ("A", "B", "C", "D") or len(opts) != 4:
                    raise DataError(f"{where}: answer {ans!r} with {len(opts)} options; expected A-D and 4 options")
                rows.append(
                    {
                        "example_id": _get(passage, "id", where),
                        "article": _get(passage, "article", where),
                        "answer": ans,
                        "question": q,
                        "options": opts,
                    }
                )
        return rows

    return load


# --------------------------------------------------------------------------------------- commonsenseqa
def _split_jsonl(task: str, data_dir: Path, split: str, files: dict[str, str], why: str) -> Iterator[tuple[str, dict]]:
    """The records of ``data_dir/task/<file of split>``, or the error naming the splits the release files have."""
    if split not in files:
        raise _no_split(task, split, tuple(files), why)
    return _jsonl(data_dir / task / files[split])


def _commonsenseqa_row(where: str, doc: dict) -> dict:
    question = _get(doc, "question", where, dict)
    choices = _get(question, "choices", where + " question", list)
    labels = [_get(c, "label", where + " choice") for c in choices]
    key = _get(doc, "answerKey", where)
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is out of range; expected one of {labels}")
    return {
        "id": _get(doc, "id", where),
        "question": _get(question, "stem", where + " question"),
        "question_concept": question.get("question_concept", ""),
        "choices": {"label": labels, "text": [_get(c, "text", where + " choice") for c in choices]},
        "answerKey": key,
    }


def _commonsenseqa(data_dir: Path, split: str) -> list[dict]:
    files = {"train": "train.jsonl", "validation": "valid.jsonl"}
    return [
        _commonsenseqa_row(where, doc)
        for where, doc in _split_jsonl("commonsenseqa", data_dir, split, files, "test.jsonl has no answers")
    ]


# --------------------------------------------------------------------------------------- siqa
def _siqa(data_dir: Path, split: str) -> list[dict]:
    names = {"train": "train", "validation": "dev"}
    if split not in names:
        raise _no_split("social_iqa", split, tuple(names), "test labels are hidden upstream")
    path = _require(data_dir / "siqa" / "socialiqa-train-dev.zip", "the official Social IQa zip")
    stem = names[split]
    with zipfile.ZipFile(path) as zf:
        try:
            feats = zf.read(f"socialiqa-train-dev/{stem}.jsonl").decode("utf-8").splitlines()
            labels = zf.read(f"socialiqa-train-dev/{stem}-labels.lst").decode("utf-8").splitlines()
        except KeyError as exc:
            raise DataError(
                f"{path}: member {exc} missing; expected socialiqa-train-dev/{stem}.jsonl and {stem}-labels.lst"
            ) from None
    feat_path, label_path = Path(f"{path}:{stem}.jsonl"), Path(f"{path}:{stem}-labels.lst")
    docs, labels = list(_jsonl(feat_path, feats)), _labels(label_path, labels)
    _aligned(docs, labels, feat_path, label_path)
    rows = []
    for (where, doc), label in zip(docs, labels):
        if label not in ("1", "2", "3"):
            raise DataError(f"{label_path}: label {label!r} for {where} is out of range; expected 1, 2 or 3")
        rows.append(
            {k: _get(doc, k, where) for k in ("context", "question", "answerA", "answerB", "answerC")}
            | {"label": label}
        )
    return rows


# --------------------------------------------------------------------------------------- gsm8k / aqua / mmlu
def _gsm8k(data_dir: Path, split: str) -> list[dict]:
    if split not in ("train", "test"):
        raise _no_split("gsm8k", split, ("train", "test"), "the release has train and test only")
    rows = []
    for where, obj in _jsonl(data_dir / "gsm8k" / f"{split}.jsonl"):
        answer = _get(obj, "answer", where)
        if not re.search(r"\n#### (.+)$", answer):
            raise DataError(f"{where}: answer does not end with a '#### <number>' line: {answer[-60:]!r}")
        rows.append({"question": _get(obj, "question", where), "answer": answer})
    return rows


def _aqua_row(where: str, obj: dict) -> dict:
    options = _get(obj, "options", where, list)
    if len(options) != 5 or any(not str(o).startswith(f"{c})") for o, c in zip(options, "ABCDE")):
        raise DataError(f"{where}: expected 5 options prefixed 'A)'..'E)', got {options!r}")
    correct = _get(obj, "correct", where)
    if correct not in ("A", "B", "C", "D", "E"):
        raise DataError(f"{where}: correct={correct!r} is not one of A..E")
    return {
        "question": _get(obj, "question", where),
        "options": options,
        "rationale": _get(obj, "rationale", where),
        "correct": correct,
    }


def _aqua(data_dir: Path, split: str) -> list[dict]:
    files = {"validation": "dev.json", "test": "test.json"}
    return [
        _aqua_row(where, obj)
        for where, obj in _split_jsonl("aqua", data_dir, split, files, "the 97k-example train.json is not kept")
    ]


_MMLU_FILES = {"dev": "dev", "validation": "val", "test": "test"}


def _mmlu(data_dir: Path, split: str) -> list[dict]:
    """All 57 subjects of one split, subjects in name order, rows in file order (``cais/mmlu`` 'all')."""
    if split not in _MMLU_FILES:
        raise _no_split("mmlu", split, tuple(_MMLU_FILES), "auxiliary_train is not kept")
    folder = _require(data_dir / "mmlu" / _MMLU_FILES[split], "MMLU's per-subject CSV files")
    suffix = f"_{_MMLU_FILES[split]}.csv"
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise DataError(f"{folder}: no '*{suffix}' files; expected one CSV per subject")
    rows = []
    for path in files:
        subject = path.name[: -len(suffix)]
        with path.open(encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                where = f"{path}:{n}"
                choices = [_get(row, f"choice{k}", where) for k in range(4)]
                answer = _get(row, "answer", where)
                if answer not in ("0", "1", "2", "3"):
                    raise DataError(f"{where}: answer={answer!r} is out of range; expected 0..3")
                rows.append(
                    {
                        "question": _get(row, "question", where),
                        "subject": subject,
                        "choices": choices,
                        "answer": int(answer),
                    }
                )
    return rows


#: task name -> (hub schema key, loader(data_dir, split) -> rows).
LOADERS: dict[str, tuple[str, Callable[[Path, str], list[dict]]]] = {
    "hellaswag": ("hellaswag", _hellaswag),
    "piqa": ("piqa", _piqa),
    "winogrande": ("winogrande", _winogrande),
    "arc_easy": ("arc", _arc("Easy")),
    "arc_challenge": ("arc", _arc("Challenge")),
    "openbookqa": ("openbookqa", _openbookqa),
    "boolq": ("boolq", _boolq),
    "race_middle": ("race", _race("middle")),
    "race_high": ("race", _race("high")),
    "commonsense_qa": ("commonsenseqa", _commonsenseqa),
    "social_iqa": ("siqa", _siqa),
    "gsm8k": ("gsm8k", _gsm8k),
    "aqua": ("aqua", _aqua),
    "mmlu": ("mmlu", _mmlu),
}


#: Earlier task names (before the registry took lm-evaluation-harness 0.4.13's), still accepted wherever a task is
#: named; the data folders under ``data_dir`` keep their names (``commonsenseqa/``, ``siqa/``).
ALIASES = {"commonsenseqa": "commonsense_qa", "commonsenseqa_cloze": "commonsense_qa_cloze", "siqa": "social_iqa"}


def load_local(task: str, split: str, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """One source split of a task from the local files, as a Dataset in the hub schema.

    ``split`` names the *source* split (``train`` / ``validation`` / ``test`` as on the hub), not the
    train / search-validation / test role; ``splits.py`` maps roles onto source splits.
    """
    task = ALIASES.get(task, task)
    if task not in LOADERS:
        raise DataError(f"no local loader for task {task!r}; known: {sorted(LOADERS)}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    return _load_cached(task, split, str(root.resolve()))


@functools.lru_cache(maxsize=32)
def _load_cached(task: str, split: str, root: str) -> datasets.Dataset:
    schema, loader = LOADERS[task]
    try:  # one boundary for whatever a damaged release file raises on the way in
        rows = loader(Path(root), split)
        if not rows:
            raise DataError(f"{task}: split {split!r} under {root} is empty; expected at least one example")
        return datasets.Dataset.from_list(rows, features=HUB_FEATURES[schema])
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, UnicodeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        if isinstance(exc, UnicodeDecodeError):
            raise DataError(
                f"{task}: a {split!r} data file under {root} is not UTF-8 text ({exc.reason} at byte "
                f"{exc.start}); expected UTF-8 encoded files"
            ) from None
        raise DataError(
            f"{task}: the {split!r} data under {root} cannot be read ({type(exc).__name__}: {exc}); "
            "expected the release files intact, as UTF-8 text (a truncated download, a directory "
            "where a file belongs, or text with unpaired surrogates)"
        ) from None
