"""The Python API: the steps in order. The CLI is a thin layer over these functions.

    from uncurl.pipeline import PruneOptions, prune
    result = prune(PruneOptions(model="builtin:mixtral", task="superglue-rte", keep=4,
                                out="runs/rte-k4", data_dir="../shared/data"))

``prune`` = load -> validate -> profile -> cluster -> merge -> save + verify -> report, with an
optional evaluation before and after (and a gate on the drop). ``sweep`` (in ``sweep.py``) reuses
the same preparation once for many (method, K) pairs.
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import tasks as T
from .adapters import expert_count, find_moe_layers, routing_groups, top_k
from .cluster import LayerPlan, get_method, plan_layer, validate_keep
from .errors import UncurlError
from .evaluate import METRICS, drop, evaluate_examples
from .load import Loaded, input_device, load_model
from .merge import MERGE_RULES, ROUTER_RULES, get_rule, parameter_count, rewrite_model, weight_bytes
from .profile import Profile, profile_model
from .report import REPORT_SCHEMA, Timings, command_line, layer_entries, versions, write_report
from .save import check_out_dir, staged_dir, verify_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


@dataclass
class DataOptions:
    """Which task text to profile and evaluate on."""

    task: str = "superglue-rte"
    data_dir: str | None = None  # local files laid out as ../shared/data; else $UNCURL_DATA_DIR; else the Hub
    samples: int = 256  # calibration examples (a seeded random subset when the split is larger)
    max_length: int = 512
    batch_size: int = 8
    template: str | None = None  # custom tasks only: str.format template over a row's fields
    choices: tuple[str, ...] | None = None  # custom tasks only
    label_field: str = "label"
    calibrate_on: str | None = None  # profile on another task's calibration split (e.g. "corpus")
    progress: bool = False


@dataclass
class RunOptions(DataOptions):
    """Everything a pruning run shares with a sweep."""

    model: str = "builtin:mixtral"
    method: str = "uncurl"  # see cluster.METHODS
    merge: str = "average"  # see merge.MERGE_RULES
    router_rows: str = "mean"  # --router; see merge.ROUTER_RULES
    top_k: int | None = None  # lower the router's top-k explicitly (must be <= keep)
    profile: str | None = None  # reuse a profile written by `uncurl profile`
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    device_map: str | None = None  # accelerate placement over GPUs and CPU (auto, balanced, sequential)
    max_memory: str | None = None  # with device_map: per-device limits, e.g. "0=20GiB,cpu=60GiB"
    dtype: str = "auto"
    eval_limit: int | None = None  # evaluation examples (a seeded subset); None: the whole split
    metric: str = "acc"  # the metric a drop is measured on: acc, acc_norm or loss
    extra: dict = field(default_factory=dict)  # merged into the report (e.g. the CLI's command line)


@dataclass
class PruneOptions(RunOptions):
    keep: int = 4
    out: str = "pruned"
    shard_size: str = "5GB"
    eval: bool = False  # evaluate before and after pruning
    max_drop: float | None = None  # gate: fail (exit 4) when the metric drops by more (implies eval)


@dataclass
class PruneResult:
    out: Path
    report: dict

    @property
    def gate_passed(self) -> bool:
        return self.report.get("gate", {}).get("passed", True)


@dataclass
class Prepared:
    """A loaded model with its profile: what every (method, K) decision starts from."""

    loaded: Loaded
    profile: Profile
    n_group: int
    top_k_before: int
    top_k_after: int
    num_experts: int


def resolve_task(opts: DataOptions, name: str | None = None) -> T.Task:
    """A registered task name, or a local .jsonl/.csv file with --template."""
    name = name or opts.task
    path = Path(name)
    if name not in T.TASKS and path.suffix in (".jsonl", ".csv", ".json"):
        if not path.is_file():
            raise UncurlError(f"--task {name}: no such file")
        if not opts.template:
            raise UncurlError(f"--task {name} is a custom data file: pass --template, e.g. '{{text}}'")
        return T.custom_task(path, opts.template, opts.choices, opts.label_field)
    return T.get_task(name)


def calibration_texts(opts: DataOptions, seed: int) -> tuple[list[str], dict]:
    task = resolve_task(opts, opts.calibrate_on)
    examples = T.load_examples(task, "calibration", opts.data_dir, limit=opts.samples, seed=seed)
    source = T.resolve_data_dir(opts.data_dir)
    info = {
        "name": task.name,
        "calibration_examples": len(examples),
        "fingerprint": T.data_fingerprint(examples),
        "source": str(Path(source).resolve()) if source else f"hub:{task.hub[0]}",
    }
    return [e.text for e in examples], info


def run_profile(loaded: Loaded, opts: DataOptions, seed: int = 0) -> Profile:
    """Profile ``loaded`` on the calibration split (the expensive pass)."""
    texts, info = calibration_texts(opts, seed)
    meta = {"model": loaded.model_id, "model_type": loaded.model.config.model_type, "task": info,
            "seed": seed, "max_length": opts.max_length, "versions": versions()}
    torch.manual_seed(seed)
    return profile_model(loaded.model, loaded.tokenizer, loaded.adapter, texts, batch_size=opts.batch_size,
                         max_length=opts.max_length, progress=opts.progress, meta=meta, seed=seed)


def run_eval(model, tokenizer, opts: DataOptions, limit: int | None, seed: int = 0) -> dict:
    """The task's evaluation split scored as lm-evaluation-harness would (see evaluate.py)."""
    task = resolve_task(opts)
    examples = T.load_examples(task, "evaluation", opts.data_dir, limit=limit, seed=seed)
    metrics = evaluate_examples(model, tokenizer, examples, batch_size=opts.batch_size,
                                max_length=max(opts.max_length, 1024), progress=opts.progress)
    return {"task": task.name, "fingerprint": T.data_fingerprint(examples), **metrics}


def _check_profile(profile: Profile, loaded: Loaded, path: str) -> None:
    e = expert_count(loaded.model.config, loaded.adapter)
    names = {layer.name for layer in find_moe_layers(loaded.model, loaded.adapter)}
    if set(profile.layers) != names or any(s.num_experts != e for s in profile.layers.values()):
        raise UncurlError(
            f"--profile {path} was recorded on {profile.meta.get('model')!r} with other MoE layers or "
            f"expert counts than {loaded.model_id!r}; profile this model with `uncurl profile`"
        )


def check_options(opts: RunOptions, evaluating: bool) -> None:
    """Cheap checks of everything that does not need the model, before loading it."""
    for method in opts.method.split(","):
        get_method(method)
    for merge in opts.merge.split(","):
        get_rule(MERGE_RULES, merge, "--merge")
    for rule in opts.router_rows.split(","):
        get_rule(ROUTER_RULES, rule, "--router")
    if opts.metric not in METRICS:
        raise UncurlError(f"--metric {opts.metric!r} is not one of {', '.join(METRICS)}")
    task = resolve_task(opts)  # an unknown task fails before the model is loaded
    if opts.calibrate_on:
        resolve_task(opts, opts.calibrate_on)
    if evaluating and opts.metric != "loss" and task.num_choices == 0:
        raise UncurlError(f"task {task.name} has no answer choices, so no {opts.metric}; use --metric loss")


def prepare(opts: RunOptions, keeps: list[int], timings: Timings, *, source_check=None) -> Prepared:
    """Load the model, validate every K against it, then profile (or read --profile)."""
    with timings.stage("load"):
        loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype, seed=opts.seed,
                            device_map=opts.device_map, max_memory=opts.max_memory)
    if source_check is not None:
        source_check(loaded.source)
    config, adapter = loaded.model.config, loaded.adapter
    n_experts, k_before = expert_count(config, adapter), top_k(config, adapter)
    k_after = opts.top_k if opts.top_k is not None else k_before
    n_group, topk_group = routing_groups(config, adapter)
    for keep in keeps:
        validate_keep(n_experts, keep, k_after, n_group, topk_group)
    with timings.stage("profile"):
        if opts.profile:
            profile = Profile.load(opts.profile)
            _check_profile(profile, loaded, opts.profile)
        else:
            profile = run_profile(loaded, opts, opts.seed)
    return Prepared(loaded, profile, n_group, k_before, k_after, n_experts)


def plan_all(prep: Prepared, keep: int, method: str, seed: int) -> dict[str, LayerPlan]:
    return {name: plan_layer(stats, keep, method, prep.n_group, seed) for name, stats in prep.profile.layers.items()}


def base_report(opts: RunOptions, prep: Prepared, timings: Timings) -> dict:
    return {
        "schema_version": REPORT_SCHEMA,
        "command": opts.extra.get("command", command_line()),
        "versions": versions(),
        "seed": opts.seed,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("extra", "progress")},
        "task": {**prep.profile.meta.get("task", {}), "tokens": prep.profile.tokens},
        "profile": opts.profile,
        "timings_s": timings,
    }


def prune(opts: PruneOptions) -> PruneResult:
    """load -> (validate) -> profile -> cluster -> merge -> save + verify -> report (+ eval, gate)."""
    timings = Timings()
    evaluating = opts.eval or opts.max_drop is not None
    check_options(opts, evaluating)
    out = check_out_dir(opts.out, overwrite=opts.overwrite)
    prep = prepare(opts, [opts.keep], timings,
                   source_check=lambda src: check_out_dir(out, overwrite=opts.overwrite, source=src))
    loaded, adapter = prep.loaded, prep.loaded.adapter
    evaluation = {}
    if evaluating:
        with timings.stage("eval_before"):
            evaluation["before"] = run_eval(loaded.model, loaded.tokenizer, opts, opts.eval_limit, opts.seed)
    with timings.stage("cluster"):
        plans = plan_all(prep, opts.keep, opts.method, opts.seed)
    before = {"params": parameter_count(loaded.model), "bytes": weight_bytes(loaded.model)}
    # accelerate's map: module name -> GPU index, "cpu" or "disk"; else the one device
    device_map = getattr(loaded.model, "hf_device_map", None) or {"": input_device(loaded.model)}
    modules_per_device = dict(Counter(str(device) for device in device_map.values()))
    with timings.stage("merge"):
        pruned = rewrite_model(loaded.model, adapter, plans, router_rule=opts.router_rows, merge=opts.merge,
                               stats=prep.profile.layers, top_k=opts.top_k,
                               consume=True)  # originals are freed layer by layer: never two copies
    loaded.model = None
    gc.collect()  # accelerate's hooks make modules self-referencing: free the original now
    if evaluating:
        with timings.stage("eval_after"):
            evaluation["after"] = run_eval(pruned, loaded.tokenizer, opts, opts.eval_limit, opts.seed)
        evaluation["drop"] = {m: drop(evaluation["before"], evaluation["after"], m) for m in METRICS}
    report = {
        **base_report(opts, prep, timings),
        "model": {
            "id": opts.model, "model_type": pruned.config.model_type,
            "experts_before": prep.num_experts, "experts_after": opts.keep,
            "top_k_before": prep.top_k_before, "top_k_after": prep.top_k_after,
            "params_before": before["params"], "params_after": parameter_count(pruned),
            "bytes_before": before["bytes"], "bytes_after": weight_bytes(pruned),
            "placement": modules_per_device,
        },
        "method": opts.method,
        "merge": opts.merge,
        "router_rows": opts.router_rows,
        "keep": opts.keep,
        "layers": layer_entries(prep.profile, plans),
        "output": str(out),
    }
    if evaluating:
        report["eval"] = evaluation
    if opts.max_drop is not None:
        measured = evaluation["drop"][opts.metric]
        report["gate"] = {"metric": opts.metric, "drop": measured, "max_drop": opts.max_drop,
                          "passed": measured is not None and measured <= opts.max_drop}
    with staged_dir(out) as tmp:
        with timings.stage("save"):
            write_checkpoint(pruned, loaded.tokenizer, tmp, opts.shard_size, extra_files=loaded.processor_files)
        del pruned  # the checks below reload from disk: never hold both copies
        gc.collect()
        with timings.stage("verify"):
            report["checks"] = verify_checkpoint(tmp, adapter, opts.keep, prep.top_k_after, loaded.tokenizer,
                                                 loaded.placement)
        with timings.stage("report"):
            report["files"] = write_report(report, tmp / "report")
    log.info("wrote %s", out)
    return PruneResult(out, report)
