"""Are constant novices worth building? A dropped expert replaced by its mean output (MoNE).

    .venv/bin/python examples/study_novices.py --model ~/.cache/uncurl/smoe-mixtral-8x/model \\
        --task superglue-rte --keeps 4,2 --out benchmarks/results/novices_trained.json

MoNE (arXiv 2507.00390) keeps the router's E rows: a token routed to a dropped expert gets that
expert's gate times a constant vector, its "novice" value; vLLM loads such a checkpoint (its
expert-substitution format). Before writing that format, this measures whether it helps, in
process, at the same K and with the same experts kept (the EAN criterion's plan):

- ``ean/select``: the dropped experts removed and the router's rows with them (uncurl's prune);
- ``ean/zero``: the router's E rows kept, a dropped expert outputs nothing (the control);
- ``ean/novice``: the router's E rows kept, a dropped expert outputs its novice value
  c_e = sum_t g_t^2 f_e(x_t) / sum_t g_t^2 over the calibration tokens routed to it (the constant
  that least-squares fits its gated output g_t f_e(x_t); padding excluded);
- ``ean/fit``: ``--merge fit`` on the same plan (the best pruned cell of examples/study_fit.py).

Every model is scored on the same evaluation examples, so the differences of task loss are paired
(standard errors: examples/paired_loss.py). The novice forward is an eager loop over the fused
experts of transformers 5 (``experts(hidden, top_k_index, top_k_weights)``), for measurement only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from paired_loss import ratio_stderr  # noqa: E402
from uncurl.adapters import find_moe_layers  # noqa: E402
from uncurl.merge import rewrite_model  # noqa: E402
from uncurl.pipeline import RunOptions, calibration_texts, fit_after_merge, plan_all, prepare, run_eval  # noqa: E402
from uncurl.profile import _expert_output, batches  # noqa: E402
from uncurl.report import Timings, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Novices:
    """The experts' forward of every MoE layer replaced: ``collect`` accumulates each expert's
    gated output moments; ``substitute`` runs the kept experts and gives the others a constant."""

    def __init__(self, layers):
        self.layers = layers
        self.mask = None  # [tokens] bool, the non-padding tokens of the batch being run
        self.mode = "off"
        self.kept: dict[str, set[int]] = {}
        self.values: dict[str, torch.Tensor] = {}  # [E, hidden] novice values (zero rows for kept ones)
        self.sums = {l.name: (torch.zeros(l.num_experts, l.experts.down_proj.shape[2 if l.experts.is_transposed else 1],
                                          dtype=torch.float64), torch.zeros(l.num_experts, dtype=torch.float64))
                     for l in layers}
        for layer in layers:
            layer.experts.forward = self._forward(layer)

    def _forward(self, layer):
        experts, name = layer.experts, layer.name

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            out = torch.zeros_like(hidden_states)
            flat, gates = top_k_index.reshape(-1), top_k_weights.reshape(-1)
            tokens = torch.arange(hidden_states.shape[0]).repeat_interleave(top_k_index.shape[-1])
            kept = self.kept.get(name)
            for e in range(experts.num_experts):
                pairs = (flat == e).nonzero().squeeze(-1)
                if pairs.numel() == 0:
                    continue
                t, g = tokens[pairs], gates[pairs]
                if self.mode == "substitute" and e not in kept:
                    out.index_add_(0, t, (g[:, None].to(self.values[name].dtype) * self.values[name][e]).to(out.dtype))
                    continue
                y = _expert_output(experts, e, hidden_states[t])
                out.index_add_(0, t, (y * g[:, None]).to(out.dtype))
                if self.mode == "collect":
                    real = self.mask[t]
                    w = g[real].double() ** 2
                    self.sums[name][0][e] += (w[:, None] * y[real].double()).sum(0)
                    self.sums[name][1][e] += w.sum()
            return out

        return forward

    def finish(self, kept: dict[str, set[int]], zero: bool) -> None:
        self.kept, self.mode = kept, "substitute"
        self.values = {n: (torch.zeros_like(s) if zero else s / w.clamp_min(1e-12)[:, None]).float()
                       for n, (s, w) in self.sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="superglue-rte")
    ap.add_argument("--keeps", default="4,2")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reuse", default=None, metavar="PATTERN",
                    help="take unpruned, ean/select and ean/fit from examples/study_fit.py's --out of each K "
                         "(PATTERN with {keep}) where its settings are these, instead of scoring them again")
    args = ap.parse_args()
    keeps = [int(k) for k in args.keeps.split(",")]

    opts = RunOptions(model=args.model, task=args.task, data_dir=args.data_dir, samples=args.samples,
                      max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
                      eval_limit=args.eval_limit, eval_max_length=512)
    timings = Timings()
    prep = prepare(opts, keeps, timings)
    model, tok, adapter = prep.loaded.model, prep.loaded.tokenizer, prep.loaded.adapter
    texts, _ = calibration_texts(opts, opts.seed, tok)
    nll, results, tokens = {}, {}, None

    def score(name, m, start):
        nonlocal tokens
        ev = run_eval(m, tok, opts, args.eval_limit, args.seed, per_example=True)
        rows = ev.pop("examples")
        nll[name], tokens = [r["nll"] for r in rows], [r["tokens"] for r in rows]
        results[name] = {"loss": ev["loss"], "acc": ev.get("acc"), "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name:16s} loss {ev['loss']:.4f} ({results[name]['seconds']} s)", flush=True)

    def reused(keep: int) -> bool:
        """The K's select/fit cells (and the unpruned one) from a study_fit run with these settings."""
        nonlocal tokens
        path = Path(args.reuse.format(keep=keep)) if args.reuse else None
        if path is None or not path.is_file():
            return False
        run = json.loads(path.read_text())
        same = (run["model"], run["task"], run["samples"], run["seed"]) == (args.model, args.task, args.samples,
                                                                            args.seed)
        if not same or not all(c in run["nll"] for c in ("unpruned", "ean/select", "ean/fit")):
            return False
        tokens = run["tokens"]
        nll["unpruned"] = run["nll"]["unpruned"]
        results["unpruned"] = {**run["results"]["unpruned"], "from": str(path)}
        for merge in ("select", "fit"):
            nll[f"K{keep} ean/{merge}"] = run["nll"][f"ean/{merge}"]
            results[f"K{keep} ean/{merge}"] = {**run["results"][f"ean/{merge}"], "from": str(path)}
        print(f"K{keep}: unpruned, ean/select, ean/fit from {path}", flush=True)
        return True

    fresh = [keep for keep in keeps if not reused(keep)]
    if "unpruned" not in nll:
        score("unpruned", model, time.perf_counter())
    for keep in fresh:  # the pruned cells first, while the model is untouched
        plans = plan_all(prep, keep, "ean", args.seed)
        for merge in ("select", "fit"):
            start = time.perf_counter()
            pruned = rewrite_model(model, adapter, plans, router_rule="mean", merge=merge, stats=prep.profile.layers)
            if merge == "fit":
                fit_after_merge(prep.loaded, pruned, plans, opts)
            score(f"K{keep} ean/{merge}", pruned, start)
            del pruned

    start = time.perf_counter()
    first = next(iter(batches(tok, texts, batch_size=args.batch_size, max_length=args.max_length)))
    with torch.no_grad():
        reference = model(**first).logits
        novices = Novices(find_moe_layers(model, adapter))
        gap = (model(**first).logits - reference).abs().max().item()  # the eager loop is the model's forward
    assert gap < 1e-3, f"the novice forward with every expert kept differs from the model's by {gap}"
    novices.mode = "collect"
    with torch.no_grad():
        for batch in batches(tok, texts, batch_size=args.batch_size, max_length=args.max_length):
            novices.mask = batch["attention_mask"].reshape(-1).bool()
            model(**batch)
    collect_s = round(time.perf_counter() - start, 1)
    for keep in keeps:
        plans = plan_all(prep, keep, "ean", args.seed)
        kept = {n: {g[0] for g in p.groups} for n, p in plans.items()}
        for zero in (True, False):
            start = time.perf_counter()
            novices.finish(kept, zero)
            score(f"K{keep} ean/{'zero' if zero else 'novice'}", model, start)

    def paired(a, b):
        d, se = ratio_stderr([x - y for x, y in zip(nll[a], nll[b])], tokens)
        return {"diff": round(d, 6), "stderr": round(se, 6)}

    diffs = {}
    for keep in keeps:
        for a, b in (("novice", "select"), ("novice", "zero"), ("novice", "fit"), ("zero", "select")):
            diffs[f"K{keep} ean/{a} - ean/{b}"] = paired(f"K{keep} ean/{a}", f"K{keep} ean/{b}")
    diffs.update({f"{a} - unpruned": paired(a, "unpruned") for a in nll if a != "unpruned"})
    out = {"model": args.model, "task": args.task, "keeps": keeps, "n": len(tokens), "tokens": sum(tokens),
           "samples": args.samples, "seed": args.seed, "novice_collect_s": collect_s, "eager_forward_gap": gap, "results": results,
           "paired_differences": diffs, "versions": versions(), "threads": torch.get_num_threads(),
           "nll": nll, "per_example_tokens": tokens}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"{args.task}, n={len(tokens)}: task loss differences ± paired standard error")
    for k, v in diffs.items():
        print(f"  {k:34s} {v['diff']:+.4f} ± {v['stderr']:.4f}")


if __name__ == "__main__":
    main()
