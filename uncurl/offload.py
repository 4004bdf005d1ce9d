"""Weights that accelerate offloads to CPU or disk under ``--device-map`` (a model larger than the GPUs).

accelerate leaves an offloaded parameter on the ``meta`` device and attaches an
``AlignDevicesHook`` to its module; the hook's ``weights_map`` holds the real tensor (in CPU memory,
or memory-mapped from the offload folder) and copies it to the execution device for each forward.
Profiling and evaluation therefore just work. Merging and saving need the tensors themselves:

- ``read_tensor`` fetches one tensor by state-dict name, from the module or from its hook, so a
  layer's experts are read (and, from disk, paged in) one tensor at a time;
- ``transplant_hooks`` gives a rewritten model the original's placement: unchanged modules get a
  hook over the same offloaded weights (nothing is copied), merged modules get a hook that offloads
  their new, smaller tensors to CPU memory.

Without offload (one device, or every layer on some GPU) these functions are pass-throughs.
"""

from __future__ import annotations

import torch


def _owner(model, name: str):
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner), attr


def is_offloaded(model) -> bool:
    return any(t.device.type == "meta" for t in model.state_dict().values())


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
    return weights[attr]


def drop_offloaded(model, name: str) -> None:
    """Forget the offloaded copy of ``name`` when it lives in CPU memory (frees it once merged)."""
    module, attr = _owner(model, name)
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    store = getattr(getattr(weights, "dataset", None), "state_dict", None)  # PrefixedDataset -> loader
    if isinstance(store, dict):
        store.pop(f"{weights.prefix}{attr}", None)


def transplant_hooks(original, new, merged_modules: set[str]) -> None:
    """Give ``new`` the device placement of ``original`` (module names are the same)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for name, module in original.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            continue
        if not isinstance(hook, AlignDevicesHook):
            raise RuntimeError(f"unsupported accelerate hook {type(hook).__name__} on {name or 'the model'}")
        target = new.get_submodule(name) if name else new
        merged = name in merged_modules and hook.offload
        add_hook_to_module(target, AlignDevicesHook(
            execution_device=hook.execution_device,
            offload=hook.offload,
            io_same_device=hook.io_same_device,
            # merged tensors are real: the new hook moves them into its own CPU weights map
            weights_map=None if merged else hook.weights_map,
            offload_buffers=hook.offload_buffers,
            place_submodules=hook.place_submodules,
            skip_keys=hook.skip_keys,
            tied_params_map=hook.tied_params_map,
        ))
    if getattr(original, "hf_device_map", None) is not None:
        new.hf_device_map = dict(original.hf_device_map)
