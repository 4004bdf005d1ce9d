"""A test utility: every torch op run under ``SameDevice()`` must have its tensor operands on one device.

    with SameDevice() as mode:
        profile_sequential(model, ...)          # raises at the first op that mixes devices, naming it
    mode.checked                                # how many ops it looked at

PyTorch raises on most mixed-device ops by itself, but only on a machine with the devices, only at
the first one, and not at all for a CPU index into a CUDA tensor (which it allows, synchronising).
Under this mode the rule is stricter (a mask or index must be on the device of the tensor it
indexes: ``uncurl.devices.on``), and the error names the op and the devices. On a CPU-only machine
the devices it can tell apart are the CPU and ``meta`` (an offloaded weight used without being
brought in first); on a GPU machine (``-m cuda``) every CUDA device and the CPU.

Allowed: moves between devices (``to``, ``cpu``, ``cuda``, ``copy_``, ``pin_memory``), and CPU
scalars (0-d tensors) beside tensors elsewhere, as PyTorch allows them.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.copy_, torch.Tensor.pin_memory,
         torch.Tensor.is_pinned, torch.Tensor.data.__set__, torch.Tensor.set_}


class MixedDevices(AssertionError):
    pass


class SameDevice(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MOVES:
            leaves, _ = tree_flatten((args, kwargs))
            devices = {t.device for t in leaves if isinstance(t, torch.Tensor)
                       and not (t.dim() == 0 and t.device.type == "cpu")}
            self.checked += 1
            if len(devices) > 1:
                name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
                raise MixedDevices(f"{name} mixes tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)
