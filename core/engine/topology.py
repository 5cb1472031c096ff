"""Which tensor-parallel ranks this process (or launcher) hosts, and joining their process group.

Two ways to describe a topology, torchrun's conventions:
- one launcher per machine (`--num-shard N` ranks here): `WORLD_SIZE` (default N) ranks in all,
  this machine is `NODE_RANK` (default 0) and hosts ranks NODE_RANK * N .. NODE_RANK * N + N - 1;
- one process per rank (`RANK` set, e.g. started by torchrun): this process is rank `RANK` of
  `WORLD_SIZE`, on local device `LOCAL_RANK`.
Every rank reaches rank 0's TCP store at `MASTER_ADDR:MASTER_PORT`. Rank 0 serves HTTP.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from textgen.core.distributed import Communicator
    from textgen.core.engine.sizing import KVCachePlan

DEFAULT_COLLECTIVE_TIMEOUT_S = 60.0
# per-vendor visible-device variables a local rank narrows to its own device (CUDA_VISIBLE_DEVICES style)
VISIBLE_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK", "HABANA_VISIBLE_MODULES",
                       "NEURON_RT_VISIBLE_CORES", "TPU_VISIBLE_CHIPS")


class TopologyError(ValueError):
    """Environment variables that do not describe a valid topology; the message says which."""


@dataclass(frozen=True, slots=True)
class ShardTopology:
    world_size: int
    local_ranks: tuple[int, ...]  # the global ranks this launcher hosts, in local-device order
    master_addr: str
    master_port: int
    node_rank: int = 0
    per_process: bool = False  # started once per rank (torchrun): this process is local_ranks[0]

    @property
    def serves_http(self) -> bool:
        return 0 in self.local_ranks

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"

    def threads_per_rank(self, cpu_count: int | None = None) -> int:
        """CPU threads for each local rank: the machine's cores split between them."""
        return max(1, (cpu_count or os.cpu_count() or 1) // len(self.local_ranks))

    def describe(self, backend: str, device: str, library: str) -> str:
        ranks = ",".join(map(str, self.local_ranks))
        return (f"tensor parallel: {self.world_size} ranks, this node (NODE_RANK {self.node_rank}) hosts ranks "
                f"{ranks}; backend {backend}, device {device}, collectives {library} (control: gloo), "
                f"rendezvous {self.init_method}")


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise TopologyError(f"{name} must be an integer, got {value!r}") from None


def resolve_topology(num_shard: int, master_addr: str, master_port: int,
                     environ: Mapping[str, str] = os.environ) -> ShardTopology:
    """The topology from `--num-shard` and torchrun's variables (see the module docstring)."""
    rank, world = _int_env(environ, "RANK"), _int_env(environ, "WORLD_SIZE")
    if rank is not None:
        if world is None:
            raise TopologyError("RANK is set but WORLD_SIZE is not: set both (torchrun sets them)")
        if not 0 <= rank < world:
            raise TopologyError(f"RANK {rank} must be in [0, WORLD_SIZE={world})")
        return ShardTopology(world, (rank,), master_addr, master_port, _int_env(environ, "NODE_RANK") or 0, True)
    world = world if world is not None else num_shard
    node = _int_env(environ, "NODE_RANK") or 0
    if world % num_shard:
        raise TopologyError(f"WORLD_SIZE {world} is not a multiple of --num-shard {num_shard} (ranks per node)")
    first = node * num_shard
    if not 0 <= first < world:
        raise TopologyError(f"NODE_RANK {node} with {num_shard} ranks per node is outside WORLD_SIZE {world}")
    return ShardTopology(world, tuple(range(first, first + num_shard)), master_addr, master_port, node)


def visible_devices_for(local_index: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The visible-device variables narrowed to this local rank's device: those set with a list
    of devices give the rank its entry (one set to a single device is left alone); when none is
    set, CUDA_VISIBLE_DEVICES (which ROCm honours too) becomes the local index, so that each rank's
    default device is its own GPU (no effect where there is none)."""
    if not any(environ.get(name) for name in VISIBLE_DEVICE_VARS):
        return {"CUDA_VISIBLE_DEVICES": str(local_index)}
    narrowed = {}
    for name in VISIBLE_DEVICE_VARS:
        devices = [d for d in environ.get(name, "").split(",") if d.strip()]
        if len(devices) > 1:
            if local_index >= len(devices):
                raise TopologyError(f"{name}={environ[name]} lists {len(devices)} devices; local rank {local_index} "
                                    f"has none")
            narrowed[name] = devices[local_index].strip()
    return narrowed


def collective_timeout_s(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds a collective may take before the group counts as broken (TEXTGEN_COLLECTIVE_TIMEOUT)."""
    return float(environ.get("TEXTGEN_COLLECTIVE_TIMEOUT") or DEFAULT_COLLECTIVE_TIMEOUT_S)


def join_process_group(communicator: Communicator, topology: ShardTopology, rank: int) -> None:
    """Join the default process group of `topology` as `rank` (blocks until all ranks joined)."""
    communicator.init_process_group(rank, topology.world_size, topology.init_method, collective_timeout_s())


def agree_on_kv_blocks(plan: KVCachePlan, communicator: Communicator, device: object = "cpu") -> KVCachePlan:
    """Every rank sizes its own cache; all of them use the smallest count (all-reduce MIN, on
    `device`: the model's collectives library may not take host tensors)."""
    if communicator.world_size == 1:
        return plan
    import dataclasses

    import torch

    blocks = communicator.all_reduce_min(torch.tensor([plan.num_blocks], dtype=torch.int64, device=device))
    return dataclasses.replace(plan, num_blocks=int(blocks.item()))
