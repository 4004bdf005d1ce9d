"""Step 4: turn each layer's plan into physically fewer experts, and the model into a K-expert model.

Every per-expert tensor (the fused expert weights and biases, the router rows and per-expert
router buffers such as ``bias`` or ``e_score_correction_bias``) has the expert axis first. A
layer is rewritten group by group: the group's members' slices of every expert tensor of the
layer (its *coupled* tensors: gate_up, down and their biases, which must move together) go to a
**merge rule**, and the router tensors to a **router rule**. Both are registries of small
functions (``MERGE_RULES``, ``ROUTER_RULES``):

- ``average``: new expert = sum_e w_e * expert e (w: usage shares within the group);
- ``aligned``: first permute each member's intermediate neurons onto the group's reference member
  (Hungarian weight matching over gate/up rows and down columns jointly,
  ``scipy.optimize.linear_sum_assignment``), then the same weighted average. Where the neurons sit
  in each tensor is the family's ``neurons`` layout in the adapter table (fused gated, gpt_oss's
  transposed interleaved one, non-gated);
- ``select``: the group's reference member alone (its most-used one, or the method's centre).
- ``fit``: ``aligned``, then the down projections are fitted to the original layer's output on the
  calibration tokens after the whole model is merged (``fit.py``; ``MergeRule.fit``).
- router ``mean`` (the merge weights' mean of the rows), ``dominant`` (the reference member's row)
  and ``refit`` (a least-squares fit, per layer, of the K new rows: see ``refit_router``).

Tables of expert *ids* (deepseek_v4's hash routing ``tid2eid``, the adapter's ``expert_ids``) are
not merged but rewritten: every id becomes its expert's new index (``expert_targets``).

Merging is computed in float32 (float64 for float64 tensors) per group and cast back to the
tensor's dtype. A singleton group is copied bit for bit, which is why ``--keep E`` reproduces the
original model exactly whatever the rules.

The rewritten model is built on the ``meta`` device from the new config and takes the tensors by
assignment: unchanged tensors (attention, embeddings, dense layers, shared experts) are shared,
not copied, so no second full copy of the model is ever held. With ``consume=True`` (what
``prune`` uses) each layer's original expert tensors are released as soon as that layer is merged,
so the peak is the model plus one merged layer, not the model plus all merged experts.

Under ``--device-map`` each tensor is merged on the device it lives on; tensors accelerate offloaded
to CPU or disk are read one layer at a time, and the rewritten model gets the original's placement
(``offload.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .adapters import (MoEAdapter, MoELayer, NeuronAxis, expert_id_names, find_moe_layers, per_expert_names,
                       set_moe_keys, tail_rows)
from .cluster import LayerPlan
from .errors import UncurlError
from .offload import Spill, dispatched, drop_offloaded, on_disk, read_tensor, transplant_hooks


def merge_tensor(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Rows of ``m`` [K, E] applied along the first axis of ``t`` [E, ...] -> [K, ...]."""
    out = torch.empty((m.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    for k, row in enumerate(m):
        members = torch.nonzero(row).flatten().tolist()
        if len(members) == 1 and row[members[0]] == 1.0:
            out[k] = t[members[0]]
            continue
        acc = torch.zeros(t.shape[1:], dtype=_work_dtype(t), device=t.device)
        for e in members:
            acc.add_(t[e].to(acc.dtype), alpha=float(row[e]))
        out[k] = acc.to(t.dtype)
    return out


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- neuron alignment ------------------------------------------------------------------------

def neuron_index(perm: torch.Tensor, packing: str) -> torch.Tensor:
    """The indices along a tensor's neuron axis that permutation ``perm`` (of I neurons) selects."""
    n = perm.numel()
    if packing == "concat":  # [gate_0..gate_I-1, up_0..up_I-1]
        return torch.cat([perm, perm + n])
    if packing == "interleaved":  # [gate_0, up_0, gate_1, up_1, ...]
        return torch.stack([2 * perm, 2 * perm + 1], 1).reshape(-1)
    return perm


def permute_neurons(tensors: dict[str, torch.Tensor], neurons: tuple[NeuronAxis, ...], perm: torch.Tensor,
                    expert_axis: bool = False) -> dict[str, torch.Tensor]:
    """One expert's tensors (by name) with its neurons reordered: new neuron i = old neuron perm[i].
    ``expert_axis``: the tensors still carry a leading member axis."""
    out = dict(tensors)
    shift = 1 if expert_axis else 0
    for spec in neurons:
        if spec.tensor in tensors:
            t = tensors[spec.tensor]
            out[spec.tensor] = t.index_select(spec.axis + shift, neuron_index(perm.to(t.device), spec.packing))
    return out


def neuron_features(tensors: dict[str, torch.Tensor], neurons: tuple[NeuronAxis, ...]) -> torch.Tensor:
    """[I, D]: every weight that belongs to each intermediate neuron (its gate and up rows, its down
    column, its biases), concatenated: the rows weight matching compares."""
    parts = []
    for spec in neurons:
        if spec.tensor not in tensors:
            continue
        t = tensors[spec.tensor].movedim(spec.axis, 0)
        per = 2 if spec.packing in ("concat", "interleaved") else 1
        n = t.shape[0] // per
        t = t.reshape(per, n, -1).transpose(0, 1) if spec.packing == "concat" else t.reshape(n, per, -1)
        parts.append(t.reshape(n, -1))
    if not parts:
        raise UncurlError("this family's adapter entry names no neuron layout its experts have; "
                          "use --merge average or select")
    sizes = {p.shape[0] for p in parts}
    if len(sizes) != 1:
        raise UncurlError(f"the neuron layout disagrees with the expert tensors (intermediate sizes {sorted(sizes)})")
    return torch.cat(parts, 1)


def match_neurons(reference: dict[str, torch.Tensor], member: dict[str, torch.Tensor],
                  neurons: tuple[NeuronAxis, ...]) -> torch.Tensor:
    """The permutation of ``member``'s neurons that best matches ``reference``'s: maximises
    sum_i <features_ref[i], features_member[perm[i]]> (Hungarian, exact)."""
    from scipy.optimize import linear_sum_assignment

    ref, mem = (neuron_features(t, neurons).double() for t in (reference, member))
    score = (ref @ mem.T).cpu().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


# ---- merge rules: one group's coupled tensors -> one expert ----------------------------------

@dataclass(frozen=True)
class GroupSpec:
    """One group of a layer: its members, merge weights and reference member (index into members)."""

    members: tuple[int, ...]
    weights: torch.Tensor  # [m], sums to 1
    reference: int


MergeFn = Callable[[dict[str, torch.Tensor], GroupSpec, tuple[NeuronAxis, ...]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MergeRule:
    name: str
    fn: MergeFn  # ({tensor name: [m, ...] members' slices}, group, neuron layout) -> {name: [...]}
    help: str
    fit: bool = False  # then the down projections are fitted after merging (fit.py), on calibration tokens


MERGE_RULES: dict[str, MergeRule] = {}


def merge_rule(name: str, help: str, fit: bool = False):
    def register(fn: MergeFn) -> MergeFn:
        MERGE_RULES[name] = MergeRule(name, fn, help, fit)
        return fn

    return register


def _weighted(tensors: dict[str, torch.Tensor], w: torch.Tensor) -> dict[str, torch.Tensor]:
    return {n: torch.tensordot(w.to(t), t, dims=1) for n, t in tensors.items()}


@merge_rule("average", "usage-weighted average of the members' weights, as they are")
def _average(tensors, group, neurons):
    return _weighted(tensors, group.weights)


@merge_rule("aligned", "permute each member's neurons onto the reference member (Hungarian weight "
                       "matching), then the usage-weighted average")
def _aligned(tensors, group, neurons):
    ref = {n: t[group.reference] for n, t in tensors.items()}
    aligned = {n: t.clone() for n, t in tensors.items()}
    for i in range(len(group.members)):
        if i == group.reference:
            continue
        member = {n: t[i] for n, t in tensors.items()}
        for n, t in permute_neurons(member, neurons, match_neurons(ref, member, neurons)).items():
            aligned[n][i] = t
    return _weighted(aligned, group.weights)


merge_rule("fit", "aligned, then each new expert's down projection fitted by ridge least squares (strength 1e-3 x "
                  "the mean diagonal of its Gram matrix) so the pruned layer's routed output reproduces the original "
                  "layer's on the calibration tokens (in each layer's visit under --pipeline auto; never worse "
                  "there: a step size is chosen per layer); also refits a pruning criterion's kept experts",
           fit=True)(_aligned)


@merge_rule("select", "keep the group's reference member (most used, or the centre) and drop the rest")
def _select(tensors, group, neurons):
    return {n: t[group.reference] for n, t in tensors.items()}


def get_rule(registry: dict, name: str, flag: str):
    try:
        return registry[name]
    except KeyError:
        raise UncurlError(f"{flag} {name!r} is not one of {', '.join(registry)}") from None


def merge_experts(tensors: dict[str, torch.Tensor], plan: LayerPlan, rule: str,
                  neurons: tuple[NeuronAxis, ...]) -> dict[str, torch.Tensor]:
    """A layer's expert tensors {name: [E, ...]} -> {name: [K, ...]} under merge rule ``rule``."""
    fn = get_rule(MERGE_RULES, rule, "--merge").fn
    out = {n: torch.empty((plan.keep, *t.shape[1:]), dtype=t.dtype, device=t.device) for n, t in tensors.items()}
    for k, members in enumerate(plan.groups):
        if len(members) == 1:  # bit for bit
            for n, t in tensors.items():
                out[n][k] = t[members[0]]
            continue
        group = GroupSpec(members, torch.tensor(plan.weights[k], dtype=torch.float64), plan.dominant(k))
        index = torch.tensor(members, device=next(iter(tensors.values())).device)
        merged = fn({n: t.index_select(0, index).to(_work_dtype(t)) for n, t in tensors.items()}, group, neurons)
        for n, t in merged.items():
            out[n][k] = t.to(out[n].dtype)
    return out


# ---- router rules: a layer's router tensors -> K rows ----------------------------------------

RouterFn = Callable[[dict[str, torch.Tensor], LayerPlan, object, MoEAdapter], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RouterRule:
    name: str
    fn: RouterFn  # ({router tensor name: [E, ...]}, plan, layer statistics, adapter) -> {name: [K, ...]}
    help: str


ROUTER_RULES: dict[str, RouterRule] = {}


def router_rule(name: str, help: str):
    def register(fn: RouterFn) -> RouterFn:
        ROUTER_RULES[name] = RouterRule(name, fn, help)
        return fn

    return register


@router_rule("mean", "a merged expert's router row (and per-expert router buffers) is the same "
                     "usage-weighted mean as its experts")
def _router_mean(tensors, plan, stats, adapter):
    m = plan.matrix(next(iter(tensors.values())).shape[0], "mean")
    return {n: merge_tensor(t, m.to(t.device)) for n, t in tensors.items()}


@router_rule("dominant", "a merged expert keeps its reference member's router row (MC-SMoE's choice)")
def _router_dominant(tensors, plan, stats, adapter):
    m = plan.matrix(next(iter(tensors.values())).shape[0], "dominant")
    return {n: merge_tensor(t, m.to(t.device)) for n, t in tensors.items()}


def refit_solution(logits: torch.Tensor, plan: LayerPlan, with_bias: bool) -> torch.Tensor:
    """A [(E or E+1), K]: least-squares coefficients of the K new logits on the original ones.

    Target of group k on token x: log sum_{e in k} exp(l_e(x)), the log of the group's summed
    (unnormalised) routing probability; for a singleton group that is l_e itself, so nothing merged
    means nothing changes. Features: the original logits [n, E] (plus a constant when the router
    has a logit bias to absorb it).
    """
    z = logits.double()
    if with_bias:
        z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], 1)
    target = torch.stack([torch.logsumexp(logits.double()[:, list(g)], 1) for g in plan.groups], 1)
    return torch.linalg.lstsq(z.cpu(), target.cpu(), driver="gelsd").solution


@router_rule("refit", "re-fit the K router rows by least squares so each new expert's logit "
                      "reproduces the log of its group's summed routing probability on the calibration "
                      "tokens (a seeded sample of up to 4096 per layer); other router buffers: mean")
def _router_refit(tensors, plan, stats, adapter):
    out = _router_mean(tensors, plan, stats, adapter)
    if all(len(members) == 1 for members in plan.groups):  # nothing merged: the kept rows, bit for bit
        return out
    if stats is None:
        raise UncurlError("--router refit needs the profile's router-logit sample (pass the profile)")
    weight_name = adapter.router_tensors[0]
    bias_name = adapter.router_logit_bias
    a = refit_solution(stats.logit_rows(), plan, bias_name is not None)
    e = tensors[weight_name].shape[0]
    w = tensors[weight_name]
    coef = a[:e].T.to(w.device)  # [K, E]
    out[weight_name] = (coef @ w.double()).to(w.dtype)
    if bias_name is not None:
        b = tensors[bias_name]
        out[bias_name] = (coef @ b.double() + a[e].to(b.device)).to(b.dtype)
    for k, members in enumerate(plan.groups):  # a singleton's row is its own, bit for bit
        if len(members) == 1:
            for n in (weight_name, bias_name):
                if n is not None:
                    out[n][k] = tensors[n][members[0]]
    return out


# ---- expert-id tables: the new index of each original expert ---------------------------------

def expert_targets(plan: LayerPlan, router_weight: torch.Tensor) -> torch.Tensor:
    """[E] long: the index (0..K-1) of the group each original expert went to, for tables that
    hold expert ids (deepseek_v4's hash routing ``tid2eid``).

    An expert in no group (dropped by a pruning criterion) goes to the group whose new router row
    (the plan's mean of its members' rows) is the most similar (cosine) to the expert's own row of
    ``router_weight`` [E, H]: the kept expert that the router scores most like it.
    """
    e = router_weight.shape[0]
    targets = torch.full((e,), -1, dtype=torch.long)
    for k, members in enumerate(plan.groups):
        targets[list(members)] = k
    dropped = torch.nonzero(targets < 0).flatten()
    if len(dropped):
        w = router_weight.double().cpu()
        rows = plan.matrix(e, "mean") @ w
        sim = torch.nn.functional.normalize(w[dropped], dim=1) @ torch.nn.functional.normalize(rows, dim=1).T
        targets[dropped] = sim.argmax(1)
    return targets


def remap_expert_ids(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``ids`` (any shape, expert ids < E) with each id replaced by ``targets[id]``, same dtype.
    A token whose experts went to one group lists that group twice: the model runs it once per
    slot, so the merged expert gets the token's whole routing weight."""
    return targets.to(ids.device)[ids.long()].to(ids.dtype)


def layer_tensor_names(layer: MoELayer, adapter: MoEAdapter) -> list[str]:
    """Full state-dict keys of the tensors ``rewrite_layer`` rewrites in ``layer``: its expert
    tensors, its per-expert routing tensors and its expert-id tables."""
    expert_names, router_names = per_expert_names(layer, adapter)
    return expert_names + router_names + expert_id_names(layer, adapter)


def check_layer(layer: MoELayer, shapes: Mapping[str, Sequence[int]], adapter: MoEAdapter, tail: int) -> None:
    """Raise unless every per-expert tensor of ``layer`` (``shapes``: name -> shape, as
    ``layer_tensor_names`` lists them) has E (or E plus ``tail``) entries on its expert axis."""
    ids = {f"{layer.name}.{adapter.router_attr}.{n}" for n in adapter.expert_ids}
    for name, shape in shapes.items():
        if name not in ids and shape[adapter.expert_axis(name)] not in (layer.num_experts, layer.num_experts + tail):
            raise ValueError(f"{name} has shape {tuple(shape)}; expected {layer.num_experts} "
                             f"experts on axis {adapter.expert_axis(name)}")


def _split_names(layer: MoELayer, adapter: MoEAdapter, names) -> tuple[dict, dict, list]:
    """``names`` (full keys) as (expert {short: full}, routing {short: full}, expert-id tables)."""
    prefix = f"{layer.name}.{adapter.experts_attr}."
    routing = {f"{layer.name}.{adapter.router_attr}.{n}": n for n in adapter.router_tensors}
    routing.update({f"{layer.name}.{n}": n for n in adapter.block_tensors})
    ids = {f"{layer.name}.{adapter.router_attr}.{n}" for n in adapter.expert_ids}
    experts, routers, tables = {}, {}, []
    for name in names:
        if name in ids:
            tables.append(name)
        elif name in routing:
            routers[routing[name]] = name
        elif name.startswith(prefix) and name[len(prefix):] not in adapter.experts_common:
            experts[name[len(prefix):]] = name
        else:
            raise ValueError(f"{name} is not a per-expert tensor of {layer.name} (see layer_tensor_names)")
    return experts, routers, tables


def rewrite_layer(
    layer: MoELayer,
    tensors: Mapping[str, torch.Tensor],
    plan: LayerPlan,
    adapter: MoEAdapter,
    *,
    merge: str = "average",
    router_rule: str = "mean",
    stats=None,
    tail: int = 0,
) -> dict[str, torch.Tensor]:
    """One MoE layer's tensors {full name: tensor} (those ``layer_tensor_names`` lists, read into
    memory) -> the same names with K experts, under merge rule ``merge`` and router rule
    ``router_rule`` (``stats``: this layer's statistics, which ``refit`` needs).

    Pure: nothing of the model is read or written (only ``layer.name`` and ``layer.num_experts``
    are used), so a whole-model rewrite, a layer-by-layer loop and a codec around the tensors all
    call this. ``tail`` rows after the E experts' (``adapter.tail_rows``) are copied as they are.
    """
    get_rule(MERGE_RULES, merge, "--merge")  # both names checked before any work
    router_fn = get_rule(ROUTER_RULES, router_rule, "--router").fn
    experts, routers, tables = _split_names(layer, adapter, tensors)
    check_layer(layer, {n: t.shape for n, t in tensors.items()}, adapter, tail)
    e = layer.num_experts
    new = {}
    for short, rewrite in (
        (experts, lambda ts: merge_experts(ts, plan, merge, adapter.neurons)),
        (routers, lambda ts: router_fn(ts, plan, stats, adapter)),
    ):
        # every rule sees the E experts on the first axis; tail rows (shared, zero or skip slots
        # after them) are put back as they were
        sources = {s: tensors[full].movedim(adapter.expert_axis(s), 0) for s, full in short.items()}
        tails = {s: t[e:] for s, t in sources.items()}
        merged = rewrite({s: t[:e] for s, t in sources.items()})
        new.update({short[s]: (torch.cat([t, tails[s].to(t)]) if len(tails[s]) else t)
                    .movedim(0, adapter.expert_axis(s)).contiguous() for s, t in merged.items()})
        del sources, tails, merged
    if tables:
        weight = tensors[routers[adapter.router_tensors[0]]]
        targets = expert_targets(plan, weight[:e])
        for name in tables:
            new[name] = remap_expert_ids(tensors[name], targets)
    return new


def rewrite_model(
    model,
    adapter: MoEAdapter,
    plans: dict[str, LayerPlan],
    *,
    router_rule: str,
    merge: str,
    stats: dict | None = None,
    top_k: int | None = None,
    consume: bool = False,
):
    """A new model with each MoE layer reduced per ``plans``, merge rule ``merge`` and router rule
    ``router_rule`` (``stats``: the profile's per-layer statistics, which ``refit`` needs).

    ``merge`` and ``router_rule`` have no defaults: the Python API must not drift from the CLI's
    (``options.DEFAULT_MERGE``/``DEFAULT_ROUTER``), and ``refit`` cannot run without ``stats``, so
    every caller names its rules.

    ``model`` is left unchanged unless ``consume``: then each merged tensor replaces the original
    inside ``model`` as it is made (freeing the original), and ``model`` must not be used again.
    Each layer is ``rewrite_layer`` over its tensors, read (from accelerate's offload too) one
    layer at a time; this function places the results and builds the new model around them.
    """
    get_rule(MERGE_RULES, merge, "--merge")
    get_rule(ROUTER_RULES, router_rule, "--router")
    layers = find_moe_layers(model, adapter)
    keep = {plans[layer.name].keep for layer in layers}
    if len(keep) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(keep)}")
    state = dict(model.state_dict())
    tail = tail_rows(model.config, adapter)
    work = []
    for layer in layers:  # check every layer before touching any (consume must not half-merge)
        names = layer_tensor_names(layer, adapter)
        check_layer(layer, {n: state[n].shape for n in names}, adapter, tail)
        work.append((layer, names))
    spill = Spill()
    merged_names = []
    for layer, names in work:
        tensors = {name: read_tensor(model, name, state[name]) for name in names}  # offloaded: read here
        new = rewrite_layer(layer, tensors, plans[layer.name], adapter, merge=merge, router_rule=router_rule,
                            stats=(stats or {}).get(layer.name), tail=tail)
        del tensors
        for name, tensor in new.items():
            state[name] = tensor
            if on_disk(model, name):  # its layer lives on disk: so does the merged tensor
                state[name] = spill.put(name, state[name])
            if consume:
                _replace(model, name, state[name])
                drop_offloaded(model, name)
            merged_names.append(name)
        del new
    # a module with merged tensors gets a new offload hook over its own tensors (transplant_hooks):
    # its other tensors (inkling_text's gate.global_scale, zaya's router_states_scale) go along
    owners = {name.rpartition(".")[0] for name in merged_names}
    for name in state:
        owner = name.rpartition(".")[0]
        if owner in owners and name not in merged_names and state[name].device.type == "meta":
            state[name] = read_tensor(model, name, state[name])
            if on_disk(model, name):
                state[name] = spill.put(name, state[name])

    config = copy.deepcopy(model.config)
    set_moe_keys(config, adapter, keep.pop(), top_k)
    with torch.device("meta"):
        new_model = type(model)(config)
    new_model.load_state_dict(state, assign=True, strict=True)
    persistent = set(state)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) are not in state
        if name not in persistent:
            owner, _, attr = name.rpartition(".")
            new_model.get_submodule(owner)._buffers[attr] = buf
    if getattr(model, "generation_config", None) is not None:
        new_model.generation_config = copy.deepcopy(model.generation_config)
    if dispatched(model):
        transplant_hooks(model, new_model, {name.rpartition(".")[0] for name in merged_names}, spill)
    return new_model.eval()


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
