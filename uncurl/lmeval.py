"""lm-evaluation-harness tasks as uncurl tasks (optional: ``pip install 'uncurl-moe[lm-eval]'``).

    uncurl eval  --model DIR --task lm-eval:arc_easy            # any task lm-eval knows, by name
    uncurl prune --model DIR --task lm-eval:./my_task.yaml ...   # a local lm-eval task file
    uncurl prune --task superglue-rte --calibrate-on lm-eval:hellaswag=1,superglue-rte=1 ...

lm-eval builds each document's prompt (its ``doc_to_text``, description and ``target_delimiter``,
zero-shot) and answer choices (``doc_to_choice``, ``doc_to_target``); uncurl scores them in memory
with its own scorer (``evaluate.py``, the same log-likelihoods lm-eval computes) and calibrates on
them. ``multiple_choice`` tasks give ``acc``/``acc_norm``/``loss``; ``generate_until`` tasks with an
``exact_match`` metric give ``exact_match`` (greedy generations, lm-eval's stop strings, filters and
exact-match options: generate.py) and the loss; other output types give text (prompt + target):
calibration, and the loss in evaluation.

Splits: evaluation reads lm-eval's evaluation documents (test, else validation); calibration reads
the training documents, else the validation ones when evaluation reads test, else fixed seeded
disjoint halves of the evaluation documents.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from . import DISTRIBUTION, tasks as T
from .errors import UncurlError

log = logging.getLogger(__name__)

PREFIX = "lm-eval:"
_DOCS = {"train": "training_docs", "validation": "validation_docs", "test": "test_docs"}


def _import():
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise UncurlError(f"lm-eval tasks need lm-evaluation-harness, an optional extra: pip install "
                          f"'{DISTRIBUTION}[lm-eval]' (or pip install lm-eval)") from None
    return lm_eval.tasks


@functools.lru_cache(maxsize=8)
def _lm_task(spec: str, flag: str = "--task"):
    """lm-eval's task object for ``NAME`` or a local task ``.yaml`` (its folder is included)."""
    lm_tasks = _import()
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise UncurlError(f"{flag} {PREFIX}{spec}: no such lm-eval task file")
        import yaml

        try:  # lm-eval's own tags (!function) need its loader; the name is all we read here
            name = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader).get("task")
        except Exception as err:
            raise UncurlError(f"lm-eval task file {path} is not valid YAML ({err})") from None
        if not name:
            raise UncurlError(f"lm-eval task file {path} has no 'task:' name")
        manager = lm_tasks.TaskManager(include_path=str(path.resolve().parent), include_defaults=False)
    else:
        name = spec
        manager = lm_tasks.TaskManager()  # indexes lm-eval's own task files (slow the first time)
    if name not in manager.all_tasks:
        raise UncurlError(f"lm-eval does not know a task {name!r}; `lm_eval ls tasks` lists them")
    try:
        task = lm_tasks.get_task_dict([name], manager)[name]
    except Exception as err:  # the dataset could not be loaded (offline, bad path, ...)
        raise UncurlError(f"lm-eval task {name}: could not load its documents ({type(err).__name__}: {err}); "
                          f"offline, point a local lm-eval task file at files on disk") from None
    if not hasattr(task, "doc_to_text"):
        raise UncurlError(f"lm-eval {name!r} is a group of tasks; name one of its tasks")
    return task


def _sources(task) -> dict[str, str]:
    """Our split -> lm-eval's documents (the same for both: halves)."""
    evaluation = "test" if task.has_test_docs() else "validation" if task.has_validation_docs() else None
    if evaluation is None:
        raise UncurlError(f"lm-eval task {task.config.task} has no test or validation documents")
    if task.has_training_docs():
        calibration = "train"
    elif evaluation == "test" and task.has_validation_docs():
        calibration = "validation"
    else:
        calibration = evaluation
    return {"calibration": calibration, "evaluation": evaluation}


def _example(task, doc: dict) -> T.Example:
    prompt = task.fewshot_context(doc, num_fewshot=0)
    delimiter = task.config.target_delimiter
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = [str(c) for c in task.doc_to_choice(doc)]
        if isinstance(target, list):
            raise UncurlError(f"lm-eval gold {target!r} names several answers; uncurl scores one gold per document")
        gold = T.gold_index(target, choices)
        return T.Example(prompt, tuple(delimiter + c for c in choices), gold)
    if _generation(task) is not None:
        if task.config.doc_to_choice is not None:  # lm-eval: the target is then an index into the choices
            target = task.doc_to_choice(doc)[target]
        answers = tuple(str(t) for t in target) if isinstance(target, list) else (str(target),)
        return T.Example(prompt, answers=answers or ("",))
    if isinstance(target, list):
        target = target[0] if target else ""
    if task.OUTPUT_TYPE == "loglikelihood_rolling":
        return T.Example(str(target))
    return T.Example(prompt + delimiter + str(target))


def _generation(task):
    """A generate_until task scored by exact_match as generate.Generation (its generation_kwargs, filter_list
    and exact_match options); None for other tasks, which give text (the loss) as before."""
    config = task.config
    metrics = [m for m in (config.metric_list or []) if m.get("metric") == "exact_match"]
    if task.OUTPUT_TYPE != "generate_until" or not metrics:
        return None
    from .generate import DEFAULT_MAX_GEN_TOKS, Filter, Generation

    kwargs = dict(config.generation_kwargs or {})
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
        raise UncurlError(f"lm-eval task {config.task} samples (do_sample/temperature); uncurl scores greedy "
                          f"generations only")
    until = kwargs.get("until") or []
    until = (until,) if isinstance(until, str) else tuple(until)
    n = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens") if k in kwargs),
             DEFAULT_MAX_GEN_TOKS)
    filters = []
    for entry in config.filter_list or []:
        steps = tuple((step["function"], tuple((k, v) for k, v in step.items() if k != "function"))
                      for step in entry["filter"])
        filters.append(Filter(entry["name"], steps))
    options = metrics[0]
    regexes = options.get("regexes_to_ignore") or ()
    try:
        return Generation(until=until, max_gen_toks=int(n), filters=tuple(filters) or (Filter(),),
                          ignore_case=bool(options.get("ignore_case", False)),
                          ignore_punctuation=bool(options.get("ignore_punctuation", False)),
                          ignore_numbers=bool(options.get("ignore_numbers", False)),
                          regexes_to_ignore=(regexes,) if isinstance(regexes, str) else tuple(regexes))
    except UncurlError as err:
        raise UncurlError(f"lm-eval task {config.task}: {err}") from None


def lmeval_task(spec: str, flag: str = "--task") -> T.Task:
    """An uncurl task over lm-eval's task ``spec`` (``lm-eval:NAME`` or ``lm-eval:PATH.yaml``)."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if not body:
        raise UncurlError(f"{flag} {spec!r}: expected lm-eval:TASK or lm-eval:PATH/TO/TASK.yaml")
    task = _lm_task(body, flag)
    sources = _sources(task)

    def read(split: str) -> list[tuple[str, dict[str, Any]]]:
        docs = getattr(task, _DOCS[sources[split]])()
        return [(f"document {n}", dict(doc)) for n, doc in enumerate(docs)]

    same = sources["calibration"] == sources["evaluation"]
    return T.Task(f"{PREFIX}{task.config.task}",
                  f"lm-eval task {task.config.task} ({task.OUTPUT_TYPE}; calibration: {sources['calibration']}, "
                  f"evaluation: {sources['evaluation']} documents{', seeded disjoint halves' if same else ''})",
                  hub=("", None), hub_splits={}, local_files={}, to_example=functools.partial(_example, task),
                  n_choices=None if task.OUTPUT_TYPE == "multiple_choice" else 0, read_docs=read, halve_docs=same,
                  generation=_generation(task))
