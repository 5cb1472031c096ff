"""Which torch build is installed (version, CUDA, HIP, XPU), read without importing torch.

Probes run on every `textgen backends` and every start: importing torch only to learn that it is
a CPU build costs seconds. torch's generated `torch/version.py` holds these facts and imports
nothing but `typing`, so it is executed on its own; once torch is imported, `torch.version` is
used (the same values, and what tests patch).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def torch_build() -> ModuleType | None:
    """`torch.version` (`__version__`, `cuda`, `hip`, `xpu`, ...), or None when torch is not installed."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "version"):
        return torch.version
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    version_spec = importlib.util.spec_from_file_location("textgen_probe_torch_version", path)
    if version_spec is None or version_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(version_spec)
    version_spec.loader.exec_module(module)
    return module
