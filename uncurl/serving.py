"""Serving, measured: prefill and decode tokens/s and peak memory on the run's own device (opt-in).

    uncurl cost --model pruned/ --measure-serving --context 4096 --serving-batch 8
    uncurl prune ... --measure-serving       # the model before and after, in the report and the card

``cost.py`` counts what a model costs from its tensors; this module times it, when asked
(``--measure-serving``). One repeat is a prefill of ``batch`` sequences of ``context`` random token
ids (seeded) with transformers' own KV cache, then ``decode_tokens`` greedy single-token steps on
that cache. A short warm-up forward runs first and is not counted. Repeats stop once ``seconds``
have passed (a repeat is never cut in half, and at least one runs), so a run is bounded by about
``seconds`` plus one repeat. The spread of the repeats is reported (min, median, max), with the
device, batch, context and the number of repeats done.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, summed over every GPU the model runs on
(``devices.used_devices``: one, or those of a ``--device-map``; each is also reported), weights
included; the timings synchronise all of them. On the CPU it is not measured (n/a): the process's resident size mixes the
allocator's caches, the tokenizer and Python, and a high-water mark cannot be reset between models.
The context is capped at the model's ``max_position_embeddings`` less the decode steps (the tiny
built-in models have 512), and the capped value is what is reported.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

from .cost import DEFAULT_BATCH, DEFAULT_CONTEXT, DEFAULT_GPU_MEMORY
from .options import opt

SERVING = "Serving cost"  # --help panel
DEFAULT_REPEATS, DEFAULT_SECONDS, DEFAULT_DECODE = 3, 60.0, 32


@dataclass
class ServingOptions:
    """The serving-cost options prune and cost share (cost.py counts, this module times)."""

    gpu_memory: str = opt(
        DEFAULT_GPU_MEMORY, panel=SERVING,
        help="Memory of one serving GPU, e.g. 80GiB (an H100/A100 80GB, the default), 24GB: the cost table "
             "counts how many hold the weights plus the KV cache of --serving-batch x --context tokens (90% of each).")
    context: int = opt(DEFAULT_CONTEXT, panel=SERVING, min=1,
                       help="Tokens per sequence the KV cache (and --measure-serving) is counted at.")
    serving_batch: int = opt(DEFAULT_BATCH, panel=SERVING, min=1,
                             help="Sequences served at once, for the KV cache (and --measure-serving).")
    measure_serving: bool = opt(
        False, "--measure-serving", panel=SERVING,
        help="Also time the model on this run's device (prune: before and after): prefill and decode tokens/s "
             "at --serving-batch x --context and peak memory (CUDA; n/a on CPU), over --serving-repeats repeats "
             "(min/median/max), stopping after --serving-seconds.")
    serving_repeats: int = opt(DEFAULT_REPEATS, panel=SERVING, min=1,
                               help="With --measure-serving: repeats per model (fewer if --serving-seconds runs out).")
    serving_seconds: float = opt(
        DEFAULT_SECONDS, panel=SERVING,
        help="With --measure-serving: no repeat starts after this many seconds per model (at least one runs).")
    decode_tokens: int = opt(DEFAULT_DECODE, panel=SERVING, min=1,
                             help="With --measure-serving: greedy decode steps timed per repeat.")


def _sync(devices: list[torch.device]) -> None:
    """Wait for the work queued on every CUDA device in ``devices`` (a timing ends when all are done)."""
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _spread(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


@torch.no_grad()
def measure_serving(model, *, batch: int = DEFAULT_BATCH, context: int = DEFAULT_CONTEXT,
                    repeats: int = DEFAULT_REPEATS, seconds: float = DEFAULT_SECONDS,
                    decode_tokens: int = DEFAULT_DECODE, seed: int = 0) -> dict:
    """Prefill and decode tokens/s of ``model`` on its own device (see the module doc)."""
    from .devices import used_devices
    from .load import input_device

    device = input_device(model)
    gpus = [d for d in used_devices(model) if d.type == "cuda"]
    config = model.config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    ctx = min(context, limit - decode_tokens) if isinstance(limit, int) and limit > decode_tokens else context
    vocab = int(getattr(config, "vocab_size", 256) or 256)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, ctx), generator=g).to(device)
    for gpu in gpus:
        with torch.cuda.device(gpu):
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(gpu)
    start = time.perf_counter()
    model(input_ids=ids[:, : min(ctx, 8)], use_cache=True)  # warm-up, not counted
    prefill, decode = [], []
    while len(prefill) < repeats and (not prefill or time.perf_counter() - start < seconds):
        _sync(gpus)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(gpus)
        t1 = time.perf_counter()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            del out
        _sync(gpus)
        t2 = time.perf_counter()
        del cache
        prefill.append(batch * ctx / (t1 - t0))
        decode.append(batch * decode_tokens / (t2 - t1))
    elapsed = time.perf_counter() - start
    peaks = {str(gpu): int(torch.cuda.max_memory_allocated(gpu)) for gpu in gpus}
    peak = sum(peaks.values()) if peaks else None
    return {"device": str(device), "device_name": _device_name(device), "dtype": str(next(model.parameters()).dtype),
            "batch": batch, "context": ctx, "context_requested": context, "decode_tokens": decode_tokens,
            "repeats": len(prefill), "repeats_requested": repeats, "cap_s": seconds,
            "capped": len(prefill) < repeats, "elapsed_s": round(elapsed, 3),
            "prefill_tokens_per_s": _spread(prefill), "decode_tokens_per_s": _spread(decode),
            "peak_memory_bytes": peak, "peak_memory_by_device": peaks,
            "peak_memory_note": (f"torch.cuda.max_memory_allocated summed over {', '.join(peaks)} (weights included)"
                                 if peak is not None else "n/a on CPU (not measured)")}


def measure(model, opts: ServingOptions, seed: int = 0) -> dict:
    """``measure_serving`` with the options' batch, context, repeats, cap and decode steps."""
    return measure_serving(model, batch=opts.serving_batch, context=opts.context, repeats=opts.serving_repeats,
                           seconds=opts.serving_seconds, decode_tokens=opts.decode_tokens, seed=seed)


def speedup(before: dict, after: dict, key: str = "decode_tokens_per_s") -> float:
    """after / before of the medians of ``key``."""
    return after[key]["median"] / before[key]["median"]


def serving_note(before: dict, after: dict) -> str:
    """ "decode x1.0, prefill x1.1 (measured on cpu, ...)" for the release note."""
    return (f"decode x{speedup(before, after):.2f}, prefill x{speedup(before, after, 'prefill_tokens_per_s'):.2f} "
            f"(measured on {after['device']}, median of {after['repeats']})")


def _rate(m: dict, key: str) -> str:
    s = m[key]
    return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"


def serving_table(measured: dict) -> str:
    """Markdown: the measured figures, one column per model (``{"before": m, "after": m}`` or ``{"value": m}``)."""
    from .cost import size

    cols = list(measured)
    first = measured[cols[0]]
    rows = [("prefill tokens/s, median (min-max)", lambda m: _rate(m, "prefill_tokens_per_s")),
            ("decode tokens/s, median (min-max)", lambda m: _rate(m, "decode_tokens_per_s")),
            ("peak memory", lambda m: "n/a" if m["peak_memory_bytes"] is None else size(m["peak_memory_bytes"])),
            ("repeats (cap s)", lambda m: f"{m['repeats']} ({m['cap_s']:g})")]
    lines = [f"Measured on {first['device']} ({first['device_name']}, {first['dtype']}): batch {first['batch']} x "
             f"{first['context']:,} tokens of prefill, then {first['decode_tokens']} decode steps.", "",
             "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(measured[c]) for c in cols) + " |")
    return "\n".join(lines)
