"""Layer by layer: each decoder layer runs over every calibration batch before the next.

    from uncurl.sequential import profile_sequential
    profile = profile_sequential(model, tokenizer, adapter, texts)   # == profile_model(...)

The driver a model larger than memory needs (each layer's weights read once, not once per batch;
``../shared/SCALE.md``). It gives the same ``Profile`` as ``profile.profile_model`` and records
with the same hooks (``profile._Recorder``); ``layerwise.py`` also merges and writes each layer
while it is on the device.

**How** (``drive``). Every calibration batch gets a thread of its own, which runs the model's own
forward on that batch. Each decoder layer's ``forward`` is replaced, for the duration, by a stand-in
that hands the call (its arguments, as the model computed them) to the driver and waits. Only one
thread runs at any time: the driver starts a thread, waits until it stops at a layer, starts the
next. When every batch waits at the same layer, the driver brings that layer's weights onto its
device once (``offload.onloaded``), runs the waiting calls through it one batch at a time
(``visit``), and hands each thread its output, which goes on to the next layer. After the last
layer each forward runs to its end as usual (final norm, the LM head on the last token only).

So the arguments every layer gets are the ones the model's own code computes between layers, on
that batch: rotary position embeddings, each layer's own mask, gemma4's per-layer inputs, zaya's
router states, glm_moe_dsa's shared top-k indices, or whatever a family does to the hidden states
between two layers. Nothing is assumed of a family beyond its MoE blocks being in one list of
decoder layers (else refused, with the reason), and each layer is computed exactly as in a
whole-model pass (same inputs, same code), so the statistics are the same. A layer the model calls
twice in one forward (a looped stack) is simply visited twice (its weights read twice); the batches
must all call the same layers in the same order (they run the same code), else the run is refused.

**Offloaded models** (``--device-map`` with CPU or disk offload): each decoder layer's weights are
read once for every batch; the modules outside the layers (embeddings, rotary, final norm, LM head)
once, on first use, and kept for the duration. A profile therefore reads the offloaded weights once,
whatever the number of batches (a whole-model pass: once per batch). Reads are counted in
``offload.READS``.

**The cache**: what the model holds for each batch between two layers (its hidden states, the
embeddings it started from, masks, position embeddings) stays where the model put it, on the
execution device. Each batch goes on as soon as its output is computed, so its layer input is
freed at once: about twice tokens x hidden x dtype bytes for the calibration set (the states and
the embeddings the forward keeps), three times with ``--calibrate-through pruned`` (the inputs
wait for the pruned layer), plus each batch's attention mask, beside one layer's weights. No disk
cache.

``--calibrate-through pruned`` (``layerwise.py``): the next layer's inputs come from the layer as
pruned, not from the original (``visit`` returns those outputs instead).
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .adapters import MoEAdapter, find_moe_layers, language_stack, top_k
from .devices import Ambient, Masks, Parking
from .errors import UncurlError
from .load import input_device
from .offload import Onload, onloaded
from .profile import _Recorder, check_text_ids, indexed_batches, progress_bar, token_positions
from .stats import Profile


def decoder_layers(model, adapter: MoEAdapter) -> list[tuple[str, nn.Module]]:
    """(name, module) of each decoder layer: the entries of the language stack's module list that
    holds every MoE block."""
    prefix, stack = language_stack(model, adapter)
    blocks = [layer.name for layer in find_moe_layers(model, adapter)]
    for name, child in stack.named_modules(prefix=prefix):
        if isinstance(child, nn.ModuleList) and all(b.startswith(name + ".") for b in blocks):
            return [(f"{name}.{i}", layer) for i, layer in enumerate(child)]
    raise UncurlError(f"{model.config.model_type}: its MoE blocks are not all in one list of decoder layers of "
                      f"{prefix or 'the model'}, so its layers cannot be profiled one at a time")


def within(block: str, layer: str) -> bool:
    """Whether MoE block ``block`` is decoder layer ``layer`` or inside it (gemma4's experts and
    router sit in the decoder layer itself)."""
    return block == layer or block.startswith(layer + ".")


@contextmanager
def _layers_replaced(layers: list[tuple[str, nn.Module]], make):
    """Each layer's ``forward`` replaced by ``make(index, layer)`` for the duration (an instance
    attribute; one set before, such as accelerate's, is put back)."""
    saved = [layer.__dict__.get("forward") for _, layer in layers]
    try:
        for i, (_, layer) in enumerate(layers):
            layer.forward = make(i, layer)
        yield
    finally:
        for (_, layer), before in zip(layers, saved):
            if before is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = before


def _forward(model, batch) -> None:
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1, use_cache=False)


class _Abort(BaseException):
    """Handed to a waiting thread when the drive ends early (an error, a signal): it unwinds."""


def _moved(value, device, memo: dict):
    """``value`` (tensors in tuples, lists, dicts) on ``device``; a tensor met twice is moved once."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        moved = [_moved(v, device, memo) for v in value]
        return type(value)(moved) if type(value) in (tuple, list) else type(value)(*moved)
    if isinstance(value, dict):
        return {k: _moved(v, device, memo) for k, v in value.items()}
    return value


def layer_device(layer: nn.Module) -> torch.device:
    """Where ``layer`` runs: its accelerate hook's execution device, else its first tensor's."""
    hook = getattr(layer, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    tensor = next((t for t in [*layer.parameters(), *layer.buffers()] if t.device.type != "meta"), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def _outer_onloaded(model, layers):
    """Modules outside the decoder layers (embeddings, rotary) with offloaded weights read once, on
    their first call, and kept on their device for the duration."""
    prefixes = tuple(name + "." for name, _ in layers)
    held, handles = Onload(), []
    for name, module in model.named_modules():
        if getattr(module, "_hf_hook", None) is not None and not (name + ".").startswith(prefixes):
            handles.append(module.register_forward_pre_hook(lambda m, args: held.add(m, recurse=False)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        held.release()


@dataclass
class Call:
    """One batch's call of a decoder layer, as the model's forward made it."""

    batch: int
    args: tuple
    kwargs: dict
    context: contextvars.Context  # the batch thread's (transformers keeps output collectors there)
    thread: "_Batch"
    answered: bool = False

    def run(self, forward, device) -> object:
        """``forward`` (a layer's own, or a stand-in module's) on this call's arguments, on ``device``."""
        args, kwargs = _moved((self.args, self.kwargs), device, {})
        return self.context.run(forward, *args, **kwargs)

    def answer(self, output, threads: int = 1) -> None:
        """Hand ``output`` to the batch's forward now (it goes on to its next layer call), and let go
        of the arguments: the layer's input states are freed before the next batch runs. ``threads``:
        torch's CPU threads meanwhile (``_Batch.resume``)."""
        self.args = self.kwargs = None
        self.answered = True
        self.thread.resume(output, threads)


_local = threading.local()


class _Batch(threading.Thread):
    """One batch's forward; it runs only between ``resume`` and its next layer call (or its end)."""

    def __init__(self, model, index: int, batch, baton: threading.Semaphore, work=None,
                 ambient: Ambient = Ambient(), parking: Parking | None = None):
        super().__init__(name=f"uncurl-batch-{index}", daemon=True)
        self.model, self.index, self.batch, self.baton = model, index, batch, baton
        self.work = work or _forward
        self.ambient, self.parking = ambient, parking  # the driver's CUDA device and stream; where states wait
        self.go = threading.Semaphore(0)
        self.call: tuple | None = None  # (layer index, Call) while it waits at a layer
        self.reply = None
        self.finished = False
        self.error: BaseException | None = None

    def run(self) -> None:
        _local.batch = self
        self.go.acquire()
        try:
            if not isinstance(self.reply, BaseException):
                with torch.no_grad(), self.ambient.entered():
                    self.work(self.model, self.batch)
        except BaseException as err:  # noqa: BLE001 - handed to the driver, which raises it
            self.error = err
        finally:
            self.call, self.finished = None, True
            self.baton.release()

    def wait(self, layer: int, args: tuple, kwargs: dict):
        """In this thread, at a layer call: hand it to the driver, wait for its output."""
        self.call = (layer, Call(self.index, args, kwargs, contextvars.copy_context(), self))
        self.baton.release()
        self.go.acquire()
        reply, self.reply, self.call = self.reply, None, None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def resume(self, reply=None, threads: int = 1) -> None:
        """In the driver: let this thread go on with ``reply`` until it stops again. It runs torch's
        CPU ops on ``threads`` threads, one by default: what a forward does between layers is small,
        and its own OpenMP team, spinning after each op, would take the cores from the layers the
        driver runs next (1.3x slower profiling on 2 cores, measured). After the last layer, when
        the thread runs to its end (the LM head, scoring: ``forward_layer_by_layer``), it gets them
        all: a thread's team goes when the thread does."""
        self.reply = reply
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self.go.release()
            self.baton.acquire()
        finally:
            torch.set_num_threads(before)
        if self.call is not None and self.parking is not None:  # it waits at a layer: its states off the device
            self.parking.arrived((self.call[1].args, self.call[1].kwargs))


LayerVisit = Callable[[int, list[Call]], list]  # drive's visit(layer index, calls) -> outputs


def drive(model, layers: list[tuple[str, nn.Module]], batches: list, visit: LayerVisit, work=None,
          parking: Parking | None = None) -> None:
    """Run the model's forward on every batch, layer by layer (module docstring): for each layer
    the model calls, ``visit(index, calls)`` gets every batch's call of it (in batch order) and
    returns their outputs, which the forwards go on with (a call ``visit`` answered itself,
    ``Call.answer``, is skipped). ``visit`` runs the layer itself (``Call.run`` with
    ``forward_of(layer)``, the layer's own forward). ``work(model, batch)``: what each batch's thread
    runs (default: the model's forward, its output dropped; ``forward_layer_by_layer``). Each thread
    runs in the caller's CUDA device and stream (``devices.Ambient``); ``parking`` says where each
    batch's tensors wait between layers (``devices.Parking``; default: where the model put them)."""
    family = model.config.model_type
    baton = threading.Semaphore(0)
    ambient = Ambient.capture()
    threads = [_Batch(model, b, batch, baton, work, ambient, parking) for b, batch in enumerate(batches)]

    def make(i, layer):
        def stand_in(*args, **kwargs):
            batch = getattr(_local, "batch", None)
            if batch is None:  # not from a batch's forward (a layer run by visit itself)
                return ORIGINAL[id(layer)](*args, **kwargs)
            return batch.wait(i, args, kwargs)

        return stand_in

    ORIGINAL.update({id(layer): layer.__dict__.get("forward") or type(layer).forward.__get__(layer)
                     for _, layer in layers})
    try:
        with _layers_replaced(layers, make):
            for thread in threads:
                thread.start()
                thread.resume()
            while True:
                failed = next((t for t in threads if t.error is not None), None)
                if failed is not None:
                    raise failed.error
                waiting = [t for t in threads if not t.finished]
                if not waiting:
                    return
                at = {t.call[0] for t in waiting}
                if len(at) > 1 or len(waiting) < len(threads):
                    raise UncurlError(f"{family}: its batches do not call the same decoder layers in the same order "
                                      f"(some at {sorted(layers[i][0] for i in at)}, {len(threads) - len(waiting)} "
                                      f"done), so its layers cannot be run one at a time")
                i = at.pop()
                calls = [t.call[1] for t in waiting]
                outputs = visit(i, calls)
                for call, out in zip(calls, outputs):
                    if not call.answered:
                        call.answer(out)
    finally:
        for thread in threads:  # an error or a signal: every waiting forward unwinds
            if thread.is_alive() and thread.call is not None:
                thread.resume(_Abort())
        for _, layer in layers:
            ORIGINAL.pop(id(layer), None)


ORIGINAL: dict[int, Callable] = {}  # id(layer) -> its own forward while a drive runs


def forward_of(layer: nn.Module) -> Callable:
    """``layer``'s own forward while ``drive`` has replaced it (accelerate's hook included)."""
    return ORIGINAL.get(id(layer)) or layer.__dict__.get("forward") or type(layer).forward.__get__(layer)


def encoded(tokenizer, texts, text_ids, *, batch_size: int, max_length: int, device):
    """The calibration batches on ``device`` and, per batch, what the recorder needs: the mask of
    its non-padding rows (``devices.Masks``: moved to each layer's device as it is used), their
    (text, position) names and the text index of each row."""
    batches, names = [], []
    for rows, batch in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
        names.append((Masks(batch["attention_mask"].reshape(-1).bool()),
                      token_positions(batch["attention_mask"], [text_ids[r] for r in rows]), [text_ids[r] for r in rows]))
        batches.append(batch.to(device))
    return batches, names


def recorder_for(model, adapter: MoEAdapter, seed: int) -> _Recorder:
    moe_layers = find_moe_layers(model, adapter)
    return _Recorder(moe_layers, moe_layers[0].num_experts, seed, tail=bool(adapter.tail_rows),
                     output=adapter.router_output, top_k=top_k(model.config, adapter),
                     router_logits=adapter.router_logits)


@dataclass
class Visit:
    """What ``run_layers``' ``after_layer`` gets: decoder layer ``name`` (``layer``, its weights on
    ``device``) once every batch went through it, the statistics of its MoE blocks complete
    (``stats``), and the batches' calls, which ``run(forward)`` runs again through another module."""

    index: int
    name: str
    layer: nn.Module
    device: torch.device
    stats: dict
    calls: list[Call]
    masks: list  # per call: its batch's non-padding rows ([B*T] bool, on ``device``)
    parking: Parking | None = None

    def run(self, forward) -> list:
        """``forward`` on every call's arguments on ``device``; the outputs parked like the states."""
        outputs = []
        for call in self.calls:
            outputs.append(call.run(forward, self.device))
            if self.parking is not None:
                self.parking.park(outputs[-1])
        return outputs


@torch.no_grad()
def run_layers(model, tokenizer, adapter: MoEAdapter, texts, *, batch_size: int = 8, max_length: int = 512,
               progress: bool = False, meta: dict | None = None, seed: int = 0, text_ids=None,
               after_layer: Callable[[Visit], "list | None"] | None = None, after_all: Callable[[], None] | None = None,
               rerun: bool = False, label: str = "profiling layer by layer", states: str = "auto", mtp=None,
               after_mtp: Callable[[object], None] | None = None) -> Profile:
    """The profile, computed layer by layer (``drive``). ``after_layer(visit)`` runs after each
    decoder layer (``Visit``), its weights still on the device. With ``rerun``, what it returns
    (the outputs of the layer as pruned: ``--calibrate-through pruned``) is what the next layer
    gets, so every batch's input states are held until then; without, each batch goes on with the
    original layer's output as soon as it is computed, and its input is freed at once.
    ``after_all()`` runs after the last, while the modules outside the layers are still held.
    ``states``: where each batch's states wait between layers (``devices.Parking``: auto, device, cpu).
    ``mtp`` (``mtp.Blocks``): its kept MTP blocks run after the last layer on every batch's last
    hidden state (held meanwhile), their statistics in the profile too; ``after_mtp(session)`` gets
    the blocks still loaded (``mtp.Session``), before ``after_all``."""
    if not texts:
        raise UncurlError("no calibration text to profile: the task's calibration split is empty")
    text_ids = check_text_ids(texts, text_ids)
    moe_layers = find_moe_layers(model, adapter)
    layers = decoder_layers(model, adapter)
    batches, names = encoded(tokenizer, texts, text_ids, batch_size=batch_size, max_length=max_length,
                             device=input_device(model))
    recorder = recorder_for(model, adapter, seed)
    parking = Parking(states, copies=len(batches) * (2 if rerun else 1))

    visited: set[int] = set()

    def visit(i: int, calls: list[Call]) -> list:
        name, layer = layers[i]
        if after_layer is not None and i in visited:
            raise UncurlError(f"{model.config.model_type}: decoder layer {name} runs twice in a forward, so it cannot be "
                              f"pruned on its first visit: use --pipeline whole")
        visited.add(i)
        with onloaded(layer):  # an offloaded layer's weights: read once for every batch
            where, forward = layer_device(layer), forward_of(layer)
            outputs = []
            for call in calls:
                recorder.mask, recorder.tokens = names[call.batch][:2]
                out = call.run(forward, where)
                recorder.mask = recorder.tokens = None
                if rerun:
                    parking.park(out)
                    outputs.append(out)
                else:  # on at once: at most one layer input and its output per batch held
                    call.answer(out)
                    outputs.append(None)
                del out
                advance()
            if after_layer is not None:
                stats = {b.name: recorder.finished(b.name) for b in moe_layers if within(b.name, name)}
                recorder.paused = True  # what after_layer runs again is not calibration
                try:
                    instead = after_layer(Visit(i, name, layer, where, stats, calls,
                                                [names[c.batch][0].on(where) for c in calls], parking))
                finally:
                    recorder.paused = False
                if rerun and instead is not None:
                    outputs = instead
        return outputs

    extra = {}
    try:
        with progress_bar(progress, len(layers) * len(batches), label) as advance, _outer_onloaded(model, layers), \
                (mtp.hidden_states(model) if mtp is not None and mtp.kept else nullcontext(None)) as hidden:
            drive(model, layers, batches, visit, parking=parking)
            if hidden is not None:
                extra = _run_mtp(mtp, batches, names, hidden, seed, after_mtp)
            if after_all is not None:
                after_all()
    finally:
        recorder.close()
    index = {layer.name: layer.index for layer in moe_layers}
    if extra:
        index.update(mtp.layer_index())
    return Profile({**recorder.stats, **extra}, index, dict(meta or {}))


def _run_mtp(mtp, batches, names, hidden: dict, seed: int, after_mtp) -> dict:
    """The kept MTP blocks on every batch's last hidden state (``hidden``, by batch; each freed once
    used unless ``after_mtp`` may run them again): their statistics."""
    session = mtp.session(seed, keep_inputs=after_mtp is not None)
    try:
        for b, batch in enumerate(batches):
            session.run(batch, hidden.pop(b), names[b][2])
        stats = session.finish()
        if after_mtp is not None:
            after_mtp(session)
        return stats
    finally:
        session.close()


def profile_sequential(model, tokenizer, adapter: MoEAdapter, texts, *, batch_size: int = 8, max_length: int = 512,
                       progress: bool = False, meta: dict | None = None, seed: int = 0, text_ids=None,
                       mtp=None) -> Profile:
    """``profile_model`` computed layer by layer: the same statistics (to float rounding)."""
    return run_layers(model, tokenizer, adapter, texts, batch_size=batch_size, max_length=max_length,
                      progress=progress, meta=meta, seed=seed, text_ids=text_ids, mtp=mtp)


@torch.no_grad()
def forward_layer_by_layer(model, adapter: MoEAdapter, batches: list, work, *, progress: bool = False,
                           label: str = "evaluating layer by layer") -> None:
    """``work(model, batch)`` on every batch, the model's forwards inside it run layer by layer
    (``drive``): an offloaded model's weights are read once for all the batches instead of once per
    batch. Each batch's ``work`` goes on past a layer as soon as its output is computed, so what it
    does after the last layer (e.g. scoring the logits) runs one batch at a time."""
    layers = decoder_layers(model, adapter)
    cores = torch.get_num_threads()

    def visit(i: int, calls: list[Call]) -> list:
        _, layer = layers[i]
        with onloaded(layer):
            where, forward = layer_device(layer), forward_of(layer)
            for call in calls:
                call.answer(call.run(forward, where), cores if i == len(layers) - 1 else 1)
                advance()
        return [None] * len(calls)

    with progress_bar(progress, len(layers) * len(batches), label) as advance, _outer_onloaded(model, layers):
        drive(model, layers, batches, visit, work)
