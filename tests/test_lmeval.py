"""lm-evaluation-harness tasks (an optional extra): skipped unless lm_eval is installed, except the
message that says how to install it. Offline: local lm-eval task YAMLs over copies of ../shared/data."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from uncurl.cli import app
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.pipeline import DataOptions, run_eval
from uncurl.tasks import data_fingerprint, get_task, load_examples, resolve_task

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is an optional extra: pip install 'uncurl-moe[lm-eval]'")
runner = CliRunner()

RTE_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/superglue/rte/train.jsonl
    validation: {data}/superglue/rte/val.jsonl
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "{{{{premise}}}}\\nQuestion: {{{{hypothesis}}}} True or False?\\nAnswer:"
doc_to_target: "{{{{0 if label == 'entailment' else 1}}}}"
doc_to_choice: ["True", "False"]
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def lm_data(data_dir, tmp_path_factory):
    """A small copy of RTE laid out like ../shared/data, and lm-eval task files over it."""
    root = tmp_path_factory.mktemp("lm")
    rte = root / "data" / "superglue" / "rte"
    rte.mkdir(parents=True)
    for name, n in (("train.jsonl", 16), ("val.jsonl", 12)):
        lines = (data_dir / "superglue" / "rte" / name).read_text().splitlines()[:n]
        (rte / name).write_text("\n".join(lines) + "\n")
    (root / "rte.yaml").write_text(RTE_YAML.format(name="rte_small", data=root / "data"))
    only_eval = RTE_YAML.format(name="rte_eval_only", data=root / "data").replace("training_split: train\n", "")
    (root / "only" ).mkdir()
    (root / "only" / "rte.yaml").write_text(only_eval)
    return root


def test_without_lm_eval_the_message_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(UncurlError, match=r"pip install 'uncurl-moe\[lm-eval\]'"):
        resolve_task("lm-eval:somewhere/else.yaml")


@needs_lm_eval
def test_lm_eval_documents_are_the_registered_task(lm_data):
    task = resolve_task(f"lm-eval:{lm_data / 'rte.yaml'}")
    assert task.name == "lm-eval:rte_small" and task.num_choices is None
    for split in ("calibration", "evaluation"):
        assert load_examples(task, split) == load_examples(get_task("superglue-rte"), split, lm_data / "data")


@needs_lm_eval
def test_scores_match_lm_eval_itself(lm_data):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = build_tiny("mixtral", seed=0)
    ours = run_eval(model, tok, DataOptions(task=f"lm-eval:{lm_data / 'rte.yaml'}", eval_max_length=2048), None)
    theirs = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=2048),
                             tasks=["rte_small"], num_fewshot=0,
                             task_manager=TaskManager(include_path=str(lm_data), include_defaults=False))
    result = theirs["results"]["rte_small"]
    assert ours["n"] == 12
    assert ours["acc"] == pytest.approx(result["acc,none"], abs=1e-6)
    assert ours["acc_norm"] == pytest.approx(result["acc_norm,none"], abs=1e-6)


@needs_lm_eval
def test_eval_documents_only_are_halved(lm_data):
    task = resolve_task(f"lm-eval:{lm_data / 'only' / 'rte.yaml'}")
    cal, ev = load_examples(task, "calibration"), load_examples(task, "evaluation")
    assert len(cal) == len(ev) == 6 and "disjoint" in task.split_note
    assert not {data_fingerprint([e]) for e in cal} & {data_fingerprint([e]) for e in ev}


@needs_lm_eval
def test_lm_eval_task_through_the_cli(lm_data, data_dir, tmp_path):
    spec = f"lm-eval:{lm_data / 'rte.yaml'}"
    res = runner.invoke(app, ["prune", "--data-dir", str(data_dir), "--calibrate-on", f"{spec}=1,corpus=1",
                              "--task", spec, "--eval", "--keep", "4", "--out", str(tmp_path / "o"),
                              "--samples", "8", "--max-length", "64"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    assert [(p["name"], p["calibration_examples"]) for p in report["task"]["mix"]] == [("lm-eval:rte_small", 4), ("corpus", 4)]
    assert report["eval"]["before"]["task"] == "lm-eval:rte_small" and report["eval"]["before"]["n"] == 12
    res = runner.invoke(app, ["eval", "--task", f"lm-eval:{lm_data / 'nope.yaml'}"])
    assert res.exit_code == 2 and "no such lm-eval task file" in res.output
