"""What a task's data looks like: a declarative registry, one short entry per task.

    uncurl tasks               # lists this registry without loading a model

A task names where its rows live (a Hugging Face Hub dataset, and files under a local data dir
laid out like ``../shared/data``) and how a row becomes an :class:`Example`: a ``str.format``
template over the row's fields, the choices, and the label spellings. Odd preprocessing goes in
one Python escape hatch, ``to_example``; files that are not rows (plain text) in another,
``read_local``. Prompts follow lm-evaluation-harness.

    load_examples(get_task("superglue-rte"), "calibration", "../shared/data", limit=128)

With a data dir (``--data-dir DIR`` or ``$UNCURL_DATA_DIR``) rows come from local files;
without one from ``datasets.load_dataset``. The ``corpus`` task (task-agnostic calibration) has no
Hub copy: it reads the held-out tail of ``corpus/*.txt`` under the data dir, the text that
``examples/train_smoe.py`` does not train on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import UncurlError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "UNCURL_DATA_DIR"
SPLITS = ("calibration", "evaluation")
HALVES_SEED = 1234  # fixed on purpose: the calibration/evaluation halves must not move with --seed
CORPUS_HOLDOUT = 0.02  # the tail of each corpus file that examples/train_smoe.py never trains on
# lm-eval joins a prompt and a choice with this (its ``target_delimiter``): every continuation below
# starts with it, and acc_norm divides by the choice's length without it (evaluate.completion_length).
TARGET_DELIMITER = " "
_SUPERGLUE_SPLITS = {"calibration": "train", "evaluation": "validation"}


@dataclass(frozen=True)
class Example:
    """One scored item: a prompt and its continuations, each ``TARGET_DELIMITER`` + a choice, as
    lm-eval requests them."""

    prompt: str
    choices: tuple[str, ...] = ()
    gold: int = -1  # index into choices; -1 when unknown

    @property
    def text(self) -> str:
        """The prompt followed by the gold continuation (the prompt alone without one)."""
        return self.prompt + self.choices[self.gold] if self.choices and self.gold >= 0 else self.prompt


@dataclass(frozen=True)
class Task:
    """Where a task's rows live and how one row becomes an :class:`Example`."""

    name: str
    description: str
    hub: tuple[str, str | None]  # (dataset path, config name); path "" means no Hub copy
    hub_splits: dict[str, str]  # our split -> the Hub's split
    local_files: dict[str, str]  # our split -> file relative to the data dir (or absolute)
    template: str | None = None  # str.format over the row's fields
    choices: tuple[str, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)  # label spelling -> choice index
    label_field: str = "label"
    to_example: Callable[[Mapping[str, Any]], Example] | None = None  # escape hatch
    n_choices: int | None = None  # for to_example tasks; None: varies by row
    halve_local: bool = False  # the local file holds one split: a fixed seeded half for each
    read_local: Callable[[Path], list[dict[str, Any]]] | None = None  # escape hatch: local_files[split] -> rows

    def __post_init__(self) -> None:
        if (self.template is None) == (self.to_example is None):
            raise ValueError(f"task {self.name}: give exactly one of template and to_example")

    @property
    def num_choices(self) -> int | None:
        """How many continuations each example has (0: text only, None: varies by row)."""
        return self.n_choices if self.to_example else len(self.choices)

    def example(self, row: Mapping[str, Any]) -> Example:
        """Turn one row (local or Hub layout) into an :class:`Example`."""
        if self.to_example is not None:
            return self.to_example(row)
        try:
            prompt = self.template.format(**row)
        except KeyError as err:
            raise UncurlError(
                f"task {self.name}: template field {{{err.args[0]}}} is not in the row; "
                f"the row has fields {sorted(row)}"
            ) from None
        if not self.choices:
            return Example(prompt)
        return Example(prompt, self.choices, gold_index(_field(row, self.label_field), self.choices, self.labels))


def gold_index(value: Any, choices: Sequence[str], labels: Mapping[str, int] | None = None) -> int:
    """Read a label as a choice index: a label spelling, a choice string, or the index itself.

    Strings are matched (stripped, then case-insensitively) against ``labels`` (the stripped
    choices when there are none) before being read as an integer; ``-1`` means unknown.
    """
    spellings = dict(labels) if labels else {c.strip(): i for i, c in enumerate(choices)}
    if isinstance(value, (str, bool)):
        key = str(value).strip()
        lowered = {k.lower(): i for k, i in spellings.items()}
        if key in spellings or key.lower() in lowered:
            return spellings.get(key, lowered.get(key.lower()))
        if re.fullmatch(r"-?\d+", key):
            value = int(key)
    if isinstance(value, int) and not isinstance(value, bool) and -1 <= value < len(choices):
        return value
    raise UncurlError(
        f"label {value!r} is not one of {list(spellings)} nor an index in 0..{len(choices) - 1} "
        f"(-1 for unknown)"
    )


def _field(row: Mapping[str, Any], name: str) -> Any:
    if name not in row:
        raise UncurlError(f"field {name!r} is missing; the row has fields {sorted(row)}")
    return row[name]


# --- escape hatches -------------------------------------------------------------------------


def _copa(row: Mapping[str, Any]) -> Example:
    """COPA as lm-eval's super_glue/copa: "premise because/therefore", and each choice with its first
    letter lower-cased *and* a leading space of its own (lm-eval's ``doc_to_choice``), after the target
    delimiter: the continuation starts with two spaces, and acc_norm counts one of them."""
    question = _field(row, "question")
    if question not in ("cause", "effect"):
        raise UncurlError(f"COPA question {question!r} is neither 'cause' nor 'effect'")
    prompt = _field(row, "premise").strip().removesuffix(".") + (" because" if question == "cause" else " therefore")
    choices = tuple(TARGET_DELIMITER + " " + c[:1].lower() + c[1:] for c in (_field(row, "choice1"), _field(row, "choice2")))
    return Example(prompt, choices, gold_index(_field(row, "label"), choices))


def _arc_hub_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """ARC on the Hub (question, choices{text,label}, answerKey) -> the local layout."""
    keys = [str(k) for k in row["choices"]["label"]]
    if str(row["answerKey"]) not in keys:
        raise UncurlError(f"ARC answerKey {row['answerKey']!r} is not one of the choice labels {keys}")
    return {"query": "Question: " + row["question"], "choices": list(row["choices"]["text"]),
            "gold": keys.index(str(row["answerKey"]))}


def _piqa_hub_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """PIQA on the Hub (goal, sol1, sol2, label) -> the local layout."""
    return {"query": "Question: " + row["goal"], "choices": [row["sol1"], row["sol2"]], "gold": row["label"]}


def _multiple_choice(row: Mapping[str, Any]) -> Example:
    """Local ``{"query", "choices", "gold"}`` rows (or ARC/PIQA Hub rows): "Question: ...\\nAnswer:"."""
    if "answerKey" in row:
        row = _arc_hub_row(row)
    elif "goal" in row:
        row = _piqa_hub_row(row)
    choices = tuple(" " + c for c in _field(row, "choices"))
    return Example(_field(row, "query").strip() + "\nAnswer:", choices, gold_index(_field(row, "gold"), choices))


def split_corpus(text: str) -> tuple[str, str]:
    """(train, holdout): the holdout is the last ``CORPUS_HOLDOUT`` of the characters."""
    cut = int(len(text) * (1 - CORPUS_HOLDOUT))
    return text[:cut], text[cut:]


def corpus_passages(text: str, size: int = 1000) -> list[str]:
    """``text`` in passages of about ``size`` characters, broken at line ends, stripped, blanks dropped.

    Each passage is whole consecutive lines (longer than ``size`` only when one line is), so it
    occurs verbatim in ``text``.
    """
    passages, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line.rstrip()) > size:
            passages.append(current)
            current = ""
        current += line
    passages.append(current)
    return [p.strip() for p in passages if p.strip()]


def _corpus_rows(pattern: Path) -> list[dict[str, Any]]:
    """``{"text": passage}`` rows from the held-out tail of every file matching ``pattern``, by file name."""
    files = sorted(pattern.parent.glob(pattern.name))
    if not files:
        raise UncurlError(f"task corpus: no files match {pattern}; the data dir must be laid out like "
                          f"../shared/data with corpus/*.txt under it")
    return [{"text": passage} for path in files
            for passage in corpus_passages(split_corpus(path.read_text(encoding="utf-8", errors="replace"))[1])]


# --- the registry ---------------------------------------------------------------------------


def _superglue(name: str, local_dir: str, calibration_file: str = "train.jsonl") -> dict[str, Any]:
    return {"hub": ("aps/super_glue", name), "hub_splits": dict(_SUPERGLUE_SPLITS),
            "local_files": {"calibration": f"superglue/{local_dir}/{calibration_file}",
                            "evaluation": f"superglue/{local_dir}/val.jsonl"}}


def _mc(file: str, hub: tuple[str, str | None], calibration: str, evaluation: str,
        n_choices: int | None) -> dict[str, Any]:
    return {"hub": hub, "hub_splits": {"calibration": calibration, "evaluation": evaluation},
            "local_files": dict.fromkeys(SPLITS, f"mc/{file}"), "to_example": _multiple_choice,
            "n_choices": n_choices, "halve_local": True}


_HALVES = " The local file holds one split: a fixed seeded half calibrates, the other half evaluates."

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("superglue-rte", "RTE: does the premise entail the hypothesis? (True/False)",
         template="{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", choices=(" True", " False"),
         labels={"entailment": 0, "not_entailment": 1}, **_superglue("rte", "rte")),
    Task("superglue-cb", "CommitmentBank: entailment, contradiction or neither (3-way)",
         template="{premise}\nQuestion: {hypothesis}. True, False, or Neither?\nAnswer:",
         choices=(" True", " False", " Neither"), labels={"entailment": 0, "contradiction": 1, "neutral": 2},
         **_superglue("cb", "cb")),
    Task("superglue-copa", "COPA: pick the more plausible cause or effect of a premise",
         to_example=_copa, n_choices=2, **_superglue("copa", "copa")),
    Task("superglue-boolq", "BoolQ: yes/no questions about a Wikipedia passage (calibrates on FewGLUE's 32)",
         template="{passage}\nQuestion: {question}?\nAnswer:", choices=(" no", " yes"),
         labels={"false": 0, "true": 1}, **_superglue("boolq", "boolq", "train32.jsonl")),
    # ARC: 4 options in the local files, 3 to 5 in some Hub rows, hence n_choices None.
    Task("arc-easy", "ARC-Easy: grade-school science questions with 3-5 options." + _HALVES,
         **_mc("arc_easy.jsonl", ("allenai/ai2_arc", "ARC-Easy"), "train", "test", None)),
    Task("arc-challenge", "ARC-Challenge: harder grade-school science questions with 3-5 options." + _HALVES,
         **_mc("arc_challenge.jsonl", ("allenai/ai2_arc", "ARC-Challenge"), "train", "test", None)),
    Task("piqa", "PIQA: physical commonsense, pick the better of two solutions." + _HALVES,
         **_mc("piqa.jsonl", ("ybisk/piqa", None), "train", "validation", 2)),
    Task("corpus", f"English corpus text (task-agnostic calibration; held-out tail of each ../shared/data "
         f"corpus file, the last {CORPUS_HOLDOUT:.0%}, in ~1000-character passages; calibration and evaluation "
         f"both read all of it); text only: evaluation gives loss, no accuracy",
         hub=("", None), hub_splits={}, local_files=dict.fromkeys(SPLITS, "corpus/*.txt"),
         template="{text}", read_local=_corpus_rows),
]}


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise UncurlError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or a custom .jsonl/.csv file)")
    return TASKS[name]


def describe_tasks() -> list[dict[str, Any]]:
    """One plain dict per registered task, for ``uncurl tasks``: hub is "path (config)", choices a count."""
    return [{"name": t.name, "description": t.description,
             "hub": t.hub[0] + (f" ({t.hub[1]})" if t.hub[1] else ""), "local_files": dict(t.local_files),
             "choices": "varies" if t.num_choices is None else t.num_choices} for t in TASKS.values()]


def custom_task(path: str | Path, template: str, choices: Sequence[str] | None = None,
                label_field: str = "label") -> Task:
    """A task over one local .jsonl/.csv file; calibration and evaluation both read all of it.

    ``template`` is ``str.format`` over each row's fields. ``choices`` get a leading space if they
    lack one; the gold is read from ``label_field`` as an index or as one of the choices. Without
    choices the examples are text only (for calibration).
    """
    path = Path(path).expanduser().resolve()
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UncurlError(f"template {template!r} is not a str.format string ({err}); write {{{{ }}}} for braces") from None
    if not fields or any(f == "" or f.isdigit() for f in fields):
        raise UncurlError(f"template {template!r} must name the row's fields, e.g. 'Review: {{text}}'")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise UncurlError(f"custom task file {path} must end in .jsonl or .csv")
    spaced = tuple(c if c.startswith(" ") else " " + c for c in choices or ())
    return Task(path.stem, f"custom task from {path} (calibration and evaluation both read the whole file)",
                hub=("", None), hub_splits={}, local_files=dict.fromkeys(SPLITS, str(path)),
                template=template, choices=spaced, label_field=label_field)


# --- loading --------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit ``data_dir``, else ``$UNCURL_DATA_DIR``, else None (read from the Hub)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl (one object a line, blank lines skipped) or .csv (with a header) file."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UncurlError(f"{path} line {n} is not a JSON object ({err}); expected one object a line") from None
    return rows


def _local_rows(task: Task, split: str, data_dir: Path | None) -> tuple[list[dict[str, Any]], str]:
    if data_dir is None and not Path(task.local_files[split]).is_absolute():
        raise UncurlError(
            f"task {task.name} has no Hugging Face Hub copy and reads {task.local_files[split]} under a data dir: "
            f"pass --data-dir DIR (or set {DATA_DIR_ENV}=DIR), laid out like ../shared/data"
        )
    path = (data_dir or Path()) / task.local_files[split]
    if task.read_local is not None:
        return task.read_local(path), str(path)
    if not path.is_file():
        raise UncurlError(
            f"task {task.name}: {split} file {path} does not exist; the data dir must be laid out like "
            f"../shared/data with {', '.join(sorted(set(task.local_files.values())))} under it"
        )
    rows = _read_rows(path)
    if task.halve_local:
        order = list(range(len(rows)))
        random.Random(HALVES_SEED).shuffle(order)
        half = order[: len(rows) // 2] if split == "calibration" else order[len(rows) // 2:]
        rows = [rows[i] for i in sorted(half)]
    return rows, str(path)


def _hub_rows(task: Task, split: str) -> tuple[list[dict[str, Any]], str]:
    path, name = task.hub
    where = f"{path}" + (f" ({name})" if name else "") + f" split {task.hub_splits[split]}"
    try:
        import datasets  # slow to import: only when the Hub is used

        rows = [dict(r) for r in datasets.load_dataset(path, name, split=task.hub_splits[split])]
    except Exception as err:  # offline, not found, bad config: all mean "use local files"
        raise UncurlError(
            f"task {task.name}: could not load {where} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"Point at local files instead with --data-dir DIR or {DATA_DIR_ENV}=DIR, laid out like "
            f"../shared/data ({', '.join(sorted(set(task.local_files.values())))})"
        ) from err
    return rows, f"the Hub's {where}"


def load_examples(task: Task, split: str, data_dir: str | Path | None = None, *,
                  limit: int | None = None, seed: int = 0) -> list[Example]:
    """The task's examples for ``split`` ("calibration" or "evaluation"), in file order.

    ``limit`` keeps a random subset of that many rows (``random.Random(seed)``), file order kept.
    """
    if split not in SPLITS:
        raise UncurlError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise UncurlError(f"limit {limit} must be a positive number of examples (or None for all)")
    data_dir = resolve_data_dir(data_dir)
    if data_dir is not None or not task.hub[0]:
        rows, source = _local_rows(task, split, data_dir)
    else:
        rows, source = _hub_rows(task, split)
    if not rows:
        raise UncurlError(f"task {task.name} has no data in {source} ({split} split); check the file")
    if limit is not None and len(rows) > limit:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    examples = []
    for n, row in enumerate(rows):
        try:
            examples.append(task.example(row))
        except UncurlError as err:
            raise UncurlError(f"{source}, {split} row {n}: {err}") from None
    log.debug("task %s: %d %s examples from %s", task.name, len(examples), split, source)
    return examples


def data_fingerprint(examples: Sequence[Example]) -> str:
    """First 16 hex digits of a sha256 over the examples (prompts, choices, golds), stable across runs."""
    payload = json.dumps([[e.prompt, list(e.choices), e.gold] for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
