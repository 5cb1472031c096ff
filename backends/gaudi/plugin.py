"""Gaudi backend plugin: hook implementations only. Never imports habana_frameworks here.

The probe looks at the installed package and the habanalabs driver's device nodes: /dev/hl<N>
(older drivers) or /dev/accel/accel<N> bound to the habanalabs driver (the kernel's accel
subsystem, shared with other accelerators, so the sysfs driver link decides).
"""
from __future__ import annotations

import os
from glob import glob
from importlib.util import find_spec
from typing import TYPE_CHECKING

from textgen.core.backend import BackendCandidate, BackendIdentity
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import STATIC_PAGED, AttentionBackendInfo

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig

PRIORITY = 90
BACKEND_CLASS = "textgen.backends.gaudi.backend:GaudiBackend"
HPU_FLAT_PA = AttentionBackendInfo("hpu_flat_pa", "textgen.backends.gaudi.attention:HPUFlatPagedAttention", 10)
LEGACY_NODES = "/dev/hl[0-9]*"
ACCEL_NODES = "/dev/accel/accel[0-9]*"
DRIVER = "habanalabs"


_candidate = BackendIdentity("gaudi", PRIORITY, BACKEND_CLASS).candidate


def _sysfs_dir(node: str) -> str:
    """/dev/accel/accel0 -> /sys/class/accel/accel0/device; /dev/hl0 -> /sys/class/habanalabs/hl0."""
    name = os.path.basename(node)
    return f"/sys/class/accel/{name}/device" if name.startswith("accel") else f"/sys/class/habanalabs/{name}"


def gaudi_nodes() -> list[str]:
    """Device nodes of Gaudi cards: every /dev/hlN, and /dev/accel/accelN bound to habanalabs."""
    accel = [n for n in glob(ACCEL_NODES) if os.path.basename(os.path.realpath(f"{_sysfs_dir(n)}/driver")) == DRIVER]
    return sorted(glob(LEGACY_NODES) + accel)


def _device_type(node: str) -> str:
    try:
        with open(f"{_sysfs_dir(node)}/device_type") as f:
            return f.read().strip() or "Gaudi"
    except OSError:
        return "Gaudi"


def probe() -> BackendCandidate:
    if find_spec("habana_frameworks") is None:
        return _candidate(
            False,
            "habana_frameworks is not installed (install Intel Gaudi's PyTorch bridge, "
            "then pip install 'textgen[gaudi]')",
        )
    nodes = gaudi_nodes()
    if not nodes:
        return _candidate(
            False, f"no Gaudi device: no {LEGACY_NODES} or {ACCEL_NODES} node of the {DRIVER} driver"
        )
    return _candidate(True, f"{len(nodes)} x {_device_type(nodes[0])} ({nodes[0]})")


@hookimpl
def textgen_probe_backend(config: EngineConfig | None) -> BackendCandidate:
    return probe()


@hookimpl
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    """vllm-hpu-extension's flat_pa when it imports, else the static-shape kernel: under shape
    bucketing both trace to one graph per bucket (the portable kernel's shapes follow each step's
    lengths: a recompile per step)."""
    return [HPU_FLAT_PA, STATIC_PAGED]
