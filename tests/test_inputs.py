"""Defects around the CLI's own output, and damaged model folders: each fails with exit 2, named."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from uncurl.cli import app

runner = CliRunner()
FAST = ["--samples", "12", "--max-length", "64"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_report_command_reruns_to_the_same_bytes(tmp_path, data_dir):
    first = tmp_path / "first"
    res = run("prune", "--model", "builtin:mixtral", "--keep", 3, "--data-dir", data_dir, "--out", first,
              "--eval", "--eval-limit", 6, "--eval-max-length", 96, "--json", *FAST)
    assert res.exit_code == 0, res.output
    report = json.loads((first / "report" / "report.json").read_text())
    words = shlex.split(report["command"])
    assert words[:2] == ["uncurl", "prune"]
    assert "--eval" in words and "--json" in words and "--evaluate" not in words and "--as-json" not in words
    again = tmp_path / "again"
    words[words.index("--out") + 1] = str(again)
    res = run(*words[1:])
    assert res.exit_code == 0, res.output
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert json.loads((again / "report" / "report.json").read_text())["eval"] == report["eval"]


def test_prune_eval_prints_one_summary_and_honours_eval_max_length(tmp_path, data_dir):
    res = run("prune", "--model", "builtin:mixtral", "--keep", 3, "--data-dir", data_dir, "--out", tmp_path / "o",
              "--eval", "--eval-limit", 4, "--eval-max-length", 40, *FAST)
    assert res.exit_code == 0, res.output
    assert res.output.count("experts / MoE layer") == 1, res.output
    assert "superglue-rte acc" in res.output
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    # RTE prompts are longer than 40 bytes: each of the 4 examples is scored on at most 39 predicted tokens
    assert report["options"]["eval_max_length"] == 40
    assert report["eval"]["before"]["tokens"] <= 4 * 39


@pytest.fixture(scope="module")
def damaged(tiny_dirs, tmp_path_factory):
    """name -> a copy of the tiny Mixtral folder damaged one way."""
    src = tiny_dirs("mixtral")
    root = tmp_path_factory.mktemp("damaged")

    def copy(name):
        shutil.copytree(src, root / name)
        return root / name

    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (copy("no-weights") / "model.safetensors").unlink()
    (copy("bad-config") / "config.json").write_text('{"model_type": "mixtral",')
    header = copy("bad-header") / "model.safetensors"
    header.write_bytes(header.read_bytes()[:8] + b"{oops" + header.read_bytes()[13:])
    from uncurl.load import build_tiny

    model, tok = build_tiny("mixtral", seed=0)
    model.save_pretrained(root / "missing-shard", max_shard_size="100KB")
    tok.save_pretrained(root / "missing-shard")
    sorted((root / "missing-shard").glob("model-*.safetensors"))[-1].unlink()
    nan = copy("nan") / "model.safetensors"
    state = load_file(nan)
    state[next(k for k in state if "layers.1" in k and "experts" in k)].view(-1)[3] = float("nan")
    save_file(state, nan, metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("case, needles", [
    ("truncated", ["model.safetensors is truncated or corrupt"]),
    ("no-weights", ["has config.json but no weights", "model.safetensors"]),
    ("bad-config", ["config.json is not valid JSON"]),
    ("bad-header", ["model.safetensors: the safetensors header is not valid JSON"]),
    ("nan", ["NaN", "layer 1, tensor model.layers.1.", "experts"]),
    ("missing-shard", ["-of-0", "is missing (named by the checkpoint's index)"]),
])
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_damaged_model_folder_exits_2_naming_the_file(damaged, case, needles, command, tmp_path, data_dir):
    root = damaged
    extra = ["--out", tmp_path / "out", *FAST] if command == "prune" else ["--limit", 2]
    res = run(command, "--model", root / case, "--data-dir", data_dir, *extra)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    for needle in needles:
        assert needle in text, text
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
