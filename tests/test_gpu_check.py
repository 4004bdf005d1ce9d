"""``make gpu-check`` without a GPU (its CPU-safe parts, small, as CI runs them): the script runs end
to end, skips what needs CUDA saying so, and its twin has Qwen3-30B-A3B's layer layout."""

from __future__ import annotations

import json

import torch

from benchmarks.gpu_check import SMOKE_TWIN, TWIN, main


def qwen3_moe_bytes(s: dict, layers: int) -> int:
    """Weight bytes of a qwen3_moe from its dimensions (bf16), counted by hand from the architecture:
    embeddings and an untied head; per layer q/k/v/o, q/k norms, two norms, the router and the experts."""
    h, e, i, hd = s["hidden"], s["experts"], s["intermediate"], s["head_dim"]
    attention = h * s["heads"] * hd * 2 + h * s["kv_heads"] * hd * 2 + 2 * hd
    layer = attention + 2 * h + e * h + e * 3 * h * i
    return 2 * (2 * s["vocab"] * h + layers * layer + h)


def test_the_smoke_run_writes_every_step(tmp_path, data_dir):
    out = tmp_path / "gpu_check.json"
    results = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == results and results["ok"], results
    steps = results["steps"]
    assert steps["cuda_tests"]["status"] == steps["bench"]["status"] == "skipped"
    assert steps["device_map"]["status"] == "ok" and "disk" in steps["device_map"]["placement"]
    assert steps["device_map"]["pipeline"]["layer_by_layer"]
    twin = steps["twin"]
    assert twin["status"] == "ok" and twin["merge"] == "fit"  # the defaults: the fitted merge
    assert twin["weight_bytes"] == qwen3_moe_bytes(SMOKE_TWIN, 2)
    assert twin["gpu_peak_bytes"] is None and not torch.cuda.is_available() or twin["gpu_peak_bytes"] > 0


def test_the_full_twin_is_qwen3_30b_a3b_shaped():
    assert (TWIN["hidden"], TWIN["experts"], TWIN["intermediate"], TWIN["top_k"], TWIN["dtype"]) == (
        2048, 128, 768, 8, "bfloat16")
    per_layer = qwen3_moe_bytes(TWIN, 1) - qwen3_moe_bytes(TWIN, 0)
    assert 1.2e9 < per_layer < 1.3e9  # 128 x 3 x 2048 x 768 bf16 experts, plus attention
