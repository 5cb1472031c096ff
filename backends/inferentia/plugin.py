"""Inferentia backend plugin: hook implementations only. Never imports torch_neuronx here.

The probe checks the package and the Neuron driver's device nodes (/dev/neuron<N>, one per
Inferentia2/Trainium chip, created by the aws-neuronx-dkms driver).
"""
from __future__ import annotations

from glob import glob
from importlib import metadata
from importlib.util import find_spec
from typing import TYPE_CHECKING

from textgen.core.backend import BackendCandidate, BackendIdentity
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import STATIC_PAGED, AttentionBackendInfo

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig

PRIORITY = 90
BACKEND_CLASS = "textgen.backends.inferentia.backend:InferentiaBackend"
DEVICE_NODES = "/dev/neuron[0-9]*"


_candidate = BackendIdentity("inferentia", PRIORITY, BACKEND_CLASS).candidate


def probe() -> BackendCandidate:
    if find_spec("torch_neuronx") is None:
        return _candidate(
            False, "torch_neuronx is not installed (pip install 'textgen[inferentia]' from the Neuron repository)"
        )
    nodes = sorted(glob(DEVICE_NODES))
    if not nodes:
        return _candidate(False, f"no Neuron device: no {DEVICE_NODES} device node (aws-neuronx-dkms driver)")
    version = metadata.version("torch_neuronx")
    return _candidate(True, f"{len(nodes)} x Neuron device ({nodes[0]}), torch_neuronx {version}")


@hookimpl
def textgen_probe_backend(config: EngineConfig | None) -> BackendCandidate:
    return probe()


@hookimpl
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    """The static-shape kernel: under shape bucketing it traces to one program per bucket (the
    portable kernel's shapes follow each step's lengths: a recompile per step)."""
    return [STATIC_PAGED]
