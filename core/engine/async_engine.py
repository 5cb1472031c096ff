"""AsyncEngine: the EngineCore on a dedicated thread, with an asyncio front for the HTTP layer.

The event loop never runs a forward pass: requests and aborts are queued to the engine thread,
events come back through `loop.call_soon_threadsafe`. Closing a `generate` iterator before its
final event (client disconnect, task cancellation) aborts the request; the engine thread applies
the abort before its next step, which frees the request's KV blocks.

The engine thread also builds the EngineCore (loads the weights, allocates the KV cache), so it is
the only thread of the process that runs torch's intra-op parallel regions. With libgomp each
thread that starts parallel regions keeps a team of its own; a second team (the main thread's,
from loading the model there) makes libgomp throttle its spin-waits to 1,000 rounds, so the
workers sleep and are woken by futex on every op: decode steps ran 2-2.5x slower on a 2-core
machine. The HTTP side must therefore never run large torch ops on the event loop thread.

Events are delivered once per step: a request's sink, called on the engine thread, only queues
its event; after each step (and after the queued commands are applied) the engine thread hands
every queued event to its event loop in one `call_soon_threadsafe`, instead of one wake-up of
the loop (a self-pipe write, a loop iteration) per token: at 64 decoding requests that is one
wake-up per step instead of 64.

Liveness: the engine thread stamps `_progress_at` after every loop iteration (a step, or an idle
wait of at most 0.5 s), so `health_problem` can tell a stuck step (no stamp for longer than the
watchdog while requests are open) from an idle engine. If the thread dies, every open and every
later request gets an error event at once instead of waiting forever.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from textgen.core.config import EngineConfig
from textgen.core.engine.engine_core import EngineCore
from textgen.core.engine.types import EngineRequest, EngineStats, RequestOutput, StepRecord
from textgen.core.sampling_params import SamplingParams

log = logging.getLogger("textgen.engine")


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self._commands: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._healthy = True
        self._step_error: str | None = None
        self._death: str | None = None  # why the engine thread stopped, once it has
        self._progress_at = time.monotonic()  # written by the engine thread only
        self._open_requests = 0  # generate() iterators not finished yet (event loop side)
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, RequestOutput]] = []  # engine thread
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(config, ready, failure), name="textgen-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        core = self.core
        self.config = core.config
        self.tokenizer = core.tokenizer
        self.hf_config = core.runner.hf_config
        self.lora = core.runner.lora  # LoraManager or None; its registry is safe to use from any thread
        self.model_id = core.config.model_id
        self.model_path = str(core.runner.model_path)
        self.dtype = str(core.runner.dtype)
        self.backend_name = core.backend.name
        self.device = str(core.backend.device)
        loaded = core.runner.loaded
        self.quantize, self.quantization, self.weight_bytes = loaded.method, loaded.quantization, loaded.weight_bytes

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Build the engine on its own thread; raises what building it raised (bad config, a
        model that cannot load)."""
        return cls(config)

    # -- API used by the HTTP layer -----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self._death is not None:
            yield _error_event(request.request_id, f"the engine thread is not running ({self._death})")
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(event: RequestOutput) -> None:
            if threading.current_thread() is self._thread:
                self._outbox.append((loop, events, event))  # delivered after the step (_flush)
                return
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the caller's loop is gone: nobody listens any more
                self.abort(request.request_id)

        self._commands.put(("add", request, sink))
        finished = False
        self._open_requests += 1
        try:
            while not finished:
                event = await events.get()
                finished = event.finished
                yield event
        finally:
            self._open_requests -= 1
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def stats(self) -> EngineStats:
        return self._stats

    def add_step_observer(self, observer: Callable[[StepRecord], None]) -> None:
        """Call `observer(record)` on the engine thread after every step (metrics); it must be
        quick and thread-safe, and an exception in it is logged, never raised into the engine."""
        self.core.step_observers.append(observer)

    def is_healthy(self) -> bool:
        return self._healthy and self._thread.is_alive()

    def is_running(self) -> bool:
        """Whether the engine thread is alive (False once it stopped, for good)."""
        return self._thread.is_alive()

    def health_problem(self, watchdog_s: float) -> str | None:
        """Why the engine cannot serve, or None: a dead thread, a failed last step, or no step
        completed within `watchdog_s` seconds while requests are open."""
        if self._death is not None or not self._thread.is_alive():
            return f"the engine thread is not running ({self._death or 'stopped'})"
        if not self._healthy:
            return f"the last engine step failed: {self._step_error}"
        stalled = time.monotonic() - self._progress_at
        if self._open_requests and stalled > watchdog_s:
            return (f"no engine step completed in the last {stalled:.1f} s (watchdog {watchdog_s:g} s) "
                    f"while {self._open_requests} requests are open")
        return None

    async def health_check(self) -> None:
        """A real one-token generation through the whole engine (TGI's /health does the same)."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        prompt = [bos if bos is not None else 0]
        req = EngineRequest(f"health-{uuid.uuid4().hex}", prompt, SamplingParams(max_new_tokens=1))
        async for event in self.generate(req):
            if event.finish_reason == "error":
                raise RuntimeError(event.error or "health check failed")

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout=10)

    # -- engine thread ------------------------------------------------------------------------

    def _run(self, config: EngineConfig, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            self.core = EngineCore(config)
            self._stats = self.core.stats()
        except BaseException as exc:  # handed to the constructor, which raises it
            failure.append(exc)
            return
        finally:
            ready.set()
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the thread ends here: say why, fail the waiters
            self._die(f"{type(exc).__name__}: {exc}")

    def _die(self, reason: str) -> None:
        self._death = reason or "stopped"
        log.critical("the engine thread stopped: %s; open requests fail and /health answers 503", self._death)
        message = f"the engine thread is not running ({self._death})"
        for rid, st in list(self.core.states.items()):
            st.emit(_error_event(rid, message))
        self.core.states.clear()
        while True:  # requests queued before the flag was seen
            try:
                kind, arg, sink = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                sink(_error_event(arg.request_id, message))
        self._flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_commands(block=not self.core.has_work())
            self._flush()  # events of the commands (e.g. a request rejected at admission)
            try:
                self.core.step()
                self._healthy = True
            except Exception as exc:  # a bug outside per-request isolation: fail what is running, go on
                log.exception("engine step failed; aborting the running requests")
                self._healthy, self._step_error = False, f"{type(exc).__name__}: {exc}"
                self.core.abort(list(self.core.states), reason="error")
            self._flush()
            self._stats = self.core.stats()
            self._progress_at = time.monotonic()

    def _flush(self) -> None:
        """Hand the queued events to their event loops: one call_soon_threadsafe per loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for loop, events, event in outbox:
            by_loop.setdefault(loop, []).append((events, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is gone: nobody listens any more
                for _, event in items:
                    if not event.finished:
                        self.core.abort([event.request_id])

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple[str, Any, Any]) -> None:
        kind, arg, sink = cmd
        if kind == "add":
            self.core.add_request(arg, sink)
        elif kind == "abort":
            self.core.abort([arg])


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """On the event loop: put each event on its request's queue, in the engine's order."""
    for events, event in items:
        events.put_nowait(event)


def _error_event(request_id: str, message: str) -> RequestOutput:
    return RequestOutput(request_id=request_id, token=None, text="", finished=True, finish_reason="error",
                         error=message)
