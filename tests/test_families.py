"""Every family in the adapter table, end to end: prune -> save -> reload -> check from disk.

A new entry in uncurl.adapters.ADAPTERS is enrolled here automatically. Per family, on a tiny
random instance: prune to E/2 and reload with no missing, unexpected or mismatched keys; keep all
E experts and get the original logits bit for bit; every tensor outside the routed experts and
routers (attention, dense layers, shared experts, hybrid mixers) byte-identical. The refused
families exit 2 with their reason. Each family is built, profiled and pruned once per session.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from conftest import is_wrapper, pretrained

from uncurl.adapters import (ADAPTERS, REFUSED, expert_count, expert_id_names, find_moe_layers, language_stack,
                             per_expert_names, tail_rows)
from uncurl.load import PROCESSOR_FILES
from uncurl.pipeline import PruneOptions, prune

FAMILIES = sorted(ADAPTERS)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def disk_tensors(folder):
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def pruned(tiny_dirs, data_dir, tmp_path_factory):
    """family -> (input folder, output folder, report), pruned to E/2 with UNCURL, sharded small."""
    cache = {}

    def get(family):
        if family not in cache:
            src = tiny_dirs(family)
            before = digest(src)
            e = expert_count(pretrained(src).config, ADAPTERS[family])
            out = tmp_path_factory.mktemp("pruned") / family
            result = prune(PruneOptions(model=str(src), task="superglue-rte", keep=e // 2, out=str(out),
                                        data_dir=str(data_dir), samples=8, max_length=64, shard_size="150KB",
                                        plots=False))  # the report's plots: test_cli
            assert digest(src) == before, "the input model folder was modified"
            cache[family] = (src, out, result.report, e)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_to_half_reloads_cleanly(family, pruned, ids):
    src, out, report, e = pruned(family)
    adapter = ADAPTERS[family]
    model, info = pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert expert_count(model.config, adapter) == e // 2
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    layers = find_moe_layers(model, adapter)
    assert len(layers) == len(report["layers"]) > 0
    for layer in layers:
        expert_names, router_names = per_expert_names(layer, adapter)
        state = model.state_dict()
        for name in expert_names + router_names:  # (plus any tail rows: shared, zero or skip slots)
            assert state[name].shape[adapter.expert_axis(name)] in (e // 2, e // 2 + tail_rows(model.config, adapter)), name
        for name in expert_id_names(layer, adapter):  # hash tables name kept experts only
            assert 0 <= int(state[name].min()) and int(state[name].max()) < e // 2, name
    # sharded on disk with an index, and no expert index >= E/2 in the per-expert layout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for key in disk_tensors(out):
        m = re.search(r"experts\.(\d+)\.", key)
        assert m is None or int(m.group(1)) < e // 2 + tail_rows(model.config, adapter), key
    assert (out / "report" / "report.json").is_file() and (out / "tokenizer.json").is_file()
    # the class that saved the input reloads the output (a wrapper's ...ForConditionalGeneration)
    assert type(model).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]
    for name in PROCESSOR_FILES:
        if (src / name).is_file():
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert is_wrapper(model.config) == (out / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_layers_and_shared_experts_unchanged(family, pruned):
    src, out, _, _ = pruned(family)
    adapter = ADAPTERS[family]
    original = pretrained(src)
    reloaded = pretrained(out)
    routed = set()
    for layer in find_moe_layers(original, adapter):
        experts, router = per_expert_names(layer, adapter)
        routed |= set(experts) | set(router) | set(expert_id_names(layer, adapter))
    untouched = {k: v for k, v in original.state_dict().items() if k not in routed}
    got = reloaded.state_dict()
    assert set(got) - routed == set(untouched)
    for name, tensor in untouched.items():
        assert torch.equal(got[name], tensor), name
    for attr in adapter.shared_attrs:  # the comparison above covered the shared experts
        assert any(f".{attr}." in k for k in untouched), attr
    # dense layers (first_k_dense_replace, mlp_layer_types, ...) stay dense, MoE layers stay MoE
    moe_indices = [[m.index for m in find_moe_layers(model, adapter)] for model in (original, reloaded)]
    assert moe_indices[0] == moe_indices[1]
    if is_wrapper(original.config):  # ... and the vision (audio) towers, projectors
        stack = language_stack(original, adapter)[0]
        assert stack and any(not k.startswith(stack + ".") and "embed_tokens" not in k and "lm_head" not in k
                             for k in untouched), stack


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_experts_reproduces_logits(family, tiny_dirs, data_dir, tmp_path, ids):
    src = tiny_dirs(family)
    original = pretrained(src)
    e = expert_count(original.config, ADAPTERS[family])
    prune(PruneOptions(model=str(src), keep=e, out=str(tmp_path / "same"), data_dir=str(data_dir), samples=4,
                       max_length=32, plots=False))
    again = pretrained(tmp_path / "same")
    with torch.no_grad():  # bit for bit: both are read from disk, so not even save/reload noise is allowed
        torch.testing.assert_close(again(ids).logits, original(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_families_exit_2_with_the_reason(family, tmp_path):
    """A checkpoint folder of each refused MoE family: exit 2, the reason named, nothing written."""
    from transformers import AutoConfig
    from typer.testing import CliRunner

    from uncurl.cli import app

    AutoConfig.for_model(family).save_pretrained(tmp_path / "model")
    res = CliRunner().invoke(app, ["prune", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"model family {family!r} cannot be pruned by uncurl: {REFUSED[family]}" in " ".join(res.output.split())
    assert not (tmp_path / "out").exists()


def test_a_family_newer_than_the_installed_transformers_says_so(tmp_path, monkeypatch):
    """A checkpoint of a family in the table that this transformers cannot read: exit 2, upgrade."""
    from typer.testing import CliRunner

    from uncurl.cli import app

    monkeypatch.setitem(ADAPTERS, "future_moe", ADAPTERS["mixtral"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "future_moe"}))
    res = CliRunner().invoke(app, ["prune", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "'future_moe' is not in the installed transformers" in res.output and "upgrade" in res.output


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_next"])  # grouped routing; DeltaNet hybrid (multimodal: test_cli)
def test_cli_end_to_end_with_eval(family, tiny_dirs, data_dir, tmp_path):
    from typer.testing import CliRunner

    from uncurl.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune", "--model", str(tiny_dirs(family)), "--keep", "4", "--eval", "--eval-limit",
                                   "8", "--data-dir", str(data_dir), "--samples", "8", "--max-length", "64",
                                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["keep"] == 4 and summary["model"]["experts_after"] == 4 and summary["exit_code"] == 0
    for when in ("before", "after"):
        assert summary["eval"][when]["n"] == 8 and 0 <= summary["eval"][when]["acc"] <= 1
    _, info = pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


@pytest.mark.parametrize("method", ["uncurl", "frequency"])
def test_report_records_groups_that_match_the_checkpoint(method, tiny_dirs, data_dir, tmp_path):
    src = tiny_dirs("mixtral")
    res = prune(PruneOptions(model=str(src), keep=3, out=str(tmp_path / "o"), data_dir=str(data_dir), samples=16,
                             max_length=64, method=method, merge="average", router_rows="dominant"))
    # merge="average" so the recorded weights give the merged tensors directly (aligned permutes first)
    original = pretrained(src).state_dict()
    reloaded = pretrained(tmp_path / "o").state_dict()
    for layer in res.report["layers"]:
        assert len(layer["groups"]) == 3
        for k, (members, weights) in enumerate(zip(layer["groups"], layer["merge_weights"])):
            want = sum(w * original[f"{layer['name']}.experts.down_proj"][e] for e, w in zip(members, weights))
            torch.testing.assert_close(reloaded[f"{layer['name']}.experts.down_proj"][k], want, rtol=1e-4, atol=1e-5)
            dominant = members[max(range(len(members)), key=lambda i: (weights[i], -i))]
            assert torch.equal(reloaded[f"{layer['name']}.gate.weight"][k], original[f"{layer['name']}.gate.weight"][dominant])
        if method == "frequency":
            assert all(len(g) == 1 for g in layer["groups"])
            kept = sorted(range(8), key=lambda e: (-layer["usage_counts"][e], e))[:3]
            assert [g[0] for g in layer["groups"]] == sorted(kept)


def test_a_router_returning_probabilities_is_profiled_on_its_logits(texts):
    """gemma4_text's router returns softmax probabilities; the profile must see the logits its
    ``proj`` computes (adapter.router_logits), which a hook of our own records independently."""
    from uncurl.load import build_tiny
    from uncurl.profile import profile_model

    model, tok = build_tiny("gemma4_text", seed=0)
    adapter = ADAPTERS["gemma4_text"]
    seen = {}
    handles = [layer.router.proj.register_forward_hook(
        lambda m, a, out, name=layer.name: seen.setdefault(name, []).append(out.reshape(-1, out.shape[-1])))
        for layer in find_moe_layers(model, adapter)]
    prof = profile_model(model, tok, adapter, texts[:1], batch_size=1)
    for h in handles:
        h.remove()
    for name, stats in prof.layers.items():
        logits = torch.cat(seen[name]).double()
        torch.testing.assert_close(stats.logit_sum, logits.sum(0))
        assert abs(float(stats.logit_sum.sum()) - stats.tokens) > 1e-3  # probabilities would sum to 1 per token


def test_a_family_whose_transformers_code_is_broken_there_is_refused_with_the_fault(tiny_dirs, tmp_path, monkeypatch):
    """A family listed as broken in the installed transformers release: exit 2 naming the release,
    the fault and what to install; nothing written."""
    import transformers
    from typer.testing import CliRunner

    from uncurl.cli import app

    src = tiny_dirs("mixtral")
    monkeypatch.setitem(ADAPTERS, "mixtral", replace(ADAPTERS["mixtral"], broken_in={transformers.__version__: "X fails"}))
    res = CliRunner().invoke(app, ["prune", "--model", str(src), "--out", str(tmp_path / "out"), "--samples", "4"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"cannot run with the installed transformers {transformers.__version__}: X fails" in text
    assert f"transformers>=5,<6,!={transformers.__version__}" in text
    assert not (tmp_path / "out").exists()
