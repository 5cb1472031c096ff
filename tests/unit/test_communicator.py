"""Backend.communicator(): torch.distributed collectives on a real gloo process group of two
processes, and a free pass-through in a single process."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp

from textgen.core.distributed import Communicator, TorchDistributedCommunicator
from textgen.testing.paged_model import cpu_backend


def _worker(rank: int, init: str, out: dict) -> None:
    import torch.distributed as dist

    comm = cpu_backend().communicator()
    assert isinstance(comm, TorchDistributedCommunicator) and comm.backend_name == "gloo"
    comm.init_process_group(rank, 2, init, timeout_s=60)
    try:
        summed = comm.all_reduce(torch.full((3,), float(rank + 1)))
        gathered = comm.all_gather(torch.tensor([[rank, 10 + rank]]), dim=1)
        sent = comm.broadcast(torch.tensor([7.0]) if rank == 1 else torch.zeros(1), src=1)
        out[rank] = (summed.tolist(), gathered.tolist(), sent.tolist(), comm.rank, comm.world_size)
    finally:
        dist.destroy_process_group()


def test_gloo_collectives_across_two_processes(tmp_path) -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        assert results[rank] == ([3.0, 3.0, 3.0], [[0, 10, 1, 11]], [7.0], rank, 2)


def test_single_process_is_a_pass_through() -> None:
    comm = Communicator()
    t = torch.arange(4.0)
    assert comm.world_size == 1 and comm.rank == 0
    assert comm.all_reduce(t) is t and comm.all_gather(t) is t and comm.broadcast(t) is t
