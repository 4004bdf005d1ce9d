"""Summarise a methods study: accuracy lost against the unpruned model, per method, over tasks and K.

    .venv/bin/python examples/summarise_study.py benchmarks/results/methods_study/*.json

Reads the results.json of one or more ``examples/study_methods.py`` runs (one per task is fine) and
writes, beside the first file, summary.md (points of acc lost, averaged over tasks and K, and at each
K) and summary.png (mean points lost vs K, one line per method; averaging, aligned and criteria
methods in separate colours).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    rows = [r for p in paths for r in json.loads(p.read_text())["rows"]]
    base = {r["task"]: r["acc"] for r in rows if r["label"] == "unpruned" and r["calibration"] == "task"}
    keeps = sorted({r["keep"] for r in rows if r["label"] != "unpruned"}, reverse=True)
    lost: dict[tuple[str, str], dict[int, list[float]]] = {}
    tasks: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        if r["label"] != "unpruned" and r["task"] in base:
            lost.setdefault((r["label"], r["calibration"]), {}).setdefault(r["keep"], []).append(
                100 * (base[r["task"]] - r["acc"]))
            tasks.setdefault((r["label"], r["calibration"]), set()).add(r["task"])

    def mean(values):
        return sum(values) / len(values)

    order = sorted(lost, key=lambda key: mean([v for vs in lost[key].values() for v in vs]))
    lines = [f"Points of accuracy lost against the unpruned model, averaged over {', '.join(base)} "
             "(each cell: n=500 for ARC-Easy and PIQA, 100 for COPA); lower is better.", "",
             "| method | calibration | tasks | mean | " + " | ".join(f"K={k}" for k in keeps) + " |",
             "|---|---|---|---|" + "---|" * len(keeps)]
    for label, cal in order:
        cells = lost[(label, cal)]
        lines.append(f"| {label} | {cal} | {', '.join(sorted(tasks[(label, cal)]))} | {mean([v for vs in cells.values() for v in vs]):.2f} | "
                     + " | ".join(f"{mean(cells[k]):.2f}" if k in cells else "" for k in keeps) + " |")
    out = paths[0].parent
    (out / "summary.md").write_text("\n".join(lines) + "\n")

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
    ax.invert_xaxis()
    ax.set_xlabel("experts kept per layer (of 8)")
    ax.set_ylabel("accuracy points lost (mean over tasks)")
    ax.set_title("Methods study on the pretrained test bed (task calibration)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    print(out / "summary.md")


if __name__ == "__main__":
    main()
