"""Partial profiles add up: texts split into shards, profiled apart and combined, give the profile
of all texts (sums to float64 rounding, counts exactly, the router-logit sample's tokens exactly)."""

from __future__ import annotations

import pytest
import torch

from uncurl import stats as S
from uncurl.adapters import ADAPTERS
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.profile import Profile, profile_model, shard_range, token_positions
from uncurl.stats import STATISTICS, LayerStats, combine_samples, token_keys

TEXTS = [("The quick brown fox jumps over the lazy dog. " * (1 + i % 4))[: 12 + (17 * i) % 90] + f" #{i}"
         for i in range(13)]  # distinct, lengths 15..100 bytes: batches pad


def _random_batch(g, n, e=6, k=2):
    logits = torch.randn(n, e, generator=g)
    return logits, torch.rand(n, k, generator=g), torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])


def test_token_keys_are_uniform_and_name_the_token():
    tokens = torch.stack(torch.meshgrid(torch.arange(50), torch.arange(200), indexing="ij"), -1).reshape(-1, 2)
    keys = token_keys(3, tokens)
    assert keys.dtype == torch.float64 and ((keys >= 0) & (keys < 1)).all()
    assert keys.unique().numel() == len(keys)
    assert abs(float(keys.mean()) - 0.5) < 0.01 and abs(float((keys < 0.1).double().mean()) - 0.1) < 0.01
    assert torch.equal(token_keys(3, tokens.flip(0)), keys.flip(0))  # a function of the token, not the order
    assert not torch.equal(token_keys(4, tokens), keys)  # and of the seed


def test_layer_stats_of_disjoint_token_sets_combine_to_one_pass(monkeypatch):
    """Pure tensors: the same 300 tokens fed in one pass, or as three parts in another order."""
    monkeypatch.setattr(S, "SAMPLE_TOKENS", 40)
    g = torch.Generator().manual_seed(0)
    logits, weights, idx = _random_batch(g, 300)
    tokens = torch.stack([torch.arange(300) // 30, torch.arange(300) % 30], 1)  # 10 texts of 30
    whole = LayerStats(6, seed=5)
    for lo in range(0, 300, 70):
        whole.update(logits[lo : lo + 70], weights[lo : lo + 70], idx[lo : lo + 70], tokens[lo : lo + 70])
    whole.update_experts(idx.reshape(-1), weights.reshape(-1), weights.reshape(-1) * 3)
    parts = []
    for rows in (torch.arange(200, 300), torch.arange(0, 120), torch.arange(120, 200)):
        part = LayerStats(6, seed=5)
        part.update(logits[rows], weights[rows], idx[rows], tokens[rows])
        part.update_experts(idx[rows].reshape(-1), weights[rows].reshape(-1), weights[rows].reshape(-1) * 3)
        parts.append(part)
    combined = LayerStats.combine(parts)
    assert combined.tokens == 300
    for name in STATISTICS:
        if name == "logit_sample":
            assert torch.equal(combined.logit_sample, whole.logit_sample)
        else:
            torch.testing.assert_close(getattr(combined, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    assert torch.equal(combined.counts, whole.counts)
    # the sample is the 40 smallest keys of all 300 tokens, ascending, with their logits
    keys = token_keys(5, tokens)
    order = torch.argsort(keys)[:40]
    assert torch.equal(whole.logit_sample[:, 0], keys[order])
    assert torch.equal(whole.logit_rows(), logits.double()[order])


def test_combining_samples_keeps_the_smallest_keys():
    inf = float("inf")
    a = torch.tensor([[0.1, 1.0], [0.5, 2.0], [inf, inf]], dtype=torch.float64)
    b = torch.tensor([[0.3, 3.0], [inf, inf], [inf, inf]], dtype=torch.float64)
    assert combine_samples(a, b).tolist() == [[0.1, 1.0], [0.3, 3.0], [0.5, 2.0]]
    assert torch.equal(combine_samples(b, a), combine_samples(a, b))


def test_token_positions_skip_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert token_positions(mask, [7, 2]).tolist() == [[7, 0], [7, 1], [7, 2], [2, 0], [2, 1]]


def test_shard_ranges_cover_the_texts_once():
    for total, count in ((13, 2), (13, 3), (4, 4), (2, 3)):
        ranges = [shard_range(total, i, count) for i in range(count)]
        assert [i for r in ranges for i in r] == list(range(total))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(UncurlError, match="shard 3/3"):
        shard_range(10, 3, 3)


def assert_same_profile(got: Profile, want: Profile) -> None:
    assert got.layer_index == want.layer_index
    for name, w in want.layers.items():
        g = got.layers[name]
        assert g.tokens == w.tokens and g.missing == w.missing
        assert torch.equal(g.counts, w.counts), name  # integers: exact
        for stat in ("mass", "logit_sum", "gram", "ean_sum", "reap_sum"):  # float32 activations, other padding
            torch.testing.assert_close(getattr(g, stat), getattr(w, stat), rtol=1e-5, atol=1e-5, msg=stat)
        # the sample: the very same tokens (keys are exact), their logits to float32 rounding
        assert torch.equal(g.logit_sample[:, 0], w.logit_sample[:, 0]), name
        torch.testing.assert_close(g.logit_sample, w.logit_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_shards_profiled_apart_combine_to_the_whole(family, monkeypatch, tmp_path):
    """13 texts in one pass (batches of 4, so other padding and batch mates) against 2 and 3 shards
    of whole texts (batches of 3 and 2), combined in memory and from the saved shard files."""
    monkeypatch.setattr(S, "SAMPLE_TOKENS", 64)  # fewer than the texts' tokens: the sample is cut
    model, tok = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    meta = {"model": "tiny", "model_type": family, "seed": 0, "max_length": 48}
    whole = profile_model(model, tok, adapter, TEXTS, batch_size=4, max_length=48, meta=meta)
    assert whole.tokens > 64 and bool(torch.isfinite(next(iter(whole.layers.values())).logit_sample).all())
    for count, batch_size in ((2, 3), (3, 2)):
        parts = []
        for i in range(count):
            ids = shard_range(len(TEXTS), i, count)
            shard_meta = {**meta, "task": {"name": "t", "calibration_examples": len(ids), "fingerprint": f"f{i}"}}
            parts.append(profile_model(model, tok, adapter, [TEXTS[j] for j in ids], batch_size=batch_size,
                                       max_length=48, meta=shard_meta, text_ids=ids))
        combined = Profile.combine(parts)
        assert_same_profile(combined, whole)
        assert combined.meta["task"] == {"name": "t", "calibration_examples": len(TEXTS)}
        assert [p["task"]["fingerprint"] for p in combined.meta["parts"]] == [f"f{i}" for i in range(count)]
        files = [p.save(tmp_path / f"{count}-{i}.profile") for i, p in enumerate(parts)]
        from_files = Profile.combine([Profile.load(f) for f in files])
        assert_same_profile(from_files, combined)
        for name, s in from_files.layers.items():
            for stat in STATISTICS:
                assert torch.equal(getattr(s, stat), getattr(combined.layers[name], stat)), stat


def test_profiles_that_do_not_belong_together_are_refused(texts):
    model, tok = build_tiny("mixtral", seed=0)
    a = profile_model(model, tok, ADAPTERS["mixtral"], texts[:2], meta={"model": "m", "seed": 0})
    b = profile_model(model, tok, ADAPTERS["mixtral"], texts[2:], meta={"model": "m", "seed": 1}, text_ids=[2, 3, 4])
    with pytest.raises(UncurlError, match="different 'seed': 0, 1"):
        Profile.combine([a, b])
    b.meta["seed"] = 0
    assert Profile.combine([a, b]).meta == {"model": "m", "seed": 0}
    other = Profile({"model.layers.1.mlp": b.layers["model.layers.1.mlp"]}, {"model.layers.1.mlp": 1}, b.meta)
    with pytest.raises(UncurlError, match="different MoE layers"):
        Profile.combine([a, other])
    with pytest.raises(UncurlError, match="text_ids: 2 ids for 3 texts"):
        profile_model(model, tok, ADAPTERS["mixtral"], texts[2:], text_ids=[2, 3])
