"""KV-cache events over ZMQ in vLLM's wire format, for prefix-aware routers (llm-d's KV-cache
indexer, the inference gateway's prefix scorer, Dynamo's relay). Off unless `--kv-events-endpoint`
is given.

Wire format (vLLM's `ZmqEventPublisher`, vllm/distributed/kv_events.py): a PUB socket sends one
3-frame message per engine step that changed the prefix cache: `(topic, seq, payload)` with
`seq` an 8-byte big-endian counter from 0 and `payload` a msgpack-encoded `KVEventBatch`. The
structs are msgspec's `array_like` encoding, as vLLM declares them:

    KVEventBatch     = [ts, [event, ...], data_parallel_rank]
    BlockStored      = ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
                        lora_id, medium, lora_name]
    BlockRemoved     = ["BlockRemoved", block_hashes, medium]
    AllBlocksCleared = ["AllBlocksCleared"]

Block hashes are textgen's own 32-byte sha256 chain hashes (vLLM's `ExternalBlockHash` is bytes or
int); medium is "GPU", the name vLLM gives the engine's own KV tier on every device. An endpoint
with `*`, `::`, `ipc://` or `inproc://` is bound, any other is connected (vLLM's rule), so
`tcp://*:5557` serves subscribers and `tcp://indexer:5557` pushes to a binding indexer.

Threads: the block pool calls `observe` on the engine thread, which only appends to the step's
list; `flush` (a step observer, also on the engine thread) hands the list to a queue; the
publisher thread encodes and sends, so the engine never waits on the network. A full queue drops
the batch with a warning rather than stall the engine; sequence numbers count sent batches only,
so subscribers see no gap for a batch that was never sent.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from textgen.core.kv_cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

if TYPE_CHECKING:
    from textgen.core.engine.async_engine import AsyncEngine

log = logging.getLogger("textgen.kv_events")
MEDIUM = "GPU"
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
_STOP = object()


class KVEventsError(RuntimeError):
    """The endpoint cannot be opened (address in use, unknown host); the message names it."""


def endpoint_reasons(endpoint: str | None) -> list[str]:
    """Why `--kv-events-endpoint` cannot be used; empty when fine (or not set)."""
    if endpoint is None:
        return []
    if not endpoint.startswith(ENDPOINT_SCHEMES):
        return [f"--kv-events-endpoint must start with {', '.join(ENDPOINT_SCHEMES)} (e.g. tcp://*:5557); "
                f"got {endpoint!r}"]
    try:
        import msgspec  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as exc:
        return [f"--kv-events-endpoint needs pyzmq and msgspec ({exc.name} is missing): "
                "pip install 'textgen[gateway]'"]
    return []


def binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _wire_types() -> dict[str, Any]:
    """vLLM's msgspec structs, built on first use so msgspec is imported only when enabled."""
    import msgspec

    opts = {"array_like": True, "omit_defaults": True, "gc": False}

    class KVEventBatch(msgspec.Struct, **opts):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class _Event(msgspec.Struct, tag=True, **opts):
        pass

    class WireBlockStored(_Event, tag="BlockStored"):
        block_hashes: list[bytes]
        parent_block_hash: bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None

    class WireBlockRemoved(_Event, tag="BlockRemoved"):
        block_hashes: list[bytes]
        medium: str | None

    class WireAllBlocksCleared(_Event, tag="AllBlocksCleared"):
        pass

    return {"batch": KVEventBatch, "stored": WireBlockStored, "removed": WireBlockRemoved,
            "cleared": WireAllBlocksCleared, "encoder": msgspec.msgpack.Encoder()}


def _to_wire(event: KVCacheEvent, types: dict[str, Any]) -> Any:
    if isinstance(event, BlockStored):
        return types["stored"](list(event.block_hashes), event.parent_block_hash, list(event.token_ids),
                               event.block_size, None, MEDIUM, None)
    if isinstance(event, BlockRemoved):
        return types["removed"](list(event.block_hashes), MEDIUM)
    if isinstance(event, AllBlocksCleared):
        return types["cleared"]()
    raise TypeError(f"not a KV cache event: {event!r}")


class KVEventPublisher:
    """Publishes the prefix-cache changes of each engine step as one `KVEventBatch`."""

    def __init__(self, endpoint: str, topic: str = "", data_parallel_rank: int = 0,
                 max_queue: int = 100_000) -> None:
        self.endpoint, self.topic, self.data_parallel_rank = endpoint, topic, data_parallel_rank
        self._pending: list[KVCacheEvent] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._types = _wire_types()
        ready, failure = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="textgen-kv-events",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    # -- engine thread ------------------------------------------------------------------

    def observe(self, event: KVCacheEvent) -> None:
        self._pending.append(event)

    def flush(self, _record: object = None) -> None:
        """End of a step: hand its events, if any, to the publisher thread."""
        if not self._pending:
            return
        batch, self._pending = (time.time(), self._pending), []
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            log.warning("KV event queue full: dropped a batch of %d events", len(batch[1]))

    # -- any thread -----------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then close the socket."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- publisher thread -----------------------------------------------------------------

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        import zmq

        ctx = zmq.Context.instance()
        try:
            sock = ctx.socket(zmq.PUB)
            sock.set_hwm(100_000)
            (sock.bind if binds(self.endpoint) else sock.connect)(self.endpoint)
        except zmq.ZMQError as exc:
            failure.append(KVEventsError(f"cannot open the KV events endpoint {self.endpoint}: {exc}"))
            return
        finally:
            ready.set()
        try:
            self._send_loop(sock)
        finally:
            sock.close(linger=1000)

    def _send_loop(self, sock: Any) -> None:
        topic, seq = self.topic.encode(), 0
        encode = self._types["encoder"].encode
        while (item := self._queue.get()) is not _STOP:
            ts, events = item
            batch = self._types["batch"](ts, [_to_wire(e, self._types) for e in events], self.data_parallel_rank)
            sock.send_multipart((topic, seq.to_bytes(8, "big"), encode(batch)))
            seq += 1


def attach_kv_events(engine: AsyncEngine, endpoint: str, topic: str = "") -> KVEventPublisher:
    """Publish `engine`'s prefix-cache changes; call before the engine serves requests."""
    publisher = KVEventPublisher(endpoint, topic)
    engine.core.scheduler.kv_manager.add_event_observer(publisher.observe)
    engine.add_step_observer(publisher.flush)
    return publisher
