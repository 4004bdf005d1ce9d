"""The statistics a profile holds: named per-layer accumulators that update online and combine.

    uncurl profile --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte.profile

Statistics are named accumulators in ``STATISTICS`` (a registry): each declares its shape, its
source (router or experts) and an in-place update, and is accumulated online per MoE layer in
float64, so memory does not grow with the number of calibration tokens. Nothing here knows the
model: the drivers (``profile.profile_model`` over the whole model, and the ones to come) hand
batches to ``LayerStats``.

A profile is a safetensors file with the model id, task, data fingerprint and versions in its
metadata; ``prune --profile FILE`` reuses it, and a file of an older schema is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import UncurlError

PROFILE_SCHEMA = 2
SAMPLE_TOKENS = 4096  # router-logit rows kept per layer (a seeded uniform sample) for --router refit


@dataclass
class RouterBatch:
    """What a router hook sees, padding removed: logits [N, E], top-k weights and indices [N, k]."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


@dataclass
class ExpertBatch:
    """What the recording experts see, one entry per (token, chosen expert) pair, padding removed."""

    expert: torch.Tensor  # [S] expert index
    gate: torch.Tensor  # [S] the weight the family applied to this expert's output
    norm: torch.Tensor  # [S] ||f_j(x)||_2 of the expert's output (before the gate)


@dataclass(frozen=True)
class Statistic:
    """A named per-layer accumulator: ``update(stats, acc, batch)`` adds one batch in place."""

    name: str
    shape: Callable[[int], tuple[int, ...]]  # from the expert count E
    source: str  # "router" (RouterBatch) or "experts" (ExpertBatch)
    update: Callable[["LayerStats", torch.Tensor, object], None]
    doc: str
    fill: float = 0.0


STATISTICS: dict[str, Statistic] = {}


def statistic(name: str, shape, source: str, doc: str, fill: float = 0.0):
    """Register an accumulator: a new statistic is one decorated function here."""

    def register(update):
        STATISTICS[name] = Statistic(name, shape, source, update, doc, fill)
        return update

    return register


def _vec(e: int) -> tuple[int, ...]:
    return (e,)


@statistic("counts", _vec, "router", "times each expert was in a token's top-k (frequency)")
def _counts(stats, acc, b: RouterBatch):
    acc += torch.bincount(b.indices.reshape(-1), minlength=acc.numel()).to(acc)


@statistic("mass", _vec, "router", "sum of the routing weights each expert received")
def _mass(stats, acc, b: RouterBatch):
    acc.index_add_(0, b.indices.reshape(-1), b.weights.reshape(-1).to(acc))


@statistic("logit_sum", _vec, "router", "sum of router logits")
def _logit_sum(stats, acc, b: RouterBatch):
    acc += b.logits.sum(0)


@statistic("gram", lambda e: (e, e), "router", "sum over tokens of logits^T logits (covariance, cosine)")
def _gram(stats, acc, b: RouterBatch):
    acc += b.logits.T @ b.logits


@statistic("ean_sum", _vec, "experts", "sum of ||f_j(x)|| over the tokens routed to j (EAN)")
def _ean_sum(stats, acc, b: ExpertBatch):
    acc.index_add_(0, b.expert, b.norm)


@statistic("reap_sum", _vec, "experts", "sum of g_j(x) ||f_j(x)|| over the tokens routed to j (REAP)")
def _reap_sum(stats, acc, b: ExpertBatch):
    acc.index_add_(0, b.expert, b.gate * b.norm)


@statistic("logit_sample", lambda e: (SAMPLE_TOKENS, e + 1), "router",
           "a seeded uniform sample of tokens' router logits (column 0: sort key; inf = empty)", fill=float("inf"))
def _logit_sample(stats, acc, b: RouterBatch):
    # priority sampling: every token draws a uniform key; the SAMPLE_TOKENS smallest keys are a
    # uniform sample without replacement of all tokens seen, whatever the batch sizes
    keys = torch.rand(b.logits.shape[0], generator=stats.generator, dtype=torch.float64).to(acc.device)
    rows = torch.cat([acc, torch.cat([keys[:, None], b.logits], 1)])
    acc.copy_(rows[torch.argsort(rows[:, 0])[: acc.shape[0]]])


class LayerStats:
    """The accumulators of one MoE layer (float64), by statistic name; see ``STATISTICS``."""

    def __init__(self, num_experts: int, tokens: int = 0, seed: int = 0, **tensors: torch.Tensor):
        self.num_experts, self.tokens = num_experts, tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, spec in STATISTICS.items():
            given = tensors.get(name)
            self.tensors[name] = (given.to(torch.float64) if given is not None
                                  else torch.full(spec.shape(num_experts), spec.fill, dtype=torch.float64))
        self.missing = {name for name in STATISTICS if name not in tensors} if tensors else set()

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    def require(self, name: str, why: str) -> torch.Tensor:
        if name in self.missing:
            raise UncurlError(f"{why} needs the profile statistic {name!r}, which this profile lacks; "
                              f"profile again with this version of uncurl")
        return self.tensors[name]

    def _add(self, source: str, batch) -> None:
        for name, spec in STATISTICS.items():
            if spec.source == source:
                acc = self.tensors[name]
                if acc.device != batch_device(batch):
                    acc = self.tensors[name] = acc.to(batch_device(batch))
                spec.update(self, acc, batch)

    def update(self, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        """Add a router batch: logits [N, E], top-k routing weights [N, k] and expert indices [N, k]."""
        self.tokens += logits.shape[0]
        self._add("router", RouterBatch(logits.detach().to(torch.float64), weights.detach(),
                                        indices.detach().long()))

    def update_experts(self, expert: torch.Tensor, gate: torch.Tensor, norm: torch.Tensor) -> None:
        self._add("experts", ExpertBatch(expert.long(), gate.detach().to(torch.float64),
                                         norm.detach().to(torch.float64)))

    def cpu(self) -> "LayerStats":
        self.tensors = {k: v.cpu() for k, v in self.tensors.items()}
        return self

    @property
    def frequency(self) -> torch.Tensor:
        """Share of top-k slots each expert took (sums to 1)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else torch.full_like(self.counts, 1 / self.num_experts)

    def correlation(self) -> torch.Tensor:
        """Pearson correlation of router-logit columns over tokens, [E, E], from the Gram matrix."""
        n = max(self.tokens, 1)
        mean = self.logit_sum / n
        cov = self.gram / n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(1e-12).sqrt()
        return (cov / torch.outer(std, std)).clamp(-1.0, 1.0)

    def cosine(self) -> torch.Tensor:
        """Cosine similarity of router-logit columns over tokens (UNCURL paper's form), [E, E]."""
        norm = self.gram.diagonal().clamp_min(1e-12).sqrt()
        return (self.gram / torch.outer(norm, norm)).clamp(-1.0, 1.0)

    def logit_rows(self) -> torch.Tensor:
        """The sampled tokens' router logits [n, E] (n <= SAMPLE_TOKENS), in sampling order."""
        sample = self.require("logit_sample", "--router refit")
        return sample[torch.isfinite(sample[:, 0]), 1:]


RouterStats = LayerStats  # the name before statistics became a registry


def batch_device(batch) -> torch.device:
    return (batch.logits if isinstance(batch, RouterBatch) else batch.norm).device


@dataclass
class Profile:
    """Per-layer statistics plus where they came from."""

    layers: dict[str, LayerStats]  # keyed by MoE block name
    layer_index: dict[str, int]
    meta: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return next(iter(self.layers.values())).tokens if self.layers else 0

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{name}/{f}": t.contiguous().cpu() for name, s in self.layers.items()
                   for f, t in s.tensors.items() if f not in s.missing}
        header = {
            "schema": PROFILE_SCHEMA,
            "statistics": {name: spec.doc for name, spec in STATISTICS.items()},
            "layers": {n: {"index": self.layer_index[n], "tokens": s.tokens} for n, s in self.layers.items()},
            **self.meta,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"uncurl": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UncurlError(f"--profile {path}: no such file (write one with `uncurl profile`)")
        try:
            with safe_open(str(path), "pt") as fh:
                header = json.loads((fh.metadata() or {})["uncurl"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as err:  # noqa: BLE001 - any parse failure means "not a profile"
            raise UncurlError(f"--profile {path} is not an uncurl profile file ({err})") from None
        if header.get("schema") != PROFILE_SCHEMA:
            raise UncurlError(
                f"--profile {path} has schema {header.get('schema')}, this uncurl reads schema {PROFILE_SCHEMA} "
                f"(it holds the expert-output statistics REAP and EAN need); profile again with `uncurl profile`"
            )
        layers, index = {}, {}
        for name, info in header.pop("layers").items():
            fields = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.rsplit("/", 1)[0] == name}
            layers[name] = LayerStats(fields["counts"].numel(), info["tokens"], **fields)
            index[name] = info["index"]
        header.pop("schema")
        header.pop("statistics", None)
        return cls(layers, index, header)
