"""Native Llama-family models against transformers (float32, eager attention) through the paged
KV cache: prefill (whole or chunked after a cached prefix), greedy decode steps, and a mixed batch
of several requests that must equal each request run alone."""
from __future__ import annotations

import json

import pytest
import torch

from tests.models.parity import ATOL, PagedRunner, check_mixed_batch, hf_logits, prompt_of

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def model_path(tiny_model_factory, tmp_path_factory):
    """tiny_model_factory, plus overrides it cannot key on (dict values such as rope_scaling)."""
    from textgen.testing.tiny_models import make_tiny_model

    built: dict[str, str] = {}

    def get(arch: str, **overrides: object) -> str:
        if not any(isinstance(v, dict) for v in overrides.values()):
            return tiny_model_factory(arch, **overrides)
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in built:
            built[key] = str(make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **overrides))
        return built[key]

    return get


CASES = {
    "llama": ("llama", {}, 16, [40]),
    "mistral": ("mistral", {}, 16, [40]),  # default window 32 < 43 positions
    "qwen2-tied": ("qwen2", {}, 16, [40]),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}, 16, [40]),
    "mistral-window8-chunked": ("mistral", {"sliding_window": 8}, 4, [13, 27]),
    "qwen2-window-per-layer": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                         "max_window_layers": 1}, 4, [17, 23]),
    "llama-chunked": ("llama", {}, 4, [1, 22, 17]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_transformers(model_path, case: str) -> None:
    arch, overrides, block_size, chunks = CASES[case]
    path = model_path(arch, **overrides)
    runner = PagedRunner(path, block_size)
    prompt = prompt_of(sum(chunks), seed=len(case))
    seq, ours = runner.generate(prompt, chunks, steps=3)
    ref = hf_logits(path, seq.tokens)[: len(seq.tokens)]
    assert ours.shape == (len(prompt) + 3, 1000)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert seq.tokens[len(prompt):] == ref[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_sliding_window_and_llama3_rope_change_the_result(model_path) -> None:
    """Guards the cases above against configs that silently did nothing."""
    prompt = prompt_of(40, seed=1)
    full = hf_logits(model_path("mistral", sliding_window=None), prompt)
    windowed = hf_logits(model_path("mistral", sliding_window=8), prompt)
    assert not torch.allclose(full[-1], windowed[-1], atol=1e-3)
    plain = PagedRunner(model_path("llama"), 16).generate(prompt, [40], 0)[1]
    scaled = PagedRunner(model_path("llama", rope_scaling=LLAMA3_ROPE), 16).generate(prompt, [40], 0)[1]
    assert not torch.allclose(plain[-1], scaled[-1], atol=1e-3)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 8})],
                         ids=["llama", "mistral-window8"])
def test_mixed_batch_equals_each_request_alone(model_path, arch: str, overrides: dict) -> None:
    check_mixed_batch(model_path(arch, **overrides))
