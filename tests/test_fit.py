"""--merge fit: the normal equations against numpy's ridge solution, exactness on a target the pruned
layer can represent, never worse than the unfitted merge on the calibration tokens, --keep E exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uncurl.adapters import ADAPTERS, find_moe_layers
from uncurl.cluster import LayerPlan, plan_layer
from uncurl.fit import FIT_BAND, _Layer, fit_model, layer_errors, plan_chunks
from uncurl.load import build_tiny
from uncurl.merge import rewrite_model
from uncurl.profile import profile_model

TEXTS = [f"The {w} sat on the mat number {i}, and then it ran away quickly." for i, w in
         enumerate(["cat", "dog", "bird", "fish", "cow", "hen", "fox", "owl"] * 3)]


def _synthetic(seed=0, n=300, k_new=3, top_k=2):
    """One mixtral experts module with ``k_new`` experts, and synthetic routed inputs."""
    model, _ = build_tiny("mixtral", seed=seed, num_local_experts=k_new)
    experts = find_moe_layers(model, ADAPTERS["mixtral"])[0].experts
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 64, generator=g)
    index = torch.stack([torch.randperm(k_new, generator=g)[:top_k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, top_k, generator=g), -1)
    y = torch.randn(n, 64, generator=g)
    return experts, x, index, weights, y


def _numpy_parts(experts, x, index, weights, y):
    """Per expert, in numpy: the tokens, gates and gated intermediates h; and the residual e."""
    gu = experts.gate_up_proj.detach().double().numpy()
    dn = experts.down_proj.detach().double().numpy()
    xs = x.double().numpy()
    inter = gu.shape[1] // 2
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    parts, y0 = [], np.zeros_like(y.double().numpy())
    for k in range(gu.shape[0]):
        tokens, slot = np.nonzero(index.numpy() == k)
        h = silu(xs[tokens] @ gu[k, :inter].T) * (xs[tokens] @ gu[k, inter:].T)
        g = weights.double().numpy()[tokens, slot]
        np.add.at(y0, tokens, g[:, None] * (h @ dn[k].T))
        parts.append((tokens, g, h))
    return parts, y.double().numpy() - y0


def _ridge(z, t, lam):
    """argmin ||z d - t||^2 + r ||d||^2, r = lam x mean diagonal of z^T z, by numpy's lstsq on the stacked system."""
    r = lam * np.mean(np.sum(z * z, 0))
    stacked = np.vstack([z, np.sqrt(r) * np.eye(z.shape[1])])
    return np.linalg.lstsq(stacked, np.vstack([t, np.zeros((z.shape[1], t.shape[1]))]), rcond=None)[0]


@pytest.mark.parametrize("joint", [True, False])
def test_normal_equations_equal_numpy_ridge_by_hand(joint):
    experts, x, index, weights, y = _synthetic()
    fit = _Layer("layer", None, experts, joint_max=10**6 if joint else 0)
    fit.start(range(3))
    for chunk in (slice(0, 120), slice(120, 300)):  # accumulated over two batches
        for block in fit.routed(x[chunk], index[chunk], weights[chunk], None):
            fit.accumulate(block, fit.residual(block, y[chunk], True, set(fit.chunk)))
    lam = 1e-2
    fit.solve(lam)
    parts, e = _numpy_parts(experts, x, index, weights, y)
    if joint:  # z(x) = [g_k h_k(x)]_k, target e
        z = np.zeros((len(x), 3 * 64))
        for k, (tokens, g, h) in enumerate(parts):
            z[tokens, k * 64:(k + 1) * 64] = g[:, None] * h
        want = _ridge(z, e, lam)
        got = torch.cat(fit.delta).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())  # float32 h vs float64
    else:  # expert k: rows g h, target (e / G) g: weights g^2 on (h, e / G)
        total = weights.double().numpy().sum(1)
        for k, (tokens, g, h) in enumerate(parts):
            want = _ridge(g[:, None] * h, (g / total[tokens])[:, None] * e[tokens], lam)
            np.testing.assert_allclose(fit.delta[k].numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def _duplicated(seed=0):
    """A mixtral whose experts come in identical pairs (2j, 2j+1: weights and router rows): merged in
    pairs and routed top-1, the pruned model computes the same function."""
    model, tok = build_tiny("mixtral", seed=seed)
    adapter = ADAPTERS["mixtral"]
    layers = find_moe_layers(model, adapter)
    with torch.no_grad():
        for layer in layers:
            for p in list(layer.experts.parameters()) + [layer.router.weight]:
                p.copy_(p[0::2].repeat_interleave(2, 0))
    plans = {layer.name: LayerPlan(tuple((i, i + 1) for i in range(0, 8, 2)), ((0.5, 0.5),) * 4) for layer in layers}
    return model, tok, adapter, layers, plans


def test_fit_is_exact_where_the_pruned_layer_can_represent_the_target():
    model, tok, adapter, layers, plans = _duplicated()
    pruned = rewrite_model(model, adapter, plans, router_rule="mean", merge="aligned", top_k=1)
    ids = tok(TEXTS[:4], return_tensors="pt", padding=True)
    torch.testing.assert_close(pruned(**ids).logits, model(**ids).logits, rtol=0, atol=1e-5)  # the hand truth
    truth = {layer.name: pruned.get_submodule(layer.name).experts.down_proj.detach().clone() for layer in layers}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # spoil the down projections; the fit must find the truth again
        for layer in layers:
            w = pruned.get_submodule(layer.name).experts.down_proj
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=g))
    assert max(layer_errors(model, pruned, adapter, tok, TEXTS).values()) > 0.05
    report = fit_model(model, pruned, adapter, plans, tok, TEXTS, ridge=1e-10)
    for name, w in truth.items():
        torch.testing.assert_close(pruned.get_submodule(name).experts.down_proj, w, rtol=0, atol=2e-4)
        assert report["layers"][name]["solve"] == "joint" and report["layers"][name]["error_after"] < 1e-8
    torch.testing.assert_close(pruned(**ids).logits, model(**ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method,joint_max", [("uncurl", 4096), ("uncurl", 0), ("ean", 4096)])
def test_fitted_layer_error_is_at_most_the_unfitted(method, joint_max):
    """Measured apart from the fit's own report: on the calibration tokens, after a grouping or a criterion."""
    model, tok = build_tiny("qwen3_moe", seed=1)
    adapter = ADAPTERS["qwen3_moe"]
    profile = profile_model(model, tok, adapter, TEXTS)
    plans = {n: plan_layer(s, 4, method) for n, s in profile.layers.items()}
    unfitted = rewrite_model(model, adapter, plans, merge="aligned", router_rule="mean")
    fitted = rewrite_model(model, adapter, plans, merge="aligned", router_rule="mean")
    report = fit_model(model, fitted, adapter, plans, tok, TEXTS, joint_max=joint_max)
    before, after = (layer_errors(model, m, adapter, tok, TEXTS) for m in (unfitted, fitted))
    for name in before:
        assert after[name] <= before[name] + 1e-9
        assert after[name] < 0.9 * before[name]  # and it does something
        assert report["layers"][name]["error_after"] == pytest.approx(after[name], rel=1e-3, abs=1e-7)
        assert report["layers"][name]["error_before"] == pytest.approx(before[name], rel=1e-6)


def test_keep_all_is_left_bit_for_bit():
    model, tok = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    layers = find_moe_layers(model, adapter)
    plans = {layer.name: LayerPlan(tuple((i,) for i in range(8)), ((1.0,),) * 8) for layer in layers}
    pruned = rewrite_model(model, adapter, plans, merge="fit", router_rule="mean")
    report = fit_model(model, pruned, adapter, plans, tok, TEXTS)
    assert report["layers"] == {} and "nothing to fit" in report["note"]
    state = pruned.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


def test_prune_merge_fit_end_to_end(tmp_path):
    from uncurl.pipeline import PruneOptions, prune
    from tests.conftest import DATA_DIR

    r = prune(PruneOptions(model="builtin:mixtral", task="superglue-rte", keep=4, method="uncurl", merge="fit",
                           out=str(tmp_path / "out"), data_dir=str(DATA_DIR), samples=8, plots=False))
    fit = r.report["fit"]
    assert fit["ridge"] == 1e-3 and len(fit["layers"]) == len(r.report["layers"]) == 2
    assert all(v["error_after"] <= v["error_before"] for v in fit["layers"].values())
    assert r.report["checks"]


def test_fit_and_recover_on_a_quantized_input_need_dequantize(data_dir, tmp_path, tmp_path_factory):
    """A quantized input is written back with its kept bytes as stored: a fit or a recovery would be lost."""
    from tests.test_quant import FAMILIES as QUANT, cli_prune, fp8_dirs, nothing_written

    family = next(iter(QUANT))
    model = fp8_dirs.__wrapped__(tmp_path_factory)(family)[0]
    for extra in (["--merge", "fit", "--method", "uncurl"], ["--recover", "1"]):
        res = cli_prune(model, tmp_path / "o", data_dir, *extra)
        assert res.exit_code == 2 and "--dequantize" in res.output, res.output
        assert nothing_written(tmp_path / "o")


def test_auto_merge_is_fit_where_it_applies_and_the_report_says_so(tmp_path):
    """The default --merge auto runs the fit (the same checkpoint as --merge fit); the report names both."""
    from uncurl.pipeline import PruneOptions, prune
    from tests.conftest import DATA_DIR

    base = dict(model="builtin:mixtral", task="superglue-rte", keep=4, data_dir=str(DATA_DIR), samples=8,
                max_length=64, plots=False)
    auto = prune(PruneOptions(**base, out=str(tmp_path / "auto")))
    fit = prune(PruneOptions(**base, merge="fit", out=str(tmp_path / "fit")))
    assert (auto.report["merge"], auto.report["merge_requested"]) == ("fit", "auto")
    assert fit.report["merge"] == "fit" and "merge_requested" not in fit.report
    assert auto.report["fit"]["layers"] == fit.report["fit"]["layers"]
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (tmp_path / "fit" / "model.safetensors").read_bytes()


def test_auto_merge_goes_aligned_where_the_fit_cannot_run_and_says_why(data_dir, tmp_path, tmp_path_factory):
    """A quantized input kept in its format: auto runs aligned (no error, unlike an explicit --merge fit);
    with --dequantize the fit applies again."""
    import json

    from tests.test_quant import FAMILIES as QUANT, cli_prune, fp8_dirs

    model = fp8_dirs.__wrapped__(tmp_path_factory)(next(iter(QUANT)))[0]
    res = cli_prune(model, tmp_path / "kept", data_dir)
    assert res.exit_code == 0, res.output
    assert "--merge auto: aligned, since" in res.output  # a warning: the user sees it
    report = json.loads((tmp_path / "kept" / "report" / "report.json").read_text())
    assert (report["merge"], report["merge_requested"]) == ("aligned", "auto") and "fit" not in report
    assert "byte for byte" in report["merge_reason"] and "--dequantize" in report["merge_reason"]
    res = cli_prune(model, tmp_path / "full", data_dir, "--dequantize")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "full" / "report" / "report.json").read_text())
    assert report["merge"] == "fit" and report["fit"]["layers"]


def test_auto_merge_reasons():
    """Each case where the fit cannot run, said in words: experts whose output is normalised, a device
    map on the whole-model pipeline."""
    from types import SimpleNamespace

    from uncurl.pipeline import fit_refused, merge_used

    def loaded(family):
        model, _ = build_tiny(family)
        return SimpleNamespace(model=model, adapter=ADAPTERS[family], quantized=None)

    opts = SimpleNamespace(merge="auto", method="ean", device_map=None, dequantize=False)
    mixtral = loaded("mixtral")
    assert fit_refused(opts, mixtral, layerwise=True) is None and merge_used(opts, mixtral, True) == ("fit", None)
    assert "post_expert_norm" in fit_refused(opts, loaded("muse_spark"), layerwise=True)
    mapped = SimpleNamespace(merge="auto", method="ean", device_map="auto", dequantize=False)
    assert "--device-map" in fit_refused(mapped, mixtral, layerwise=False)
    assert fit_refused(mapped, mixtral, layerwise=True) is None
    assert merge_used(mapped, mixtral, False)[0] == "aligned"
    assert merge_used(SimpleNamespace(merge="auto,select", method="ean", device_map=None, dequantize=False), mixtral,
                      False) == ("fit,select", None)
    free = SimpleNamespace(merge="auto", method="aimer", device_map=None, dequantize=False)  # no calibration text
    assert "weights alone" in fit_refused(free, mixtral, layerwise=True)
    assert merge_used(free, mixtral, True)[0] == "aligned"


def _fitted_down(model, tok, adapter, plans, **kw):
    pruned = rewrite_model(model, adapter, plans, merge="aligned", router_rule="mean")
    report = fit_model(model, pruned, adapter, plans, tok, TEXTS, batch_size=4, **kw)
    return report, {n: t.clone() for n, t in pruned.state_dict().items() if "down_proj" in n}


@pytest.mark.parametrize("joint_max", [4096, 0])
def test_fit_is_the_same_bytes_run_to_run_and_chunked_over_experts(joint_max):
    """Deterministic (no index_add_: each expert's rows are one matmul), and the normal equations
    built a few experts at a time under a small memory budget give the same bytes as all at once."""
    model, tok = build_tiny("qwen3_moe", seed=2)
    adapter = ADAPTERS["qwen3_moe"]
    profile = profile_model(model, tok, adapter, TEXTS)
    plans = {n: plan_layer(s, 4, "uncurl") for n, s in profile.layers.items()}
    once, down = _fitted_down(model, tok, adapter, plans, joint_max=joint_max)
    again, down2 = _fitted_down(model, tok, adapter, plans, joint_max=joint_max)
    assert once == again and all(torch.equal(down[n], down2[n]) for n in down)
    assert all(v["step"] > 0 for v in once["layers"].values())
    chunked, down3 = _fitted_down(model, tok, adapter, plans, joint_max=joint_max, memory=1)
    if joint_max:  # a joint system over the budget is solved per expert instead
        assert all(v["solve"] == "per expert" for v in chunked["layers"].values())
    else:
        assert chunked == once and all(torch.equal(down[n], down3[n]) for n in down)


def test_normal_equations_are_sized_before_they_are_built():
    """K x I x (I + H) float64 per layer (A_k's upper triangle): chunked over experts to what the
    budget holds, at least one expert per chunk; a joint system over the budget goes per expert."""
    model, _ = build_tiny("mixtral", seed=0)
    experts = find_moe_layers(model, ADAPTERS["mixtral"])[0].experts
    k, hidden, inter = experts.down_proj.shape  # mixtral's down_proj: [K, H, I]
    assert k == 8 and inter <= FIT_BAND  # one band: the whole [I, I]
    per_expert = (inter * inter + inter * hidden) * 8
    cpu = torch.device("cpu")
    layer = _Layer("l", None, experts, joint_max=0)
    assert layer.bytes_per_expert() == per_expert
    assert plan_chunks([layer], 10 * per_expert, cpu) == {"l": [list(range(8))]}
    assert plan_chunks([layer], 3 * per_expert, cpu) == {"l": [[0, 1, 2], [3, 4, 5], [6, 7]]}
    assert plan_chunks([layer], 1, cpu) == {"l": [[k] for k in range(8)]}
    two = [_Layer("a", None, experts, joint_max=0), _Layer("b", None, experts, joint_max=0)]
    assert plan_chunks(two, 8 * per_expert, cpu) == {"a": [[0, 1, 2, 3], [4, 5, 6, 7]], "b": [[0, 1, 2, 3], [4, 5, 6, 7]]}
    joint = _Layer("j", None, experts, joint_max=4096)
    assert joint.joint and joint.joint_bytes() == 8 * inter * (8 * inter + hidden) * 8
    assert plan_chunks([joint], joint.joint_bytes(), cpu) == {"j": [list(range(8))]} and joint.joint
    assert plan_chunks([joint], joint.joint_bytes() - 1, cpu)["j"] == [list(range(8))] and not joint.joint
