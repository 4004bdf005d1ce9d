"""Evaluation against known answers and a direct transformers computation; sweep; the CI gate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from uncurl import pipeline
from uncurl.cli import app
from uncurl.evaluate import drop, evaluate_examples
from uncurl.load import build_tiny, byte_tokenizer
from uncurl.sweep import threshold
from uncurl.tasks import Example, get_task, load_examples

runner = CliRunner()


class UniformLM(torch.nn.Module):
    """Every next token equally likely: log p = -log V for every token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_known_scores():
    tok = byte_tokenizer()
    v = 300
    examples = [Example("Is it so?\nAnswer:", (" True", " False"), 0),
                Example("Is it not?\nAnswer:", (" True", " False"), 1),
                Example("Pick:", (" a longer one", " short"), 1)]
    m = evaluate_examples(UniformLM(v), tok, examples, batch_size=2)
    # acc: fewer tokens wins (" True" 5 bytes < " False" 6; " short" < " a longer one"): right on 0 and 2
    assert m["acc"] == pytest.approx(2 / 3)
    # acc_norm: every choice scores -log V per character: a tie, the first choice wins: right on 0 only
    assert m["acc_norm"] == pytest.approx(1 / 3)
    assert m["loss"] == pytest.approx(math.log(v), rel=1e-6)
    n_tokens = sum(len(tok(e.text)["input_ids"]) - 1 for e in examples)
    assert m["tokens"] == n_tokens and m["n"] == 3


def direct_scores(model, tok, ex: Example):
    """Log-likelihood of each choice, and the mean NLL of prompt + gold, one sequence at a time."""
    out = []
    n_ctx = len(tok(ex.prompt)["input_ids"])
    for choice in ex.choices:
        ids = torch.tensor([tok(ex.prompt + choice)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        token_lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append((float(token_lp[n_ctx - 1 :].sum()), float(token_lp.sum()), token_lp.numel()))
    return out


def test_matches_a_direct_transformers_computation(data_dir):
    model, tok = build_tiny("qwen3_moe", seed=3)
    examples = load_examples(get_task("superglue-cb"), "evaluation", data_dir, limit=10, seed=0)
    got = evaluate_examples(model, tok, examples, batch_size=4)  # padded batches
    correct = correct_norm = 0
    nll = tokens = 0.0
    lm_eval_lengths = [len("True"), len("False"), len("Neither")]  # lm-eval's completion_len: no delimiter
    direct = [direct_scores(model, tok, ex) for ex in examples]
    for ex, scores in zip(examples, direct):
        ll = [s[0] for s in scores]
        norm = [s[0] / n for s, n in zip(scores, lm_eval_lengths)]
        correct += ll.index(max(ll)) == ex.gold
        correct_norm += norm.index(max(norm)) == ex.gold
        nll -= scores[ex.gold][1]
        tokens += scores[ex.gold][2]
    assert got["acc"] == pytest.approx(correct / len(examples))
    assert got["acc_norm"] == pytest.approx(correct_norm / len(examples))
    p, n = got["acc"], len(examples)
    assert got["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-6)  # lm-eval's formula
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert got == evaluate_examples(model, tok, examples, batch_size=1)  # padding does not matter
    # per example: each one's share of the loss is the direct computation's (for paired comparisons)
    rows = evaluate_examples(model, tok, examples, batch_size=4, per_example=True)["examples"]
    for row, ex, scores in zip(rows, examples, direct):
        _, full, n_tokens = scores[ex.gold]
        assert row["nll"] == pytest.approx(-full, rel=1e-4) and row["tokens"] == n_tokens


def test_one_token_choices_share_one_forward_row_and_score_as_alone():
    """Choices of one token each ("A"/"B"/"C" under a byte tokenizer) have the same inputs, so they are
    scored from one forward row (lm-eval's one-token cache); every score is still the direct one."""
    model, tok = build_tiny("mixtral", seed=5)
    examples = [Example(f"Question {i}: which one?", ("A", "B", "C"), i % 3) for i in range(5)]
    examples.append(Example("Longer answers:", (" yes", " no"), 0))  # several tokens: rows of their own
    rows = []
    forward = model.forward
    model.forward = lambda input_ids, **kw: (rows.append(input_ids.shape[0]), forward(input_ids=input_ids, **kw))[1]
    got = evaluate_examples(model, tok, examples, batch_size=3, per_example=True)["examples"]
    assert sum(rows) == 5 + 2  # one row per one-token question, one per multi-token choice
    for row, ex in zip(got, examples):
        direct = direct_scores(model, tok, ex)
        assert row["ll"] == pytest.approx([s[0] for s in direct], abs=1e-4)
        assert row["nll"] == pytest.approx(-direct[ex.gold][1], rel=1e-4)
        assert row["tokens"] == direct[ex.gold][2]


def test_text_only_examples_give_loss_only():
    tok = byte_tokenizer()
    m = evaluate_examples(UniformLM(260), tok, [Example("plain text here"), Example("and more")])
    assert "acc" not in m and m["loss"] == pytest.approx(math.log(260), rel=1e-6)


def test_drop_definition():
    before, after = {"acc": 0.70, "loss": 2.0}, {"acc": 0.655, "loss": 2.1}
    assert drop(before, after, "acc") == pytest.approx(4.5)
    assert drop(before, after, "loss") == pytest.approx(5.0)
    assert drop(before, after, "acc_norm") is None


def test_threshold_needs_every_larger_k_within_tolerance():
    rows = [{"keep": k, "drop": {"acc": d}} for k, d in ((6, 0.5), (4, 2.0), (2, 0.0))]
    assert threshold(rows, "acc", 1.0) == 6  # K=2 happens to pass, but K=4 already failed
    assert threshold(rows, "acc", 3.0) == 2
    assert threshold([{"keep": 6, "drop": {"acc": 5.0}}], "acc", 1.0) is None


def test_sweep_profiles_once_and_writes_results(tmp_path, data_dir, monkeypatch):
    calls = []
    real = pipeline.profile_model
    monkeypatch.setattr(pipeline, "profile_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "sw"
    res = runner.invoke(app, ["sweep", "--model", "builtin:olmoe", "--keep", "6,4,2", "--method", "uncurl,frequency",
                              "--data-dir", str(data_dir), "--samples", "8", "--eval-limit", "6", "--out", str(out),
                              "--keep-checkpoints", "--json"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    s = json.loads((out / "sweep.json").read_text())
    assert s["schema_version"] == 1 and s["unpruned"]["keep"] == 8
    assert [(r["method"], r["keep"]) for r in s["results"]] == [
        (m, k) for m in ("uncurl", "frequency") for k in (6, 4, 2)]
    for r in s["results"]:
        assert {"acc", "acc_norm", "loss", "drop", "params", "checkpoint"} <= set(r)
        assert (out / "checkpoints" / Path(r["checkpoint"]).name / "config.json").is_file()
    # a grouping is labelled with its merge and router rules; a pruning criterion by its name alone
    # the default merge, auto, ran as fit (named so); a criterion has a fitted cell then, and no other
    grouping = f"uncurl/fit/{pipeline.DEFAULT_ROUTER}"
    assert pipeline.DEFAULT_MERGE == "auto" and s["merge_requested"] == "auto"
    assert set(s["threshold"]) == {grouping, "frequency/fit"}
    assert (out / "sweep.png").stat().st_size > 0 and f"| {grouping} | 4 |" in (out / "sweep.md").read_text()


def prune_args(tmp_path, data_dir, *extra):
    return ["prune", "--model", "builtin:mixtral", "--keep", "4", "--data-dir", str(data_dir), "--samples", "8",
            "--eval-limit", "8", "--out", str(tmp_path / "out"), *extra]


def test_gate_fails_with_exit_4_after_writing_the_report(tmp_path, data_dir):
    # a bound of 0: any rise in the task loss fails it (halving a random model's experts raises it a little)
    res = runner.invoke(app, prune_args(tmp_path, data_dir, "--max-drop", "0", "--metric", "loss", "--json"))
    assert res.exit_code == 4, res.output
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["gate"]["passed"] is False and report["gate"]["metric"] == "loss"
    assert report["gate"]["drop"] > 0 and report["eval"]["after"]["loss"] > report["eval"]["before"]["loss"]
    assert set(report["eval"]) == {"before", "after", "drop"}
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["exit_code"] == 4 and summary["gate"]["passed"] is False
    assert "gate failed" in res.output


def test_gate_passes_with_exit_0(tmp_path, data_dir):
    res = runner.invoke(app, prune_args(tmp_path, data_dir, "--max-drop", "100", "--json"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["gate"]["passed"] is True and summary["exit_code"] == 0
    assert summary["eval"]["before"]["n"] == 8


def test_accuracy_gate_on_a_text_only_task_is_refused(tmp_path, data_dir):
    res = runner.invoke(app, prune_args(tmp_path, data_dir, "--task", "corpus", "--max-drop", "1"))
    assert res.exit_code == 2 and "use --metric loss" in res.output
    assert not (tmp_path / "out").exists()


def test_eval_command_json(data_dir):
    res = runner.invoke(app, ["eval", "--model", "builtin:gpt_oss", "--task", "superglue-copa", "--data-dir",
                              str(data_dir), "--limit", "6", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout[res.stdout.index("{"):])
    assert m["n"] == 6 and 0 <= m["acc"] <= 1 and m["loss"] > 0 and m["task"] == "superglue-copa"


def test_trailing_prompt_whitespace_moves_into_the_continuation():
    """lm-eval's _encode_pair: 'Answer: ' + 'yes' is scored as context 'Answer:' + continuation ' yes'."""
    tok = byte_tokenizer()
    from uncurl.evaluate import build_requests

    spaced, plain = (build_requests(tok, [Example(p, c, 0)], 64)[0] for p, c in
                     (("Answer: ", ("yes",)), ("Answer:", (" yes",))))
    assert spaced == plain and plain.n_cont == 4


def test_eval_scores_a_dense_model(tmp_path, data_dir):
    """`uncurl eval` needs no MoE: a dense Llama folder is scored like a direct computation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "dense"), "--task", "superglue-rte", "--data-dir",
                              str(data_dir), "--limit", "6", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout[res.stdout.index("{"):])
    examples = load_examples(get_task("superglue-rte"), "evaluation", data_dir, limit=6, seed=0)
    hits = []
    for ex in examples:
        ll = [s[0] for s in direct_scores(model, tok, ex)]
        hits.append(ll.index(max(ll)) == ex.gold)
    assert got["n"] == 6 and got["acc"] == pytest.approx(sum(hits) / 6)
    pruned = runner.invoke(app, ["prune", "--model", str(tmp_path / "dense"), "--data-dir", str(data_dir),
                                 "--out", str(tmp_path / "out")])
    assert pruned.exit_code == 2 and "'llama' is not supported" in pruned.output  # pruning still needs an MoE
