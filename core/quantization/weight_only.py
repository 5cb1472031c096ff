"""On-the-fly weight-only quantization of a float checkpoint: `int8` (per output channel,
symmetric) and `int4` (groups along the input axis, asymmetric); both store the LM head (and a
tied embedding) in int8 (core/quantization/vocab.py). textgen's own method names:
Hugging Face has no `quant_method` for them; chosen with `--quantize int8|int4`.

The float weight loads exactly as an unquantized layer's (same loaders: fused shards, TP
slices), then `process_after_loading` quantizes it and hands the codes to the backend's kernels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.quantization.base import Quantizer
from textgen.core.quantization.kernels import quantize_int4_groups, quantize_int8_channels

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.quantization.moe import FusedMoEMethod

DEFAULT_INT4_GROUP_SIZE = 128
FALLBACK_GROUP_SIZES = (128, 64, 32, 16, 8)


def create_float_weight(layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
    """The unquantized layer's `weight` parameter: [out, in] in the compute dtype."""
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
    layer.weight.output_dim, layer.weight.input_dim = 0, 1


def on_the_fly_reasons(name: str, quant_config: dict[str, Any]) -> list[str]:
    if quant_config.get("textgen_on_the_fly"):
        return []
    return [f"'{name}' quantizes a float checkpoint while loading; this checkpoint is already quantized "
            f"with '{quant_config.get('quant_method')}'"]


def int4_group_size(in_features: int, requested: int) -> int:
    """`requested` when it divides the input size, else the largest fallback that does, else
    the whole row (one group)."""
    for size in (requested, *FALLBACK_GROUP_SIZES):
        if in_features % size == 0:
            return size
    return in_features


class Int8WeightOnly(Quantizer):
    name = "int8"
    quantizes_vocab = True

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        return on_the_fly_reasons(cls.name, quant_config)

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        create_float_weight(layer, in_features, out_features, dtype)

    def process_after_loading(self, layer: nn.Module) -> None:
        codes, scales = quantize_int8_channels(layer.weight.data)
        self.kernels.pack_int8(layer, codes, scales)

    def moe_method(self) -> FusedMoEMethod | None:
        from textgen.core.quantization.moe import Int8WeightOnlyMoE

        return Int8WeightOnlyMoE()

    def describe(self) -> str:
        return f"int8 weight-only per channel, LM head int8 (kernels: {self.kernels.describe()})"


class Int4WeightOnly(Quantizer):
    name = "int4"
    # the vocabulary matrix in int8 too: in bf16 it alone is ~1/5 of an int4 ~100M model's bytes
    quantizes_vocab = True

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        reasons = on_the_fly_reasons(cls.name, quant_config)
        size = quant_config.get("group_size", DEFAULT_INT4_GROUP_SIZE)
        if not isinstance(size, int) or size <= 0:
            reasons.append(f"int4 group_size must be a positive integer, got {size!r}")
        return reasons

    @property
    def group_size(self) -> int:
        return int(self.quant_config.get("group_size", DEFAULT_INT4_GROUP_SIZE))

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        create_float_weight(layer, in_features, out_features, dtype)

    def process_after_loading(self, layer: nn.Module) -> None:
        size = int4_group_size(layer.weight.shape[1], self.group_size)
        codes, scales, zeros = quantize_int4_groups(layer.weight.data, size)
        self.kernels.pack_int4(layer, codes, scales, zeros, size)

    def describe(self) -> str:
        return f"int4 weight-only, group {self.group_size}, LM head int8 (kernels: {self.kernels.describe()})"
