"""Summarise examples/study_fit.py runs: does the best merge beat the best criterion alone?

    .venv/bin/python examples/summarise_fit.py benchmarks/results/fit_recover_*_k*.json \\
        --out benchmarks/results/fit_recover_summary.md

(a ``--out``.partial of a run still going can be given too: its cells so far.)

Every study file scores its models on the same examples, so each difference below is paired and
carries examples/paired_loss.py's standard error (ratio estimator over examples). For each bed
(the study's ``--model``) and K it gives:

- every cell's task loss gained against the unpruned model, +- its paired standard error;
- issue 18's test: the best *merge* (a cell whose merge rule rewrites expert weights: ``aligned``,
  ``fit``; with or without recovery) minus the best criterion alone (``select`` after a criterion,
  no recovery), and whether it is below -2 paired standard errors;
- recovery's share of EAN's gap: 1 - (loss gained by ``ean/select`` + recovery) / (loss gained by
  ``ean/select``), for each recovery form, and the same for the best recovered cell.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_loss import ratio_stderr  # noqa: E402

from uncurl.cluster import METHODS  # noqa: E402

MERGES = ("aligned", "fit", "average")  # merge rules that rewrite expert weights ("select" keeps them)


def bed_of(model: str) -> str:
    return "pretrained" if "smol-moe" in model else "trained" if "smoe-mixtral" in model else model


def parts(name: str) -> tuple[str, str, str]:
    """"uncurl/fit+recover60" -> ("uncurl", "fit", "+recover60")."""
    base, _, tail = name.partition("+")
    method, _, merge = base.partition("/")
    return method, merge, "+" + tail if tail else ""


def study(path: Path) -> dict:
    data = json.loads(path.read_text())
    if path.suffix == ".partial":  # a run still going (or stopped): its cells so far
        data.update(model=data["args"]["model"], keep=int(data["args"]["keep"]))
    if "nll" not in data:  # a run from before per-example losses were kept in --out: its .partial has them
        data.update({k: v for k, v in json.loads(path.with_name(path.name + ".partial").read_text()).items()
                     if k in ("nll", "tokens")})
    return data


def summarise(data: dict) -> dict:
    nll, tokens = data["nll"], data["tokens"]

    def paired(a: str, b: str) -> tuple[float, float]:
        return ratio_stderr([x - y for x, y in zip(nll[a], nll[b])], tokens)

    names = [n for n in nll if n != "unpruned"]
    gained = {n: paired(n, "unpruned") for n in names}
    criteria = [n for n in names if parts(n)[1] == "select" and not parts(n)[2]
                and METHODS[parts(n)[0]].kind == "criterion"]
    merges = [n for n in names if parts(n)[1] in MERGES]
    best_criterion = min(criteria, key=lambda n: gained[n][0])
    best_merge = min(merges, key=lambda n: gained[n][0])
    d, se = paired(best_merge, best_criterion)
    out = {"bed": bed_of(data["model"]), "keep": data["keep"], "n": len(tokens), "unpruned": ratio_stderr(nll["unpruned"], tokens),
           "gained": gained, "best_criterion": best_criterion, "best_merge": best_merge,
           "merge_minus_criterion": (d, se), "merge_wins": d < -2 * se, "closes": {}}
    ean = gained.get("ean/select", (None,))[0]
    recovered = [n for n in names if parts(n)[2]]
    if ean and ean > 0 and recovered:
        for n in [r for r in recovered if r.startswith("ean/select+")] + [min(recovered, key=lambda r: gained[r][0])]:
            out["closes"][n] = 1 - gained[n][0] / ean
    return out


def markdown(summaries: list[dict]) -> str:
    lines = []
    for bed in dict.fromkeys(s["bed"] for s in summaries):
        mine = sorted((s for s in summaries if s["bed"] == bed), key=lambda s: -s["keep"])
        keeps = [s["keep"] for s in mine]
        lines += [f"#### {bed} test bed: task loss gained against the unpruned model (nats/token, +- paired SE)", "",
                  "unpruned: " + ", ".join(f"K={s['keep']} run: {s['unpruned'][0]:.4f} +- {s['unpruned'][1]:.4f} "
                                           f"(n={s['n']})" for s in mine), "",
                  "| cell | " + " | ".join(f"K={k}" for k in keeps) + " |", "|---|" + "---|" * len(keeps)]
        cells = list(dict.fromkeys(n for s in mine for n in s["gained"]))
        cells.sort(key=lambda n: sum(s["gained"][n][0] for s in mine if n in s["gained"]) / max(
            1, sum(n in s["gained"] for s in mine)))
        for n in cells:
            row = [f"{s['gained'][n][0]:+.4f} +- {s['gained'][n][1]:.4f}" if n in s["gained"] else "" for s in mine]
            lines.append(f"| {n} | " + " | ".join(row) + " |")
        lines += ["", "| K | best merge | best criterion alone | merge - criterion | beyond 2 SE? | recovery's share of EAN's gap |",
                  "|---|---|---|---|---|---|"]
        for s in mine:
            d, se = s["merge_minus_criterion"]
            closes = "; ".join(f"{n} {v:.0%}" for n, v in s["closes"].items()) or "-"
            lines.append(f"| {s['keep']} | {s['best_merge']} | {s['best_criterion']} | {d:+.4f} +- {se:.4f} | "
                         f"{'yes' if s['merge_wins'] else 'no'} | {closes} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    text = markdown([summarise(study(p)) for p in args.studies])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
