"""Continuous batching: many requests share each decode step of one model, owned by one background thread.

Between two decode steps the thread drops finished and cancelled rows, admits waiting requests (FIFO) into free
slots (each prefilled alone, then merged into the shared cache: serve/batch.py), and runs one step for every row
(Request, Handle and Event live in serve/handle.py and are re-exported here).
So nobody waits behind a long generation while a slot is free, and a row computes exactly what it would alone:
greedy text equals `llmkit.infer.generate.generate`'s, and a seeded request draws from its own generator.

Interface notes for the HTTP layer: `Engine.max_context` is the limit submit() checks. An Event's text and
token_ids never include any part of a stop string (infer/textstream.py holds it back). Handle.cancel() frees the
slot; so does cancelling an asyncio task while it awaits the handle's next event (what Starlette does when a
streaming client disconnects), but a plain `break` out of a loop does not. If the model itself fails, the
affected handles raise `EngineError` from iteration and result(); the engine goes on with the next requests.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from llmkit.data.tokenizer import Tokenizer
from llmkit.errors import ConfigError, LLMKitError
from llmkit.serve.batch import Batch, Row, TokenLogprob
from llmkit.serve.handle import EngineError, Event, Handle, Request

__all__ = ["Engine", "EngineError", "Event", "Handle", "QueueFull", "Request", "TokenLogprob"]


class QueueFull(LLMKitError):
    """`max_queue` requests already wait for a batch slot (the HTTP layer answers 429)."""


class Engine:
    """Owns the model on one background thread; requests join the running batch between decode steps.

    close(): every request still running or waiting ends with a final event, finish_reason "length" (the text
    generated so far is kept), and submit() afterwards raises ConfigError.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_batch: int = 8,
                 max_context: int | None = None, max_queue: int = 64) -> None:
        """max_context defaults to model.cfg.block_size and may not exceed it (ConfigError)."""
        block = model.cfg.block_size
        if max_context is not None and not 1 < max_context <= block:
            raise ConfigError(f"--max-context {max_context}: must be between 2 and the model's context ({block})")
        if max_batch < 1 or max_queue < 0:
            raise ConfigError(f"--max-batch must be >= 1 (got {max_batch}) and the queue size >= 0 (got {max_queue})")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context: int = max_context or block
        self._batch = Batch(model)
        self._handles: list[Handle] = []  # parallel to self._batch.rows
        self._waiting: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._admitting = 0  # requests taken from the queue, being prefilled
        self._stats = dict(requests_total=0, prompt_tokens_total=0, completion_tokens_total=0, steps_total=0)
        self._ttft: deque[float] = deque(maxlen=1000)

    def start(self) -> None:
        """Start the one background thread that owns the model (idempotent)."""
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the thread and end every unfinished handle (see the class docstring)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._end_all("length")

    def submit(self, req: Request) -> Handle:
        """Queue a request. ConfigError when the prompt is empty, holds an id outside the vocabulary, or prompt +
        max_new_tokens exceeds max_context (naming the numbers); QueueFull when `max_queue` requests wait."""
        n, new, vocab = len(req.prompt_ids), req.sampling.max_new_tokens, self.model.cfg.vocab_size
        if n == 0:
            raise ConfigError("the prompt is empty: give at least one token")
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            bad = next(t for t in req.prompt_ids if not 0 <= t < vocab)
            raise ConfigError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if n + new > self.max_context:
            raise ConfigError(f"the prompt is {n} tokens and max_new_tokens is {new}: {n + new} is over the context "
                              f"of {self.max_context} tokens (at most {max(self.max_context - n, 0)} new tokens fit)")
        if req.logprobs is not None and req.logprobs < 0:
            raise ConfigError(f"logprobs must be >= 0 (the number of alternatives per token), got {req.logprobs}")
        handle = Handle(req)
        handle._on_cancel = self._wake
        with self._cond:
            if self._closed:
                raise ConfigError("the engine is closed")
            if self._queue_depth() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (the queue is full); retry later")
            self._waiting.append(handle)
            self._stats["requests_total"] += 1
            self._stats["prompt_tokens_total"] += n
            self._cond.notify_all()
        return handle

    @property
    def stats(self) -> dict:
        """requests_total, requests_running, queue_depth, prompt_tokens_total, completion_tokens_total,
        time_to_first_token_seconds (a list of the last 1000 values), steps_total."""
        with self._cond:
            running = sum(not h.done for h in self._handles)  # a finished row may not have left the batch yet
            return dict(self._stats, requests_running=running,
                        queue_depth=max(self._queue_depth(), 0),
                        time_to_first_token_seconds=list(self._ttft))

    def _queue_depth(self) -> int:
        """Requests that wait for a slot (those a free slot will take at the next step do not count)."""
        free = self.max_batch - len(self._handles) - self._admitting
        return sum(not h.cancelled for h in self._waiting) - free

    # ------------------------------------------------------------------ the engine thread
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._waiting or self._handles)
                    if self._closed:
                        return
                    admit = []
                    while self._waiting and len(self._handles) + len(admit) < self.max_batch:
                        h = self._waiting.popleft()
                        if h.cancelled:
                            h._put(self._empty_event(h, "stop"))
                        else:
                            admit.append(h)
                    self._admitting = len(admit)
                try:
                    self._admit(admit)
                    self._drop_done()
                    if self._handles:
                        self._batch.step()
                        self._stats["steps_total"] += 1
                        for h, row in zip(self._handles, self._batch.rows):
                            self._emit(h, row)
                        self._drop_done()
                except Exception as exc:  # the model failed: fail these requests, keep serving the next ones
                    for h in self._handles + admit:
                        if not h.done:
                            h._put(None, exc)
                    self._batch = Batch(self.model)
                    with self._cond:
                        self._handles, self._admitting = [], 0

    def _admit(self, handles: list[Handle]) -> None:
        """Prefill each new request alone, emit its first token, and merge those still running into the batch."""
        rows, caches, joined = [], [], []
        for h in handles:
            req = h.request
            row = self._batch.new_row(req.prompt_ids, req.sampling, req.eos_ids, req.logprobs, self.tokenizer)
            cache = self._batch.prefill(row)
            with self._cond:
                self._ttft.append(time.perf_counter() - h.submitted)
            self._emit(h, row)
            if row.finish is None and not h.cancelled:
                rows.append(row)
                caches.append(cache)
                joined.append(h)
            elif row.finish is None:
                self._finish(h, row, "stop")
        if rows:
            self._batch.add(rows, caches)
        with self._cond:
            self._handles = self._handles + joined
            self._admitting = 0

    def _drop_done(self) -> None:
        """Finished rows and cancelled ones leave the batch."""
        keep = []
        for i, (h, row) in enumerate(zip(self._handles, self._batch.rows)):
            if row.finish is None and h.cancelled:
                self._finish(h, row, "stop")
            if row.finish is None:
                keep.append(i)
        if len(keep) < len(self._handles):
            self._batch.keep(keep)
            with self._cond:
                self._handles = [self._handles[i] for i in keep]

    def _emit(self, h: Handle, row: Row) -> None:
        """Send what became safe to show since the last event (nothing if nothing did, unless the row ended)."""
        text, ids = row.stream.take()
        if text or ids or row.finish:
            self._send(h, row, text, ids)

    def _finish(self, h: Handle, row: Row, reason: str) -> None:
        row.finish = reason
        row.stream.finish()
        text, ids = row.stream.take()
        self._send(h, row, text, ids)

    def _send(self, h: Handle, row: Row, text: str, ids: list[int]) -> None:
        done = row.stream.shown_ids
        lps = None if row.logprobs is None else row.token_logprobs[done - len(ids):done]
        with self._cond:
            self._stats["completion_tokens_total"] += len(ids)
        h._put(Event(text=text, token_ids=ids, logprobs=lps, finish_reason=row.finish,
                     prompt_tokens=len(row.prompt_ids), completion_tokens=done))

    def _empty_event(self, h: Handle, reason: str) -> Event:
        """The only event of a request that ends before it ever ran (cancelled or closed while waiting)."""
        return Event(text="", token_ids=[], logprobs=None if h.request.logprobs is None else [],
                     finish_reason=reason, prompt_tokens=len(h.request.prompt_ids), completion_tokens=0)

    def _end_all(self, reason: str) -> None:
        """After the thread stopped: running rows end with what they have, waiting requests with nothing."""
        for h, row in zip(self._handles, self._batch.rows):
            if not h.done:
                self._finish(h, row, reason)
        for h in self._waiting:
            if not h.done:
                h._put(self._empty_event(h, reason))
        self._handles, self._waiting = [], deque()
        self._batch = Batch(self.model)
