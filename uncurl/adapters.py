"""Where each MoE family keeps its router and experts: one declarative table.

    uncurl families            # lists this table

transformers 5 keeps the experts of a MoE block fused at run time (``experts.gate_up_proj
[E, ...]``, ``experts.down_proj [E, ...]``, sometimes ``*_bias [E, ...]``) and the router as a
module with an ``[E, H]`` weight (plus, for some families, per-expert buffers). Every per-expert
tensor has the expert axis first, so merging and slicing are the same operation for every family:
only *names* differ, and those names live here. Facts come from ``../shared/TRANSFORMERS_MOE.md``.

Adding a family is one entry in ``ADAPTERS`` (defaults fit the common layout) with a ``tiny``
config that builds a small random instance; the test suite enrols every entry automatically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from torch import nn

from .errors import UncurlError


@dataclass(frozen=True)
class NeuronAxis:
    """Where one fused expert tensor keeps the intermediate neurons (the axis a permutation moves).

    ``axis`` counts in the per-expert tensor (expert axis removed). ``packing``: ``single`` (I
    entries), ``concat`` (gate rows then up rows, 2I) or ``interleaved`` (gate, up, gate, up, ...).
    """

    tensor: str  # name under the experts module, e.g. "gate_up_proj"
    axis: int
    packing: str = "single"


# The layout of the experts' intermediate neurons; expert tensors not listed (output biases) have
# none and are merged without permutation. One permutation of the neurons, applied to every listed
# tensor, leaves an expert's function unchanged (tests/test_align.py checks this per family).
FUSED_GATED = (NeuronAxis("gate_up_proj", 0, "concat"), NeuronAxis("down_proj", 1))  # [E,2I,H], [E,H,I]
FUSED_NON_GATED = (NeuronAxis("up_proj", 0), NeuronAxis("down_proj", 1))  # [E,I,H], [E,H,I] (nemotron_h)
TRANSPOSED_GATED = (NeuronAxis("gate_up_proj", 1, "concat"), NeuronAxis("down_proj", 0))  # [E,H,2I], [E,I,H] (aria)
TRANSPOSED_INTERLEAVED = (  # gpt_oss: [E,H,2I] gate/up interleaved (+ bias [E,2I]), down [E,I,H]
    NeuronAxis("gate_up_proj", 1, "interleaved"), NeuronAxis("gate_up_proj_bias", 0, "interleaved"),
    NeuronAxis("down_proj", 0),
)


# config keys that announce a checkpoint's next-token-prediction (MTP) blocks, as the Hub's configs spell them
# (DeepSeek-V3, GLM-4.5, ERNIE-4.5, ...: num_nextn_predict_layers; Qwen3-Next, Qwen3.5: mtp_num_hidden_layers;
# transformers' own name: num_mtp_layers)
MTP_COUNT_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")


@dataclass(frozen=True)
class MtpBlocks:
    """A family's next-token-prediction (MTP) blocks: extra blocks its checkpoints keep for speculative
    decoding, which transformers does not load and serving engines do (``mtp.py``). The default, for every
    family: uncurl does not run them, so a pruned checkpoint drops them and writes their count as 0."""

    count_keys: tuple[str, ...] = MTP_COUNT_KEYS  # config keys holding their count (each one present is rewritten)
    # how uncurl runs and prunes them; None: it cannot (dropped, count 0). "deepseek": block i is
    # model.layers.{num_hidden_layers + i}.*, a decoder layer of the family's class plus enorm, hnorm,
    # eh_proj [H, 2H], shared_head.{norm,head}, embed_tokens, fed eh_proj([enorm(embed(t+1)), hnorm(h_t)]) (vLLM's
    # deepseek_mtp.py)
    wiring: str | None = None
    hidden_from: str = "norm"  # the language stack's module whose input is h_t (the last state before the final norm)
    moe_attr: str = "mlp"  # the MoE block's attribute in the block's decoder layer


DEEPSEEK_MTP = MtpBlocks(wiring="deepseek")


@dataclass(frozen=True)
class MoEAdapter:
    """How one model family lays out its MoE blocks (defaults: the common transformers-5 layout)."""

    model_type: str
    expert_count_key: str  # config key holding E (the canonical one, not an attribute_map alias)
    top_k_key: str = "num_experts_per_tok"
    router_attr: str = "gate"  # the router module, an attribute of the MoE block
    experts_attr: str = "experts"  # the fused experts module, an attribute of the MoE block
    router_tensors: tuple[str, ...] = ("weight",)  # router tensors with one row per expert
    shared_attrs: tuple[str, ...] = ()  # parts of the block that are not routed: never touched
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for grouped routing
    # the router's submodule whose output is the logits, for a router that returns probabilities
    router_logits: str | None = None
    hybrid: str = ""  # the other token mixers the stack interleaves (Mamba, linear attention, ...)
    # overrides for a small random instance (of a multimodal wrapper's text_config, see below)
    tiny: Mapping[str, Any] = field(default_factory=dict)
    # Multimodal wrappers (a config with a ``text_config``): every key above is read and written in
    # the text config (``get_text_config()``); these override the wrapper's own keys for a small
    # instance (vision_config, audio_config, token ids), on top of TINY_TOWERS
    tiny_wrapper: Mapping[str, Any] = field(default_factory=dict)
    # the module whose MoE blocks are pruned; None: the model's language stack (get_decoder()), so
    # a vision or audio tower's own MoE blocks are never touched
    language_stack: str | None = None
    neurons: tuple[NeuronAxis, ...] = FUSED_GATED  # intermediate-neuron layout (--merge aligned)
    router_logit_bias: str | None = None  # router tensor added to the logits (--router refit fits it)
    # per-expert tensors of the MoE block itself (routing biases the block passes to its router:
    # afmoe/lfm2_moe ``expert_bias``, hy_v3/minimax_m2 ``e_score_correction_bias``): rewritten with
    # the router rule, like the router's own per-expert buffers
    block_tensors: tuple[str, ...] = ()
    # routing tensors (names as in router_tensors/block_tensors) whose expert axis is not the first,
    # e.g. ernie4_5_moe's ``moe_statics.e_score_correction_bias`` [1, E]: {name: axis}
    expert_axes: Mapping[str, int] = field(default_factory=dict)
    # rows after the E experts' in some per-expert tensors (inkling_text's shared-expert sink rows,
    # longcat_flash's zero experts, zaya's skip column): a config key holding their count, or the
    # count. Those rows are copied, never merged, and their logit columns ignored while profiling
    tail_rows: str | int = 0
    # what the router returns, so the profile counts the experts the model really routes to: "topk"
    # (logits, top-k weights, top-k indices), or "scores" (llama4: (scores [N, E], logits), the
    # chosen set being the top-k of the logits, as the family's forward takes it); see
    # profile.ROUTER_OUTPUTS
    router_output: str = "topk"
    # transformers releases whose own code for this family cannot run it: {version: what fails}.
    # uncurl refuses the family there (exit 2, naming the version and the fault) rather than crash
    broken_in: Mapping[str, str] = field(default_factory=dict)
    # tensors of the experts module that are not per-expert (muse_spark's ``post_expert_norm.weight``
    # [H], one norm after every expert): copied as they are, never indexed by expert
    experts_common: tuple[str, ...] = ()
    # router tensors that hold expert *ids*, not one row per expert (deepseek_v4's hash routers:
    # ``tid2eid [V, k]``, the k experts each token id is routed to): every id is rewritten to its
    # expert's new index through the plan (merge.expert_targets). A layer whose router lacks one (a
    # learned router beside the hash ones) has none to rewrite
    expert_ids: tuple[str, ...] = ()
    mtp: MtpBlocks = MtpBlocks()  # next-token-prediction blocks its checkpoints may keep (mtp.py)
    # a looped stack (inkling2_loop_text): the config keys (first, end, passes) of the decoder layers
    # first..end-1 that run ``passes`` times in one forward. Such layers cannot be pruned on their
    # first visit, so the prune merges after a full profile (``looped_layers``)
    loop_keys: tuple[str, str, str] | None = None

    def expert_axis(self, name: str) -> int:
        """The axis of tensor ``name`` (a short name or a full state-dict key) that holds the experts."""
        for key, axis in self.expert_axes.items():
            if name == key or name.endswith("." + key):
                return axis
        return 0


# Shared by every tiny instance: small enough for CPU tests, big enough to route meaningfully.
TINY_BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    vocab_size=320,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Shared by every multimodal wrapper's tiny instance: one small layer per tower. Each family spells
# these keys its own way (depth or num_hidden_layers, num_heads or num_attention_heads); a key a
# tower does not use is ignored. Only the language stack is pruned: the towers must merely exist.
_TOWER = dict(hidden_size=32, intermediate_size=64, depth=1, num_hidden_layers=1, num_heads=2,
              num_attention_heads=2, out_hidden_size=64)
TINY_TOWERS: dict[str, dict[str, Any]] = {"vision_config": _TOWER, "audio_config": _TOWER}

ADAPTERS: dict[str, MoEAdapter] = {
    a.model_type: a
    for a in (
        MoEAdapter("mixtral", "num_local_experts", tiny=dict(num_local_experts=8)),
        MoEAdapter(
            "qwen2_moe",
            "num_experts",
            shared_attrs=("shared_expert", "shared_expert_gate"),
            tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64),
        ),
        MoEAdapter("qwen3_moe", "num_experts", tiny=dict(num_experts=8, moe_intermediate_size=32)),
        MoEAdapter("olmoe", "num_experts", tiny=dict(num_experts=8, intermediate_size=32)),
        MoEAdapter(
            "deepseek_v3",
            "n_routed_experts",
            router_tensors=("weight", "e_score_correction_bias"),
            shared_attrs=("shared_experts",),
            group_keys=("n_group", "topk_group"),
            mtp=DEEPSEEK_MTP,
            tiny=dict(
                n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
                n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
                num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            ),
        ),
        MoEAdapter(
            "gpt_oss",
            "num_local_experts",
            router_attr="router",
            router_tensors=("weight", "bias"),
            neurons=TRANSPOSED_INTERLEAVED,
            router_logit_bias="bias",
            tiny=dict(num_local_experts=8, head_dim=16, max_position_embeddings=131072),
        ),
    )
}

# Shared pieces of the tiny configs below (facts: ../shared/FAMILIES.md, section A).
_ECB = ("weight", "e_score_correction_bias")  # router rows + DeepSeek-style correction bias
_GROUPS = ("n_group", "topk_group")
_MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)  # DeepSeek-style latent attention
_INDEXER = dict(index_topk=8, index_head_dim=16, index_n_heads=2)  # sparse-attention indexer
_DEEPSEEK = dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=2, topk_group=1)

# Section A: one entry each, ordered by model_type (families-b's shared mechanisms live apart).
ADAPTERS.update({
    a.model_type: a
    for a in (
        MoEAdapter("aria_text", "moe_num_experts", top_k_key="moe_topk", router_attr="router",
                   shared_attrs=("shared_experts",), neurons=TRANSPOSED_GATED,
                   tiny=dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1, head_dim=16)),
        MoEAdapter("axk1", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, tiny=dict(**_DEEPSEEK, **_MLA, num_hidden_layers=3)),
        MoEAdapter("axk2", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS,
                   tiny=dict(**_DEEPSEEK, **_MLA, **_INDEXER, gated_norm_rank=4, num_hidden_layers=3)),
        MoEAdapter("bailing_hybrid", "num_experts", top_k_key="num_experts_per_token", router_tensors=_ECB,
                   hybrid="linear attention",
                   shared_attrs=("shared_experts",), group_keys=("num_expert_group", "topk_group"),
                   tiny=dict(_MLA, num_experts=8, moe_intermediate_size=32, num_shared_experts=1,
                             num_expert_group=2, topk_group=1, first_k_dense_replace=1, layer_group_size=2,
                             linear_head_dim=16, linear_num_heads=4, num_hidden_layers=3)),
        MoEAdapter("beam", "num_experts", router_tensors=_ECB, group_keys=_GROUPS,
                   tiny=dict(num_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1, head_dim=16,
                             sliding_window=32, num_hidden_layers=3,
                             mlp_layer_types=["dense", "sparse", "sparse"])),
        MoEAdapter("cohere2_moe", "num_experts", tiny=dict(num_experts=8, head_dim=16)),
        MoEAdapter("deepseek_v2", "n_routed_experts", shared_attrs=("shared_experts",), group_keys=_GROUPS,
                   tiny=dict(_MLA, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
                             q_lora_rank=None, first_k_dense_replace=1, num_hidden_layers=3)),
        MoEAdapter("deepseek_v32", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS,
                   tiny=dict(**_DEEPSEEK, **_MLA, **_INDEXER, first_k_dense_replace=1, num_hidden_layers=3)),
        MoEAdapter("dots1", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS,
                   tiny=dict(_DEEPSEEK, first_k_dense_replace=1, head_dim=16, num_hidden_layers=3)),
        MoEAdapter("dots3_note_text", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS,
                   tiny=dict(**_DEEPSEEK, **_MLA, **_INDEXER, shared_experts_intermediate_size=32,
                             use_sliding_window=False, num_hidden_layers=3)),
        MoEAdapter("exaone_moe", "num_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS,
                   tiny=dict(num_experts=8, moe_intermediate_size=32, num_shared_experts=1, n_group=2,
                             topk_group=1, first_k_dense_replace=1, head_dim=16, num_hidden_layers=3)),
        MoEAdapter("flex_olmo", "num_experts", tiny=dict(num_experts=8)),
        MoEAdapter("flint", "num_experts", shared_attrs=("shared_expert",),
                   tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                             mlp_only_layers=[0], head_dim=16, num_hidden_layers=3)),
        MoEAdapter("gemma4_text", "num_experts", top_k_key="top_k_experts", router_attr="router",
                   router_tensors=("proj.weight", "per_expert_scale"), router_logits="proj", shared_attrs=("mlp",),
                   tiny=dict(num_experts=8, top_k_experts=2, moe_intermediate_size=32, enable_moe_block=True,
                             head_dim=16, global_head_dim=16, vocab_size_per_layer_input=320,
                             hidden_size_per_layer_input=8)),
        MoEAdapter("glm4_moe", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, mtp=DEEPSEEK_MTP, tiny=dict(_DEEPSEEK, first_k_dense_replace=1, head_dim=16,
                                                 num_hidden_layers=3)),
        MoEAdapter("glm4_moe_lite", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, tiny=dict(**_DEEPSEEK, **_MLA, first_k_dense_replace=1,
                                                 num_hidden_layers=3)),
        MoEAdapter("glm_moe_dsa", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, tiny=dict(**_DEEPSEEK, **_MLA, **_INDEXER, first_k_dense_replace=1,
                                                 num_hidden_layers=3)),
        MoEAdapter("granitemoe", "num_local_experts", router_attr="router", tiny=dict(num_local_experts=8)),
        MoEAdapter("granitemoe_swa", "num_local_experts", router_attr="router",
                   tiny=dict(num_local_experts=8, sliding_window=32)),
        MoEAdapter("granitemoehybrid", "num_local_experts", router_attr="router", hybrid="Mamba-2",
                   tiny=dict(num_local_experts=8, shared_intermediate_size=64, mamba_n_heads=8, mamba_d_head=16,
                             mamba_d_state=16, mamba_chunk_size=16,
                             layer_types=["linear_attention", "full_attention"])),
        MoEAdapter("granitemoeshared", "num_local_experts", router_attr="router",
                   tiny=dict(num_local_experts=8, shared_intermediate_size=64)),
        MoEAdapter("hunyuan_v1_moe", "num_experts", top_k_key="moe_topk", router_tensors=("wg.weight",),
                   shared_attrs=("shared_mlp",), tiny=dict(num_experts=8, moe_topk=2, head_dim=16)),
        MoEAdapter("hy_v4", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, tiny=dict(**_DEEPSEEK, **_MLA, **_INDEXER, num_hidden_layers=3,
                                                 mlp_layer_types=["dense", "sparse", "sparse"])),
        MoEAdapter("inkling2_loop_text", "n_routed_experts", router_tensors=_ECB,
                   tiny=dict(n_routed_experts=8, head_dim=16, swa_head_dim=16, swa_num_attention_heads=4,
                             swa_num_key_value_heads=2, unpadded_vocab_size=320, n_layers_per_attn_res_block=1,
                             loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=4,
                             layer_types=["hybrid_sliding", "hybrid"]),
                   loop_keys=("loop_layer_index_start", "loop_layer_index_end", "loop_num_passes")),
        MoEAdapter("inkling2_text", "n_routed_experts", router_tensors=_ECB,
                   tiny=dict(n_routed_experts=8, head_dim=16, swa_head_dim=16, swa_num_attention_heads=4,
                             swa_num_key_value_heads=2, unpadded_vocab_size=320, rel_extent=64,
                             layer_types=["hybrid_sliding", "hybrid"])),
        MoEAdapter("jamba", "num_experts", router_attr="router", hybrid="Mamba",
                   tiny=dict(num_experts=8, use_mamba_kernels=False, mamba_dt_rank=8, mamba_d_state=8,
                             attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                             expert_layer_offset=0)),
        MoEAdapter("kimi_linear", "num_experts", top_k_key="num_experts_per_token", router_tensors=_ECB,
                   hybrid="Kimi delta attention",
                   shared_attrs=("shared_experts",), group_keys=("num_expert_group", "topk_group"),
                   tiny=dict(_MLA, num_experts=8, moe_intermediate_size=32, num_shared_experts=1,
                             num_expert_group=2, topk_group=1, q_lora_rank=None, linear_head_dim=16,
                             linear_num_heads=4, num_hidden_layers=3,
                             layer_types=["linear_attention", "full_attention", "linear_attention"])),
        MoEAdapter("kolibri1", "num_local_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   tiny=dict(num_local_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             head_dim=16)),
        MoEAdapter("laguna", "num_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             head_dim=16, num_hidden_layers=3)),
        MoEAdapter("lara_mini", "num_experts", shared_attrs=("shared_expert",), hybrid="gated DeltaNet",
                   tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])),
        MoEAdapter("mellum", "num_local_experts", tiny=dict(num_local_experts=8, moe_intermediate_size=32,
                                                            head_dim=16)),
        MoEAdapter("mimo_v2_flash", "n_routed_experts", router_tensors=_ECB, group_keys=_GROUPS,
                   tiny=dict(n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1, head_dim=16,
                             v_head_dim=16, num_hidden_layers=3)),
        MoEAdapter("minimax", "num_local_experts", hybrid="lightning attention",
                   tiny=dict(num_local_experts=8, head_dim=16, block_size=16)),
        MoEAdapter("minimax_m3_vl_text", "num_local_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   tiny=dict(num_local_experts=8, intermediate_size=32, shared_intermediate_size=32, head_dim=16,
                             dense_intermediate_size=64)),
        MoEAdapter("nemotron_h", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, hybrid="Mamba-2", neurons=FUSED_NON_GATED,
                   tiny=dict(n_routed_experts=8, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                             n_group=2, topk_group=1, head_dim=16, use_mamba_kernels=False, mamba_num_heads=8,
                             mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
                             layers_block_type=["mamba", "moe", "attention", "moe"])),
        MoEAdapter("phimoe", "num_local_experts", router_attr="router", tiny=dict(num_local_experts=8)),
        MoEAdapter("qwen3_5_moe_text", "num_experts", shared_attrs=("shared_expert", "shared_expert_gate"),
                   hybrid="gated DeltaNet",
                   tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])),
        MoEAdapter("qwen3_next", "num_experts", shared_attrs=("shared_expert", "shared_expert_gate"),
                   hybrid="gated DeltaNet",
                   tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])),
        MoEAdapter("qwen4_exp_text", "num_experts", shared_attrs=("shared_expert", "shared_expert_gate"),
                   hybrid="gated DeltaNet",
                   tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1,
                             indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,
                             layer_types=["linear_attention", "indexed_attention"])),
        MoEAdapter("sarvam_mla", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, tiny=dict({**_DEEPSEEK, **_MLA}, q_lora_rank=None, first_k_dense_replace=1,
                                                 num_hidden_layers=3)),
        MoEAdapter("sarvam_moe", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, tiny=dict(_DEEPSEEK, first_k_dense_replace=1, head_dim=16,
                                                 num_hidden_layers=3)),
        MoEAdapter("solar_open", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
                   group_keys=_GROUPS, tiny=dict(_DEEPSEEK, head_dim=16)),
    )
})


# FAMILIES.md section C: MoE model types this design cannot prune, and why. Loading one exits 2
# with the reason (``get_adapter``); ``uncurl families`` lists them.
REFUSED: dict[str, str] = {
    "dbrx": "its experts are 2-D [E*I, H] matrices with the MoE keys inside ffn_config, and its router returns "
            "logits only, not the experts it chose",
    "diffusion_gemma": "it is a diffusion model, not a causal LM: routing on causal calibration text says nothing "
                       "about how it generates",
    "doge": "its ~16k 'experts' are single neurons picked by product keys, not expert MLPs to cluster and merge",
    "jetmoe": "its attention is a mixture of experts too (mixture of attention heads) sharing the expert count "
              "with the MLP experts: one cannot shrink without the other",
    "nllb-moe": "it is an encoder-decoder with its experts in a ModuleDict; uncurl prunes decoder-only causal LMs",
    "openai_privacy_filter": "it is a token classifier, not a causal LM: there is no next-token likelihood to "
                             "calibrate or evaluate on",
    "switch_transformers": "it is an encoder-decoder with its experts in a ModuleDict; uncurl prunes decoder-only "
                           "causal LMs",
}


def _wrapper(model_type: str, text_type: str, **fields) -> MoEAdapter:
    """A multimodal wrapper whose language stack is the table's ``text_type`` family (its MTP blocks, if any,
    are not run: mtp.py)."""
    return replace(ADAPTERS[text_type], model_type=model_type, **{"mtp": MtpBlocks(), **fields})


# FAMILIES.md section B: families that need one of the shared mechanisms above (multimodal
# wrappers, ...). Kept apart from the plain entries; each is still one entry.
ADAPTERS.update({a.model_type: a for a in (
    MoEAdapter("qwen3_vl_moe", "num_local_experts",
               tiny=dict(num_local_experts=8, moe_intermediate_size=32, head_dim=16)),
    # q_lora_rank as in the real model: transformers' rope permutation for the vision tower's fused
    # qkv (pattern "attn.q_proj") would also hit a language-stack q_proj when the checkpoint is read
    _wrapper("kimi_k25", "deepseek_v3", tiny={**ADAPTERS["deepseek_v3"].tiny, "q_lora_rank": 16}),
    MoEAdapter("aria", "moe_num_experts", top_k_key="moe_topk", router_attr="router", shared_attrs=("shared_experts",),
               neurons=TRANSPOSED_GATED, tiny=dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1, head_dim=16)),
    MoEAdapter("glm4v_moe", "n_routed_experts", router_tensors=("weight", "e_score_correction_bias"),
               shared_attrs=("shared_experts",), group_keys=("n_group", "topk_group"),
               tiny=dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=2, topk_group=1,
                         first_k_dense_replace=1, num_hidden_layers=3,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                              mrope_section=[2, 1, 1]))),  # sums to head_dim * 0.5 / 2
    MoEAdapter("qwen3_5_moe", "num_experts", shared_attrs=("shared_expert", "shared_expert_gate"),
               tiny=dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32, head_dim=16,
                         linear_key_head_dim=16, linear_value_head_dim=16,
                         layer_types=["linear_attention", "full_attention"])),
    # block-level per-expert routing biases (block_tensors)
    MoEAdapter("afmoe", "num_experts", router_attr="router", router_tensors=("gate.weight",),
               block_tensors=("expert_bias",), shared_attrs=("shared_experts",),
               tiny=dict(num_experts=8, moe_intermediate_size=32, head_dim=16, num_shared_experts=1)),
    MoEAdapter("hy_v3", "num_experts", block_tensors=("e_score_correction_bias",), shared_attrs=("shared_experts",),
               tiny=dict(num_experts=8, moe_intermediate_size=32, head_dim=16)),
    MoEAdapter("minimax_m2", "num_local_experts", block_tensors=("e_score_correction_bias",),
               tiny=dict(num_local_experts=8, head_dim=16)),
    MoEAdapter("lfm2_moe", "num_experts", block_tensors=("expert_bias",),
               tiny=dict(num_experts=8, moe_intermediate_size=32, num_dense_layers=1, num_hidden_layers=3,
                         layer_types=["conv", "full_attention", "conv"])),
    # a per-expert tensor whose expert axis is not the first (expert_axes)
    MoEAdapter("ernie4_5_moe", "moe_num_experts", top_k_key="moe_k",
               router_tensors=("weight", "moe_statics.e_score_correction_bias"),
               expert_axes={"moe_statics.e_score_correction_bias": 1}, shared_attrs=("shared_experts",),
               tiny=dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=1, num_hidden_layers=3, head_dim=16)),
    # router tail rows (tail_rows): copied, never merged
    MoEAdapter("inkling_text", "n_routed_experts", router_tensors=("weight", "e_score_correction_bias"),
               tail_rows="n_shared_experts", shared_attrs=("shared_experts",),
               tiny=dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, head_dim=16,
                         swa_head_dim=16, rel_extent=64)),  # relative bias materialised densely: keep it short
    MoEAdapter("longcat_flash", "n_routed_experts", top_k_key="moe_topk", router_attr="router",
               router_tensors=("classifier.weight", "e_score_correction_bias"), tail_rows="zero_expert_num",
               tiny=dict(n_routed_experts=8, moe_topk=2, zero_expert_num=2, expert_ffn_hidden_size=32,
                         ffn_hidden_size=64, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, head_dim=8, num_key_value_heads=4)),
    MoEAdapter("zaya", "num_experts", router_tensors=("router_mlp.out_proj.weight", "balancing_biases"),
               tail_rows=1,  # the skip expert's column
               tiny=dict(num_experts=8, moe_intermediate_size=32, head_dim=16, router_hidden_size=16,
                         num_experts_per_tok=1)),  # zaya routes top-1 only
    # routers returning scores, not the chosen top-k (router_output)
    MoEAdapter("llama4_text", "num_local_experts", router_attr="router", router_output="scores",
               shared_attrs=("shared_expert",), neurons=TRANSPOSED_GATED,
               tiny=dict(num_local_experts=8, intermediate_size=32, intermediate_size_mlp=64, head_dim=16)),
)})
# multimodal wrappers over a text stack of the table (FAMILIES.md B.1)
ADAPTERS.update({a.model_type: a for a in (
    _wrapper("gemma4", "gemma4_text"),
    _wrapper("inkling2", "inkling2_text", tiny_wrapper=dict(vision_config=dict(text_hidden_size=64))),
    _wrapper("minimax_m3_vl", "minimax_m3_vl_text"),
    _wrapper("qwen4_exp", "qwen4_exp_text"),
)})
# FAMILIES.md section B, last types (issue 10). Their text configs (deepseek_ocr2_text, ...) are in
# no causal-LM mapping, so each wrapper is its own entry; mistral4 loads through the
# image-text-to-text mapping (load.model_class).
_OCR = dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=2, topk_group=1,
            topk_method="group_limited_greedy", num_key_value_heads=4, num_hidden_layers=3,
            mlp_layer_types=["dense", "sparse", "sparse"])  # DeepSeek-V2 MoE under a standard attention
# the OCR models' vision tower is two nested encoders (SAM, then a CLIP or Qwen2-like one)
_OCR_TOWERS = dict(vision_config=dict(
    sam_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                    patch_size=16, window_size=2, global_attn_indexes=[0], downsample_channels=[16, 32]),
    encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=320, image_size=32, patch_size=16)))
ADAPTERS.update({a.model_type: a for a in (
    MoEAdapter("deepseek_ocr2", "n_routed_experts", shared_attrs=("shared_experts",), group_keys=_GROUPS,
               tiny=_OCR, tiny_wrapper=_OCR_TOWERS),
    MoEAdapter("unlimited_ocr", "n_routed_experts", shared_attrs=("shared_experts",), group_keys=_GROUPS,
               tiny=dict(_OCR, sliding_window=16), tiny_wrapper=_OCR_TOWERS),
    MoEAdapter("mistral4", "n_routed_experts", shared_attrs=("shared_experts",), group_keys=_GROUPS,
               tiny=dict(**_DEEPSEEK, **_MLA, first_k_dense_replace=1, num_hidden_layers=3,
                         max_position_embeddings=1048576)),  # its YaRN default: 128 x 8192
    MoEAdapter("mistral_large4", "n_routed_experts", shared_attrs=("shared_experts",), group_keys=_GROUPS,
               tiny=dict(**_DEEPSEEK, **_MLA, **_INDEXER, first_k_dense_replace=1, num_hidden_layers=3)),
    MoEAdapter("step3p7", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
               tiny=dict(n_routed_experts=8, moe_intermediate_size=32, share_expert_dim=32, head_dim=16,
                         sliding_window=32, num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
                         layer_types=["full_attention", "sliding_attention", "full_attention"])),
    MoEAdapter("glm5_next", "n_routed_experts", router_tensors=_ECB, shared_attrs=("shared_experts",),
               group_keys=_GROUPS, hybrid="linear attention",
               tiny=dict({**_DEEPSEEK, **_MLA, **_INDEXER}, qk_rope_head_dim=0, num_attention_heads=4,
                         index_kpool=4, linear_head_dim=16, linear_num_heads=4, hc_mult=2, num_hidden_layers=3,
                         mlp_layer_types=["dense", "sparse", "sparse"],
                         layer_types=["linear_attention", "indexed_attention", "linear_attention"]),
               tiny_wrapper=dict(vision_config=dict(projection_intermediate_size=64))),
    MoEAdapter("muse_spark", "num_local_experts", router_tensors=_ECB, experts_common=("post_expert_norm.weight",),
               tiny=dict(num_local_experts=8, moe_intermediate_size=32, moe_hidden_size=32, head_dim=16,
                         num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"]),
               tiny_wrapper=dict(out_hidden_size=64, projector_hidden_size=64, audio_config=dict(
                   patch_sizes=[4], hidden_sizes=[32], depths=[1]))),
)})
# hash routing (tid2eid): the first layers route by token id and their routers have no correction bias;
# intermediate_size is its alias of moe_intermediate_size
ADAPTERS["deepseek_v4"] = MoEAdapter(
    "deepseek_v4", "n_routed_experts", router_tensors=_ECB, expert_ids=("tid2eid",), shared_attrs=("shared_experts",),
    tiny=dict(n_routed_experts=8, intermediate_size=32, n_shared_experts=1, head_dim=16, num_key_value_heads=1,
              q_lora_rank=16, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
              sliding_window=8, hc_mult=2, num_hidden_layers=3, mlp_layer_types=["hash_moe", "moe", "moe"],
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
              layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]))
ADAPTERS["llama4"] = _wrapper("llama4", "llama4_text", tiny_wrapper=dict(vision_config=dict(
    image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)),
    broken_in={"5.24.0": "Llama4ForConditionalGeneration.forward reads outputs.image_outputs, which its language "
                         "model does not return: every forward raises AttributeError"})


@dataclass
class MoELayer:
    """One MoE block found in a model."""

    name: str  # module path of the block, e.g. "model.layers.1.mlp"
    index: int  # decoder layer index
    router: nn.Module
    experts: nn.Module
    num_experts: int


def supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def get_adapter(model_type: str) -> MoEAdapter:
    """The adapter for a config's ``model_type``; an unknown or refused family is a clear error."""
    if model_type in REFUSED:
        raise UncurlError(f"model family {model_type!r} cannot be pruned by uncurl: {REFUSED[model_type]}")
    try:
        adapter = ADAPTERS[model_type]
    except KeyError:
        raise UncurlError(
            f"model family {model_type!r} is not supported; supported families: {supported()}"
        ) from None
    fault = broken_here(adapter)
    if fault:
        raise UncurlError(fault)
    return adapter


def broken_here(adapter: MoEAdapter) -> str | None:
    """The error for a family whose code in the installed transformers release cannot run, or None."""
    import transformers

    fault = adapter.broken_in.get(transformers.__version__)
    if fault is None:
        return None
    avoid = "".join(f",!={v}" for v in sorted(adapter.broken_in))
    return (f"model family {adapter.model_type!r} cannot run with the installed transformers {transformers.__version__}: "
            f"{fault}; install another 5.x release (pip install 'transformers>=5,<6{avoid}')")


def installed(model_type: str) -> bool:
    """Whether the installed transformers knows ``model_type`` (newer families need a newer one)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def needs_newer_transformers(model_type: str) -> str:
    """The error for a family in the table that the installed transformers does not know yet."""
    import transformers

    return (f"model family {model_type!r} is not in the installed transformers {transformers.__version__}; "
            "upgrade it (pip install -U 'transformers>=5,<6')")


def family_class(model_type: str) -> str | None:
    """The transformers class uncurl loads ``model_type`` with (None: not in this transformers)."""
    from transformers.models.auto import modeling_auto

    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
        name = getattr(modeling_auto, mapping, {}).get(model_type)
        if name:
            return name
    return None


def special(adapter: MoEAdapter) -> list[str]:
    """What sets a family apart from the plain layout, for ``uncurl families``."""
    out = []
    if adapter.group_keys is not None:
        out.append(f"grouped routing ({'/'.join(adapter.group_keys)})")
    if adapter.shared_attrs:
        out.append(f"shared: {', '.join(adapter.shared_attrs)}")
    if adapter.hybrid:
        out.append(f"hybrid: {adapter.hybrid}")
    if installed(adapter.model_type) and is_wrapper(adapter.model_type):
        out.append("multimodal (language stack pruned)")
    if adapter.block_tensors:
        out.append(f"block routing tensors: {', '.join(adapter.block_tensors)}")
    if adapter.tail_rows:
        out.append(f"router tail rows: {adapter.tail_rows}")
    if adapter.experts_common:
        out.append(f"not per-expert: experts.{', experts.'.join(adapter.experts_common)}")
    if adapter.expert_ids:
        out.append(f"expert-id tables: {', '.join(adapter.expert_ids)}")
    if adapter.router_output != "topk":
        out.append(f"router returns {adapter.router_output}")
    if adapter.mtp.wiring:
        out.append(f"MTP blocks pruned ({adapter.mtp.wiring} wiring)")
    if adapter.broken_in:
        out.append(f"refused with transformers {', '.join(adapter.broken_in)} (its code fails)")
    return out


def is_wrapper(model_type: str) -> bool:
    """Whether ``model_type``'s config wraps a text config (a multimodal model)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return "text_config" in (getattr(CONFIG_MAPPING[model_type], "sub_configs", {}) or {})


def moe_config(config):
    """The config that holds the MoE keys: a multimodal wrapper's text config, else ``config``."""
    return config.get_text_config(decoder=True)


def expert_count(config, adapter: MoEAdapter) -> int:
    return _uniform(moe_config(config), adapter.expert_count_key, "expert count")


def top_k(config, adapter: MoEAdapter) -> int:
    return _uniform(moe_config(config), adapter.top_k_key, "top-k")


def _uniform(config, key: str, what: str) -> int:
    """``config``'s ``key`` as one int. A per-layer list (Hunyuan-A13B's ``moe_topk: [8, 8, ...]``;
    transformers' hunyuan_v1_moe reads entry ``layer_idx``) is taken when its entries are all one value;
    layers that differ are refused, naming the key (uncurl prunes every MoE layer to one K and top-k)."""
    value = getattr(config, key)
    if not isinstance(value, (list, tuple)):
        return int(value)
    if not value or len(set(value)) != 1:
        raise UncurlError(f"config.json's {key} {list(value)!r} gives its MoE layers different values; uncurl "
                          f"prunes every layer alike and accepts a per-layer {what} only when all its entries are "
                          f"equal")
    return int(value[0])


def set_moe_keys(config, adapter: MoEAdapter, num_experts: int, top_k: int | None = None) -> None:
    """Write the new expert count (and top-k) where the family reads them (a per-layer list stays a
    list of the same length, ``_uniform``), and no MTP blocks: a pruned config announces them only
    where they are written with the new count (``mtp.py`` sets it back)."""
    target = moe_config(config)
    for key, value in ((adapter.expert_count_key, num_experts), (adapter.top_k_key, top_k)):
        if value is not None:
            old = getattr(target, key, None)
            setattr(target, key, [value] * len(old) if isinstance(old, (list, tuple)) else value)
    set_mtp_count(config, adapter, 0)


def _with_text(config) -> list:
    text = moe_config(config)
    return [text] if text is config else [text, config]


def mtp_count(config, adapter: MoEAdapter) -> tuple[str | None, int]:
    """(the config key, how many MTP blocks it announces); (None, 0) when none."""
    for cfg in _with_text(config):
        for key in adapter.mtp.count_keys:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
    return None, 0


def set_mtp_count(config, adapter: MoEAdapter, count: int) -> None:
    """Write ``count`` into every MTP count key the config has (a key absent or None stays so)."""
    for cfg in _with_text(config):
        for key in adapter.mtp.count_keys:
            if getattr(cfg, key, None) is not None:
                setattr(cfg, key, count)


def looped_layers(config, adapter: MoEAdapter) -> range:
    """The decoder layers a looped stack runs more than once per forward (see ``MoEAdapter.loop_keys``);
    empty for every other family, or a loop of one pass."""
    if adapter.loop_keys is None:
        return range(0)
    first, end, passes = (getattr(moe_config(config), key, None) for key in adapter.loop_keys)
    return range(int(first), int(end)) if first is not None and end is not None and (passes or 1) > 1 else range(0)


def tail_rows(config, adapter: MoEAdapter) -> int:
    """How many rows follow the experts' own in a tensor with tail rows (see ``MoEAdapter.tail_rows``)."""
    if isinstance(adapter.tail_rows, int):
        return adapter.tail_rows
    return int(getattr(moe_config(config), adapter.tail_rows, 0) or 0)


def routing_groups(config, adapter: MoEAdapter) -> tuple[int, int]:
    """(n_group, topk_group) for grouped routers; (1, 1) for plain top-k routing."""
    if adapter.group_keys is None:
        return 1, 1
    n_group, topk_group = (getattr(moe_config(config), k, None) for k in adapter.group_keys)
    return int(n_group or 1), int(topk_group or 1)


def language_stack(model: nn.Module, adapter: MoEAdapter) -> tuple[str, nn.Module]:
    """(module path, module) of the stack whose MoE blocks are pruned: ``adapter.language_stack``,
    else the model's decoder (``model.model`` of a causal LM, ``model.model.language_model`` of a
    multimodal wrapper), else the whole model."""
    if adapter.language_stack is not None:
        return adapter.language_stack, model.get_submodule(adapter.language_stack)
    decoder = getattr(model, "get_decoder", lambda: model)()
    for name, module in model.named_modules():
        if module is decoder:
            return name, module
    return "", model


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def find_moe_layers(model: nn.Module, adapter: MoEAdapter) -> list[MoELayer]:
    """Every MoE block of ``model``: a module holding both the router and the fused experts."""
    num_experts = expert_count(model.config, adapter)
    prefix, stack = language_stack(model, adapter)
    layers = []
    for name, module in stack.named_modules(prefix=prefix):
        router = getattr(module, adapter.router_attr, None)
        experts = getattr(module, adapter.experts_attr, None)
        if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
            continue
        match = _LAYER_INDEX.search(f".{name}.")
        layers.append(
            MoELayer(
                name=name,
                index=int(match.group(1)) if match else len(layers),
                router=router,
                experts=experts,
                num_experts=num_experts,
            )
        )
    if not layers:
        raise UncurlError(
            f"no MoE layers found in this {model.config.model_type!r} model (looked for modules "
            f"with '.{adapter.router_attr}' and '.{adapter.experts_attr}'); is it a dense model?"
        )
    # a router tensor may be missing from some layers (routing_names), never from all: a misspelt one
    seen = set().union(*(layer.router.state_dict().keys() for layer in layers))
    absent = [n for n in adapter.router_tensors + adapter.expert_ids if n not in seen]
    if absent:
        raise ValueError(f"{adapter.model_type}: no router of this model has {absent} (the adapter entry is wrong)")
    return layers


def per_expert_names(layer: MoELayer, adapter: MoEAdapter) -> tuple[list[str], list[str]]:
    """(expert tensor names, router tensor names) of one layer, as full state-dict keys.

    Every one of them has the expert axis first (or where ``adapter.expert_axes`` says);
    ``merge.rewrite_model`` raises on a tensor whose expert axis is not E (a bug in the adapter
    entry) rather than skipping it.
    """
    experts = [f"{layer.name}.{adapter.experts_attr}.{n}" for n in layer.experts.state_dict()
               if n not in adapter.experts_common]
    return experts, list(routing_names(layer, adapter).values())


def routing_names(layer: MoELayer, adapter: MoEAdapter) -> dict[str, str]:
    """{short name: full state-dict key} of a layer's per-expert routing tensors: the router's
    (``router_tensors``, named under the router; one this layer's router lacks is skipped, as
    deepseek_v4's hash routers have no ``e_score_correction_bias``) and the block's own
    (``block_tensors``)."""
    own = layer.router.state_dict().keys()
    names = {n: f"{layer.name}.{adapter.router_attr}.{n}" for n in adapter.router_tensors if n in own}
    names.update({n: f"{layer.name}.{n}" for n in adapter.block_tensors})
    if len(names) != len(own & set(adapter.router_tensors)) + len(adapter.block_tensors):
        raise ValueError(f"{adapter.model_type}: a router tensor and a block tensor share a name")
    return names


def expert_id_names(layer: MoELayer, adapter: MoEAdapter) -> list[str]:
    """Full state-dict keys of the layer's router tensors that hold expert ids (``expert_ids``)."""
    own = layer.router.state_dict().keys()
    return [f"{layer.name}.{adapter.router_attr}.{n}" for n in adapter.expert_ids if n in own]


def tiny_config(model_type: str, **overrides):
    """A small random-instance config for ``model_type`` (tests, the demo, benchmarks).

    A multimodal wrapper gets ``TINY_BASE``, ``tiny`` and ``overrides`` in its text config and
    small towers (``TINY_TOWERS``, then ``tiny_wrapper``) beside it."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    adapter = get_adapter(model_type)
    if not installed(model_type):
        raise UncurlError(needs_newer_transformers(model_type))
    text = {**TINY_BASE, **adapter.tiny, **overrides}
    if not is_wrapper(model_type):
        return AutoConfig.for_model(model_type, **text)
    subs = CONFIG_MAPPING[model_type].sub_configs
    wrapper = {k: dict(v) for k, v in TINY_TOWERS.items() if k in subs}
    wrapper["tie_word_embeddings"] = text["tie_word_embeddings"]  # some wrappers read it at the top
    for key, value in adapter.tiny_wrapper.items():
        wrapper[key] = {**wrapper[key], **value} if key in wrapper and isinstance(value, Mapping) else value
    return AutoConfig.for_model(model_type, text_config=text, **wrapper)
