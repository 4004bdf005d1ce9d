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
import io
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
    answers: tuple[str, ...] = ()  # a generative task's reference answers (generate.py): any one matching scores

    @property
    def text(self) -> str:
        """The prompt followed by the gold continuation (the prompt alone without one); a generative
        task's prompt, ``TARGET_DELIMITER`` and first reference answer."""
        if self.answers:
            return self.prompt + TARGET_DELIMITER + self.answers[0]
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
    choices_field: str | None = None  # each row's own choices (a list) instead of fixed ``choices``
    halve_hub: bool = False  # the Hub split is the same for both: a fixed seeded half for each
    read_docs: Callable[[str], list[tuple[str, dict[str, Any]]]] | None = None  # escape hatch: split -> rows (lm-eval)
    halve_docs: bool = False  # read_docs gives the same rows for both: a fixed seeded half for each
    generation: Any = None  # a generative task's generate.Generation (answers scored by exact match); None: not one
    answer_field: str | None = None  # a task file's reference answer field (with generation)
    answer_index: str | None = None  # with a list answer_field: the field whose index picks the one reference

    @property
    def split_note(self) -> str:
        """How calibration and evaluation rows are kept apart (stated in reports)."""
        if self.halve_local or self.halve_hub or self.halve_docs:
            return (f"one source split in two fixed disjoint halves (seed {HALVES_SEED}): calibration and "
                    f"evaluation never share a row")
        if self.local_files and len(set(self.local_files.values())) == 1 and not self.hub_splits:
            return "calibration and evaluation both read all of the same rows"
        return "separate calibration and evaluation sources"

    def __post_init__(self) -> None:
        if (self.template is None) == (self.to_example is None):
            raise ValueError(f"task {self.name}: give exactly one of template and to_example")

    @property
    def num_choices(self) -> int | None:
        """How many continuations each example has (0: text only, None: varies by row)."""
        if self.to_example:
            return self.n_choices
        return None if self.choices_field else len(self.choices)

    @property
    def generative(self) -> bool:
        """Whether evaluation generates answers and scores them by exact match (generate.py)."""
        return self.generation is not None

    def example(self, row: Mapping[str, Any]) -> Example:
        """Turn one row (local or Hub layout) into an :class:`Example`."""
        if self.to_example is not None:
            return self.to_example(row)
        prompt = fill_template(self.template, row, self.name)
        if self.answer_field:
            value = _field(row, self.answer_field)
            if self.answer_index:  # e.g. ARC's choices[gold]: the gold choice's text is the one reference
                if not isinstance(value, list):
                    raise UncurlError(f"field {self.answer_field!r} must be a list to be indexed by "
                                      f"{self.answer_index!r}, got {value!r}")
                index = gold_index(_field(row, self.answer_index), row_choices(value, self.answer_field))
                if index < 0:
                    raise UncurlError(f"field {self.answer_index!r} gives no index into {self.answer_field!r}")
                value = [value[index]]
            answers = tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)
            if not answers:
                raise UncurlError(f"field {self.answer_field!r} is an empty list; give a reference answer")
            return Example(prompt, answers=answers)
        if self.choices_field:
            choices = row_choices(_field(row, self.choices_field), self.choices_field)
        elif self.choices:
            choices = self.choices
        else:
            return Example(prompt)
        try:
            gold = gold_index(_field(row, self.label_field), choices, None if self.choices_field else self.labels)
        except UncurlError as err:
            raise UncurlError(f"field {self.label_field!r}: {err}") from None
        return Example(prompt, choices, gold)


def row_choices(value: Any, name: str) -> tuple[str, ...]:
    """A row's own choices: a list of strings (in a .csv cell, a JSON array), each given a leading space."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise UncurlError(f"field {name!r} must be a list of at least two strings (in a .csv cell, a JSON array "
                          f"such as [\"yes\", \"no\"]); got {value!r}")
    return tuple(c if c.startswith(" ") else " " + c for c in value)


def gold_index(value: Any, choices: Sequence[str], labels: Mapping[str, int] | None = None) -> int:
    """Read a label as a choice index: a label spelling, a choice string, or the index itself.

    Strings are matched (stripped, then case-insensitively) against ``labels`` (the stripped
    choices when there are none) before being read as an integer; ``-1`` means unknown. A JSON
    boolean names the choice spelled ``true``/``false`` when there is one, else it is the index
    false=0, true=1 (so ``"label": false`` with choices no/yes is "no").
    """
    spellings = dict(labels) if labels else {c.strip(): i for i, c in enumerate(choices)}
    if isinstance(value, (str, bool)):
        key = str(value).strip()
        lowered = {k.lower(): i for k, i in spellings.items()}
        if key in spellings or key.lower() in lowered:
            return spellings.get(key, lowered.get(key.lower()))
        if re.fullmatch(r"-?\d+", key):
            value = int(key)
    if isinstance(value, bool) and len(choices) >= 2:
        return int(value)
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


TASK_FORMS = ("a registered task (uncurl tasks), hf:ORG/NAME[:CONFIG], lm-eval:TASK, a task file .yaml/.json, or a "
              "custom .jsonl/.csv file")


def get_task(name: str, flag: str = "--task") -> Task:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise UncurlError(f"{flag}: unknown task {name!r}; known tasks: {', '.join(TASKS)} (or hf:ORG/NAME[:CONFIG], "
                          f"lm-eval:TASK, a task file .yaml/.json, or a custom .jsonl/.csv file)")
    return TASKS[name]


def describe_tasks() -> list[dict[str, Any]]:
    """One plain dict per registered task, for ``uncurl tasks``: hub is "path (config)", choices a count."""
    return [{"name": t.name, "description": t.description,
             "hub": t.hub[0] + (f" ({t.hub[1]})" if t.hub[1] else ""), "local_files": dict(t.local_files),
             "choices": "varies" if t.num_choices is None else t.num_choices} for t in TASKS.values()]


TEMPLATE_FORM = ("a template names a row's fields, {field}, optionally indexed ({field[0]}, {field[key]}), "
                 "converted (!r, !s, !a) and formatted (:>10, :.2f)")


def _replacements(template: str) -> list[tuple[str, str | None, str]]:
    """(field, conversion, format spec) of each replacement field of ``template``, in order."""
    try:
        return [(f, conv, spec or "") for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UncurlError(f"template {template!r} is not a str.format string ({err}); write {{{{ }}}} for braces") from None


def _shown(f: str, conv: str | None, spec: str) -> str:
    """One replacement field as the template spells it, e.g. ``{text!r:>10}``."""
    return "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"


def _template_fields(template: str) -> None:
    """What can be known of ``template`` without a row: its fields are named, not positional, read
    no attributes, and convert with !r, !s or !a (``fill_template`` checks the rest on each row)."""
    fields = _replacements(template)
    if not fields or any(f == "" or f.isdigit() for f, _, _ in fields):
        raise UncurlError(f"template {template!r} must name the row's fields, e.g. 'Review: {{text}}'")
    for f, conv, spec in fields:
        shown = _shown(f, conv, spec)
        if "." in f:
            raise UncurlError(f"template {template!r}: {shown} reads an attribute (.{f.split('.', 1)[1]}), which "
                              f"a row's values do not offer; {TEMPLATE_FORM}")
        if conv not in (None, "r", "s", "a"):
            raise UncurlError(f"template {template!r}: {shown} has the conversion !{conv}; accepted: !r, !s, !a")


def fill_template(template: str, row: Mapping[str, Any], task: str = "") -> str:
    """``template.format(**row)``; a field the row lacks, or one its value cannot fill (an index out
    of range, a format spec for another type), fails naming the field and the value."""
    try:
        return template.format(**row)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
        failed = err
    where = f"task {task}: " if task else ""
    for f, conv, spec in _replacements(template):
        shown = _shown(f, conv, spec)
        name = re.split(r"[.\[]", f, maxsplit=1)[0]
        if name not in row:
            raise UncurlError(f"{where}template field {{{name}}} is not in the row; the row has fields "
                              f"{sorted(row)}") from None
        try:
            shown.format(**row)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
            value = repr(row[name])
            value = value if len(value) <= 60 else value[:57] + "..."
            raise UncurlError(f"{where}template {template!r}: {shown} cannot be filled from this row's {name} = "
                              f"{value} ({type(err).__name__}: {err}); a field's index and format spec must fit its "
                              f"value in every row") from None
    raise UncurlError(f"{where}template {template!r} cannot be filled from this row ({type(failed).__name__}: "
                      f"{failed}); {TEMPLATE_FORM}") from None


def _spaced(choices: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(c if c.startswith(" ") else " " + c for c in choices or ())


def _check_choices(choices: Sequence[str] | None, choices_field: str | None) -> None:
    if choices and choices_field:
        raise UncurlError("give fixed choices or a choices field (each row's own list), not both")
    if choices is not None and len(choices) == 1:
        raise UncurlError(f"choices {list(choices)} must be at least two answers")


def custom_task(path: str | Path, template: str, choices: Sequence[str] | None = None,
                label_field: str = "label", *, choices_field: str | None = None,
                eval_path: str | Path | None = None, labels: Mapping[str, int] | None = None,
                name: str | None = None) -> Task:
    """A task over local .jsonl/.csv files.

    With ``eval_path`` the rows of ``path`` calibrate and those of ``eval_path`` evaluate (the same
    file for both: both read all of it). With one file, fixed seeded disjoint halves (seed
    ``HALVES_SEED``, as the registry's ``mc/`` files), so a gate is never graded on the rows it
    was calibrated on.

    ``template`` is ``str.format`` over each row's fields. ``choices`` (the same for every row) or
    ``choices_field`` (a field holding each row's own list) get a leading space if they lack one;
    the gold is read from ``label_field`` as an index, one of the choices (or a ``labels``
    spelling), or a JSON boolean (see :func:`gold_index`). Without choices the examples are text
    only (for calibration; evaluation gives the loss).
    """
    _template_fields(template)
    _check_choices(choices, choices_field)
    files = {}
    for split, given in (("calibration", path), ("evaluation", eval_path if eval_path is not None else path)):
        files[split] = Path(given).expanduser().resolve()
        if files[split].suffix.lower() not in (".jsonl", ".csv"):
            raise UncurlError(f"custom task file {files[split]} must end in .jsonl or .csv")
    one_file = eval_path is None
    how = ("seeded disjoint halves of the file calibrate and evaluate" if one_file else
           f"calibrates on {files['calibration'].name}, evaluates on {files['evaluation'].name}")
    return Task(name or files["calibration"].stem, f"custom task from {files['calibration']} ({how})",
                hub=("", None), hub_splits={}, local_files={k: str(v) for k, v in files.items()},
                template=template, choices=_spaced(choices), labels=dict(labels or {}),
                label_field=label_field, choices_field=choices_field, halve_local=one_file)


HUB_PREFIX = "hf:"
HUB_DEFAULT_SPLITS = {"calibration": "train", "evaluation": "validation"}


def hub_task(spec: str, template: str | None, choices: Sequence[str] | None = None, label_field: str = "label", *,
             choices_field: str | None = None, labels: Mapping[str, int] | None = None,
             splits: Mapping[str, str | None] | None = None, name: str | None = None, flag: str = "--task") -> Task:
    """A Hub dataset named ``hf:ORG/NAME[:CONFIG]``, read with ``datasets.load_dataset``.

    ``splits`` maps calibration/evaluation to the Hub's splits (default train/validation); when
    both name the same split, fixed seeded disjoint halves of it are used.
    """
    body = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    path, _, config = body.partition(":")
    if not path or "/" not in path.strip("/") and not Path(path).is_dir():
        raise UncurlError(f"{flag} {spec!r}: expected hf:ORG/NAME or hf:ORG/NAME:CONFIG, e.g. hf:aps/super_glue:rte")
    if not template:
        raise UncurlError(f"{flag} {spec} is a Hub dataset: pass --template over its fields, e.g. '{{question}}\\nAnswer:'")
    _template_fields(template)
    _check_choices(choices, choices_field)
    chosen = {**HUB_DEFAULT_SPLITS, **{k: v for k, v in (splits or {}).items() if v}}
    if set(chosen) != set(SPLITS):
        raise UncurlError(f"splits {sorted(chosen)}: name only {', '.join(SPLITS)}")
    same = chosen["calibration"] == chosen["evaluation"]
    return Task(name or f"{HUB_PREFIX}{body}", f"Hub dataset {body} (calibration: {chosen['calibration']}, "
                f"evaluation: {chosen['evaluation']}{', seeded disjoint halves' if same else ''})",
                hub=(path, config or None), hub_splits=chosen, local_files={}, template=template,
                choices=_spaced(choices), labels=dict(labels or {}), label_field=label_field,
                choices_field=choices_field, halve_hub=same)


TASK_FILE_KEYS = {"name", "description", "template", "choices", "choices_field", "label_field", "labels",
                  "file", "files", "hub", "config", "splits"}
# a generative task file's keys (generate.py): the reference answer's field, and how answers are made and compared
GENERATIVE_KEYS = {"answer_field", "answer_regex", "group_select", "fallback", "until", "max_gen_toks",
                   "ignore_case", "ignore_punctuation", "regexes_to_ignore"}


def _generation_from_file(spec: dict, path: Path):
    """A task file's generate.Generation (lm-eval's names: until, max_gen_toks, exact_match's options; the
    answer_regex is its regex filter then take_first)."""
    from .generate import DEFAULT_MAX_GEN_TOKS, REGEX_DEFAULTS, Filter, Generation

    def strings(key: str) -> tuple[str, ...]:
        value = spec.get(key, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UncurlError(f"task file {path}: {key} must be a string or a list of strings, got {value!r}")
        return tuple(value)

    flags = {}
    for key in ("ignore_case", "ignore_punctuation"):
        if not isinstance(spec.get(key, False), bool):
            raise UncurlError(f"task file {path}: {key} must be true or false, got {spec[key]!r}")
        flags[key] = spec.get(key, False)
    n = spec.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UncurlError(f"task file {path}: max_gen_toks must be a number of tokens >= 1, got {n!r}")
    steps = [("take_first", ())]
    if "answer_regex" in spec:
        if not isinstance(spec.get("group_select", 0), int):
            raise UncurlError(f"task file {path}: group_select must be an integer (0: the first match, -1: the last)")
        steps.insert(0, ("regex", (("regex_pattern", str(spec["answer_regex"])),
                                   ("group_select", spec.get("group_select", 0)),
                                   ("fallback", str(spec.get("fallback", REGEX_DEFAULTS["fallback"]))))))
    elif "group_select" in spec or "fallback" in spec:
        raise UncurlError(f"task file {path}: group_select and fallback belong to an answer_regex; give one")
    try:
        return Generation(until=strings("until"), max_gen_toks=n,
                          filters=(Filter("answer_regex" if "answer_regex" in spec else "none", tuple(steps)),),
                          regexes_to_ignore=strings("regexes_to_ignore"), **flags)
    except UncurlError as err:
        raise UncurlError(f"task file {path}: {err}") from None


def task_from_file(path: str | Path, flag: str = "--task") -> Task:
    """A task declared in a YAML or JSON file (``--task my-task.yaml``); paths are relative to it.

        name: reviews                       # default: the file's name
        template: "Review: {text}\nSentiment:"
        choices: [positive, negative]       # or  choices_field: options  (each row's own list)
        label_field: label                  # an index, a choice, a labels spelling or a boolean
        labels: {pos: 0, neg: 1}            # optional spellings
        file: reviews.jsonl                 # one file: seeded disjoint halves; or
        files: {calibration: train.jsonl, evaluation: test.jsonl}   # or
        hub: ORG/NAME                       # with optional config: NAME and
        splits: {calibration: train, evaluation: validation}

    A generative task (scored by exact match of greedy generations, as lm-eval's generate_until;
    generate.py) names its reference answer instead of choices:

        answer_field: answer                # the reference (a list: any one matching)
        label_field: gold                   # optional: answer_field is a list, the reference is its element here
        answer_regex: "(\\d+)"               # optional: the answer extracted from the generation
        group_select: 0                     # fallback: "[invalid]"   (lm-eval's regex filter)
        until: ["\n\n", "Question:"]          # stop strings; max_gen_toks: 256
        ignore_case: true                   # ignore_punctuation, regexes_to_ignore: [",", "\\$"]
    """
    path = Path(path).expanduser().resolve()
    try:
        text = read_text(path, "task file ")
    except OSError as err:
        raise UncurlError(f"{flag} {path}: cannot read the task file ({err})") from None
    try:
        if path.suffix.lower() == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise UncurlError(f"task file {path} is not valid {path.suffix.lstrip('.').upper()} ({err})") from None
    if not isinstance(spec, dict):
        raise UncurlError(f"task file {path} must be a mapping of keys ({', '.join(sorted(TASK_FILE_KEYS))})")
    unknown = set(spec) - TASK_FILE_KEYS - GENERATIVE_KEYS
    if unknown:
        raise UncurlError(f"task file {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"accepted: {', '.join(sorted(TASK_FILE_KEYS | GENERATIVE_KEYS))}")
    generative = set(spec) & GENERATIVE_KEYS
    if generative and "answer_field" not in spec:
        raise UncurlError(f"task file {path}: {', '.join(sorted(generative))} belong to a generative task; "
                          f"name its reference answer with answer_field")
    if "answer_field" in spec and ({"choices", "choices_field", "labels"} & set(spec)):
        raise UncurlError(f"task file {path}: answer_field (a generative task) does not go with choices, "
                          f"choices_field or labels (a multiple-choice task)")
    sources = [k for k in ("file", "files", "hub") if k in spec]
    if len(sources) != 1:
        raise UncurlError(f"task file {path}: give exactly one of file, files or hub (it has {sources or 'none'})")
    if "template" not in spec:
        raise UncurlError(f"task file {path}: template is required (str.format over a row's fields)")
    choices = spec.get("choices")
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        hint = (" (YAML reads unquoted yes/no/true/false/on/off as booleans: quote them, e.g. ['no', 'yes'])"
                if isinstance(choices, list) and any(isinstance(c, bool) for c in choices) else "")
        raise UncurlError(f"task file {path}: choices must be a list of strings, got {choices!r}{hint}")
    labels = spec.get("labels")
    if labels is not None and (not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values())):
        raise UncurlError(f"task file {path}: labels must map spellings to choice indices, got {labels!r}")
    common = dict(choices_field=spec.get("choices_field"), labels={str(k): v for k, v in (labels or {}).items()},
                  name=spec.get("name", path.stem))
    args = (str(spec["template"]), choices, spec.get("label_field", "label"))
    if "hub" in spec:
        splits = spec.get("splits") or {}
        if not isinstance(splits, dict):
            raise UncurlError(f"task file {path}: splits must map calibration/evaluation to Hub splits")
        hub = str(spec["hub"]) + (f":{spec['config']}" if spec.get("config") else "")
        task = hub_task(hub, *args, splits=splits, **common)
    else:
        if "files" in spec:
            files = spec["files"]
            if not isinstance(files, dict) or set(files) != set(SPLITS):
                raise UncurlError(f"task file {path}: files must name both calibration and evaluation, got {files!r}")
            first, second = path.parent / files["calibration"], path.parent / files["evaluation"]
        else:
            first, second = path.parent / spec["file"], None
        task = custom_task(first, *args, eval_path=second, **common)
    from dataclasses import replace

    if spec.get("description"):
        task = replace(task, description=str(spec["description"]))
    if "answer_field" in spec:
        task = replace(task, answer_field=str(spec["answer_field"]), generation=_generation_from_file(spec, path),
                       answer_index=str(spec["label_field"]) if "label_field" in spec else None)
    return task


def resolve_task(name: str, *, template: str | None = None, choices: Sequence[str] | None = None,
                 label_field: str = "label", choices_field: str | None = None, eval_file: str | None = None,
                 calibration_split: str | None = None, evaluation_split: str | None = None,
                 flag: str = "--task") -> Task:
    """What ``--task NAME`` means: a registered task, ``hf:ORG/NAME[:CONFIG]``, a task file
    (.yaml/.yml/.json), or a .jsonl/.csv data file with ``template``. Errors name ``flag``, the
    option that gave the name (``--calibrate-on`` for a task of a calibration mix)."""
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if (calibration_split or evaluation_split) and not name.startswith(HUB_PREFIX):
        raise UncurlError(f"--calibration-split/--evaluation-split are for hf: datasets; {flag} {name} is not one "
                          f"(a task file names its Hub splits under splits:)")
    if eval_file and suffix not in (".jsonl", ".csv"):
        raise UncurlError(f"--eval-file is for a .jsonl/.csv --task file; {flag} {name} is not one")
    if name in TASKS:
        return TASKS[name]
    if name.startswith("lm-eval:"):
        from .lmeval import lmeval_task

        return lmeval_task(name, flag)
    if name.startswith(HUB_PREFIX):
        return hub_task(name, template, choices, label_field, choices_field=choices_field,
                        splits={"calibration": calibration_split, "evaluation": evaluation_split}, flag=flag)
    if suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise UncurlError(f"{flag} {name}: no such task file")
        return task_from_file(path, flag)
    if suffix in (".jsonl", ".csv"):
        for given in (path, Path(eval_file).expanduser() if eval_file else None):
            if given is not None and not given.is_file():
                raise UncurlError(f"{flag} {name}: no such file {given}" if given == path else f"--eval-file {given}: no such file")
        if not template:
            raise UncurlError(f"{flag} {name} is a custom data file: pass --template, e.g. '{{text}}'")
        return custom_task(path, template, choices, label_field, choices_field=choices_field, eval_path=eval_file)
    if path.is_dir():
        raise UncurlError(f"{flag} {name} is a directory; {flag} takes {TASK_FORMS}")
    if path.is_file():
        raise UncurlError(f"{flag} {name} is a file of a kind it does not read ({suffix or 'no suffix'}); {flag} "
                          f"takes {TASK_FORMS}")
    if os.sep in name or name.startswith((".", "~")):
        raise UncurlError(f"{flag} {name}: no such file; {flag} takes {TASK_FORMS}")
    return get_task(name, flag)


# --- loading --------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit ``data_dir``, else ``$UNCURL_DATA_DIR``, else None (read from the Hub)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


Rows = list[tuple[str, dict[str, Any]]]  # (where in the source, e.g. "line 12", the row)


def read_text(path: Path, what: str = "") -> str:
    """``path`` read as UTF-8 (a byte-order mark dropped); bytes that are not UTF-8 fail naming the
    file, the line and the byte, and what is accepted."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UncurlError(f"{what}{path} line {line} holds byte 0x{data[err.start]:02x} (offset {err.start:,}), "
                          f"which is not UTF-8; save the file as UTF-8 text") from None


def _read_rows(path: Path) -> Rows:
    """Rows of a .jsonl (one object a line, blank lines skipped) or .csv (with a header) file."""
    text = read_text(path)  # a byte-order mark (Excel) is not a field
    if path.suffix.lower() == ".csv":
        return [(f"line {n}", dict(r)) for n, r in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2)]
    rows = []
    for n, line in enumerate(io.StringIO(text, newline=None), 1):  # as a file reads: \n, \r\n or \r ends a line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UncurlError(f"{path} line {n} is not a JSON object ({err}); expected one object a line") from None
        if not isinstance(row, dict):
            raise UncurlError(f"{path} line {n} is a JSON {type(row).__name__}, not an object with fields")
        rows.append((f"line {n}", row))
    return rows


def halves(rows: list, split: str, task: Task | None = None, source: str = "") -> list:
    """The ``split``'s fixed seeded half of ``rows`` (``HALVES_SEED``), in their order; the halves are disjoint.

    Fewer than two rows cannot be halved: that fails saying so (and how to give an evaluation source)."""
    if task is not None and len(rows) == 1:
        custom = task.halve_local and all(Path(f).is_absolute() for f in task.local_files.values())
        other = (" or pass --eval-file FILE to evaluate on another file" if custom else
                 " or name another --evaluation-split" if task.halve_hub else "")
        raise UncurlError(f"task {task.name}: {source} has 1 row, too few to split into calibration and evaluation "
                          f"halves; add rows{other}")
    order = list(range(len(rows)))
    random.Random(HALVES_SEED).shuffle(order)
    half = order[: len(rows) // 2] if split == "calibration" else order[len(rows) // 2:]
    return [rows[i] for i in sorted(half)]


def _local_rows(task: Task, split: str, data_dir: Path | None) -> tuple[Rows, str]:
    if data_dir is None and not Path(task.local_files[split]).is_absolute():
        raise UncurlError(
            f"task {task.name} has no Hugging Face Hub copy and reads {task.local_files[split]} under a data dir: "
            f"pass --data-dir DIR (or set {DATA_DIR_ENV}=DIR), laid out like ../shared/data"
        )
    path = (data_dir or Path()) / task.local_files[split]
    if task.read_local is not None:
        return [(f"passage {n}", r) for n, r in enumerate(task.read_local(path), 1)], str(path)
    if not path.is_file():
        raise UncurlError(
            f"task {task.name}: {split} file {path} does not exist; the data dir must be laid out like "
            f"../shared/data with {', '.join(sorted(set(task.local_files.values())))} under it"
        )
    rows = _read_rows(path)
    return (halves(rows, split, task, str(path)) if task.halve_local else rows), str(path)


def _hub_rows(task: Task, split: str) -> tuple[Rows, str]:
    path, name = task.hub
    where = f"{path}" + (f" ({name})" if name else "") + f" split {task.hub_splits[split]}"
    try:
        import datasets  # slow to import: only when the Hub is used

        rows = [(f"row {n}", dict(r)) for n, r in enumerate(datasets.load_dataset(path, name, split=task.hub_splits[split]))]
    except Exception as err:  # offline, not found, bad config: all mean "use local files"
        hint = (f"Point at local files instead with --data-dir DIR or {DATA_DIR_ENV}=DIR, laid out like "
                f"../shared/data ({', '.join(sorted(set(task.local_files.values())))})" if task.local_files else
                "Check the dataset name, config and split, and that the Hub is reachable (HF_DATASETS_OFFLINE unset), "
                "or download the rows to a .jsonl file and use a task file")
        raise UncurlError(
            f"task {task.name}: could not load {where} from the Hugging Face Hub ({type(err).__name__}: {err}). {hint}"
        ) from err
    return (halves(rows, split, task, f"the Hub's {where}") if task.halve_hub else rows), f"the Hub's {where}"


def load_examples(task: Task, split: str, data_dir: str | Path | None = None, *,
                  limit: int | None = None, seed: int = 0) -> list[Example]:
    """The task's examples for ``split`` ("calibration" or "evaluation"), in file order.

    ``limit`` keeps a random subset of that many rows (``random.Random(seed)``), file order kept.
    A row that does not fit the task fails naming the source, the row (its line in a file) and
    the field.
    """
    if split not in SPLITS:
        raise UncurlError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise UncurlError(f"limit {limit} must be a positive number of examples (or None for all)")
    data_dir = resolve_data_dir(data_dir)
    if task.read_docs is not None:
        rows, source = task.read_docs(split), task.name
        rows = halves(rows, split, task, source) if task.halve_docs else rows
    elif task.hub[0] and (data_dir is None or not task.local_files):
        rows, source = _hub_rows(task, split)
    else:
        rows, source = _local_rows(task, split, data_dir)
    if not rows:
        raise UncurlError(f"task {task.name} has no data in {source} ({split} split); check the file")
    if limit is not None and len(rows) > limit:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    examples = []
    for where, row in rows:
        try:
            examples.append(task.example(row))
        except UncurlError as err:
            raise UncurlError(f"{source}, {where} ({split} split): {err}") from None
    log.debug("task %s: %d %s examples from %s", task.name, len(examples), split, source)
    return examples


def data_fingerprint(examples: Sequence[Example]) -> str:
    """First 16 hex digits of a sha256 over the examples (prompts, choices, golds), stable across runs."""
    payload = json.dumps([[e.prompt, list(e.choices), e.gold] + ([list(e.answers)] if e.answers else [])
                          for e in examples], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
