"""Step 4: turn each layer's plan into physically fewer experts, and the model into a K-expert model.

Every per-expert tensor (the fused expert weights and biases, the router rows and per-expert
router buffers such as ``bias`` or ``e_score_correction_bias``) has the expert axis first, so one
operation serves all: new expert k = sum over members e of M[k, e] * old expert e, computed in
float32 per group and cast back to the tensor's dtype. A singleton group with weight 1 is copied
bit for bit, which is why ``--keep E`` reproduces the original model exactly.

Router rows (documented choice): by default (``--router-rows mean``) a group's router row and
per-expert router buffers are the *same* frequency-weighted mean as its experts, so every
per-expert tensor follows one rule; ``--router-rows dominant`` instead keeps the row of the
group's most-used member (MC-SMoE's choice), which preserves that expert's routing scale.

The rewritten model is built on the ``meta`` device from the new config and takes the tensors by
assignment: unchanged tensors (attention, embeddings, dense layers, shared experts) are shared,
not copied, so no second full copy of the model is ever held. With ``consume=True`` (what
``prune`` uses) each layer's original expert tensors are released as soon as that layer is merged,
so the peak is the model plus one merged tensor, not the model plus all merged experts.

Under ``--device-map`` each tensor is merged on the device it lives on; tensors accelerate offloaded
to CPU or disk are read one at a time, and the rewritten model gets the original's placement
(``offload.py``).
"""

from __future__ import annotations

import copy

import torch

from .adapters import MoEAdapter, find_moe_layers, per_expert_names, set_moe_keys
from .cluster import LayerPlan
from .offload import Spill, drop_offloaded, on_disk, read_tensor, transplant_hooks


def merge_tensor(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Rows of ``m`` [K, E] applied along the first axis of ``t`` [E, ...] -> [K, ...]."""
    out = torch.empty((m.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    for k, row in enumerate(m):
        members = torch.nonzero(row).flatten().tolist()
        if len(members) == 1 and row[members[0]] == 1.0:
            out[k] = t[members[0]]
            continue
        acc = torch.zeros(t.shape[1:], dtype=torch.float32 if t.dtype != torch.float64 else t.dtype, device=t.device)
        for e in members:
            acc.add_(t[e].to(acc.dtype), alpha=float(row[e]))
        out[k] = acc.to(t.dtype)
    return out


def rewrite_model(
    model,
    adapter: MoEAdapter,
    plans: dict[str, LayerPlan],
    *,
    router_rule: str = "mean",
    top_k: int | None = None,
    consume: bool = False,
):
    """A new model with each MoE layer reduced per ``plans``.

    ``model`` is left unchanged unless ``consume``: then each merged tensor replaces the original
    inside ``model`` as it is made (freeing the original), and ``model`` must not be used again.
    """
    layers = find_moe_layers(model, adapter)
    keep = {plans[layer.name].keep for layer in layers}
    if len(keep) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(keep)}")
    state = dict(model.state_dict())
    work = []
    for layer in layers:  # check every layer before touching any (consume must not half-merge)
        plan = plans[layer.name]
        expert_names, router_names = per_expert_names(layer, adapter)
        for names, rule in ((expert_names, "mean"), (router_names, router_rule)):
            m = plan.matrix(layer.num_experts, rule)
            for name in names:
                if state[name].shape[0] != layer.num_experts:
                    raise ValueError(f"{name} has shape {tuple(state[name].shape)}; expected experts first")
                work.append((name, m))
    spill = Spill()
    for name, m in work:
        source = read_tensor(model, name, state[name])  # from accelerate's offload if need be
        state[name] = merge_tensor(source, m.to(source.device))
        del source
        if on_disk(model, name):  # its layer lives on disk: so does the merged tensor
            state[name] = spill.put(name, state[name])
        if consume:
            _replace(model, name, state[name])
            drop_offloaded(model, name)

    config = copy.deepcopy(model.config)
    set_moe_keys(config, adapter, keep.pop(), top_k)
    with torch.device("meta"):
        new = type(model)(config)
    new.load_state_dict(state, assign=True, strict=True)
    persistent = set(state)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) are not in state
        if name not in persistent:
            owner, _, attr = name.rpartition(".")
            new.get_submodule(owner)._buffers[attr] = buf
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    if any(hasattr(module, "_hf_hook") for module in model.modules()):  # dispatched by accelerate
        transplant_hooks(model, new, {name.rpartition(".")[0] for name, _ in work}, spill)
    return new.eval()


def _replace(model, name: str, tensor: torch.Tensor) -> None:
    """Point ``model``'s parameter or buffer ``name`` at ``tensor``, dropping the old one."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    """Bytes of the distinct tensors in the state dict (tied weights counted once; offloaded tensors,
    which all sit at address 0 on ``meta``, by name)."""
    seen = {(t.data_ptr() if t.device.type != "meta" else name): t.numel() * t.element_size()
            for name, t in model.state_dict().items()}
    return sum(seen.values())
