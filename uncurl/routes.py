"""Routing you can see: the experts every token of every input chose, per MoE layer, and each layer's balance.

    uncurl routes --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte-routes
    uncurl routes --model pruned/ --file inputs.jsonl --out routes/

The inputs run through the model once, under the profiler's own recorder (``profile._Recorder``:
the same router hooks and adapter readers, ``adapter.router_output``, padding removed), which hands
each router call's top-k indices and weights to this module. Written into ``--out`` (a folder,
claimed with ``output.claim``):

- ``routes.jsonl``: one line per input, in input order: ``{"example": i, "text": ..., "tokens":
  [ids], "routes": {"LAYER": [[[expert, weight], ...] per token]}}`` (weights rounded to 4 digits;
  a family's skip slots, tail rows, are left out);
- ``routes.json`` and ``routes.md``: per layer the usage counts, shares and routing mass summed from
  those lines, and the load balance (``stats.balance``: entropy / log E, coefficient of variation,
  largest share);
- ``heatmap.png``: layers x experts, the share of top-k slots (unless ``--no-plots``).

The counts are those ``uncurl profile`` records for the same texts (tests/test_routes.py).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import tasks as T
from .adapters import find_moe_layers, top_k
from .errors import UncurlError
from .options import DATA, opt
from .pipeline import RunOptions, chat_wrap, resolve_task

log = logging.getLogger(__name__)


@dataclass
class TrafficOptions(RunOptions):
    """Which inputs to route (``routes``) or to check against a pruned model (``monitor``)."""

    file: str | None = opt(
        None, "--file", panel=DATA,
        help="Route the texts of this .jsonl file instead of --task's: one input per line, a JSON string or an "
             "object with a 'text' field (--samples of them, a seeded subset, when there are more).",
        monitor=dict(help="The traffic: the texts of this .jsonl file instead of --task's, one per line, a JSON string or "
                          "an object with a 'text' field (--samples of them, a seeded subset, when there are more)."))
    split: str = opt("evaluation", panel=DATA,
                     help="Which split of --task to read: evaluation (held out from calibration) or calibration.")
    plots: bool = opt(True, help="Draw the PNG (matplotlib); --no-plots skips it.")


@dataclass
class RoutesOptions(TrafficOptions):
    out: str = opt("routes", "--out", "-o",
                   help="Output folder: routes.jsonl, routes.json, routes.md, heatmap.png. Written whole or not at all.")


def _read_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UncurlError(f"--file {path}: no such file (one input per line: a JSON string or {{\"text\": ...}})")
    texts = []
    for n, line in enumerate(T.read_text(p, "--file ").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UncurlError(f"--file {path}, line {n}: not JSON (one input per line: a JSON string or "
                              f"{{\"text\": ...}})") from None
        text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UncurlError(f"--file {path}, line {n}: expected a JSON string or an object with a 'text' string")
        texts.append(text)
    if not texts:
        raise UncurlError(f"--file {path} holds no inputs")
    return texts


def traffic_texts(opts: TrafficOptions, tokenizer=None) -> tuple[list[str], dict]:
    """The inputs (``--file``, or ``--split`` of ``--task``: --samples of them, seeded) and what they were."""
    if opts.file:
        texts = _read_file(opts.file)
        if len(texts) > opts.samples:
            keep = sorted(random.Random(opts.seed).sample(range(len(texts)), opts.samples))
            texts = [texts[i] for i in keep]
        examples = [T.Example(t) for t in texts]
        info = {"name": str(Path(opts.file).resolve()), "source": "file"}
    else:
        if opts.split not in T.SPLITS:
            raise UncurlError(f"--split {opts.split!r} is not one of {', '.join(T.SPLITS)}")
        task = resolve_task(opts)
        examples = T.load_examples(task, opts.split, opts.data_dir, limit=opts.samples, seed=opts.seed)
        if opts.chat_template and tokenizer is not None:
            examples = chat_wrap(examples, tokenizer)
        info = {"name": task.name, "split": opts.split, "source": task.split_note}
    return [e.text for e in examples], {**info, "examples": len(examples), "fingerprint": T.data_fingerprint(examples)}


class _Routes:
    """Per-token routes of one batch from the recorder's listener, then each input's line."""

    def __init__(self, layers, num_experts: int, tail: bool):
        self.index = {layer.name: layer.index for layer in layers}
        self.e, self.tail = num_experts, tail
        self.seen: dict[str, tuple[list, list]] = {}
        self.tokens = 0
        self.counts = {layer.name: [0] * num_experts for layer in layers}  # lists: per-pair adds in Python
        self.mass = {layer.name: [0.0] * num_experts for layer in layers}

    def listen(self, name, weights, indices):
        self.seen[name] = (weights.float().cpu().tolist(), indices.cpu().tolist())

    def lines(self, rows, input_ids, attention_mask, texts):
        """One record per row of the batch (token rows are the mask's, row-major)."""
        lengths = attention_mask.sum(1).tolist()
        self.tokens += sum(lengths)
        starts = [sum(lengths[:b]) for b in range(len(lengths))]
        out = []
        for b, i in enumerate(rows):
            n, s = lengths[b], starts[b]
            routes = {}
            for name, (w, idx) in self.seen.items():
                per_token = []
                for ws, es in zip(w[s : s + n], idx[s : s + n]):
                    pairs = [(e, x) for e, x in zip(es, ws) if not self.tail or (e < self.e and x != 0)]
                    for e, x in pairs:
                        self.counts[name][e] += 1
                        self.mass[name][e] += x
                    per_token.append([[e, round(x, 4)] for e, x in pairs])
                routes[str(self.index[name])] = per_token
            out.append((i, {"example": i, "text": texts[i], "tokens": input_ids[b, :n].tolist(), "routes": routes}))
        self.seen = {}
        return out


@torch.no_grad()
def route(model, tokenizer, adapter, texts: list[str], write, *, batch_size: int = 8, max_length: int = 512,
          progress: bool = False) -> tuple[dict, int]:
    """Run ``texts`` through ``model``; ``write(record)`` gets each input's line, in input order.
    Returns (per layer name: {"index", "counts", "mass"} summed from those lines, tokens routed)."""
    from .load import input_device
    from .profile import _Recorder, indexed_batches, progress_bar

    layers = find_moe_layers(model, adapter)
    if not layers:
        raise UncurlError("this model has no MoE layers to route through")
    recorder = _Recorder(layers, layers[0].num_experts, tail=bool(adapter.tail_rows), output=adapter.router_output,
                         top_k=top_k(model.config, adapter), router_logits=adapter.router_logits)
    routes = _Routes(layers, layers[0].num_experts, bool(adapter.tail_rows))
    recorder.listen = routes.listen
    device, pending, following = input_device(model), {}, 0
    try:
        with progress_bar(progress, -(-len(texts) // batch_size), "routing") as advance:
            for rows, batch in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
                recorder.start(batch["attention_mask"], rows)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      logits_to_keep=1, use_cache=False)
                pending.update(routes.lines(rows, batch["input_ids"], batch["attention_mask"], texts))
                while following in pending:
                    write(pending.pop(following))
                    following += 1
                advance()
    finally:
        recorder.close()
    return {layer.name: {"index": layer.index, "counts": torch.tensor(routes.counts[layer.name], dtype=torch.float64),
                         "mass": torch.tensor(routes.mass[layer.name], dtype=torch.float64)}
            for layer in layers}, routes.tokens


def summary(layers: dict) -> list[dict]:
    """Per layer: counts, shares, routing mass and the load balance (``stats.balance``)."""
    from .stats import balance

    rows = []
    for name, d in layers.items():
        counts = [int(c) for c in d["counts"].tolist()]
        total = sum(counts) or 1
        rows.append({"name": name, "index": d["index"], "counts": counts,
                     "share": [round(c / total, 6) for c in counts],
                     "mass": [round(m, 4) for m in d["mass"].tolist()], "balance": balance(counts)})
    return sorted(rows, key=lambda r: r["index"])


def heatmap(rows: list[dict], key: str, path: Path, title: str, label: str = "share", cmap: str = "viridis") -> None:
    """Layers x experts of ``row[key]`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([r[key] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * data.shape[1] + 2), max(2.5, 0.4 * len(rows) + 1.5)))
    im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set(title=title, xlabel="expert", ylabel="layer", yticks=range(len(rows)),
           yticklabels=[str(r["index"]) for r in rows], xticks=range(data.shape[1]))
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(record: dict) -> str:
    from .report import balance_cell

    lines = [f"# uncurl routes: {record['model']} on {record['inputs']['name']}", "", f"`{record['command']}`", "",
             f"{record['inputs']['examples']} inputs, {record['tokens']:,} tokens (fingerprint "
             f"`{record['inputs']['fingerprint']}`); each input's experts and gate weights per token are in "
             "`routes.jsonl`.", "", "| layer | tokens | most used (share) | balance |", "|---|---|---|---|"]
    for r in record["layers"]:
        top = max(range(len(r["share"])), key=r["share"].__getitem__)
        lines.append(f"| {r['index']} | {record['tokens']:,} | {top} ({r['share'][top]:.1%}) | "
                     f"{balance_cell(r['balance'])} |")
    lines += ["", "Balance: entropy of the expert-usage share / log E (1 = even), coefficient of variation of the "
              "counts, largest share.", ""]
    if "heatmap" in record["files"]:
        lines += [f"![Share of top-k slots]({record['files']['heatmap']})", ""]
    return "\n".join(lines)


def routes(opts: RoutesOptions) -> dict:
    """``uncurl routes``: load, route the inputs, write ``--out``; returns what routes.json holds."""
    from .load import check_family, load_model
    from .output import claim
    from .pipeline import loaded_inputs, run_inputs
    from .profile import router_fingerprint
    from .report import REPORT_SCHEMA, Timings, command_line, versions

    check_family(opts.model)
    traffic_texts(replace(opts, chat_template=False))  # a bad task or file fails before the model loads
    inputs = run_inputs(opts) + ([("the --file", Path(opts.file), False)] if opts.file else [])
    timings = Timings()
    with claim(opts.out, overwrite=opts.overwrite, inputs=inputs) as output:
        with timings.stage("load"):
            loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype, seed=opts.seed,
                                device_map=opts.device_map, max_memory=opts.max_memory,
                                trust_remote_code=opts.trust_remote_code)
        output.check(loaded_inputs(loaded))  # not (in) what the model was read from
        texts, info = traffic_texts(opts, loaded.tokenizer)
        with output.staged() as tmp:
            with timings.stage("route"), open(tmp / "routes.jsonl", "w", encoding="utf-8") as fh:
                layers, tokens = route(loaded.model, loaded.tokenizer, loaded.adapter, texts,
                               lambda rec: fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"),
                               batch_size=opts.batch_size, max_length=opts.max_length, progress=opts.progress)
            rows = summary(layers)
            record = {"schema_version": REPORT_SCHEMA, "command": opts.extra.get("command", command_line()),
                      "versions": versions(), "model": opts.model, "model_type": loaded.model.config.model_type,
                      "router_fingerprint": router_fingerprint(loaded.model, loaded.adapter), "seed": opts.seed,
                      "max_length": opts.max_length, "inputs": info,
                      "tokens": tokens, "layers": rows, "files": {"jsonl": "routes.jsonl", "json": "routes.json", "markdown": "routes.md"}}
            if opts.plots:
                heatmap(rows, "share", tmp / "heatmap.png", "Share of top-k slots per expert")
                record["files"]["heatmap"] = "heatmap.png"
            record["timings_s"] = timings
            (tmp / "routes.json").write_text(json.dumps(record, indent=2) + "\n")
            (tmp / "routes.md").write_text(markdown(record))
    return {**record, "output": str(output.path)}
