"""make bench: uncurl's own cost, as ratios measured side by side in one run.

    make bench                         # or: .venv/bin/python -m benchmarks.run --hidden 512
    make bench BENCH_ARGS="--device cuda"   # on a GPU machine: benchmarks/results/bench-cuda.json

Builds a Mixtral in-process (default ~60M parameters, fp32, random weights: speed does not depend
on what the weights learned), then measures on the same batches:
- profile time (every statistic on: router statistics, REAP/EAN output norms from the recording
  experts, the router-logit sample) / plain forward time (`model(...)` with no hooks, same inputs
  and logits_to_keep); goal <= 1.10; and the peak RSS growth of each, in fresh processes (goal:
  unchanged);
- prune wall time (profile + cluster + merge + save + verify) / (one forward + save of the
  original); goal <= 1.5;
- bytes of the pruned checkpoint / bytes its parameter count predicts; goal 1.00 +- 0.01;
- peak resident memory while profiling ~1k, 10k and 100k tokens (each in a fresh process, a
  smaller model, after one full warm-up batch); goal: flat. (Growth over the warm-up RSS is also
  recorded, but the allocator returns memory between batches, so it is noisier than the peak.)
- `uncurl prune` from a checkpoint on disk (--prune-hidden, default ~490 MB fp32), in a fresh
  process: peak resident memory / weight bytes (goal <= 1.2), per stage; and its wall time /
  (load + one forward over the same calibration batches + save), the latter timed in another
  fresh process, which also gives the memory floor any forward-based tool needs. Memory is
  VmHWM (reset per stage through /proc/self/clear_refs) minus the RSS after a warm-up run of the
  same code on a tiny model, so interpreter and library pages are not counted as model memory.
- how prune time grows with experts (8, 32, 128) and layers (2, 4, 8) at a fixed expert size:
  seconds per stage and seconds per million parameters; goal: linear (flat per parameter).
- the profile pipelines side by side (`--only pipelines`, ~1-3 minutes on 2 CPU cores): a Mixtral saved to
  disk (--pipeline-hidden, default ~55 MB fp32), profiled at 8 and 256 samples resident (whole), with
  `--device-map auto --max-memory cpu=<weights/4>` (disk offload) whole, and the same sequential:
  bytes of offloaded weights read (``offload.READS``, accelerate's own reads counted too) over the
  checkpoint's bytes, and wall time over the resident run's. One run each (weights in the page cache:
  the cheapest case for the whole-model pass).
- an FP8 checkpoint against its dequantized twin (`--only quantized`, --quant-hidden, default a
  qwen3_moe of ~30 MB in FP8): `uncurl prune --keep 8` of each with `reap` (copies the kept experts'
  FP8 bytes) and `uncurl` (re-quantizes merged experts), in fresh processes: wall time, peak RSS and
  bytes written, min/median/max of --repeats runs, and FP8 over twin.
- evaluation (`--only evaluation`): `evaluate_examples` on 64 RTE examples over one plain forward of
  the rows it must score, with RTE's choices as they are and with one-token choices (which share
  their example's row); goal <= 1.10.
- the default merge's cost (`--only fit`): `uncurl prune` of the 470 MB model with the defaults (auto:
  the fit, layer by layer) against `--merge select`, `--merge aligned` and aligned layer by layer, in
  fresh processes, alternating; per-round ratios of wall and CPU seconds (min/median/max) and peak RSS
  over the weights (goal: <= 1.3x select, peak <= 1.4x).
Each timing figure is the median of --repeats runs. Writes benchmarks/results/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from uncurl.adapters import ADAPTERS
from uncurl.cluster import plan_layer
from uncurl.load import build_tiny, prefer_lean_experts, return_freed_memory
from uncurl.merge import parameter_count, rewrite_model
from uncurl.profile import batches, profile_model
from uncurl.save import verify_checkpoint, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEVICE = torch.device("cpu")  # --device; children get it on their command line


def sync() -> None:
    """Wait for queued GPU work, so a timing covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def gpu_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None


def texts(n: int) -> list[str]:
    corpus = ROOT.parent / "shared" / "data" / "corpus" / "wikitext2_valid.txt"
    words = corpus.read_text().split() if corpus.is_file() else ["token"] * 100_000
    return [" ".join(words[i * 200 : (i + 1) * 200]) for i in range(n)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_alternating(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in alternation (a, b, a, b, ...) so drift hits all."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def profile_memory_child(n_tokens: int) -> None:
    """In a fresh process: resident-memory growth (MB) while profiling ``n_tokens`` tokens."""
    return_freed_memory()  # as load_model does
    model, tok = build_tiny("mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    prefer_lean_experts(model, torch.device("cpu"))
    data = texts(max(1, round(n_tokens / 512)) + 8)  # texts are truncated at 512 tokens
    profile_model(model, tok, ADAPTERS["mixtral"], data[:8], batch_size=8, max_length=512)  # one full batch
    before = rss_mb()
    prof = profile_model(model, tok, ADAPTERS["mixtral"], data[8:], batch_size=8, max_length=512)
    peak = rss_mb("VmHWM:")  # this process's high-water mark (ru_maxrss would inherit the parent's)
    print(json.dumps({"tokens": prof.tokens, "rss_before_mb": round(before, 1), "peak_mb": round(peak, 1),
                      "growth_mb": round(max(peak - before, 0.0), 1)}))


def rss_mb(key: str = "VmRSS:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def profile_memory(token_counts=(1_000, 10_000, 100_000)) -> list[dict]:
    import subprocess
    import sys

    rows = []
    for n in token_counts:
        out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--profile-memory-child", str(n)],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def stage_peaks():
    """Wrap report.Timings.stage so each pipeline stage also records its peak RSS (MB)."""
    from contextlib import contextmanager

    from uncurl import report

    peaks, original = {}, report.Timings.stage

    @contextmanager
    def stage(self, name):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        with original(self, name):
            yield
        peaks[name] = rss_mb("VmHWM:")

    report.Timings.stage = stage
    return peaks


class AnonSampler:
    """Highest RssAnon seen (sampled every 5 ms): memory that cannot be reclaimed, as opposed to the
    clean file-backed pages of memory-mapped files that VmHWM also counts."""

    def __init__(self):
        import threading

        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_mb("RssAnon:"))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def warm_up() -> float:
    """Run the whole pipeline once on a tiny model (imports, kernels, allocator), then the RSS."""
    from uncurl.pipeline import PruneOptions, prune

    with tempfile.TemporaryDirectory() as d:
        prune(PruneOptions(model="builtin:mixtral", task="corpus", data_dir=str(DATA), samples=2, max_length=32,
                           keep=4, out=str(Path(d) / "out"), device=str(DEVICE), merge="aligned"))
    return rss_mb()


# --merge aligned: the bench's figures (and their comparisons with llm-compressor's REAP, which does not fit)
# are of pruning without the fit that the default, auto, adds (its cost: the part "fit", fit_cost)
PRUNE_ARGS = {"task": "corpus", "samples": 32, "max_length": 256, "batch_size": 8, "keep": 4, "device": "cpu",
              "merge": "aligned"}


def prune_memory_child(arg: str) -> None:
    """In a fresh process: `prune` of the checkpoint in ``folder``; peak RSS per stage, wall time."""
    from uncurl.pipeline import PruneOptions, prune

    folder, batch, max_memory, *extra = arg.split("::")
    PRUNE_ARGS["batch_size"] = int(batch)
    if extra and extra[0]:
        PRUNE_ARGS["method"] = extra[0]
    if len(extra) > 1:  # other options as JSON, e.g. {"samples": 256, "pipeline": "sequential"}
        PRUNE_ARGS.update(json.loads(extra[1]))
    PRUNE_ARGS["device"] = str(DEVICE)
    placement = {"device_map": "auto", "max_memory": max_memory, "device": "auto"} if max_memory else {}
    base = warm_up()
    base_anon = rss_mb("RssAnon:")
    peaks = stage_peaks()
    with tempfile.TemporaryDirectory(dir=Path(folder).parent) as d, AnonSampler() as anon:
        start, cpu = time.perf_counter(), time.process_time()
        result = prune(PruneOptions(model=folder, out=str(Path(d) / "out"), data_dir=str(DATA),
                                    **{**PRUNE_ARGS, **placement}))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"baseline_mb": base, "stage_peak_mb": {k: round(v - base, 1) for k, v in peaks.items()},
                      "peak_mb": round(max(peaks.values()) - base, 1), "seconds": wall, "cpu_seconds": cpu,
                      "peak_anon_mb": round(anon.peak - base_anon, 1),
                      "stage_seconds": result.report["timings_s"], "weight_bytes": result.report["model"]["bytes_before"],
                      "weight_bytes_after": result.report["model"]["bytes_after"],
                      "format": result.report["model"].get("format"),
                      "placement": result.report["model"]["placement"], "gpu_peak_mb": gpu_peak_mb(),
                      "offloaded_bytes": result.report["model"].get("offloaded_bytes", 0),
                      "offload_reads_bytes": result.report.get("offload_reads_bytes", {}),
                      "tokens": result.report["task"]["tokens"],
                      "layer_by_layer": result.report.get("pipeline", {}).get("layer_by_layer"),
                      "merge": result.report.get("merge")}))


def floor_child(arg: str) -> None:
    """In a fresh process: load + one plain forward over the same batches + save: time and peak."""
    from uncurl.load import load_model
    from uncurl.pipeline import DataOptions, calibration_texts

    folder, batch = arg.split("::")
    PRUNE_ARGS["batch_size"] = int(batch)
    base = warm_up()
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    loaded = load_model(folder, device=str(DEVICE))
    texts_, _ = calibration_texts(DataOptions(task="corpus", data_dir=str(DATA), samples=PRUNE_ARGS["samples"]), 0)
    with torch.no_grad():
        for b in batches(loaded.tokenizer, texts_, batch_size=PRUNE_ARGS["batch_size"], max_length=PRUNE_ARGS["max_length"]):
            b = b.to(DEVICE)
            loaded.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1,
                         use_cache=False)
    with tempfile.TemporaryDirectory(dir=Path(folder).parent) as d:
        write_checkpoint(loaded.model, loaded.tokenizer, Path(d))
    sync()
    wall = time.perf_counter() - start
    print(json.dumps({"seconds": wall, "peak_mb": round(rss_mb("VmHWM:") - base, 1), "gpu_peak_mb": gpu_peak_mb()}))


def profile_peak_child(arg: str) -> None:
    """In a fresh process: peak RSS growth (MB) of one plain forward pass over the calibration
    batches, or of profiling them with every statistic ("plain" or "profile"), after a warm-up of both."""
    mode, hidden, layers, experts, samples = arg.split("::")
    return_freed_memory()
    model, tok = build_tiny("mixtral", hidden_size=int(hidden), intermediate_size=2 * int(hidden),
                            num_hidden_layers=int(layers), num_local_experts=int(experts),
                            num_attention_heads=8, num_key_value_heads=8)
    model = model.to(DEVICE)
    prefer_lean_experts(model, DEVICE)
    data = texts(int(samples))
    enc = [b.to(DEVICE) for b in batches(tok, data, batch_size=8, max_length=512)]

    @torch.no_grad()
    def plain():
        for b in enc:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1, use_cache=False)

    def profile():
        profile_model(model, tok, ADAPTERS["mixtral"], data, batch_size=8, max_length=512)

    plain()
    profile()
    before = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")
    (plain if mode == "plain" else profile)()
    print(json.dumps({"peak_growth_mb": round(max(rss_mb("VmHWM:") - before, 0.0), 1)}))


def profile_peaks(args) -> dict:
    """Median peak growth of a plain forward and of profiling, each in fresh processes."""
    spec = f"{args.hidden}::{args.layers}::{args.experts}::{args.samples}"
    runs = {mode: [child("--profile-peak-child", f"{mode}::{spec}")["peak_growth_mb"] for _ in range(args.repeats)]
            for mode in ("plain", "profile")}
    return {"runs": runs, **{mode: statistics.median(v) for mode, v in runs.items()}}


def child(flag: str, arg: str) -> dict:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", str(DEVICE), flag, arg],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def prune_memory(hidden: int, repeats: int) -> dict:
    """Save a Mixtral of ``hidden`` to disk, then prune it and run the floor, each in fresh processes."""
    model, tok = build_tiny("mixtral", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                            num_local_experts=8, num_attention_heads=8, num_key_value_heads=8)
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as d:
        folder = Path(d) / "model"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
        out = {"weight_mb": None, "prune_args": PRUNE_ARGS}
        for batch in (8, 1):
            prunes = [child("--prune-memory-child", f"{folder}::{batch}::") for _ in range(repeats)]
            floors = [child("--floor-child", f"{folder}::{batch}") for _ in range(repeats)]
            weight_mb = prunes[0]["weight_bytes"] / 2**20
            out["weight_mb"] = round(weight_mb, 1)
            median = statistics.median
            out[f"batch_{batch}"] = {
                "runs": prunes, "floor_runs": floors,
                "peak_over_weights": round(median(p["peak_mb"] for p in prunes) / weight_mb, 3),
                "anon_peak_over_weights": round(median(p["peak_anon_mb"] for p in prunes) / weight_mb, 3),
                "floor_peak_over_weights": round(median(f["peak_mb"] for f in floors) / weight_mb, 3),
                "prune_over_load_forward_save": round(median(p["seconds"] for p in prunes)
                                                      / median(f["seconds"] for f in floors), 3),
            }
        # a model 4x bigger than the memory it may use: --device-map auto --max-memory cpu=<weights/4>
        budget = f"cpu={int(out['weight_mb'] / 4)}MiB"
        offloaded = [child("--prune-memory-child", f"{folder}::8::{budget}") for _ in range(repeats)]
        resident = median(r["seconds"] for r in out["batch_8"]["runs"])
        out["offloaded"] = {"max_memory": budget, "runs": offloaded,
                            "peak_over_weights": round(median(p["peak_mb"] for p in offloaded) / out["weight_mb"], 3),
                            "anon_peak_over_weights": round(median(p["peak_anon_mb"] for p in offloaded)
                                                            / out["weight_mb"], 3),
                            "time_over_resident": round(median(p["seconds"] for p in offloaded) / resident, 3)}
    return out


def scaling(repeats: int) -> list[dict]:
    """Prune stages timed in-process at a fixed expert size, varying experts and then layers."""
    adapter = ADAPTERS["mixtral"]
    data = texts(16)
    rows = []
    configs = ((8, 4), (32, 4), (128, 4), (8, 2), (8, 8))
    for i, (experts, layers) in enumerate(((8, 2), *configs)):  # the first is a warm-up, not reported
        model, tok = build_tiny("mixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                num_local_experts=experts, num_attention_heads=4, num_key_value_heads=4)
        model = model.to(DEVICE)
        prefer_lean_experts(model, DEVICE)
        seconds: dict[str, list[float]] = {}
        for _ in range(repeats):
            t = {}
            start = time.perf_counter()
            prof = profile_model(model, tok, adapter, data, batch_size=8, max_length=256)
            t["profile"] = time.perf_counter() - start
            start = time.perf_counter()
            plans = {n: plan_layer(st, experts // 2, "uncurl") for n, st in prof.layers.items()}
            t["cluster"] = time.perf_counter() - start
            start = time.perf_counter()
            new = rewrite_model(model, adapter, plans, router_rule="mean", merge="average")
            t["merge"] = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as d:
                start = time.perf_counter()
                write_checkpoint(new, tok, Path(d))
                t["save"] = time.perf_counter() - start
                del new
                start = time.perf_counter()
                verify_checkpoint(Path(d), adapter, experts // 2, 2, tok)
                t["verify"] = time.perf_counter() - start
            for k, v in t.items():
                seconds.setdefault(k, []).append(v)
        if i == 0:
            continue
        med = {k: round(statistics.median(v), 4) for k, v in seconds.items()}
        params = parameter_count(model)
        rows.append({"experts": experts, "layers": layers, "params": params, "seconds": med,
                     "total_s": round(sum(med.values()), 4),
                     "s_per_mparam": round(sum(med.values()) / (params / 1e6), 5),
                     "s_per_mparam_without_profile": round((sum(med.values()) - med["profile"]) / (params / 1e6), 5)})
    return rows


@contextmanager
def mixtral_on_disk(hidden: int, layers: int = 4):
    """A Mixtral of ``hidden`` (8 experts) saved to a temporary folder: (folder, checkpoint bytes,
    ``--max-memory`` of a quarter of them, bytes of one decoder layer, bytes outside the layers)."""
    model, tok = build_tiny("mixtral", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_local_experts=8, num_attention_heads=8, num_key_value_heads=8)
    outside = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers." not in n)
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as d:
        folder = Path(d) / "model"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
        checkpoint = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        yield folder, checkpoint, f"cpu={max(1, checkpoint // 4 // 2**20)}MiB", layer, outside


def pipelines(hidden: int, sample_counts=(8, 256), max_length: int = 64) -> dict:
    """Profile time and offloaded bytes read: resident, disk-offloaded whole, disk-offloaded sequential."""
    from uncurl.load import load_model
    from uncurl.offload import READS, counting, offloaded_bytes
    from uncurl.pipeline import ProfileOptions, run_profile

    out = {"max_length": max_length, "batch_size": 8, "rows": []}
    with mixtral_on_disk(hidden) as (folder, checkpoint, budget, _, _):
        out.update(checkpoint_mb=round(checkpoint / 2**20, 1), max_memory=budget)
        # every row through accelerate (resident: --device-map auto, no limit), so all run the same
        # experts implementation (a plain CPU load switches to eager experts, load.prefer_lean_experts)
        runs = [("resident", "whole", None), ("offload", "whole", budget), ("offload", "sequential", budget)]
        for round_, samples in enumerate((sample_counts[0], *sample_counts)):  # round 0 warms up, not reported
            resident_s = None
            for placement, pipeline, limit in runs:
                loaded = load_model(str(folder), device_map="auto", max_memory=limit)
                opts = ProfileOptions(model=str(folder), task="superglue-rte", data_dir=str(DATA), samples=samples,
                                      max_length=max_length, batch_size=8, pipeline=pipeline)
                offloaded = offloaded_bytes(loaded.model)
                with counting(loaded.model):
                    READS.reset()
                    start = time.perf_counter()
                    profile = run_profile(loaded, opts, 0)
                    sync()
                    seconds = time.perf_counter() - start
                    read = READS.bytes
                resident_s = resident_s or seconds
                if round_ == 0:
                    del loaded, profile
                    continue
                out["rows"].append({"samples": samples, "placement": placement, "pipeline": pipeline,
                                    "tokens": profile.tokens, "seconds": round(seconds, 3),
                                    "time_over_resident": round(seconds / resident_s, 3),
                                    "offloaded_mb": round(offloaded / 2**20, 1), "read_mb": round(read / 2**20, 1),
                                    "read_over_checkpoint": round(read / checkpoint, 3)})
                print(out["rows"][-1], flush=True)
                del loaded, profile
                return_freed_memory()
    return out


def offload_prune(hidden: int, repeats: int, sample_counts=(8, 256), max_length: int = 64) -> dict:
    """``uncurl prune`` of a Mixtral 4x larger than the CPU memory it may use (``--device-map auto
    --max-memory cpu=<weights/4>``: the rest offloaded to disk), whole-model and layer by layer, beside
    the resident run, at 8 and 256 samples; each run in a fresh process. Per run: bytes of weights
    read from the input (the resident part once at load, plus every offloaded read before the check
    of the written checkpoint: ``report.offload_reads_bytes``) over the checkpoint's bytes, peak RSS
    (and anonymous RSS: what the page cache cannot take back) over the weights and over one decoder
    layer plus the cached states, wall time over the resident run's."""
    layers = 4
    out = {"max_length": max_length, "batch_size": 8, "rows": []}
    with mixtral_on_disk(hidden, layers) as (folder, checkpoint, budget, layer_bytes, embed):
        out.update(checkpoint_mb=round(checkpoint / 2**20, 1), max_memory=budget, layer_mb=round(layer_bytes / 2**20, 1),
                   outside_layers_mb=round(embed / 2**20, 1), layers=layers, hidden=hidden)
        runs = [("resident", "whole", ""), ("offload", "whole", budget), ("offload", "sequential", budget)]
        median = statistics.median
        for samples in sample_counts:
            resident_s = None
            for placement, pipeline, limit in runs:
                extra = json.dumps({"samples": samples, "max_length": max_length, "pipeline": pipeline,
                                    "method": "reap", "plots": False})
                got = [child("--prune-memory-child", f"{folder}::8::{limit}::reap::{extra}") for _ in range(repeats)]
                seconds = sorted(r["seconds"] for r in got)
                resident_s = resident_s or median(seconds)
                r0 = got[0]
                resident_part = checkpoint - r0["offloaded_bytes"]  # read once, at load
                read = resident_part + sum(v for k, v in r0["offload_reads_bytes"].items() if k != "verify")
                states = r0["tokens"] * hidden * 4  # one copy of the calibration set's hidden states (float32)
                peaks, anon = sorted(r["peak_mb"] for r in got), sorted(r["peak_anon_mb"] for r in got)
                row = {"samples": samples, "placement": placement, "pipeline": pipeline,
                       "layer_by_layer": r0["layer_by_layer"], "tokens": r0["tokens"],
                       "seconds": [seconds[0], median(seconds), seconds[-1]],
                       "time_over_resident": round(median(seconds) / resident_s, 3),
                       "read_over_checkpoint": round(read / checkpoint, 3),
                       "reads_by_stage_mb": {k: round(v / 2**20, 1) for k, v in r0["offload_reads_bytes"].items()},
                       "peak_mb": [peaks[0], median(peaks), peaks[-1]], "anon_peak_mb": [anon[0], median(anon), anon[-1]],
                       "peak_over_weights": round(median(peaks) / (checkpoint / 2**20), 3),
                       "anon_peak_over_weights": round(median(anon) / (checkpoint / 2**20), 3),
                       "states_mb": round(states / 2**20, 1),
                       "anon_peak_over_layer_plus_states": round(median(anon) / ((layer_bytes + states) / 2**20), 3),
                       "stage_seconds": r0["stage_seconds"]}
                out["rows"].append(row)
                print({k: row[k] for k in ("samples", "placement", "pipeline", "seconds", "read_over_checkpoint",
                                           "anon_peak_mb", "time_over_resident")}, flush=True)
    return out


def ranks(hidden: int, repeats: int, samples: int = 256, max_length: int = 64) -> dict:
    """``uncurl profile`` in one process (torch on every core) against ``torchrun --nproc-per-node 2``
    (gloo; each rank one core, OMP_NUM_THREADS=1), wall time of the whole command, same model and
    texts, each pipeline; the machine's load average is recorded beside (other work skews it)."""
    import subprocess
    import sys

    out = {"hidden": hidden, "samples": samples, "max_length": max_length, "rows": [], "load_average": []}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    with mixtral_on_disk(hidden) as (folder, *_):
        d = folder.parent
        args = ["profile", "--model", str(folder), "--task", "superglue-rte", "--data-dir", str(DATA), "--samples",
                str(samples), "--max-length", str(max_length), "--batch-size", "8"]
        for pipeline in ("whole", "sequential"):
            times = {}
            for nproc in (1, 2):
                launch = [sys.executable, "-m", "uncurl"] if nproc == 1 else [
                    torchrun, "--standalone", "--nproc-per-node", "2", "-m", "uncurl"]
                env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if nproc > 1 else {})}
                times[nproc] = []
                for r in range(repeats):
                    target = Path(d) / f"p-{pipeline}-{nproc}-{r}.profile"
                    start = time.perf_counter()
                    subprocess.run([*launch, *args, "--pipeline", pipeline, "--out", str(target)], check=True, env=env,
                                   capture_output=True, cwd=ROOT)
                    times[nproc].append(time.perf_counter() - start)
                    out["load_average"].append(os.getloadavg()[0])
            one, two = (sorted(times[n]) for n in (1, 2))
            median = statistics.median
            out["rows"].append({"pipeline": pipeline, "one_process_s": [one[0], median(one), one[-1]],
                                "two_ranks_s": [two[0], median(two), two[-1]],
                                "two_ranks_over_one": round(median(two) / median(one), 3)})
            print(out["rows"][-1], flush=True)
    return out


def evaluation(hidden: int, repeats: int, n_examples: int = 64) -> dict:
    """Evaluation time over one plain forward of the rows it must score (the unavoidable work):
    RTE as it is (multi-token choices under the byte tokenizer: a row per choice) and RTE with
    one-token choices ("T"/"F": the choices share their example's row, lm-eval's one-token cache)."""
    from uncurl.evaluate import build_requests, evaluate_examples, forward_rows, shared_inputs
    from uncurl.tasks import Example, get_task, load_examples

    model, tok = build_tiny("mixtral", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                            num_local_experts=8, num_attention_heads=8, num_key_value_heads=8)
    model = model.to(DEVICE)
    prefer_lean_experts(model, DEVICE)
    rte = load_examples(get_task("superglue-rte"), "evaluation", DATA, limit=n_examples, seed=0)
    sets = {"multi_token": rte,
            "one_token": [Example(e.prompt.rstrip(), ("T", "F"), e.gold) for e in rte]}
    out = {"model": {"params": parameter_count(model), "hidden": hidden}, "examples": n_examples, "rows": {}}
    for name, examples in sets.items():
        requests = build_requests(tok, examples, 512)
        inputs = shared_inputs(requests)  # the rows evaluation forwards, batched as it batches them
        padded = [(ids.to(DEVICE), mask.to(DEVICE)) for _, ids, mask in forward_rows(inputs, 8, 0)]

        @torch.no_grad()
        def plain():
            for ids, mask in padded:
                model(input_ids=ids, attention_mask=mask, use_cache=False)

        def scored():
            evaluate_examples(model, tok, examples, batch_size=8, max_length=512)

        plain(), scored()  # warm-up
        times = {"plain": [], "eval": []}
        for _ in range(repeats):
            for key, fn in (("plain", plain), ("eval", scored)):
                start = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - start)
        out["rows"][name] = {"requests": len(requests), "rows_forwarded": len(inputs),
                             "seconds": {k: spread(v) for k, v in times.items()},
                             "eval_over_plain": round(statistics.median(times["eval"]) / statistics.median(times["plain"]), 3)}
    return out


def spread(values) -> list[float]:
    """[min, median, max] of ``values``, rounded."""
    return [round(min(values), 3), round(statistics.median(values), 3), round(max(values), 3)]


def fit_cost(hidden: int, repeats: int) -> dict:
    """What the default merge (auto, which fits here) costs over ``--merge select`` and ``--merge
    aligned`` (for the default criterion, EAN, both keep the experts as they are), each prune in a
    fresh process, the cells in alternation, against the floor (load, one plain forward of the
    calibration batches, save). The fit runs layer by layer (auto's pipeline for it), so aligned is
    timed both whole (its own default) and layer by layer: the last ratio is the fit's own cost.
    Ratios are per round (each cell ran once per round, one after the other), as min/median/max
    over the rounds: the machine's load moves between rounds more than within one. CPU seconds
    (the process's, all threads) are given beside wall seconds: less moved by other work on the
    machine."""
    cells = {"select": {"merge": "select"}, "aligned": {}, "aligned_layer_by_layer": {"pipeline": "sequential"},
             "default_fit": {"merge": "auto"}}
    with mixtral_on_disk(hidden) as (folder, checkpoint, *_):
        runs = {name: [] for name in [*cells, "floor"]}
        load = []  # the 1-minute load average as each round starts, and at the end (the machine is shared)
        for _ in range(repeats):
            load.append(round(os.getloadavg()[0], 2))
            for name, extra in cells.items():
                # batch 8, no --max-memory, no --method, then the options
                runs[name].append(child("--prune-memory-child", f"{folder}::8::::::{json.dumps(extra)}"))
            runs["floor"].append(child("--floor-child", f"{folder}::8"))
        load.append(round(os.getloadavg()[0], 2))
    weight_mb = checkpoint / 2**20
    rows = {name: {"seconds": spread([r["seconds"] for r in rs]),
                   **({"cpu_seconds": spread([r["cpu_seconds"] for r in rs])} if "cpu_seconds" in rs[0] else {}),
                   "peak_over_weights": spread([r["peak_mb"] / weight_mb for r in rs])}
            for name, rs in runs.items()}
    for name in cells:
        rows[name]["over_floor"] = round(rows[name]["seconds"][1] / rows["floor"]["seconds"][1], 3)
        rows[name]["layer_by_layer"] = runs[name][0]["layer_by_layer"]

    def ratio(key, over):
        return spread([a[key] / b[key] for a, b in zip(runs["default_fit"], runs[over])])

    fitted = runs["default_fit"][0]
    return {"model": f"mixtral hidden {hidden}, 4 layers, 8 experts, keep {PRUNE_ARGS['keep']}",
            "weight_mb": round(weight_mb, 1), "prune_args": PRUNE_ARGS, "runs": runs, "rows": rows,
            "merge_used": fitted.get("merge"), "goal": "default <= 1.3x select, peak <= 1.4x the weights",
            "load_average": load, "cores": os.cpu_count(),
            "default_over": {over: {"seconds": ratio("seconds", over), "cpu_seconds": ratio("cpu_seconds", over)}
                             for over in ("select", "aligned", "aligned_layer_by_layer")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/bench.json (bench-cuda.json on a GPU)")
    ap.add_argument("--prune-hidden", type=int, default=768, help="hidden size of the prune-memory model")
    ap.add_argument("--pipeline-hidden", type=int, default=256, help="hidden size of the pipelines model")
    ap.add_argument("--quant-hidden", type=int, default=512, help="hidden size of the FP8-vs-twin model")
    ap.add_argument("--offload-hidden", type=int, default=512, help="hidden size of the offload-prune model")
    ap.add_argument("--only", choices=["ratios", "profile_memory", "prune_memory", "scaling", "pipelines", "quantized",
                                       "offload_prune", "ranks", "evaluation", "fit", "huge"],
                    help="run one part (others kept); huge only when named (benchmarks/huge.py)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] to benchmark on a GPU (host RSS is "
                    "still measured; GPU peaks are added as gpu_peak_mb)")
    ap.add_argument("--huge-dir", type=Path, default=Path("/work/bigtwin"), help="--only huge: where its twin (~32 GB, "
                    "kept for later runs) and temporary outputs go; outside any git repository")
    ap.add_argument("--huge-layers", type=int, default=25, help="--only huge: decoder layers of the twin (48 real)")
    ap.add_argument("--huge-keep", type=int, default=8, help="--only huge: experts kept of 128")
    ap.add_argument("--huge-samples", type=int, default=16, help="--only huge: calibration samples")
    ap.add_argument("--huge-max-length", type=int, default=64, help="--only huge: calibration tokens per sample")
    ap.add_argument("--huge-max-memory", default="cpu=4GiB", help="--only huge: --max-memory of the prunes")
    ap.add_argument("--huge-rerun", action="store_true", help="--only huge: measure again what huge.json has")
    ap.add_argument("--profile-memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prune-memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--floor-child", help=argparse.SUPPRESS)
    ap.add_argument("--profile-peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.out is None:
        name = "bench.json" if DEVICE.type == "cpu" else f"bench-{DEVICE.type}.json"
        args.out = ROOT / "benchmarks" / "results" / name
    if args.profile_memory_child:
        return profile_memory_child(args.profile_memory_child)
    if args.prune_memory_child:
        return prune_memory_child(args.prune_memory_child)
    if args.floor_child:
        return floor_child(args.floor_child)
    if args.profile_peak_child:
        return profile_peak_child(args.profile_peak_child)
    if args.only == "huge":  # opt-in, its own file: a model larger than this machine (benchmarks/huge.py)
        return huge_part(args)

    parts = {
        "ratios": lambda: ratios(args),
        "profile_memory": profile_memory,
        "prune_memory": lambda: prune_memory(args.prune_hidden, args.repeats),
        "scaling": lambda: scaling(args.repeats),
        "pipelines": lambda: pipelines(args.pipeline_hidden),
        "quantized": lambda: quantized(args.quant_hidden, args.repeats),
        "offload_prune": lambda: offload_prune(args.offload_hidden, args.repeats),
        "ranks": lambda: ranks(args.pipeline_hidden, args.repeats),
        "evaluation": lambda: evaluation(args.pipeline_hidden, args.repeats),
        "fit": lambda: fit_cost(args.prune_hidden, args.repeats),
    }
    result = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    result["device"] = str(DEVICE)
    for name, run in parts.items():
        if args.only in (None, name):
            print(f"running {name} ...", flush=True)
            result[name] = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summarise(result)
    print(f"wrote {args.out}")


def huge_part(args) -> None:
    from benchmarks.huge import huge

    out = ROOT / "benchmarks" / "results" / "huge.json"
    huge(args.huge_dir, args.huge_layers, args.huge_keep, args.huge_samples, args.huge_max_length,
         args.huge_max_memory, out, rerun=args.huge_rerun)
    print(f"wrote {out}")


def stage_line(run: dict) -> str:
    return "    stage peaks (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in run["stage_peak_mb"].items())


def fp8_twin(folder: Path, block: int = 128) -> tuple[Path, Path]:
    """``folder``'s checkpoint written twice: in DeepSeek-V3's FP8 layout (every linear weight but
    the head as float8_e4m3fn with 128x128 ``weight_scale_inv`` blocks) and as its dequantized twin
    (the same values in bfloat16), side by side."""
    import shutil

    from safetensors.torch import load_file, save_file

    from uncurl.quant import CODECS

    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [block, block],
          "modules_to_not_convert": ["lm_head"]}
    codec, state = CODECS["fp8"], load_file(str(folder / "model.safetensors"))
    like = (torch.empty(0, dtype=torch.float8_e4m3fn), torch.empty(0, dtype=torch.float32))
    fp8, twin = {}, {}
    for name, t in state.items():
        if name.endswith(".weight") and t.dim() == 2 and "norm" not in name and "embed" not in name \
                and not name.startswith("lm_head") and not name.endswith(".gate.weight"):
            q, scale = codec.quantize(t, like, qc)
            fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = q, scale
            twin[name] = codec.dequantize(q, (scale,), qc).to(torch.bfloat16)
        else:
            fp8[name] = twin[name] = t.to(torch.bfloat16)
    out = []
    for kind, tensors in (("fp8", fp8), ("twin", twin)):
        dst = folder.parent / kind
        shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((dst / "config.json").read_text())
        config["dtype"] = "bfloat16"
        if kind == "fp8":
            config["quantization_config"] = qc
        (dst / "config.json").write_text(json.dumps(config, indent=2))
        out.append(dst)
    return out[0], out[1]


def quantized(hidden: int, repeats: int) -> dict:
    """`uncurl prune` of an FP8 block-scaled qwen3_moe and of its dequantized bf16 twin, each in fresh
    processes: peak RSS, wall time, bytes in and out; a criterion (copies the kept experts' FP8
    bytes) and a merge (re-quantizes the merged experts)."""
    model, tok = build_tiny("qwen3_moe", hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                            num_hidden_layers=4, num_experts=16, num_attention_heads=8, num_key_value_heads=8,
                            head_dim=hidden // 8)
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as d:
        folder = Path(d) / "plain"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
        fp8, twin = fp8_twin(folder)
        out = {"model": f"qwen3_moe hidden {hidden}, 4 layers, 16 experts of {hidden // 2}, keep {PRUNE_ARGS['keep']}",
               "prune_args": PRUNE_ARGS,
               "bytes": {k: sum(f.stat().st_size for f in p.glob("*.safetensors")) for k, p in (("fp8", fp8), ("twin", twin))}}
        for method in ("reap", "uncurl"):
            for kind, path in (("fp8", fp8), ("twin", twin)):
                runs = [child("--prune-memory-child", f"{path}::8::::{method}") for _ in range(repeats)]
                seconds, peaks = sorted(r["seconds"] for r in runs), sorted(r["peak_mb"] for r in runs)
                out[f"{method}_{kind}"] = {"runs": runs, "format": runs[0]["format"],
                                           "bytes_after": runs[0]["weight_bytes_after"],
                                           "seconds": [seconds[0], statistics.median(seconds), seconds[-1]],
                                           "peak_mb": [peaks[0], statistics.median(peaks), peaks[-1]]}
            f, t = out[f"{method}_fp8"], out[f"{method}_twin"]
            out[f"{method}_fp8_over_twin"] = {"seconds": round(f["seconds"][1] / t["seconds"][1], 3),
                                              "peak": round(f["peak_mb"][1] / t["peak_mb"][1], 3),
                                              "bytes_after": round(f["bytes_after"] / t["bytes_after"], 3)}
    return out


def summarise(result: dict) -> None:
    q = result.get("quantized")
    if q:
        print(f"quantized: {q['model']}; input {q['bytes']['fp8'] / 1e6:.1f} MB FP8, {q['bytes']['twin'] / 1e6:.1f} MB bf16")
        for method in ("reap", "uncurl"):
            f, t, r = q[f"{method}_fp8"], q[f"{method}_twin"], q[f"{method}_fp8_over_twin"]
            print(f"  {method:7s} FP8 {f['seconds'][1]:.1f} s (min {f['seconds'][0]:.1f}, max {f['seconds'][2]:.1f}), "
                  f"peak {f['peak_mb'][1]:.0f} MB, out {f['bytes_after'] / 1e6:.1f} MB | twin {t['seconds'][1]:.1f} s, "
                  f"peak {t['peak_mb'][1]:.0f} MB, out {t['bytes_after'] / 1e6:.1f} MB | FP8/twin time {r['seconds']}, "
                  f"peak {r['peak']}, bytes out {r['bytes_after']}")
    pipes = result.get("pipelines")
    if pipes:
        print(f"pipelines: {pipes['checkpoint_mb']} MB checkpoint, offload --max-memory {pipes['max_memory']}")
        for row in pipes["rows"]:
            print(f"  {row['samples']:4d} samples  {row['placement']:8s} {row['pipeline']:10s} "
                  f"read/checkpoint {row['read_over_checkpoint']:7.3f}  time/resident {row['time_over_resident']:6.2f}")
    rk = result.get("ranks")
    if rk:
        print(f"ranks: uncurl profile, {rk['samples']} samples; torchrun --nproc-per-node 2 over one process "
              f"(load average {min(rk['load_average']):.1f}-{max(rk['load_average']):.1f})")
        for row in rk["rows"]:
            print(f"  {row['pipeline']:10s} one {row['one_process_s'][1]:.2f} s, two ranks {row['two_ranks_s'][1]:.2f} s: "
                  f"{row['two_ranks_over_one']:.2f}x")
    op = result.get("offload_prune")
    if op:
        print(f"offload prune: {op['checkpoint_mb']} MB checkpoint ({op['layer_mb']} MB per decoder layer), "
              f"--max-memory {op['max_memory']}")
        for row in op["rows"]:
            print(f"  {row['samples']:4d} samples  {row['placement']:8s} {row['pipeline']:10s} "
                  f"read/checkpoint {row['read_over_checkpoint']:7.3f}  time/resident {row['time_over_resident']:6.2f}  "
                  f"anon peak {row['anon_peak_mb'][1]:7.1f} MB ({row['anon_peak_over_weights']:.2f}x weights, "
                  f"{row['anon_peak_over_layer_plus_states']:.2f}x layer + states)  peak RSS {row['peak_over_weights']:.2f}x")
    ft = result.get("fit")
    if ft:
        print(f"fit: {ft['model']} ({ft['weight_mb']} MB), {len(ft['runs']['floor'])} rounds of fresh processes: "
              f"median (min-max)")
        for name, row in ft["rows"].items():
            extra = f", {row['over_floor']:.2f}x the floor" if "over_floor" in row else ""
            cpu = f", cpu {row['cpu_seconds'][1]:.1f} s" if "cpu_seconds" in row else ""
            peak = row["peak_over_weights"]
            peak = f"{peak[1]:.2f}x ({peak[0]:.2f}-{peak[2]:.2f})" if isinstance(peak, list) else f"{peak:.2f}x"
            print(f"  {name:24s} {row['seconds'][1]:6.2f} s ({row['seconds'][0]:.2f}-{row['seconds'][2]:.2f}){cpu}{extra}, "
                  f"peak {peak} the weights")
        for over, r in ft.get("default_over", {}).items():
            w, c = r["seconds"], r["cpu_seconds"]
            print(f"  default over {over:22s} wall {w[1]:.2f}x ({w[0]:.2f}-{w[2]:.2f}), cpu {c[1]:.2f}x ({c[0]:.2f}-{c[2]:.2f})")
    ev = result.get("evaluation")
    if ev:
        print(f"evaluation: {ev['examples']} RTE examples, a {ev['model']['params']:,}-parameter Mixtral")
        for name, row in ev["rows"].items():
            print(f"  {name:12s} {row['requests']} requests in {row['rows_forwarded']} rows: eval {row['seconds']['eval'][1]:.2f} s"
                  f" over plain forward of those rows {row['seconds']['plain'][1]:.2f} s = {row['eval_over_plain']:.2f}x")
    r = result.get("ratios")
    if r and "model" in r:
        print(f"ratios: model {r['model']['params']:,} parameters, {r['calibration_tokens']:,} calibration tokens")
        for name, value in r["ratios"].items():
            print(f"  {name:36s} {value:8.3f}   goal {r['goals'][name]}")
        pk = r.get("profile_peak_mb")
        if pk:
            print(f"  peak RSS growth: plain forward {pk['plain']:.0f} MB, profiling {pk['profile']:.0f} MB")
        ei = r.get("experts_implementation")
        if ei:
            print(f"  experts on {result.get('device', 'cpu')}, one batch of {ei['tokens_per_batch']} tokens: " + "; ".join(
                f"{k} {ei[k]['median_seconds']:.2f} s, +{ei[k]['median_peak_growth_mb']:.0f} MB"
                for k in ("grouped_mm", "eager")))
    for row in result.get("profile_memory", []):
        print(f"  profile peak RSS at {row['tokens']:>7,} tokens   {row['peak_mb']:7.1f} MB   goal: flat")
    pm = result.get("prune_memory")
    if pm and "batch_8" in pm:
        print(f"prune from disk, {pm['weight_mb']} MB of weights, {pm['prune_args']['samples']} examples:")
        for batch in (8, 1):
            b = pm[f"batch_{batch}"]
            print(f"  --batch-size {batch}: peak RSS / weight bytes {b['peak_over_weights']:.3f} (goal <= 1.2), "
                  f"anonymous only {b['anon_peak_over_weights']:.3f}; "
                  f"floor (load + forward + save) {b['floor_peak_over_weights']:.3f}; "
                  f"prune time / floor time {b['prune_over_load_forward_save']:.3f} (goal <= 1.5)")
            print(stage_line(b["runs"][0]))
        off = pm.get("offloaded")
        if off:
            print(f"  --device-map auto --max-memory {off['max_memory']}: peak RSS / weight bytes "
                  f"{off['peak_over_weights']:.3f} (anonymous only {off['anon_peak_over_weights']:.3f}), "
                  f"time / resident time {off['time_over_resident']:.3f}, "
                  f"placement {off['runs'][0]['placement']}")
            print(stage_line(off["runs"][0]))
    rows = result.get("scaling")
    if rows:
        print("scaling (hidden 128, expert 256 wide): experts layers params  total_s  s/Mparam  s/Mparam w/o profile")
        for row in rows:
            print(f"  {row['experts']:>7} {row['layers']:>6} {row['params']:>11,} {row['total_s']:8.2f} "
                  f"{row['s_per_mparam']:9.4f} {row['s_per_mparam_without_profile']:9.4f}")


def experts_implementations(model, batch, repeats: int = 3) -> dict:
    """One batch through transformers' grouped_mm and eager experts: seconds and peak RSS growth."""
    out = {}
    batch = batch.to(DEVICE)
    for impl in ("grouped_mm", "eager") * repeats:
        model.set_experts_implementation(impl)
        with torch.no_grad():
            before = rss_mb() if DEVICE.type == "cpu" else torch.cuda.memory_allocated() / 2**20
            Path("/proc/self/clear_refs").write_text("5")
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                  use_cache=False)
            sync()
            seconds = time.perf_counter() - start
            peak = (rss_mb("VmHWM:") if DEVICE.type == "cpu" else gpu_peak_mb()) - before
        row = out.setdefault(impl, {"seconds": [], "peak_growth_mb": []})
        row["seconds"].append(round(seconds, 4))
        row["peak_growth_mb"].append(round(peak, 1))
    for row in out.values():
        row["median_seconds"] = statistics.median(row["seconds"])
        row["median_peak_growth_mb"] = statistics.median(row["peak_growth_mb"])
    out["tokens_per_batch"] = int(batch["attention_mask"].sum())
    return out


def ratios(args) -> dict:
    """Profile / plain forward, prune / (forward + save), checkpoint bytes, all in this process."""
    adapter = ADAPTERS["mixtral"]
    model, tok = build_tiny("mixtral", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_hidden_layers=args.layers, num_local_experts=args.experts,
                            num_attention_heads=8, num_key_value_heads=8)
    model = model.to(DEVICE)
    experts_impl = experts_implementations(model, list(batches(tok, texts(8), batch_size=8, max_length=512))[0])
    prefer_lean_experts(model, DEVICE)  # what uncurl runs: eager experts on CPU, transformers' default on CUDA
    data = texts(args.samples)
    enc = [b.to(DEVICE) for b in batches(tok, data, batch_size=8, max_length=512)]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in enc)

    @torch.no_grad()
    def plain():
        for b in enc:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1, use_cache=False)

    def profile():
        return profile_model(model, tok, adapter, data, batch_size=8, max_length=512)

    plain()  # warm-up
    t = timed_alternating({"plain": plain, "profile": profile}, 2 * args.repeats + 1)
    t_plain, t_profile = t["plain"], t["profile"]
    prof = profile()

    def save_original():
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(model, tok, Path(d))

    def prune_all():
        p = profile()
        plans = {n: plan_layer(s, args.experts // 2, "uncurl") for n, s in p.layers.items()}
        new = rewrite_model(model, adapter, plans, router_rule="mean", merge="average")
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(new, tok, Path(d))
            verify_checkpoint(Path(d), adapter, args.experts // 2, 2, tok)

    t_save = timed(save_original, args.repeats)
    t_prune = timed(prune_all, args.repeats)
    plans = {n: plan_layer(s, args.experts // 2, "uncurl") for n, s in prof.layers.items()}
    new = rewrite_model(model, adapter, plans, router_rule="mean", merge="average")
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(new, tok, Path(d))
        on_disk = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
    predicted = parameter_count(new) * 4

    return {
        "model": {"params": parameter_count(model), "weight_mb": round(parameter_count(model) * 4 / 1e6, 1),
                  "experts": args.experts, "layers": args.layers, "hidden": args.hidden},
        "calibration_tokens": n_tokens,
        "experts_implementation": experts_impl,
        "seconds": {"plain_forward": t_plain, "profile": t_profile, "save_original": t_save, "prune": t_prune},
        "ratios": {
            "profile_over_forward": round(t_profile / t_plain, 3),
            "prune_over_forward_plus_save": round(t_prune / (t_plain + t_save), 3),
            "checkpoint_bytes_over_predicted": round(on_disk / predicted, 4),
        },
        "profile_peak_mb": profile_peaks(args),
        "goals": {"profile_over_forward": "<= 1.10 (every statistic on)", "prune_over_forward_plus_save": "<= 1.5",
                  "checkpoint_bytes_over_predicted": "1.00 +- 0.01"},
    }


if __name__ == "__main__":
    main()
