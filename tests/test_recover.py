"""--recover: distillation of the parent's logits into the pruned model's routers (and experts)."""

from __future__ import annotations

import pytest
import torch

from uncurl.adapters import ADAPTERS, find_moe_layers, routing_names
from uncurl.cluster import plan_layer
from uncurl.load import build_tiny
from uncurl.merge import rewrite_model
from uncurl.profile import profile_model
from uncurl.recover import kl_loss, recover

TEXTS = [f"The {w} sat on mat {i}, then it ran." for i, w in enumerate(["cat", "dog", "bird", "fish", "cow", "hen"] * 2)]


@pytest.fixture(scope="module")
def setup():
    """A tiny mixtral with peaked next-token distributions (its lm_head scaled up), pruned by EAN to 4 of 8."""
    model, tok = build_tiny("mixtral", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    adapter = ADAPTERS["mixtral"]
    profile = profile_model(model, tok, adapter, TEXTS, max_length=32)
    plans = {n: plan_layer(s, 4, "uncurl") for n, s in profile.layers.items()}
    return model, tok, adapter, plans


def _pruned(setup):
    model, tok, adapter, plans = setup
    return rewrite_model(model, adapter, plans, merge="aligned", router_rule="mean")


@torch.no_grad()
def _kl(student, teacher, tok):
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    return float(kl_loss(teacher(**batch).logits, student(**batch).logits, batch["attention_mask"].bool()))


def _run(setup, pruned, steps, **kw):
    model, tok, adapter, _ = setup
    return recover(pruned, model, adapter, tok, TEXTS, steps=steps, seed=0, batch_size=4, max_length=32,
                   router_lr=1e-2, **kw)


def test_recovery_lowers_the_kl_to_the_parent(setup):
    model, tok, _, _ = setup
    pruned = _pruned(setup)
    before = _kl(pruned, model, tok)
    rec = _run(setup, pruned, 24)
    curve = rec.report["loss_curve"]
    after = _kl(pruned, model, tok)
    assert before > 0.01  # pruning did cost something to recover
    assert after < 0.9 * before, (before, after)
    assert sum(curve[-6:]) < sum(curve[:6])  # the running loss fell too
    assert len(curve) == 24 and rec.report["seconds"] > 0


def test_recovery_is_deterministic_and_trains_only_the_routers(setup):
    model, tok, adapter, _ = setup
    a, b = _pruned(setup), _pruned(setup)
    start = {n: t.clone() for n, t in a.state_dict().items()}
    _run(setup, a, 6)
    _run(setup, b, 6)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)  # same seed, same bytes
    routers = {full for layer in find_moe_layers(a, adapter) for full in routing_names(layer, adapter).values()}
    changed = {n for n in sa if not torch.equal(sa[n], start[n])}
    assert changed and changed <= routers
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in model.state_dict().items())  # parent untouched


def test_recovery_with_experts_moves_the_experts_and_zero_steps_changes_nothing(setup):
    _, _, adapter, _ = setup
    p = _pruned(setup)
    start = {n: t.clone() for n, t in p.state_dict().items()}
    rec = _run(setup, p, 0)
    assert rec.report["loss_curve"] == [] and all(torch.equal(t, start[n]) for n, t in p.state_dict().items())
    _run(setup, p, 3, experts=True)
    changed = {n for n, t in p.state_dict().items() if not torch.equal(t, start[n])}
    assert any(".experts." in n for n in changed) and any(".gate." in n for n in changed)
    assert all(".experts." in n or ".gate." in n for n in changed)


def test_prune_with_recover_and_eval_reports_the_curve_and_the_verdict(tmp_path, data_dir):
    from uncurl.pipeline import PruneOptions, prune

    r = prune(PruneOptions(model="builtin:mixtral", task="superglue-rte", keep=4, method="ean", recover=2,
                           out=str(tmp_path / "o"), data_dir=str(data_dir), samples=4, max_length=64, eval=True,
                           eval_limit=4, eval_max_length=64, plots=False))
    rec = r.report["recover"]
    assert len(rec["loss_curve"]) == 2 and "kept" in rec and "task loss" in rec["note"]
    assert r.report["eval"]["merged"]["n"] == 4
    assert "## Recovery" in (tmp_path / "o" / "report" / "report.md").read_text()
    if not rec["kept"]:
        assert r.report["eval"]["after"] == r.report["eval"]["merged"]


def test_a_recovery_that_raised_the_task_loss_is_put_back_and_said(setup):
    from uncurl.pipeline import judge_recovery

    p = _pruned(setup)
    start = {n: t.clone() for n, t in p.state_dict().items()}
    rec = _run(setup, p, 2)
    assert any(not torch.equal(t, start[n]) for n, t in p.state_dict().items())
    evaluation = {"merged": {"loss": 1.0}, "after": {"loss": 1.5}}
    judge_recovery(rec, evaluation)
    assert rec.report["kept"] is False and "raised the task loss" in rec.report["note"]
    assert evaluation["after"]["loss"] == 1.0 and evaluation["recovered_discarded"]["loss"] == 1.5
    assert all(torch.equal(t, start[n]) for n, t in p.state_dict().items())  # the merged weights, bit for bit
