"""`uncurl monitor`: coverage of new traffic on the pruned model's experts, the gate's exit code, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from uncurl.cli import app
from uncurl.errors import EXIT_COVERAGE

runner = CliRunner()
FAST = ["--samples", 12, "--max-length", 48]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def payload(res) -> dict:
    return json.loads(res.stdout[res.stdout.index("{"):])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, data_dir):
    """keep -> an `uncurl prune` output of builtin:mixtral (8 experts, top-2) on RTE."""
    root, made = tmp_path_factory.mktemp("monitor"), {}

    def get(keep: int, method: str = "frequency"):
        if (keep, method) not in made:
            out = root / f"k{keep}-{method}"
            res = run("prune", "--model", "builtin:mixtral", "--keep", keep, "--method", method, "--merge", "average",
                      "--router", "mean", "--data-dir", data_dir, "--out", out, "--no-plots", *FAST)
            assert res.exit_code == 0, res.output
            made[keep, method] = out
        return made[keep, method]

    return get


def monitor(pruned_dir, out, data_dir, *extra):
    return run("monitor", "--pruned", pruned_dir, "--task", "superglue-cb", "--data-dir", data_dir, "--out", out,
               *FAST, "--json", *extra)


def test_keep_every_expert_covers_everything(pruned, tmp_path, data_dir):
    res = monitor(pruned(8), tmp_path / "m", data_dir, "--min-coverage", 1.0)
    assert res.exit_code == 0, res.output
    r = payload(res)
    assert r["overall"]["coverage"] == 1.0 and r["overall"]["dropped"] == 0.0 and r["gate"]["passed"]
    assert all(layer["coverage"] == 1.0 and layer["dropped_experts"] == [] for layer in r["layers"])
    assert 0 <= r["overall"]["js_divergence"] <= 1
    on_disk = json.loads((tmp_path / "m" / "monitor.json").read_text())
    assert on_disk["overall"] == r["overall"] and (tmp_path / "m" / "monitor.png").stat().st_size > 0
    assert "Coverage 100.0%" in (tmp_path / "m" / "monitor.md").read_text()


def test_gate_exit_code_and_shares(pruned, tmp_path, data_dir):
    res = monitor(pruned(2), tmp_path / "m", data_dir, "--min-coverage", 0.999)
    assert res.exit_code == EXIT_COVERAGE == 5, res.output
    r = json.loads((tmp_path / "m" / "monitor.json").read_text())  # written whatever the verdict
    o = r["overall"]
    assert r["exit_code"] == 5 and not r["gate"]["passed"] and o["coverage"] < 0.999
    assert o["kept"] + o["merged"] + o["dropped"] == pytest.approx(1, abs=1e-5) and o["merged"] == 0
    assert o["coverage"] == pytest.approx(1 - o["dropped"], abs=1e-6)
    for layer in r["layers"]:
        assert len(layer["dropped_experts"]) == 6
    ok = monitor(pruned(2), tmp_path / "m2", data_dir, "--min-coverage", 0.0)
    assert ok.exit_code == 0 and payload(ok)["exit_code"] == 0


def test_the_traffic_must_be_named(pruned, tmp_path, data_dir):
    """A gate has no default traffic: without --task or --file it exits 2 saying so (prune's default
    task, superglue-rte, would silently check the calibration task itself)."""
    res = run("monitor", "--pruned", pruned(2), "--data-dir", data_dir, "--out", tmp_path / "m", *FAST)
    assert res.exit_code == 2 and "--task" in res.output and "--file" in res.output, res.output
    assert not (tmp_path / "m").exists()


def test_divergence_gate(pruned, tmp_path, data_dir):
    """--max-divergence: exit 5 above the bound (any other task's usage differs from RTE's calibration
    a little, so 0 fails), 0 within it, 2 for a bound outside 0..1; both bounds are checked together."""
    res = monitor(pruned(2), tmp_path / "m", data_dir, "--max-divergence", 0.0)
    assert res.exit_code == EXIT_COVERAGE, res.output
    r = json.loads((tmp_path / "m" / "monitor.json").read_text())
    assert r["overall"]["js_divergence"] > 0 and not r["gate"]["passed"]
    assert r["gate"]["failed"] == [f"js_divergence {r['overall']['js_divergence']:.4g} not <= 0"]
    both = monitor(pruned(2), tmp_path / "m2", data_dir, "--max-divergence", 1.0, "--min-coverage", 0.0)
    assert both.exit_code == 0 and payload(both)["gate"]["passed"], both.output
    bad = monitor(pruned(2), tmp_path / "m3", data_dir, "--max-divergence", 2)
    assert bad.exit_code == 2 and "--max-divergence 2" in bad.output and not (tmp_path / "m3").exists()


def test_merged_experts_count_as_covered_and_apart(pruned, tmp_path, data_dir):
    res = monitor(pruned(4, "uncurl"), tmp_path / "m", data_dir)
    assert res.exit_code == 0, res.output
    o = payload(res)["overall"]
    assert o["merged"] > 0 and o["dropped"] == 0 and o["coverage"] == 1.0  # grouping methods drop nothing


def test_profile_reused_gives_the_same_figures(pruned, tmp_path, data_dir):
    prof = tmp_path / "cb.profile"
    assert run("profile", "--model", "builtin:mixtral", "--task", "superglue-cb", "--data-dir", data_dir, "--out", prof,
               *FAST).exit_code == 0
    direct = monitor(pruned(2), tmp_path / "a", data_dir, "--split", "calibration")
    reused = run("monitor", "--pruned", pruned(2), "--profile", prof, "--out", tmp_path / "b", "--json")
    assert direct.exit_code == 0 and reused.exit_code == 0, reused.output
    assert payload(direct)["overall"] == payload(reused)["overall"]


def test_bad_input_exits_2_naming_it(pruned, tmp_path, data_dir):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    for folder, said in ((plain, "is not an uncurl prune output"), (tmp_path / "missing", "no such folder")):
        res = monitor(folder, tmp_path / "m", data_dir)
        assert res.exit_code == 2 and said in res.output and str(folder) in res.output.replace("\n", "")
    res = monitor(pruned(2), tmp_path / "m", data_dir, "--parent", "builtin:qwen2_moe")
    assert res.exit_code == 2 and "qwen2_moe model" in res.output and "--parent builtin:qwen2_moe" in res.output
    res = monitor(pruned(2), tmp_path / "m", data_dir, "--parent", "builtin:mixtral", "--seed", 1)
    assert res.exit_code == 2 and "router fingerprint" in res.output
    other = tmp_path / "other.profile"
    assert run("profile", "--model", "builtin:mixtral", "--seed", 1, "--task", "superglue-cb", "--data-dir", data_dir,
               "--out", other, *FAST).exit_code == 0
    res = run("monitor", "--pruned", pruned(2), "--profile", other, "--out", tmp_path / "m")
    assert res.exit_code == 2 and f"--profile {other}" in res.output.replace("\n", "")
    res = monitor(pruned(2), tmp_path / "m", data_dir, "--min-coverage", 1.5)
    assert res.exit_code == 2 and "--min-coverage" in res.output
    assert not (tmp_path / "m").exists()


def test_a_local_parent_is_found_from_another_folder(tmp_path, data_dir, tiny_dirs, monkeypatch):
    """The report records the parent folder's absolute path: monitor finds it from any working folder."""
    import shutil

    src = tmp_path / "parent"
    shutil.copytree(tiny_dirs("olmoe"), src)
    monkeypatch.chdir(tmp_path)
    assert run("prune", "--model", "parent", "--keep", 4, "--data-dir", data_dir, "--out", "k4", "--no-plots",
               *FAST).exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = monitor(tmp_path / "k4", tmp_path / "m", data_dir)
    assert res.exit_code == 0, res.output
    assert payload(res)["parent"] == str(src.resolve())
