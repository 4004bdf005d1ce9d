"""Where tensors live: one rule for every op that mixes tensors from two places.

    PYTHONPATH=. pytest tests/test_devices.py      # the rules on CPU; `-m cuda` on a GPU machine

Under ``--device-map`` each decoder layer runs on its own device (``cuda:0``, ``cuda:1``, the CPU),
while the batch (token ids, the attention mask, the masks of its non-padding rows) is made on the
input device (the embedding's). So the rule, by construction:

- ``on(t, like)``: a mask or an index is moved to the device of the tensor it indexes (or that it
  is combined with), at the op, never assumed to be there. ``Masks`` keeps one copy per device of a
  batch's mask, so each layer's device gets it once.
- ``Ambient``: the driver thread's CUDA device and stream, captured where a run starts and entered
  in every worker thread (the sequential driver's per-batch threads): a thread starts on CUDA's
  default device and stream otherwise, so with ``--device cuda:1``, or at torchrun rank >= 1, its
  work would land on GPU 0. Nothing on a CPU-only machine.
- ``Parking``: what the sequential driver holds for each batch between two layers (hidden states,
  position embeddings, masks: the floating tensors of a layer call's arguments) kept in CPU memory,
  pinned, while the batch waits, instead of on the execution device, when the device cannot hold
  them all (llm-compressor's ``IntermediatesCache`` offloads its activations to the CPU the same
  way). The tensors are moved in place (``t.data``), so every reference the model's own forward
  keeps to them is moved too and the device memory is freed; each layer call moves its arguments
  to the layer's device (``sequential.Call.run``).
- ``used_devices``: every device a (possibly dispatched) model executes on; serving measurements
  synchronise and read the peak of each.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def device_of(like) -> torch.device:
    """``like``'s device: a tensor's, or ``like`` itself as a device."""
    return like.device if isinstance(like, torch.Tensor) else torch.device(like)


def on(t: torch.Tensor | None, like) -> torch.Tensor | None:
    """``t`` on the device of ``like`` (a tensor or a device): a mask or index moved to the tensor it
    indexes. ``t`` itself when it is already there (or None)."""
    if t is None:
        return None
    device = device_of(like)
    return t if t.device == device else t.to(device)


class Masks:
    """One batch's mask (or index), with a copy per device it was asked for (each layer's device
    gets it once per batch, not once per op)."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask
        self.copies: dict[torch.device, torch.Tensor] = {}

    def on(self, like) -> torch.Tensor | None:
        if self.mask is None:
            return None
        device = device_of(like)
        if self.mask.device == device:
            return self.mask
        if device not in self.copies:
            self.copies[device] = self.mask.to(device)
        return self.copies[device]

    def numel(self) -> int:
        return 0 if self.mask is None else self.mask.numel()


# ---- CUDA device and stream, carried into worker threads -------------------------------------------

@dataclass(frozen=True)
class Ambient:
    """The CUDA device index and stream current in the thread that captured it (None on a machine
    without CUDA)."""

    device: int | None = None
    stream: object | None = None

    @classmethod
    def capture(cls) -> "Ambient":
        if not torch.cuda.is_available():
            return cls()
        return cls(torch.cuda.current_device(), torch.cuda.current_stream())

    @contextlib.contextmanager
    def entered(self):
        """This device and stream current for the duration, in the calling thread (no-op without CUDA)."""
        if self.device is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield


# ---- hidden states parked in (pinned) CPU memory -----------------------------------------------

STATES_SHARE = 0.5  # park when the states would take more than this share of the device's free memory


def _tensors(value, seen: dict):
    """Every tensor in ``value`` (tuples, lists, dicts, dataclass-like outputs), each once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen[id(value)] = value
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, seen)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, seen)
    return seen


def parkable(t: torch.Tensor) -> bool:
    """A tensor the driver may move off the device while its batch waits: floating point, at least
    two axes (hidden states, position embeddings, 4-d masks), not a parameter, on an accelerator.
    Token ids and 2-d integer masks stay (a batch's own inputs are read again after the forward)."""
    return (t.is_floating_point() and t.dim() >= 2 and not isinstance(t, torch.nn.Parameter)
            and t.device.type not in ("cpu", "meta"))


def held_bytes(values) -> dict[torch.device, int]:
    """Bytes of the parkable tensors in ``values`` by device (a storage shared by views counted once)."""
    sizes: dict[torch.device, int] = {}
    storages = set()
    for t in _tensors(values, {}).values():
        if not parkable(t):
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key in storages:
            continue
        storages.add(key)
        sizes[t.device] = sizes.get(t.device, 0) + t.untyped_storage().nbytes()
    return sizes


def should_park(held: dict[torch.device, int], free: dict[torch.device, int | None],
                share: float = STATES_SHARE) -> bool:
    """Whether states of ``held`` bytes per device cannot stay there: on some device they would take
    more than ``share`` of its free memory (the rest is for one layer's weights and its work)."""
    return any(free.get(d) is not None and n > share * free[d] for d, n in held.items())


def _free(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


class Parking:
    """Where the sequential driver keeps each batch's tensors between two layers.

    ``mode``: ``device`` (they stay where the model computed them), ``cpu`` (always parked in CPU
    memory, pinned when CUDA is present), ``auto`` (parked once, at the first layer, the states all
    batches hold are found not to fit: ``should_park`` against the device's free memory)."""

    MODES = ("auto", "device", "cpu")

    def __init__(self, mode: str = "auto", copies: int = 1):
        if mode not in self.MODES:
            raise ValueError(f"parking mode {mode!r}: one of {', '.join(self.MODES)}")
        self.mode = mode
        self.copies = copies  # how many batches' states a run holds at once (their number; twice with a rerun)
        self.active = mode == "cpu"
        self.decided = mode != "auto"
        self.parked_bytes = 0

    def arrived(self, value) -> None:
        """A batch stopped at a layer with the arguments ``value``: with ``auto``, the first batch
        decides (its states times ``copies`` against the free memory), then every batch is parked."""
        if not self.decided:
            self.decide(value)
        self.park(value)

    def decide(self, value) -> None:
        """Whether ``copies`` times the states of ``value`` (one batch's) fit where they are."""
        self.decided = True
        held = {d: n * self.copies for d, n in held_bytes(value).items()}
        free = {d: _free(d) for d in held}
        self.active = should_park(held, free)
        if self.active:
            log.info("hidden states between layers (%s) kept in CPU memory: the device cannot hold them (%s free)",
                     {str(d): n for d, n in held.items()}, {str(d): n for d, n in free.items()})

    def park(self, value) -> None:
        """The parkable tensors in ``value`` moved to CPU memory in place (every reference follows)."""
        if not self.active:
            return
        pin = torch.cuda.is_available()
        for t in _tensors(value, {}).values():
            if parkable(t):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                host.copy_(t)
                self.parked_bytes += host.nbytes
                t.data = host


def used_devices(model) -> list[torch.device]:
    """Every device ``model`` executes on: its tensors' devices and, under accelerate, its hooks'
    execution devices (offloaded weights sit on the meta device; they run on the hook's)."""
    found: dict[str, torch.device] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            found.setdefault(str(t.device), t.device)
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            d = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
            found.setdefault(str(d), d)
    return sorted(found.values(), key=str)
