"""Methods: REAP/EAN equal a hand computation from the fused weights, the kept set is the K best,
the re-fitted router is a plain least-squares solution, and every method x merge x router
combination reloads clean."""

from __future__ import annotations

import inspect

import json

import numpy as np
import pytest
import torch
from conftest import representatives

from uncurl.adapters import ADAPTERS, FUSED_NON_GATED, TRANSPOSED_GATED, TRANSPOSED_INTERLEAVED, find_moe_layers
from uncurl.cluster import METHODS, LayerPlan, plan_layer
from uncurl.load import build_tiny
from uncurl.merge import MERGE_RULES, ROUTER_RULES, refit_solution, rewrite_model
from uncurl.profile import profile_model

TEXTS = ["The cat sat on the mat.", "Experts and routers, for a test.", "Short one.", "Paris is in France!"]


def forward_texts(model, tok, hooks) -> None:
    """A plain forward over TEXTS, one text at a time, with ``hooks`` attached; then removes them."""
    try:
        with torch.no_grad():
            for text in TEXTS:
                model(**tok([text], return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()


def hand_expert_output(experts, adapter, config, e: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) written out from the fused tensors, per the family's documented layout, then the
    norm all experts share where there is one (muse_spark's post_expert_norm)."""
    y = hand_ffn(experts, adapter, config, e, x)
    return experts.post_expert_norm(y) if hasattr(experts, "post_expert_norm") else y


def hand_ffn(experts, adapter, config, e: int, x: torch.Tensor) -> torch.Tensor:
    if adapter.neurons == TRANSPOSED_INTERLEAVED:  # gpt_oss: [H, 2I] interleaved gate/up, clamped GLU
        h = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = h[:, 0::2].clamp(max=config.swiglu_limit), h[:, 1::2].clamp(-config.swiglu_limit, config.swiglu_limit)
        mid = (up + 1) * gate * torch.sigmoid(gate * config.swiglu_alpha)
        return mid @ experts.down_proj[e] + experts.down_proj_bias[e]
    if adapter.neurons == TRANSPOSED_GATED:  # aria: [H, 2I] gate columns then up columns, down [I, H]
        gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        return (experts.act_fn(gate) * up) @ experts.down_proj[e]
    if adapter.neurons == FUSED_NON_GATED:
        return experts.act_fn(x @ experts.up_proj[e].T) @ experts.down_proj[e].T
    i = experts.gate_up_proj.shape[1] // 2  # [2I, H]: gate rows, then up rows
    gate, up = x @ experts.gate_up_proj[e][:i].T, x @ experts.gate_up_proj[e][i:].T
    if not hasattr(experts, "act_fn"):  # a clamped GLU (hy_v4, minimax_m3_vl_text): the family's own
        return experts._apply_gate(torch.cat([gate, up], dim=-1)) @ experts.down_proj[e].T
    act = experts.act_fn  # a module act(gate, up) (inkling2's softcaps), or act(gate) as in most families
    if isinstance(act, torch.nn.Module) and len(inspect.signature(act.forward).parameters) == 2:
        return experts.act_fn(gate, up) @ experts.down_proj[e].T
    return (experts.act_fn(gate) * up) @ experts.down_proj[e].T


def hand_scores(model, tok, adapter):
    """Per MoE layer: (counts, sum ||f||, sum g ||f||) from a plain forward, one text at a time."""
    layers = find_moe_layers(model, adapter)
    seen = {layer.name: [] for layer in layers}
    forward_texts(model, tok, [layer.experts.register_forward_pre_hook(
        lambda m, args, name=layer.name: seen[name].append([a.detach().clone() for a in args[:3]]))
        for layer in layers])
    out = {}
    for layer in layers:
        e_count = layer.num_experts
        counts, ean, reap = (np.zeros(e_count) for _ in range(3))
        for x, index, weights in seen[layer.name]:
            for t in range(x.shape[0]):
                for slot in range(index.shape[1]):
                    e = int(index[t, slot])
                    if adapter.tail_rows and (e >= e_count or float(weights[t, slot]) == 0):
                        continue  # a zero/skip slot after the experts (longcat_flash, zaya): not an expert
                    with torch.no_grad():
                        norm = float(hand_expert_output(layer.experts, adapter, model.config, e, x[t : t + 1]).norm())
                    counts[e] += 1
                    ean[e] += norm
                    reap[e] += float(weights[t, slot]) * norm
        out[layer.name] = counts, ean, reap
    return out


# uncurl's own per-expert loop ("eager") on every family; the model's own kernel ("grouped_mm", run
# by the recorder on the routed pairs) on one family per adapter layout, as the offload tests do
@pytest.mark.parametrize(("family", "experts"), [(f, "eager") for f in sorted(ADAPTERS)]
                         + [(f, "grouped_mm") for f in representatives()])
def test_reap_and_ean_equal_a_hand_computation(family, experts):
    adapter = ADAPTERS[family]
    if adapter.router_output != "topk":  # llama4's experts see pre-weighted inputs, not (index, weight)
        pytest.skip("test_profile.py checks what these routers count")
    model, tok = build_tiny(family, seed=0)
    try:
        model.set_experts_implementation(experts)
    except (ValueError, AttributeError):  # experts that are not switchable (longcat_flash)
        pytest.skip(f"{family} has no switchable experts")
    expected = hand_scores(model, tok, adapter)
    prof = profile_model(model, tok, adapter, TEXTS, batch_size=1)
    for name, (counts, ean, reap) in expected.items():
        stats = prof.layers[name]
        np.testing.assert_array_equal(stats.counts.numpy(), counts)
        if "ean_sum" in stats.missing:  # experts not switchable (longcat_flash): no REAP/EAN recorded
            continue
        np.testing.assert_allclose(stats.ean_sum.numpy(), ean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.reap_sum.numpy(), reap, rtol=1e-5, atol=1e-7)
        reap_score = np.where(counts > 0, reap / np.maximum(counts, 1), 0)
        for method, score in (("reap", reap_score), ("ean", ean), ("ean-mean", np.where(counts > 0, ean / np.maximum(counts, 1), 0))):
            if adapter.group_keys:  # grouped routing: the best within each routing group
                continue
            keep = 4
            plan = plan_layer(stats, keep, method)
            best = sorted(np.argsort(-score, kind="stable")[:keep].tolist())
            assert [g[0] for g in plan.groups] == best, method


def test_grouped_routers_keep_the_best_per_group():
    model, tok = build_tiny("deepseek_v3", seed=0)
    prof = profile_model(model, tok, ADAPTERS["deepseek_v3"], TEXTS, batch_size=2)
    stats = next(iter(prof.layers.values()))
    score = (stats.reap_sum / stats.counts.clamp_min(1)).numpy()
    plan = plan_layer(stats, 4, "reap", n_group=2)
    for g in range(2):
        block = list(range(4 * g, 4 * g + 4))
        assert sorted(e for (e,) in plan.groups if e in block) == sorted(sorted(block, key=lambda i: -score[i])[:2])


def test_random_is_seeded_and_centred_groups_around_reap_centres():
    model, tok = build_tiny("mixtral", seed=0)
    stats = next(iter(profile_model(model, tok, ADAPTERS["mixtral"], TEXTS).layers.values()))
    assert plan_layer(stats, 4, "random", seed=3) == plan_layer(stats, 4, "random", seed=3)
    assert plan_layer(stats, 4, "random", seed=3) != plan_layer(stats, 4, "random", seed=4)
    plan = plan_layer(stats, 3, "centred")
    reap = plan_layer(stats, 3, "reap")
    assert sorted(plan.centres) == [g[0] for g in reap.groups]  # centres = the K best by REAP
    assert sorted(e for g in plan.groups for e in g) == list(range(8))  # nobody dropped
    corr = stats.correlation().numpy()
    for group, centre in zip(plan.groups, plan.centres):
        for e in group:  # each non-centre sits with the centre it correlates with most
            if e != centre:
                assert corr[e, centre] == max(corr[e, c] for c in plan.centres)
        assert group[plan.dominant(plan.groups.index(group))] == centre


def router_logits(model, tok, adapter):
    """Each MoE layer's router logits on TEXTS, from hooks on a plain forward."""
    layers = find_moe_layers(model, adapter)
    seen = {layer.name: [] for layer in layers}
    forward_texts(model, tok, [layer.router.register_forward_hook(
        lambda m, a, out, name=layer.name: seen[name].append(out[0].detach().reshape(-1, out[0].shape[-1])))
        for layer in layers])
    return {name: torch.cat(v).double() for name, v in seen.items()}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_refit_is_the_least_squares_solution(family):
    model, tok = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    prof = profile_model(model, tok, adapter, TEXTS, batch_size=1)
    logits = router_logits(model, tok, adapter)
    plan = LayerPlan(((0, 5), (1,), (2, 3, 7), (4, 6)), ((0.5, 0.5), (1.0,), (0.2, 0.3, 0.5), (0.6, 0.4)))
    plans = {name: plan for name in prof.layers}
    new = rewrite_model(model, adapter, plans, router_rule="refit", stats=prof.layers, merge="average")
    bias = adapter.router_logit_bias
    for layer, new_layer in zip(find_moe_layers(model, adapter), find_moe_layers(new, adapter)):
        z = logits[layer.name]
        target = torch.stack([torch.logsumexp(z[:, list(g)], 1) for g in plan.groups], 1)
        design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1) if bias else z
        a = torch.linalg.lstsq(design, target, driver="gelsd").solution
        w = layer.router.weight.double()
        torch.testing.assert_close(new_layer.router.weight.double(), a[:8].T @ w, rtol=1e-4, atol=1e-5)
        if bias:
            b = getattr(layer.router, bias).double()
            torch.testing.assert_close(getattr(new_layer.router, bias).double(), a[:8].T @ b + a[8], rtol=1e-4, atol=1e-5)
        assert torch.equal(new_layer.router.weight[1], layer.router.weight[1])  # a singleton keeps its row


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_refit_reproduces_the_routing_when_nothing_is_merged(family, ids):
    model, tok = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    prof = profile_model(model, tok, adapter, TEXTS, batch_size=1)
    plan = LayerPlan(tuple((e,) for e in range(8)), tuple((1.0,) for _ in range(8)))
    for name, stats in prof.layers.items():  # the fit itself returns each expert's own logit
        a = refit_solution(stats.logit_rows(), plan, adapter.router_logit_bias is not None)
        torch.testing.assert_close(a[:8], torch.eye(8, dtype=a.dtype), atol=1e-8, rtol=0)
    new = rewrite_model(model, adapter, {n: plan for n in prof.layers}, router_rule="refit", stats=prof.layers, merge="average")
    with torch.no_grad():
        assert torch.equal(new(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])  # grouped routing; biases everywhere
def test_every_method_merge_and_router_reloads_clean(family, data_dir, tmp_path):
    from uncurl.sweep import SweepOptions, sweep

    s = sweep(SweepOptions(
        model=f"builtin:{family}", task="superglue-rte", data_dir=str(data_dir), samples=8, eval_limit=2,
        keeps=(4,), methods=tuple(METHODS), merges=tuple(MERGE_RULES), routers=tuple(ROUTER_RULES),
        keep_checkpoints=True, out=str(tmp_path / "sweep"), batch_size=4,
    ))
    criteria = [m for m, spec in METHODS.items() if spec.kind == "criterion"]
    groupings = [m for m in METHODS if m not in criteria]
    fitting = [m for m, rule in MERGE_RULES.items() if rule.fit]  # a criterion: once, and once per fitting rule
    assert len(s["results"]) == len(criteria) * (1 + len(fitting)) + len(groupings) * len(MERGE_RULES) * len(ROUTER_RULES)
    for row in s["results"]:  # every checkpoint was reloaded and checked by the sweep (verify_checkpoint)
        config = json.loads((tmp_path / "sweep" / "checkpoints" / row["checkpoint"].split("/")[-1] / "config.json").read_text())
        assert config[ADAPTERS[family].expert_count_key] == 4
        assert np.isfinite(row["loss"])


def test_the_report_names_the_method_that_ran_when_the_default_falls_back(data_dir, tmp_path):
    """llama4's experts are not switchable, so its profile has no expert-output norms: the default
    criterion cannot be computed and frequency runs instead; the report says both."""
    from uncurl.pipeline import DEFAULT_METHOD, PruneOptions, prune

    res = prune(PruneOptions(model="builtin:llama4_text", task="superglue-rte", keep=4, out=str(tmp_path / "o"),
                             data_dir=str(data_dir), samples=8, max_length=64))
    assert res.report["method"] == "frequency" and res.report["method_requested"] == DEFAULT_METHOD
    assert all(len(g) == 1 for layer in res.report["layers"] for g in layer["groups"])  # a criterion: kept alone
