"""InferentiaBackend: one NeuronCore of an Inferentia2/Trainium chip, through torch_neuronx.

torch_neuronx drives NeuronCores as a torch_xla PJRT device, so this is the XLA backend with
Neuron's facts. Neither SDK is imported before the backend is built.

With the NxD Inference runner (TEXTGEN_NEURON_IMPL, see `plugin`) the NeuronCores belong to
NxDI's compiled model: the backend then leaves torch_xla's device alone (initializing it would
start a second claim on the cores) and textgen's own tensors (logits, sampler, grammar masks)
live on the host, where NxDI hands its logits back.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from textgen.backends.tpu.backend import XLABackend, xla_memory
from textgen.core.backend import Backend, MemoryInfo

if TYPE_CHECKING:
    from textgen.core.backend import BackendCandidate
    from textgen.core.config import EngineConfig

# Inferentia2 and Trainium1 chips carry 32 GiB of HBM for their two NeuronCores.
CORE_MEMORY_BYTES = 16 * 2**30
DEFAULT_KV_CACHE_GB = 4.0


class InferentiaBackend(XLABackend):
    name = "inferentia"

    def __init__(self, config: EngineConfig | None, candidate: BackendCandidate) -> None:
        import torch_neuronx  # noqa: F401  registers the Neuron PJRT plugin with torch_xla

        from textgen.backends.inferentia.plugin import neuron_impl

        self.runs_nxdi = neuron_impl(os.environ) == "nxdi"
        if self.runs_nxdi:
            Backend.__init__(self, config, candidate)
            self._xm, self._device = None, torch.device("cpu")
        else:
            super().__init__(config, candidate)

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.bfloat16, torch.float16, torch.float32)

    def memory_info(self) -> MemoryInfo:
        """torch_xla's report when the Neuron runtime gives one; otherwise the NeuronCore's 16 GiB
        share of HBM, of which TEXTGEN_NEURON_KV_CACHE_GB (default 4) counts as available, since
        what the weights took cannot be measured."""
        try:
            memory = xla_memory(dict(self._xm.get_memory_info(self._device)))
        except Exception:  # the Neuron PJRT plugin does not implement memory stats in every release
            memory = None
        if memory is not None:
            return memory
        kv_bytes = int(float(os.environ.get("TEXTGEN_NEURON_KV_CACHE_GB", DEFAULT_KV_CACHE_GB)) * 2**30)
        return MemoryInfo(total_bytes=CORE_MEMORY_BYTES, available_bytes=min(kv_bytes, CORE_MEMORY_BYTES))
