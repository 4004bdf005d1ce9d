"""Step 3: decide, per MoE layer, which experts become one (pure functions on profile tensors).

    uncurl prune --method uncurl ...     # spectral clustering on router-logit similarity (default)
    uncurl prune --method frequency ...  # baseline: keep the K most-used experts, drop the rest

A decision is a ``LayerPlan``: K groups of original expert indices and, per group, the merge
weights (usage frequency of each member inside its group; uniform when no member was used).
Grouped routers (DeepSeek-V3's ``n_group``) cluster inside each routing group, K / n_group per
group, so every new expert stays in the routing group of its members.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UncurlError
from .profile import RouterStats

METHODS = ("uncurl", "frequency")
ROUTER_RULES = ("mean", "dominant")


@dataclass(frozen=True)
class LayerPlan:
    groups: tuple[tuple[int, ...], ...]  # K groups of original expert indices
    weights: tuple[tuple[float, ...], ...]  # merge weights, one per member, each group sums to 1

    @property
    def keep(self) -> int:
        return len(self.groups)

    def matrix(self, num_experts: int, rule: str = "mean") -> torch.Tensor:
        """[K, E] float64 map from old to new experts: new_k = sum_e M[k, e] * old_e.

        ``rule="mean"`` uses the merge weights; ``"dominant"`` puts 1 on each group's most-used
        member (ties: lowest index). For singleton groups both are a plain selection.
        """
        m = torch.zeros(self.keep, num_experts, dtype=torch.float64)
        for k, (members, weights) in enumerate(zip(self.groups, self.weights)):
            if rule == "dominant":
                m[k, members[int(np.argmax(weights))]] = 1.0
            else:
                m[k, list(members)] = torch.tensor(weights, dtype=torch.float64)
        return m


def validate_keep(num_experts: int, keep: int, top_k: int, n_group: int = 1, topk_group: int = 1) -> None:
    """Reject a --keep / --top-k pair the pruned model could not route with; runs before profiling."""
    if not 1 <= keep <= num_experts:
        raise UncurlError(f"--keep {keep} is out of range: this model has {num_experts} experts per layer (1..{num_experts})")
    if top_k > keep:
        raise UncurlError(
            f"--keep {keep} is below the router's top-k ({top_k}): each token would need more experts "
            f"than exist; keep at least {top_k}, or lower top-k explicitly with --top-k"
        )
    if top_k < 1:
        raise UncurlError(f"--top-k {top_k} must be at least 1")
    if n_group > 1:
        if keep % n_group or keep // n_group < 2:
            choices = [g * n_group for g in range(2, num_experts // n_group + 1)]
            raise UncurlError(
                f"--keep {keep} does not fit grouped routing (n_group={n_group}): the pruned model needs "
                f"the same number of experts, at least 2, in each group; accepted: {choices}"
            )
        if top_k > topk_group * (keep // n_group):
            raise UncurlError(
                f"--keep {keep} leaves {topk_group * (keep // n_group)} reachable experts per token "
                f"(topk_group={topk_group} groups of {keep // n_group}), fewer than top-k {top_k}"
            )


def affinity(stats: RouterStats) -> np.ndarray:
    """Router-logit similarity mapped to [0, 1]: (1 + Pearson correlation of logit columns) / 2."""
    return ((1.0 + stats.correlation()) / 2.0).numpy()


def spectral_groups(aff: np.ndarray, k: int, seed: int = 0) -> list[list[int]]:
    """Spectral clustering of experts on a precomputed affinity into exactly ``k`` groups."""
    n = aff.shape[0]
    if k >= n:
        return [[i] for i in range(n)]
    if k == 1:
        return [list(range(n))]
    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected" on near-zero affinities
        labels = SpectralClustering(
            n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
        ).fit_predict(aff)
    groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    return _exactly(groups, k, aff)


def _exactly(groups: list[list[int]], k: int, aff: np.ndarray) -> list[list[int]]:
    """Split the largest group until there are ``k`` (clustering may return fewer): the member
    least similar to the rest of its group leaves first."""
    groups = [g for g in groups if g]
    while len(groups) < k:
        big = max(groups, key=len)
        loner = min(big, key=lambda i: aff[i, [j for j in big if j != i]].mean())
        big.remove(loner)
        groups.append([loner])
    return sorted(groups)


def frequency_groups(frequency: np.ndarray, k: int) -> list[list[int]]:
    """The ``k`` most-used experts, each alone (ties: lower index first), in original order."""
    order = sorted(range(len(frequency)), key=lambda i: (-frequency[i], i))
    return sorted([i] for i in order[:k])


def plan_layer(stats: RouterStats, keep: int, method: str = "uncurl", n_group: int = 1, seed: int = 0) -> LayerPlan:
    """Groups and merge weights for one layer (within each routing group when ``n_group > 1``)."""
    if method not in METHODS:
        raise UncurlError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    e = stats.num_experts
    size, per_group = e // n_group, keep // n_group
    counts = stats.counts.numpy()
    aff = affinity(stats) if method == "uncurl" else None
    groups: list[list[int]] = []
    for g in range(n_group):
        block = list(range(g * size, (g + 1) * size))
        if method == "uncurl":
            local = spectral_groups(aff[np.ix_(block, block)], per_group, seed)
        else:
            local = frequency_groups(counts[block], per_group)
        groups += [[block[i] for i in members] for members in local]
    weights = []
    for members in groups:
        c = counts[members]
        weights.append(tuple((c / c.sum()).tolist() if c.sum() > 0 else [1.0 / len(members)] * len(members)))
    return LayerPlan(tuple(tuple(m) for m in groups), tuple(weights))
