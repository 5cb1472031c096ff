"""TPU backend plugin: hook implementations only. Never imports torch_xla here.

The probe checks the package, PJRT_DEVICE (when set it must say TPU), and the TPU device nodes:
/dev/accel<N> (TPU v2-v4) or /dev/vfio/<group> (v5e and later).
"""
from __future__ import annotations

import os
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
BACKEND_CLASS = "textgen.backends.tpu.backend:TPUBackend"
DEVICE_NODES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


# Static-shape kernels only: the portable kernel's shapes follow each step's lengths (a recompile
# per step on XLA). The Pallas kernel runs on TPU; the static one on any XLA device.
RAGGED_PAGED = AttentionBackendInfo("ragged_paged_attention", "textgen.backends.tpu.attention:RaggedPagedAttention", 10)

_candidate = BackendIdentity("tpu", PRIORITY, BACKEND_CLASS).candidate


def tpu_nodes() -> list[str]:
    return sorted(node for pattern in DEVICE_NODES for node in glob(pattern))


def probe() -> BackendCandidate:
    if find_spec("torch_xla") is None:
        return _candidate(False, "torch_xla is not installed (pip install 'textgen[tpu]')")
    pjrt = os.environ.get("PJRT_DEVICE")
    if pjrt and pjrt.upper() != "TPU":
        return _candidate(False, f"PJRT_DEVICE={pjrt} selects another XLA device (set PJRT_DEVICE=TPU or unset it)")
    nodes = tpu_nodes()
    if not nodes:
        return _candidate(False, f"no TPU device: no {' or '.join(DEVICE_NODES)} device node")
    accelerator = os.environ.get("TPU_ACCELERATOR_TYPE", "TPU")
    return _candidate(True, f"{len(nodes)} x {accelerator} chip, torch_xla {metadata.version('torch_xla')}")


@hookimpl
def textgen_probe_backend(config: EngineConfig | None) -> BackendCandidate:
    return probe()


@hookimpl
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    return [RAGGED_PAGED, STATIC_PAGED]
