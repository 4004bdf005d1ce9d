"""`uncurl routes`: per-input routes agree with the profile's counts; load balance figures."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from uncurl.adapters import get_adapter
from uncurl.cli import app
from uncurl.load import build_tiny
from uncurl.profile import Profile, profile_model
from uncurl.routes import route
from uncurl.stats import balance

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_balance_by_hand():
    even = balance([5, 5, 5, 5])
    assert (even["entropy"], even["cv"], even["max_share"]) == (1.0, 0.0, 0.25)
    one = balance([8, 0, 0, 0])
    assert one["entropy"] == 0.0 and one["max_share"] == 1.0 and one["cv"] == pytest.approx(3 ** 0.5, abs=1e-6)
    assert balance([0, 0])["entropy"] is None


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "longcat_flash"])
def test_routes_agree_with_the_profile(family, texts):
    """Counts and routing mass summed from the per-token lines equal the profile's, for the same texts
    (longcat_flash: zero-computation experts in the router's tail rows, left out of both)."""
    model, tok = build_tiny(family)
    adapter = get_adapter(family)
    lines = []
    layers, tokens = route(model, tok, adapter, texts, lines.append, batch_size=2, max_length=24)
    prof = profile_model(model, tok, adapter, texts, batch_size=3, max_length=24)
    assert [rec["example"] for rec in lines] == list(range(len(texts)))
    assert tokens == prof.tokens == sum(len(rec["tokens"]) for rec in lines)
    for name, stats in prof.layers.items():
        assert torch.equal(layers[name]["counts"], stats.counts)
        assert torch.allclose(layers[name]["mass"], stats.mass, atol=1e-4)
        from_lines = torch.zeros_like(stats.counts)
        for rec in lines:
            per_token = rec["routes"][str(layers[name]["index"])]
            assert len(per_token) == len(rec["tokens"])
            for pairs in per_token:
                for e, _ in pairs:
                    from_lines[e] += 1
        assert torch.equal(from_lines, stats.counts)


def test_routes_command_matches_uncurl_profile(tmp_path, data_dir):
    common = ["--model", "builtin:qwen2_moe", "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 10,
              "--max-length", 40]
    prof = tmp_path / "rte.profile"
    assert run("profile", *common, "--out", prof).exit_code == 0
    out = tmp_path / "routes"
    res = run("routes", *common, "--split", "calibration", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    record = json.loads((out / "routes.json").read_text())
    profile = Profile.load(prof)
    assert record["tokens"] == summary["tokens"] == profile.tokens
    assert record["router_fingerprint"] == profile.meta["router_fingerprint"]
    for layer in record["layers"]:
        stats = profile.layers[layer["name"]]
        assert layer["counts"] == [int(c) for c in stats.counts.tolist()]
        assert layer["balance"] == balance(stats.counts)
    lines = (out / "routes.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[3])["example"] == 3
    k = build_tiny("qwen2_moe")[0].config.num_experts_per_tok
    first = json.loads(lines[0])
    assert all(len(pairs) == k for per_token in first["routes"].values() for pairs in per_token)
    assert (out / "heatmap.png").stat().st_size > 0 and "heatmap.png" in (out / "routes.md").read_text()
    again = run("routes", *common, "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert run("routes", *common, "--out", out, "--overwrite", "--no-plots").exit_code == 0


def test_routes_file_of_inputs_and_bad_file(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('"plain string"\n{"text": "an object"}\n\n')
    out = tmp_path / "r"
    res = run("routes", "--model", "builtin:mixtral", "--file", inputs, "--out", out, "--no-plots")
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in (out / "routes.jsonl").read_text().splitlines()]
    assert [rec["text"] for rec in lines] == ["plain string", "an object"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\n')
    res = run("routes", "--model", "builtin:mixtral", "--file", bad, "--out", tmp_path / "r2")
    assert res.exit_code == 2 and "line 1" in res.output and not (tmp_path / "r2").exists()


def test_expected_balance_after_pruning_sums_each_group():
    """The prune report's 'after' balance: each new expert's members' calibration counts summed,
    dropped experts' slots left out."""
    from uncurl.report import expected_after

    assert expected_after([5, 3, 2, 0], [[0], [1, 2]]) == [5, 5]
    assert balance(expected_after([5, 3, 2, 0], [[0], [1, 2]]))["entropy"] == 1.0
