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
from textgen.core.loader.lazy_slice import iterate_safetensor_slices
from textgen.core.models.base import ModelBuildContext
from textgen.core.models.registry import resolve_model_class
from textgen.core.quantization import QuantizerRegistry, select_quantizer

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig
    from textgen.core.distributed import Communicator
    from textgen.core.model import Model
    from textgen.core.registry import QuantizerInfo


@dataclass(slots=True)
class LoadedModel:
    model: Model
    hf_config: Any
    dtype: torch.dtype
    path: Path
    quantization: str = "none"  # the method's description, for startup lines and /info
    weight_bytes: int = 0  # parameters and buffers after process_after_loading
    tp_rank: int = 0  # this process's tensor-parallel rank and the number of ranks
    tp_size: int = 1

    def describe_weights(self) -> str:
        return f"weights {self.weight_bytes / 2**20:.1f} MiB, quantization: {self.quantization}"


def load_model(config: EngineConfig, backend: Backend, extra_architectures: dict[str, str] | None = None,
               quantizers: list[QuantizerInfo] | None = None) -> LoadedModel:
    """Resolve the files, read config.json, pick the class (plugin architectures override the
    built-in ones), choose the quantization method among `quantizers` (what the backend's
    `textgen_quantizers` offered), build the model on `backend.device` in the resolved dtype,
    then load the safetensors weights (or random ones for `load_format="dummy"`), check all were
    filled, and let each layer repack them (`process_after_loading`)."""
    from transformers import AutoConfig

    path = resolve_model_path(config.model_id, config.revision)
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)
    model_cls = resolve_model_class(hf_config, extra_architectures)
    dtype = resolve_dtype(config.dtype, hf_config, backend)
    registry = QuantizerRegistry.build(backend.name, quantizers or [])
    quantizer = select_quantizer(config.quantize, hf_config, registry, backend, dtype)
    communicator = backend.communicator()
    build = ModelBuildContext(dtype, backend.device, quantizer, communicator.rank, communicator.world_size)
    with _building_on(backend.device, dtype):
        model = model_cls(hf_config, build)
    if config.load_format == "dummy":
        fill_dummy_weights(model, hf_config, config.seed)
    elif config.load_format in ("auto", "safetensors"):
        weights = iterate_safetensors(path) if build.tp_size == 1 else iterate_safetensor_slices(path)
        _check_all_loaded(model, model.load_weights(weights))
    else:
        raise ValueError(f"unknown load_format {config.load_format!r}: use auto, safetensors or dummy")
    _process_after_loading(model)
    _attach_communicator(model, communicator)
    described = quantizer.describe() if quantizer is not None else "none"
    return LoadedModel(model.eval(), hf_config, dtype, path, described, weight_bytes(model), build.tp_rank,
                       build.tp_size)


def _attach_communicator(model: torch.nn.Module, communicator: Communicator) -> None:
    """Layers that reduce or gather across ranks (row-parallel linears, vocab-parallel embedding
    and LM head: those declaring a `communicator` attribute) use the backend's collectives (one
    object for the model)."""
    for module in model.modules():
        if hasattr(module, "communicator"):
            module.communicator = communicator


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
