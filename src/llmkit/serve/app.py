"""The FastAPI app of `llmkit serve`: the routes, and every error in OpenAI's shape.

Routes are plain functions of the raw request: the body is read by `Served.read_json` under a size limit (413
before anything is parsed), parsed and validated by `protocol`, so no malformed body can reach a code path that
answers 500. The key (`--api-key`) guards every /v1 route; `/`, `/health` and `/metrics` stay open so a person and
a monitor can reach them. One model is served; its id is what requests name in `model` (404 for any other).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from llmkit.serve import openai_routes
from llmkit.serve.engine import EngineError
from llmkit.serve.metrics import CountRequests
from llmkit.serve.protocol import MAX_EMBED_INPUTS, ApiError, EmbeddingRequest, validate
from llmkit.serve.served import Served

# ------------------------------------------------------------------------------------------------ routes


async def embeddings(http: HttpRequest, served: Served) -> Response:
    """Mean-pooled, L2-normalised states: exactly `llmkit embed` (the same SentenceEncoder, the same framing)."""
    req = validate(EmbeddingRequest, await served.read_json(http))
    served.check_model(req.model)
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or len(texts) > MAX_EMBED_INPUTS or not all(isinstance(t, str) and t for t in texts):
        raise ApiError(400, f"'input' must be a non-empty string or a list of 1 to {MAX_EMBED_INPUTS} non-empty "
                       "strings (token ids are not supported: send text)", param="input", code="invalid_value")
    enc = served.embedder
    if req.dimensions is not None and req.dimensions != enc.dim:
        raise ApiError(400, f"'dimensions' must be {enc.dim} for this model (it cannot shorten its embeddings), got "
                       f"{req.dimensions}", param="dimensions", code="invalid_value")

    def run() -> tuple[np.ndarray, int]:
        with served.embed_lock:
            ids = enc.tokenize(texts)  # once: the usage count and the embeddings read the same ids
            return enc.embed_ids(ids), sum(len(row) for row in ids)

    emb, tokens = await run_in_threadpool(run)
    data = []
    for i, row in enumerate(emb):
        vec: Any = (base64.b64encode(row.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                    else row.tolist())
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return JSONResponse({"object": "list", "data": data, "model": served.model_id,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def models(http: HttpRequest, served: Served) -> Response:
    served.check_key(http)
    card = {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "llmkit",
            "max_context": served.max_context, "generates": served.engine is not None,
            "chat_template": served.has_chat_template, "embedding_dim": served.embedder.dim}
    return JSONResponse({"object": "list", "data": [card]})


def _endpoint(route: Callable[[HttpRequest, Served], Awaitable[Response]], served: Served) -> Callable:
    async def endpoint(request: HttpRequest) -> Response:
        try:
            return await route(request, served)
        except RecursionError:  # pydantic or the chat template on absurdly nested input
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None

    return endpoint


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(served: Served) -> FastAPI:
    """The ASGI app; its lifespan starts the engine's thread and stops it (ending any request still running)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if served.engine is not None:
            served.engine.start()
        try:
            yield
        finally:
            if served.engine is not None:
                await asyncio.to_thread(served.engine.close)

    app = FastAPI(title="llmkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page = files("llmkit.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        # The page runs only its own inline code and talks only to this server: nothing loads from elsewhere.
        csp = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'")
        return HTMLResponse(page, headers={"content-security-policy": csp, "cache-control": "no-cache"})

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": served.model_id})

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        stats = served.engine.stats if served.engine is not None else None
        return PlainTextResponse(served.metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def list_models(request: HttpRequest) -> Response:
        return models(request, served)

    for path, route in (("/v1/completions", openai_routes.completions),
                        ("/v1/chat/completions", openai_routes.chat_completions), ("/v1/embeddings", embeddings)):
        app.add_api_route(path, _endpoint(route, served), methods=["POST"])

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"[:300], code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HttpRequest, e: RequestValidationError) -> JSONResponse:
        return _error(ApiError(400, str(e)[:300], code="invalid_request"))

    @app.exception_handler(EngineError)
    async def engine_error(request: HttpRequest, e: EngineError) -> JSONResponse:
        # The model failed, not the request: a 500, still in OpenAI's shape so clients can show the message.
        return _error(ApiError(500, str(e)[:400], type="server_error", code="engine_error"))

    app.add_middleware(CountRequests, metrics=served.metrics)
    return app
