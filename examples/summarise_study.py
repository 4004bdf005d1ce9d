"""Summarise a methods study: accuracy lost against the unpruned model, per method, over tasks and K.

    .venv/bin/python examples/summarise_study.py benchmarks/results/methods_study/*.json
    .venv/bin/python examples/summarise_study.py --metric loss --name summary_loss benchmarks/results/methods_study/*.json
    .venv/bin/python examples/summarise_study.py --metric loss benchmarks/results/methods_study_trained/superglue*.json

Reads the results.json of one or more ``examples/study_methods.py`` runs (one per task is fine) and
writes, beside the first file, summary.md (points of acc lost, or with ``--metric loss`` the task
loss gained in nats/token, averaged over tasks and K, and at each K) and summary.png (the mean vs K,
one line per method; averaging, aligned and criteria methods in separate line styles).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metric", choices=["acc", "loss"], default="acc")
    parser.add_argument("--name", default="summary", help="output file names: NAME.md and NAME.png")
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()
    paths, metric = args.results, args.metric
    rows = [r for p in paths for r in json.loads(p.read_text())["rows"]]
    base = {r["task"]: r[metric] for r in rows if r["label"] == "unpruned" and r["calibration"] == "task"}
    # how much worse: points of accuracy lost, or nats/token of task loss gained
    worse = (lambda task, r: 100 * (base[task] - r["acc"])) if metric == "acc" else (lambda task, r: r["loss"] - base[task])
    keeps = sorted({r["keep"] for r in rows if r["label"] != "unpruned"}, reverse=True)
    lost: dict[tuple[str, str], dict[int, list[float]]] = {}
    tasks: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        if r["label"] != "unpruned" and r["task"] in base:
            lost.setdefault((r["label"], r["calibration"]), {}).setdefault(r["keep"], []).append(
                worse(r["task"], r))
            tasks.setdefault((r["label"], r["calibration"]), set()).add(r["task"])

    def mean(values):
        return sum(values) / len(values)

    order = sorted(lost, key=lambda key: mean([v for vs in lost[key].values() for v in vs]))
    n = {r["task"]: r["n"] for r in rows if r["label"] == "unpruned" and r["calibration"] == "task"}
    what = "Points of accuracy lost" if metric == "acc" else "Task loss gained (nats/token)"
    lines = [f"{what} against the unpruned model, averaged over "
             + ", ".join(f"{t} (n={n[t]})" for t in base) + "; lower is better.", "",
             "| method | calibration | tasks | mean | " + " | ".join(f"K={k}" for k in keeps) + " |",
             "|---|---|---|---|" + "---|" * len(keeps)]
    digits = 2 if metric == "acc" else 3
    for label, cal in order:
        cells = lost[(label, cal)]
        lines.append(f"| {label} | {cal} | {', '.join(sorted(tasks[(label, cal)]))} | {mean([v for vs in cells.values() for v in vs]):.{digits}f} | "
                     + " | ".join(f"{mean(cells[k]):.{digits}f}" if k in cells else "" for k in keeps) + " |")
    out = paths[0].parent
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, cal in order:
        if cal != "task":
            continue
        cells = lost[(label, cal)]
        style = "--" if "/average" in label else ("-" if "/" in label else ":")
        ax.plot(keeps, [mean(cells[k]) for k in keeps], style, marker="o", label=label, alpha=0.85)
    ax.set_xticks(keeps)
    ax.invert_xaxis()
    ax.set_xlabel("experts kept per layer (of 8)")
    ax.set_ylabel("accuracy points lost (mean over tasks)" if metric == "acc"
                  else "task loss gained, nats/token (mean over tasks)")
    model = Path(json.loads(paths[0].read_text())["model"])
    ax.set_title(f"Methods study: {model.parent.name if model.name == 'model' else model.name} (task calibration)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=110)
    print(out / f"{args.name}.md")


if __name__ == "__main__":
    main()
