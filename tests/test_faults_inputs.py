"""Bad input, damaged models and misleading messages (issue 15): each ends in exit 2 with one line
naming the value and what is accepted, before the expensive work where it can be known, with nothing
written to --out, the input byte-identical and no traceback."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import digest, refused
from typer.testing import CliRunner

from uncurl import pipeline
from uncurl.cli import app

runner = CliRunner()
FAST = ["--samples", "12", "--max-length", "64"]
PRUNE = [*FAST, "--no-plots"]  # prune's own: no matplotlib


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def no_profiling(monkeypatch):
    """Refusals that can be known before profiling must not reach it."""

    def forbidden(*a, **k):
        raise AssertionError("profiled before refusing")

    monkeypatch.setattr(pipeline, "profile_model", forbidden)


def copy_of(tiny_dirs, family: str, tmp_path: Path, name: str = "model") -> Path:
    shutil.copytree(tiny_dirs(family), tmp_path / name)
    return tmp_path / name


def edit_weights(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def router_key(folder: Path) -> str:
    """The on-disk name of layer 1's router weight."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return next(k for k in f.keys() if ".layers.1." in k and re.search(r"\.(gate|router)\.weight$", k)
                    and "expert" not in k)


# --- 1. a damaged model: missing, unexpected or mis-shaped tensors ------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen3_vl_moe", "gpt_oss", "deepseek_v3"])
def test_missing_router_tensor_is_refused_and_the_intact_folder_loads_clean(family, tiny_dirs, tmp_path, data_dir,
                                                                           no_profiling):
    from uncurl.load import load_model

    load_model(str(tiny_dirs(family)), device="cpu")  # saved by save_pretrained: no key is reported
    model = copy_of(tiny_dirs, family, tmp_path)
    key = router_key(model)
    edit_weights(model, lambda state: state.pop(key))
    before, out = digest(model), tmp_path / "out"
    res = run("prune", "--model", model, "--data-dir", data_dir, "--out", out, *PRUNE)
    line = refused(res, out, "is damaged", "lacks", "layers.1.")
    assert re.search(r"layers\.1\.mlp\.(gate|router)\.weight", line), line
    assert digest(model) == before


def _extra(state):
    state["model.layers.1.mlp.stray.weight"] = torch.zeros(3)


def _router_rows(state):
    state["model.layers.1.block_sparse_moe.gate.weight"] = torch.zeros(5, 64)


def _expert_column(state):
    state["model.layers.0.block_sparse_moe.experts.3.w1.weight"] = torch.zeros(64, 65)


def _expert_gone(state):
    del state["model.layers.0.block_sparse_moe.experts.3.w1.weight"]


@pytest.mark.parametrize("change, needles", [
    (_extra, ["no place for model.layers.1.mlp.stray.weight"]),
    (_router_rows, ["model.layers.1.mlp.gate.weight has shape [5, 64], the config expects [8, 64]"]),
    (_expert_column, ["model.layers.0.block_sparse_moe.experts.3.w1.weight has shape [64, 65], its siblings [64, 64]"]),
    (_expert_gone, ["model.layers.0.block_sparse_moe.experts.3.w1.weight is missing"]),
])
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_unexpected_or_mis_shaped_tensor_is_named(change, needles, command, tiny_dirs, tmp_path, data_dir,
                                                  no_profiling):
    model = copy_of(tiny_dirs, "mixtral", tmp_path)
    edit_weights(model, change)
    before, out = digest(model), tmp_path / "out"
    extra = ["--out", out, *PRUNE] if command == "prune" else ["--limit", 2]
    refused(run(command, "--model", model, "--data-dir", data_dir, *extra), out, "is damaged", *needles)
    assert digest(model) == before


# --- 2. an incomplete config or tokenizer ----------------------------------------------------------


@pytest.mark.parametrize("family, key", [("qwen3_moe", "num_experts"), ("mixtral", "num_local_experts")])
def test_config_without_the_expert_count_names_the_key_and_adapter(family, key, tiny_dirs, tmp_path, data_dir,
                                                                   no_profiling):
    model = copy_of(tiny_dirs, family, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.pop("num_local_experts"), config.pop("num_experts", None)
    (model / "config.json").write_text(json.dumps(config))
    before, out = digest(model), tmp_path / "out"
    res = run("prune", "--model", model, "--data-dir", data_dir, "--out", out, *PRUNE)
    refused(res, out, "config.json has no", repr(key), f"the {family} adapter reads the expert count")
    assert digest(model) == before


@pytest.mark.parametrize("removed, needle", [
    (["tokenizer_config.json"], "neither a pad nor an end-of-sequence token"),
    (["tokenizer_config.json", "tokenizer.json"], "has no usable tokenizer"),
])
def test_missing_tokenizer_files_are_named_before_profiling(removed, needle, tiny_dirs, tmp_path, data_dir,
                                                            no_profiling):
    model = copy_of(tiny_dirs, "mixtral", tmp_path)
    for name in removed:
        (model / name).unlink()
    before, out = digest(model), tmp_path / "out"
    res = run("prune", "--model", model, "--data-dir", data_dir, "--out", out, *PRUNE)
    refused(res, out, f"model folder {model}", needle, "tokenizer.json", "tokenizer_config.json")
    assert digest(model) == before


# --- 3. a profile recorded on another model or task -----------------------------------------------


@pytest.fixture(scope="module")
def profiles(tmp_path_factory, data_dir):
    """A profile of builtin:mixtral and one of builtin:qwen3_moe (superglue-rte), and the mixtral one
    as an older uncurl wrote it (no router fingerprint)."""
    root = tmp_path_factory.mktemp("profiles")
    for family in ("mixtral", "qwen3_moe"):
        res = run("profile", "--model", f"builtin:{family}", "--data-dir", data_dir, "--out", root / family,
                  "--samples", 12, "--max-length", 64)
        assert res.exit_code == 0, res.output
    with safe_open(str(root / "mixtral"), "pt") as f:
        header = json.loads(f.metadata()["uncurl"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header.pop("router_fingerprint", None)
    save_file(tensors, str(root / "older"), metadata={"uncurl": json.dumps(header)})
    return root


@pytest.mark.parametrize("args, needles", [
    (["--model", "builtin:mixtral", "--profile", "{p}/qwen3_moe"], ["a qwen3_moe model", "is a mixtral model"]),
    (["--model", "builtin:mixtral", "--seed", "1", "--profile", "{p}/mixtral"], ["other router weights"]),
    (["--task", "arc-easy", "--profile", "{p}/mixtral"],
     ["recorded on task superglue-rte", "calibrates on arc-easy", "--task superglue-rte"]),
    (["--calibrate-on", "superglue-rte=3,corpus=1", "--profile", "{p}/mixtral"],
     ["recorded on task superglue-rte", "calibrates on superglue-rte=3,corpus=1"]),
])
def test_profile_of_another_model_or_task_is_refused(args, needles, profiles, tmp_path, data_dir, no_profiling):
    args = [a.format(p=profiles) for a in args]
    before, out = digest(profiles), tmp_path / "out"
    refused(run("prune", *args, "--data-dir", data_dir, "--out", out, *PRUNE), out, f"--profile {profiles}", *needles)
    assert digest(profiles) == before


def test_older_profile_without_a_fingerprint_is_used_with_a_warning(profiles, tmp_path, data_dir, no_profiling):
    res = run("prune", "--profile", profiles / "older", "--data-dir", data_dir, "--out", tmp_path / "out", *PRUNE)
    assert res.exit_code == 0, res.output
    assert "could not be checked" in " ".join(res.output.split())


# --- 4. values accepted silently -------------------------------------------------------------------


@pytest.mark.parametrize("command, args, needles", [
    ("prune", ["--max-drop", "-1"], ["--max-drop -1", ">= 0"]),
    ("prune", ["--max-drop", "nan"], ["--max-drop nan", ">= 0"]),
    ("sweep", ["--tolerance", "-5", "--keep", "6,4"], ["--tolerance -5", ">= 0"]),
    ("prune", ["--top-k", "5"], ["--top-k 5", "own top-k (2)", "1..2"]),
    ("sweep", ["--top-k", "3", "--keep", "6,4"], ["--top-k 3", "own top-k (2)"]),
])
def test_out_of_range_bounds_are_refused_before_profiling(command, args, needles, tmp_path, data_dir, no_profiling):
    out = tmp_path / "out"
    refused(run(command, *args, "--data-dir", data_dir, "--out", out, *(PRUNE if command == "prune" else FAST)), out,
            *needles)


# --- 5. messages that mislead ----------------------------------------------------------------------


def test_messages_name_the_value_and_what_is_accepted(tmp_path, data_dir, no_profiling):
    out = tmp_path / "out"
    (tmp_path / "folder").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    cases = [
        (["--task", "[a b]"], ["unknown task '[a b]'"]),  # brackets are not Rich markup
        (["--model", tmp_path / "[bold]x"], [f"--model {tmp_path}/[bold]x: no such folder"]),
        (["--model", "./no/such-model"], ["--model ./no/such-model: no such folder"]),
        (["--model", tmp_path / "weights.bin"], ["is a file, not a model folder"]),
        (["--keep", "abc"], ["--keep 'abc'", "valid integer"]),
        (["--keep", "[x]"], ["--keep '[x]'"]),
        (["--calibrate-on", "nope.yaml=1,corpus=1"], ["--calibrate-on nope.yaml: no such task file"]),
        (["--calibrate-on", "nope=1,corpus=1"], ["--calibrate-on: unknown task 'nope'"]),
        (["--task", tmp_path / "folder"], ["is a directory", "--task takes a registered task"]),
        (["--task", tmp_path / "weights.bin"], ["is a file of a kind it does not read (.bin)", "--task takes"]),
    ]
    for args, needles in cases:
        refused(run("prune", *args, "--data-dir", data_dir, "--out", out, *PRUNE), out, *needles)


def test_a_plain_hub_id_stays_a_hub_id(tmp_path, data_dir):
    out = tmp_path / "out"
    refused(run("prune", "--model", "nobody/no-such-moe", "--data-dir", data_dir, "--out", out, *PRUNE), out,
            "Hub is unreachable")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_files_saved_with_a_byte_order_mark_are_read(suffix, tmp_path):
    rows = [{"q": f"question {i}", "label": "yes" if i % 2 else "no"} for i in range(8)]
    path = tmp_path / f"excel{suffix}"
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8-sig") as f:
            writer = csv.DictWriter(f, ["q", "label"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    res = run("eval", "--task", path, "--template", "{q}\nAnswer:", "--choices", "yes,no", "--limit", 2)
    assert res.exit_code == 0, res.output
    assert "acc=" in res.output


def test_one_row_file_is_too_few_to_halve(tmp_path, no_profiling):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"q": "only", "label": "yes"}) + "\n")
    before, out = digest(path), tmp_path / "out"
    res = run("prune", "--task", path, "--template", "{q}", "--choices", "yes,no", "--out", out, *PRUNE)
    refused(res, out, "has 1 row, too few to split into calibration and evaluation halves", "--eval-file")
    assert digest(path) == before


# --- 6. -v logs each stage -------------------------------------------------------------------------


@pytest.mark.parametrize("command, args, stages", [
    ("eval", ["--limit", 2], ["load", "eval"]),
    ("prune", ["--keep", 6, *PRUNE], ["load", "layers", "verify"]),  # the default: fitted layer by layer
    ("prune", ["--keep", 6, "--pipeline", "whole", *PRUNE], ["load", "profile", "cluster", "merge", "fit", "save",
                                                            "verify"]),
])
def test_verbose_logs_each_stage_with_its_time(command, args, stages, tmp_path, data_dir):
    extra = ["--out", tmp_path / "out"] if command == "prune" else []
    res = run(command, "-v", "--data-dir", data_dir, *extra, *args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for stage in stages:
        assert f"{stage} ..." in text and re.search(rf"{stage} done in \d+\.\d s", text), (stage, text)


def test_a_model_too_big_for_the_device_is_refused_before_loading_saying_how_to_place_it(
        tiny_dirs, tmp_path, data_dir, monkeypatch, no_profiling):
    """Without --device-map the whole model goes onto the device: weights that cannot fit (here the
    machine's memory is made to look smaller than the 1 MB tiny Mixtral) exit 2 before any weight is
    read, naming both sizes and --device-map; with --device-map the check does not apply."""
    from uncurl import load

    src = copy_of(tiny_dirs, "mixtral", tmp_path)
    before = digest(src)
    monkeypatch.setattr(load, "available_memory", lambda device: 100_000)
    monkeypatch.setattr(load, "from_folder", lambda *a, **k: pytest.fail("read the weights before refusing"))
    out = tmp_path / "out"
    stored = sum(f.stat().st_size for f in src.glob("*.safetensors"))  # float32: loaded as stored
    refused(run("prune", "--model", src, "--out", out, "--data-dir", data_dir, *FAST), out,
            f"its weights need {stored / 2**20:.1f} MiB and there is 0.1 MiB of memory available", "--device-map auto")
    refused(run("eval", "--model", src, "--data-dir", data_dir, "--limit", 2), None, "--device-map auto")
    monkeypatch.undo()
    monkeypatch.setattr(load, "available_memory", lambda device: 100_000)
    placed = run("eval", "--model", src, "--data-dir", data_dir, "--limit", 2, "--device-map", "auto")
    assert placed.exit_code == 0, placed.output  # accelerate places it: the check is not for it
    # in float32 the bf16-sized estimate doubles: --dtype is counted
    config = json.loads((src / "config.json").read_text())
    from transformers import AutoConfig

    f32, _ = load.weights_needed(src, AutoConfig.from_pretrained(src), "auto")
    bf16, _ = load.weights_needed(src, AutoConfig.from_pretrained(src), "bfloat16")
    assert config.get("dtype", "float32") == "float32" and f32 == 2 * bf16
    assert digest(src) == before
