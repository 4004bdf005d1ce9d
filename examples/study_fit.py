"""Does fitting merged experts to the layer's output, or recovery by distillation, beat pruning alone?

    .venv/bin/python examples/study_fit.py --model ~/.cache/uncurl/smoe-mixtral-8x/model \\
        --task superglue-rte --keep 4 --recover 60 --out benchmarks/results/fit_recover_study.json

One profile of the task's calibration split; then, at one K, the grouping ``uncurl`` with merges
select / aligned / fit (router refit) and the criterion ``ean`` alone and with ``fit``, each without
and with ``--recover STEPS`` (routers only, the default learning rate) at a fixed budget; and
``LOCAL_CELLS`` pruned layer by layer with ``--recover-local STEPS`` (``uncurl prune``, the model
loaded afresh each time). Every
model is scored on the same evaluation examples, so differences of task loss are paired: their
standard errors are examples/paired_loss.py's (ratio estimator over examples). Recovery and the fit
see only the calibration texts. Writes ``--out`` (JSON) and prints a table; each cell as it is
done goes to ``--out``.partial, from which a stopped run resumes, and ``--out`` is rewritten from the
cells so far (``"complete": false`` until every cell is done).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from paired_loss import ratio_stderr  # noqa: E402
from uncurl.cluster import METHODS  # noqa: E402
from uncurl.fit import layer_errors  # noqa: E402
from uncurl.merge import MERGE_RULES, rewrite_model  # noqa: E402
from uncurl.load import load_model  # noqa: E402
from uncurl.pipeline import (PruneOptions, RunOptions, calibration_texts, fit_after_merge, plan_all, prepare,  # noqa: E402
                             prune, run_eval)
from uncurl.recover import recover  # noqa: E402
from uncurl.report import Timings, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = [("uncurl", "select", "refit"), ("uncurl", "aligned", "refit"), ("uncurl", "fit", "refit"),
         ("ean", "select", "mean"), ("ean", "fit", "mean")]  # a criterion's "select" keeps its experts as they are
# criteria alone, without recovery: with ean/select, the "best criterion alone" the merges are measured against
CRITERIA = [("reap", "select", "mean")]
# the KL recovery's order: the cells that decide first (EAN's gap, the fitted merges)
RECOVER_ORDER = [("ean", "select"), ("ean", "fit"), ("uncurl", "fit"), ("uncurl", "aligned"), ("uncurl", "select")]
# the layer-local recovery (--recover-local, the same STEPS): run by `uncurl prune --pipeline sequential`
LOCAL_CELLS = [("uncurl", "aligned", "refit"), ("uncurl", "fit", "refit"), ("ean", "select", "mean")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="superglue-rte")
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--recover", type=int, default=60, help="recovery steps (one calibration batch each)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cheap-only", action="store_true",
                    help="skip the KL-recovery cells (the slow ones): a first pass over every K, resumed later")
    ap.add_argument("--recover-experts", action="store_true",
                    help="the KL recovery trains the experts too (cells '+recoverNexperts'), to its own --out")
    ap.add_argument("--cells", default=None,
                    help="only these cells, by name, e.g. 'ean/select,ean/select+recover240' (and the unpruned "
                         "model): a larger --recover budget on the cells that decide, to its own --out")
    args = ap.parse_args()

    opts = RunOptions(model=args.model, task=args.task, data_dir=args.data_dir, samples=args.samples,
                      max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
                      eval_limit=args.eval_limit, eval_max_length=512)
    timings = Timings()
    prep = prepare(opts, [args.keep], timings)
    model, tok, adapter = prep.loaded.model, prep.loaded.tokenizer, prep.loaded.adapter
    texts, _ = calibration_texts(opts, opts.seed, tok)

    def scored(m) -> tuple[list[float], list[int], dict]:
        ev = run_eval(m, tok, opts, args.eval_limit, args.seed, per_example=True)
        rows = ev.pop("examples")
        return [r["nll"] for r in rows], [r["tokens"] for r in rows], ev

    kl = f"recover{args.recover}" + ("experts" if args.recover_experts else "")  # the KL-recovery cells' suffix
    # cells done so far are kept beside --out (per-example losses too), so a stopped run resumes
    partial = args.out.with_name(args.out.name + ".partial")
    key = {k: str(v) for k, v in vars(args).items() if k not in ("cheap_only", "cells")}  # what the cells depend on
    saved = json.loads(partial.read_text()) if partial.is_file() else {}
    if saved.get("args") != key:
        saved = {}
    results, nll, tokens = saved.get("results", {}), saved.get("nll", {}), saved.get("tokens")

    def checkpoint() -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"args": key, "results": results, "nll": nll, "tokens": tokens}))

    def done(name: str, entry: dict, ev: dict, start: float) -> None:
        """A cell scored: its entry kept (and checkpointed) and printed."""
        entry.update({k: ev[k] for k in ("acc", "loss") if k in ev})
        entry["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = entry
        checkpoint()
        write_out(complete=False)
        print(f"{name:28s} loss {ev['loss']:.4f} acc {ev.get('acc', float('nan')):.4f} ({entry['seconds']} s)",
              flush=True)

    if "unpruned" not in nll:
        nll["unpruned"], tokens, ev = scored(model)
        results["unpruned"] = {k: ev[k] for k in ("acc", "loss", "n") if k in ev}
        checkpoint()
    def write_out(complete: bool) -> dict:
        """--out from the cells so far (``complete``: every cell done); returns the paired differences."""
        n = len(tokens)
        table = {name: dict(zip(("loss", "stderr"), ratio_stderr(v, tokens))) for name, v in nll.items()}

        def paired(a, b):
            d, se = ratio_stderr([x - y for x, y in zip(nll[a], nll[b])], tokens)
            return {"diff": round(d, 6), "stderr": round(se, 6)}

        criteria = [f"{m}/{g}" for m, g, _ in CELLS + CRITERIA if g == "select" and METHODS[m].kind == "criterion"
                    and f"{m}/{g}" in nll]
        base = min(criteria, key=lambda a: table[a]["loss"], default=None)  # the best criterion alone, by task loss
        diffs = {f"{a} - {base}": paired(a, base) for a in nll if base and a not in (base, "unpruned")}
        diffs.update({f"{a}+{kl} - {a}": paired(f"{a}+{kl}", a)
                      for a in (f"{m}/{g}" for m, g, _ in CELLS) if f"{a}+{kl}" in nll})
        diffs.update({f"{m}/{g}+local{args.recover} - {m}/{g}": paired(f"{m}/{g}+local{args.recover}", f"{m}/{g}")
                      for m, g, _ in LOCAL_CELLS if f"{m}/{g}+local{args.recover}" in nll})
        diffs.update({f"{a} - unpruned": paired(a, "unpruned") for a in nll if a != "unpruned"})
        out = {"complete": complete, "model": args.model, "task": args.task, "keep": args.keep, "n": n, "tokens": sum(tokens),
               "samples": args.samples, "recover_steps": args.recover, "seed": args.seed,
               "cells": [list(c) for c in CELLS], "criteria": [list(c) for c in CRITERIA], "best_criterion": base,
               "results": results,
               "loss": {k: {"loss": round(v["loss"], 6), "stderr": round(v["stderr"], 6)} for k, v in table.items()},
               "paired_differences": diffs, "timings_s": timings, "versions": versions(),
               "threads": torch.get_num_threads(),
               "nll": nll, "tokens": tokens}  # per example, for any other paired difference (examples/summarise_fit.py)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
        return diffs

    def whole_cell(method: str, merge: str, router: str, steps: int) -> None:
        name = f"{method}/{merge}" + (f"+{kl}" if steps else "")
        start = time.perf_counter()
        plans = plan_all(prep, args.keep, method, args.seed)
        pruned = rewrite_model(model, adapter, plans, router_rule=router, merge=merge, stats=prep.profile.layers)
        entry = {}
        if MERGE_RULES[merge].fit:
            fit = fit_after_merge(prep.loaded, pruned, plans, opts)
            entry["fit_error"] = {n: [round(v["error_before"], 4), round(v["error_after"], 4)]
                                  for n, v in fit["layers"].items()}
        else:
            entry["layer_error"] = {n: round(v, 4) for n, v in
                                    layer_errors(model, pruned, adapter, tok, texts[:32]).items()}
        if steps:
            rec = recover(pruned, model, adapter, tok, texts, steps=steps, seed=args.seed,
                          experts=args.recover_experts, batch_size=args.batch_size, max_length=args.max_length)
            curve = rec.report["loss_curve"]
            entry["recover"] = {"steps": steps, "kl_first5": sum(curve[:5]) / 5, "kl_last5": sum(curve[-5:]) / 5,
                                "seconds": rec.report["seconds"]}
        nll[name], _, ev = scored(pruned)
        done(name, entry, ev, start)

    def local_cell(method: str, merge: str, router: str) -> None:  # a fresh load: the layer-by-layer prune consumes it
        name = f"{method}/{merge}+local{args.recover}"
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            result = prune(PruneOptions(
                model=args.model, task=args.task, data_dir=args.data_dir, samples=args.samples,
                max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, keep=args.keep, method=method,
                merge=merge, router_rows=router, pipeline="sequential", recover_local=args.recover, plots=False,
                out=str(Path(d) / "out")))
            nll[name], _, ev = scored(load_model(str(Path(d) / "out")).model)
        entry = {"recover_local": {n: {k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()}
                                   for n, e in result.report["recover_local"]["layers"].items()}}
        done(name, entry, ev, start)

    # cheapest first, so a run stopped early still has every merge and criterion: the cells without
    # recovery, then the layer-local recovery, then the KL recovery (the slow cells) in RECOVER_ORDER
    jobs = [(f"{m}/{g}", whole_cell, (m, g, r, 0)) for m, g, r in CELLS + CRITERIA]
    jobs += [(f"{m}/{g}+local{args.recover}", local_cell, (m, g, r)) for m, g, r in LOCAL_CELLS]
    jobs += [(f"{m}/{g}+{kl}", whole_cell, (m, g, r, args.recover))
             for m, g, r in sorted(CELLS, key=lambda c: RECOVER_ORDER.index(c[:2])) if not args.cheap_only]
    if args.cells:
        wanted = set(args.cells.split(","))
        jobs = [job for job in jobs if job[0] in wanted]
    for name, run, cell in jobs:
        if name in nll:
            print(f"{name:28s} (resumed)", flush=True)
            continue
        run(*cell)

    diffs = write_out(complete=not (args.cheap_only or args.cells))  # the .partial stays: cells added later resume
    n = len(tokens)
    print(f"{args.task}, K={args.keep}, n={n}: task loss ± paired standard error")
    for k, v in diffs.items():
        print(f"  {k:50s} {v['diff']:+.4f} ± {v['stderr']:.4f}")


if __name__ == "__main__":
    main()
