"""How well does `--merge aligned` find which neurons of two experts are the same? Scored against
the test bed's ground truth.

    .venv/bin/python examples/score_alignment.py --model ~/.cache/uncurl/smol-moe/model

The test bed (examples/build_smol_moe.py) builds every expert from a subset of its dense parent's
FFN neurons and shuffles each expert's neurons with a seeded permutation; ``correspondence.safetensors``
says, per MoE layer, which parent neuron each expert neuron is ([E, I]). Two experts that both hold
parent neuron n should be aligned so that their copies of n land on the same position. For every
ordered pair (reference a, member b) of a layer this script runs uncurl's own matcher
(``uncurl.merge.match_neurons``, Hungarian over gate/up rows and down columns, the layout from the
adapter table) and counts, over the parent neurons both experts hold, the share put on the right
position. Baselines: no alignment (what ``--merge average`` does) and a random permutation.
The gate/up rows of a shared neuron are equal copies in both experts; the down columns are not (the
build refits them per expert), so this is a fair, not a trivial, test of the matcher.
Writes benchmarks/results/alignment_score.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def pair_score(perm: torch.Tensor, ref_parent: torch.Tensor, mem_parent: torch.Tensor) -> tuple[int, int]:
    """(neurons put right, neurons shared): position i of the reference gets member neuron perm[i];
    right when both are the same parent neuron. Only parent neurons both experts hold count."""
    shared = torch.isin(ref_parent, mem_parent)
    right = (mem_parent[perm] == ref_parent) & shared
    return int(right.sum()), int(shared.sum())


def score_layer(experts: dict[str, torch.Tensor], parent: torch.Tensor, neurons, seed: int = 0) -> dict:
    """Scores of every ordered expert pair of one layer. ``experts``: {tensor name: [E, ...]};
    ``parent``: [E, I] parent neuron of each expert neuron."""
    from uncurl.merge import match_neurons

    g = torch.Generator().manual_seed(seed)
    n_exp, size = parent.shape
    totals = {"aligned": 0, "none": 0, "random": 0, "shared": 0}
    for a in range(n_exp):
        ref = {n: t[a] for n, t in experts.items()}
        for b in range(n_exp):
            if a == b:
                continue
            mem = {n: t[b] for n, t in experts.items()}
            perm = match_neurons(ref, mem, neurons)
            right, shared = pair_score(perm, parent[a], parent[b])
            totals["aligned"] += right
            totals["shared"] += shared
            totals["none"] += pair_score(torch.arange(size), parent[a], parent[b])[0]
            totals["random"] += pair_score(torch.randperm(size, generator=g), parent[a], parent[b])[0]
    share = totals.pop("shared")
    return {"pairs": n_exp * (n_exp - 1), "shared_neurons_per_pair": share / (n_exp * (n_exp - 1)),
            **{f"right_{k}": v / share for k, v in totals.items()}}


def main() -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from uncurl.adapters import find_moe_layers, get_adapter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache" / "uncurl" / "smol-moe" / "model")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "alignment_score.json")
    args = ap.parse_args()
    truth = load_file(str(args.model / "correspondence.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    adapter = get_adapter(model.config.model_type)
    start, layers = time.perf_counter(), {}
    for layer in find_moe_layers(model, adapter):
        experts = {n: p.detach() for n, p in layer.experts.named_parameters()}
        layers[layer.name] = score_layer(experts, truth[layer.name], adapter.neurons)
        print(layer.name, json.dumps(layers[layer.name]), flush=True)
    mean = {k: sum(v[k] for v in layers.values()) / len(layers) for k in next(iter(layers.values()))}
    result = {"model": str(args.model), "matcher": "uncurl.merge.match_neurons", "layers": layers,
              "mean_over_layers": mean, "seconds": round(time.perf_counter() - start, 1)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(mean, indent=2))


if __name__ == "__main__":
    main()
