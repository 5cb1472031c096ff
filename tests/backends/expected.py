"""What each in-tree probe must answer on a machine like CI's: no accelerator, torch's CPU build,
none of the vendor SDKs installed."""
from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

VERSION = torch.__version__
UNAVAILABLE_REASONS = {
    "cuda": f"torch {VERSION} was built without CUDA",
    "rocm": f"torch {VERSION} was built without ROCm",
    "xpu": f"torch {VERSION} was built without XPU support (install PyTorch's XPU build)",
    "gaudi": (
        "habana_frameworks is not installed (install Intel Gaudi's PyTorch bridge, then pip install 'textgen[gaudi]')"
    ),
    "tpu": "torch_xla is not installed (pip install 'textgen[tpu]')",
    "inferentia": "torch_neuronx is not installed (pip install 'textgen[inferentia]' from the Neuron repository)",
}
PRIORITIES = {"cuda": 100, "rocm": 100, "xpu": 90, "gaudi": 90, "tpu": 90, "inferentia": 90, "cpu": 0}

_VENDOR_MODULES = ("habana_frameworks", "torch_xla", "torch_neuronx", "intel_extension_for_pytorch")
is_cpu_only_machine = (
    torch.version.cuda is None
    and torch.version.hip is None
    and not torch.xpu._is_compiled()
    and all(find_spec(m) is None for m in _VENDOR_MODULES)
)
cpu_only_machine = pytest.mark.skipif(
    not is_cpu_only_machine, reason="expects torch's CPU build and no vendor SDK (as in CI)"
)
