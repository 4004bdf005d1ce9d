"""The task registry against the real files in ../shared/data, plus tiny temp files for edge cases."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from uncurl.errors import UncurlError
from uncurl.tasks import (
    CORPUS_HOLDOUT,
    DATA_DIR_ENV,
    TASKS,
    Example,
    corpus_passages,
    custom_task,
    data_fingerprint,
    describe_tasks,
    get_task,
    load_examples,
    resolve_data_dir,
    split_corpus,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# (calibration, evaluation) row counts; the mc/ files are halved (SOURCES.md gives the file sizes).
COUNTS = {
    "superglue-rte": (2490, 277),
    "superglue-cb": (250, 56),
    "superglue-copa": (400, 100),
    "superglue-boolq": (32, 3270),
    "arc-easy": (1188, 1188),
    "arc-challenge": (586, 586),
    "piqa": (919, 919),
}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (SHARED_DATA / "superglue").is_dir():
        pytest.skip(f"real task data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- every registered task on the real data -------------------------------------------------


def test_registry_matches_expected_counts():
    assert set(TASKS) == set(COUNTS) | {"corpus"}  # corpus is text only: tested below


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_real_data_loads_with_valid_golds(name, data_dir):
    task = get_task(name)
    for split, expected in zip(("calibration", "evaluation"), COUNTS[name]):
        examples = load_examples(task, split, data_dir)
        assert len(examples) == expected, (name, split)
        for ex in examples:
            assert ex.choices and all(c.startswith(" ") for c in ex.choices)
            assert 0 <= ex.gold < len(ex.choices)
            assert task.num_choices in (None, len(ex.choices))
            assert ex.text == ex.prompt + ex.choices[ex.gold]


def test_rte_first_example_hand_checked(data_dir):
    ex = load_examples(get_task("superglue-rte"), "calibration", data_dir)[0]
    assert ex == Example(
        "No Weapons of Mass Destruction Found in Iraq Yet.\n"
        "Question: Weapons of Mass Destruction Found in Iraq. True or False?\nAnswer:",
        (" True", " False"),
        1,  # "not_entailment"
    )
    golds = Counter(e.gold for e in load_examples(get_task("superglue-rte"), "evaluation", data_dir))
    assert golds == {0: 146, 1: 131}  # entailment / not_entailment in val.jsonl


def test_cb_first_eval_example(data_dir):
    ex = load_examples(get_task("superglue-cb"), "evaluation", data_dir)[1]
    assert ex.prompt.endswith("\nQuestion: there is a shipment. True, False, or Neither?\nAnswer:")
    assert ex.choices == (" True", " False", " Neither") and ex.gold == 2  # "neutral"


def test_copa_renders_because_and_therefore(data_dir):
    task = get_task("superglue-copa")
    cause = load_examples(task, "calibration", data_dir)[0]
    # lm-eval's super_glue/copa: the choice carries its own leading space after the " " delimiter
    assert cause == Example(
        "My body cast a shadow over the grass because", ("  the sun was rising.", "  the grass was cut."), 0
    )
    effect = load_examples(task, "evaluation", data_dir)[0]
    assert effect.prompt == "The man turned on the faucet therefore"
    assert effect.choices == ("  the toilet filled with water.", "  water flowed from the spout.")
    assert effect.text == "The man turned on the faucet therefore  water flowed from the spout."


def test_boolq_true_is_yes(data_dir):
    task = get_task("superglue-boolq")
    for split, file in (("calibration", "train32.jsonl"), ("evaluation", "val.jsonl")):
        rows = _read_jsonl(data_dir / "superglue" / "boolq" / file)
        examples = load_examples(task, split, data_dir)
        assert [e.choices[e.gold] for e in examples] == [" yes" if r["label"] else " no" for r in rows]
    first = load_examples(task, "calibration", data_dir)[0]
    assert first.prompt.endswith("\nQuestion: is ghost in the shell based on the anime?\nAnswer:")


@pytest.mark.parametrize("name,file", [("arc-easy", "arc_easy"), ("arc-challenge", "arc_challenge"), ("piqa", "piqa")])
def test_mc_halves_disjoint_and_cover_the_file(name, file, data_dir):
    task = get_task(name)
    rows = _read_jsonl(data_dir / "mc" / f"{file}.jsonl")
    whole = [Example(r["query"].strip() + "\nAnswer:", tuple(" " + c for c in r["choices"]), r["gold"]) for r in rows]
    calibration = load_examples(task, "calibration", data_dir)
    evaluation = load_examples(task, "evaluation", data_dir)
    assert Counter(calibration) + Counter(evaluation) == Counter(whole)
    assert len(calibration) + len(evaluation) == len(whole)
    copies = Counter(whole)  # a row in both halves must occur more than once in the file
    assert all(copies[e] > 1 for e in set(calibration) & set(evaluation))
    assert calibration != whole[: len(calibration)]  # shuffled, not the file's first half
    for half in (calibration, evaluation):  # each half keeps file order
        rest = iter(whole)
        assert all(e in rest for e in half)
    # the halves are fixed: they do not move with the subset seed
    assert load_examples(task, "calibration", data_dir, seed=7) == calibration


def test_describe_tasks_lists_every_task():
    described = {d["name"]: d for d in describe_tasks()}
    assert set(described) == set(TASKS)
    rte = described["superglue-rte"]
    assert rte["hub"] == "aps/super_glue (rte)" and described["piqa"]["hub"] == "ybisk/piqa"
    assert rte["local_files"] == {"calibration": "superglue/rte/train.jsonl", "evaluation": "superglue/rte/val.jsonl"}
    assert rte["choices"] == 2 and described["superglue-cb"]["choices"] == 3
    assert described["superglue-copa"]["choices"] == 2 and described["arc-easy"]["choices"] == "varies"
    assert "half" in described["arc-easy"]["description"]
    corpus = described["corpus"]
    assert corpus["hub"] == "" and corpus["choices"] == 0 and "loss" in corpus["description"]
    assert set(corpus["local_files"].values()) == {"corpus/*.txt"}


# --- label spellings and Hub row layouts ----------------------------------------------------


@pytest.mark.parametrize(
    "name,local_dir,row,spellings",
    [
        ("superglue-rte", "rte", {"premise": "P.", "hypothesis": "H."}, [("entailment", 0), ("not_entailment", 1)]),
        ("superglue-cb", "cb", {"premise": "P.", "hypothesis": "H"},
         [("entailment", 0), ("contradiction", 1), ("neutral", 2)]),
        ("superglue-boolq", "boolq", {"passage": "P.", "question": "q"},
         [(False, 0), ("false", 0), ("False", 0), (True, 1), ("true", 1)]),
        ("superglue-copa", "copa", {"premise": "It rained.", "choice1": "A.", "choice2": "B.", "question": "cause"},
         [("0", 0), ("1", 1)]),
    ],
)
def test_integer_and_string_labels_agree(tmp_path, name, local_dir, row, spellings):
    task = get_task(name)
    for i, (spelling, index) in enumerate(spellings):
        by_name = tmp_path / f"s{i}"
        by_index = tmp_path / f"i{i}"
        _write_jsonl(by_name / "superglue" / local_dir / "val.jsonl", [{**row, "label": spelling}])
        _write_jsonl(by_index / "superglue" / local_dir / "val.jsonl", [{**row, "label": index}])
        [a] = load_examples(task, "evaluation", by_name)
        [b] = load_examples(task, "evaluation", by_index)
        assert a == b and a.gold == index


def test_hub_rows_convert_like_local_rows():
    arc = get_task("arc-easy")
    hub = {"question": "Which is a gas?", "answerKey": "C",
           "choices": {"text": ["rock", "water", "steam"], "label": ["A", "B", "C"]}}
    local = {"query": "Question: Which is a gas?", "choices": ["rock", "water", "steam"], "gold": 2}
    assert arc.example(hub) == arc.example(local) == Example(
        "Question: Which is a gas?\nAnswer:", (" rock", " water", " steam"), 2
    )
    numeric_keys = {**hub, "answerKey": "2", "choices": {"text": ["a", "b"], "label": ["1", "2"]}}
    assert arc.example(numeric_keys).gold == 1
    piqa = get_task("piqa")
    assert piqa.example({"goal": "Open a jar", "sol1": "twist", "sol2": "push", "label": 0}) == piqa.example(
        {"query": "Question: Open a jar\n", "choices": ["twist", "push"], "gold": 0}
    )
    rte = get_task("superglue-rte")
    assert rte.example({"premise": "P.", "hypothesis": "H.", "label": 1, "idx": 0}).gold == 1
    with pytest.raises(UncurlError, match="'E'"):
        arc.example({**hub, "answerKey": "E"})


def test_bad_label_names_value_and_accepted_spellings():
    with pytest.raises(UncurlError, match=r"'maybe'.*entailment"):
        get_task("superglue-rte").example({"premise": "P", "hypothesis": "H", "label": "maybe"})
    with pytest.raises(UncurlError, match=r"\b5\b.*0\.\.2"):
        get_task("superglue-cb").example({"premise": "P", "hypothesis": "H", "label": 5})


# --- errors ---------------------------------------------------------------------------------


def test_unknown_task_lists_known_names():
    with pytest.raises(UncurlError, match="superglue-rtee") as err:
        get_task("superglue-rtee")
    assert all(name in str(err.value) for name in TASKS)


def test_bad_split_names_split_and_choices(data_dir):
    with pytest.raises(UncurlError, match=r"'train'.*calibration.*evaluation"):
        load_examples(get_task("superglue-rte"), "train", data_dir)


def test_missing_file_names_path_and_layout(tmp_path):
    with pytest.raises(UncurlError) as err:
        load_examples(get_task("superglue-cb"), "evaluation", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "superglue" / "cb" / "val.jsonl") in message and "laid out" in message


def test_empty_file_says_no_data(tmp_path):
    (tmp_path / "superglue" / "rte").mkdir(parents=True)
    (tmp_path / "superglue" / "rte" / "train.jsonl").write_text("\n\n")
    with pytest.raises(UncurlError, match=r"superglue-rte has no data in .*train\.jsonl"):
        load_examples(get_task("superglue-rte"), "calibration", tmp_path)


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "superglue" / "rte" / "val.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"premise": "P", "hypothesis": "H", "label": 0}\n{not json\n')
    with pytest.raises(UncurlError, match="line 2"):
        load_examples(get_task("superglue-rte"), "evaluation", tmp_path)


def test_offline_hub_points_at_data_dir(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets and huggingface_hub read these at import time: patch the live values too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # an empty cache
    with pytest.raises(UncurlError) as err:
        load_examples(get_task("superglue-rte"), "calibration")
    message = str(err.value)
    assert "aps/super_glue" in message and "--data-dir" in message and DATA_DIR_ENV in message


def test_resolve_data_dir(monkeypatch, tmp_path):
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path)) == tmp_path


def test_env_data_dir_is_used(monkeypatch, data_dir):
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert len(load_examples(get_task("superglue-cb"), "evaluation")) == 56


# --- the corpus task (held-out tail of corpus/*.txt) ----------------------------------------

CORPUS_PASSAGES = 451  # pinned: the held-out tails of the 8 files in ../shared/data/corpus


@pytest.fixture(scope="module")
def corpus_splits(data_dir) -> list[tuple[str, str]]:
    """(train, holdout) of every corpus file, read as the corpus task reads them."""
    files = sorted((data_dir / "corpus").glob("*.txt"))
    if not files:
        pytest.skip(f"no corpus files in {data_dir / 'corpus'}")
    return [split_corpus(f.read_text(encoding="utf-8", errors="replace")) for f in files]


def test_split_corpus_cut_matches_holdout():
    train, holdout = split_corpus("x" * 1000)
    assert len(holdout) == 1000 * CORPUS_HOLDOUT == 20 and len(train) == 980
    train, holdout = split_corpus("abc\n" * 333)
    assert train + holdout == "abc\n" * 333 and len(train) == int(len("abc\n" * 333) * (1 - CORPUS_HOLDOUT))


def test_corpus_passages_break_at_lines():
    lines = [f"line {i} " + "w" * (i % 37) for i in range(300)]
    text = "\n".join(lines) + "\n\n   \n"
    passages = corpus_passages(text, size=200)
    assert all(p and p == p.strip() and len(p) <= 200 and p in text for p in passages)
    assert "\n".join(passages) == "\n".join(lines)  # nothing lost, nothing reordered, breaks at line ends
    assert corpus_passages("short\n" + "L" * 50 + "\nend", size=10) == ["short", "L" * 50, "end"]
    assert corpus_passages(" \n\n\t\n") == [] and corpus_passages("") == []


def test_corpus_task_reads_held_out_tail(data_dir, corpus_splits):
    task = get_task("corpus")
    examples = load_examples(task, "calibration", data_dir)
    assert len(examples) == CORPUS_PASSAGES
    assert load_examples(task, "evaluation", data_dir) == examples  # both splits read all of it
    assert all(e.choices == () and e.gold == -1 and e.text == e.prompt for e in examples)
    assert all(e.prompt.strip() and (len(e.prompt) <= 1000 or "\n" not in e.prompt) for e in examples)
    assert all(any(e.prompt in holdout for _, holdout in corpus_splits) for e in examples)
    # held out: barely any passage occurs in a training part (2 duplicated reviews in movie_reviews)
    in_train = sum(any(e.prompt in train for train, _ in corpus_splits) for e in examples)
    assert in_train <= 2
    expected = [p for _, holdout in corpus_splits for p in corpus_passages(holdout)]  # files by name
    assert [e.prompt for e in examples] == expected


def test_corpus_task_limit_and_seed(data_dir):
    task = get_task("corpus")
    full = load_examples(task, "calibration", data_dir)
    a = load_examples(task, "calibration", data_dir, limit=16, seed=0)
    assert len(a) == 16 and a == load_examples(task, "calibration", data_dir, limit=16, seed=0)
    assert a != load_examples(task, "calibration", data_dir, limit=16, seed=1)
    positions = [full.index(e) for e in a]
    assert positions == sorted(positions)


def test_corpus_task_needs_a_data_dir(tmp_path):
    with pytest.raises(UncurlError, match=r"corpus.*--data-dir") as err:
        load_examples(get_task("corpus"), "calibration")
    assert DATA_DIR_ENV in str(err.value)
    with pytest.raises(UncurlError, match=r"no files match .*corpus/\*\.txt"):
        load_examples(get_task("corpus"), "calibration", tmp_path)


def test_corpus_task_on_tiny_files(tmp_path):
    (tmp_path / "corpus").mkdir()  # 11-character lines: the 2% tail is the last 2 (a) and 4 (b)
    (tmp_path / "corpus" / "b.txt").write_text("".join(f"b line {i:03d}\n" for i in range(200)))
    (tmp_path / "corpus" / "a.txt").write_text("".join(f"a line {i:03d}\n" for i in range(100)))
    (tmp_path / "corpus" / "notes.md").write_text("not a corpus file")
    examples = load_examples(get_task("corpus"), "evaluation", tmp_path)
    assert [e.prompt for e in examples] == ["a line 098\na line 099", "b line 196\nb line 197\nb line 198\nb line 199"]


# --- custom tasks ---------------------------------------------------------------------------

ROWS = [
    {"text": "great film", "label": "positive"},
    {"text": "dull plot", "label": "1"},
    {"text": "fine acting", "label": 0},
]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_custom_task_with_choices(tmp_path, fmt):
    path = tmp_path / f"reviews.{fmt}"
    _write_jsonl(path, ROWS) if fmt == "jsonl" else _write_csv(path, ROWS)
    task = custom_task(path, "Review: {text}\nSentiment:", ["positive", " negative"], eval_path=path)
    assert task.name == "reviews" and task.choices == (" positive", " negative")
    for split in ("calibration", "evaluation"):  # the same file named for both: both read all of it
        examples = load_examples(task, split)
        assert [e.gold for e in examples] == [0, 1, 0]
    assert examples[1] == Example("Review: dull plot\nSentiment:", (" positive", " negative"), 1)
    assert examples[1].text == "Review: dull plot\nSentiment: negative"
    assert load_examples(task, "evaluation", tmp_path / "elsewhere") == examples  # absolute path wins


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_custom_task_text_only(tmp_path, fmt):
    path = tmp_path / f"notes.{fmt}"
    _write_jsonl(path, ROWS) if fmt == "jsonl" else _write_csv(path, ROWS)
    examples = load_examples(custom_task(path, "{text}.", eval_path=path), "calibration")
    assert examples == [Example("great film."), Example("dull plot."), Example("fine acting.")]
    assert examples[0].choices == () and examples[0].gold == -1 and examples[0].text == "great film."


def test_custom_task_errors(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(UncurlError, match=r"\{title\}.*\['label', 'text'\]"):
        load_examples(custom_task(path, "{title}"), "calibration")
    with pytest.raises(UncurlError, match=r"'stars'.*\['label', 'text'\]"):
        load_examples(custom_task(path, "{text}", ["good", "bad"], label_field="stars"), "calibration")
    with pytest.raises(UncurlError, match=r"'positive'.*\['good', 'bad'\]"):
        load_examples(custom_task(path, "{text}", ["good", "bad"], eval_path=path), "calibration")
    with pytest.raises(UncurlError, match="jsonl or .csv"):
        custom_task(tmp_path / "rows.txt", "{text}")
    with pytest.raises(UncurlError, match="name the row's fields"):
        custom_task(path, "{0}")
    with pytest.raises(UncurlError, match=r"missing\.csv does not exist"):
        load_examples(custom_task(tmp_path / "missing.csv", "{text}"), "evaluation")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(UncurlError, match="empty has no data"):
        load_examples(custom_task(tmp_path / "empty.csv", "{text}"), "evaluation")


# --- subsets and fingerprints ---------------------------------------------------------------


def test_limit_is_a_seeded_subset_in_file_order(data_dir):
    task = get_task("superglue-rte")
    full = load_examples(task, "evaluation", data_dir)
    a = load_examples(task, "evaluation", data_dir, limit=20, seed=0)
    assert a == load_examples(task, "evaluation", data_dir, limit=20, seed=0)
    assert len(a) == 20 and a != full[:20]
    assert a != load_examples(task, "evaluation", data_dir, limit=20, seed=1)
    positions = [full.index(e) for e in a]
    assert positions == sorted(positions)
    assert load_examples(task, "evaluation", data_dir, limit=10_000) == full
    with pytest.raises(UncurlError, match="limit 0"):
        load_examples(task, "evaluation", data_dir, limit=0)


def test_data_fingerprint_stable_and_sensitive():
    examples = [Example("a", (" x", " y"), 1), Example("b")]
    assert data_fingerprint(examples) == "5a616ed71ea410f6"  # pinned: must not change across runs
    assert data_fingerprint(list(examples)) == data_fingerprint(examples)
    assert len(data_fingerprint(examples)) == 16
    assert data_fingerprint([Example("a", (" x", " y"), 0), Example("b")]) != data_fingerprint(examples)
    assert data_fingerprint([Example("a!", (" x", " y"), 1), Example("b")]) != data_fingerprint(examples)
    assert data_fingerprint(examples[::-1]) != data_fingerprint(examples)


def test_real_data_fingerprint_is_stable(data_dir):
    examples = load_examples(get_task("superglue-cb"), "evaluation", data_dir)
    assert data_fingerprint(examples) == data_fingerprint(load_examples(get_task("superglue-cb"), "evaluation", data_dir))
    assert data_fingerprint(examples) != data_fingerprint(examples[:-1])
