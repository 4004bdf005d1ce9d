"""Weights that accelerate offloads to CPU or disk under ``--device-map`` (a model larger than the GPUs).

accelerate leaves an offloaded parameter on the ``meta`` device and attaches an
``AlignDevicesHook`` to its module; the hook's ``weights_map`` holds the real tensor (in CPU memory,
or in the offload folder, read on demand) and copies it to the execution device for each forward.
Profiling and evaluation therefore just work. Merging and saving need the tensors themselves:

- ``read_tensor`` fetches one tensor by state-dict name, from the module or from its hook, so a
  layer's experts are read (and, from disk, paged in) one tensor at a time;
- ``Spill`` writes the merged tensors of a layer that was offloaded to disk to a private folder
  as they are made (accelerate's own format), so they never accumulate in memory;
- ``transplant_hooks`` gives a rewritten model the original's placement: unchanged modules get a
  hook over the same offloaded weights (nothing is copied), merged modules a hook over their new,
  smaller tensors (spilled to disk, or kept in CPU memory when the original was there).

- ``reach_children`` has a router's hook bring in the router's children too, for a router whose
  forward reads a child's weight without calling the child (longcat_flash).

- ``onloaded`` brings a module's offloaded weights onto its execution device once and keeps them
  there for a while (its hook told not to offload), so a layer runs over many batches with its
  weights read once (``sequential.py``), then puts them back on ``meta``.

Every offloaded tensor these functions read is counted in ``READS`` (bytes and tensors), and
``counting(model)`` counts accelerate's own per-forward reads too, so both pipelines can be
measured alike (tests, ``make bench``).

Without offload (one device, or every layer on some GPU) these functions are pass-throughs.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Mapping
from contextlib import contextmanager

import torch


class Reads:
    """Bytes and tensors of offloaded weights read (from CPU memory or disk) since ``reset``."""

    def __init__(self):
        self.bytes = self.tensors = 0

    def reset(self) -> None:
        self.bytes = self.tensors = 0

    def add(self, tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            self.bytes += tensor.numel() * tensor.element_size()
            self.tensors += 1


READS = Reads()


def _fetch(weights, key: str) -> torch.Tensor:
    """``weights[key]`` (an accelerate weights map), counted in ``READS``."""
    if isinstance(weights, _Counted):  # counted here, once
        weights = weights.weights
    tensor = weights[key]
    READS.add(tensor)
    return tensor


def dispatched(model) -> bool:
    """Whether accelerate placed ``model`` (its hooks make modules self-referencing, so only a
    garbage collection frees it; a plain model is freed as soon as its last reference goes)."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


def offloaded_bytes(model) -> int:
    """Bytes of ``model``'s weights accelerate left offloaded (on ``meta`` behind its hooks): 0 for a
    model in memory or on its devices."""
    if not dispatched(model):
        return 0
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device.type == "meta")


def _owner(model, name: str):
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner), attr


def _store(model, name: str):
    """(loader, full key) of accelerate's offloaded weights holding ``name``, or (None, None)."""
    module, attr = _owner(model, name)
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    loader = getattr(weights, "dataset", None)  # PrefixedDataset -> OffloadedWeightsLoader
    if loader is None:
        return None, None
    return loader, f"{weights.prefix}{attr}"


def _in_memory(loader) -> dict:
    """The CPU-memory part of a weights store: an OffloadedWeightsLoader's state dict, or the
    plain dict ``cpu_offload`` uses."""
    return loader if isinstance(loader, dict) else getattr(loader, "state_dict", {})


def on_disk(model, name: str) -> bool:
    loader, key = _store(model, name)
    return loader is not None and key not in _in_memory(loader) and key in getattr(loader, "index", {})


def read_tensor(model, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """``model.state_dict()[name]``, fetched from accelerate's offload when it is on ``meta``."""
    if tensor is None:
        tensor = model.state_dict()[name]
    if tensor.device.type != "meta":
        return tensor
    module, attr = _owner(model, name)
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise RuntimeError(f"{name} is on the meta device and no accelerate hook holds its weights")
    return _fetch(weights, attr)


def drop_offloaded(model, name: str) -> None:
    """Forget the offloaded copy of ``name`` when it lives in CPU memory (frees it once merged)."""
    loader, key = _store(model, name)
    if loader is not None:
        _in_memory(loader).pop(key, None)


def _offloading(module):
    hook = getattr(module, "_hf_hook", None)
    return hook if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None else None


def reach_children(modules) -> None:
    """Have the offload hook of each of ``modules`` bring in the module's whole subtree for its
    forward, not only its own tensors.

    accelerate hooks every module that holds tensors of its own, and each hook brings in only that
    module's tensors. A forward that reads a child's weight without calling the child therefore
    computes with a tensor still on ``meta``: longcat_flash's router does ``self.classifier.weight``.
    Its logits were then garbage, NaN now and then. Meant for the MoE routers, which are small; a
    child's own hook still works when the child is called."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for module in modules:
        hook = _offloading(module)
        if hook is None or hook.place_submodules or not any(True for c in module.children() for _ in c.parameters()):
            continue
        add_hook_to_module(module, AlignDevicesHook(
            execution_device=hook.execution_device, offload=True, io_same_device=hook.io_same_device,
            weights_map=hook.weights_map, offload_buffers=hook.offload_buffers, place_submodules=True,
            skip_keys=hook.skip_keys, tied_params_map=hook.tied_params_map))


class Onload:
    """Modules whose offloaded weights were brought onto their execution device once (``add``),
    their hooks set not to offload, until ``release`` puts the weights back on ``meta``."""

    def __init__(self):
        self.modules: list[tuple[torch.nn.Module, object, list[str]]] = []

    def add(self, module, recurse: bool = True) -> None:
        """``module`` and (``recurse``) every offloading module inside it, weights read once each
        (``READS``); a module already held is skipped."""
        from accelerate.utils import set_module_tensor_to_device
        from accelerate.utils.modeling import named_module_tensors

        for sub in module.modules() if recurse else [module]:
            hook = _offloading(sub)
            if hook is None:
                continue
            names = [name for name, _ in named_module_tensors(sub, include_buffers=hook.offload_buffers,
                                                              recurse=hook.place_submodules, remove_non_persistent=True)]
            for name in names:
                set_module_tensor_to_device(sub, name, hook.execution_device, value=_fetch(hook.weights_map, name))
            hook.offload = False
            self.modules.append((sub, hook, names))

    def release(self) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for sub, hook, names in reversed(self.modules):
            for name in names:
                set_module_tensor_to_device(sub, name, "meta")
            hook.offload = True
        self.modules = []


@contextmanager
def onloaded(module):
    """``module``'s offloaded weights on its execution device for the duration, read once."""
    held = Onload()
    try:
        held.add(module)
        yield
    finally:
        held.release()


class _Counted(Mapping):
    """A hook's weights map whose reads are counted in ``READS``."""

    def __init__(self, weights):
        self.weights = weights

    def __getitem__(self, key):
        return _fetch(self.weights, key)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)

    def __getattr__(self, name):  # dataset, prefix, ... of accelerate's PrefixedDataset
        return getattr(self.__dict__["weights"], name)


@contextmanager
def counting(model):
    """accelerate's own reads of ``model``'s offloaded weights (each forward) counted in ``READS``
    too, for the duration: what a whole-model pass reads, measured as uncurl's reader is."""
    hooks = [h for m in model.modules() if (h := _offloading(m)) is not None]
    for hook in hooks:
        hook.weights_map = _Counted(hook.weights_map)
    try:
        yield READS
    finally:
        for hook in hooks:
            if isinstance(hook.weights_map, _Counted):
                hook.weights_map = hook.weights_map.weights


class Spill:
    """Merged tensors of disk-offloaded layers, written to a private folder instead of kept in RAM.

    The folder goes away with the model that reads from it (``attach``), or at exit."""

    def __init__(self):
        self.folder: str | None = None
        self.index: dict = {}

    def put(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Write ``tensor`` under ``name``; return a ``meta`` stand-in of the same shape and dtype."""
        from accelerate.utils import offload_weight

        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="uncurl-merged-")
        offload_weight(tensor, name, self.folder, index=self.index)
        return torch.empty_like(tensor, device="meta")

    def weights_map(self, module_name: str):
        from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

        prefix = f"{module_name}."
        if not any(key.startswith(prefix) for key in self.index):
            return None
        return PrefixedDataset(OffloadedWeightsLoader(save_folder=self.folder, index=self.index), prefix)

    def attach(self, model) -> None:
        if self.folder is not None:
            weakref.finalize(model, shutil.rmtree, self.folder, True)


class _Overlay(Mapping):
    """A merged module's weights map: its merged tensors first, the rest from the original's."""

    def __init__(self, merged, original):
        self.merged, self.original = merged, original

    def __getitem__(self, key):
        return self.merged[key] if key in self.merged else self.original[key]

    def __iter__(self):
        return iter(dict.fromkeys([*self.merged, *(self.original or ())]))

    def __len__(self):
        return sum(1 for _ in self)


def transplant_hooks(original, new, merged_modules: set[str], spill: Spill | None = None) -> None:
    """Give ``new`` the device placement of ``original`` (module names are the same)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for name, module in original.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            continue
        if not isinstance(hook, AlignDevicesHook):
            raise RuntimeError(f"unsupported accelerate hook {type(hook).__name__} on {name or 'the model'}")
        target = new.get_submodule(name) if name else new
        weights = hook.weights_map
        # a hook that brings in its children (reach_children) needs their merged tensors too
        below = hook.place_submodules and any(m.startswith(f"{name}.") for m in merged_modules)
        if (name in merged_modules or below) and hook.offload:
            # merged tensors: spilled to disk, else the module's real tensors (kept in CPU memory);
            # the module's other tensors (gemma4's router.scale beside per_expert_scale) stay where they were
            own = spill.weights_map(name) if spill else None
            if own is None:
                own = {n: t.to("cpu") for n, t in target.state_dict(keep_vars=True).items() if t.device.type != "meta"}
            weights = _Overlay(own, hook.weights_map)
        add_hook_to_module(target, AlignDevicesHook(
            execution_device=hook.execution_device,
            offload=hook.offload,
            io_same_device=hook.io_same_device,
            weights_map=weights,
            offload_buffers=hook.offload_buffers,
            place_submodules=hook.place_submodules,
            skip_keys=hook.skip_keys,
            tied_params_map=hook.tied_params_map,
        ))
    if getattr(original, "hf_device_map", None) is not None:
        new.hf_device_map = dict(original.hf_device_map)
    if spill is not None:
        spill.attach(new)
