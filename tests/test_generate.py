"""Generative tasks (exact match of greedy generations, as lm-evaluation-harness scores generate_until):
lm-eval's filter and exact_match semantics on hand-worked gsm8k answers, greedy generation against
transformers' own ``generate``, a local task file, and (with lm-eval installed) equality with
lm-eval's simple_evaluate generation by generation."""

from __future__ import annotations

import importlib.util
import json

import pytest

from uncurl.errors import UncurlError
from uncurl.generate import Filter, Generation, apply_filter, exact_match, generate
from uncurl.load import build_tiny
from uncurl.pipeline import DataOptions, run_eval
from uncurl.tasks import resolve_task

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is an optional extra: pip install 'uncurl[lm-eval]'")

# gsm8k.yaml's (lm-eval 0.4.13) filters and exact_match options
GSM8K = Generation(
    until=("Question:", "</s>", "<|im_end|>"),
    filters=(Filter("strict-match", (("regex", (("regex_pattern", r"#### (\-?[0-9\.\,]+)"),)), ("take_first", ()))),
             Filter("flexible-extract", (("regex", (("group_select", -1), ("regex_pattern", r"(-?[$0-9.,]{2,})|(-?[0-9]+)"))),
                                         ("take_first", ())))),
    ignore_case=True, regexes_to_ignore=(",", r"\$", r"(?s).*#### ", r"\.$"))
GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("generation, strict, flexible, hit_strict, hit_flexible", [
    (" She sold 48 + 24 = 72 clips.\n#### 72", "72", "72", 1.0, 1.0),
    (" 48 + 24 = 72, so $1,072.", "[invalid]", "$1,072.", 0.0, 0.0),  # ignored: "," "$" and a final "." -> 1072
    (" 24 and then 72", "[invalid]", "72", 0.0, 1.0),  # flexible: the last match, its first non-empty group
    (" I do not know", "[invalid]", "[invalid]", 0.0, 0.0),
    (" #### 7,2", "7,2", "7,2", 1.0, 1.0),  # the commas go from both sides
])
def test_gsm8k_filters_and_exact_match(generation, strict, flexible, hit_strict, hit_flexible):
    answers = [apply_filter(f, generation) for f in GSM8K.filters]
    assert answers == [strict, flexible]
    assert [exact_match(a, [GOLD], GSM8K) for a in answers] == [hit_strict, hit_flexible]


def test_exact_match_options():
    plain = Generation()
    assert exact_match("Paris", ["paris"], plain) == 0.0
    assert exact_match("Paris", ["paris"], Generation(ignore_case=True)) == 1.0
    assert exact_match("Paris!", ["Paris"], Generation(ignore_punctuation=True)) == 1.0
    assert exact_match("Paris ", ["Paris"], plain) == 0.0  # no stripping unless a filter does it
    assert exact_match("Rome", ["Paris", "Rome"], plain) == 1.0  # several references: any one


def test_unknown_filter_is_refused():
    with pytest.raises(UncurlError, match="'majority_vote' is not one uncurl applies"):
        Generation(filters=(Filter("x", (("majority_vote", ()),)),))


def test_greedy_generation_is_transformers_generate_cut_at_the_stops():
    import torch

    model, tok = build_tiny("mixtral", seed=0)
    prompts = [f"Question: what is {a} plus {b}?\nAnswer:" for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1)]]
    gen = Generation(until=("hhh", "**"), max_gen_toks=12)
    ours = generate(model, tok, prompts, gen, max_length=256, batch_size=2)
    theirs = []
    for p in prompts:  # one at a time: no padding, KV cache
        ids = torch.tensor([tok(p)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        text = tok.decode(out, skip_special_tokens=True)
        for stop in ("hhh", "**", tok.decode([tok.eos_token_id])):
            text = text.split(stop)[0]
        theirs.append(text)
    assert ours == theirs
    assert any(len(t) < 12 for t in ours)  # a stop string did cut some


def _write_data(root, n=12):
    """An arithmetic set shaped like gsm8k (answer: working, then '#### X'); the references are letters the
    seed-0 tiny model writes in some of its generations (so that some match under each filter, some not)."""
    refs = ["H", "x", "x", "N", "x", "N", "q", "x", "a", "x", "x", "H"]
    rows = [{"question": f"what is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {refs[a]}"}
            for a, b in zip(range(n), range(3, 3 + n))]
    for name in ("train.jsonl", "test.jsonl"):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


LM_EVAL_YAML = """\
task: arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/train.jsonl
    test: {root}/test.jsonl
output_type: generate_until
training_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["hhh", "**"]
  do_sample: false
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ["(?s).*#### ", ","]
filter_list:
  - name: after-dot
    filter:
      - function: regex
        regex_pattern: "\\\\.(\\\\w)"
      - function: take_first
  - name: last-word-char
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "([a-zA-Z])"
      - function: take_first
"""

TASK_FILE = """\
name: arith
template: "Question: {question}\\nAnswer:"
files: {calibration: train.jsonl, evaluation: test.jsonl}
answer_field: answer
answer_regex: "\\\\.(\\\\w)"
until: ["hhh", "**"]
max_gen_toks: 12
ignore_case: true
regexes_to_ignore: ["(?s).*#### ", ","]
"""


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    _write_data(root)
    (root / "arith_gen.yaml").write_text(LM_EVAL_YAML.format(root=root))
    (root / "arith.yaml").write_text(TASK_FILE)
    return root


def test_a_task_file_with_an_answer_field_is_generative(gen_data):
    task = resolve_task(str(gen_data / "arith.yaml"))
    assert task.generative and task.num_choices == 0
    model, tok = build_tiny("mixtral", seed=0)
    out = run_eval(model, tok, DataOptions(task=str(gen_data / "arith.yaml"), eval_max_length=256), None,
                   per_example=True)
    assert out["n"] == 12 and out["exact_match_filter"] == "answer_regex"
    rows = out["examples"]
    # scored by hand from the generations: the character after the first '.', against the reference's letter
    refs = [json.loads(line)["answer"].split("#### ")[1] for line in (gen_data / "test.jsonl").read_text().splitlines()]
    import re

    by_hand = [float(bool(m := re.search(r"\.(\w)", r["generation"])) and m.group(1).lower() == ref.lower())
               for r, ref in zip(rows, refs)]
    assert out["exact_match"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-6)
    assert 0 < out["exact_match"] < 1  # some hit, some miss: the comparison means something


@pytest.mark.parametrize("body, message", [
    ("answer_regex: '(\\\\d)'\n", "name its reference answer with answer_field"),
    ("answer_field: answer\nchoices: [a, b]\n", "does not go with choices"),
    ("answer_field: answer\nmax_gen_toks: 0\n", "max_gen_toks must be"),
    ("answer_field: answer\nanswer_regex: '(('\n", "not a regular expression"),
])
def test_bad_generative_task_files(gen_data, tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"template: '{{question}}'\nfile: {gen_data / 'test.jsonl'}\n" + body)
    with pytest.raises(UncurlError, match=message):
        resolve_task(str(path))


def test_metric_exact_match_needs_a_generative_task(data_dir, gen_data, tmp_path):
    from typer.testing import CliRunner

    from uncurl.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["prune", "--data-dir", str(data_dir), "--task", "superglue-rte", "--metric", "exact_match",
                              "--max-drop", "1", "--keep", "4", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no reference answers" in res.output
    res = runner.invoke(app, ["prune", "--task", str(gen_data / "arith.yaml"), "--metric", "exact_match",
                              "--max-drop", "100", "--keep", "4", "--out", str(tmp_path / "g"), "--samples", "4",
                              "--max-length", "32", "--eval-max-length", "256", "--no-plots"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "g" / "report" / "report.json").read_text())
    assert report["gate"]["metric"] == "exact_match" and "exact_match" in report["eval"]["after"]


@needs_lm_eval
def test_generations_and_exact_match_equal_lm_eval(gen_data):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = build_tiny("mixtral", seed=0)
    ours = run_eval(model, tok, DataOptions(task=f"lm-eval:{gen_data / 'arith_gen.yaml'}", eval_max_length=256), None,
                    per_example=True)
    theirs = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=256),
                             tasks=["arith_gen"], num_fewshot=0, log_samples=True,
                             task_manager=TaskManager(include_path=str(gen_data), include_defaults=False))
    result, samples = theirs["results"]["arith_gen"], theirs["samples"]["arith_gen"]
    by_doc = {}
    for s in samples:  # one sample per document and filter
        by_doc.setdefault(s["doc_id"], {})[s["filter"]] = s
    assert ours["n"] == len(by_doc) == 12
    for i, row in enumerate(ours["examples"]):
        for name, sample in by_doc[i].items():
            assert row["generation"] == sample["resps"][0][0]
            assert row["answers"][name]["answer"] == sample["filtered_resps"][0]
            assert row["answers"][name]["exact_match"] == sample["exact_match"]
    for name, value in ours["exact_match_by_filter"].items():
        assert value == pytest.approx(result[f"exact_match,{name}"], abs=1e-6)
    assert all(0 < v < 1 for v in ours["exact_match_by_filter"].values())
