"""Clustering and validation: pure functions on tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uncurl.cluster import frequency_groups, plan_layer, spectral_groups, validate_keep
from uncurl.errors import UncurlError
from uncurl.profile import RouterStats


def planted_stats(blocks: list[list[int]], tokens: int = 4000, seed: int = 0) -> RouterStats:
    """Router logits in which experts of one block share a latent signal (high correlation)."""
    g = torch.Generator().manual_seed(seed)
    e = sum(len(b) for b in blocks)
    logits = torch.zeros(tokens, e)
    for b in blocks:
        shared = torch.randn(tokens, 1, generator=g)
        logits[:, b] = shared + 0.1 * torch.randn(tokens, len(b), generator=g)
    stats = RouterStats(e)
    idx = logits.topk(2, dim=-1).indices
    stats.update(logits, torch.full((tokens, 2), 0.5), idx)
    return stats


def test_spectral_recovers_planted_groups():
    blocks = [[0, 3, 6], [1, 4], [2, 5, 7]]
    stats = planted_stats(blocks)
    aff = ((1 + stats.correlation()) / 2).numpy()
    assert spectral_groups(aff, 3, seed=0) == sorted(blocks)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8])
def test_spectral_returns_exactly_k_disjoint_groups(k):
    rng = np.random.default_rng(k)
    a = rng.random((8, 8))
    aff = (a + a.T) / 2
    np.fill_diagonal(aff, 1.0)
    groups = spectral_groups(aff, k, seed=0)
    assert len(groups) == k
    assert sorted(e for g in groups for e in g) == list(range(8))


def test_frequency_keeps_most_used_with_stable_ties():
    assert frequency_groups(np.array([5, 9, 1, 9, 0, 5]), 3) == [[0], [1], [3]]


def test_plan_weights_are_usage_shares_within_group():
    stats = planted_stats([[0, 1], [2, 3]])
    plan = plan_layer(stats, 2, "uncurl")
    c = stats.counts.numpy()
    assert plan.groups == ((0, 1), (2, 3))
    np.testing.assert_allclose(plan.weights[0], c[[0, 1]] / c[[0, 1]].sum())
    np.testing.assert_allclose(plan.weights[1], c[[2, 3]] / c[[2, 3]].sum())


def test_unused_group_gets_uniform_weights():
    stats = RouterStats(4)
    stats.update(torch.randn(10, 4), torch.ones(10, 1), torch.zeros(10, 1, dtype=torch.long))
    plan = plan_layer(stats, 1, "uncurl")
    assert plan.groups == ((0, 1, 2, 3),) and plan.weights == ((1.0, 0.0, 0.0, 0.0),)
    plan = plan_layer(stats, 3, "frequency")
    assert plan.groups == ((0,), (1,), (2,))  # zero counts: ties broken by index
    stats0 = RouterStats(2)
    assert plan_layer(stats0, 1, "uncurl").weights == ((0.5, 0.5),)


def test_grouped_routing_clusters_inside_each_group():
    # planted blocks cross routing-group boundaries on purpose: the plan must not follow them
    stats = planted_stats([[0, 4], [1, 5], [2, 6], [3, 7]])
    plan = plan_layer(stats, 4, "uncurl", n_group=2)
    assert len(plan.groups) == 4
    for members in plan.groups[:2]:
        assert all(e < 4 for e in members)
    for members in plan.groups[2:]:
        assert all(e >= 4 for e in members)
    freq = plan_layer(stats, 4, "frequency", n_group=2)
    assert [g[0] < 4 for g in freq.groups] == [True, True, False, False]


@pytest.mark.parametrize(
    "args, needle",
    [
        ((8, 0, 2), "--keep 0 is out of range"),
        ((8, 9, 2), "--keep 9 is out of range"),
        ((8, 1, 2), "below the router's top-k"),
        ((8, 3, 2, 2, 1), "does not fit grouped routing"),
        ((8, 2, 2, 2, 1), "does not fit grouped routing"),
        ((8, 4, 3, 2, 1), "fewer than top-k"),
        ((8, 4, 0), "must be at least 1"),
    ],
)
def test_validate_keep_rejects(args, needle):
    with pytest.raises(UncurlError, match=needle):
        validate_keep(*args)


def test_validate_keep_accepts():
    validate_keep(8, 8, 2)
    validate_keep(8, 2, 2)
    validate_keep(8, 4, 2, 2, 1)
    validate_keep(8, 1, 1)


def test_unknown_method():
    with pytest.raises(UncurlError, match="--method 'magic'"):
        plan_layer(RouterStats(4), 2, "magic")
