"""Communicator: the collectives tensor parallelism needs, for one device kind.

`Backend.communicator(group)` returns one; the default runs torch.distributed collectives on the
process group created with `Backend.distributed_backend()` (gloo on CPU, NCCL on CUDA, RCCL on
ROCm, the vendor's library elsewhere). A vendor whose collectives are not torch.distributed ops
(or need a custom all-reduce for small messages) subclasses it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Communicator:
    """All-reduce (sum), all-gather along a dimension and broadcast from a rank, over `group`.

    With a world of one every operation returns its input unchanged and touches no process group,
    so a single-process engine pays nothing."""

    def __init__(self, group: object = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns `tensor`."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        """Minimum over ranks, in place; returns `tensor` (e.g. the KV blocks every rank can hold)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `tensor` concatenated along `dim`, in rank order."""
        world = self.world_size
        if world == 1:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`src`'s tensor on every rank, in place; returns `tensor`."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src=src, group=self.group)
        return tensor


class TorchDistributedCommunicator(Communicator):
    """The default: torch.distributed on a process group of `backend_name` (gloo, nccl, ...)."""

    def __init__(self, backend_name: str, group: object = None) -> None:
        super().__init__(group)
        self.backend_name = backend_name

    def init_process_group(self, rank: int, world_size: int, init_method: str, timeout_s: float) -> None:
        """Join the default process group (the launcher calls this in each worker)."""
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group(self.backend_name, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
