"""Profiling layer by layer gives the profile of one whole-model pass; a model whose layers cannot
be run one at a time is refused, saying why."""

from __future__ import annotations

import pytest
import torch
from conftest import representatives

from uncurl.adapters import ADAPTERS, find_moe_layers
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.profile import profile_model
from uncurl.sequential import decoder_layers, profile_sequential
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
        for layer in layers:
            h = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)
            if mode == "between":
                h = h * 0.5
            if mode == "derived":
                cos = cos + h.mean()
        return MoeModelOutputWithPast(last_hidden_state=inner.norm(h))

    inner.forward = forward


@pytest.mark.parametrize(("mode", "reason"), [
    ("loop", "model.layers.1 runs 2 times in a forward"),
    ("between", "the hidden states entering model.layers.1 are not the previous layer's output"),
    ("derived", "model.layers.1 gets argument 'position_embeddings' computed from earlier layers' outputs"),
])
def test_a_stack_that_is_not_its_layers_in_turn_is_refused(mode, reason, texts):
    model, tok = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    _custom_stack(model, mode)
    profile_model(model, tok, adapter, texts, batch_size=2)  # the model runs
    with pytest.raises(UncurlError, match=f"mixtral: .*{reason}.*cannot be profiled one at a time"):
        profile_sequential(model, tok, adapter, texts, batch_size=2)
    assert all("forward" not in layer.__dict__ for _, layer in decoder_layers(model, adapter))


def test_moe_blocks_outside_one_layer_list_are_refused(monkeypatch):
    model, _ = build_tiny("mixtral", seed=0)
    adapter = ADAPTERS["mixtral"]
    layers = find_moe_layers(model, adapter)
    monkeypatch.setattr("uncurl.sequential.find_moe_layers", lambda m, a: [*layers, type(layers[0])(
        "model.extra.mlp", 9, layers[0].router, layers[0].experts, layers[0].num_experts)])
    with pytest.raises(UncurlError, match="not all in one list of decoder layers"):
        decoder_layers(model, adapter)
