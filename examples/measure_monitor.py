"""Coverage of traffic from the pruned-for task against other tasks and the corpus (uncurl monitor).

    PYTHONPATH=. .venv/bin/python examples/measure_monitor.py [--model builtin:mixtral builtin:qwen2_moe] [--samples 128]
    PYTHONPATH=. .venv/bin/python examples/measure_monitor.py --model ~/.cache/uncurl/smol-moe/model --samples 100 \\
        --plans ean:4 frequency:4 frequency:2 ean:2 --out benchmarks/results/monitor_testbed.json

Profiles each model once on superglue-rte's calibration split (256 examples), prunes it once per
``--plans METHOD:K`` from that profile (EAN at K = 4, the default, as ``uncurl prune`` does), then
routes the traffic of each source through the parent once: RTE's calibration split (the
calibration data itself), RTE's held-out evaluation split, the other tasks' evaluation splits and
the corpus' held-out passages, --samples examples each. For every plan and source it records

- the pooled figures ``uncurl monitor`` reports (``monitor.coverage`` on the routes' sums: kept,
  merged, dropped, coverage, JS divergence, per-layer coverage);
- per input, so as mean, standard error and n over the inputs: ``coverage`` (its routing mass on
  kept or merged experts), ``top1_kept`` (share of its token-layer pairs whose top-1 expert was not
  dropped), ``uncovered`` (pairs with more than half their mass on dropped experts; with top-2 and
  normalised weights about 1 - top1_kept), ``wholly_uncovered`` (pairs with all their top-k
  dropped), ``uncovered_tokens`` (tokens whose dropped share, averaged over the layers, is over one
  half), ``min_layer_coverage`` (its lowest layer's coverage), and per-layer coverage;
- the JS divergence with a bootstrap standard error (200 resamples of the inputs).

``separation`` says, per plan and statistic, by how many standard errors of the difference RTE's
held-out traffic lies on the in-task side of each other source (higher coverage, fewer uncovered
tokens, lower divergence), and whether it does so by more than 2 for every one. The random-weight
built-in models are measured by default (benchmarks/results/monitor_builtin.json); the pretrained
test bed is not built on every machine, pass --model DIR to measure it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from uncurl.load import load_model
from uncurl.monitor import _js, coverage
from uncurl.pipeline import ProfileOptions, PruneOptions, prune, run_profile
from uncurl.routes import TrafficOptions, route, traffic_texts

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = "superglue-rte"
SOURCES = [(CALIBRATION, "calibration"), (CALIBRATION, "evaluation"), ("superglue-cb", "evaluation"),
           ("superglue-copa", "evaluation"), ("superglue-boolq", "evaluation"), ("arc-easy", "evaluation"),
           ("arc-challenge", "evaluation"), ("piqa", "evaluation"), ("corpus", "evaluation")]
# per-input statistics and the side of each on which the pruned-for task's own traffic should lie
HIGHER, LOWER = 1, -1
STATISTICS = {"coverage": HIGHER, "top1_kept": HIGHER, "uncovered": LOWER, "wholly_uncovered": LOWER,
              "uncovered_tokens": LOWER, "min_layer_coverage": HIGHER}


def collect(rec: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One routes.jsonl record -> layer index -> (expert ids [n, k], gate weights [n, k]); a token
    with fewer routed slots (a family's skip slots) is padded with weight 0."""
    out = {}
    for layer, tokens in rec["routes"].items():
        k = max((len(p) for p in tokens), default=0)
        ids = torch.zeros(len(tokens), k, dtype=torch.long)
        w = torch.zeros(len(tokens), k)
        for t, pairs in enumerate(tokens):
            for j, (e, x) in enumerate(pairs):
                ids[t, j], w[t, j] = e, x
        out[int(layer)] = (ids, w)
    return out


def per_input(example: dict, dropped: dict[int, list[int]], experts: int) -> dict:
    """The per-input statistics (module docstring) of one input's routes under one plan."""
    mass = covered = 0.0
    top1 = uncovered = wholly = pairs = 0
    layer_cov, shares = [], []
    for index in sorted(example):
        ids, w = example[index]
        routed = w.sum(1) > 0
        ids, w = ids[routed], w[routed]
        if not len(ids):
            continue
        drop = torch.zeros(experts, dtype=torch.bool)
        drop[dropped[index]] = True
        on_dropped = (w * drop[ids]).sum(1)
        share = on_dropped / w.sum(1)
        mass += float(w.sum())
        covered += float(w.sum() - on_dropped.sum())
        first = ids[torch.arange(len(ids)), w.argmax(1)]
        top1 += int((~drop[first]).sum())
        uncovered += int((share > 0.5).sum())
        wholly += int((share > 1 - 1e-6).sum())
        pairs += len(share)
        layer_cov.append(float(1 - on_dropped.sum() / w.sum()))
        shares.append(share)
    if not pairs:
        return {}
    per_token = torch.stack(shares).mean(0) if len({len(s) for s in shares}) == 1 else None
    return {"coverage": covered / mass, "top1_kept": top1 / pairs, "uncovered": uncovered / pairs,
            "wholly_uncovered": wholly / pairs,
            "uncovered_tokens": None if per_token is None else float((per_token > 0.5).double().mean()),
            "min_layer_coverage": min(layer_cov), "layer_coverage": layer_cov}


def mean_se(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": round(m, 6), "se": round(sd / math.sqrt(n), 6), "n": n}


def pooled_js(examples: list[dict], frequency: dict[int, torch.Tensor], experts: int) -> float:
    """``monitor``'s divergence (mean over layers of JS(usage share, calibration share)) of these inputs."""
    counts = {i: torch.zeros(experts, dtype=torch.float64) for i in frequency}
    for ex in examples:
        for i, (ids, w) in ex.items():
            counts[i] += torch.bincount(ids[w > 0].flatten(), minlength=experts).double()
    return sum(_js(counts[i] / counts[i].sum(), f / f.sum()) for i, f in frequency.items()) / len(frequency)


def bootstrap_se(examples: list[dict], frequency, experts: int, resamples: int = 200, seed: int = 0) -> float:
    rng = random.Random(seed)
    draws = [pooled_js([examples[rng.randrange(len(examples))] for _ in examples], frequency, experts)
             for _ in range(resamples)]
    m = sum(draws) / len(draws)
    return math.sqrt(sum((d - m) ** 2 for d in draws) / (len(draws) - 1))


def separation(rows: list[dict]) -> dict:
    """Per statistic: RTE held-out against every other task's traffic, in standard errors of the
    difference on the in-task side (positive: where the task's own traffic should be)."""
    own = next(r for r in rows if r["traffic"] == CALIBRATION and r["split"] == "evaluation")
    others = [r for r in rows if r["traffic"] != CALIBRATION]
    out = {}
    for stat, side in {**STATISTICS, "js_divergence": LOWER}.items():
        a = own["per_input"][stat] if stat in STATISTICS else own["js_bootstrap"]
        if a is None:
            continue
        z = {}
        for r in others:
            b = r["per_input"][stat] if stat in STATISTICS else r["js_bootstrap"]
            z[r["traffic"]] = round(side * (a["mean"] - b["mean"]) / math.hypot(a["se"], b["se"]), 1)
        out[stat] = {"z": z, "closest": min(z, key=z.get), "min_z": min(z.values()),
                     "separates": min(z.values()) > 2}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="*", default=["builtin:mixtral", "builtin:qwen2_moe"])
    ap.add_argument("--plans", nargs="*", default=["ean:4"], help="METHOD:K, one pruned model each")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "monitor_builtin.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plans = [(m, int(k)) for m, k in (p.split(":") for p in args.plans)]
    results, summary, started = [], [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            slug = model.replace(":", "_").replace("/", "_")
            calib = dict(model=model, task=CALIBRATION, data_dir=args.data_dir, samples=256, max_length=args.max_length)
            loaded = load_model(model, device="cpu", seed=0)
            profile = Path(tmp) / f"{slug}.profile"
            run_profile(loaded, ProfileOptions(**calib, out=str(profile)), 0).save(str(profile))
            reports = {}
            for method, keep in plans:
                pruned = Path(tmp) / f"{slug}-{method}-k{keep}"
                prune(PruneOptions(**calib, method=method, keep=keep, profile=str(profile), out=str(pruned),
                                   plots=False))
                reports[method, keep] = json.loads((pruned / "report" / "report.json").read_text())
            experts = reports[plans[0]]["model"]["experts_before"]
            rows = {plan: [] for plan in plans}
            for task, split in SOURCES:
                texts, info = traffic_texts(TrafficOptions(task=task, split=split, data_dir=args.data_dir,
                                                           samples=args.samples, max_length=args.max_length, seed=0),
                                            loaded.tokenizer)
                examples = []
                sums, tokens = route(loaded.model, loaded.tokenizer, loaded.adapter, texts,
                                     lambda rec: examples.append(collect(rec)), batch_size=8, max_length=args.max_length)
                for (method, keep), report in reports.items():
                    pooled = coverage(report, sums)  # what `uncurl monitor` reports for this traffic
                    dropped = {r["index"]: r["dropped"] for r in report["layers"]}
                    frequency = {r["index"]: torch.tensor(r["frequency"], dtype=torch.float64) for r in report["layers"]}
                    per = [s for s in (per_input(ex, dropped, experts) for ex in examples) if s]
                    stats = {k: (mean_se([p[k] for p in per]) if per[0][k] is not None else None) for k in STATISTICS}
                    row = {"model": model, "method": method, "keep": keep, "traffic": task, "split": split,
                           "n": info["examples"], "tokens": tokens, **pooled["overall"],
                           "per_layer_coverage": [layer["coverage"] for layer in pooled["layers"]],
                           "per_input": stats,
                           "js_bootstrap": {"mean": round(pooled_js(examples, frequency, experts), 6),
                                            "se": round(bootstrap_se(examples, frequency, experts), 6),
                                            "n": len(examples)},
                           "per_layer_per_input": [mean_se([p["layer_coverage"][i] for p in per])
                                                   for i in range(len(per[0]["layer_coverage"]))]}
                    rows[method, keep].append(row)
                    s = stats["coverage"]
                    print(f"{model:22} {method}:{keep} {task:16} {split:11} n={row['n']:4} tokens={tokens:6} "
                          f"coverage={row['coverage']:.3f} per input {s['mean']:.3f}+-{s['se']:.3f} "
                          f"JS={row['js_divergence']:.4f}", flush=True)
            for (method, keep), plan_rows in rows.items():
                results += plan_rows
                summary.append({"model": model, "method": method, "keep": keep, "separation": separation(plan_rows)})
            del loaded
    record = {"calibration": f"{CALIBRATION}, 256 examples (one profile; each plan pruned from it)",
              "max_length": args.max_length, "samples": args.samples, "threads": args.threads,
              "seconds": round(time.time() - started), "criterion": (
                  "separates: RTE held-out lies on the in-task side of every other task's traffic by more than 2 "
                  "standard errors of the difference (per-input mean and SE; JS: bootstrap SE over inputs)"),
              "separation": summary, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for s in summary:
        print(s["model"], f"{s['method']}:{s['keep']}",
              {k: (v["min_z"], v["closest"], v["separates"]) for k, v in s["separation"].items()})


if __name__ == "__main__":
    main()
