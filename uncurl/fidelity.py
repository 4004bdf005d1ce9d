"""Generation fidelity against the parent: how often a pruned model would say what its parent says.

    uncurl eval --model runs/k4 --parent ORG/PARENT --task superglue-rte --gen-tokens 32 --limit 60

The parent greedily continues each evaluation prompt for ``--gen-tokens`` tokens (stopping after
its end-of-text token); then the pruned model is teacher-forced on prompt + continuation, and at
each continuation token, with p the parent's next-token distribution there and q the pruned
model's:

- ``agreement``: whether q's top token is p's (top-1 agreement; ties go to the first token);
- ``acceptance``: sum_v min(p_v, q_v), the chance that a speculative decoder drafting with the
  pruned model has its token accepted by the parent (EvoESAP's ESAP);
- ``kl``: KL(p || q) in nats;
- ``nll``: -log q of the parent's own token (the pruned model's loss on the parent's text).

Each is averaged over a prompt's continuation tokens, then reported as the mean over prompts with
its standard error (sample standard deviation / sqrt(prompts)); ``paired`` compares two models
prompt by prompt (the difference's mean and standard error).

The parent is run once, before the pruned model exists or after it is gone (``parent_reference``):
its continuations and, at each continuation token, its ``STORED`` most likely tokens' log-probs and
the log of the mass left outside them (a :class:`Reference`, CPU tensors, about 8 kB per token) are
all the scoring needs, so the parent is never held beside the pruned model. Exactness: where the
vocabulary has at most ``STORED`` tokens (every built-in model) the full distribution is kept and
every measure is exact (float32). Above it, agreement and nll stay exact, and acceptance and KL are
those of the two distributions coarsened to the stored tokens plus one "other" bin: acceptance is
then at most the parent's tail mass above the true value, and KL is a lower bound of the true KL
(merging outcomes never increases a divergence). ``tail`` reports the parent's mean tail mass, so the
bound's width is on record; for greedy continuations of a trained model it is usually well below
0.001 at 1024 tokens. A parent scored against its own reference gives exactly agreement 1 and KL 0,
and acceptance 1 to float rounding, whatever the storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .load import input_device
from .profile import progress_bar

STORED = 1024  # the parent's most likely tokens kept per continuation token (the whole vocabulary when smaller)
MEASURES = ("agreement", "acceptance", "kl", "nll")
DEFAULT_GEN_TOKENS = 32


@dataclass
class Reference:
    """The parent's side of the measure, for each prompt: its token ids (truncated from the left),
    the greedy continuation, and at each continuation token the parent's top token (``best``), its
    ``STORED`` most likely tokens (``top_ids``, ``top_logp``) and the log of the rest's mass
    (``log_tail``, -inf when nothing is left out)."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    best: list[torch.Tensor] = field(default_factory=list)  # [n] int64
    top_ids: list[torch.Tensor] = field(default_factory=list)  # [n, S] int32
    top_logp: list[torch.Tensor] = field(default_factory=list)  # [n, S] float32
    log_tail: list[torch.Tensor] = field(default_factory=list)  # [n] float32
    gen_tokens: int = DEFAULT_GEN_TOKENS
    fingerprint: str = ""  # the evaluation examples' (tasks.data_fingerprint)

    @property
    def sequences(self) -> list[list[int]]:
        return [p + c for p, c in zip(self.prompts, self.continuations)]

    def tail_mass(self) -> float:
        """The parent's mean probability outside the stored tokens, over every continuation token."""
        tails = torch.cat(self.log_tail).double().exp() if self.log_tail else torch.zeros(0)
        return float(tails.mean()) if tails.numel() else 0.0


def prompt_ids(tokenizer, prompts: Sequence[str], max_length: int, gen_tokens: int) -> list[list[int]]:
    """Each prompt's tokens (no special tokens, as evaluation's requests), kept from the right so that
    prompt + continuation fit ``max_length``."""
    room = max(max_length - gen_tokens, 1)
    out = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-room:]
        out.append(ids or [tokenizer.eos_token_id or 0])
    return out


def forward_each(model, sequences: list[list[int]], *, batch_size: int, pad_id: int,
                 on_logits: Callable[[int, torch.Tensor], None], adapter=None, progress: bool = False,
                 label: str = "fidelity") -> None:
    """``on_logits(i, logits of sequences[i] [len, V])`` for every sequence, in right-padded batches
    of ``batch_size``, longest first (the same batches for the same sequences, so two models are
    compared on the same arithmetic); ``adapter``: layer by layer (``sequential.forward_layer_by_layer``)."""
    device = input_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[r, : len(sequences[i])] = 1
        batches.append((rows, ids, mask))

    @torch.no_grad()
    def work(model, batch) -> None:
        rows, ids, mask = batch
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for r, i in enumerate(rows):
            on_logits(i, logits[r, : len(sequences[i])])
        del logits

    if adapter is not None:
        from .sequential import forward_layer_by_layer

        forward_layer_by_layer(model, adapter, batches, work, progress=progress, label=label)
        return
    with progress_bar(progress, len(batches), label) as advance:
        for batch in batches:
            work(model, batch)
            advance()


def greedy(model, prompts: list[list[int]], gen_tokens: int, *, eos_id: int | None, batch_size: int, pad_id: int,
           adapter=None, progress: bool = False, stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Each prompt's greedy continuation of ``gen_tokens`` tokens (fewer where the end-of-text token
    comes first: it is kept; or where ``stop(continuation)`` is true: a generative task's stop strings). One
    forward of the whole prefix per token (no KV cache), so a model run layer by layer reads its weights ``gen_tokens`` times in all, not once per prompt."""
    continuations: list[list[int]] = [[] for _ in prompts]
    finished: set[int] = set()
    for step in range(gen_tokens):
        finished.update(i for i, c in enumerate(continuations)
                        if i not in finished and c and (c[-1] == eos_id or (stop is not None and stop(c))))
        active = [i for i in range(len(prompts)) if i not in finished]
        if not active:
            break
        chosen: dict[int, int] = {}

        def take(j: int, logits: torch.Tensor) -> None:
            chosen[active[j]] = int(logits[-1].float().argmax())

        forward_each(model, [prompts[i] + continuations[i] for i in active], batch_size=batch_size, pad_id=pad_id,
                     on_logits=take, adapter=adapter, progress=progress, label=f"parent: token {step + 1}/{gen_tokens}")
        for i, token in chosen.items():
            continuations[i].append(token)
    return continuations


def continuation_logp(logits: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """log-probs [n_cont, V] (float32) of the positions that predict the continuation's tokens."""
    return torch.log_softmax(logits[n_prompt - 1 : -1].float(), dim=-1)


def _log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the mass outside ``ids`` at each row (-inf when ``ids`` covers the vocabulary), summed
    directly over the rest (no 1 - sum cancellation)."""
    if ids.shape[-1] >= logp.shape[-1]:
        return torch.full(logp.shape[:-1], -math.inf)
    return logp.scatter(-1, ids, -math.inf).logsumexp(-1)


def build_reference(model, tokenizer, prompts: Sequence[str], gen_tokens: int, *, max_length: int, batch_size: int,
                    adapter=None, progress: bool = False, stored: int = STORED, fingerprint: str = "") -> Reference:
    """The parent's continuations of ``prompts`` and its distributions over them (see the module doc)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = prompt_ids(tokenizer, prompts, max_length, gen_tokens)
    conts = greedy(model, ids, gen_tokens, eos_id=tokenizer.eos_token_id, batch_size=batch_size, pad_id=pad_id or 0,
                   adapter=adapter, progress=progress)
    ref = Reference(ids, conts, gen_tokens=gen_tokens, fingerprint=fingerprint)
    n = len(ids)
    ref.best, ref.top_ids, ref.top_logp, ref.log_tail = ([None] * n for _ in range(4))

    def keep(i: int, logits: torch.Tensor) -> None:
        logp = continuation_logp(logits, len(ids[i]))
        top_logp, top_ids = logp.topk(min(stored, logp.shape[-1]), dim=-1)
        ref.best[i] = logp.argmax(-1).cpu()
        ref.top_ids[i], ref.top_logp[i] = top_ids.int().cpu(), top_logp.cpu()  # int32 + float32: 8 bytes a token
        ref.log_tail[i] = _log_rest(logp, top_ids).cpu()

    forward_each(model, ref.sequences, batch_size=batch_size, pad_id=pad_id or 0, on_logits=keep, adapter=adapter,
                 progress=progress, label="parent: teacher-forced")
    return ref


def token_measures(logq: torch.Tensor, best: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                   log_tail: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per continuation token (float64): agreement, acceptance, KL(p || q) and nll, from the pruned
    model's log-probs ``logq`` [n, V] and the parent's stored side (see the module doc)."""
    logq = logq.double()
    q_top = logq.gather(-1, top_ids)
    p_top = top_logp.double()
    p_tail, q_tail = log_tail.double(), _log_rest(logq, top_ids).double()
    agreement = (logq.argmax(-1) == best).double()
    acceptance = torch.minimum(p_top.exp(), q_top.exp()).sum(-1) + torch.minimum(p_tail.exp(), q_tail.exp())
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    kl = kl + torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(kl))
    nll = -logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return {"agreement": agreement, "acceptance": acceptance, "kl": kl, "nll": nll}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); nan below two values)."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@torch.no_grad()
def score(model, reference: Reference, *, batch_size: int, pad_id: int, adapter=None, progress: bool = False) -> dict:
    """``model`` teacher-forced on the reference's prompt + continuation: each measure's mean and
    standard error over prompts, the tokens and storage behind them, and ``per_prompt`` (each
    prompt's means, for ``paired``)."""
    per_prompt: dict[str, list[float]] = {m: [None] * len(reference.prompts) for m in MEASURES}  # type: ignore[misc]

    def measure(i: int, logits: torch.Tensor) -> None:
        logq = continuation_logp(logits, len(reference.prompts[i]))
        targets = torch.tensor(reference.continuations[i], device=logq.device)
        got = token_measures(logq, reference.best[i].to(logq.device), reference.top_ids[i].to(logq.device).long(),
                             reference.top_logp[i].to(logq.device), reference.log_tail[i].to(logq.device), targets)
        for m, values in got.items():
            per_prompt[m][i] = float(values.mean())

    forward_each(model, reference.sequences, batch_size=batch_size, pad_id=pad_id, on_logits=measure, adapter=adapter,
                 progress=progress, label="fidelity: teacher-forced")
    out: dict = {}
    for m in MEASURES:
        mean, se = mean_stderr(per_prompt[m])
        out[m], out[f"{m}_stderr"] = round(mean, 6), round(se, 6)
    stored = reference.top_ids[0].shape[-1] if reference.top_ids else 0
    out["fidelity"] = {
        "gen_tokens": reference.gen_tokens, "prompts": len(reference.prompts),
        "tokens": sum(len(c) for c in reference.continuations), "stored_tokens": stored,
        "tail": round(reference.tail_mass(), 8),
        "exact": reference.tail_mass() == 0.0,
        "per_prompt": {m: [round(v, 6) for v in per_prompt[m]] for m in MEASURES},
    }
    return out


def paired(a: dict, b: dict) -> dict:
    """``b`` minus ``a`` prompt by prompt, for each measure: the mean difference and its standard error
    (both scored against the same reference)."""
    pa, pb = a["fidelity"]["per_prompt"], b["fidelity"]["per_prompt"]
    out = {}
    for m in MEASURES:
        mean, se = mean_stderr([y - x for x, y in zip(pa[m], pb[m])])
        out[m] = {"diff": round(mean, 6), "stderr": round(se, 6)}
    return out
