"""Configs as the Hub's repos publish them, where they differ from what save_pretrained writes (faults
the twins of tests/twins.py found): no dtype in config.json (gpt-oss), a per-layer top-k (Hunyuan-A13B).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import pretrained
from typer.testing import CliRunner

from uncurl.cli import app
from uncurl.load import build_tiny, load_model

runner = CliRunner()


def saved(folder, family: str, dtype=None, **overrides):
    model, tokenizer = build_tiny(family, seed=0, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_config_without_dtype_loads_in_the_dtype_its_weights_are_stored_in(dtype, tmp_path):
    """gpt-oss's config.json names no dtype: the model is held in the weights' own, as transformers'
    from_pretrained(folder) picks it (uncurl reads the shards itself, so it resolves it from the headers)."""
    folder = saved(tmp_path / "m", "qwen3_moe", dtype)
    edit_config(folder, dtype=None, torch_dtype=None)
    assert "dtype" not in (folder / "config.json").read_text()
    loaded = load_model(str(folder), device="cpu")
    reference = pretrained(folder)  # transformers reads the dtype from the first shard's tensors
    assert reference.dtype == dtype
    assert {p.dtype for p in loaded.model.parameters()} == {p.dtype for p in reference.parameters()}
    for (name, ours), (_, theirs) in zip(loaded.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name


def prune(folder, out, data_dir, *extra):
    return runner.invoke(app, ["prune", "--model", str(folder), "--keep", "4", "--samples", "4", "--max-length", "16",
                               "--method", "frequency", "--merge", "select", "--no-plots", "--data-dir", str(data_dir),
                               "--out", str(out), *extra])


@pytest.fixture(scope="module")
def per_layer_top_k(tmp_path_factory):
    """A tiny hunyuan_v1_moe whose config.json spells moe_topk per layer, as Hunyuan-A13B's does."""
    folder = saved(tmp_path_factory.mktemp("hunyuan") / "m", "hunyuan_v1_moe")
    edit_config(folder, moe_topk=[2, 2])
    return folder


@pytest.mark.parametrize("top_k", [None, 1])
def test_a_per_layer_top_k_list_is_written_back_as_a_list(top_k, per_layer_top_k, data_dir, tmp_path):
    out = tmp_path / "out"
    result = prune(per_layer_top_k, out, data_dir, *(["--top-k", str(top_k)] if top_k else []))
    assert result.exit_code == 0, result.output[-600:]
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 4
    assert config["moe_topk"] == [top_k or 2] * 2
    model = pretrained(out)
    gates = [layer.mlp.gate for layer in model.model.layers]
    assert [g.top_k for g in gates] == [top_k or 2] * 2 and [g.wg.weight.shape[0] for g in gates] == [4, 4]


def test_a_per_layer_top_k_that_differs_between_layers_is_refused_naming_the_key(per_layer_top_k, data_dir,
                                                                                   tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for file in per_layer_top_k.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    edit_config(folder, moe_topk=[2, 1])
    out = tmp_path / "out"
    result = prune(folder, out, data_dir)
    message = " ".join(result.output.split())
    assert result.exit_code == 2, message[-600:]
    assert "moe_topk [2, 1]" in message and "all its entries are equal" in message
    assert "calibration tokens" not in message and not out.exists()


@pytest.mark.parametrize("value, says", [([2, "2"], "each entry of a per-layer list"), ([2, 0], "each entry"),
                                         ([], "must be a whole number"), ([99, 99], "above")])
def test_a_per_layer_top_k_list_with_a_bad_entry_is_refused_before_the_work(value, says, per_layer_top_k, data_dir,
                                                                             tmp_path):
    """The config-value check (load.check_config_values) reads a per-layer list entry by entry, and
    compares its largest top-k with the expert count."""
    folder = tmp_path / "m"
    folder.mkdir()
    for file in per_layer_top_k.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    edit_config(folder, moe_topk=value)
    out = tmp_path / "out"
    result = prune(folder, out, data_dir)
    message = " ".join(result.output.split())
    assert result.exit_code == 2, message[-600:]
    assert "'moe_topk'" in message and says in message, message[-600:]
    assert "calibration tokens" not in message and not out.exists()
