"""Sweep --keep, --method, --merge and --router to find where the task starts to suffer: profile once.

    uncurl sweep --model DIR --task superglue-rte --keep 6,4,2 --method uncurl,reap --merge aligned,select

The model is loaded and profiled once (or the profile is read from --profile): the profile holds
every statistic, so every (method, merge, router, K) cell is planned from it, merged from the
untouched original in memory, and evaluated. Pruning criteria keep experts alone, so merge and
router rules that copy them cannot change them: they are run once, shown with merge and router "-",
and once more per fitting merge rule (``fit``, the default ``auto``'s choice where it applies).
The threshold of a method is the smallest K such that it and every larger K swept stay within
--tolerance points of the unpruned model on --metric. Writes sweep.json, sweep.md and sweep.png;
pruned checkpoints only with --keep-checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .cluster import METHODS, get_method
from .errors import UncurlError
from .evaluate import METRICS, drop
from .fidelity import paired
from .merge import MERGE_RULES, ROUTER_RULES, parameter_count, rewrite_model
from .options import AUTO_MERGE, DEFAULT_MERGE, DEFAULT_METHOD, DEFAULT_ROUTER, EVAL, PRUNE, ints, names, opt
from .output import claim, library_caches
from .pipeline import (RunOptions, base_report, check_options, fit_after_merge, follow, loaded_check, method_used,
                       may_fit, parent_reference, plan_all, prepare, resolved, run_eval, run_inputs)
from .report import Timings
from .save import verify_checkpoint, write_checkpoint

SWEEP_SCHEMA = 1


@dataclass
class SweepOptions(RunOptions):
    """A run's options, with lists of K, methods and rules to try in place of one of each."""

    keeps: tuple[int, ...] = opt((6, 4, 2), "--keep", "-k", panel=PRUNE, parse=ints,
                                 help="Comma-separated K values to try, e.g. 6,4,2.")
    methods: tuple[str, ...] = opt((DEFAULT_METHOD, "frequency"), "--method", panel=PRUNE, parse=names,
                                   help="Comma-separated methods (see prune --help): " + ", ".join(METHODS) + ".")
    merges: tuple[str, ...] = opt((DEFAULT_MERGE,), "--merge", panel=PRUNE, parse=names,
                                  help="Comma-separated merge rules (see prune --help): " + ", ".join([AUTO_MERGE, *MERGE_RULES])
                                       + "; a pruning criterion runs once per fitting rule (fit) and once for all "
                                         "the others.")
    routers: tuple[str, ...] = opt((DEFAULT_ROUTER,), "--router", "--router-rows", panel=PRUNE, parse=names,
                                   help="Comma-separated router rules for grouping methods: "
                                        + ", ".join(ROUTER_RULES) + ".")
    out: str = opt("sweep", "--out", "-o", panel=PRUNE,
                   help="Output folder: sweep.json, sweep.md, sweep.png (+ checkpoints/).")
    tolerance: float = opt(1.0, panel=EVAL, help="Largest acceptable drop in --metric, in points.")  # see evaluate.drop
    keep_checkpoints: bool = opt(False, panel=PRUNE, help="Also save every pruned checkpoint (disk!).")


def threshold(rows: list[dict], metric: str, tolerance: float) -> int | None:
    """Smallest K such that it and every larger K in ``rows`` drop by at most ``tolerance``."""
    best = None
    for row in sorted(rows, key=lambda r: -r["keep"]):
        d = row["drop"].get(metric)
        if d is None or d > tolerance:
            break
        best = row["keep"]
    return best


def pairwise(rows: list[dict]) -> list[dict]:
    """Every two cells of the same K compared prompt by prompt on the fidelity measures (``fidelity.paired``:
    ``b`` minus ``a``, the mean difference and its standard error), in the order the cells ran."""
    out = []
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        at = [r for r in rows if r["keep"] == keep]
        out += [{"keep": keep, "a": a["label"], "b": b["label"], **paired(a, b)}
                for i, a in enumerate(at) for b in at[i + 1:]]
    return out


def cells(opts: SweepOptions) -> list[tuple[str, str, str]]:
    """Every (method, merge, router) to run. A pruning criterion's kept experts are the same under
    every merge and router rule that copies them: it runs once with merge/router "-", and once more
    per fitting merge rule (``fit``, which refits them), with router "-"."""
    out = []
    for method in opts.methods:
        if get_method(method).kind == "criterion":
            fitted = [m for m in opts.merges if may_fit(m)]
            if len(fitted) < len(opts.merges):
                out.append((method, "-", "-"))
            out += [(method, merge, "-") for merge in fitted]
        else:
            out += [(method, merge, router) for merge in opts.merges for router in opts.routers]
    return list(dict.fromkeys(out))


def label(method: str, merge: str, router: str) -> str:
    return method if merge == "-" else f"{method}/{merge}" if router == "-" else f"{method}/{merge}/{router}"


def parse_label(name: str) -> tuple[str, str, str]:
    """``label``'s inverse: "reap" -> ("reap", "-", "-"), "uncurl/aligned/refit" -> its three parts."""
    method, merge, router = (name.split("/") + ["-", "-"])[:3]
    return method, merge, router


def cell_model(prep, model, method: str, merge: str, router: str, keep: int, seed: int, top_k: int | None = None,
               opts=None):
    """One cell's pruned model (``model`` is left as it is) and its plans; a criterion's singletons
    ("-" merge and router) are kept as they are. A fitting merge rule (``--merge fit``) fits on
    ``opts``' calibration texts."""
    plans = plan_all(prep, keep, method, seed)
    pruned = rewrite_model(model, prep.loaded.adapter, plans, router_rule="mean" if router == "-" else router,
                           merge="select" if merge == "-" else merge, stats=prep.profile.layers, top_k=top_k)
    if merge != "-" and MERGE_RULES[merge].fit:
        if opts is None:
            raise ValueError(f"--merge {merge} needs the run's options (its calibration texts)")
        fit_after_merge(prep.loaded, pruned, plans, opts)
    return pruned, plans


def sweep(opts: SweepOptions, on_row=None, skip=None, reference=None) -> dict | None:
    """Run the sweep. ``on_row(row, unpruned)`` is called as each cell finishes (e.g. to save
    results as they come); ``skip(method, merge, router, keep)`` -> True leaves a cell out (e.g.
    one a resumed study already has); ``reference``: the parent's continuations made earlier
    (``pipeline.parent_reference`` on the same evaluation examples), so that several sweeps of one
    study generate them once."""
    if not opts.keeps or not opts.methods or not opts.merges or not opts.routers:
        raise UncurlError("--keep, --method, --merge and --router each need at least one value, "
                          "e.g. --keep 6,4,2 --method uncurl")
    opts.method, opts.merge, opts.router_rows = (",".join(v) for v in (opts.methods, opts.merges, opts.routers))
    check_options(opts, evaluating=True)
    if distributed.follower():  # a rank other than 0 under torchrun: its share of the profile only
        with library_caches():  # this rank writes nothing: its caches in a folder removed after
            return follow(opts, list(opts.keeps))
    with claim(opts.out, overwrite=opts.overwrite, inputs=run_inputs(opts)) as output:  # held to the end
        return _sweep(opts, output, on_row, skip, reference)


def _sweep(opts: SweepOptions, output, on_row, skip, reference=None) -> dict:
    timings, out = Timings(), output.path
    copies = len(cells(opts)) if opts.keep_checkpoints else 0  # every cell's checkpoints must fit
    prep = prepare(opts, list(opts.keeps), timings, check_loaded=loaded_check(output, sorted(set(opts.keeps)), copies))
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    opts, _, auto = resolved(opts, prep.loaded)  # --merge auto: fit where it applies, else aligned
    opts.merges = tuple(opts.merge.split(","))
    with timings.stage("eval_unpruned"):  # with a fidelity metric, the parent's continuations once for every cell
        if reference is None:
            reference = parent_reference(model, tok, opts, opts.eval_limit, opts.seed)
        base = run_eval(model, tok, opts, opts.eval_limit, opts.seed, reference=reference)
    base = {"keep": prep.num_experts, "params": parameter_count(model), **base}
    rows = []
    with output.staged() as tmp:
        for method, merge, router in cells(opts):
            used = method_used(prep, method)  # what runs: the default may fall back (said once per cell)
            for keep in sorted(set(opts.keeps), reverse=True):
                if skip is not None and skip(method, merge, router, keep):
                    continue
                name = label(method, merge, router)
                with timings.stage(f"{name}-k{keep}"):
                    pruned, plans = cell_model(prep, model, used, merge, router, keep, opts.seed, opts.top_k, opts)
                    metrics = run_eval(pruned, tok, opts, opts.eval_limit, opts.seed, reference=reference)
                    row = {"method": used, **({"method_requested": method} if used != method else {}), "merge": merge, "router": router, "label": name, "keep": keep,
                           "params": parameter_count(pruned), **metrics,
                           "drop": {m: drop(base, metrics, m) for m in METRICS},
                           "groups": {layer: [list(g) for g in p.groups] for layer, p in plans.items()}}
                    if opts.keep_checkpoints:
                        folder = tmp / "checkpoints" / f"{name.replace('/', '-')}-k{keep}"
                        stored = prep.loaded.quantized  # a quantized input: written in its format
                        write_checkpoint(pruned, tok, folder, extra_files=prep.loaded.processor_files,
                                         as_input=(stored, prep.loaded.adapter, plans) if stored else None,
                                         carry=prep.loaded.carry)
                        verify_checkpoint(folder, prep.loaded.adapter, keep, prep.top_k_after, tok,
                                          prep.loaded.placement)
                        row["checkpoint"] = str(out / "checkpoints" / folder.name)
                    rows.append(row)
                    if on_row is not None:
                        on_row(row, base)
                    del pruned
        summary = {
            "schema_version": SWEEP_SCHEMA,
            **base_report(opts, prep, timings),
            "model": {"id": opts.model, "model_type": model.config.model_type, "experts": prep.num_experts,
                      "top_k": prep.top_k_after},
            **auto,
            "metric": opts.metric,
            "tolerance": opts.tolerance,
            "unpruned": base,
            "results": rows,
            "threshold": {lab: threshold([r for r in rows if r["label"] == lab], opts.metric, opts.tolerance)
                          for lab in dict.fromkeys(r["label"] for r in rows)},
            **({"paired": pairwise(rows)} if reference is not None else {}),
            "output": str(out),
        }
        (tmp / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "sweep.md").write_text(markdown(summary))
        plot(summary, tmp / "sweep.png")
    return summary


def markdown(s: dict) -> str:
    base, metric = s["unpruned"], s["metric"]
    has_acc = "acc" in base
    cols = (["acc", "acc_norm", "loss"] if has_acc else ["loss"]) + [m for m in ("exact_match", "agreement", "acceptance") if m in base]
    lines = [f"# uncurl sweep: {s['model']['id']} on {base['task']}", "", f"`{s['command']}`", "",
             f"{base['n']} evaluation examples; calibration: {s['task']['name']} "
             f"({s['task']['calibration_examples']} examples, {s['task']['tokens']:,} tokens).", "",
             "| method | K | " + " | ".join(cols) + f" | drop in {metric} (points) |",
             "|---|---|" + "---|" * (len(cols) + 1),
             f"| unpruned | {base['keep']} | " + " | ".join(f"{base[c]:.4f}" for c in cols) + " | - |"]
    for r in s["results"]:
        lines.append(f"| {r['label']} | {r['keep']} | " + " | ".join(f"{r[c]:.4f}" for c in cols)
                     + f" | {r['drop'][metric]} |")
    lines += ["", f"Threshold (smallest K with every K above it within {s['tolerance']} points of {metric}): "
              + ", ".join(f"{m}: {'K=' + str(k) if k is not None else 'none'}" for m, k in s["threshold"].items()),
              "", "![metric vs K](sweep.png)", ""]
    for p in s.get("paired", []):
        if p is s["paired"][0]:
            lines += ["Fidelity against the unpruned model, cells of one K compared prompt by prompt "
                      "(b minus a, mean ± standard error):", "", "| K | a | b | agreement | acceptance |",
                      "|---|---|---|---|---|"]
        lines.append(f"| {p['keep']} | {p['a']} | {p['b']} | "
                     + " | ".join(f"{p[m]['diff']:+.4f} ± {p[m]['stderr']:.4f}" for m in ("agreement", "acceptance"))
                     + " |")
    return "\n".join(lines) + ("\n" if s.get("paired") else "")


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [s["metric"]] + (["loss"] if s["metric"] != "loss" else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in dict.fromkeys(r["label"] for r in s["results"]):
            rows = sorted((r for r in s["results"] if r["label"] == method), key=lambda r: r["keep"])
            ax.plot([r["keep"] for r in rows], [r[metric] for r in rows], marker="o", label=method)
        ax.axhline(s["unpruned"][metric], color="gray", linestyle="--", label=f"unpruned (K={s['unpruned']['keep']})")
        ax.set(xlabel="experts kept per layer (K)", ylabel=metric, title=f"{s['unpruned']['task']}: {metric}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
