"""Step 2: record what every router and expert does on the task's calibration text.

    uncurl profile --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte.profile

One ordinary forward pass per batch under ``torch.no_grad()``. A forward hook on each router sees
``(logits, top-k weights, top-k indices)``; the experts run under uncurl's recording experts
implementation (``uncurl_record``, registered in transformers' ``ExpertsInterface``), the same
per-expert loop as transformers' eager one that also hands over ||f_j(x)|| of every (token, chosen
expert) pair and the gate the family applied. Nothing is computed twice and no expert runs on a
token that was not routed to it.

What is recorded is the registry of statistics in ``stats.py`` (``STATISTICS``, ``LayerStats``,
``Profile``: accumulators and the file, apart from this driver, which is one loop among several).
Padding tokens are excluded. A shard of the texts (``shard_range``) profiled with
``text_ids=`` their global indices gives a partial profile; ``Profile.combine`` adds the shards'.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F

from .adapters import MoEAdapter, find_moe_layers, routing_names, top_k
from .devices import Masks, on
from .errors import UncurlError
from .load import input_device
from .stats import (PROFILE_SCHEMA, SAMPLE_TOKENS, STATISTICS, ExpertBatch, LayerStats, Profile,  # noqa: F401
                    RouterBatch, RouterStats, Statistic, batch_device, statistic)

log = logging.getLogger(__name__)


def router_fingerprint(model, adapter: MoEAdapter) -> str:
    """Which model a profile was recorded on: the first 16 hex digits of a sha256 over every MoE
    layer's routing tensors (name, shape, values as bfloat16, so the same checkpoint loaded with
    another --dtype gives the same digits). Cheap: E x H values per layer."""
    from .offload import read_tensor

    digest, state = hashlib.sha256(), model.state_dict()
    for layer in find_moe_layers(model, adapter):
        for name in routing_names(layer, adapter).values():
            tensor = read_tensor(model, name, state[name]).detach().to("cpu", torch.bfloat16).contiguous()
            digest.update(f"{name}{list(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _expert_output(module, e: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) of one fused expert, as transformers' eager experts compute it (flags of the
    ``use_experts_implementation`` decorator say how the family's tensors are laid out)."""
    proj = module.gate_up_proj if module.has_gate else module.up_proj
    h = x @ proj[e] if module.is_transposed else F.linear(x, proj[e])
    if module.has_bias:
        h = h + (module.gate_up_proj_bias if module.has_gate else module.up_proj_bias)[e]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = h @ module.down_proj[e] if module.is_transposed else F.linear(h, module.down_proj[e])
    if module.has_bias:
        y = y + module.down_proj_bias[e]
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return y


def _through(self, inner, hidden_states, top_k_index, top_k_weights):
    """Run the model's own kernel (``inner``: grouped_mm, batched_mm, ...) once on the routed
    (token, expert) pairs with unit gates, which yields each pair's f_j(x); gate and sum after."""
    n, k = top_k_index.shape[0], top_k_index.shape[-1]
    pairs = top_k_index.reshape(-1, 1)
    x = hidden_states.repeat_interleave(k, dim=0) if k > 1 else hidden_states
    y = inner(self, x, pairs, torch.ones(pairs.shape, dtype=top_k_weights.dtype, device=pairs.device))
    gates = top_k_weights.reshape(-1)
    record = getattr(self, "_uncurl_record", None)
    if record is not None:
        record(pairs.reshape(-1), gates, torch.linalg.vector_norm(y.float(), dim=-1), y.float().abs().amax(-1))
    out = (y.view(n, k, -1) * gates.view(n, k, 1).to(y.dtype)).sum(1)
    return out.to(hidden_states.dtype)


def recording_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """The experts' forward, also reporting ||f_j(x)|| and g_j(x) of each routed pair to
    ``self._uncurl_record`` (set by the profiler). Under an implementation such as ``grouped_mm``
    (``self._uncurl_inner``, the default on GPUs) that kernel runs the pairs; otherwise this is
    transformers' eager per-expert loop (the lean choice on CPU)."""
    inner = getattr(self, "_uncurl_inner", None)
    if inner is not None:
        return _through(self, inner, hidden_states, top_k_index, top_k_weights)
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    gates = top_k_weights.reshape(-1)
    out = torch.zeros_like(hidden_states)
    norms = torch.zeros(flat.shape[0], dtype=torch.float32, device=hidden_states.device)
    peaks = torch.zeros_like(norms)
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=self.num_experts).tolist()
    start = 0
    for e, size in enumerate(sizes):
        if size == 0 or e >= self.num_experts:
            start += size
            continue
        pairs = order[start : start + size]
        start += size
        tokens = pairs // k
        y = _expert_output(self, e, hidden_states[tokens])
        norms[pairs] = torch.linalg.vector_norm(y.float(), dim=-1)
        peaks[pairs] = y.float().abs().amax(-1)
        # deterministic on CUDA too: a token is routed to an expert once, so no row gets two nonzero adds in one call
        out.index_add_(0, tokens, (y * gates[pairs, None]).to(out.dtype))
    record = getattr(self, "_uncurl_record", None)
    if record is not None:
        record(flat, gates, norms, peaks)
    return out


RECORDING = "uncurl_record"


def _register_recording():
    """transformers' experts interface with ``uncurl_record`` registered, or None (no such interface)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    except ImportError:  # pragma: no cover - transformers without switchable experts
        return None
    ExpertsInterface.register(RECORDING, recording_experts_forward)
    return ALL_EXPERTS_FUNCTIONS


def _topk_output(output, k: int):
    """transformers-5 routers: (logits, top-k weights, top-k indices, ...)."""
    if not (isinstance(output, tuple) and len(output) >= 3):
        return None
    return output[:3]


def _scores_output(output, k: int):
    """llama4: (scores [N, E], logits [N, E]); scores are sigmoid(logit) on the top-k of the logits
    and 0 elsewhere, and the forward weights each chosen expert's input by its score."""
    if not (isinstance(output, tuple) and len(output) == 2):
        return None
    scores, logits = output
    indices = torch.topk(logits, k, dim=-1).indices  # the set the family's router picks
    return logits, scores.gather(-1, indices), indices


# adapter.router_output -> (router output, top-k) -> (logits [.., E], weights [.., k], indices [.., k])
ROUTER_OUTPUTS = {"topk": _topk_output, "scores": _scores_output}


class _Recorder:
    """Router hooks plus the recording experts implementation on every MoE layer; ``mask`` selects
    the non-padding rows of the current batch, ``tokens`` [n, 2] names them (text index, position:
    what the logit sample's keys hash), both set per batch by ``start``. The mask is made wherever
    (the CPU, the input device) and each hook uses it on the device of the tensors it indexes
    (``devices.Masks``): under ``--device-map`` every layer has its own.

    A router that returns probabilities instead of logits (``adapter.router_logits``) gets a second
    hook on the submodule that computes its logits, which runs first, inside the router's forward."""

    def __init__(self, moe_layers, num_experts: int, seed: int = 0, tail: bool = False, output: str = "topk",
                 top_k: int = 0, router_logits: str | None = None):
        self.stats = {layer.name: LayerStats(num_experts, seed=seed + layer.index) for layer in moe_layers}
        self.tail = tail  # routers with tail rows: logit columns and slots past the experts are dropped
        self.read, self.output, self.top_k = ROUTER_OUTPUTS[output], output, top_k
        self.mask = None  # a devices.Masks (a tensor set here is wrapped in one)
        self.tokens: torch.Tensor | None = None
        self.paused = False  # set while a layer's blocks run again for other ends (layerwise.py's fit)
        self.listen = None  # listen(name, weights [n, k], indices [n, k]) per router call, padding removed (routes.py)
        self.logits: dict[str, torch.Tensor] = {}
        self.handles = [layer.router.register_forward_hook(self._hook(layer.name)) for layer in moe_layers]
        if router_logits is not None:
            self.handles += [layer.router.get_submodule(router_logits).register_forward_hook(self._logits(layer.name))
                             for layer in moe_layers]
        self.switched: list[tuple[object, object]] = []
        interface = _register_recording()
        self.missing_outputs = []
        self.modules = []
        for layer in moe_layers:
            experts = layer.experts
            config = getattr(experts, "config", None)
            if not (interface is not None and config is not None and hasattr(experts, "has_gate")):
                self.missing_outputs.append(layer.name)
                continue
            current = config._experts_implementation
            if current == RECORDING:  # a config shared by several layers, already switched
                current = next(prev for cfg, prev in self.switched if cfg is config)
            else:
                self.switched.append((config, current))
                config._experts_implementation = RECORDING
            experts._uncurl_record = self._record(layer.name)
            experts._uncurl_inner = interface[current] if current not in (None, "eager") else None
            self.modules.append(experts)
        if self.missing_outputs:
            log.warning("%d MoE layers do not use transformers' switchable experts: no REAP/EAN statistics "
                        "for them", len(self.missing_outputs))

    def __setattr__(self, name, value):
        if name == "mask" and not (value is None or isinstance(value, Masks)):
            value = Masks(value)
        super().__setattr__(name, value)

    def start(self, attention_mask: torch.Tensor, text_ids: Sequence[int]) -> None:
        """The next batch: its attention mask [B, T] and the (global) index of each of its texts."""
        self.mask = attention_mask.reshape(-1).bool()
        self.tokens = token_positions(attention_mask, text_ids)

    def _logits(self, name: str):
        def hook(module, args, output):
            if not self.paused:
                self.logits[name] = output

        return hook

    def _keep(self, like: torch.Tensor) -> torch.Tensor | None:
        """The non-padding rows of ``like`` (rows first), on its device; None when they are not the batch's."""
        keep = self.mask
        return keep.on(like) if keep is not None and keep.numel() == like.shape[0] else None

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.paused:
                return
            read = self.read(output, self.top_k)
            if read is None:
                raise UncurlError(
                    f"router {type(module).__name__} returned {type(output).__name__}; expected what the "
                    f"adapter's router_output {self.output!r} reads ({self.read.__doc__.strip()})"
                )
            logits, weights, indices = read
            logits = self.logits.pop(name, logits)
            logits, weights, indices = (on(t.reshape(-1, t.shape[-1]), logits) for t in (logits, weights, indices))
            keep = self._keep(logits)
            if keep is not None:
                logits, weights, indices = logits[keep], weights[keep], indices[keep]
            if self.listen is not None:  # each token's top-k as the router chose it (tail slots included)
                self.listen(name, weights, indices)
            if self.tail:  # router tail rows (adapter.tail_rows): count the experts only
                e = self.stats[name].num_experts
                routed = (indices < e) & (weights != 0)  # zaya returns a skip slot as expert 0, weight 0
                logits, weights, indices = logits[:, :e], weights[routed], indices[routed]
            tokens = self.tokens if self.tokens is not None and len(self.tokens) == logits.shape[0] else None
            self.stats[name].update(logits, weights, indices, tokens)

        return hook

    def _record(self, name: str):
        def record(expert, gate, norm, peak):
            if self.paused:
                return
            keep = self.mask
            if keep is not None and keep.numel() and expert.shape[0] % keep.numel() == 0:
                gate, norm, peak = on(gate, expert), on(norm, expert), on(peak, expert)
                pairs = keep.on(expert).repeat_interleave(expert.shape[0] // keep.numel())  # token-major pairs
                expert, gate, norm, peak = expert[pairs], gate[pairs], norm[pairs], peak[pairs]
            if self.tail:  # as in the router hook: skip slots are not routed
                routed = gate != 0
                expert, gate, norm, peak = expert[routed], gate[routed], norm[routed], peak[routed]
            self.stats[name].update_experts(expert, gate, norm, peak)

        return record

    def close(self):
        for h in self.handles:
            h.remove()
        for config, previous in reversed(self.switched):
            config._experts_implementation = previous
        for experts in self.modules:
            del experts._uncurl_record, experts._uncurl_inner
        for name in self.stats:
            self.finished(name)

    def finished(self, name: str):
        """Layer ``name``'s statistics as the profile keeps them (on the CPU, those the recorder
        could not see marked missing): once no more tokens come for it."""
        stats = self.stats[name]
        if name in self.missing_outputs:
            stats.missing = {n for n, spec in STATISTICS.items() if spec.source == "experts"}
        return stats.cpu()


def token_positions(attention_mask: torch.Tensor, text_ids: Sequence[int]) -> torch.Tensor:
    """[n, 2] long on the CPU: (text index, position in the text) of each non-padding token of a
    batch, in the order the masked rows come (row-major over [B, T])."""
    mask = attention_mask.cpu().bool()
    positions = mask.long().cumsum(1) - 1
    texts = torch.as_tensor(list(text_ids), dtype=torch.long)[:, None].expand_as(mask)
    return torch.stack([texts[mask], positions[mask]], 1)


def shard_range(total: int, index: int, count: int) -> range:
    """The texts (indices into ``total``) of shard ``index`` of ``count`` (0-based): contiguous,
    sizes differing by at most one. Profiles of all ``count`` shards, each run with
    ``text_ids=shard_range(...)``, combine (``Profile.combine``) to the profile of all texts."""
    if not 0 <= index < count:
        raise UncurlError(f"shard {index}/{count}: the index must be 0..{count - 1}")
    return range(index * total // count, (index + 1) * total // count)


WINDOW_BATCHES = 8  # batches tokenised (and sorted by length) together


def batches(tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int):
    """Tokenised batches, longest first within each window of ``WINDOW_BATCHES`` batches.

    Each text is tokenised once, a window at a time, and a batch is only padded. Sorting within a
    window keeps most of the padding saving of a global sort, while memory stays flat in the number
    of texts. Tokenising 1,000 texts of 512 tokens at once peaked at +114 MB of tokenizer objects.
    """
    for _, batch in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
        yield batch


def indexed_batches(tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int):
    """``batches``, each with the indices (into ``texts``) of its rows: (list of int, batch)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    window = batch_size * WINDOW_BATCHES
    for first in range(0, len(texts), window):
        ids = tokenizer(list(texts[first : first + window]), truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield [first + i for i in rows], tokenizer.pad([{"input_ids": ids[i]} for i in rows], return_tensors="pt",
                                                           padding=True)


@torch.no_grad()
def profile_model(
    model,
    tokenizer,
    adapter: MoEAdapter,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
    meta: dict | None = None,
    seed: int = 0,
    text_ids: Sequence[int] | None = None,
    mtp=None,
) -> Profile:
    """Forward ``texts`` through ``model`` and return every registered statistic, per MoE layer.

    ``text_ids``: the index of each text in the whole calibration set when ``texts`` is one shard
    of it (``shard_range``), so that shards' profiles combine to the whole set's; default
    ``0..len(texts)-1``. ``mtp`` (``mtp.Blocks``): its kept MTP blocks run on each batch after the
    model's forward, their statistics in the profile too."""
    if not texts:
        raise UncurlError("no calibration text to profile: the task's calibration split is empty")
    text_ids = check_text_ids(texts, text_ids)
    moe_layers = find_moe_layers(model, adapter)
    recorder = _Recorder(moe_layers, moe_layers[0].num_experts, seed, tail=bool(adapter.tail_rows),
                         output=adapter.router_output, top_k=top_k(model.config, adapter),
                         router_logits=adapter.router_logits)
    device = input_device(model)
    n_batches = -(-len(texts) // batch_size)
    extra = mtp.session(seed) if mtp is not None and mtp.kept else None
    try:
        with progress_bar(progress, n_batches, "profiling") as advance, \
                (mtp.hidden_states(model) if extra else nullcontext({})) as hidden:
            for rows, batch in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
                recorder.start(batch["attention_mask"], [text_ids[i] for i in rows])
                batch = batch.to(device)
                # logits_to_keep=1: the router statistics need no vocabulary projection; no KV cache
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                      use_cache=False)
                if extra is not None:
                    extra.run(batch, hidden.pop(0), [text_ids[i] for i in rows])
                advance()
    finally:
        recorder.close()
        if extra is not None:
            extra.close()
    stats, index = dict(recorder.stats), {layer.name: layer.index for layer in moe_layers}
    if extra is not None:
        stats.update(extra.finish())
        index.update(mtp.layer_index())
    return Profile(stats, index, dict(meta or {}))


def check_text_ids(texts: Sequence[str], text_ids: Sequence[int] | None) -> list[int]:
    """The global index of each text (default: its position in ``texts``), one distinct index each."""
    if text_ids is None:
        return list(range(len(texts)))
    text_ids = [int(i) for i in text_ids]
    if len(text_ids) != len(texts) or len(set(text_ids)) != len(text_ids):
        raise UncurlError(f"text_ids: {len(text_ids)} ids for {len(texts)} texts (one distinct index per text)")
    return text_ids


class progress_bar:
    """A rich progress bar (on stderr) when asked for, a no-op otherwise."""

    def __init__(self, show: bool, total: int, label: str):
        self.show, self.total, self.label, self.bar = show, total, label, None

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            transient=True, console=Console(stderr=True),  # stdout stays machine-readable
        )
        self.bar.__enter__()
        task = self.bar.add_task("profile", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
