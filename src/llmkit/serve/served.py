"""What `llmkit serve` serves: one loaded model, its engine (generators only), its embedder and the limits around it.

The checks every route shares live here: the API key, the body size limit (413 before anything is parsed), the
model id (404 for any other) and the refusal of generation for a model that cannot generate.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request as HttpRequest

from llmkit.config import FinetuneRunConfig
from llmkit.data.tokenizer import Tokenizer
from llmkit.infer.load import Loaded
from llmkit.serve.engine import Engine
from llmkit.serve.metrics import Metrics
from llmkit.serve.protocol import ApiError, parse_json
from llmkit.tasks.embed import SentenceEncoder

DEFAULT_MAX_BODY = 1_000_000  # bytes: a long conversation fits; a flood does not


@dataclass
class Served:
    """The one model behind the server and the limits around it."""

    model_id: str
    loaded: Loaded
    engine: Engine | None  # None: the model cannot generate (an encoder, a classifier)
    embedder: SentenceEncoder
    max_context: int
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    embed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    @property
    def has_chat_template(self) -> bool:
        """The tokenizer brings a template, or its vocabulary has ChatML's tokens (the template `llmkit chat` uses
        when none is given); otherwise messages would be rendered into text the model never saw."""
        tok = self.tokenizer
        chatml = tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None
        return tok.chat_template is not None or chatml

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"The model {name!r} does not exist: this server serves {self.model_id!r} (see "
                           "GET /v1/models)"[:400], param="model", code="model_not_found")

    def generator_or_400(self) -> Engine:
        if self.engine is None:
            raise ApiError(400, f"model {self.model_id!r} is {describe(self.loaded)}: it embeds text but does not "
                           "generate; use /v1/embeddings", param="model", code="not_a_generator")
        return self.engine

    def check_key(self, http: HttpRequest) -> None:
        if self.api_key is None:
            return
        auth = http.headers.get("authorization", "")
        if not auth:
            raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    async def read_json(self, http: HttpRequest) -> Any:
        """The body under the size limit, parsed: 401 without the key, 413 over the limit, 400 if not JSON."""
        self.check_key(http)
        limit = self.max_body_bytes
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        raw = bytearray()
        async for chunk in http.stream():
            raw += chunk
            if len(raw) > limit:
                raise _too_large(len(raw), limit)
        return parse_json(bytes(raw))


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size:,}+ bytes; this server takes at most {limit:,} (--max-body-bytes)",
                    code="request_too_large")


def is_generator(loaded: Loaded) -> bool:
    classifier = isinstance(loaded.run, FinetuneRunConfig) and loaded.run.train.objective == "classify"
    return loaded.cfg.arch not in ("bert", "mbart") and not classifier


def describe(loaded: Loaded) -> str:
    if loaded.cfg.arch == "mbart":
        return "an encoder-decoder (it rewrites text: `llmkit eval --task text2text`)"
    return "a BERT encoder" if loaded.cfg.arch == "bert" else f"a text classifier on a {loaded.cfg.arch} backbone"


def serve_model(loaded: Loaded, model_id: str, max_batch: int = 8, max_context: int | None = None,
                max_queue: int = 64, **limits: Any) -> Served:
    """A loaded model -> what the app serves: an engine for generators, the embedder for every model."""
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_context=max_context,
                    max_queue=max_queue) if is_generator(loaded) else None
    context = engine.max_context if engine is not None else (max_context or loaded.cfg.block_size)
    return Served(model_id=model_id, loaded=loaded, engine=engine, embedder=SentenceEncoder(loaded),
                  max_context=context, max_queue=max_queue, **limits)
