"""On-the-fly methods, the CPU kernels' two paths, the MoE interface and startup refusals."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from textgen.backends.cpu.quant_kernels import MAX_PACKED_ROWS, CPUKernels, int4_layout_understood
from textgen.core.quantization import QuantizationError
from textgen.core.quantization.kernels import dequantize_int4, quantize_int4_groups, quantize_int8_channels
from textgen.core.quantization.moe import Int8WeightOnlyMoE, UnquantizedMoE
from tests.quantization.helpers import greedy, load_quantized, prefill_logits


def _layer(dtype: torch.dtype) -> nn.Module:
    layer = nn.Module()
    layer.compute_dtype = dtype
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 16, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1, 40])
def test_cpu_kernels_compute_the_dequantized_weight(dtype, rows):
    """Every path (GEMV, packed kernel up to MAX_PACKED_ROWS, dequantize + GEMM above) against x @ W.T
    of the dequantized weight in float64; tolerance: one activation-dtype rounding of the output."""
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(128, 256, generator=gen) * 0.05, torch.randn(rows, 256, generator=gen).to(dtype)
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    codes, scales, zeros = quantize_int4_groups(weight, 64)
    layer = _layer(dtype)
    CPUKernels().pack_int4(layer, codes, scales, zeros, 64)
    assert layer.weight_format in ("int4_gemv", "int4_cpu")  # the GEMV layout where its kernel builds
    dense = dequantize_int4(codes, scales, zeros, torch.float64)
    expected = x.double() @ dense.t()
    assert torch.allclose(CPUKernels().apply(layer, x, None).double(), expected, atol=atol)
    codes8, scales8 = quantize_int8_channels(weight)
    CPUKernels().pack_int8(layer := _layer(dtype), codes8, scales8)
    expected8 = x.double() @ (codes8.double() * scales8.double().unsqueeze(-1)).t()
    assert torch.allclose(CPUKernels().apply(layer, x, None).double(), expected8, atol=atol)


def test_int4_unpack_matches_this_torch_build():
    assert int4_layout_understood()


def test_on_the_fly_methods_stay_close_and_shrink_weights(tiny_llama):
    """Logit error bounds: int8 per channel ~0.5% of the weight range, int4 group 64 ~7%, fp8
    e4m3 (3 mantissa bits) ~3%; measured 0.006 / 0.08 / 0.02 on logits of max ~0.7."""
    tokens = list(range(5, 40))
    plain = load_quantized(tiny_llama)
    expected = prefill_logits(plain.model, tokens)
    for method, bound in (("int8", 0.02), ("int4", 0.2), ("fp8", 0.06)):
        loaded = load_quantized(tiny_llama, method)
        assert loaded.quantization.startswith(method)
        assert loaded.weight_bytes < plain.weight_bytes
        assert (prefill_logits(loaded.model, tokens) - expected).abs().max() < bound


@pytest.mark.parametrize("method", [UnquantizedMoE, Int8WeightOnlyMoE])
def test_moe_methods_compute_the_routed_experts(method):
    """Each token's output = sum over its top-k experts of weight * down(silu(gate(x)) * up(x)),
    experts loaded one part at a time (shard ids (expert, part)) as from a Mixtral checkpoint."""
    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, k = 4, 32, 48, 10, 2
    w1, w3 = torch.randn(experts, inter, hidden, generator=gen), torch.randn(experts, inter, hidden, generator=gen)
    w2 = torch.randn(experts, hidden, inter, generator=gen)
    layer, impl = nn.Module(), method()
    layer.act = torch.nn.functional.silu
    impl.create_weights(layer, experts, hidden, inter, torch.float32)
    for e in range(experts):
        for part, tensor in enumerate((w1[e], w3[e])):
            layer.gate_up_proj.weight_loader(layer.gate_up_proj, tensor, (e, part))
        layer.down_proj.weight_loader(layer.down_proj, w2[e], (e, 2))
    impl.process_after_loading(layer)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.randint(0, experts, (tokens, k), generator=gen)
    weights = torch.rand(tokens, k, generator=gen)
    expected = torch.stack([sum(weights[t, j] * (w2[e] @ (torch.nn.functional.silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
                                for j, e in enumerate(ids[t].tolist())) for t in range(tokens)])
    rel = 1e-5 if method is UnquantizedMoE else 2e-2  # int8: ~1/254 of each row's range per weight
    assert torch.allclose(impl.apply(layer, x, weights, ids), expected, atol=rel * expected.abs().max())
    if method is Int8WeightOnlyMoE:
        assert layer.gate_up_proj_codes.dtype == torch.int8 and "gate_up_proj" not in dict(layer.named_parameters())


def test_demo_model_greedy_agreement():
    """The demo model quantized keeps the unquantized greedy continuation (decode at M = 1 runs the
    packed kernels). Measured: int8 32/32 tokens, int4 prefix agreement reported by the assert."""
    from textgen.demo import DEMO_MODEL_PATH

    prompt = [1, 1070, 220, 84, 115]  # "def " in the demo tokenizer's ids is not needed: any prompt
    base = greedy(load_quantized(DEMO_MODEL_PATH).model, prompt, 32)
    agreement = {}
    for method in ("int8", "int4"):
        got = greedy(load_quantized(DEMO_MODEL_PATH, method).model, prompt, 32)
        agreement[method] = next((i for i, (a, b) in enumerate(zip(got, base)) if a != b), len(base))
    assert agreement["int8"] >= 16 and agreement["int4"] >= 4, agreement


def test_unknown_method_and_bad_shapes_are_one_line_errors(tiny_llama, tmp_path):
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_llama, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "hqq"}}))
    with pytest.raises(QuantizationError, match=r"^quantization 'hqq' \(the checkpoint's quantization_config\) "
                                                r"cannot run on backend 'cpu': backend 'cpu' does not offer it "
                                                r"\(methods it runs: awq, bitsandbytes, compressed-tensors, fp8, gptq, int4, int8\)$"):
        load_quantized(str(unknown))
    with pytest.raises(QuantizationError, match="already quantized with 'hqq'; --quantize int8 cannot re-quantize"):
        load_quantized(str(unknown), "int8")
    from tests.quantization.checkpoints import write_quantized

    quant, _ = write_quantized(tiny_llama, tmp_path / "gptq", "gptq", 4, 32)
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64  # scales on disk have 2 groups, the layer expects 1
    (quant / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^checkpoint tensor of shape \(4, 8\) does not have 2 entries on axis 0$"):
        load_quantized(str(quant))  # the first fused qzeros part: 4 groups on disk, 2 expected
