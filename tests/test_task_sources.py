"""Where a task's rows can come from: custom files (per-row choices, boolean golds, separate or halved
files), task files (YAML/JSON), Hub datasets by name, calibration mixes and chat templates."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
from typer.testing import CliRunner

from uncurl import pipeline
from uncurl.cli import app
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.pipeline import DataOptions, calibration_texts, chat_wrap, mix_counts, run_eval
from uncurl.tasks import DATA_DIR_ENV, Example, custom_task, data_fingerprint, get_task, load_examples, resolve_task

runner = CliRunner()
FAST = ["--samples", "12", "--max-length", "64"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def items():
    """20 yes/no items in three spellings of the same answers."""
    rng = random.Random(3)
    rows = [{"q": f"Is {rng.randint(0, 99)} bigger than {rng.randint(0, 99)}?", "gold": rng.randint(0, 1)}
            for _ in range(20)]
    return rows


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("mixtral", seed=0)


def score(tiny, task_name, **options):
    model, tok = tiny
    return run_eval(model, tok, DataOptions(task=str(task_name), **options), limit=None)


def test_per_row_choices_score_as_fixed_choices(tmp_path, items, tiny):
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [{"q": r["q"], "label": r["gold"]} for r in items])
    per_row = write_jsonl(tmp_path / "per_row.jsonl",
                          [{"q": r["q"], "options": ["no", "yes"], "answer": ["no", "yes"][r["gold"]]} for r in items])
    a = score(tiny, fixed, template="{q}\nAnswer:", choices=("no", "yes"))
    b = score(tiny, per_row, template="{q}\nAnswer:", choices_field="options", label_field="answer")
    assert a == {**b, "task": "fixed"} and a["n"] == 10 and "acc" in a


def test_per_row_choices_may_vary_in_number(tmp_path):
    rows = [{"q": "a", "c": ["x", "y", "z"], "label": 2}, {"q": "b", "c": '["u", " v"]', "label": "v"}]
    task = custom_task(write_jsonl(tmp_path / "v.jsonl", rows), "{q}", choices_field="c", eval_path=tmp_path / "v.jsonl")
    assert task.num_choices is None
    assert load_examples(task, "evaluation") == [Example("a", (" x", " y", " z"), 2), Example("b", (" u", " v"), 1)]


def test_boolean_golds_score_as_their_0_1_twin(tmp_path, items, tiny):
    booleans = write_jsonl(tmp_path / "b.jsonl", [{"q": r["q"], "label": bool(r["gold"])} for r in items])
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"q": r["q"], "label": r["gold"]} for r in items])
    options = dict(template="{q}\nAnswer:", choices=("no", "yes"))
    assert score(tiny, booleans, **options) == {**score(tiny, numbers, **options), "task": "b"}
    # a choice spelled true/false is named by the boolean itself
    task = custom_task(booleans, "{q}", ["False", "True"], eval_path=booleans)
    assert [e.gold for e in load_examples(task, "evaluation")] == [r["gold"] for r in items]


def test_one_file_halves_never_share_an_example(tmp_path, items):
    path = write_jsonl(tmp_path / "one.jsonl", [{"q": r["q"] + str(i), "label": r["gold"]} for i, r in enumerate(items)])
    task = custom_task(path, "{q}", ["no", "yes"])
    cal, ev = (load_examples(task, split) for split in ("calibration", "evaluation"))
    prints = [{data_fingerprint([e]) for e in split} for split in (cal, ev)]
    assert len(cal) == len(ev) == 10 and not prints[0] & prints[1]
    assert sorted(e.prompt for e in cal + ev) == sorted(r["q"] + str(i) for i, r in enumerate(items))
    assert "disjoint" in task.split_note
    # a separate evaluation file: calibration reads all of the first file
    other = write_jsonl(tmp_path / "other.jsonl", [{"q": "x", "label": 1}])
    two = custom_task(path, "{q}", ["no", "yes"], eval_path=other)
    assert len(load_examples(two, "calibration")) == 20 and load_examples(two, "evaluation") == [Example("x", (" no", " yes"), 1)]


def test_prune_on_one_file_states_the_split_and_fingerprints_differ(tmp_path, items):
    path = write_jsonl(tmp_path / "one.jsonl", [{"q": r["q"] + str(i), "label": r["gold"]} for i, r in enumerate(items)])
    res = run("prune", "--task", path, "--template", "{q}\nAnswer:", "--choices", "no,yes", "--keep", 4,
              "--eval", "--out", tmp_path / "out", *FAST)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert "disjoint halves" in report["task"]["split"] and "disjoint halves" in report["eval"]["before"]["split"]
    assert report["task"]["fingerprint"] != report["eval"]["before"]["fingerprint"]
    assert "disjoint halves" in (tmp_path / "out" / "report" / "report.md").read_text()


@pytest.mark.parametrize("rows, needles", [
    ([{"q": "a", "label": 0}, {"q": "b", "label": "maybe"}], ["line 2", "field 'label'", "'maybe'"]),
    ([{"q": "a", "label": 0}, {"q": "b"}], ["line 2", "field 'label' is missing"]),
    ([{"q": "a", "c": "just one", "label": 0}], ["line 1", "field 'c' must be a list"]),
])
def test_bad_rows_name_the_line_and_field(tmp_path, rows, needles):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    task = custom_task(path, "{q}", None if "c" in rows[0] else ["no", "yes"],
                       choices_field="c" if "c" in rows[0] else None, eval_path=path)
    with pytest.raises(UncurlError) as err:
        load_examples(task, "evaluation")
    for needle in needles:
        assert needle in str(err.value)


def test_custom_task_option_errors(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "a", "label": 0}])
    with pytest.raises(UncurlError, match="not both"):
        custom_task(path, "{q}", ["a", "b"], choices_field="c")
    with pytest.raises(UncurlError, match="--eval-file .*no such file"):
        resolve_task(str(path), template="{q}", eval_file=str(tmp_path / "none.jsonl"))
    with pytest.raises(UncurlError, match="--eval-file is for a .jsonl/.csv"):
        resolve_task("superglue-rte", eval_file=str(path))
    with pytest.raises(UncurlError, match="are for hf: datasets"):
        resolve_task("superglue-rte", calibration_split="train")


# --- task files -----------------------------------------------------------------------------


YAML_TASK = """\
name: sums
description: yes/no questions about numbers
template: "{q}\\nAnswer:"
choices: ["no", "yes"]
label_field: label
files:
  calibration: data/cal.jsonl
  evaluation: data/ev.jsonl
"""


def test_yaml_and_json_task_files_match_the_options(tmp_path, items):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "cal.jsonl", [{"q": r["q"], "label": r["gold"]} for r in items[:12]])
    write_jsonl(tmp_path / "data" / "ev.jsonl", [{"q": r["q"], "label": ["no", "yes"][r["gold"]]} for r in items[12:]])
    (tmp_path / "sums.yaml").write_text(YAML_TASK)
    import yaml

    (tmp_path / "sums.json").write_text(json.dumps(yaml.safe_load(YAML_TASK)))
    direct = custom_task(tmp_path / "data" / "cal.jsonl", "{q}\nAnswer:", ["no", "yes"], eval_path=tmp_path / "data" / "ev.jsonl")
    for spec in ("sums.yaml", "sums.json"):
        task = resolve_task(str(tmp_path / spec))
        assert task.name == "sums" and task.description == "yes/no questions about numbers"
        for split in ("calibration", "evaluation"):
            assert load_examples(task, split) == load_examples(direct, split)
    one = tmp_path / "one.yml"
    one.write_text("template: '{q}'\nchoices_field: c\nfile: data/cal.jsonl\n")
    assert resolve_task(str(one)).halve_local and resolve_task(str(one)).name == "one"


@pytest.mark.parametrize("text, needle", [
    ("template: '{q}'\nfile: a.jsonl\nhub: org/name\n", "exactly one of file, files or hub"),
    ("template: '{q}'\nfile: a.jsonl\nchoises: [a, b]\n", "unknown key(s) choises"),
    ("file: a.jsonl\n", "template is required"),
    ("template: '{q}'\nfiles: {calibration: a.jsonl}\n", "files must name both"),
    ("template: [unclosed\n", "is not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
    ("template: '{q}'\nfile: a.jsonl\nchoices: [no, yes]\n", "quote them"),
])
def test_bad_task_files_are_named(tmp_path, text, needle):
    (tmp_path / "t.yaml").write_text(text)
    res = run("eval", "--task", tmp_path / "t.yaml")
    assert res.exit_code == 2 and needle in " ".join(res.output.split()), res.output


def test_task_file_through_the_cli(tmp_path, items):
    write_jsonl(tmp_path / "all.jsonl", [{"q": r["q"], "label": r["gold"]} for r in items])
    (tmp_path / "t.yaml").write_text("template: '{q}\\nAnswer:'\nchoices: ['no', 'yes']\nfile: all.jsonl\n")
    res = run("eval", "--task", tmp_path / "t.yaml", "--model", "builtin:mixtral", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 10 and out["task"] == "t" and "disjoint" in out["split"]


# --- Hub datasets by name -------------------------------------------------------------------


def test_hub_dataset_reads_like_the_same_files(tmp_path, items):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"q": r["q"], "label": r["gold"]} for r in items[:12]])
    write_jsonl(folder / "validation.jsonl", [{"q": r["q"], "label": r["gold"]} for r in items[12:]])
    hub = resolve_task(f"hf:{folder}", template="{q}", choices=("no", "yes"))
    files = custom_task(folder / "train.jsonl", "{q}", ["no", "yes"], eval_path=folder / "validation.jsonl")
    for split in ("calibration", "evaluation"):
        assert load_examples(hub, split) == load_examples(files, split)
    same = resolve_task(f"hf:{folder}", template="{q}", choices=("no", "yes"), evaluation_split="train")
    cal, ev = load_examples(same, "calibration"), load_examples(same, "evaluation")
    assert len(cal) == len(ev) == 6 and not {e.prompt for e in cal} & {e.prompt for e in ev}


def test_hub_dataset_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    res = run("eval", "--task", "hf:nobody/no-such-dataset:cfg", "--template", "{q}", "--model", "builtin:mixtral")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "could not load nobody/no-such-dataset (cfg) split validation" in text
    assert time.perf_counter() - start < 60
    res = run("eval", "--task", "hf:nobody/x")
    assert res.exit_code == 2 and "pass --template" in res.output
    res = run("eval", "--task", "hf:", "--template", "{q}")
    assert res.exit_code == 2 and "expected hf:ORG/NAME" in res.output


# --- calibration mixes ----------------------------------------------------------------------


def test_mix_counts():
    assert mix_counts([3, 1], 12) == [9, 3]
    assert mix_counts([1, 1, 1], 10) == [4, 3, 3]
    assert mix_counts([100, 1], 4) == [3, 1]  # every part gets at least one
    with pytest.raises(UncurlError, match="fewer than"):
        mix_counts([1, 1, 1], 2)


def test_calibration_mix_is_the_parts_in_order(data_dir):
    opts = DataOptions(task="superglue-rte", data_dir=str(data_dir), samples=12, calibrate_on="superglue-rte=3,corpus=1")
    texts, info = calibration_texts(opts, seed=5)
    rte = load_examples(get_task("superglue-rte"), "calibration", data_dir, limit=9, seed=5)
    corpus = load_examples(get_task("corpus"), "calibration", data_dir, limit=3, seed=5)
    assert texts == [e.text for e in rte + corpus]
    assert [(p["name"], p["weight"], p["calibration_examples"]) for p in info["mix"]] == [
        ("superglue-rte", 3.0, 9), ("corpus", 1.0, 3)]
    assert info["mix"][0]["fingerprint"] == data_fingerprint(rte) and info["calibration_examples"] == 12


@pytest.mark.parametrize("spec, needle", [
    ("superglue-rte=0,corpus", "positive weight"), ("superglue-rte=x", "positive weight"),
    ("corpus,corpus", "twice"), ("nope=1,corpus=1", "unknown task 'nope'")])
def test_bad_mixes_are_refused(spec, needle, data_dir, tmp_path):
    res = run("prune", "--calibrate-on", spec, "--data-dir", data_dir, "--out", tmp_path / "o", *FAST)
    assert res.exit_code == 2 and needle in res.output, res.output


def test_mix_in_report_and_profile(tmp_path, data_dir):
    from uncurl.profile import Profile

    res = run("profile", "--data-dir", data_dir, "--calibrate-on", "superglue-rte=1,corpus=1",
              "--out", tmp_path / "p.safetensors", *FAST)
    assert res.exit_code == 0, res.output
    meta = Profile.load(tmp_path / "p.safetensors").meta["task"]
    assert [p["calibration_examples"] for p in meta["mix"]] == [6, 6]
    # a profile is reused by a run that calibrates on the same mix (another is refused: test_faults_inputs)
    res = run("prune", "--profile", tmp_path / "p.safetensors", "--calibrate-on", "superglue-rte=1,corpus=1",
              "--keep", 4, "--data-dir", data_dir, "--out", tmp_path / "o", *FAST)  # auto's fit reads the texts
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    assert report["task"]["mix"] == meta["mix"] and report["task"]["name"] == "superglue-rte+corpus"


# --- chat templates -------------------------------------------------------------------------


CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def test_chat_wrap_is_the_template_then_the_bare_answer():
    model, tok = build_tiny("mixtral")
    with pytest.raises(UncurlError, match="no chat template"):
        chat_wrap([Example("Q?", (" yes", " no"), 0)], tok)
    tok.chat_template = CHAT
    [wrapped] = chat_wrap([Example("Q?", (" yes", " no"), 0)], tok)
    assert wrapped == Example("<|user|>Q?<|end|><|assistant|>", ("yes", "no"), 0)


def test_chat_template_through_the_cli(tmp_path, tiny_dirs, data_dir):
    folder = tmp_path / "chat"
    shutil.copytree(tiny_dirs("mixtral"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    res = run("prune", "--model", folder, "--data-dir", data_dir, "--chat-template", "--eval", "--eval-limit", 4,
              "--keep", 4, "--out", tmp_path / "o", *FAST)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    assert report["task"]["chat_template"] is True and report["eval"]["before"]["chat_template"] is True
    assert report["options"]["chat_template"] is True and "--chat-template" in report["command"]
    model, tok = build_tiny("mixtral")
    tok.chat_template = CHAT
    rte = load_examples(get_task("superglue-rte"), "calibration", data_dir, limit=12, seed=0)
    assert report["task"]["fingerprint"] == data_fingerprint(chat_wrap(rte, tok))
    res = run("eval", "--data-dir", data_dir, "--chat-template", "--limit", 2)
    assert res.exit_code == 2 and "no chat template" in res.output


def test_bad_rows_and_unreachable_data_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    import uncurl.load

    def no_model(*a, **k):
        raise AssertionError("the data must be checked before the model is loaded")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    monkeypatch.setattr(uncurl.load, "load_model", no_model)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "a", "label": 0}] * 5 + [{"q": "b", "label": 7}] * 5)
    for command, extra in (("prune", ["--eval", "--out", tmp_path / "o"]), ("profile", ["--out", tmp_path / "p"]),
                           ("eval", [])):
        res = run(command, "--task", path, "--template", "{q}", "--choices", "no,yes", "--eval-file", path, *extra)
        assert res.exit_code == 2 and "line 6" in res.output and "field 'label'" in res.output, res.output
        res = run(command, "--task", "hf:nobody/nothing", "--template", "{q}", *extra)
        assert res.exit_code == 2 and "could not load nobody/nothing" in " ".join(res.output.split()), res.output
