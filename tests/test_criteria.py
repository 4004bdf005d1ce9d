"""Super-expert protection and the data-free criterion (issue 28, parts 3 and 4).

Super experts: a tiny mixtral with one expert's down_proj scaled x1000 (its output, so its peak,
scales by exactly 1000: the router before it is untouched). The peak statistic equals a hand
computation of max |f_e(x)| over the tokens routed to e; REAP's rule finds the planted expert and
every method keeps it; shards' peaks combine to the whole pass's.

The data-free criterion (AIMER, arXiv 2603.18492): the kept set equals the K lowest
mean|w|/RMS(w) computed here with numpy from the saved weights; no forward pass of the parent and
no calibration text is read; an offloaded model gives the same plan.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_methods import hand_expert_output

from uncurl.adapters import ADAPTERS, find_moe_layers
from uncurl.cluster import METHODS, check_protected, plan_layer, super_experts
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.profile import profile_model
from uncurl.stats import LayerStats, Profile

TEXTS = ["The cat sat on the mat.", "Experts and routers, for a test.", "Short one.", "Paris is in France!",
         "A somewhat longer sentence about mixtures of experts and their routers."]
PLANT = (0, 5)  # (MoE layer index in order, expert): inside REAP's first 75% of the two layers


def planted(seed: int = 0, factor: float = 1000.0):
    model, tok = build_tiny("mixtral", seed=seed)
    if factor != 1.0:
        layer = find_moe_layers(model, ADAPTERS["mixtral"])[PLANT[0]]
        with torch.no_grad():
            layer.experts.down_proj[PLANT[1]] *= factor
    return model, tok


def profile(model, tok, texts=TEXTS, text_ids=None):
    return profile_model(model, tok, ADAPTERS["mixtral"], texts, batch_size=2, max_length=128, text_ids=text_ids)


def hand_peaks(model, tok) -> dict[str, torch.Tensor]:
    """max |f_e(x)_i| over the tokens routed to e, written out from the fused weights and the
    router's own top-k (hooks), one text at a time."""
    adapter = ADAPTERS["mixtral"]
    layers = find_moe_layers(model, adapter)
    peaks = {layer.name: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    seen = {}
    hooks = [layer.experts.register_forward_pre_hook(
        lambda m, args, name=layer.name: seen.__setitem__(name, (args[0].detach(), args[1].detach())))
        for layer in layers]
    try:
        with torch.no_grad():
            for text in TEXTS:
                model(**tok([text], return_tensors="pt"))
                for layer in layers:
                    x, idx = seen[layer.name]
                    for e in range(layer.num_experts):
                        rows = (idx == e).any(-1)
                        if rows.any():
                            y = hand_expert_output(layer.experts, adapter, model.config, e, x[rows])
                            peaks[layer.name][e] = max(peaks[layer.name][e], float(y.abs().max()))
    finally:
        for h in hooks:
            h.remove()
    return peaks


def test_peak_equals_hand_computation_and_finds_the_planted_expert():
    model, tok = planted()
    prof = profile(model, tok)
    hand = hand_peaks(model, tok)
    names = sorted(prof.layers, key=lambda n: prof.layer_index[n])
    for name in names:
        torch.testing.assert_close(prof.layers[name].peak, hand[name], rtol=1e-5, atol=1e-7)
    found, threshold = super_experts({n: s.peak for n, s in prof.layers.items()}, prof.layer_index)
    assert found == {names[PLANT[0]]: [PLANT[1]]}
    assert prof.layers[names[PLANT[0]]].peak[PLANT[1]] > threshold


def test_a_normal_model_does_not_flag_the_planted_expert_and_the_plant_scales_its_peak_exactly():
    normal, tok = planted(factor=1.0)
    base = profile(normal, tok)
    plant = profile(planted()[0], tok)
    names = sorted(base.layers, key=lambda n: base.layer_index[n])
    found, _ = super_experts({n: s.peak for n, s in base.layers.items()}, base.layer_index)
    assert PLANT[1] not in found.get(names[PLANT[0]], [])
    # REAP's rule is relative: in a model without outliers it marks the largest peak of the first
    # 75% of layers (here: one expert), nothing else
    first = base.layers[names[0]].peak
    assert found == {names[0]: [int(first.argmax())]}
    # layer 0's routing is unchanged by the plant (the router comes first): the peak is x1000 exactly
    torch.testing.assert_close(plant.layers[names[0]].peak[PLANT[1]], base.layers[names[0]].peak[PLANT[1]] * 1000,
                               rtol=1e-4, atol=0)


def test_shard_profiles_combine_the_peak_by_maximum():
    model, tok = planted()
    whole = profile(model, tok)
    parts = [profile(model, tok, TEXTS[:2], text_ids=[0, 1]), profile(model, tok, TEXTS[2:], text_ids=[2, 3, 4])]
    combined = Profile.combine(parts)
    for name, stats in whole.layers.items():
        # equal up to float32 rounding (the shards' batches are padded otherwise); a sum would be ~2x
        torch.testing.assert_close(combined.layers[name].peak, stats.peak, rtol=1e-5, atol=0)
        assert not torch.equal(parts[0].layers[name].peak, parts[1].layers[name].peak)  # each shard sees its own


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.calibration])
def test_every_method_keeps_the_protected_expert_alone(method):
    model, tok = planted()
    prof = profile(model, tok)
    name = sorted(prof.layers, key=lambda n: prof.layer_index[n])[PLANT[0]]
    stats = prof.layers[name]
    for keep in (2, 4, 7):
        plan = plan_layer(stats, keep, method, protect=[PLANT[1]])
        assert plan.keep == keep
        assert (PLANT[1],) in plan.groups  # alone: never merged with another, never dropped
        assert plan.matrix(8)[list(plan.groups).index((PLANT[1],)), PLANT[1]] == 1.0


def test_more_super_experts_than_k_is_refused_naming_them():
    """REAP's rule on 100 layers x 8 experts (synthetic peaks): four peaks above the 99.5th
    percentile, three of them in layer 0; K=2 cannot keep them."""
    g = torch.Generator().manual_seed(0)
    peaks = {f"l{i}": torch.rand(8, generator=g, dtype=torch.float64) for i in range(100)}
    peaks["l0"][[1, 3, 6]] = torch.tensor([50.0, 60.0, 70.0], dtype=torch.float64)
    peaks["l1"][2] = 40.0
    order = {f"l{i}": i for i in range(100)}
    found, threshold = super_experts(peaks, order)
    assert found == {"l0": [1, 3, 6], "l1": [2]}
    assert threshold == pytest.approx(max(float(np.percentile(torch.cat(list(peaks.values())).numpy(), 99.5)), 7.0))
    peaks["l90"][0] = 80.0  # in the last quarter of layers: not a super expert (REAP's rule)
    assert "l90" not in super_experts(peaks, order)[0]
    with pytest.raises(UncurlError, match=r"3 super experts \(\[1, 3, 6\]\), more than --keep 2"):
        check_protected([1, 3, 6], 2, 8, where="MoE layer l0")
    stats = LayerStats(8)
    with pytest.raises(UncurlError, match="--protect-super-experts"):
        plan_layer(stats, 2, "frequency", protect=[1, 3, 6])


def test_prune_protects_the_planted_expert_and_reports_it(tmp_path, data_dir):
    from uncurl.pipeline import PruneOptions, prune

    model, tok = planted()
    src = tmp_path / "planted"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    common = dict(model=str(src), task="superglue-rte", data_dir=str(data_dir), samples=16, max_length=32,
                  keep=2, method="frequency", merge="select", plots=False)
    plain = prune(PruneOptions(out=str(tmp_path / "plain"), **common)).report
    kept = prune(PruneOptions(out=str(tmp_path / "kept"), protect_super_experts=True, **common)).report
    layer0 = min(kept["layers"], key=lambda r: r["index"])
    assert kept["super_experts"]["protected"] and kept["super_experts"]["layers"] == {layer0["name"]: [PLANT[1]]}
    assert [PLANT[1]] in layer0["groups"] and PLANT[1] not in layer0["dropped"]
    assert plain["super_experts"]["protected"] is False  # found and reported, not protected
    plain0 = min(plain["layers"], key=lambda r: r["index"])
    assert [PLANT[1]] not in plain0["groups"]  # frequency alone drops it here: protection changed the plan


# ---- the data-free criterion ---------------------------------------------------------------------


def hand_aimer(folder) -> dict[int, list[int]]:
    """Per decoder layer: the experts AIMER keeps at K=4, computed with numpy from the saved
    safetensors (mixtral's files store each expert's w1, w2, w3 apart): mean|w| / sqrt(mean w^2)
    over the expert's three matrices together; AIMER's code prunes the highest ratios, so the 4
    lowest stay."""
    import re

    from safetensors.numpy import load_file

    mats: dict[tuple[int, int], list[np.ndarray]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for key, w in load_file(f).items():
            m = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.w[123]\.weight$", key)
            if m:
                mats.setdefault((int(m[1]), int(m[2])), []).append(w.astype(np.float64).ravel())
    out = {}
    for layer in sorted({k[0] for k in mats}):
        ratio = []
        for e in range(8):
            w = np.concatenate(mats[(layer, e)])
            assert w.size == 3 * 64 * 64
            ratio.append(np.abs(w).mean() / np.sqrt((w ** 2).mean()))
        out[layer] = sorted(np.argsort(ratio, kind="stable")[:4].tolist())
    return out


def no_forward(monkeypatch):
    """Count forward calls of the parent's MoE experts and fail any calibration read."""
    import uncurl.pipeline as P

    calls = []
    real = P.load_model

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        for layer in find_moe_layers(loaded.model, loaded.adapter):
            layer.experts.register_forward_pre_hook(lambda m, a: calls.append(1))
        return loaded

    def refuse(*args, **kwargs):
        raise AssertionError("a data-free method read calibration text")

    monkeypatch.setattr(P, "load_model", load)
    monkeypatch.setattr(P, "calibration_texts", refuse)
    return calls


@pytest.mark.parametrize("offload", [False, True])
def test_aimer_keeps_the_hand_computed_experts_without_a_forward_pass(tiny_dirs, data_dir, tmp_path, monkeypatch,
                                                                       offload):
    from uncurl.pipeline import PruneOptions, prune

    folder = tiny_dirs("mixtral")
    calls = no_forward(monkeypatch)
    extra = dict(device_map="auto", max_memory="cpu=30KB") if offload else {}
    report = prune(PruneOptions(model=str(folder), task="superglue-rte", data_dir=str(data_dir), keep=4,
                                method="aimer", out=str(tmp_path / "out"), plots=False, **extra)).report
    assert calls == []  # the parent ran no forward (the checkpoint check loads the pruned copy)
    hand = hand_aimer(folder)
    assert {r["index"]: sorted(g[0] for g in r["groups"]) for r in report["layers"]} == hand
    assert all(len(g) == 1 for r in report["layers"] for g in r["groups"])
    assert report["task"]["calibration_examples"] == 0 and report["task"]["tokens"] == 0
    assert report["merge"] == "aligned" and "weights alone" in report["merge_reason"]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_local_experts"] == 4


def test_aimer_refuses_what_needs_calibration(tiny_dirs, data_dir, tmp_path):
    from uncurl.pipeline import PruneOptions, prune

    for extra, flag in ((dict(protect_super_experts=True), "--protect-super-experts"),
                        (dict(merge="fit"), "--merge fit"), (dict(recover=2), "--recover")):
        with pytest.raises(UncurlError, match=f"ranks experts from the weights alone.*{flag}"):
            prune(PruneOptions(model=str(tiny_dirs("mixtral")), task="superglue-rte", data_dir=str(data_dir), keep=4,
                               method="aimer", out=str(tmp_path / "x"), plots=False, **extra))
        assert not (tmp_path / "x").exists()
