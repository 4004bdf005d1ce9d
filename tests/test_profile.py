"""Profiling: online statistics equal a direct computation; padding is excluded; files round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uncurl.adapters import ADAPTERS, find_moe_layers, top_k
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.profile import STATISTICS, Profile, RouterStats, profile_model


def test_online_stats_equal_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 6, generator=g) * 2 + torch.arange(6.0)
    weights = torch.rand(300, 2, generator=g)
    idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(300)])
    stats = RouterStats(6)
    for lo in range(0, 300, 70):  # uneven chunks
        stats.update(logits[lo : lo + 70], weights[lo : lo + 70], idx[lo : lo + 70])
    assert stats.tokens == 300
    assert stats.counts.tolist() == [float((idx == e).sum()) for e in range(6)]
    np.testing.assert_allclose(stats.mass.numpy(), [float(weights[idx == e].sum()) for e in range(6)], rtol=1e-6)
    np.testing.assert_allclose(stats.gram.numpy(), (logits.double().T @ logits.double()).numpy(), rtol=1e-9)
    np.testing.assert_allclose(stats.correlation().numpy(), np.corrcoef(logits.double().numpy().T), atol=1e-9)
    np.testing.assert_allclose(stats.frequency.sum().item(), 1.0)


def test_hooks_see_the_routers_own_logits():
    """Cross-check against transformers' output_router_logits on an unpadded batch."""
    model, tok = build_tiny("mixtral", seed=0)
    texts = ["twelve bytes", "other twelve"]  # equal lengths: no padding
    ids = tok(texts, return_tensors="pt")["input_ids"]
    layers = find_moe_layers(model, ADAPTERS["mixtral"])
    with torch.no_grad():
        ref = model(ids, output_router_logits=True).router_logits
    stats = []
    for logits in ref:
        s = RouterStats(8)
        idx = logits.topk(2, dim=-1).indices
        w = torch.softmax(logits, -1).gather(1, idx)
        s.update(logits, w / w.sum(-1, keepdim=True), idx)
        stats.append(s)
    prof = profile_model(model, tok, ADAPTERS["mixtral"], texts, batch_size=2)
    for layer, s in zip(layers, stats):
        got = prof.layers[layer.name]
        assert got.tokens == s.tokens == ids.numel()
        assert torch.equal(got.counts, s.counts)
        torch.testing.assert_close(got.gram, s.gram, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.mass, s.mass, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_padding_tokens_are_excluded(family, texts):
    model, tok = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    batched = profile_model(model, tok, adapter, texts, batch_size=5)
    alone = profile_model(model, tok, adapter, texts, batch_size=1)
    n_tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    for name, s in batched.layers.items():
        assert s.tokens == alone.layers[name].tokens == n_tokens
        assert torch.equal(s.counts, alone.layers[name].counts)
        torch.testing.assert_close(s.gram, alone.layers[name].gram, rtol=1e-4, atol=1e-4)
        for stat in ("ean_sum", "reap_sum"):  # expert outputs of padding tokens are left out too
            torch.testing.assert_close(getattr(s, stat), getattr(alone.layers[name], stat), rtol=1e-4, atol=1e-5)


def test_profile_file_round_trip(tmp_path, texts):
    model, tok = build_tiny("qwen2_moe", seed=0)
    prof = profile_model(model, tok, ADAPTERS["qwen2_moe"], texts, meta={"model": "x", "task": {"name": "t"}})
    path = prof.save(tmp_path / "p.safetensors")
    back = Profile.load(path)
    assert back.meta == {"model": "x", "task": {"name": "t"}}
    assert back.layer_index == prof.layer_index
    for name, s in prof.layers.items():
        for f in STATISTICS:  # every registered statistic is in the file
            assert torch.equal(getattr(back.layers[name], f), getattr(s, f)), f
        assert back.layers[name].tokens == s.tokens


def test_profile_load_errors(tmp_path):
    with pytest.raises(UncurlError, match="no such file"):
        Profile.load(tmp_path / "missing")
    (tmp_path / "junk").write_text("not a profile")
    with pytest.raises(UncurlError, match="not an uncurl profile"):
        Profile.load(tmp_path / "junk")


def test_old_schema_profile_is_refused_with_a_way_out(tmp_path):
    import json

    from safetensors.torch import save_file

    header = {"schema": 1, "layers": {"model.layers.0.mlp": {"index": 0, "tokens": 3}}}
    save_file({"model.layers.0.mlp/counts": torch.zeros(4)}, str(tmp_path / "old"),
              metadata={"uncurl": json.dumps(header)})
    with pytest.raises(UncurlError, match="schema 1.*schema 2.*profile again"):
        Profile.load(tmp_path / "old")


def test_empty_calibration_is_an_error():
    model, tok = build_tiny("mixtral", seed=0)
    with pytest.raises(UncurlError, match="no calibration text"):
        profile_model(model, tok, ADAPTERS["mixtral"], [])


def test_profile_on_real_rte_rows(data_dir):
    from uncurl.tasks import get_task, load_examples

    examples = load_examples(get_task("superglue-rte"), "calibration", data_dir, limit=12, seed=0)
    model, tok = build_tiny("olmoe", seed=0)
    texts = [e.text for e in examples]
    prof = profile_model(model, tok, ADAPTERS["olmoe"], texts, batch_size=4, max_length=128)
    expected_tokens = sum(min(len(tok(t)["input_ids"]), 128) for t in texts)
    assert len(prof.layers) == 2
    for s in prof.layers.values():
        assert s.tokens == expected_tokens
        assert s.counts.sum().item() == 2 * expected_tokens  # top-2: two slots per token


def test_batches_tokenise_each_text_once_in_windows(monkeypatch):
    """Every text comes out exactly once, unpadded ids intact; lengths never increase inside a
    window, and a window never mixes texts with another (memory flat in the number of texts)."""
    from uncurl import profile as P
    from uncurl.load import byte_tokenizer

    monkeypatch.setattr(P, "WINDOW_BATCHES", 2)
    tok = byte_tokenizer()
    texts = [("x" * (1 + (7 * i) % 23)) + str(i) for i in range(21)]  # distinct, varied lengths
    seen, per_window = [], []
    for n, batch in enumerate(P.batches(tok, texts, batch_size=3, max_length=64)):
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = [tok.decode(ids[:k]) for ids, k in zip(batch["input_ids"].tolist(), lengths)]
        if n % 2 == 0:
            per_window.append([])
        per_window[-1].extend(zip(lengths, rows))
        seen += rows
    assert sorted(seen) == sorted(texts)
    for w, window in enumerate(per_window):
        assert [k for k, _ in window] == sorted((k for k, _ in window), reverse=True)
        assert {r for _, r in window} == set(texts[w * 6 : (w + 1) * 6])


@pytest.mark.parametrize("family", sorted(f for f, a in ADAPTERS.items() if a.router_output != "topk"))
def test_routers_returning_scores_count_the_experts_the_forward_uses(family, texts):
    """llama4's router returns (scores, logits), not its top-k. Truth: the experts module receives
    each token once per expert, scaled by that expert's score, which is 0 for experts not chosen."""
    model, tok = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    layers = find_moe_layers(model, adapter)
    used = {layer.name: torch.zeros(layer.num_experts) for layer in layers}

    def seen(name, e):
        def hook(module, args):
            x = args[0].reshape(e, -1, args[0].shape[-1])  # [E, tokens, H]
            used[name] += (x.abs().sum(-1) != 0).sum(1).float()
        return hook

    handles = [layer.experts.register_forward_pre_hook(seen(layer.name, layer.num_experts)) for layer in layers]
    try:
        prof = profile_model(model, tok, adapter, texts, batch_size=1)  # one text a batch: no padding
    finally:
        for h in handles:
            h.remove()
    k = top_k(model.config, adapter)
    for layer in layers:
        counts = prof.layers[layer.name].counts
        assert counts.sum() == k * prof.layers[layer.name].tokens
        assert torch.equal(counts.float(), used[layer.name]), layer.name


@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_recording_experts_compute_what_the_model_computes(family, experts, ids):
    from uncurl.profile import _Recorder

    model, _ = build_tiny(family, seed=0)
    model.set_experts_implementation(experts)
    layers = find_moe_layers(model, ADAPTERS[family])
    with torch.no_grad():
        reference = model(ids).logits
        recorder = _Recorder(layers, layers[0].num_experts)
        try:
            recorded = model(ids).logits
        finally:
            recorder.close()
    torch.testing.assert_close(recorded, reference, rtol=1e-5, atol=1e-5)
    assert model.config._experts_implementation == experts  # switched back
    assert all(s.ean_sum.sum() > 0 for s in recorder.stats.values())
