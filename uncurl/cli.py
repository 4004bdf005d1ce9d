"""The command line: a thin layer over ``uncurl.pipeline``.

    uncurl prune --model builtin:mixtral --task superglue-rte --keep 4 --data-dir ../shared/data --out runs/k4
    uncurl profile --model ./olmoe --task arc-easy --out arc.profile
    uncurl tasks
    uncurl families
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cluster import METHODS
from .errors import EXIT_GATE, UncurlError
from .merge import MERGE_RULES, ROUTER_RULES
from .pipeline import DEFAULT_MERGE, DEFAULT_METHOD, DEFAULT_ROUTER, STUDY_EVIDENCE

UsageError = typer.BadParameter.__base__  # typer vendors click: its UsageError, base of BadParameter


class Commands(typer.core.TyperGroup):
    """Typer's command group, with a bad option value said as every other bad input is: one line,
    naming the option and the value (typer's own message, from pydantic, leaves the value out), exit 2."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            message = e.format_message()
            if isinstance(e, typer.BadParameter) and e.param is not None:
                flag = next((o for o in e.param.opts if o.startswith("--")), e.param.opts[0])
                errors = getattr(e.__cause__, "errors", lambda: [])()  # pydantic's ValidationError
                value = errors[0].get("input") if errors else None
                message = f"{flag} {value!r}: {e.message}" if value is not None else f"{flag}: {e.message}"
            where = e.ctx.command_path if e.ctx is not None else "uncurl"
            err.print(Text.assemble(("error:", "bold red"), f" {message} (see {where} --help)"), soft_wrap=True)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    cls=Commands,
    help=(
        "Make a smaller sparse Mixture-of-Experts model for one task: profile routers and experts on "
        "the task's data, then keep the best-scoring experts (REAP, EAN, frequency) or cluster them by "
        "routing behaviour and merge each cluster into one expert (UNCURL), then save a checkpoint "
        "that transformers loads. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 the written "
        "checkpoint failed its checks."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)

MODEL, DATA, PRUNE, EVAL, RUN = "Model", "Task data", "Pruning", "Evaluation and gate", "Run"

Model = Annotated[str, typer.Option(
    "--model", "-m", rich_help_panel=MODEL,
    help="Hub id (ORG/NAME), local transformers folder, or builtin:<family> for a seeded tiny random "
         "model (no files, no network; see `uncurl families`).")]
Task = Annotated[str, typer.Option(
    "--task", "-t", rich_help_panel=DATA,
    help="What to calibrate and evaluate on: a registered task (see `uncurl tasks`); hf:ORG/NAME[:CONFIG], a "
         "Hub dataset read with datasets.load_dataset (with --template; splits: --calibration-split, "
         "--evaluation-split); lm-eval:TASK or lm-eval:FILE.yaml, an lm-evaluation-harness task (optional "
         "extra: pip install 'uncurl\\[lm-eval]'); a task file (.yaml/.json: template, choices, label field, files or Hub id; see "
         "README); or a .jsonl/.csv file with --template (one file: fixed seeded disjoint halves calibrate "
         "and evaluate; see --eval-file).")]
DataDir = Annotated[Optional[str], typer.Option(
    "--data-dir", rich_help_panel=DATA, envvar="UNCURL_DATA_DIR",
    help="Read tasks from local files laid out as ../shared/data instead of the Hub.")]
Samples = Annotated[int, typer.Option(
    rich_help_panel=DATA, min=1,
    help="Calibration examples to profile: a seeded random subset of the task's calibration split "
         "(all of it when smaller). Profiling time grows linearly with it; memory does not.")]
MaxLength = Annotated[int, typer.Option(
    rich_help_panel=DATA, min=8,
    help="Calibration: truncate each example to this many tokens (evaluation has --eval-max-length).")]
EvalMaxLength = Annotated[int, typer.Option(
    rich_help_panel=EVAL, min=8,
    help="Evaluation: keep at most this many tokens of each sequence (from the right; the answer is never cut).")]
BatchSize = Annotated[int, typer.Option(rich_help_panel=DATA, min=1, help="Examples per forward pass.")]
Template = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="Custom and hf: tasks: a Python format string over a row's fields, e.g. '{question}\\nAnswer:'.")]
Choices = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="Custom and hf: tasks: comma-separated answer choices, the same for every row, e.g. 'yes,no'.")]
ChoicesField = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="Custom and hf: tasks: the field holding each row's own list of choices "
                               "(in a .csv cell, a JSON array), instead of --choices.")]
LabelField = Annotated[str, typer.Option(
    rich_help_panel=DATA, help="Custom and hf: tasks: the field holding the gold answer: an index, one of the "
                               "choices, or a JSON boolean (a choice spelled true/false, else false=0, true=1).")]
EvalFile = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="Custom .jsonl/.csv tasks: evaluate on this file and calibrate on all of --task's "
                               "(default: fixed seeded disjoint halves of the one file; the same file: both read all).")]
CalibrationSplit = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="hf: tasks: the Hub split to calibrate on (default train).")]
EvaluationSplit = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="hf: tasks: the Hub split to evaluate on (default validation; the same as "
                               "--calibration-split: fixed seeded disjoint halves of it).")]
ChatTemplate = Annotated[bool, typer.Option(
    rich_help_panel=DATA, help="Wrap each calibration and evaluation prompt as a user turn in the tokenizer's chat "
                               "template (instruction-tuned models); the answer follows the template directly, "
                               "as in lm-evaluation-harness. Recorded in the report.")]
Seed = Annotated[int, typer.Option(rich_help_panel=RUN, help="Seed for sampling, tiny models and clustering.")]
Device = Annotated[str, typer.Option(rich_help_panel=RUN, help="auto (CUDA when present), cpu, cuda, cuda:N.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    rich_help_panel=RUN,
    help="Place a model too big for one GPU with accelerate: auto, balanced, balanced_low_0 or "
         "sequential. Layers fill the GPUs, then CPU memory, then disk; each layer is merged where it "
         "lives, offloaded ones one tensor at a time. See --max-memory.")]
MaxMemory = Annotated[Optional[str], typer.Option(
    rich_help_panel=RUN,
    help="With --device-map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=60GiB'. What does not fit is "
         "offloaded to CPU memory, then to a temporary folder on disk (under $TMPDIR; deleted at exit).")]
Dtype = Annotated[str, typer.Option(rich_help_panel=RUN, help="auto (the checkpoint's own), float32, bfloat16, float16.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", rich_help_panel=RUN, help="Log each step.")]
Json = Annotated[bool, typer.Option("--json", rich_help_panel=RUN,
                                    help="Print a machine-readable summary on stdout (human output goes to stderr).")]
EvalLimit = Annotated[Optional[int], typer.Option(
    "--eval-limit", "--limit", rich_help_panel=EVAL, min=1,
    help="Evaluation examples: a seeded subset of the evaluation split (default: all of it).")]
Metric = Annotated[str, typer.Option(rich_help_panel=EVAL,
                                     help="Metric a drop is measured on: acc, acc_norm (points of accuracy) or "
                                          "loss (its increase in percent).")]
CalibrateOn = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA,
    help="Profile on other tasks' calibration splits instead of --task's: one task (e.g. corpus, for "
         "task-agnostic calibration) or a weighted mix, e.g. 'superglue-rte=3,corpus=1' (--samples split "
         "3:1). Each part is recorded in the report and the profile.")]


def _choices(registry: dict, extra=lambda spec: "") -> str:
    """The help text of a registry-backed option: every name with its one-line description."""
    return " ".join(f"[bold]{name}[/]: {spec.help}{extra(spec)}." for name, spec in registry.items())


METHOD_HELP = ("How experts are chosen or grouped. " + _choices(
    METHODS, lambda m: " (pruning: each kept expert alone)" if m.kind == "criterion" else " (groups, merged by --merge)")
    + " " + STUDY_EVIDENCE)
MERGE_HELP = ("How a group of several experts becomes one (pruning criteria keep singletons, which are "
              "copied as they are). " + _choices(MERGE_RULES))
ROUTER_HELP = "A merged expert's router row. " + _choices(ROUTER_RULES)


def _data_options(params: dict) -> dict:
    """The command's parameters that are :class:`~uncurl.pipeline.DataOptions` fields (by name)."""
    from dataclasses import fields

    from .pipeline import DataOptions

    names = {f.name for f in fields(DataOptions)}
    out = {k: v for k, v in params.items() if k in names}
    if out.get("choices"):
        out["choices"] = tuple(c.strip() for c in out["choices"].split(","))
    return {**out, "progress": err.is_terminal}


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UncurlError(f"{flag} {text!r} must be comma-separated integers, e.g. 6,4,2") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _emit_json(payload: dict) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _handled(fn):
    """Turn an UncurlError into a one-line message and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UncurlError as e:
            # one line (a library's multi-line message folded in), and a Text, not markup: brackets in a
            # user's value ([a b], a path with [bold]) print as they are
            line = re.sub(r"\s*\n\s*", " ", str(e)).strip()
            err.print(Text.assemble(("error:", "bold red"), f" {line}"), highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _command_line(ctx: typer.Context) -> str:
    """The running command with every option spelled out (defaults included): rerunnable as is.

    Spelled with the CLI's own option names (click's declarations), so ``--eval`` and ``--json``
    come out as typed, never as the Python parameter names behind them.
    """
    import shlex

    words = ["uncurl", ctx.info_name]
    for param in ctx.command.params:
        if getattr(param, "param_type_name", "") != "option" or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if param.is_flag:
            if value is True:
                words.append(flag)
            elif value is False and param.default is True and param.secondary_opts:
                words.append(param.secondary_opts[0])
        elif value is not None:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@app.command()
@_handled
def prune(
    ctx: typer.Context,
    model: Model = "builtin:mixtral",
    task: Task = "superglue-rte",
    keep: Annotated[int, typer.Option(
        "--keep", "-k", rich_help_panel=PRUNE,
        help="Experts to keep per MoE layer (>= top-k; a multiple of n_group for grouped routers). "
             "Equal to the expert count reproduces the model exactly.")] = 4,
    out: Annotated[str, typer.Option("--out", "-o", rich_help_panel=PRUNE,
                                     help="Output folder: checkpoint + report/. Written whole or not at all.")] = "pruned",
    method: Annotated[str, typer.Option(rich_help_panel=PRUNE, help=METHOD_HELP)] = DEFAULT_METHOD,
    merge: Annotated[str, typer.Option(rich_help_panel=PRUNE, help=MERGE_HELP)] = DEFAULT_MERGE,
    router_rows: Annotated[str, typer.Option("--router", "--router-rows", rich_help_panel=PRUNE,
                                             help=ROUTER_HELP)] = DEFAULT_ROUTER,
    top_k: Annotated[Optional[int], typer.Option(rich_help_panel=PRUNE,
                                                 help="Lower the router's top-k explicitly (default: unchanged).")] = None,
    profile: Annotated[Optional[str], typer.Option(rich_help_panel=PRUNE,
                                                   help="Reuse a profile written by `uncurl profile` (skips the forward pass).")] = None,
    overwrite: Annotated[bool, typer.Option(rich_help_panel=PRUNE, help="Replace a non-empty --out.")] = False,
    shard_size: Annotated[str, typer.Option(rich_help_panel=PRUNE,
                                            help="Largest safetensors shard, e.g. 5GB or 500MB; bigger "
                                                 "checkpoints get an index file.")] = "5GB",
    plots: Annotated[bool, typer.Option(rich_help_panel=PRUNE,
                                        help="Draw report/usage.png and report/groups.png (expert usage and "
                                             "group maps); --no-plots skips matplotlib, e.g. in a CI gate.")] = True,
    data_dir: DataDir = None,
    samples: Samples = 256,
    max_length: MaxLength = 512,
    batch_size: BatchSize = 8,
    template: Template = None,
    choices: Choices = None,
    choices_field: ChoicesField = None,
    label_field: LabelField = "label",
    eval_file: EvalFile = None,
    calibration_split: CalibrationSplit = None,
    evaluation_split: EvaluationSplit = None,
    chat_template: ChatTemplate = False,
    calibrate_on: CalibrateOn = None,
    evaluate: Annotated[bool, typer.Option("--eval", rich_help_panel=EVAL,
                                           help="Evaluate the task before and after pruning; both go in the report.")] = False,
    eval_limit: EvalLimit = None,
    eval_max_length: EvalMaxLength = 1024,
    metric: Metric = "acc",
    max_drop: Annotated[Optional[float], typer.Option(
        rich_help_panel=EVAL,
        help="CI gate (implies --eval): exit 4 when --metric drops by more than this many points. "
             "The checkpoint and report are still written.")] = None,
    seed: Seed = 0,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    dtype: Dtype = "auto",
    as_json: Json = False,
    verbose: Verbose = False,
):
    """Prune/merge a model's experts down to --keep per layer for one task, and write a report.

    Example: uncurl prune --model builtin:mixtral --task superglue-rte --keep 4 --data-dir ../shared/data --out runs/k4
    """
    from .pipeline import PruneOptions, prune as run

    _setup_logging(verbose)
    opts = PruneOptions(
        model=model, keep=keep, out=out, method=method, merge=merge, router_rows=router_rows, top_k=top_k,
        profile=profile,
        overwrite=overwrite, shard_size=shard_size, plots=plots, seed=seed, device=device, device_map=device_map, max_memory=max_memory, dtype=dtype,
        eval=evaluate, eval_limit=eval_limit, metric=metric, max_drop=max_drop,
        extra={"command": _command_line(ctx)},
        **_data_options(locals()),
    )
    result = run(opts)
    _summary(result.report)
    r = result.report
    if as_json:
        _emit_json({"output": r["output"], "report": str(result.out / "report" / "report.json"),
                    "model": r["model"], "task": r["task"]["name"], "method": r["method"], "keep": r["keep"],
                    "eval": r.get("eval"), "gate": r.get("gate"),
                    "exit_code": 0 if result.gate_passed else EXIT_GATE})
    else:
        typer.echo(str(result.out / "report" / "report.md"))
    if not result.gate_passed:
        g = r["gate"]
        err.print(f"[bold red]gate failed:[/] {g['metric']} dropped by {g['drop']} points (bound {g['max_drop']})")
        raise typer.Exit(EXIT_GATE)


def _summary(r: dict) -> None:
    m = r["model"]
    table = Table(title=Text(f"uncurl {r['method']}: {m['id']} on {r['task']['name']}"), show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("experts / MoE layer", str(m["experts_before"]), str(m["experts_after"]))
    table.add_row("top-k", str(m["top_k_before"]), str(m["top_k_after"]))
    table.add_row("parameters", f"{m['params_before']:,}", f"{m['params_after']:,}")
    table.add_row("weight MB", f"{m['bytes_before'] / 1e6:.1f}", f"{m['bytes_after'] / 1e6:.1f}")
    if "eval" in r:
        ev = r["eval"]
        for metric in ("acc", "acc_norm", "loss"):
            if metric in ev["before"]:
                table.add_row(Text(f"{ev['before']['task']} {metric}"), f"{ev['before'][metric]:.4f}",
                              f"{ev['after'][metric]:.4f}")
    err.print(table)
    err.print(f"{len(r['layers'])} MoE layers, {r['task']['tokens']:,} calibration tokens; "
              f"checkpoint reloaded and checked. Output: {r['output']}", markup=False)


@app.command("profile")
@_handled
def profile_cmd(
    model: Model = "builtin:mixtral",
    task: Task = "superglue-rte",
    out: Annotated[str, typer.Option("--out", "-o", help="Profile file to write (safetensors).")] = "profile.safetensors",
    data_dir: DataDir = None,
    samples: Samples = 256,
    max_length: MaxLength = 512,
    batch_size: BatchSize = 8,
    template: Template = None,
    choices: Choices = None,
    choices_field: ChoicesField = None,
    label_field: LabelField = "label",
    eval_file: EvalFile = None,
    calibration_split: CalibrationSplit = None,
    evaluation_split: EvaluationSplit = None,
    chat_template: ChatTemplate = False,
    calibrate_on: CalibrateOn = None,
    seed: Seed = 0,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    dtype: Dtype = "auto",
    verbose: Verbose = False,
):
    """Record router statistics on a task's calibration data; `prune --profile FILE` reuses them.

    Example: uncurl profile --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte.profile
    """
    from .load import load_model
    from .pipeline import DataOptions, check_data, run_profile
    from .report import Timings

    _setup_logging(verbose)
    opts = DataOptions(**_data_options(locals()))
    check_data(opts, calibrating=True, evaluating=False, seed=seed)  # before the model is loaded
    stages = Timings()
    with stages.stage("load"):
        loaded = load_model(model, device=device, dtype=dtype, seed=seed, device_map=device_map, max_memory=max_memory)
    with stages.stage("profile"):
        path = run_profile(loaded, opts, seed).save(out)
    typer.echo(str(path))


@app.command("eval")
@_handled
def eval_cmd(
    model: Model = "builtin:mixtral",
    task: Task = "superglue-rte",
    data_dir: DataDir = None,
    limit: EvalLimit = None,
    max_length: Annotated[int, typer.Option(rich_help_panel=DATA, min=8,
                                            help="Keep at most this many tokens of each sequence (from the right).")] = 1024,
    batch_size: BatchSize = 8,
    template: Template = None,
    choices: Choices = None,
    choices_field: ChoicesField = None,
    label_field: LabelField = "label",
    eval_file: EvalFile = None,
    calibration_split: CalibrationSplit = None,
    evaluation_split: EvaluationSplit = None,
    chat_template: ChatTemplate = False,
    seed: Seed = 0,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    dtype: Dtype = "auto",
    as_json: Json = False,
    verbose: Verbose = False,
):
    """Score a task's evaluation split as lm-evaluation-harness does: acc, acc_norm, loss, ppl.

    Example: uncurl eval --model runs/k4 --task superglue-rte --data-dir ../shared/data --limit 200
    """
    from .load import load_model
    from .pipeline import DataOptions, check_data, run_eval
    from .report import Timings

    _setup_logging(verbose)
    opts = DataOptions(**_data_options(locals()), samples=1, eval_max_length=max_length)
    check_data(opts, calibrating=False, evaluating=True, eval_limit=limit, seed=seed)  # before the model
    stages = Timings()
    with stages.stage("load"):
        loaded = load_model(model, device=device, dtype=dtype, seed=seed, device_map=device_map,
                            max_memory=max_memory, moe=False)  # any causal LM: evaluation needs no MoE
    with stages.stage("eval"):
        metrics = {"model": model, **run_eval(loaded.model, loaded.tokenizer, opts, limit, seed)}
    if as_json:
        _emit_json(metrics)
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in metrics.items()))


@app.command("sweep")
@_handled
def sweep_cmd(
    ctx: typer.Context,
    model: Model = "builtin:mixtral",
    task: Task = "superglue-rte",
    keep: Annotated[str, typer.Option("--keep", "-k", rich_help_panel=PRUNE,
                                      help="Comma-separated K values to try, e.g. 6,4,2.")] = "6,4,2",
    method: Annotated[str, typer.Option(rich_help_panel=PRUNE,
                                        help="Comma-separated methods (see prune --help): "
                                             + ", ".join(METHODS) + ".")] = f"{DEFAULT_METHOD},frequency",
    merge: Annotated[str, typer.Option(rich_help_panel=PRUNE,
                                       help="Comma-separated merge rules for grouping methods: "
                                            + ", ".join(MERGE_RULES) + ".")] = DEFAULT_MERGE,
    out: Annotated[str, typer.Option("--out", "-o", rich_help_panel=PRUNE,
                                     help="Output folder: sweep.json, sweep.md, sweep.png (+ checkpoints/).")] = "sweep",
    router_rows: Annotated[str, typer.Option("--router", "--router-rows", rich_help_panel=PRUNE,
                                             help="Comma-separated router rules for grouping methods: "
                                                  + ", ".join(ROUTER_RULES) + ".")] = DEFAULT_ROUTER,
    top_k: Annotated[Optional[int], typer.Option(rich_help_panel=PRUNE, help="Lower the router's top-k.")] = None,
    profile: Annotated[Optional[str], typer.Option(rich_help_panel=PRUNE, help="Reuse a profile file.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(rich_help_panel=PRUNE,
                                                   help="Also save every pruned checkpoint (disk!).")] = False,
    overwrite: Annotated[bool, typer.Option(rich_help_panel=PRUNE, help="Replace a non-empty --out.")] = False,
    tolerance: Annotated[float, typer.Option(rich_help_panel=EVAL,
                                             help="Largest acceptable drop in --metric, in points.")] = 1.0,
    metric: Metric = "acc",
    eval_limit: EvalLimit = None,
    eval_max_length: EvalMaxLength = 1024,
    data_dir: DataDir = None,
    samples: Samples = 256,
    max_length: MaxLength = 512,
    batch_size: BatchSize = 8,
    template: Template = None,
    choices: Choices = None,
    choices_field: ChoicesField = None,
    label_field: LabelField = "label",
    eval_file: EvalFile = None,
    calibration_split: CalibrationSplit = None,
    evaluation_split: EvaluationSplit = None,
    chat_template: ChatTemplate = False,
    calibrate_on: CalibrateOn = None,
    seed: Seed = 0,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    dtype: Dtype = "auto",
    as_json: Json = False,
    verbose: Verbose = False,
):
    """Profile once, then prune and evaluate every (method, K); name the threshold K per method.

    Example: uncurl sweep --model DIR --task superglue-rte --keep 6,4,2 --method uncurl,frequency --data-dir ../shared/data
    """
    from .sweep import SweepOptions, sweep

    _setup_logging(verbose)
    opts = SweepOptions(
        model=model, keeps=_ints(keep, "--keep"), methods=_names(method), merges=_names(merge),
        routers=_names(router_rows), out=out, top_k=top_k, profile=profile, keep_checkpoints=keep_checkpoints,
        overwrite=overwrite, tolerance=tolerance, metric=metric, eval_limit=eval_limit, seed=seed, device=device,
        device_map=device_map, max_memory=max_memory, dtype=dtype, extra={"command": _command_line(ctx)},
        **_data_options(locals()),
    )
    s = sweep(opts)
    table = Table(title=Text(f"sweep: {model} on {s['unpruned']['task']} ({s['metric']})"))
    for col in ("method", "K", s["metric"], "loss", "drop"):
        table.add_column(col, justify="right")
    table.add_row("unpruned", str(s["unpruned"]["keep"]), str(s["unpruned"].get(s["metric"])),
                  f"{s['unpruned']['loss']:.4f}", "-")
    for r in s["results"]:
        table.add_row(r["label"], str(r["keep"]), str(r.get(s["metric"])), f"{r['loss']:.4f}",
                      str(r["drop"][s["metric"]]))
    err.print(table)
    err.print("threshold: " + ", ".join(f"{m} K={k}" for m, k in s["threshold"].items()))
    if as_json:
        _emit_json({k: s[k] for k in ("output", "metric", "tolerance", "threshold", "unpruned", "results")})
    else:
        typer.echo(str(Path(s["output"]) / "sweep.md"))


@app.command()
def tasks():
    """List the registered tasks (no model is loaded)."""
    from .tasks import describe_tasks

    table = Table(show_header=True)
    for col in ("task", "choices", "hub dataset", "local files (under --data-dir)", "description"):
        table.add_column(col)
    for t in describe_tasks():
        table.add_row(t["name"], str(t["choices"]), str(t["hub"]), "\n".join(dict.fromkeys(t["local_files"].values())), t["description"])
    Console().print(table)
    Console().print("--task also takes: a .jsonl/.csv file with --template; a task file (.yaml/.json); "
                    "hf:ORG/NAME[:CONFIG] (a Hub dataset); lm-eval:TASK (lm-evaluation-harness, optional). See README.")


@app.command()
def families(
    markdown: Annotated[bool, typer.Option("--markdown", help="print the tables as Markdown (README's family "
                                           "table is this output)")] = False,
):
    """List the supported MoE families (transformers class, config keys, router, what is special)
    and the MoE families uncurl refuses, with the reason."""
    import transformers

    from .adapters import ADAPTERS, REFUSED, family_class, special

    supported = (
        f"{len(ADAPTERS)} supported MoE families",
        ("model_type", "transformers class", "experts / top-k keys", "router: per-expert tensors", "special"),
        [(name, family_class(name) or f"(not in transformers {transformers.__version__})",
          f"{a.expert_count_key} / {a.top_k_key}", f"{a.router_attr}: {', '.join(a.router_tensors)}",
          "; ".join(special(a)) or "-") for name, a in sorted(ADAPTERS.items())],
    )
    refused = (f"{len(REFUSED)} MoE families uncurl refuses (exit 2)", ("model_type", "why"), sorted(REFUSED.items()))
    for title, columns, rows in (supported, refused):
        if markdown:
            typer.echo(f"{title}:\n\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
            for row in rows:
                typer.echo("| " + " | ".join(f"`{row[0]}`" if i == 0 else cell for i, cell in enumerate(row)) + " |")
            typer.echo("")
            continue
        table = Table(show_header=True, title=title)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        Console().print(table)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
