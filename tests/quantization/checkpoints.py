"""Pre-quantized checkpoints written by the tests in the documented on-disk formats (GPTQ v1,
AWQ GEMM), from a tiny float model, plus the float checkpoint of the same dequantized weights
(the reference: what an exact kernel must reproduce)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] -> int32 [R / f, C]: row r*f + i at bit offset bits * i of word r."""
    f = 32 // bits
    v = values.long().reshape(-1, f, values.shape[1])
    return to_int32(sum(v[:, i] << (bits * i) for i in range(f)))


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    f = 32 // bits
    v = values.long().reshape(values.shape[0], -1, f)
    return to_int32(sum(v[..., i] << (bits * i) for i in range(f)))


def quantize(weight: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int, sym: bool):
    """Per-group min/max (asym) or absmax (sym) quantization of W [N, K] with groups g_idx [K].
    Returns codes [N, K], zeros [G, N] (int), scales [G, N] (float16) and the dequantized W."""
    n, k = weight.shape
    top = 2**bits - 1
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n)
    for g in range(groups):
        cols = weight[:, g_idx == g].float()
        if sym:
            scales[g] = cols.abs().amax(1).clamp(min=1e-6) / (2 ** (bits - 1) - 1)
            zeros[g] = 2 ** (bits - 1)
        else:
            lo, hi = cols.amin(1), cols.amax(1)
            scales[g] = ((hi - lo) / top).clamp(min=1e-6)
            # GPTQ v1 stores zero - 1 in `bits` bits: a zero of 0 cannot be written (real v1
            # exporters wrap it); keep zeros >= 1 so the file means what the reference computes
            zeros[g] = (-lo / scales[g]).round().clamp(1, top)
    scales = scales.half()
    s, z = scales.float()[g_idx].t(), zeros[g_idx].t()
    codes = (weight.float() / s + z).round().clamp(0, top)
    return codes.long(), zeros.long(), scales, (codes - z) * s


def write_quantized(src: str | Path, out: Path, method: str, bits: int = 4, group_size: int = 32,
                    desc_act: bool = False, sym: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """(quantized checkpoint, float reference checkpoint) of `src`'s projections."""
    weights = load_file(str(Path(src) / "model.safetensors"))
    quant, ref = {}, {}
    for name, tensor in weights.items():
        if not (name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS):
            quant[name] = ref[name] = tensor
            continue
        n, k = tensor.shape
        size = k if group_size <= 0 else group_size
        groups = k // size
        # act order sorts columns by the Hessian of the layer's input: projections that share an
        # input (q/k/v, gate/up) share their g_idx
        shared_input = name.split(".")[:-2] + [str(k)]
        gen = torch.Generator().manual_seed(seed + hash(tuple(shared_input)) % 2**31)
        g_idx = (torch.randperm(k, generator=gen) if desc_act else torch.arange(k)) // size
        codes, zeros, scales, dense = quantize(tensor, bits, g_idx, groups, sym)
        prefix = name.removesuffix(".weight")
        ref[name] = dense.float().contiguous()
        if method == "gptq":
            quant[f"{prefix}.qweight"] = pack_rows(codes.t(), bits)
            quant[f"{prefix}.qzeros"] = pack_cols(zeros - 1, bits)  # v1: zero - 1
            quant[f"{prefix}.scales"] = scales
            quant[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        else:  # awq gemm
            quant[f"{prefix}.qweight"] = pack_cols(codes.t().reshape(k, -1, 8)[..., list(AWQ_ORDER)].reshape(k, n), 4)
            quant[f"{prefix}.qzeros"] = pack_cols(zeros.reshape(groups, -1, 8)[..., list(AWQ_ORDER)].reshape(groups, n), 4)
            quant[f"{prefix}.scales"] = scales
    config = {"quant_method": method, "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym}
    if method == "awq":
        config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return _write(src, out / "quant", quant, config), _write(src, out / "ref", ref, None)


def _write(src: str | Path, out: Path, tensors: dict[str, torch.Tensor], quant_config: dict | None) -> Path:
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    if quant_config is not None:
        config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_compressed_tensors(src: str | Path, out: Path, preset: str, fmt: str, weight_only: bool = False,
                             **weight_args: object) -> Path:
    """`src` quantized by the compressed-tensors library with one of its preset schemes (e.g.
    "W4A16", "W8A8", "FP8_DYNAMIC") on every Linear but the LM head, min/max weight scales (what
    an observer computes without calibration data), compressed in format `fmt` and saved by
    transformers: the files llm-compressor writes. `weight_args` override the scheme's weights;
    `weight_only` drops its activation quantization (static scales would need calibration data)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config, preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    for key, value in weight_args.items():
        setattr(scheme.weights, key, value)
    if weight_only:
        scheme.input_activations = None
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "quantization_scheme"):
            args = module.quantization_scheme.weights
            low, high = _observed_range(module.weight.data, args.strategy, args.group_size)
            scale, zero_point = calculate_qparams(low, high, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    model.save_pretrained(str(out))
    compressor.update_config(str(out))
    for extra in Path(src).iterdir():
        if extra.name.startswith("tokenizer") or extra.suffix == ".jinja":
            shutil.copy(extra, out)
    return out


def _observed_range(weight: torch.Tensor, strategy: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    groups = weight.reshape(weight.shape[0], -1, group_size)
    return groups.amin(-1), groups.amax(-1)
