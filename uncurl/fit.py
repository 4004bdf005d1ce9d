"""Step 4b (``--merge fit``): fit each new expert's down projection to the ORIGINAL layer's output.

    uncurl prune --model DIR --task superglue-rte --keep 4 --method uncurl --merge fit ...

After planning and the base merge (``aligned``; a criterion's kept experts as they are), the
pruned layer computes y'(x) = sum_{k in top-k'(x)} g'_k(x) (D_k h_k(x) + b_k): the pruned router's
gates g', each new expert's gated intermediate activations h_k (from its merged gate/up) and its
down projection D_k. That is linear in the D_k, so they can be fitted, in closed form, to make the
pruned layer's routed output reproduce the original layer's routed output y(x) on the calibration
tokens (MergeMoE; the same ridge least squares the pretrained test bed is built with).

**Target.** The residual e(x) = y(x) - y'_0(x) of the unfitted merge (D_k = D0_k), fitted as a
change Delta_k of the down projections, with a ridge towards the unfitted merge (r = ``FIT_RIDGE``
x the mean diagonal of the Gram matrix). Two solves, by size:

- **joint** (K x I <= ``FIT_JOINT_MAX``): z(x) = [g'_k(x) h_k(x)]_k, zero for the experts not chosen;
  G = sum z z^T [K I, K I], B = sum z e^T [K I, H], (G + r I) Delta^T = B. The exact least-squares
  fit of the layer (a target the pruned layer can represent is met); memory (K I)^2 + K I H
  float64 per layer (134 MB at K I = 4096).
- **per expert** (larger): e is shared among the experts the pruned router chose, in proportion to
  their gates: expert k on token x is fitted towards f0_k(x) + e(x) / G(x), G(x) = sum of the
  chosen gates, weighted by g'_k(x)^2 (if every expert met its target the output would be y).
  A_k = sum g'^2 h h^T [I, I], C_k = sum (g'^2 / G) h e^T [I, H], Delta_k^T = (A_k + r I)^-1 C_k:
  memory K x I x (I + H) float64 per layer.

**Never worse on the calibration tokens.** A second pass measures, per layer, ||e||^2, <e, Delta>
and ||Delta||^2 (Delta: the fitted change of the layer's output) and applies the step
t = clip(<e, Delta> / ||Delta||^2, 0, 1) that minimises the layer's squared error along the
correction: error(t) <= error(0), the unfitted merge's (per-expert corrections can overlap; the
joint one gives t close to 1).

An expert routed fewer than ``FIT_MIN_PAIRS`` x I pairs keeps its unfitted down projection. A layer
whose plan keeps every expert alone is not touched (``--keep E`` stays bit for bit). Each layer's
inputs are the original model's hidden states (as the profile sees them), so every layer is fitted
in the same two calibration passes, each one forward of the original model plus the pruned MoE
blocks; both models are held meanwhile (``prune`` frees the original after the fit: its peak is the
model plus the merged experts, where a plain merge's is the model plus one merged layer). The
normal equations of every fitted layer are held at once (the sizes above, per layer). In the
layer-by-layer prune (``layerwise.py``) each block is fitted in its layer's visit instead, over the
calls its original made there (``fit_blocks``): one layer's normal equations and calibration
inputs at a time, no second model, and it runs under ``--device-map``.

Families whose experts are not transformers' switchable fused experts, or that normalise each
expert's output (``post_expert_norm``: not linear in D), are refused with a message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import MoEAdapter, find_moe_layers
from .cluster import LayerPlan
from .errors import UncurlError
from .load import input_device
from .profile import indexed_batches, progress_bar

log = logging.getLogger(__name__)

FIT_RIDGE = 1e-3  # r = FIT_RIDGE x mean diagonal of A_k (as the test bed's construction: --ridge 1e-3)
FIT_MIN_PAIRS = 1.0  # an expert needs at least FIT_MIN_PAIRS x I routed pairs to be fitted
FIT_JOINT_MAX = 4096  # K x I up to this: one joint system, (K I)^2 float64 per layer (134 MB at 4096)


def intermediate(experts, k: int, x: torch.Tensor) -> torch.Tensor:
    """h_k(x) [n, I]: expert ``k``'s gated intermediate activations, as transformers' experts compute them."""
    proj = experts.gate_up_proj if experts.has_gate else experts.up_proj
    h = x @ proj[k] if experts.is_transposed else F.linear(x, proj[k])
    if experts.has_bias:
        h = h + (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[k]
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def down(experts, k: int, h: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """f_k = D_k h (+ b_k) [n, H]; ``delta`` [I, H]: the change of D_k^T to add."""
    w = experts.down_proj[k]
    y = h @ w if experts.is_transposed else F.linear(h, w)
    if experts.has_bias:
        y = y + experts.down_proj_bias[k]
    if delta is not None:
        y = y + (h.double() @ delta).to(y.dtype)
    return y


def unfittable(experts, name: str) -> str | None:
    """Why the fit cannot model the experts of block ``name`` (None: it can)."""
    if not hasattr(experts, "has_gate") or not hasattr(experts, "down_proj"):
        return f"the experts of {name} are not transformers' fused switchable experts"
    if getattr(experts, "has_post_expert_norm", False):
        return (f"the experts of {name} normalise their outputs (post_expert_norm), so the output is not linear in "
                f"the down projection")
    return None


def check_fittable(experts, name: str) -> None:
    why = unfittable(experts, name)
    if why:
        raise UncurlError(f"--merge fit: {why}; use --merge aligned or select")


def identity_plan(plan: LayerPlan, num_experts: int) -> bool:
    return plan.keep == num_experts and all(len(g) == 1 for g in plan.groups)


@dataclass
class _LayerFit:
    keep: int
    inter: int
    hidden: int
    device: torch.device
    joint: bool = False  # one [K I, K I] system (exact) instead of K blocks [I, I]
    a: torch.Tensor = None  # [K, I, I] float64, or [1, K I, K I] when joint
    c: torch.Tensor = None  # [K, I, H], or [1, K I, H]
    pairs: torch.Tensor = None  # [K]
    delta: list = None  # per expert: [I, H] float64 or None (pass 2)
    sums: dict = field(default_factory=lambda: {"ee": 0.0, "ed": 0.0, "dd": 0.0, "yy": 0.0, "tokens": 0})

    def __post_init__(self):
        k, i, h = self.keep, self.inter, self.hidden
        blocks, size = (1, k * i) if self.joint else (k, i)
        self.a = torch.zeros(blocks, size, size, dtype=torch.float64, device=self.device)
        self.c = torch.zeros(blocks, size, h, dtype=torch.float64, device=self.device)
        self.pairs = torch.zeros(k, dtype=torch.long)

    def solve(self, ridge: float) -> None:
        """The change of each D_k^T from the normal equations (None: too few pairs, left unfitted)."""
        enough = [int(p) >= FIT_MIN_PAIRS * self.inter for p in self.pairs]
        if not self.joint:
            self.delta = [solve(self.a[k], self.c[k], ridge) if enough[k] else None for k in range(self.keep)]
        else:
            keep = [k for k in range(self.keep) if enough[k]]
            index = torch.cat([torch.arange(k * self.inter, (k + 1) * self.inter) for k in keep]) if keep else None
            self.delta = [None] * self.keep
            if keep:
                index = index.to(self.a.device)
                change = solve(self.a[0][index][:, index], self.c[0][index], ridge)
                for j, k in enumerate(keep):
                    self.delta[k] = change[j * self.inter : (j + 1) * self.inter]
        self.a = self.c = None  # the normal equations are no longer needed


class _Passes:
    """Hooks on each original MoE block: the original experts' routed output, and the pruned block
    run on the same input with its experts replaced by a capture of (hidden, top-k index, weights)."""

    def __init__(self, original, pruned, adapter: MoEAdapter, names: list[str], joint_max: int):
        self.mode = "gram"
        self.mask: torch.Tensor | None = None
        self.layers: dict[str, _LayerFit] = {}
        self.handles = []
        self.seen: dict[str, tuple] = {}
        by_name = {layer.name: layer for layer in find_moe_layers(original, adapter)}
        for name in names:
            new_block = pruned.get_submodule(name)
            new_experts = getattr(new_block, adapter.experts_attr)
            check_fittable(by_name[name].experts, name)
            check_fittable(new_experts, name)
            w = new_experts.down_proj
            k, (i, h) = w.shape[0], ((w.shape[1], w.shape[2]) if new_experts.is_transposed else (w.shape[2], w.shape[1]))
            self.layers[name] = _LayerFit(k, i, h, w.device, joint=k * i <= joint_max)
            self.handles.append(by_name[name].experts.register_forward_hook(self._experts_hook(name)))
            self.handles.append(original.get_submodule(name).register_forward_hook(
                self._block_hook(name, new_block, new_experts), with_kwargs=True))

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, t.shape[-1])
        if self.mask is not None and self.mask.numel() == t.shape[0]:
            return t[self.mask]
        return t

    def _experts_hook(self, name):
        def hook(module, args, output):
            self.seen[name] = (self._rows(args[0]), self._rows(output))
        return hook

    def _block_hook(self, name, new_block, new_experts):
        def capture(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            self.seen[name + "/pruned"] = (self._rows(hidden_states), self._rows(top_k_index), self._rows(top_k_weights))
            return torch.zeros_like(hidden_states)

        def hook(module, args, kwargs, output):
            new_experts.forward = capture
            try:
                new_block(*args, **kwargs)
            finally:
                del new_experts.forward
            x, y = self.seen.pop(name)
            x2, index, weights = self.seen.pop(name + "/pruned")
            if x2.shape != x.shape:
                raise UncurlError(f"--merge fit: the pruned block {name} routes other rows ({tuple(x2.shape)}) than "
                                  f"the original's experts see ({tuple(x.shape)})")
            self._accumulate(self.layers[name], new_experts, x2, index, weights, y)
        return hook

    @torch.no_grad()
    def _accumulate(self, fit: _LayerFit, experts, x, index, weights, y):
        n = x.shape[0]
        valid = (index < fit.keep) & (weights != 0)
        gates = torch.where(valid, weights, torch.zeros_like(weights)).double()
        total = gates.sum(-1).clamp_min(1e-12)  # G(x)
        per = []
        y0 = torch.zeros(n, fit.hidden, dtype=torch.float64, device=x.device)
        for k in range(fit.keep):
            slot = (index == k) & valid
            tokens, which = torch.nonzero(slot, as_tuple=True)
            if not len(tokens):
                per.append(None)
                continue
            h = intermediate(experts, k, x[tokens])
            g = gates[tokens, which]
            y0.index_add_(0, tokens, down(experts, k, h).double() * g[:, None])
            per.append((tokens, g, h.double()))
        err = y.double() - y0
        if self.mode == "gram" and fit.joint:  # z(x) = [g_k h_k(x)]_k (zero where not routed); e ~ Delta z
            z = torch.zeros(n, fit.keep, fit.inter, dtype=torch.float64, device=x.device)
            for k, item in enumerate(per):
                if item is not None:
                    tokens, g, h = item
                    z[tokens, k] = h * g[:, None]
                    fit.pairs[k] += len(tokens)
            z = z.reshape(n, -1)
            fit.a[0] += z.T @ z
            fit.c[0] += z.T @ err
            return
        if self.mode == "gram":  # expert k towards f0_k + e / G, weighted by g^2
            for k, item in enumerate(per):
                if item is None:
                    continue
                tokens, g, h = item
                fit.a[k] += (h * (g * g)[:, None]).T @ h
                fit.c[k] += (h * (g * g / total[tokens])[:, None]).T @ err[tokens]
                fit.pairs[k] += len(tokens)
            return
        change = torch.zeros_like(y0)
        for k, item in enumerate(per):
            if item is None or fit.delta[k] is None:
                continue
            tokens, g, h = item
            change.index_add_(0, tokens, (h @ fit.delta[k]) * g[:, None])
        s = fit.sums
        s["ee"] += float((err * err).sum())
        s["ed"] += float((err * change).sum())
        s["dd"] += float((change * change).sum())
        s["yy"] += float((y.double() ** 2).sum())
        s["tokens"] += n

    def close(self):
        for h in self.handles:
            h.remove()


def solve(a: torch.Tensor, c: torch.Tensor, ridge: float = FIT_RIDGE) -> torch.Tensor:
    """(A + r I)^-1 C with r = ``ridge`` x mean diagonal of A: the change of D^T [I, H]."""
    r = ridge * float(a.diagonal().mean())
    return torch.linalg.solve(a + r * torch.eye(a.shape[0], dtype=a.dtype, device=a.device), c)


def _run(passes: "_Passes", original, tokenizer, texts, batch_size, max_length, progress, label):
    device = input_device(original)
    with progress_bar(progress, -(-len(texts) // batch_size), label) as advance:
        for _, batch in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
            batch = batch.to(device)
            passes.mask = batch["attention_mask"].reshape(-1).bool()
            original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                     use_cache=False)
            advance()


@torch.no_grad()
def layer_errors(original, pruned, adapter: MoEAdapter, tokenizer, texts, *, batch_size: int = 8,
                 max_length: int = 512) -> dict[str, float]:
    """Per MoE layer: sum ||y'(x) - y(x)||^2 / sum ||y(x)||^2 over the non-padding tokens of ``texts``,
    y the original layer's routed output and y' the pruned layer's on the same (original) inputs."""
    names = [layer.name for layer in find_moe_layers(original, adapter)]
    passes = _Passes(original, pruned, adapter, names, joint_max=0)
    passes.mode = "step"
    for fit in passes.layers.values():
        fit.a = fit.c = None
        fit.delta = [None] * fit.keep
    try:
        _run(passes, original, tokenizer, texts, batch_size, max_length, False, "")
    finally:
        passes.close()
    return {name: fit.sums["ee"] / (fit.sums["yy"] or 1.0) for name, fit in passes.layers.items()}


@torch.no_grad()
def fit_model(original, pruned, adapter: MoEAdapter, plans: dict[str, LayerPlan], tokenizer, texts, *,
              batch_size: int = 8, max_length: int = 512, progress: bool = False,
              ridge: float = FIT_RIDGE, joint_max: int = FIT_JOINT_MAX) -> dict:
    """Fit the down projections of ``pruned``'s MoE layers (in place) to ``original``'s routed outputs on
    ``texts``; returns the report entry: per layer the relative squared error before and after, the step,
    and the experts fitted or left (too few pairs)."""
    layers = find_moe_layers(original, adapter)
    names = [layer.name for layer in layers if not identity_plan(plans[layer.name], layer.num_experts)]
    report = fit_report(ridge)
    if not names:
        report["note"] = "every layer keeps every expert alone: nothing to fit"
        return report

    def replay(passes: _Passes, mode: str) -> None:
        _run(passes, original, tokenizer, texts, batch_size, max_length, progress,
             f"fitting ({'normal equations' if mode == 'gram' else 'step'})")

    report["layers"] = fit_blocks(original, pruned, adapter, names, replay, ridge=ridge, joint_max=joint_max)
    return report


def fit_report(ridge: float = FIT_RIDGE) -> dict:
    """The report's ``fit`` entry without its layers (``fit_blocks`` gives those)."""
    return {"ridge": ridge, "ridge_is": "ridge x mean diagonal of each expert's A = sum g^2 h h^T",
            "min_pairs": f"{FIT_MIN_PAIRS:g} x intermediate size", "target": "the original layer's routed output",
            "layers": {}}


@torch.no_grad()
def fit_blocks(original, pruned, adapter: MoEAdapter, names: list[str], replay, *, ridge: float = FIT_RIDGE,
               joint_max: int = FIT_JOINT_MAX, reduce=None) -> dict:
    """Fit the down projections of ``pruned``'s MoE blocks ``names`` (in place) to ``original``'s;
    ``replay(passes, mode)`` runs the calibration data through ``original``'s blocks ``names``
    (setting ``passes.mask`` per batch), once per mode ("gram", then "step"): the whole model over
    the texts (``fit_model``) or each block over its cached calls (the layer-by-layer prune).
    ``reduce(tensors)``, under torchrun, sums tensors over the ranks in place
    (``distributed.sum_over_ranks``): each rank replays its share of the data, and the normal
    equations and the error sums are added up before they are used, so every rank fits alike.
    Returns the per-layer report entries."""
    passes = _Passes(original, pruned, adapter, names, joint_max)
    try:
        for mode in ("gram", "step"):
            passes.mode = mode
            replay(passes, mode)
            for fit in passes.layers.values():  # every rank has the same layers, in the same order
                if mode == "gram":
                    if reduce is not None:
                        reduce([fit.a, fit.c, fit.pairs])
                    fit.solve(ridge)
                elif reduce is not None:
                    keys = ("ee", "ed", "dd", "yy", "tokens")
                    sums = torch.tensor([float(fit.sums[k]) for k in keys], dtype=torch.float64)
                    reduce([sums])
                    fit.sums.update({k: (int(v) if k == "tokens" else float(v)) for k, v in zip(keys, sums.tolist())})
    finally:
        passes.close()
    out = {}
    for name, fit in passes.layers.items():
        s = fit.sums
        step = min(max(s["ed"] / s["dd"], 0.0), 1.0) if s["dd"] > 0 else 0.0
        after = s["ee"] - 2 * step * s["ed"] + step * step * s["dd"]
        experts = getattr(pruned.get_submodule(name), adapter.experts_attr)
        w = experts.down_proj
        for k, delta in enumerate(fit.delta):
            if delta is None or step == 0.0:
                continue
            change = step * (delta if experts.is_transposed else delta.T)
            w.data[k] = (w.data[k].double() + change.to(w.device)).to(w.dtype)
        yy = s["yy"] or 1.0
        out[name] = {
            "error_before": s["ee"] / yy, "error_after": max(after, 0.0) / yy,  # relative to ||y||^2
            "step": step, "solve": "joint" if fit.joint else "per expert", "tokens": s["tokens"],
            "pairs": fit.pairs.tolist(),
            "fitted": sum(d is not None for d in fit.delta), "unfitted": sum(d is None for d in fit.delta),
        }
        log.info("fit %s: relative error %.4f -> %.4f (step %.3f)", name, s["ee"] / yy, after / yy, step)
    return out
