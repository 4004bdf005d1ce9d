"""What pruning costs on a trained SMoE: UNCURL vs frequency, task-aware vs task-agnostic calibration.

    .venv/bin/python examples/train_smoe.py                 # first: the test bed (~1 hour on 2 cores)
    .venv/bin/python examples/measure_pruning.py            # then: ~20 minutes on 2 cores

For RTE, CB, COPA and BoolQ: one `uncurl sweep` per (task, calibration) with K = 6, 4, 2 and both
methods, calibrated on the task's training split ("task") or on held-out corpus text ("corpus").
Writes benchmarks/results/pruning_quality.{json,md,png}; the sweeps themselves go to --work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from uncurl.sweep import SweepOptions, sweep

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "uncurl"
TASKS = ("superglue-rte", "superglue-cb", "superglue-copa", "superglue-boolq")


def run(args) -> list[dict]:
    rows = []
    for task in TASKS:
        for calibration in ("task", "corpus"):
            s = sweep(SweepOptions(
                model=str(args.model), task=task, keeps=(6, 4, 2), methods=("uncurl", "frequency"),
                merges=("average",), routers=("mean",),  # the rules these recorded results used
                out=str(args.work / f"{task}-{calibration}"), overwrite=True, data_dir=str(args.data_dir),
                samples=args.samples, max_length=256, eval_limit=args.eval_limit, metric="acc",
                calibrate_on="corpus" if calibration == "corpus" else None, device="cpu", seed=0,
                extra={"command": "examples/measure_pruning.py"}))
            base = s["unpruned"]
            rows.append({"task": task, "calibration": calibration, "method": "unpruned", "keep": base["keep"],
                         "acc": base["acc"], "acc_norm": base["acc_norm"], "loss": base["loss"], "n": base["n"]})
            rows += [{"task": task, "calibration": calibration, "method": r["method"], "keep": r["keep"],
                      "acc": r["acc"], "acc_norm": r["acc_norm"], "loss": r["loss"], "n": r["n"]}
                     for r in s["results"]]
            print(task, calibration, "done", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| task | K | method | calibration | acc | acc_norm | task loss |", "|---|---|---|---|---|---|---|"]
    for task in TASKS:
        base = next(r for r in rows if r["task"] == task and r["method"] == "unpruned")
        lines.append(f"| {task} (n={base['n']}) | 8 | unpruned | - | {base['acc']:.3f} | {base['acc_norm']:.3f} | {base['loss']:.4f} |")
        for keep in (6, 4, 2):
            for method in ("uncurl", "frequency"):
                for cal in ("task", "corpus"):
                    r = next(r for r in rows if (r["task"], r["keep"], r["method"], r["calibration"]) == (task, keep, method, cal))
                    lines.append(f"| | {keep} | {method} | {cal} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.4))
    for ax, task in zip(axes, TASKS):
        base = next(r for r in rows if r["task"] == task and r["method"] == "unpruned")
        for method in ("uncurl", "frequency"):
            for cal, style in (("task", "-"), ("corpus", ":")):
                pts = sorted((r["keep"], r["loss"]) for r in rows
                             if (r["task"], r["method"], r["calibration"]) == (task, method, cal))
                ax.plot(*zip(*pts), style, marker="o", label=f"{method} / {cal} calib.")
        ax.axhline(base["loss"], color="gray", linestyle="--", label="unpruned (K=8)")
        ax.set(title=task, xlabel="experts kept (K)", ylabel="task loss (nats/token)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=CACHE / "smoe-mixtral-8x" / "model")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=CACHE / "measure")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pruning_quality")
    args = ap.parse_args()
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"model": str(args.model), "samples": args.samples,
                                                         "eval_limit": args.eval_limit, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows))
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
