"""`--num-shard N`: start the tensor-parallel worker processes, watch them, stop them.

The launcher that hosts rank 0 joins the process group in its own process (rank 0 runs the
scheduler, the engine and HTTP) and starts the other local ranks as spawned processes, each
with `cores / N` CPU threads and its own device (the visible-device variable narrowed to it). A
launcher on another node (`NODE_RANK` > 0, or a torchrun-started process with `RANK` > 0) serves
no HTTP: it runs its ranks' worker loops and exits with their status.

Failure handling: a watcher thread polls the local workers and the engine thread. When a worker
exits while serving, or the engine thread stops (a collective failed: a remote worker died or
hung), it logs which shard and why, keeps the server up `SHARD_FAILURE_GRACE_S` seconds (so
/health answers 503 to the probes), then ends the other local workers and exits the launcher
with status 1. Workers die with their launcher (PR_SET_PDEATHSIG) and exit when rank 0's
connection closes, so no process is left behind.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from textgen.core.engine.topology import (
    ShardTopology, TopologyError, join_process_group, resolve_topology, visible_devices_for,
)

log = logging.getLogger("textgen.launcher")
SHARD_FAILURE_GRACE_S = float(os.environ.get("TEXTGEN_SHARD_FAILURE_GRACE", "3"))
EXIT_FAILURE = 1


def topology_for(options: Mapping[str, Any], environ: Mapping[str, str]) -> ShardTopology | None:
    """None for one shard in one process (the default: no process group at all)."""
    num_shard = options["num_shard"] or 1
    if num_shard == 1 and environ.get("WORLD_SIZE") in (None, "", "1"):
        return None
    return resolve_topology(num_shard, options["master_addr"], options["master_port"], environ)


class ShardGroup:
    """This launcher's ranks: rank 0 in this process (when hosted here) plus spawned workers."""

    def __init__(self, topology: ShardTopology, config: Any) -> None:
        self.topology, self.config = topology, config
        self.processes: dict[int, mp.process.BaseProcess] = {}
        self._stopping = threading.Event()

    @classmethod
    def start(cls, topology: ShardTopology, config: Any) -> ShardGroup:
        """Spawn the local workers; when this launcher hosts rank 0, join its group here."""
        group = cls(topology, config)
        ctx = mp.get_context("spawn")
        threads = topology.threads_per_rank()
        spawned = topology.local_ranks if not topology.serves_http else topology.local_ranks[1:]
        if topology.per_process and not topology.serves_http:
            spawned = ()  # this process is the worker: `wait` runs it inline
        for rank in spawned:
            index = topology.local_ranks.index(rank)
            proc = ctx.Process(target=worker_main, name=f"textgen-shard-{rank}", daemon=False,
                               args=(topology, rank, index, threads, config))
            proc.start()
            group.processes[rank] = proc
        if topology.serves_http:
            _use_local_device(0, os.environ, threads)
            join_process_group(_communicator(config), topology, 0)
        return group

    @property
    def serves_http(self) -> bool:
        return self.topology.serves_http

    def describe(self, engine: Any) -> str:
        return self.topology.describe(engine.backend_name, engine.device, engine.core.backend.distributed_backend())

    def wait(self) -> int:
        """A launcher without rank 0: run (or wait for) its workers; their worst status."""
        if self.topology.per_process:
            rank = self.topology.local_ranks[0]
            return worker_main(self.topology, rank, 0, self.topology.threads_per_rank(), self.config, exit=False)
        status = 0
        for rank, proc in self.processes.items():
            proc.join()
            if proc.exitcode:
                log.error("shard %d exited with status %s", rank, proc.exitcode)
                status = EXIT_FAILURE
                self._terminate()
        return status

    def watch(self, engine: Any) -> None:
        """Start the watcher thread (see the module docstring)."""
        threading.Thread(target=self._watch, args=(engine,), name="textgen-shard-watch", daemon=True).start()

    def _watch(self, engine: Any) -> None:
        while not self._stopping.is_set():
            dead = {rank: p.exitcode for rank, p in self.processes.items() if not p.is_alive()}
            if dead:
                reason = "; ".join(f"shard {rank} exited with {_status(code)}" for rank, code in dead.items())
                break
            if not engine.is_running():
                reason = f"the engine stopped: {engine.health_problem(float('inf'))}"
                break
            time.sleep(0.2)
        else:
            return
        if self._stopping.is_set():
            return
        log.critical("tensor parallelism failed: %s; /health answers 503, exiting with status %d in %.0f s",
                     reason, EXIT_FAILURE, SHARD_FAILURE_GRACE_S)
        print(f"textgen serve: error: {reason}", file=sys.stderr, flush=True)
        time.sleep(SHARD_FAILURE_GRACE_S)
        if self._stopping.is_set():
            return
        self._terminate()
        os._exit(EXIT_FAILURE)  # the HTTP server and engine thread cannot end cleanly without their shards

    def stop(self, engine: Any = None) -> None:
        """Normal shutdown: tell the workers to exit, then make sure they did."""
        self._stopping.set()
        if engine is not None and not engine.is_running():  # never next to the engine thread's own collectives
            try:
                engine.core.executor.shutdown()
            except Exception as exc:  # noqa: BLE001 - the workers are ended below anyway
                log.warning("stopping the shards: %s", exc)
        for proc in self.processes.values():
            proc.join(timeout=10)
        self._terminate()
        _leave_process_group()

    def _terminate(self) -> None:
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.processes.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def worker_main(topology: ShardTopology, rank: int, local_index: int, threads: int, config: Any,
                exit: bool = True) -> int:
    """One worker rank: join the group, build the same engine parts as rank 0, follow its plans."""
    _die_with_parent()
    from textgen.core.engine.executor import run_worker
    from textgen.core.engine.setup import build_engine_parts

    status = 0
    try:
        _use_local_device(local_index, os.environ, threads)
        join_process_group(_communicator(config), topology, rank)
        parts = build_engine_parts(config)
        run_worker(parts.runner, parts.executor.channel)
    except BaseException as exc:  # noqa: BLE001 - the launcher reports the status; say why here
        log.critical("shard %d failed: %s: %s", rank, type(exc).__name__, exc)
        print(f"textgen shard {rank}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        status = EXIT_FAILURE
    finally:
        _leave_process_group()
    if exit:
        sys.stdout.flush()
        os._exit(status)  # skip interpreter teardown (torch threads, a half-closed group)
    return status


def _communicator(config: Any) -> Any:
    from textgen.core.plugins import PluginManager

    return PluginManager().create_backend(config, forced=config.backend).communicator()


def _use_local_device(local_index: int, environ: Any, threads: int) -> None:
    import torch

    environ.update(visible_devices_for(local_index, environ))
    torch.set_num_threads(threads)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group cannot be left politely
            pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its launcher dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _status(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    return f"signal {-code}" if code < 0 else f"status {code}"


__all__ = ["ShardGroup", "TopologyError", "topology_for", "worker_main"]
