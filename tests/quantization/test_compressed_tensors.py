"""compressed-tensors checkpoints written by the compressed-tensors library (min/max weight
scales, the library's compressors, saved by transformers), served by textgen and compared with
transformers loading the same files (it decompresses them with the library and fake-quantizes
dynamic activations in its forward).

Same arithmetic, same numbers: int4 / int8 codes times the stored scales, activations rounded per
token exactly as the library does (int8: absmax / 127.5; fp8: absmax / 448). Measured max logit
difference 0.0 (W4A16, W8A16, FP8) and 2.4e-7 (W8A8: int32 accumulation instead of float);
bound 1e-4 on logits of magnitude ~0.7, while the quantization itself moves them by 0.005 (8-bit)
to 0.08 (4-bit). Greedy tokens equal over the prompts."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.quantization.checkpoints import write_compressed_tensors
from tests.quantization.helpers import greedy, hf_greedy, hf_logits, load_quantized, prefill_logits

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM  # noqa: E402

PROMPTS = ([5, 17, 300, 41, 8, 99, 512, 3, 77, 250, 11, 600], [1, 900, 42])
STEPS = 8
SAME_ARITHMETIC = 1e-4
# name -> (preset, format, extra arguments, what textgen's description says)
CASES = {
    "w4a16-g32": ("W4A16", "pack-quantized", {"group_size": 32}, "W4A16 group 32"),
    "w8a16-channel": ("W8A16", "pack-quantized", {"strategy": "channel", "group_size": None}, "W8A16 per channel"),
    "w8a16-g32": ("W8A16", "pack-quantized", {"group_size": 32}, "W8A16 group 32"),
    "w8a8-int8": ("W8A8", "int-quantized", {}, "W8A8 int8, dynamic per-token activations"),
    "fp8-tensor": ("FP8", "float-quantized", {"weight_only": True}, "FP8 per tensor"),
    "fp8-channel-dynamic": ("FP8_DYNAMIC", "float-quantized", {}, "FP8 per channel"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_matches_transformers(tiny_llama, tmp_path, name):
    preset, fmt, extra, described = CASES[name]
    path = write_compressed_tensors(tiny_llama, tmp_path / name, preset, fmt, **extra)
    loaded = load_quantized(str(path))
    assert loaded.quantization.startswith(f"compressed-tensors {described}")
    assert loaded.method == "compressed-tensors"
    assert loaded.weight_bytes < load_quantized(tiny_llama).weight_bytes
    hf = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float32).eval()
    plain = load_quantized(tiny_llama).model
    for prompt in PROMPTS:
        got, expected = prefill_logits(loaded.model, prompt), hf_logits(hf, prompt)
        assert (got - expected).abs().max() < SAME_ARITHMETIC, (got - expected).abs().max()
        assert (got - prefill_logits(plain, prompt)).abs().max() > 10 * SAME_ARITHMETIC  # really quantized
        assert greedy(loaded.model, prompt, STEPS) == hf_greedy(hf, prompt, STEPS)


def test_asymmetric_w4a16_matches_the_library_decompression(tiny_llama, tmp_path):
    """Asymmetric packed zero points: transformers 5.24 cannot load them (it expects unpacked
    [N, G] zero points), so the reference is the checkpoint decompressed by the library's own
    unpack and dequantize, served as float weights."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    path = write_compressed_tensors(tiny_llama, tmp_path / "asym", "W4A16_ASYM", "pack-quantized", group_size=32)
    loaded = load_quantized(str(path))
    assert loaded.quantization.startswith("compressed-tensors W4A16 group 32 asym")
    args = QuantizationArgs(**json.loads((path / "config.json").read_text())["quantization_config"]
                            ["config_groups"]["group_0"]["weights"])
    tensors, dense = load_file(str(path / "model.safetensors")), {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_packed"):
            prefix = name.removesuffix(".weight_packed")
            shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
            scale = tensors[f"{prefix}.weight_scale"]
            codes = unpack_from_int32(tensor, 4, shape, packed_dim=1)
            zero = unpack_from_int32(tensors[f"{prefix}.weight_zero_point"], 4, scale.shape, packed_dim=0)
            dense[f"{prefix}.weight"] = dequantize(codes, scale, zero, args, dtype=torch.float32)
        elif not name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
            dense[name] = tensor
    reference = tmp_path / "reference"
    shutil.copytree(tiny_llama, reference)
    save_file(dense, str(reference / "model.safetensors"), metadata={"format": "pt"})
    expected_model = load_quantized(str(reference)).model
    for prompt in PROMPTS:
        got, expected = prefill_logits(loaded.model, prompt), prefill_logits(expected_model, prompt)
        assert (got - expected).abs().max() < 2e-3, (got - expected).abs().max()  # the int4 kernel sums in another order
        assert greedy(loaded.model, prompt, STEPS) == greedy(expected_model, prompt, STEPS)


def test_unsupported_schemes_are_refused_with_the_reason(tiny_llama, tmp_path):
    from textgen.core.quantization import QuantizationError

    path = tmp_path / "static"
    shutil.copytree(tiny_llama, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "ignore": ["lm_head"], "config_groups": {"group_0": {
                                         "targets": ["Linear"], "format": "float-quantized",
                                         "weights": {"type": "float", "num_bits": 8, "strategy": "tensor"},
                                         "input_activations": {"type": "float", "num_bits": 8, "strategy": "tensor",
                                                               "dynamic": False}}}}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"^quantization 'compressed-tensors' cannot run on backend 'cpu': "
                                                r"scheme weights \{type=float, num_bits=8, strategy=tensor\} activations "
                                                r"\{type=float, num_bits=8, strategy=tensor, dynamic=False\} format "
                                                r"'float-quantized' \(supported: W4A16"):
        load_quantized(str(path))
