"""Step 5: write the pruned checkpoint, all or nothing, and check it from disk before saying so.

The output is assembled in a hidden temporary folder beside ``--out`` and renamed into place only
when complete and checked: an interrupted or failed run leaves no half-written folder. An
``--out`` that already holds anything is refused unless ``--overwrite``; an ``--out`` inside (or
equal to) the input model folder is always refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .adapters import MoEAdapter, expert_count, find_moe_layers, top_k
from .errors import CheckpointCheckError, UncurlError

SHARD_SIZE = "5GB"  # transformers' default; a model under it is one model.safetensors, no index


def check_out_dir(out: str | Path, *, overwrite: bool, source: Path | None = None) -> Path:
    """Validate ``--out`` before any expensive work."""
    out = Path(out).resolve()
    if source is not None and (out == source or source in out.parents):
        raise UncurlError(f"--out {out} is inside the input model folder {source}; uncurl never writes there")
    if out.exists() and not out.is_dir():
        raise UncurlError(f"--out {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a checkpoint" if (out / "config.json").exists() else "files"
        raise UncurlError(f"--out {out} already holds {what}; choose an empty folder or pass --overwrite")
    return out


@contextmanager
def staged_dir(out: Path):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it vanishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(model, tokenizer, folder: Path, shard_size: str | int = SHARD_SIZE) -> None:
    """Safetensors shards of at most ``shard_size`` + index (transformers' names), config,
    generation config, tokenizer files."""
    model.save_pretrained(folder, max_shard_size=shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def verify_checkpoint(folder: Path, adapter: MoEAdapter, expected_experts: int, expected_top_k: int, tokenizer) -> dict:
    """Reload from disk and check keys, expert counts, router rows, finiteness and one forward."""
    from transformers import AutoConfig

    from .load import from_folder

    model, info = from_folder(folder, AutoConfig.from_pretrained(folder), "auto", output_loading_info=True)
    problems = [f"{k}: {sorted(v)}" for k, v in info.items() if k != "error_msgs" and v] + list(info["error_msgs"])
    if expert_count(model.config, adapter) != expected_experts:
        problems.append(f"config says {expert_count(model.config, adapter)} experts, expected {expected_experts}")
    if top_k(model.config, adapter) != expected_top_k:
        problems.append(f"config says top-k {top_k(model.config, adapter)}, expected {expected_top_k}")
    layers = find_moe_layers(model, adapter)
    for layer in layers:
        router = layer.router.state_dict()
        tensors = list(layer.experts.state_dict().items()) + [(n, router[n]) for n in adapter.router_tensors]
        for name, t in tensors:
            if t.shape[0] != expected_experts:
                problems.append(f"{layer.name}: {name} has {t.shape[0]} experts, expected {expected_experts}")
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        problems.append(f"non-finite values in {bad[:5]}")
    ids = tokenizer("uncurl checks the pruned model.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        problems.append("forward pass produced non-finite logits")
    if problems:
        raise CheckpointCheckError("the pruned checkpoint failed its checks: " + "; ".join(problems))
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    return {
        "missing_keys": 0,
        "unexpected_keys": 0,
        "moe_layers": len(layers),
        "experts_per_layer": expected_experts,
        "forward_ok": True,
        "shards": shards,
        "bytes_on_disk": sum((folder / s).stat().st_size for s in shards),
    }
