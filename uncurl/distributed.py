"""Data-parallel profiling on torch.distributed: each rank profiles its share of the texts, the
statistics are gathered and combined, rank 0 plans, merges, writes and reports.

    torchrun --nproc-per-node 2 -m uncurl prune --model DIR --task superglue-rte --keep 4 --out runs/k4
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m uncurl prune ...

A run is data-parallel when torchrun's environment says so (``WORLD_SIZE`` > 1; ``RANK``,
``LOCAL_RANK``): every rank checks the options and data (a bad value exits 2 on every rank), loads
the model, profiles its share of the calibration texts (``profile.shard_range``: whole texts, with
their global indices, so the logit sample's keys are those of one pass), then every statistic of
every layer is all-gathered and combined in rank order by its own ``combine`` (``stats``: sums
add; the sample keeps the smallest keys), the rule ``Profile.combine`` applies to shard files, so
a 2-rank run gives what two ``--shard`` files combined give. Rank 0 goes on alone; the other ranks
exit 0 without output and never touch ``--out``. A layer-by-layer prune (``layerwise.py``) gathers
each layer's statistics as that layer is done; every rank then plans and merges it alike (the same
statistics, the same deterministic merge: what ``--calibrate-through pruned`` runs its share
through), and rank 0 alone writes it.

Backend: gloo when the model runs on the CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``). The
process group's timeout (``UNCURL_DIST_TIMEOUT`` seconds, default 1800, torch's own) bounds how
long a rank waits for the others at the one collective step; a rank that dies ends the run on the
others sooner: torchrun stops the remaining workers and exits non-zero (each rank's claim of
``--out`` is rank 0's alone, and its staged output is removed on the signal, see ``output.py``).
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from functools import reduce

import torch

from .errors import UncurlError
from .stats import STATISTICS, Profile

log = logging.getLogger(__name__)

TIMEOUT_ENV = "UNCURL_DIST_TIMEOUT"
DIE_ENV = "UNCURL_TEST_DIE_RANK"  # tests only: this rank exits abruptly before the collective step


def world() -> tuple[int, int] | None:
    """(rank, world size) under torchrun with more than one process, else None."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UncurlError(f"WORLD_SIZE {os.environ.get('WORLD_SIZE')!r} / RANK {os.environ.get('RANK')!r}: "
                          f"torchrun's environment must hold integers") from None
    return (rank, size) if size > 1 else None


def follower() -> bool:
    """Whether this process is a rank other than 0 of a data-parallel run."""
    w = world()
    return w is not None and w[0] != 0


def rank_device(device: str) -> str:
    """``--device`` for this rank: each rank its own GPU (``cuda:LOCAL_RANK``) for auto or cuda."""
    if world() is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UncurlError(f"{TIMEOUT_ENV}={text!r}: the seconds a rank waits for the others, a number > 0")
    return timedelta(seconds=seconds)


def init(device: torch.device) -> str:
    """Join torchrun's process group (once): nccl for a CUDA device, else gloo. Returns the backend."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timeout())
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_backend()


def gather_profile(profile: Profile, device: torch.device) -> Profile:
    """Every rank's partial ``profile`` combined, on every rank: each statistic all-gathered and
    combined in rank order by its ``combine``; token counts summed."""
    import torch.distributed as dist

    for name in sorted(profile.layers):
        gather_layer(profile.layers[name], device)
    profile.meta["ranks"] = dist.get_world_size()
    return profile


def sum_over_ranks(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Each tensor replaced, in place, by its sum over every rank (the same on every rank): the
    layer-by-layer fit's normal equations and error sums, so every rank solves the same system from
    every rank's share of the calibration texts."""
    import torch.distributed as dist

    backend = init(device)
    where = device if backend == "nccl" else torch.device("cpu")
    for t in tensors:
        mine = t.to(where).contiguous()
        dist.all_reduce(mine)
        t.copy_(mine.to(t.device))


def gather_layer(stats, device: torch.device) -> None:
    """One layer's statistics (``LayerStats``) combined over every rank, in place, on every rank:
    what ``gather_profile`` does per layer (the layer-by-layer prune calls it as each layer is done;
    every rank visits the layers in the same order, so the collectives pair up)."""
    import torch.distributed as dist

    backend = init(device)
    if os.environ.get(DIE_ENV) == str(dist.get_rank()):  # tests: a rank that dies before the collective
        os._exit(1)
    where = device if backend == "nccl" else torch.device("cpu")
    size = dist.get_world_size()
    counts = torch.tensor([stats.tokens], dtype=torch.int64, device=where)
    dist.all_reduce(counts)
    stats.tokens = int(counts.item())
    for stat, spec in STATISTICS.items():
        mine = stats.tensors[stat].to(where, torch.float64).contiguous()
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine)
        stats.tensors[stat] = reduce(spec.combine, parts).cpu()
