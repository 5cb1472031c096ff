"""Server-sent events as TGI (axum) writes them: `data: <compact JSON>\\n\\n`, a `:\\n\\n` comment
every 15 s while idle, `data: [DONE]\\n\\n` only where the caller adds it (OpenAI routes).

`EventStreamResponse` always watches for the client's disconnect (also while no event is due,
e.g. during a long prefill) and always closes the event iterator, which aborts the request.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b":\n\n"


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as is (serde_json's output)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


async def with_keep_alive(events: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """Yield `events`, plus a keep-alive comment whenever `interval` seconds pass without one.

    The pending `__anext__` is kept across keep-alives (never cancelled), so no event is lost.
    """
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEP_ALIVE
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None,
                 keep_alive: float = 15.0) -> None:
        self._events = events
        all_headers = {"cache-control": "no-cache", **(headers or {})}
        super().__init__(with_keep_alive(events, keep_alive), headers=all_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watcher):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()
            with contextlib.suppress(BaseException):
                await self._events.aclose()
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            exc = stream.exception()
            if not isinstance(exc, OSError):
                raise exc


_END = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several iterators in arrival order as (stream index, item). The first exception
    ends the merged stream; every source is closed when the merged stream ends or is closed."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, source: AsyncIterator[Any]) -> None:
        try:
            async for item in source:
                await queue.put((i, item, None))
            await queue.put((i, _END, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, _END, exc))
        finally:
            await source.aclose()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
