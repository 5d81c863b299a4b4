"""POST /v1/completions and /v1/chat/completions: an OpenAI body -> engine requests -> an OpenAI answer or stream.

Each prompt is submitted `n` times (choice `p * n + i` is prompt p's i-th; with a seed it is seeded `seed + i`, so
choices differ but a request repeats exactly). Prompts are encoded here, as `llmkit generate` and `llmkit chat`
encode them (BOS where the model wants it, the chat template, its end-of-turn tokens), so `usage` counts what the
model read. A request that cannot fit the context is refused with the numbers before anything is queued.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from llmkit.data.tokenizer import end_of_turn_ids
from llmkit.errors import LLMKitError
from llmkit.infer.generate import SamplingConfig
from llmkit.serve.engine import EngineError, Event, Handle, QueueFull, Request, TokenLogprob
from llmkit.serve.protocol import (
    MAX_PROMPTS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    GenerationFields,
    check_chat,
    check_completion,
    context_error,
    message_text,
    stop_list,
    validate,
)
from llmkit.serve.served import Served
from llmkit.serve.stream import EventStream, cancel_on_disconnect, merged, sse


@dataclass
class Choice:
    """One choice's events merged, for a whole answer and for `usage`."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, ev: Event) -> None:
        self.text += ev.text
        self.logprobs += ev.logprobs or []
        self.finish_reason = ev.finish_reason or self.finish_reason
        self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens


@dataclass
class Job:
    """What one HTTP request asked, ready to submit."""

    chat: bool
    requests: list[Request]
    prompt_texts: list[str]  # echoed back by completions with `echo`
    n: int
    model: str
    stream: bool
    include_usage: bool
    echo: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


# ------------------------------------------------------------------------------------------------ building


def _sampling(req: GenerationFields, prompt_len: int, max_new: int | None, default_new: int | None, context: int,
              seed_offset: int, param: str) -> SamplingConfig:
    if prompt_len >= context or (max_new is not None and prompt_len + max_new > context):
        raise context_error(prompt_len, max_new, context, param)
    room = context - prompt_len
    new = max_new if max_new is not None else min(default_new or room, room)
    seed = None
    if req.seed is not None:
        seed = req.seed + seed_offset
        seed = seed - 2**64 if seed >= 2**64 else seed  # stay inside torch's 64-bit seed range
    try:
        return SamplingConfig(max_new_tokens=new, temperature=1.0 if req.temperature is None else req.temperature,
                              top_k=max(0, req.top_k or 0), top_p=1.0 if req.top_p is None else req.top_p,
                              repetition_penalty=req.repetition_penalty or 1.0, seed=seed, stop=stop_list(req.stop))
    except LLMKitError as e:
        raise ApiError(400, str(e), code="invalid_value") from None


def _job(served: Served, req: GenerationFields, prompts: list[list[int]], texts: list[str], max_new: int | None,
         default_new: int | None, eos: set[int], logprobs: int | None, chat: bool, param: str) -> Job:
    n = req.n or 1
    requests = [Request(prompt_ids=ids, eos_ids=eos, logprobs=logprobs,
                        sampling=_sampling(req, len(ids), max_new, default_new, served.max_context, i, param))
                for ids in prompts for i in range(n)]
    opts = req.stream_options
    return Job(chat=chat, requests=requests, prompt_texts=texts, n=n, model=served.model_id,
               stream=bool(req.stream), include_usage=bool(req.stream and opts and opts.include_usage))


def _completion_prompts(served: Served, prompt: Any) -> tuple[list[list[int]], list[str]]:
    """`prompt` as text, texts, token ids or lists of ids -> ids (BOS as the model wants) and texts."""
    tok = served.tokenizer
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "'prompt' is an empty list; send a string or a list of strings", param="prompt",
                       code="invalid_value")
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request", param="prompt",
                       code="invalid_value")
    ids_list, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids = tok.encode_prompt(p)
        else:
            vocab = min(tok.vocab_size, served.loaded.cfg.vocab_size)  # ids the tokenizer and the model both know
            bad = [i for i in p if not 0 <= i < vocab]
            if bad:
                raise ApiError(400, f"'prompt' holds token id {bad[0]}, outside the vocabulary [0, {vocab})",
                               param="prompt", code="invalid_value")
            ids = list(p)
        # An empty prompt starts a fresh document, as `llmkit generate` does.
        ids_list.append(ids or tok.with_bos([]) or [tok.eos_id])
        texts.append(p if isinstance(p, str) else tok.decode(p))
    return ids_list, texts


async def _generation_request(http: HttpRequest, served: Served, model, check):
    """The body parsed and checked (fields, model id, values), and the served model able to generate."""
    req = validate(model, await served.read_json(http))
    served.check_model(req.model)
    check(req)
    served.generator_or_400()
    return req


async def completions(http: HttpRequest, served: Served) -> Response:
    t0 = time.perf_counter()
    req = await _generation_request(http, served, CompletionRequest, check_completion)
    prompts, texts = await run_in_threadpool(_completion_prompts, served, req.prompt)  # a long text: off the loop
    job = _job(served, req, prompts, texts, req.max_tokens, 16, {served.tokenizer.eos_id}, req.logprobs,
               chat=False, param="prompt")
    job.echo = bool(req.echo)
    return await _run(http, served, job, t0)


async def chat_completions(http: HttpRequest, served: Served) -> Response:
    t0 = time.perf_counter()
    req = await _generation_request(http, served, ChatRequest, check_chat)
    tok = served.tokenizer
    if not served.has_chat_template:
        raise ApiError(400, f"model {served.model_id!r} has no chat template (its tokenizer defines none and lacks "
                       "ChatML's <|im_start|>/<|im_end|> tokens), so it cannot take 'messages'; send a plain "
                       "'prompt' to /v1/completions instead", param="messages", code="no_chat_template")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
                for i, m in enumerate(req.messages)]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    except (LLMKitError, TemplateError) as e:  # the template's own raise_exception, or a template that fails
        raise ApiError(400, f"the chat template refused these messages: {e}"[:400], param="messages",
                       code="invalid_value") from None
    ids = await run_in_threadpool(tok.encode_prompt, text)  # BOS unless the template wrote it, as `llmkit chat`
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    job = _job(served, req, [ids], [text], max_new, None, set(end_of_turn_ids(tok)), k, chat=True,
               param="messages")
    return await _run(http, served, job, t0)


# ------------------------------------------------------------------------------------------------ answering


def _submit(served: Served, job: Job) -> list[Handle]:
    """All of a job's requests or none: a refusal part-way cancels those already queued."""
    engine = served.generator_or_400()
    handles: list[Handle] = []
    try:
        for r in job.requests:
            handles.append(engine.submit(r))
    except QueueFull:
        for h in handles:
            h.cancel()
        raise ApiError(429, f"the server is busy: its queue of {served.max_queue} waiting requests is full; retry "
                       "shortly", code="queue_full", type="rate_limit_exceeded") from None
    except LLMKitError as e:
        for h in handles:
            h.cancel()
        raise ApiError(400, str(e), code="invalid_value") from None
    return handles


def _logprobs(job: Job, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's two logprobs shapes: chat's list of objects, completions' parallel lists (with text offsets)."""
    if job.chat:
        return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                             "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(a.encode())}
                                              for a, lp in t.top]} for t in items], "refusal": None}
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [_by_text(t.top) for t in items], "text_offset": offsets}


def _by_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """Completions' top_logprobs is keyed by text: two ids that decode alike (half characters) keep the likelier."""
    out: dict[str, float] = {}
    for text, lp in top:
        out.setdefault(text, lp)
    return out


def _usage(job: Job, choices: list[Choice]) -> dict[str, int]:
    prompt = sum(choices[p * job.n].prompt_tokens or len(job.requests[p * job.n].prompt_ids)
                 for p in range(len(choices) // job.n))
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _envelope(job: Job, chunk: bool = False) -> dict[str, Any]:
    kind = job.object + (".chunk" if chunk and job.chat else "")
    return {"id": ("chatcmpl-" if job.chat else "cmpl-") + job.id, "object": kind, "created": job.created,
            "model": job.model, "system_fingerprint": None}


async def _run(http: HttpRequest, served: Served, job: Job, t0: float) -> Response:
    handles = _submit(served, job)
    if job.stream:
        return EventStream(_frames(served, job, handles, t0))
    choices = [Choice() for _ in handles]
    first = True
    async with cancel_on_disconnect(http, handles):
        async for i, ev in merged(handles):
            if first and ev.token_ids:
                served.metrics.observe_ttft(time.perf_counter() - t0)
                first = False
            choices[i].add(ev)
    out = []
    for i, c in enumerate(choices):
        prefix = job.prompt_texts[i // job.n] if job.echo else ""
        lp = _logprobs(job, c.logprobs, len(prefix)) if job.requests[i].logprobs is not None else None
        body: dict[str, Any] = {"index": i, "logprobs": lp, "finish_reason": c.finish_reason or "stop"}
        if job.chat:
            body["message"] = {"role": "assistant", "content": c.text, "refusal": None}
        else:
            body["text"] = prefix + c.text
        out.append(body)
    return JSONResponse({**_envelope(job), "choices": out, "usage": _usage(job, choices)})


def _chunk(job: Job, i: int, text: str | None, logprobs: dict | None = None, finish: str | None = None,
           role: bool = False) -> bytes:
    choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": finish}
    if job.chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    extra = {"usage": None} if job.include_usage else {}
    return sse({**_envelope(job, chunk=True), "choices": [choice], **extra})


async def _frames(served: Served, job: Job, handles: list[Handle], t0: float):  # -> AsyncIterator[bytes]
    """The SSE frames of a streamed answer: chat's first chunk per choice carries the role, every chunk the same
    id; each choice ends with a chunk holding its finish_reason; then usage if asked, then [DONE]."""
    choices = [Choice() for _ in handles]
    offsets = [0] * len(handles)
    for i in range(len(handles)):
        if job.chat:
            yield _chunk(job, i, "", role=True)
        elif job.echo:
            offsets[i] = len(job.prompt_texts[i // job.n])
            yield _chunk(job, i, job.prompt_texts[i // job.n])
    first = True
    try:
        async for i, ev in merged(handles):
            if first and ev.token_ids:
                served.metrics.observe_ttft(time.perf_counter() - t0)
                first = False
            choices[i].add(ev)
            if ev.text or ev.logprobs:
                lp = _logprobs(job, ev.logprobs, offsets[i]) if job.requests[i].logprobs is not None else None
                offsets[i] += len(ev.text)
                yield _chunk(job, i, ev.text, lp)
            if ev.finish_reason:
                yield _chunk(job, i, None if job.chat else "", finish=ev.finish_reason)
    except EngineError as e:  # the status is already sent: report in the stream, as OpenAI does
        yield sse(ApiError(500, str(e), type="server_error", code="engine_error").body())
    if job.include_usage:
        yield sse({**_envelope(job, chunk=True), "choices": [], "usage": _usage(job, choices)})
    yield sse("[DONE]")
