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

**Never worse on the calibration tokens.** Per layer, ||e||^2, <e, Delta> and ||Delta||^2 (Delta: the
fitted change of the layer's output) give the step t = clip(<e, Delta> / ||Delta||^2, 0, 1) that
minimises the layer's squared error along the correction: error(t) <= error(0), the unfitted
merge's (per-expert corrections can overlap; the joint one gives t close to 1). The joint solve
has them from its normal equations (<e, Delta> = tr(Delta^T B), ||Delta||^2 = tr(Delta^T G Delta)),
so it needs no second pass; the per-expert solve measures them in a second pass over the calls.

An expert routed fewer than ``FIT_MIN_PAIRS`` x I pairs keeps its unfitted down projection. A layer
whose plan keeps every expert alone is not touched (``--keep E`` stays bit for bit).

**Cost** (``fit_blocks``). The products are float32 (h is the model's own float32 or bf16
activation), accumulated per call into float64 normal equations, which the solve needs (its
condition number reaches ~I / ``FIT_RIDGE``); the step's sums are float64 too. Each call's pairs are
sorted by expert and each expert's rows are one contiguous matmul: no ``index_add_`` (float64
``index_add_`` is nondeterministic on CUDA), so a seed gives the same bytes run to run, on any
device. In the layer-by-layer prune (``layerwise.py``) each block is fitted in its layer's visit
from what that visit recorded: the original experts' outputs (the target) and the block's inputs,
so the original block is not run again. The first sweep over those calls computes the residual e
once (kept, in float32, in place of the target) and the normal equations; the per-expert step is
one more sweep (h again, and its product with Delta). The normal equations are sized before they
are built: K x I x (I + H) float64 per expert set (joint: (K I)^2 + K I H, at most
``FIT_JOINT_MAX``^2), against ``FIT_MEMORY_SHARE`` of the device's free memory (or ``memory``);
when they do not fit, the experts are fitted a chunk at a time, one sweep each (the same numbers,
bit for bit, as in one sweep). The whole-model fit (``fit_model``: ``--recover``, ``--profile``, a
sweep) runs the original model once per sweep instead, with every fitted layer's equations held
at once; both models are held meanwhile (``prune`` frees the original after the fit).

Families whose experts are not transformers' switchable fused experts, or that normalise each
expert's output (``post_expert_norm``: not linear in D), are refused with a message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .adapters import MoEAdapter, find_moe_layers
from .cluster import LayerPlan
from .errors import UncurlError
from .load import available_memory, input_device
from .profile import indexed_batches, progress_bar

log = logging.getLogger(__name__)

FIT_RIDGE = 1e-3  # r = FIT_RIDGE x mean diagonal of A_k (as the test bed's construction: --ridge 1e-3)
FIT_MIN_PAIRS = 1.0  # an expert needs at least FIT_MIN_PAIRS x I routed pairs to be fitted
FIT_JOINT_MAX = 4096  # K x I up to this: one joint system, (K I)^2 float64 per layer (134 MB at 4096)
FIT_MEMORY_SHARE = 0.5  # the normal equations may take this share of the device's free memory (else chunked)
# a call's tokens are fitted in blocks of this many rows: the per-expert solve's float32 products span at
# most that many rows before they are added into float64, so the rounding of each sum grows with
# sqrt(FIT_ROWS), not with the calibration set (~1e-6 relative, against a ridge of 1e-3 of the mean
# diagonal); and a block's work (its intermediates) does not grow with the batch
FIT_ROWS = 1024
FIT_BAND = 128  # rows of A_k's upper triangle per band of its packed storage


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
class _Routed:
    """A block of rows of one call of a pruned block: its experts' input and the pruned router's choices there,
    the pairs sorted by expert (``slices[k]``: positions in the [n, top-k] pair grid, their rows of
    ``x`` and their gates), and the residual e once computed."""

    x: torch.Tensor  # [N, H] what the experts get, padding rows included
    rows: torch.Tensor  # the block's rows of x (non-padding), on the router's device
    n: int  # their number
    top_k: int
    total: torch.Tensor  # [n] float32: G(x), the sum of the chosen gates
    slices: list  # per kept expert: (pair positions, local rows, rows of x, gates float32) or None
    e: torch.Tensor | None = None  # [n, H] float32: y - y'_0 on the non-padding rows


class _Layer:
    """One pruned MoE block's fit: sizes, normal equations (of the experts in ``chunk``), solution,
    error sums."""

    def __init__(self, name: str, block, experts, joint_max: int):
        self.name, self.block, self.experts = name, block, experts
        w = experts.down_proj
        self.keep = w.shape[0]
        self.inter, self.hidden = (w.shape[1], w.shape[2]) if experts.is_transposed else (w.shape[2], w.shape[1])
        self.device = w.device
        self.joint = self.keep * self.inter <= joint_max
        self.pairs = torch.zeros(self.keep, dtype=torch.long)
        self.delta: list = [None] * self.keep  # per expert: the change of D_k^T [I, H] float32, or None
        self.chunk: list[int] = []  # experts whose normal equations are being accumulated
        # per expert of chunk: A's upper triangle packed and C [I, H], float64; joint: G [K I, K I], B [K I, H]
        self.a = self.c = None
        self.sums = {"ee": 0.0, "ed": 0.0, "dd": 0.0, "yy": 0.0, "tokens": 0}
        self.cache: list[_Routed] = []  # the calls' routing and residual, when the source keeps them

    def bytes_per_expert(self) -> int:
        """A_k's upper triangle (packed) and C_k, float64."""
        return (self.packed() + self.inter * self.hidden) * 8

    def joint_bytes(self) -> int:
        size = self.keep * self.inter
        return size * (size + self.hidden) * 8

    def start(self, chunk: list[int]) -> None:
        """Zeroed normal equations for the experts ``chunk`` (sized by ``plan_chunks``)."""
        self.chunk = list(chunk)
        if self.joint:
            size = self.keep * self.inter
            self.a = torch.zeros(size, size, dtype=torch.float64, device=self.device)
            self.c = torch.zeros(size, self.hidden, dtype=torch.float64, device=self.device)
        else:  # A_k symmetric: the rows of its upper triangle in bands of FIT_BAND (A[r0:r1, r0:]), packed
            i = self.inter
            self.a = [torch.zeros(self.packed(), dtype=torch.float64, device=self.device) for _ in chunk]
            self.c = [torch.zeros(i, self.hidden, dtype=torch.float64, device=self.device) for _ in chunk]

    def bands(self):
        """(first row, last row, offset in the packed A) of each band of A's upper triangle."""
        offset = 0
        for r0 in range(0, self.inter, FIT_BAND):
            r1 = min(r0 + FIT_BAND, self.inter)
            yield r0, r1, offset
            offset += (r1 - r0) * (self.inter - r0)

    def packed(self) -> int:
        return sum((r1 - r0) * (self.inter - r0) for r0, r1, _ in self.bands())

    def enough(self, k: int) -> bool:
        return int(self.pairs[k]) >= FIT_MIN_PAIRS * self.inter

    # -- one call -----------------------------------------------------------------------------------

    @torch.no_grad()
    def route(self, args, kwargs, mask) -> list[_Routed]:
        """The pruned block run on the original block's call with its experts replaced by a capture
        of (hidden, top-k index, weights): its router as the pruned layer will route."""
        seen = []

        def capture(hidden_states, top_k_index, top_k_weights, *a, **k):
            seen.append((hidden_states, top_k_index, top_k_weights))
            return torch.zeros_like(hidden_states)

        self.experts.forward = capture
        try:
            self.block(*args, **kwargs)
        finally:
            del self.experts.forward
        return self.routed(*seen[0], mask)

    @torch.no_grad()
    def routed(self, x, index, weights, mask) -> list[_Routed]:
        """The pairs of one call (the experts' input, the pruned router's top-k index and weights) on
        the non-padding rows of ``mask``, in blocks of at most ``FIT_ROWS`` rows (what a block's
        work holds at once does not grow with the batch), each block's pairs sorted by expert."""
        x = x.reshape(-1, x.shape[-1])
        index, weights = index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1])
        rows = torch.arange(x.shape[0], device=index.device)
        if mask is not None and mask.numel() == x.shape[0]:
            mask = mask.to(index.device)  # the batch's mask may live where the inputs started
            if not bool(mask.all()):
                rows = mask.nonzero().squeeze(1)
                index, weights = index[rows], weights[rows]
        top_k = index.shape[1]
        valid = (index < self.keep) & (weights != 0)
        gates = torch.where(valid, weights, torch.zeros_like(weights)).float()
        expert = torch.where(valid, index, torch.full_like(index, self.keep))
        blocks = []
        for first in range(0, len(rows), FIT_ROWS):
            part = slice(first, first + FIT_ROWS)
            block_rows, block_gates = rows[part], gates[part]
            order = torch.argsort(expert[part].reshape(-1), stable=True)  # by expert, in row order within each
            sizes = torch.bincount(expert[part].reshape(-1), minlength=self.keep + 1).tolist()
            flat, slices, start = block_gates.reshape(-1), [], 0
            for k in range(self.keep):
                positions = order[start:start + sizes[k]]
                start += sizes[k]
                if not len(positions):
                    slices.append(None)
                    continue
                local = positions // top_k
                slices.append((positions, local, block_rows[local], flat[positions]))
            blocks.append(_Routed(x, block_rows, len(block_rows), top_k, block_gates.sum(-1).clamp_min(1e-12), slices))
        return blocks

    @torch.no_grad()
    def residual(self, call: _Routed, y: torch.Tensor, first: bool, keep: set[int]) -> dict[int, torch.Tensor]:
        """e = y - y'_0 on the call's rows (``call.e``; its sums counted on the ``first`` sweep); the
        intermediates h of the experts in ``keep``, for the normal equations."""
        y = y.reshape(-1, y.shape[-1])[call.rows.to(y.device)].to(self.device, torch.float32)
        grid = torch.zeros(call.n * call.top_k, self.hidden, dtype=torch.float32, device=self.device)
        hs = {}
        for k, item in enumerate(call.slices):
            if item is None:
                continue
            positions, _, rows, g = item
            h = intermediate(self.experts, k, call.x[rows])
            grid[positions] = down(self.experts, k, h).float() * g[:, None]
            if k in keep:
                hs[k] = h
        call.e = y - grid.view(call.n, call.top_k, self.hidden).sum(1)
        if first:
            s = self.sums
            s["ee"] += float(call.e.pow(2).sum(dtype=torch.float64))
            s["yy"] += float(y.pow(2).sum(dtype=torch.float64))
            s["tokens"] += call.n
            for k, item in enumerate(call.slices):
                if item is not None:
                    self.pairs[k] += len(item[0])
        return hs

    @torch.no_grad()
    def accumulate(self, call: _Routed, hs: dict[int, torch.Tensor]) -> None:
        """The normal equations of the experts in ``chunk`` gain this call's pairs: float32 products
        of each expert's rows (contiguous), added into float64."""
        i = self.inter
        if not self.joint:
            for j, k in enumerate(self.chunk):
                item = call.slices[k]
                if item is None:
                    continue
                _, local, rows, g = item
                h = hs.pop(k) if k in hs else intermediate(self.experts, k, call.x[rows])
                z = h.float() * g[:, None]  # g h
                del h
                # float32 products over at most FIT_ROWS rows (the block's), written in A's packed layout (only
                # its upper triangle is computed: about half the products), then added into float64 in one op,
                # converted first: the same sums as an add across dtypes, which casts element by element (18x
                # slower on one core, measured) and, a band at a time, would be three ops a band where each op
                # costs a barrier of torch's threads on a busy machine
                products = torch.empty(self.packed(), dtype=z.dtype, device=self.device)  # freed before the next
                for r0, r1, offset in self.bands():  # sum g^2 h h^T
                    band = products[offset:offset + (r1 - r0) * (i - r0)].view(r1 - r0, i - r0)
                    torch.mm(z[:, r0:r1].T, z[:, r0:], out=band)
                self.a[j].add_(products.double())
                del products, band
                product = z.T @ (call.e[local] * (g / call.total[local])[:, None])  # sum (g^2 / G) h e^T
                self.c[j].add_(product.double())
                del product
            return
        scaled = {}
        for k in self.chunk:
            item = call.slices[k]
            if item is None:
                continue
            rows, g = item[2], item[3]
            h = hs.pop(k) if k in hs else intermediate(self.experts, k, call.x[rows])
            # z's block k on its rows, g h, in float64: the joint system is small by construction, and
            # exact where the target can be met, which float32 products would not keep at a tiny ridge
            scaled[k] = h.double() * g.double()[:, None]
        i = self.inter
        member = {}  # expert -> position of each row among its pairs (-1: not routed there)
        for k, z in scaled.items():
            local = call.slices[k][1]
            self.c[k * i:(k + 1) * i].add_(z.T @ call.e[local].double())  # B = sum z e^T
            where = torch.full((call.n,), -1, dtype=torch.long, device=self.device)
            where[local] = torch.arange(len(local), device=self.device)
            member[k] = where
        experts = sorted(scaled)
        for a, k in enumerate(experts):  # G's upper blocks: the rows routed to both k and l
            for l in experts[a:]:
                if k == l:
                    block = scaled[k].T @ scaled[k]
                else:
                    both = ((member[k] >= 0) & (member[l] >= 0)).nonzero().squeeze(1)
                    if not len(both):
                        continue
                    block = scaled[k][member[k][both]].T @ scaled[l][member[l][both]]
                self.a[k * i:(k + 1) * i, l * i:(l + 1) * i].add_(block)

    @torch.no_grad()
    def measure(self, call: _Routed) -> None:
        """<e, Delta> and ||Delta||^2 on this call (the per-expert solve's step)."""
        grid = torch.zeros(call.n * call.top_k, self.hidden, dtype=torch.float32, device=self.device)
        for k, item in enumerate(call.slices):
            if item is None or self.delta[k] is None:
                continue
            positions, _, rows, g = item
            h = intermediate(self.experts, k, call.x[rows])
            grid[positions] = (h.float() @ self.delta[k]) * g[:, None]
        change = grid.view(call.n, call.top_k, self.hidden).sum(1)
        self.sums["ed"] += float((call.e * change).sum(dtype=torch.float64))
        self.sums["dd"] += float(change.pow(2).sum(dtype=torch.float64))

    # -- after a sweep ------------------------------------------------------------------------------

    @torch.no_grad()
    def solve(self, ridge: float) -> None:
        """The change of each D_k^T of ``chunk`` from its normal equations (None: too few pairs);
        the joint solve also gives the step's sums, from G and B."""
        i = self.inter
        if not self.joint:
            for j, k in enumerate(self.chunk):
                packed, c = self.a[j], self.c[j]
                self.a[j] = self.c[j] = None  # each expert's equations go as it is solved
                if self.enough(k):
                    a = torch.empty(i, i, dtype=torch.float64, device=self.device)
                    for r0, r1, offset in self.bands():
                        a[r0:r1, r0:] = packed[offset:offset + (r1 - r0) * (i - r0)].view(r1 - r0, i - r0)
                    del packed
                    self.delta[k] = solve(a, c, ridge, inplace=True, upper=True).float()
            self.a = self.c = None
            return
        keep = [k for k in range(self.keep) if self.enough(k)]
        for k in range(self.keep):  # G from its upper blocks
            for l in range(k + 1, self.keep):
                self.a[l * i:(l + 1) * i, k * i:(k + 1) * i] = self.a[k * i:(k + 1) * i, l * i:(l + 1) * i].T
        if keep:
            index = torch.cat([torch.arange(k * i, (k + 1) * i) for k in keep]).to(self.device)
            g, b = self.a[index][:, index], self.c[index]
            self.a = self.c = None
            change = solve(g, b, ridge)
            self.sums["ed"] += float((change * b).sum())  # tr(Delta^T B)
            self.sums["dd"] += float((change * (g @ change)).sum())  # tr(Delta^T G Delta)
            for j, k in enumerate(keep):
                self.delta[k] = change[j * i:(j + 1) * i].float()
        self.a = self.c = None


def plan_chunks(layers: list[_Layer], memory: int | None, device: torch.device) -> dict[str, list[list[int]]]:
    """Per layer, its experts in the chunks whose normal equations are built one sweep at a time:
    all at once where every layer's fit in ``layers`` within ``memory`` bytes (None:
    ``FIT_MEMORY_SHARE`` of ``device``'s free memory), else as many experts per chunk as fit (at
    least one). A joint system that does not fit is solved per expert instead."""
    if memory is None:
        free = available_memory(device)
        memory = int(FIT_MEMORY_SHARE * free) if free is not None else None
    out = {}
    share = None if memory is None else max(memory // max(len(layers), 1), 0)
    for layer in layers:
        if layer.joint and share is not None and layer.joint_bytes() > share:
            log.warning("fit %s: the joint system (%.0f MB) does not fit the fit's memory (%.0f MB): solved per "
                        "expert", layer.name, layer.joint_bytes() / 2**20, share / 2**20)
            layer.joint = False
        if layer.joint or share is None:
            out[layer.name] = [list(range(layer.keep))]
            continue
        size = max(1, min(layer.keep, share // layer.bytes_per_expert()))
        out[layer.name] = [list(range(k, min(k + size, layer.keep))) for k in range(0, layer.keep, size)]
        if len(out[layer.name]) > 1:
            log.info("fit %s: normal equations of %.0f MB against %.0f MB: %d experts per sweep", layer.name,
                     layer.keep * layer.bytes_per_expert() / 2**20, share / 2**20, size)
    return out


def solve(a: torch.Tensor, c: torch.Tensor, ridge: float = FIT_RIDGE, inplace: bool = False,
          upper: bool = False) -> torch.Tensor:
    """(A + r I)^-1 C with r = ``ridge`` x mean diagonal of A: the change of D^T [I, H]. By Cholesky
    (A + r I is symmetric positive definite; LU where rounding says otherwise). ``inplace``: A's
    diagonal gains r in place. ``upper``: only A's upper triangle is given (what lies below is not
    read; the Cholesky factor is taken from the upper triangle, so no symmetric copy is built unless
    LU is needed)."""
    r = ridge * float(a.diagonal().mean())
    if not inplace:
        a = a.clone()
    a.diagonal().add_(r)
    factor, info = torch.linalg.cholesky_ex(a, upper=upper)
    if int(info) == 0:
        return torch.cholesky_solve(c, factor, upper=upper)
    del factor
    if upper:
        a = a.triu_()
        a += a.triu(1).T
    return torch.linalg.solve(a, c)


Source = Callable[[Callable], None]  # source(fn): fn(name, args, kwargs, y, mask) for every call of every block


class Replay:
    """Hooks on ``original``'s MoE blocks ``names``: each call of a block hands (its arguments, its
    experts' routed output, the batch's mask) to ``fn``, once the block has run."""

    def __init__(self, original, adapter: MoEAdapter, names: list[str]):
        self.fn = None
        self.mask = None
        self.handles = []
        self.outputs: dict[str, torch.Tensor] = {}
        by_name = {layer.name: layer for layer in find_moe_layers(original, adapter)}
        for name in names:
            self.handles.append(by_name[name].experts.register_forward_hook(
                lambda module, args, output, name=name: self.outputs.__setitem__(name, output)))
            self.handles.append(original.get_submodule(name).register_forward_hook(
                lambda module, args, kwargs, output, name=name: self.fn(name, args, kwargs, self.outputs.pop(name),
                                                                       self.mask), with_kwargs=True))

    def close(self):
        for h in self.handles:
            h.remove()


def _run(replay: Replay, original, tokenizer, texts, batch_size, max_length, progress, label):
    device = input_device(original)
    with progress_bar(progress, -(-len(texts) // batch_size), label) as advance:
        for _, batch in indexed_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
            batch = batch.to(device)
            replay.mask = batch["attention_mask"].reshape(-1).bool()
            original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                     use_cache=False)
            advance()


@torch.no_grad()
def layer_errors(original, pruned, adapter: MoEAdapter, tokenizer, texts, *, batch_size: int = 8,
                 max_length: int = 512) -> dict[str, float]:
    """Per MoE layer: sum ||y'(x) - y(x)||^2 / sum ||y(x)||^2 over the non-padding tokens of ``texts``,
    y the original layer's routed output and y' the pruned layer's on the same (original) inputs:
    the pruned block run as it is, its experts' output read by a hook (apart from the fit's own sums)."""
    names = [layer.name for layer in find_moe_layers(original, adapter)]
    sums = {name: [0.0, 0.0] for name in names}
    new_out = {}
    handles = [getattr(pruned.get_submodule(name), adapter.experts_attr).register_forward_hook(
        lambda module, args, output, name=name: new_out.__setitem__(name, output)) for name in names]
    replay = Replay(original, adapter, names)

    def fn(name, args, kwargs, y, mask):
        pruned.get_submodule(name)(*args, **kwargs)
        y2 = new_out.pop(name).reshape(-1, y.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        if mask is not None and mask.numel() == y.shape[0]:
            y, y2 = y[mask.to(y.device)], y2[mask.to(y2.device)]
        sums[name][0] += float(((y2 - y) ** 2).sum())
        sums[name][1] += float((y ** 2).sum())

    replay.fn = fn
    try:
        _run(replay, original, tokenizer, texts, batch_size, max_length, False, "")
    finally:
        replay.close()
        for h in handles:
            h.remove()
    return {name: ee / (yy or 1.0) for name, (ee, yy) in sums.items()}


@torch.no_grad()
def fit_model(original, pruned, adapter: MoEAdapter, plans: dict[str, LayerPlan], tokenizer, texts, *,
              batch_size: int = 8, max_length: int = 512, progress: bool = False,
              ridge: float = FIT_RIDGE, joint_max: int = FIT_JOINT_MAX, memory: int | None = None) -> dict:
    """Fit the down projections of ``pruned``'s MoE layers (in place) to ``original``'s routed outputs on
    ``texts``; returns the report entry: per layer the relative squared error before and after, the step,
    and the experts fitted or left (too few pairs). Each sweep is one forward of ``original``."""
    layers = find_moe_layers(original, adapter)
    names = [layer.name for layer in layers if not identity_plan(plans[layer.name], layer.num_experts)]
    report = fit_report(ridge)
    if not names:
        report["note"] = "every layer keeps every expert alone: nothing to fit"
        return report
    replay = Replay(original, adapter, names)

    def source(fn, label):
        replay.fn = fn
        _run(replay, original, tokenizer, texts, batch_size, max_length, progress, f"fitting ({label})")

    try:
        report["layers"] = fit_blocks(original, pruned, adapter, names, source, ridge=ridge, joint_max=joint_max,
                                      memory=memory)
    finally:
        replay.close()
    return report


def fit_report(ridge: float = FIT_RIDGE) -> dict:
    """The report's ``fit`` entry without its layers (``fit_blocks`` gives those)."""
    return {"ridge": ridge, "ridge_is": "ridge x mean diagonal of each expert's A = sum g^2 h h^T",
            "min_pairs": f"{FIT_MIN_PAIRS:g} x intermediate size", "target": "the original layer's routed output",
            "layers": {}}


@torch.no_grad()
def fit_blocks(original, pruned, adapter: MoEAdapter, names: list[str], source, *, ridge: float = FIT_RIDGE,
               joint_max: int = FIT_JOINT_MAX, reduce=None, memory: int | None = None, kept: bool = False) -> dict:
    """Fit the down projections of ``pruned``'s MoE blocks ``names`` (in place) to ``original``'s.
    ``source(fn, label)`` hands every call of the original blocks ``names`` over the calibration data
    to ``fn(name, args, kwargs, y, mask)``: the block's arguments, its experts' routed output y and
    the batch's non-padding mask, in the same order on every sweep (``fit_model``: a forward of
    ``original`` per sweep; the layer-by-layer prune: the calls its visit recorded). With ``kept``
    the fit keeps each call's routing and residual after the first sweep (and the source may drop
    its y): later sweeps pass y as None. ``memory``: bytes the normal equations may take (None:
    ``FIT_MEMORY_SHARE`` of the device's free memory; ``plan_chunks``). ``reduce(tensors)``, under
    torchrun, sums tensors over the ranks in place (``distributed.sum_over_ranks``): each rank
    replays its share of the data, and the normal equations and the error sums are added up before
    they are used, so every rank fits alike. Returns the per-layer report entries."""
    by_name = {layer.name: layer for layer in find_moe_layers(original, adapter)}
    fits: dict[str, _Layer] = {}
    for name in names:
        new_block = pruned.get_submodule(name)
        new_experts = getattr(new_block, adapter.experts_attr)
        check_fittable(by_name[name].experts, name)
        check_fittable(new_experts, name)
        fits[name] = _Layer(name, new_block, new_experts, joint_max)
    chunks = plan_chunks(list(fits.values()), memory, next(iter(fits.values())).device)
    sweeps = max(len(c) for c in chunks.values())
    counters: dict[str, int] = {}

    def each_block(fit: _Layer, args, kwargs, y, mask, first: bool, work) -> None:
        """``work(block, hs)`` on each block of this call, with its routing and residual: from the
        fit's cache after the first sweep (``kept``), else computed (the error sums counted on the
        ``first`` sweep only), with the intermediates of the experts being fitted (``hs``)."""
        if kept and not first:
            i = counters[fit.name] = counters.get(fit.name, -1) + 1
            for block in fit.cache[i]:
                work(block, {})
            return
        blocks = fit.route(args, kwargs, mask)
        for block in blocks:
            work(block, fit.residual(block, y, first, set(fit.chunk)))
        if kept:
            fit.cache.append(blocks)

    def equations(sweep: int):
        def fn(name, args, kwargs, y, mask):
            fit = fits[name]
            if sweep == 0 or fit.chunk:
                each_block(fit, args, kwargs, y, mask, sweep == 0, fit.accumulate)
        return fn

    for sweep in range(sweeps):
        counters.clear()
        for name, fit in fits.items():
            if sweep < len(chunks[name]):
                fit.start(chunks[name][sweep])
        source(equations(sweep), "normal equations" if sweeps == 1 else f"normal equations {sweep + 1}/{sweeps}")
        for fit in fits.values():  # every rank has the same layers, in the same order
            if sweep == 0 and reduce is not None:
                reduce([fit.pairs])
            if fit.chunk:
                if reduce is not None:
                    reduce([fit.a, fit.c] if fit.joint else [*fit.a, *fit.c])
                fit.solve(ridge)
                fit.chunk = []

    stepped = {fit.name for fit in fits.values() if not fit.joint and any(d is not None for d in fit.delta)}
    if stepped:  # the per-expert solve's step: one more sweep, h again and its product with Delta
        def measure(name, args, kwargs, y, mask):
            if name in stepped:
                each_block(fits[name], args, kwargs, y, mask, False, lambda block, hs: fits[name].measure(block))

        counters.clear()
        source(measure, "step")
    for fit in fits.values():
        fit.cache = []
        if reduce is not None:
            keys = ("ee", "ed", "dd", "yy", "tokens") if not fit.joint else ("ee", "yy", "tokens")
            sums = torch.tensor([float(fit.sums[k]) for k in keys], dtype=torch.float64)
            reduce([sums])
            fit.sums.update({k: (int(v) if k == "tokens" else float(v)) for k, v in zip(keys, sums.tolist())})
    out = {}
    for name, fit in fits.items():
        s = fit.sums
        step = min(max(s["ed"] / s["dd"], 0.0), 1.0) if s["dd"] > 0 else 0.0
        after = s["ee"] - 2 * step * s["ed"] + step * step * s["dd"]
        experts = fit.experts
        w = experts.down_proj
        for k, delta in enumerate(fit.delta):
            if delta is None or step == 0.0:
                continue
            change = step * (delta if experts.is_transposed else delta.T).double()
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
