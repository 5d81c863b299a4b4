"""Engine handles -> HTTP: merge several handles' events, and send Server-Sent Events that stop when the client goes.

A client that disconnects must free its batch slot at once, not when the next token happens to fail to send: the
SSE response listens for `http.disconnect` while it streams and, when it comes, cancels the stream, whose `finally`
cancels the engine handles. Non-streamed answers get the same guarantee from `cancel_on_disconnect`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from llmkit.serve.engine import Event, Handle


async def merged(handles: list[Handle]) -> AsyncIterator[tuple[int, Event]]:
    """(handle index, event) pairs from all handles as they come; every handle is cancelled if the consumer stops
    early (a disconnect, an error), so no row keeps decoding for nobody."""
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, handle: Handle) -> None:
        try:
            async for event in handle:
                queue.put_nowait((i, event))
        except Exception as e:  # handed to the consumer, which decides what the client sees
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for h in handles:
            h.cancel()
        for t in tasks:
            t.cancel()


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@asynccontextmanager
async def cancel_on_disconnect(request: Request, handles: list[Handle]) -> AsyncIterator[None]:
    """While the body runs (the request body is already read), a disconnect cancels `handles`."""

    async def watch() -> None:
        await _wait_disconnect(request.receive)
        for h in handles:
            h.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class EventStream(StreamingResponse):
    """`text/event-stream` from an async iterator of ready-made SSE frames, cut short by a client disconnect
    (starlette's own StreamingResponse notices a gone client only when a send fails)."""

    def __init__(self, frames: AsyncIterator[bytes]) -> None:
        super().__init__(frames, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.frames = frames

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await _wait_disconnect(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                async for frame in self.frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away between two frames
                pass
            finally:
                with anyio.CancelScope(shield=True):  # runs merged()'s finally: the handles are cancelled
                    await self.frames.aclose()  # type: ignore[attr-defined]
                tg.cancel_scope.cancel()
