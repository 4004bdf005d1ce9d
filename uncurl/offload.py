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
import logging
import weakref
from collections.abc import Mapping
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


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


# --- disk offload straight from the checkpoint -------------------------------------------------
#
# transformers re-saves every weight that --device-map sends to disk and that a conversion changes on
# loading (most MoE checkpoints: per-expert tensors on disk, one stacked tensor per layer in the model)
# into the offload folder: a second write and a second read of most of a model larger than memory,
# and as much temporary disk as the model itself. ``from_source`` instead leaves those weights
# unread at load (meta tensors through the conversion, which only stacks and concatenates) and notes
# where each comes from; ``SourceLoader`` reads them from the checkpoint's own files when they are
# needed, and replays the same conversion.

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_sources(sources: list[tuple[str, list[tuple[str, str]]]]) -> dict[str, list[torch.Tensor]]:
    """{source pattern: [tensors]} read from (file, name) pairs with ``pread`` (no mapping of the
    file: nothing lands in the process's resident set but the tensors themselves)."""
    from safetensors import safe_open

    files = {file for _, names in sources for file, _ in names}
    handles = {file: safe_open(file, framework="pt", device="cpu", backend="pread") for file in files}
    try:
        out = {pattern: [handles[file].get_tensor(name) for file, name in names] for pattern, names in sources}
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return out  # counted in READS by whoever fetched the result (_fetch)


def read_source(info: dict, key: str) -> torch.Tensor:
    """One offloaded weight, made from the checkpoint's own tensors as transformers made it at load."""
    import copy
    from collections import defaultdict

    converter = info.get("converter")
    if converter is not None and _stacks_only(converter):
        return _read_stacked(info, converter)
    tensors = _read_sources(info["uncurl_sources"])
    if converter is None:  # renamed only
        (tensor,) = next(iter(tensors.values()))
    else:
        converter = copy.deepcopy(converter)
        converter.collected_tensors = defaultdict(list, tensors)
        tensor = converter.convert(info["layer_name"], config=info.get("config"))[key]
        tensor = tensor[0] if isinstance(tensor, list) else tensor
    return tensor.to(getattr(torch, info["dtype"])).contiguous()


def _stacks_only(converter) -> bool:
    """Whether ``converter`` only stacks each source pattern's tensors (MergeModulelist on dim 0), then
    maybe concatenates the stacks along a later dim: a layer's experts, as most MoE families load them."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = getattr(converter, "operations", None) or []
    return (len(converter.target_patterns) == 1 and len(ops) in (1, 2) and type(ops[0]) is MergeModulelist
            and ops[0].dim == 0 and (len(ops) == 1 or (type(ops[1]) is Concatenate and ops[1].dim >= 1)))


def _read_stacked(info: dict, converter) -> torch.Tensor:
    """What ``converter`` makes of the sources, each read straight into its place in the result: the
    layer's stacked tensor plus one source tensor in memory (stacking a read list, then concatenating
    the stacks, would hold up to three copies)."""
    from safetensors import safe_open

    sources = dict(info["uncurl_sources"])
    patterns = [p for p in converter.source_patterns if p in sources]
    if len(patterns) > 1 and len(converter.operations) == 1:
        raise RuntimeError(f"{info['layer_name']}: several stacks and no concatenation")
    handles = {}
    try:
        def handle(file):
            if file not in handles:
                handles[file] = safe_open(file, framework="pt", device="cpu", backend="pread")
            return handles[file]

        shapes = [[len(sources[p]), *handle(sources[p][0][0]).get_slice(sources[p][0][1]).get_shape()] for p in patterns]
        dim = converter.operations[1].dim if len(converter.operations) == 2 else 0
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes) if len(patterns) > 1 else shape[dim]
        out = torch.empty(shape, dtype=getattr(torch, info["dtype"]))
        offset = 0
        for p, s in zip(patterns, shapes):
            part = out.narrow(dim, offset, s[dim]) if len(patterns) > 1 else out
            offset += s[dim]
            for j, (file, name) in enumerate(sources[p]):
                part[j].copy_(handle(file).get_tensor(name))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return out


def _source_loader_class():
    from accelerate.utils import OffloadedWeightsLoader

    class SourceLoader(OffloadedWeightsLoader):
        """accelerate's loader, reading ``from_source`` entries from the checkpoint itself."""

        def __getitem__(self, key: str):
            if key not in self.state_dict:
                info = self.index.get(key)
                if isinstance(info, dict) and "uncurl_sources" in info:
                    return read_source(info, key)
            return super().__getitem__(key)

    return SourceLoader


# The internals of transformers.core_model_loading that from_source wraps, by the parameters it
# passes them (read off transformers 5.23); a release where any differs loads as transformers does.
_SOURCE_HOOKS = {
    "get_device": ("device_map", "param_name", "valid_torch_device"),
    "spawn_materialize": ("thread_pool", "tensor", "device", "dtype", "sharding_op", "tensor_idx"),
    "offload_and_maybe_resave_param": ("target_name", "param", "loading_info", "disk_offload_folder",
                                       "disk_offload_index", "applied_ops"),
    "set_param_for_module": ("model", "target_name", "param_value"),
}


def source_loading_fits(cml) -> bool:
    """Whether ``cml`` (transformers.core_model_loading) has the functions ``from_source`` wraps,
    with the parameters it passes them."""
    import inspect

    try:
        for name, params in _SOURCE_HOOKS.items():
            have = list(inspect.signature(getattr(cml, name)).parameters)
            if have[:len(params)] != list(params):
                return False
        add = list(inspect.signature(cml.WeightTransform.add_tensor).parameters)
        return add[:5] == ["self", "target_key", "source_key", "source_pattern", "future"] and \
            hasattr(cml, "WeightConverter")
    except (AttributeError, TypeError, ValueError):
        return False


@contextmanager
def from_source(files_of: dict[str, str], config):
    """Around ``from_pretrained(None, state_dict=<safetensors slices>, device_map=...)``: weights bound
    for ``disk`` are not read nor re-saved; their offload index entries name the checkpoint tensors
    they come from (``files_of``: tensor name -> its file). Yields a list that gets the model's
    loaders swapped to ``SourceLoader`` by ``install_source_loaders``."""
    from transformers import core_model_loading as cml

    if not source_loading_fits(cml):  # another transformers release: its own path (re-saved to the folder)
        log.info("transformers %s loads offloaded weights its own way: they are re-saved to the offload folder",
                 getattr(__import__("transformers"), "__version__", "?"))
        yield
        return
    order: dict[int, dict] = {}  # id(transform) -> its first target, its sources by pattern in load order
    by_target: dict[str, object] = {}  # first target -> its transform
    originals = (cml.get_device, cml.spawn_materialize, cml.offload_and_maybe_resave_param, cml.set_param_for_module,
                 cml.WeightTransform.add_tensor)
    get_device, spawn, offload, set_param, add_tensor = originals
    on_disk_marker = "uncurl:disk"

    def get_device_(device_map, name, valid_torch_device=False):
        device = get_device(device_map, name)
        if valid_torch_device and device == "disk":
            return on_disk_marker  # seen only by spawn_ below
        return get_device(device_map, name, valid_torch_device)

    def spawn_(thread_pool, tensor, device=None, dtype=None, sharding_op=None, tensor_idx=None):
        if device == on_disk_marker:
            kind = _SAFETENSORS_DTYPES.get(tensor.get_dtype()) if hasattr(tensor, "get_dtype") else None
            if sharding_op is None and kind is not None:
                shape = tuple(tensor.get_shape())

                def job():
                    return torch.empty(shape, dtype=dtype or kind, device="meta")

                return thread_pool.submit(job) if thread_pool is not None else job
            device = "cpu"
        return spawn(thread_pool, tensor, device, dtype, sharding_op=sharding_op, tensor_idx=tensor_idx)

    def add_tensor_(self, target_key, source_key, source_pattern, future):
        seen = order.setdefault(id(self), {"layer_name": target_key, "sources": {}})
        seen["sources"].setdefault(source_pattern, []).append(source_key)
        by_target.setdefault(target_key, self)
        return add_tensor(self, target_key, source_key, source_pattern, future)

    def entry(transform, param) -> dict:
        seen = order[id(transform)]
        return {"uncurl_sources": [(p, [(files_of[k], k) for k in keys]) for p, keys in seen["sources"].items()],
                "converter": transform if isinstance(transform, cml.WeightConverter) else None,
                "layer_name": seen["layer_name"], "config": config, "dtype": str(param.dtype).removeprefix("torch.")}

    def offload_(target_name, param, loading_info, folder, index, applied_ops):
        if param.device.type != "meta":  # read at load after all (e.g. a force_cpu conversion): re-saved
            return offload(target_name, param, loading_info, folder, index, applied_ops)
        loading_info.missing_keys.discard(target_name)
        index[target_name] = entry(applied_ops, param)
        return index

    def set_param_(model, target_name, param, *args, **kwargs):
        if param.device.type == "meta" and target_name in by_target:  # a buffer of a module sent to disk: kept
            param = read_source(entry(by_target[target_name], param), target_name)
        return set_param(model, target_name, param, *args, **kwargs)

    cml.get_device, cml.spawn_materialize, cml.offload_and_maybe_resave_param, cml.set_param_for_module = (
        get_device_, spawn_, offload_, set_param_)
    cml.WeightTransform.add_tensor = add_tensor_
    try:
        yield
    finally:
        cml.get_device, cml.spawn_materialize, cml.offload_and_maybe_resave_param, cml.set_param_for_module = (
            originals[:4])
        cml.WeightTransform.add_tensor = originals[4]


def install_source_loaders(model) -> int:
    """Swap accelerate's loaders holding ``from_source`` entries to ``SourceLoader``; how many."""
    cls, done = None, set()
    for module in model.modules():
        loader = getattr(getattr(getattr(module, "_hf_hook", None), "weights_map", None), "dataset", None)
        index = getattr(loader, "index", None)
        if loader is None or id(loader) in done or not isinstance(index, dict):
            continue
        if any(isinstance(v, dict) and "uncurl_sources" in v for v in index.values()):
            cls = cls or _source_loader_class()
            loader.__class__ = cls
            done.add(id(loader))
    return len(done)
