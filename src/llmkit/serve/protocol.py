"""The OpenAI wire format: request bodies as pydantic models, the error shape, and every check a body must pass.

Bodies are parsed by hand (not by FastAPI's binding) so that every way a body can be wrong — bytes that are not
UTF-8, JSON that is not JSON, NaN, nesting deep enough to exhaust the parser, a wrong type, a huge number — ends
as one `ApiError` with OpenAI's shape `{"error": {"message", "type", "param", "code"}}` and a 4xx status. Types
are strict (`"1"` is not a number, `true` is not an integer), as OpenAI's own server is; unknown fields are
ignored, as clients send vendor extras. Fields we cannot honour (tools, penalties, `json_object`) are refused with
a 400 that says so rather than silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 16  # choices per prompt
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for chat
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_PROMPTS = 64  # prompts per completions request
MAX_EMBED_INPUTS = 2048  # OpenAI's limit for one embeddings request
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


class ApiError(Exception):
    """One refusal, rendered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class GenerationFields(_Body):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extra (vLLM and llama-server take it too); 0 or -1 = no limit
    repetition_penalty: float | None = None  # an extra, as vLLM
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


# ------------------------------------------------------------------------------------------------ parsing


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Body bytes -> JSON value, or a 400 that says what is wrong with them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        value = json.loads(text, parse_constant=_no_constants)  # NaN / Infinity are not JSON
        if _SURROGATE.search(text):  # "\\ud800" parses to a string that is not Unicode text: no tokenizer takes it
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff); send valid "
                       "Unicode text", code="invalid_json") from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    return value


def _where(loc: tuple) -> str:
    """pydantic's location -> `messages[0].content`, without the union-branch names pydantic inserts."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[ContentPart]", "ContentPart",
                      "StreamOptions", "function-after[...]", "literal['float','base64']") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validate(model: type[_Body], data: Any) -> Any:
    """JSON value -> a request model, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_type")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _where(err["loc"])
        if err["type"] == "missing":
            raise ApiError(400, f"missing required field '{param}'", param=param, code="missing_field") from None
        value = err.get("input")
        got = repr(value)[:60] if isinstance(value, str | int | float | bool | None) else type(value).__name__
        raise ApiError(400, f"invalid '{param}': {err['msg']} (got {got})", param=param,
                       code="invalid_type") from None


# ------------------------------------------------------------------------------------------------ checks


def check_range(param: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    """A number outside [low, high] (or (low, high]) is a 400 naming the field, its value and the valid range."""
    if value is None:
        return
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ApiError(400, f"'{param}' must be in {bracket}{low}, {high}], got {value}", param=param,
                       code="invalid_value")


def check_common(req: GenerationFields) -> None:
    """Ranges and the OpenAI fields llmkit cannot honour, shared by completions and chat."""
    check_range("temperature", req.temperature, 0, 100)
    check_range("top_p", req.top_p, 0, 1, low_open=True)
    check_range("top_k", req.top_k, -1, 2**31 - 1)
    check_range("repetition_penalty", req.repetition_penalty, 0, 100, low_open=True)
    check_range("n", req.n, 1, MAX_N)
    if req.seed is not None and not SEED_RANGE[0] <= req.seed < SEED_RANGE[1]:
        raise ApiError(400, f"'seed' must be a 64-bit integer, got {req.seed}", param="seed", code="invalid_value")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be at least 1, got {req.max_tokens}", param="max_tokens",
                       code="invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"'{name}' is not supported by llmkit serve; use 'repetition_penalty' (a "
                           "multiplicative penalty, 1 = off) instead", param=name, code="unsupported")
    if req.logit_bias:
        raise ApiError(400, "'logit_bias' is not supported by llmkit serve", param="logit_bias", code="unsupported")
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP or any(s == "" for s in stops):
        raise ApiError(400, f"'stop' takes up to {MAX_STOP} non-empty strings, got {stops!r}"[:300], param="stop",
                       code="invalid_value")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_chat(req: ChatRequest) -> None:
    """Chat-only fields: logprobs flags, response_format, tools."""
    check_common(req)
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise ApiError(400, f"'max_completion_tokens' must be at least 1, got {req.max_completion_tokens}",
                       param="max_completion_tokens", code="invalid_value")
    check_range("top_logprobs", req.top_logprobs, 0, MAX_TOP_LOGPROBS)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    kind = (req.response_format or {}).get("type", "text")
    if kind != "text":
        raise ApiError(400, f"response_format {{'type': {kind!r}}} is not supported: llmkit serve does not constrain "
                       "decoding, so it could not guarantee valid JSON; ask for JSON in the prompt instead",
                       param="response_format", code="unsupported")
    if req.tools or req.functions:
        raise ApiError(400, "tools / function calling is not supported by llmkit serve", param="tools",
                       code="unsupported")


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    check_range("logprobs", req.logprobs, 0, MAX_TOP_LOGPROBS)
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(400, "'best_of' other than 'n' is not supported by llmkit serve", param="best_of",
                       code="unsupported")
    if req.suffix:
        raise ApiError(400, "'suffix' (fill in the middle) is not supported by llmkit serve", param="suffix",
                       code="unsupported")
    if req.echo and req.logprobs is not None:
        raise ApiError(400, "'echo' with 'logprobs' (prompt logprobs) is not supported by llmkit serve",
                       param="echo", code="unsupported")


def message_text(msg: Message, index: int) -> str:
    """A message's content as one string: text parts joined; anything else (images, audio) is a 400."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{index}].content: only text parts are supported, got type "
                           f"{part.type!r}"[:300], param=f"messages[{index}].content", code="unsupported")
        texts.append(part.text)
    return "".join(texts)


def context_error(prompt_len: int, max_new: int | None, context: int, param: str) -> ApiError:
    """OpenAI's wording for a request that does not fit, with the numbers."""
    if max_new is None:
        asked = f"your prompt is {prompt_len} tokens, which leaves no room for a completion"
    else:
        asked = (f"you requested {prompt_len + max_new} tokens ({prompt_len} in the prompt, {max_new} in the "
                 "completion)")
    return ApiError(400, f"This model's maximum context length is {context} tokens. However, {asked}. Please reduce "
                    "the length of the prompt or the completion.", param=param, code="context_length_exceeded")
