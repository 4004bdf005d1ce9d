"""Generation fidelity against the parent (fidelity.py): a hand-computed example, the stored tail's
bounds, the parent against itself and --keep E, and --metric acceptance in the gate and the sweep."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from uncurl.cli import app
from uncurl.fidelity import build_reference, paired, score
from uncurl.load import build_tiny, byte_tokenizer
from uncurl.sweep import threshold

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def summary(res) -> dict:
    return json.loads(res.stdout[res.stdout.index("{"):])


class TableLM(torch.nn.Module):
    """A 3-token language model whose next-token distribution after a prompt of ``prompt_len``
    tokens is ``tables[0]``, and after every later token ``tables[1]`` (before: uniform)."""

    def __init__(self, prompt_len: int, tables: list[list[float]]):
        super().__init__()
        self.prompt_len, self.tables = prompt_len, torch.tensor(tables).log()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, 3)
        for pos in range(self.prompt_len - 1, t):
            logits[:, pos] = self.tables[min(pos - (self.prompt_len - 1), 1)]
        return SimpleNamespace(logits=logits)


def test_a_hand_computed_two_token_example():
    tok = byte_tokenizer()
    prompt = "ab"  # two byte tokens
    parent = TableLM(2, [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])  # greedy: token 0, then token 2
    pruned = TableLM(2, [[0.3, 0.5, 0.2], [0.2, 0.2, 0.6]])
    ref = build_reference(parent, tok, [prompt], 2, max_length=64, batch_size=1)
    assert ref.continuations == [[0, 2]] and ref.tail_mass() == 0.0  # 3 tokens: all stored
    got = score(pruned, ref, batch_size=1, pad_id=0)
    # token 1: q's top is token 1, p's token 0; token 2: both token 2
    assert got["agreement"] == pytest.approx(0.5)
    # sum min(p, q): 0.3 + 0.3 + 0.2, then 0.1 + 0.1 + 0.6
    assert got["acceptance"] == pytest.approx((0.8 + 0.8) / 2, abs=1e-6)
    kl1 = 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.2)
    kl2 = 0.1 * math.log(0.1 / 0.2) * 2 + 0.8 * math.log(0.8 / 0.6)
    assert got["kl"] == pytest.approx((kl1 + kl2) / 2, abs=1e-6)
    assert got["nll"] == pytest.approx((-math.log(0.3) - math.log(0.6)) / 2, abs=1e-6)
    f = got["fidelity"]
    assert f["prompts"] == 1 and f["tokens"] == 2 and f["stored_tokens"] == 3 and f["exact"]
    itself = score(parent, ref, batch_size=1, pad_id=0)
    assert (itself["agreement"], itself["kl"]) == (1.0, 0.0) and itself["acceptance"] == pytest.approx(1.0)
    # paired: the pruned model minus the parent, prompt by prompt (one prompt: no standard error)
    assert paired(itself, got)["nll"]["diff"] == pytest.approx(got["nll"] - itself["nll"], abs=2e-6)


def test_a_stored_top_n_bounds_acceptance_and_kl_and_keeps_agreement_and_nll_exact():
    """Storing only the parent's 8 most likely tokens of 258: agreement and NLL exact; acceptance at
    most the parent's tail mass above the exact value; KL a lower bound of it."""
    parent, tok = build_tiny("mixtral", seed=1)
    pruned, _ = build_tiny("mixtral", seed=2)
    prompts = ["The cat sat on the", "Answer: yes or no?", "1, 2, 3,"]
    exact_ref = build_reference(parent, tok, prompts, 4, max_length=64, batch_size=2)
    top_ref = build_reference(parent, tok, prompts, 4, max_length=64, batch_size=2, stored=8)
    assert top_ref.continuations == exact_ref.continuations and top_ref.tail_mass() > 0.1  # a random model is flat
    exact = score(pruned, exact_ref, batch_size=2, pad_id=tok.pad_token_id)
    bound = score(pruned, top_ref, batch_size=2, pad_id=tok.pad_token_id)
    assert exact["fidelity"]["exact"] and not bound["fidelity"]["exact"]
    for m in ("agreement", "nll"):
        assert bound[m] == pytest.approx(exact[m], abs=1e-6)
    assert exact["acceptance"] - 1e-6 <= bound["acceptance"] <= exact["acceptance"] + bound["fidelity"]["tail"] + 1e-6
    assert 0 <= bound["kl"] <= exact["kl"] + 1e-6 and exact["kl"] > 0
    itself = score(parent, top_ref, batch_size=2, pad_id=tok.pad_token_id)  # coarsening never hides the parent
    assert (itself["agreement"], itself["kl"]) == (1.0, 0.0) and itself["acceptance"] == pytest.approx(1.0, abs=1e-6)


def test_the_parent_against_itself(data_dir):
    res = run("eval", "--model", "builtin:mixtral", "--parent", "builtin:mixtral", "--task", "superglue-rte",
              "--data-dir", data_dir, "--limit", 4, "--gen-tokens", 4, "--json")
    assert res.exit_code == 0, res.output
    m = summary(res)
    assert (m["agreement"], m["kl"]) == (1.0, 0.0) and m["acceptance"] == pytest.approx(1.0, abs=1e-6)
    assert m["fidelity"]["prompts"] == 4 and 4 <= m["fidelity"]["tokens"] <= 16 and m["fidelity"]["exact"]
    assert m["nll"] > 0 and m["paired"]["nll"] == {"diff": 0.0, "stderr": 0.0}
    assert m["parent"]["model"] == "builtin:mixtral" and m["drop"]["acceptance"] == 0.0


def test_keep_all_experts_gives_the_parent_and_acceptance_gates(tmp_path, data_dir):
    """prune --keep E: its checkpoint (loaded back) says what the parent says; --metric acceptance
    gates a real prune (exit 4 at a bound of 0), the drop being 100 x the acceptance lost."""
    common = ["--model", "builtin:mixtral", "--data-dir", data_dir, "--samples", 8, "--max-length", 64,
              "--eval-limit", 4, "--gen-tokens", 4, "--metric", "acceptance", "--max-drop", 0, "--no-plots", "--json"]
    res = run("prune", "--keep", 8, "--out", tmp_path / "k8", *common)
    assert res.exit_code == 0, res.output
    after = summary(res)["eval"]["after"]
    assert (after["agreement"], after["kl"]) == (1.0, 0.0) and after["acceptance"] == pytest.approx(1.0, abs=1e-6)
    res = run("prune", "--keep", 2, "--out", tmp_path / "k2", *common)
    assert res.exit_code == 4, res.output
    report = json.loads((tmp_path / "k2" / "report" / "report.json").read_text())
    ev, gate = report["eval"], report["gate"]
    assert gate["metric"] == "acceptance" and not gate["passed"]
    assert gate["drop"] == pytest.approx(100 * (ev["before"]["acceptance"] - ev["after"]["acceptance"]), abs=1e-3)
    assert ev["after"]["acceptance"] < 1 and ev["after"]["kl"] > 0
    assert ev["paired"]["acceptance"]["diff"] == pytest.approx(ev["after"]["acceptance"] - ev["before"]["acceptance"],
                                                               abs=2e-6)
    assert "| acceptance |" in (tmp_path / "k2" / "report" / "report.md").read_text()


def test_sweep_on_acceptance(tmp_path, data_dir):
    out = tmp_path / "sw"
    res = run("sweep", "--model", "builtin:mixtral", "--keep", "8,2", "--method", "ean,frequency", "--merge",
              "aligned", "--metric", "acceptance", "--tolerance", 0.5, "--gen-tokens", 4, "--data-dir", data_dir,
              "--samples", 8, "--max-length", 64, "--eval-limit", 4, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads((out / "sweep.json").read_text())
    assert s["metric"] == "acceptance" and s["unpruned"]["acceptance"] == pytest.approx(1.0, abs=1e-6)
    rows = {(r["label"], r["keep"]): r for r in s["results"]}
    for label in ("ean", "frequency"):
        assert rows[label, 8]["agreement"] == 1.0 and rows[label, 8]["drop"]["acceptance"] == pytest.approx(0, abs=1e-3)
        assert s["threshold"][label] == (2 if rows[label, 2]["drop"]["acceptance"] <= 0.5 else 8)
        assert s["threshold"][label] == threshold([r for r in s["results"] if r["label"] == label], "acceptance", 0.5)
    pair = next(p for p in s["paired"] if p["keep"] == 2)
    assert (pair["a"], pair["b"]) == ("ean", "frequency")
    assert pair["acceptance"]["diff"] == pytest.approx(
        rows["frequency", 2]["acceptance"] - rows["ean", 2]["acceptance"], abs=2e-6)
    assert "| 2 | ean | frequency |" in (out / "sweep.md").read_text()


def test_gen_tokens_must_be_positive(data_dir):
    res = run("eval", "--model", "builtin:mixtral", "--parent", "builtin:mixtral", "--data-dir", data_dir,
              "--gen-tokens", 0)
    assert res.exit_code == 2 and "--gen-tokens" in res.output


def test_layer_by_layer_gives_the_whole_model_figures():
    """The parent's reference and the scores, run one decoder layer at a time over every batch (an
    offloaded model's path), equal the whole-model forwards'."""
    from uncurl.adapters import ADAPTERS

    parent, tok = build_tiny("qwen3_moe", seed=1)
    pruned, _ = build_tiny("qwen3_moe", seed=2)
    adapter = ADAPTERS["qwen3_moe"]
    prompts = ["The cat sat on the", "Answer: yes or no?", "1, 2, 3,"]
    whole = build_reference(parent, tok, prompts, 3, max_length=64, batch_size=2)
    layered = build_reference(parent, tok, prompts, 3, max_length=64, batch_size=2, adapter=adapter)
    assert layered.continuations == whole.continuations
    for a, b in zip(layered.top_logp, whole.top_logp):
        assert torch.allclose(a, b, atol=1e-5)
    want = score(pruned, whole, batch_size=2, pad_id=tok.pad_token_id)
    got = score(pruned, whole, batch_size=2, pad_id=tok.pad_token_id, adapter=adapter)
    for m in ("agreement", "acceptance", "kl", "nll"):
        assert got[m] == pytest.approx(want[m], abs=1e-5)
