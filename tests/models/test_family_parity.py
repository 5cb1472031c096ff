"""Every native family beyond Llama against transformers: a tiny seeded random model (real
safetensors, random norm weights and biases) prefilled in chunks after a cached prefix, then
decoded greedily, through the engine's paged step path (block size 4, so the prompt spans several
blocks). Logits within 1e-4 (float32) at every position; greedy tokens = transformers' argmax."""
from __future__ import annotations

import pytest
import torch

from tests.models.parity import check_mixed_batch, check_prefill_and_decode, hf_logits, prompt_of

# transformers' eager Falcon adds ALiBi twice (once in the scores, once folded into the causal
# mask, transformers 5.24); its SDPA path adds it once, as the model was trained: the reference.
SDPA_REFERENCE = {"falcon-rw-alibi-sequential-bias"}

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}

# case -> (tiny architecture, config overrides, block size, prefill chunks)
CASES = {
    "qwen3-window-per-layer": ("qwen3", {}, 4, [13, 9, 11]),
    "gemma": ("gemma", {}, 4, [13, 9, 11]),
    "gemma2-softcap-alternating-window": ("gemma2", {}, 4, [13, 9, 11]),
    "gemma3-local-global-rope-qk-norm": ("gemma3", {}, 4, [13, 9, 11]),
    "phi3-partial-rotary-window": ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 8}, 4, [13, 9, 11]),
    "gpt-neox-parallel-residual": ("gpt_neox", {}, 4, [13, 9, 11]),
    "gpt-neox-sequential-residual": ("gpt_neox", {"use_parallel_residual": False}, 4, [13, 9, 11]),
    "stablelm-qk-layernorm-qkv-bias": ("stablelm", {}, 4, [13, 9, 11]),
    "stablelm-parallel-residual": ("stablelm", {"use_parallel_residual": True, "qk_layernorm": False}, 4, [13, 9, 11]),
    "starcoder2-bias-window": ("starcoder2", {}, 4, [13, 9, 11]),
    "granite-multipliers": ("granite", {}, 4, [13, 9, 11]),
    "olmo2-post-norms": ("olmo2", {}, 4, [13, 9, 11]),
    "phi-qk-layernorm": ("phi", {}, 4, [13, 9, 11]),
    "phi-plain": ("phi", {"qk_layernorm": False}, 4, [13, 9, 11]),
    "cohere-qk-norm-interleaved-rotary": ("cohere", {}, 4, [13, 9, 11]),
    "gpt2-conv1d-inverse-layer-scale": ("gpt2", {}, 4, [13, 9, 11]),
    "gpt-bigcode-multi-query": ("gpt_bigcode", {}, 4, [13, 9, 11]),
    "gpt-bigcode-multi-head": ("gpt_bigcode", {"multi_query": False}, 4, [13, 9, 11]),
    "bloom-alibi": ("bloom", {}, 4, [13, 9, 11]),
    "bloom-alibi-6-heads-post-ln-residual": ("bloom", {"hidden_size": 48, "n_head": 6,
                                              "apply_residual_connection_post_layernorm": True},
                                             4, [13, 9, 11]),
    "falcon-7b-multi-query-parallel": ("falcon", {}, 4, [13, 9, 11]),
    "falcon-40b-new-architecture-gqa": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2,
                                                   "tie_word_embeddings": True}, 4, [13, 9, 11]),
    "falcon-new-architecture-one-norm": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2,
                                                    "num_ln_in_parallel_attn": 1}, 4, [13, 9, 11]),
    "falcon-rw-alibi-sequential-bias": ("falcon", {"alibi": True, "multi_query": False, "parallel_attn": False,
                                                   "bias": True}, 4, [13, 9, 11]),
    "phi3-longrope-short": ("phi3", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64},
                            4, [13, 9, 11]),
    "mixtral-moe-window": ("mixtral", {}, 4, [13, 9, 11]),
    "qwen2-moe-shared-expert-dense-layer": ("qwen2_moe", {}, 4, [13, 9, 11]),
    "qwen3-moe-norm-topk": ("qwen3_moe", {"seed": 1}, 4, [13, 9, 11]),  # seed 0 leaves an expert idle
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_transformers(tiny_model_factory, case: str) -> None:
    arch, overrides, block_size, chunks = CASES[case]
    check_prefill_and_decode(tiny_model_factory(arch, **overrides), block_size, chunks, seed=len(case),
                             attn_implementation="sdpa" if case in SDPA_REFERENCE else "eager")


# (arch, base overrides, changes each of which must alter transformers' logits)
GUARDS = [
    ("gemma2", {}, [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                    {"sliding_window": 1024}, {"query_pre_attn_scalar": 16}]),
    ("qwen3", {}, [{"sliding_window": 1024}]),
    ("gemma3", {}, [{"sliding_window": 1024}, {"rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}]),
    ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 8}, [{"partial_rotary_factor": 1.0},
                                                                   {"sliding_window": None}]),
    ("mixtral", {}, [{"sliding_window": None}]),
    ("phi3", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64},
     [{"rope_parameters": {**LONGROPE, "short_factor": [1.0] * 8}}]),
    ("gpt_neox", {}, [{"rotary_pct": 1.0}, {"use_parallel_residual": False}]),
    ("stablelm", {}, [{"qk_layernorm": False}, {"use_qkv_bias": False}]),
    ("starcoder2", {}, [{"sliding_window": None}]),
    ("phi", {}, [{"qk_layernorm": False}, {"partial_rotary_factor": 1.0}]),
    ("cohere", {}, [{"use_qk_norm": False}, {"logit_scale": 1.0}]),
    ("gpt2", {}, [{"scale_attn_by_inverse_layer_idx": False}]),
    ("granite", {}, [{"embedding_multiplier": 1.0}, {"attention_multiplier": 2.0}, {"residual_multiplier": 1.0},
                     {"logits_scaling": 1.0}]),
]


@pytest.mark.parametrize("arch,base,changes", GUARDS, ids=[g[0] for g in GUARDS])
def test_each_tested_feature_changes_the_result(tiny_model_factory, arch: str, base: dict, changes: list) -> None:
    """Guards the cases above against configs that silently did nothing (same seed, same weights)."""
    prompt = prompt_of(33, 1)
    reference = hf_logits(tiny_model_factory(arch, **base), prompt)[-1]
    for change in changes:
        changed = hf_logits(tiny_model_factory(arch, **{**base, **change}), prompt)[-1]
        assert not torch.allclose(reference, changed, atol=1e-3), change


BATCHED = ["gemma2", "mixtral", "bloom", "falcon-new", "gpt_bigcode", "qwen2_moe"]
_BATCHED_OVERRIDES = {"falcon-new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2})}


@pytest.mark.parametrize("name", BATCHED)
def test_mixed_batch_equals_each_request_alone(tiny_model_factory, name: str) -> None:
    """Three requests in shared steps (a chunk after a cached prefix, a decode and a full prefill
    together): each one's logits equal running it alone and transformers."""
    arch, overrides = _BATCHED_OVERRIDES.get(name, (name, {}))
    check_mixed_batch(tiny_model_factory(arch, **overrides))


def test_longrope_uses_the_long_factors_from_the_original_length_on(tiny_model_factory) -> None:
    """Per position: short factors below original_max_position_embeddings (the parity case above),
    transformers' long frequencies and attention factor from there on."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from textgen.core.layers.rotary import get_rope

    config = AutoConfig.from_pretrained(tiny_model_factory("phi3", rope_parameters=LONGROPE,
                                                           original_max_position_embeddings=64))
    rotary = get_rope(config, 16)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](config, None)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=65)
    assert factor > 1 and not torch.allclose(short, long)
    for position, inv_freq in ((63, short), (64, long), (500, long)):
        torch.testing.assert_close(rotary.cos_cache[position], (position * inv_freq).cos() * factor)
        torch.testing.assert_close(rotary.sin_cache[position], (position * inv_freq).sin() * factor)
