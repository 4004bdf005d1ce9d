"""The command line: a thin layer over ``uncurl.pipeline``.

    uncurl prune --model builtin:mixtral --task superglue-rte --keep 4 --data-dir ../shared/data --out runs/k4
    uncurl profile --model ./olmoe --task arc-easy --out arc.profile
    uncurl tasks
    uncurl families
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import EXIT_GATE, Terminated, UncurlError
from .options import RUN, Option, markdown, markdown_besides, opt, options, parameters
from .pipeline import CostOptions, EvalOptions, ProfileOptions, PruneOptions, RunOptions
from .monitor import MonitorOptions
from .routes import RoutesOptions
from .sweep import SweepOptions

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
        "that transformers loads. Exit codes: 0 ok, 1 internal error, 2 bad input (nothing written), "
        "3 the written checkpoint failed its checks, 4 the --max-drop gate failed, 5 monitor's --min-coverage/--max-divergence "
        "gate failed, 128+N stopped by "
        "signal N (130 Ctrl-C, 143 SIGTERM; the unfinished output removed)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)


@dataclass
class Output:
    """The command line's own options (the Python API has no use for them)."""

    as_json: bool = opt(False, "--json", panel=RUN,
                        help="Print a machine-readable summary on stdout (human output goes to stderr).")
    verbose: bool = opt(False, "--verbose", "-v", panel=RUN, help="Log each step.")


OUTPUT = [f.name for f in fields(Output)]
COMMANDS: dict[str, tuple[type, list[str]]] = {}  # command -> (its options dataclass, the fields it takes, in order)


def command(name: str, cls: type, names: list[str]):
    """Register ``fn(ctx, opts, **output)`` as ``uncurl NAME``: its options are the fields ``names``
    of ``cls`` (and of :class:`Output`), generated from their metadata (``options.opt``) in that
    order; the command gets ``opts = cls(...)`` built from them, and ``Output``'s as keywords."""

    def decorate(fn):
        COMMANDS[name] = (cls, names)
        ours, cli = _options(name)

        def run(ctx: typer.Context, **given):
            opts = cls(**{o.name: o.value(given[o.name]) for o in ours}, progress=err.is_terminal)
            return fn(ctx, opts, **{o.name: given[o.name] for o in cli})

        ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        run.__signature__ = inspect.Signature([ctx_param, *parameters(command_options(name))])
        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        app.command(name)(_handled(run))
        return fn

    return decorate


def _options(name: str) -> tuple[list[Option], list[Option]]:
    """``uncurl NAME``'s options: those of its options dataclass, and those of :class:`Output`."""
    cls, names = COMMANDS[name]
    return (options(cls, name, [n for n in names if n not in OUTPUT]),
            options(Output, name, [n for n in names if n in OUTPUT]))


def command_options(name: str) -> list[Option]:
    """Every option of ``uncurl NAME``, in the order of its --help and its recorded command line."""
    by_name = {o.name: o for o in sum(_options(name), [])}
    return [by_name[n] for n in COMMANDS[name][1]]


# The options each command takes, in --help order (and the recorded command line's).
DATA_FIELDS = ["data_dir", "samples", "max_length", "batch_size", "template", "choices", "choices_field", "label_field",
               "eval_file", "calibration_split", "evaluation_split", "chat_template", "calibrate_on"]
RUN_FIELDS = ["seed", "device", "device_map", "max_memory", "dtype", "trust_remote_code"]
SERVING_FIELDS = ["gpu_memory", "context", "serving_batch", "measure_serving", "serving_repeats", "serving_seconds",
                  "decode_tokens"]


def _emit_json(payload: dict) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _handled(fn):
    """Turn an UncurlError (or a SIGTERM's Terminated) into a one-line message and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UncurlError, Terminated) as e:
            # one line (a library's multi-line message folded in), and a Text, not markup: brackets in a
            # user's value ([a b], a path with [bold]) print as they are
            line = re.sub(r"\s*\n\s*", " ", str(e)).strip()
            err.print(Text.assemble(("error:", "bold red"), f" {line}"), highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C: every cleanup has run on the way here; 128 + SIGINT, not click's 1
            err.print(Text.assemble(("error:", "bold red"), " stopped by SIGINT; the unfinished output was removed "
                                    "and --out is as it was"), highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

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


@command("prune", PruneOptions, [
    "model", "task", "keep", "out", "method", "merge", "router_rows", "protect_super_experts", "top_k", "profile", "overwrite", "shard_size",
    "dequantize", "plots", "recover", "recover_experts", "recover_local", *DATA_FIELDS, "eval", "eval_limit", "eval_max_length", "metric",
    "gen_tokens", "max_drop", *SERVING_FIELDS, *RUN_FIELDS, "pipeline", "calibrate_through", *OUTPUT])
def prune(ctx: typer.Context, opts: PruneOptions, as_json: bool, verbose: bool):
    """Prune/merge a model's experts down to --keep per layer for one task, and write a report.

    Example: uncurl prune --model builtin:mixtral --task superglue-rte --keep 4 --data-dir ../shared/data --out runs/k4
    """
    from .pipeline import prune as run

    _setup_logging(verbose)
    opts.extra["command"] = _command_line(ctx)
    result = run(opts)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
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


@command("profile", ProfileOptions, ["model", "task", "out", "overwrite", "shard", *DATA_FIELDS, *RUN_FIELDS,
                                     "pipeline", "verbose"])
def profile_cmd(ctx: typer.Context, opts: ProfileOptions, verbose: bool):
    """Record router statistics on a task's calibration data; `prune --profile FILE` reuses them.

    Example: uncurl profile --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte.profile
    """
    from . import distributed
    from .load import load_model
    from .output import library_caches
    from .pipeline import check_data, check_pipeline, loaded_inputs, parse_shard, run_inputs, run_profile
    from .profile import Profile
    from .report import Timings

    _setup_logging(verbose)
    check_pipeline(opts)
    parse_shard(opts.shard)
    check_data(opts, calibrating=True, evaluating=False, seed=opts.seed)  # before the model is loaded
    stages, leader = Timings(), not distributed.follower()
    # refused or held before the model is loaded; under torchrun by rank 0 only, which alone writes
    with Profile.claim(opts.out, overwrite=opts.overwrite, inputs=run_inputs(opts)) if leader else \
            library_caches() as output:
        with stages.stage("load"):
            loaded = load_model(opts.model, device=distributed.rank_device(opts.device), dtype=opts.dtype,
                                seed=opts.seed, device_map=opts.device_map, max_memory=opts.max_memory,
                                trust_remote_code=opts.trust_remote_code)
        if leader:
            output.check(loaded_inputs(loaded))  # not (in) what the model was read from
        with stages.stage("profile"):
            profile = run_profile(loaded, opts, opts.seed)
            if not leader:
                return
            path = profile.save(opts.out, overwrite=opts.overwrite)
    typer.echo(str(path))


@app.command("profile-merge")
@_handled
def profile_merge(
    out: Annotated[str, typer.Argument(help="Profile file to write (safetensors).")],
    shards: Annotated[list[str], typer.Argument(help="The N files of `uncurl profile --shard I/N`, I = 0..N-1.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier uncurl profile at OUT (nothing else).")] = False,
):
    """Add the shard profiles of a job array into the profile of all the calibration texts.

    Example: uncurl profile-merge rte.profile rte-0.profile rte-1.profile rte-2.profile
    """
    from .profile import Profile

    inputs = [("one of the shards it adds", Path(path), False) for path in shards if Path(path).exists()]
    with Profile.claim(out, overwrite=overwrite, inputs=inputs, flag="OUT"):  # never written over one of its shards
        profile = Profile.combine_shards([Profile.load(path, "shard") for path in shards], shards)
        profile.save(out, overwrite=overwrite)
    typer.echo(out)


@command("eval", EvalOptions, [
    "model", "task", "parent", "data_dir", "eval_limit", "eval_max_length", "batch_size", "template", "choices",
    "choices_field", "label_field", "eval_file", "calibration_split", "evaluation_split", "chat_template", "gen_tokens",
    *RUN_FIELDS, "pipeline", *OUTPUT])
def eval_cmd(ctx: typer.Context, opts: EvalOptions, as_json: bool, verbose: bool):
    """Score a task's evaluation split as lm-evaluation-harness does: acc, acc_norm (or a generative task's
    exact_match), loss, ppl; with
    --parent, also the generation fidelity against the parent (agreement, acceptance, KL, NLL).

    Example: uncurl eval --model runs/k4 --task superglue-rte --data-dir ../shared/data --limit 200
    """
    import gc

    from .evaluate import drop
    from .fidelity import paired
    from .load import load_model
    from .offload import dispatched
    from .output import library_caches
    from .pipeline import FIDELITY_METRICS, check_data, check_pipeline, parent_reference, run_eval
    from .report import Timings

    _setup_logging(verbose)
    check_pipeline(opts)
    if opts.gen_tokens is not None and opts.gen_tokens < 1:
        raise UncurlError(f"--gen-tokens {opts.gen_tokens} must be at least 1")
    check_data(opts, calibrating=False, evaluating=True, eval_limit=opts.eval_limit, seed=opts.seed)  # before the model
    stages = Timings()

    def load(name: str):
        return load_model(name, device=opts.device, dtype=opts.dtype, seed=opts.seed, device_map=opts.device_map,
                          max_memory=opts.max_memory, moe=False,
                          trust_remote_code=opts.trust_remote_code)  # any causal LM: evaluation needs no MoE

    reference = parent = None
    with library_caches():  # eval writes nothing: the libraries' caches in a folder removed after
        if opts.parent:  # the parent first, alone: its continuations and distributions kept, then it is freed
            with stages.stage("parent"):
                held = load(opts.parent)
                vocab = held.tokenizer.get_vocab()
                reference = parent_reference(held.model, held.tokenizer, opts, opts.eval_limit, opts.seed)
                parent = run_eval(held.model, held.tokenizer, opts, opts.eval_limit, opts.seed, reference=reference)
                hooked = dispatched(held.model)
                del held
                if hooked:
                    gc.collect()
        with stages.stage("load"):
            loaded = load(opts.model)
        if parent is not None and loaded.tokenizer.get_vocab() != vocab:
            raise UncurlError(f"--parent {opts.parent} and --model {opts.model} have different tokenizers: fidelity "
                              f"compares next-token distributions over one vocabulary")
        with stages.stage("eval"):
            metrics = {"model": opts.model, **run_eval(loaded.model, loaded.tokenizer, opts, opts.eval_limit,
                                                       opts.seed, reference=reference)}
    if parent is not None:
        metrics["parent"] = {"model": opts.parent, **parent}
        metrics["drop"] = {m: drop(parent, metrics, m) for m in ("acc", "acc_norm", "loss", *FIDELITY_METRICS)}
        metrics["paired"] = paired(parent, metrics)  # the model minus the parent, prompt by prompt
    if as_json:
        _emit_json(metrics)
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in metrics.items() if not isinstance(v, dict)))


@command("sweep", SweepOptions, [
    "model", "task", "keeps", "methods", "merges", "out", "routers", "protect_super_experts", "top_k", "profile", "keep_checkpoints", "overwrite",
    "tolerance", "metric", "gen_tokens", "eval_limit", "eval_max_length", *DATA_FIELDS, *RUN_FIELDS, "pipeline", *OUTPUT])
def sweep_cmd(ctx: typer.Context, opts: SweepOptions, as_json: bool, verbose: bool):
    """Profile once, then prune and evaluate every (method, K); name the threshold K per method.

    Example: uncurl sweep --model DIR --task superglue-rte --keep 6,4,2 --method uncurl,frequency --data-dir ../shared/data
    """
    from .sweep import sweep

    _setup_logging(verbose)
    opts.extra["command"] = _command_line(ctx)
    s = sweep(opts)
    if s is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    table = Table(title=Text(f"sweep: {opts.model} on {s['unpruned']['task']} ({s['metric']})"))
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


@command("cost", CostOptions, ["model", *SERVING_FIELDS, *RUN_FIELDS, *OUTPUT])
def cost_cmd(ctx: typer.Context, opts: CostOptions, as_json: bool, verbose: bool):
    """What a model costs to serve: weight memory, active parameters and FLOPs per token, KV cache, GPUs
    (dense models too); --measure-serving also times prefill and decode on this device.

    Example: uncurl cost --model runs/k4 --gpu-memory 80GiB --context 4096 --serving-batch 8
    """
    from .pipeline import cost
    from .serving import serving_table

    _setup_logging(verbose)
    result = cost(opts)
    if as_json:
        _emit_json({k: v for k, v in result.items() if k != "table"})
        return
    typer.echo(f"# serving cost: {result['model']} ({result['model_type']})\n\n{result['table']}")
    if "measured" in result:
        typer.echo("\n" + serving_table({"value": result["measured"]}))


TRAFFIC_FIELDS = ["data_dir", "samples", "max_length", "batch_size", "template", "choices", "choices_field",
                  "label_field", "eval_file", "calibration_split", "evaluation_split", "chat_template"]


@command("routes", RoutesOptions, ["model", "task", "file", "split", "out", "overwrite", "plots", *TRAFFIC_FIELDS,
                                       *RUN_FIELDS, *OUTPUT])
def routes_cmd(ctx: typer.Context, opts: RoutesOptions, as_json: bool, verbose: bool):
    """Write the experts (and gate weights) every token of every input chose, per MoE layer, with each
    layer's load balance and a heat map (layers x experts).

    Example: uncurl routes --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --out rte-routes
    """
    from .report import balance_cell
    from .routes import routes

    _setup_logging(verbose)
    opts.extra["command"] = _command_line(ctx)
    r = routes(opts)
    table = Table(title=Text(f"routes: {r['model']} on {r['inputs']['name']} ({r['inputs']['examples']} inputs, "
                             f"{r['tokens']:,} tokens)"))
    for col in ("layer", "balance (entropy/log E, CV, largest share)"):
        table.add_column(col)
    for layer in r["layers"]:
        table.add_row(str(layer["index"]), balance_cell(layer["balance"]))
    err.print(table)
    if as_json:
        _emit_json({"output": r["output"], "tokens": r["tokens"], "inputs": r["inputs"],
                    "layers": [{k: v for k, v in layer.items() if k in ("name", "index", "balance")}
                               for layer in r["layers"]]})
    else:
        typer.echo(str(Path(r["output"]) / "routes.md"))


@command("monitor", MonitorOptions, ["pruned", "task", "file", "split", "parent", "profile", "min_coverage", "max_divergence", "out",
                                     "overwrite", "plots", *TRAFFIC_FIELDS, *RUN_FIELDS, *OUTPUT])
def monitor_cmd(ctx: typer.Context, opts: MonitorOptions, as_json: bool, verbose: bool):
    """Profile new traffic through the pruned model's parent: the share of its routing mass on experts the
    pruned model kept, merged or dropped (coverage), per layer and overall, and its divergence from the
    calibration; --min-coverage exits 5 below the bound.

    Example: uncurl monitor --pruned runs/k4 --task superglue-cb --data-dir ../shared/data --min-coverage 0.9 --out cb
    """
    from .monitor import monitor

    _setup_logging(verbose)
    opts.extra["command"] = _command_line(ctx)
    r = monitor(opts)
    o = r["overall"]
    table = Table(title=Text(f"monitor: {r['traffic']['name']} on {r['pruned']} ({r['tokens']:,} tokens)"))
    for col in ("layer", "coverage", "kept", "merged", "dropped", "JS divergence"):
        table.add_column(col, justify="right")
    for row in [*r["layers"], {**o, "index": "all"}]:
        table.add_row(str(row["index"]), *(f"{row[k]:.1%}" if row[k] is not None else "-"
                                           for k in ("coverage", "kept", "merged", "dropped")),
                      f"{row['js_divergence']:.3f}")
    err.print(table)
    if as_json:
        _emit_json({k: r[k] for k in ("output", "pruned", "parent", "traffic", "tokens", "overall", "layers",
                                      "exit_code") if k in r} | ({"gate": r["gate"]} if "gate" in r else {}))
    else:
        typer.echo(str(Path(r["output"]) / "monitor.md"))
    if r["exit_code"]:
        g = r["gate"]
        err.print(Text.assemble(("gate failed:", "bold red"), " " + "; ".join(g["failed"])))
        raise typer.Exit(r["exit_code"])


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


@app.command("options", hidden=True)
def options_cmd(
    name: Annotated[str, typer.Argument(metavar="COMMAND", help="prune, profile, eval, sweep, cost, routes or monitor")] = "prune",
    as_markdown: Annotated[bool, typer.Option("--markdown", help="print Markdown (README's option tables are "
                                              "this output, one command at a time)")] = False,
):
    """Each option of a command with its default and meaning, generated from the options dataclasses."""
    if name not in COMMANDS:
        err.print(f"[bold red]error:[/] {name!r} is not one of {', '.join(COMMANDS)}")
        raise typer.Exit(2)
    opts = command_options(name)
    if as_markdown:
        typer.echo(markdown(opts) if name == "prune" else markdown_besides(opts, command_options("prune"), "prune"))
        return
    table = Table(show_header=True, title=f"uncurl {name}")
    for col in ("option", "default", "meaning"):
        table.add_column(col)
    for o in opts:
        table.add_row(", ".join(o.flag.flags) or "--" + o.name.replace("_", "-"), str(o.default), o.flag.help)
    Console().print(table)


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
