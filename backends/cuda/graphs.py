"""CUDA graph mode: each decode bucket's forward captured once into a torch.cuda.CUDAGraph and
replayed for every later decode step of that size (one kernel launch sequence, no Python).

Needs a capture-safe attention kernel (`supports_graph_capture`: flash-attn's builder passes the
largest lengths on padded steps). Graphs share one memory pool, captured largest bucket first so
the smaller ones fit in its memory. ROCm's torch exposes HIP graphs through the same API.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from textgen.core.graphs import GraphRunner, StepForward

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext

WARMUP_RUNS = 2  # lazy initialisations (cuBLAS workspaces, autotuning) must happen before capture


class CUDAGraphDecode(GraphRunner):
    name: ClassVar[str] = "CUDA graphs"
    default_batch_sizes: ClassVar[tuple[int, ...]] = (1, 2, 4, 8, 16, 32)  # TGI's --cuda-graphs default
    requires_capture_safe_kernel: ClassVar[bool] = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: object = None

    def capture(self, batch_size: int, forward: StepForward,
                example: tuple[torch.Tensor, torch.Tensor, ForwardContext]) -> StepForward:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                forward(*example)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward(*example)
        if self.pool is None:
            self.pool = graph.pool()

        def replay(input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
            # the step's inputs were written into the same buffers the graph reads
            graph.replay()
            return out

        return replay
