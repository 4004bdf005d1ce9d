"""MTP (next-token-prediction) tensors laid out as the Hub's DeepSeek-V3/R1 and GLM-4.5 repos keep them.

    from tests.mtp_util import add_mtp_blocks
    model.save_pretrained(folder)
    names = add_mtp_blocks(folder, seed=1)       # model.layers.{num_hidden_layers + i}.* written into the shards

A DeepSeek-style MTP block i sits at ``model.layers.{num_hidden_layers + i}.``: a full decoder layer (attention,
router ``mlp.gate.weight`` + ``e_score_correction_bias``, experts stored one tensor per expert
``mlp.experts.{j}.{gate,up,down}_proj.weight``, shared experts) plus ``enorm``, ``hnorm``, ``eh_proj`` [H, 2H],
``shared_head.norm``, ``shared_head.head`` [V, H] and its own ``embed_tokens`` [V, H]. The decoder layer's tensors
are named exactly as the checkpoint names its main MoE layers (the names of the first MoE layer, renumbered), in the
checkpoint's dtype; every value is random (seeded). Shared with the real-repo twins fixture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EXTRAS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
          "embed_tokens.weight")
COUNT_KEY = "num_nextn_predict_layers"


def _files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in _files(folder):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def mtp_shapes(config: dict, state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple, torch.dtype]]:
    """{relative name: (shape, dtype)} of one MTP block, from the checkpoint's config.json and tensors: the
    decoder-layer tensors of its last layer (an MoE layer), and the MTP extras."""
    last = config["num_hidden_layers"] - 1
    prefix = f"model.layers.{last}."
    layer = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(re.match(r"mlp\.experts\.", k) for k in layer):
        raise ValueError(f"layer {last} of this checkpoint is not an MoE layer")
    dtype = state["model.embed_tokens.weight"].dtype
    h, v = config["hidden_size"], config["vocab_size"]
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in layer.items()}
    shapes.update({"enorm.weight": ((h,), dtype), "hnorm.weight": ((h,), dtype), "eh_proj.weight": ((h, 2 * h), dtype),
                   "shared_head.norm.weight": ((h,), dtype), "shared_head.head.weight": ((v, h), dtype),
                   "embed_tokens.weight": ((v, h), dtype)})
    return shapes


def add_mtp_blocks(folder: str | Path, count: int = 1, seed: int = 1, file: str | None = None) -> list[str]:
    """Add ``count`` random MTP blocks to the checkpoint in ``folder`` (written by save_pretrained) and set
    ``num_nextn_predict_layers`` to ``count`` in its config.json. The blocks go into their own shard ``file``
    (default: the checkpoint's last one, as the real repos put them last), and the index, if any, names them.
    Returns the names added."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    state = _read_all(folder)
    shapes = mtp_shapes(config, state)
    gen = torch.Generator().manual_seed(seed)
    added = {}
    for i in range(count):
        prefix = f"model.layers.{config['num_hidden_layers'] + i}."
        for rel, (shape, dtype) in shapes.items():
            if rel.endswith("norm.weight") or rel.endswith("layernorm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)  # norms near one, as trained ones are
            elif rel.endswith("e_score_correction_bias"):
                t = 0.01 * torch.randn(shape, generator=gen)
            else:
                t = 0.05 * torch.randn(shape, generator=gen)
            added[prefix + rel] = t.to(dtype)
    files = _files(folder)
    target = folder / (file or files[-1].name)
    existing, metadata = {}, {"format": "pt"}
    if target.is_file():
        with safe_open(str(target), framework="pt") as f:
            existing = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or metadata
    save_file({**existing, **added}, str(target), metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: target.name for k in added})
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    config[COUNT_KEY] = count
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted(added)
