"""Model loading: files (local or Hub, safetensors only), dtype choice, building and weights."""
from textgen.core.loader.dtype import checkpoint_dtype, resolve_dtype
from textgen.core.loader.files import ModelFilesError, iterate_safetensors, resolve_model_path, safetensors_files
from textgen.core.loader.model_loader import LoadedModel, load_model

__all__ = [
    "LoadedModel", "ModelFilesError", "checkpoint_dtype", "iterate_safetensors", "load_model",
    "resolve_dtype", "resolve_model_path", "safetensors_files",
]
