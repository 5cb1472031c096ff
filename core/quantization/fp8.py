"""`fp8`: float8_e4m3fn weights with float scales (per tensor or per output channel).

Two sources, one layout on the layer (fp8 codes [N, K] + per-channel scales [N]):
- a float checkpoint with `--quantize fp8`: quantized per channel while loading (absmax / 448);
- a checkpoint whose `quantization_config.quant_method` is "fp8" (`weight` in float8_e4m3fn,
  `weight_scale` per tensor or per channel; `input_scale` of static activation schemes is read and
  unused: activations stay in the compute dtype). A per-tensor scale of one part of a fused layer
  (q, k, v) fills that part's rows, so fused parts keep their own scales.
Compute: the backend's `WeightKernels.pack_fp8` / `apply`: the portable kernels dequantize to the
activation dtype and run a regular GEMM (CPU has no fp8 GEMM); CUDA on capability 8.9+ runs
`torch._scaled_mm` (textgen.backends.cuda.quant_kernels). Memory: 1 byte per weight.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.quantization.base import Quantizer
from textgen.core.quantization.weight_only import create_float_weight

if TYPE_CHECKING:
    from textgen.core.backend import Backend

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def quantize_fp8_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    scales = (w.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    return (w / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


class Fp8(Quantizer):
    name = "fp8"

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        if quant_config.get("weight_block_size"):
            return [f"fp8 with weight_block_size {quant_config['weight_block_size']} (block-wise scales) "
                    "is not supported yet: use a per-tensor or per-channel fp8 checkpoint"]
        return []

    @property
    def on_the_fly(self) -> bool:
        return bool(self.quant_config.get("textgen_on_the_fly"))

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        if self.on_the_fly:
            create_float_weight(layer, in_features, out_features, dtype)
            return
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        layer.weight.output_dim, layer.weight.input_dim = 0, 1
        layer.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        layer.weight_scale.output_dim = 0
        layer.weight_scale.weight_loader = _scale_loader(layer)
        if self.quant_config.get("activation_scheme") == "static":
            layer.input_scale = nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)

    def process_after_loading(self, layer: nn.Module) -> None:
        if self.on_the_fly:
            codes, scales = quantize_fp8_channels(layer.weight.data)
        else:
            codes, scales = layer.weight.data, layer.weight_scale.data
            for name in ("weight_scale", "input_scale"):
                layer._parameters.pop(name, None)
        self.kernels.pack_fp8(layer, codes, scales)

    def describe(self) -> str:
        source = "quantized while loading" if self.on_the_fly else "from the checkpoint"
        return f"fp8 e4m3 per-channel scales, {source} (kernels: {self.kernels.describe()})"


def _scale_loader(layer: nn.Module):  # noqa: ANN202 - a weight_loader closure
    """A scalar (per-tensor) scale is broadcast over the rows of its part of the layer."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.numel() == 1:
            rows = layer.shard_range(shard_id)[1] if shard_id is not None else param.shape[0]
            loaded = loaded.reshape(()).float().expand(rows * layer.tp_size)
        layer.weight_loader(param, loaded.reshape(-1).float(), shard_id)

    return load
