"""The study on generation: every method x merge at K = 6, 4, 2, by fidelity against the unpruned model.

    .venv/bin/python examples/study_generation.py --bed pretrained                 # ~/.cache/uncurl/smol-moe/model
    .venv/bin/python examples/study_generation.py --bed trained                    # ~/.cache/uncurl/smoe-mixtral-8x/model
    .venv/bin/python examples/study_generation.py --model builtin:qwen2_moe --eval-limit 6 --samples 8 \\
        --gen-tokens 8 --out /tmp/gen-study                                        # a smoke run on a tiny random model

Two held-out kinds of text: the generative task file ``examples/tasks/arc_easy_qa.yaml`` (ARC-Easy questions
answered free-form, scored by exact match as lm-eval's generate_until) and ``--task corpus`` (held-out
passages). For each, the model is profiled once on its calibration split and the parent's greedy
continuations (``--gen-tokens`` per prompt) are made once (both kept in OUT/profiles); then
``examples/study_methods.py``'s sweeps score every cell on them, teacher-forced: acceptance
(sum min(p, q), the speculative-decoding acceptance rate), top-1 agreement, KL and NLL, with standard errors
over prompts, and every cell is compared prompt by prompt with the default (``ean/fit``, what
``uncurl prune`` runs with no --method/--merge) at the same K.

Stages, the most informative first, so that a run cut off still answers the question:
1. ``key``: ean/fit (the default), ean alone, reap, frequency, aimer, uncurl/aligned, uncurl/fit;
2. ``protect``: ean/fit with --protect-super-experts (the super experts each profile finds are in results.json);
3. ``recover``: --recover STEPS (router distillation, what ``uncurl prune --recover`` runs: the same
   ``pipeline.recover_after_merge``) on the default and the best other label by mean acceptance, scored on
   the same continuations and compared prompt by prompt with the same cell unrecovered;
4. ``rest``: every other method alone and with --merge fit; every grouping with average, aligned and fit.
Grouping cells use the CLI's default router rule (refit) only.

Seeded, resumable (rows already in OUT/results.json are skipped; rerun the same command) and written as
each cell finishes: OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_methods import FIDELITY, Results, common_options, prepared, row_of, run_sweep, task_key  # noqa: E402
from uncurl.cluster import METHODS, super_experts  # noqa: E402
from uncurl.fidelity import mean_stderr  # noqa: E402
from uncurl.sweep import label, parse_label  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEDS = {"pretrained": Path.home() / ".cache" / "uncurl" / "smol-moe" / "model",
        "trained": Path.home() / ".cache" / "uncurl" / "smoe-mixtral-8x" / "model"}
TASKS = (str(ROOT / "examples" / "tasks" / "arc_easy_qa.yaml"), "corpus")
DEFAULT = "ean/fit"  # uncurl prune's defaults: --method ean, --merge auto (fit where it applies)
KEY = ("ean/fit", "ean", "reap", "frequency", "aimer", "uncurl/aligned/refit", "uncurl/fit/refit")
CALIBRATION = "task"  # each text kind calibrates on its own calibration split (never its evaluation rows)


def every_label() -> list[str]:
    """Every criterion alone and with fit, every grouping with average, aligned and fit (router refit)."""
    out = []
    for method, spec in METHODS.items():
        out += [method, f"{method}/fit"] if spec.kind == "criterion" else \
            [f"{method}/{merge}/refit" for merge in ("fit", "aligned", "average")]
    return out


def sweep_labels(args, results, meta, task, labels, suffix="", **options) -> None:
    """Sweep exactly ``labels`` (in their order as the sweep runs them: method by method)."""
    wanted = set(labels)
    methods = list(dict.fromkeys(parse_label(n)[0] for n in labels))
    merges = [m for m in ("fit", "aligned", "average", "select") if any(parse_label(n)[1] in (m, "-") for n in labels)]
    # a criterion alone ("-") comes from any merge rule that copies its experts
    run_sweep(args, results, meta, task, CALIBRATION, methods, merges, ["refit"],
              lambda m, mg, r: label(m, mg, r) in wanted,
              suffix=suffix, **options)


def paired(a: dict, b: dict, measure: str) -> tuple[float, float]:
    """b minus a prompt by prompt (the same continuations): the mean and its standard error."""
    return mean_stderr([y - x for x, y in zip(a["per_prompt"][measure], b["per_prompt"][measure])])


def mean_acceptance(rows: list[dict], name: str) -> float:
    values = [r["acceptance"] for r in rows if r["label"] == name]
    return sum(values) / len(values) if values else float("-inf")


def best_other(rows: list[dict], n: int) -> list[str]:
    """The ``n`` labels other than the default with the highest mean acceptance over tasks and K."""
    names = {r["label"] for r in rows if r["label"] not in ("unpruned", DEFAULT) and "+" not in r["label"]}
    return sorted(names, key=lambda name: -mean_acceptance(rows, name))[:n]


def recover_cells(args, results, meta, task, labels) -> None:
    """Each label at each K merged as its sweep row was, then ``--recover`` (router distillation on the
    calibration texts: ``pipeline.recover_after_merge``, what ``uncurl prune --recover`` runs) and scored on the
    same continuations; the row says whether ``prune --eval`` would keep it (its task loss did not rise)."""
    from uncurl.pipeline import PruneOptions, method_used, prepare, recover_after_merge, resolved, run_eval
    from uncurl.report import Timings
    from uncurl.sweep import cell_model

    name_of, suffix = task_key(task), f"+recover{args.recover}"
    todo = [(n, k) for n in labels for k in args.recover_keeps
            if not results.has(name_of, CALIBRATION, n + suffix, k) and results.has(name_of, CALIBRATION, n, k)]
    if not todo:
        return
    profile, reference = prepared(args, task, CALIBRATION)
    opts = PruneOptions(**common_options(args, task, CALIBRATION), profile=str(profile), recover=args.recover,
                        keep=max(args.recover_keeps))
    prep = prepare(opts, sorted({k for _, k in todo}), Timings())
    opts, _, _ = resolved(opts, prep.loaded)
    tok = prep.loaded.tokenizer
    distil = replace(opts, batch_size=args.recover_batch_size or opts.batch_size,
                     max_length=args.recover_max_length or opts.max_length)
    for name, keep in todo:
        started = time.perf_counter()
        method, merge, router = parse_label(name)
        pruned, _ = cell_model(prep, prep.loaded.model, method_used(prep, method), merge, router, keep, opts.seed,
                               None, opts)
        recovery = recover_after_merge(prep.loaded, pruned, distil)
        metrics = run_eval(pruned, tok, opts, opts.eval_limit, opts.seed, reference=reference)
        base = next(r for r in results.rows if (r["task"], r["calibration"], r["label"], r["keep"])
                    == (name_of, CALIBRATION, name, keep))
        row = row_of(name_of, CALIBRATION, {**metrics, "label": name + suffix, "method": method, "merge": merge,
                                            "router": router, "keep": keep}, time.perf_counter() - started)
        curve = recovery.report.get("loss_curve") or []
        row["recovery"] = {"steps": args.recover, "batch_size": distil.batch_size, "max_length": distil.max_length,
                           "kl_first": curve[0] if curve else None, "kl_last": curve[-1] if curve else None,
                           "kept_by_prune_eval": metrics["loss"] <= base["loss"],
                           "seconds": recovery.report.get("seconds")}
        results.add(row, meta)
        print(f"{name_of} {name}{suffix} K={keep}: acceptance {base['acceptance']:.4f} -> {row['acceptance']:.4f}, "
              f"loss {base['loss']:.4f} -> {row['loss']:.4f}", flush=True)
        del pruned


def record_super_experts(args, meta, task) -> None:
    """The super experts REAP's rule finds in this task's profile (cluster.super_experts), into meta."""
    from uncurl.profile import Profile

    profile, _ = prepared(args, task, CALIBRATION)
    p = Profile.load(str(profile))
    peaks = {n: s.peak for n, s in p.layers.items()}
    found, threshold = super_experts(peaks, p.layer_index)
    meta.setdefault("super_experts", {})[task_key(task)] = {
        "layers": found, "threshold": threshold, "largest_peak": max(float(v.max()) for v in peaks.values()),
        "median_peak": float(sorted(float(x) for v in peaks.values() for x in v)[sum(v.numel() for v in peaks.values()) // 2])}


def fmt(x: float, se: float, sign: bool = False) -> str:
    return (f"{x:+.3f}" if sign else f"{x:.3f}") + f" ± {se:.3f}"


def markdown(rows: list[dict], meta: dict) -> str:
    """Per text kind: acceptance ± SE and agreement per label and K, the paired difference from the default
    (acceptance and agreement, ± SE); recovery rows against the same label unrecovered."""
    lines = [f"# Generation study: {meta['model']}", "", f"`{meta['command']}`", "",
             f"Fidelity against the unpruned model: the parent's greedy continuation of {meta['gen_tokens']} tokens per "
             f"prompt, {meta['eval_limit']} prompts per text kind (a seeded subset of the evaluation split), the pruned "
             f"model teacher-forced on it. Calibration: {meta['samples']} texts of each kind's calibration split, "
             f"{meta['max_length']} tokens. Paired differences are minus the default ({DEFAULT}) at the same K, prompt "
             "by prompt (mean ± standard error); `+recoverN` rows are against the same label unrecovered.", ""]
    for task, found in meta.get("super_experts", {}).items():
        lines.append(f"Super experts ({task} profile, REAP's rule): "
                     + (", ".join(f"{layer}: {e}" for layer, e in found["layers"].items()) or "none")
                     + f"; threshold {found['threshold']:.3g}, largest peak {found['largest_peak']:.3g}, "
                       f"median peak {found['median_peak']:.3g}.")
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        base = next((r for r in mine if r["label"] == "unpruned"), None)
        keeps = sorted({r["keep"] for r in mine if r["label"] != "unpruned"}, reverse=True)
        names = [n for n in dict.fromkeys(r["label"] for r in mine) if n != "unpruned"]
        names.sort(key=lambda n: ("+" in n, -mean_acceptance(mine, n)))
        head = f"## {task}"
        if base:
            head += f" (unpruned loss {base['loss']:.4f}" + (f", exact_match {base['exact_match']:.3f}"
                                                             if "exact_match" in base else "") + ")"
        lines += ["", head, "",
                  "| label | " + " | ".join(f"K={k} acceptance" for k in keeps) + " | "
                  + " | ".join(f"K={k} Δacc. vs {DEFAULT}" for k in keeps) + " | "
                  + " | ".join(f"K={k} agreement (Δ)" for k in keeps) + " | "
                  + " | ".join(f"K={k} loss" for k in keeps) + " |",
                  "|---|" + "---|" * (4 * len(keeps))]
        at = {(r["label"], r["keep"]): r for r in mine}
        for name in names:
            ref_name = name.split("+")[0] if "+" in name else DEFAULT
            cells = []
            for k in keeps:
                c = at.get((name, k))
                cells.append(fmt(c["acceptance"], c["acceptance_stderr"]) if c else "")
            for measure in ("acceptance", "agreement"):
                for k in keeps:
                    c, ref = at.get((name, k)), at.get((ref_name, k))
                    if not c:
                        cells.append("")
                        continue
                    diff = fmt(*paired(ref, c, measure), sign=True) if ref and ref is not c else "-"
                    cells.append(diff if measure == "acceptance" else f"{c['agreement']:.3f} ({diff})")
            for k in keeps:
                c = at.get((name, k))
                cells.append(f"{c['loss']:.4f}" if c else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(files: list[Path], labels: list[str], keeps=(6, 4, 2)) -> str:
    """The README's table: per bed and text kind, each label's acceptance ± SE at each K and its paired
    difference from the default (± SE); a cell not measured is blank."""
    import json

    lines = ["| bed, text | label | " + " | ".join(f"K={k} acceptance | Δ vs {DEFAULT}" for k in keeps) + " |",
             "|---|---|" + "---|---|" * len(keeps)]
    for file in files:
        got = json.loads(Path(file).read_text())
        bed = "pretrained" if "smol-moe" in got["model"] else "trained" if "smoe-mixtral" in got["model"] else got["model"]
        for task in dict.fromkeys(r["task"] for r in got["rows"]):
            at = {(r["label"], r["keep"]): r for r in got["rows"] if r["task"] == task}
            for name in labels:
                if not any((name, k) in at for k in keeps):
                    continue
                ref_name = name.split("+")[0] if "+" in name else DEFAULT
                cells = []
                for k in keeps:
                    c, ref = at.get((name, k)), at.get((ref_name, k))
                    cells.append(fmt(c["acceptance"], c["acceptance_stderr"]) if c else "")
                    cells.append(fmt(*paired(ref, c, "acceptance"), sign=True) if c and ref and ref is not c else
                                 ("-" if c else ""))
                lines.append(f"| {bed}, {task} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bed", choices=sorted(BEDS), default=None, help="a test bed: its model and output folder")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/generation_study_<bed>")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--keeps", default="6,4,2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256, help="calibration tokens per text")
    parser.add_argument("--eval-limit", type=int, default=48, help="prompts per text kind")
    parser.add_argument("--eval-max-length", type=int, default=128, help="prompt + continuation tokens (from the right)")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="key,protect,recover,rest")
    parser.add_argument("--recover", type=int, default=60, help="recovery steps (uncurl prune --recover)")
    parser.add_argument("--recover-keeps", default="6,4,2")
    parser.add_argument("--recover-others", type=int, default=1, help="labels besides the default to recover")
    parser.add_argument("--recover-labels", default=None,
                        help="the labels to recover (comma-separated); default: the default and --recover-others best")
    parser.add_argument("--recover-batch-size", type=int, default=None, help="default: --batch-size")
    parser.add_argument("--recover-max-length", type=int, default=None, help="default: --max-length")
    parser.add_argument("--combine", nargs="+", type=Path, default=None,
                        help="only gather these runs' results.json (e.g. one process per text kind) into OUT")
    parser.add_argument("--summary", nargs="+", type=Path, default=None,
                        help="only print the README table of these results.json files (the key labels)")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.summary, [*KEY, f"{DEFAULT}+protect", f"{DEFAULT}+recover{args.recover}"]))
        return
    if args.model is None:
        args.model = str(BEDS[args.bed or "pretrained"])
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"generation_study_{args.bed or 'pretrained'}"
    args.keeps = [int(k) for k in args.keeps.split(",")]
    args.recover_keeps = [int(k) for k in args.recover_keeps.split(",")]
    args.metric = "acceptance"
    (args.out / "profiles").mkdir(parents=True, exist_ok=True)
    results = Results(args.out, render=markdown)
    meta = {"model": args.model, "command": " ".join(["python", *sys.argv]), "seed": args.seed,
            "samples": args.samples, "max_length": args.max_length, "eval_limit": args.eval_limit,
            "eval_max_length": args.eval_max_length, "gen_tokens": args.gen_tokens, "metric": args.metric,
            "default": DEFAULT, "measures": list(FIDELITY)}
    tasks = args.tasks.split(",")
    import json

    if args.combine:  # rows and meta of several runs (each a text kind) in one results.json/.md
        for part in args.combine:
            got = json.loads((part / "results.json").read_text())
            for key in ("super_experts",):
                meta.setdefault(key, {}).update(got.get(key, {}))
            meta.setdefault("recovered", got.get("recovered"))
            meta.setdefault("commands", []).append(got["command"])
            for row in got["rows"]:
                results.add(row, meta)
        meta["command"] = " ; ".join(meta.pop("commands"))
        results.add(results.rows[-1], meta)
        print(f"combined {len(results.rows)} rows: {args.out / 'results.md'}", flush=True)
        return

    if results.path.is_file():  # a resumed run keeps what earlier stages recorded
        old = json.loads(results.path.read_text())
        meta.update({k: old[k] for k in ("super_experts", "recovered") if k in old})
    for stage in args.stages.split(","):
        started = time.perf_counter()
        for task in tasks:
            if stage == "key":  # K by K in --keeps' order, so that a run cut off has every key label at its first K
                keeps = args.keeps
                for keep in keeps:
                    args.keeps = [keep]
                    sweep_labels(args, results, meta, task, list(KEY))
                args.keeps = keeps
                record_super_experts(args, meta, task)
            elif stage == "protect":
                sweep_labels(args, results, meta, task, [DEFAULT], suffix="+protect", protect_super_experts=True)
            elif stage == "recover":
                if args.recover_labels:
                    meta["recovered"] = args.recover_labels.split(",")
                meta.setdefault("recovered", [DEFAULT, *best_other(results.rows, args.recover_others)])
                recover_cells(args, results, meta, task, meta["recovered"])
            elif stage == "rest":
                sweep_labels(args, results, meta, task, [n for n in every_label() if n not in KEY])
            else:
                raise SystemExit(f"--stages: {stage!r} is not one of key, protect, recover, rest")
        print(f"stage {stage}: {time.perf_counter() - started:.0f} s", flush=True)
    if results.rows:  # results.json/.md with the final meta (super experts, the labels recovered)
        results.add(results.rows[-1], meta)
    print(f"done: {args.out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
