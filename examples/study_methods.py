"""Which expert-reduction method wins? Every method x merge (x router where it matters) at K = 6, 4, 2.

    .venv/bin/python examples/study_methods.py                       # the pretrained test bed (issue 8)
    .venv/bin/python examples/study_methods.py --model builtin:qwen2_moe --eval-limit 8 --samples 16 \\
        --tasks superglue-copa --out /tmp/study                      # a smoke run on a tiny random model
    nice -n 10 .venv/bin/python examples/study_methods.py &          # long: run it in the background

For each task (ARC-Easy, PIQA, COPA by default) the model is profiled once on 256 calibration
examples of the task, the profile file is kept (``OUT/profiles``), and one ``uncurl sweep`` over that
profile evaluates every cell: each pruning criterion alone, each grouping with every merge rule
(router ``mean``), and each grouping with ``--merge aligned`` under every router rule (the router
rule matters for merged groups only; the study does not multiply it over all merge rules, unless
``--every-router``). Then
the two best labels by mean accuracy over tasks and K are rerun with corpus calibration
(task-agnostic) for the task vs corpus comparison.

Seeded (--seed), resumable (cells already in OUT/results.json are skipped: rerun the same command
after an interruption), and results are written as each cell finishes: OUT/results.json (every
row with acc, acc_norm, loss, n and binomial standard errors) and OUT/results.md (the tables).

``--metric loss`` ranks by the task loss (mean NLL per token of prompt + gold answer, lower is
better) instead of accuracy: for a model whose accuracy sits at chance, such as the trained 17.8M
test bed (``examples/train_smoe.py``)::

    nice .venv/bin/python examples/study_methods.py --model ~/.cache/uncurl/smoe-mixtral-8x/model \\
        --metric loss --tasks superglue-rte,superglue-cb,superglue-copa --out runs/study-trained/glue3

(README, "Both test beds by task loss", has the exact commands of the recorded run.)

``--metric acceptance`` (or ``agreement``) ranks by generation fidelity against the unpruned model
(``--gen-tokens`` of its greedy continuation per prompt; uncurl/fidelity.py): each row keeps its
per-prompt figures, so two rows of one task and K compare prompt by prompt
(``examples/study_generation.py`` runs that study on a generative task file and the corpus).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from uncurl.cluster import METHODS  # noqa: E402
from uncurl.merge import MERGE_RULES, ROUTER_RULES  # noqa: E402
from uncurl.sweep import SweepOptions, label, parse_label, sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "uncurl" / "smol-moe" / "model"


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n - 1, 1))


def wanted(method: str, merge: str, router: str) -> bool:
    """The study's cells: criteria once; groupings x merge with router mean; aligned x router."""
    return merge == "-" or router == "mean" or merge == "aligned"


class Results:
    def __init__(self, out: Path, render=None):
        self.render = render or markdown  # rows, meta -> results.md
        self.path = out / "results.json"
        self.rows = json.loads(self.path.read_text())["rows"] if self.path.is_file() else []

    def has(self, task, calibration, name, keep) -> bool:
        return any((r["task"], r["calibration"], r["label"], r["keep"]) == (task, calibration, name, keep)
                   for r in self.rows)

    def add(self, row: dict, meta: dict) -> None:
        self.rows = [r for r in self.rows if (r["task"], r["calibration"], r["label"], r["keep"])
                     != (row["task"], row["calibration"], row["label"], row["keep"])] + [row]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "rows": self.rows}, indent=1) + "\n")
        tmp.replace(self.path)
        (self.path.parent / "results.md").write_text(self.render(self.rows, meta))


def row_of(task, calibration, r: dict, seconds: float | None = None) -> dict:
    out = {"task": task, "calibration": calibration, "label": r.get("label", "unpruned"),
           "method": r.get("method", "unpruned"), "merge": r.get("merge", "-"), "router": r.get("router", "-"),
           "keep": r["keep"], "n": r["n"], "loss": r["loss"]}
    for metric in ("acc", "acc_norm"):
        if metric in r:
            out[metric], out[f"{metric}_stderr"] = r[metric], stderr(r[metric], r["n"])
    for metric in ("exact_match", *FIDELITY):
        if metric in r:
            out[metric], out[f"{metric}_stderr"] = r[metric], r.get(f"{metric}_stderr")
    if "fidelity" in r:  # per prompt, for paired differences between rows (agreement and acceptance only: small)
        out["per_prompt"] = {m: r["fidelity"]["per_prompt"][m] for m in FIDELITY[:2]}
        out["gen_tokens"], out["fidelity_tokens"] = r["fidelity"]["gen_tokens"], r["fidelity"]["tokens"]
    if seconds is not None:
        out["seconds"] = round(seconds, 1)
    return out


FIDELITY = ("acceptance", "agreement", "kl", "nll")  # fidelity.MEASURES, the ranking ones first


def fidelity_table(name: str):
    """TABLES' entry for a fidelity metric: the mean ± standard error over prompts, then the other measure."""
    other = "agreement" if name == "acceptance" else "acceptance"
    return (f"{name} against the unpruned model (mean ± standard error over prompts; higher is better), every model "
            "on the parent's same continuations",
            lambda b: f"unpruned loss {b['loss']:.4f}" + (f", exact_match {b['exact_match']:.3f}" if "exact_match" in b else ""),
            ((name, lambda c: f"{c[name]:.3f} ± {c[name + '_stderr']:.3f}"), (other, lambda c: f"{c[other]:.3f}"),
             ("loss", lambda c: f"{c['loss']:.4f}")))


# metric -> (what the tables show, the unpruned model's figures, the column groups: key and cell text)
TABLES = {
    "acc": ("acc (± binomial standard error)",
            lambda b: f"unpruned acc {b['acc']:.3f} ± {b['acc_stderr']:.3f}, acc_norm {b['acc_norm']:.3f}",
            (("acc", lambda c: f"{c['acc']:.3f} ± {c['acc_stderr']:.3f}"), ("acc_norm", lambda c: f"{c['acc_norm']:.3f}"))),
    "loss": ("Task loss (mean NLL per token of prompt + gold answer; lower is better, rows best first), every model "
             "on the same examples",
             lambda b: f"unpruned loss {b['loss']:.4f}" + (f", acc {b['acc']:.3f}" if "acc" in b else ""),
             (("loss", lambda c: f"{c['loss']:.4f}"), ("acc", lambda c: f"{c['acc']:.3f}"))),
    "acceptance": fidelity_table("acceptance"),
    "agreement": fidelity_table("agreement"),
}


def markdown(rows: list[dict], meta: dict) -> str:
    metric = meta.get("metric", "acc")
    what, unpruned, columns = TABLES[metric]
    lines = [f"# Methods study: {meta['model']}", "", f"`{meta['command']}`", "",
             f"{what}; calibration = {meta.get('samples', 256)} examples of the task unless marked corpus.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        keeps = sorted({r["keep"] for r in mine if r["label"] != "unpruned"}, reverse=True)
        base = next((r for r in mine if r["label"] == "unpruned" and r["calibration"] == "task"), None)
        lines += [f"## {task}" + (f" (n={base['n']}, {unpruned(base)})" if base and metric in base else ""), "",
                  "| method | calibration | " + " | ".join(f"K={k} {key}" for key, _ in columns for k in keeps) + " |",
                  "|---|---|" + "---|" * (len(columns) * len(keeps))]
        labels = list(dict.fromkeys((r["label"], r["calibration"]) for r in mine if r["label"] != "unpruned"))
        if metric == "loss":  # best first: task calibration, then by total loss
            labels.sort(key=lambda lc: (lc[1] != "task", sum(r["loss"] for r in mine if (r["label"], r["calibration"]) == lc)))
        for name, cal in labels:
            cells = {r["keep"]: r for r in mine if (r["label"], r["calibration"]) == (name, cal)}
            text = [cell(cells[k]) if k in cells and key in cells[k] else "" for key, cell in columns for k in keeps]
            lines.append(f"| {name} | {cal} | " + " | ".join(text) + " |")
        lines.append("")
    return "\n".join(lines)


def task_key(task: str) -> str:
    """A task's name in files and rows: a task file's stem (examples/tasks/arc_easy_qa.yaml -> arc_easy_qa)."""
    return Path(task).stem if task.endswith((".yaml", ".yml", ".json")) else task


def common_options(args, task: str, calibration: str) -> dict:
    """The options every sweep, profile and reference of one (task, calibration) share."""
    fidelity = args.metric in FIDELITY
    return dict(model=str(args.model), task=task, data_dir=str(args.data_dir), samples=args.samples,
                max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, device=args.device,
                calibrate_on="corpus" if calibration == "corpus" else None,
                eval_limit=args.eval_limit,  # a seeded subset; all of a smaller split (COPA: 100)
                **({"metric": args.metric, "gen_tokens": getattr(args, "gen_tokens", None),
                    "eval_max_length": getattr(args, "eval_max_length", None) or args.max_length} if fidelity else {}))


def prepared(args, task: str, calibration: str):
    """(profile file, the parent's Reference or None): made once per (task, calibration) with one load of
    the model and kept in OUT (a resumed run reads them); the reference only for a fidelity --metric."""
    from uncurl.fidelity import Reference

    key = f"{task_key(task)}-{calibration}"
    settings = f"n{args.eval_limit}-g{getattr(args, 'gen_tokens', None)}-L{getattr(args, 'eval_max_length', None) or args.max_length}"
    profile = args.out / "profiles" / f"{key}.safetensors"
    ref_file = args.out / "profiles" / f"{key}-reference-{settings}.pt"  # made on these evaluation settings only
    fidelity = args.metric in FIDELITY
    if not profile.is_file() or (fidelity and not ref_file.is_file()):
        import torch

        from uncurl.load import load_model
        from uncurl.pipeline import RunOptions, parent_reference, run_profile

        opts = RunOptions(**common_options(args, task, calibration))
        loaded = load_model(opts.model, device=opts.device, seed=opts.seed)
        if not profile.is_file():
            run_profile(loaded, opts, opts.seed).save(profile)
        if fidelity and not ref_file.is_file():
            started = time.perf_counter()
            ref = parent_reference(loaded.model, loaded.tokenizer, opts, opts.eval_limit, opts.seed)
            print(f"{key}: the parent's continuations in {time.perf_counter() - started:.0f} s", flush=True)
            torch.save(vars(ref), ref_file.with_suffix(".tmp"))
            ref_file.with_suffix(".tmp").replace(ref_file)
        del loaded
    if not fidelity:
        return profile, None
    import torch

    return profile, Reference(**torch.load(ref_file, weights_only=True))


def run_sweep(args, results, meta, task, calibration, methods, merges, routers, keep_cell, *, suffix="",
              **options) -> None:
    """One sweep of ``task`` over the cells ``keep_cell`` wants that ``results`` lacks; rows are labelled
    ``label + suffix`` (``options``: more SweepOptions, e.g. protect_super_experts=True with suffix "+protect")."""
    name_of = task_key(task)
    profile, reference = prepared(args, task, calibration)
    common = common_options(args, task, calibration)

    def skip(method, merge, router, keep):
        return (not keep_cell(method, merge, router)
                or results.has(name_of, calibration, label(method, merge, router) + suffix, keep))

    if all(skip(m, mg, r, k) for m in methods for mg in (["-", *merges] if METHODS[m].kind == "criterion" else merges)
           for r in (["-"] if METHODS[m].kind == "criterion" else routers) for k in args.keeps):  # a criterion: alone or fit
        return
    started = [time.perf_counter()]

    def on_row(r, base):
        if not results.has(name_of, calibration, "unpruned", base["keep"]):
            results.add(row_of(name_of, calibration, base), meta)
        row = row_of(name_of, calibration, r, time.perf_counter() - started[0])
        row["label"] += suffix
        results.add(row, meta)
        started[0] = time.perf_counter()
        print(f"{name_of} {calibration} {row['label']} K={r['keep']}: acc {r.get('acc')} loss {r['loss']:.4f}"
              + (f" {args.metric} {r[args.metric]:.4f}" if args.metric in FIDELITY else ""), flush=True)

    sweep(SweepOptions(**common, **options, keeps=tuple(args.keeps), methods=tuple(methods), merges=tuple(merges),
                       routers=tuple(routers), profile=str(profile),
                       out=str(args.out / "sweeps" / f"{name_of}-{calibration}{suffix}"),
                       overwrite=True, extra={"command": meta["command"]}), on_row=on_row, skip=skip, reference=reference)


def best_labels(rows: list[dict], n: int = 2, metric: str = "acc") -> list[str]:
    """The ``n`` labels with the best mean ``metric`` over every task and K (task calibration):
    the highest accuracy, or the lowest loss."""
    scores = {}
    for r in rows:
        if r["calibration"] == "task" and r["label"] != "unpruned" and metric in r:
            scores.setdefault(r["label"], []).append(r[metric] if metric == "loss" else -r[metric])  # lowest first
    return sorted(scores, key=lambda k: sum(scores[k]) / len(scores[k]))[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods_study")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--tasks", default="arc-easy,piqa,superglue-copa")
    parser.add_argument("--keeps", default="6,4,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--merges", default=",".join(MERGE_RULES))
    parser.add_argument("--routers", default=",".join(ROUTER_RULES))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--eval-limit", type=int, default=500, help="evaluation examples per task (a seeded subset; COPA has 100)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", choices=["acc", "loss", "acceptance", "agreement"], default="acc",
                        help="what ranks the methods (the two best get the corpus rerun): accuracy, task loss, or "
                             "generation fidelity against the unpruned model (see --gen-tokens)")
    parser.add_argument("--gen-tokens", type=int, default=None,
                        help="with --metric acceptance/agreement: tokens of the parent's greedy continuation per prompt")
    parser.add_argument("--no-corpus", action="store_true", help="skip the corpus-calibration comparison")
    parser.add_argument("--every-router", action="store_true",
                        help="every grouping x merge x router cell, not only aligned merges under every router")
    args = parser.parse_args()
    args.keeps = [int(k) for k in args.keeps.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profiles").mkdir(exist_ok=True)
    import sys

    meta = {"model": args.model, "command": " ".join(["python", *sys.argv]), "seed": args.seed,
            "samples": args.samples, "eval_limit": args.eval_limit, "metric": args.metric}
    results = Results(args.out)
    methods, merges, routers = (v.split(",") for v in (args.methods, args.merges, args.routers))
    tasks = args.tasks.split(",")
    for task in tasks:
        run_sweep(args, results, meta, task, "task", methods, merges, routers,
                  (lambda *cell: True) if args.every_router else wanted)
    if not args.no_corpus:
        best = best_labels(results.rows, metric=args.metric)
        meta["corpus_labels"] = best
        for task in tasks:
            for name in best:
                method, merge, router = parse_label(name)
                run_sweep(args, results, meta, task, "corpus", [method],  # a criterion ignores merge/router
                          [merge if merge != "-" else "select"], [router if router != "-" else "mean"],
                          lambda m, mg, r, name=name: label(m, mg, r) == name)
    print(f"done: {args.out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
