"""Neuron alignment: the family's layout permutes an expert without changing it, weight matching
finds a permutation back exactly, and permuted copies merge back to the original model."""

from __future__ import annotations

import pytest
import torch

from uncurl.adapters import ADAPTERS, find_moe_layers, routing_names
from uncurl.cluster import LayerPlan, plan_layer
from uncurl.load import build_tiny
from uncurl.merge import match_neurons, permute_neurons, rewrite_model
from uncurl.profile import profile_model




def expert_tensors(layer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in layer.experts.named_parameters(recurse=False)}


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_layout_permutes_experts_without_changing_them_and_matching_undoes_it(family, ids):
    model, _ = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    first = find_moe_layers(model, adapter)[0]
    if not any(p.dim() == 3 and p.shape[0] == first.num_experts for p in first.experts.parameters()):
        pytest.skip(f"{family}: its experts are not fused [E, ...] tensors")
    with torch.no_grad():
        before = model(ids).logits
    g = torch.Generator().manual_seed(0)
    originals = {}
    for layer in find_moe_layers(model, adapter):
        tensors = expert_tensors(layer)
        originals[layer.name] = {n: t.clone() for n, t in tensors.items()}
        for e in range(layer.num_experts):
            one = {n: t[e] for n, t in tensors.items()}
            neurons = next(s for s in adapter.neurons if s.tensor in one)
            size = one[neurons.tensor].shape[neurons.axis] // (1 if neurons.packing == "single" else 2)
            for n, t in permute_neurons(one, adapter.neurons, torch.randperm(size, generator=g)).items():
                tensors[n][e] = t
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # the layout names the right axes
    for layer in find_moe_layers(model, adapter):
        tensors = expert_tensors(layer)
        for e in range(layer.num_experts):
            ref = {n: t[e] for n, t in originals[layer.name].items()}
            mine = {n: t[e] for n, t in tensors.items()}
            back = permute_neurons(mine, adapter.neurons, match_neurons(ref, mine, adapter.neurons))
            for n in ref:
                assert torch.equal(back[n], ref[n]), (layer.name, e, n)  # every neuron matched back


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_permuted_copies_merge_back_to_the_original_model(family, ids):
    """Experts 4..7 are neuron-permuted copies of 0..3 with duplicated router rows, top-1: merging
    each pair 8 -> 4 with aligned weights is the original model; averaging unaligned ones is not."""
    model, tok = build_tiny(family, seed=0, num_experts_per_tok=1)
    adapter = ADAPTERS[family]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in find_moe_layers(model, adapter):
            tensors = expert_tensors(layer)
            for e in range(4):
                one = {n: t[e] for n, t in tensors.items()}
                spec = next(s for s in adapter.neurons if s.tensor in one)
                size = one[spec.tensor].shape[spec.axis] // (1 if spec.packing == "single" else 2)
                for n, t in permute_neurons(one, adapter.neurons, torch.randperm(size, generator=g)).items():
                    tensors[n][e + 4] = t
            state = model.state_dict(keep_vars=True)
            for name in routing_names(layer, adapter).values():  # router rows and block routing biases
                rows = state[name].data.movedim(adapter.expert_axis(name), 0)
                rows[4:8] = rows[:4].clone()  # (tail rows after the 8 experts stay)
        reference = model(ids).logits
    prof = profile_model(model, tok, adapter, ["Some calibration text.", "And another one, longer."])
    for name, stats in prof.layers.items():  # UNCURL's clustering pairs each copy with its original
        assert set(plan_layer(stats, 4, "uncurl").groups) == {(0, 4), (1, 5), (2, 6), (3, 7)}, name
    plan = LayerPlan(((0, 4), (1, 5), (2, 6), (3, 7)), ((0.5, 0.5),) * 4)
    plans = {layer.name: plan for layer in find_moe_layers(model, adapter)}
    with torch.no_grad():
        aligned = rewrite_model(model, adapter, plans, merge="aligned", router_rule="mean")(ids).logits
        average = rewrite_model(model, adapter, plans, merge="average", router_rule="mean")(ids).logits
    torch.testing.assert_close(aligned, reference, rtol=0, atol=1e-5)
    assert (average - reference).abs().max() > 1e-3
