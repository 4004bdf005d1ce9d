"""Step 3: decide, per MoE layer, which experts become one (pure functions on profile statistics).

    uncurl prune --method uncurl ...     # spectral clustering on router-logit similarity (default)
    uncurl prune --method reap ...       # keep the K experts with the highest REAP score

Methods live in one registry, ``METHODS``: a *criterion* scores every expert from the profile and
keeps the K best, each alone (frequency, reap, ean, ean-mean, random); a *grouping* returns K
groups of experts (uncurl, uncurl-cosine, centred). Adding a method is one decorated function.

A decision is a ``LayerPlan``: K groups of original expert indices, per group the merge weights
(usage frequency of each member inside its group; uniform when no member was used) and the
group's reference member (its most-used one, or the centre a method chose). Grouped routers
(DeepSeek-V3's ``n_group``) are planned inside each routing group, K / n_group per group, so every
new expert stays in the routing group of its members.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import UncurlError
from .options import DEFAULT_METHOD
from .stats import LayerStats


@dataclass(frozen=True)
class LayerPlan:
    groups: tuple[tuple[int, ...], ...]  # K groups of original expert indices
    weights: tuple[tuple[float, ...], ...]  # merge weights, one per member, each group sums to 1
    centres: tuple[int, ...] | None = None  # each group's reference member; default: its most used

    @property
    def keep(self) -> int:
        return len(self.groups)

    def dominant(self, k: int) -> int:
        """Position (within group ``k``) of its reference member: the chosen centre, else the most
        used member (ties: lowest index)."""
        if self.centres is not None:
            return self.groups[k].index(self.centres[k])
        return int(np.argmax(self.weights[k]))

    def matrix(self, num_experts: int, rule: str = "mean") -> torch.Tensor:
        """[K, E] float64 map from old to new experts: new_k = sum_e M[k, e] * old_e.

        ``rule="mean"`` uses the merge weights; ``"dominant"`` puts 1 on each group's reference
        member. For singleton groups both are a plain selection.
        """
        m = torch.zeros(self.keep, num_experts, dtype=torch.float64)
        for k, (members, weights) in enumerate(zip(self.groups, self.weights)):
            if rule == "dominant":
                m[k, members[self.dominant(k)]] = 1.0
            else:
                m[k, list(members)] = torch.tensor(weights, dtype=torch.float64)
        return m


@dataclass(frozen=True)
class Method:
    """One --method: ``select(stats, block, k, seed)`` returns k groups of experts of ``block`` (a
    routing group's expert indices), as lists of positions in ``block``."""

    name: str
    kind: str  # "criterion" (keeps K experts, each alone) or "grouping" (K groups to merge)
    select: Callable[[LayerStats, list[int], int, int], list[list[int]]]
    help: str
    centred: bool = False  # groups carry a chosen centre (the first member of each group)
    calibration: bool = True  # False: ranked from the weights alone, so no calibration pass runs
    weigh: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # data-free: expert tensors -> [E]


METHODS: dict[str, Method] = {}


def method(name: str, kind: str, help: str, centred: bool = False):
    def register(fn):
        METHODS[name] = Method(name, kind, fn, help, centred)
        return fn

    return register


def criterion(name: str, help: str):
    """Register a pruning criterion: ``score(stats) -> [E]``; the K best-scoring experts are kept."""

    def register(score):
        def select(stats, block, k, seed):
            return best(score(stats, seed)[block], k)

        METHODS[name] = Method(name, "criterion", select, help)
        return score

    return register


def weight_criterion(name: str, help: str):
    """Register a data-free pruning criterion: ``weigh(tensors) -> [E]`` scores every expert of a
    layer from its weight matrices alone ({name: [E, ...]}, expert axis first), the K best are kept.
    Such a method needs no calibration pass (``Method.calibration`` is False): the pipeline puts the
    scores in each layer's statistics (``LayerStats.scores[name]``) instead of profiling."""

    def register(weigh):
        def select(stats, block, k, seed):
            if name not in stats.scores:
                raise UncurlError(f"--method {name} scores the weights; these statistics carry no {name} scores")
            return best(stats.scores[name].numpy()[block], k)

        METHODS[name] = Method(name, "criterion", select, help, calibration=False, weigh=weigh)
        return weigh

    return register


def needs_calibration(methods) -> bool:
    """Whether any of ``methods`` (names) ranks experts from calibration statistics."""
    return any(get_method(m).calibration for m in methods)


def method_names(kind: str | None = None) -> list[str]:
    return [n for n, m in METHODS.items() if kind is None or m.kind == kind]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UncurlError(f"--method {name!r} is not one of {', '.join(METHODS)}") from None


def best(scores: np.ndarray, k: int) -> list[list[int]]:
    """The ``k`` highest scores, each alone (ties: lower index first), in original order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted([i] for i in order[:k])


def _per_token(total: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))


@criterion("frequency", "keep the K experts chosen most often (top-k selections on the task)")
def _frequency(stats: LayerStats, seed: int) -> np.ndarray:
    return stats.counts.numpy()


@criterion("reap", "keep the K experts with the highest REAP score: mean over the tokens routed to "
                   "j of gate x ||expert output|| (Cerebras REAP)")
def _reap(stats: LayerStats, seed: int) -> np.ndarray:
    return _per_token(stats.require("reap_sum", "--method reap"), stats.counts).numpy()


@criterion("ean", "keep the K experts with the largest summed output norm over their tokens (EAN)")
def _ean(stats: LayerStats, seed: int) -> np.ndarray:
    return stats.require("ean_sum", "--method ean").numpy()


@criterion("ean-mean", "EAN divided by the expert's token count (mean output norm; ignores frequency)")
def _ean_mean(stats: LayerStats, seed: int) -> np.ndarray:
    return _per_token(stats.require("ean_sum", "--method ean-mean"), stats.counts).numpy()


@criterion("random", "keep K experts drawn at random (seeded by --seed): the floor any method must beat")
def _random(stats: LayerStats, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(stats.num_experts)


@weight_criterion("aimer", "data-free, no calibration pass: keep the K experts whose weights have the LOWEST "
                          "mean |w| / RMS(w) over their gate/up and down matrices (AIMER, arXiv 2603.18492: it "
                          "prunes the highest; a low ratio means heavy-tailed weights)")
def _aimer(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """-(mean |w| / sqrt(mean w^2)) per expert over all its matrices together (AIMER's score negated:
    its reference code sorts descending and prunes the first experts, so the lowest ratios stay)."""
    mats = [t.flatten(1).double() for t in tensors.values()]
    n = sum(m.shape[1] for m in mats)
    abs_mean = sum(m.abs().sum(1) for m in mats) / n
    rms = (sum(m.square().sum(1) for m in mats) / n).sqrt()
    return -torch.where(rms > 0, abs_mean / rms.clamp_min(1e-300), torch.zeros_like(rms))


# ---- super experts (Su et al. 2025, arXiv 2507.23279; REAP's get_super_expert_indices) -----------

SUPER_QUANTILE, SUPER_FRACTION, SUPER_LAYERS = 0.995, 0.1, 0.75


def super_experts(peaks: dict[str, torch.Tensor], order: dict[str, int]) -> tuple[dict[str, list[int]], float]:
    """REAP's rule on the per-expert peaks |f_j(x)_i| (``peaks``: layer name -> [E]; ``order``: layer
    name -> its index): an expert is a super expert when its peak is above the 99.5th percentile of
    all layers' per-expert peaks and above a tenth of the largest, in the first 75% of the MoE layers
    (REAP leaves the last quarter out: outliers there shape the output, not the massive activations).
    The rule is relative: unless the largest peak ties, it always marks the largest peak of those layers.
    Returns ({layer name: [experts]} of the layers with any, the threshold)."""
    names = sorted(peaks, key=lambda n: order[n])
    if not names:
        return {}, float("inf")
    flat = torch.cat([peaks[n].double().reshape(-1) for n in names])
    threshold = max(torch.quantile(flat, SUPER_QUANTILE).item(), flat.max().item() * SUPER_FRACTION)
    found = {n: torch.nonzero(peaks[n] > threshold).reshape(-1).tolist() for n in names[: int(len(names) * SUPER_LAYERS)]}
    return {n: e for n, e in found.items() if e}, threshold


def validate_keep(num_experts: int, keep: int, top_k: int, n_group: int = 1, topk_group: int = 1, *,
                  top_k_from: str = "--top-k", experts_from: str = "") -> None:
    """Reject a --keep / --top-k pair the pruned model could not route with; runs before profiling.
    ``top_k_from``: what set ``top_k`` (``--top-k``, or the config key when no flag was given);
    ``experts_from``: the config key of the expert count, named in messages when given."""
    experts = f"{num_experts} experts per layer" + (f" ({experts_from})" if experts_from else "")
    if not 1 <= keep <= num_experts:
        raise UncurlError(f"--keep {keep} is out of range: this model has {experts} (1..{num_experts})")
    if top_k < 1:
        raise UncurlError(f"{top_k_from} {top_k} must be at least 1")
    if top_k > keep:
        own = "" if top_k_from == "--top-k" else f", {top_k_from}"
        raise UncurlError(
            f"--keep {keep} is below the router's top-k ({top_k}{own}): each token would need more experts "
            f"than exist; keep at least {top_k}, or lower top-k explicitly with --top-k"
        )
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


SIMILARITIES = {
    "pearson": lambda stats: stats.correlation(),
    "cosine": lambda stats: stats.cosine(),
}


def affinity(stats: LayerStats, similarity: str = "pearson") -> np.ndarray:
    """Router-logit similarity of expert columns over the task's tokens, mapped to [0, 1] as (1+S)/2."""
    return ((1.0 + SIMILARITIES[similarity](stats)) / 2.0).numpy()


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
    return best(frequency, k)


@method("uncurl", "grouping", "spectral clustering on the Pearson correlation of router-logit columns "
                              "(UNCURL; centring removes each expert's mean logit, which the plain cosine "
                              "lets dominate)")
def _uncurl(stats, block, k, seed):
    return spectral_groups(affinity(stats)[np.ix_(block, block)], k, seed)


@method("uncurl-cosine", "grouping", "spectral clustering on the plain cosine of router-logit columns "
                                     "(the UNCURL paper's form)")
def _uncurl_cosine(stats, block, k, seed):
    return spectral_groups(affinity(stats, "cosine")[np.ix_(block, block)], k, seed)


@method("centred", "grouping", "the K best experts by REAP are centres; every other expert joins the "
                               "centre whose router logits correlate most with its own (REAM-style), and "
                               "the centre is the group's reference member", centred=True)
def _centred(stats, block, k, seed):
    centres = [g[0] for g in best(_reap(stats, seed)[block], k)]
    aff = affinity(stats)[np.ix_(block, block)]
    groups = {c: [c] for c in centres}
    for i in range(len(block)):
        if i not in groups:
            groups[max(centres, key=lambda c: (aff[i, c], -c))].append(i)
    return [groups[c] for c in sorted(centres)]  # the centre first in each group


def check_protected(protect, keep: int, num_experts: int, n_group: int = 1, where: str = "this layer") -> None:
    """Raise unless the experts ``protect`` fit in ``keep`` (in each routing group: ``keep // n_group``)."""
    size, per_group = num_experts // n_group, keep // n_group
    for g in range(n_group):
        mine = sorted(e for e in protect if g * size <= e < (g + 1) * size)
        if len(mine) > per_group:
            group = f" in routing group {g}" if n_group > 1 else ""
            raise UncurlError(f"--protect-super-experts: {where} has {len(mine)} super experts{group} ({mine}), more "
                              f"than --keep {keep} keeps ({per_group}{' per group' if n_group > 1 else ''}); keep "
                              f"at least {len(mine) * n_group}, or leave protection off")


def plan_layer(stats: LayerStats, keep: int, method: str = DEFAULT_METHOD, n_group: int = 1, seed: int = 0,
               protect=()) -> LayerPlan:
    """Groups, merge weights and centres for one layer (within each routing group when ``n_group > 1``).

    ``protect``: experts (super experts) that are kept as they are, each its own group and counted
    within ``keep``; the method plans the rest of each routing group into the groups left."""
    spec = get_method(method)
    e = stats.num_experts
    size, per_group = e // n_group, keep // n_group
    counts = stats.counts.numpy()
    protect = set(protect)
    check_protected(protect, keep, e, n_group)
    groups: list[list[int]] = []
    for g in range(n_group):
        block = list(range(g * size, (g + 1) * size))
        kept = [[i] for i in block if i in protect]
        rest = [i for i in block if i not in protect]
        left = per_group - len(kept)
        groups += kept
        if left and rest:
            groups += [[rest[i] for i in members] for members in spec.select(stats, rest, left, seed)]
    if protect:
        groups = sorted(groups, key=min)  # protected experts among the rest, in original order
    centres = tuple(members[0] for members in groups) if spec.centred else None
    groups = [sorted(members) for members in groups]
    weights = []
    for members in groups:
        c = counts[members]
        weights.append(tuple((c / c.sum()).tolist() if c.sum() > 0 else [1.0 / len(members)] * len(members)))
    return LayerPlan(tuple(tuple(m) for m in groups), tuple(weights), centres)
