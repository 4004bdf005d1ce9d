"""The pretrained test bed against its dense parent: language ability and task accuracy.

    .venv/bin/python examples/build_smol_moe.py      # first: ~/.cache/uncurl/smol-moe/{parent,model}
    .venv/bin/python examples/testbed_report.py      # -> benchmarks/results/testbed.{json,md}
    .venv/bin/python examples/specialisation.py --model ~/.cache/uncurl/smol-moe/model --samples 64 \\
        --out benchmarks/results/specialisation_smol.json   # per-task expert usage

For the parent and the MoE: the held-out corpus loss (the ``corpus`` task's evaluation passages,
which the build never calibrates on), and acc / acc_norm with standard errors on the full evaluation
halves of ARC-Easy, PIQA and COPA, scored by ``uncurl.evaluate`` (lm-eval's requests). "margin" is
acc minus chance in standard errors. Each model is scored in one process run; results are written
after every (model, task) pair, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "uncurl"
TASKS = ("arc-easy", "piqa", "superglue-copa")


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| model | held-out corpus loss | " + " | ".join(f"{t} acc | {t} acc_norm" for t in TASKS) + " |",
             "|---|---|" + "---|---|" * len(TASKS)]
    for name, scores in result["models"].items():
        row = [name, f"{scores['corpus']['loss']:.3f}" if "corpus" in scores else ""]
        for t in TASKS:
            s = scores.get(t)
            row += ([f"{s['acc']:.3f} ± {s['acc_stderr']:.3f}", f"{s['acc_norm']:.3f} ± {s['acc_norm_stderr']:.3f}"]
                    if s else ["", ""])
        lines.append("| " + " | ".join(row) + " |")
    n = {t: next((s[t]["n"] for s in result["models"].values() if t in s), "") for t in (*TASKS, "corpus")}
    lines.append("")
    lines.append("Examples: " + ", ".join(f"{t} {v}" for t, v in n.items()) + ".")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    from uncurl import tasks as T
    from uncurl.evaluate import evaluate_examples
    from uncurl.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=CACHE / "smol-moe", help="the build's --out (parent/ and model/)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--limit", type=int, default=None, help="a seeded subset of each evaluation split")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "testbed.json")
    args = ap.parse_args()
    build = json.loads((args.root / "model" / "build.json").read_text())
    result = {"build": {k: v for k, v in build.items() if k != "sha256"}, "models": {}}
    for name in ("parent", "model"):
        loaded = load_model(str(args.root / name), device=args.device, moe=False)
        scores = result["models"].setdefault(name, {})
        for task in (*TASKS, "corpus"):
            started = time.time()
            examples = T.load_examples(T.get_task(task), "evaluation", args.data, limit=args.limit, seed=0)
            s = evaluate_examples(loaded.model, loaded.tokenizer, examples, batch_size=args.batch_size)
            if "acc" in s:
                chance = sum(1 / len(e.choices) for e in examples) / len(examples)
                s["margin_over_chance_in_stderr"] = round((s["acc"] - chance) / s["acc_stderr"], 2)
            s["seconds"] = round(time.time() - started, 1)
            scores[task] = s
            write(result, args.out)
            print(name, task, {k: s[k] for k in ("n", "loss", "acc", "acc_norm") if k in s}, flush=True)
        del loaded


if __name__ == "__main__":
    main()
