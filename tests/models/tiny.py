"""Tiny configs, one per supported architecture: small enough for CPU, big enough to route.

Each keeps one dense layer where the architecture has them (mlp_only_layers / first_k_dense_replace /
mlp_layer_types) and a shared expert where it has one, so every Linear kind gets LoRA in the tests.
"""

from __future__ import annotations

import transformers

VOCAB = 96

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _mla(**kwargs):
    """DeepSeek-style multi-head latent attention dims (deepseek_v3, glm4_moe_lite)."""
    # MLA expands the latent to every head: no grouped KV heads.
    dims = dict(q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    return dict(dims, num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kwargs)


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    if model_type == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
        )
    if model_type == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **_COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0],
        )
    if model_type == "olmoe":
        return transformers.OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=6, num_experts_per_tok=2)
    if model_type == "mixtral":
        return transformers.MixtralConfig(**_COMMON, intermediate_size=16, num_local_experts=5, num_experts_per_tok=2)
    if model_type == "gpt_oss":
        # swiglu_limit small enough that the clamp is exercised by random weights.
        return transformers.GptOssConfig(
            **_COMMON, head_dim=8, intermediate_size=16, num_local_experts=5, num_experts_per_tok=2,
            sliding_window=8, layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.5,
        )
    if model_type == "glm4_moe":
        return transformers.Glm4MoeConfig(
            **_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5,
        )
    if model_type == "glm4_moe_lite":
        return transformers.Glm4MoeLiteConfig(
            **{**_COMMON, **_mla()}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            mlp_layer_types=["dense", "sparse"], routed_scaling_factor=2.5,
        )
    if model_type == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**_COMMON, **_mla()}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5,
        )
    if model_type == "qwen3_vl_moe":
        text = dict(_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                    num_experts_per_tok=2, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})
        text.pop("tie_word_embeddings")
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=1, deepstack_visual_indexes=[])
        return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    raise KeyError(model_type)
