"""Serving cost against hand counts from the tiny configs (cost.py), and what pruning changes in it."""

from __future__ import annotations

import pytest
import torch

from uncurl.adapters import get_adapter
from uncurl.cluster import LayerPlan
from uncurl.cost import parse_bytes, release_note, serving_cost
from uncurl.errors import UncurlError
from uncurl.load import build_tiny
from uncurl.merge import rewrite_model


def attention(c, bias=False) -> int:
    """q, k, v, o projections of a grouped-query attention layer (heads of hidden/heads dims)."""
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    return c.hidden_size * (2 * q + 2 * kv) + (q + 2 * kv if bias else 0)


def test_mixtral_by_hand():
    model, _ = build_tiny("mixtral")
    c = model.config
    h, i, e, k, v, n = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, c.vocab_size, c.num_hidden_layers
    expert = 3 * h * i  # gate, up, down
    layer_common = attention(c) + e * h + 2 * h  # attention, router, two norms
    total = n * (layer_common + e * expert) + 2 * v * h + h  # embedding, head, final norm (untied)
    active = n * (layer_common + k * expert) + 2 * v * h + h
    cost = serving_cost(model, get_adapter("mixtral"), context=1000, batch=3)
    assert (cost.params, cost.active_params) == (total, active)
    assert cost.flops_per_token == 2 * (active - v * h)  # the input embedding is a lookup
    kv_per_token = n * 2 * c.num_key_value_heads * (h // c.num_attention_heads) * 4  # K and V, float32
    assert cost.kv_bytes_per_token == kv_per_token and cost.kv_fixed_bytes == 0
    assert cost.kv_bytes == 3 * 1000 * kv_per_token
    assert cost.weight_bytes == 4 * total


def test_qwen2_moe_shared_expert_always_runs():
    model, _ = build_tiny("qwen2_moe")
    c = model.config
    h, e, k, v, n = c.hidden_size, c.num_experts, c.num_experts_per_tok, c.vocab_size, c.num_hidden_layers
    expert, shared = 3 * h * c.moe_intermediate_size, 3 * h * c.shared_expert_intermediate_size + h  # + its gate
    layer_common = attention(c, bias=True) + e * h + shared + 2 * h
    active = n * (layer_common + k * expert) + 2 * v * h + h
    assert serving_cost(model, get_adapter("qwen2_moe")).active_params == active


def test_deepseek_v3_dense_first_layer_and_latent_cache():
    """A dense first layer runs whole; multi-latent attention caches the compressed latent and the
    rotary key (kv_lora_rank + qk_rope_head_dim per layer), as transformers holds it."""
    model, _ = build_tiny("deepseek_v3")
    c = model.config
    h, e, k, n = c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.num_hidden_layers
    cost = serving_cost(model, get_adapter("deepseek_v3"))
    expert = 3 * h * c.moe_intermediate_size
    routed = (n - c.first_k_dense_replace) * e * expert
    assert cost.params - cost.active_params == routed - routed * k // e
    assert cost.kv_bytes_per_token == n * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_sliding_window_layers_stop_growing():
    model, _ = build_tiny("gpt_oss")
    c = model.config
    per_layer = 2 * c.num_key_value_heads * c.head_dim * 4
    cost = serving_cost(model, get_adapter("gpt_oss"), context=1000, batch=2)
    assert c.layer_types == ["sliding_attention", "full_attention"] and c.sliding_window < 1000
    assert cost.kv_bytes == 2 * (per_layer * c.sliding_window + per_layer * 1000)


def test_linear_attention_state_is_fixed_per_sequence():
    model, _ = build_tiny("qwen3_next")
    short = serving_cost(model, get_adapter("qwen3_next"), context=100)
    long = serving_cost(model, get_adapter("qwen3_next"), context=200)
    assert short.kv_fixed_bytes > 0
    assert long.kv_bytes - short.kv_bytes == 100 * short.kv_bytes_per_token


def test_pruning_experts_keeps_active_parameters_lowering_top_k_cuts_them():
    model, _ = build_tiny("mixtral")
    adapter = get_adapter("mixtral")
    plans = {name: LayerPlan(groups=tuple((j,) for j in range(4)), weights=((1.0,),) * 4)
             for name in ("model.layers.0.mlp", "model.layers.1.mlp")}
    before = serving_cost(model, adapter, gpu_memory=300_000)
    kept = serving_cost(rewrite_model(model, adapter, plans, merge="select", router_rule="mean"), adapter, gpu_memory=300_000)
    lower = serving_cost(rewrite_model(model, adapter, plans, merge="select", top_k=1, router_rule="mean"), adapter)
    # a token still runs k experts: only the router's dropped rows leave the active count
    c = model.config
    assert before.active_params - kept.active_params == c.num_hidden_layers * 4 * c.hidden_size
    assert kept.weight_bytes < before.weight_bytes and (kept.gpus, before.gpus) == (11, 12)
    expert = 3 * c.hidden_size * c.intermediate_size
    assert kept.active_params - lower.active_params == c.num_hidden_layers * expert  # one expert fewer per token
    note = release_note(before, kept)
    cut = round(100 * (1 - kept.weight_bytes / before.weight_bytes))
    router = 100 * (before.active_params - kept.active_params) / before.active_params
    assert note.startswith(f"-{cut}% weight memory, fits 11 GPUs instead of 12, -{router:.1f}% active parameters")


@pytest.mark.parametrize("text, value", [("80GiB", 80 * 2**30), ("24GB", 24 * 10**9), ("500MB", 5 * 10**8),
                                         ("1e9", 10**9)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["0", "-1GB", "abc", "12XB", "inf"])
def test_parse_bytes_refuses(text):
    with pytest.raises(UncurlError, match="--gpu-memory"):
        parse_bytes(text)


def test_no_grad_state_left_behind():
    model, _ = build_tiny("mixtral")
    serving_cost(model, get_adapter("mixtral"))
    assert torch.is_grad_enabled()
