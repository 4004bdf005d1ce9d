"""How precise is a task-loss difference between two pruned models? Its paired standard error.

    .venv/bin/python examples/paired_loss.py --model ~/.cache/uncurl/smoe-mixtral-8x/model \\
        --task superglue-rte --profile runs/study-trained/glue3/profiles/superglue-rte-task.safetensors \\
        --keep 4 --labels reap,frequency,uncurl/aligned/refit,uncurl/average/mean

A methods study scores every model on the same examples, so the difference between two models'
task losses is paired. Per example i (prompt + gold answer, t_i tokens), d_i = nll_a,i - nll_b,i;
the difference of the task losses is D = sum d_i / sum t_i, and its standard error over examples
(the ratio estimator's) is sqrt(n / (n - 1) * sum (d_i - D t_i)^2) / sum t_i. The same formula with
nll_b = 0 gives one model's loss and its (unpaired) standard error. The models are rebuilt from the
study's profile file exactly as its sweep built them (same plans, merge and router rules, seed), so
the losses printed here equal the study's. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from uncurl.pipeline import RunOptions, method_used, prepare, run_eval  # noqa: E402
from uncurl.report import Timings  # noqa: E402
from uncurl.sweep import cell_model, parse_label  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def ratio_stderr(nll: list[float], tokens: list[int]) -> tuple[float, float]:
    """(sum nll / sum tokens, its standard error over examples)."""
    n, total = len(nll), sum(tokens)
    mean = sum(nll) / total
    spread = sum((x - mean * t) ** 2 for x, t in zip(nll, tokens))
    return mean, math.sqrt(n / (n - 1) * spread) / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--profile", required=True, help="the study's profile file for this task")
    ap.add_argument("--keep", type=int, required=True)
    ap.add_argument("--labels", required=True, help="study labels: method or method/merge/router")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    opts = RunOptions(model=args.model, task=args.task, data_dir=args.data_dir, max_length=args.max_length,
                      profile=args.profile, seed=args.seed, eval_limit=args.eval_limit)
    prep = prepare(opts, [args.keep], Timings())
    model, tok = prep.loaded.model, prep.loaded.tokenizer

    def per_example(m) -> tuple[list[float], list[int]]:
        rows = run_eval(m, tok, opts, args.eval_limit, args.seed, per_example=True)["examples"]
        return [r["nll"] for r in rows], [r["tokens"] for r in rows]

    scored = {"unpruned": per_example(model)}
    for name in args.labels.split(","):
        method, merge, router = parse_label(name)
        pruned, _ = cell_model(prep, model, method_used(prep, method), merge, router, args.keep, args.seed)
        scored[name] = per_example(pruned)
        del pruned

    tokens = scored["unpruned"][1]
    names = list(scored)
    n = len(tokens)
    result = {"model": args.model, "task": args.task, "keep": args.keep, "n": n, "tokens": sum(tokens),
              "loss": {}, "differences": {}}
    print(f"{args.task}, K={args.keep}, n={n}: loss ± standard error (nats/token)")
    for name in names:
        loss, se = ratio_stderr(scored[name][0], tokens)
        result["loss"][name] = {"loss": round(loss, 6), "stderr": round(se, 6)}
        print(f"  {name:28s} {loss:.4f} ± {se:.4f}")
    print("paired differences (row minus column), ± paired standard error:")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = [x - y for x, y in zip(scored[a][0], scored[b][0])]
            d, se = ratio_stderr(diff, tokens)
            result["differences"][f"{a} - {b}"] = {"diff": round(d, 6), "stderr": round(se, 6)}
            print(f"  {a} - {b}: {d:+.4f} ± {se:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
