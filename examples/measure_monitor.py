"""Coverage of traffic from the pruned-for task against other tasks and the corpus (uncurl monitor).

    PYTHONPATH=. .venv/bin/python examples/measure_monitor.py [--family mixtral qwen2_moe] [--samples 128]

Prunes each built-in tiny model (random weights, seed 0) to --keep experts on superglue-rte (EAN,
the default), then monitors traffic of each source through the parent: RTE's calibration split
(the calibration data itself), RTE's held-out evaluation split, the other tasks' evaluation splits
and the corpus' held-out passages, --samples examples each. Writes
benchmarks/results/monitor_builtin.json. The pretrained and trained test beds are not built on
every machine; pass --model DIR to measure one (it is pruned the same way).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from uncurl.monitor import MonitorOptions, monitor
from uncurl.pipeline import PruneOptions, prune

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [("superglue-rte", "calibration"), ("superglue-rte", "evaluation"), ("superglue-cb", "evaluation"),
           ("superglue-copa", "evaluation"), ("superglue-boolq", "evaluation"), ("arc-easy", "evaluation"),
           ("arc-challenge", "evaluation"), ("piqa", "evaluation"), ("corpus", "evaluation")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="*", default=["builtin:mixtral", "builtin:qwen2_moe"])
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "monitor_builtin.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            pruned = Path(tmp) / model.replace(":", "_").replace("/", "_")
            prune(PruneOptions(model=model, task="superglue-rte", keep=args.keep, out=str(pruned), data_dir=args.data_dir,
                               samples=256, max_length=args.max_length, plots=False))
            for task, split in SOURCES:
                r = monitor(MonitorOptions(pruned=str(pruned), task=task, split=split, data_dir=args.data_dir,
                                           samples=args.samples, max_length=args.max_length, plots=False,
                                           out=str(Path(tmp) / f"m-{pruned.name}-{task}-{split}")))
                row = {"model": model, "keep": args.keep, "traffic": task, "split": split,
                       "n": r["traffic"]["examples"], "tokens": r["tokens"], **r["overall"],
                       "per_layer_coverage": [layer["coverage"] for layer in r["layers"]]}
                results.append(row)
                print(f"{model:22} {task:16} {split:11} n={row['n']:4} tokens={row['tokens']:6} "
                      f"coverage={row['coverage']:.3f} JS={row['js_divergence']:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"calibration": "superglue-rte, 256 examples", "max_length": args.max_length,
                                          "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
