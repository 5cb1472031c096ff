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
from textgen.core.loader.gguf import GGUFCheckpoint, find_gguf_file
from textgen.core.loader.lazy_slice import iterate_safetensor_slices
from textgen.core.models.base import ModelBuildContext
from textgen.core.models.registry import model_path_name, resolve_model_class
from textgen.core.quantization import QuantizerRegistry, select_quantizer

if TYPE_CHECKING:
    from textgen.core.backend import Backend, DenseLinearKernel
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
    method: str | None = None  # TGI's --quantize name: the flag, else the checkpoint's quant_method
    weight_bytes: int = 0  # parameters and buffers after process_after_loading
    model_path: str = "native"  # or "transformers fallback" (`registry.model_path_name`)
    tp_rank: int = 0  # this process's tensor-parallel rank and the number of ranks
    tp_size: int = 1

    def describe_weights(self) -> str:
        return (f"model path: {self.model_path}; weights {self.weight_bytes / 2**20:.1f} MiB, "
                f"quantization: {self.quantization}")


def load_model(config: EngineConfig, backend: Backend, extra_architectures: dict[str, str] | None = None,
               quantizers: list[QuantizerInfo] | None = None) -> LoadedModel:
    """Resolve the files, read config.json, pick the class (plugin architectures override the
    built-in ones), choose the quantization method among `quantizers` (what the backend's
    `textgen_quantizers` offered), build the model on `backend.device` in the resolved dtype,
    then load the safetensors weights (or random ones for `load_format="dummy"`), check all were
    filled, and let each layer repack them (`process_after_loading`). A GGUF model (see
    `loader.gguf`) gives its config and weights from the file instead."""
    from transformers import AutoConfig

    registry = QuantizerRegistry.build(backend.name, quantizers or [])
    gguf_file = find_gguf_file(config.model_id, config.revision)
    keep_q4_0 = config.quantize is None and "gptq" in registry.infos
    gguf = GGUFCheckpoint.open(gguf_file, keep_q4_0) if gguf_file is not None else None
    path = gguf_file or resolve_model_path(config.model_id, config.revision)
    hf_config = (gguf.hf_config() if gguf is not None
                 else AutoConfig.from_pretrained(str(path), trust_remote_code=config.trust_remote_code))
    model_cls = resolve_model_class(hf_config, extra_architectures)
    dtype = resolve_dtype(config.dtype, hf_config, backend)
    quantizer = select_quantizer(config.quantize, hf_config, registry, backend, dtype)
    communicator = backend.communicator()
    build = ModelBuildContext(dtype, backend.device, quantizer, communicator.rank, communicator.world_size)
    with _building_on(backend.device, dtype):
        model = model_cls(hf_config, build)
    if config.load_format == "dummy":
        fill_dummy_weights(model, hf_config, config.seed)
    elif config.load_format in ("auto", "safetensors"):
        if gguf is not None:
            tensors = gguf.weights(hf_config)
        else:
            tensors = iterate_safetensors(path) if build.tp_size == 1 else iterate_safetensor_slices(path)
        if quantizer is not None:
            tensors = quantizer.rename_checkpoint_tensors(tensors)
        _check_all_loaded(model, model.load_weights(tensors))
    else:
        raise ValueError(f"unknown load_format {config.load_format!r}: use auto, safetensors or dummy")
    _process_after_loading(model)
    if quantizer is not None and quantizer.quantizes_vocab:
        from textgen.core.quantization.vocab import quantize_vocab_int8

        quantize_vocab_int8(model, quantizer.kernels)
    _attach_communicator(model, communicator)
    weights = weight_bytes(model)  # before a backend kernel's repacking (its layout may pad)
    _attach_dense_linear(model, backend.dense_linear(dtype))
    described = quantizer.describe() if quantizer is not None else "none"
    if gguf is not None:
        described = gguf.describe(dtype, described)
    method = (config.quantize or quantizer.name) if quantizer is not None else None
    return LoadedModel(model.eval(), hf_config, dtype, path, described, method, weights,
                       model_path_name(model_cls), build.tp_rank, build.tp_size)


def _attach_communicator(model: torch.nn.Module, communicator: Communicator) -> None:
    """Layers that reduce or gather across ranks (row-parallel linears, vocab-parallel embedding
    and LM head: those declaring a `communicator` attribute) use the backend's collectives (one
    object for the model)."""
    for module in model.modules():
        if hasattr(module, "communicator"):
            module.communicator = communicator


def _attach_dense_linear(model: torch.nn.Module, kernel: DenseLinearKernel | None) -> None:
    """Unquantized linear layers and LM heads (the modules declaring `dense_kernel`) multiply
    through the backend's kernel, which may repack their weights; quantized ones (a quantizer, or
    an int8 head's `kernels`) keep their method's. A head tied to the embedding shares its weight."""
    if kernel is None:
        return
    for module in model.modules():
        if not hasattr(module, "dense_kernel") or getattr(module, "quantizer", None) is not None:
            continue
        if getattr(module, "kernels", None) is not None or "weight" not in module._parameters:
            continue
        module.dense_kernel = kernel
        kernel.prepare(module, shared=getattr(module, "tied", False))


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
