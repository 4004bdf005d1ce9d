"""The Python API: the steps in order. The CLI is a thin layer over these two functions.

    from uncurl.pipeline import PruneOptions, prune
    result = prune(PruneOptions(model="builtin:mixtral", task="superglue-rte", keep=4,
                                out="runs/rte-k4", data_dir="../shared/data"))
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import tasks as T
from .adapters import expert_count, routing_groups, top_k
from .cluster import ROUTER_RULES, plan_layer, validate_keep
from .errors import UncurlError
from .load import Loaded, load_model
from .merge import parameter_count, rewrite_model, weight_bytes
from .profile import Profile, profile_model
from .report import REPORT_SCHEMA, Timings, command_line, layer_entries, versions, write_report
from .save import check_out_dir, staged_dir, verify_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


@dataclass
class DataOptions:
    """Which task text to profile on."""

    task: str = "superglue-rte"
    data_dir: str | None = None  # local files laid out as ../shared/data; else $UNCURL_DATA_DIR; else the Hub
    samples: int = 256  # calibration examples (a seeded random subset when the split is larger)
    max_length: int = 512
    batch_size: int = 8
    template: str | None = None  # custom tasks only: str.format template over a row's fields
    choices: tuple[str, ...] | None = None  # custom tasks only
    label_field: str = "label"


@dataclass
class PruneOptions(DataOptions):
    model: str = "builtin:mixtral"
    keep: int = 4
    out: str = "pruned"
    method: str = "uncurl"
    router_rows: str = "mean"
    top_k: int | None = None  # lower the router's top-k explicitly (must be <= keep)
    profile: str | None = None  # reuse a profile written by `uncurl profile`
    overwrite: bool = False
    shard_size: str = "5GB"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = False
    extra: dict = field(default_factory=dict)  # merged into the report (e.g. the CLI's command line)


@dataclass
class PruneResult:
    out: Path
    report: dict


def resolve_task(opts: DataOptions) -> T.Task:
    """A registered task name, or a local .jsonl/.csv file with --template."""
    path = Path(opts.task)
    if opts.task not in T.TASKS and path.suffix in (".jsonl", ".csv", ".json"):
        if not path.is_file():
            raise UncurlError(f"--task {opts.task}: no such file")
        if not opts.template:
            raise UncurlError(f"--task {opts.task} is a custom data file: pass --template, e.g. '{{text}}'")
        return T.custom_task(path, opts.template, opts.choices, opts.label_field)
    return T.get_task(opts.task)


def calibration_texts(opts: DataOptions, seed: int) -> tuple[T.Task, list[str], dict]:
    task = resolve_task(opts)
    examples = T.load_examples(task, "calibration", opts.data_dir, limit=opts.samples, seed=seed)
    source = T.resolve_data_dir(opts.data_dir)
    info = {
        "name": task.name,
        "calibration_examples": len(examples),
        "fingerprint": T.data_fingerprint(examples),
        "source": str(Path(source).resolve()) if source else f"hub:{task.hub[0]}",
    }
    return task, [e.text for e in examples], info


def run_profile(loaded: Loaded, opts: DataOptions, seed: int = 0) -> Profile:
    """Profile ``loaded`` on the task's calibration split (the expensive pass)."""
    task, texts, info = calibration_texts(opts, seed)
    meta = {"model": loaded.model_id, "model_type": loaded.model.config.model_type, "task": info,
            "seed": seed, "max_length": opts.max_length, "versions": versions()}
    torch.manual_seed(seed)
    return profile_model(loaded.model, loaded.tokenizer, loaded.adapter, texts, batch_size=opts.batch_size,
                         max_length=opts.max_length, progress=getattr(opts, "progress", False), meta=meta)


def _check_profile(profile: Profile, loaded: Loaded, path: str) -> None:
    e = expert_count(loaded.model.config, loaded.adapter)
    from .adapters import find_moe_layers

    names = {layer.name for layer in find_moe_layers(loaded.model, loaded.adapter)}
    if set(profile.layers) != names or any(s.num_experts != e for s in profile.layers.values()):
        raise UncurlError(
            f"--profile {path} was recorded on {profile.meta.get('model')!r} with other MoE layers or "
            f"expert counts than {loaded.model_id!r}; profile this model with `uncurl profile`"
        )


def prune(opts: PruneOptions) -> PruneResult:
    """load -> (validate) -> profile -> cluster -> merge -> save + verify -> report."""
    timings = Timings()
    if opts.router_rows not in ROUTER_RULES:
        raise UncurlError(f"--router-rows {opts.router_rows!r} is not one of {', '.join(ROUTER_RULES)}")
    out = check_out_dir(opts.out, overwrite=opts.overwrite)
    resolve_task(opts)  # an unknown task fails before the model is loaded
    with timings.stage("load"):
        loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype, seed=opts.seed)
    check_out_dir(out, overwrite=opts.overwrite, source=loaded.source)
    config, adapter = loaded.model.config, loaded.adapter
    n_experts, k_before = expert_count(config, adapter), top_k(config, adapter)
    k_after = opts.top_k if opts.top_k is not None else k_before
    n_group, topk_group = routing_groups(config, adapter)
    validate_keep(n_experts, opts.keep, k_after, n_group, topk_group)

    with timings.stage("profile"):
        if opts.profile:
            profile = Profile.load(opts.profile)
            _check_profile(profile, loaded, opts.profile)
        else:
            profile = run_profile(loaded, opts, opts.seed)
    with timings.stage("cluster"):
        plans = {name: plan_layer(stats, opts.keep, opts.method, n_group, opts.seed)
                 for name, stats in profile.layers.items()}
    before = {"params": parameter_count(loaded.model), "bytes": weight_bytes(loaded.model)}
    with timings.stage("merge"):
        pruned = rewrite_model(loaded.model, adapter, plans, router_rule=opts.router_rows, top_k=opts.top_k)
    loaded.model = None  # release the original expert tensors: never two full copies
    report = {
        "schema_version": REPORT_SCHEMA,
        "command": opts.extra.get("command", command_line()),
        "versions": versions(),
        "seed": opts.seed,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("extra", "progress")},
        "model": {
            "id": opts.model, "model_type": config.model_type,
            "experts_before": n_experts, "experts_after": opts.keep,
            "top_k_before": k_before, "top_k_after": k_after,
            "params_before": before["params"], "params_after": parameter_count(pruned),
            "bytes_before": before["bytes"], "bytes_after": weight_bytes(pruned),
        },
        "task": {**profile.meta.get("task", {}), "tokens": profile.tokens},
        "profile": opts.profile,
        "method": opts.method,
        "router_rows": opts.router_rows,
        "keep": opts.keep,
        "layers": layer_entries(profile, plans),
        "timings_s": timings,
        "output": str(out),
    }
    with staged_dir(out) as tmp:
        with timings.stage("save"):
            write_checkpoint(pruned, loaded.tokenizer, tmp, opts.shard_size)
        with timings.stage("verify"):
            report["checks"] = verify_checkpoint(tmp, adapter, opts.keep, k_after, loaded.tokenizer)
        with timings.stage("report"):
            report["files"] = write_report(report, tmp / "report")
    log.info("wrote %s", out)
    return PruneResult(out, report)
