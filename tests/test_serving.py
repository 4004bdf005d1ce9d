"""`uncurl cost` against cost.py's own figures, dense models, and the opt-in measured serving path
(structure and bounds only: timings are not compared)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from uncurl.adapters import get_adapter
from uncurl.cli import app
from uncurl.cost import serving_cost
from uncurl.load import build_tiny, byte_tokenizer
from uncurl.serving import measure_serving

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def payload(res) -> dict:
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_cost_command_gives_cost_py_figures():
    res = run("cost", "--model", "builtin:qwen2_moe", "--gpu-memory", "24GB", "--context", 1000, "--serving-batch", 3,
              "--json")
    assert res.exit_code == 0, res.output
    got = payload(res)
    model, _ = build_tiny("qwen2_moe")
    want = serving_cost(model, get_adapter("qwen2_moe"), gpu_memory="24GB", context=1000, batch=3).as_dict()
    assert got["cost"] == want and got["moe"] is True and "measured" not in got
    assert (got["cost"]["context"], got["cost"]["batch"], got["cost"]["gpu_memory"]) == (1000, 3, 24 * 10**9)


def test_cost_command_table_and_dense_model(tmp_path):
    """A dense causal LM (no experts): every parameter of the stack and head is active."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    res = run("cost", "--model", tmp_path / "dense", "--json")
    assert res.exit_code == 0, res.output
    c = payload(res)["cost"]
    emb = config.vocab_size * config.hidden_size
    assert (c["experts"], c["top_k"]) == (None, None) and c["active_params"] == c["params"]
    assert c["flops_per_token"] == 2 * (c["params"] - emb)
    assert c["kv_bytes_per_token"] == 2 * 2 * config.num_key_value_heads * (32 // 4) * 4  # layers x K,V x float32
    table = run("cost", "--model", tmp_path / "dense")
    assert table.exit_code == 0 and "| experts / MoE layer, top-k | dense |" in table.stdout


def test_bad_serving_values_exit_2_before_loading():
    res = run("cost", "--model", "builtin:mixtral", "--gpu-memory", "lots")
    assert res.exit_code == 2 and "--gpu-memory 'lots'" in res.output
    res = run("cost", "--model", "builtin:mixtral", "--serving-seconds", 0)
    assert res.exit_code == 2 and "--serving-seconds" in res.output


def test_measured_serving_structure_and_bounds():
    model, _ = build_tiny("mixtral")
    m = measure_serving(model, batch=2, context=4096, repeats=3, seconds=600, decode_tokens=3)
    assert m["repeats"] == 3 and not m["capped"] and m["batch"] == 2 and m["decode_tokens"] == 3
    assert m["context"] == model.config.max_position_embeddings - 3 and m["context_requested"] == 4096  # capped
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        s = m[key]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert m["device"] == "cpu" and m["peak_memory_bytes"] is None and "n/a" in m["peak_memory_note"]
    quick = measure_serving(model, batch=1, context=16, repeats=5, seconds=1e-9, decode_tokens=1)
    assert quick["repeats"] == 1 and quick["capped"] and quick["cap_s"] == 1e-9  # at least one, then stop


def test_cost_command_measures_when_asked():
    res = run("cost", "--model", "builtin:mixtral", "--measure-serving", "--context", 16, "--serving-repeats", 2,
              "--decode-tokens", 2, "--json")
    assert res.exit_code == 0, res.output
    m = payload(res)["measured"]
    assert (m["context"], m["batch"], m["repeats"], m["decode_tokens"]) == (16, 1, 2, 2)
    assert {"device", "device_name", "dtype", "cap_s", "elapsed_s", "peak_memory_bytes"} <= set(m)


def test_prune_reports_serving_options_and_measured(tmp_path, data_dir):
    out = tmp_path / "k4"
    res = run("prune", "--model", "builtin:mixtral", "--keep", 4, "--data-dir", data_dir, "--out", out, "--samples", 8,
              "--max-length", 32, "--no-plots", "--gpu-memory", "1MB", "--context", 64, "--serving-batch", 2,
              "--measure-serving", "--serving-repeats", 1, "--decode-tokens", 2)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report" / "report.json").read_text())
    for side in ("before", "after"):
        assert (r["cost"][side]["context"], r["cost"][side]["batch"], r["cost"][side]["gpu_memory"]) == (64, 2, 10**6)
        assert r["cost"]["measured"][side]["repeats"] == 1 and r["cost"]["measured"][side]["context"] == 64
    assert "decode x" in r["cost"]["note"]
    assert "decode tokens/s" in (out / "report" / "report.md").read_text()
    assert "decode tokens/s" in (out / "README.md").read_text()
    for layer in r["layers"]:
        assert layer["balance_before"]["experts"] == 8 and layer["balance_after_expected"]["experts"] == 4
        assert 0 < layer["balance_before"]["entropy"] <= 1
