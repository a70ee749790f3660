"""Task registry, local loaders, hub path, splits and lm-eval prompt formats."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pytest

from flexora_jax import tasks
from flexora_jax.errors import ConfigError, DataError
from flexora_jax.tasks import formats

DATA_DIR = Path(os.environ.get("FLEXORA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
requires_data = pytest.mark.skipif(
    not DATA_DIR.exists(), reason=f"reference data folder {DATA_DIR} is absent (set FLEXORA_DATA_DIR)"
)

# (task, source split, examples) from each folder's SOURCE.md.
SOURCE_COUNTS = [
    ("hellaswag", "validation", 10042),
    ("piqa", "validation", 1838),
    ("winogrande", "validation", 1267),
    ("arc_easy", "train", 2251),
    ("arc_easy", "validation", 570),
    ("arc_easy", "test", 2376),
    ("arc_challenge", "train", 1119),
    ("arc_challenge", "validation", 299),
    ("arc_challenge", "test", 1172),
    ("openbookqa", "train", 4957),
    ("openbookqa", "validation", 500),
    ("openbookqa", "test", 500),
    ("boolq", "validation", 3270),
    ("race_middle", "train", 25421),
    ("race_middle", "validation", 1436),
    ("race_middle", "test", 1436),
    ("race_high", "train", 62445),
    ("race_high", "validation", 3451),
    ("race_high", "test", 3498),
    ("commonsense_qa", "train", 9741),
    ("commonsense_qa", "validation", 1221),
    ("social_iqa", "train", 33410),
    ("social_iqa", "validation", 1954),
]


@requires_data
@pytest.mark.parametrize("task,split,count", SOURCE_COUNTS)
def test_local_loader_counts_and_records(task, split, count):
    ds = tasks.load_local(task, split, DATA_DIR)
    spec = tasks.get_task(task)
    assert len(ds) == count
    assert ds.features == spec.features  # same schema as the hub dataset
    records = spec.to_records(ds)
    assert len(records) == count
    for r in records:
        assert 0 <= r.gold < len(r.choices) and all(isinstance(c, str) and c for c in r.choices)
        assert r.context or r.is_partial


@requires_data
def test_local_label_distributions_match_source_md():
    gold = lambda task, split: collections.Counter(  # noqa: E731
        r.gold for r in tasks.get_task(task).to_records(tasks.load_local(task, split, DATA_DIR))
    )
    assert gold("hellaswag", "validation") == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    assert gold("piqa", "validation") == {0: 910, 1: 928}
    assert gold("boolq", "validation") == {1: 2033, 0: 1237}
    assert gold("siqa", "validation") == {0: 643, 1: 654, 2: 657}
    assert gold("openbookqa", "validation") == {0: 126, 1: 138, 2: 110, 3: 126}
    assert gold("openbookqa", "train") == {0: 1378, 1: 1212, 2: 1146, 3: 1221}


@requires_data
def test_race_last_question_only_is_one_per_passage():
    split = tasks.load_split("race_middle", "test", data_dir=DATA_DIR)
    assert len(split.records(last_question_only=True)) == 362  # passages, lm-eval's document unit


def test_registry_lists_all_tasks():
    assert set(tasks.list_tasks()) == {
        "hellaswag",
        "piqa",
        "winogrande",
        "race_middle",
        "race_high",
        "boolq",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
        "commonsense_qa",
        "commonsense_qa_cloze",
        "social_iqa",
        "gsm8k",
        "aqua",
        "mmlu",
    }
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        tasks.get_task("nope")


#: Registered tasks lm-eval 0.4.13 does not have under any name: RACE by level (lm-eval's ``race`` is RACE-high
#: scored on each article's last question: our race_high with last_question_only), the cloze control of
#: CommonsenseQA, and AQuA-RAT as generation (lm-eval's agieval_aqua_rat is multiple choice).
NOT_IN_LM_EVAL = {"race_middle", "race_high", "commonsense_qa_cloze", "aqua"}


def _lm_eval_task_names() -> set[str]:
    import importlib.util
    import re

    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm-eval is not installed")
    names = set()
    for path in Path(spec.origin).parent.joinpath("tasks").rglob("*.yaml"):
        names |= set(re.findall(r"^(?:task|group):\s*['\"]?([\w.-]+)", path.read_text(errors="replace"), re.M))
    return names


def test_task_names_are_lm_evals_and_earlier_names_still_work():
    lm_eval = _lm_eval_task_names()
    assert {"commonsense_qa", "social_iqa", "arc_easy", "boolq", "hellaswag", "mmlu", "race"} <= lm_eval
    assert set(tasks.list_tasks()) - lm_eval == NOT_IN_LM_EVAL
    for old, new in (
        ("commonsenseqa", "commonsense_qa"),
        ("siqa", "social_iqa"),
        ("commonsenseqa_cloze", "commonsense_qa_cloze"),
    ):
        assert tasks.get_task(old) is tasks.get_task(new)
    with pytest.raises(ConfigError, match=r"unknown task 'socail_iqa' \(did you mean 'social_iqa'\?\)"):
        tasks.get_task("socail_iqa")
    with pytest.raises(ConfigError, match=r"did you mean 'race_high'"):
        tasks.get_task("race")


@requires_data
def test_an_earlier_task_name_reads_the_same_files_under_the_lm_eval_name():
    old = tasks.load_records("siqa", "test", data_dir=DATA_DIR)
    new = tasks.load_records("social_iqa", "test", data_dir=DATA_DIR)
    assert old == new and {r.task for r in new} == {"social_iqa"}


# ------------------------------------------------------------------------------------------- splits
@requires_data
def test_resplit_is_seeded_disjoint_and_recorded():
    roles = {r: tasks.load_split("winogrande", r, data_dir=DATA_DIR, seed=3) for r in tasks.ROLES}
    assert [len(roles[r]) for r in tasks.ROLES] == [767, 250, 250]
    sentences = {r: set(roles[r].docs["sentence"]) for r in tasks.ROLES}
    assert not (sentences["train"] & sentences["test"]) and not (sentences["validation"] & sentences["test"])
    info = roles["test"].info.to_dict()
    assert info == {
        "task": "winogrande",
        "role": "test",
        "source": "local",
        "source_split": "validation",
        "n": 250,
        "resplit": True,
        "seed": 3,
        "sizes": {"train": 767, "validation": 250, "test": 250},
        "pool_size": 1267,
    }
    again = tasks.load_split("winogrande", "search-validation", data_dir=DATA_DIR, seed=3)
    assert again.docs["sentence"] == roles["validation"].docs["sentence"]
    other = tasks.load_split("winogrande", "validation", data_dir=DATA_DIR, seed=4)
    assert other.docs["sentence"] != roles["validation"].docs["sentence"]
    # A smaller train set leaves test untouched (test is cut first).
    small = tasks.load_split("winogrande", "test", data_dir=DATA_DIR, seed=3, sizes={"train": 100})
    assert small.docs["sentence"] == roles["test"].docs["sentence"]
    assert len(tasks.load_split("winogrande", "train", data_dir=DATA_DIR, seed=3, sizes={"train": 100})) == 100


@requires_data
def test_official_and_train_pool_splits():
    test = tasks.load_split("commonsenseqa", "test", data_dir=DATA_DIR)
    assert (test.info.source_split, test.info.resplit, len(test)) == ("validation", False, 1221)
    val = tasks.load_split("commonsenseqa", "validation", data_dir=DATA_DIR)
    train = tasks.load_split("commonsenseqa", "train", data_dir=DATA_DIR)
    assert (len(train), len(val), val.info.source_split) == (8741, 1000, "train")
    assert not set(train.docs["id"]) & set(val.docs["id"])
    with pytest.raises(ConfigError, match="official split 'validation'"):
        tasks.load_split("commonsenseqa", "test", data_dir=DATA_DIR, sizes={"test": 10})
    with pytest.raises(DataError, match="pool has only 1838"):
        tasks.load_split("piqa", "test", data_dir=DATA_DIR, sizes={"test": 2000})
    with pytest.raises(ConfigError, match="unknown split"):
        tasks.load_split("piqa", "dev2", data_dir=DATA_DIR)


def test_resplit_indices_partition():
    parts = tasks.splits.resplit_indices(100, {"train": 60, "validation": 20, "test": 20}, seed=0)
    together = np.concatenate(list(parts.values()))
    assert sorted(together.tolist()) == list(range(100))


# ------------------------------------------------------------------------------------------- hub path
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


HELLASWAG_HUB = [
    {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap.",
            "is ripping level tiles off.",
            "is holding a cube.",
            "starts pulling up roofing.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    },
    {
        "ind": 92,
        "activity_label": "Baking cookies",
        "ctx_a": "[header] How to bake. [title] Mix the dough.",
        "ctx_b": "",
        "ctx": "[header] How to bake. [title] Mix the dough.",
        "endings": ["[step] Stir it.", "Bake [substeps] it.", "Eat it.", "Sell it."],
        "source_id": "wikihow~1",
        "split": "val",
        "split_type": "zeroshot",
        "label": "0",
    },
]


def test_hub_path_with_a_local_dataset_in_hub_schema(tmp_path):
    _write_jsonl(tmp_path / "hs" / "validation.jsonl", HELLASWAG_HUB * 5)
    split = tasks.load_split(
        "hellaswag", "test", source="hub", hub_path=tmp_path / "hs", sizes={"train": 6, "validation": 2, "test": 2}
    )
    assert split.info.source == "hub" and len(split) == 2
    assert split.docs.features == tasks.get_task("hellaswag").features
    recs = tasks.load_split(
        "hellaswag", "train", source="hub", hub_path=tmp_path / "hs", sizes={"train": 10, "validation": 0, "test": 0}
    ).records()
    assert recs[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert recs[1].context == "Baking cookies: How to bake.. Mix the dough."
    assert recs[1].choices == (" Stir it.", "Bake it.", "Eat it.", "Sell it.")  # lm-eval keeps the space

    arc = [
        {
            "id": f"q{i}",
            "question": f"Q{i}?",
            "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
            "answerKey": "2",
        }
        for i in range(3)
    ]
    _write_jsonl(tmp_path / "arc" / "test.jsonl", arc)
    recs = tasks.load_split("arc_easy", "test", source="hub", hub_path=tmp_path / "arc").records()
    assert [r.gold for r in recs] == [1, 1, 1] and recs[0].context == "Question: Q0?\nAnswer:"


def test_hub_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="could not load split 'test'.*source='local'"):
        tasks.load_split("arc_easy", "test", source="hub", hub_path=tmp_path / "missing")
    _write_jsonl(tmp_path / "bad" / "test.jsonl", [{"id": "x", "question": "q?"}])
    with pytest.raises(DataError, match=r"lacks field\(s\) \['choices', 'answerKey'\]"):
        tasks.load_split("arc_easy", "test", source="hub", hub_path=tmp_path / "bad")


# ------------------------------------------------------------------------------------------- bad input
def test_local_bad_files(tmp_path):
    piqa = tmp_path / "piqa"
    _write_jsonl(piqa / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}, {"goal": "g", "sol1": "a"}])
    (piqa / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError, match=r"valid.jsonl:2: missing field 'sol2'"):
        tasks.load_local("piqa", "validation", tmp_path)
    _write_jsonl(piqa / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (piqa / "valid-labels.lst").write_text("0\n2\n")
    with pytest.raises(DataError, match=r"label '2' .* out of range; expected 0 or 1"):
        tasks.load_local("piqa", "validation", tmp_path)
    (piqa / "valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match="has 2 examples but .* has 1 labels"):
        tasks.load_local("piqa", "validation", tmp_path)
    (piqa / "valid.jsonl").write_text("")
    (piqa / "valid-labels.lst").write_text("")
    with pytest.raises(DataError, match="is empty"):
        tasks.load_local("piqa", "validation", tmp_path)
    with pytest.raises(DataError, match=r"boolq/val.jsonl not found"):
        tasks.load_local("boolq", "validation", tmp_path)
    with pytest.raises(DataError, match="split 'train' is not available"):
        tasks.load_local("hellaswag", "train", tmp_path)


@pytest.mark.parametrize(
    "task, split, path, damage",
    [
        ("social_iqa", "train", "siqa/socialiqa-train-dev.zip", "truncated"),
        ("social_iqa", "train", "siqa/socialiqa-train-dev.zip", "garbage"),
        ("hellaswag", "validation", "hellaswag/hellaswag_val_full.txt.bz2", "truncated"),
        ("hellaswag", "validation", "hellaswag/hellaswag_val_full.txt.bz2", "garbage"),
        ("race_middle", "test", "race/RACE-dev-test.tar.gz", "truncated"),
        ("race_middle", "test", "race/RACE-dev-test.tar.gz", "garbage"),
        ("piqa", "validation", "piqa/valid.jsonl", "directory"),
        ("piqa", "validation", "piqa/valid.jsonl", "surrogates"),
    ],
    ids=lambda v: str(v).split("/")[-1],
)
def test_damaged_release_files_are_data_errors(tmp_path, data_dir, task, split, path, damage):
    """Archives cut short or overwritten, a directory where a file belongs, unpaired surrogates: a DataError
    naming the task and the reason, never BadZipFile / EOFError / UnicodeEncodeError."""
    src = data_dir / path
    if damage in ("truncated", "garbage") and not src.exists():
        pytest.skip(f"{src} is not in this data folder")
    dst = tmp_path / path
    dst.parent.mkdir(parents=True)
    if damage == "truncated":
        raw = src.read_bytes()
        dst.write_bytes(raw[: len(raw) // 3])
    elif damage == "garbage":
        dst.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "directory":
        dst.mkdir()
        (dst.parent / "valid-labels.lst").write_text("0\n")
    else:
        dst.write_text('{"goal": "\\ud800 jar", "sol1": "a", "sol2": "b"}\n')
        (dst.parent / "valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match=task.split("_")[0]):
        tasks.load_local(task, split, tmp_path)


def test_empty_choices_are_refused():
    with pytest.raises(DataError, match=r"choice\(s\) \[1\] are empty"):
        formats.piqa({"goal": "g", "sol1": "a", "sol2": "", "label": 0}, 7)


def test_converter_bad_docs():
    with pytest.raises(DataError, match="gold label 4 is out of range; expected 0..1"):
        formats.piqa({"goal": "g", "sol1": "a", "sol2": "b", "label": 4}, 7)
    with pytest.raises(DataError, match="piqa doc 7: missing field 'sol2'"):
        formats.piqa({"goal": "g", "sol1": "a", "label": 0}, 7)
    with pytest.raises(DataError, match="answerKey='E' is not one of"):
        formats.arc({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}, 0)
    with pytest.raises(DataError, match="has no '_' blank"):
        formats.winogrande({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, 0)


# ------------------------------------------------------------------------------------------- lm-eval formats
def test_formats_match_lm_eval_task_code():
    from lm_eval.tasks.hellaswag import utils as hs
    from lm_eval.tasks.race import preprocess_race as race
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    for i, doc in enumerate(HELLASWAG_HUB):
        ref = hs.process_docs(__import__("datasets").Dataset.from_list([doc]))[0]
        rec = formats.hellaswag(doc, i)
        assert (rec.context, list(rec.choices), rec.gold) == (ref["query"], ref["choices"], ref["gold"])

    doc = {
        "sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }
    rec = formats.winogrande(doc, 0)
    assert list(rec.choices) == wg.doc_to_choice(doc) and rec.gold == wg.doc_to_text(doc)
    assert rec.requests()[0] == (wg.doc_to_choice(doc)[0], " " + wg.doc_to_target(doc))

    problems = [
        {"question": "The writer  _  .", "options": ["w", "x", "y", "z"], "answer": "B"},
        {"question": "Why?", "options": ["p", "q", "r", "s"], "answer": "D"},
        {"question": "What next?", "options": ["e", "f", "g", "h"], "answer": "A"},
    ]
    rows = [
        {
            "example_id": "m1.txt",
            "article": "Text.",
            "question": p["question"],
            "options": p["options"],
            "answer": p["answer"],
        }
        for p in problems
    ]
    ref_doc = {"article": "Text.", "problems": repr(problems)}
    recs = formats.race_records(rows, last_question_only=True)
    assert len(recs) == 1
    assert recs[0].context == race.doc_to_text(ref_doc) and list(recs[0].choices) == race.doc_to_choice(ref_doc)
    assert recs[0].gold == race.doc_to_target(ref_doc)
    assert len(formats.race_records(rows)) == 3

    csqa = formats.commonsenseqa(
        {"question": " Where? ", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "C"}, 0
    )
    assert csqa.context == "Question: Where?\nA. v\nB. w\nC. x\nD. y\nE. z\nAnswer:" and csqa.gold == 2
    siqa = formats.siqa(
        {"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}, 0
    )
    assert (siqa.context, siqa.gold) == ("Q: C. Q?\nA:", 2)
    boolq = formats.boolq({"passage": "P.", "question": "is it", "label": 1}, 0)
    assert boolq.requests() == [("P.\nQuestion: is it?\nAnswer:", " no"), ("P.\nQuestion: is it?\nAnswer:", " yes")]


def test_cloze_commonsenseqa_and_the_question_removed_control():
    doc = {"question": " Where? ", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "C"}
    cloze = formats.commonsenseqa_cloze(doc, 0)
    assert (cloze.context, cloze.choices, cloze.gold) == ("Question: Where?\nAnswer:", tuple("vwxyz"), 2)
    noq = formats.question_removed(cloze)
    assert (
        noq.requests()
        == [("Answer:", " v"), ("Answer:", " w"), ("Answer:", " x"), ("Answer:", " y"), ("Answer:", " z")]
        and noq.gold == 2
    )
    siqa = formats.siqa(
        {"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"}, 0
    )
    assert formats.question_removed(siqa).context == "A:"
    hs = formats.question_removed(formats.hellaswag(HELLASWAG_HUB[0], 0))
    assert hs.context == "" and hs.choices == formats.hellaswag(HELLASWAG_HUB[0], 0).choices
    wg = formats.winogrande({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}, 0)
    with pytest.raises(DataError, match="partial scoring"):
        formats.question_removed(wg)


@requires_data
def test_cloze_commonsenseqa_reads_the_commonsenseqa_files():
    recs = tasks.load_records("commonsenseqa_cloze", "test", data_dir=DATA_DIR)
    lettered = tasks.load_records("commonsenseqa", "test", data_dir=DATA_DIR)
    assert len(recs) == len(lettered) == 1221
    assert [r.gold for r in recs] == [r.gold for r in lettered]
    assert all(len(r.choices) == 5 and r.context.startswith("Question: ") for r in recs)
