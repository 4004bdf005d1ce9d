"""Score a task's evaluation split the way lm-evaluation-harness scores multiple choice.

    uncurl eval --model builtin:mixtral --task superglue-rte --data-dir ../shared/data --limit 100

For each example and each choice, the log-likelihood of the choice's tokens after the prompt:
``acc`` takes the argmax of the summed log-likelihoods, ``acc_norm`` the argmax after dividing by
the choice's length in characters without the target delimiter (lm-eval's ``completion_len``).
Ties go to the first choice, as ``np.argmax`` does. ``acc_stderr``/``acc_norm_stderr`` are
lm-eval's standard errors of the mean (sample standard deviation / sqrt(n)). The task ``loss`` is
the mean per-token negative log-likelihood of prompt + gold answer (``ppl`` its exponential): it
stays informative where accuracy sits near chance. Text-only tasks (no choices) report the loss alone.

Requests are lm-eval 0.4's (``HFLM._encode_pair``): whitespace at the end of the prompt moves to
the start of the continuation, and the continuation's tokens are those of ``prompt + choice`` after
the tokens of ``prompt``, both without special tokens (so merges across the boundary are seen as
the model would see them). ``examples/compare_lm_eval.py`` checks the agreement example by example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .load import input_device
from .profile import progress_bar
from .tasks import TARGET_DELIMITER, Example

# exact_match: a generative task's (generate.py); agreement, acceptance: fidelity.py, against the parent
METRICS = ("acc", "acc_norm", "exact_match", "loss", "agreement", "acceptance")


@dataclass(frozen=True)
class Request:
    example: int
    choice: int  # -1: the text-only sequence
    ids: tuple[int, ...]  # full sequence (context + continuation), truncated from the left
    n_cont: int  # continuation tokens at the end of ids


def build_requests(tokenizer, examples: Sequence[Example], max_length: int) -> list[Request]:
    requests = []
    for i, ex in enumerate(examples):
        prompt = ex.prompt.rstrip()  # lm-eval moves the prompt's trailing whitespace into the continuation
        ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        options = [(c, ex.prompt + choice) for c, choice in enumerate(ex.choices)] or [(-1, ex.prompt)]
        for c, text in options:
            whole = tokenizer(text, add_special_tokens=False)["input_ids"]
            n_cont = max(len(whole) - len(ctx), 1) if c >= 0 else len(whole) - 1
            ids = whole[-max_length:]
            requests.append(Request(i, c, tuple(ids), min(n_cont, len(ids) - 1)))
    return requests


def shared_inputs(requests: Sequence[Request]) -> list[tuple[tuple[int, ...], list[int]]]:
    """(model input, indices of the requests it serves), longest first. Requests whose inputs (every
    token but the last) are equal share one forward row: the choices of a one-token answer
    ("True"/"False") differ only in the target the last position predicts (lm-eval's one-token
    continuation cache, ``group_by="contexts"``)."""
    shared: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        shared.setdefault(r.ids[:-1] if len(r.ids) > 1 else r.ids, []).append(i)
    return sorted(shared.items(), key=lambda kv: -len(kv[0]))


def forward_rows(inputs: list, batch_size: int, pad_id: int):
    """Evaluation's batches of ``inputs`` (``shared_inputs``), made as they are needed: (rows of
    (input, its requests), ids, mask), ``batch_size`` rows each, right-padded with ``pad_id``."""
    for start in range(0, len(inputs), batch_size):
        rows = inputs[start : start + batch_size]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (x, _) in enumerate(rows):
            ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        yield rows, ids, mask


@torch.no_grad()
def score_requests(model, requests: Sequence[Request], *, batch_size: int, pad_id: int, progress: bool = False,
                   adapter=None):
    """For each request: (sum log p of its continuation, sum log p of every predicted token, count).
    ``adapter``: run the forwards layer by layer (``sequential.forward_layer_by_layer``: an offloaded
    model's weights read once for all the batches); the scores are the same."""
    device = input_device(model)
    results: list[tuple[float, float, int]] = [None] * len(requests)  # type: ignore[list-item]
    inputs = shared_inputs(requests)
    batches = forward_rows(inputs, batch_size, pad_id)

    def score(model, batch) -> None:
        rows, ids, mask = batch
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, (_, members) in enumerate(rows):  # one row at a time: no float32 copy of the whole [B, T, V]
            n = max(len(requests[i].ids) for i in members) - 1
            logp = torch.log_softmax(logits[row, :n].float(), dim=-1)
            for i in members:
                r = requests[i]
                targets = torch.tensor(r.ids[1:], device=logp.device)
                lp = logp[: len(targets)].gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
                results[i] = (float(lp[-r.n_cont :].sum()), float(lp.sum()), len(lp))
        del logits

    if adapter is not None:
        from .sequential import forward_layer_by_layer

        forward_layer_by_layer(model, adapter, list(batches), score, progress=progress)  # every batch at once
        return results
    with progress_bar(progress, -(-len(inputs) // batch_size), "evaluating") as advance:
        for batch in batches:
            score(model, batch)
            advance()
    return results


def completion_length(choice: str) -> int:
    """The characters lm-eval divides by for acc_norm: the choice without the target delimiter."""
    return max(len(choice.removeprefix(TARGET_DELIMITER)), 1)


def stderr(values: Sequence[float]) -> float:
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def evaluate_examples(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 1024,
                      progress: bool = False, per_example: bool = False, layers_of=None) -> dict:
    """acc, acc_norm and their standard errors (multiple-choice tasks), loss and ppl over ``examples``.

    ``per_example``: also ``examples``, one dict per example (``pred``, ``pred_norm``, ``gold``, the
    choices' log-likelihoods ``ll``, and ``nll``/``tokens``, its share of the task loss), for paired
    comparisons and agreement with lm-eval. ``layers_of``: the model's adapter, to run the forwards
    layer by layer (``score_requests``).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    requests = build_requests(tokenizer, examples, max_length)
    scores = score_requests(model, requests, batch_size=batch_size, pad_id=pad_id or 0, progress=progress,
                            adapter=layers_of)
    by_example: dict[int, dict[int, tuple[float, float, int]]] = {}
    for r, s in zip(requests, scores):
        by_example.setdefault(r.example, {})[r.choice] = s
    nll, tokens = 0.0, 0
    hits, hits_norm, rows = [], [], []
    for i, ex in enumerate(examples):
        by_choice = by_example[i]
        text_key = ex.gold if ex.choices else -1
        share = {}
        if text_key in by_choice:
            nll -= by_choice[text_key][1]
            tokens += by_choice[text_key][2]
            share = {"nll": round(-by_choice[text_key][1], 6), "tokens": by_choice[text_key][2]}
        if ex.choices:
            ll = [by_choice[c][0] for c in range(len(ex.choices))]
            norm = [v / completion_length(ex.choices[c]) for c, v in enumerate(ll)]
            pred, pred_norm = _argmax(ll), _argmax(norm)
            rows.append({"pred": pred, "pred_norm": pred_norm, "gold": ex.gold, "ll": [round(v, 6) for v in ll],
                         **share})
            if ex.gold >= 0:
                hits.append(float(pred == ex.gold))
                hits_norm.append(float(pred_norm == ex.gold))
    loss = nll / max(tokens, 1)
    out = {"n": len(examples), "tokens": tokens, "loss": round(loss, 6), "ppl": round(math.exp(min(loss, 50)), 4)}
    if hits:
        out.update(acc=round(sum(hits) / len(hits), 6), acc_stderr=round(stderr(hits), 6),
                   acc_norm=round(sum(hits_norm) / len(hits_norm), 6), acc_norm_stderr=round(stderr(hits_norm), 6))
    if per_example:
        out["examples"] = rows
    return out


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (np.argmax's tie rule)."""
    return max(range(len(values)), key=values.__getitem__)


def drop(before: dict, after: dict, metric: str) -> float | None:
    """How much worse ``after`` is, in points: 100 x accuracy lost, or the loss's % increase."""
    if metric not in before or metric not in after:
        return None
    if metric == "loss":
        return round(100 * (after["loss"] - before["loss"]) / before["loss"], 4)
    return round(100 * (before[metric] - after[metric]), 4)
