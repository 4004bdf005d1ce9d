"""Does `uncurl eval` score exactly as lm-evaluation-harness does? Example by example.

    python -m venv ../.venv-lmeval && ../.venv-lmeval/bin/pip install torch==2.13.0 lm-eval==0.4.13 transformers==5.23.0 accelerate
    .venv/bin/python examples/compare_lm_eval.py --lm-eval-python ../.venv-lmeval/bin/python \\
        --model ~/.cache/uncurl/smol-moe/model --tasks superglue-copa,superglue-rte,arc-easy --limit 300

lm-eval is never a dependency of uncurl: it runs in its own virtual environment, as a subprocess.
For each task the script takes the first ``--limit`` rows of uncurl's evaluation split (local
files under ``--data``), writes them in the Hub schema lm-eval's default task config expects, and
runs lm-eval on them through a task YAML that ``include``s lm-eval's own default config (same
prompt, choices and delimiter; only the data source is local, and acc_norm is asked for too). Then
it scores the same rows with ``uncurl.evaluate`` in this process and compares, per example, the
predicted answer under ``acc`` and ``acc_norm``. Writes benchmarks/results/lm_eval_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "uncurl"

# uncurl task -> (lm-eval default config, relative to lm_eval/tasks; local row -> lm-eval's Hub row)
LM_EVAL_TASKS = {
    "superglue-rte": ("super_glue/rte/default.yaml", lambda r: r),
    "superglue-cb": ("super_glue/cb/default.yaml", lambda r: r),
    "superglue-copa": ("super_glue/copa/default.yaml", lambda r: r),
    "superglue-boolq": ("super_glue/boolq/default.yaml", lambda r: r),
    "arc-easy": ("arc/arc_easy.yaml", lambda r: _arc(r)),
    "arc-challenge": ("arc/arc_challenge.yaml", lambda r: _arc(r)),
    "piqa": ("piqa/piqa.yaml", lambda r: {"goal": r["query"].removeprefix("Question: "), "sol1": r["choices"][0],
                                          "sol2": r["choices"][1], "label": r["gold"]}),
}
_LABELS = {"entailment": 0, "not_entailment": 1, "contradiction": 1, "neutral": 2}


def _arc(r: dict) -> dict:
    keys = "ABCDE"[: len(r["choices"])]
    return {"question": r["query"].removeprefix("Question: "), "answerKey": keys[r["gold"]],
            "choices": {"text": list(r["choices"]), "label": list(keys)}}


def _hub_row(task: str, row: dict) -> dict:
    row = LM_EVAL_TASKS[task][1](dict(row))
    if isinstance(row.get("label"), str):  # SuperGLUE label spellings -> the Hub's integers
        row["label"] = _LABELS[row["label"]]
    return row


def evaluation_rows(task_name: str, data: Path, limit: int | None) -> list[dict]:
    from uncurl import tasks as T

    rows, _ = T._local_rows(T.get_task(task_name), "evaluation", data)  # [(where, row)]
    rows = [row for _, row in rows]
    return rows[:limit] if limit else rows


def lm_eval_tasks_dir(python: str) -> Path:
    out = subprocess.run([python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip()) / "tasks"


def run_lm_eval(python: str, model: Path, tasks: dict[str, list[dict]], work: Path, batch_size: int) -> dict:
    """{uncurl task: {doc_id: (acc, acc_norm)}} from lm-eval's logged samples."""
    library = lm_eval_tasks_dir(python)
    include = work / "tasks"
    include.mkdir(parents=True)
    names = {}
    for name, rows in tasks.items():
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps(_hub_row(name, r)) + "\n" for r in rows))
        names[name] = f"uncurl_{name.replace('-', '_')}"
        (include / f"{name}.yaml").write_text(
            f"include: {library / LM_EVAL_TASKS[name][0]}\n"
            f"task: {names[name]}\ntag: []\n"
            f"dataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
            f"training_split: null\nvalidation_split: validation\ntest_split: null\nfewshot_split: null\n"
            f"metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
    out = work / "out"
    cmd = [python, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--tasks", ",".join(names.values()), "--include_path", str(include), "--batch_size", str(batch_size),
           "--device", "cpu", "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # lm-eval's environment only
    subprocess.run(cmd, check=True, env=env)
    result = {}
    for name, lm_name in names.items():
        [samples] = sorted(out.rglob(f"samples_{lm_name}_*.jsonl"))
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        result[name] = {r["doc_id"]: (r["acc"], r["acc_norm"]) for r in rows}
    return result


def run_uncurl(model: Path, tasks: dict[str, list[dict]], batch_size: int) -> dict:
    from uncurl import tasks as T
    from uncurl.evaluate import evaluate_examples
    from uncurl.load import load_model

    loaded = load_model(str(model), device="cpu", moe=False)
    out = {}
    for name, rows in tasks.items():
        examples = [T.get_task(name).example(r) for r in rows]
        scored = evaluate_examples(loaded.model, loaded.tokenizer, examples, batch_size=batch_size, per_example=True)
        out[name] = {"metrics": {k: v for k, v in scored.items() if k != "examples"},
                     "docs": {i: (float(e["pred"] == e["gold"]), float(e["pred_norm"] == e["gold"]))
                              for i, e in enumerate(scored["examples"])}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=CACHE / "smol-moe" / "model")
    ap.add_argument("--lm-eval-python", default=str(ROOT.parent / ".venv-lmeval" / "bin" / "python"))
    ap.add_argument("--tasks", default="superglue-copa,superglue-rte,arc-easy")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--limit", type=int, default=300, help="first N rows of each evaluation split (0: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm_eval_agreement.json")
    args = ap.parse_args()
    tasks = {name: evaluation_rows(name, args.data, args.limit or None) for name in args.tasks.split(",")}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="uncurl-lmeval-") as work:
        theirs = run_lm_eval(args.lm_eval_python, args.model, tasks, Path(work), args.batch_size)
    lm_eval_s = time.time() - started
    ours = run_uncurl(args.model, tasks, args.batch_size)
    report = {"model": str(args.model), "lm_eval_seconds": round(lm_eval_s, 1), "tasks": {}}
    for name in tasks:
        docs = ours[name]["docs"]
        agree = {m: sum(docs[i][k] == theirs[name][i][k] for i in docs) for k, m in enumerate(("acc", "acc_norm"))}
        differ = [i for i in docs if docs[i] != theirs[name][i]]
        n = len(docs)
        report["tasks"][name] = {
            "n": n, "agree_acc": agree["acc"], "agree_acc_norm": agree["acc_norm"], "differing_docs": differ,
            "uncurl": {m: ours[name]["metrics"].get(m) for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
            "lm_eval": {"acc": sum(v[0] for v in theirs[name].values()) / n,
                        "acc_norm": sum(v[1] for v in theirs[name].values()) / n},
        }
        print(f"{name}: {n} examples, acc agrees on {agree['acc']}, acc_norm on {agree['acc_norm']}; "
              f"uncurl acc {report['tasks'][name]['uncurl']['acc']:.4f} vs lm-eval {report['tasks'][name]['lm_eval']['acc']:.4f}",
              file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
