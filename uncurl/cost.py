"""What a model costs to serve, before and after pruning: weights, active parameters, KV cache, GPUs.

    uncurl cost --model pruned/ --gpu-memory 80GiB --context 4096 --serving-batch 8

Computed from the model's own tensors and config, never guessed from a family name:

- **weight bytes** as stored (every tensor once, tied ones once);
- **active parameters per token**: the language stack and output head, with each MoE layer's routed
  experts counted at ``top_k / E`` of their size (what a token runs through). Pruning experts leaves
  this unchanged unless top-k goes down; vision or audio towers are not run by a text token and are
  left out of it (they are in the weight bytes);
- **FLOPs per token**: 2 x the active parameters a token multiplies with (the input embedding is a
  lookup; a tied output head is a real matmul), the usual ``2N`` rule. Attention over the context
  adds ``4 x context x heads x head_dim`` per attention layer, which is not counted here;
- **KV cache**: measured, not derived: one short forward fills transformers' own cache for this
  model (``prune`` reuses the forward that checks its checkpoint), and each cache layer gives the
  bytes its keys and values take per token and a fixed part (the recurrent state of
  linear-attention and Mamba layers). A sliding-window layer stops growing
  at its window. So multi-latent attention (DeepSeek), sliding windows (gpt-oss) and hybrid stacks
  are counted as transformers holds them; a serving engine with another cache layout may differ;
- **GPUs**: the fewest GPUs of ``gpu_memory`` each (``USABLE`` of it, the rest left to activations
  and the runtime) that hold the weights plus the KV cache of ``batch`` sequences of ``context``
  tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .adapters import MoEAdapter, find_moe_layers, language_stack, per_expert_names, top_k
from .merge import weight_bytes

KV_PROBE = 4  # tokens of the cache-measuring forward (measure_kv)
USABLE = 0.9  # share of a GPU's memory the weights and the KV cache may take
DEFAULT_GPU_MEMORY = "80GiB"  # an H100/A100 80GB
DEFAULT_CONTEXT, DEFAULT_BATCH = 4096, 1


@dataclass
class Cost:
    """Serving figures of one model (see the module doc for how each is counted)."""

    weight_bytes: int
    params: int
    active_params: int
    flops_per_token: int
    top_k: int | None
    experts: int | None
    kv_bytes_per_token: int | None  # growing part, summed over layers, at contexts within every window
    kv_fixed_bytes: int | None  # per sequence: recurrent states that do not grow with the context
    kv_bytes: int | None  # batch x (fixed + per-token x context, each sliding layer capped at its window)
    context: int
    batch: int
    gpu_memory: int
    gpus: int | None  # None: the KV cache could not be measured

    def as_dict(self) -> dict:
        return asdict(self)


def parse_bytes(text: str | int, flag: str = "--gpu-memory") -> int:
    """``80GiB``, ``80GB``, ``500MB``, ``1e9`` -> bytes (binary units for *iB, decimal otherwise)."""
    from .errors import UncurlError

    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper()
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0 or math.isinf(value):
        raise UncurlError(f"{flag} {text!r} must be a positive size such as 80GiB, 24GB or 500MB")
    return int(value * units[unit])


def _unique_params(module) -> dict[int, torch.Tensor]:
    return {id(p): p for p in module.parameters()}


def active_params(model, adapter: MoEAdapter | None) -> tuple[int, int, int]:
    """(all parameters, active per token, of which the input embedding's) of ``model``."""
    total = sum(p.numel() for p in _unique_params(model).values())  # merge.parameter_count, tied once
    stack = language_stack(model, adapter)[1] if adapter is not None else getattr(model, "get_decoder", lambda: model)()
    run = _unique_params(stack)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        run.update(_unique_params(head))
    embedding = model.get_input_embeddings()
    k = top_k(model.config, adapter) if adapter is not None else 0
    state = model.state_dict()
    unused = 0
    for layer in find_moe_layers(model, adapter) if adapter is not None else []:
        e = layer.num_experts
        for name in per_expert_names(layer, adapter)[0]:
            t = state[name]
            rows = t.shape[adapter.expert_axis(name)]
            routed = t.numel() * min(e, rows) // rows  # tail rows (shared sinks) always run
            unused += routed - routed * k // e
    active = sum(p.numel() for p in run.values()) - unused
    emb = embedding.weight.numel() if embedding is not None else 0
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    matmul = active - (0 if tied else emb)
    return total, active, matmul


def _cache_bytes(layer) -> int:
    """Bytes of every tensor a cache layer holds (its attributes, and lists, tuples and dicts of them:
    linear-attention layers keep ``conv_states``/``recurrent_states`` dicts)."""
    total = 0
    for value in vars(layer).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for t in items:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                total += t.numel() * t.element_size()
    return total


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) and t.dim() > 0 else 0


def kv_rows(cache) -> list[dict] | None:
    """Per layer of a filled transformers cache: the bytes its keys and values take per cached token
    (over the entries they hold: a sliding-window layer stops at its window), the bytes of what it
    holds beside them (the fixed recurrent state of linear-attention and Mamba layers), its window.
    None when the model returned no cache."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    rows = []
    for layer in layers:
        keys = getattr(layer, "keys", None)
        grows = _bytes(keys) + _bytes(getattr(layer, "values", None))
        held = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() >= 2 and keys.shape[-2] else 0
        window = getattr(layer, "sliding_window", None)
        rows.append({"per_token": grows // held if held else 0, "fixed": _cache_bytes(layer) - grows,
                     "window": int(window) if isinstance(window, int) and window > 0 else None})
    return rows


@torch.no_grad()
def measure_kv(model) -> list[dict] | None:
    """``kv_rows`` of one forward of ``KV_PROBE`` tokens (``prune`` takes them from its checkpoint
    check's forward instead, ``save.verify_checkpoint``: no forward of its own)."""
    from .load import input_device

    ids = torch.full((1, KV_PROBE), 1, dtype=torch.long, device=input_device(model))
    return kv_rows(getattr(model(input_ids=ids, use_cache=True), "past_key_values", None))


def kv_total(rows: list[dict], context: int, batch: int) -> int:
    """The cache of ``batch`` sequences of ``context`` tokens: each layer's fixed part plus its
    growth up to its window."""
    return batch * sum(r["fixed"] + r["per_token"] * (min(context, r["window"]) if r["window"] else context)
                       for r in rows)


def static_cost(model, adapter: MoEAdapter | None) -> dict:
    """The figures that need no forward: weights, parameters, active parameters, FLOPs, experts, top-k
    (``adapter`` None: a dense model, every parameter of its language stack active, no experts)."""
    params, active, matmul = active_params(model, adapter)
    layers = find_moe_layers(model, adapter) if adapter is not None else []
    return {"weight_bytes": weight_bytes(model), "params": params, "active_params": active,
            "flops_per_token": 2 * matmul, "top_k": top_k(model.config, adapter) if adapter is not None else None,
            "experts": layers[0].num_experts if layers else None}


def finish(static: dict, kv: list[dict] | None, *, gpu_memory: str | int = DEFAULT_GPU_MEMORY,
           context: int = DEFAULT_CONTEXT, batch: int = DEFAULT_BATCH) -> Cost:
    """``static_cost`` with the KV cache (``measure_kv``; None: not measured) and the GPU count."""
    memory = parse_bytes(gpu_memory)
    cache = kv_total(kv, context, batch) if kv is not None else None
    gpus = math.ceil((static["weight_bytes"] + cache) / (memory * USABLE)) if cache is not None else None
    return Cost(**static, kv_bytes_per_token=sum(r["per_token"] for r in kv) if kv is not None else None,
                kv_fixed_bytes=sum(r["fixed"] for r in kv) if kv is not None else None,
                kv_bytes=cache, context=context, batch=batch, gpu_memory=memory, gpus=gpus)


def serving_cost(model, adapter: MoEAdapter | None, *, gpu_memory: str | int = DEFAULT_GPU_MEMORY,
                 context: int = DEFAULT_CONTEXT, batch: int = DEFAULT_BATCH, kv: list[dict] | None = None,
                 measure: bool = True) -> Cost:
    """The :class:`Cost` of ``model``; ``kv`` reuses a ``measure_kv`` result (pruning experts does not
    change the cache), ``measure=False`` skips it (a model without weights)."""
    if kv is None and measure:
        kv = measure_kv(model)
    return finish(static_cost(model, adapter), kv, gpu_memory=gpu_memory, context=context, batch=batch)


def _pct(before: float, after: float) -> str:
    """The change in percent: whole points from 10% up, one decimal below (a router's rows: -0.4%)."""
    if not before:
        return "n/a"
    change = (after - before) / before
    return f"{change:+.0%}" if abs(change) >= 0.1 else f"{change:+.1%}"


def release_note(before: Cost, after: Cost) -> str:
    """One line, as a release note reads: "-48% weight memory, fits 1 GPU instead of 2, ...". """
    parts = [f"{_pct(before.weight_bytes, after.weight_bytes)} weight memory"]
    if before.gpus is not None and after.gpus is not None:
        unit = "GPU" if after.gpus == 1 else "GPUs"
        parts.append(f"fits {after.gpus} {unit} instead of {before.gpus}" if after.gpus != before.gpus
                     else f"still {after.gpus} {unit}")
    parts.append("active parameters per token unchanged" if after.active_params == before.active_params
                 else f"{_pct(before.active_params, after.active_params)} active parameters per token")
    return ", ".join(parts) + (f" ({after.gpu_memory / 2**30:g} GiB GPUs, batch {after.batch} x "
                               f"{after.context:,} tokens of KV cache)")


def size(n: int) -> str:
    """Bytes in the largest decimal unit that keeps a number >= 1: 1.05 GB, 512 B."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n} B"


def cost_table(before: Cost, after: Cost | None = None) -> str:
    """Markdown: the figures before (and after) pruning."""
    rows = [("weight memory", lambda c: size(c.weight_bytes)),
            ("parameters", lambda c: f"{c.params:,}"),
            ("active parameters / token", lambda c: f"{c.active_params:,}"),
            ("FLOPs / token (2N, weights)", lambda c: f"{c.flops_per_token:,}"),
            ("experts / MoE layer, top-k", lambda c: "dense" if c.experts is None else f"{c.experts}, {c.top_k}"),
            ("KV cache / token", lambda c: "n/a" if c.kv_bytes_per_token is None else size(c.kv_bytes_per_token)),
            (f"KV cache, batch {(after or before).batch} x {(after or before).context:,} tokens",
             lambda c: "n/a" if c.kv_bytes is None else size(c.kv_bytes)),
            (f"GPUs of {(after or before).gpu_memory / 2**30:g} GiB", lambda c: "n/a" if c.gpus is None else str(c.gpus))]
    cols = ["before", "after"] if after is not None else ["value"]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(c) for c in (before, after) if c is not None) + " |")
    return "\n".join(lines)
