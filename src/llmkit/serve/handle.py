"""What a caller gets from the engine: Request in, a Handle out that yields Events (blocking or asyncio).

Kept apart from the engine's scheduling (engine.py) so each reads in one sitting; import them from
llmkit.serve.engine, which re-exports everything here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from llmkit.infer.generate import SamplingConfig
from llmkit.serve.batch import TokenLogprob


@dataclass
class Request:
    """One generation: the caller templates and encodes the prompt, so the engine never guesses a format."""

    prompt_ids: list[int]  # BOS included as the tokenizer wants; must be non-empty
    sampling: SamplingConfig  # max_new_tokens, temperature, top_k, top_p, seed, stop, repetition_penalty
    eos_ids: set[int]  # tokens that end the text (chat: end-of-turn ids; else the tokenizer's eos)
    logprobs: int | None = None  # None = off; k >= 0 = each emitted token's logprob plus its top-k alternatives


@dataclass
class Event:
    """One chunk of a request's output, in order; the last one has `finish_reason` set."""

    text: str  # new text safe to show: never part of a stop string, never half a UTF-8 character; "" allowed
    token_ids: list[int]  # the tokens this chunk adds: none that only spell a stop string (the last may hold its start)
    logprobs: list[TokenLogprob] | None  # one per token in token_ids when the request asked; else None
    finish_reason: str | None  # None while running; "stop" (eos or stop string) or "length" on the last event
    prompt_tokens: int
    completion_tokens: int  # exact count so far: the tokens of all text returned, a stop string's excluded


class EngineError(RuntimeError):
    """The model failed while serving this request (not the client's fault: the HTTP layer answers 500)."""


class Handle:
    """A submitted request's output: iterate it (blocking or async), cancel it, or wait for the merged result."""

    def __init__(self, req: Request) -> None:
        self.request = req
        self.submitted = time.perf_counter()
        self.cancelled = False
        self._events: list[Event] = []
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._on_cancel: Callable[[], None] | None = None  # wakes the engine thread

    @property
    def done(self) -> bool:
        return self._error is not None or bool(self._events and self._events[-1].finish_reason)

    def __iter__(self) -> Iterator[Event]:
        """Yield events as the engine thread produces them; blocks between them; ends after the final event.
        Leaving the loop early does not cancel the request (call cancel())."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and self._error is None:
                    self._cond.wait()
                if i >= len(self._events):
                    raise EngineError(f"generation failed: {self._error}") from self._error
                ev = self._events[i]
            i += 1
            yield ev
            if ev.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[Event]:
        """The same events for asyncio code: waiting never blocks the event loop (the engine thread wakes it
        with loop.call_soon_threadsafe). Call it inside the running loop. When the task waiting on it is cancelled
        (Starlette cancels a streaming response's task when the client disconnects), the request is cancelled."""
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        flag = asyncio.Event()
        waiter = (asyncio.get_running_loop(), flag)
        with self._cond:
            self._waiters.append(waiter)
        i = 0
        try:
            while True:
                with self._cond:
                    ready, error = self._events[i:], self._error
                if not ready:
                    if error is not None:
                        raise EngineError(f"generation failed: {error}") from error
                    try:
                        await flag.wait()
                    except asyncio.CancelledError:
                        self.cancel()
                        raise
                    flag.clear()
                    continue
                for ev in ready:
                    i += 1
                    yield ev
                    if ev.finish_reason is not None:
                        return
        finally:
            with self._cond:
                self._waiters.remove(waiter)

    def cancel(self) -> None:
        """The client went away: the row leaves the batch before the next step (or the queue, if it still
        waits) and the handle ends with a final event, finish_reason "stop". Safe to call twice or after the end."""
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def result(self) -> Event:
        """Block until the request ends; one Event with the whole text, token_ids and logprobs merged and the
        final finish_reason and counts. Works whether or not the handle was iterated."""
        with self._cond:
            self._cond.wait_for(lambda: self.done)
            events, error = list(self._events), self._error
        if error is not None:
            raise EngineError(f"generation failed: {error}") from error
        last = events[-1]
        lps = None if self.request.logprobs is None else [lp for ev in events for lp in ev.logprobs or []]
        return Event(text="".join(ev.text for ev in events), token_ids=[t for ev in events for t in ev.token_ids],
                     logprobs=lps, finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                     completion_tokens=last.completion_tokens)

    def _put(self, ev: Event | None, error: BaseException | None = None) -> None:
        """Called by the engine thread: append an event (or fail) and wake every waiter."""
        with self._cond:
            if ev is not None:
                self._events.append(ev)
            self._error = error or self._error
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that event loop is closed: nobody is listening there any more
                pass
