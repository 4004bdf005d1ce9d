"""Profiling layer by layer: each decoder layer runs over every calibration batch before the next.

    from uncurl.sequential import profile_sequential
    profile = profile_sequential(model, tokenizer, adapter, texts)   # == profile_model(...)

The driver a model larger than memory needs (each layer's weights read once, not once per batch;
``../shared/SCALE.md``), here for a model resident in memory: it gives the same ``Profile`` as
``profile.profile_model`` and records with the same hooks (``profile._Recorder``).

1. **Inputs of every layer, without running one.** For each batch the model runs its own forward
   with every decoder layer replaced by the identity: its code embeds the tokens and computes
   whatever each layer is called with besides the hidden states (rotary position embeddings, the
   causal mask of the layer's attention type, gemma4's per-layer inputs, ...). Each layer's
   arguments are kept (shared tensors stay shared: one mask for all full-attention layers).
   Unlike capturing the first layer's inputs and stopping there, this gives every layer its own
   mask and per-layer inputs, and needs no weights of any layer.
2. **One layer at a time.** Layer i runs over every batch with its own arguments and the hidden
   states layer i-1 produced; its output replaces them (the ORIGINAL model's states: what a
   one-pass profile of the unpruned model sees). A value a layer returns beside the hidden states
   that the model hands to the next layer as it is (zaya's router states, glm_moe_dsa's top-k
   indices) is carried along too.

That is the model's own computation only if nothing happens between two layers but handing their
outputs on, and nothing else a layer is called with depends on an earlier layer's output. Before
profiling, one real forward of the first batch checks both (each layer called at most once, in
list order, with the arguments of step 1 and the previous layer's outputs); a model that fails is
refused with an ``UncurlError`` naming what differs (a layer run twice, as looped stacks do; hidden
states transformed between layers; an argument computed from earlier layers).

**Offloaded models** (``--device-map`` with CPU or disk offload): each decoder layer's weights
are read once (``offload.onloaded``: onto the layer's execution device, its accelerate hooks told
not to offload) and every batch runs through it, then they go back; the modules outside the layers
that the inputs pass (embeddings, rotary) are read once on first use in step 1, and the forward of
step 1 stops after the last layer (no final norm, no LM head). The check's one real forward reads
the decoder layers' offloaded weights once more, so a profile reads about twice the offloaded
bytes of the layers (the embeddings and the LM head once) whatever the number of batches (a
whole-model pass: everything once per batch). Reads are counted in ``offload.READS``.

**The cache**: between layers, each batch's hidden states (and what a layer hands to the next)
are kept in CPU memory and moved to the layer's device for its turn; what step 1 captured besides
them (masks, position embeddings) is kept in CPU memory too, one copy per batch however many
layers share it. No disk cache: tokens x hidden x dtype bytes must fit in CPU memory.

Not covered yet: feeding layer i+1 with the PRUNED layer i's outputs, and merging a layer while
its weights are on the device (the merge reads the weights once more, ``merge.rewrite_model``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .adapters import MoEAdapter, find_moe_layers, language_stack, top_k
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


HIDDEN = ("pos", 0)  # a slot: ("pos", index) of a positional argument or ("kw", name)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _filled(args: tuple, kwargs: dict, values: dict) -> tuple[tuple, dict]:
    """``args``, ``kwargs`` with the hidden states and the slots in ``values`` replaced."""
    args, kwargs = list(args), dict(kwargs)
    for slot, value in values.items():
        if slot == HIDDEN and not args:
            slot = ("kw", "hidden_states")
        if slot[0] == "pos":
            args[slot[1]] = value
        else:
            kwargs[slot[1]] = value
    return tuple(args), kwargs


def _outputs(output) -> tuple:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


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


class _Stop(Exception):
    """Raised in the last decoder layer's stand-in: nothing after it is needed (norm, LM head)."""


def layer_inputs(model, layers, batch, forms: list[int | None]) -> list[list[tuple[tuple, dict]]]:
    """What the model calls each decoder layer with on ``batch``, every layer the identity: per
    layer, one (args, kwargs) per call. ``forms``: what each layer returns, a tensor (None) or a
    tuple of n (the identity returns the hidden states and n - 1 Nones). The forward stops when
    the last layer of the list is called."""
    calls: list[list] = [[] for _ in layers]

    def make(i, layer):
        def identity(*args, **kwargs):
            calls[i].append((args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            hidden = _hidden(args, kwargs)
            return hidden if forms[i] is None else (hidden, *[None] * (forms[i] - 1))  # nothing carried

        return identity

    try:
        with _layers_replaced(layers, make):
            _forward(model, batch)
    except _Stop:
        pass
    except Exception as err:  # noqa: BLE001 - whatever fails, the family's layers cannot be skipped
        raise UncurlError(f"{model.config.model_type}: its forward fails with the decoder layers skipped "
                          f"({type(err).__name__}: {err}), so its layers cannot be profiled one at a time") from err
    return calls


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


def _real_calls(model, layers, batch) -> tuple[list[list], list[int]]:
    """One real forward: per layer, its calls as (args, kwargs, output); and the call order."""
    calls: list[list] = [[] for _ in layers]
    order: list[int] = []

    def make(i, layer):
        forward = layer.__dict__.get("forward") or type(layer).forward.__get__(layer)

        def record(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls[i].append((args, kwargs, out))
            order.append(i)
            return out

        return record

    with _layers_replaced(layers, make):
        _forward(model, batch)
    return calls, order


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b or a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable equality are not the same
        return False


def _differs(stub: tuple[tuple, dict], real: tuple[tuple, dict], carried) -> str | None:
    """The first argument a layer gets in the real forward that the identity pass did not give
    it, or None; the hidden states and the ``carried`` slots (from the previous layer) aside."""
    (sa, sk), (ra, rk) = stub, real
    if len(sa) != len(ra) or sk.keys() != rk.keys():
        return f"arguments {sorted(rk)} (+{len(ra)} positional) instead of {sorted(sk)} (+{len(sa)})"
    for i, (x, y) in enumerate(zip(sa, ra)):
        if i and ("pos", i) not in carried and not _same(x, y):
            return f"positional argument {i}"
    for key in rk:
        if key != "hidden_states" and ("kw", key) not in carried and not _same(sk[key], rk[key]):
            return f"argument {key!r}"
    return None


def _carried(previous: tuple, args: tuple, kwargs: dict) -> dict:
    """{slot of this layer's arguments: index in the previous layer's outputs} for each output
    after the hidden states that the model hands on as it is (zaya's router states, glm_moe_dsa's
    top-k indices); an output it does not hand on is not needed here."""
    links = {}
    for k, value in enumerate(previous[1:], 1):
        if value is None:
            continue
        slot = next((("kw", key) for key, v in kwargs.items() if v is value), None)
        slot = slot or next((("pos", p) for p, v in enumerate(args) if p and v is value), None)
        if slot is not None:
            links[slot] = k
    return links


def check_sequential(model, layers, batch) -> tuple[list[int], list[int | None], dict[int, dict]]:
    """Raise ``UncurlError`` unless ``model``'s forward on ``batch`` is its layers run one after
    another as ``profile_sequential`` runs them. Returns the indices of the layers it runs, what
    each returns (``layer_inputs``'s ``forms``) and, per layer, the arguments it takes from the
    previous layer's outputs besides the hidden states (``_carried``)."""
    family = model.config.model_type
    real, order = _real_calls(model, layers, batch)
    used = [i for i, c in enumerate(real) if c]
    forms: list[int | None] = [None] * len(layers)
    for i in used:
        out = real[i][0][2]
        if isinstance(out, (tuple, list)):
            forms[i] = len(out)
    links = {j: _carried(_outputs(real[i][0][2]), *real[j][0][:2]) for i, j in zip(used, used[1:])}
    stub = layer_inputs(model, layers, batch, forms)
    for i, (name, _) in enumerate(layers):
        if len(real[i]) > 1 or len(stub[i]) != len(real[i]):
            raise UncurlError(f"{family}: decoder layer {name} runs {len(real[i])} times in a forward "
                              f"({len(stub[i])} when the layers are skipped), so its layers cannot be profiled "
                              f"one at a time")
    if order != used:
        raise UncurlError(f"{family}: its decoder layers do not run in list order ({order}), so they cannot be "
                          f"profiled one at a time")
    previous = None
    for i in used:
        args, kwargs, out = real[i][0]
        what = _differs(stub[i][0], (args, kwargs), links.get(i, {}))
        if what is not None:
            raise UncurlError(f"{family}: decoder layer {layers[i][0]} gets {what} computed from earlier layers' "
                              f"outputs, so its layers cannot be profiled one at a time")
        if previous is not None and not _same(_hidden(args, kwargs), _outputs(previous)[0]):
            raise UncurlError(f"{family}: the hidden states entering {layers[i][0]} are not the previous layer's "
                              f"output (the model transforms them between layers), so its layers cannot be "
                              f"profiled one at a time")
        previous = out
    return used, forms, links


@torch.no_grad()
def profile_sequential(
    model,
    tokenizer,
    adapter: MoEAdapter,
    texts,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
    meta: dict | None = None,
    seed: int = 0,
    text_ids=None,
) -> Profile:
    """``profile_model`` computed layer by layer: the same statistics (to float rounding; see the
    module docstring for what is checked first and which families are refused)."""
    if not texts:
        raise UncurlError("no calibration text to profile: the task's calibration split is empty")
    text_ids = check_text_ids(texts, text_ids)
    moe_layers = find_moe_layers(model, adapter)
    layers = decoder_layers(model, adapter)
    device = input_device(model)
    batches, names = [], []  # per batch: the batch on the device; its rows' mask and (text, position)
    for rows, batch in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
        names.append((batch["attention_mask"].reshape(-1).bool().to(device),
                      token_positions(batch["attention_mask"], [text_ids[r] for r in rows])))
        batches.append(batch.to(device))
    cpu = torch.device("cpu")
    inputs, outputs = [], []  # [batch][layer] -> [(args, kwargs)]; per batch: the last layer's outputs
    with _outer_onloaded(model, layers):
        used, forms, links = check_sequential(model, layers, batches[0])
        for batch in batches:
            calls = layer_inputs(model, layers, batch, forms)
            outputs.append((_hidden(*calls[used[0]][0]).to(cpu),))
            memo: dict = {}  # per batch: a mask all layers share is one tensor in CPU memory
            inputs.append([[_moved(_filled(*c, {HIDDEN: None}), cpu, memo) for c in layer_calls]
                           for layer_calls in calls])
    recorder = _Recorder(moe_layers, moe_layers[0].num_experts, seed, tail=bool(adapter.tail_rows),
                         output=adapter.router_output, top_k=top_k(model.config, adapter),
                         router_logits=adapter.router_logits)
    try:
        with progress_bar(progress, len(used) * len(batches), "profiling layer by layer") as advance:
            for i in used:
                layer = layers[i][1]
                with onloaded(layer):  # an offloaded layer's weights: read once for every batch
                    where = layer_device(layer)
                    for b in range(len(batches)):
                        recorder.mask, recorder.tokens = names[b]
                        values = {HIDDEN: outputs[b][0], **{s: outputs[b][k] for s, k in links.get(i, {}).items()}}
                        args, kwargs = _moved(_filled(*inputs[b][i][0], values), where, {})
                        outputs[b] = _moved(_outputs(layer(*args, **kwargs)), cpu, {})
                        inputs[b][i] = None  # this layer's arguments are no longer needed
                        advance()
    finally:
        recorder.close()
    index = {layer.name: layer.index for layer in moe_layers}
    return Profile(recorder.stats, index, dict(meta or {}))
