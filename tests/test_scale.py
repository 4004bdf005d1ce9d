"""Models larger than the machine: the sequential pipeline (each layer's weights read once) gives
the whole-model pass's plan and checkpoint; shard profiles of a job array add up to the whole
profile; a torchrun data-parallel run gives one process's checkpoint. Bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import representatives
from typer.testing import CliRunner

from uncurl.cli import app
from uncurl.offload import READS, counting
from uncurl.pipeline import PruneOptions, plan_all, prepare
from uncurl.profile import Profile
from uncurl.report import Timings
from uncurl.stats import STATISTICS

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
CLI_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "zaya", "gemma4"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))} | {
        "config.json": (folder / "config.json").read_bytes()}


def common(model, data_dir, samples=12):
    return ["--model", model, "--task", "superglue-rte", "--data-dir", data_dir, "--samples", samples,
            "--max-length", 48, "--batch-size", 4]


@pytest.mark.parametrize("family", representatives())
def test_sequential_plans_equal_whole(family, data_dir):
    opts = dict(model=f"builtin:{family}", task="superglue-rte", data_dir=str(data_dir), samples=8, max_length=32,
                batch_size=3, method="frequency")
    whole = prepare(PruneOptions(**opts), [4], Timings())
    seq = prepare(PruneOptions(**opts, pipeline="sequential"), [4], Timings())
    no_outputs = any(s.missing for s in whole.profile.layers.values())  # llama4, longcat_flash: no EAN
    for method in ("frequency", "uncurl") if no_outputs else ("frequency", "ean", "uncurl"):
        assert plan_all(whole, 4, method, 0) == plan_all(seq, 4, method, 0), (family, method)


@pytest.mark.parametrize("family", CLI_FAMILIES)
def test_sequential_prune_writes_the_same_checkpoint(family, tiny_dirs, data_dir, tmp_path):
    args = [*common(tiny_dirs(family), data_dir), "--keep", 4, "--method", "reap", "--no-plots"]
    whole = run("prune", *args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    seq = run("prune", *args, "--pipeline", "sequential", "--out", tmp_path / "seq")
    assert seq.exit_code == 0, seq.output
    assert files(tmp_path / "whole") == files(tmp_path / "seq")


def test_disk_offloaded_sequential_reads_each_layer_once(tiny_dirs, data_dir, tmp_path):
    """Most of mixtral offloaded to disk: the whole-model pass reads the offloaded weights once
    per batch, the sequential one about twice in all (its check's one forward, then each layer
    once), whatever the batches; both write the resident run's checkpoint."""
    opts = dict(model=str(tiny_dirs("mixtral")), task="superglue-rte", data_dir=str(data_dir), samples=16,
                max_length=32, batch_size=2, device_map="auto", max_memory="cpu=30KB")
    from uncurl.load import load_model
    from uncurl.pipeline import run_profile

    reads = {}
    for pipeline in ("whole", "sequential"):
        loaded = load_model(opts["model"], device_map="auto", max_memory="cpu=30KB")
        offloaded = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values()
                        if t.device.type == "meta")
        assert offloaded > 0
        with counting(loaded.model):
            READS.reset()
            profile = run_profile(loaded, PruneOptions(**opts, pipeline=pipeline), 0)
            reads[pipeline] = READS.bytes / offloaded
        assert profile.tokens > 0
    batches = 16 / 2
    assert reads["whole"] >= batches - 0.5, reads
    assert reads["sequential"] <= 2.05, reads
    prune = ["--keep", 4, "--method", "reap", "--no-plots", "--device-map", "auto", "--max-memory", "cpu=30KB"]
    base = [*common(tiny_dirs("mixtral"), data_dir), "--keep", 4, "--method", "reap", "--no-plots"]
    assert run("prune", *base, "--out", tmp_path / "plain").exit_code == 0
    res = run("prune", *common(tiny_dirs("mixtral"), data_dir), *prune, "--pipeline", "sequential",
              "--out", tmp_path / "seq")
    assert res.exit_code == 0, res.output
    assert files(tmp_path / "plain") == files(tmp_path / "seq")


def test_a_family_whose_layers_cannot_run_alone_exits_2(data_dir, tmp_path, monkeypatch):
    from test_sequential import _custom_stack

    import uncurl.pipeline as P

    load = P.load_model

    def looped(*args, **kwargs):
        loaded = load(*args, **kwargs)
        _custom_stack(loaded.model, "loop")
        return loaded

    monkeypatch.setattr(P, "load_model", looped)
    res = run("prune", *common("builtin:mixtral", data_dir), "--pipeline", "sequential", "--out", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert "decoder layer model.layers.1 runs twice in a forward" in res.output and "--pipeline whole" in res.output
    assert not (tmp_path / "o").exists()
    res = run("profile", *common("builtin:mixtral", data_dir), "--pipeline", "layered", "--out", tmp_path / "p")
    assert res.exit_code == 2 and "--pipeline 'layered' is not one of auto, whole, sequential" in res.output


# ---- shard profiles (a job array) ----------------------------------------------------------------

def _same_profile(a: Profile, b: Profile, rtol: float = 1e-9) -> None:
    assert a.layer_index == b.layer_index and a.tokens == b.tokens
    for name, w in a.layers.items():
        g = b.layers[name]
        assert torch.equal(g.counts, w.counts) and torch.equal(g.logit_sample[:, 0], w.logit_sample[:, 0]), name
        for stat in STATISTICS:
            torch.testing.assert_close(getattr(g, stat), getattr(w, stat), rtol=rtol, atol=rtol, msg=stat)


@pytest.mark.parametrize("pipeline", ["whole", "sequential"])
def test_shard_profiles_add_up_to_the_whole(pipeline, tiny_dirs, data_dir, tmp_path):
    args = [*common(tiny_dirs("qwen3_moe"), data_dir, samples=13), "--pipeline", pipeline]
    assert run("profile", *args, "--out", tmp_path / "all.profile").exit_code == 0
    for i in range(3):
        res = run("profile", *args, "--shard", f"{i}/3", "--out", tmp_path / f"s{i}.profile")
        assert res.exit_code == 0, res.output
    shards = [tmp_path / f"s{i}.profile" for i in (2, 0, 1)]  # any order
    res = run("profile-merge", tmp_path / "merged.profile", *shards)
    assert res.exit_code == 0, res.output
    whole, merged = Profile.load(tmp_path / "all.profile"), Profile.load(tmp_path / "merged.profile")
    _same_profile(whole, merged)
    assert merged.meta["task"] == whole.meta["task"] and merged.meta["shards"] == 3
    # prune from the merged profile: the checkpoint of the one-pass profile
    prune = [*common(tiny_dirs("qwen3_moe"), data_dir, samples=13), "--keep", 4, "--method", "reap", "--no-plots"]
    assert run("prune", *prune, "--profile", tmp_path / "all.profile", "--out", tmp_path / "a").exit_code == 0
    assert run("prune", *prune, "--profile", tmp_path / "merged.profile", "--out", tmp_path / "b").exit_code == 0
    assert files(tmp_path / "a") == files(tmp_path / "b")
    # a shard alone is not a profile of the task
    res = run("prune", *prune, "--profile", shards[0], "--out", tmp_path / "c")
    assert res.exit_code == 2 and "is shard 2/3 of the calibration texts only" in res.output, res.output
    # not all shards, a shard twice, another seed
    res = run("profile-merge", tmp_path / "m2.profile", shards[0], shards[1])
    assert res.exit_code == 2 and "shards 1/3 are missing" in res.output, res.output
    res = run("profile-merge", tmp_path / "m2.profile", *shards, shards[0])
    assert res.exit_code == 2 and "are both shard 2/3" in res.output, res.output
    res = run("profile", *args, "--seed", 1, "--shard", "1/3", "--out", tmp_path / "seed1.profile")
    assert res.exit_code == 0, res.output
    res = run("profile-merge", tmp_path / "m2.profile", shards[0], shards[1], tmp_path / "seed1.profile")
    assert res.exit_code == 2 and "'seed' other than" in res.output, res.output
    res = run("profile-merge", tmp_path / "m2.profile", shards[0], shards[1], tmp_path / "all.profile")
    assert res.exit_code == 2 and "is not a shard profile" in res.output, res.output
    assert not (tmp_path / "m2.profile").exists()


@pytest.mark.parametrize("spec", ["3/2", "0/0", "abc", "1/", "-1/2", "14/20"])
def test_a_bad_shard_spec_exits_2(spec, data_dir, tmp_path):
    res = run("profile", *common("builtin:mixtral", data_dir, samples=13), "--shard", spec,
              "--out", tmp_path / "p.profile")
    assert res.exit_code == 2, res.output
    assert f"--shard {spec!r}" in res.output or "more than the 13 calibration texts" in res.output, res.output
    assert not (tmp_path / "p.profile").exists()


# ---- torch.distributed: torchrun on CPU (gloo) -------------------------------------------------

def torchrun(*args, nproc=2, env=None, timeout=600):
    """``torchrun --nproc-per-node nproc -m uncurl ARGS``; nproc 0: ``python -m uncurl ARGS``, the
    same environment (one thread each: float32 sums in the same order as the ranks')."""
    launch = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc)] if nproc else [
        sys.executable]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launch, "-m", "uncurl", *map(str, args)],
                          capture_output=True, text=True, env=environ, timeout=timeout, cwd=ROOT)


def test_torchrun_two_ranks_write_the_one_process_checkpoint(tiny_dirs, data_dir, tmp_path):
    args = [*common(tiny_dirs("mixtral"), data_dir, samples=13), "--keep", 4, "--method", "reap", "--merge", "aligned",
            "--no-plots"]  # the kept experts copied: byte for byte (the fit: the test below)
    one = run("prune", *args, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = torchrun("prune", *args, "--out", tmp_path / "two", "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert two.stdout.count('"output"') == 1  # rank 0 alone reports
    # layer by layer: each rank takes its share of every layer, the statistics gathered per layer,
    # rank 0 writes; through the pruned layers too
    for through in ("original", "pruned"):
        seq = [*args, "--pipeline", "sequential", "--calibrate-through", through]
        assert run("prune", *seq, "--out", tmp_path / f"one-{through}").exit_code == 0
        res = torchrun("prune", *seq, "--out", tmp_path / f"two-{through}", "--json")
        assert res.returncode == 0, res.stderr[-3000:]
        assert files(tmp_path / f"one-{through}") == files(tmp_path / f"two-{through}"), through
    assert files(tmp_path / "one-original") == files(tmp_path / "one")
    # the profile, layer by layer on each rank: the gathered statistics are the two shards' combined
    # (to float64 rounding: the same per-token values, added in the same order) ...
    prof = [*common(tiny_dirs("mixtral"), data_dir, samples=13), "--pipeline", "sequential"]
    res = torchrun("profile", *prof, "--out", tmp_path / "two.profile")
    assert res.returncode == 0, res.stderr[-3000:]
    for i in range(2):
        res = torchrun("profile", *prof, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}.profile", nproc=0)
        assert res.returncode == 0, res.stderr[-3000:]
    merged = Profile.combine_shards([Profile.load(tmp_path / f"s{i}.profile") for i in range(2)])
    two = Profile.load(tmp_path / "two.profile")
    _same_profile(merged, two, rtol=1e-12)
    # ... and one process's, to float32 rounding (other batches: the forward's sums in another order)
    assert run("profile", *prof, "--out", tmp_path / "one.profile").exit_code == 0
    _same_profile(Profile.load(tmp_path / "one.profile"), two, rtol=1e-6)


def test_torchrun_fits_like_one_process(tiny_dirs, data_dir, tmp_path):
    """The default merge (auto: fit, layer by layer) under torchrun: each rank replays its share and the
    normal equations are summed over the ranks, so the checkpoint is one process's, to float rounding."""
    from safetensors.torch import load_file

    args = [*common(tiny_dirs("mixtral"), data_dir, samples=13), "--keep", 2, "--no-plots"]
    assert run("prune", *args, "--out", tmp_path / "one").exit_code == 0
    res = torchrun("prune", *args, "--out", tmp_path / "two", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "report" / "report.json").read_text()) for d in ("one", "two")]
    assert [r["merge"] for r in reports] == ["fit", "fit"] and reports[1]["pipeline"]["layer_by_layer"]
    fits = [r["fit"]["layers"] for r in reports]
    assert fits[0].keys() == fits[1].keys() and fits[0]
    for name in fits[0]:
        assert fits[0][name]["tokens"] == fits[1][name]["tokens"] and fits[0][name]["pairs"] == fits[1][name]["pairs"]
        assert fits[0][name]["error_after"] == pytest.approx(fits[1][name]["error_after"], rel=1e-5)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(f["step"] > 0 and f["error_after"] < f["error_before"] for f in fits[1].values())  # it did fit


def test_torchrun_more_ranks_than_texts_exits_2_on_every_rank(tiny_dirs, data_dir, tmp_path):
    res = torchrun("profile", *common(tiny_dirs("mixtral"), data_dir, samples=1), "--out", tmp_path / "p.profile")
    assert res.returncode != 0
    assert res.stderr.count("2 ranks: more than the 1 calibration texts") == 2, res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr or "exit code 2" in res.stderr.lower() or "exitcode: 2" in res.stderr, \
        res.stderr[-3000:]
    assert not (tmp_path / "p.profile").exists()


@pytest.mark.parametrize("pipeline", ["whole", "sequential"])  # sequential: it dies at the first layer's gather
def test_a_rank_that_dies_fails_the_run_on_every_rank(pipeline, tiny_dirs, data_dir, tmp_path):
    start = time.monotonic()
    res = torchrun("prune", *common(tiny_dirs("mixtral"), data_dir, samples=13), "--keep", 4, "--no-plots",
                   "--pipeline", pipeline, "--out", tmp_path / "o",
                   env={"UNCURL_TEST_DIE_RANK": "1", "UNCURL_DIST_TIMEOUT": "60"})
    assert res.returncode != 0, res.stderr[-3000:]
    assert time.monotonic() - start < 300
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")], list(tmp_path.iterdir())
