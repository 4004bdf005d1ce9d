"""The model card: ``README.md`` in the output folder, in the Hugging Face Hub's model-card format.

    uncurl prune --model ORG/MODEL --task superglue-rte --keep 4 --out pruned/   # pruned/README.md

Rendered from the report (one source for both): YAML metadata (``base_model``, ``tags``, the
calibration ``datasets`` where they have a Hub id, ``license`` copied from the parent's card when it
has one, else from the licence files carried into the output: repo.py), then what was done, the evaluation before and after with standard errors, the serving cost
and the command that reproduces it. ``huggingface_hub.ModelCard`` parses it (tests/test_card.py).
The parent's card is only read; uncurl never writes into the input folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD = "README.md"


def parent_card(model_id: str, source: Path | None) -> dict:
    """The YAML metadata of the parent's own card (a local folder's README.md, or the Hub's in its
    cache), {} when there is none or it does not parse."""
    path = source / CARD if source is not None else None
    if path is None and not model_id.startswith("builtin:"):
        try:
            from transformers.utils import cached_file

            found = cached_file(model_id, CARD, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            path = Path(found) if found else None
        except OSError:
            path = None
    if path is None or not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard(path.read_text(encoding="utf-8")).data.to_dict()
    except Exception:  # noqa: BLE001 - a card that does not parse has no usable metadata
        return {}


def _hub_id(model_id: str, source) -> str | None:
    """The parent as a Hub id, when it is one (a local folder or a built-in model is not)."""
    in_hub_cache = source is not None and source.parent.name == "snapshots"  # a quantized Hub model's files
    if (source is not None and not in_hub_cache) or model_id.startswith("builtin:"):
        return None
    return model_id if re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) else None


def calibration_datasets(task: dict) -> list[str]:
    """Hub ids of the calibration data: registered tasks' Hub copies and hf: tasks."""
    from .tasks import TASKS

    out = []
    for part in task.get("mix") or [task]:
        if part.get("calibration_examples") == 0:  # a data-free method read no calibration text
            continue
        name = part.get("name", "")
        if name.startswith("hf:"):
            out.append(name[3:].split(":")[0])
        elif name in TASKS and TASKS[name].hub[0]:
            out.append(TASKS[name].hub[0])
    return list(dict.fromkeys(out))


def merged(report: dict) -> bool:
    return any(len(g) > 1 for layer in report["layers"] for g in layer["groups"])


def metadata(report: dict, parent: dict, source: Path | None = None) -> dict:
    m = report["model"]
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["moe", "pruned", "uncurl", f"{m['experts_after']}-experts"]}
    if merged(report):
        meta["tags"].append("expert-merging")
    base = _hub_id(m["id"], source)
    if base is None:
        base = parent.get("base_model") if isinstance(parent.get("base_model"), str) else None
    if base:
        meta["base_model"] = base
    datasets = calibration_datasets(report["task"])
    if datasets:
        meta["datasets"] = datasets
    for key in ("license", "license_name", "license_link", "language"):
        if key in parent:
            meta[key] = parent[key]
    if "license" not in parent:  # else from the licence files carried into the output (repo.licence_metadata)
        meta.update(m.get("carried", {}).get("card_licence", {}))
    return meta


def _yaml(meta: dict) -> str:
    """YAML front matter for the flat keys and lists above (JSON scalars are valid YAML)."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def _change(x: float) -> str:
    return f"{round(x, 4) + 0.0:+.4f}"  # no "-0.0000"


def _eval_rows(ev: dict) -> list[str]:
    before, after = ev["before"], ev["after"]
    rows = [f"Task `{before['task']}`, {before['n']} evaluation examples, scored as lm-evaluation-harness "
            "scores multiple choice (`uncurl eval`).", "",
            "| metric | before | after | change |", "|---|---|---|---|"]
    for metric in ("acc", "acc_norm", "exact_match"):
        if metric in before:
            err = f"{metric}_stderr"
            rows.append(f"| {metric} | {before[metric]:.4f} ± {before.get(err, 0):.4f} | "
                        f"{after[metric]:.4f} ± {after.get(err, 0):.4f} | {_change(after[metric] - before[metric])} |")
    if "loss" in before:
        rows.append(f"| task loss (nats/token) | {before['loss']:.4f} | {after['loss']:.4f} | "
                    f"{_change(after['loss'] - before['loss'])} |")
    for metric, name in (("agreement", "top-1 agreement with the parent"),
                         ("acceptance", "expected speculative acceptance")):
        if metric in after:
            rows.append(f"| {name} | {before[metric]:.4f} | {after[metric]:.4f} ± {after[f'{metric}_stderr']:.4f} | "
                        f"{_change(after[metric] - before[metric])} |")
    return rows


def mtp_note(mtp: dict) -> str:
    """What became of the parent's next-token-prediction (MTP) blocks, for the card."""
    if mtp["kept"]:
        return (f"MTP (speculative decoding): the parent's {mtp['announced']} next-token-prediction block(s) "
                f"({', '.join(mtp['layers'])}) were profiled on the same calibration text and pruned to "
                f"{mtp['experts']} experts alike (merge `{mtp['merge']}`); `{mtp['count_key']}` stays "
                f"{mtp['kept']}, so vLLM/SGLang can serve it with MTP speculative decoding.")
    return (f"MTP (speculative decoding): the parent's {mtp['announced']} next-token-prediction block(s) were "
            f"**dropped** ({mtp['why_dropped']}), and `{mtp['count_key']}` is 0: serve it without MTP speculative "
            f"decoding.")


def render(report: dict, parent: dict | None = None, source: Path | None = None) -> str:
    """The card's text for ``report`` (the dict written as report.json); ``parent``: the parent card's
    metadata (``parent_card``), ``source``: the local folder the parent came from, if any."""
    from .cost import Cost, cost_table, size

    m, t = report["model"], report["task"]
    parent = parent or {}
    title = f"{m['id']} pruned to {m['experts_after']} experts per layer for {t['name']}"
    lines = ["---", _yaml(metadata(report, parent, source)), "---", "", f"# {title}", "",
             f"Made with uncurl from `{m['id']}` ({m['model_type']}): every MoE layer "
             f"reduced from {m['experts_before']} to {m['experts_after']} experts "
             f"(top-k {m['top_k_before']} -> {m['top_k_after']}) for one task, {t['name']}.", "",
             "## What was done", "",
             f"- method: **{report['method']}**"
             + (f" (merge `{report['merge']}`, router rows `{report['router_rows']}`)"
                if merged(report) else " (experts kept alone)")
             + ("; down projections fitted to the original layers' outputs on the calibration tokens"
                if report.get("fit", {}).get("layers") else ""),
             f"- calibration: {t.get('calibration_examples', '?')} examples of {t['name']} "
             f"({t.get('tokens', 0):,} tokens, fingerprint `{t.get('fingerprint', '')}`), seed {report['seed']}",
             f"- parameters: {m['params_before']:,} -> {m['params_after']:,}; "
             f"weights {size(m['bytes_before'])} -> {size(m['bytes_after'])}", "",
             "| layer | experts kept (groups merged into one) | dropped |", "|---|---|---|"]
    for layer in report["layers"]:
        groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in layer["groups"])
        lines.append(f"| {layer['index']} | {groups} | {', '.join(map(str, layer['dropped'])) or '-'} |")
    if report.get("mtp"):
        lines += ["", mtp_note(report["mtp"])]
    if "eval" in report:
        lines += ["", "## Evaluation before and after", "", *_eval_rows(report["eval"])]
    else:
        lines += ["", "## Evaluation", "", "Not evaluated in this run (pass `--eval`)."]
    if "cost" in report:
        before, after = (Cost(**report["cost"][k]) for k in ("before", "after"))
        lines += ["", "## Serving cost", "", f"{report['cost']['note']}.", "", cost_table(before, after),
                  "", "Counted from the checkpoint's tensors; the KV cache as transformers holds it (see uncurl's "
                  "`cost.py`). Weight memory excludes activations; GPUs are counted at 90% of their memory."]
        if "measured" in report["cost"]:
            from .serving import serving_table

            lines += ["", serving_table(report["cost"]["measured"])]
    lines += ["", "## Reproduce", "", "```bash", report["command"], "```", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
