"""The generation study's task file (examples/tasks/arc_easy_qa.yaml): ARC-Easy as free-form QA, whose one
reference is the gold choice's text (a list answer_field indexed by label_field)."""

import json
from pathlib import Path

import pytest

from uncurl.errors import UncurlError
from uncurl.tasks import halves, load_examples, resolve_task

from conftest import DATA_DIR

TASK = Path(__file__).resolve().parents[1] / "examples" / "tasks" / "arc_easy_qa.yaml"
ARC = DATA_DIR / "mc" / "arc_easy.jsonl"


@pytest.mark.skipif(not ARC.is_file(), reason="needs ../shared/data")
def test_arc_easy_qa_references_are_the_gold_choices():
    task = resolve_task(str(TASK))
    assert task.generative
    rows = [json.loads(line) for line in ARC.read_text().splitlines()]
    for split in ("calibration", "evaluation"):
        examples = load_examples(task, split)
        mine = halves(rows, split, task)  # the same seeded half, read independently of the task file
        assert len(examples) == len(mine) > 1000
        assert [ex.answers for ex in examples] == [(r["choices"][r["gold"]],) for r in mine]
        assert [ex.prompt for ex in examples] == [r["query"] + "\nAnswer:" for r in mine]


def test_an_indexed_answer_field_must_be_a_list(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": q, "a": ["b", "c"], "g": 1}) + "\n" for q in "xy"))
    (tmp_path / "t.yaml").write_text("template: '{q}'\nfile: d.jsonl\nanswer_field: a\nlabel_field: g\n")
    task = resolve_task(str(tmp_path / "t.yaml"))
    assert task.example({"q": "y", "a": ["b", "c"], "g": 1}).answers == ("c",)
    with pytest.raises(UncurlError, match="must be a list"):
        task.example({"q": "x", "a": "not a list", "g": 0})
