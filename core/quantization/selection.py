"""Choosing the quantization method: `--quantize` (TGI's names, env QUANTIZE) or the checkpoint's
`quantization_config`, looked up in the registry the chosen backend fed through
`textgen_quantizers`, then checked. Every refusal is one `QuantizationError` line that says why
and what to change."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textgen.core.quantization.base import QuantizationError, Quantizer
from textgen.core.registry import QuantizerInfo, load_class

if TYPE_CHECKING:
    import torch

    from textgen.core.backend import Backend

# TGI `--quantize` name -> (Hugging Face quant_method, the config it implies for a float checkpoint)
FLAG_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    # TGI's bnb layers: LLM.int8 with outlier threshold 6.0; 4-bit with compressed statistics
    "bitsandbytes": ("bitsandbytes", {"load_in_8bit": True, "llm_int8_threshold": 6.0}),
    "bitsandbytes-nf4": ("bitsandbytes", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                          "bnb_4bit_use_double_quant": True}),
    "bitsandbytes-fp4": ("bitsandbytes", {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                          "bnb_4bit_use_double_quant": True}),
    "int8": ("int8", {}),
    "int4": ("int4", {"group_size": 128}),
}
# What a method needs when the chosen backend does not offer it (the rest: "not offered").
REQUIREMENTS = {
    "eetq": ("eetq is not supported: its CUDA int8 kernels ship only in the eetq package, which is not on "
             "PyPI (TGI builds it from source); --quantize int8 is the int8 weight-only method here"),
    "exl2": "exl2 needs CUDA (exllamav2 kernels)",
    "marlin": "marlin needs CUDA (Marlin kernels, compute capability >= 8.0)",
}


@dataclass(frozen=True, slots=True)
class QuantizerRegistry:
    """The methods the chosen backend offers, by Hugging Face `quant_method` name."""

    backend_name: str
    infos: dict[str, QuantizerInfo]

    @classmethod
    def build(cls, backend_name: str, infos: list[QuantizerInfo]) -> QuantizerRegistry:
        """Later entries override earlier ones (a plugin may replace a built-in method)."""
        return cls(backend_name, {info.name: info for info in infos})

    def names(self) -> list[str]:
        return sorted(self.infos)


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    """config.json's `quantization_config` as a plain dict (transformers may give an object)."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else vars(raw)
    return dict(raw)


def requested_config(flag: str | None, checkpoint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The config of the method to use; None for plain weights. A flag naming the checkpoint's own
    method is accepted (TGI lets `--quantize gptq` serve a GPTQ checkpoint); re-quantizing a
    quantized checkpoint with another method is refused."""
    if flag is None:
        return checkpoint
    method, defaults = FLAG_METHODS.get(flag, (flag, {}))
    if checkpoint is not None:
        stored = checkpoint.get("quant_method")
        if stored != method:
            raise QuantizationError(f"the checkpoint is already quantized with '{stored}'; --quantize {flag} "
                                    f"cannot re-quantize it: drop --quantize (or QUANTIZE) to serve it as '{stored}'")
        return checkpoint
    return {"quant_method": method, **defaults, "textgen_on_the_fly": True}


def select_quantizer(flag: str | None, hf_config: Any, registry: QuantizerRegistry | None, backend: Backend,
                     dtype: torch.dtype) -> Quantizer | None:
    """The Quantizer for this model, or None for plain weights; raises QuantizationError."""
    quant_config = requested_config(flag, checkpoint_quant_config(hf_config))
    if quant_config is None:
        return None
    method = quant_config.get("quant_method")
    info = registry.infos.get(method) if registry is not None else None
    if info is None:
        raise QuantizationError(not_offered(method, flag, registry))
    cls: type[Quantizer] = load_class(info.class_path)
    reasons = cls.check(quant_config, backend, dtype)
    if reasons:
        raise QuantizationError(f"quantization '{method}' cannot run on backend '{backend.name}': "
                                + "; ".join(reasons))
    return cls(quant_config, load_class(info.kernels)())


def not_offered(method: object, flag: str | None, registry: QuantizerRegistry | None) -> str:
    source = f"--quantize {flag}" if flag else "the checkpoint's quantization_config"
    if registry is None:
        return f"quantization '{method}' ({source}) was requested but no quantization methods are registered"
    offered = ", ".join(registry.names()) or "none"
    why = REQUIREMENTS.get(str(method), f"backend '{registry.backend_name}' does not offer it")
    return (f"quantization '{method}' ({source}) cannot run on backend '{registry.backend_name}': {why} "
            f"(methods it runs: {offered})")
