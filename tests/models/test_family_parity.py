"""Every native family beyond Llama against transformers: a tiny seeded random model (real
safetensors, random norm weights and biases) prefilled in chunks after a cached prefix, then
decoded greedily, through the engine's paged step path (block size 4, so the prompt spans several
blocks). Logits within 1e-4 (float32) at every position; greedy tokens = transformers' argmax."""
from __future__ import annotations

import pytest

from tests.models.parity import check_prefill_and_decode

# case -> (tiny architecture, config overrides, block size, prefill chunks)
CASES = {
    "qwen3-window-per-layer": ("qwen3", {}, 4, [13, 9, 11]),
    "gemma": ("gemma", {}, 4, [13, 9, 11]),
    "gemma2-softcap-alternating-window": ("gemma2", {}, 4, [13, 9, 11]),
    "phi3-partial-rotary-window": ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 8}, 4, [13, 9, 11]),
    "mixtral-moe-window": ("mixtral", {}, 4, [13, 9, 11]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_transformers(tiny_model_factory, case: str) -> None:
    arch, overrides, block_size, chunks = CASES[case]
    check_prefill_and_decode(tiny_model_factory(arch, **overrides), block_size, chunks, seed=len(case))
