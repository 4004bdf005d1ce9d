"""The statistics a profile holds: named per-layer accumulators that update online and combine.

    uncurl profile --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte.profile

Statistics are named accumulators in ``STATISTICS`` (a registry): each declares its shape, its
source (router or experts), an in-place ``update`` with one batch and a ``combine`` of two partial
accumulators of the same layer, and is accumulated online per MoE layer in float64, so memory does
not grow with the number of calibration tokens. Nothing here knows the model: the drivers
(``profile.profile_model`` over the whole model, and the ones to come: layer by layer, one rank of
several, one shard of the texts) hand batches to ``LayerStats`` and ``Profile.combine`` adds the
partial profiles of disjoint text shards (what ``--profile a b c`` and an all-reduce use).

Every accumulation is deterministic on CPU and CUDA alike (``add_by_index``: no float atomics), so
a run equals itself, and the layer-by-layer driver the whole-model pass, bit for bit on one machine.
Combining is exact for the sums (counts, mass, logit sums, Gram matrix, EAN/REAP sums: up to the
order of float64 additions). The router-logit sample is *priority sampling* with a key per token
derived from (seed, layer, text index, position in the text) by a hash (``token_keys``), not from a
running random stream: the sample keeps the ``SAMPLE_TOKENS`` tokens with the smallest keys, so the
tokens kept do not depend on the batching, and the union of shards' samples cut to the smallest
keys is the sample one pass over all texts keeps (``combine_samples``), given each shard profiled
with the texts' global indices (``profile_model(text_ids=...)``).

A profile is a safetensors file with the model id, task, data fingerprint and versions in its
metadata; ``prune --profile FILE`` reuses it, and a file of an older schema is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import UncurlError

PROFILE_SCHEMA = 2
SAMPLE_TOKENS = 4096  # router-logit rows kept per layer (a seeded uniform sample) for --router refit


@dataclass
class RouterBatch:
    """What a router hook sees, padding removed: logits [N, E], top-k weights and indices [N, k];
    ``tokens`` [N, 2] (on the CPU): each row's (text index, position in the text)."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    tokens: torch.Tensor | None = None


@dataclass
class ExpertBatch:
    """What the recording experts see, one entry per (token, chosen expert) pair, padding removed."""

    expert: torch.Tensor  # [S] expert index
    gate: torch.Tensor  # [S] the weight the family applied to this expert's output
    norm: torch.Tensor  # [S] ||f_j(x)||_2 of the expert's output (before the gate)
    peak: torch.Tensor | None = None  # [S] max_i |f_j(x)_i|, the pair's largest output entry (before the gate)


def _sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b.to(a.device)


@dataclass(frozen=True)
class Statistic:
    """A named per-layer accumulator: ``update(stats, acc, batch)`` adds one batch in place;
    ``combine(a, b)`` is the accumulator of the union of the tokens two accumulators saw."""

    name: str
    shape: Callable[[int], tuple[int, ...]]  # from the expert count E
    source: str  # "router" (RouterBatch) or "experts" (ExpertBatch)
    update: Callable[["LayerStats", torch.Tensor, object], None]
    doc: str
    fill: float = 0.0
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _sum


STATISTICS: dict[str, Statistic] = {}


def statistic(name: str, shape, source: str, doc: str, fill: float = 0.0, combine=_sum):
    """Register an accumulator: a new statistic is one decorated function here (sums need no
    ``combine``: the default adds)."""

    def register(update):
        STATISTICS[name] = Statistic(name, shape, source, update, doc, fill, combine)
        return update

    return register


def _vec(e: int) -> tuple[int, ...]:
    return (e,)


@statistic("counts", _vec, "router", "times each expert was in a token's top-k (frequency)")
def _counts(stats, acc, b: RouterBatch):  # integer counts: exact in any order
    acc += torch.bincount(b.indices.reshape(-1), minlength=acc.numel()).to(acc)


SUM_ROWS = 4096  # rows of one one-hot block in add_by_index (4096 x E float64: 4 MiB at E = 128)


def add_by_index(acc: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``acc[index[i]] += values[i]`` for every i (``acc`` [E], float64), deterministically: as
    ``values @ one_hot(index)``, block by block in a fixed order. ``index_add_`` would be shorter, but
    on CUDA it adds with atomics, so float64 sums depend on thread timing (torch's reproducibility
    notes): a run would not equal itself, nor sequential the whole pass, bit for bit. A matrix product
    has a fixed reduction order on a given GPU and library version (cuBLAS' reproducibility
    guarantee), and on the CPU. Operands are moved to ``acc``'s device."""
    index, values = index.reshape(-1).to(acc.device), values.reshape(-1).to(acc)
    for start in range(0, index.numel(), SUM_ROWS):
        rows = slice(start, start + SUM_ROWS)
        acc += values[rows] @ torch.nn.functional.one_hot(index[rows], acc.numel()).to(acc.dtype)


@statistic("mass", _vec, "router", "sum of the routing weights each expert received")
def _mass(stats, acc, b: RouterBatch):
    add_by_index(acc, b.indices, b.weights)


@statistic("logit_sum", _vec, "router", "sum of router logits")
def _logit_sum(stats, acc, b: RouterBatch):
    acc += b.logits.sum(0)


@statistic("gram", lambda e: (e, e), "router", "sum over tokens of logits^T logits (covariance, cosine)")
def _gram(stats, acc, b: RouterBatch):
    acc += b.logits.T @ b.logits


@statistic("ean_sum", _vec, "experts", "sum of ||f_j(x)|| over the tokens routed to j (EAN)")
def _ean_sum(stats, acc, b: ExpertBatch):
    add_by_index(acc, b.expert, b.norm)


@statistic("reap_sum", _vec, "experts", "sum of g_j(x) ||f_j(x)|| over the tokens routed to j (REAP)")
def _reap_sum(stats, acc, b: ExpertBatch):
    add_by_index(acc, b.expert, b.gate * b.norm)


@statistic("peak", _vec, "experts", "largest |f_j(x)_i| over the tokens routed to j and the hidden dims "
           "(super experts: --protect-super-experts)", combine=torch.maximum)
def _peak(stats, acc, b: ExpertBatch):
    if b.peak is not None and b.peak.numel():  # a maximum: exact and order-free, on CUDA too
        acc.scatter_reduce_(0, b.expert.to(acc.device), b.peak.to(acc), reduce="amax")


# ---- the router-logit sample: priority sampling with per-token hashed keys ---------------------

_MASK = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a bijection that scrambles every bit; wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_keys(seed: int, tokens: torch.Tensor) -> torch.Tensor:
    """[N] float64 keys, uniform on [0, 1): a hash of (``seed``, text index, position) for each row
    of ``tokens`` [N, 2]. The same token gets the same key whatever batch or shard it is in."""
    t = tokens.cpu().numpy().astype(np.int64).view(np.uint64)  # -1 (a stream without texts) wraps
    h = _mix(np.full(len(t), (seed + 0x9E3779B97F4A7C15) & _MASK, dtype=np.uint64))
    h = _mix(h ^ t[:, 0])
    h = _mix(h ^ t[:, 1])
    return torch.from_numpy((h >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def combine_samples(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two samples [S, 1 + E] (column 0: the key; inf: empty) -> the S rows with the smallest keys
    of both, ascending: what one pass over both sets of tokens keeps."""
    rows = torch.cat([a, b.to(a.device)])
    return rows[torch.argsort(rows[:, 0], stable=True)[: a.shape[0]]]


@statistic("logit_sample", lambda e: (SAMPLE_TOKENS, e + 1), "router",
           "a seeded uniform sample of tokens' router logits (column 0: sort key; inf = empty)", fill=float("inf"),
           combine=combine_samples)
def _logit_sample(stats, acc, b: RouterBatch):
    # priority sampling: every token has a uniform key; the SAMPLE_TOKENS smallest keys are a
    # uniform sample without replacement of all tokens seen, whatever the batches or shards
    keys = token_keys(stats.seed, b.tokens).to(acc.device)
    acc.copy_(combine_samples(acc, torch.cat([keys[:, None], b.logits], 1)))


class LayerStats:
    """The accumulators of one MoE layer (float64), by statistic name; see ``STATISTICS``."""

    def __init__(self, num_experts: int, tokens: int = 0, seed: int = 0, **tensors: torch.Tensor):
        self.num_experts, self.tokens, self.seed = num_experts, tokens, seed
        self.tensors: dict[str, torch.Tensor] = {}
        for name, spec in STATISTICS.items():
            given = tensors.get(name)
            self.tensors[name] = (given.to(torch.float64) if given is not None
                                  else torch.full(spec.shape(num_experts), spec.fill, dtype=torch.float64))
        self.missing = {name for name in STATISTICS if name not in tensors} if tensors else set()
        self.scores: dict[str, torch.Tensor] = {}  # [E] per data-free method, from the weights (cluster.py)

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

    def update(self, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               tokens: torch.Tensor | None = None) -> None:
        """Add a router batch: logits [N, E], top-k routing weights [N, k] and expert indices [N, k];
        ``tokens`` [N, 2]: each row's (text index, position), which the sample's keys hash. Without
        them the rows are one stream of texts-less tokens, numbered in arrival order."""
        n = logits.shape[0]
        if tokens is None:
            tokens = torch.stack([torch.full((n,), -1, dtype=torch.long),
                                  torch.arange(self.tokens, self.tokens + n)], 1)
        self.tokens += n
        self._add("router", RouterBatch(logits.detach().to(torch.float64), weights.detach(),
                                        indices.detach().long(), tokens))

    def update_experts(self, expert: torch.Tensor, gate: torch.Tensor, norm: torch.Tensor,
                       peak: torch.Tensor | None = None) -> None:
        """Add the routed (token, expert) pairs: expert index, gate, ||f_j(x)|| and (optional)
        max |f_j(x)_i| of each."""
        self._add("experts", ExpertBatch(expert.long(), gate.detach().to(torch.float64),
                                         norm.detach().to(torch.float64),
                                         None if peak is None else peak.detach().to(torch.float64)))

    def cpu(self) -> "LayerStats":
        self.tensors = {k: v.cpu() for k, v in self.tensors.items()}
        return self

    @classmethod
    def combine(cls, parts: Sequence["LayerStats"]) -> "LayerStats":
        """The statistics of the union of the (disjoint) tokens ``parts`` saw, each by its
        ``combine``; a statistic missing from one part is missing from the whole."""
        if not parts:
            raise ValueError("nothing to combine")
        experts = {p.num_experts for p in parts}
        if len(experts) != 1:
            raise UncurlError(f"cannot combine statistics of layers with different expert counts {sorted(experts)}")
        out = cls(parts[0].num_experts, sum(p.tokens for p in parts), parts[0].seed)
        for name, spec in STATISTICS.items():
            out.tensors[name] = reduce(spec.combine, [p.tensors[name] for p in parts]).cpu()
        out.missing = set().union(*(p.missing for p in parts))
        return out

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
        """The sampled tokens' router logits [n, E] (n <= SAMPLE_TOKENS), by ascending key."""
        sample = self.require("logit_sample", "--router refit")
        return sample[torch.isfinite(sample[:, 0]), 1:]


RouterStats = LayerStats  # the name before statistics became a registry


def batch_device(batch) -> torch.device:
    return (batch.logits if isinstance(batch, RouterBatch) else batch.norm).device


# meta keys whose values the statistics depend on: partial profiles must agree on them
MUST_AGREE = ("model", "model_type", "seed", "max_length")


def _combined_meta(metas: list[dict]) -> dict:
    """Keys every part agrees on; where the parts differ (each shard's task fingerprint), ``task``
    keeps what they agree on with the example counts summed, and ``parts`` lists each part's meta."""
    for key in MUST_AGREE:
        values = [m.get(key) for m in metas]
        if any(v != values[0] for v in values):
            raise UncurlError(f"cannot combine profiles with different {key!r}: {', '.join(map(repr, values))}")
    keys = dict.fromkeys(k for m in metas for k in m)
    meta = {k: metas[0][k] for k in keys if all(k in m and m[k] == metas[0][k] for m in metas)}
    if len(meta) == len(keys):
        return meta
    tasks = [m.get("task") for m in metas]
    if "task" not in meta and all(isinstance(t, dict) for t in tasks):
        task = {k: v for k, v in tasks[0].items() if all(t.get(k) == v for t in tasks)}
        if all(isinstance(t.get("calibration_examples"), int) for t in tasks):
            task["calibration_examples"] = sum(t["calibration_examples"] for t in tasks)
        meta["task"] = task
    meta["parts"] = metas
    return meta


@dataclass
class Profile:
    """Per-layer statistics plus where they came from."""

    layers: dict[str, LayerStats]  # keyed by MoE block name
    layer_index: dict[str, int]
    meta: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return next(iter(self.layers.values())).tokens if self.layers else 0

    @classmethod
    def combine(cls, profiles: Sequence["Profile"]) -> "Profile":
        """One profile from partial ones over disjoint texts of the same model (shard files, the
        ranks of a data-parallel run): the same layers and expert counts, and the same model,
        seed and max length in their meta; every statistic combined by its own rule."""
        profiles = list(profiles)
        if not profiles:
            raise UncurlError("no profiles to combine")
        first = profiles[0]
        for p in profiles[1:]:
            if p.layer_index != first.layer_index:
                raise UncurlError(f"cannot combine profiles of different MoE layers: {sorted(first.layer_index)} "
                                  f"and {sorted(p.layer_index)}")
        meta = _combined_meta([dict(p.meta) for p in profiles])
        layers = {name: LayerStats.combine([p.layers[name] for p in profiles]) for name in first.layers}
        return cls(layers, dict(first.layer_index), meta)

    @classmethod
    def combine_shards(cls, profiles: Sequence["Profile"], names: Sequence[str] | None = None) -> "Profile":
        """The profile of all texts from the files of ``uncurl profile --shard I/N``: each records
        its shard (``meta["shard"]``); all N shards must be there, once each, of the same model
        (router weights), task data, seed and max length (``combine``'s own checks add the layers)."""
        profiles = list(profiles)
        names = list(names or (f"profile {i + 1}" for i in range(len(profiles))))
        if not profiles:
            raise UncurlError("no shard profiles to combine")
        shards = []
        for name, p in zip(names, profiles):
            shard = p.meta.get("shard")
            if not isinstance(shard, dict):
                raise UncurlError(f"{name} is not a shard profile (it records no --shard I/N): only the files of "
                                  f"`uncurl profile --shard I/N` are combined")
            shards.append(shard)
        count = shards[0]["count"]
        for name, shard in zip(names, shards):
            if shard["count"] != count or shard.get("of") != shards[0].get("of"):
                raise UncurlError(f"{name} is shard {shard['index']}/{shard['count']} of {shard.get('of')} texts, "
                                  f"{names[0]} is of {count} shards of {shards[0].get('of')} texts: not one split")
        seen: dict[int, str] = {}
        for name, shard in zip(names, shards):
            if shard["index"] in seen:
                raise UncurlError(f"{name} and {seen[shard['index']]} are both shard {shard['index']}/{count}")
            seen[shard["index"]] = name
        missing = sorted(set(range(count)) - set(seen))
        if missing:
            raise UncurlError(f"shards {', '.join(f'{i}/{count}' for i in missing)} are missing: the {count} shards "
                              f"must cover the calibration set (profile them with --shard I/{count})")
        for key, what in (*((k, f"a {k!r}") for k in MUST_AGREE), ("router_fingerprint", "router weights"),
                          ("task", "task data")):
            values = [p.meta.get(key) for p in profiles]
            for name, value in zip(names, values):
                if value != values[0]:
                    raise UncurlError(f"{name} was profiled with {what} other than {names[0]}'s ({value!r}, "
                                      f"{values[0]!r}): "
                                      f"shards of one profile share the model, task, seed and max length")
        order = sorted(range(len(profiles)), key=lambda i: shards[i]["index"])
        stripped = [cls(profiles[i].layers, profiles[i].layer_index,
                        {k: v for k, v in profiles[i].meta.items() if k != "shard"}) for i in order]
        combined = cls.combine(stripped)
        combined.meta["shards"] = count
        return combined

    @staticmethod
    def claim(path: str | Path, *, overwrite: bool = False, inputs=(), flag: str = "--out"):
        """Claim ``path`` for a profile before the expensive work (``output.claim``): refused if it
        is a folder, one of the run's ``inputs``, or exists and is not an earlier uncurl profile
        replaced with ``overwrite``."""
        from .output import claim

        return claim(path, overwrite=overwrite, kind="file", inputs=inputs, flag=flag)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the profile to ``path`` through a unique hidden temporary file beside it (removed on
        any error or signal), never over anything but an earlier profile (``overwrite``)."""
        from safetensors.torch import save

        path = Path(path)
        tensors = {f"{name}/{f}": t.contiguous().cpu() for name, s in self.layers.items()
                   for f, t in s.tensors.items() if f not in s.missing}
        header = {
            "schema": PROFILE_SCHEMA,
            "statistics": {name: spec.doc for name, spec in STATISTICS.items()},
            "layers": {n: {"index": self.layer_index[n], "tokens": s.tokens} for n, s in self.layers.items()},
            **self.meta,
        }
        data = save(tensors, metadata={"uncurl": json.dumps(header)})
        with self.claim(path, overwrite=overwrite) as output, output.staged() as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        return path

    @classmethod
    def load(cls, path: str | Path, flag: str = "--profile") -> "Profile":
        """The profile in the file ``path``, checked on read (``check_header``, ``check_layer``): a
        file uncurl wrote, of this schema, with every layer's router statistics present, of the
        shape its expert count gives, and finite. ``flag`` names the file in messages."""
        from safetensors import safe_open

        path = Path(path)
        what = f"{flag} {path}"
        if path.is_dir():
            raise UncurlError(f"{what} is a folder; a profile is one file, written by `uncurl profile --out FILE`")
        if not path.is_file():
            raise UncurlError(f"{what}: no such file (write one with `uncurl profile`)" if not path.exists() else
                              f"{what} is not a regular file (a FIFO, socket or device); a profile is a file "
                              f"written by `uncurl profile`")
        try:
            with safe_open(str(path), "pt") as fh:
                header = json.loads((fh.metadata() or {})["uncurl"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as err:  # noqa: BLE001 - any parse failure means "not a profile"
            raise UncurlError(f"{what} is not an uncurl profile file ({err})") from None
        check_header(header, what)
        layers, index = {}, {}
        for name, info in header.pop("layers").items():
            fields = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.rsplit("/", 1)[0] == name}
            check_layer(name, fields, what)
            layers[name] = LayerStats(fields["counts"].numel(), info["tokens"], **fields)
            index[name] = info["index"]
        header.pop("schema")
        header.pop("statistics", None)
        return cls(layers, index, header)


def _json_type(value) -> str:
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _whole(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_header(header, what: str) -> None:
    """A profile's metadata: a JSON object of this schema whose layers each have an index and a token
    count, and whose task and shard records are objects."""
    again = "profile again with `uncurl profile`"
    if not isinstance(header, dict):
        raise UncurlError(f"{what}: its uncurl metadata is a JSON {_json_type(header)}, not an object; it was "
                          f"not written by uncurl (or was edited): {again}")
    schema = header.get("schema")
    if not _whole(schema) or schema != PROFILE_SCHEMA:
        said = f"schema {json.dumps(schema)}" + ("" if _whole(schema) else f" (a {_json_type(schema)}, not a "
                                                                            f"whole number)")
        raise UncurlError(f"{what} has {said}, this uncurl reads schema {PROFILE_SCHEMA} (it holds the expert-output "
                          f"statistics REAP and EAN need); {again}")
    layers = header.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise UncurlError(f"{what}: its metadata names no MoE layers (\"layers\" is {json.dumps(layers)[:40]}); "
                          f"{again}")
    for name, info in layers.items():
        if not isinstance(info, dict) or not _whole(info.get("index")) or not _whole(info.get("tokens")):
            raise UncurlError(f"{what}: layer {name}'s record {json.dumps(info)[:60]} lacks a whole index and token "
                              f"count; {again}")
    for key in ("task", "shard"):
        if key in header and not isinstance(header[key], dict):
            raise UncurlError(f"{what}: its {key!r} record is {json.dumps(header[key])[:40]}, not an object; {again}")
    shard = header.get("shard")
    if shard is not None and not (_whole(shard.get("index")) and _whole(shard.get("count"), 1)):
        raise UncurlError(f"{what}: its shard record {json.dumps(shard)[:60]} lacks a whole index and count; {again}")


def check_layer(name: str, fields: dict[str, torch.Tensor], what: str) -> None:
    """One layer's statistics as read: the router's (which every family records) present, each of
    the shape the layer's expert count gives, counts >= 0, and no NaN (nor Inf, but in the logit
    sample's empty rows): a profile damaged after it was written is refused, not read as zeros."""
    again = "the file is damaged: profile again with `uncurl profile`"
    absent = [s for s, spec in STATISTICS.items() if spec.source == "router" and s not in fields]
    if absent:
        raise UncurlError(f"{what} lacks {', '.join(absent)} of layer {name} (every profile holds the router's "
                          f"statistics {', '.join(s for s, spec in STATISTICS.items() if spec.source == 'router')}); "
                          f"{again}")
    if fields["counts"].dim() != 1 or fields["counts"].numel() < 1:
        raise UncurlError(f"{what}: {name}/counts has shape {list(fields['counts'].shape)}, expected [E] (one count "
                          f"per expert); {again}")
    e = fields["counts"].numel()
    for stat, t in fields.items():
        spec = STATISTICS.get(stat)
        if spec is None:
            continue  # a statistic this uncurl does not know: unused
        if tuple(t.shape) != spec.shape(e):
            raise UncurlError(f"{what}: {name}/{stat} has shape {list(t.shape)}, expected {list(spec.shape(e))} for "
                              f"its {e} experts; {again}")
        bad = torch.isnan(t) if spec.fill == float("inf") else ~torch.isfinite(t)
        if bool(bad.any()):
            raise UncurlError(f"{what}: {name}/{stat} holds {int(bad.sum()):,} NaN/Inf values; {again}")
    if bool((fields["counts"] < 0).any()):
        raise UncurlError(f"{what}: {name}/counts holds negative counts; {again}")


def balance(counts) -> dict:
    """Load balance of one layer from its expert-usage counts [E]: ``entropy`` of the usage share
    normalised by log E (1: every expert used equally, 0: one expert takes every slot), ``cv`` the
    coefficient of variation of the counts (population std / mean; 0 when balanced), and
    ``max_share`` the largest expert's share of the slots (1/E when balanced)."""
    c = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    e, total = c.numel(), float(c.sum())
    if total <= 0 or e == 0:
        return {"experts": e, "entropy": None, "cv": None, "max_share": None}
    p = c / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / np.log(e)) if e > 1 else 1.0
    mean = total / e
    cv = float(((c - mean) ** 2).mean().sqrt() / mean)
    return {"experts": e, "entropy": round(entropy, 6), "cv": round(cv, 6), "max_share": round(float(p.max()), 6)}
