"""Pruning layer by layer (``layerwise.py``: profile, plan, merge and write each decoder layer in
one visit) writes the whole-model pass's checkpoint; ``--calibrate-through pruned`` feeds each layer
what the pruned layers before it give; an offloaded model's weights are read once in all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import representatives
from safetensors.torch import load_file
from typer.testing import CliRunner

from uncurl.adapters import ADAPTERS, expert_count, find_moe_layers, installed, routing_groups, top_k
from uncurl.cli import app
from uncurl.cluster import plan_layer
from uncurl.layerwise import prune_layer_by_layer
from uncurl.load import build_tiny
from uncurl.merge import rewrite_model
from uncurl.profile import profile_model
from uncurl.save import write_checkpoint
from uncurl.stats import STATISTICS

runner = CliRunner()
RULES = {"criterion": ("reap", "aligned", "mean"), "merge": ("uncurl", "aligned", "refit")}


def _keep(model, adapter) -> int:
    e, n_group = expert_count(model.config, adapter), routing_groups(model.config, adapter)[0]
    keep = max(top_k(model.config, adapter), e // 2)
    return -(-keep // n_group) * n_group if n_group > 1 else keep


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("rules", list(RULES))
@pytest.mark.parametrize("family", representatives())
def test_layer_by_layer_writes_the_whole_model_checkpoint(family, rules, texts, tmp_path):
    method, merge, router = RULES[rules]
    adapter = ADAPTERS[family]
    model, tok = build_tiny(family, seed=0)
    keep, n_group = _keep(model, adapter), routing_groups(model.config, adapter)[0]
    if any(s.missing for s in profile_model(model, tok, adapter, texts[:2], max_length=16).layers.values()):
        method = "frequency"  # llama4, longcat_flash: no expert outputs recorded
    profile = profile_model(model, tok, adapter, texts, batch_size=2, max_length=32, seed=1)
    plans = {n: plan_layer(s, keep, method, n_group, 1) for n, s in profile.layers.items()}
    whole = rewrite_model(model, adapter, plans, router_rule=router, merge=merge, stats=profile.layers)
    write_checkpoint(whole, None, tmp_path / "whole")

    fresh, _ = build_tiny(family, seed=0)  # consumed by the layer-by-layer run
    result = prune_layer_by_layer(fresh, tok, adapter, texts, tmp_path / "layers", keep=keep,
                                  plan=lambda name, stats: plan_layer(stats, keep, method, n_group, 1), merge=merge,
                                  router_rule=router, batch_size=2, max_length=32, seed=1)
    assert result.plans == plans
    assert (tmp_path / "whole" / "config.json").read_text() == (tmp_path / "layers" / "config.json").read_text()
    names = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "layers").glob("*.safetensors"))
    if rules == "criterion":  # the same bytes
        for name in names:
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "layers" / name).read_bytes(), name
    else:  # merges: the same tensors to float rounding (the profile's sums come in another order)
        want, got = _tensors(tmp_path / "whole"), _tensors(tmp_path / "layers")
        assert want.keys() == got.keys()
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_calibrate_through_pruned_feeds_the_pruned_layers_outputs(texts, tmp_path, monkeypatch):
    """Layer 0's statistics are the same either way; layer 1's, through the pruned layer 0, are
    those of a whole-model pass of the model whose layer 0 is the pruned one (from the checkpoint)."""
    from uncurl.load import from_folder
    from transformers import AutoConfig

    adapter, keep = ADAPTERS["mixtral"], 2
    runs = {}
    for through in ("original", "pruned"):
        model, tok = build_tiny("mixtral", seed=0)
        runs[through] = prune_layer_by_layer(model, tok, adapter, texts, tmp_path / through, keep=keep,
                                             plan=lambda name, stats: plan_layer(stats, keep, "reap"),
                                             merge="aligned", router_rule="mean", through=through, batch_size=2,
                                             max_length=32)
    first, second = "model.layers.0.mlp", "model.layers.1.mlp"
    a, b = runs["original"].profile.layers, runs["pruned"].profile.layers
    assert torch.equal(a[first].counts, b[first].counts)
    assert not torch.equal(a[second].counts, b[second].counts)

    original, tok = build_tiny("mixtral", seed=0)
    folder = tmp_path / "pruned"
    pruned = from_folder(folder, AutoConfig.from_pretrained(folder), torch.float32)
    original.model.layers[0] = pruned.model.layers[0]  # the pruned layer 0 feeding the original layer 1
    block = [layer for layer in find_moe_layers(original, adapter) if layer.name == second]
    monkeypatch.setattr("uncurl.profile.find_moe_layers", lambda m, a: block)
    truth = profile_model(original, tok, adapter, texts, batch_size=2, max_length=32).layers[second]
    assert torch.equal(b[second].counts, truth.counts)
    for stat in STATISTICS:
        torch.testing.assert_close(getattr(b[second], stat), getattr(truth, stat), rtol=1e-5, atol=1e-6, msg=stat)


def test_calibrate_through_pruned_at_keep_e_changes_nothing(texts, tmp_path):
    adapter = ADAPTERS["mixtral"]
    for through in ("original", "pruned"):
        model, tok = build_tiny("mixtral", seed=0)
        e = expert_count(model.config, adapter)
        prune_layer_by_layer(model, tok, adapter, texts, tmp_path / through, keep=e,
                             plan=lambda name, stats: plan_layer(stats, e, "reap"), merge="aligned", router_rule="mean",
                             through=through, batch_size=2, max_length=32)
    assert (tmp_path / "original" / "model.safetensors").read_bytes() == (
        tmp_path / "pruned" / "model.safetensors").read_bytes()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_offloaded_prune_reads_the_input_once(tiny_dirs, data_dir, tmp_path):
    """Most of mixtral offloaded to disk, 16 texts in 8 batches: the layer-by-layer prune reads the
    offloaded weights once in all (every stage before the check of the written checkpoint), the
    whole-model one once per batch in its profile; both write the resident run's checkpoint."""
    from uncurl.load import load_model

    folder = tiny_dirs("mixtral")
    loaded = load_model(str(folder), device_map="auto", max_memory="cpu=30KB")
    offloaded = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values() if t.device.type == "meta")
    del loaded
    data = ["--model", folder, "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 16, "--max-length", 32,
            "--batch-size", 2, "--keep", 4, "--method", "reap", "--merge", "aligned", "--no-plots"]  # kept as they are
    offload = ["--device-map", "auto", "--max-memory", "cpu=30KB"]
    assert _run("prune", *data, "--out", tmp_path / "plain").exit_code == 0
    reads = {}
    for pipeline in ("whole", "sequential"):
        res = _run("prune", *data, *offload, "--pipeline", pipeline, "--out", tmp_path / pipeline)
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / pipeline / "report" / "report.json").read_text())
        assert report["pipeline"]["layer_by_layer"] == (pipeline == "sequential")
        reads[pipeline] = {k: v / offloaded for k, v in report["offload_reads_bytes"].items()}
        for name in sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors")):
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / pipeline / name).read_bytes()
    input_reads = {p: sum(v for k, v in r.items() if k != "verify") for p, r in reads.items()}
    assert input_reads["sequential"] <= 1.05, reads
    assert reads["whole"]["profile"] >= 8 - 0.5, reads  # once per batch
    assert set(reads["sequential"]) <= {"layers", "verify"}, reads


def test_calibrate_through_pruned_needs_the_layer_by_layer_prune(data_dir, tmp_path):
    """It is a layer-by-layer prune (auto turns one on for it); whatever excludes one is refused."""
    base = ["prune", "--model", "builtin:mixtral", "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 4,
            "--out", tmp_path / "o", "--calibrate-through"]
    res = _run(*base, "pruned", "--pipeline", "whole")
    assert res.exit_code == 2 and "--calibrate-through pruned" in res.output, res.output
    assert "--pipeline sequential or auto" in res.output
    res = _run(*base, "pruned", "--pipeline", "sequential", "--recover", 3)
    assert res.exit_code == 2 and "no --recover" in res.output, res.output
    res = _run(*base, "sideways")
    assert res.exit_code == 2 and "'sideways' is not one of original, pruned" in res.output
    assert not (tmp_path / "o").exists()


def test_auto_runs_an_offloaded_prune_layer_by_layer_and_a_resident_one_whole(tiny_dirs, data_dir, tmp_path):
    data = ["--model", tiny_dirs("mixtral"), "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 4,
            "--max-length", 32, "--keep", 4, "--method", "reap", "--merge", "aligned", "--no-plots"]  # auto's fit:
    assert _run("prune", *data, "--out", tmp_path / "resident").exit_code == 0  # layer by layer (test_fit)
    res = _run("prune", *data, "--device-map", "auto", "--max-memory", "cpu=30KB", "--out", tmp_path / "offloaded")
    assert res.exit_code == 0, res.output
    pipelines = {k: json.loads((tmp_path / k / "report" / "report.json").read_text())["pipeline"]
                 for k in ("resident", "offloaded")}
    assert pipelines["resident"] == {"requested": "auto", "name": "whole", "layer_by_layer": False,
                                     "calibrate_through": "original"}
    assert pipelines["offloaded"]["name"] == "sequential" and pipelines["offloaded"]["layer_by_layer"]
    assert (tmp_path / "resident" / "model.safetensors").read_bytes() == (
        tmp_path / "offloaded" / "model.safetensors").read_bytes()


# ---- --recover-local: each pruned block trained on its own layer's calibration inputs ---------

def _local(tmp_path, name, texts, steps, keep=2, seed=0, experts=False):
    model, tok = build_tiny("mixtral", seed=0)
    return prune_layer_by_layer(model, tok, ADAPTERS["mixtral"], texts, tmp_path / name, keep=keep,
                                plan=lambda n, stats: plan_layer(stats, keep, "uncurl"), merge="aligned",
                                router_rule="mean", batch_size=2, max_length=32, seed=seed, recover_local=steps,
                                recover_experts=experts)


def test_recover_local_trains_only_routers_and_lowers_each_blocks_error(texts, tmp_path):
    """The errors the report gives are the written checkpoint's: layer 0's block, reloaded, against
    the original block on the same inputs (layer 0's inputs do not depend on the pruning)."""
    from transformers import AutoConfig

    from uncurl.load import from_folder

    plain = _local(tmp_path, "plain", texts, 0)
    trained = _local(tmp_path, "trained", texts, 40)
    assert trained.plans == plain.plans
    for name, rep in trained.local.items():
        assert rep["kept"] == (rep["after"] < rep["before"]), name
    assert all(rep["kept"] for rep in trained.local.values()), trained.local
    want, got = _tensors(tmp_path / "plain"), _tensors(tmp_path / "trained")
    changed = sorted(n for n in want if not torch.equal(want[n], got[n]))
    assert changed and all(".gate." in n or "router" in n for n in changed), changed

    original, tok = build_tiny("mixtral", seed=0)
    folder = tmp_path / "trained"
    pruned = from_folder(folder, AutoConfig.from_pretrained(folder), torch.float32)
    seen = {}
    original.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    from uncurl.profile import indexed_batches

    num = den = 0.0
    for _, batch in indexed_batches(tok, texts, batch_size=2, max_length=32):
        with torch.no_grad():
            original(**batch)
            y2 = pruned.model.layers[0].mlp(seen["x"])
        mask = batch["attention_mask"].reshape(-1).bool()
        h = seen["y"].shape[-1]
        y, y2 = seen["y"].reshape(-1, h)[mask], y2.reshape(-1, h)[mask]
        num += float(((y2 - y) ** 2).sum())
        den += float((y ** 2).sum())
    assert abs(num / den - trained.local["model.layers.0.mlp"]["after"]) < 1e-5 * max(1.0, num / den)


def test_recover_local_is_seeded_and_changes_nothing_at_keep_e(texts, tmp_path):
    a, b = _local(tmp_path, "a", texts, 10, seed=3), _local(tmp_path, "b", texts, 10, seed=3)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    _local(tmp_path, "e0", texts, 0, keep=8)
    _local(tmp_path, "e10", texts, 10, keep=8, experts=True)
    assert (tmp_path / "e0" / "model.safetensors").read_bytes() == (tmp_path / "e10" / "model.safetensors").read_bytes()


def test_recover_local_needs_the_layer_by_layer_prune(data_dir, tmp_path):
    base = ["prune", "--model", "builtin:mixtral", "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 4,
            "--out", tmp_path / "o"]
    res = _run(*base, "--recover-local", -1)
    assert res.exit_code == 2 and "--recover-local -1 must be a number of steps >= 0" in res.output, res.output
    res = _run(*base, "--recover-local", 5, "--pipeline", "whole")
    assert res.exit_code == 2 and "--recover-local" in res.output and "--pipeline sequential or auto" in res.output
    res = _run(*base, "--recover-local", 5, "--keep", 4, "--no-plots")  # auto: layer by layer
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    assert report["pipeline"]["layer_by_layer"] and report["recover_local"]["steps"] == 5
    assert set(report["recover_local"]["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_layer_by_layer_fit_equals_the_whole_model_fit(family, texts, tmp_path):
    """--merge fit in the layer visit (its blocks' own calls replayed) fits what the whole-model fit
    (two more passes of the original model) fits: the same down projections to float rounding."""
    from uncurl.fit import fit_model

    adapter = ADAPTERS[family]
    model, tok = build_tiny(family, seed=0)
    keep = _keep(model, adapter)
    profile = profile_model(model, tok, adapter, texts, batch_size=2, max_length=32)
    plans = {n: plan_layer(s, keep, "uncurl") for n, s in profile.layers.items()}
    whole = rewrite_model(model, adapter, plans, router_rule="refit", merge="fit", stats=profile.layers)
    report = fit_model(model, whole, adapter, plans, tok, texts, batch_size=2, max_length=32)
    write_checkpoint(whole, None, tmp_path / "whole")
    fresh, _ = build_tiny(family, seed=0)
    result = prune_layer_by_layer(fresh, tok, adapter, texts, tmp_path / "layers", keep=keep,
                                  plan=lambda name, stats: plan_layer(stats, keep, "uncurl"), merge="fit",
                                  router_rule="refit", batch_size=2, max_length=32)
    assert result.fits.keys() == report["layers"].keys() and result.fits
    for name, entry in result.fits.items():
        assert entry["error_after"] < entry["error_before"], name
        assert abs(entry["error_after"] - report["layers"][name]["error_after"]) < 1e-4, name
    want, got = _tensors(tmp_path / "whole"), _tensors(tmp_path / "layers")
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-3, atol=1e-4, msg=name)
    changed = [n for n in want if "down" in n or "w2" in n]
    assert changed


def test_layer_by_layer_fit_chunked_over_experts_is_the_same_bytes(texts, tmp_path):
    """Under a memory budget too small for a layer's normal equations the layer-by-layer fit builds
    them one expert per sweep over the visit's calls (the residual kept from the first): the same
    checkpoint, byte for byte, as all experts in one sweep."""
    adapter = ADAPTERS["mixtral"]
    tok = build_tiny("mixtral", seed=0)[1]
    reports = {}
    for name, memory in (("one_sweep", 4 * 64 * (64 + 64) * 8), ("chunked", 1)):  # per expert: I (I + H) float64
        fresh, _ = build_tiny("mixtral", seed=0)
        keep = _keep(fresh, adapter)
        reports[name] = prune_layer_by_layer(fresh, tok, adapter, texts, tmp_path / name, keep=keep,
                                             plan=lambda n, stats: plan_layer(stats, keep, "uncurl"), merge="fit",
                                             router_rule="refit", batch_size=2, max_length=32, fit_memory=memory).fits
    assert reports["one_sweep"] == reports["chunked"] and reports["chunked"]
    assert all(v["solve"] == "per expert" and v["step"] > 0 for v in reports["chunked"].values())
    assert (tmp_path / "one_sweep" / "model.safetensors").read_bytes() == \
        (tmp_path / "chunked" / "model.safetensors").read_bytes()


def test_fit_under_device_map_runs_layer_by_layer(tiny_dirs, data_dir, tmp_path):
    data = ["--model", tiny_dirs("mixtral"), "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 8,
            "--max-length", 32, "--batch-size", 2, "--keep", 4, "--merge", "fit", "--no-plots"]
    res = _run("prune", *data, "--device-map", "auto", "--max-memory", "cpu=30KB", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    assert report["pipeline"]["layer_by_layer"] and report["fit"]["layers"]
    res = _run("prune", *data, "--device-map", "auto", "--pipeline", "whole", "--out", tmp_path / "w")
    assert res.exit_code == 2 and "runs layer by layer" in res.output, res.output
    res = _run("prune", *data, "--device-map", "auto", "--recover", 2, "--out", tmp_path / "r")
    assert res.exit_code == 2 and "without --recover" in res.output, res.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()


def test_auto_fits_a_resident_model_layer_by_layer_unless_recovering(tiny_dirs, data_dir, tmp_path):
    """--pipeline auto runs --merge fit layer by layer on a resident model too (no second model), and
    writes what --pipeline whole writes; with --recover (which needs the parent) it runs whole."""
    data = ["--model", tiny_dirs("mixtral"), "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 8,
            "--max-length", 32, "--batch-size", 2, "--keep", 4, "--merge", "fit", "--method", "uncurl", "--no-plots"]
    used = {}
    for name, extra in (("auto", []), ("whole", ["--pipeline", "whole"]), ("recover", ["--recover", 1])):
        res = _run("prune", *data, *extra, "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
        used[name] = json.loads((tmp_path / name / "report" / "report.json").read_text())["pipeline"]
    assert used["auto"]["name"] == "sequential" and used["auto"]["layer_by_layer"]
    assert used["whole"]["name"] == used["recover"]["name"] == "whole"
    want, got = _tensors(tmp_path / "whole"), _tensors(tmp_path / "auto")
    assert want.keys() == got.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-3, atol=1e-4, msg=name)


def test_auto_profiles_whole_for_a_fit_that_runs_whole(tiny_dirs):
    """Only a prune that can go layer by layer asks auto for it: a sweep's fits, and a prune from a
    profile file or with --recover, run whole, so their profile runs whole too."""
    from uncurl.load import load_model
    from uncurl.pipeline import PruneOptions, pipeline_for
    from uncurl.sweep import SweepOptions

    loaded = load_model(str(tiny_dirs("mixtral")))
    fit = dict(model="x", task="superglue-rte", merge="fit")
    assert pipeline_for(PruneOptions(**fit), loaded) == "sequential"
    assert pipeline_for(PruneOptions(**fit, recover=1), loaded) == "whole"
    assert pipeline_for(PruneOptions(**fit, profile="p.safetensors"), loaded) == "whole"
    assert pipeline_for(SweepOptions(model="x", task="superglue-rte", merges=("fit",)), loaded) == "whole"


def test_a_layer_by_layer_prune_with_eval_loads_its_checkpoint_once(tiny_dirs, data_dir, tmp_path, monkeypatch):
    """The checkpoint loaded back to evaluate it is the one checked: one load of the output, with
    --eval as without, and the same checks."""
    import uncurl.load

    model = tiny_dirs("mixtral")
    loads = []
    real = uncurl.load.from_folder
    monkeypatch.setattr(uncurl.load, "from_folder",
                        lambda folder, *a, **k: (loads.append(Path(folder)), real(folder, *a, **k))[1])
    data = ["--model", model, "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 8, "--max-length", 32,
            "--batch-size", 2, "--keep", 4, "--pipeline", "sequential", "--no-plots", "--eval-limit", 4]
    checks = {}
    for name, extra in (("plain", []), ("eval", ["--eval"])):
        loads.clear()
        res = _run("prune", *data, *extra, "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
        outputs = [f for f in loads if f.resolve() != Path(model).resolve()]
        assert len(outputs) == 1, (name, loads)
        report = json.loads((tmp_path / name / "report" / "report.json").read_text())
        checks[name] = report["checks"]
    assert "after" in report["eval"] and checks["eval"] == checks["plain"]


def test_recover_local_with_eval_reports_the_task_loss_without_it(tiny_dirs, data_dir, tmp_path):
    """With --eval, the task loss before the layer-local recovery is the loss of the same prune without
    it (--recover-local 0, scored on its own checkpoint), and the report says whether it rose."""
    data = ["--model", tiny_dirs("mixtral"), "--task", "superglue-rte", "--data-dir", data_dir, "--samples", 8,
            "--max-length", 32, "--batch-size", 2, "--keep", 2, "--no-plots", "--eval", "--eval-limit", 8,
            "--metric", "loss"]
    reports = {}
    for steps in (0, 20):
        res = _run("prune", *data, "--recover-local", steps, "--out", tmp_path / str(steps))
        assert res.exit_code == 0, res.output
        reports[steps] = json.loads((tmp_path / str(steps) / "report" / "report.json").read_text())
    local = reports[20]["recover_local"]
    assert any(layer["kept"] for layer in local["layers"].values())
    told = local["task_loss"]
    assert told["compared"] and told["before_recovery"] == pytest.approx(reports[0]["eval"]["after"]["loss"], abs=1e-6)
    assert told["after_recovery"] == reports[20]["eval"]["after"]["loss"] != told["before_recovery"]
    assert told["raised"] == (told["after_recovery"] > told["before_recovery"])
    assert reports[20]["eval"]["merged"]["loss"] == told["before_recovery"]
    assert ("--recover-local raised the task loss" in " ".join(res.output.split())) == told["raised"]


def test_an_offloaded_model_is_evaluated_layer_by_layer_reading_it_once(tiny_dirs, data_dir):
    """The same scores as the resident model's whole-model forwards; the offloaded weights read
    once for all the evaluation batches (a whole-model pass: once per batch)."""
    from uncurl.load import load_model
    from uncurl.offload import READS, counting
    from uncurl.pipeline import RunOptions, run_eval

    folder = str(tiny_dirs("mixtral"))
    opts = dict(model=folder, task="superglue-rte", data_dir=str(data_dir), batch_size=2, eval_max_length=64)
    resident = run_eval(load_model(folder).model, load_model(folder).tokenizer, RunOptions(**opts), 12, 0,
                        per_example=True)
    got = {}
    for pipeline in ("whole", "auto"):
        loaded = load_model(folder, device_map="auto", max_memory="cpu=30KB")
        offloaded = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values()
                        if t.device.type == "meta")
        with counting(loaded.model):
            READS.reset()
            got[pipeline] = run_eval(loaded.model, loaded.tokenizer, RunOptions(**opts, pipeline=pipeline), 12, 0,
                                     per_example=True)
            got[pipeline]["read"] = READS.bytes / offloaded
    assert got["auto"]["read"] <= 1.01, got["auto"]["read"]
    assert got["whole"]["read"] >= 5, got["whole"]["read"]  # 12 examples x 2 choices in batches of 2
    for pipeline, ev in got.items():
        assert ev["acc"] == resident["acc"] and ev["n"] == resident["n"]
        assert abs(ev["loss"] - resident["loss"]) < 1e-5, pipeline
        for a, b in zip(ev["examples"], resident["examples"]):
            assert a["pred"] == b["pred"]
            assert all(abs(x - y) < 1e-4 for x, y in zip(a["ll"], b["ll"]))


def test_recover_local_under_torchrun_is_refused_before_the_work(data_dir, monkeypatch):
    """Each rank would train on its share alone (the fit sums its normal equations over the ranks; this does not)."""
    from uncurl import distributed
    from uncurl.errors import UncurlError
    from uncurl.pipeline import PruneOptions, check_options

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    opts = PruneOptions(model="builtin:mixtral", task="superglue-rte", data_dir=str(data_dir), recover_local=5)
    with pytest.raises(UncurlError, match="--recover-local under torchrun is not supported yet"):
        check_options(opts, evaluating=False)
    monkeypatch.setattr(distributed, "world", lambda: None)
    check_options(opts, evaluating=False)


def test_looped_layers_come_from_the_adapters_config_keys():
    """A looped stack's layers first..end-1 run ``passes`` times; one pass, or a family with no
    loop keys, loops nothing."""
    from transformers import PretrainedConfig

    from uncurl.adapters import looped_layers

    loop = ADAPTERS["inkling2_loop_text"]
    config = PretrainedConfig(loop_layer_index_start=1, loop_layer_index_end=3, loop_num_passes=2)
    assert looped_layers(config, loop) == range(1, 3)
    assert looped_layers(PretrainedConfig(loop_layer_index_start=1, loop_layer_index_end=3, loop_num_passes=1),
                         loop) == range(0)
    assert looped_layers(config, ADAPTERS["mixtral"]) == range(0)


@pytest.mark.skipif(not installed("inkling2_loop_text"), reason="transformers has no inkling2_loop (5.25+)")
def test_a_looped_stack_is_profiled_whole_then_merged(data_dir, tmp_path):
    """Its looped layer runs twice per forward, so it cannot be pruned on its first visit: auto fits
    on the whole model; --pipeline sequential profiles layer by layer (visiting the looped layer
    twice) and merges after, to the same checkpoint as --pipeline whole; the options only a
    layer-by-layer prune runs are refused before anything is written."""
    base = ["prune", "--model", "builtin:inkling2_loop_text", "--task", "superglue-rte", "--data-dir", data_dir,
            "--samples", 8, "--max-length", 32, "--keep", 4, "--no-plots"]
    res = _run(*base, "--out", tmp_path / "auto")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "auto" / "report" / "report.json").read_text())
    assert report["merge"] == "fit" and report["pipeline"]["layer_by_layer"] is False
    for pipeline in ("whole", "sequential"):
        res = _run(*base, "--merge", "aligned", "--pipeline", pipeline, "--out", tmp_path / pipeline)
        assert res.exit_code == 0, res.output
    whole, sequential = _tensors(tmp_path / "whole"), _tensors(tmp_path / "sequential")
    assert whole.keys() == sequential.keys()
    assert all(torch.allclose(whole[k], sequential[k], atol=1e-5) for k in whole)
    res = _run(*base, "--recover-local", 2, "--out", tmp_path / "local")
    assert res.exit_code == 2 and "looped stack" in res.output and "--recover-local" in res.output, res.output
    assert not (tmp_path / "local").exists()
