"""Quantization methods (weight formats), their kernels, and how one is chosen.

See `base` for the per-layer contract, `moe` for stacked expert weights, `selection` for how
`--quantize` / `quantization_config` pick a method from the backend's registry."""
from textgen.core.quantization.base import QuantizationError, Quantizer, WeightKernels
from textgen.core.quantization.selection import QuantizerRegistry, select_quantizer

__all__ = ["QuantizationError", "Quantizer", "QuantizerRegistry", "WeightKernels", "select_quantizer"]
