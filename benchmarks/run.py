"""make bench: uncurl's own cost, as ratios measured side by side in one run.

    make bench                         # or: .venv/bin/python -m benchmarks.run --hidden 512

Builds a Mixtral in-process (default ~60M parameters, fp32, random weights: speed does not depend
on what the weights learned), then measures on the same batches:
- profile time / plain forward time (`model(...)` with no hooks, same inputs and logits_to_keep);
  goal <= 1.05;
- prune wall time (profile + cluster + merge + save + verify) / (one forward + save of the
  original); goal <= 1.5;
- bytes of the pruned checkpoint / bytes its parameter count predicts; goal 1.00 +- 0.01;
- peak resident memory while profiling ~1k, 10k and 100k tokens (each in a fresh process, a
  smaller model, after one full warm-up batch); goal: flat. (Growth over the warm-up RSS is also
  recorded, but the allocator returns memory between batches, so it is noisier than the peak.)
Each figure is the median of --repeats runs. Writes benchmarks/results/bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from uncurl.adapters import ADAPTERS
from uncurl.cluster import plan_layer
from uncurl.load import build_tiny
from uncurl.merge import parameter_count, rewrite_model
from uncurl.profile import batches, profile_model
from uncurl.save import verify_checkpoint, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def texts(n: int) -> list[str]:
    corpus = ROOT.parent / "shared" / "data" / "corpus" / "wikitext2_valid.txt"
    words = corpus.read_text().split() if corpus.is_file() else ["token"] * 100_000
    return [" ".join(words[i * 200 : (i + 1) * 200]) for i in range(n)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_memory_child(n_tokens: int) -> None:
    """In a fresh process: resident-memory growth (MB) while profiling ``n_tokens`` tokens."""
    model, tok = build_tiny("mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    data = texts(max(1, n_tokens // 512) + 8)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench.json")
    ap.add_argument("--profile-memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile_memory_child:
        return profile_memory_child(args.profile_memory_child)

    adapter = ADAPTERS["mixtral"]
    model, tok = build_tiny("mixtral", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_hidden_layers=args.layers, num_local_experts=args.experts,
                            num_attention_heads=8, num_key_value_heads=8)
    data = texts(args.samples)
    enc = list(batches(tok, data, batch_size=8, max_length=512))
    n_tokens = sum(int(b["attention_mask"].sum()) for b in enc)

    @torch.no_grad()
    def plain():
        for b in enc:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1)

    def profile():
        return profile_model(model, tok, adapter, data, batch_size=8, max_length=512)

    t_plain, t_profile = timed(plain, args.repeats), timed(profile, args.repeats)
    prof = profile()

    def save_original():
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(model, tok, Path(d))

    def prune_all():
        p = profile()
        plans = {n: plan_layer(s, args.experts // 2, "uncurl") for n, s in p.layers.items()}
        new = rewrite_model(model, adapter, plans)
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(new, tok, Path(d))
            verify_checkpoint(Path(d), adapter, args.experts // 2, 2, tok)

    t_save = timed(save_original, args.repeats)
    t_prune = timed(prune_all, args.repeats)
    plans = {n: plan_layer(s, args.experts // 2, "uncurl") for n, s in prof.layers.items()}
    new = rewrite_model(model, adapter, plans)
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(new, tok, Path(d))
        on_disk = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
    predicted = parameter_count(new) * 4

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {"params": parameter_count(model), "weight_mb": round(parameter_count(model) * 4 / 1e6, 1),
                  "experts": args.experts, "layers": args.layers, "hidden": args.hidden},
        "calibration_tokens": n_tokens,
        "seconds": {"plain_forward": t_plain, "profile": t_profile, "save_original": t_save, "prune": t_prune},
        "ratios": {
            "profile_over_forward": round(t_profile / t_plain, 3),
            "prune_over_forward_plus_save": round(t_prune / (t_plain + t_save), 3),
            "checkpoint_bytes_over_predicted": round(on_disk / predicted, 4),
        },
        "goals": {"profile_over_forward": "<= 1.05", "prune_over_forward_plus_save": "<= 1.5",
                  "checkpoint_bytes_over_predicted": "1.00 +- 0.01"},
    }
    result["profile_memory"] = profile_memory()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {result['model']['params']:,} parameters, {n_tokens:,} calibration tokens")
    for name, value in result["ratios"].items():
        print(f"{name:36s} {value:8.3f}   goal {result['goals'][name]}")
    for row in result["profile_memory"]:
        print(f"profile peak RSS at {row['tokens']:>7,} tokens   {row['peak_mb']:7.1f} MB   goal: flat")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
