"""CPU graph mode: torch.compile (inductor's C++ backend) of the model step per decode batch size.

The attention kernel stays eager (its plans depend on each step's context lengths); everything
between two attention calls (norms, rotary, projections, activations, residual adds) is compiled
for the bucket's static shape: fused elementwise work and no per-op Python dispatch. Inductor
caches compiled code on disk (its cache directory, TORCHINDUCTOR_CACHE_DIR), so a restart
compiles faster.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from textgen.core.graphs import GraphRunner, StepForward
from textgen.core.layers.attention import attention_layers

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext


class CPUCompiledDecode(GraphRunner):
    name: ClassVar[str] = "torch.compile"
    default_batch_sizes: ClassVar[tuple[int, ...]] = ()  # off unless --cuda-graphs lists sizes

    def __init__(self) -> None:
        self._compiled: StepForward | None = None

    def prepare(self, model: torch.nn.Module) -> None:
        for layer in attention_layers(model):
            layer.keep_kernel_eager()
        # one compiled graph set per bucket; each must stay cached
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.allow_unspec_int_on_nn_module = True  # layer_idx: one graph for every layer
        self._compiled = torch.compile(model, dynamic=False)

    def capture(self, batch_size: int, forward: StepForward,
                example: tuple[torch.Tensor, torch.Tensor, ForwardContext]) -> StepForward:
        compiled = self._compiled
        compiled(*example)
        return compiled
