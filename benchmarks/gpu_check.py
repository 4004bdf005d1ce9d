"""make gpu-check: everything a lent GPU should run, in one script, in at most ten minutes on one H100/H200.

    make gpu-check                                    # on a GPU machine: benchmarks/results/gpu_check.json
    python -m benchmarks.gpu_check --smoke --out x.json   # without a GPU (CI): the parts that can, small

Steps, each timed, each one entry in the JSON (status ok / failed / skipped / timed_out, seconds, and
its figures); a step that fails does not stop the others, and each has a share of the budget:

1. ``cuda_tests``: ``pytest -m cuda`` (tests/test_cuda.py: every op on one device, whole ==
   sequential, parked states, quantized write, the fit on cuda).
2. ``bench``: ``make bench BENCH_ARGS="--device cuda"``, part by part (``--only``, one repeat each)
   into benchmarks/results/bench-cuda.json, as many parts as the step's budget allows.
3. ``device_map``: ``uncurl prune`` of a Mixtral saved to disk (--map-hidden) with ``--device-map
   auto --max-memory 0=<half its weights>``: half its layers on cuda:0, the rest in CPU memory (what
   a second GPU is to the first: another device per layer), layer by layer; exit code, wall time,
   the placement, GPU peak. With --smoke: ``cpu`` + disk.
4. ``twin``: a random-weight model of Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of
   I = 768, top-8, bf16; ``build_twin``, a function to swap for the ``huge`` bench part's writer)
   at --twin-layers layers, pruned with the defaults (``--keep`` half the experts) on cuda: wall
   time, GPU peak, peak RSS. With --smoke: a small model of the same family on the CPU.

GPU peaks are ``torch.cuda.max_memory_allocated`` in the step's own process; RSS is the child's
VmHWM. Steps 3 and 4 run in fresh processes (``--child``), so each peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
TWIN = {"hidden": 2048, "experts": 128, "intermediate": 768, "top_k": 8, "heads": 32, "kv_heads": 4,
        "head_dim": 128, "vocab": 151936, "dtype": "bfloat16"}  # Qwen3-30B-A3B's config.json
SMOKE_TWIN = {"hidden": 64, "experts": 16, "intermediate": 32, "top_k": 4, "heads": 4, "kv_heads": 2,
              "head_dim": 16, "vocab": 512, "dtype": "bfloat16"}
BENCH_PARTS = ["ratios", "fit", "pipelines", "quantized", "evaluation", "profile_memory", "prune_memory",
               "offload_prune", "scaling", "ranks"]


def data_dir() -> Path:
    """The shared task data: $UNCURL_DATA, else ../shared/data beside the checkout, else ./shared/data."""
    for path in (os.environ.get("UNCURL_DATA"), ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):
        if path and (Path(path) / "corpus").is_dir():
            return Path(path)
    return ROOT.parent / "shared" / "data"


def build_twin(folder: Path, *, layers: int, shape: dict = TWIN, seed: int = 0, device: str = "cpu") -> int:
    """A random-weight qwen3_moe of ``shape`` (default Qwen3-30B-A3B's) with ``layers`` decoder layers,
    saved to ``folder`` with a byte tokenizer; returns its weight bytes. Built on ``device`` (a GPU
    initialises 1.2 GB of experts a layer in a blink) and written by save_pretrained."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from uncurl.load import byte_tokenizer

    config = Qwen3MoeConfig(
        hidden_size=shape["hidden"], num_experts=shape["experts"], moe_intermediate_size=shape["intermediate"],
        num_experts_per_tok=shape["top_k"], num_hidden_layers=layers, intermediate_size=3 * shape["hidden"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
        vocab_size=shape["vocab"], max_position_embeddings=4096, norm_topk_prob=True, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], dtype=shape["dtype"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config).to(getattr(torch, shape["dtype"]))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    del model
    return size


def build_mixtral(folder: Path, hidden: int, layers: int = 4) -> int:
    """A Mixtral (8 experts, fp32, random weights) saved to ``folder``; its weight bytes."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from uncurl.load import byte_tokenizer

    config = MixtralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           vocab_size=512, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """One prune, in this process: ``spec`` says what to build and how to prune it."""
    from uncurl.pipeline import PruneOptions, prune

    cuda = torch.cuda.is_available() and spec["device"] != "cpu"
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as d:
        folder = Path(d) / "model"
        start = time.perf_counter()
        if spec["kind"] == "twin":
            size = build_twin(folder, layers=spec["layers"], shape=spec["shape"], device="cuda" if cuda else "cpu")
        else:
            size = build_mixtral(folder, spec["hidden"])
        built = time.perf_counter() - start
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        placement = {}
        if spec.get("max_memory"):
            limit = spec["max_memory"].replace("HALF", f"{max(size // 2000, 1)}KB").replace(
                "QUARTER", f"{max(size // 4000, 1)}KB")
            placement = {"device_map": "auto", "max_memory": limit, "device": "auto"}
        opts = {"task": "corpus", "data_dir": str(data_dir()), "samples": spec["samples"], "max_length": spec["max_length"],
                "batch_size": 8, "keep": spec["keep"], "plots": False, "device": spec["device"], **placement,
                **spec.get("prune", {})}
        start = time.perf_counter()
        result = prune(PruneOptions(model=str(folder), out=str(Path(d) / "out"), **opts))
        wall = time.perf_counter() - start
        report = result.report
    return {"weight_bytes": size, "build_s": round(built, 2), "prune_s": round(wall, 2),
            "stage_s": report.get("timings_s"), "pipeline": report.get("pipeline"), "merge": report.get("merge"),
            "placement": report.get("model", {}).get("placement"), "options": {k: v for k, v in opts.items()
                                                                             if k != "data_dir"},
            "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "peak_rss_mb": round(vm_hwm_mb(), 1), "tokens": report.get("task", {}).get("tokens")}


def run_child(spec: dict, timeout: float, fresh: bool) -> dict:
    if not fresh:
        return child(spec)
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--child", json.dumps(spec)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step(name: str, results: dict, budget: float, fn) -> None:
    """Run ``fn(budget)`` as step ``name``, recording its status, seconds and figures."""
    print(f"gpu-check: {name} (budget {budget:.0f} s) ...", flush=True)
    start = time.perf_counter()
    try:
        figures = fn(budget)
        status = figures.pop("status", "ok") if isinstance(figures, dict) else "ok"
        entry = {"status": status, **(figures or {})}
    except subprocess.TimeoutExpired:
        entry = {"status": "timed_out"}
    except Exception as err:  # noqa: BLE001 - a failed step is recorded, the others still run
        entry = {"status": "failed", "error": f"{type(err).__name__}: {str(err)[-1500:]}"}
    entry["seconds"] = round(time.perf_counter() - start, 1)
    results["steps"][name] = entry
    print(f"gpu-check: {name} {entry['status']} in {entry['seconds']} s", flush=True)


def cuda_tests(budget: float) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "why": "no CUDA device"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-n", "0", "-q",
                          "-rs", "--no-header"], cwd=ROOT, capture_output=True, text=True, timeout=budget)
    return {"status": "ok" if out.returncode == 0 else "failed", "returncode": out.returncode,
            "summary": out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "",
            "tail": out.stdout[-3000:] if out.returncode else ""}


def bench(budget: float) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped", "why": "no CUDA device"}
    target = ROOT / "benchmarks" / "results" / "bench-cuda.json"
    parts, start = {}, time.perf_counter()
    for part in BENCH_PARTS:
        left = budget - (time.perf_counter() - start)
        if left < 20:
            parts[part] = "not run (budget spent)"
            continue
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--repeats", "1",
                                  "--only", part, "--out", str(target)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=left)
            parts[part] = {"returncode": out.returncode, "seconds": round(time.perf_counter() - t0, 1),
                           **({"tail": out.stderr[-800:]} if out.returncode else {})}
        except subprocess.TimeoutExpired:
            parts[part] = {"status": "timed_out", "seconds": round(time.perf_counter() - t0, 1)}
    figures = json.loads(target.read_text()) if target.is_file() else {}
    return {"parts": parts, "out": str(target.relative_to(ROOT)),
            "figures": {k: v for k, v in figures.items() if k in BENCH_PARTS and k in parts}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="no GPU needed: the CPU-safe parts, small (CI)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--budget", type=float, default=570, help="seconds for all steps (default: under 10 minutes)")
    ap.add_argument("--twin-layers", type=int, default=3)
    ap.add_argument("--map-hidden", type=int, default=1024, help="hidden size of the device-map Mixtral")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    cuda = torch.cuda.is_available() and not args.smoke
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
               "smoke": args.smoke, "budget_s": args.budget, "steps": {}}
    fresh = not args.smoke  # fresh processes for clean peaks; in-process when small (CI)
    shares = {"cuda_tests": 0.25, "bench": 0.3, "device_map": 0.15, "twin": 0.3}
    device = "cuda" if cuda else "cpu"
    if args.smoke:
        results["steps"]["cuda_tests"] = {"status": "skipped", "why": "--smoke"}
        results["steps"]["bench"] = {"status": "skipped", "why": "--smoke"}
    else:
        step("cuda_tests", results, shares["cuda_tests"] * args.budget, cuda_tests)
        step("bench", results, shares["bench"] * args.budget, bench)
    map_spec = {"kind": "mixtral", "hidden": 32 if args.smoke else args.map_hidden, "samples": 4 if args.smoke else 64,
                "max_length": 16 if args.smoke else 256, "keep": 4, "device": device,
                "max_memory": ("0=HALF,cpu=64GiB" if cuda else "cpu=QUARTER"),
                "prune": {"pipeline": "sequential", **({"merge": "select"} if args.smoke else {})}}
    step("device_map", results, shares["device_map"] * args.budget,
         lambda budget: run_child(map_spec, budget, fresh))
    shape = SMOKE_TWIN if args.smoke else TWIN
    twin_spec = {"kind": "twin", "layers": 2 if args.smoke else args.twin_layers, "shape": shape,
                 "samples": 4 if args.smoke else 64, "max_length": 16 if args.smoke else 256,
                 "keep": shape["experts"] // 2, "device": device}
    step("twin", results, shares["twin"] * args.budget, lambda budget: run_child(twin_spec, budget, fresh))
    results["ok"] = all(s["status"] in ("ok", "skipped") for s in results["steps"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v['status']}" for k, v in results["steps"].items()))
    return results


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
