"""Native model implementations and the architecture registry."""
from textgen.core.models.base import ModelBuildContext
from textgen.core.models.registry import ARCHITECTURES, resolve_model_class

__all__ = ["ARCHITECTURES", "ModelBuildContext", "resolve_model_class"]
