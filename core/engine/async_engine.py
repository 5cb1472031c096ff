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
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
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
        self.model_id = core.config.model_id
        self.model_path = str(core.runner.model_path)
        self.dtype = str(core.runner.dtype)
        self.backend_name = core.backend.name
        self.device = str(core.backend.device)

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Build the engine on its own thread; raises what building it raised (bad config, a
        model that cannot load)."""
        return cls(config)

    # -- API used by the HTTP layer -----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(event: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the caller's loop is gone: nobody listens any more
                self.abort(request.request_id)

        self._commands.put(("add", request, sink))
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.finished
                yield event
        finally:
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
        self._loop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_commands(block=not self.core.has_work())
            try:
                self.core.step()
                self._healthy = True
            except Exception:  # a bug outside per-request isolation: fail what is running, go on
                log.exception("engine step failed; aborting the running requests")
                self._healthy = False
                self.core.abort(list(self.core.states), reason="error")
            self._stats = self.core.stats()

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
