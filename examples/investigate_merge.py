"""Why does UNCURL's merge lose to frequency pruning on the trained test bed? Separate the causes.

    .venv/bin/python examples/investigate_merge.py     # ~5 minutes on 2 cores, after train_smoe.py

On one profile (RTE, task calibration) and for K = 6 and 4, evaluates the RTE task loss of:
- uncurl / mean rows:   spectral groups, frequency-weighted average of experts and router rows
- uncurl / dominant:    the same experts, router row of each group's most-used member
- groups, select:       the same groups, but each group keeps only its most-used member (no averaging)
- frequency:            the K most-used experts
If "groups, select" is close to frequency while the averages are far worse, the damage comes from
averaging experts whose hidden units are not aligned (independently trained experts are only
equal up to a permutation of their intermediate neurons), not from the clustering or the router.
Writes benchmarks/results/merge_investigation.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from uncurl.cluster import LayerPlan
from uncurl.merge import rewrite_model
from uncurl.pipeline import RunOptions, plan_all, prepare, run_eval
from uncurl.report import Timings

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "uncurl" / "smoe-mixtral-8x" / "model"


def select_dominant(plan: LayerPlan) -> LayerPlan:
    """Same groups, all weight on each group's most-used member."""
    weights = tuple(tuple(float(i == int(np.argmax(w))) for i in range(len(w))) for w in plan.weights)
    return LayerPlan(plan.groups, weights)


def main() -> None:
    opts = RunOptions(model=str(MODEL), task="superglue-rte", data_dir=str(ROOT.parent / "shared" / "data"),
                      samples=256, max_length=256, device="cpu")
    prep = prepare(opts, [6, 4], Timings())
    model, tok, adapter = prep.loaded.model, prep.loaded.tokenizer, prep.loaded.adapter
    results = {"unpruned": run_eval(model, tok, opts, None)["loss"]}
    for keep in (6, 4):
        groups = plan_all(prep, keep, "uncurl", 0)
        variants = {
            "uncurl / mean rows": (groups, "mean"),
            "uncurl / dominant rows": (groups, "dominant"),
            "uncurl groups, select dominant": ({n: select_dominant(p) for n, p in groups.items()}, "mean"),
            "frequency": (plan_all(prep, keep, "frequency", 0), "mean"),
        }
        for name, (plans, rule) in variants.items():
            pruned = rewrite_model(model, adapter, plans, router_rule=rule, merge="average")
            results[f"K={keep}: {name}"] = run_eval(pruned, tok, opts, None)["loss"]
            print(f"K={keep} {name:34s} loss {results[f'K={keep}: {name}']:.4f}", flush=True)
    out = ROOT / "benchmarks" / "results" / "merge_investigation.json"
    out.write_text(json.dumps({"model": str(MODEL), "task": "superglue-rte", "metric": "task loss (nats/token)",
                               "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
