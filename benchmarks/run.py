"""make bench: uncurl's own cost, as ratios measured side by side in one run.

    make bench                         # or: .venv/bin/python -m benchmarks.run --hidden 512

Builds a Mixtral in-process (default ~60M parameters, fp32, random weights: speed does not depend
on what the weights learned), then measures on the same batches:
- profile time / plain forward time (`model(...)` with no hooks, same inputs and logits_to_keep);
  goal <= 1.05;
- prune wall time (profile + cluster + merge + save + verify) / (one forward + save of the
  original); goal <= 1.5;
- bytes of the pruned checkpoint / bytes its parameter count predicts; goal 1.00 +- 0.01.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench.json")
    args = ap.parse_args()

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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {result['model']['params']:,} parameters, {n_tokens:,} calibration tokens")
    for name, value in result["ratios"].items():
        print(f"{name:36s} {value:8.3f}   goal {result['goals'][name]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
