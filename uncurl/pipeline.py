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
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import tasks as T
from .adapters import expert_count, find_moe_layers, routing_groups, top_k
from .cluster import LayerPlan, get_method, plan_layer, validate_keep
from .errors import UncurlError
from .evaluate import METRICS, drop, evaluate_examples
from .load import Loaded, check_family, input_device, load_model
from .merge import MERGE_RULES, ROUTER_RULES, get_rule, parameter_count, rewrite_model, weight_bytes
from .offload import dispatched
from .profile import Profile, profile_model, router_fingerprint
from .report import REPORT_SCHEMA, Timings, command_line, layer_entries, versions, write_report
from .save import check_out_dir, staged_dir, verify_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


# The defaults, chosen by the methods studies on both test beds (README, "Which method wins";
# benchmarks/results/methods_study*): the evidence, as --help states it, is STUDY_EVIDENCE.
DEFAULT_METHOD, DEFAULT_MERGE, DEFAULT_ROUTER = "ean", "aligned", "refit"
STUDY_EVIDENCE = ("Defaults from the methods studies (README, 'Which method wins'): no method won everywhere; EAN "
                  "was in the top three on every measure. Task loss gained, mean over tasks and K=6,4,2: "
                  "pretrained test bed EAN 0.096 nats (EAN-mean 0.144, REAP 0.165, frequency 0.409); trained test "
                  "bed EAN 0.51 (REAP 0.42, EAN-mean 0.63, frequency 0.73, uncurl+aligned+refit 1.12, "
                  "uncurl+average 1.55). Accuracy on the pretrained bed: EAN lost 0.8 points, EAN-mean 0.4, "
                  "REAP 1.1, frequency 2.0, uncurl+average 7.2, the top five within about one standard error.")


@dataclass
class DataOptions:
    """Which task text to profile and evaluate on."""

    task: str = "superglue-rte"
    data_dir: str | None = None  # local files laid out as ../shared/data; else $UNCURL_DATA_DIR; else the Hub
    samples: int = 256  # calibration examples (a seeded random subset when the split is larger)
    max_length: int = 512  # calibration: tokens kept per example (profiling)
    eval_max_length: int = 1024  # evaluation: tokens kept per sequence, from the right
    batch_size: int = 8
    template: str | None = None  # custom/hf: tasks: str.format template over a row's fields
    choices: tuple[str, ...] | None = None  # custom/hf: tasks: the same answer choices for every row
    choices_field: str | None = None  # custom/hf: tasks: the field holding each row's own choices
    label_field: str = "label"  # custom/hf: tasks: the gold (index, choice, spelling or boolean)
    eval_file: str | None = None  # custom file tasks: evaluate on this file (default: seeded halves of one)
    calibration_split: str | None = None  # hf: tasks: the Hub split to calibrate on (default train)
    evaluation_split: str | None = None  # hf: tasks: the Hub split to evaluate on (default validation)
    calibrate_on: str | None = None  # profile on other tasks' calibration splits: "corpus" or "rte=3,corpus=1"
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (instruction-tuned models)
    progress: bool = False


@dataclass
class RunOptions(DataOptions):
    """Everything a pruning run shares with a sweep."""

    model: str = "builtin:mixtral"
    method: str = DEFAULT_METHOD  # see cluster.METHODS
    merge: str = DEFAULT_MERGE  # see merge.MERGE_RULES
    router_rows: str = DEFAULT_ROUTER  # --router; see merge.ROUTER_RULES
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
    plots: bool = True  # report/usage.png and groups.png (about a second of matplotlib per run)
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
    """A registered task, hf:ORG/NAME[:CONFIG], a task file (.yaml/.json), or a .jsonl/.csv file with --template.

    ``name``: a task of ``--calibrate-on`` (its errors name that option; the Hub splits apply to it
    only when it is a Hub dataset); default: ``--task``."""
    mixed = bool(opts.calibrate_on) and name is not None
    hub = not mixed or name.startswith(T.HUB_PREFIX)
    return T.resolve_task(name or opts.task, template=opts.template, choices=opts.choices,
                          label_field=opts.label_field, choices_field=opts.choices_field,
                          eval_file=opts.eval_file if name in (None, opts.task) else None,
                          calibration_split=opts.calibration_split if hub else None,
                          evaluation_split=opts.evaluation_split if hub else None,
                          flag="--calibrate-on" if mixed else "--task")


def calibration_mix(opts: DataOptions) -> list[tuple[str, float]]:
    """``--calibrate-on`` as (task, weight) pairs: "corpus", "superglue-rte=3,corpus=1" (default: --task)."""
    if not opts.calibrate_on:
        return [(opts.task, 1.0)]
    mix = []
    for item in opts.calibrate_on.split(","):
        name, sep, weight = item.strip().rpartition("=") if "=" in item else (item.strip(), "", "1")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name or not w > 0 or w == float("inf"):
            raise UncurlError(f"--calibrate-on {opts.calibrate_on!r}: {item.strip()!r} must be TASK or TASK=WEIGHT "
                              f"with a positive weight, e.g. superglue-rte=3,corpus=1")
        mix.append((name, w))
    if len({n for n, _ in mix}) != len(mix):
        raise UncurlError(f"--calibrate-on {opts.calibrate_on!r} names a task twice")
    return mix


def mix_counts(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder; ties to the first), each >= 1."""
    if total < len(weights):
        raise UncurlError(f"--samples {total} is fewer than the {len(weights)} tasks in --calibrate-on")
    exact = [total * w / sum(weights) for w in weights]
    counts = [max(int(e), 1) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: -(exact[i] - int(exact[i])))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def chat_wrap(examples: list[T.Example], tokenizer) -> list[T.Example]:
    """Each prompt as a user turn in the tokenizer's chat template, ready for the assistant's answer.

    As lm-evaluation-harness does with a chat template, the answer follows the template directly
    (its leading space is dropped: the assistant's turn starts with it).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UncurlError("--chat-template: this model's tokenizer has no chat template (tokenizer_config.json "
                          "'chat_template'); leave the option off for a base model")
    out = []
    for ex in examples:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False,
                                               add_generation_prompt=True)
        out.append(T.Example(prompt, tuple(c[1:] if c.startswith(" ") else c for c in ex.choices), ex.gold))
    return out


def _source(task: T.Task, data_dir: str | None) -> str:
    if task.read_docs is not None:
        return task.name
    files = sorted(set(task.local_files.values()))
    if files and all(Path(f).is_absolute() for f in files):  # custom files: themselves
        return ", ".join(files)
    local = T.resolve_data_dir(data_dir)
    if task.hub[0] and (local is None or not task.local_files):
        return f"hub:{task.hub[0]}" + (f":{task.hub[1]}" if task.hub[1] else "")
    return str(Path(local).resolve()) if local else "local files"


def calibration_texts(opts: DataOptions, seed: int, tokenizer=None) -> tuple[list[str], dict]:
    """The calibration texts (a mix when --calibrate-on names several tasks) and what they were."""
    mix = calibration_mix(opts)
    counts = mix_counts([w for _, w in mix], opts.samples) if len(mix) > 1 else [opts.samples]
    parts, examples = [], []
    for (name, weight), n in zip(mix, counts):
        task = resolve_task(opts, name)
        part = T.load_examples(task, "calibration", opts.data_dir, limit=n, seed=seed)
        if opts.chat_template:
            part = chat_wrap(part, tokenizer)
        parts.append({"name": task.name, "weight": weight, "calibration_examples": len(part),
                      "fingerprint": T.data_fingerprint(part), "source": _source(task, opts.data_dir),
                      "split": task.split_note})
        examples += part
    info = dict(parts[0]) if len(parts) == 1 else {
        "name": "+".join(p["name"] for p in parts), "calibration_examples": len(examples),
        "fingerprint": T.data_fingerprint(examples), "source": "; ".join(dict.fromkeys(p["source"] for p in parts)),
        "mix": parts}
    info.pop("weight", None)
    info["chat_template"] = opts.chat_template
    return [e.text for e in examples], info


def run_profile(loaded: Loaded, opts: DataOptions, seed: int = 0) -> Profile:
    """Profile ``loaded`` on the calibration split (the expensive pass)."""
    texts, info = calibration_texts(opts, seed, loaded.tokenizer)
    meta = {"model": loaded.model_id, "model_type": loaded.model.config.model_type,
            "router_fingerprint": router_fingerprint(loaded.model, loaded.adapter), "task": info,
            "seed": seed, "max_length": opts.max_length, "versions": versions()}
    torch.manual_seed(seed)
    profile = profile_model(loaded.model, loaded.tokenizer, loaded.adapter, texts, batch_size=opts.batch_size,
                            max_length=opts.max_length, progress=opts.progress, meta=meta, seed=seed)
    for name, stats in profile.layers.items():  # finite weights can still overflow (e.g. float16)
        if not all(bool(torch.isfinite(getattr(stats, f)).all()) for f in ("mass", "logit_sum", "gram")):
            raise UncurlError(f"the router of {name} gave NaN/Inf logits on the calibration text; the weights are "
                              f"finite, so the activations overflowed: try --dtype float32 or bfloat16")
    return profile


def run_eval(model, tokenizer, opts: DataOptions, limit: int | None, seed: int = 0, per_example: bool = False) -> dict:
    """The task's evaluation split scored as lm-evaluation-harness would (see evaluate.py);
    ``per_example`` adds each example's figures (``evaluate_examples``)."""
    task = resolve_task(opts)
    examples = T.load_examples(task, "evaluation", opts.data_dir, limit=limit, seed=seed)
    if opts.chat_template:
        examples = chat_wrap(examples, tokenizer)
    metrics = evaluate_examples(model, tokenizer, examples, batch_size=opts.batch_size,
                                max_length=opts.eval_max_length, progress=opts.progress, per_example=per_example)
    return {"task": task.name, "fingerprint": T.data_fingerprint(examples), "split": task.split_note,
            "chat_template": opts.chat_template, **metrics}


def _mix_spec(parts: list[tuple[str, float]]) -> str:
    """A calibration source as --calibrate-on spells it: "superglue-rte", or "superglue-rte=3,corpus=1"."""
    if len(parts) == 1:
        return parts[0][0]
    return ",".join(f"{name}={weight:g}" for name, weight in parts)


def _shares(parts: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """A calibration mix as proportions, so that 3:1 and 6:2 compare equal."""
    total = sum(w for _, w in parts)
    return [(name, round(w / total, 6)) for name, w in parts]


def _check_profile(profile: Profile, loaded: Loaded, path: str, opts: DataOptions) -> None:
    """A reused profile must come from this model (family, router weights, layers, expert counts)
    and from this run's calibration task; older profiles without a router fingerprint are accepted
    with a warning that the weights could not be compared."""
    meta, model_type = profile.meta, loaded.model.config.model_type
    recorded_on = f"--profile {path} was recorded on {meta.get('model')!r}"
    if meta.get("model_type") not in (None, model_type):
        raise UncurlError(f"{recorded_on}, a {meta['model_type']} model; {loaded.model_id!r} is a {model_type} model: "
                          f"profile this model with `uncurl profile`")
    e = expert_count(loaded.model.config, loaded.adapter)
    names = {layer.name for layer in find_moe_layers(loaded.model, loaded.adapter)}
    if set(profile.layers) != names or any(s.num_experts != e for s in profile.layers.values()):
        raise UncurlError(f"{recorded_on} with other MoE layers or expert counts than {loaded.model_id!r}; profile "
                          f"this model with `uncurl profile`")
    if "router_fingerprint" not in meta:
        log.warning("--profile %s records no router fingerprint (written by an older uncurl): it could not be checked "
                    "that it was recorded on these weights", path)
    elif meta["router_fingerprint"] != (now := router_fingerprint(loaded.model, loaded.adapter)):
        raise UncurlError(f"{recorded_on} with other router weights than {loaded.model_id!r} has now (router "
                          f"fingerprint {meta['router_fingerprint']}, now {now}): it describes another model (or "
                          f"another --seed of a built-in one); profile this one with `uncurl profile`")
    task = meta.get("task") or {}
    recorded = [(p["name"], p["weight"]) for p in task["mix"]] if task.get("mix") else [(task.get("name"), 1.0)]
    run = [(resolve_task(opts, name).name, w) for name, w in calibration_mix(opts)]
    if recorded[0][0] is not None and _shares(recorded) != _shares(run):
        spec = _mix_spec(recorded)
        how = f"--calibrate-on {spec}" if len(recorded) > 1 else f"--task {spec} (or --calibrate-on {spec})"
        raise UncurlError(f"--profile {path} was recorded on task {spec}, this run calibrates on {_mix_spec(run)}: "
                          f"pass {how} to reuse it, or profile {_mix_spec(run)} with `uncurl profile`")


def check_data(opts: DataOptions, *, calibrating: bool, evaluating: bool, eval_limit: int | None = None,
               seed: int = 0) -> T.Task:
    """Resolve every task and read the rows a run will use, before the model is loaded: an unknown
    task, a missing or malformed file or row, an unreachable Hub fail in seconds, not after loading."""
    task = resolve_task(opts)
    for name, _ in calibration_mix(opts):
        resolve_task(opts, name)
    if calibrating:
        calibration_texts(replace(opts, chat_template=False), seed)  # the chat template needs the tokenizer
    if evaluating:
        T.load_examples(task, "evaluation", opts.data_dir, limit=eval_limit, seed=seed)
    return task


# The gate bounds of PruneOptions (max_drop) and SweepOptions (tolerance): points of --metric
DROP_BOUNDS = {"max_drop": "--max-drop", "tolerance": "--tolerance"}


def check_options(opts: RunOptions, evaluating: bool) -> None:
    """Cheap checks of everything that does not need the model, before loading it."""
    check_family(opts.model)  # a refused family says why before any data is read
    for method in opts.method.split(","):
        get_method(method)
    for merge in opts.merge.split(","):
        get_rule(MERGE_RULES, merge, "--merge")
    for rule in opts.router_rows.split(","):
        get_rule(ROUTER_RULES, rule, "--router")
    if opts.metric not in METRICS:
        raise UncurlError(f"--metric {opts.metric!r} is not one of {', '.join(METRICS)}")
    for name, flag in DROP_BOUNDS.items():
        value = getattr(opts, name, None)
        if value is not None and not 0 <= value < math.inf:
            raise UncurlError(f"{flag} {value:g} is not accepted: it is the largest acceptable drop in --metric, a "
                              f"number of points >= 0, e.g. 1.0")
    if opts.top_k is not None and opts.top_k < 1:
        raise UncurlError(f"--top-k {opts.top_k} must be at least 1")
    task = check_data(opts, calibrating=not opts.profile, evaluating=evaluating, eval_limit=opts.eval_limit,
                      seed=opts.seed)
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
    if opts.top_k is not None and opts.top_k > k_before:
        raise UncurlError(f"--top-k {opts.top_k} is above this model's own top-k ({k_before}): --top-k only lowers "
                          f"it; pass 1..{k_before}, or leave it out to keep {k_before}")
    k_after = opts.top_k if opts.top_k is not None else k_before
    n_group, topk_group = routing_groups(config, adapter)
    for keep in keeps:
        validate_keep(n_experts, keep, k_after, n_group, topk_group)
    with timings.stage("profile"):
        if opts.profile:
            profile = Profile.load(opts.profile)
            _check_profile(profile, loaded, opts.profile, opts)
        else:
            profile = run_profile(loaded, opts, opts.seed)
    return Prepared(loaded, profile, n_group, k_before, k_after, n_experts)


def method_used(prep: Prepared, method: str) -> str:
    """The method a run really uses: the default falls back to frequency (logged) on a profile
    without expert-output statistics (llama4, longcat_flash: the recorder cannot see their experts)."""
    if method == DEFAULT_METHOD and any(stats.missing for stats in prep.profile.layers.values()):
        log.warning("this profile has no expert-output statistics; the default --method %s falls back to "
                    "frequency", DEFAULT_METHOD)
        return "frequency"
    return method


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
        method = method_used(prep, opts.method)
        plans = plan_all(prep, opts.keep, method, opts.seed)
    before = {"params": parameter_count(loaded.model), "bytes": weight_bytes(loaded.model)}
    # accelerate's map: module name -> GPU index, "cpu" or "disk"; else the one device
    device_map = getattr(loaded.model, "hf_device_map", None) or {"": input_device(loaded.model)}
    modules_per_device = dict(Counter(str(device) for device in device_map.values()))
    hooked = dispatched(loaded.model)  # then a collection is what frees a model, not `del`
    with timings.stage("merge"):
        pruned = rewrite_model(loaded.model, adapter, plans, router_rule=opts.router_rows, merge=opts.merge,
                               stats=prep.profile.layers, top_k=opts.top_k,
                               consume=True)  # originals are freed layer by layer: never two copies
    loaded.model = None
    if hooked:
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
        "method": method,  # what ran; "method_requested" when the default fell back
        **({"method_requested": opts.method} if method != opts.method else {}),
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
        if hooked:
            gc.collect()
        with timings.stage("verify"):
            report["checks"] = verify_checkpoint(tmp, adapter, opts.keep, prep.top_k_after, loaded.tokenizer,
                                                 loaded.placement)
        with timings.stage("report"):
            report["files"] = write_report(report, tmp / "report", with_plots=opts.plots)
    log.info("wrote %s", out)
    return PruneResult(out, report)
