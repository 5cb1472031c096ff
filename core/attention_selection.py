"""Kernel negotiation: which offered attention kernel serves the model, with which block size.

Rule: kernels are tried highest priority first (or only the forced one). Each layer's spec is
completed with the block size (the user's `--block-size`, else the kernel's preferred one) and
the KV dtype; the first kernel that accepts every layer wins. Every kernel tried before it is
reported with its reasons, so startup can say why a faster kernel was not used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from textgen.core.engine.sizing import ConfigError
from textgen.core.registry import AttentionBackendInfo, load_class

if TYPE_CHECKING:
    import torch

    from textgen.core.attention import AttentionBackend, AttentionSpec


class AttentionSelectionError(ConfigError):
    """No offered kernel can serve the model (or the forced one cannot); lists every reason. A
    configuration error: `textgen serve` exits with status 2."""


@dataclass(frozen=True, slots=True)
class Rejection:
    kernel: str
    reasons: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.kernel}: {'; '.join(self.reasons)}"


@dataclass(frozen=True, slots=True)
class KernelChoice:
    kernel_cls: type[AttentionBackend]
    block_size: int
    specs: list[AttentionSpec]  # the model's layer specs, completed for the cache
    rejected: tuple[Rejection, ...]

    def describe(self) -> list[str]:
        lines = [f"attention kernel {self.kernel_cls.name} (block size {self.block_size})"]
        return lines + [f"attention kernel not used: {r.describe()}" for r in self.rejected]


def negotiate(infos: list[AttentionBackendInfo], specs: list[AttentionSpec], block_size: int | None,
              kv_cache_dtype: torch.dtype | None, forced: str | None = None) -> KernelChoice:
    """See the module docstring. Raises AttentionSelectionError naming every rejected kernel."""
    if forced is not None:
        offered = ", ".join(i.name for i in infos) or "none"
        infos = [i for i in infos if i.name == forced]
        if not infos:
            raise AttentionSelectionError(f"attention backend '{forced}' is not offered by this backend "
                                          f"(offered: {offered})")
    rejected: list[Rejection] = []
    for info in sorted(infos, key=lambda i: -i.priority):
        kernel_cls = load_class(info.class_path)
        size = block_size or kernel_cls.preferred_block_size()
        completed = [s.for_cache(size, kv_cache_dtype) for s in specs]
        reasons = layer_reasons(kernel_cls, completed)
        if not reasons:
            return KernelChoice(kernel_cls, size, completed, tuple(rejected))
        rejected.append(Rejection(info.name, tuple(reasons)))
    if forced is not None:
        raise AttentionSelectionError(f"attention backend {rejected[0].describe()}")
    detail = "\n  ".join(r.describe() for r in rejected) or "no attention kernel was offered by the backend"
    raise AttentionSelectionError(f"no attention kernel can run this model:\n  {detail}")


def layer_reasons(kernel_cls: type[AttentionBackend], specs: list[AttentionSpec]) -> list[str]:
    """The kernel's reasons over the model's distinct layer specs, each said once; a reason that
    holds for only some layers names them."""
    by_reason: dict[str, list[int]] = {}
    checked: dict[AttentionSpec, list[str]] = {}
    for index, spec in enumerate(specs):
        if spec not in checked:
            checked[spec] = kernel_cls.check(spec)
        for reason in checked[spec]:
            by_reason.setdefault(reason, []).append(index)
    return [reason if len(layers) == len(specs) else f"{reason} (layers {_ranges(layers)})"
            for reason, layers in by_reason.items()]


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans = [[indices[0], indices[0]]]
    for index in indices[1:]:
        if index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
