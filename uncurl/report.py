"""Step 6: the pruning report: ``report.json`` (machines), ``report.md`` (people), PNG plots.

``report.json`` carries ``schema_version``; a field is only ever added under the same version.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPORT_SCHEMA = 1

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import numpy
    import sklearn
    import torch
    import transformers

    from . import __version__

    return {
        "uncurl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


class Timings(dict):
    """Seconds per pipeline stage, in the order the stages ran; each stage is logged (INFO, ``-v``)
    as it starts and ends. ``reads``: bytes of offloaded weights each stage read (``offload.READS``;
    accelerate's own reads too while ``offload.counting`` is on), for a model under --device-map."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str):
        from .offload import READS

        log.info("%s ...", name)
        start, read = time.perf_counter(), READS.bytes
        try:
            yield
        except BaseException:
            log.info("%s failed after %.1f s", name, time.perf_counter() - start)
            raise
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)
            if READS.bytes != read:
                self.reads[name] = self.reads.get(name, 0) + READS.bytes - read
        log.info("%s done in %.1f s", name, self[name])


def expected_after(counts: list, groups: list) -> list:
    """The calibration counts of each new expert: its group's members' counts summed. Dropped
    experts' slots are left out: where those tokens go instead is only known by routing them again."""
    return [sum(counts[e] for e in g) for g in groups]


def layer_entries(profile, plans) -> list[dict]:
    """Per-layer usage statistics, load balance and the groups chosen for it."""
    from .stats import balance

    rows = []
    for name, stats in profile.layers.items():
        plan = plans[name]
        counts = [int(c) for c in stats.counts.tolist()]
        rows.append(
            {
                "name": name,
                "index": profile.layer_index[name],
                "tokens": stats.tokens,
                "usage_counts": [int(c) for c in stats.counts.tolist()],
                "frequency": [round(f, 6) for f in stats.frequency.tolist()],
                "routing_mass": [round(m, 4) for m in stats.mass.tolist()],
                "groups": [list(g) for g in plan.groups],
                "merge_weights": [[round(w, 6) for w in ws] for ws in plan.weights],
                "dropped": sorted(set(range(stats.num_experts)) - {e for g in plan.groups for e in g}),
                "balance_before": balance(counts),
                "balance_after_expected": balance(expected_after(counts, plan.groups)),
            }
        )
    return sorted(rows, key=lambda r: r["index"])


def write_report(report: dict, folder: Path, with_plots: bool = True) -> dict[str, str]:
    """Write report.json, report.md and (``with_plots``) the plots into ``folder``; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": "report.json", "markdown": "report.md"}
    if with_plots:
        files.update(plots(report["layers"], folder))
    report = {**report, "files": files}
    (folder / files["json"]).write_text(json.dumps(report, indent=2) + "\n")
    (folder / files["markdown"]).write_text(markdown(report))
    return files


def carried_lines(m: dict) -> list[str]:
    """The native class a model_type transformers lacks was loaded with, and the parent's files the
    output keeps (repo.py)."""
    lines = []
    if "loaded_as" in m:
        lines += ["", f"Loaded as {m['loaded_as']['class']}: {m['loaded_as']['why']}."]
    files = [f"`{name}`" for kind in ("code", "tokenizer", "licences") for name in m.get("carried", {}).get(kind, [])]
    if files:
        lines += ["", "Carried from the parent unchanged: " + ", ".join(files) + "."]
    return lines


def markdown(r: dict) -> str:
    m, t = r["model"], r["task"]
    lines = [
        f"# uncurl report: {m['id']} on {t['name']}",
        "",
        f"`{r['command']}`",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| experts per MoE layer | {m['experts_before']} | {m['experts_after']} |",
        f"| top-k | {m['top_k_before']} | {m['top_k_after']} |",
        f"| parameters | {m['params_before']:,} | {m['params_after']:,} |",
        f"| weight bytes | {m['bytes_before']:,} | {m['bytes_after']:,} |",
        *([f"| format | {m['format_before']} | {m['format']} |"] if "format" in m else []),
        "",
        f"Method **{r['method']}** (merge: {r['merge']}, router rows: {r['router_rows']}), seed {r['seed']}, "
        f"{t['calibration_examples']} calibration examples ({t['tokens']:,} tokens, "
        f"fingerprint `{t['fingerprint']}`, source {t['source']}).",
        *task_lines(t),
        *carried_lines(m),
        "",
        "## Per layer",
        "",
        "| layer | tokens | most used (share) | groups (merged experts) | dropped | balance before | balance after (expected) |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in r["layers"]:
        freq = layer["frequency"]
        top = max(range(len(freq)), key=freq.__getitem__)
        groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in layer["groups"])
        lines.append(
            f"| {layer['index']} | {layer['tokens']:,} | {top} ({freq[top]:.1%}) | {groups} | "
            f"{', '.join(map(str, layer['dropped'])) or '-'} | {balance_cell(layer.get('balance_before'))} | "
            f"{balance_cell(layer.get('balance_after_expected'))} |"
        )
    if r["layers"] and "balance_before" in r["layers"][0]:
        lines += ["", BALANCE_NOTE]
    if "cost" in r:
        from .cost import Cost, cost_table

        lines += ["", "## Serving cost", "", f"{r['cost']['note']}.", "",
                  cost_table(Cost(**r["cost"]["before"]), Cost(**r["cost"]["after"]))]
        if "measured" in r["cost"]:
            from .serving import serving_table

            lines += ["", serving_table(r["cost"]["measured"])]
    if "fit" in r:
        f = r["fit"]
        lines += ["", "## Output fit (--merge fit)", "",
                  f"Down projections fitted to {f['target']} on the calibration tokens; ridge {f['ridge']:g} x the "
                  f"mean diagonal of the Gram matrix. {f.get('note', '')}".rstrip(), ""]
        if f["layers"]:
            lines += ["| layer | solve | relative error before | after | step | experts fitted / left |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {name} | {v['solve']} | {v['error_before']:.4f} | {v['error_after']:.4f} | {v['step']:.3f} | "
                      f"{v['fitted']} / {v['unfitted']} |" for name, v in f["layers"].items()]
    if "recover" in r:
        rec = r["recover"]
        curve = rec.get("loss_curve") or []
        lines += ["", "## Recovery (--recover)", "",
                  f"{rec['steps']} steps training the {rec['trains']} ({rec['parameters']:,} parameters) on {rec['loss']}"
                  + (f": {curve[0]:.4f} -> {curve[-1]:.4f} in {rec['seconds']:.1f} s on {rec.get('device')}" if curve
                     else "") + ".", ""]
        if "note" in rec:
            lines += [f"**{rec['note'][0].upper()}{rec['note'][1:]}.**", ""]
        elif curve:
            lines += ["Not evaluated (run with `--eval` to keep it only if the task loss does not rise).", ""]
    if "eval" in r:
        lines += ["", "## Evaluation", "", eval_table(r["eval"])]
    if "gate" in r:
        g = r["gate"]
        lines += ["", f"**Gate {'passed' if g['passed'] else 'FAILED'}**: {g['metric']} dropped by "
                      f"{g['drop']} points (bound {g['max_drop']})."]
    lines += ["", "## Timings (s)", "", " · ".join(f"{k} {v:.2f}" for k, v in r["timings_s"].items()), ""]
    for key, name in (("usage_plot", "Expert usage"), ("groups_plot", "Groups")):
        if key in r.get("files", {}):
            lines += [f"![{name}]({r['files'][key]})", ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


BALANCE_NOTE = ("Balance: entropy of the expert-usage share / log E (1 = even), coefficient of variation of the "
                "counts, largest share; before from the calibration profile's counts, after *expected*: each new "
                "expert's members' calibration counts summed, dropped experts' slots left out (not routed again).")


def balance_cell(b: dict | None) -> str:
    if not b or b.get("entropy") is None:
        return "-"
    return f"H {b['entropy']:.3f}, CV {b['cv']:.2f}, max {b['max_share']:.1%}"


def task_lines(t: dict) -> list[str]:
    """The calibration mix, how calibration and evaluation rows are kept apart, the chat template."""
    lines = []
    for part in t.get("mix", []):
        lines.append(f"- {part['name']} (weight {part['weight']:g}): {part['calibration_examples']} examples, "
                     f"fingerprint `{part['fingerprint']}`, source {part['source']}; {part['split']}")
    if lines:
        lines = ["", "Calibration mix:", "", *lines]
    if "split" in t:
        lines += ["", f"Calibration and evaluation: {t['split']}."]
    if t.get("chat_template"):
        lines += ["", "Prompts wrapped in the tokenizer's chat template (`--chat-template`)."]
    return lines


def eval_table(ev: dict) -> str:
    """Before/after/drop of each metric, as a Markdown table."""
    before, after = ev["before"], ev["after"]
    rows = [f"Task {before['task']}, {before['n']} evaluation examples (fingerprint `{before['fingerprint']}`).",
            "", "| metric | before | after | drop (points) |", "|---|---|---|---|"]
    for metric in ("acc", "acc_norm", "exact_match", "loss", "ppl", "agreement", "acceptance", "kl", "nll"):
        if metric in before:
            rows.append(f"| {metric} | {before[metric]:.4f} | {after[metric]:.4f} | {ev['drop'].get(metric, '')} |")
    note = "\n\nDrop: 100 x accuracy lost; for loss, its increase in percent."
    if "fidelity" in after:
        f, pairs = after["fidelity"], ev.get("paired", {})
        note += (f"\n\nGeneration fidelity against the parent: {f['prompts']} prompts, "
                 f"{f['tokens']} greedy tokens of the parent (up to {f['gen_tokens']} each); after minus before, "
                 "paired over prompts: " + ", ".join(f"{m} {p['diff']:+.4f} ± {p['stderr']:.4f}"
                                                     for m, p in pairs.items()) + ".")
    return "\n".join(rows) + note


def plots(layers: list[dict], folder: Path) -> dict[str, str]:
    """Expert-usage heatmap and group-assignment map, one row per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    usage = np.array([layer["frequency"] for layer in layers])
    assign = np.full(usage.shape, np.nan)
    for row, layer in enumerate(layers):
        for k, members in enumerate(layer["groups"]):
            assign[row, members] = k
    ticks = [str(layer["index"]) for layer in layers]
    out = {}
    for key, data, title, cmap, label in (
        ("usage_plot", usage, "Share of top-k slots per expert", "viridis", "share"),
        ("groups_plot", assign, "New expert each old expert joins (blank: dropped)", "tab20", "new expert"),
    ):
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * usage.shape[1] + 2), max(2.5, 0.4 * len(layers) + 1.5)))
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set(title=title, xlabel="expert", ylabel="layer", yticks=range(len(ticks)), yticklabels=ticks,
               xticks=range(usage.shape[1]))
        if key == "groups_plot" and usage.size <= 2048:  # label each cell with its new expert
            for (row, col), k in np.ndenumerate(data):
                if not np.isnan(k):
                    ax.text(col, row, int(k), ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        name = f"{key.removesuffix('_plot')}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        out[key] = name
    return out


def command_line() -> str:
    return " ".join(["uncurl", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("uncurl") else " ".join(sys.argv)
