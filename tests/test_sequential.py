"""Profiling layer by layer gives the profile of one whole-model pass, whatever the model's forward
does between its layers; a model whose batches do not run the same layers is refused, saying why."""

from __future__ import annotations

import pytest
import torch
from conftest import representatives

from uncurl.adapters import ADAPTERS, find_moe_layers
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.profile import profile_model
from uncurl.sequential import decoder_layers, profile_sequential, run_layers
from uncurl.stats import STATISTICS

# beyond the layouts: layers that hand a second stream to the next one (zaya's router states are a
# representative; glm_moe_dsa's shared top-k indices are not)
FAMILIES = sorted(set(representatives()) | {"glm_moe_dsa"})


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_one_pass(family, texts):
    model, tok = build_tiny(family, seed=0)
    adapter = ADAPTERS[family]
    want = profile_model(model, tok, adapter, texts, batch_size=2, max_length=32, seed=3)
    got = profile_sequential(model, tok, adapter, texts, batch_size=2, max_length=32, seed=3)
    assert got.layer_index == want.layer_index
    for name, w in want.layers.items():
        g = got.layers[name]
        assert g.tokens == w.tokens and g.missing == w.missing
        assert torch.equal(g.counts, w.counts), name
        assert torch.equal(g.logit_sample[:, 0], w.logit_sample[:, 0]), name  # the same tokens sampled
        for stat in STATISTICS:
            torch.testing.assert_close(getattr(g, stat), getattr(w, stat), rtol=1e-6, atol=1e-6, msg=stat)
    # the model is left as it was: its own forward again, nothing patched
    assert all("forward" not in layer.__dict__ for _, layer in decoder_layers(model, adapter))


def _custom_stack(model, mode: str):
    """mixtral's decoder stack with a forward of our own that breaks one assumption (``mode``)."""
    from transformers.modeling_outputs import MoeModelOutputWithPast

    inner = model.model

    def forward(input_ids=None, attention_mask=None, **kwargs):
        h = inner.embed_tokens(input_ids)
        positions = torch.arange(h.shape[1])[None]
        cos, sin = inner.rotary_emb(h, positions)
        layers = [inner.layers[0], inner.layers[1], inner.layers[1]] if mode == "loop" else list(inner.layers)
        if mode == "by_length" and input_ids.shape[1] < 20:  # short batches skip the last layer
            layers = layers[:-1]
        for layer in layers:
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)
            if mode == "between":
                h = h * 0.5
            if mode == "derived":
                cos = cos + h.mean()
        return MoeModelOutputWithPast(last_hidden_state=inner.norm(h))

    inner.forward = forward


@pytest.mark.parametrize("mode", ["loop", "between", "derived"])
def test_a_stack_of_its_own_is_run_as_its_forward_runs(mode, texts):
    """What a forward does between its layers (a layer run twice, hidden states scaled, position
    embeddings computed from the hidden states) happens in the model's own code on each batch, so
    the profile is still the one-pass profile."""
    model, tok = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    _custom_stack(model, mode)
    want = profile_model(model, tok, adapter, texts, batch_size=2, max_length=32)
    got = profile_sequential(model, tok, adapter, texts, batch_size=2, max_length=32)
    for name, w in want.layers.items():
        assert torch.equal(got.layers[name].counts, w.counts), (mode, name)
        for stat in STATISTICS:
            torch.testing.assert_close(getattr(got.layers[name], stat), getattr(w, stat), rtol=1e-6, atol=1e-6)
    if mode == "loop":  # layer 1 ran twice per forward: its tokens counted twice, as in the one pass
        assert got.layers["model.layers.1.mlp"].tokens == 2 * got.layers["model.layers.0.mlp"].tokens
    assert all("forward" not in layer.__dict__ for _, layer in decoder_layers(model, adapter))


def test_batches_that_call_different_layers_are_refused(texts):
    model, tok = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    _custom_stack(model, "by_length")
    with pytest.raises(UncurlError, match="mixtral: its batches do not call the same decoder layers"):
        profile_sequential(model, tok, adapter, texts, batch_size=2, max_length=32)
    assert all("forward" not in layer.__dict__ for _, layer in decoder_layers(model, adapter))


def test_a_failing_layer_unwinds_every_batch(texts, monkeypatch):
    """An error inside one layer's visit ends the drive: the error is raised, no batch thread is
    left waiting, and the model's layers have their own forward back."""
    import threading

    model, tok = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    boom = RuntimeError("boom in layer 1")

    def after(visit):
        if visit.index == 1:
            raise boom

    with pytest.raises(RuntimeError, match="boom in layer 1"):
        run_layers(model, tok, adapter, texts, batch_size=2, max_length=32, after_layer=after)
    for thread in threading.enumerate():
        if thread.name.startswith("uncurl-batch-"):
            thread.join(timeout=5)
            assert not thread.is_alive(), thread.name
    assert all("forward" not in layer.__dict__ for _, layer in decoder_layers(model, adapter))


def test_moe_blocks_outside_one_layer_list_are_refused(monkeypatch):
    model, _ = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    layers = find_moe_layers(model, adapter)
    monkeypatch.setattr("uncurl.sequential.find_moe_layers", lambda m, a: [*layers, type(layers[0])(
        "model.extra.mlp", 9, layers[0].router, layers[0].experts, layers[0].num_experts)])
    with pytest.raises(UncurlError, match="not all in one list of decoder layers"):
        decoder_layers(model, adapter)
