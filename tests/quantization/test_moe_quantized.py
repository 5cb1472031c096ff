"""int8 experts in a tiny Mixtral: `--quantize int8` reaches the fused MoE layer through its
quantization method (core/quantization/moe.py), which stores every expert in int8 and runs the
one grouped GEMM; methods without an expert method are refused with the reason."""
from __future__ import annotations

import pytest
import torch

from tests.quantization.helpers import copy_dequantized, greedy, load_quantized, prefill_logits
from textgen.core.layers.moe import FusedMoE
from textgen.core.quantization import QuantizationError
from textgen.core.quantization.moe import Int8WeightOnlyMoE, UnquantizedMoE

PROMPT = [5, 17, 300, 41, 8, 99, 512, 3, 77, 250, 11, 600, 13, 14]


def test_int8_experts_in_a_tiny_mixtral(tiny_model_factory):
    """The quantized model computes the float model whose weights are its dequantized int8 weights
    (logits to float rounding, greedy decode at M = 1 equal). Against the unquantized model: int8
    per row moves each weight by <= 1/254 of its row's range, the logits (max ~4 here) by < 3% of
    their largest magnitude (measured 0.08 of 4.0, of which 0.066 with float experts)."""
    path = tiny_model_factory("mixtral")
    plain, quantized = load_quantized(path), load_quantized(path, "int8")
    layers = [m for m in quantized.model.modules() if isinstance(m, FusedMoE)]
    assert layers and all(isinstance(m.method, Int8WeightOnlyMoE) for m in layers)
    assert all(m.gate_up_proj_codes.dtype == m.down_proj_codes.dtype == torch.int8 for m in layers)
    assert all(isinstance(m.method, UnquantizedMoE) and not isinstance(m.method, Int8WeightOnlyMoE)
               for m in plain.model.modules() if isinstance(m, FusedMoE))
    expert_floats = sum(m.gate_up_proj_codes.numel() + m.down_proj_codes.numel() for m in layers)
    assert plain.weight_bytes - quantized.weight_bytes > expert_floats * 3 * 0.9  # 4 -> 1 byte per expert weight
    expected = prefill_logits(plain.model, PROMPT)
    got = prefill_logits(quantized.model, PROMPT)
    error = (got - expected).abs().max()
    assert 0 < error < 0.03 * expected.abs().max(), error
    dequantized = load_quantized(path).model
    copy_dequantized(quantized.model, dequantized)
    assert (got - prefill_logits(dequantized, PROMPT)).abs().max() < 1e-4
    assert greedy(quantized.model, PROMPT, 6) == greedy(dequantized, PROMPT, 6)


def test_a_method_without_experts_is_refused(tiny_model_factory):
    with pytest.raises(QuantizationError, match=r"^quantization 'int4' has no method for mixture-of-experts weights"):
        load_quantized(tiny_model_factory("mixtral"), "int4")
