"""Merging: hand-computed weighted averages, exact selection, router rows, identical experts."""

from __future__ import annotations

import pytest
import torch

from uncurl.adapters import ADAPTERS, expert_count, expert_id_names, find_moe_layers, per_expert_names, tail_rows
from uncurl.cluster import LayerPlan
from uncurl.load import build_tiny
from uncurl.merge import expert_targets, merge_tensor, remap_expert_ids, rewrite_model


def test_merge_tensor_equals_hand_computed_weighted_average():
    t = torch.randn(4, 3, 5)
    plan = LayerPlan(groups=((0, 2), (1,), (3,)), weights=((0.25, 0.75), (1.0,), (1.0,)))
    out = merge_tensor(t, plan.matrix(4))
    assert out.shape == (3, 3, 5)
    torch.testing.assert_close(out[0], 0.25 * t[0] + 0.75 * t[2])
    assert torch.equal(out[1], t[1]) and torch.equal(out[2], t[3])  # singletons: bit for bit


def test_merge_tensor_bf16_is_computed_in_fp32():
    t = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    m = torch.tensor([[1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    exact = t.double().mean(0)
    out = merge_tensor(t, m)
    assert out.dtype == torch.bfloat16
    # one rounding, to bf16 (half its 2^-7 spacing), plus float32's own error where the sum cancels
    assert ((out[0].double() - exact).abs() <= exact.abs() * 2**-8 + 2**-20).all()
    # bf16 arithmetic rounds after every step: its total error is clearly larger
    in_bf16 = t[0] * (1 / 3) + t[1] * (1 / 3) + t[2] * (1 / 3)
    assert (out[0].double() - exact).abs().sum() < 0.8 * (in_bf16.double() - exact).abs().sum()


def test_identical_experts_merge_to_that_expert():
    row = torch.randn(7, 9)
    t = row.expand(5, 7, 9).clone()
    plan = LayerPlan(groups=((0, 1, 2, 3, 4),), weights=((0.1, 0.2, 0.3, 0.15, 0.25),))
    torch.testing.assert_close(merge_tensor(t, plan.matrix(5))[0], row, rtol=0, atol=1e-6)


def test_router_rule_matrices():
    plan = LayerPlan(groups=((0, 3), (1, 2)), weights=((0.4, 0.6), (0.5, 0.5)))
    mean = plan.matrix(4)
    assert mean.tolist() == [[0.4, 0, 0, 0.6], [0, 0.5, 0.5, 0]]
    dom = plan.matrix(4, "dominant")
    assert dom.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]  # tie -> lowest index


@pytest.mark.parametrize("family", sorted(ADAPTERS))
@pytest.mark.parametrize("rule", ["mean", "dominant"])
def test_rewrite_applies_the_documented_functions(family, rule):
    model, _ = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    layers = find_moe_layers(model, adapter)
    e = layers[0].num_experts
    half = e // 2
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # routing biases start at zero: give them values a wrong merge would show
        for name, t in model.state_dict(keep_vars=True).items():
            if any(name in per_expert_names(layer, adapter)[1] for layer in layers) and not t.any():
                t.data.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
            if any(name in expert_id_names(layer, adapter) for layer in layers):  # hash tables: zeros too
                t.data.copy_(torch.randint(0, e, t.shape, generator=g).to(t.dtype))
    groups = tuple((i, i + 1) for i in range(0, e, 2))  # pairs stay inside routing groups
    weights = tuple((0.3, 0.7) for _ in groups)
    plans = {layer.name: LayerPlan(groups, weights) for layer in layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = rewrite_model(model, adapter, plans, router_rule=rule, merge="average")

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was modified"
    state = new.state_dict()
    for layer in layers:
        expert_names, router_names = per_expert_names(layer, adapter)
        assert expert_names and set(router_names) >= {f"{layer.name}.{adapter.router_attr}.{adapter.router_tensors[0]}"}
        for name in expert_names:
            old = before[name]
            want = torch.stack([0.3 * old[i] + 0.7 * old[i + 1] for i in range(0, e, 2)])
            torch.testing.assert_close(state[name], torch.cat([want, old[e:]]))
        for name in router_names:
            axis = adapter.expert_axis(name)
            old = before[name].movedim(axis, 0)
            if rule == "mean":
                want = torch.stack([0.3 * old[i] + 0.7 * old[i + 1] for i in range(0, e, 2)])
            else:
                want = old[1:e:2]  # the heavier member of each pair
            want = torch.cat([want, old[e:]])  # tail rows (shared, zero, skip slots) are copied
            torch.testing.assert_close(state[name], want.movedim(0, axis))
            assert state[name].shape[axis] in (half, half + tail_rows(model.config, adapter))
        for name in expert_id_names(layer, adapter):  # expert 2i and 2i+1 are now expert i
            assert torch.equal(state[name], before[name] // 2) and before[name].unique().numel() > half
    assert expert_count(new.config, adapter) == half


def test_expert_ids_are_remapped_through_the_plan_by_hand():
    """A hash-routing table (deepseek_v4's tid2eid) after a plan over 6 experts: groups {0, 3},
    {1}, {2, 5}; expert 4 is in no group and goes to the group whose new router row is closest
    to its own: group 1 (expert 1's row, which is expert 4's times 2)."""
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.9]])
    plan = LayerPlan(groups=((0, 3), (1,), (2, 5)), weights=((0.5, 0.5), (1.0,), (0.5, 0.5)))
    targets = expert_targets(plan, w)
    assert targets.tolist() == [0, 1, 2, 0, 1, 2]
    tid2eid = torch.tensor([[0, 4], [5, 1], [3, 2], [3, 0]], dtype=torch.int32)
    out = remap_expert_ids(tid2eid, targets)
    assert out.dtype == torch.int32 and out.tolist() == [[0, 1], [2, 1], [0, 2], [0, 0]]
    # a selection plan (K=E, singletons in order) leaves the table as it was
    same = LayerPlan(groups=tuple((i,) for i in range(6)), weights=((1.0,),) * 6)
    assert torch.equal(remap_expert_ids(tid2eid, expert_targets(same, w)), tid2eid)


def test_merging_identical_experts_leaves_outputs_unchanged(ids):
    """Mixtral normalises its top-k weights, so a layer whose experts are all equal computes that
    expert whatever the routing: merging any groups of them must not change the logits."""
    model, _ = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    layers = find_moe_layers(model, adapter)
    with torch.no_grad():
        for layer in layers:
            for p in layer.experts.parameters():
                p.copy_(p[0:1].expand_as(p))
    ref = model(ids).logits
    plans = {layer.name: LayerPlan(((0, 3, 5), (1, 2), (4,), (6, 7)), ((0.2, 0.5, 0.3), (0.5, 0.5), (1.0,), (0.9, 0.1)))
             for layer in layers}
    new = rewrite_model(model, adapter, plans, router_rule="mean", merge="average")
    torch.testing.assert_close(new(ids).logits, ref, rtol=0, atol=1e-5)


def test_keep_all_singletons_reproduces_logits_exactly(ids):
    model, _ = build_tiny("olmoe", seed=0)
    adapter = ADAPTERS["olmoe"]
    layers = find_moe_layers(model, adapter)
    plans = {layer.name: LayerPlan(tuple((i,) for i in range(8)), tuple((1.0,) for _ in range(8))) for layer in layers}
    new = rewrite_model(model, adapter, plans, router_rule="mean", merge="average")
    assert torch.equal(new(ids).logits, model(ids).logits)


def test_lower_top_k_is_written_to_config():
    model, _ = build_tiny("qwen3_moe", seed=0)
    adapter = ADAPTERS["qwen3_moe"]
    layers = find_moe_layers(model, adapter)
    plans = {layer.name: LayerPlan(((0,), (1,), (2,)), ((1.0,), (1.0,), (1.0,))) for layer in layers}
    new = rewrite_model(model, adapter, plans, top_k=1, router_rule="mean", merge="average")
    assert new.config.num_experts_per_tok == 1 and new.config.num_experts == 3
    assert find_moe_layers(new, adapter)[0].router.top_k == 1


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v4", "ernie4_5_moe", "longcat_flash"])
def test_rewrite_layer_is_what_rewrite_model_writes_and_touches_nothing(family):
    """One layer's tensors in, new tensors out (hash tables, an expert axis not first, tail rows),
    byte for byte what the whole-model rewrite puts in the new model; the inputs are not modified."""
    from uncurl.merge import layer_tensor_names, rewrite_layer

    model, _ = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    layers = find_moe_layers(model, adapter)
    e = layers[0].num_experts
    plans = {layer.name: LayerPlan(tuple((i, i + 1) for i in range(0, e, 2)), ((0.3, 0.7),) * (e // 2))
             for layer in layers}
    state = model.state_dict()
    new = rewrite_model(model, adapter, plans, router_rule="mean", merge="average").state_dict()
    for layer in layers:
        tensors = {n: state[n].clone() for n in layer_tensor_names(layer, adapter)}
        out = rewrite_layer(layer, tensors, plans[layer.name], adapter, tail=tail_rows(model.config, adapter))
        assert out.keys() == tensors.keys()
        for name, t in out.items():
            assert torch.equal(t, new[name]) and torch.equal(tensors[name], state[name]), name
        with pytest.raises(ValueError, match="not a per-expert tensor"):
            rewrite_layer(layer, {**tensors, "model.norm.weight": state["model.norm.weight"]}, plans[layer.name], adapter,
                          tail=tail_rows(model.config, adapter))
