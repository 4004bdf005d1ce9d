"""Generative tasks scored as lm-evaluation-harness scores ``generate_until`` tasks: exact match.

    uncurl eval --model DIR --task lm-eval:gsm8k --limit 100     # lm-eval's own task, zero-shot
    uncurl eval --model DIR --task math.yaml                      # a task file with answer_field

Each evaluation prompt is continued greedily (argmax, no sampling) for at most ``max_gen_toks``
tokens, stopping early once one of the stop strings (``until``) or the end-of-text token appears;
the text is decoded (special tokens skipped) and cut before the first stop string, as lm-eval's
``HFLM.generate_until`` does (the end-of-text token's text is one of the stop strings). Each filter
pipeline then turns the generation into an answer (lm-eval's ``regex``: ``re.findall``, the match
``group_select`` picks, its first non-empty group when the pattern has groups, stripped, else
``fallback``; ``take_first``; ``lowercase``/``uppercase``; ``remove_whitespace``: strip), and
``exact_match`` compares it with the reference answer as lm-eval's (HF evaluate's) does: each of
``regexes_to_ignore`` removed from both, then optionally case, punctuation and digits dropped. With
several references (a list), any one matching scores 1.

The prompt is encoded as lm-eval encodes generation contexts: with the tokenizer's own special
tokens (a BOS where the tokenizer adds one) unless the prompt already starts with the BOS text,
kept from the right to ``max_length - max_gen_toks`` tokens. The forwards are uncurl's
(``fidelity.greedy``: the whole prefix each token, right-padded batches, or layer by layer), not
``model.generate``'s KV cache and left padding: the same greedy tokens up to float rounding.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import UncurlError

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default
FILTER_FUNCTIONS = ("regex", "take_first", "lowercase", "uppercase", "remove_whitespace")
REGEX_DEFAULTS = {"regex_pattern": r"#### (\-?[0-9\.\,]+)", "group_select": 0, "fallback": "[invalid]"}  # lm-eval's


@dataclass(frozen=True)
class Filter:
    """One of lm-eval's filter pipelines (``filter_list``): a name and its steps (function, arguments)."""

    name: str = "none"
    steps: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (("take_first", ()),)


@dataclass(frozen=True)
class Generation:
    """How a generative task's answers are made and scored (lm-eval's generation_kwargs, filter_list and
    exact_match options)."""

    until: tuple[str, ...] = ()
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    filters: tuple[Filter, ...] = (Filter(),)
    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_numbers: bool = False
    regexes_to_ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in self.filters:
            for function, kwargs in f.steps:
                if function not in FILTER_FUNCTIONS:
                    raise UncurlError(f"filter {f.name!r}: function {function!r} is not one uncurl applies; "
                                      f"accepted: {', '.join(FILTER_FUNCTIONS)}")
                if function == "regex":
                    unknown = set(dict(kwargs)) - set(REGEX_DEFAULTS)
                    if unknown:
                        raise UncurlError(f"filter {f.name!r}: regex takes {', '.join(REGEX_DEFAULTS)}, not "
                                          f"{', '.join(sorted(unknown))}")
                    try:
                        re.compile(dict(kwargs).get("regex_pattern", REGEX_DEFAULTS["regex_pattern"]))
                    except re.error as err:
                        raise UncurlError(f"filter {f.name!r}: regex_pattern is not a regular expression ({err})") from None
        for pattern in self.regexes_to_ignore:
            try:
                re.compile(pattern)
            except re.error as err:
                raise UncurlError(f"regexes_to_ignore {pattern!r} is not a regular expression ({err})") from None
        if self.max_gen_toks < 1:
            raise UncurlError(f"max_gen_toks {self.max_gen_toks} must be at least 1")


def regex_filter(pattern: str, answer: str, *, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's ``regex`` filter on one response."""
    matches = re.findall(pattern, answer if isinstance(answer, str) else "")
    if not matches:
        return fallback
    try:
        match = matches[group_select]
    except IndexError:  # lm-eval raises here; a short answer is simply not matched
        return fallback
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def apply_filter(f: Filter, generation: str) -> str:
    """One filter pipeline over the (single, greedy) response."""
    responses = [generation]
    for function, kwargs in f.steps:
        args = dict(kwargs)
        if function == "regex":
            opts = {**REGEX_DEFAULTS, **args}
            responses = [regex_filter(opts["regex_pattern"], r, group_select=int(opts["group_select"]),
                                      fallback=str(opts["fallback"])) for r in responses]
        elif function == "take_first":
            responses = responses[:1]
        elif function == "lowercase":
            responses = [r.lower() for r in responses]
        elif function == "uppercase":
            responses = [r.upper() for r in responses]
        elif function == "remove_whitespace":
            responses = [r.strip() for r in responses]
    return responses[0]


def _normalize(text: str, gen: Generation) -> str:
    for pattern in gen.regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if gen.ignore_case:
        text = text.lower()
    if gen.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if gen.ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text


def exact_match(prediction: str, references: Sequence[str], gen: Generation) -> float:
    """1.0 when the prediction equals any reference after lm-eval's exact_match normalization."""
    pred = _normalize(str(prediction), gen)
    return float(any(pred == _normalize(str(ref), gen) for ref in references))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """lm-eval's ``postprocess_generated_text``: the text before each stop string, in turn."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def generate(model, tokenizer, prompts: Sequence[str], gen: Generation, *, max_length: int, batch_size: int,
             adapter=None, progress: bool = False) -> list[str]:
    """Each prompt's greedy generation, decoded and cut before the first stop string (see the module doc)."""
    from .fidelity import greedy

    eos_id = tokenizer.eos_token_id
    stops = list(gen.until)
    if eos_id is not None:
        eos_text = tokenizer.decode([eos_id], skip_special_tokens=False)
        if eos_text not in stops:
            stops.append(eos_text)
    room = max_length - gen.max_gen_toks
    if room < 1:
        raise UncurlError(f"max_gen_toks {gen.max_gen_toks} leaves no room for the prompt in --eval-max-length "
                          f"{max_length}: raise --eval-max-length")
    bos = getattr(tokenizer, "bos_token", None)
    ids = []
    for text in prompts:
        special = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        ids.append(tokenizer(text, **special)["input_ids"][-room:] or [eos_id or 0])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def done(tokens: list[int]) -> bool:  # a stop string is out: later tokens cannot change the text before it
        text = decode(tokens)
        return any(s and s in text for s in gen.until)

    conts = greedy(model, ids, gen.max_gen_toks, eos_id=eos_id, batch_size=batch_size, pad_id=pad_id or 0,
                   adapter=adapter, progress=progress, stop=done if gen.until else None)
    return [cut_at_stops(decode(c), stops) for c in conts]


def score(generations: Sequence[str], references: Sequence[Sequence[str]], gen: Generation) -> dict:
    """exact_match (the first filter's) with its standard error, ``exact_match_by_filter``, and per example
    the generation, each filter's answer and whether it matched (``rows``)."""
    from .evaluate import stderr

    by_filter, rows = {}, [{"generation": g, "answers": {}, "references": list(r)} for g, r in zip(generations, references)]
    for f in gen.filters:
        hits = []
        for row, g, refs in zip(rows, generations, references):
            answer = apply_filter(f, g)
            hit = exact_match(answer, refs, gen)
            row["answers"][f.name] = {"answer": answer, "exact_match": hit}
            hits.append(hit)
        by_filter[f.name] = (round(sum(hits) / max(len(hits), 1), 6), round(stderr(hits), 6))
    first = by_filter[gen.filters[0].name]
    return {"exact_match": first[0], "exact_match_stderr": first[1], "exact_match_filter": gen.filters[0].name,
            "exact_match_by_filter": {k: v[0] for k, v in by_filter.items()}, "rows": rows}
