"""The built-in methods as `QuantizerInfo`s, for backend plugins to offer with their kernels."""
from __future__ import annotations

from textgen.core.registry import PORTABLE_KERNELS, QuantizerInfo

_Q = "textgen.core.quantization"
BUILTIN_METHODS: dict[str, str] = {
    "int8": f"{_Q}.weight_only:Int8WeightOnly",
    "int4": f"{_Q}.weight_only:Int4WeightOnly",
    "fp8": f"{_Q}.fp8:Fp8",
    "gptq": f"{_Q}.gptq:GPTQ",
    "awq": f"{_Q}.gptq:AWQ",
    "bitsandbytes": f"{_Q}.bitsandbytes:BitsAndBytes",
    "compressed-tensors": f"{_Q}.compressed_tensors:CompressedTensors",
}


def builtin_quantizers(kernels: str = PORTABLE_KERNELS, exclude: tuple[str, ...] = ()) -> list[QuantizerInfo]:
    """Every built-in method computing with `kernels` (a `WeightKernels` class path)."""
    return [QuantizerInfo(name, path, kernels) for name, path in BUILTIN_METHODS.items() if name not in exclude]
