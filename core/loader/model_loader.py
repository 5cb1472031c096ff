"""load_model: config + backend + attention kernel -> a native model with its weights loaded."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from textgen.core.loader.dtype import resolve_dtype
from textgen.core.loader.dummy import fill_dummy_weights
from textgen.core.loader.files import iterate_safetensors, resolve_model_path
from textgen.core.models.base import ModelBuildContext
from textgen.core.models.registry import resolve_model_class

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.model import Model
    from textgen.core.quantizer import Quantizer


@dataclass(slots=True)
class LoadedModel:
    model: Model
    hf_config: Any
    dtype: torch.dtype
    path: Path


def load_model(config: EngineConfig, backend: Backend, extra_architectures: dict[str, str] | None = None,
               quantizer: Quantizer | None = None) -> LoadedModel:
    """Resolve the files, read config.json, pick the class (plugin architectures override the
    built-in ones), build it on `backend.device` in the resolved dtype, then load the
    safetensors weights (or random ones for `load_format="dummy"`) and check all were filled."""
    from transformers import AutoConfig

    path = resolve_model_path(config.model_id, config.revision)
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)
    model_cls = resolve_model_class(hf_config, extra_architectures)
    _check_quantization(config, hf_config, quantizer)
    dtype = resolve_dtype(config.dtype, hf_config, backend)
    build = ModelBuildContext(dtype, backend.device, quantizer)
    with _building_on(backend.device, dtype):
        model = model_cls(hf_config, build)
    if config.load_format == "dummy":
        fill_dummy_weights(model, hf_config, config.seed)
    elif config.load_format in ("auto", "safetensors"):
        _check_all_loaded(model, model.load_weights(iterate_safetensors(path)))
    else:
        raise ValueError(f"unknown load_format {config.load_format!r}: use auto, safetensors or dummy")
    _process_after_loading(model)
    return LoadedModel(model.eval(), hf_config, dtype, path)


@contextlib.contextmanager
def _building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create tensors on `device` with `dtype` as the default, restoring the previous default
    even when the constructor raises."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _check_quantization(config: EngineConfig, hf_config: Any, quantizer: Quantizer | None) -> None:
    quant_config = getattr(hf_config, "quantization_config", None)
    if isinstance(quant_config, dict):
        method = quant_config.get("quant_method")
    else:
        method = getattr(quant_config, "quant_method", None)
    method = config.quantize or method
    if method and quantizer is None:
        raise ValueError(f"quantization method {method!r} has no quantizer on this backend; "
                         f"use an unquantized checkpoint or a backend that offers {method!r}")


def _check_all_loaded(model: torch.nn.Module, loaded: set[str]) -> None:
    missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"the checkpoint does not provide these parameters of {type(model).__name__}: {shown}")


def _process_after_loading(model: torch.nn.Module) -> None:
    for module in model.modules():
        hook = getattr(module, "process_after_loading", None)
        if callable(hook):
            hook()
