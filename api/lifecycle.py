"""Graceful drain on SIGTERM/SIGINT and the readiness answer of /health.

Drain semantics (`--shutdown-timeout`): on the first SIGTERM or SIGINT the server keeps listening
but admits no new request on the generation routes (503 `draining`), /health answers 503 (so a
load balancer or Kubernetes stops sending traffic), and the requests and streams in flight run to
their end. When the last one finishes, or when the timeout expires (the remaining ones are then
cut), uvicorn shuts down and the process exits with status 0. A second signal exits at once.
Read-only routes (/metrics, /info, /dashboard, /docs) keep answering while draining.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from textgen.api.errors import ApiError

log = logging.getLogger("textgen.api")

ADMISSION_ROUTES = frozenset(("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions",
                              "/invocations", "/tokenize", "/chat_tokenize"))


def draining_error() -> ApiError:
    return ApiError(503, "The server is shutting down and accepts no new requests", "draining")


@dataclass(slots=True)
class Drain:
    """In-flight HTTP requests on the admission routes, and whether the server drains.

    Only touched from the event loop. `idle` is set exactly when no admitted request is in flight.
    """

    in_flight: int = 0
    draining_since: float | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    async def run(self, timeout_s: float) -> bool:
        """Stop admitting and wait for the in-flight requests; True when all finished in time."""
        self.draining_since = time.monotonic()
        log.info("draining: %d requests in flight, waiting up to %g s", self.in_flight, timeout_s)
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain timeout (%g s): %d requests still in flight are cut", timeout_s, self.in_flight)
            return False
        log.info("drained: no request in flight")
        return True


class DrainMiddleware:
    """Counts the admission routes' requests (a stream counts until its last byte) and refuses
    new ones with 503 while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ADMISSION_ROUTES or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await draining_error().response()(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the listener.

    uvicorn re-raises a captured signal after shutting down (the process then dies by it, status
    143 for SIGTERM); a drain is a requested, clean stop, so the signal is not re-raised and
    `textgen serve` exits 0.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[Any] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self._loop is None:
            log.warning("%s during the drain: exiting now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        log.info("%s received: draining (shutdown timeout %g s)", signal.Signals(sig).name, self.shutdown_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.drain.run(self.shutdown_timeout_s)
        self.should_exit = True
