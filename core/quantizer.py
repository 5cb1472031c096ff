"""Kept for imports that predate the package: the contract lives in `textgen.core.quantization`."""
from textgen.core.quantization.base import QuantizationError, Quantizer, WeightKernels

__all__ = ["QuantizationError", "Quantizer", "WeightKernels"]
