"""Step 4c (``--recover STEPS``): distil the parent's next-token distribution into the pruned model.

    uncurl prune --model DIR --task superglue-rte --keep 4 --recover 200 --eval ...

After merging (and ``--merge fit``), the pruned model's routers (with ``--recover-experts`` also its
MoE experts) are trained for STEPS optimiser steps to match the parent's next-token distribution:
the loss is KL(parent || pruned) of the logits, averaged over the non-padding tokens of the
calibration texts only (never the evaluation split). Everything else stays frozen, so a router-only
recovery changes router tensors only (Router KD, arXiv 2603.02217).

- Adam, learning rate ``ROUTER_LR`` for router tensors and ``EXPERT_LR`` for experts, no weight
  decay; one calibration batch (``--batch-size`` texts) per step, the batches in a seeded order,
  reshuffled each time they are all used. Seeded (``--seed``) and deterministic on one machine
  (``torch.use_deterministic_algorithms``, warn-only, while it runs); on CUDA when the model is.
- The parent is held beside the pruned model while it runs (its forward gives the targets).
- ``--recover 0`` changes nothing. With ``--eval``, ``prune`` evaluates the model before and after
  recovery and keeps the recovered weights only if the task loss did not rise (the report says so).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .adapters import MoEAdapter, find_moe_layers
from .devices import on
from .errors import UncurlError
from .load import input_device
from .profile import indexed_batches

log = logging.getLogger(__name__)

ROUTER_LR = 1e-3  # Adam on the router rows: large enough to move in ~100 steps on the tiny models
EXPERT_LR = 1e-4  # the experts' weights are larger and shared by many tokens: a tenth


def trainable(model, adapter: MoEAdapter, experts: bool = False) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} recovery trains: every MoE layer's router parameters and the block's own
    per-expert routing parameters (``block_tensors``); with ``experts`` also the experts' parameters."""
    out = {}
    for layer in find_moe_layers(model, adapter):
        block = model.get_submodule(layer.name)
        modules = [(adapter.router_attr, layer.router)] + ([(adapter.experts_attr, layer.experts)] if experts else [])
        for attr, module in modules:
            for name, p in module.named_parameters():
                out[f"{layer.name}.{attr}.{name}"] = p
        for name in adapter.block_tensors:
            p = dict(block.named_parameters(recurse=False)).get(name)
            if p is not None:
                out[f"{layer.name}.{name}"] = p
    return out


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over the tokens where ``mask``."""
    t = F.log_softmax(on(teacher_logits, student_logits).float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    per_token = (t.exp() * (t - s)).sum(-1)
    m = on(mask, per_token).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


@contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


class _LossBar:
    """A rich progress bar with the running loss (stderr), or nothing."""

    def __init__(self, show: bool, total: int):
        self.show, self.total, self.bar, self.task = show, total, None, None

    def __enter__(self):
        if self.show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("recovering"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("KL {task.fields[loss]}"), TimeRemainingColumn(), transient=True,
                                console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task("recover", total=self.total, loss="-")
        return self

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


class Recovery:
    """The result of ``recover``: the report entry, and ``restore()`` to put the weights back."""

    def __init__(self, params: dict, saved: dict, report: dict):
        self.params, self.saved, self.report = params, saved, report

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.saved[name])


def recover(student, teacher, adapter: MoEAdapter, tokenizer, texts, *, steps: int, seed: int = 0,
            experts: bool = False, batch_size: int = 8, max_length: int = 512, progress: bool = False,
            router_lr: float = ROUTER_LR, expert_lr: float = EXPERT_LR) -> Recovery:
    """Train ``student``'s routers (and experts) in place for ``steps`` steps to match ``teacher``'s
    logits on ``texts``. Returns the report entry (loss curve, time) and a way back."""
    if steps < 0:
        raise UncurlError(f"--recover {steps} must be a number of steps >= 0")
    params = trainable(student, adapter, experts)
    saved = {name: p.detach().clone() for name, p in params.items()}
    report = {"steps": steps, "trains": "routers and experts" if experts else "routers",
              "parameters": sum(p.numel() for p in params.values()), "loss": "KL(parent || pruned) of next-token "
              "logits, mean over calibration tokens", "router_lr": router_lr, "seed": seed}
    if experts:
        report["expert_lr"] = expert_lr
    if steps == 0 or not params:
        return Recovery(params, saved, {**report, "loss_curve": [], "seconds": 0.0})
    if not texts:
        raise UncurlError("--recover: no calibration text to distil on")
    device = input_device(student)
    batches = [b for _, b in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length)]
    grads = {id(p) for p in params.values()}
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in grads)
    expert_names = {n for n in params if f".{adapter.experts_attr}." in n}
    groups = [{"params": [p for n, p in params.items() if n not in expert_names], "lr": router_lr}]
    if expert_names:
        groups.append({"params": [p for n, p in params.items() if n in expert_names], "lr": expert_lr})
    curve, start = [], time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    try:
        with _deterministic(), _LossBar(progress, steps) as bar:
            optimiser = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=0.0)
            order: list[int] = []
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                batch = batches[order.pop(0)].to(device)
                with torch.no_grad():
                    target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).logits
                logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).logits
                loss = kl_loss(target, logits, batch["attention_mask"].bool())
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                curve.append(float(loss.detach()))
                bar.advance(curve[-1])
    finally:
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
    seconds = time.perf_counter() - start
    log.info("recovery: KL %.4f -> %.4f in %d steps (%.1f s)", curve[0], curve[-1], steps, seconds)
    return Recovery(params, saved, {**report, "loss_curve": curve, "seconds": round(seconds, 3),
                                    "device": str(device), "batches": len(batches)})


@torch.enable_grad()
def recover_block(block: torch.nn.Module, params: dict[str, torch.nn.Parameter], calls: list, *, steps: int,
                  seed: int = 0, router_lr: float = ROUTER_LR, expert_lr: float = EXPERT_LR,
                  expert_names=frozenset()) -> dict:
    """Layer-local recovery (``--recover-local STEPS``): train ``params`` of one pruned MoE ``block``
    in place so its output matches the original block's on the layer's own calibration inputs.

    ``calls``: per calibration batch (args, kwargs, target output, mask of its non-padding rows or
    None), what the ORIGINAL block was called with and returned. Loss: the squared error over the
    non-padding tokens relative to the target's energy, ||y' - y||^2 / ||y||^2; Adam, one batch per
    step in a seeded order. Kept only if it lowered that error over all the batches (measured before
    and after); else the weights are put back. Returns the report entry."""
    def error_of(out, target, mask):
        out = (out[0] if isinstance(out, (tuple, list)) else out).float()
        o, t = out.reshape(-1, out.shape[-1]), on(target, out).float().reshape(-1, out.shape[-1])
        if mask is not None and mask.numel() == o.shape[0]:
            mask = on(mask, o)
            o, t = o[mask], t[mask]
        return ((o - t) ** 2).sum(), (t ** 2).sum()

    def total() -> float:
        with torch.no_grad():
            parts = [error_of(block(*a, **k), y, m) for a, k, y, m in calls]
        return float(sum(e for e, _ in parts) / sum(n for _, n in parts).clamp_min(1e-30))

    saved = {n: p.detach().clone() for n, p in params.items()}
    report = {"steps": steps, "before": total()}
    if steps == 0 or not params or report["before"] == 0.0:
        return {**report, "after": report["before"], "kept": False}
    flags = {id(p): p.requires_grad for p in block.parameters()}
    train = {id(p) for p in params.values()}
    for p in block.parameters():
        p.requires_grad_(id(p) in train)
    groups = [{"params": [p for n, p in params.items() if n not in expert_names], "lr": router_lr}]
    if any(n in expert_names for n in params):
        groups.append({"params": [p for n, p in params.items() if n in expert_names], "lr": expert_lr})
    gen = torch.Generator().manual_seed(seed)
    try:
        with _deterministic():
            optimiser = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=0.0)
            order: list[int] = []
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(calls), generator=gen).tolist()
                args, kwargs, target, mask = calls[order.pop(0)]
                err, norm = error_of(block(*args, **kwargs), target, mask)
                loss = err / norm.clamp_min(1e-30)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        for p in block.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
    report["after"] = total()
    report["kept"] = report["after"] < report["before"]
    if not report["kept"]:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    return report
