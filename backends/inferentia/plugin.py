"""Inferentia backend plugin: hook implementations only. Never imports torch_neuronx or
neuronx_distributed_inference here.

The probe checks the package and the Neuron driver's device nodes (/dev/neuron<N>, one per
Inferentia2/Trainium chip, created by the aws-neuronx-dkms driver).

Two ways to run a model on NeuronCores, chosen by TEXTGEN_NEURON_IMPL:
- `nxdi`: AWS's NxD Inference compiles the checkpoint per bucket and keeps its own KV cache
  (`nxd_model`, `slot_runner`); handed to the engine through `textgen_owned_cache_runner`;
- `native`: textgen's own model over its paged cache on torch_neuronx's XLA device, with shape
  buckets and the static sampler (`backend.InferentiaBackend`, the TPU rule);
- `auto` (the default): `nxdi` when neuronx_distributed_inference is installed, else `native`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from glob import glob
from importlib import metadata
from importlib.util import find_spec
from typing import TYPE_CHECKING

from textgen.core.backend import BackendCandidate, BackendIdentity
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import STATIC_PAGED, AttentionBackendInfo

if TYPE_CHECKING:
    from textgen.backends.inferentia.slot_runner import SlotRunner
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig

PRIORITY = 90
BACKEND_CLASS = "textgen.backends.inferentia.backend:InferentiaBackend"
DEVICE_NODES = "/dev/neuron[0-9]*"
IMPL_ENV = "TEXTGEN_NEURON_IMPL"
IMPLS = ("auto", "nxdi", "native")
NXDI_PACKAGE = "neuronx_distributed_inference"


_candidate = BackendIdentity("inferentia", PRIORITY, BACKEND_CLASS).candidate


def neuron_impl(environ: Mapping[str, str]) -> str:
    """"nxdi" or "native" from TEXTGEN_NEURON_IMPL (auto: nxdi when its package is installed).
    Raises ValueError naming the accepted values."""
    value = environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if value not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={value!r}: expected one of {', '.join(IMPLS)}")
    if value == "auto":
        return "nxdi" if find_spec(NXDI_PACKAGE) is not None else "native"
    return value


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
def textgen_configure(config: EngineConfig, backend: Backend) -> list[str]:
    try:
        impl = neuron_impl(os.environ)
    except ValueError as exc:
        return [str(exc)]
    if impl == "nxdi" and config.num_shard > 1:
        return ["the NxD Inference runner shards over NeuronCores inside one process: use --num-shard 1 and "
                "TEXTGEN_NEURON_TP_DEGREE=N"]
    return []


@hookimpl
def textgen_owned_cache_runner(config: EngineConfig, backend: Backend) -> SlotRunner | None:
    """The NxD Inference runner when TEXTGEN_NEURON_IMPL picks it (its KV cache is NxDI's own)."""
    if neuron_impl(os.environ) != "nxdi":
        return None
    from textgen.backends.inferentia.nxd_model import build_nxd_runner
    from textgen.core.engine.sizing import ConfigError

    try:
        return build_nxd_runner(config, backend)
    except ValueError as exc:
        raise ConfigError(f"NxD Inference runner: {exc}") from None


@hookimpl
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    """The static-shape kernel of the native path: under shape bucketing it traces to one
    program per bucket (the portable kernel's shapes follow each step's lengths: a recompile
    per step)."""
    return [STATIC_PAGED]
