"""The command line: a thin layer over ``uncurl.pipeline``.

    uncurl prune --model builtin:mixtral --task superglue-rte --keep 4 --data-dir ../shared/data --out runs/k4
    uncurl profile --model ./olmoe --task arc-easy --out arc.profile
    uncurl tasks
    uncurl families
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UncurlError

app = typer.Typer(
    help=(
        "Make a smaller sparse Mixture-of-Experts model for one task: profile the routers on the "
        "task's data, cluster experts by routing behaviour and merge each cluster into one expert "
        "(UNCURL), then save a checkpoint that transformers loads. Exit codes: 0 ok, 1 internal "
        "error, 2 bad input, 3 the written checkpoint failed its checks."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)

MODEL, DATA, PRUNE, RUN = "Model", "Task data", "Pruning", "Run"

Model = Annotated[str, typer.Option(
    "--model", "-m", rich_help_panel=MODEL,
    help="Hub id (ORG/NAME), local transformers folder, or builtin:<family> for a seeded tiny random "
         "model (no files, no network; see `uncurl families`).")]
Task = Annotated[str, typer.Option(
    "--task", "-t", rich_help_panel=DATA,
    help="Registered task (see `uncurl tasks`) or a local .jsonl/.csv file used with --template.")]
DataDir = Annotated[Optional[str], typer.Option(
    "--data-dir", rich_help_panel=DATA, envvar="UNCURL_DATA_DIR",
    help="Read tasks from local files laid out as ../shared/data instead of the Hub.")]
Samples = Annotated[int, typer.Option(
    rich_help_panel=DATA, min=1,
    help="Calibration examples to profile: a seeded random subset of the task's calibration split "
         "(all of it when smaller). Profiling time grows linearly with it; memory does not.")]
MaxLength = Annotated[int, typer.Option(rich_help_panel=DATA, min=8, help="Truncate each example to this many tokens.")]
BatchSize = Annotated[int, typer.Option(rich_help_panel=DATA, min=1, help="Examples per forward pass.")]
Template = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="Custom tasks: a Python format string over a row's fields, e.g. '{question}\\nAnswer:'.")]
Choices = Annotated[Optional[str], typer.Option(
    rich_help_panel=DATA, help="Custom tasks: comma-separated answer choices, e.g. 'yes,no'.")]
LabelField = Annotated[str, typer.Option(rich_help_panel=DATA, help="Custom tasks: the field holding the gold choice.")]
Seed = Annotated[int, typer.Option(rich_help_panel=RUN, help="Seed for sampling, tiny models and clustering.")]
Device = Annotated[str, typer.Option(rich_help_panel=RUN, help="auto (CUDA when present), cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(rich_help_panel=RUN, help="auto (the checkpoint's own), float32, bfloat16, float16.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", rich_help_panel=RUN, help="Log each step.")]


def _data_options(task, data_dir, samples, max_length, batch_size, template, choices, label_field) -> dict:
    return dict(task=task, data_dir=data_dir, samples=samples, max_length=max_length, batch_size=batch_size,
                template=template, choices=tuple(c.strip() for c in choices.split(",")) if choices else None,
                label_field=label_field)


def _handled(fn):
    """Turn an UncurlError into a one-line message and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UncurlError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _command_line(ctx: typer.Context) -> str:
    """The running command with every option spelled out (defaults included): rerunnable as is."""
    import shlex

    words = ["uncurl", ctx.info_name]
    for name, value in ctx.params.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value not in (None, False):
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
    method: Annotated[str, typer.Option(rich_help_panel=PRUNE,
                                        help="uncurl: spectral clustering on router-logit similarity, then "
                                             "frequency-weighted merging. frequency: keep the K most-used experts.")] = "uncurl",
    router_rows: Annotated[str, typer.Option(rich_help_panel=PRUNE,
                                             help="A merged expert's router row: mean (same frequency-weighted "
                                                  "mean as its experts) or dominant (its most-used member's row).")] = "mean",
    top_k: Annotated[Optional[int], typer.Option(rich_help_panel=PRUNE,
                                                 help="Lower the router's top-k explicitly (default: unchanged).")] = None,
    profile: Annotated[Optional[str], typer.Option(rich_help_panel=PRUNE,
                                                   help="Reuse a profile written by `uncurl profile` (skips the forward pass).")] = None,
    overwrite: Annotated[bool, typer.Option(rich_help_panel=PRUNE, help="Replace a non-empty --out.")] = False,
    shard_size: Annotated[str, typer.Option(rich_help_panel=PRUNE,
                                            help="Largest safetensors shard, e.g. 5GB or 500MB; bigger "
                                                 "checkpoints get an index file.")] = "5GB",
    data_dir: DataDir = None,
    samples: Samples = 256,
    max_length: MaxLength = 512,
    batch_size: BatchSize = 8,
    template: Template = None,
    choices: Choices = None,
    label_field: LabelField = "label",
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    verbose: Verbose = False,
):
    """Prune/merge a model's experts down to --keep per layer for one task, and write a report.

    Example: uncurl prune --model builtin:mixtral --task superglue-rte --keep 4 --data-dir ../shared/data --out runs/k4
    """
    from .pipeline import PruneOptions, prune as run

    _setup_logging(verbose)
    opts = PruneOptions(
        model=model, keep=keep, out=out, method=method, router_rows=router_rows, top_k=top_k, profile=profile,
        overwrite=overwrite, shard_size=shard_size, seed=seed, device=device, dtype=dtype, progress=err.is_terminal,
        extra={"command": _command_line(ctx)},
        **_data_options(task, data_dir, samples, max_length, batch_size, template, choices, label_field),
    )
    result = run(opts)
    _summary(result.report)
    typer.echo(str(result.out / "report" / "report.md"))


def _summary(r: dict) -> None:
    m = r["model"]
    table = Table(title=f"uncurl {r['method']}: {m['id']} on {r['task']['name']}", show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("experts / MoE layer", str(m["experts_before"]), str(m["experts_after"]))
    table.add_row("top-k", str(m["top_k_before"]), str(m["top_k_after"]))
    table.add_row("parameters", f"{m['params_before']:,}", f"{m['params_after']:,}")
    table.add_row("weight MB", f"{m['bytes_before'] / 1e6:.1f}", f"{m['bytes_after'] / 1e6:.1f}")
    err.print(table)
    err.print(f"{len(r['layers'])} MoE layers, {r['task']['tokens']:,} calibration tokens; "
              f"checkpoint reloaded and checked. Output: {r['output']}")


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
    label_field: LabelField = "label",
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    verbose: Verbose = False,
):
    """Record router statistics on a task's calibration data; `prune --profile FILE` reuses them.

    Example: uncurl profile --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte.profile
    """
    from .load import load_model
    from .pipeline import DataOptions, resolve_task, run_profile

    _setup_logging(verbose)
    opts = DataOptions(**_data_options(task, data_dir, samples, max_length, batch_size, template, choices, label_field))
    opts.progress = err.is_terminal
    resolve_task(opts)
    loaded = load_model(model, device=device, dtype=dtype, seed=seed)
    path = run_profile(loaded, opts, seed).save(out)
    typer.echo(str(path))


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


@app.command()
def families():
    """List the supported MoE families and where each keeps its router and experts."""
    from .adapters import ADAPTERS

    table = Table(show_header=True)
    for col in ("model_type", "expert count key", "router", "per-expert router tensors", "left untouched"):
        table.add_column(col)
    for a in ADAPTERS.values():
        table.add_row(a.model_type, a.expert_count_key, a.router_attr, ", ".join(a.router_tensors),
                      ", ".join(a.shared_attrs) or "-")
    Console().print(table)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
