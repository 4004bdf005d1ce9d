"""Prune layer by layer: profile, plan, merge and write each decoder layer while its weights are on the device.

    from uncurl.layerwise import prune_layer_by_layer
    result = prune_layer_by_layer(model, tokenizer, adapter, texts, folder, keep=4, plan=..., merge="aligned",
                                  router_rule="refit")

What ``--pipeline sequential`` runs for ``uncurl prune`` (``pipeline._prune``) unless ``--recover``
needs the original model after the merge (then the profile of ``sequential.py`` and the usual
merge). Each decoder layer's weights are read once, in all
(``sequential.run_layers``), and while they are on the device:

1. every calibration batch runs through the layer (its MoE blocks' statistics recorded);
2. each MoE block is planned (``plan(name, stats)``) and rewritten (``merge.rewrite_layer``, the
   function the whole-model merge calls), so the plan and the tensors are the whole-model pass's;
3. the layer's tensors, merged and unchanged, are written at their offsets in the checkpoint's
   shards (``save.CheckpointWriter``: the layout is fixed up front from the pruned model on ``meta``,
   so the files are the ones ``save_pretrained`` writes, byte for byte);
3b. with ``--merge fit`` each block's down projections are fitted to its original's outputs on the
   calls the original made in this visit (``fit.fit_blocks``): the target is the original experts'
   output, taken in the visit, so the original block does not run again; the original layer's
   weights are let go before the fit; one layer's normal equations at a time;
4. with ``through="pruned"`` the batches run again through the layer as pruned and the next layer
   gets those outputs (REAM's and llm-compressor's choice), else the original layer's (then the
   profile is the one-pass profile);
5. with ``recover_local`` steps (``--recover-local``) each pruned MoE block's routers are first
   trained to give the original block's output on the layer's own calibration inputs
   (``recover.recover_block``; layer-local recovery, one layer in memory);
6. the layer's original weights are let go (offloaded ones back to ``meta``; resident ones too:
   the model is consumed and must not be used again).

The tensors outside the decoder layers (embeddings, final norm, LM head, a vision tower) are
written at the end, read once. A layer the forward runs twice (a looped stack) cannot be merged
on its first visit and is refused; ``--pipeline whole`` handles it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapters import MoEAdapter, find_moe_layers, set_moe_keys, set_mtp_count, tail_rows
from .cluster import LayerPlan
from .errors import UncurlError
from .merge import MERGE_RULES, check_layer, layer_tensor_names, rewrite_layer
from .offload import read_tensor
from .save import CheckpointWriter
from .sequential import Visit, decoder_layers, run_layers, within
from .stats import LayerStats, Profile

THROUGH = ("original", "pruned")  # --calibrate-through


def check_through(through: str) -> None:
    if through not in THROUGH:
        raise UncurlError(f"--calibrate-through {through!r} is not one of {', '.join(THROUGH)}")


@dataclass
class LayerwiseResult:
    profile: Profile
    plans: dict[str, LayerPlan]
    model: torch.nn.Module  # the pruned model on meta: its config, shapes and dtypes (costs, counts)
    local: dict = field(default_factory=dict)  # --recover-local: per MoE block, its error before/after
    fits: dict = field(default_factory=dict)  # --merge fit: per MoE block, fit.fit_blocks' entry
    # --recover-local of the routers alone: each trained (and kept) router tensor as it was before, on
    # the CPU, so that --eval can score the model without the recovery (pipeline.judge_local)
    before_recovery: dict = field(default_factory=dict)


def pruned_on_meta(model, adapter: MoEAdapter, keep: int, top_k: int | None):
    """``model``'s class built for ``keep`` experts (and ``top_k``) on ``meta``, each tensor with the
    dtype of the original's of the same name, tied weights tied: what the checkpoint will hold."""
    config = copy.deepcopy(model.config)
    set_moe_keys(config, adapter, keep, top_k)
    with torch.device("meta"):
        new = type(model)(config)
    state = model.state_dict()
    for name, tensor in list(new.state_dict().items()):
        owner, _, attr = name.rpartition(".")
        module = new.get_submodule(owner)
        dtype = state[name].dtype if name in state else tensor.dtype
        if tensor.dtype != dtype:
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
            else:
                module._buffers[attr] = tensor.to(dtype)
    new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def _materialised(module: torch.nn.Module, state: dict[str, torch.Tensor], original: torch.nn.Module, device):
    """``module`` (of the pruned model on meta) given ``state`` (its tensors, names relative to it)
    on ``device``, and ``original``'s non-persistent buffers (rotary tables)."""
    module.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True, strict=True)
    persistent = set(state)
    for name, buf in original.named_buffers():
        if name not in persistent:
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = buf
    return module


def _to_meta(module: torch.nn.Module) -> None:
    for sub in module.modules():
        for attr, t in list(sub._parameters.items()):
            if t is not None and t.device.type != "meta":
                sub._parameters[attr] = torch.nn.Parameter(t.to("meta"), requires_grad=False)
        for attr, t in list(sub._buffers.items()):
            if t is not None and t.device.type != "meta":
                sub._buffers[attr] = t.to("meta")


@torch.no_grad()
def prune_layer_by_layer(
    model,
    tokenizer,
    adapter: MoEAdapter,
    texts,
    folder: Path | None,
    *,
    keep: int,
    plan: Callable[[str, LayerStats], LayerPlan],
    merge: str,
    router_rule: str,
    top_k: int | None = None,
    through: str = "original",
    shard_size: str | int = "5GB",
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
    meta: dict | None = None,
    seed: int = 0,
    text_ids=None,
    gather: Callable[[LayerStats], None] | None = None,
    reduce: Callable[[list], None] | None = None,
    recover_local: int = 0,
    recover_experts: bool = False,
    mtp=None,
    fit_memory: int | None = None,
) -> LayerwiseResult:
    """Profile ``model`` on ``texts`` layer by layer and write it, cut to ``keep`` experts per MoE
    layer, into ``folder`` (weights and configs; the tokenizer is the caller's; None: write nothing,
    a torchrun rank other than 0). ``gather(stats)``, under torchrun, combines a layer's statistics
    over the ranks (``distributed.gather_layer``) before it is planned, and ``reduce(tensors)`` sums
    the ``--merge fit`` normal equations over them (``fit.fit_blocks``). ``recover_local`` steps:
    each pruned MoE block's routers (``recover_experts``: and experts) trained to give the original
    block's output on the layer's calibration inputs (``recover.recover_block``), before it is
    written. ``mtp`` (``mtp.Blocks``): its kept MTP blocks are profiled after the last layer, planned
    and merged alike (fitted with ``--merge fit``, not recovered) and written under their own names,
    the config's count kept. ``fit_memory``: bytes the fit's normal equations may take
    (``fit.plan_chunks``; None: a share of the device's free memory). ``model`` is consumed. See the
    module docstring."""
    check_through(through)
    family = model.config.model_type
    layers = decoder_layers(model, adapter)
    moe_layers = find_moe_layers(model, adapter)
    blocks = {name: [b for b in moe_layers if within(b.name, name)] for name, _ in layers}
    tail = tail_rows(model.config, adapter)
    pruned = pruned_on_meta(model, adapter, keep, top_k)
    prefixes = [name for name, _ in layers]
    extra = mtp is not None and mtp.kept
    writer = CheckpointWriter(pruned, folder, shard_size, prefixes=prefixes,
                              extra=mtp.stand_ins(keep, top_k) if extra else ()) if folder is not None else None
    runs = dict(writer.runs) if writer is not None else {}  # layer name -> its run of the checkpoint
    plans: dict[str, LayerPlan] = {}
    done: set[str] = set()
    local: dict[str, dict] = {}
    fits: dict[str, dict] = {}
    before_recovery: dict[str, torch.Tensor] = {}
    fitting = MERGE_RULES[merge].fit
    seen: dict[str, list] = {b.name: [] for b in moe_layers}  # --merge fit, --recover-local: each block's calls
    captured: dict[str, list] = {}
    targets: dict[str, list] = {}
    # each block's calls: (args, kwargs, output); the output only where --recover-local trains on it
    hooks = [model.get_submodule(b.name).register_forward_hook(
        lambda module, args, kwargs, out, name=b.name: seen[name].append((args, kwargs, out if recover_local else None)),
        with_kwargs=True) for b in moe_layers] if (recover_local or fitting) else []
    # --merge fit: the original experts' routed output of each call, the fit's target (taken in the
    # visit, so the fit does not run the original block again)
    routed: dict[str, list] = {b.name: [] for b in moe_layers}
    hooks += [b.experts.register_forward_hook(lambda module, args, out, name=b.name: routed[name].append(out))
              for b in moe_layers] if fitting else []

    def after_layer(visit: Visit):
        done.add(visit.name)  # a second visit is refused before it runs (sequential.run_layers)
        for b in blocks[visit.name]:  # the calls its blocks made in this visit (what runs again appends anew)
            captured[b.name], seen[b.name] = seen[b.name], []
            targets[b.name], routed[b.name] = routed[b.name], []
        state = {f"{visit.name}.{k}": v for k, v in visit.layer.state_dict().items()}
        for block in blocks[visit.name]:
            stats = visit.stats[block.name]
            if gather is not None:
                gather(stats)
            plans[block.name] = plan(block.name, stats)
            names = layer_tensor_names(block, adapter)
            check_layer(block, {n: state[n].shape for n in names}, adapter, tail)
            state.update(rewrite_layer(block, {n: state[n] for n in names}, plans[block.name], adapter, merge=merge,
                                       router_rule=router_rule, stats=stats, tail=tail))
        module = None
        if blocks[visit.name] and (through == "pruned" or recover_local or fitting):
            module = pruned.get_submodule(visit.name)
            prefix = visit.name + "."
            _materialised(module, {k[len(prefix):]: v for k, v in state.items()}, visit.layer, visit.device)
            # what follows runs the pruned layer only: the original's weights go now (the fit's memory
            # comes out of theirs)
            _to_meta(visit.layer)
        if fitting and module is not None:
            _fitted(visit)
        if recover_local and module is not None:
            _recovered(visit)
        if module is not None:  # what the writer and the next layer get: the layer as fitted, trained
            state = {f"{visit.name}.{k}": v.detach() for k, v in module.state_dict().items()}
        for b in blocks[visit.name]:
            captured.pop(b.name, None)
            targets.pop(b.name, None)
            seen[b.name] = []
            routed[b.name] = []
        if writer is not None:
            run = runs.get(visit.name)
            if run is None or set(run) != set(state):
                raise UncurlError(f"{family}: the tensors of decoder layer {visit.name} are not one run of the "
                                  f"checkpoint, so it cannot be written layer by layer: use --pipeline whole")
            writer.write(state)
        outputs = visit.run(module) if through == "pruned" and module is not None else None
        if module is not None:
            _to_meta(module)
        del state
        _to_meta(visit.layer)  # consumed: resident weights freed too (offloaded ones go back to meta anyway)
        return outputs

    def _fitted(visit: Visit) -> None:
        """--merge fit: the layer's pruned blocks' down projections fitted (in place) to the original
        blocks' outputs on the calls the original blocks made in this visit (``fit.fit_blocks``)."""
        from .fit import fit_blocks, identity_plan

        names = [b.name for b in blocks[visit.name] if not identity_plan(plans[b.name], b.num_experts)]
        if not names:
            return

        def source(fn, label):
            for name in names:
                ys = targets[name]
                for i, ((args, kwargs, _), mask) in enumerate(zip(captured[name], visit.masks)):
                    y, ys[i] = ys[i], None  # the fit keeps its residual instead (kept=True)
                    fn(name, args, kwargs, y, mask)
                    del y

        fits.update(fit_blocks(model, pruned, adapter, names, source, reduce=reduce, kept=True, memory=fit_memory))

    def _recovered(visit: Visit) -> None:
        """--recover-local: each of the layer's pruned blocks trained (in place) on its original's calls."""
        from .recover import recover_block, trainable

        params = trainable(pruned, adapter, recover_experts)
        for b in blocks[visit.name]:
            calls = [(a, k, out[0] if isinstance(out, (tuple, list)) else out, m)
                     for (a, k, out), m in zip(captured[b.name], visit.masks)]
            mine = {n: p for n, p in params.items() if n.startswith(b.name + ".")}
            experts = {n for n in mine if f".{adapter.experts_attr}." in n}
            saved = {} if experts else {n: p.detach().to("cpu", copy=True) for n, p in mine.items()}
            local[b.name] = recover_block(pruned.get_submodule(b.name), mine, calls, steps=recover_local,
                                          seed=seed + b.index, expert_names=experts)
            if local[b.name]["kept"]:
                before_recovery.update(saved)

    def after_mtp(session) -> None:
        """The MTP blocks, still loaded and run on every batch: planned, merged (fitted), written."""
        from .fit import Replay, fit_blocks, identity_plan

        mtp.merge = merge
        for block in mtp.blocks:
            stats = session.stats[block.name]
            if gather is not None:
                gather(stats)
            plans[block.name] = plan(block.name, stats)
            shell = mtp.pruned(block, plans[block.name], merge=merge, router_rule=router_rule, stats=stats, top_k=top_k)
            if fitting and not identity_plan(plans[block.name], stats.num_experts):
                inner = block.moe().name
                replay = Replay(block.shell, adapter, [inner])  # the original block's calls, run again per sweep

                def source(fn, label, block=block, replay=replay):
                    replay.fn = fn
                    session.replay(block, replay)

                try:
                    fit = fit_blocks(block.shell, shell, adapter, [inner], source, reduce=reduce, memory=fit_memory)
                finally:
                    replay.close()
                fits[block.name] = fit[inner]
            if writer is not None:
                writer.write(block.state(shell))
            del shell

    def after_all():
        missing = [b.name for name, _ in layers if name not in done for b in blocks[name]]
        if missing:
            raise UncurlError(f"{family}: the forward never ran the decoder layers of {missing[:3]}, so they cannot be "
                              f"planned from the calibration text")
        if writer is None:
            return
        state = model.state_dict()
        for key, run in writer.runs:  # outside the decoder layers (and layers without weights run)
            if key not in done:
                writer.write({name: read_tensor(model, name, state[name]) for name in run})

    try:
        profile = run_layers(model, tokenizer, adapter, texts, batch_size=batch_size, max_length=max_length,
                             progress=progress, meta=meta, seed=seed, text_ids=text_ids, after_layer=after_layer,
                             after_all=after_all, rerun=through == "pruned", label="pruning layer by layer",
                             mtp=mtp if extra else None, after_mtp=after_mtp)
    finally:
        for hook in hooks:
            hook.remove()
        if writer is not None:
            writer.close()
    if extra:
        set_mtp_count(pruned.config, adapter, mtp.count)
    if writer is not None:
        writer.finish(pruned.config, getattr(pruned, "generation_config", None))
    return LayerwiseResult(profile, plans, pruned, local, fits, before_recovery)
