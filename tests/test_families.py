"""Every family in the adapter table, end to end: prune -> save -> reload -> check from disk.

A new entry in uncurl.adapters.ADAPTERS is enrolled here automatically.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors import safe_open
from conftest import is_wrapper, pretrained

from uncurl.adapters import ADAPTERS, expert_count, find_moe_layers, language_stack, per_expert_names, tail_rows
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
                                        data_dir=str(data_dir), samples=24, max_length=128, shard_size="150KB"))
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
        routed |= set(experts) | set(router)
    untouched = {k: v for k, v in original.state_dict().items() if k not in routed}
    got = reloaded.state_dict()
    assert set(got) - routed == set(untouched)
    for name, tensor in untouched.items():
        assert torch.equal(got[name], tensor), name
    for attr in adapter.shared_attrs:  # the comparison above covered the shared experts
        assert any(f".{attr}." in k for k in untouched), attr
    if is_wrapper(original.config):  # ... and the vision (audio) towers, projectors
        stack = language_stack(original, adapter)[0]
        assert stack and any(not k.startswith(stack + ".") and "embed_tokens" not in k and "lm_head" not in k
                             for k in untouched), stack
    if family == "deepseek_v3":  # first_k_dense_replace=1: layer 0 is a dense MLP
        assert any(k.startswith("model.layers.0.mlp.") for k in untouched)
        assert not any(layer.index == 0 for layer in find_moe_layers(reloaded, adapter))


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_experts_reproduces_logits(family, tiny_dirs, data_dir, tmp_path, ids):
    src = tiny_dirs(family)
    original = pretrained(src)
    e = expert_count(original.config, ADAPTERS[family])
    prune(PruneOptions(model=str(src), keep=e, out=str(tmp_path / "same"), data_dir=str(data_dir), samples=8,
                       max_length=64))
    again = pretrained(tmp_path / "same")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, original(ids).logits, rtol=0, atol=0)


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
