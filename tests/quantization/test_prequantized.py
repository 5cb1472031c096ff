"""GPTQ and AWQ checkpoints packed by the test from a tiny Llama: textgen's logits against the
same model with the dequantized float weights (transformers cannot load GPTQ/AWQ on CPU without
GPTQModel / AutoAWQ). The quantized model must reproduce the dequantized one up to float32
rounding: prefills of 20 and 4 tokens through the packed kernels
(4 tokens). Tolerance 2e-3 on logits of magnitude ~1: the int4 kernel keeps
scales and zeros in the activation dtype and sums in a different order; a wrong nibble order,
zero offset or group permutation moves logits by > 0.05."""
from __future__ import annotations

import pytest
import torch

from tests.quantization.checkpoints import write_quantized
from tests.quantization.helpers import load_quantized, prefill_logits

ATOL = 2e-3
PROMPT = [5, 17, 300, 41, 8, 99, 512, 3, 77, 250, 11, 600, 13, 14, 800, 6, 7, 9, 420, 21]


@pytest.mark.parametrize(("method", "bits", "group_size", "desc_act", "sym"), [
    ("gptq", 4, 32, False, True),
    ("gptq", 4, 32, True, False),
    ("gptq", 4, 64, True, True),
    ("gptq", 8, -1, False, True),
    ("gptq", 8, 32, True, False),
    ("awq", 4, 32, False, False),
])
def test_prequantized_matches_dequantized_reference(tiny_llama, tmp_path, method, bits, group_size, desc_act, sym):
    quant, ref = write_quantized(tiny_llama, tmp_path, method, bits, group_size, desc_act, sym)
    loaded = load_quantized(str(quant))
    assert loaded.quantization.startswith(method)
    reference = load_quantized(str(ref)).model
    for tokens in (PROMPT, PROMPT[:4]):
        expected = prefill_logits(reference, tokens)
        got = prefill_logits(loaded.model, tokens)
        assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
    # and the quantization is not a no-op: the float original differs by more (int8 ~ 1e-3)
    original = prefill_logits(load_quantized(tiny_llama).model, PROMPT)
    assert (original - prefill_logits(reference, PROMPT)).abs().max() > (10 if bits == 4 else 0.1) * ATOL
