"""The Python API: the steps in order. The CLI is a thin layer over these functions.

    from uncurl.pipeline import PruneOptions, prune
    result = prune(PruneOptions(model="builtin:mixtral", task="superglue-rte", keep=4,
                                out="runs/rte-k4", data_dir="../shared/data"))

``prune`` = load -> validate -> profile -> cluster -> merge (-> fit with ``--merge fit``, ``fit.py``;
-> recover with ``--recover``, ``recover.py``) -> save + verify -> report, with an optional
evaluation before and after (and a gate on the drop). ``sweep`` (in ``sweep.py``) reuses
the same preparation once for many (method, K) pairs.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import distributed
from . import tasks as T
from .adapters import expert_count, find_moe_layers, looped_layers, routing_groups, set_mtp_count, top_k
from .card import CARD, parent_card, render as render_card
from .cluster import (METHODS, SUPER_FRACTION, SUPER_LAYERS, SUPER_QUANTILE, LayerPlan, check_protected, get_method,
                      needs_calibration, plan_layer, super_experts, validate_keep)
from .cost import cost_table, finish, release_note, serving_cost, static_cost
from .errors import UncurlError
from .evaluate import METRICS, drop, evaluate_examples
from .generate import generate, score as score_generations
from .fidelity import DEFAULT_GEN_TOKENS, Reference, build_reference, paired, score as score_fidelity
from .fit import fit_model, fit_report as fit_entry
from .load import Loaded, check_family, input_device, load_model
from .merge import MERGE_RULES, ROUTER_RULES, get_rule, parameter_count, rewrite_model, weight_bytes
from .offload import counting, dispatched, offloaded_bytes
from .options import (AUTO_MERGE, DATA, DEFAULT_MERGE, DEFAULT_METHOD, DEFAULT_ROUTER, EVAL, FIT_EVIDENCE, MODEL, PRUNE,
                      RUN, STUDY_EVIDENCE, choices_help, items, opt)
from .mtp import Blocks as MtpBlocks, find as find_mtp
from .profile import Profile, profile_model, router_fingerprint, shard_range
from .stats import LayerStats
from .recover import recover
from .sequential import decoder_layers, profile_sequential
from .report import REPORT_SCHEMA, Timings, command_line, layer_entries, versions, write_report
from .output import Claim, claim, library_caches
from .save import expected_bytes, parse_shard_size, stored_bytes, verify_checkpoint, write_checkpoint, write_extras
from .serving import ServingOptions, measure as measure_serving, serving_note

log = logging.getLogger(__name__)


METHOD_HELP = ("How experts are chosen or grouped. " + choices_help(
    METHODS, lambda m: " (pruning: each kept expert alone)" if m.kind == "criterion" else " (groups, merged by --merge)")
    + " " + STUDY_EVIDENCE)
MERGE_HELP = ("How a group of several experts becomes one (a pruning criterion's kept experts are copied as they "
              "are, except by fit). " + choices_help(MERGE_RULES) + f" [bold]{AUTO_MERGE}[/] (the default): fit where "
              "it applies, else aligned (a quantized input written back in its format, experts whose output is not "
              "linear in their down projection, --device-map on the whole-model pipeline); "
              "the report says which ran. " + FIT_EVIDENCE + ".")
ROUTER_HELP = "A merged expert's router row. " + choices_help(ROUTER_RULES)


# Each field is an option of the CLI too: ``opt`` spells its flag, help and --help panel (options.py).
@dataclass
class DataOptions:
    """Which task text to profile and evaluate on."""

    task: str = opt(
        "superglue-rte", "--task", "-t", panel=DATA, note="See [Your own tasks](#your-own-tasks).",
        help="What to calibrate and evaluate on: a registered task (see `uncurl tasks`); hf:ORG/NAME[:CONFIG], a "
             "Hub dataset read with datasets.load_dataset (with --template; splits: --calibration-split, "
             "--evaluation-split); lm-eval:TASK or lm-eval:FILE.yaml, an lm-evaluation-harness task (optional "
             "extra: pip install 'uncurl-moe\\[lm-eval]'); a task file (.yaml/.json: template, choices, label field, files or Hub id; see "
             "README); or a .jsonl/.csv file with --template (one file: fixed seeded disjoint halves calibrate "
             "and evaluate; see --eval-file).",
        routes=dict(help="The inputs to route: any --task prune takes (a registered task, hf:ORG/NAME, lm-eval:TASK, a "
                         "task file, a .jsonl/.csv file with --template); --split picks the split. Or see --file."),
        monitor=dict(help="The traffic: any --task prune takes (a registered task, hf:ORG/NAME, lm-eval:TASK, a task "
                          "file, a .jsonl/.csv file with --template); --split picks the split. Or see --file."))
    data_dir: str | None = opt(  # else $UNCURL_DATA_DIR (tasks.resolve_data_dir); else the Hub
        None, "--data-dir", panel=DATA, envvar="UNCURL_DATA_DIR", readme_default="`$UNCURL_DATA_DIR`",
        help="Read tasks from local files laid out as ../shared/data instead of the Hub.")
    samples: int = opt(
        256, panel=DATA, min=1,
        help="Calibration examples to profile: a seeded random subset of the task's calibration split "
             "(all of it when smaller). Profiling time grows linearly with it; memory does not.",
        routes=dict(help="Inputs to read: a seeded random subset of the split (all of it when smaller)."),
        monitor=dict(help="Traffic examples to read: a seeded random subset of the split (all of it when smaller)."))
    max_length: int = opt(
        512, panel=DATA, min=8,
        help="Calibration: truncate each example to this many tokens (evaluation has --eval-max-length).",
        routes=dict(help="Truncate each input to this many tokens."),
        monitor=dict(help="Truncate each traffic example to this many tokens."))
    eval_max_length: int = opt(
        1024, panel=EVAL, min=8, note="`uncurl eval` calls it `--max-length`.",
        help="Evaluation: keep at most this many tokens of each sequence (from the right; the answer is never cut).",
        eval=dict(flags=("--max-length",), panel=DATA, note="`prune` and `sweep` call it `--eval-max-length`.",
                  help="Keep at most this many tokens of each sequence (from the right)."))
    batch_size: int = opt(8, panel=DATA, min=1, help="Examples per forward pass.")
    template: str | None = opt(
        None, panel=DATA,
        help="Custom and hf: tasks: a Python format string over a row's fields, e.g. '{question}\\nAnswer:'.")
    choices: tuple[str, ...] | None = opt(
        None, panel=DATA, parse=items,
        help="Custom and hf: tasks: comma-separated answer choices, the same for every row, e.g. 'yes,no'.")
    choices_field: str | None = opt(
        None, panel=DATA,
        help="Custom and hf: tasks: the field holding each row's own list of choices "
             "(in a .csv cell, a JSON array), instead of --choices.")
    label_field: str = opt(
        "label", panel=DATA,
        help="Custom and hf: tasks: the field holding the gold answer: an index, one of the "
             "choices, or a JSON boolean (a choice spelled true/false, else false=0, true=1).")
    eval_file: str | None = opt(
        None, panel=DATA,
        help="Custom .jsonl/.csv tasks: evaluate on this file and calibrate on all of --task's "
             "(default: fixed seeded disjoint halves of the one file; the same file: both read all).")
    calibration_split: str | None = opt(
        None, panel=DATA, readme_default="`train`", help="hf: tasks: the Hub split to calibrate on (default train).")
    evaluation_split: str | None = opt(
        None, panel=DATA, readme_default="`validation`",
        help="hf: tasks: the Hub split to evaluate on (default validation; the same as "
             "--calibration-split: fixed seeded disjoint halves of it).")
    calibrate_on: str | None = opt(
        None, panel=DATA, readme_default="`--task`",
        help="Profile on other tasks' calibration splits instead of --task's: one task (e.g. corpus, for "
             "task-agnostic calibration) or a weighted mix, e.g. 'superglue-rte=3,corpus=1' (--samples split "
             "3:1). Each part is recorded in the report and the profile.")
    chat_template: bool = opt(
        False, panel=DATA,
        help="Wrap each calibration and evaluation prompt as a user turn in the tokenizer's chat "
             "template (instruction-tuned models); the answer follows the template directly, "
             "as in lm-evaluation-harness. Recorded in the report.")
    progress: bool = False  # progress bars on stderr (the CLI: when stderr is a terminal)


@dataclass
class RunOptions(DataOptions):
    """Everything a pruning run shares with a sweep."""

    model: str = opt(
        "builtin:mixtral", "--model", "-m", panel=MODEL, note="The tiny models have a byte-level tokenizer.",
        help="Hub id (ORG/NAME), local transformers folder, or builtin:<family> for a seeded tiny random "
             "model (no files, no network; see `uncurl families`).")
    trust_remote_code: bool = opt(
        False, "--trust-remote-code", panel=MODEL, note="See [Remote code, model types and licences](#remote-code-model-types-and-licences).",
        help="Allow running Python code from the model's folder or Hub repo (the files its auto_map names), where "
             "transformers has no class of its own: a model type and architectures it lacks, or a tokenizer class it "
             "lacks (Kimi-K2's). Risk: that code runs with your permissions; read it first. Without this flag uncurl "
             "never runs a repo's code and never asks (such a model exits 2 naming the flag); a model transformers "
             "has, e.g. model_type kimi_k2 with architectures DeepseekV3ForCausalLM, loads natively either way.")
    method: str = opt(DEFAULT_METHOD, panel=PRUNE, help=METHOD_HELP,  # see cluster.METHODS
                      note="`centred` groups as REAM and Mosaic pruning do.")
    merge: str = opt(DEFAULT_MERGE, panel=PRUNE, help=MERGE_HELP,  # see merge.MERGE_RULES
                     note="`aligned` matches gate/up rows and down columns.")
    router_rows: str = opt(DEFAULT_ROUTER, "--router", "--router-rows", panel=PRUNE, help=ROUTER_HELP)
    protect_super_experts: bool = opt(
        False, "--protect-super-experts", panel=PRUNE,
        help="Never prune or merge away a super expert (Su et al. 2025, arXiv 2507.23279: a few experts whose "
             "down_proj outputs are extreme carry the massive activations): an expert whose peak |output| on the "
             "calibration tokens is above the 99.5th percentile of all experts' peaks and above a tenth of the "
             "largest, in the first 75% of MoE layers (REAP's rule), is kept as it is, counted within --keep. The "
             "rule is relative: it marks at least the largest peak. The report lists them with or without this "
             "flag; the plan needs every layer's peaks, so the prune profiles first, then merges (not in one "
             "visit per layer).")
    top_k: int | None = opt(  # must be <= keep
        None, panel=PRUNE, readme_default="unchanged", note="Then `--keep` may go down to it.",
        help="Lower the router's top-k explicitly (default: unchanged).",
        sweep=dict(help="Lower the router's top-k.", note=""))
    profile: str | None = opt(
        None, panel=PRUNE, help="Reuse a profile written by `uncurl profile` (skips the forward pass).",
        sweep=dict(help="Reuse a profile file."),
        monitor=dict(panel=DATA, help="A profile of the traffic through the parent, written by uncurl profile on "
                                      "the parent and the traffic, instead of profiling --task here; checked against "
                                      "the pruned model's parent."))
    overwrite: bool = opt(
        False, panel=PRUNE,
        help="Replace an earlier uncurl output at --out (uncurl's report/report.json or sweep.json); "
             "anything else is refused.",
        profile=dict(panel=None, help="Replace an earlier uncurl profile at --out (nothing else)."),
        routes=dict(panel=None, help="Replace an earlier uncurl routes output at --out (its routes.json); anything else is refused."),
        monitor=dict(panel=None, help="Replace an earlier uncurl monitor output at --out (its monitor.json); anything else is "
                          "refused."))
    seed: int = opt(0, panel=RUN, help="Seed for sampling, tiny models and clustering.")
    device: str = opt("auto", panel=RUN, help="auto (CUDA when present), cpu, cuda, cuda:N.")
    device_map: str | None = opt(
        None, panel=RUN, note="The pruned model keeps the same placement for evaluation.",
        help="Place a model too big for one GPU with accelerate: auto, balanced, balanced_low_0 or "
             "sequential. Layers fill the GPUs, then CPU memory, then disk; each layer is merged where it "
             "lives, offloaded ones one tensor at a time. See --max-memory.")
    max_memory: str | None = opt(
        None, panel=RUN, note="Point `$TMPDIR` at a real disk, not a tmpfs.",
        help="With --device-map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=60GiB'. What does not fit is "
             "offloaded to CPU memory, then to a temporary folder on disk (under $TMPDIR; deleted at exit).")
    dtype: str = opt("auto", panel=RUN, note="Merging is done in float32 and cast back.",
                     help="auto (the checkpoint's own), float32, bfloat16, float16.")
    eval_limit: int | None = opt(
        None, "--eval-limit", "--limit", panel=EVAL, min=1, readme_default="all",
        help="Evaluation examples: a seeded subset of the evaluation split (default: all of it).")
    metric: str = opt("acc", panel=EVAL, help="Metric a drop is measured on: acc, acc_norm (points of accuracy), "
                                               "exact_match (points, a generative task's), loss (its increase in "
                                               "percent), or agreement, acceptance (points of generation fidelity "
                                               "against the parent: see --gen-tokens).")
    gen_tokens: int | None = opt(
        None, panel=EVAL, min=1, readme_default=f"{DEFAULT_GEN_TOKENS} where measured",
        note="See [Generation fidelity](#generation-fidelity).",
        help="Generation fidelity: the parent greedily continues each evaluation prompt for this many tokens, then "
             "the pruned model is teacher-forced on them: top-1 agreement, expected speculative acceptance "
             "sum min(p, q), KL(parent || pruned) and the pruned model's NLL of the parent's tokens, means and "
             f"standard errors over prompts. Measured when given, with --metric agreement or acceptance "
             f"({DEFAULT_GEN_TOKENS} tokens), or with eval --parent.")
    pipeline: str = opt(
        "auto", panel=RUN, note="See [Models larger than the machine](#models-larger-than-the-machine).",
        help="How the model is run: whole (one forward of the whole model per batch), sequential (one decoder "
             "layer at a time over every batch: an offloaded layer's weights are read once instead of once per "
             "batch, and prune plans, merges and writes each layer while it is loaded, so the input is read once "
             "in all) or auto (sequential when --device-map leaves weights offloaded to CPU memory or disk, or an "
             "option needs it: --calibrate-through pruned, --recover-local, --merge fit (fitted in each layer's "
             "visit, with no second model; unless --recover, which needs the parent model); else whole). Both "
             "give the same statistics, so the same plan and checkpoint; whole holds one batch's states at a "
             "time, sequential every batch's (on the execution device). A looped stack (a layer run more than once "
             "per forward, inkling2_loop) is profiled layer by layer but merged after the whole profile.")
    extra: dict = field(default_factory=dict)  # merged into the report (e.g. the CLI's command line)


@dataclass
class PruneOptions(RunOptions, ServingOptions):
    keep: int = opt(
        4, "--keep", "-k", panel=PRUNE, note="For grouped routers, at least 2 per group.",
        help="Experts to keep per MoE layer (>= top-k; a multiple of n_group for grouped routers). "
             "Equal to the expert count reproduces the model exactly.")
    out: str = opt("pruned", "--out", "-o", panel=PRUNE,
                   help="Output folder: checkpoint + report/. Written whole or not at all.")
    shard_size: str = opt("5GB", panel=PRUNE, note="The index is `model.safetensors.index.json`.",
                          help="Largest safetensors shard, e.g. 5GB or 500MB; bigger checkpoints get an index file.")
    plots: bool = opt(True, panel=PRUNE, note="The plots take about a second per run.",
                      help="Draw report/usage.png and report/groups.png (expert usage and group maps); "
                           "--no-plots skips matplotlib, e.g. in a CI gate.")
    eval: bool = opt(False, "--eval", panel=EVAL,
                     help="Evaluate the task before and after pruning; both go in the report.")
    max_drop: float | None = opt(
        None, panel=EVAL,
        help="CI gate (implies --eval): exit 4 when --metric drops by more than this many points. "
             "The checkpoint and report are still written.")
    dequantize: bool = opt(
        False, "--dequantize", panel=PRUNE, note="See [Quantized checkpoints](#quantized-checkpoints).",
        help="A quantized input: write the pruned checkpoint in full precision (the checkpoint's dtype, or "
             "--dtype), without quantization_config, on purpose; also accepts schemes uncurl cannot write back, when "
             "transformers dequantizes them on load. Default: an FP8 block-scaled or MXFP4 input is written in its "
             "own format, kept experts byte for byte (merged ones quantized again); other schemes are refused.")
    recover: int = opt(  # >= 0, checked in check_options (a min= range would crowd --help's Pruning panel)
        0, "--recover", panel=PRUNE,
        help="After merging, train the pruned model's routers for this many steps (one calibration batch each; "
             "Adam, lr 1e-3) to match the parent's next-token distribution (KL on the logits) on the calibration "
             "texts only; seeded. With --eval the recovered weights are kept only if the task loss did not rise "
             "(the report says which). The parent is held in memory meanwhile. 0: off. Measured (README, 'Does it "
             "beat pruning?'; RTE, 60 steps, EAN at K=2 of 8): the routers alone close 19% (trained test bed) and "
             "40% (pretrained) of the task loss EAN loses; with --recover-experts 80% and 81%.")
    recover_experts: bool = opt(
        False, "--recover-experts", panel=PRUNE,
        help="With --recover or --recover-local: train the MoE experts' weights too (lr 1e-4). With --recover it "
             "closed 80-81% of EAN's K=2 loss gap, against 19-40% for the routers alone (see --recover); it costs a "
             "gradient and Adam's two moments for every expert weight of the pruned model (three more copies of "
             "them). Not measured with --recover-local.")
    recover_local: int = opt(  # >= 0, checked in check_through
        0, "--recover-local", panel=PRUNE,
        help="Layer by layer (auto turns it on): after merging each MoE block, train its router rows for this many "
             "steps (Adam, lr 1e-3, one calibration batch each; with --recover-experts its experts too, lr 1e-4) so "
             "that its output matches the original block's on that layer's own calibration inputs (squared error "
             "relative to the output's); kept only where it lowered that error. One layer in memory, no parent "
             "beside it. 0: off.")
    calibrate_through: str = opt(
        "original", panel=PRUNE,
        help="Layer by layer (--pipeline sequential; auto turns it on): the inputs of each layer come from the layers before it as they were "
             "(original: the one-pass profile, the same plan as --pipeline whole) or as pruned (pruned: each "
             "layer is planned on what the pruned model will feed it, as REAM and llm-compressor do).")


@dataclass
class EvalOptions(RunOptions):
    """What ``uncurl eval`` takes: a model and a task, and optionally the parent to measure fidelity against."""

    parent: str | None = opt(
        None, "--parent", panel=MODEL,
        help="The model --model was pruned from (Hub id, folder or builtin:<family>): also measure generation "
             "fidelity against it (see --gen-tokens). The parent runs first and is freed before --model is loaded; "
             "both must share a tokenizer.")


@dataclass
class ProfileOptions(RunOptions):
    """What ``uncurl profile`` takes: a run's model and data options, and the file to write."""

    out: str = opt("profile.safetensors", "--out", "-o", help="Profile file to write (safetensors).")
    shard: str | None = opt(
        None, note="`uncurl profile-merge OUT FILES...` adds the N files into one profile.",
        help="I/N (0 <= I < N): profile only shard I of N of the calibration texts (whole texts, contiguous, "
             "sizes differing by at most one), for a job array; the file records it.")


@dataclass
class CostOptions(RunOptions, ServingOptions):
    """What ``uncurl cost`` takes: a model, where to load it, and the serving assumptions."""


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
    profile: Profile | None
    n_group: int
    top_k_before: int
    top_k_after: int
    num_experts: int
    protect: dict = field(default_factory=dict)  # layer name -> super experts every plan keeps
    super_experts: dict | None = None  # the report's record of the super experts found (None: no peaks)


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
        out.append(T.Example(prompt, tuple(c[1:] if c.startswith(" ") else c for c in ex.choices), ex.gold, ex.answers))
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


PIPELINES = ("auto", "whole", "sequential")  # --pipeline


def pipeline_for(opts, loaded: Loaded) -> str:
    """What ``--pipeline`` runs for ``loaded``: auto is sequential when weights were left offloaded
    or an option needs it (--calibrate-through pruned, --recover-local), or for ``--merge fit`` in a
    prune that can go layer by layer (fitted in each layer's visit: no second model, and faster;
    not with --profile or --recover, nor in a sweep, whose fits run whole), else whole."""
    fitting = any(MERGE_RULES[m].fit for m in getattr(opts, "merge", "").split(",") if m in MERGE_RULES)
    asked = (getattr(opts, "calibrate_through", "original") == "pruned" or bool(getattr(opts, "recover_local", 0))
             or (fitting and can_go_layer_by_layer(opts) and not looped(loaded)))
    return "sequential" if _sequential(loaded.model, loaded.adapter, getattr(opts, "pipeline", "whole"), asked) \
        else "whole"


def looped(loaded: Loaded) -> range:
    """The decoder layers ``loaded``'s stack runs more than once per forward (adapters.looped_layers)."""
    return looped_layers(loaded.model.config, loaded.adapter) if loaded.adapter is not None else range(0)


def check_looped(opts, loaded: Loaded) -> None:
    """A looped stack's layers run again after their first visit, so they cannot be pruned on it:
    the options only a layer-by-layer prune runs are refused there (exit 2), before profiling."""
    layers = looped(loaded)
    through, local = getattr(opts, "calibrate_through", "original"), getattr(opts, "recover_local", 0)
    if layers and (through == "pruned" or local):
        flag = "--calibrate-through pruned" if through == "pruned" else "--recover-local"
        raise UncurlError(f"{loaded.model.config.model_type}: decoder layers {layers.start}-{layers.stop - 1} run more "
                          f"than once in one forward (a looped stack), so they cannot be pruned layer by layer, "
                          f"which {flag} needs; leave it out (the prune then profiles the whole stack first)")


def _sequential(model, adapter, pipeline: str, asked: bool = False) -> bool:
    """Whether ``pipeline`` runs ``model`` layer by layer: sequential does; auto does when weights
    are offloaded or ``asked``, for a family whose MoE blocks are in one list of decoder layers
    (else it runs whole, saying why)."""
    if pipeline != "auto":
        return pipeline == "sequential"
    if adapter is None or not (asked or offloaded_bytes(model)):
        return False
    try:
        decoder_layers(model, adapter)
    except UncurlError as err:  # its MoE blocks are not in one list of layers: the whole-model pass runs it
        log.warning("--pipeline auto: %s; running it whole", err)
        return False
    return True


def held_states(opts) -> dict | None:
    """What the memory preflight counts besides the weights (``load.states_needed``'s keywords): the
    calibration set's hidden states, held between layers unless the pipeline is ``whole``."""
    if getattr(opts, "pipeline", "whole") == "whole" or not hasattr(opts, "samples"):
        return None
    copies = 3 if getattr(opts, "calibrate_through", "original") == "pruned" else 2
    return {"samples": opts.samples, "max_length": opts.max_length, "copies": copies}


def profile_driver(name: str):
    """The profile driver ``--pipeline NAME`` (whole or sequential, ``pipeline_for``) runs, looked up
    when a run starts (a caller that replaces ``pipeline.profile_model`` is obeyed)."""
    return {"whole": profile_model, "sequential": profile_sequential}[name]


def check_pipeline(opts: DataOptions) -> None:
    pipeline = getattr(opts, "pipeline", "whole")
    if pipeline not in PIPELINES:
        raise UncurlError(f"--pipeline {pipeline!r} is not one of {', '.join(PIPELINES)}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard 1/4`` -> (1, 4); None without one."""
    if text is None:
        return None
    index, sep, count = text.strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise UncurlError(f"--shard {text!r} must be I/N with 0 <= I < N, e.g. 0/4 .. 3/4 for four shards")
    if distributed.world() is not None:
        raise UncurlError("--shard splits the texts over separate runs; under torchrun the ranks split them already")
    return i, n


def mtp_of(loaded: Loaded, opts) -> "MtpBlocks":
    """The input's MTP blocks (``mtp.py``) and whether this run prunes them: a prune does, and a
    profile records them; a sweep drops them (its checkpoints' configs announce none)."""
    if loaded.mtp is None:
        sweeping = not isinstance(opts, (PruneOptions, ProfileOptions))
        loaded.mtp = find_mtp(loaded, why="uncurl sweep does not prune MTP blocks yet" if sweeping else None)
    return loaded.mtp


def run_profile(loaded: Loaded, opts: DataOptions, seed: int = 0) -> Profile:
    """Profile ``loaded`` on the calibration split (the expensive pass): all of it, the shard
    ``--shard I/N`` names (recorded in the meta), or under torchrun this rank's share, gathered
    from every rank (``distributed``)."""
    texts, info = calibration_texts(opts, seed, loaded.tokenizer)
    meta = profile_meta(loaded, info, opts, seed)
    shard, ranks = parse_shard(getattr(opts, "shard", None)), distributed.world()
    index, count = shard or ranks or (0, 1)
    ids = text_share(len(texts), index, count, f"{count} ranks" if ranks else f"--shard {index}/{count}")
    if shard:
        meta["shard"] = {"index": index, "count": count, "of": len(texts), "texts": [ids.start, ids.stop]}
    torch.manual_seed(seed)
    driver = profile_driver(pipeline_for(opts, loaded))
    blocks = mtp_of(loaded, opts)
    profile = driver(loaded.model, loaded.tokenizer, loaded.adapter, [texts[i] for i in ids], text_ids=list(ids),
                     batch_size=opts.batch_size, max_length=opts.max_length, progress=opts.progress, meta=meta,
                     seed=seed, **({"mtp": blocks} if blocks.kept else {}))
    if ranks:
        profile = distributed.gather_profile(profile, input_device(loaded.model))
    check_profiled(profile)
    return profile


def text_share(n: int, index: int, count: int, what: str) -> range:
    """Share ``index`` of ``count`` of ``n`` calibration texts (``shard_range``); ``what`` (the
    ranks or the shard spec) is named when there are more shares than texts."""
    if count > n:
        raise UncurlError(f"{what}: more than the {n} calibration texts, so a share would be empty; use at most {n} "
                          f"(or more --samples)")
    return shard_range(n, index, count)


def profile_meta(loaded: Loaded, info: dict, opts: DataOptions, seed: int) -> dict:
    """What a profile records of where it came from (checked when it is reused: ``_check_profile``)."""
    return {"model": loaded.model_id, "model_type": loaded.model.config.model_type,
            "router_fingerprint": router_fingerprint(loaded.model, loaded.adapter), "task": info,
            "seed": seed, "max_length": opts.max_length, "versions": versions()}


def check_profiled(profile: Profile) -> None:
    for name, stats in profile.layers.items():  # finite weights can still overflow (e.g. float16)
        if not all(bool(torch.isfinite(getattr(stats, f)).all()) for f in ("mass", "logit_sum", "gram")):
            raise UncurlError(f"the router of {name} gave NaN/Inf logits on the calibration text; the weights are "
                              f"finite, so the activations overflowed: try --dtype float32 or bfloat16")


def eval_layers(model, opts) -> object | None:
    """The adapter to evaluate ``model`` layer by layer with (``_sequential``), or None: whole-model
    forwards (a dense model, one uncurl has no adapter for, is always run whole)."""
    from .adapters import ADAPTERS

    adapter = ADAPTERS.get(model.config.model_type)
    return adapter if adapter is not None and _sequential(model, adapter, getattr(opts, "pipeline", "whole")) else None


def eval_examples(tokenizer, opts: DataOptions, limit: int | None, seed: int = 0) -> tuple[T.Task, list[T.Example]]:
    """The task and its evaluation examples as evaluation reads them (a seeded subset of ``limit``)."""
    task = resolve_task(opts)
    examples = T.load_examples(task, "evaluation", opts.data_dir, limit=limit, seed=seed)
    if opts.chat_template:
        examples = chat_wrap(examples, tokenizer)
    return task, examples


FIDELITY_METRICS = ("agreement", "acceptance")  # --metric values measured against the parent (fidelity.py)


def fidelity_tokens(opts) -> int | None:
    """How many tokens the parent generates for the fidelity measure (--gen-tokens, or its default
    where --metric agreement/acceptance or eval --parent asks for the measure); None: not measured."""
    n = getattr(opts, "gen_tokens", None)
    if n is None and (getattr(opts, "metric", None) in FIDELITY_METRICS or getattr(opts, "parent", None)):
        n = DEFAULT_GEN_TOKENS
    return n


def parent_reference(model, tokenizer, opts: DataOptions, limit: int | None, seed: int = 0) -> Reference | None:
    """The parent's greedy continuations of the evaluation prompts and its distributions over them
    (``fidelity.build_reference``), computed once so that the parent need not be held beside a pruned
    model; None where fidelity is not measured (``fidelity_tokens``)."""
    n = fidelity_tokens(opts)
    if n is None:
        return None
    _, examples = eval_examples(tokenizer, opts, limit, seed)
    return build_reference(model, tokenizer, [ex.prompt for ex in examples], n, max_length=opts.eval_max_length,
                           batch_size=opts.batch_size, adapter=eval_layers(model, opts), progress=opts.progress,
                           fingerprint=T.data_fingerprint(examples))


def run_eval(model, tokenizer, opts: DataOptions, limit: int | None, seed: int = 0, per_example: bool = False,
             reference: Reference | None = None) -> dict:
    """The task's evaluation split scored as lm-evaluation-harness would (see evaluate.py);
    ``per_example`` adds each example's figures (``evaluate_examples``). An offloaded model (or
    --pipeline sequential) is run layer by layer (``eval_layers``). ``reference``: also the
    generation fidelity against the parent it was made from (``parent_reference``; fidelity.py)."""
    task, examples = eval_examples(tokenizer, opts, limit, seed)
    layers = eval_layers(model, opts)
    metrics = evaluate_examples(model, tokenizer, examples, batch_size=opts.batch_size,
                                max_length=opts.eval_max_length, progress=opts.progress, per_example=per_example,
                                layers_of=layers)
    out = {"task": task.name, "fingerprint": T.data_fingerprint(examples), "split": task.split_note,
           "chat_template": opts.chat_template, **metrics}
    if task.generative:  # exact match of greedy generations, as lm-eval scores generate_until (generate.py)
        generations = generate(model, tokenizer, [ex.prompt for ex in examples], task.generation,
                               max_length=opts.eval_max_length, batch_size=opts.batch_size, adapter=layers,
                               progress=opts.progress)
        scored = score_generations(generations, [ex.answers for ex in examples], task.generation)
        rows = scored.pop("rows")
        out.update(scored)
        if per_example:
            out["examples"] = [{**row, **share} for row, share in zip(rows, out.get("examples") or [{}] * len(rows))]
    if reference is not None:
        if reference.fingerprint != out["fingerprint"]:
            raise UncurlError(f"the parent's continuations were made on other evaluation examples (fingerprint "
                              f"{reference.fingerprint}, now {out['fingerprint']}): score with the same --task, "
                              f"--eval-limit and --seed")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out.update(score_fidelity(model, reference, batch_size=opts.batch_size, pad_id=pad_id or 0, adapter=layers,
                                  progress=opts.progress))
    return out


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
    if "shard" in meta:
        shard = meta["shard"]
        raise UncurlError(f"--profile {path} is shard {shard['index']}/{shard['count']} of the calibration texts "
                          f"only: add the {shard['count']} shard files with `uncurl profile-merge OUT FILES...` and "
                          f"pass OUT")
    if meta.get("model_type") not in (None, model_type):
        raise UncurlError(f"{recorded_on}, a {meta['model_type']} model; {loaded.model_id!r} is a {model_type} model: "
                          f"profile this model with `uncurl profile`")
    e = expert_count(loaded.model.config, loaded.adapter)
    names = {layer.name for layer in find_moe_layers(loaded.model, loaded.adapter)}
    extra = set(mtp_of(loaded, opts).names)  # a profile may hold the MTP blocks' statistics too
    if set(profile.layers) - extra != names or any(s.num_experts != e for s in profile.layers.values()):
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


def can_go_layer_by_layer(opts) -> bool:
    """Before loading: whether this run could prune layer by layer (a prune, not --pipeline whole,
    and ``layer_by_layer``'s other conditions); auto turns it on for the options that need it."""
    return isinstance(opts, PruneOptions) and layer_by_layer(opts, "whole" if opts.pipeline == "whole" else "sequential")


def check_through(opts) -> None:
    """The options that only a layer-by-layer prune runs: --calibrate-through pruned, --recover-local."""
    from .layerwise import check_through as check_value

    through, local = getattr(opts, "calibrate_through", "original"), getattr(opts, "recover_local", 0)
    check_value(through)
    if local < 0:
        raise UncurlError(f"--recover-local {local} must be a number of steps >= 0 (0: off)")
    if local and distributed.world() is not None:
        raise UncurlError("--recover-local under torchrun is not supported yet: each rank would train the routers on "
                          "its share of the calibration texts alone; run it in one process")
    for flag, used, what in (("--calibrate-through pruned", through == "pruned", "feeds each layer the pruned layers' "
                              "outputs"), ("--recover-local", local, "trains each pruned block on its layer's inputs")):
        if used and not can_go_layer_by_layer(opts):
            why = ("--pipeline sequential or auto" if opts.pipeline == "whole" else
                   "a run that profiles here (no --profile)" if opts.profile else
                   "no --recover (it distils the whole model after merging)")
            raise UncurlError(f"{flag} {what} while pruning layer by layer, so it needs {why}")


def check_options(opts: RunOptions, evaluating: bool) -> None:
    """Cheap checks of everything that does not need the model, before loading it."""
    check_family(opts.model)  # a refused family says why before any data is read
    check_pipeline(opts)
    for method in opts.method.split(","):
        get_method(method)
    for merge in opts.merge.split(","):
        if merge != AUTO_MERGE and merge not in MERGE_RULES:
            raise UncurlError(f"--merge {merge!r} is not one of {', '.join([AUTO_MERGE, *MERGE_RULES])}")
        if merge != AUTO_MERGE and MERGE_RULES[merge].fit and opts.device_map and not can_go_layer_by_layer(opts):
            raise UncurlError(f"--merge {merge} under --device-map runs layer by layer (prune with --pipeline auto or "
                              f"sequential, profiling here, without --recover): the whole-model fit holds the original "
                              f"model beside the merged one")
    for rule in opts.router_rows.split(","):
        get_rule(ROUTER_RULES, rule, "--router")
    if getattr(opts, "recover", 0) < 0:
        raise UncurlError(f"--recover {opts.recover} must be a number of steps >= 0 (0: no recovery)")
    if getattr(opts, "recover", 0) and opts.device_map:
        raise UncurlError("--recover does not run under --device-map yet (it trains beside the parent model); "
                          "use a device that holds both")
    if opts.metric not in METRICS:
        raise UncurlError(f"--metric {opts.metric!r} is not one of {', '.join(METRICS)}")
    for name, flag in DROP_BOUNDS.items():
        value = getattr(opts, name, None)
        if value is not None and not 0 <= value < math.inf:
            raise UncurlError(f"{flag} {value:g} is not accepted: it is the largest acceptable drop in --metric, a "
                              f"number of points >= 0, e.g. 1.0")
    if opts.top_k is not None and opts.top_k < 1:
        raise UncurlError(f"--top-k {opts.top_k} must be at least 1")
    check_through(opts)
    methods = opts.method.split(",")
    calibrated = needs_calibration(methods)
    if not calibrated:
        free = ", ".join(methods)
        for flag, used in (("--protect-super-experts", opts.protect_super_experts), ("--profile", opts.profile),
                           ("--recover", getattr(opts, "recover", 0)), ("--recover-local", getattr(opts, "recover_local", 0)),
                           ("--calibrate-through pruned", getattr(opts, "calibrate_through", "original") == "pruned"),
                           *((f"--merge {m}", MERGE_RULES[m].fit) for m in opts.merge.split(",") if m in MERGE_RULES)):
            if used:
                raise UncurlError(f"--method {free} ranks experts from the weights alone, with no calibration pass; "
                                  f"{flag} needs calibration text: drop it, or add a method that profiles")
    # a fit (auto's choice too) reads the calibration texts again, with --profile as well
    fits = calibrated and any(may_fit(m) for m in opts.merge.split(","))
    task = check_data(opts, calibrating=(calibrated and not opts.profile) or fits, evaluating=evaluating,
                      eval_limit=opts.eval_limit, seed=opts.seed)
    if getattr(opts, "gen_tokens", None) is not None and opts.gen_tokens < 1:
        raise UncurlError(f"--gen-tokens {opts.gen_tokens} must be at least 1")
    if evaluating and opts.metric in ("acc", "acc_norm") and task.num_choices == 0:
        other = "exact_match or loss" if task.generative else "loss"
        raise UncurlError(f"task {task.name} has no answer choices, so no {opts.metric}; use --metric {other}")
    if evaluating and opts.metric == "exact_match" and not task.generative:
        raise UncurlError(f"task {task.name} has no reference answers to generate, so no exact_match; --metric "
                          f"exact_match is for generative tasks (a task file with answer_field, or an lm-eval "
                          f"generate_until task)")


def run_inputs(opts: RunOptions) -> list[tuple[str, Path, bool]]:
    """What a run reads from disk, known before loading, as ``output.check_out`` takes it: (what,
    path, whether an output inside it is refused too)."""
    found = [("the input model folder", Path(opts.model), True)] if Path(opts.model).is_dir() else []
    data_dir = T.resolve_data_dir(opts.data_dir)
    for what, path in (("the --profile file", opts.profile), ("the --data-dir folder", data_dir),
                       ("the --task file", opts.task), ("the --eval-file", opts.eval_file),
                       ("the --file of inputs", getattr(opts, "file", None))):  # routes, monitor
        if path and Path(path).exists():
            found.append((what, Path(path), False))
    return found


def loaded_inputs(loaded: Loaded) -> list[tuple[str, Path, bool]]:
    """What the loaded model was read from: its folder and, for a folder of links (a Hub snapshot),
    the folders the links point into."""
    if loaded.source is None:
        return []
    targets = {p.resolve().parent for p in loaded.source.iterdir() if p.is_symlink()}
    return [("the input model folder", loaded.source, True)] + [
        ("the folder the input model's files link into", t, False) for t in sorted(targets)]


def loaded_check(output: Claim, keeps: list[int], copies: int = 1, dequantize: bool = False):
    """``prepare``'s check once the model is loaded, before profiling: ``--out`` is not (in) what it
    was read from, and its file system has room for ``copies`` checkpoints per K in ``keeps`` (a
    quantized input's as stored, unless ``dequantize``)."""
    def check(loaded: Loaded) -> None:
        output.check(loaded_inputs(loaded))
        if copies:
            n = copies * len(keeps)
            stored = 1.0 if loaded.quantized is None or dequantize else (
                loaded.quantized.stored_bytes / max(weight_bytes(loaded.model), 1))  # bytes on disk per byte held
            need = copies * sum(expected_bytes(loaded.model, loaded.adapter, k) for k in keeps)
            output.check_space(int(need * stored), "the checkpoint" if n == 1 else f"the {n} checkpoints")
    return check


def prepare(opts: RunOptions, keeps: list[int], timings: Timings, *, check_loaded=None,
            profiling: bool = True) -> Prepared:
    """Load the model, validate every K against it, then profile (or read --profile; neither when
    not ``profiling``: the profile is then None, for the caller to make).
    ``check_loaded(loaded)`` runs between loading and profiling (see ``loaded_check``). A --profile
    file is read and checked (``Profile.load``) before the model is loaded."""
    profile = Profile.load(opts.profile) if opts.profile else None
    with timings.stage("load"):
        loaded = load_model(opts.model, device=distributed.rank_device(opts.device), dtype=opts.dtype,
                            seed=opts.seed, device_map=opts.device_map, max_memory=opts.max_memory,
                            dequantize=getattr(opts, "dequantize", False), states=held_states(opts),
                            trust_remote_code=opts.trust_remote_code)
    if loaded.quantized is not None:
        log.info("%s is %s: the profile runs on its weights, dequantized as they are read", opts.model,
                 loaded.quantized.format)
    if check_loaded is not None:
        check_loaded(loaded)
    config, adapter = loaded.model.config, loaded.adapter
    n_experts, k_before = expert_count(config, adapter), top_k(config, adapter)
    if opts.top_k is not None and opts.top_k > k_before:
        raise UncurlError(f"--top-k {opts.top_k} is above this model's own top-k ({k_before}) in the config's "
                          f"{adapter.top_k_key}: --top-k only lowers "
                          f"it; pass 1..{k_before}, or leave it out to keep {k_before}")
    k_after = opts.top_k if opts.top_k is not None else k_before
    n_group, topk_group = routing_groups(config, adapter)
    keys = f"the config's {adapter.expert_count_key}"
    k_from = "--top-k" if opts.top_k is not None else f"the config's {adapter.top_k_key}"
    for keep in keeps:
        validate_keep(n_experts, keep, k_after, n_group, topk_group, top_k_from=k_from, experts_from=keys)
    prep = Prepared(loaded, None, n_group, k_before, k_after, n_experts)
    if opts.profile:
        with timings.stage("profile"):
            prep.profile = profile
            _check_profile(prep.profile, loaded, opts.profile, opts)
            blocks = mtp_of(loaded, opts)
            if any(name not in prep.profile.layers for name in blocks.names):
                blocks.drop(f"the --profile file {opts.profile} has no statistics of them (record it with "
                            f"`uncurl profile` of this uncurl version)")
            for name in set(prep.profile.layers) - {layer.name for layer in find_moe_layers(loaded.model, adapter)} \
                    - set(blocks.names):  # MTP statistics of blocks this run drops
                del prep.profile.layers[name]
                prep.profile.layer_index.pop(name, None)
    elif profiling or not needs_calibration(opts.method.split(",")):
        with timings.stage("profile"):
            prep.profile = make_profile(loaded, opts)
    if prep.profile is not None:
        profiled(prep, opts, keeps)
    return prep


def make_profile(loaded: Loaded, opts: RunOptions) -> Profile:
    """The statistics the run's methods need: the calibration pass (``run_profile``), or for
    data-free methods only (``Method.calibration``) an empty profile, with no forward pass."""
    if needs_calibration(opts.method.split(",")):
        return run_profile(loaded, opts, opts.seed)
    mtp_of(loaded, opts).drop(f"--method {opts.method} ranks experts from the weights of the main layers only")
    layers = find_moe_layers(loaded.model, loaded.adapter)
    meta = {"model": loaded.model_id, "model_type": loaded.model.config.model_type,
            "router_fingerprint": router_fingerprint(loaded.model, loaded.adapter),
            "task": {"name": resolve_task(opts).name, "calibration_examples": 0, "fingerprint": "none",
                     "source": "none (a data-free method: experts ranked from their weights alone)"},
            "seed": opts.seed,
            "versions": versions()}
    return Profile({layer.name: LayerStats(layer.num_experts, 0, opts.seed + layer.index) for layer in layers},
                   {layer.name: layer.index for layer in layers}, meta)


def profiled(prep: Prepared, opts: RunOptions, keeps: list[int]) -> None:
    """Once ``prep.profile`` is there: the data-free methods' scores put in each layer's statistics
    (read from the weights, one layer at a time), and the super experts found (``find_super``)."""
    free = [m for m in dict.fromkeys(opts.method.split(",")) if not get_method(m).calibration]
    if free:
        loaded = prep.loaded
        for layer in find_moe_layers(loaded.model, loaded.adapter):
            tensors = weight_matrices(loaded, layer)
            for m in free:
                prep.profile.layers[layer.name].scores[m] = get_method(m).weigh(tensors).cpu()
            del tensors
    find_super(prep, opts, keeps)


def weight_matrices(loaded: Loaded, layer) -> dict[str, torch.Tensor]:
    """{name: [E, ...]} the expert weight matrices of ``layer`` (the adapter's neuron tensors, biases
    left out), read from accelerate's offload too; a quantized input's are read as stored."""
    from .offload import read_tensor

    state = loaded.model.state_dict()
    prefix = f"{layer.name}.{loaded.adapter.experts_attr}."
    names = dict.fromkeys(axis.tensor for axis in loaded.adapter.neurons)
    out = {n: read_tensor(loaded.model, prefix + n, state.get(prefix + n)) for n in names if prefix + n in state}
    return {n: t for n, t in out.items() if t.dim() >= 3}


def find_super(prep: Prepared, opts: RunOptions, keeps: list[int]) -> None:
    """The super experts of ``prep.profile`` by REAP's rule on the per-expert peak |output|
    (``cluster.super_experts``), recorded for the report; with --protect-super-experts kept in every
    plan, each K checked to hold them."""
    layers = prep.profile.layers
    if not layers or prep.profile.tokens == 0 or any("peak" in s.missing for s in layers.values()):
        if getattr(opts, "protect_super_experts", False):
            raise UncurlError("--protect-super-experts needs the profile statistic 'peak' (each expert's largest "
                              "|output|), which this profile lacks; profile again with this version of uncurl")
        return
    found, threshold = super_experts({n: s.peak for n, s in layers.items()}, prep.profile.layer_index)
    protect = bool(getattr(opts, "protect_super_experts", False))
    prep.super_experts = {
        "rule": f"peak |expert output| above the {SUPER_QUANTILE * 100:g}th percentile of all experts' peaks and "
                f"above {SUPER_FRACTION:g} x the largest, in the first {SUPER_LAYERS:.0%} of MoE layers (REAP)",
        "threshold": threshold, "largest_peak": max(float(s.peak.max()) for s in layers.values()),
        "protected": protect, "layers": found}
    if found:
        log.info("super experts (%s): %s", "protected" if protect else "not protected", found)
    if protect:
        for keep in keeps:
            for name, experts in found.items():
                check_protected(experts, keep, prep.num_experts, prep.n_group, where=f"MoE layer {name}")
        prep.protect = found


def fallback_method(method: str, missing: bool, warn: bool = True) -> str:
    """The method a run really uses: the default falls back to frequency (logged when ``warn``) on
    statistics without expert outputs (``missing``: llama4, longcat_flash, the recorder cannot see
    their experts)."""
    if method == DEFAULT_METHOD and missing:
        if warn:
            log.warning("this profile has no expert-output statistics; the default --method %s falls back to "
                        "frequency", DEFAULT_METHOD)
        return "frequency"
    return method


def may_fit(merge: str) -> bool:
    """Whether ``--merge merge`` fits: a fitting rule, or auto (where the fit applies)."""
    return merge == AUTO_MERGE or (merge in MERGE_RULES and MERGE_RULES[merge].fit)


def fit_refused(opts, loaded: Loaded, layerwise: bool) -> str | None:
    """Why ``--merge fit`` cannot run on this model with these options (None: it can). ``layerwise``:
    whether the prune would go layer by layer."""
    from .fit import unfittable

    if not needs_calibration(opts.method.split(",")):
        return f"--method {opts.method} ranks experts from the weights alone (the fit needs calibration text)"
    if loaded.quantized is not None and not getattr(opts, "dequantize", False):
        return f"the {loaded.quantized.format} input is written back in its format, byte for byte (--dequantize fits)"
    if opts.device_map and not layerwise:
        return "under --device-map the whole-model fit would hold the original model beside the merged one"
    return next((why for layer in find_moe_layers(loaded.model, loaded.adapter)
                 if (why := unfittable(layer.experts, layer.name))), None)


def resolved(opts, loaded: Loaded):
    """``opts`` with ``--merge auto`` resolved (``merge_used``), the pipeline that then runs, and
    the report's record of it: (opts, pipeline, {"merge_requested", "merge_reason"} or {}). Whether
    the fit applies depends on whether the prune would go layer by layer, which auto picks for a
    fit: so the pipeline is first taken as if fitting."""
    if AUTO_MERGE not in opts.merge.split(","):
        return opts, pipeline_for(opts, loaded), {}
    trial = replace(opts, merge=",".join("fit" if m == AUTO_MERGE else m for m in opts.merge.split(",")))
    layerwise = isinstance(opts, PruneOptions) and layer_by_layer(trial, pipeline_for(trial, loaded), loaded)
    merge, why = merge_used(opts, loaded, layerwise)
    record = {"merge_requested": opts.merge, **({"merge_reason": f"not fit: {why}"} if why else {})}
    opts = replace(opts, merge=merge)
    return opts, pipeline_for(opts, loaded), record


def merge_used(opts, loaded: Loaded, layerwise: bool) -> tuple[str, str | None]:
    """``opts.merge`` as this run applies it: ``auto`` is ``fit`` where the fit applies, else
    ``aligned``; and why not the fit (None where it ran, or auto was not asked), logged too."""
    merges = opts.merge.split(",")
    if AUTO_MERGE not in merges:
        return opts.merge, None
    why = fit_refused(opts, loaded, layerwise)
    if why:
        log.warning("--merge %s: aligned, since %s", AUTO_MERGE, why)
    return ",".join(dict.fromkeys("aligned" if m == AUTO_MERGE and why else "fit" if m == AUTO_MERGE else m
                                  for m in merges)), why


def method_used(prep: Prepared, method: str) -> str:
    """``fallback_method`` for a whole profile."""
    return fallback_method(method, any(outputs_missing(stats) for stats in prep.profile.layers.values()))


def outputs_missing(stats) -> bool:
    """Whether the recorder could not see this layer's expert outputs (not merely an older profile
    without a later statistic such as ``peak``)."""
    return "ean_sum" in stats.missing


def plan_all(prep: Prepared, keep: int, method: str, seed: int) -> dict[str, LayerPlan]:
    return {name: plan_layer(stats, keep, method, prep.n_group, seed, prep.protect.get(name, ()))
            for name, stats in prep.profile.layers.items()}


def fit_after_merge(loaded: Loaded, pruned, plans: dict[str, LayerPlan], opts: RunOptions) -> dict:
    """``--merge fit``: ``pruned``'s down projections fitted (in place) to ``loaded.model``'s routed
    outputs on the calibration texts (``fit.fit_model``); the report's ``fit`` entry."""
    texts, _ = calibration_texts(opts, opts.seed, loaded.tokenizer)
    return fit_model(loaded.model, pruned, loaded.adapter, plans, loaded.tokenizer, texts, batch_size=opts.batch_size,
                     max_length=opts.max_length, progress=opts.progress)


def recover_after_merge(loaded: Loaded, pruned, opts: "PruneOptions"):
    """``--recover STEPS``: distil ``loaded.model``'s logits into ``pruned`` on the calibration texts
    (``recover.recover``); returns the ``Recovery`` (report entry, and a way back)."""
    texts, _ = calibration_texts(opts, opts.seed, loaded.tokenizer)
    return recover(pruned, loaded.model, loaded.adapter, loaded.tokenizer, texts, steps=opts.recover, seed=opts.seed,
                   experts=opts.recover_experts, batch_size=opts.batch_size, max_length=opts.max_length,
                   progress=opts.progress)


def check_changes_stored(opts: "PruneOptions", loaded: Loaded) -> None:
    """A quantized input is written back with its kept experts' and routers' bytes as they were
    stored (``quant.py``): what ``--merge fit`` and ``--recover`` change there would be lost, so they
    need ``--dequantize``. Runs once the model is loaded, before profiling."""
    if loaded.quantized is None or opts.dequantize:
        return
    fitting = opts.merge != AUTO_MERGE and MERGE_RULES[opts.merge].fit  # auto goes aligned there
    for used, flag in ((fitting, f"--merge {opts.merge}"), (opts.recover, "--recover")):
        if used:
            raise UncurlError(f"{flag} changes kept experts and routers, which a {loaded.quantized.format} checkpoint "
                              f"is written back with byte for byte: add --dequantize to write it in full precision")


def judge_local(local: dict, unrecovered: dict, model, tokenizer, opts, evaluation: dict) -> None:
    """With --eval and --recover-local: the task loss with and without the recovery, in the report
    (``local["task_loss"]``, ``evaluation["merged"]``), and a warning where the recovery raised it.
    The model without it is ``model`` (the written checkpoint, loaded back) with the trained router
    tensors put back as they were (``unrecovered``), then restored. The checkpoint keeps the
    recovery: it was written layer by layer. Not compared when the experts were trained too
    (holding them twice would cost a pruned model's experts), nor for tensors left offloaded."""
    state = model.state_dict()
    why = ("the experts were trained too (--recover-experts)" if opts.recover_experts else
           "no block kept a recovery" if not unrecovered else
           "its router tensors are offloaded" if any(state[n].device.type == "meta" for n in unrecovered) else None)
    if why:
        local["task_loss"] = {"compared": False, "why": why}
        return
    trained = {n: state[n].detach().clone() for n in unrecovered}
    with torch.no_grad():
        for n, t in unrecovered.items():
            state[n].copy_(t)
        try:
            evaluation["merged"] = run_eval(model, tokenizer, opts, opts.eval_limit, opts.seed)
        finally:
            for n, t in trained.items():
                state[n].copy_(t)
    merged, after = evaluation["merged"]["loss"], evaluation["after"]["loss"]
    local["task_loss"] = {"compared": True, "before_recovery": merged, "after_recovery": after,
                          "raised": after > merged}
    if after > merged:
        log.warning("--recover-local raised the task loss from %.4f to %.4f (while each block's error fell); the "
                    "checkpoint keeps it: prune again without --recover-local for the lower loss", merged, after)


def judge_recovery(recovery, evaluation: dict) -> None:
    """With --eval: keep the recovered weights only if the task loss did not rise over the merged
    model's (``evaluation["merged"]``); else put the merged weights back and say so in the report."""
    merged, after = evaluation["merged"]["loss"], evaluation["after"]["loss"]
    rep = recovery.report
    rep["task_loss"] = {"before_recovery": merged, "after_recovery": after}
    rep["kept"] = not after > merged
    if not rep["kept"]:
        recovery.restore()
        evaluation["recovered_discarded"] = evaluation["after"]
        evaluation["after"] = evaluation["merged"]
        rep["note"] = (f"recovery raised the task loss ({merged:.4f} -> {after:.4f} on the evaluation split): the "
                       f"checkpoint is the model before recovery")
        log.warning("--recover: %s", rep["note"])
    else:
        rep["note"] = f"recovery changed the task loss {merged:.4f} -> {after:.4f} on the evaluation split: kept"


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
        "offload_reads_bytes": timings.reads,  # per stage, for a model under --device-map (else empty)
    }


def follow(opts: RunOptions, keeps: list[int]) -> None:
    """A data-parallel run's rank other than 0: load, check every K, profile this rank's share and
    hand the statistics to every rank (``distributed``); rank 0 does the rest. Never touches ``--out``."""
    if not opts.profile:
        prepare(opts, keeps, Timings())
    return None


def follow_prune(opts: PruneOptions, shard_size: int) -> None:
    """``follow`` for prune: a layer-by-layer prune's other ranks take their share of every layer
    (the statistics gathered per layer) and write nothing."""
    prep = prepare(opts, [opts.keep], Timings(), profiling=False)
    opts, pipeline, _ = resolved(opts, prep.loaded)
    if layer_by_layer(opts, pipeline, prep.loaded):
        _prune_layerwise(opts, prep, None, shard_size, Timings())
    elif not opts.profile:
        run_profile(prep.loaded, opts, opts.seed)
    return None


def check_serving(opts: ServingOptions) -> None:
    """The serving options, before any model is loaded."""
    from .cost import parse_bytes

    parse_bytes(opts.gpu_memory)
    if not opts.serving_seconds > 0 or math.isinf(opts.serving_seconds):
        raise UncurlError(f"--serving-seconds {opts.serving_seconds:g} must be a positive number of seconds, e.g. 60")


def cost(opts: CostOptions) -> dict:
    """``uncurl cost``: the serving cost of one model (any causal LM uncurl loads; a dense one has no
    experts), with ``--measure-serving`` its measured throughput on this device."""
    check_family(opts.model)
    check_serving(opts)
    with library_caches():  # cost writes nothing: the libraries' caches in a folder removed after
        return _cost(opts)


def _cost(opts: CostOptions) -> dict:
    timings = Timings()
    with timings.stage("load"):
        loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype, seed=opts.seed,
                            device_map=opts.device_map, max_memory=opts.max_memory, moe=False,
                            trust_remote_code=opts.trust_remote_code)
    with timings.stage("cost"):
        c = serving_cost(loaded.model, loaded.adapter, gpu_memory=opts.gpu_memory, context=opts.context,
                         batch=opts.serving_batch)
    out = {"model": opts.model, "model_type": loaded.model.config.model_type, "moe": loaded.adapter is not None,
           "cost": c.as_dict(), "table": cost_table(c)}
    if opts.measure_serving:
        with timings.stage("serving"):
            out["measured"] = measure_serving(loaded.model, opts, opts.seed)
    out["timings_s"] = timings
    return out


def prune(opts: PruneOptions) -> PruneResult | None:
    """load -> (validate) -> profile -> cluster -> merge -> save + verify -> report (+ eval, gate).
    ``--out`` is checked and claimed first and held to the end (see ``output.claim``). Under
    torchrun, ranks other than 0 profile their share and return None (``follow``)."""
    evaluating = opts.eval or opts.max_drop is not None
    check_options(opts, evaluating)
    check_serving(opts)
    shard_size = parse_shard_size(opts.shard_size)
    if distributed.follower():
        with library_caches():  # this rank writes nothing: its caches in a folder removed after
            return follow_prune(opts, shard_size)
    with claim(opts.out, overwrite=opts.overwrite, inputs=run_inputs(opts)) as output:
        return _prune(opts, output, shard_size, evaluating)


def layer_by_layer(opts: PruneOptions, pipeline: str, loaded: Loaded | None = None) -> bool:
    """Whether ``prune`` profiles, merges and writes each layer in one visit (``layerwise.py``): when
    the pipeline run is sequential (``pipeline_for``), unless a profile file is given, --recover
    needs the original model after the merge, or ``loaded`` is a looped stack (``looped``: a layer
    runs again after its visit). Under torchrun every rank
    takes its share of the batches through each layer (``distributed.gather_layer``)."""
    return (pipeline == "sequential" and not opts.profile and not opts.recover and not opts.protect_super_experts
            and needs_calibration(opts.method.split(",")) and not (loaded is not None and looped(loaded)))


def _plan_one(prep: Prepared, keep: int, method: str, seed: int, used: set):
    """One layer's plan as ``plan_all`` makes it, the method by ``fallback_method`` (said once);
    ``used`` collects the methods run."""
    def plan(name: str, stats) -> LayerPlan:
        m = fallback_method(method, outputs_missing(stats), warn=not used)
        used.add(m)
        return plan_layer(stats, keep, m, prep.n_group, seed)
    return plan


def _prune(opts: PruneOptions, output: Claim, shard_size: int, evaluating: bool) -> PruneResult:
    timings = Timings()
    checks = loaded_check(output, [opts.keep], dequantize=opts.dequantize)

    def check_loaded(loaded: Loaded) -> None:
        checks(loaded)
        check_changes_stored(opts, loaded)
        check_looped(opts, loaded)

    prep = prepare(opts, [opts.keep], timings, check_loaded=check_loaded, profiling=False)  # profiled below
    opts, pipeline, auto = resolved(opts, prep.loaded)
    with counting(prep.loaded.model):  # accelerate's own reads of offloaded weights counted too (report)
        return _pruned(opts, output, shard_size, evaluating, timings, prep, pipeline, auto)


def _pruned(opts: PruneOptions, output: Claim, shard_size: int, evaluating: bool, timings: Timings, prep: Prepared,
            pipeline: str, auto: dict | None = None) -> PruneResult:
    layerwise = layer_by_layer(opts, pipeline, prep.loaded)
    out = output.path
    loaded, adapter = prep.loaded, prep.loaded.adapter
    if layerwise and loaded.quantized is not None and not opts.dequantize:
        log.info("%s is written back in its %s format from the whole model's tensors: profiling layer by layer, "
                 "then merging", opts.model, loaded.quantized.format)
        layerwise = False
    if prep.profile is None and not layerwise:
        with timings.stage("profile"):
            prep.profile = make_profile(loaded, opts)
        profiled(prep, opts, [opts.keep])
    evaluation, reference = {}, None
    if evaluating:
        with timings.stage("eval_before"):  # the parent's continuations kept (CPU) for after: fidelity.py
            reference = parent_reference(loaded.model, loaded.tokenizer, opts, opts.eval_limit, opts.seed)
            evaluation["before"] = run_eval(loaded.model, loaded.tokenizer, opts, opts.eval_limit, opts.seed,
                                            reference=reference)
    dtype = str(loaded.model.dtype).removeprefix("torch.")
    before = {"params": parameter_count(loaded.model), "bytes": weight_bytes(loaded.model),
              "cost": static_cost(loaded.model, adapter), "format": dtype}
    stored = loaded.quantized  # a quantized input: written back in its format, unless --dequantize
    if stored is not None:
        before.update(bytes=stored.stored_bytes, format=stored.format)
        if opts.dequantize:
            log.warning("--dequantize: writing %s in full precision (%s), not in its own %s, on purpose",
                        opts.model, dtype, stored.format)
            stored = None
    fmt_after = before["format"] if stored is not None else (
        f"{dtype} (dequantized from {before['format']})" if loaded.quantized is not None else dtype)
    measured = {}
    if opts.measure_serving:
        with timings.stage("serving_before"):
            measured["before"] = measure_serving(loaded.model, opts, opts.seed)
    # accelerate's map: module name -> GPU index, "cpu" or "disk"; else the one device
    device_map = getattr(loaded.model, "hf_device_map", None) or {"": input_device(loaded.model)}
    modules_per_device = dict(Counter(str(device) for device in device_map.values()))
    hooked = dispatched(loaded.model)  # then a collection is what frees a model, not `del`
    offloaded = offloaded_bytes(loaded.model)
    with output.staged() as tmp:
        fit_report = recovery = local = None
        unrecovered, extra = {}, []
        if layerwise:
            pruned, plans, method, fit_report, local, unrecovered = _prune_layerwise(opts, prep, tmp, shard_size,
                                                                                     timings)
        else:
            pruned, plans, method, fit_report, recovery, extra = _merge_whole(opts, prep, evaluation, evaluating,
                                                                              timings)
        loaded.model = None
        if hooked:
            gc.collect()  # accelerate's hooks make modules self-referencing: free the original now
        with timings.stage("cost"):  # no forward: the KV cache comes from the checkpoint check's forward
            after_cost = static_cost(pruned, adapter)
        checks = None
        if evaluating or opts.measure_serving:
            with _model_after(pruned, tmp, loaded, opts, layerwise) as (model_after, info):
                if info is not None:  # the checkpoint loaded back: checked now, not loaded again below
                    with timings.stage("verify"):
                        checks = verify_checkpoint(tmp, adapter, opts.keep, prep.top_k_after, loaded.tokenizer,
                                                   reloaded=(model_after, info))
                if opts.measure_serving:
                    with timings.stage("serving_after"):
                        measured["after"] = measure_serving(model_after, opts, opts.seed)
                if evaluating:
                    with timings.stage("eval_after"):
                        evaluation["after"] = run_eval(model_after, loaded.tokenizer, opts, opts.eval_limit, opts.seed,
                                                       reference=reference)
                    if local is not None:
                        with timings.stage("eval_merged"):
                            judge_local(local, unrecovered, model_after, loaded.tokenizer, opts, evaluation)
            if evaluating:
                if recovery is not None:
                    judge_recovery(recovery, evaluation)
                evaluation["drop"] = {m: drop(evaluation["before"], evaluation["after"], m) for m in METRICS}
                if reference is not None:  # after minus before (the parent against itself), prompt by prompt
                    evaluation["paired"] = paired(evaluation["before"], evaluation["after"])
        report = {
            **base_report(opts, prep, timings),
            "model": {
                "id": opts.model, "model_type": pruned.config.model_type,
                "experts_before": prep.num_experts, "experts_after": opts.keep,
                "top_k_before": prep.top_k_before, "top_k_after": prep.top_k_after,
                "params_before": before["params"], "params_after": parameter_count(pruned),
                "bytes_before": before["bytes"], "bytes_after": weight_bytes(pruned),  # as stored (after: see save)
                "format_before": before["format"], "format": fmt_after,
                "placement": modules_per_device,
                "offloaded_bytes": offloaded,  # of the input's weights, left to accelerate's CPU or disk offload
                "router_fingerprint": prep.profile.meta.get("router_fingerprint"),  # the parent's (uncurl monitor)
                "source": str(loaded.source) if loaded.source is not None else None,  # the parent's folder, absolute
                **(loaded.carry.entries() if loaded.carry is not None else {}),  # the parent's files kept (repo.py)
            },
            "pipeline": {"requested": opts.pipeline, "name": pipeline, "layer_by_layer": layerwise,
                         "calibrate_through": opts.calibrate_through},
            "method": method,  # what ran; "method_requested" when the default fell back
            **({"method_requested": opts.method} if method != opts.method else {}),
            "merge": opts.merge,  # what ran; with auto, "merge_requested" (and "merge_reason" where not fit)
            **(auto or {}),
            "router_rows": opts.router_rows,
            "keep": opts.keep,
            "layers": layer_entries(prep.profile, plans),
            **({"super_experts": prep.super_experts} if prep.super_experts is not None else {}),
            **({"fit": fit_report} if fit_report is not None else {}),
            **({"recover": recovery.report} if recovery is not None else {}),
            **({"recover_local": local} if local is not None else {}),
            **({"mtp": entry} if (entry := mtp_of(loaded, opts).report(opts.keep)) else {}),
            "output": str(out),
        }
        if evaluating:
            report["eval"] = evaluation
        if opts.max_drop is not None:
            dropped = evaluation["drop"][opts.metric]
            report["gate"] = {"metric": opts.metric, "drop": dropped, "max_drop": opts.max_drop,
                              "passed": dropped is not None and dropped <= opts.max_drop}
        as_input = (stored, adapter, plans) if stored is not None else None
        if not layerwise:
            with timings.stage("save"):
                write_checkpoint(pruned, loaded.tokenizer, tmp, shard_size, extra_files=loaded.processor_files,
                                 as_input=as_input, extra=extra, carry=loaded.carry)
        del extra
        if as_input is not None:  # the bytes as stored, from the files written
            report["model"]["bytes_after"] = stored_bytes(tmp)
        del pruned  # the checks below reload from disk: never hold both copies
        if hooked:
            gc.collect()
        if checks is None:
            with timings.stage("verify"):
                checks = verify_checkpoint(tmp, adapter, opts.keep, prep.top_k_after, loaded.tokenizer,
                                           loaded.placement)
        report["checks"] = checks
        # the KV cache is the same before and after (attention is untouched); weights as stored
        kv, serve = report["checks"].pop("kv_cache"), dict(gpu_memory=opts.gpu_memory, context=opts.context,
                                                            batch=opts.serving_batch)
        costs = {"before": finish({**before["cost"], "weight_bytes": report["model"]["bytes_before"]}, kv, **serve),
                 "after": finish({**after_cost, "weight_bytes": report["model"]["bytes_after"]}, kv, **serve)}
        report["cost"] = {"note": release_note(costs["before"], costs["after"])
                          + (f"; {serving_note(measured['before'], measured['after'])}" if measured else ""),
                          **{k: c.as_dict() for k, c in costs.items()}, **({"measured": measured} if measured else {})}
        with timings.stage("report"):
            report["files"] = write_report(report, tmp / "report", with_plots=opts.plots)
            (tmp / CARD).write_text(render_card(report, parent_card(opts.model, loaded.source), loaded.source),
                                    encoding="utf-8")
    log.info("wrote %s", out)
    return PruneResult(out, report)


def _merge_whole(opts: PruneOptions, prep: Prepared, evaluation: dict, evaluating: bool, timings: Timings):
    """The whole-model merge of a profiled model (then --merge fit, --recover): (pruned model,
    plans, method run, fit report, recovery)."""
    loaded, adapter = prep.loaded, prep.loaded.adapter
    with timings.stage("cluster"):
        method = method_used(prep, opts.method)
        plans = plan_all(prep, opts.keep, method, opts.seed)
    fitting = MERGE_RULES[opts.merge].fit
    with timings.stage("merge"):  # originals are freed layer by layer (never two copies), unless fit or recovery
        pruned = rewrite_model(loaded.model, adapter, plans, router_rule=opts.router_rows, merge=opts.merge,
                               stats=prep.profile.layers, top_k=opts.top_k, consume=not (fitting or opts.recover))
    fit_report = recovery = None
    if fitting:
        with timings.stage("fit"):
            fit_report = fit_after_merge(loaded, pruned, plans, opts)
    if opts.recover:
        if evaluating:
            with timings.stage("eval_merged"):
                evaluation["merged"] = run_eval(pruned, loaded.tokenizer, opts, opts.eval_limit, opts.seed)
        with timings.stage("recover"):
            recovery = recover_after_merge(loaded, pruned, opts)
    blocks, extra = mtp_of(loaded, opts), []
    if blocks.kept:
        with timings.stage("merge_mtp"):
            extra = blocks.prune_all(plans, prep.profile.layers, merge=opts.merge, router_rule=opts.router_rows,
                                     top_k=opts.top_k)
        set_mtp_count(pruned.config, adapter, blocks.count)
    return pruned, plans, method, fit_report, recovery, extra


def _prune_layerwise(opts: PruneOptions, prep: Prepared, folder: Path | None, shard_size: int, timings: Timings):
    """Profile, plan, merge and write each decoder layer in one visit (``layerwise.py``) into
    ``folder`` (None: a torchrun rank other than 0, which takes its share and writes nothing):
    (the pruned model on meta, plans, method run, the report's fit and recover_local entries or
    None). Consumes the loaded model."""
    from .layerwise import prune_layer_by_layer

    loaded = prep.loaded
    texts, info = calibration_texts(opts, opts.seed, loaded.tokenizer)
    meta = profile_meta(loaded, info, opts, opts.seed)
    ids, gather, reduce, ranks = range(len(texts)), None, None, distributed.world()
    if ranks:  # this rank's share of the texts; each layer's statistics gathered from every rank
        ids = text_share(len(texts), *ranks, f"{ranks[1]} ranks")
        device = input_device(loaded.model)
        gather = lambda stats: distributed.gather_layer(stats, device)  # noqa: E731
        reduce = lambda tensors: distributed.sum_over_ranks(tensors, device)  # noqa: E731
        meta["ranks"] = ranks[1]
    used: set = set()
    with timings.stage("layers"):  # profile + cluster + merge + save, one decoder layer at a time
        torch.manual_seed(opts.seed)
        result = prune_layer_by_layer(
            loaded.model, loaded.tokenizer, loaded.adapter, [texts[i] for i in ids], folder, keep=opts.keep,
            plan=_plan_one(prep, opts.keep, opts.method, opts.seed, used), merge=opts.merge,
            router_rule=opts.router_rows, top_k=opts.top_k, through=opts.calibrate_through, shard_size=shard_size,
            batch_size=opts.batch_size, max_length=opts.max_length, progress=opts.progress, meta=meta,
            seed=opts.seed, text_ids=list(ids), gather=gather, reduce=reduce, recover_local=opts.recover_local,
            recover_experts=opts.recover_experts, mtp=mtp_of(loaded, opts))
        if folder is not None:
            write_extras(loaded.tokenizer, folder, loaded.processor_files, loaded.carry)
    check_profiled(result.profile)
    prep.profile = result.profile
    find_super(prep, opts, [opts.keep])  # recorded only: protection plans after the whole profile
    method = used.pop() if len(used) == 1 else opts.method
    fit = {**fit_entry(), "layers": result.fits} if MERGE_RULES[opts.merge].fit else None
    local = {"steps": opts.recover_local, "trains": "routers and experts" if opts.recover_experts else "routers",
             "loss": "||y' - y||^2 / ||y||^2 of each block on its layer's calibration inputs",
             "layers": result.local} if opts.recover_local else None
    return result.model, result.plans, method, fit, local, result.before_recovery


@contextmanager
def _model_after(pruned, folder: Path, loaded: Loaded, opts: PruneOptions, layerwise: bool):
    """(the pruned model to evaluate, its loading info): in memory (info None), or (layer by layer:
    only its checkpoint exists) the checkpoint loaded back, placed as the run's model was."""
    if not layerwise:
        yield pruned, None
        return
    back = load_model(str(folder), device=opts.device, dtype=opts.dtype, seed=opts.seed,
                      device_map=opts.device_map, max_memory=opts.max_memory, trust_remote_code=opts.trust_remote_code)
    try:
        yield back.model, back.loading_info
    finally:
        hooked = dispatched(back.model)
        back.model = None
        if hooked:
            gc.collect()
