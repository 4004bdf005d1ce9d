"""The model card (card.py): written with every prune, parses as a Hub model card, says what the report says."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from uncurl.cli import app

runner = CliRunner()
FAST = ["--samples", "12", "--max-length", "64", "--no-plots"]

PARENT_CARD = """---
license: apache-2.0
language:
- en
base_model: someorg/base-moe
---
# The parent's card
"""


def test_card_parses_and_carries_the_report(tmp_path, data_dir, tiny_dirs):
    src = tmp_path / "parent"
    import shutil

    shutil.copytree(tiny_dirs("qwen2_moe"), src)
    (src / "README.md").write_text(PARENT_CARD)
    before = (src / "README.md").read_bytes()
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", "--model", str(src), "--keep", "4", "--data-dir", str(data_dir), "--out", str(out),
                              "--method", "uncurl", "--eval", "--eval-limit", "6", *FAST])
    assert res.exit_code == 0, res.output
    assert (src / "README.md").read_bytes() == before  # the parent's card is only read
    report = json.loads((out / "report" / "report.json").read_text())
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["base_model"] == "someorg/base-moe"  # a local parent: its own card names the base
    assert {"moe", "pruned", "expert-merging"} <= set(meta["tags"])
    assert meta["datasets"] == ["aps/super_glue"]
    text = card.text
    assert report["command"] in text and report["cost"]["note"] in text
    ev = report["eval"]
    assert f"{ev['before']['acc']:.4f} ± {ev['before']['acc_stderr']:.4f}" in text
    assert f"{ev['after']['acc']:.4f} ± {ev['after']['acc_stderr']:.4f}" in text
    for layer in report["layers"]:
        assert "{" + ",".join(map(str, layer["groups"][0])) + "}" in text


def test_card_of_a_criterion_run_without_eval(tmp_path, data_dir):
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", "--model", "builtin:mixtral", "--keep", "4", "--method", "reap",
                              "--data-dir", str(data_dir), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert "base_model" not in meta and "license" not in meta  # a built-in model has neither
    assert "expert-merging" not in meta["tags"]
    text = (out / "README.md").read_text()
    assert "experts kept alone" in text and "Not evaluated in this run" in text
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["merge"] == "fit" and "down projections fitted" in text  # the default merge, auto, refits them
    assert report["cost"]["before"]["experts"] == 8 and report["cost"]["after"]["experts"] == 4
    assert report["cost"]["after"]["weight_bytes"] == report["model"]["bytes_after"]
    # the KV cache, taken from the checkpoint check's forward: K and V of 2 layers x 2 heads x 16, float32
    assert report["cost"]["before"]["kv_bytes_per_token"] == report["cost"]["after"]["kv_bytes_per_token"] == 512
    assert "kv_cache" not in report["checks"]
