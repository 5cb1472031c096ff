"""`compressed-tensors` checkpoints (llm-compressor's format, `quant_method: compressed-tensors`).

The config names one scheme per group of targets; textgen serves one group targeting `Linear`
(the LM head and MoE routers stay float, as `ignore` usually says) in one of these forms:

| scheme | format | tensors per layer W [N, K] | compute |
|---|---|---|---|
| W4A16 / W8A16 (int weights, group or channel scales, sym or asym) | pack-quantized | `weight_packed` int32 [N, K * bits / 32] (value + 2^(bits-1), element i at bit i * bits of its row), `weight_scale` [N, G], asym: `weight_zero_point` [N * bits / 32, G] packed the same way along N, `weight_shape` (dropped) | 4-bit: the backend's int4 kernels; 8-bit per channel: int8 kernels; 8-bit groups: int8 codes dequantized per call |
| W8A8 int8 (per-channel weights, dynamic per-token activations) | int-quantized | `weight` int8, `weight_scale` [N, 1] | activations quantized per token (absmax / 127.5, as the library computes), int8 x int8 -> int32 GEMM (`torch._int_mm`), scaled |
| FP8 (per-tensor or per-channel weights; no or dynamic per-token activations) | float-quantized | `weight` float8_e4m3fn, `weight_scale` [1] or [N, 1] | weight dequantized; dynamic activations rounded through fp8 per token (absmax / 448), as the library's forward does, then a GEMM |

W = (q - zero) * scale with signed codes q. A per-tensor scale of one part of a fused layer
(q, k, v) fills that part's rows. Static activation scales, block scales, act-order g_idx,
sparsity and transforms are refused with the reason.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.quantization.base import Quantizer
from textgen.core.quantization.fp8 import FP8, FP8_MAX, _scale_loader
from textgen.core.quantization.gptq import _param, unpack_along_cols, unpack_along_rows
from textgen.core.quantization.kernels import replace_weight

if TYPE_CHECKING:
    from textgen.core.backend import Backend

SUPPORTED = ("W4A16 / W8A16 pack-quantized, W8A8 int8 with dynamic per-token activations, FP8 per-tensor or "
             "per-channel weights with no or dynamic per-token activations")
INT8_ACTIVATION_RANGE = 127.5  # (127 - (-128)) / 2: compressed-tensors' symmetric int8 scale divisor


def scheme_kind(quant_config: dict[str, Any]) -> tuple[str | None, list[str]]:
    """("pack" | "w8a8" | "fp8", []) or (None, reasons)."""
    groups = quant_config.get("config_groups") or {}
    if len(groups) != 1:
        return None, [f"{len(groups)} config_groups (textgen serves one scheme for all linear layers)"]
    scheme = next(iter(groups.values()))
    reasons = []
    if "Linear" not in scheme.get("targets", []):
        reasons.append(f"targets {scheme.get('targets')} (textgen serves schemes targeting 'Linear')")
    for name in quant_config.get("ignore") or []:
        if not ("lm_head" in name or name.endswith(("mlp.gate", "mlp.gate$", "shared_expert_gate"))):
            reasons.append(f"ignore entry {name!r} (only the LM head and MoE routers can stay unquantized)")
    weights, acts = scheme.get("weights") or {}, scheme.get("input_activations")
    fmt = scheme.get("format") or quant_config.get("format")
    if weights.get("actorder") == "group" or weights.get("block_structure") or weights.get("strategy") == "block":
        reasons.append("act-order groups or block scales are not supported yet")
    kind = _kind(weights, acts, fmt)
    if kind is None:
        reasons.append(f"scheme weights {_short(weights)} activations {_short(acts)} format {fmt!r} "
                       f"(supported: {SUPPORTED})")
    return (kind if not reasons else None), reasons


def _kind(weights: dict[str, Any], acts: dict[str, Any] | None, fmt: str | None) -> str | None:
    wtype, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    dynamic_token = acts is not None and acts.get("dynamic") is True and acts.get("strategy") == "token"
    if wtype == "int" and bits in (4, 8) and strategy in ("group", "channel") and acts is None \
            and fmt == "pack-quantized":
        return "pack"
    if wtype == "int" and bits == 8 and strategy == "channel" and weights.get("symmetric", True) \
            and dynamic_token and acts.get("type") == "int" and acts.get("num_bits") == 8 \
            and fmt in ("int-quantized", "naive-quantized"):
        return "w8a8"
    if wtype == "float" and bits == 8 and strategy in ("tensor", "channel") \
            and (acts is None or (dynamic_token and acts.get("type") == "float")) \
            and fmt in ("float-quantized", "naive-quantized"):
        return "fp8"
    return None


def _short(args: dict[str, Any] | None) -> str:
    if not args:
        return "none"
    keys = ("type", "num_bits", "strategy", "group_size", "symmetric", "dynamic")
    return "{" + ", ".join(f"{k}={args[k]}" for k in keys if args.get(k) is not None) + "}"


class CompressedTensors(Quantizer):
    name = "compressed-tensors"

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        if quant_config.get("textgen_on_the_fly"):
            return ["compressed-tensors needs a compressed-tensors checkpoint (write one with llm-compressor)"]
        reasons = scheme_kind(quant_config)[1]
        for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
            if quant_config.get(key):
                reasons.append(f"{key} is not supported yet")
        return reasons

    @property
    def kind(self) -> str:
        return str(scheme_kind(self.quant_config)[0])

    @property
    def weights(self) -> dict[str, Any]:
        return next(iter(self.quant_config["config_groups"].values()))["weights"]

    def rename_checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]
                                  ) -> Iterator[tuple[str, torch.Tensor]]:
        return ((name, tensor) for name, tensor in weights if not name.endswith(".weight_shape"))

    def group_size(self, in_features: int) -> int:
        return int(self.weights.get("group_size") or in_features) if self.weights["strategy"] == "group" \
            else in_features

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        n, k = out_features, in_features
        if self.kind == "pack":
            bits = int(self.weights["num_bits"])
            groups = -(-k // self.group_size(k))
            _param(layer, "weight_packed", (n, -(-k * bits // 32)), torch.int32, output_dim=0, input_dim=1)
            _param(layer, "weight_scale", (n, groups), torch.float32, output_dim=0, input_dim=1)
            if not self.weights.get("symmetric", True):
                _param(layer, "weight_zero_point", (-(-n * bits // 32), groups), torch.int32, output_dim=0,
                       input_dim=1, packed_dim=0, packed_factor=32 // bits)
            return
        _param(layer, "weight", (n, k), torch.int8 if self.kind == "w8a8" else FP8, output_dim=0, input_dim=1)
        _param(layer, "weight_scale", (n,), torch.float32, output_dim=0)
        layer.weight_scale.weight_loader = _scale_loader(layer)

    def process_after_loading(self, layer: nn.Module) -> None:
        if self.kind == "pack":
            self._canonicalize_packed(layer)
            return
        codes, scales = layer.weight.data, layer._parameters.pop("weight_scale").data
        if self.kind == "w8a8":
            replace_weight(layer, w8a8_codes_t=codes.t().contiguous(), w8a8_scales=scales)
        else:
            replace_weight(layer, fp8_weight=codes.contiguous(), fp8_scales=scales)
        layer.weight_format = self.kind

    def _canonicalize_packed(self, layer: nn.Module) -> None:
        bits = int(self.weights["num_bits"])
        offset = 1 << (bits - 1)
        scales = layer._parameters.pop("weight_scale").data
        n, groups = scales.shape
        k = layer.in_features
        codes = unpack_along_cols(layer._parameters.pop("weight_packed").data, bits)[:, :k]  # q + offset
        zero_point = layer._parameters.pop("weight_zero_point", None)
        zeros = (unpack_along_rows(zero_point.data, bits)[:n] - offset).float() if zero_point is not None \
            else torch.zeros_like(scales)
        size = self.group_size(k)
        if bits == 4 and k % size == 0:  # W = (codes - 8) * s + (-zero * s)
            self.kernels.pack_int4(layer, codes.to(torch.uint8), scales, -zeros * scales, size)
        elif groups == 1 and zero_point is None:
            self.kernels.pack_int8(layer, (codes - offset).to(torch.int8), scales[:, 0])
        else:  # 8-bit groups (or a ragged last group): int8 codes, dequantized per call
            signed = (codes - offset).float() - zeros.repeat_interleave(size, dim=1)[:, :k]
            replace_weight(layer, group_codes=signed.to(torch.int16 if zero_point is not None else torch.int8),
                           group_scales=scales.to(layer.compute_dtype))
            layer.weight_format, layer.group_size = "int8_groups", size

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fmt = layer.weight_format
        if fmt == "w8a8":
            return _w8a8_linear(x, layer.w8a8_codes_t, layer.w8a8_scales, bias)
        if fmt == "fp8":
            weight = layer.fp8_weight.to(x.dtype) * layer.fp8_scales.to(x.dtype).unsqueeze(-1)
            acts = next(iter(self.quant_config["config_groups"].values())).get("input_activations")
            return F.linear(x if acts is None else fp8_round_per_token(x), weight, bias)
        if fmt == "int8_groups":
            scales = layer.group_scales.to(x.dtype).repeat_interleave(layer.group_size, dim=1)
            return F.linear(x, layer.group_codes.to(x.dtype) * scales[:, :layer.group_codes.shape[1]], bias)
        return self.kernels.apply(layer, x, bias)

    def describe(self) -> str:
        w = self.weights
        scales = f"group {w.get('group_size')}" if w.get("strategy") == "group" else f"per {w.get('strategy')}"
        what = {"pack": f"W{w['num_bits']}A16 {scales}{'' if w.get('symmetric', True) else ' asym'}",
                "w8a8": "W8A8 int8, dynamic per-token activations",
                "fp8": f"FP8 {scales}"}[self.kind]
        return f"compressed-tensors {what} (kernels: {self.kernels.describe()})"


def _w8a8_linear(x: torch.Tensor, codes_t: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """int8 activations (symmetric, per token) x int8 weights, int32 accumulation, then scaled."""
    flat = x.reshape(-1, x.shape[-1])
    token_scales = (flat.abs().amax(-1, keepdim=True) / INT8_ACTIVATION_RANGE).clamp(min=torch.finfo(x.dtype).tiny)
    q = torch.round(flat / token_scales).clamp(-128, 127).to(torch.int8)
    # torch._int_mm: any M on CPU; CUDA wants M > 16, so elsewhere the int8 values go through a float GEMM
    acc = torch._int_mm(q, codes_t) if flat.device.type == "cpu" else q.float() @ codes_t.float()
    out = (acc.float() * token_scales.float() * scales.float()).to(x.dtype)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def fp8_round_per_token(x: torch.Tensor) -> torch.Tensor:
    """x through float8_e4m3fn with one scale per token (absmax / 448), back in x's dtype."""
    scales = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(x.dtype).tiny)
    return (x / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(x.dtype) * scales
