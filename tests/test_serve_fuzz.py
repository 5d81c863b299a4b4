"""Fuzz the request bodies of a real `llmkit serve`: whatever arrives, the answer is a 2xx or a 4xx in OpenAI's
error shape — never a 500, never a traceback in the log, never a dead server.

Bodies come from hypothesis (derandomized: the same cases every run): random JSON, valid requests with one field
replaced by a random value (wrong types, huge numbers, deep nesting), random bytes (invalid UTF-8), and nested
brackets deep enough to exhaust a recursive parser.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers_serve import running_server, tiny_chat_run

MODEL = "fuzz"
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 4},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
}
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "stop", "seed", "logprobs", "top_logprobs", "stream", "stream_options", "echo",
          "response_format", "encoding_format", "dimensions", "repetition_penalty", "best_of", "logit_bias"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**30]),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.sampled_from(["", "user", "assistant", "\ud7ff", "\ud800", "\x00", "fuzz", "text",
                                     "json_object"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@st.composite
def bodies(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(PATHS))
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "json", "bytes", "deep", "surrogate"]))
    if kind == "mutated":
        body = dict(VALID[path])
        for _ in range(draw(st.integers(1, 3))):
            body[draw(st.sampled_from(FIELDS))] = draw(values)
        if draw(st.booleans()):  # keep generation short when a mutation asks for many tokens
            body["max_tokens"] = 4
        return path, json.dumps(body).encode()
    if kind == "surrogate":  # valid JSON whose text is not Unicode: a lone UTF-16 surrogate escape
        body = dict(VALID[path], stop="x")
        text = "a" + chr(draw(st.integers(0xD800, 0xDFFF))) + "b"
        key = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}[path]
        where = draw(st.sampled_from([key, "stop", "model"]))
        body[where] = [{"role": "user", "content": text}] if where == "messages" else text
        return path, json.dumps(body).encode()
    if kind == "json":
        return path, json.dumps(draw(values)).encode()
    if kind == "bytes":
        return path, draw(st.binary(max_size=200))
    depth = draw(st.sampled_from([100, 5_000, 200_000]))
    field = draw(st.sampled_from(["messages", "prompt", "input", "response_format", "stop"]))
    return path, (f'{{"model": "{MODEL}", "{field}": ' + "[" * depth + "]" * depth + "}").encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tiny_chat_run(tmp_path_factory.mktemp("fuzz-run") / "tiny", block_size=64)
    with running_server(run, tmp_path_factory.mktemp("fuzz-log"), "--served-model-name", MODEL,
                        "--max-body-bytes", "600000") as s:
        yield s


def check_answer(status: int, body) -> None:
    assert status < 500, body
    if status >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body
        assert isinstance(err["message"], str) and err["message"]
    elif isinstance(body, str):  # a stream
        assert body.rstrip().endswith("data: [DONE]"), body[-200:]


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=bodies())
def test_no_body_gets_a_500(server, case):
    path, raw = case
    check_answer(*server.post(path, raw))


def test_server_survives_the_fuzz(server):
    # Runs after the fuzz (file order): the process is alive, still answers properly, and logged no traceback.
    assert server.alive()
    status, body = server.post("/v1/chat/completions", VALID["/v1/chat/completions"])
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert server.get("/health")[0] == 200
    assert "Traceback" not in server.log.read_text()
