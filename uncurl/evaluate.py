"""Score a task's evaluation split the way lm-evaluation-harness scores multiple choice.

    uncurl eval --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --limit 100

For each example and each choice, the log-likelihood of the choice's tokens after the prompt:
``acc`` takes the argmax of the summed log-likelihoods, ``acc_norm`` the argmax after dividing by
the choice's length in characters (lm-eval's length normalisation). The task ``loss`` is the mean
per-token negative log-likelihood of prompt + gold answer (``ppl`` its exponential): it stays
informative where accuracy sits near chance. Text-only tasks (no choices) report the loss alone.

Tokenisation follows lm-eval: the continuation's tokens are those of ``prompt + choice`` after the
tokens of ``prompt`` (so merges across the boundary are seen as the model would see them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .load import input_device
from .profile import progress_bar
from .tasks import Example

METRICS = ("acc", "acc_norm", "loss")


@dataclass(frozen=True)
class Request:
    example: int
    choice: int  # -1: the text-only sequence
    ids: tuple[int, ...]  # full sequence (context + continuation), truncated from the left
    n_cont: int  # continuation tokens at the end of ids


def build_requests(tokenizer, examples: Sequence[Example], max_length: int) -> list[Request]:
    requests = []
    for i, ex in enumerate(examples):
        ctx = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        options = [(c, ex.prompt + choice) for c, choice in enumerate(ex.choices)] or [(-1, ex.prompt)]
        for c, text in options:
            whole = tokenizer(text, add_special_tokens=False)["input_ids"]
            n_cont = max(len(whole) - len(ctx), 1) if c >= 0 else len(whole) - 1
            ids = whole[-max_length:]
            requests.append(Request(i, c, tuple(ids), min(n_cont, len(ids) - 1)))
    return requests


@torch.no_grad()
def score_requests(model, requests: Sequence[Request], *, batch_size: int, pad_id: int, progress: bool = False):
    """For each request: (sum log p of its continuation, sum log p of every predicted token, count)."""
    device = input_device(model)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    results: list[tuple[float, float, int]] = [None] * len(requests)  # type: ignore[list-item]
    with progress_bar(progress, -(-len(order) // batch_size), "evaluating") as advance:
        for start in range(0, len(order), batch_size):
            chunk = [requests[i] for i in order[start : start + batch_size]]
            width = max(len(r.ids) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, r in enumerate(chunk):
                ids[row, : len(r.ids)] = torch.tensor(r.ids)
                mask[row, : len(r.ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            targets = ids[:, 1:].to(device)
            for row, r in enumerate(chunk):  # one row at a time: no float32 copy of the whole [B, T, V]
                n = len(r.ids) - 1
                logp = torch.log_softmax(logits[row, :n].float(), dim=-1)
                lp = logp.gather(-1, targets[row, :n].unsqueeze(-1)).squeeze(-1).cpu()
                results[order[start + row]] = (float(lp[-r.n_cont :].sum()), float(lp.sum()), len(lp))
            del logits
            advance()
    return results


def evaluate_examples(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 1024,
                      progress: bool = False) -> dict:
    """acc, acc_norm (multiple-choice tasks), loss and ppl over ``examples``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    requests = build_requests(tokenizer, examples, max_length)
    scores = score_requests(model, requests, batch_size=batch_size, pad_id=pad_id or 0, progress=progress)
    per_example: dict[int, dict[int, tuple[float, float, int]]] = {}
    for r, s in zip(requests, scores):
        per_example.setdefault(r.example, {})[r.choice] = s
    nll, tokens, correct, correct_norm, scored = 0.0, 0, 0, 0, 0
    for i, ex in enumerate(examples):
        by_choice = per_example[i]
        text_key = ex.gold if ex.choices else -1
        if text_key in by_choice:
            nll -= by_choice[text_key][1]
            tokens += by_choice[text_key][2]
        if ex.choices and ex.gold >= 0:
            ll = [by_choice[c][0] for c in range(len(ex.choices))]
            norm = [v / max(len(ex.choices[c]), 1) for c, v in enumerate(ll)]
            correct += int(max(range(len(ll)), key=ll.__getitem__) == ex.gold)
            correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == ex.gold)
            scored += 1
    loss = nll / max(tokens, 1)
    out = {"n": len(examples), "tokens": tokens, "loss": round(loss, 6), "ppl": round(math.exp(min(loss, 50)), 4)}
    if scored:
        out.update(acc=round(correct / scored, 6), acc_norm=round(correct_norm / scored, 6))
    return out


def drop(before: dict, after: dict, metric: str) -> float | None:
    """How much worse ``after`` is, in points: 100 x accuracy lost, or the loss's % increase."""
    if metric not in before or metric not in after:
        return None
    if metric == "loss":
        return round(100 * (after["loss"] - before["loss"]) / before["loss"], 4)
    return round(100 * (before[metric] - after[metric]), 4)
