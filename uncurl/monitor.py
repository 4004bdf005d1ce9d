"""A coverage gate for staged rollout: does new traffic still route to the experts the pruned model kept?

    uncurl monitor --pruned runs/k4 --task superglue-rte --data-dir ../shared/data --out rte-monitor
    uncurl monitor --pruned runs/k4 --file traffic.jsonl --min-coverage 0.9 --json

The traffic runs through the PARENT model (the one the pruned folder's ``report/report.json`` names,
a local folder by the absolute path it was read from; or ``--parent``; or ``--profile``, a profile
of the traffic through the parent from ``uncurl profile``), where routing can still choose every
expert. Per MoE layer and overall (the layers'
sums pooled), the share of the traffic's routing mass (the gate weights of the top-k choices) that
lands on experts the pruned model

- **kept** as they were (a group of one),
- **merged** into a group with others (covered: the group survives as one expert, but reported
  apart, since the merged expert is not the one the router chose),
- **dropped** (not covered).

Coverage = kept + merged = 1 - dropped. Beside it, the Jensen-Shannon divergence (base 2, 0 to 1)
of the traffic's expert-usage share (top-k slots) from the calibration profile's (the report's).
``--min-coverage X`` exits ``EXIT_COVERAGE`` (5) when the overall coverage is below X, ``--max-divergence
X`` when the divergence is above X; the output is written either way. On the pretrained test bed
(examples/measure_monitor.py, benchmarks/results/monitor_testbed.json) only the divergence told the
pruned-for task's held-out traffic from other tasks' traffic: BoolQ's traffic covered better than
RTE's own, whatever the coverage statistic, method or K. A folder that is not an uncurl prune output, or a parent (or profile) that
is not the model the pruned one was made from (model type, MoE layers, expert count, router
fingerprint), is bad input: exit 2, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import EXIT_COVERAGE, UncurlError
from .options import EVAL, MODEL, opt
from .routes import TrafficOptions, traffic_texts

log = logging.getLogger(__name__)
_TASK = next(f for f in dataclasses.fields(TrafficOptions) if f.name == "task")  # its flag, help and panel


@dataclass
class MonitorOptions(TrafficOptions):
    # no default traffic (prune's is superglue-rte): a gate must be told what it checks, --task or --file
    task: str | None = dataclasses.field(default=None, metadata=_TASK.metadata)
    pruned: str | None = opt(
        None, "--pruned", panel=MODEL,
        help="The pruned model's folder (an `uncurl prune` output): its report.json names the parent and the plan.")
    parent: str | None = opt(
        None, "--parent", panel=MODEL, readme_default="the report's",
        help="The parent model to profile the traffic through (default: the one report.json names, a built-in one "
             "with the prune's seed; with --parent, --seed's); it must be the model the pruned one was made from "
             "(checked: model type, MoE layers, expert count, router fingerprint).")
    min_coverage: float | None = opt(
        None, panel=EVAL,
        help="Gate: exit 5 when the overall coverage (share of routing mass on experts the pruned model kept or "
             "merged) is below this, e.g. 0.95. It bounds how much of the traffic's routing the pruned model still "
             "has, not whether the traffic is the task: on the pretrained test bed no coverage figure (mass, top-1, "
             "uncovered tokens, lowest layer; EAN or frequency, K = 2 or 4) put the task's held-out traffic above "
             "every other task's (README). The output is written either way.")
    max_divergence: float | None = opt(
        None, panel=EVAL,
        help="Gate: exit 5 when the JS divergence of the traffic's expert usage from the calibration profile's "
             "(mean over layers, 0..1) is above this, e.g. 0.005. On the pretrained test bed it separated the "
             "pruned-for task's held-out traffic (0.0005) from every other task's (0.0022 to 0.043), where "
             "coverage did not (README). The output is written either way.")
    out: str = opt("monitor", "--out", "-o",
                   help="Output folder: monitor.json, monitor.md, monitor.png. Written whole or not at all.")


def read_pruned(folder: str | None) -> dict:
    """The report of an uncurl prune output at ``folder``, or exit 2 naming it."""
    from .output import uncurl_output

    if not folder:
        raise UncurlError("--pruned is required: the folder an `uncurl prune` wrote (it holds report/report.json)")
    path = Path(folder)
    if not path.is_dir():
        raise UncurlError(f"--pruned {folder}: no such folder (name the --out of an `uncurl prune` run)")
    if uncurl_output(path) != "an earlier uncurl prune output":
        raise UncurlError(f"--pruned {folder} is not an uncurl prune output (no report/report.json written by "
                          f"uncurl prune in it): name the --out of an `uncurl prune` run")
    report = json.loads((path / "report" / "report.json").read_text())
    if not isinstance(report.get("layers"), list) or not all("groups" in r for r in report["layers"]) \
            or "model" not in report:
        raise UncurlError(f"--pruned {folder}: its report/report.json has no per-layer plan (layers, groups); "
                          f"it was not written by this uncurl's prune")
    return report


def check_parent(report: dict, model_type: str, layers: dict[str, int], fingerprint: str | None, what: str,
                 pruned: str) -> None:
    """``what`` (the parent, or a profile of the traffic) must describe the model ``report`` was pruned
    from: ``layers`` maps MoE layer name -> expert count."""
    m = report["model"]
    made_from = f"the model --pruned {pruned} was made from ({m['id']}"
    if model_type != m["model_type"]:
        raise UncurlError(f"{what} is a {model_type} model, not {made_from}, a {m['model_type']} model)")
    want = {r["name"]: m["experts_before"] for r in report["layers"]}
    if layers != want:
        raise UncurlError(f"{what} has other MoE layers or expert counts than {made_from}: "
                          f"{len(want)} layers of {m['experts_before']} experts)")
    recorded = m.get("router_fingerprint")
    if recorded is None:
        log.warning("--pruned %s records no router fingerprint (an older uncurl): %s could not be checked against "
                    "its parent's router weights", pruned, what)
    elif fingerprint != recorded:
        raise UncurlError(f"{what} has other router weights than {made_from}; router fingerprint {fingerprint}, "
                          f"the parent's {recorded}): it is another model (or another --seed of a built-in one)")


def _js(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence, base 2 (0: equal, 1: disjoint)."""
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * (a[nz] / b[nz]).log2()).sum())

    return max(0.0, (kl(p, m) + kl(q, m)) / 2)


def _shares(total: float, parts: dict[str, float]) -> dict[str, float]:
    return {k: round(v / total, 6) if total > 0 else None for k, v in parts.items()}


def coverage(report: dict, traffic: dict[str, dict]) -> dict:
    """Per layer and overall: kept / merged / dropped shares of the traffic's routing mass, coverage,
    and the JS divergence of its usage share from the calibration's. ``traffic``: layer name ->
    {"counts": [E], "mass": [E]} tensors."""
    rows, pooled = [], {"kept": 0.0, "merged": 0.0, "dropped": 0.0}
    for layer in sorted(report["layers"], key=lambda r: r["index"]):
        t = traffic[layer["name"]]
        mass, counts = t["mass"].double(), t["counts"].double()
        kept = [g[0] for g in layer["groups"] if len(g) == 1]
        merged = [e for g in layer["groups"] if len(g) > 1 for e in g]
        parts = {"kept": float(mass[kept].sum()), "merged": float(mass[merged].sum()),
                 "dropped": float(mass[layer["dropped"]].sum())}
        for k in pooled:
            pooled[k] += parts[k]
        share = _shares(sum(parts.values()), parts)
        calibration = torch.tensor(layer["frequency"], dtype=torch.float64)
        usage = counts / counts.sum() if counts.sum() > 0 else counts
        rows.append({"name": layer["name"], "index": layer["index"], **share,
                     "coverage": None if share["dropped"] is None else round(1 - share["dropped"], 6),
                     "js_divergence": round(_js(usage, calibration / calibration.sum()), 6),
                     "dropped_experts": layer["dropped"], "merged_experts": sorted(merged),
                     "counts": [int(c) for c in counts.tolist()]})
    overall = _shares(sum(pooled.values()), pooled)
    overall["coverage"] = None if overall["dropped"] is None else round(1 - overall["dropped"], 6)
    overall["js_divergence"] = round(sum(r["js_divergence"] for r in rows) / len(rows), 6)  # mean over layers
    return {"overall": overall, "layers": rows}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(rows) + 2) + 2.5, 3.5))
    bottom = [0.0] * len(rows)
    for key, color in (("kept", "tab:green"), ("merged", "tab:olive"), ("dropped", "tab:red")):
        values = [r[key] or 0.0 for r in rows]
        ax.bar(x, values, bottom=bottom, color=color, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(x, [r["js_divergence"] for r in rows], "k.-", label="JS divergence from calibration")
    ax.set(xticks=list(x), xticklabels=[str(r["index"]) for r in rows], xlabel="layer", ylim=(0, 1.05),
           ylabel="share of routing mass", title="Traffic on the pruned model's experts")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gate(overall: dict, opts) -> dict | None:
    """The verdict of every bound given (``--min-coverage``, ``--max-divergence``); None without one."""
    checks = []
    if opts.min_coverage is not None:
        cov = overall["coverage"]
        checks.append(("coverage", cov, f">= {opts.min_coverage:g}", cov is not None and cov >= opts.min_coverage))
    if opts.max_divergence is not None:
        js = overall["js_divergence"]
        checks.append(("js_divergence", js, f"<= {opts.max_divergence:g}", js is not None and js <= opts.max_divergence))
    if not checks:
        return None
    passed = all(ok for *_, ok in checks)
    return {"coverage": overall["coverage"], "min_coverage": opts.min_coverage,
            "js_divergence": overall["js_divergence"], "max_divergence": opts.max_divergence,
            "failed": [f"{name} {value:.4g} not {bound}" for name, value, bound, ok in checks if not ok],
            "passed": passed, "exit_code": 0 if passed else EXIT_COVERAGE}


def markdown(record: dict) -> str:
    o, g = record["overall"], record.get("gate")
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [f"# uncurl monitor: {record['traffic']['name']} on {record['pruned']}", "", f"`{record['command']}`", "",
             f"Traffic: {record['traffic']['examples']} inputs, {record['tokens']:,} tokens (fingerprint "
             f"`{record['traffic'].get('fingerprint', '')}`), profiled through the parent {record['parent']}; "
             f"the pruned model was calibrated on {record['calibration']}.", "",
             f"**Coverage {pct(o['coverage'])}** of the routing mass (kept {pct(o['kept'])}, merged "
             f"{pct(o['merged'])}, dropped {pct(o['dropped'])}); JS divergence of expert usage from the "
             f"calibration profile {o['js_divergence']:.3f} (mean over layers; 0 = the same, 1 = disjoint).", ""]
    if g:
        bounds = [f"coverage {pct(g['coverage'])}, bound {g['min_coverage']:g}" if g["min_coverage"] is not None else "",
                  f"JS divergence {g['js_divergence']:.4f}, bound {g['max_divergence']:g}"
                  if g["max_divergence"] is not None else ""]
        lines += [f"**Gate {'passed' if g['passed'] else 'FAILED'}**: {'; '.join(b for b in bounds if b)} "
                  f"(exit {g['exit_code']}).", ""]
    lines += ["| layer | coverage | kept | merged | dropped | JS divergence | dropped experts |",
              "|---|---|---|---|---|---|---|"]
    for r in record["layers"]:
        lines.append(f"| {r['index']} | {pct(r['coverage'])} | {pct(r['kept'])} | {pct(r['merged'])} | "
                     f"{pct(r['dropped'])} | {r['js_divergence']:.3f} | "
                     f"{', '.join(map(str, r['dropped_experts'])) or '-'} |")
    lines += ["", "Shares of the gate weights of the traffic's top-k choices in the parent; merged experts count as "
              "covered (their group survives as one expert).", ""]
    if "plot" in record["files"]:
        lines += [f"![Coverage per layer]({record['files']['plot']})", ""]
    return "\n".join(lines)


def monitor(opts: MonitorOptions) -> dict:
    """``uncurl monitor``: profile the traffic through the parent (or read ``--profile``), compare
    with the pruned model's plan and calibration, write ``--out``; the record has ``exit_code``."""
    from .adapters import find_moe_layers
    from .load import check_family, load_model
    from .output import claim
    from .pipeline import loaded_inputs, run_inputs
    from .profile import Profile, profile_model, router_fingerprint
    from .report import REPORT_SCHEMA, Timings, command_line, versions

    if not (opts.task or opts.file or opts.profile):
        raise UncurlError("uncurl monitor needs the traffic to check: --task TASK (e.g. superglue-cb), --file "
                          "inputs.jsonl, or --profile of the traffic")
    report = read_pruned(opts.pruned)
    for flag, bound in (("--min-coverage", opts.min_coverage), ("--max-divergence", opts.max_divergence)):
        if bound is not None and not 0 <= bound <= 1:
            raise UncurlError(f"{flag} {bound:g} must be a number between 0 and 1, e.g. "
                              f"{'0.95' if flag == '--min-coverage' else '0.005'}")
    parent = opts.parent or report["model"].get("source") or report["model"]["id"]  # a local parent: its absolute path
    seed = opts.seed if opts.parent else report.get("seed", opts.seed)  # a built-in parent: the prune's seed
    if opts.profile:
        traffic_profile = Profile.load(opts.profile)
        meta = traffic_profile.meta
        check_parent(report, meta.get("model_type"), {n: s.num_experts for n, s in traffic_profile.layers.items()},
                     meta.get("router_fingerprint"), f"--profile {opts.profile}", opts.pruned)
        info = {**meta.get("task", {}), "examples": meta.get("task", {}).get("calibration_examples")}
        parent = meta.get("model", parent)
    else:
        check_family(parent, f"--parent {parent}" if opts.parent else f"the parent {parent} (named in --pruned's "
                             f"report.json; pass --parent DIR if it moved)")
        traffic_texts(replace(opts, chat_template=False))  # a bad task or file fails before the model loads
    inputs = run_inputs(replace(opts, model=parent)) + [("the --pruned folder", Path(opts.pruned), True)]
    timings = Timings()
    with claim(opts.out, overwrite=opts.overwrite, inputs=inputs) as output:
        if not opts.profile:
            with timings.stage("load"):
                loaded = load_model(parent, device=opts.device, dtype=opts.dtype, seed=seed,
                                    device_map=opts.device_map, max_memory=opts.max_memory,
                                    trust_remote_code=opts.trust_remote_code)
            output.check(loaded_inputs(loaded))  # not (in) what the parent was read from
            layers = {layer.name: layer.num_experts for layer in find_moe_layers(loaded.model, loaded.adapter)}
            what = f"--parent {parent}" if opts.parent else f"the parent {parent} (named in --pruned's report.json)"
            check_parent(report, loaded.model.config.model_type, layers,
                         router_fingerprint(loaded.model, loaded.adapter), what, opts.pruned)
            texts, info = traffic_texts(opts, loaded.tokenizer)
            with timings.stage("profile"):
                traffic_profile = profile_model(loaded.model, loaded.tokenizer, loaded.adapter, texts,
                                                batch_size=opts.batch_size, max_length=opts.max_length,
                                                progress=opts.progress, seed=opts.seed)
            del loaded
        traffic = {name: {"counts": s.counts, "mass": s.mass} for name, s in traffic_profile.layers.items()}
        result = coverage(report, traffic)
        record = {"schema_version": REPORT_SCHEMA, "command": opts.extra.get("command", command_line()),
                  "versions": versions(), "pruned": str(Path(opts.pruned).resolve()), "parent": parent,
                  "profile": opts.profile, "calibration": report["task"].get("name"), "traffic": info,
                  "tokens": traffic_profile.tokens, **result, "files": {"json": "monitor.json", "markdown": "monitor.md"}}
        verdict = gate(result["overall"], opts)
        if verdict:
            record["gate"] = verdict
        code = record["exit_code"] = verdict["exit_code"] if verdict else 0
        record["timings_s"] = timings
        with output.staged() as tmp:
            if opts.plots:
                plot(result["layers"], tmp / "monitor.png")
                record["files"]["plot"] = "monitor.png"
            (tmp / "monitor.json").write_text(json.dumps(record, indent=2) + "\n")
            (tmp / "monitor.md").write_text(markdown(record))
    return {**record, "output": str(output.path)}

