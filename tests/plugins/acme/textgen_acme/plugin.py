"""Acme backend hooks. Imports nothing heavy; the Backend class is a lazy string path.

Installed into shared environments by textgen's test setup, so it is only available when
TEXTGEN_ACME_AVAILABLE=1: otherwise its priority (above the CPU's) would win auto-selection.
"""
from __future__ import annotations

import os

from textgen.core.backend import BackendCandidate
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import AttentionBackendInfo

PRIORITY = 5
BACKEND_CLASS = "textgen_acme.backend:AcmeBackend"


@hookimpl
def textgen_probe_backend(config: object) -> BackendCandidate:
    if os.environ.get("TEXTGEN_ACME_AVAILABLE") != "1":
        return BackendCandidate("acme", False, PRIORITY, "set TEXTGEN_ACME_AVAILABLE=1 (test backend)", BACKEND_CLASS)
    return BackendCandidate("acme", True, PRIORITY, "1 x Acme accelerator (emulated on the host CPU)", BACKEND_CLASS)


@hookimpl
def textgen_attention_backends(backend: object) -> list[AttentionBackendInfo]:
    return [AttentionBackendInfo("torch_paged", "textgen.core.layers.paged_attention:TorchPagedAttention", 0)]
